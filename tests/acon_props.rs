//! Property tests (the paper's limits, special cases, layout equivalence),
//! f32-vs-f64 agreement and determinism of the ACON ops.
mod common;

use activation_kernels::cpu::acon::*;
use activation_kernels::{ActShape, Layout};
use approx::abs_diff_eq;
use common::*;
use proptest::prelude::*;

/// Arbitrary small shape in either layout: (n, c, s, layout).
fn shape_strategy() -> impl Strategy<Value = ActShape> {
    (1usize..4, 1usize..6, 1usize..9, any::<bool>()).prop_map(|(n, c, s, nlc)| {
        if nlc {
            ActShape::nlc(n, s, c)
        } else {
            ActShape {
                n,
                c,
                s,
                layout: Layout::Nchw,
            }
        }
    })
}

/// Deterministic data for a shape: x in [−5, 5], p1, p2 in [−2, 2], dy ~ N(0,1).
fn make(sh: &ActShape, seed: u64) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut r = rng(seed);
    let m = sh.n * sh.c * sh.s;
    (
        uniform(&mut r, m, -5.0, 5.0),
        uniform(&mut r, sh.c, -2.0, 2.0),
        uniform(&mut r, sh.c, -2.0, 2.0),
        randn(&mut r, m),
    )
}

/// β buffer of the given kind (0: per channel, 1: per (n, c), 2: per sample), all `v`.
fn beta_buf(kind: u8, sh: &ActShape, v: f64) -> Vec<f64> {
    vec![
        v;
        match kind {
            0 => sh.c,
            1 => sh.n * sh.c,
            _ => sh.n,
        }
    ]
}
fn beta_src(kind: u8, b: &[f64]) -> Beta<'_, f64> {
    match kind {
        0 => Beta::PerChannel(b),
        1 => Beta::PerSampleChannel(b),
        2 => Beta::PerSample(b),
        _ => Beta::PixelWise,
    }
}

