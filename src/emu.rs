//! The emulated CUDA device (feature `emulate`): `kernels/*.cu` compiled as host
//! C++ behind a fake `libcuda`, so the crate's CUDA path (validation, cudarc
//! allocation, argument packing, launch geometry) and the kernels' logic run on a
//! machine with no GPU and no toolkit.
//!
//! Opt-in only: nothing happens until [`install`] is called, and [`install`]
//! refuses when a real CUDA driver can be loaded, so it can never shadow a GPU.
//! Emulation proves logic, never speed.

use std::ffi::c_char;
use std::sync::OnceLock;

/// Why the emulated device could not be installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmuError {
    /// A real CUDA driver is present: use it instead.
    #[error("a real CUDA driver is present; the emulated device is not installed")]
    RealDriverPresent,
    /// cudarc had already loaded a driver before `install` was called.
    #[error("the emulated driver could not be loaded: {0}")]
    Load(String),
}

/// Order in which the threads of a block are run between barriers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Thread 0 first.
    Identity,
    /// Last thread first (blocks also claimed last-first).
    Reversed,
    /// A seeded random permutation per block.
    Shuffled(u64),
    /// One warp per block (chosen by the seed) runs as far as it can — to its next
    /// `__syncthreads` — before any other warp moves: the drift an SM allows.
    WarpAhead(u64),
    /// One seeded-random ready thread at a time, and every warp collective released
    /// as soon as it is complete: warps interleave differently at every collective.
    Random(u64),
}

struct Emu {
    lib: libloading::Library,
}

static EMU: OnceLock<std::result::Result<Emu, EmuError>> = OnceLock::new();

/// glibc's `RTLD_NOLOAD` (not exported by libloading): find, never load.
const RTLD_NOLOAD: std::ffi::c_int = 4;

/// The emulated driver if it is already in this process (installed, or linked into
/// the binary as its `libcuda.so` with features `emulate` + `candle-cuda`).
fn already_loaded() -> Option<libloading::Library> {
    // SAFETY: RTLD_NOLOAD only looks the library up among those already loaded.
    unsafe {
        libloading::os::unix::Library::open(
            Some(env!("AK_EMU_LIB")),
            libloading::os::unix::RTLD_NOW | RTLD_NOLOAD,
        )
    }
    .ok()
    .map(Into::into)
}

/// Whether the emulated driver is loaded in this process.
pub(crate) fn emulator_loaded() -> bool {
    already_loaded().is_some()
}

fn load() -> std::result::Result<Emu, EmuError> {
    // With features `emulate` + `candle-cuda` the test binaries are linked against
    // the emulator (cudarc's `dynamic-linking`; build.rs): it is already the driver.
    if let Some(lib) = already_loaded() {
        return Ok(Emu { lib });
    }
    if crate::cuda::real_driver_present() {
        return Err(EmuError::RealDriverPresent);
    }
    let path = env!("AK_EMU_LIB");
    // SAFETY: the library is ours (built by build.rs from kernels/emu/*.cpp);
    // its initialisers only register kernels in a map. RTLD_GLOBAL | RTLD_NOW makes
    // its soname (libcuda.so) satisfy cudarc's later dlopen("libcuda.so").
    let lib = unsafe {
        libloading::os::unix::Library::open(
            Some(path),
            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
        )
    }
    .map_err(|e| EmuError::Load(format!("{path}: {e}")))?;
    Ok(Emu { lib: lib.into() })
}

/// Loads the emulated driver into this process (idempotent). After it returns
/// `Ok`, `cudarc::driver::CudaContext::new(0)` opens the emulated device.
pub fn install() -> std::result::Result<(), EmuError> {
    EMU.get_or_init(load)
        .as_ref()
        .map(|_| ())
        .map_err(Clone::clone)
}

fn sym<T: Copy>(name: &[u8]) -> Option<T> {
    let emu = EMU.get()?.as_ref().ok()?;
    // SAFETY: each caller names an exported symbol of kernels/emu/*.cpp with the exact C
    // signature T it is declared with there.
    unsafe { emu.lib.get::<T>(name).ok().map(|s| *s) }
}

