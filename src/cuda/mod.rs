//! CUDA backend: safe wrappers over the hand-written kernels in `kernels/*.cu`.
//!
//! Layering follows cudarc: `kernels/*.cu` are the raw layer (one `extern "C"`
//! kernel per op and storage dtype); this module loads them once per
//! [`CudaContext`] ([`Kernels`]), and each family module (`acon`, ...) validates
//! every length, shape and parameter on the host, then launches. Outputs and
//! gradients come back as [`CudaSlice`]s on the caller's stream. Bad input is an
//! [`crate::Error`], never a panic and never a launch.
//!
//! Available with feature `cuda` (kernels compiled by nvcc into one fatbin) and
//! with feature `emulate` (the same kernels compiled for the host; see
//! [`crate::emu`]).

pub mod abi;
pub mod acon;
pub mod aiec;
pub mod cast;
pub mod dtype;
pub(crate) mod handles;
pub mod iieu;
pub mod iieu_conv;
pub mod iieu_dc;
mod module;
pub mod rtc;

pub use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaView};
pub use dtype::DType;
pub use module::{driver_version, Kernels, Origin};

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use cudarc::driver::{DriverError, LaunchArgs, LaunchConfig, PushKernelArg};

use handles::Kernel;

impl From<DriverError> for crate::Error {
    fn from(e: DriverError) -> Self {
        crate::Error::Driver(e.to_string())
    }
}

/// Something the ops accept as a read-only device input: a [`CudaSlice`] or a
/// [`CudaView`] of one.
pub trait DeviceInput<T> {
    /// A view of the whole input.
    fn view(&self) -> CudaView<'_, T>;
}
impl<T> DeviceInput<T> for CudaSlice<T> {
    fn view(&self) -> CudaView<'_, T> {
        self.as_view()
    }
}
impl<T> DeviceInput<T> for CudaView<'_, T> {
    fn view(&self) -> CudaView<'_, T> {
        self.slice(..)
    }
}

/// Whether a real CUDA driver (`libcuda`) is present in this process or loadable.
///
/// Works whichever way cudarc reaches the driver: loaded at run time (this crate's
/// default), or linked into the binary (cudarc's `dynamic-linking`, which
/// candle-core's `cuda` feature turns on). The emulated driver ([`crate::emu`]) is
/// never counted as real, whether it was installed with `emu::install()` or linked
/// in (features `emulate` + `candle-cuda`).
pub fn real_driver_present() -> bool {
    #[cfg(feature = "emulate")]
    if crate::emu::emulator_loaded() {
        return false;
    }
    // The names cudarc tries for the driver on Linux.
    ["libcuda.so", "libcuda.so.1"].iter().any(|name| {
        // SAFETY: opens (or finds already loaded) a driver library by name and drops
        // the handle; the driver's initialisers do not run our code.
        unsafe { libloading::Library::new(*name) }.is_ok()
    })
}

/// The null device pointer passed for an optional buffer a kernel does not use.
const NULL: u64 = 0;

/// [`LaunchArgs`] with optional buffers: `arg_opt(Some(v))` pushes `v`, `arg_opt(None)`
/// a null pointer (the kernels take such buffers as optional and never dereference a
/// null one).
pub(crate) trait ArgOpt {
    /// Pushes `v`, or a null device pointer for `None`.
    fn arg_opt<A>(&mut self, v: Option<A>) -> &mut Self
    where
        Self: PushKernelArg<A>;
}

impl ArgOpt for LaunchArgs<'_> {
    fn arg_opt<A>(&mut self, v: Option<A>) -> &mut Self
    where
        Self: PushKernelArg<A>,
    {
        match v {
            Some(v) => self.arg(v),
            None => PushKernelArg::<&u64>::arg(self, &NULL),
        }
    }
}

/// Threads per block of the elementwise and reduction kernels (a multiple of 32).
pub(crate) const BLOCK: u32 = 256;

/// The most blocks a grid-stride launch uses: 65 535. With feature `emulate`,
/// `AK_EMU_GRID_CAP=<blocks>` lowers it, so that the test shapes run every grid-stride
/// loop several times — the path a large tensor takes — at the emulator's cost of a
/// small tensor (CI runs the parity suites once that way). Only the cap changes; the
/// launch code is the production one.
pub(crate) fn grid_cap() -> usize {
    #[cfg(feature = "emulate")]
    {
        static CAP: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let c = *CAP.get_or_init(|| {
            std::env::var("AK_EMU_GRID_CAP")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&v| v > 0)
                .unwrap_or(65_535)
        });
        return c.min(65_535);
    }
    #[allow(unreachable_code)]
    65_535
}

