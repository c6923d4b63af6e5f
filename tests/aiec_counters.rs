//! ACU counters, consensus masks, DMU correctness and the gate loss: hand-derived
//! examples and property tests (SPEC §3).
mod common;

use activation_kernels::cpu::aiec::*;
use activation_kernels::{ActShape, Error};
use common::*;
use proptest::prelude::*;

/// 3 samples, 3 channels, 2 classes; expected counts written by hand.
#[test]
fn counters_hand_example() {
    let mut cnt = Counters::new(2, 3).unwrap();
    let a = [
        1.0, 0.0, 2.0, // sample 0, label 0, correct
        0.0, 0.5, 0.0, // sample 1, label 1, correct
        3.0, 3.0, 3.0, // sample 2, label 0, WRONG: must not count
    ];
    cnt.update(&a, &[0, 1, 0], &[true, true, false]).unwrap();
    assert_eq!(cnt.theta(), &[1, 0, 1, 0, 1, 0]);
    assert_eq!(cnt.eta(), &[0, 1, 0, 1, 0, 1]);
    assert_eq!(cnt.phi(), &[1, 1]);
    assert_eq!(
        cnt.relative_rate::<f64>(),
        vec![1.0, -1.0, 1.0, -1.0, 1.0, -1.0]
    );

    // Second batch: one more correct sample of class 0.
    cnt.update(&[0.0f64, 0.0, 4.0], &[0], &[true]).unwrap();
    assert_eq!(cnt.theta(), &[1, 0, 2, 0, 1, 0]);
    assert_eq!(cnt.eta(), &[1, 2, 0, 1, 0, 1]);
    assert_eq!(cnt.phi(), &[2, 1]);
    let v = cnt.relative_rate::<f64>();
    assert_eq!(v, vec![0.0, -1.0, 1.0, -1.0, 1.0, -1.0]);

    // Masks: G = [v ≤ 0] ∧ [Wd ≤ 0].
    let wd = [-1.0, -0.5, 0.2, 0.3, -2.0, -0.1];
    let g = gate_masks(&v, &wd).unwrap();
    assert_eq!(g, vec![true, true, false, false, false, true]);

    cnt.reset();
    assert!(cnt
        .theta()
        .iter()
        .chain(cnt.eta())
        .chain(cnt.phi())
        .all(|&x| x == 0));
    assert_eq!(cnt.relative_rate::<f32>(), vec![0.0f32; 6]);
    assert_eq!(cnt, Counters::new(2, 3).unwrap());
}

