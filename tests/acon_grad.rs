//! f64 gradient checks (central finite differences) for ACON-A/B/C with every β
//! source, both layouts, batch 1 and 3; the meta-ACON generators; and the full
//! meta-ACON-C chain. Loss: L = Σ w·y with fixed random w (so dy = w).
//!
//! Kinks: every ACON op and generator here is smooth (products, sums, sigmoids),
//! so there is no branch point to keep inputs away from; inputs are O(1) so the
//! finite-difference error analysis in `common::H` applies.
mod common;

use activation_kernels::cpu::acon::*;
use activation_kernels::ActShape;
use approx::assert_abs_diff_eq;
use common::*;

/// The shapes of the case matrix: NCHW (N, 5, 3×7) and NLC (N, L = 7, 5), N ∈ {1, 3}.
fn shapes() -> Vec<ActShape> {
    vec![
        ActShape::nchw(1, 5, 3, 7),
        ActShape::nchw(3, 5, 3, 7),
        ActShape::nlc(1, 7, 5),
        ActShape::nlc(3, 7, 5),
    ]
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Ch,
    SampleCh,
    Sample,
    Pixel,
}
const KINDS: [Kind; 4] = [Kind::Ch, Kind::SampleCh, Kind::Sample, Kind::Pixel];

fn beta_len(k: Kind, sh: &ActShape) -> usize {
    match k {
        Kind::Ch => sh.c,
        Kind::SampleCh => sh.n * sh.c,
        Kind::Sample => sh.n,
        Kind::Pixel => 0,
    }
}

fn beta_of(k: Kind, b: &[f64]) -> Beta<'_, f64> {
    match k {
        Kind::Ch => Beta::PerChannel(b),
        Kind::SampleCh => Beta::PerSampleChannel(b),
        Kind::Sample => Beta::PerSample(b),
        Kind::Pixel => Beta::PixelWise,
    }
}

struct Data {
    x: Vec<f64>,
    w: Vec<f64>,
    p1: Vec<f64>,
    p2: Vec<f64>,
    b: Vec<f64>,
}

fn data(sh: &ActShape, k: Kind, seed: u64) -> Data {
    let mut r = rng(seed);
    let m = sh.n * sh.c * sh.s;
    // x ~ 1.5·N(0,1); p1, p2 ~ N(0,1); β in [−1, 2] (negative β is legal and
    // exercises the other side of σ).
    let x = randn(&mut r, m).iter().map(|v| 1.5 * v).collect();
    let w = randn(&mut r, m);
    let p1 = randn(&mut r, sh.c);
    let p2 = randn(&mut r, sh.c);
    let b = uniform(&mut r, beta_len(k, sh), -1.0, 2.0);
    Data { x, w, p1, p2, b }
}

fn tag(sh: &ActShape, k: Kind, what: &str) -> String {
    format!("{what} {:?} n={} {:?}", sh.layout, sh.n, k)
}

#[test]
fn acon_c_gradcheck_all_beta_sources_and_layouts() {
    for (si, sh) in shapes().iter().enumerate() {
        for (ki, &k) in KINDS.iter().enumerate() {
            let d = data(sh, k, 100 + (si * 10 + ki) as u64);
            let loss = |x: &[f64], p1: &[f64], p2: &[f64], b: &[f64]| {
                dot(&d.w, &acon_c_forward(sh, x, p1, p2, beta_of(k, b)).unwrap())
            };
            let g = acon_c_backward(sh, &d.w, &d.x, &d.p1, &d.p2, beta_of(k, &d.b)).unwrap();
            let nx = numeric_grad(&d.x, |v| loss(v, &d.p1, &d.p2, &d.b));
            check_grad(&tag(sh, k, "C dx"), &g.dx, &nx);
            let np1 = numeric_grad(&d.p1, |v| loss(&d.x, v, &d.p2, &d.b));
            check_grad(&tag(sh, k, "C dp1"), &g.dp1, &np1);
            let np2 = numeric_grad(&d.p2, |v| loss(&d.x, &d.p1, v, &d.b));
            check_grad(&tag(sh, k, "C dp2"), &g.dp2, &np2);
            let nb = numeric_grad(&d.b, |v| loss(&d.x, &d.p1, &d.p2, v));
            assert_eq!(g.dbeta.len(), beta_len(k, sh));
            check_grad(&tag(sh, k, "C dbeta"), &g.dbeta, &nb);
        }
    }
}

