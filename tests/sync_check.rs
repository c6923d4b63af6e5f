//! `AK_CUDA_SYNC_CHECK` (issue 15 item 4): with the check on, a kernel that faults makes
//! the op that launched it return an error naming the kernel; with it off, the op
//! returns `Ok` and the fault surfaces in a later, unrelated call — as on a GPU, where
//! launches are asynchronous. The emulated device poses as a GPU here with
//! `emu::set_async_faults(true)` (its launches are otherwise synchronous: every fault
//! is already returned by the launch itself).
#![cfg(feature = "emulate")]

use activation_kernels::cuda::{self, acon, CudaContext};
use activation_kernels::emu::{self, Checks};
use activation_kernels::ActShape;

#[test]
fn sync_check_names_the_faulting_kernel() {
    emu::install().expect("emulated device");
    let on = Checks {
        race: true,
        init: true,
        mem: true,
    };
    if !emu::set_checks(on).is_some_and(|c| c.init) {
        // The AddressSanitizer build has no access instrumentation, so no initcheck.
        eprintln!("initcheck unavailable in this build of the emulated device; test skipped");
        return;
    }
    let ctx = CudaContext::new(0).expect("emulated device 0");
    let s = ctx.default_stream();
    let shape = ActShape::nchw(2, 4, 3, 3);
    let p1 = s.clone_htod(&[1.0f32, 0.5, 0.25, 2.0]).expect("p1");
    let p2 = s.clone_htod(&[0.1f32, 0.2, 0.3, 0.4]).expect("p2");
    let beta = s.clone_htod(&[1.0f32; 4]).expect("beta");
    let good = s.clone_htod(&[0.5f32; 72]).expect("x");
    // SAFETY: deliberately never written: the forward's read of it is the fault
    // (initcheck) this test needs.
    let bad = unsafe { s.alloc::<f32>(72) }.expect("alloc");
    let fwd = |x| acon::acon_c_forward(&s, &shape, x, &p1, &p2, acon::Beta::PerChannel(&beta));
    emu::set_async_faults(true);

    // Off: the op returns Ok; the fault surfaces at the next synchronisation.
    cuda::set_sync_check(false);
    let _ = emu::take_fault();
    assert!(
        fwd(&bad).is_ok(),
        "without the check the faulting op returns Ok (asynchronous)"
    );
    let later = s.synchronize();
    assert!(
        later.is_err(),
        "the fault surfaces in the later synchronisation"
    );
    assert!(emu::take_fault().is_some_and(|m| m.contains("acon_c_fwd_f32")));

    // On: the op itself fails and names the kernel.
    cuda::set_sync_check(true);
    assert!(cuda::sync_check());
    let err = fwd(&bad)
        .expect_err("with the check the faulting op fails")
        .to_string();
    assert!(
        err.contains("acon_c_fwd_f32"),
        "error names the kernel: {err}"
    );
    assert!(
        err.contains("AK_CUDA_SYNC_CHECK"),
        "error says what found it: {err}"
    );
    let _ = emu::take_fault();
    // A good launch passes the check, and nothing is left pending.
    let y = fwd(&good).expect("a clean launch passes the check");
    assert_eq!(s.clone_dtoh(&y).expect("copy").len(), 72);
    s.synchronize().expect("nothing pending");

    cuda::set_sync_check(false);
    emu::set_async_faults(false);
}
