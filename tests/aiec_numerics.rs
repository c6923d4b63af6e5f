//! TAU, inference, global feature against naive loops, f32 vs f64 agreement and
//! bitwise determinism of the AIEC layer (SPEC §3).
mod common;

use activation_kernels::cpu::aiec::*;
use activation_kernels::ActShape;
use approx::abs_diff_eq;
use common::*;

#[test]
fn tau_with_positive_threshold_by_hand() {
    let tau = 0.5;
    let x = [-1.0, 0.0, 0.25, 0.5, 0.5000001, 2.0, f64::NAN];
    let y = tau_forward(&x, tau).unwrap();
    assert_eq!(&y[..6], &[0.0, 0.0, 0.0, 0.0, 0.5000001, 2.0]);
    assert_eq!(y[6], 0.0, "NaN > τ is false → 0");
    let dy = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0];
    let g = tau_backward(&dy, &x, tau).unwrap();
    assert_eq!(g, vec![0.0, 0.0, 0.0, 0.0, 5.0, 6.0, 0.0]);
    // τ = 0 is ReLU with gradient 0 at 0.
    assert_eq!(
        tau_forward(&[-2.0f32, 0.0, 3.0], 0.0).unwrap(),
        vec![0.0, 0.0, 3.0]
    );
}

#[test]
fn inference_is_tau_only() {
    let mut r = rng(30);
    let shape = ActShape::nlc(3, 5, 4);
    let f = randn(&mut r, 60);
    let cfg = AiecConfig {
        tau: 0.2,
        lambda_gate: 50.0,
        pool: Pool::ClassToken(1),
        ..AiecConfig::default()
    };
    let inf = infer_forward(&cfg, &f).unwrap();
    let naive: Vec<f64> = f.iter().map(|&v| if v > 0.2 { v } else { 0.0 }).collect();
    assert_eq!(inf, naive);
    // The training forward's output is the same TAU(F): the ACU/DMU/CGU only add
    // losses, they never change the activation.
    let wd = randn(&mut r, 2 * 4);
    let mut cnt = Counters::new(2, 4).unwrap();
    let o = train_forward(&cfg, &shape, &f, &wd, &[0, 1, 1], &mut cnt).unwrap();
    assert_eq!(o.out, inf);
}

#[test]
fn global_feature_matches_naive() {
    let mut r = rng(31);
    for (shape, pool) in [
        (ActShape::nchw(3, 5, 4, 7), Pool::Mean),
        (ActShape::nlc(2, 9, 6), Pool::Mean),
        (ActShape::nlc(2, 9, 6), Pool::ClassToken(0)),
        (ActShape::nlc(2, 9, 6), Pool::ClassToken(8)),
    ] {
        let x = randn(&mut r, shape.n * shape.c * shape.s);
        let got = global_feature(&shape, &x, pool).unwrap();
        let mut want = vec![0.0; shape.n * shape.c];
        for n in 0..shape.n {
            for c in 0..shape.c {
                want[n * shape.c + c] = match pool {
                    Pool::Mean => {
                        (0..shape.s).map(|s| x[shape.idx(n, c, s)]).sum::<f64>() / shape.s as f64
                    }
                    Pool::ClassToken(i) => x[shape.idx(n, c, i)],
                };
            }
        }
        assert_close("feature", &got, &want, 1e-14, 1e-12);
        // And the layer's fused TAU + feature pass equals feature(TAU(F)).
        let cfg = AiecConfig {
            pool,
            ..AiecConfig::default()
        };
        let wd = randn(&mut r, 2 * shape.c);
        let labels: Vec<usize> = (0..shape.n).map(|i| i % 2).collect();
        let mut cnt = Counters::new(2, shape.c).unwrap();
        let o = train_forward(&cfg, &shape, &x, &wd, &labels, &mut cnt).unwrap();
        let a_ref = global_feature(&shape, &tau_forward(&x, 0.0).unwrap(), pool).unwrap();
        assert_eq!(o.saved.feature(), &a_ref[..]);
    }
}

fn to32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// `|a − b| ≤ tol · max(1, max|b|)` element-wise (`abs_diff_eq!` with that epsilon).
fn assert_scaled_close(name: &str, a: &[f32], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!(
            abs_diff_eq!(x as f64, y, epsilon = tol * scale),
            "{name}[{i}]: f32 {x} vs f64 {y} (scale {scale})"
        );
    }
}