/// A whole training step by hand: NLC, N = 2, L = 2, C = 3, K = 2, τ = 0, Mean pool.
#[test]
fn train_forward_hand_example() {
    let shape = ActShape::nlc(2, 2, 3);
    #[rustfmt::skip]
    let f = [
        2.0, -1.0, 4.0,   0.0, -3.0, 2.0,   // sample 0: A rows [2,0,4],[0,0,2] → a = [1,0,3]
        -1.0, 1.0, 0.5,   -2.0, 3.0, -0.5,  // sample 1: A rows [0,1,.5],[0,3,0] → a = [0,2,.25]
    ];
    let wd = [1.0, -1.0, 1.0, -1.0, 0.5, -2.0];
    // z0 = [4, −7] → predicts 0 = label (correct); z1 = [−1.75, 0.5] → predicts 1 ≠ 0.
    let labels = [0usize, 0];
    let cfg = AiecConfig {
        lambda_gate: 10.0,
        ..AiecConfig::default()
    };
    let mut cnt = Counters::new(2, 3).unwrap();
    let o = train_forward(&cfg, &shape, &f, &wd, &labels, &mut cnt).unwrap();
    assert_eq!(
        o.out,
        vec![2.0, 0.0, 4.0, 0.0, 0.0, 2.0, 0.0, 1.0, 0.5, 0.0, 3.0, 0.0]
    );
    assert_eq!(o.saved.feature(), &[1.0, 0.0, 3.0, 0.0, 2.0, 0.25]);
    assert_eq!(o.saved.logits(), &[4.0, -7.0, -1.75, 0.5]);
    assert_eq!(o.saved.correct(), &[true, false]);
    // Only sample 0 counts.
    assert_eq!(cnt.theta(), &[1, 0, 1, 0, 0, 0]);
    assert_eq!(cnt.eta(), &[0, 1, 0, 0, 0, 0]);
    assert_eq!(cnt.phi(), &[1, 0]);
    // v row 0 = [1, −1, 1]; class 1 has φ = 0 → v = 0 → G_intr all 1, G = [Wd ≤ 0].
    assert_eq!(o.saved.masks(), &[false, true, false, true, false, true]);
    // L_gate: sample 0 (y=0): |a01|/1 = 0; sample 1 (y=0): |a11|/1 = 2.
    assert_eq!(o.losses.gate, vec![0.0, 2.0]);
    assert_eq!(o.losses.gate_mean, 1.0);
    let aux0 = (1.0f64 + (-11.0f64).exp()).ln();
    let aux1 = (1.0f64 + 2.25f64.exp()).ln();
    assert_close("aux", &o.losses.aux, &[aux0, aux1], 1e-15, 1e-14);
    let total = 1.0 * (aux0 + aux1) / 2.0 + 10.0 * 1.0;
    assert_close("total", &[o.losses.total_aux_gate], &[total], 1e-14, 1e-14);

    // Backward, upstream gradient 0: only the auxiliary and gate terms remain.
    let g = train_backward(&cfg, &shape, &[0.0; 12], 1.0, &f, &wd, &o.saved).unwrap();
    // Hand: p1 = softmax([−1.75, 0.5]); g1 = (λ_aux/N)(p1 − e0);
    // da1 = g1·Wd + (λ_gate/N)·G[0]·sign(a1)/1 = … + 5·[0,1,0]; dF = [F > 0]·da/L.
    let e = (-2.25f64).exp();
    let p10 = e / (1.0 + e);
    let g1 = [0.5 * (p10 - 1.0), 0.5 * (1.0 - p10)];
    let da1: Vec<f64> = (0..3)
        .map(|c| g1[0] * wd[c] + g1[1] * wd[3 + c] + if c == 1 { 5.0 } else { 0.0 })
        .collect();
    let df_s1: Vec<f64> = f[6..]
        .iter()
        .enumerate()
        .map(|(i, &fv)| if fv > 0.0 { da1[i % 3] / 2.0 } else { 0.0 })
        .collect();
    assert_close("df sample 1", &g.df[6..], &df_s1, 1e-15, 1e-13);
    // Sample-0 gate term: G[0] = [0,1,0] but a01 = 0 → sign(0) = 0: only aux remains.
    let z0 = [4.0f64, -7.0];
    let p00 = 1.0 / (1.0 + (z0[1] - z0[0]).exp());
    let g0 = [0.5 * (p00 - 1.0), 0.5 * (1.0 - p00)];
    let a = [1.0, 0.0, 3.0, 0.0, 2.0, 0.25];
    let dwd: Vec<f64> = (0..6)
        .map(|i| {
            let (k, c) = (i / 3, i % 3);
            g0[k] * a[c] + g1[k] * a[3 + c]
        })
        .collect();
    assert_close("dwd", &g.dwd, &dwd, 1e-15, 1e-13);
}

/// A class with no correct sample yet (φ = 0) has v = 0, so G_intr = 1 and its mask
/// row is exactly [Wd ≤ 0].
#[test]
fn class_without_correct_samples_gates_on_wd_only() {
    let cnt = Counters::new(3, 4).unwrap();
    let v = cnt.relative_rate::<f64>();
    assert!(v.iter().all(|&x| x == 0.0));
    let wd = [
        0.5, -0.5, 0.0, -1e-9, 1.0, 2.0, 3.0, 4.0, -1.0, -2.0, -3.0, -4.0,
    ];
    let g = gate_masks(&v, &wd).unwrap();
    let expect: Vec<bool> = wd.iter().map(|&w| w <= 0.0).collect();
    assert_eq!(g, expect);
}

