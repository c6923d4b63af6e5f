//! Every bad-input path of the AIEC ops returns the specific `Err` variant (SPEC §3).
use activation_kernels::cpu::aiec::*;
use activation_kernels::{ActShape, Error};

fn is_len(r: Result<impl Sized, Error>) -> bool {
    matches!(r, Err(Error::LengthMismatch { .. }))
}
fn is_param(r: Result<impl Sized, Error>) -> bool {
    matches!(r, Err(Error::InvalidParam { .. }))
}
fn is_empty(r: Result<impl Sized, Error>) -> bool {
    matches!(r, Err(Error::Empty { .. }))
}
fn is_shape(r: Result<impl Sized, Error>) -> bool {
    matches!(r, Err(Error::Shape { .. }))
}
fn is_label(r: Result<impl Sized, Error>) -> bool {
    matches!(r, Err(Error::LabelOutOfRange { .. }))
}

#[test]
fn tau_bad_inputs() {
    let x = [1.0f64, -1.0];
    assert!(is_param(tau_forward(&x, -0.1)));
    assert!(is_param(tau_forward(&x, f64::NAN)));
    assert!(is_param(tau_forward(&x, f64::INFINITY)));
    assert!(is_empty(tau_forward::<f64>(&[], 0.0)));
    assert!(is_param(tau_backward(&x, &x, -1.0)));
    assert!(is_param(tau_backward(&x, &x, f32::NAN as f64)));
    assert!(is_len(tau_backward(&[1.0], &x, 0.0)));
    assert!(is_empty(tau_backward::<f32>(&[], &[], 0.0)));
    for tau in [-1.0, f64::NAN] {
        let cfg = AiecConfig {
            tau,
            ..AiecConfig::default()
        };
        assert!(is_param(infer_forward(&cfg, &x)));
    }
    assert!(is_empty(infer_forward::<f64>(&AiecConfig::default(), &[])));
}

#[test]
fn pool_bad_inputs() {
    let nchw = ActShape::nchw(1, 2, 2, 2);
    let nlc = ActShape::nlc(1, 3, 2);
    let x = vec![1.0f64; 8];
    assert!(is_shape(global_feature(&nchw, &x, Pool::ClassToken(0))));
    assert!(is_param(global_feature(&nlc, &x[..6], Pool::ClassToken(3))));
    assert!(is_len(global_feature(&nlc, &x, Pool::Mean)));
    assert!(is_empty(global_feature(
        &ActShape::nlc(0, 3, 2),
        &[] as &[f64],
        Pool::Mean
    )));
    assert!(is_shape(global_feature_backward(
        &nchw,
        &[1.0f64; 2],
        Pool::ClassToken(0)
    )));
    assert!(is_param(global_feature_backward(
        &nlc,
        &[1.0f64; 2],
        Pool::ClassToken(7)
    )));
    assert!(is_len(global_feature_backward(
        &nlc,
        &[1.0f64; 3],
        Pool::Mean
    )));
    assert!(is_empty(global_feature_backward(
        &ActShape::nchw(1, 0, 2, 2),
        &[] as &[f64],
        Pool::Mean
    )));
    // Through the layer, before any counter is touched.
    let mut cnt = Counters::new(2, 2).unwrap();
    let cfg = AiecConfig {
        pool: Pool::ClassToken(0),
        ..AiecConfig::default()
    };
    assert!(is_shape(train_forward(
        &cfg,
        &nchw,
        &x,
        &[0.0; 4],
        &[0],
        &mut cnt
    )));
    let cfg = AiecConfig {
        pool: Pool::ClassToken(3),
        ..AiecConfig::default()
    };
    assert!(is_param(train_forward(
        &cfg,
        &nlc,
        &x[..6],
        &[0.0; 4],
        &[0],
        &mut cnt
    )));
    assert_eq!(cnt, Counters::new(2, 2).unwrap());
}

