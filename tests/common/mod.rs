//! Shared test helpers: seeded random data and f64 central finite differences.
#![allow(dead_code)]

use approx::abs_diff_eq;
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

/// Asserts `|a − n| <= atol + rtol·max(|a|, |n|)` element-wise (approx's
/// `abs_diff_eq!` with that epsilon), naming the worst offender. Defaults used by the
/// gradient checks: `atol = 1e-8, rtol = 1e-6`.
///
/// Not `relative_eq!(epsilon = atol, max_relative = rtol)`: that passes when either
/// bound holds (`max(atol, rtol·max)`, up to twice as tight as this sum, which the
/// checks' margins were set against) and lets `∞ == ∞` through.
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
        let bound = atol + rtol * a.abs().max(n.abs());
        if !abs_diff_eq!(a, n, epsilon = bound) {
            let excess = (a - n).abs() - bound;
            if excess > worst.1 {
                worst = (i, excess);
            }
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

/// Per-element f32 relative term of the GPU parity suites: 2^-21 (8 f32 ulps).
pub const E_REL: f64 = 1.0 / 2097152.0;

/// The GPU parity bound, element-wise and relative to the tensor's largest magnitude:
/// every `|got_i − want_i| ≤ (u + E_REL)·|want_i| + r·max|want|` (approx's
/// `abs_diff_eq!` with that epsilon; a NaN on either side fails). `u` is the storage
/// dtype's unit roundoff (0 for f32), `r` the suite's max-relative term. An
/// identically zero reference is refused (it would verify nothing). With
/// `PARITY_MEASURE` set, prints the smallest `r` that would pass,
/// `MEASURE|{family}|{dtype}|r={r}|{tensor}|{need}|ratio {r/need}`, reading the dtype
/// and tensor from a `name` of the form `"<dtype> …: <tensor>"`.
#[track_caller]
pub fn assert_parity(family: &str, name: &str, got: &[f64], want: &[f64], u: f64, r: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let max = want.iter().fold(0.0f64, |a, v| a.max(v.abs()));
    assert!(max > 0.0, "{name}: reference is identically zero");
    let mut need = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = (u + E_REL) * w.abs() + r * max;
        let err = (g - w).abs();
        need = need.max((err - (u + E_REL) * w.abs()).max(0.0) / max);
        assert!(
            abs_diff_eq!(g, w, epsilon = tol),
            "{name}[{i}]: gpu {g} vs ref {w} (err {err:.3e} > tol {tol:.3e}, max|ref| {max:.3e})"
        );
    }
    if std::env::var_os("PARITY_MEASURE").is_some() {
        let what = name.rsplit(": ").next().unwrap();
        let dt = name.split(' ').next().unwrap();
        eprintln!(
            "MEASURE|{family}|{dt}|r={r}|{what}|{need:.3e}|ratio {:.1}",
            r / need.max(1e-300)
        );
    }
}

#[cfg(any(feature = "cuda", feature = "emulate"))]
pub mod device;