/// Channel of flat index `i`.
fn chan(sh: &ActShape, i: usize) -> usize {
    match sh.layout {
        Layout::Nchw => (i / sh.s) % sh.c,
        Layout::Nlc => i % sh.c,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// β → +∞: ACON-C → max(p1·x, p2·x). With d = (p1−p2)x, the gap is
    /// |d|·σ(−β|d|) ≤ max_t t·e^{−βt} = 1/(e·β) (≈ 3.7e-4 for β = 1e3); we assert
    /// that bound (plus 1e-12 rounding).
    #[test]
    fn acon_c_large_beta_is_maxout(sh in shape_strategy(), seed in any::<u64>(), kind in 0u8..3) {
        let (x, p1, p2, _) = make(&sh, seed);
        let bv = 1e3;
        let b = beta_buf(kind, &sh, bv);
        let y = acon_c_forward(&sh, &x, &p1, &p2, beta_src(kind, &b)).unwrap();
        let tol = 1.0 / (std::f64::consts::E * bv) + 1e-12;
        for (i, (&yv, &xv)) in y.iter().zip(&x).enumerate() {
            let c = chan(&sh, i);
            let want = (p1[c] * xv).max(p2[c] * xv);
            prop_assert!(abs_diff_eq!(yv, want, epsilon = tol), "i={} y={} want={}", i, yv, want);
        }
    }

    /// β → 0: ACON-C → (p1 + p2)/2·x. The gap is d·(σ(βd) − 1/2) with
    /// |σ(u) − 1/2| ≤ |u|/4, so ≤ β·d²/4 (+ 1e-12 rounding); β = 1e-9.
    #[test]
    fn acon_c_small_beta_is_mean(sh in shape_strategy(), seed in any::<u64>(), kind in 0u8..3) {
        let (x, p1, p2, _) = make(&sh, seed);
        let bv = 1e-9;
        let b = beta_buf(kind, &sh, bv);
        let y = acon_c_forward(&sh, &x, &p1, &p2, beta_src(kind, &b)).unwrap();
        for (i, (&yv, &xv)) in y.iter().zip(&x).enumerate() {
            let c = chan(&sh, i);
            let d = (p1[c] - p2[c]) * xv;
            let want = 0.5 * (p1[c] + p2[c]) * xv;
            prop_assert!(abs_diff_eq!(yv, want, epsilon = bv * d * d / 4.0 + 1e-12));
        }
    }

    /// ACON-A equals Swish x/(1 + e^{−βx}), written independently here.
    #[test]
    fn acon_a_is_swish(sh in shape_strategy(), seed in any::<u64>(), kind in 0u8..4) {
        let (x, _, _, _) = make(&sh, seed);
        let mut r = rng(seed ^ 1);
        let b: Vec<f64> = match kind {
            0 => uniform(&mut r, sh.c, -3.0, 3.0),
            1 => uniform(&mut r, sh.n * sh.c, -3.0, 3.0),
            2 => uniform(&mut r, sh.n, -3.0, 3.0),
            _ => vec![],
        };
        let y = acon_a_forward(&sh, &x, beta_src(kind, &b)).unwrap();
        for n in 0..sh.n {
            for c in 0..sh.c {
                for s in 0..sh.s {
                    let i = sh.idx(n, c, s);
                    let xv = x[i];
                    let bt = match kind {
                        0 => b[c],
                        1 => b[n * sh.c + c],
                        2 => b[n],
                        _ => 1.0 / (1.0 + (-xv).exp()),
                    };
                    let want = xv / (1.0 + (-bt * xv).exp());
                    prop_assert!(abs_diff_eq!(y[i], want, epsilon = 1e-14 * (1.0 + want.abs())));
                }
            }
        }
    }

    /// ACON-B(p) is ACON-C with p1 = 1, p2 = p: forward and every gradient.
    #[test]
    fn acon_b_is_acon_c_with_p1_one(sh in shape_strategy(), seed in any::<u64>(), kind in 0u8..4) {
        let (x, _, p, dy) = make(&sh, seed);
        let mut r = rng(seed ^ 2);
        let b: Vec<f64> = match kind {
            0 => uniform(&mut r, sh.c, -3.0, 3.0),
            1 => uniform(&mut r, sh.n * sh.c, -3.0, 3.0),
            2 => uniform(&mut r, sh.n, -3.0, 3.0),
            _ => vec![],
        };
        let ones = vec![1.0; sh.c];
        let yb = acon_b_forward(&sh, &x, &p, beta_src(kind, &b)).unwrap();
        let yc = acon_c_forward(&sh, &x, &ones, &p, beta_src(kind, &b)).unwrap();
        prop_assert_eq!(&yb, &yc);
        // Independent formula: (1−p)x·σ(β(1−p)x) + p·x.
        if kind == 0 {
            for (i, &xv) in x.iter().enumerate() {
                let c = chan(&sh, i);
                let u = (1.0 - p[c]) * xv;
                let want = u / (1.0 + (-b[c] * u).exp()) + p[c] * xv;
                prop_assert!(abs_diff_eq!(yb[i], want, epsilon = 1e-14 * (1.0 + want.abs())));
            }
        }
        let gb = acon_b_backward(&sh, &dy, &x, &p, beta_src(kind, &b)).unwrap();
        let gc = acon_c_backward(&sh, &dy, &x, &ones, &p, beta_src(kind, &b)).unwrap();
        prop_assert_eq!(&gb.dx, &gc.dx);
        prop_assert_eq!(&gb.dp, &gc.dp2);
        prop_assert_eq!(&gb.dbeta, &gc.dbeta);
    }

    /// NCHW and NLC give the same values for the same logical tensor (the test
    /// transposes); parameter gradients agree up to summation order (1e-12 rel).
    #[test]
    fn nchw_and_nlc_agree(n in 1usize..4, c in 1usize..6, s in 1usize..9,
                          seed in any::<u64>(), kind in 0u8..4) {
        let a = ActShape { n, c, s, layout: Layout::Nchw };
        let t = ActShape::nlc(n, s, c);
        let (x, p1, p2, dy) = make(&a, seed);
        let mut r = rng(seed ^ 3);
        let b: Vec<f64> = match kind {
            0 => uniform(&mut r, c, -3.0, 3.0),
            1 => uniform(&mut r, n * c, -3.0, 3.0),
            2 => uniform(&mut r, n, -3.0, 3.0),
            _ => vec![],
        };
        // transpose NCHW → NLC by logical index
        let tr = |v: &[f64]| {
            let mut o = vec![0.0; v.len()];
            for nn in 0..n { for cc in 0..c { for ss in 0..s {
                o[t.idx(nn, cc, ss)] = v[a.idx(nn, cc, ss)];
            }}}
            o
        };
        let (xt, dyt) = (tr(&x), tr(&dy));
        let ya = acon_c_forward(&a, &x, &p1, &p2, beta_src(kind, &b)).unwrap();
        let yt = acon_c_forward(&t, &xt, &p1, &p2, beta_src(kind, &b)).unwrap();
        prop_assert_eq!(tr(&ya), yt);
        let ga = acon_c_backward(&a, &dy, &x, &p1, &p2, beta_src(kind, &b)).unwrap();
        let gt = acon_c_backward(&t, &dyt, &xt, &p1, &p2, beta_src(kind, &b)).unwrap();
        prop_assert_eq!(tr(&ga.dx), gt.dx);
        let close = |u: &[f64], v: &[f64]| u.len() == v.len() && u.iter().zip(v)
            .all(|(p, q)| abs_diff_eq!(p, q, epsilon = 1e-12 * (1.0 + p.abs().max(q.abs()))));
        prop_assert!(close(&ga.dp1, &gt.dp1));
        prop_assert!(close(&ga.dp2, &gt.dp2));
        prop_assert!(close(&ga.dbeta, &gt.dbeta));
        // The generators too.
        let la = layer_gen_forward(&a, &x).unwrap();
        let lt = layer_gen_forward(&t, &xt).unwrap();
        prop_assert!(close(&la, &lt));
        let g = ChannelGen::<f64>::init(c, 2, true, seed).unwrap();
        let (ba, sa) = g.forward(&a, &x).unwrap();
        let (bt, st) = g.forward(&t, &xt).unwrap();
        prop_assert!(close(&ba, &bt));
        let dba = randn(&mut r, n * c);
        let gga = g.backward(&a, &dba, &sa).unwrap();
        let ggt = g.backward(&t, &dba, &st).unwrap();
        prop_assert!(close(&tr(&gga.dx), &ggt.dx));
        prop_assert!(close(&gga.dw1, &ggt.dw1));
    }
}

fn to32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&a| a as f32).collect()
}
fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