#[test]
fn counters_bad_inputs() {
    assert!(is_empty(Counters::new(0, 3)));
    assert!(is_empty(Counters::new(3, 0)));
    assert!(is_shape(Counters::new(usize::MAX, 2)));
    assert!(is_len(Counters::from_parts(
        1,
        2,
        vec![0],
        vec![0, 0],
        vec![0]
    )));
    assert!(is_len(Counters::from_parts(
        1,
        2,
        vec![0, 0],
        vec![0],
        vec![0]
    )));
    assert!(is_len(Counters::from_parts(
        1,
        2,
        vec![0, 0],
        vec![0, 0],
        vec![]
    )));
    assert!(is_empty(Counters::from_parts(0, 2, vec![], vec![], vec![])));

    let mut c = Counters::new(2, 3).unwrap();
    c.update(&[1.0f64, 0.0, 1.0], &[1], &[true]).unwrap();
    let before = c.clone();
    assert!(is_empty(c.update::<f64>(&[], &[], &[])));
    assert!(is_len(c.update(&[1.0f64; 5], &[0, 1], &[true, true])));
    assert!(is_len(c.update(&[1.0f64; 6], &[0, 1], &[true])));
    assert_eq!(
        c.update(&[1.0f64; 6], &[0, 2], &[true, true]),
        Err(Error::LabelOutOfRange {
            sample: 1,
            label: 2,
            classes: 2
        })
    );
    assert_eq!(c, before);
}

#[test]
fn dmu_and_gate_bad_inputs() {
    let d = AiecDims::new(2, 3, 2);
    let a = [1.0f64; 6];
    let wd = [0.5f64; 6];
    let probs = [0.5f64; 4];
    let masks = [true; 6];
    for bad in [
        AiecDims::new(0, 3, 2),
        AiecDims::new(2, 0, 2),
        AiecDims::new(2, 3, 0),
    ] {
        assert!(is_empty(dmu_forward(&a, &wd, &[0, 1], bad)));
        assert!(is_empty(dmu_backward(
            &a,
            &wd,
            &probs,
            &[0, 1],
            &[1.0; 2],
            bad
        )));
        assert!(is_empty(gate_loss(&a, &masks, &[0, 1], bad)));
        assert!(is_empty(gate_loss_backward(
            &a,
            &masks,
            &[0, 1],
            &[1.0; 2],
            bad
        )));
    }
    assert!(is_shape(AiecDims::new(usize::MAX, 2, 1).validate()));
    assert!(is_len(dmu_forward(&a[..5], &wd, &[0, 1], d)));
    assert!(is_len(dmu_forward(&a, &wd[..4], &[0, 1], d)));
    assert!(is_len(dmu_forward(&a, &wd, &[0], d)));
    assert!(is_label(dmu_forward(&a, &wd, &[0, 2], d)));
    assert!(is_len(dmu_backward(
        &a,
        &wd,
        &probs[..3],
        &[0, 1],
        &[1.0; 2],
        d
    )));
    assert!(is_len(dmu_backward(&a, &wd, &probs, &[0, 1], &[1.0; 3], d)));
    assert!(is_label(dmu_backward(
        &a,
        &wd,
        &probs,
        &[5, 1],
        &[1.0; 2],
        d
    )));
    assert!(is_len(gate_loss(&a, &masks[..5], &[0, 1], d)));
    assert!(is_len(gate_loss(&a[..4], &masks, &[0, 1], d)));
    assert!(is_label(gate_loss(&a, &masks, &[0, 9], d)));
    assert!(is_len(gate_loss(&a, &masks, &[0, 1, 1], d)));
    assert!(is_len(gate_loss_backward(&a, &masks, &[0, 1], &[1.0], d)));
    assert!(is_label(gate_loss_backward(
        &a,
        &masks,
        &[2, 1],
        &[1.0; 2],
        d
    )));
    assert!(is_len(gate_masks(&[0.0f64; 6], &[0.0; 5])));
    assert!(is_empty(gate_masks::<f64>(&[], &[])));
}

