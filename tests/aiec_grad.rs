//! f64 central-difference gradient checks of the AIEC layer (SPEC §3) and of its
//! standalone pieces (global feature, DMU, gate loss, TAU).
//!
//! The ACU counters and the consensus masks are piecewise-constant functions of the
//! data (integer counts of `a > 0` and an argmax), so their derivative is 0 almost
//! everywhere and the SPEC says the masks carry no gradient. A finite difference
//! through `train_forward` would (a) mutate the counters on every evaluation and (b)
//! could flip a mask across a threshold. So each check computes the masks once with
//! `train_forward` (which also provides `saved` for the analytic backward) and then
//! differentiates `train_forward_with_masks` with those masks held fixed — exactly
//! the function whose gradient the backward claims to compute.
mod common;

use activation_kernels::cpu::aiec::*;
use activation_kernels::{ActShape, Layout};
use common::*;
use rand::rngs::SmallRng;
use rand::Rng;

/// Margin between any F and τ, and the minimum non-zero |a|: both ≫ h = 1e-5.
const MARGIN: f64 = 0.05;

/// Pre-activation data with every |F − τ| ≥ MARGIN (so TAU's kink is never within h),
/// and with each (n, c) feature strictly positive (≥ (τ + 0.5)/S) except the
/// channels listed in `off`, whose every contributing entry is τ − 0.5 (so a = 0
/// exactly and stays 0 under any perturbation of size h: no |·| kink is crossed).
fn make_f(
    r: &mut SmallRng,
    shape: &ActShape,
    tau: f64,
    pool: Pool,
    off: &[(usize, usize)],
) -> Vec<f64> {
    let len = shape.n * shape.c * shape.s;
    let mut f: Vec<f64> = (0..len)
        .map(|_| {
            let mag = MARGIN + r.gen_range(0.0..1.0);
            if r.gen_bool(0.5) {
                tau + mag
            } else {
                tau - mag
            }
        })
        .collect();
    for n in 0..shape.n {
        for c in 0..shape.c {
            let is_off = off.contains(&(n, c));
            match pool {
                Pool::Mean => {
                    if is_off {
                        for s in 0..shape.s {
                            f[shape.idx(n, c, s)] = tau - 0.5;
                        }
                    } else {
                        f[shape.idx(n, c, 0)] = tau + 0.5 + r.gen_range(0.0..0.5);
                    }
                }
                Pool::ClassToken(i) => {
                    f[shape.idx(n, c, i)] = if is_off {
                        tau - 0.5
                    } else {
                        tau + 0.5 + r.gen_range(0.0..0.5)
                    };
                }
            }
        }
    }
    assert!(f.iter().all(|&v| (v - tau).abs() >= MARGIN - 1e-12));
    f
}

struct Case {
    shape: ActShape,
    k: usize,
    cfg: AiecConfig,
    loss_scale: f64,
    off: Vec<(usize, usize)>,
    seed: u64,
}