/// f32 vs f64 on 4×64×15×15 (NCHW) and 4×225×64 (NLC), every β source.
///
/// Inputs are drawn once, rounded to f32 and widened back, so both runs see the
/// same values. Element-wise results (y, dx) are a handful of f32 operations on
/// O(1) operands (x, dy, p ~ N(0,1), β ∈ [−1, 2]) — at most ~10 ulp ≈ 6e-7 of the
/// operand scale. Measured worst |a32 − a64|/(1 + |a64|): y 8.0e-7, dx 4.5e-6 (dx
/// sums `p2` and `(p1 − p2)·∂y/∂d`, terms up to |p| ≈ 3 times |dy| ≈ 3 that cancel,
/// so its error is ~10 ulp of an operand scale of ~10, not of 1 + |dx|). We assert
/// `|a32 − a64| ≤ e·(1 + max(|a32|, |a64|))` with e = 5e-6 for y (6× margin) and
/// e = 1e-5 for dx (2.2× margin; the operand-scale argument gives no more room).
/// Parameter gradients are f64 sums of f32-formed products with relative error
/// ≲ 6e-7 each; we assert |g32 − g64| ≤ 1e-6·Σ|terms|, with Σ|terms| bounded
/// by 2.1·Σ|dy·x| for dp1, dp2 (|∂y/∂d| ≤ 1.1) and by Σ|dy|·d²/4 for dβ
/// (measured worst |g32 − g64|/Σ|terms|: dp 1.2e-8, dβ 4.7e-8; ≥ 20× margin).
#[test]
fn f32_matches_f64() {
    for sh in [ActShape::nchw(4, 64, 15, 15), ActShape::nlc(4, 225, 64)] {
        let mut r = rng(77);
        let m = sh.n * sh.c * sh.s;
        let x = to64(&to32(&randn(&mut r, m)));
        let dy = to64(&to32(&randn(&mut r, m)));
        let p1 = to64(&to32(&randn(&mut r, sh.c)));
        let p2 = to64(&to32(&randn(&mut r, sh.c)));
        for kind in 0u8..4 {
            let b = to64(&to32(&match kind {
                0 => uniform(&mut r, sh.c, -1.0, 2.0),
                1 => uniform(&mut r, sh.n * sh.c, -1.0, 2.0),
                2 => uniform(&mut r, sh.n, -1.0, 2.0),
                _ => vec![],
            }));
            let b32 = to32(&b);
            let src32 = match kind {
                0 => Beta::PerChannel(&b32[..]),
                1 => Beta::PerSampleChannel(&b32[..]),
                2 => Beta::PerSample(&b32[..]),
                _ => Beta::PixelWise,
            };
            let (x32, dy32, p132, p232) = (to32(&x), to32(&dy), to32(&p1), to32(&p2));
            let y64 = acon_c_forward(&sh, &x, &p1, &p2, beta_src(kind, &b)).unwrap();
            let y32 = acon_c_forward(&sh, &x32, &p132, &p232, src32).unwrap();
            assert_close("y f32", &to64(&y32), &y64, 5e-6, 5e-6);
            let g64 = acon_c_backward(&sh, &dy, &x, &p1, &p2, beta_src(kind, &b)).unwrap();
            let g32 = acon_c_backward(&sh, &dy32, &x32, &p132, &p232, src32).unwrap();
            assert_close("dx f32", &to64(&g32.dx), &g64.dx, 1e-5, 1e-5);
            // Scales of the parameter-gradient sums.
            let mut sx = vec![0.0; sh.c];
            let mut sb = vec![0.0; g64.dbeta.len()];
            for nn in 0..sh.n {
                for c in 0..sh.c {
                    for s in 0..sh.s {
                        let i = sh.idx(nn, c, s);
                        sx[c] += (dy[i] * x[i]).abs();
                        let d = (p1[c] - p2[c]) * x[i];
                        let t = dy[i].abs() * d * d / 4.0;
                        match kind {
                            0 => sb[c] += t,
                            1 => sb[nn * sh.c + c] += t,
                            2 => sb[nn] += t,
                            _ => {}
                        }
                    }
                }
            }
            for (c, &sxc) in sx.iter().enumerate() {
                let tol = 1e-6 * 2.1 * sxc;
                assert!(
                    abs_diff_eq!(g32.dp1[c] as f64, g64.dp1[c], epsilon = tol),
                    "dp1[{c}]"
                );
                assert!(
                    abs_diff_eq!(g32.dp2[c] as f64, g64.dp2[c], epsilon = tol),
                    "dp2[{c}]"
                );
            }
            assert_eq!(g32.dbeta.len(), g64.dbeta.len());
            for (i, (&a, &bb)) in g32.dbeta.iter().zip(&g64.dbeta).enumerate() {
                assert!(
                    abs_diff_eq!(a as f64, bb, epsilon = 1e-6 * sb[i] + 1e-12),
                    "dbeta[{i}] kind {kind}"
                );
            }
        }
    }
}