/// Grid size for a grid-stride loop over `work` items of which each block
/// handles `per_block` per iteration, capped (at [`grid_cap`]) so that launches
/// stay cheap.
pub(crate) fn grid_for(work: usize, per_block: usize) -> u32 {
    let blocks = work.div_ceil(per_block.max(1)).max(1);
    blocks.min(grid_cap()) as u32
}

/// `i32` view of a size, or an error if a kernel's 32-bit index could overflow.
pub(crate) fn to_i32(what: &'static str, v: usize) -> crate::Result<i32> {
    i32::try_from(v).map_err(|_| crate::Error::Shape {
        what,
        msg: format!("{v} exceeds the kernels' 32-bit index range"),
    })
}

/// 0: not read yet; 1: off; 2: on.
static SYNC_CHECK: AtomicU8 = AtomicU8::new(0);

/// Whether every launch is followed by a synchronisation of its stream that names the
/// kernel in any error (`AK_CUDA_SYNC_CHECK=1`, read once; [`set_sync_check`] overrides
/// it). Off by default: a kernel's asynchronous fault then surfaces in a later,
/// unrelated call (the next synchronisation or copy), as with any CUDA library. On, each
/// op is slower (one host-blocking synchronisation per launch) and a fault is an
/// [`crate::Error::Driver`] naming the kernel that caused it. For debugging only.
pub fn sync_check() -> bool {
    match SYNC_CHECK.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            let on = *ENV.get_or_init(|| {
                std::env::var("AK_CUDA_SYNC_CHECK")
                    .map(|v| sync_check_value(&v))
                    .unwrap_or(false)
            });
            // A concurrent set_sync_check wins.
            let _ = SYNC_CHECK.compare_exchange(
                0,
                1 + u8::from(on),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            SYNC_CHECK.load(Ordering::Relaxed) == 2
        }
    }
}

/// Whether an `AK_CUDA_SYNC_CHECK` value turns the check on: `1`, `true`, `on` or `yes`
/// (ASCII case ignored); anything else (`0`, `no`, empty, …) leaves it off.
fn sync_check_value(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "on" | "yes"
    )
}

/// Turns the per-launch synchronisation check ([`sync_check`]) on or off for the rest
/// of the process, whatever `AK_CUDA_SYNC_CHECK` says.
pub fn set_sync_check(on: bool) {
    SYNC_CHECK.store(1 + u8::from(on), Ordering::Relaxed);
}

/// A [`LaunchArgs`] that knows its stream and its kernel's name: every launch site
/// builds its arguments on one (it derefs to the [`LaunchArgs`]) and launches with
/// [`Launcher::launch`], which adds the [`sync_check`].
pub(crate) struct Launcher<'a> {
    args: LaunchArgs<'a>,
    stream: &'a CudaStream,
    name: &'static str,
}

/// The launch builder for kernel `k` on `stream`.
pub(crate) fn launcher<'a>(stream: &'a Arc<CudaStream>, k: &'a Kernel) -> Launcher<'a> {
    Launcher {
        args: stream.launch_builder(k.func()),
        stream,
        name: k.name(),
    }
}

impl Launcher<'_> {
    /// Launches the kernel with the arguments pushed so far. With [`sync_check`] on,
    /// then synchronises the stream; an error of either step names the kernel.
    ///
    /// # Safety
    /// As [`LaunchArgs::launch`]: the pushed arguments match the kernel's parameters,
    /// and every access the kernel makes under `cfg` is inside the buffers passed.
    pub(crate) unsafe fn launch(&mut self, cfg: LaunchConfig) -> crate::Result<()> {
        // SAFETY: the caller upholds LaunchArgs::launch's contract (above).
        let r = unsafe { self.args.launch(cfg) };
        if !sync_check() {
            r?;
            return Ok(());
        }
        let name = self.name;
        r.map_err(|e| crate::Error::Driver(format!("kernel {name}: launch failed: {e}")))?;
        self.stream.synchronize().map_err(|e| {
            crate::Error::Driver(format!(
                "kernel {name} failed (found by AK_CUDA_SYNC_CHECK's synchronisation right \
                 after launching it; a fault of work queued before it on this context, e.g. \
                 another library's kernel, would surface here too): {e}"
            ))
        })
    }
}

impl<'a> std::ops::Deref for Launcher<'a> {
    type Target = LaunchArgs<'a>;
    fn deref(&self) -> &LaunchArgs<'a> {
        &self.args
    }
}

impl<'a> std::ops::DerefMut for Launcher<'a> {
    fn deref_mut(&mut self) -> &mut LaunchArgs<'a> {
        &mut self.args
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sync_check_values() {
        for on in ["1", "true", "ON", " yes "] {
            assert!(super::sync_check_value(on), "{on}");
        }
        for off in ["", "0", "false", "off", "no", "2"] {
            assert!(!super::sync_check_value(off), "{off}");
        }
    }
}