fn run_case(case: &Case) {
    let Case {
        shape,
        k,
        cfg,
        loss_scale,
        ref off,
        seed,
    } = *case;
    let mut r = rng(seed);
    let (n, c) = (shape.n, shape.c);
    let f = make_f(&mut r, &shape, cfg.tau, cfg.pool, off);
    // Decision weights: class k−1 has an all-positive row, so its consensus mask
    // row is all zero (L_gate = 0 for its samples, with zero gradient, no NaN).
    let mut wd = randn(&mut r, k * c);
    for v in &mut wd[(k - 1) * c..] {
        *v = r.gen_range(0.1..1.0);
    }
    // Labels cycle through the classes (the empty-mask class occurs when N ≥ K).
    let labels: Vec<usize> = (0..n).map(|i| i % k).collect();
    let w = randn(&mut r, f.len()); // L = Σ w·A + s·(λ_aux·mean L_aux + λ_gate·mean L_gate)

    // Mid-epoch counters: φ = 50 per class, θ + η ≤ 50 and |θ − η| ≥ 25, so
    // |v| ≥ 0.5 and one batch (≤ 4 samples) cannot flip its sign. Even channels of
    // every class but the last get v < 0 and Wd < 0, so they are always gated.
    let phi0 = 50u64;
    let mut theta = vec![0u64; k * c];
    let mut eta = vec![0u64; k * c];
    for kk in 0..k {
        for j in 0..c {
            let (hi, lo) = (r.gen_range(30..=45u64), r.gen_range(0..=5u64));
            let i = kk * c + j;
            let negative = if kk < k - 1 && j % 2 == 0 {
                wd[i] = -wd[i].abs();
                true
            } else {
                r.gen_bool(0.5)
            };
            (theta[i], eta[i]) = if negative { (lo, hi) } else { (hi, lo) };
        }
    }
    let mut counters = Counters::from_parts(k, c, theta, eta, vec![phi0; k]).unwrap();
    let fw = train_forward(&cfg, &shape, &f, &wd, &labels, &mut counters).unwrap();
    let masks = fw.saved.masks().to_vec();
    // Masks are non-trivial, and the all-positive class has an empty row.
    assert!(masks[(k - 1) * c..].iter().all(|&g| !g));
    assert!(masks.iter().any(|&g| g), "no gated channel: test too weak");

    // The features are as constructed: ≠ 0 and far from 0, except the `off` ones.
    let a = fw.saved.feature();
    for i in 0..n {
        for j in 0..c {
            if off.contains(&(i, j)) {
                assert_eq!(a[i * c + j], 0.0);
            } else {
                assert!(a[i * c + j] > 1e-3, "a[{i},{j}] = {}", a[i * c + j]);
            }
        }
    }
    // At least one sample has a non-zero gate term (so the gate gradient is tested).
    assert!(fw.losses.gate.iter().any(|&g| g > 1e-3));
    for (i, &y) in labels.iter().enumerate() {
        if y == k - 1 {
            assert_eq!(fw.losses.gate[i], 0.0);
        }
    }

    let loss = |f: &[f64], wd: &[f64]| -> f64 {
        let o = train_forward_with_masks(&cfg, &shape, f, wd, &labels, &masks).unwrap();
        dot(&w, &o.out) + loss_scale * o.losses.total_aux_gate
    };
    // The fixed-mask function agrees with train_forward at the base point.
    let fm = train_forward_with_masks(&cfg, &shape, &f, &wd, &labels, &masks).unwrap();
    assert_eq!(fm.out, fw.out);
    assert_eq!(fm.losses, fw.losses);

    let g = train_backward(&cfg, &shape, &w, loss_scale, &f, &wd, &fw.saved).unwrap();
    assert_eq!(g.df.len(), f.len());
    assert_eq!(g.dwd.len(), wd.len());
    assert!(g.df.iter().chain(&g.dwd).all(|v| v.is_finite()));
    let nf = numeric_grad(&f, |x| loss(x, &wd));
    check_grad("dF", &g.df, &nf);
    let nw = numeric_grad(&wd, |x| loss(&f, x));
    check_grad("dWd", &g.dwd, &nw);
}

#[test]
fn grad_nchw_mean_batch1() {
    run_case(&Case {
        shape: ActShape::nchw(1, 5, 3, 3),
        k: 3,
        cfg: AiecConfig::default(),
        loss_scale: 1.0,
        off: vec![],
        seed: 1,
    });
}

#[test]
fn grad_nchw_mean_batch3_tau_odd_sizes_off_channel() {
    run_case(&Case {
        shape: ActShape::nchw(3, 7, 3, 5),
        k: 4,
        cfg: AiecConfig {
            tau: 0.3,
            lambda_aux: 1.3,
            lambda_gate: 7.0,
            pool: Pool::Mean,
        },
        loss_scale: 0.5,
        off: vec![(0, 1), (2, 4)],
        seed: 2,
    });
}

#[test]
fn grad_nlc_mean() {
    for (n, seed) in [(1usize, 3u64), (4, 4)] {
        run_case(&Case {
            shape: ActShape::nlc(n, 7, 5),
            k: 3,
            cfg: AiecConfig {
                tau: 0.1,
                ..AiecConfig::default()
            },
            loss_scale: 1.0 / 3.0,
            off: vec![(0, 2)],
            seed,
        });
    }
}

#[test]
fn grad_nlc_class_token() {
    for (n, tok, seed) in [(1usize, 0usize, 5u64), (3, 3, 6), (2, 6, 7)] {
        run_case(&Case {
            shape: ActShape::nlc(n, 7, 5),
            k: 3,
            cfg: AiecConfig {
                tau: 0.2,
                lambda_aux: 0.7,
                lambda_gate: 200.0,
                pool: Pool::ClassToken(tok),
            },
            loss_scale: 1.0,
            off: vec![(n - 1, 0)],
            seed,
        });
    }
}