#[test]
fn train_bad_inputs() {
    let shape = ActShape::nlc(2, 3, 4);
    let f = vec![0.5f64; 24];
    let wd = vec![-0.1f64; 3 * 4];
    let cfg = AiecConfig::default();
    let fresh = Counters::new(3, 4).unwrap();
    let mut cnt = fresh.clone();

    assert!(is_label(train_forward(
        &cfg,
        &shape,
        &f,
        &wd,
        &[0, 3],
        &mut cnt
    )));
    assert!(is_len(train_forward(&cfg, &shape, &f, &wd, &[0], &mut cnt)));
    assert!(is_len(train_forward(
        &cfg,
        &shape,
        &f,
        &wd,
        &[0, 1, 2],
        &mut cnt
    )));
    assert!(is_len(train_forward(
        &cfg,
        &shape,
        &f,
        &wd[..8],
        &[0, 1],
        &mut cnt
    )));
    assert!(is_len(train_forward(
        &cfg,
        &shape,
        &f[..23],
        &wd,
        &[0, 1],
        &mut cnt
    )));
    assert!(is_empty(train_forward(
        &cfg,
        &ActShape::nlc(2, 0, 4),
        &[] as &[f64],
        &wd,
        &[0, 1],
        &mut cnt
    )));
    for bad in [
        AiecConfig { tau: -0.5, ..cfg },
        AiecConfig {
            tau: f64::NAN,
            ..cfg
        },
        AiecConfig {
            lambda_aux: -1.0,
            ..cfg
        },
        AiecConfig {
            lambda_gate: f64::NAN,
            ..cfg
        },
    ] {
        assert!(is_param(train_forward(
            &bad,
            &shape,
            &f,
            &wd,
            &[0, 1],
            &mut cnt
        )));
    }
    // Counters of the wrong channel count.
    let mut wrong = Counters::new(3, 5).unwrap();
    assert!(is_shape(train_forward(
        &cfg,
        &shape,
        &f,
        &wd,
        &[0, 1],
        &mut wrong
    )));
    assert_eq!(wrong, Counters::new(3, 5).unwrap());
    // Counters with a different class count than Wd: Wd length check.
    let mut two = Counters::new(2, 4).unwrap();
    assert!(is_len(train_forward(
        &cfg,
        &shape,
        &f,
        &wd,
        &[0, 1],
        &mut two
    )));
    assert_eq!(cnt, fresh, "no failed call may touch the counters");

    // train_forward_with_masks.
    let m = vec![true; 12];
    assert!(is_shape(train_forward_with_masks(
        &cfg,
        &shape,
        &f,
        &wd[..7],
        &[0, 1],
        &m
    )));
    assert!(is_shape(train_forward_with_masks(
        &cfg,
        &shape,
        &f,
        &[],
        &[0, 1],
        &m
    )));
    assert!(is_len(train_forward_with_masks(
        &cfg,
        &shape,
        &f,
        &wd,
        &[0, 1],
        &m[..8]
    )));
    assert!(is_label(train_forward_with_masks(
        &cfg,
        &shape,
        &f,
        &wd,
        &[3, 1],
        &m
    )));

    // Backward.
    let o = train_forward(&cfg, &shape, &f, &wd, &[0, 1], &mut cnt).unwrap();
    let d = vec![1.0f64; 24];
    assert!(train_backward(&cfg, &shape, &d, 1.0, &f, &wd, &o.saved).is_ok());
    assert!(is_len(train_backward(
        &cfg,
        &shape,
        &d[..20],
        1.0,
        &f,
        &wd,
        &o.saved
    )));
    assert!(is_len(train_backward(
        &cfg,
        &shape,
        &d,
        1.0,
        &f[..20],
        &wd,
        &o.saved
    )));
    assert!(is_len(train_backward(
        &cfg,
        &shape,
        &d,
        1.0,
        &f,
        &wd[..4],
        &o.saved
    )));
    let other = AiecConfig { tau: 0.1, ..cfg };
    assert!(is_param(train_backward(
        &other, &shape, &d, 1.0, &f, &wd, &o.saved
    )));
    let s3 = ActShape::nlc(3, 2, 4);
    assert!(is_shape(train_backward(
        &cfg, &s3, &d, 1.0, &f, &wd, &o.saved
    )));
}
