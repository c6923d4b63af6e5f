//! The scalar trait the CPU backend is generic over (f32 for speed, f64 for
//! gradient checks).

use std::fmt::Debug;
use std::iter::Sum;

/// A floating-point storage type of the CPU backend: `f32` or `f64`.
///
/// Reductions convert to `f64` through [`Real::to_f64`] where the sum is long
/// (GAP, norms, parameter gradients), so the f32 path stays close to the f64
/// reference regardless of tensor size.
pub trait Real:
    num_traits::Float + num_traits::FromPrimitive + Copy + Send + Sync + Debug + Default + Sum + 'static
{
    /// Converts from f64 (rounding to nearest for f32).
    fn of(v: f64) -> Self;
    /// Converts to f64 exactly.
    fn to_f64(self) -> f64;
    /// `e^x` for hot loops: the vectorisable [`crate::fastmath::exp_f32`] (≤ 2 ulp)
    /// for f32, libm's correctly-rounded-ish `exp` for f64 (the reference).
    fn exp_fast(self) -> Self;
    /// `e^x` for `x ≤ 0` (NaN propagates): [`crate::fastmath::exp_nonpos_f32`] for f32
    /// (the same bits as `exp_fast` there, less work; `x > 0` gives 1), `exp` for f64.
    fn exp_nonpos(self) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn of(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        crate::fastmath::exp_f32(self)
    }
    #[inline(always)]
    fn exp_nonpos(self) -> Self {
        crate::fastmath::exp_nonpos_f32(self)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn of(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        self.exp()
    }
    #[inline(always)]
    fn exp_nonpos(self) -> Self {
        self.exp()
    }
}
