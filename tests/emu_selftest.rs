//! The emulator's own tests: it must catch what it claims to catch — each detector
//! (racecheck, initcheck, memcheck, launch limits, watchdog) is proven by a kernel
//! with a seeded bug of its class (kernels/emu/selftest.cu), and the same kernel
//! without the bug passes — and implement warp collectives and block reductions
//! correctly for full and partial warps, through the real cudarc path.
#![cfg(feature = "emulate")]

use std::sync::{Arc, Mutex, MutexGuard};

use activation_kernels::emu::{self, Checks, Schedule};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaContext, CudaModule, DriverError, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

/// The schedule is process-global: tests that set it run one at a time.
static LOCK: Mutex<()> = Mutex::new(());

fn setup() -> (MutexGuard<'static, ()>, Arc<CudaContext>, Arc<CudaModule>) {
    let g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    emu::install().expect("emulated device installs on a machine without a CUDA driver");
    emu::set_schedule(Schedule::Identity);
    let ctx = CudaContext::new(0).expect("open the emulated device");
    let module = ctx
        .load_module(Ptx::from_binary(
            b"activation-kernels: emulated image; built with CUDA 13000\0".to_vec(),
        ))
        .expect("load module");
    (g, ctx, module)
}

fn warp_sums(x: &[f32], block: u32) -> Vec<f32> {
    let (_g, ctx, m) = setup();
    let f = m.load_function("emu_selftest_warp_sum").unwrap();
    let s = ctx.default_stream();
    let n = x.len() as i32;
    let grid = (x.len() as u32).div_ceil(block);
    let dx = s.clone_htod(x).unwrap();
    let mut out = s.alloc_zeros::<f32>(grid as usize * 32).unwrap();
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = s.launch_builder(&f);
    b.arg(&dx).arg(&mut out).arg(&n);
    // SAFETY: the kernel reads x[0..n) and writes out[grid*32] — both allocated here.
    unsafe { b.launch(cfg) }.unwrap();
    s.clone_dtoh(&out).unwrap()
}

#[test]
fn warp_shuffle_sums_full_and_partial_warps() {
    // 40 threads per block: warp 0 has 32 lanes, warp 1 has 8 (a partial warp
    // whose mask is 0xff). 93 elements: the last block is ragged too.
    let x: Vec<f32> = (0..93).map(|i| (i % 7) as f32 + 0.5).collect();
    let got = warp_sums(&x, 40);
    for blk in 0..3 {
        for w in 0..2 {
            let lo = blk * 40 + w * 32;
            let hi = (lo + if w == 0 { 32 } else { 8 }).min(93);
            let want: f32 = if lo < 93 { x[lo..hi].iter().sum() } else { 0.0 };
            assert_eq!(got[blk * 32 + w], want, "block {blk} warp {w}");
        }
    }
}

