//! Shared test helpers: seeded random data and f64 central finite differences.
#![allow(dead_code)]

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Seeded RNG: every test is reproducible.
pub fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}

/// `n` values uniform in `[lo, hi)`.
pub fn uniform(r: &mut SmallRng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| r.gen_range(lo..hi)).collect()
}

/// `n` standard-normal values (Box–Muller).
pub fn randn(r: &mut SmallRng, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let u1: f64 = r.gen_range(1e-12..1.0);
            let u2: f64 = r.gen_range(0.0..1.0);
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        })
        .collect()
}

/// `Σ a_i b_i`.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Finite-difference step. With f64 and O(1) inputs, the central difference has
/// truncation error ~h²·|f'''|/6 ≈ 1e-11 and rounding error ~ε·|f|/h ≈ 1e-11,
/// so agreement to 1e-6 (relative) leaves a 1e5 safety margin; a wrong analytic
/// term produces O(1e-2..1) relative errors.
pub const H: f64 = 1e-5;

/// Central finite-difference gradient of the scalar function `f` at `x`
/// (every coordinate).
pub fn numeric_grad(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + H;
            let fp = f(&xp);
            xp[i] = orig - H;
            let fm = f(&xp);
            xp[i] = orig;
            (fp - fm) / (2.0 * H)
        })
        .collect()
}

/// Asserts `|a − n| <= atol + rtol·max(|a|, |n|)` element-wise, naming the worst
/// offender. Defaults used by the gradient checks: `atol = 1e-8, rtol = 1e-6`.
///
/// Every element on both sides must be finite: a NaN or an infinity on either side
/// (NaN vs finite, NaN vs ±∞, ±∞ vs finite, and also NaN vs NaN and ∞ vs ∞) fails,
/// naming the index. A gradient or a reference that is not finite verifies nothing
/// (`err > bound` is false for a NaN `err`, so without this check a NaN would pass),
/// and no caller compares values that are legitimately non-finite; a test that needs
/// to check a NaN pattern does so explicitly.
#[track_caller]
pub fn assert_close(name: &str, analytic: &[f64], numeric: &[f64], atol: f64, rtol: f64) {
    assert_eq!(analytic.len(), numeric.len(), "{name}: length");
    assert!(
        atol.is_finite() && rtol.is_finite() && atol >= 0.0 && rtol >= 0.0,
        "{name}: tolerances must be finite and non-negative (atol {atol}, rtol {rtol})"
    );
    let mut worst = (0usize, 0.0f64);
    for (i, (a, n)) in analytic.iter().zip(numeric).enumerate() {
        assert!(
            a.is_finite() && n.is_finite(),
            "{name}[{i}]: non-finite value: analytic {a} vs numeric {n}"
        );
        let err = (a - n).abs();
        let bound = atol + rtol * a.abs().max(n.abs());
        if err > bound && err - bound > worst.1 {
            worst = (i, err - bound);
        }
    }
    if worst.1 > 0.0 {
        let i = worst.0;
        panic!(
            "{name}: gradient mismatch at [{i}]: analytic {} vs numeric {} (atol {atol}, rtol {rtol})",
            analytic[i], numeric[i]
        );
    }
}

/// Gradient check with the default tolerances (see [`H`]); fails on any non-finite
/// value (see [`assert_close`]).
#[track_caller]
pub fn check_grad(name: &str, analytic: &[f64], numeric: &[f64]) {
    assert_close(name, analytic, numeric, 1e-8, 1e-6);
}

#[cfg(any(feature = "cuda", feature = "emulate"))]
pub mod device;