/// Sets the thread order of subsequent launches (no-op if not installed).
pub fn set_schedule(s: Schedule) {
    let (mode, seed) = match s {
        Schedule::Identity => (0, 0),
        Schedule::Reversed => (1, 0),
        Schedule::Shuffled(seed) => (2, seed),
        Schedule::WarpAhead(seed) => (3, seed),
        Schedule::Random(seed) => (4, seed),
    };
    if let Some(f) = sym::<unsafe extern "C" fn(i32, u64)>(b"emu_set_schedule\0") {
        // SAFETY: plain store of two integers in the emulator.
        unsafe { f(mode, seed) }
    }
}

/// Number of device allocations currently alive (for leak checks).
pub fn live_allocations() -> Option<i64> {
    let f = sym::<unsafe extern "C" fn() -> i64>(b"emu_live_allocations\0")?;
    // SAFETY: reads an atomic counter.
    Some(unsafe { f() })
}

/// Takes (and clears) the message of the last kernel contract violation (deadlock,
/// warp collective on an exited lane, ...), if any.
pub fn take_fault() -> Option<String> {
    let f = sym::<unsafe extern "C" fn(*mut c_char, usize) -> usize>(b"emu_take_fault\0")?;
    let mut buf = vec![0u8; 1024];
    // SAFETY: the emulator writes at most len−1 bytes plus a NUL into buf.
    let n = unsafe { f(buf.as_mut_ptr().cast(), buf.len()) };
    if n == 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// The emulator's detectors (compute-sanitizer's tools, on the host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checks {
    /// racecheck: shared- and global-memory hazards between threads of a launch.
    pub race: bool,
    /// initcheck: reads (and device-to-host copies) of never-written device bytes.
    pub init: bool,
    /// memcheck: accesses outside an allocation or a block's shared memory.
    pub mem: bool,
}

impl Checks {
    fn mask(self) -> i32 {
        self.race as i32 | (self.init as i32) << 1 | (self.mem as i32) << 2
    }
    fn from_mask(m: i32) -> Self {
        Checks {
            race: m & 1 != 0,
            init: m & 2 != 0,
            mem: m & 4 != 0,
        }
    }
}

/// The detectors in force (`AK_EMU_CHECK`, default all; none in the
/// AddressSanitizer build, whose kernels carry no access instrumentation).
pub fn checks() -> Option<Checks> {
    let f = sym::<unsafe extern "C" fn(i32) -> i32>(b"emu_checks\0")?;
    // SAFETY: -1 only reads the mask.
    Some(Checks::from_mask(unsafe { f(-1) }))
}

/// Sets the detectors for subsequent launches; returns those in force after the
/// call (unchanged all-off where the kernels are not instrumented). Memory written
/// while a detector was off is not known to it: turn detectors on before the data
/// is uploaded.
pub fn set_checks(c: Checks) -> Option<Checks> {
    let f = sym::<unsafe extern "C" fn(i32) -> i32>(b"emu_checks\0")?;
    // SAFETY: plain store of a mask in the emulator.
    Some(Checks::from_mask(unsafe { f(c.mask()) }))
}

/// Poses the emulated driver as one of CUDA version `v` (1000·major + 10·minor, as
/// `cuDriverGetVersion` reports it; e.g. 12040 for an R550 driver) for subsequent
/// version queries and image loads: it then refuses images that driver would refuse
/// (a CUDA 13 image, PTX of a newer ISA). `0` restores `AK_EMU_DRIVER_VERSION` or the
/// default, 13050. Contexts that already loaded the kernels keep them.
pub fn set_driver_version(v: u32) {
    if let Some(f) = sym::<unsafe extern "C" fn(i32)>(b"emu_set_driver_version\0") {
        // SAFETY: plain store of an integer in the emulator.
        unsafe { f(v.min(i32::MAX as u32) as i32) }
    }
}

/// Sets the watchdog period in milliseconds (a launch that makes no progress for
/// that long fails); 0 restores `AK_EMU_WATCHDOG_MS` or its default, 60 s.
pub fn set_watchdog_ms(ms: u64) {
    if let Some(f) = sym::<unsafe extern "C" fn(i64)>(b"emu_set_watchdog_ms\0") {
        // SAFETY: plain store of an integer in the emulator.
        unsafe { f(ms.min(i64::MAX as u64) as i64) }
    }
}

