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

use cudarc::driver::{DriverError, LaunchArgs, PushKernelArg};

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
