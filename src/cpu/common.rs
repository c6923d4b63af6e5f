//! Small numeric building blocks shared by the CPU ops (sigmoid, LayerNorm over a
//! short vector, deterministic parallel reductions).

use rayon::prelude::*;

use crate::real::Real;

/// Logistic sigmoid `σ(x) = 1 / (1 + e^{−x})`, evaluated without overflow for
/// large |x| (e^{−x} saturates to +∞ for very negative x, giving 0 exactly).
#[inline(always)]
pub fn sigmoid<T: Real>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

/// Forward of LayerNorm with biased variance over `v` (no affine):
/// writes `x̂ = (v − μ)/sqrt(var + eps)` into `xhat` and returns `rstd = 1/sqrt(var + eps)`.
/// Statistics are accumulated in f64.
pub fn layer_norm_fwd(v: &[f64], eps: f64, xhat: &mut [f64]) -> f64 {
    debug_assert_eq!(v.len(), xhat.len());
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|&a| (a - mean) * (a - mean)).sum::<f64>() / n;
    let rstd = 1.0 / (var + eps).sqrt();
    for (o, &a) in xhat.iter_mut().zip(v) {
        *o = (a - mean) * rstd;
    }
    rstd
}

/// Backward of [`layer_norm_fwd`]: given `dxhat = ∂L/∂x̂`, the saved `x̂` and `rstd`,
/// writes `∂L/∂v = rstd · (dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))` into `dv`.
pub fn layer_norm_bwd(dxhat: &[f64], xhat: &[f64], rstd: f64, dv: &mut [f64]) {
    debug_assert_eq!(dxhat.len(), xhat.len());
    let n = dxhat.len() as f64;
    let m1 = dxhat.iter().sum::<f64>() / n;
    let m2 = dxhat.iter().zip(xhat).map(|(a, b)| a * b).sum::<f64>() / n;
    for ((o, &g), &xh) in dv.iter_mut().zip(dxhat).zip(xhat) {
        *o = rstd * (g - m1 - xh * m2);
    }
}

/// Deterministic two-stage reduction of per-item partial vectors: `f(i)` returns a
/// partial of length `len` for item `i` (computed in parallel); the partials are then
/// summed in item order. The result has identical bits on every run and for every
/// thread count (no float atomics, fixed summation order).
pub fn par_reduce_vec<F>(items: usize, len: usize, f: F) -> Vec<f64>
where
    F: Fn(usize) -> Vec<f64> + Sync + Send,
{
    let partials: Vec<Vec<f64>> = (0..items).into_par_iter().map(f).collect();
    let mut out = vec![0.0f64; len];
    for p in &partials {
        debug_assert_eq!(p.len(), len);
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

/// Makes `v` exactly `len` long (zero-filled only when its length changes; the
/// callers overwrite every element).
pub(crate) fn fit<T: Real>(v: &mut Vec<T>, len: usize) {
    if v.len() != len {
        v.clear();
        v.resize(len, T::zero());
    }
}