#[test]
fn acon_b_gradcheck_all_beta_sources_and_layouts() {
    for (si, sh) in shapes().iter().enumerate() {
        for (ki, &k) in KINDS.iter().enumerate() {
            let d = data(sh, k, 200 + (si * 10 + ki) as u64);
            let p = &d.p2;
            let loss = |x: &[f64], p: &[f64], b: &[f64]| {
                dot(&d.w, &acon_b_forward(sh, x, p, beta_of(k, b)).unwrap())
            };
            let g = acon_b_backward(sh, &d.w, &d.x, p, beta_of(k, &d.b)).unwrap();
            let nx = numeric_grad(&d.x, |v| loss(v, p, &d.b));
            check_grad(&tag(sh, k, "B dx"), &g.dx, &nx);
            let np = numeric_grad(p, |v| loss(&d.x, v, &d.b));
            check_grad(&tag(sh, k, "B dp"), &g.dp, &np);
            let nb = numeric_grad(&d.b, |v| loss(&d.x, p, v));
            assert_eq!(g.dbeta.len(), beta_len(k, sh));
            check_grad(&tag(sh, k, "B dbeta"), &g.dbeta, &nb);
        }
    }
}

#[test]
fn acon_a_gradcheck_all_beta_sources_and_layouts() {
    for (si, sh) in shapes().iter().enumerate() {
        for (ki, &k) in KINDS.iter().enumerate() {
            let d = data(sh, k, 300 + (si * 10 + ki) as u64);
            let loss =
                |x: &[f64], b: &[f64]| dot(&d.w, &acon_a_forward(sh, x, beta_of(k, b)).unwrap());
            let g = acon_a_backward(sh, &d.w, &d.x, beta_of(k, &d.b)).unwrap();
            let nx = numeric_grad(&d.x, |v| loss(v, &d.b));
            check_grad(&tag(sh, k, "A dx"), &g.dx, &nx);
            let nb = numeric_grad(&d.b, |v| loss(&d.x, v));
            assert_eq!(g.dbeta.len(), beta_len(k, sh));
            check_grad(&tag(sh, k, "A dbeta"), &g.dbeta, &nb);
        }
    }
}

/// A generator with O(1) weights (larger than the init's ±1/√C so that every
/// path carries a visible gradient).
fn gen(c: usize, r: usize, bias: bool, seed: u64) -> ChannelGen<f64> {
    let mut g = ChannelGen::<f64>::init(c, r, bias, seed).unwrap();
    let mut rr = rng(seed ^ 0xabc);
    let wd = g.width;
    g.w1 = randn(&mut rr, wd * c);
    g.w2 = randn(&mut rr, c * wd).iter().map(|v| 0.5 * v).collect();
    if bias {
        g.b1 = Some(randn(&mut rr, wd));
        g.b2 = Some(randn(&mut rr, c));
    }
    g
}