/// Runs `f` once on a 1-thread pool and once on a 4-thread pool.
fn on_pools<R: Send>(f: impl Fn() -> R + Sync) -> (R, R) {
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let four = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    (one.install(&f), four.install(&f))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|a| a.to_bits()).collect()
}

/// Backward twice (default pool) and on 1- vs 4-thread pools: identical bits,
/// f32, 8×64×56×56 NCHW and 64×197×192 NLC (big enough for rayon to split).
#[test]
fn backward_is_deterministic_f32() {
    for sh in [ActShape::nchw(8, 64, 56, 56), ActShape::nlc(64, 197, 192)] {
        let mut r = rng(5);
        let m = sh.n * sh.c * sh.s;
        let x = to32(&randn(&mut r, m));
        let dy = to32(&randn(&mut r, m));
        let p1 = to32(&randn(&mut r, sh.c));
        let p2 = to32(&randn(&mut r, sh.c));
        let b = to32(&uniform(&mut r, sh.n * sh.c, 0.5, 2.0));
        let bc = &b[..sh.c];
        let run = || {
            let g = acon_c_backward(&sh, &dy, &x, &p1, &p2, Beta::PerChannel(bc)).unwrap();
            let h = acon_c_backward(&sh, &dy, &x, &p1, &p2, Beta::PerSampleChannel(&b)).unwrap();
            (g, h)
        };
        let first = run();
        let second = run();
        for ((a, b), what) in [(&first.0, &second.0), (&first.1, &second.1)]
            .into_iter()
            .zip(["per-channel", "per-sample-channel"])
        {
            assert_eq!(bits(&a.dx), bits(&b.dx), "{what} dx");
            assert_eq!(bits(&a.dp1), bits(&b.dp1), "{what} dp1");
            assert_eq!(bits(&a.dp2), bits(&b.dp2), "{what} dp2");
            assert_eq!(bits(&a.dbeta), bits(&b.dbeta), "{what} dbeta");
        }
        let (g1, g4) =
            on_pools(|| acon_c_backward(&sh, &dy, &x, &p1, &p2, Beta::PerChannel(bc)).unwrap());
        assert_eq!(bits(&g1.dp1), bits(&first.0.dp1));
        assert_eq!(bits(&g4.dp1), bits(&first.0.dp1));
        assert_eq!(bits(&g1.dp2), bits(&g4.dp2));
        assert_eq!(bits(&g1.dbeta), bits(&g4.dbeta));
        assert_eq!(bits(&g1.dx), bits(&g4.dx));
    }
}