/// Poses as ptxas having reported `regs` registers per thread for `kernel` (the
/// launch check uses it), for self-tests of kernels nvcc never builds. Returns
/// false if no such kernel is registered.
pub fn set_kernel_regs(kernel: &str, regs: u32) -> bool {
    let Ok(name) = std::ffi::CString::new(kernel) else {
        return false;
    };
    let Some(f) = sym::<unsafe extern "C" fn(*const c_char, i32) -> i32>(b"emu_set_kernel_regs\0")
    else {
        return false;
    };
    // SAFETY: name is a NUL-terminated string that outlives the call.
    unsafe { f(name.as_ptr(), regs.min(255) as i32) != 0 }
}

/// Host↔device traffic the calling thread asked the emulated driver for since the
/// last [`reset_transfers`] (or the thread's start): what a GPU training step must not
/// do in steady state (issue 16: no host round trip in any GPU op).
///
/// The counts are per thread (the driver calls of other threads, e.g. tests running
/// in parallel, are not included) and count driver calls, not bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transfers {
    /// Host-to-device copies (`cuMemcpyHtoD_v2` and `cuMemcpyHtoDAsync_v2`).
    pub htod: u64,
    /// Device-to-host copies (`cuMemcpyDtoH_v2` and `cuMemcpyDtoHAsync_v2`).
    pub dtoh: u64,
    /// `cuStreamSynchronize` calls.
    pub stream_syncs: u64,
    /// `cuCtxSynchronize` calls.
    pub ctx_syncs: u64,
    /// `cuEventSynchronize` calls.
    pub event_syncs: u64,
}

impl Transfers {
    /// Copies in either direction.
    pub fn copies(&self) -> u64 {
        self.htod + self.dtoh
    }

    /// Host-blocking synchronisations of any kind (stream, context, event).
    pub fn syncs(&self) -> u64 {
        self.stream_syncs + self.ctx_syncs + self.event_syncs
    }
}

/// The calling thread's [`Transfers`] (`None` if the emulated device is not installed).
pub fn transfers() -> Option<Transfers> {
    let f = sym::<unsafe extern "C" fn(*mut i64, i32) -> i32>(b"emu_traffic_counts\0")?;
    let mut v = [0i64; 5];
    // SAFETY: the emulator writes at most 5 values into the 5-element buffer.
    let n = unsafe { f(v.as_mut_ptr(), v.len() as i32) };
    if n != 5 {
        return None;
    }
    let u = |x: i64| x.max(0) as u64;
    Some(Transfers {
        htod: u(v[0]),
        dtoh: u(v[1]),
        stream_syncs: u(v[2]),
        ctx_syncs: u(v[3]),
        event_syncs: u(v[4]),
    })
}

/// Number of `cp.async` copies the emulated kernels have issued since the emulator was
/// loaded (every launch, every thread; `None` if not installed). Read around a call, it
/// tells whether a kernel took its `cp.async` loads or its staged ones (a kernel picks
/// them by shape and pointer alignment on the device, invisibly to the launcher).
pub fn cp_async_issued() -> Option<u64> {
    let f = sym::<unsafe extern "C" fn() -> u64>(b"emu_cp_async_issued\0")?;
    // SAFETY: reads an atomic counter in the emulator.
    Some(unsafe { f() })
}

/// Clears the calling thread's [`Transfers`] (no-op if not installed).
pub fn reset_transfers() {
    if let Some(f) = sym::<unsafe extern "C" fn()>(b"emu_reset_traffic_counts\0") {
        // SAFETY: clears thread-local integers in the emulator.
        unsafe { f() }
    }
}

/// Dry run: while on, launches are checked (limits, trace, [`set_launch_log`]) but no
/// kernel runs, so the time of a call is the host-side cost of the safe API alone
/// (validation, kernel handle, argument packing, allocation, the launch call), and a
/// launch audit (`examples/launch_audit/main.rs`) can record the launches of model-size
/// shapes. Allocations made while it is on are address ranges no memory backs, and
/// copies and memsets while it is on (or into such a range) touch no memory, so a dry
/// run of a multi-gigabyte op uses none; no executed kernel may use those buffers
/// (copies into them outside a dry run are refused). For benchmarks and the audit only: outputs are left
/// unwritten (turn initcheck off). Returns the setting in force after the call
/// (`None` if not installed).
pub fn set_dry_run(on: bool) -> Option<bool> {
    let f = sym::<unsafe extern "C" fn(i32) -> i32>(b"emu_dry_run\0")?;
    // SAFETY: plain store of a flag in the emulator.
    Some(unsafe { f(i32::from(on)) } != 0)
}