#[test]
fn channel_gen_gradcheck_with_and_without_bias() {
    for sh in [
        ActShape::nchw(3, 5, 3, 7),
        ActShape::nlc(3, 7, 5),
        ActShape::nchw(1, 5, 3, 7),
    ] {
        for bias in [true, false] {
            let g0 = gen(5, 3, bias, 7);
            assert_eq!(g0.width, 3); // max(3, 5/3)
            let mut r = rng(11);
            let x = randn(&mut r, sh.n * sh.c * sh.s);
            let w = randn(&mut r, sh.n * sh.c);
            let (beta, saved) = g0.forward(&sh, &x).unwrap();
            let gr = g0.backward(&sh, &w, &saved).unwrap();
            assert_eq!(beta.len(), sh.n * sh.c);
            let t = |s: &str| format!("gen {s} {:?} n={} bias={bias}", sh.layout, sh.n);
            let nx = numeric_grad(&x, |v| dot(&w, &g0.forward(&sh, v).unwrap().0));
            check_grad(&t("dx"), &gr.dx, &nx);
            let nw1 = numeric_grad(&g0.w1, |v| {
                let mut g = g0.clone();
                g.w1 = v.to_vec();
                dot(&w, &g.forward(&sh, &x).unwrap().0)
            });
            check_grad(&t("dw1"), &gr.dw1, &nw1);
            let nw2 = numeric_grad(&g0.w2, |v| {
                let mut g = g0.clone();
                g.w2 = v.to_vec();
                dot(&w, &g.forward(&sh, &x).unwrap().0)
            });
            check_grad(&t("dw2"), &gr.dw2, &nw2);
            if bias {
                let b1 = g0.b1.clone().unwrap();
                let nb1 = numeric_grad(&b1, |v| {
                    let mut g = g0.clone();
                    g.b1 = Some(v.to_vec());
                    dot(&w, &g.forward(&sh, &x).unwrap().0)
                });
                check_grad(&t("db1"), gr.db1.as_ref().unwrap(), &nb1);
                let b2 = g0.b2.clone().unwrap();
                let nb2 = numeric_grad(&b2, |v| {
                    let mut g = g0.clone();
                    g.b2 = Some(v.to_vec());
                    dot(&w, &g.forward(&sh, &x).unwrap().0)
                });
                check_grad(&t("db2"), gr.db2.as_ref().unwrap(), &nb2);
            } else {
                assert!(gr.db1.is_none() && gr.db2.is_none());
            }
        }
    }
}

#[test]
fn channel_gen_forward_matches_naive_formula() {
    let sh = ActShape::nchw(2, 5, 3, 7);
    let g = gen(5, 3, true, 3);
    let x = randn(&mut rng(5), sh.n * sh.c * sh.s);
    let (beta, _) = g.forward(&sh, &x).unwrap();
    for n in 0..sh.n {
        let gap: Vec<f64> = (0..sh.c)
            .map(|c| (0..sh.s).map(|s| x[sh.idx(n, c, s)]).sum::<f64>() / sh.s as f64)
            .collect();
        let h: Vec<f64> = (0..g.width)
            .map(|j| g.b1.as_ref().unwrap()[j] + dot(&g.w1[j * sh.c..(j + 1) * sh.c], &gap))
            .collect();
        for c in 0..sh.c {
            let z = g.b2.as_ref().unwrap()[c] + dot(&g.w2[c * g.width..(c + 1) * g.width], &h);
            let want = 1.0 / (1.0 + (-z).exp());
            assert_abs_diff_eq!(beta[n * sh.c + c], want, epsilon = 1e-14);
        }
    }
}

#[test]
fn layer_gen_gradcheck_and_formula() {
    for sh in [
        ActShape::nchw(3, 5, 3, 7),
        ActShape::nlc(3, 7, 5),
        ActShape::nlc(1, 7, 5),
    ] {
        let mut r = rng(21);
        let x = randn(&mut r, sh.n * sh.c * sh.s);
        let w = randn(&mut r, sh.n);
        let beta = layer_gen_forward(&sh, &x).unwrap();
        for n in 0..sh.n {
            // σ(Σ_c mean_s x) = σ(Σ_{c,s} x / S)
            let z: f64 = (0..sh.c)
                .flat_map(|c| (0..sh.s).map(move |s| (c, s)))
                .map(|(c, s)| x[sh.idx(n, c, s)])
                .sum::<f64>()
                / sh.s as f64;
            assert_abs_diff_eq!(beta[n], 1.0 / (1.0 + (-z).exp()), epsilon = 1e-14);
        }
        let dx = layer_gen_backward(&sh, &w, &beta).unwrap();
        let nx = numeric_grad(&x, |v| dot(&w, &layer_gen_forward(&sh, v).unwrap()));
        check_grad(&format!("layer gen dx {:?}", sh.layout), &dx, &nx);
    }
}