/// The meta-ACON-C backward (channel generator) is deterministic too.
#[test]
fn meta_backward_is_deterministic_f32() {
    let sh = ActShape::nchw(8, 64, 28, 28);
    let mut r = rng(6);
    let m = sh.n * sh.c * sh.s;
    let x = to32(&randn(&mut r, m));
    let dy = to32(&randn(&mut r, m));
    let p1 = to32(&randn(&mut r, sh.c));
    let p2 = to32(&randn(&mut r, sh.c));
    let g = ChannelGen::<f32>::init(64, 16, true, 3).unwrap();
    let run = || {
        let (_, s) = meta_acon_c_forward(&sh, &x, &p1, &p2, MetaGen::Channel(&g)).unwrap();
        meta_acon_c_backward(&sh, &dy, &x, &p1, &p2, MetaGen::Channel(&g), &s).unwrap()
    };
    let (a, b) = on_pools(run);
    assert_eq!(bits(&a.dx), bits(&b.dx));
    assert_eq!(bits(&a.dp1), bits(&b.dp1));
    assert_eq!(bits(&a.dw1), bits(&b.dw1));
    assert_eq!(bits(&a.dw2), bits(&b.dw2));
}

/// Extreme inputs give no NaN: huge |β·d| saturates σ to 0 or 1 exactly.
#[test]
fn saturation_is_finite() {
    let sh = ActShape::nlc(1, 4, 2);
    let x = [1e30f32, -1e30, 80.0, -80.0, 0.0, 1e-30, -3.0, 3.0];
    let p1 = [1.0f32, 0.5];
    let p2 = [0.0f32, -0.25];
    let b = [1e30f32, 1e3];
    let y = acon_c_forward(&sh, &x, &p1, &p2, Beta::PerChannel(&b)).unwrap();
    let g = acon_c_backward(&sh, &[1.0; 8], &x[..], &p1, &p2, Beta::PerChannel(&b)).unwrap();
    assert!(y.iter().all(|v| v.is_finite()), "{y:?}");
    assert!(g.dx.iter().all(|v| v.is_finite()), "{:?}", g.dx);
    assert!(g.dbeta.iter().all(|v| v.is_finite()), "{:?}", g.dbeta);
    // Saturated: channel 0 (p1 = 1, p2 = 0) gives y = max(x, 0) and dy/dx = 1 for
    // x > 0 (β·d overflows to +∞ in f32 at x = 1e30); channel 1 at x = −80 gives
    // y = p2·x = 20, dy/dx = p2 = −0.25.
    assert_eq!(y[0], 1e30);
    assert_eq!(y[2], 80.0);
    assert_eq!(y[3], 20.0);
    assert_eq!(g.dx[0], 1.0);
    assert_eq!(g.dx[2], 1.0);
    assert_eq!(g.dx[3], -0.25);
    let yp = acon_c_forward(&sh, &x, &p1, &p2, Beta::PixelWise).unwrap();
    assert!(yp.iter().all(|v| v.is_finite()));
}

