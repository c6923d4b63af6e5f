//! The emulated device's dry run (what the launch audit runs on, `emu::set_dry_run`):
//! allocations backed by no memory, launches logged but not executed, copies into
//! dry-run buffers skipped while the dry run is on and refused after it, dry-run
//! buffers freed after it ends, and ordinary work unaffected afterwards. Its own test
//! binary: the dry-run switch is process-wide, so no other test may run beside it.
#![cfg(feature = "emulate")]

use activation_kernels::cuda::{aiec, CudaContext};
use activation_kernels::emu;

#[test]
fn dry_run_allocates_nothing_logs_launches_and_ends_cleanly() {
    emu::install().expect("emulated device");
    let ctx = CudaContext::new(0).expect("emulated device 0");
    let s = ctx.default_stream();
    assert_eq!(emu::set_dry_run(true), Some(true));
    assert_eq!(emu::set_launch_log(true), Some(true));
    let _ = emu::take_launch_log();

    // 4 GiB of f32 that no memory backs (this machine could not hold many of them).
    let n = 1usize << 30;
    // SAFETY: in the dry run no kernel executes, so the contents are never read.
    let mut big = unsafe { s.alloc::<f32>(n) }.expect("dry-run allocation");
    // SAFETY: as above.
    let mut big2 = unsafe { s.alloc::<f32>(n) }.expect("a second one");
    let y = aiec::tau_forward(&s, &big, 0.1).expect("launch in the dry run");
    let log = emu::take_launch_log();
    assert_eq!(log.len(), 1, "{log:?}");
    assert!(log[0].kernel.starts_with("aiec_tau_fwd"), "{:?}", log[0]);
    assert!(log[0].grid[0] > 0 && log[0].block[0] > 0);
    // Copies into dry-run buffers do nothing while the dry run is on.
    s.memcpy_htod(&[1.0f32; 4], &mut big.slice_mut(0..4))
        .expect("copy skipped in the dry run");
    s.memcpy_dtod(&big.slice(0..4), &mut big2.slice_mut(0..4))
        .expect("device copy skipped in the dry run");

    emu::set_launch_log(false);
    assert_eq!(emu::set_dry_run(false), Some(false));
    // After it, a dry-run buffer holds no data: copying from or into it is an error.
    let mut host = [0.0f32; 4];
    assert!(s.memcpy_dtoh(&y.slice(0..4), &mut host).is_err());
    assert!(s
        .memcpy_htod(&[1.0f32; 4], &mut big.slice_mut(0..4))
        .is_err());
    // Freed after the dry run ended: no error, no leak.
    drop((y, big, big2));
    s.synchronize().expect("nothing pending");

    // Ordinary work runs and computes as before.
    let x = s.clone_htod(&[-1.0f32, 0.25, 2.0]).expect("upload");
    let y = aiec::tau_forward(&s, &x, 0.5).expect("tau");
    assert_eq!(s.clone_dtoh(&y).expect("download"), vec![0.0, 0.0, 2.0]);
}