/// f32 vs f64 on a ViT-sized layer (8 × 197 × 192, K = 10, class token and mean
/// pool). The sums are accumulated in f64 on both paths, so the f32 path differs
/// only by rounding each stored intermediate (feature, logits, probabilities,
/// losses, gradients) to f32: a few unit roundoffs (2^-24 ≈ 6e-8) of the tensor's
/// scale. Tolerance: 1e-6 of max(1, largest magnitude); measured worst over both
/// pools and all six tensors: 4.5e-8 (aux loss, mean pool), a 22× margin. The
/// activation itself must agree exactly (TAU commutes with rounding).
#[test]
fn f32_matches_f64_vit_shape() {
    let mut r = rng(32);
    let shape = ActShape::nlc(8, 197, 192);
    let k = 10;
    let f64s = randn(&mut r, 8 * 197 * 192);
    let wd64: Vec<f64> = randn(&mut r, k * 192).iter().map(|v| v * 0.1).collect();
    let dout64: Vec<f64> = randn(&mut r, f64s.len()).iter().map(|v| v * 0.01).collect();
    let labels: Vec<usize> = (0..8).map(|i| (i * 3) % k).collect();
    let (f32s, wd32, dout32) = (to32(&f64s), to32(&wd64), to32(&dout64));
    for pool in [Pool::Mean, Pool::ClassToken(0)] {
        let cfg = AiecConfig {
            pool,
            ..AiecConfig::default()
        };
        // Masks from a realistic counter state, shared by both precisions so that
        // the comparison is of the differentiable path.
        let mut cnt = Counters::new(k, 192).unwrap();
        let o64 = train_forward(&cfg, &shape, &f64s, &wd64, &labels, &mut cnt).unwrap();
        let masks = o64.saved.masks().to_vec();
        assert!(masks.iter().any(|&g| g));
        let o32 = train_forward_with_masks(&cfg, &shape, &f32s, &wd32, &labels, &masks).unwrap();
        assert_eq!(o32.out, to32(&o64.out));
        assert_eq!(o32.saved.correct(), o64.saved.correct());
        assert_scaled_close("feature", o32.saved.feature(), o64.saved.feature(), 1e-6);
        assert_scaled_close("aux", &o32.losses.aux, &o64.losses.aux, 1e-6);
        assert_scaled_close("gate", &o32.losses.gate, &o64.losses.gate, 1e-6);
        assert_scaled_close(
            "total",
            &[o32.losses.total_aux_gate],
            &[o64.losses.total_aux_gate],
            1e-6,
        );
        let g64 = train_backward(&cfg, &shape, &dout64, 0.5, &f64s, &wd64, &o64.saved).unwrap();
        let g32 = train_backward(&cfg, &shape, &dout32, 0.5, &f32s, &wd32, &o32.saved).unwrap();
        assert_scaled_close("df", &g32.df, &g64.df, 1e-6);
        assert_scaled_close("dwd", &g32.dwd, &g64.dwd, 1e-6);
    }
}

/// Same inputs → identical bits, forward, counters and backward (f32, 64 × 197 × 192:
/// big enough for rayon to split every pass).
#[test]
fn deterministic_f32_64x197x192() {
    let mut r = rng(33);
    let shape = ActShape::nlc(64, 197, 192);
    let k = 100;
    let f = to32(&randn(&mut r, 64 * 197 * 192));
    let wd: Vec<f32> = to32(&randn(&mut r, k * 192))
        .iter()
        .map(|v| v * 0.1)
        .collect();
    let dout = to32(&randn(&mut r, f.len()));
    let labels: Vec<usize> = (0..64).map(|i| (i * 7) % k).collect();
    let cfg = AiecConfig::default();
    let run = || {
        let mut cnt = Counters::new(k, 192).unwrap();
        let o = train_forward(&cfg, &shape, &f, &wd, &labels, &mut cnt).unwrap();
        let g = train_backward(&cfg, &shape, &dout, 1.0, &f, &wd, &o.saved).unwrap();
        (o, cnt, g)
    };
    let (o1, c1, g1) = run();
    let (o2, c2, g2) = run();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    assert_eq!(bits(&o1.out), bits(&o2.out));
    assert_eq!(bits(o1.saved.feature()), bits(o2.saved.feature()));
    assert_eq!(bits(o1.saved.probs()), bits(o2.saved.probs()));
    assert_eq!(c1, c2);
    assert_eq!(bits(&g1.df), bits(&g2.df));
    assert_eq!(bits(&g1.dwd), bits(&g2.dwd));
    assert!(g1.dwd.iter().any(|&v| v != 0.0));
}