/// The f32 path's sigmoid (inline exp) is accurate to a few ulp over the whole
/// non-flushed range: ACON-A with β = 1 in f32 vs Swish in f64 on the same
/// (f32-representable) x ∈ [−87, 87], relative error ≤ 5e-7 (≈ 4 ulp: σ ≤ 2 ulp,
/// plus the rounding of 1 + e and of the product).
#[test]
fn f32_sigmoid_accuracy() {
    let xs: Vec<f32> = (0..17401).map(|i| -87.0 + i as f32 * 0.01).collect();
    let sh = ActShape::nlc(1, xs.len(), 1);
    let y = acon_a_forward(&sh, &xs, Beta::PerChannel(&[1.0f32])).unwrap();
    for (&x, &yv) in xs.iter().zip(&y) {
        let xd = x as f64;
        let want = xd / (1.0 + (-xd).exp());
        let err = (yv as f64 - want).abs();
        assert!(err <= 5e-7 * want.abs() + 1e-45, "x={x}: {yv} vs {want}");
    }
}

/// A NaN input gives NaN where it is used and leaves other samples untouched.
#[test]
fn nan_propagates_locally() {
    for sh in [ActShape::nchw(2, 3, 4, 4), ActShape::nlc(2, 16, 3)] {
        let m = sh.n * sh.c * sh.s;
        let mut x = to32(&randn(&mut rng(8), m));
        let p1 = [1.0f32, 0.5, -0.3];
        let p2 = [0.1f32, 0.2, 0.3];
        let clean = acon_c_forward(&sh, &x, &p1, &p2, Beta::PixelWise).unwrap();
        let i = sh.idx(0, 1, 5);
        x[i] = f32::NAN;
        let y = acon_c_forward(&sh, &x, &p1, &p2, Beta::PixelWise).unwrap();
        assert!(y[i].is_nan());
        for nn in 0..sh.n {
            for c in 0..sh.c {
                for s in 0..sh.s {
                    let j = sh.idx(nn, c, s);
                    if j != i {
                        assert_eq!(y[j].to_bits(), clean[j].to_bits());
                    }
                }
            }
        }
        let g = acon_c_backward(&sh, &vec![1.0; m], &x, &p1, &p2, Beta::PixelWise).unwrap();
        assert!(g.dx[i].is_nan() && g.dp1[1].is_nan());
        assert!(g
            .dx
            .iter()
            .enumerate()
            .all(|(j, v)| j == i || v.is_finite()));
        assert!(g.dp1[0].is_finite() && g.dp1[2].is_finite());
    }
}
