//! The emulator's own tests: it must catch what it claims to catch (a missing
//! barrier through the thread-order permutation check, a collective on exited
//! lanes as a launch failure) and implement warp collectives and block reductions
//! correctly for full and partial warps, through the real cudarc path.
#![cfg(feature = "emulate")]

use std::sync::{Arc, Mutex, MutexGuard};

use activation_kernels::emu::{self, Schedule};
use cudarc::driver::{CudaContext, CudaModule, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

/// The schedule is process-global: tests that set it run one at a time.
static LOCK: Mutex<()> = Mutex::new(());

fn setup() -> (MutexGuard<'static, ()>, Arc<CudaContext>, Arc<CudaModule>) {
    let g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    emu::install().expect("emulated device installs on a machine without a CUDA driver");
    emu::set_schedule(Schedule::Identity);
    let ctx = CudaContext::new(0).expect("open the emulated device");
    let module = ctx
        .load_module(Ptx::from_binary(b"emulated\0".to_vec()))
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

fn reverse(sync: i32, schedule: Schedule) -> Vec<f32> {
    let (_g, ctx, m) = setup();
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
    unsafe { b.launch(cfg) }.unwrap();
    let out = s.clone_dtoh(&y).unwrap();
    emu::set_schedule(Schedule::Identity);
    out
}

#[test]
fn permutation_check_flags_a_missing_syncthreads() {
    let schedules = [
        Schedule::Identity,
        Schedule::Reversed,
        Schedule::Shuffled(7),
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
    let outs: Vec<Vec<f32>> = schedules.iter().map(|&s| reverse(0, s)).collect();
    assert!(
        outs[0] != outs[1] || outs[0] != outs[2],
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
    assert!(
        err.contains("heap-buffer-overflow"),
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