/// A sample whose consensus row is all zero: L_gate = 0 and zero gradient, no NaN.
#[test]
fn empty_mask_row_gives_zero_loss_and_gradient() {
    let dims = AiecDims::new(2, 3, 2);
    let a = [1.0, -2.0, 3.0, 0.5, 0.5, -0.5];
    let masks = [false, false, false, true, false, true];
    let labels = [0usize, 1];
    let l = gate_loss(&a, &masks, &labels, dims).unwrap();
    assert_eq!(l, vec![0.0, 0.5]);
    let g: Vec<f64> = gate_loss_backward(&a, &masks, &labels, &[1.0, 1.0], dims).unwrap();
    assert_eq!(g, vec![0.0, 0.0, 0.0, 0.5, 0.0, -0.5]);
    assert!(g.iter().all(|v| v.is_finite()));
}

/// sign(0) = 0 in the gate gradient.
#[test]
fn gate_gradient_sign_of_zero_is_zero() {
    let dims = AiecDims::new(1, 3, 1);
    let g = gate_loss_backward(&[0.0f32, 2.0, -1.0], &[true; 3], &[0], &[3.0], dims).unwrap();
    assert_eq!(g, vec![0.0, 1.0, -1.0]);
}

/// DMU correctness: first maximum wins a tie (like torch.argmax); NaN → not correct.
#[test]
fn dmu_correct_tie_break_and_nan() {
    let dims = AiecDims::new(3, 1, 3);
    let wd = [1.0, 1.0, -1.0]; // z = [a, a, −a]
    let a = [2.0, 2.0, f64::NAN];
    let out = dmu_forward(&a, &wd, &[0, 1, 0], dims).unwrap();
    assert_eq!(out.correct, vec![true, false, false]);
    assert!(out.probs[6..].iter().all(|p| p.is_nan()));
    // Rows 0 and 1 are unaffected by the NaN sample.
    assert!(out.probs[..6].iter().all(|p| p.is_finite()));
    // Stable softmax: huge logits do not overflow.
    let big = dmu_forward(&[1e4f64], &[1.0, -1.0], &[1], AiecDims::new(1, 1, 2)).unwrap();
    assert_close("loss", &big.loss, &[2e4], 0.0, 1e-14);
    assert_eq!(big.probs, vec![1.0, 0.0]);
}