#[test]
fn block_sum_helper_is_exact_on_integers() {
    let (_g, ctx, m) = setup();
    let f = m.load_function("emu_selftest_block_sum").unwrap();
    let s = ctx.default_stream();
    let x: Vec<f32> = (0..1000).map(|i| (i % 13) as f32).collect();
    let want: f32 = x.iter().sum();
    for block in [32u32, 96, 256, 1024] {
        let dx = s.clone_htod(&x).unwrap();
        let mut out = s.alloc_zeros::<f32>(2).unwrap();
        let n = x.len() as i32;
        let mut b = s.launch_builder(&f);
        b.arg(&dx).arg(&mut out).arg(&n);
        let cfg = LaunchConfig {
            grid_dim: (2, 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: reads x[0..n), writes out[0..2).
        unsafe { b.launch(cfg) }.unwrap();
        assert_eq!(
            s.clone_dtoh(&out).unwrap(),
            vec![want, want],
            "block {block}"
        );
    }
}

const ALL: Checks = Checks {
    race: true,
    init: true,
    mem: true,
};
/// racecheck alone: with initcheck on, the racy kernels below are first caught
/// reading a byte no thread has written yet (the identity order runs thread 0 to
/// the end before thread 1 starts).
const RACE_ONLY: Checks = Checks {
    race: true,
    init: false,
    mem: true,
};
const OFF: Checks = Checks {
    race: false,
    init: false,
    mem: false,
};

/// Restores the default detectors (all on) when dropped, also on a panic.
struct Detectors;
impl Detectors {
    fn set(c: Checks) -> Self {
        emu::set_checks(c);
        Detectors
    }
}
impl Drop for Detectors {
    fn drop(&mut self) {
        emu::set_checks(ALL);
    }
}

fn cfg(grid: (u32, u32, u32), block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// The fault message of a launch (or copy) that had to fail.
fn fault_of<T: std::fmt::Debug>(r: Result<T, DriverError>) -> String {
    assert!(
        r.is_err(),
        "expected the emulated device to refuse, got {r:?}"
    );
    emu::take_fault().expect("a fault message")
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "`{p}` missing from the report: {msg}");
    }
}

fn reverse(sync: i32, schedule: Schedule) -> Vec<f32> {
    reverse_checked(sync, schedule, ALL).expect("launch")
}

fn reverse_checked(sync: i32, schedule: Schedule, c: Checks) -> Result<Vec<f32>, String> {
    let (_g, ctx, m) = setup();
    let _d = Detectors::set(c);
    emu::set_schedule(schedule);
    let f = m.load_function("emu_selftest_reverse").unwrap();
    let s = ctx.default_stream();
    let x: Vec<f32> = (0..512).map(|i| i as f32).collect();
    let dx = s.clone_htod(&x).unwrap();
    let mut y = s.alloc_zeros::<f32>(512).unwrap();
    let mut b = s.launch_builder(&f);
    b.arg(&dx).arg(&mut y).arg(&sync);
    let cfg = LaunchConfig {
        grid_dim: (2, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: 2 blocks × 256 threads read x[0..512) and write y[0..512).
    let r = unsafe { b.launch(cfg) };
    emu::set_schedule(Schedule::Identity);
    if r.is_err() {
        return Err(fault_of(r));
    }
    Ok(s.clone_dtoh(&y).unwrap())
}

#[test]
fn permutation_check_flags_a_missing_syncthreads() {
    // The thread-order check on its own (detectors off: racecheck would stop the
    // racy launch before it finishes — see racecheck_flags_a_missing_syncthreads).
    let schedules = [
        Schedule::Identity,
        Schedule::Reversed,
        Schedule::Shuffled(7),
        Schedule::WarpAhead(3),
        Schedule::Random(11),
    ];
    // With the barrier: every schedule gives the right, identical answer.
    let want: Vec<f32> = (0..512)
        .map(|i| ((i / 256) * 256 + 255 - i % 256) as f32)
        .collect();
    for sch in schedules {
        assert_eq!(reverse(1, sch), want, "{sch:?}");
    }
    // Without it: the outputs differ between schedules — this is what the
    // permutation check in the parity suite looks for.
    let outs: Vec<Vec<f32>> = schedules
        .iter()
        .map(|&s| reverse_checked(0, s, OFF).expect("launch"))
        .collect();
    assert!(
        outs.iter().any(|o| *o != outs[0]),
        "a missing barrier must change the result under some thread order"
    );
}

#[test]
fn collective_on_exited_lanes_fails_the_launch() {
    let (_g, ctx, m) = setup();
    let f = m.load_function("emu_selftest_divergent_barrier").unwrap();
    let s = ctx.default_stream();
    let mut y = s.alloc_zeros::<f32>(64).unwrap();
    let mut b = s.launch_builder(&f);
    b.arg(&mut y);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (64, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: one block of 64 threads writes y[0..64).
    let r = unsafe { b.launch(cfg) };
    assert!(r.is_err(), "the launch must fail");
    let msg = emu::take_fault().expect("a fault message");
    assert!(msg.contains("exited lane"), "{msg}");
}

#[test]
fn every_allocation_is_freed() {
    let (_g, ctx, _m) = setup();
    let before = emu::live_allocations().unwrap();
    {
        let s = ctx.default_stream();
        let a = s.alloc_zeros::<f32>(1000).unwrap();
        let _b = s.clone_htod(&[1.0f32, 2.0]).unwrap();
        assert_eq!(emu::live_allocations().unwrap(), before + 2);
        drop(a);
    }
    assert_eq!(emu::live_allocations().unwrap(), before);
}

/// Child half of `out_of_bounds_write_is_caught_by_asan`: one element past the end.
#[test]
fn oob_child() {
    if std::env::var_os("AK_EMU_OOB_CHILD").is_none() {
        return; // only meaningful as the child process below
    }
    let (_g, ctx, m) = setup();
    let f = m.load_function("emu_selftest_fill").unwrap();
    let s = ctx.default_stream();
    let mut y = s.alloc_zeros::<f32>(100).unwrap();
    let (n, extra) = (100i32, 1i32);
    let mut b = s.launch_builder(&f);
    b.arg(&mut y).arg(&n).arg(&extra);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: deliberately NOT safe — writes y[100], one past the end, to prove the
    // AddressSanitizer build catches it. Runs only in a child process.
    let _ = unsafe { b.launch(cfg) };
}

/// In the AddressSanitizer build of the emulator (AK_EMU_SANITIZE=address), an
/// out-of-bounds kernel write is reported: the child process dies with ASan's
/// heap-buffer-overflow report.
#[cfg(ak_emu_asan)]
#[test]
fn out_of_bounds_write_is_caught_by_asan() {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--exact", "oob_child", "--nocapture", "--test-threads=1"])
        .env("AK_EMU_OOB_CHILD", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the child must fail");
    // Device allocations live in the emulator's heap, whose redzones are poisoned
    // for ASan by hand: ASan calls the access a use of poisoned memory.
    assert!(
        err.contains("use-after-poison") || err.contains("heap-buffer-overflow"),
        "ASan report expected, got:\n{err}"
    );
}

/// The emulator's software f16/bf16 conversions round to nearest even exactly as
/// the hardware intrinsics (and the `half` crate) do: normal and subnormal ranges,
/// ties, overflow to infinity, NaN.
#[test]
fn f16_bf16_conversions_match_the_half_crate() {
    use half::{bf16, f16};
    let (_g, ctx, m) = setup();
    let f = m.load_function("emu_selftest_convert").unwrap();
    let s = ctx.default_stream();
    let mut x: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        65504.0,
        65519.0,
        65520.0,
        1e-8,
        2.9802322e-8,
        5.9604645e-8,
        6.1035156e-5,
        6.097555e-5,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MAX,
        f32::MIN_POSITIVE,
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
    ];
    // A dense sweep over magnitudes (2^-30 .. 2^20) and signs, hitting ties often.
    let mut r = 0x9E3779B9u32;
    for _ in 0..20_000 {
        r ^= r << 13;
        r ^= r >> 17;
        r ^= r << 5;
        let e = (r % 50) as i32 - 30;
        let mant = (r >> 8) & 0x7fffff;
        let v = f32::from_bits(
            ((e + 127) as u32) << 23 | (mant & !0x3ff) | if r & 1 == 1 { 0x1000 } else { 0 },
        );
        x.push(if r & 2 == 2 { -v } else { v });
    }
    let n = x.len() as i32;
    let dx = s.clone_htod(&x).unwrap();
    let mut h = s.alloc_zeros::<f16>(x.len()).unwrap();
    let mut b = s.alloc_zeros::<bf16>(x.len()).unwrap();
    let mut hb = s.alloc_zeros::<f32>(x.len()).unwrap();
    let mut bb = s.alloc_zeros::<f32>(x.len()).unwrap();
    let mut lb = s.launch_builder(&f);
    lb.arg(&dx)
        .arg(&mut h)
        .arg(&mut b)
        .arg(&mut hb)
        .arg(&mut bb)
        .arg(&n);
    let cfg = LaunchConfig {
        grid_dim: (x.len().div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: thread i < n reads x[i] and writes index i of the four outputs, all n long.
    unsafe { lb.launch(cfg) }.unwrap();
    let (h, b) = (s.clone_dtoh(&h).unwrap(), s.clone_dtoh(&b).unwrap());
    let (hb, bb) = (s.clone_dtoh(&hb).unwrap(), s.clone_dtoh(&bb).unwrap());
    for i in 0..x.len() {
        let (wh, wb) = (f16::from_f32(x[i]), bf16::from_f32(x[i]));
        if x[i].is_nan() {
            assert!(h[i].is_nan() && b[i].is_nan() && hb[i].is_nan() && bb[i].is_nan());
            continue;
        }
        assert_eq!(
            h[i].to_bits(),
            wh.to_bits(),
            "f16 of {:e} ({:#x})",
            x[i],
            x[i].to_bits()
        );
        assert_eq!(b[i].to_bits(), wb.to_bits(), "bf16 of {:e}", x[i]);
        assert_eq!(
            hb[i].to_bits(),
            wh.to_f32().to_bits(),
            "f16->f32 of {:e}",
            x[i]
        );
        assert_eq!(
            bb[i].to_bits(),
            wb.to_f32().to_bits(),
            "bf16->f32 of {:e}",
            x[i]
        );
    }
}

// ---- each detector, proven by a seeded bug (kernels/emu/selftest.cu) ----
// The access detectors need the instrumented kernels, which the AddressSanitizer
// build does not have (the two instrumentations exclude each other).

#[cfg(not(ak_emu_asan))]
#[test]
fn racecheck_flags_a_missing_syncthreads() {
    // All detectors: thread 0 reads buf[255] before thread 255 wrote it.
    let msg = reverse_checked(0, Schedule::Identity, ALL).expect_err("initcheck must fail it");
    assert_has(
        &msg,
        &["initcheck:", "static shared `buf` (1024 bytes), byte 1020"],
    );
    // racecheck alone: thread 128 is the first to overwrite a value another thread
    // read (buf[128], read by thread 127), with no barrier between.
    let msg =
        reverse_checked(0, Schedule::Identity, RACE_ONLY).expect_err("racecheck must fail it");
    assert_has(
        &msg,
        &[
            "racecheck: WAR hazard",
            "emu_selftest_reverse",
            "static shared `buf` (1024 bytes), byte 512",
            "thread (128,0,0) of block (0,0,0) writes it, thread (127,0,0) of block (0,0,0) read it",
            "no __syncthreads",
        ],
    );
}

#[cfg(not(ak_emu_asan))]
#[test]
fn racecheck_block_sum_without_its_leading_barrier() {
    let (_g, ctx, m) = setup();
    let f = m.load_function("emu_selftest_block_sum_twice").unwrap();
    let s = ctx.default_stream();
    let x: Vec<f32> = (0..300).map(|i| (i % 5) as f32).collect();
    let total: f32 = x.iter().sum();
    let dx = s.clone_htod(&x).unwrap();
    let n = x.len() as i32;
    for barrier in [1i32, 0] {
        let mut out = s.alloc_zeros::<f32>(1).unwrap();
        let mut b = s.launch_builder(&f);
        b.arg(&dx).arg(&mut out).arg(&n).arg(&barrier);
        // SAFETY: one block reads x[0..n) and writes out[0].
        let r = unsafe { b.launch(cfg((1, 1, 1), 256, 0)) };
        if barrier == 1 {
            r.unwrap();
            assert_eq!(s.clone_dtoh(&out).unwrap(), vec![3.0 * total]);
        } else {
            // Lane 0 of a warp overwrites scratch[w] while lanes of other warps may
            // still read it from the previous call: a WAR hazard.
            assert_has(
                &fault_of(r),
                &[
                    "racecheck: WAR hazard",
                    "emu_selftest_block_sum_twice",
                    "static shared `scratch`",
                ],
            );
        }
    }
}

#[cfg(not(ak_emu_asan))]
#[test]
fn racecheck_lost_update_in_shared_memory() {
    let (_g, ctx, m) = setup();
    let f = m.load_function("emu_selftest_lost_update").unwrap();
    let s = ctx.default_stream();
    let mut out = s.alloc_zeros::<f32>(1).unwrap();
    let mut b = s.launch_builder(&f);
    b.arg(&mut out);
    // SAFETY: one block writes out[0].
    let msg = fault_of(unsafe { b.launch(cfg((1, 1, 1), 64, 0)) });
    assert_has(
        &msg,
        &["racecheck:", "hazard", "static shared `acc`", "thread ("],
    );
}

#[cfg(not(ak_emu_asan))]
#[test]
fn racecheck_between_lanes_of_a_warp() {
    let (_g, ctx, m) = setup();
    let _d = Detectors::set(RACE_ONLY);
    let f = m.load_function("emu_selftest_warp_exchange").unwrap();
    let s = ctx.default_stream();
    for sync in [1i32, 0] {
        // SAFETY: plain f32 storage; the kernel writes all 32 before they are read.
        let mut y = unsafe { s.alloc::<f32>(32) }.unwrap();
        let mut b = s.launch_builder(&f);
        b.arg(&mut y).arg(&sync);
        // SAFETY: one warp writes y[0..32).
        let r = unsafe { b.launch(cfg((1, 1, 1), 32, 0)) };
        if sync == 1 {
            r.unwrap();
            let want: Vec<f32> = (0..32).map(|l| ((l + 1) % 32) as f32).collect();
            assert_eq!(s.clone_dtoh(&y).unwrap(), want);
        } else {
            // Lane 1 overwrites s[1] after lane 0 read it, with no __syncwarp between.
            assert_has(
                &fault_of(r),
                &[
                    "racecheck: WAR hazard",
                    "static shared `s` (128 bytes), byte 4",
                    "thread (1,0,0) of block (0,0,0) writes it, thread (0,0,0) of block (0,0,0) read it",
                    "__syncwarp",
                ],
            );
        }
    }
}

#[cfg(not(ak_emu_asan))]
#[test]
fn racecheck_between_blocks_in_global_memory() {
    let (_g, ctx, m) = setup();
    let f = m.load_function("emu_selftest_global_race").unwrap();
    let s = ctx.default_stream();
    let mut y = s.alloc_zeros::<f32>(1).unwrap();
    let mut b = s.launch_builder(&f);
    b.arg(&mut y);
    // SAFETY: thread 0 of each block writes y[0].
    let msg = fault_of(unsafe { b.launch(cfg((3, 1, 1), 32, 0)) });
    assert_has(
        &msg,
        &[
            "racecheck: WAW hazard",
            "device allocation #",
            "byte 0",
            "another block of the same launch",
        ],
    );
}

/// y = x[..n−skip] through a kernel; Err(fault) if the launch or the copy back fails.
fn copy_kernel(upload_x: bool, skip: i32) -> Result<Vec<f32>, String> {
    let (_g, ctx, m) = setup();
    let f = m.load_function("emu_selftest_copy").unwrap();
    let s = ctx.default_stream();
    let n = 100i32;
    let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let dx = if upload_x {
        s.clone_htod(&x).unwrap()
    } else {
        // SAFETY: deliberately left unwritten: the reads of it are what is tested.
        unsafe { s.alloc::<f32>(n as usize) }.unwrap()
    };
    // SAFETY: uninitialised output; the kernel is meant to write every element.
    let mut y = unsafe { s.alloc::<f32>(n as usize) }.unwrap();
    let mut b = s.launch_builder(&f);
    b.arg(&dx).arg(&mut y).arg(&n).arg(&skip);
    // SAFETY: 4 blocks × 32 threads; thread i < n − skip reads x[i] and writes y[i].
    let r = unsafe { b.launch(cfg((4, 1, 1), 32, 0)) };
    if r.is_err() {
        return Err(fault_of(r));
    }
    let back = s.clone_dtoh(&y);
    if back.is_err() {
        return Err(fault_of(back));
    }
    Ok(back.unwrap())
}

#[cfg(not(ak_emu_asan))]
#[test]
fn initcheck_output_element_never_written() {
    let want: Vec<f32> = (0..100).map(|i| i as f32).collect();
    assert_eq!(copy_kernel(true, 0).unwrap(), want);
    // The last element is never written: copying the output back is refused.
    let msg = copy_kernel(true, 1).expect_err("initcheck must refuse the copy");
    assert_has(
        &msg,
        &["initcheck", "4 never-written bytes of 400", "byte 396"],
    );
}

#[cfg(not(ak_emu_asan))]
#[test]
fn initcheck_read_of_never_written_input() {
    let msg = copy_kernel(false, 0).expect_err("initcheck must fail the launch");
    assert_has(
        &msg,
        &[
            "initcheck:",
            "emu_selftest_copy",
            "thread (0,0,0) of block (0,0,0)",
            "never written",
        ],
    );
}

#[cfg(not(ak_emu_asan))]
#[test]
fn memcheck_global_write_one_past_the_end() {
    let (_g, ctx, m) = setup();
    let f = m.load_function("emu_selftest_fill").unwrap();
    let s = ctx.default_stream();
    for extra in [0i32, 1] {
        let mut y = s.alloc_zeros::<f32>(100).unwrap();
        let n = 100i32;
        let mut b = s.launch_builder(&f);
        b.arg(&mut y).arg(&n).arg(&extra);
        // SAFETY: with extra = 1 thread 100 writes y[100], one past the end — which
        // the emulator's memcheck must refuse before the byte is touched.
        let r = unsafe { b.launch(cfg((1, 1, 1), 128, 0)) };
        if extra == 0 {
            r.unwrap();
        } else {
            assert_has(
                &fault_of(r),
                &[
                    "memcheck:",
                    "thread (100,0,0)",
                    "writes 4 bytes",
                    "0 bytes past the end of allocation #",
                    "(400 bytes)",
                ],
            );
        }
    }
}

fn smem_overrun(k: i32, dyn_: i32) -> Result<(), String> {
    let (_g, ctx, m) = setup();
    let f = m.load_function("emu_selftest_smem_overrun").unwrap();
    let s = ctx.default_stream();
    // SAFETY: plain f32 storage, written by the kernel.
    let mut y = unsafe { s.alloc::<f32>(32) }.unwrap();
    let mut b = s.launch_builder(&f);
    b.arg(&mut y).arg(&k).arg(&dyn_);
    // SAFETY: one warp; with k = 1 lane 31 writes one float past its shared buffer
    // (static buf[32], or 128 bytes of dynamic shared memory) — refused by memcheck.
    let r = unsafe { b.launch(cfg((1, 1, 1), 32, 128)) };
    if r.is_err() {
        return Err(fault_of(r));
    }
    Ok(())
}

#[cfg(not(ak_emu_asan))]
#[test]
fn memcheck_shared_memory_overrun_by_one() {
    smem_overrun(0, 0).unwrap();
    smem_overrun(0, 1).unwrap();
    assert_has(
        &smem_overrun(1, 0).unwrap_err(),
        &[
            "memcheck:",
            "thread (31,0,0)",
            "0 bytes past the end of static shared `buf` (128 bytes)",
        ],
    );
    assert_has(
        &smem_overrun(1, 1).unwrap_err(),
        &[
            "memcheck:",
            "thread (31,0,0)",
            "0 bytes past the end of dynamic shared memory (128 bytes)",
        ],
    );
}

/// Launches emu_selftest_dyn_smem with `bytes` of dynamic shared memory.
fn dyn_smem_launch(bytes: u32, attribute: Option<i32>) -> Result<(), String> {
    let (_g, ctx, m) = setup();
    let f = m.load_function("emu_selftest_dyn_smem").unwrap();
    let attr = CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
    if let Some(a) = attribute {
        if let Err(e) = f.set_attribute(attr, a) {
            return Err(format!("{e:?}: {}", emu::take_fault().unwrap_or_default()));
        }
    }
    let s = ctx.default_stream();
    let mut y = s.alloc_zeros::<f32>(1).unwrap();
    let n = (bytes / 4) as i32;
    let mut b = s.launch_builder(&f);
    b.arg(&mut y).arg(&n).arg(&n);
    let _ = &mut b;
    // SAFETY: one block writes n floats of its dynamic shared memory and y[0].
    let r = unsafe { b.launch(cfg((1, 1, 1), 128, bytes)) };
    let out = if r.is_err() { Err(fault_of(r)) } else { Ok(()) };
    f.set_attribute(attr, 48 * 1024).unwrap();
    out
}

#[test]
fn launch_limit_dynamic_shared_memory() {
    let kib49 = 49 * 1024;
    dyn_smem_launch(48 * 1024, None).unwrap();
    assert_has(
        &dyn_smem_launch(kib49, None).unwrap_err(),
        &[
            "emu_selftest_dyn_smem",
            "50176 bytes of dynamic shared memory",
            "MAX_DYNAMIC_SHARED_SIZE_BYTES",
        ],
    );
    dyn_smem_launch(kib49, Some(kib49 as i32)).unwrap();
    // The opt-in maximum: 99 KiB (101376 bytes) on sm_86, 227 KiB on sm_90, 64 KiB on
    // sm_75; one KiB more is refused.
    let (max, arch) = match emulated_sm() {
        "75" => (65536, "sm_75"),
        "90" => (232448, "sm_90"),
        _ => (101376, "sm_86"),
    };
    // Exactly the maximum is accepted (the self-test kernel has no static shared memory).
    dyn_smem_launch(max as u32, Some(max)).unwrap();
    let over = max + 1024;
    assert_has(
        &dyn_smem_launch(over as u32, Some(over)).unwrap_err(),
        &[
            &format!("MAX_DYNAMIC_SHARED_SIZE_BYTES, {over}"),
            &format!("above the {max}-byte maximum of {arch}"),
        ],
    );
}

fn fill_launch(grid: (u32, u32, u32), block: u32) -> Result<(), String> {
    let (_g, ctx, m) = setup();
    let f = m.load_function("emu_selftest_fill").unwrap();
    let s = ctx.default_stream();
    let mut y = s.alloc_zeros::<f32>(1024).unwrap();
    let (n, extra) = (0i32, 0i32);
    let mut b = s.launch_builder(&f);
    b.arg(&mut y).arg(&n).arg(&extra);
    // SAFETY: n = 0: no thread writes.
    let r = unsafe { b.launch(cfg(grid, block, 0)) };
    if r.is_err() {
        return Err(fault_of(r));
    }
    Ok(())
}

#[test]
fn launch_limit_grid_and_block_dimensions() {
    fill_launch((1, 65535, 1), 1).unwrap();
    assert_has(
        &fill_launch((1, 70000, 1), 1).unwrap_err(),
        &[
            "emu_selftest_fill",
            "grid (1,70000,1)",
            "grid y or z above 65535",
        ],
    );
    assert_has(
        &fill_launch((1, 1, 70000), 1).unwrap_err(),
        &["grid y or z above 65535"],
    );
    assert_has(
        &fill_launch((1, 1, 1), 1025).unwrap_err(),
        &["more than 1024 threads per block"],
    );
}

/// A kernel's launch bound (AK_KERNEL_BOUND + EMU_REGISTER_BOUND, kernels/common.cuh,
/// as `__launch_bounds__` on a GPU): the emulated driver reports it as the function's
/// thread limit and refuses a larger block; the bound itself goes ahead.
#[test]
fn launch_limit_kernel_launch_bounds() {
    use cudarc::driver::sys::CUfunction_attribute as A;
    let (_g, ctx, m) = setup();
    let f = m.load_function("emu_selftest_bounded").unwrap();
    assert_eq!(
        f.get_attribute(A::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)
            .unwrap(),
        128
    );
    let s = ctx.default_stream();
    let mut y = s.alloc_zeros::<f32>(512).unwrap();
    let n = 512i32;
    let mut launch = |block: u32| {
        let mut b = s.launch_builder(&f);
        b.arg(&mut y).arg(&n);
        // SAFETY: emu_selftest_bounded(y, n) writes y[0..n), grid-stride; y holds 512.
        unsafe { b.launch(cfg((1, 1, 1), block, 0)) }
    };
    launch(128).unwrap();
    assert_has(
        &fault_of(launch(256)),
        &[
            "emu_selftest_bounded",
            "256 threads per block, above the kernel's __launch_bounds__(128)",
        ],
    );
    // A crate kernel declared AK_KERNEL_BOUND(256) (kernels/cast.cu): the same bound
    // reaches the emulated driver through EMU_REGISTER_BOUND.
    let k = m.load_function("cast_to_f32_f16").unwrap();
    let max = k
        .get_attribute(A::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)
        .unwrap();
    assert_eq!(max, 256);
}

/// A kernel contract (AK_EXPECT in kernels/common.cuh) fails the launch on the emulated
/// device with the condition in the report: ak::block_sum needs whole warps.
#[test]
fn kernel_contract_violation_fails_the_launch() {
    let (_g, ctx, m) = setup();
    let f = m.load_function("emu_selftest_block_sum").unwrap();
    let s = ctx.default_stream();
    let x = s.clone_htod(&[1.0f32; 96]).unwrap();
    let mut out = s.alloc_zeros::<f32>(2).unwrap();
    let n = 96i32;
    let mut b = s.launch_builder(&f);
    b.arg(&x).arg(&mut out).arg(&n);
    // SAFETY: emu_selftest_block_sum reads x[0..n) grid-stride and writes out[blockIdx.x].
    let r = unsafe { b.launch(cfg((1, 1, 1), 48, 0)) };
    assert_has(
        &fault_of(r),
        &["kernel contract violated: (blockDim.x & 31) == 0"],
    );
}

/// A kernel that states the dynamic shared memory it needs (AK_EXPECT on
/// `ak::dynamic_smem_bytes()`): given less, the launch fails with the contract in the
/// report (before the first out-of-bounds access); given enough, it runs.
#[test]
fn kernel_contract_dynamic_smem_size() {
    let run = |bytes: u32| {
        let (_g, ctx, m) = setup();
        let f = m.load_function("emu_selftest_dyn_smem_expect").unwrap();
        let s = ctx.default_stream();
        let mut y = s.alloc_zeros::<f32>(1).unwrap();
        let n = 64i32;
        let mut b = s.launch_builder(&f);
        b.arg(&mut y).arg(&n);
        // SAFETY: one block writes n floats of its dynamic shared memory (after checking
        // it has them) and y[0].
        let r = unsafe { b.launch(cfg((1, 1, 1), 64, bytes)) };
        // The fault is taken while this test holds the emulator (the guard `_g`):
        // the fault slot is the device's, shared by every test in this binary.
        match r {
            Ok(_) => Ok(s.clone_dtoh(&y).ok()),
            Err(e) => Err(fault_of(Err::<(), _>(e))),
        }
    };
    assert_has(
        &run(128).unwrap_err(),
        &["kernel contract violated: ak::dynamic_smem_bytes() >= (unsigned)n * sizeof(float)"],
    );
    assert_eq!(run(256).unwrap(), Some(vec![63.0]));
}

#[test]
fn launch_limit_registers_times_threads() {
    // ptxas never sees the self-test kernels: pose as it had reported 128 registers.
    {
        let _s = setup();
        assert!(emu::set_kernel_regs("emu_selftest_fill", 128));
    }
    let big = fill_launch((1, 1, 1), 1024);
    let ok = fill_launch((1, 1, 1), 512);
    {
        let _s = setup();
        emu::set_kernel_regs("emu_selftest_fill", 0);
    }
    ok.unwrap();
    assert_has(
        &big.unwrap_err(),
        &[
            "128 registers per thread (ptxas) x 1024 threads need 131072 registers",
            "above the 65536",
        ],
    );
}

#[test]
fn watchdog_ends_a_spin_wait() {
    let (_g, ctx, m) = setup();
    let f = m.load_function("emu_selftest_spin").unwrap();
    let s = ctx.default_stream();
    let mut flag = s.alloc_zeros::<i32>(1).unwrap();
    emu::set_watchdog_ms(300);
    let t0 = std::time::Instant::now();
    let mut b = s.launch_builder(&f);
    b.arg(&mut flag);
    // SAFETY: one thread spins on flag[0] (allocated above) until the watchdog stops it.
    let r = unsafe { b.launch(cfg((1, 1, 1), 1, 0)) };
    emu::set_watchdog_ms(0);
    assert_has(
        &fault_of(r),
        &["emu_selftest_spin", "watchdog: no progress for 300 ms"],
    );
    assert!(
        t0.elapsed().as_secs() < 30,
        "the watchdog took {:?}",
        t0.elapsed()
    );
}

/// Tickets (first, second) per thread of one 96-thread block under `sch`.
fn tickets(sch: Schedule) -> Vec<(u32, u32)> {
    let (_g, ctx, m) = setup();
    emu::set_schedule(sch);
    let f = m.load_function("emu_selftest_tickets").unwrap();
    let s = ctx.default_stream();
    let mut counter = s.alloc_zeros::<u32>(1).unwrap();
    // SAFETY: plain u32 storage; thread t writes out[2t] and out[2t+1].
    let mut out = unsafe { s.alloc::<u32>(192) }.unwrap();
    let mut b = s.launch_builder(&f);
    b.arg(&mut counter).arg(&mut out);
    // SAFETY: one block of 96 threads; the counter and 192 outputs are allocated above.
    let r = unsafe { b.launch(cfg((1, 1, 1), 96, 0)) };
    emu::set_schedule(Schedule::Identity);
    r.unwrap();
    let v = s.clone_dtoh(&out).unwrap();
    v.chunks(2).map(|c| (c[0], c[1])).collect()
}

#[test]
fn thread_orders_are_what_they_claim() {
    // Identity: every thread's first ticket before any second one, in thread order.
    let id = tickets(Schedule::Identity);
    assert!(id.iter().enumerate().all(|(t, &(a, _))| a == t as u32));
    assert!(id.iter().all(|&(_, b)| b >= 96));
    // Warp-ahead: the leading warp (seed 1 → warp 1 of block 0) takes both of its
    // tickets (0..64) before any other warp takes its first.
    let ahead = tickets(Schedule::WarpAhead(1));
    for (t, &(a, b)) in ahead.iter().enumerate() {
        let lead = t / 32 == 1;
        assert_eq!(a < 64 && b < 64, lead, "thread {t}: tickets {a}, {b}");
    }
    // Random interleaving: seeded (same seed, same order), differs between seeds, and
    // some warp takes a second ticket before another warp has taken its first.
    let r1 = tickets(Schedule::Random(5));
    assert_eq!(r1, tickets(Schedule::Random(5)));
    assert_ne!(r1, tickets(Schedule::Random(6)));
    let first_max = r1.iter().map(|&(a, _)| a).max().unwrap();
    let second_min = r1.iter().map(|&(_, b)| b).min().unwrap();
    assert!(second_min < first_max, "warps never drifted apart: {r1:?}");
}

/// The driver answers a real kernel's registers and static shared memory from the
/// ptxas table of the emulated arch (sm_86 unless AK_EMU_ARCH says 75 or 90), and its
/// max threads per block follows from the register file (and the launch bound).
#[test]
fn function_attributes_come_from_the_ptxas_table() {
    let (_g, _ctx, m) = setup();
    let sm = emulated_sm();
    let table = include_str!("../kernels/emu/ptxas-table.tsv");
    let mut seen = 0;
    for line in table.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split('\t').collect();
        // iieu_patch_sq_* and iieu_conv_fwd_* (__launch_bounds__(256); the tensor-core
        // iieu_conv_{fwd,dgrad,wgrad}_tc_* and their Turing forms _tc75_*: 128) and
        // iieu_bwd_sums_* (__launch_bounds__(256, minBlocks), 64–80 registers): the
        // bound limits the block (every launched kernel declares one: the launch audit's
        // `bound` target), and the register file would where it allowed less.
        let bound = if [
            "iieu_conv_fwd_tc",
            "iieu_conv_dgrad_tc",
            "iieu_conv_wgrad_tc",
        ]
        .iter()
        .any(|p| f[0].starts_with(p))
        {
            128
        } else if f[0].starts_with("iieu_patch_sq_")
            || f[0].starts_with("iieu_conv_fwd_")
            || f[0].starts_with("iieu_bwd_sums_")
        {
            256
        } else {
            continue;
        };
        if f[1] != sm {
            continue;
        }
        let (regs, smem): (i32, i32) = (f[2].parse().unwrap(), f[3].parse().unwrap());
        let k = m.load_function(f[0]).unwrap();
        assert_eq!(k.num_regs().unwrap(), regs, "{}", f[0]);
        assert_eq!(k.shared_size_bytes().unwrap(), smem, "{}", f[0]);
        // Registers are allocated per warp in units of 256; 65536 per block.
        let per_warp = (regs * 32 + 255) / 256 * 256;
        let want = (65536 / per_warp * 32).min(bound);
        assert_eq!(k.max_threads_per_block().unwrap(), want, "{}", f[0]);
        seen += 1;
    }
    assert!(
        seen >= 9,
        "the table lacks iieu_patch_sq / iieu_bwd_sums / iieu_conv_fwd kernels for sm_{sm}"
    );
}

/// The emulated GPU's arch as AK_EMU_ARCH picks it (the driver's rule: 75 or 90 when
/// it says so, else 86).
fn emulated_sm() -> &'static str {
    match std::env::var("AK_EMU_ARCH").as_deref() {
        Ok("90" | "sm_90") => "90",
        Ok("75" | "sm_75") => "75",
        _ => "86",
    }
}

/// The device reports the emulated arch, and the sm_80 instructions (m16n8k16, tf32
/// mma, cp.async) fail the launch on an emulated sm_75 — naming the instruction — as
/// the trap of a kernel built for sm_75 would, while the Turing m16n8k8 runs there.
#[test]
fn sm80_instructions_fail_on_an_emulated_sm75() {
    let sm = emulated_sm();
    {
        let (_g, ctx, _m) = setup();
        let (major, minor) = ctx.compute_capability().unwrap();
        assert_eq!(format!("{major}{minor}"), sm);
    }
    let (m, n, k) = (16, 8, 16);
    for (op, what) in [
        (0, "mma.sync.m16n8k16 (f16)"),
        (1, "mma.sync.m16n8k16 (bf16)"),
        (3, "mma.sync.m16n8k8 (tf32)"),
    ] {
        let r = mma_try(op, 0, (m, n, k), Schedule::Identity);
        if sm == "75" {
            assert_has(&r.unwrap_err(), &[what, "needs sm_80", "sm_75 (T4)"]);
        } else {
            assert!(r.expect("sm_80 mma runs on sm_86/90") <= 1.0, "op {op}");
        }
    }
    // The Turing shape runs everywhere (the error is in units of its tolerance).
    assert!(mma_error(2, 0, (16, 8, 8), Schedule::Identity) <= 1.0);
    let r = cp_async_run(0, 128, ALL);
    if sm == "75" {
        assert_has(&r.unwrap_err(), &["cp.async", "needs sm_80", "sm_75 (T4)"]);
    } else {
        r.unwrap();
    }
}

const ORDERS: [Schedule; 5] = [
    Schedule::Identity,
    Schedule::Reversed,
    Schedule::Shuffled(3),
    Schedule::WarpAhead(1),
    Schedule::Random(9),
];

/// No false positive: reads ordered before a write by a full-warp collective.
#[cfg(not(ak_emu_asan))]
#[test]
fn racecheck_accepts_reads_ordered_by_a_warp_collective() {
    let (_g, ctx, m) = setup();
    let f = m
        .load_function("emu_selftest_broadcast_then_leader_write")
        .unwrap();
    let s = ctx.default_stream();
    for sch in ORDERS {
        emu::set_schedule(sch);
        // SAFETY: plain f32 storage, every element written by the kernel.
        let mut y = unsafe { s.alloc::<f32>(96) }.unwrap();
        let mut b = s.launch_builder(&f);
        b.arg(&mut y);
        // SAFETY: one block of 96 threads writes y[0..96).
        let r = unsafe { b.launch(cfg((1, 1, 1), 96, 0)) };
        emu::set_schedule(Schedule::Identity);
        if r.is_err() {
            panic!("{sch:?}: {}", fault_of(r));
        }
        let want: Vec<f32> = (0..96).map(|t| (32 * (t / 32)) as f32).collect();
        assert_eq!(s.clone_dtoh(&y).unwrap(), want, "{sch:?}");
    }
}

/// The seeded races are found under every thread order, not only the identity one.
#[cfg(not(ak_emu_asan))]
#[test]
fn racecheck_finds_the_races_under_every_thread_order() {
    let (_g, ctx, m) = setup();
    let _d = Detectors::set(RACE_ONLY);
    let s = ctx.default_stream();
    let sum = m.load_function("emu_selftest_block_sum_twice").unwrap();
    let lost = m.load_function("emu_selftest_lost_update").unwrap();
    let x = s.clone_htod(&[1.0f32; 300]).unwrap();
    let (n, barrier) = (300i32, 0i32);
    for sch in ORDERS {
        emu::set_schedule(sch);
        let mut out = s.alloc_zeros::<f32>(1).unwrap();
        let mut b = s.launch_builder(&sum);
        b.arg(&x).arg(&mut out).arg(&n).arg(&barrier);
        // SAFETY: one block reads x[0..300) and writes out[0].
        let r1 = unsafe { b.launch(cfg((1, 1, 1), 256, 0)) };
        let m1 = fault_of(r1);
        let mut b = s.launch_builder(&lost);
        b.arg(&mut out);
        // SAFETY: one block writes out[0].
        let r2 = unsafe { b.launch(cfg((1, 1, 1), 64, 0)) };
        let m2 = fault_of(r2);
        emu::set_schedule(Schedule::Identity);
        assert_has(&m1, &["racecheck:", "static shared `scratch`"]);
        assert_has(&m2, &["racecheck:", "static shared `acc`"]);
    }
}

#[cfg(not(ak_emu_asan))]
#[test]
fn racecheck_read_after_write_between_blocks_and_read_before_atomic() {
    let (_g, ctx, m) = setup();
    let f = m.load_function("emu_selftest_cross_block").unwrap();
    let s = ctx.default_stream();
    let mut x = s.clone_htod(&[0.0f32]).unwrap();
    let mut y = s.alloc_zeros::<f32>(64).unwrap();
    let mode = 0i32;
    let mut b = s.launch_builder(&f);
    b.arg(&mut x).arg(&mut y).arg(&mode);
    // SAFETY: 2 blocks of 32; block 0 writes x[0], block 1 reads it into y[0].
    let msg = fault_of(unsafe { b.launch(cfg((2, 1, 1), 32, 0)) });
    assert_has(
        &msg,
        &[
            "racecheck: RAW hazard",
            "thread (0,0,0) of block (1,0,0) reads it",
            "another block",
        ],
    );
    let mode = 1i32;
    let mut b = s.launch_builder(&f);
    b.arg(&mut x).arg(&mut y).arg(&mode);
    // SAFETY: 2 blocks of 32 read x[0] into y[0..64); the last block's thread 0
    // then adds to x[0] atomically.
    let msg = fault_of(unsafe { b.launch(cfg((2, 1, 1), 32, 0)) });
    assert_has(
        &msg,
        &[
            "racecheck: WAR hazard",
            "thread (0,0,0) of block (1,0,0) writes it",
        ],
    );
}

#[cfg(not(ak_emu_asan))]
#[test]
fn memcheck_use_after_free() {
    use cudarc::driver::DevicePtr;
    let (_g, ctx, m) = setup();
    let f = m.load_function("emu_selftest_fill").unwrap();
    let s = ctx.default_stream();
    let y = s.alloc_zeros::<f32>(64).unwrap();
    let stale: u64 = {
        let (p, _sync) = y.device_ptr(&s);
        p
    };
    drop(y);
    let (n, extra) = (64i32, 0i32);
    let mut b = s.launch_builder(&f);
    b.arg(&stale).arg(&n).arg(&extra);
    // SAFETY: deliberately NOT safe — writes through a freed device pointer, which the
    // emulator's memcheck must refuse before any byte is touched.
    let msg = fault_of(unsafe { b.launch(cfg((1, 1, 1), 64, 0)) });
    assert_has(&msg, &["memcheck:", "thread (0,0,0)", "out of bounds"]);
}

// ---- tensor-core primitives (kernels/mma.cuh, kernels/emu/selftest.cu) ----

/// mma ops of `emu_selftest_mma`: (op, name, k-step).
const MMA_OPS: [(i32, &str, usize); 4] = [
    (0, "m16n8k16 f16", 16),
    (1, "m16n8k16 bf16", 16),
    (2, "m16n8k8 f16", 8),
    (3, "m16n8k8 tf32", 8),
];

/// Whether the emulated GPU has mma op `op` of [`MMA_OPS`] (sm_75: only m16n8k8 f16).
fn on_this_arch(op: i32) -> bool {
    op == 2 || emulated_sm() != "75"
}

/// Seeded uniform values in [-2, 2).
fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut r = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            ((r >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// The operands as the kernel reads them (raw bits) and as the reference multiplies
/// them (the exact value of those bits: f16/bf16 exactly, tf32 = the f32 with its 13
/// low mantissa bits dropped, as the emulated tensor core reads a .tf32 operand).
fn mma_operand(op: i32, x: f32) -> (u32, f64) {
    match op {
        0 | 2 => {
            let h = half::f16::from_f32(x);
            (u32::from(h.to_bits()), h.to_f64())
        }
        1 => {
            let h = half::bf16::from_f32(x);
            (u32::from(h.to_bits()), h.to_f64())
        }
        _ => (
            x.to_bits(),
            f64::from(f32::from_bits(x.to_bits() & 0xffff_e000)),
        ),
    }
}

/// D = A·B + C through `emu_selftest_mma` (op, load mode), and the largest error
/// against the naive f64 product of the same operands, in units of the element's
/// tolerance: the emulated mma rounds to f32 once per k-step, so each element is
/// within steps·2⁻²⁴·(|c| + Σ|a·b|) of the f64 product (bound doubled).
fn mma_error(op: i32, load: i32, dims: (usize, usize, usize), schedule: Schedule) -> f64 {
    mma_try(op, load, dims, schedule).expect("launch")
}

/// [`mma_error`], or the emulator's fault report when the launch fails.
fn mma_try(
    op: i32,
    load: i32,
    (m, n, k): (usize, usize, usize),
    schedule: Schedule,
) -> Result<f64, String> {
    let (_g, ctx, module) = setup();
    emu::set_schedule(schedule);
    let f = module.load_function("emu_selftest_mma").unwrap();
    let s = ctx.default_stream();
    let seed = (op * 10 + load) as u64 + 1;
    let (a_bits, a): (Vec<u32>, Vec<f64>) = uniform(m * k, seed)
        .iter()
        .map(|&x| mma_operand(op, x))
        .unzip();
    let (b_bits, b): (Vec<u32>, Vec<f64>) = uniform(k * n, seed + 100)
        .iter()
        .map(|&x| mma_operand(op, x))
        .unzip();
    let c = uniform(m * n, seed + 200);
    let (da, db) = if op == 3 {
        (
            s.clone_htod(&a_bits).unwrap(),
            s.clone_htod(&b_bits).unwrap(),
        )
    } else {
        // 16-bit operands: two per u32 word, little-endian, as the kernel's u16 view.
        let pack = |v: &[u32]| -> Vec<u32> {
            v.chunks(2)
                .map(|p| p[0] | p.get(1).map_or(0, |&h| h << 16))
                .collect()
        };
        (
            s.clone_htod(&pack(&a_bits)).unwrap(),
            s.clone_htod(&pack(&b_bits)).unwrap(),
        )
    };
    let dc = s.clone_htod(&c).unwrap();
    let mut dd = s.alloc_zeros::<f32>(m * n).unwrap();
    let (mi, ni, ki) = (m as i32, n as i32, k as i32);
    let mut l = s.launch_builder(&f);
    l.arg(&op)
        .arg(&load)
        .arg(&da)
        .arg(&db)
        .arg(&dc)
        .arg(&mut dd);
    l.arg(&mi).arg(&ni).arg(&ki);
    let grid = ((n as u32).div_ceil(8), (m as u32).div_ceil(16), 1);
    // SAFETY: one warp per 16×8 tile reads A[m·k], B[k·n] (as 16-bit or 32-bit
    // elements: the u32 buffers hold ceil(m·k/2) / m·k words) and C, writes D[m·n].
    let r = unsafe { l.launch(cfg(grid, 32, 0)) };
    emu::set_schedule(Schedule::Identity);
    if r.is_err() {
        return Err(fault_of(r));
    }
    let d = s.clone_dtoh(&dd).unwrap();
    let steps = k.div_ceil(MMA_OPS[op as usize].2) as f64;
    let mut worst = 0.0f64;
    for i in 0..m {
        for j in 0..n {
            let (mut exact, mut abs) = (f64::from(c[i * n + j]), f64::from(c[i * n + j]).abs());
            for kk in 0..k {
                exact += a[i * k + kk] * b[kk * n + j];
                abs += (a[i * k + kk] * b[kk * n + j]).abs();
            }
            let tol = 2.0 * steps * abs * 2f64.powi(-24) + 1e-30;
            worst = worst.max((f64::from(d[i * n + j]) - exact).abs() / tol);
        }
    }
    Ok(worst)
}

#[test]
fn mma_matches_a_naive_product_for_every_shape_type_and_fragment_load() {
    // 16×8×16: one tile, one k-step; 37×21×40: ragged in M, N and K (zero-padded
    // tiles, 40 not a multiple of 16).
    for shape in [(16, 8, 16), (37, 21, 40)] {
        for (op, name, _) in MMA_OPS.into_iter().filter(|o| on_this_arch(o.0)) {
            // ldmatrix (b16) only for the 16-bit operands.
            let loads: &[(i32, &str)] = if op == 3 {
                &[(0, "by hand")]
            } else {
                &[
                    (0, "by hand"),
                    (1, "ldmatrix"),
                    (2, "ldmatrix.trans"),
                    (4, "A ldmatrix, B ldmatrix.trans"),
                    (5, "A ldmatrix.trans, B ldmatrix"),
                ]
            };
            for &(load, how) in loads {
                let e = mma_error(op, load, shape, Schedule::Identity);
                assert!(
                    e <= 1.0,
                    "{name}, fragments {how}, {shape:?}: error {e} tolerances"
                );
            }
        }
    }
    // The collectives under the interleaving schedule (warps drift at each one);
    // m16n8k8 where m16n8k16 is not (sm_75).
    let op = if on_this_arch(0) { 0 } else { 2 };
    let e = mma_error(op, 1, (37, 21, 40), Schedule::Random(5));
    assert!(e <= 1.0, "ldmatrix + mma under Schedule::Random: {e}");
}

#[test]
fn mma_with_a_transposed_b_fragment_gives_a_wrong_result() {
    for (op, name, _) in MMA_OPS.into_iter().filter(|o| on_this_arch(o.0)) {
        let e = mma_error(op, 3, (37, 21, 40), Schedule::Identity);
        assert!(
            e > 1e3,
            "{name}: a B fragment loaded transposed must give a wrong result (error {e} tolerances)"
        );
    }
}

fn mma_divergent(mode: i32, block: u32) -> Result<Vec<f32>, String> {
    let (_g, ctx, m) = setup();
    let f = m.load_function("emu_selftest_mma_divergent").unwrap();
    let s = ctx.default_stream();
    let mut y = s.alloc_zeros::<f32>(block as usize).unwrap();
    let mut b = s.launch_builder(&f);
    b.arg(&mut y).arg(&mode);
    // SAFETY: one block writes y[0..block).
    let r = unsafe { b.launch(cfg((1, 1, 1), block, 0)) };
    if r.is_err() {
        return Err(fault_of(r));
    }
    Ok(s.clone_dtoh(&y).unwrap())
}

#[test]
fn mma_from_a_diverged_or_partial_warp_fails_the_launch() {
    if !on_this_arch(0) {
        // The kernel's m16n8k16 does not exist on sm_75: every launch fails first there.
        assert_has(&mma_divergent(2, 32).unwrap_err(), &["needs sm_80"]);
        return;
    }
    // Control: the whole warp at one site, A = B = 1 (f16), K = 16.
    assert_eq!(mma_divergent(2, 32).unwrap(), vec![16.0; 32]);
    let msg = mma_divergent(0, 32).unwrap_err();
    assert_has(&msg, &["emu_selftest_mma_divergent", "exited lane 16"]);
    let msg = mma_divergent(1, 32).unwrap_err();
    assert_has(
        &msg,
        &[
            "different warp-collective instructions",
            "selftest.cu",
            "warp-divergent",
        ],
    );
    let msg = mma_divergent(2, 48).unwrap_err();
    assert_has(&msg, &["does not exist"]);
}

/// `emu_selftest_cp_async` in `mode` with `n` elements of x (x[i] = i + 0.5), one
/// block of 64 threads; y[0..128) on success, else the fault.
fn cp_async_run(mode: i32, n: usize, c: Checks) -> Result<Vec<f32>, String> {
    let (_g, ctx, m) = setup();
    let _d = Detectors::set(c);
    let f = m.load_function("emu_selftest_cp_async").unwrap();
    let s = ctx.default_stream();
    let x: Vec<f32> = (0..n).map(|i| i as f32 + 0.5).collect();
    let dx = s.clone_htod(&x).unwrap();
    let mut y = s.alloc_zeros::<f32>(128).unwrap();
    let ni = n as i32;
    let mut b = s.launch_builder(&f);
    b.arg(&dx).arg(&mut y).arg(&ni).arg(&mode);
    // SAFETY: reads x[0..n) (mode 3: deliberately past it, which the emulator
    // catches before any access), writes y[0..128).
    let r = unsafe { b.launch(cfg((1, 1, 1), 64, 0)) };
    if r.is_err() {
        return Err(fault_of(r));
    }
    Ok(s.clone_dtoh(&y).unwrap())
}

#[test]
fn cp_async_lands_at_its_wait_group() {
    if emulated_sm() == "75" {
        return; // no cp.async on sm_75 (sm80_instructions_fail_on_an_emulated_sm75)
    }
    // Two groups in flight, wait_group<1> retires the older, wait_group<0> the other.
    let y = cp_async_run(0, 128, ALL).unwrap();
    let want: Vec<f32> = (0..128)
        .map(|i| ((i / 64) * 64 + 63 - i % 64) as f32 + 0.5)
        .collect();
    assert_eq!(y, want);
    // Zero-fill (src-size < cp-size): 37 elements, the rest of the 64 zeros.
    let y = cp_async_run(4, 37, ALL).unwrap();
    let want: Vec<f32> = (0..64)
        .map(|i| if i < 37 { i as f32 + 0.5 } else { 0.0 })
        .chain(std::iter::repeat(0.0).take(64))
        .collect();
    assert_eq!(y, want);
}

/// (Needs the detectors, which the AddressSanitizer build has not: there an
/// out-of-bounds source is ASan's to report.)
#[cfg(not(ak_emu_asan))]
#[test]
fn cp_async_read_before_its_wait_group_fails_the_launch() {
    if emulated_sm() == "75" {
        return; // no cp.async on sm_75 (sm80_instructions_fail_on_an_emulated_sm75)
    }
    // No wait at all: racecheck, and initcheck when racecheck is off.
    let msg = cp_async_run(1, 128, ALL).unwrap_err();
    assert_has(&msg, &["racecheck: RAW", "`s0`", "cp.async", "in flight"]);
    let init_only = Checks {
        race: false,
        init: true,
        mem: true,
    };
    let msg = cp_async_run(1, 128, init_only).unwrap_err();
    assert_has(&msg, &["initcheck", "`s0`", "cp.async", "in flight"]);
    // wait_group<1> with two groups in flight retires only the older: s0 is read
    // fine, s1 (the newer group) is still in flight.
    let msg = cp_async_run(2, 128, ALL).unwrap_err();
    assert_has(&msg, &["racecheck: RAW", "`s1`", "in flight"]);
    // After the issuer's wait, another warp's read needs a __syncthreads.
    let msg = cp_async_run(5, 128, ALL).unwrap_err();
    assert_has(&msg, &["racecheck: RAW", "`s0`"]);
    // An out-of-bounds source is memcheck's.
    let msg = cp_async_run(3, 128, ALL).unwrap_err();
    assert_has(&msg, &["memcheck", "out of bounds"]);
}