/// mode 0: channel-wise with biases, 1: channel-wise without, 2: layer-wise, 3: pixel-wise.
fn meta_gen(mode: usize, g: &ChannelGen<f64>) -> MetaGen<'_, f64> {
    match mode {
        0 | 1 => MetaGen::Channel(g),
        2 => MetaGen::Layer,
        _ => MetaGen::Pixel,
    }
}

#[test]
fn meta_acon_c_full_chain_gradcheck() {
    for sh in [
        ActShape::nchw(3, 5, 3, 7),
        ActShape::nlc(3, 7, 5),
        ActShape::nchw(1, 5, 3, 7),
    ] {
        for mode in 0..4 {
            let g0 = gen(5, 3, mode == 0, 17);
            let mut r = rng(31 + mode as u64);
            let m = sh.n * sh.c * sh.s;
            let x: Vec<f64> = randn(&mut r, m);
            let w = randn(&mut r, m);
            let p1 = randn(&mut r, sh.c);
            let p2 = randn(&mut r, sh.c);
            let loss = |g: &ChannelGen<f64>, x: &[f64], p1: &[f64], p2: &[f64]| {
                dot(
                    &w,
                    &meta_acon_c_forward(&sh, x, p1, p2, meta_gen(mode, g))
                        .unwrap()
                        .0,
                )
            };
            let (_, saved) = meta_acon_c_forward(&sh, &x, &p1, &p2, meta_gen(mode, &g0)).unwrap();
            let gr =
                meta_acon_c_backward(&sh, &w, &x, &p1, &p2, meta_gen(mode, &g0), &saved).unwrap();
            let t = |s: &str| format!("meta {s} {:?} n={} mode={mode}", sh.layout, sh.n);
            let nx = numeric_grad(&x, |v| loss(&g0, v, &p1, &p2));
            check_grad(&t("dx"), &gr.dx, &nx);
            let np1 = numeric_grad(&p1, |v| loss(&g0, &x, v, &p2));
            check_grad(&t("dp1"), &gr.dp1, &np1);
            let np2 = numeric_grad(&p2, |v| loss(&g0, &x, &p1, v));
            check_grad(&t("dp2"), &gr.dp2, &np2);
            if mode <= 1 {
                let nw1 = numeric_grad(&g0.w1, |v| {
                    let mut g = g0.clone();
                    g.w1 = v.to_vec();
                    loss(&g, &x, &p1, &p2)
                });
                check_grad(&t("dw1"), &gr.dw1, &nw1);
                let nw2 = numeric_grad(&g0.w2, |v| {
                    let mut g = g0.clone();
                    g.w2 = v.to_vec();
                    loss(&g, &x, &p1, &p2)
                });
                check_grad(&t("dw2"), &gr.dw2, &nw2);
            }
            if mode == 0 {
                let b1 = g0.b1.clone().unwrap();
                let nb1 = numeric_grad(&b1, |v| {
                    let mut g = g0.clone();
                    g.b1 = Some(v.to_vec());
                    loss(&g, &x, &p1, &p2)
                });
                check_grad(&t("db1"), gr.db1.as_ref().unwrap(), &nb1);
                let b2 = g0.b2.clone().unwrap();
                let nb2 = numeric_grad(&b2, |v| {
                    let mut g = g0.clone();
                    g.b2 = Some(v.to_vec());
                    loss(&g, &x, &p1, &p2)
                });
                check_grad(&t("db2"), gr.db2.as_ref().unwrap(), &nb2);
            } else {
                assert!(gr.db1.is_none() && gr.db2.is_none());
            }
            if mode >= 2 {
                assert!(gr.dw1.is_empty() && gr.dw2.is_empty());
            }
            // The generator path must actually contribute to dx (else the chain
            // test would not test it): compare with dx of the activation alone.
            if mode <= 2 {
                let src = if mode <= 1 {
                    Beta::PerSampleChannel(saved.beta())
                } else {
                    Beta::PerSample(saved.beta())
                };
                let only = acon_c_backward(&sh, &w, &x, &p1, &p2, src).unwrap();
                let diff: f64 = only.dx.iter().zip(&gr.dx).map(|(a, b)| (a - b).abs()).sum();
                assert!(diff > 1e-6, "generator path contributes nothing ({diff})");
            }
        }
    }
}