/// Counter update against a naive count written in the test.
#[test]
fn counters_match_naive_count() {
    let mut r = rng(20);
    let (n, c, k) = (13, 7, 4);
    // a ≥ 0 with many exact zeros (as after TAU).
    let a: Vec<f64> = uniform(&mut r, n * c, -1.0, 1.0)
        .into_iter()
        .map(|v| v.max(0.0))
        .collect();
    let labels: Vec<usize> = (0..n).map(|i| (i * 5) % k).collect();
    let correct: Vec<bool> = (0..n).map(|i| i % 3 != 0).collect();
    let mut cnt = Counters::new(k, c).unwrap();
    cnt.update(&a, &labels, &correct).unwrap();
    let (mut th, mut et, mut ph) = (vec![0u64; k * c], vec![0u64; k * c], vec![0u64; k]);
    for i in 0..n {
        if correct[i] {
            ph[labels[i]] += 1;
            for j in 0..c {
                th[labels[i] * c + j] += (a[i * c + j] > 0.0) as u64;
                et[labels[i] * c + j] += (a[i * c + j] == 0.0) as u64;
            }
        }
    }
    assert_eq!(
        (cnt.theta(), cnt.eta(), cnt.phi()),
        (&th[..], &et[..], &ph[..])
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// v ∈ [−1, 1] after any sequence of updates (any sign of a, incl. negatives).
    #[test]
    fn prop_v_in_range(
        batches in prop::collection::vec(
            prop::collection::vec((-2.0f64..2.0, 0usize..3, any::<bool>()), 1..6), 1..5),
        zero_frac in 0.0f64..1.0,
    ) {
        let c = 2;
        let mut cnt = Counters::new(3, c).unwrap();
        for b in &batches {
            let a: Vec<f64> = b.iter().flat_map(|&(x, _, _)| {
                let y = if x.abs() < 2.0 * zero_frac { 0.0 } else { x };
                [y, -y]
            }).collect();
            let labels: Vec<usize> = b.iter().map(|t| t.1).collect();
            let correct: Vec<bool> = b.iter().map(|t| t.2).collect();
            cnt.update(&a, &labels, &correct).unwrap();
        }
        for (i, v) in cnt.relative_rate::<f64>().into_iter().enumerate() {
            prop_assert!((-1.0..=1.0).contains(&v), "v[{}] = {}", i, v);
            prop_assert!(cnt.theta()[i] + cnt.eta()[i] <= cnt.phi()[i / c]);
        }
    }

    /// Wrongly predicted samples never change the counters; and with a ≥ 0 (TAU
    /// output) θ + η = φ for every channel.
    #[test]
    fn prop_wrong_samples_do_not_count(
        a in prop::collection::vec(0.0f64..1.0, 12),
        labels in prop::collection::vec(0usize..2, 4),
        zero_mask in prop::collection::vec(any::<bool>(), 12),
    ) {
        let a: Vec<f64> = a.iter().zip(&zero_mask).map(|(&v, &z)| if z { 0.0 } else { v }).collect();
        let mut cnt = Counters::new(2, 3).unwrap();
        cnt.update(&a, &labels, &[true, false, true, true]).unwrap();
        let before = cnt.clone();
        cnt.update(&a, &labels, &[false; 4]).unwrap();
        prop_assert_eq!(&cnt, &before);
        for k in 0..2 {
            for j in 0..3 {
                prop_assert_eq!(cnt.theta()[k * 3 + j] + cnt.eta()[k * 3 + j], cnt.phi()[k]);
            }
        }
        cnt.reset();
        prop_assert_eq!(cnt, Counters::new(2, 3).unwrap());
    }

    /// A label out of range errs and leaves the counters untouched, whatever its
    /// position in the batch (checked before any sample is counted).
    #[test]
    fn prop_bad_label_leaves_counters(pos in 0usize..5, bad in 3usize..100) {
        let mut cnt = Counters::new(3, 2).unwrap();
        cnt.update(&[1.0f64, 0.0], &[1], &[true]).unwrap();
        let before = cnt.clone();
        let mut labels = vec![0usize, 1, 2, 0, 1];
        labels[pos] = bad;
        let a = vec![1.0f64; 10];
        let e = cnt.update(&a, &labels, &[true; 5]);
        prop_assert_eq!(e, Err(Error::LabelOutOfRange { sample: pos, label: bad, classes: 3 }));
        prop_assert_eq!(&cnt, &before);
        // Same through the whole layer.
        let shape = ActShape::nchw(5, 2, 1, 2);
        let f = vec![0.5f64; 20];
        let r = train_forward(&AiecConfig::default(), &shape, &f, &[0.1; 6], &labels, &mut cnt);
        let is_label_err = matches!(r, Err(Error::LabelOutOfRange { .. }));
        prop_assert!(is_label_err);
        prop_assert_eq!(&cnt, &before);
    }
}

#[test]
fn from_parts_round_trip_and_invariant() {
    let c = Counters::from_parts(2, 2, vec![1, 0, 2, 1], vec![0, 1, 0, 1], vec![1, 2]).unwrap();
    assert_eq!(c.relative_rate::<f64>(), vec![1.0, -1.0, 1.0, 0.0]);
    let c2 = Counters::from_parts(2, 2, c.theta().to_vec(), c.eta().to_vec(), c.phi().to_vec());
    assert_eq!(c2, Ok(c));
    assert!(matches!(
        Counters::from_parts(1, 2, vec![2, 0], vec![0, 0], vec![1]),
        Err(Error::InvalidParam { .. })
    ));
    assert!(matches!(
        Counters::from_parts(1, 1, vec![u64::MAX], vec![1], vec![u64::MAX]),
        Err(Error::InvalidParam { .. })
    ));
}