/// The feature (and hence the auxiliary and gate losses) uses only the class-token
/// row: F of every other token receives exactly its upstream gradient through TAU.
#[test]
fn class_token_only_row_feeds_feature() {
    let shape = ActShape::nlc(2, 4, 3);
    let tok = 2;
    let cfg = AiecConfig {
        pool: Pool::ClassToken(tok),
        ..AiecConfig::default()
    };
    let mut r = rng(8);
    let f = make_f(&mut r, &shape, 0.0, cfg.pool, &[]);
    let wd = randn(&mut r, 2 * 3);
    let w = randn(&mut r, f.len());
    let mut cnt = Counters::new(2, 3).unwrap();
    let fw = train_forward(&cfg, &shape, &f, &wd, &[0, 1], &mut cnt).unwrap();
    let g = train_backward(&cfg, &shape, &w, 1.0, &f, &wd, &fw.saved).unwrap();
    for n in 0..2 {
        for t in 0..4 {
            for c in 0..3 {
                let i = shape.idx(n, c, t);
                if t != tok {
                    let expect = if f[i] > 0.0 { w[i] } else { 0.0 };
                    assert_eq!(g.df[i], expect);
                }
            }
        }
    }
}

#[test]
fn grad_global_feature_backward() {
    let mut r = rng(9);
    for (shape, pool) in [
        (ActShape::nchw(2, 3, 2, 3), Pool::Mean),
        (ActShape::nlc(3, 5, 4), Pool::Mean),
        (ActShape::nlc(3, 5, 4), Pool::ClassToken(4)),
    ] {
        let x = randn(&mut r, shape.n * shape.c * shape.s);
        let w = randn(&mut r, shape.n * shape.c);
        let g = global_feature_backward(&shape, &w, pool).unwrap();
        let num = numeric_grad(&x, |x| dot(&w, &global_feature(&shape, x, pool).unwrap()));
        check_grad("global feature", &g, &num);
    }
}

#[test]
fn grad_dmu_and_gate_standalone() {
    let mut r = rng(10);
    let dims = AiecDims::new(4, 6, 3);
    // a with both signs, |a| ≥ 0.1 (≫ h): the |·| of the gate loss is smooth there.
    let a: Vec<f64> = (0..24)
        .map(|_| {
            let m = r.gen_range(0.1..1.5);
            if r.gen_bool(0.5) {
                m
            } else {
                -m
            }
        })
        .collect();
    let wd = randn(&mut r, 18);
    let labels = [2usize, 0, 1, 2];
    let wl = randn(&mut r, 4);

    let out = dmu_forward(&a, &wd, &labels, dims).unwrap();
    let g = dmu_backward(&a, &wd, &out.probs, &labels, &wl, dims).unwrap();
    let l = |a: &[f64], wd: &[f64]| dot(&wl, &dmu_forward(a, wd, &labels, dims).unwrap().loss);
    check_grad("dmu da", &g.da, &numeric_grad(&a, |x| l(x, &wd)));
    check_grad("dmu dwd", &g.dwd, &numeric_grad(&wd, |x| l(&a, x)));

    let masks: Vec<bool> = (0..18).map(|i| i % 3 != 1).collect();
    let gl = gate_loss_backward(&a, &masks, &labels, &wl, dims).unwrap();
    let lg = |a: &[f64]| dot(&wl, &gate_loss(a, &masks, &labels, dims).unwrap());
    check_grad("gate da", &gl, &numeric_grad(&a, lg));
}

#[test]
fn grad_tau() {
    let mut r = rng(11);
    let tau = 0.25;
    // Every |x − τ| ≥ 0.05 ≫ h.
    let x: Vec<f64> = (0..40)
        .map(|_| {
            let m = r.gen_range(0.05..1.0);
            if r.gen_bool(0.5) {
                tau + m
            } else {
                tau - m
            }
        })
        .collect();
    let w = randn(&mut r, 40);
    let g = tau_backward(&w, &x, tau).unwrap();
    let num = numeric_grad(&x, |x| dot(&w, &tau_forward(x, tau).unwrap()));
    check_grad("tau", &g, &num);
}

#[test]
fn layouts_are_consistent() {
    // The same logical tensor in NCHW (S = L) and NLC gives the same feature.
    let mut r = rng(12);
    let (n, c, l) = (2, 3, 5);
    let nchw = ActShape::nchw(n, c, 1, l);
    let nlc = ActShape::nlc(n, l, c);
    assert_eq!(nlc.layout, Layout::Nlc);
    let x1 = randn(&mut r, n * c * l);
    let mut x2 = vec![0.0; x1.len()];
    for i in 0..n {
        for j in 0..c {
            for s in 0..l {
                x2[nlc.idx(i, j, s)] = x1[nchw.idx(i, j, s)];
            }
        }
    }
    let a1 = global_feature(&nchw, &x1, Pool::Mean).unwrap();
    let a2 = global_feature(&nlc, &x2, Pool::Mean).unwrap();
    assert_close("layouts", &a1, &a2, 1e-14, 1e-14);
}