/// Number of dry-run allocations alive ([`set_dry_run`]); `None` if not installed.
pub fn dry_live_allocations() -> Option<i64> {
    let f = sym::<unsafe extern "C" fn() -> i64>(b"emu_dry_live_allocations\0")?;
    // SAFETY: reads a map's size under the emulator's lock.
    Some(unsafe { f() })
}

/// One launch as the emulated driver received it ([`take_launch_log`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchRecord {
    /// The kernel's name (`acon_c_fwd_f32`, ...).
    pub kernel: String,
    /// Grid dimensions (x, y, z).
    pub grid: [u32; 3],
    /// Block dimensions (x, y, z).
    pub block: [u32; 3],
    /// Dynamic shared memory in bytes.
    pub dyn_smem: u32,
    /// The kernel's launch bound (most threads per block): its `__launch_bounds__`
    /// (`AK_KERNEL_BOUND` in `kernels/common.cuh`), or 1024 for a kernel declared
    /// without one.
    pub bound: u32,
}

impl LaunchRecord {
    /// Blocks in the grid.
    pub fn blocks(&self) -> u64 {
        self.grid.iter().map(|&v| u64::from(v)).product()
    }
    /// Threads per block.
    pub fn threads(&self) -> u64 {
        self.block.iter().map(|&v| u64::from(v)).product()
    }
}

/// Turns the launch log on (clearing it) or off; returns the setting in force (`None`
/// if not installed). While on, every launch that passes the driver's checks is
/// logged, whether it runs or not ([`set_dry_run`]).
pub fn set_launch_log(on: bool) -> Option<bool> {
    let f = sym::<unsafe extern "C" fn(i32) -> i32>(b"emu_launch_log\0")?;
    // SAFETY: plain store of a flag (and a clear of a string) in the emulator.
    Some(unsafe { f(i32::from(on)) } != 0)
}

/// Takes (and clears) the launches logged since the last call ([`set_launch_log`]), in
/// launch order; empty if not installed.
pub fn take_launch_log() -> Vec<LaunchRecord> {
    let Some(f) =
        sym::<unsafe extern "C" fn(*mut c_char, usize) -> usize>(b"emu_take_launch_log\0")
    else {
        return Vec::new();
    };
    // SAFETY: a null buffer only asks for the length.
    let mut need = unsafe { f(std::ptr::null_mut(), 0) };
    let text = loop {
        let mut buf = vec![0u8; need + 4096];
        // SAFETY: the emulator writes at most buf.len() bytes (the log and a NUL) into
        // buf, and only when they fit.
        let n = unsafe { f(buf.as_mut_ptr().cast(), buf.len()) };
        if n <= buf.len() {
            buf.truncate(n.saturating_sub(1));
            break String::from_utf8_lossy(&buf).into_owned();
        }
        need = n; // the log grew between the two calls
    };
    text.lines().filter_map(parse_launch).collect()
}

fn parse_launch(line: &str) -> Option<LaunchRecord> {
    let mut it = line.split_whitespace();
    let kernel = it.next()?.to_string();
    let mut v = [0u32; 8];
    for x in &mut v {
        *x = it.next()?.parse().ok()?;
    }
    Some(LaunchRecord {
        kernel,
        grid: [v[0], v[1], v[2]],
        block: [v[3], v[4], v[5]],
        dyn_smem: v[6],
        bound: v[7],
    })
}

/// Asynchronous faults: while on, a launch whose kernel faults (a detector's hazard, a
/// contract violation) returns success, as a launch on a GPU does, and the error
/// (`CUDA_ERROR_LAUNCH_FAILED`) is returned once, by the next stream, context or event
/// synchronisation or device-to-host copy — an unrelated later call, unless
/// `AK_CUDA_SYNC_CHECK=1` ([`crate::cuda::sync_check`]) synchronises after each launch.
/// Off by default: every launch's error is returned by the launch itself. Returns the
/// setting in force (`None` if not installed).
pub fn set_async_faults(on: bool) -> Option<bool> {
    let f = sym::<unsafe extern "C" fn(i32) -> i32>(b"emu_async_faults\0")?;
    // SAFETY: plain store of a flag in the emulator.
    Some(unsafe { f(i32::from(on)) } != 0)
}