#[test]
fn acon_c_forward_matches_naive_formula() {
    for sh in shapes() {
        for &k in &KINDS {
            let d = data(&sh, k, 400);
            let y = acon_c_forward(&sh, &d.x, &d.p1, &d.p2, beta_of(k, &d.b)).unwrap();
            for n in 0..sh.n {
                for c in 0..sh.c {
                    for s in 0..sh.s {
                        let i = sh.idx(n, c, s);
                        let xv = d.x[i];
                        let b = match k {
                            Kind::Ch => d.b[c],
                            Kind::SampleCh => d.b[n * sh.c + c],
                            Kind::Sample => d.b[n],
                            Kind::Pixel => 1.0 / (1.0 + (-xv).exp()),
                        };
                        let dd = (d.p1[c] - d.p2[c]) * xv;
                        let want = dd / (1.0 + (-b * dd).exp()) + d.p2[c] * xv;
                        assert_abs_diff_eq!(y[i], want, epsilon = 1e-14 * (1.0 + want.abs()));
                    }
                }
            }
        }
    }
}

#[test]
fn params_inits() {
    let p = AconCParams::<f64>::init_paper(4).unwrap();
    assert_eq!(p.p1, vec![1.0; 4]);
    assert_eq!(p.p2, vec![0.0; 4]);
    assert_eq!(p.beta, vec![1.0; 4]);
    let a = AconCParams::<f64>::init_reference(64, 9).unwrap();
    let b = AconCParams::<f64>::init_reference(64, 9).unwrap();
    let c = AconCParams::<f64>::init_reference(64, 10).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.p1, c.p1);
    assert_eq!(a.beta, vec![1.0; 64]);
    // randn: sample mean and variance of the 128 draws near 0 and 1 (loose: 128 samples,
    // the std-error of the mean is 0.09, of the variance ~0.125).
    let all: Vec<f64> = a.p1.iter().chain(&a.p2).copied().collect();
    let mean = all.iter().sum::<f64>() / 128.0;
    let var = all.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / 128.0;
    assert!(mean.abs() < 0.4 && (var - 1.0).abs() < 0.5, "{mean} {var}");
    assert_ne!(a.p1, a.p2);
    // Paper init is Swish: ACON-C with it equals ACON-A with β = 1.
    let sh = ActShape::nchw(1, 4, 2, 3);
    let x = randn(&mut rng(1), 24);
    let yc = acon_c_forward(&sh, &x, &p.p1, &p.p2, Beta::PerChannel(&p.beta)).unwrap();
    let ya = acon_a_forward(&sh, &x, Beta::PerChannel(&p.beta)).unwrap();
    assert_close("paper init = swish", &yc, &ya, 1e-15, 1e-15);
    // Channel generator: width max(r, C/r); init bound 1/sqrt(fan_in).
    let g = ChannelGen::<f64>::init(64, 16, true, 1).unwrap();
    assert_eq!(g.width, 16);
    assert_eq!(ChannelGen::<f64>::width_for(512, 16).unwrap(), 32);
    assert!(g.w1.iter().all(|v| v.abs() <= 1.0 / 8.0));
    assert!(g.w2.iter().all(|v| v.abs() <= 1.0 / 4.0));
    assert!(g.b1.as_ref().unwrap().iter().all(|v| v.abs() <= 1.0 / 8.0));
    assert_eq!(g.b2.as_ref().unwrap().len(), 64);
    let g2 = ChannelGen::<f64>::init(64, 16, false, 1).unwrap();
    assert!(g2.b1.is_none() && g2.b2.is_none());
}
