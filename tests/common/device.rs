//! Device acquisition for the GPU parity suites: a real CUDA device when a driver
//! is present, else the emulated device (feature `emulate`), else a loud failure
//! (set AK_SKIP_GPU_TESTS=1 to skip deliberately, e.g. `--features cuda` on a
//! machine without a GPU).
#![allow(dead_code)]

use std::sync::{Arc, Mutex, MutexGuard};

use activation_kernels::cuda::CudaContext;

/// Serialises GPU tests within one test binary: the emulator's schedule and its
/// allocation counter are process-global.
static LOCK: Mutex<()> = Mutex::new(());

/// A device context plus the test lock; `None` only when skipping was requested.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub emulated: bool,
    _guard: MutexGuard<'static, ()>,
}

pub fn gpu() -> Option<Gpu> {
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let real = activation_kernels::cuda::real_driver_present();
    let emulated = if real {
        false
    } else {
        #[cfg(feature = "emulate")]
        {
            activation_kernels::emu::install().expect("install the emulated device");
            true
        }
        #[cfg(not(feature = "emulate"))]
        {
            if std::env::var_os("AK_SKIP_GPU_TESTS").is_some() {
                eprintln!(
                    "!!! NO CUDA DEVICE: GPU parity test SKIPPED (AK_SKIP_GPU_TESTS set) !!!"
                );
                return None;
            }
            panic!(
                "NO CUDA DEVICE: no driver found and feature `emulate` is off. Run with \
                 --features emulate, on a GPU machine, or set AK_SKIP_GPU_TESTS=1 to skip."
            );
        }
    };
    let ctx = CudaContext::new(0).expect("open CUDA device 0");
    Some(Gpu {
        ctx,
        emulated,
        _guard: guard,
    })
}

impl Gpu {
    /// Runs `f` once on a real GPU; on the emulated device runs it under four
    /// thread orders — identity, reversed, one warp running ahead to its next
    /// barrier, and a seeded random interleaving at every collective (fewer if
    /// AK_EMU_SCHEDULES says so) — with the emulator's race, init and bounds
    /// detectors on, and asserts the results
    /// are bitwise identical (a missing barrier or an order-dependent reduction
    /// shows up here), and that no device allocation outlives `f`.
    pub fn check_schedules<R: PartialEq + std::fmt::Debug>(&self, f: impl Fn() -> R) -> R {
        #[cfg(feature = "emulate")]
        if self.emulated {
            use activation_kernels::emu::Schedule;
            // AK_EMU_SCHEDULES=1 runs the identity order only (used by CI's
            // AddressSanitizer pass, which checks memory safety, not ordering —
            // the ordering check already ran in the plain pass).
            let count = std::env::var("AK_EMU_SCHEDULES")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(4)
                .clamp(1, 4);
            let orders = [
                Schedule::Identity,
                Schedule::Reversed,
                Schedule::WarpAhead(1),
                Schedule::Random(0x5eed),
            ];
            return self.check_orders(&orders[..count], f);
        }
        f()
    }

    /// [`Gpu::check_schedules`] with the given thread orders (at least one): runs
    /// `f` under each, asserts bitwise-identical results, no leaked allocation and
    /// no emulator fault, and returns the first result. Emulated device only.
    #[cfg(feature = "emulate")]
    pub fn check_orders<R: PartialEq + std::fmt::Debug>(
        &self,
        orders: &[activation_kernels::emu::Schedule],
        f: impl Fn() -> R,
    ) -> R {
        use activation_kernels::emu::{self, Schedule};
        let before = emu::live_allocations();
        let mut first: Option<R> = None;
        for &s in orders {
            emu::set_schedule(s);
            let r = f();
            match &first {
                None => first = Some(r),
                Some(r0) => assert!(*r0 == r, "result differs under thread order {s:?}"),
            }
        }
        emu::set_schedule(Schedule::Identity);
        assert_eq!(emu::live_allocations(), before, "device allocations leaked");
        if let Some(fault) = emu::take_fault() {
            panic!("emulator fault: {fault}");
        }
        first.expect("ran at least once")
    }
}

/// Bit pattern of an f32 slice, for exact comparisons (NaN-safe).
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
