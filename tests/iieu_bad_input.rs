//! Every bad-input path of the IIEU-B API returns its specific `Err`, never a panic.

use activation_kernels::cpu::iieu::{
    backward, backward_into, filter_inv_norm, forward, forward_into, patch_inv_norm, IieuConfig,
    IieuGrads, IieuParams, IieuSaved, PatchNorm,
};
use activation_kernels::{Conv2dGeometry, Error};

struct Setup {
    cfg: IieuConfig,
    x: Vec<f64>,
    x_pre: Vec<f64>,
    w: Vec<f64>,
    dy: Vec<f64>,
    p: IieuParams<f64>,
    saved: IieuSaved<f64>,
}

fn geo() -> Conv2dGeometry {
    Conv2dGeometry::new(2, 4, 5, 6, 6, 3, 3)
        .with_padding(1, 1)
        .with_groups(2)
}

fn setup() -> Setup {
    let cfg = IieuConfig::new(geo());
    let (oh, ow) = geo().validate().unwrap();
    let x: Vec<f64> = (0..2 * 6 * oh * ow)
        .map(|i| (i as f64 * 0.37).sin())
        .collect();
    let x_pre: Vec<f64> = (0..geo().input_len())
        .map(|i| (i as f64 * 0.11).cos())
        .collect();
    let w: Vec<f64> = (0..geo().weight_len())
        .map(|i| (i as f64 * 0.23).sin())
        .collect();
    let p = IieuParams::init(6);
    let (_, saved) = forward(&cfg, &x, &x_pre, &w, &p).unwrap();
    let dy = x.clone();
    Setup {
        cfg,
        x,
        x_pre,
        w,
        dy,
        p,
        saved,
    }
}

fn len_err(r: Result<impl Sized, Error>, what: &str) {
    match r {
        Err(Error::LengthMismatch { what: w, .. }) => assert_eq!(w, what),
        Err(e) => panic!("expected LengthMismatch({what}), got {e:?}"),
        Ok(_) => panic!("expected LengthMismatch({what}), got Ok"),
    }
}

fn short(v: &[f64]) -> Vec<f64> {
    v[..v.len() - 1].to_vec()
}

fn long(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.push(0.0);
    v
}

#[test]
fn forward_wrong_lengths() {
    let s = setup();
    for f in [short, long] {
        len_err(forward(&s.cfg, &f(&s.x), &s.x_pre, &s.w, &s.p), "x");
        len_err(forward(&s.cfg, &s.x, &f(&s.x_pre), &s.w, &s.p), "x_pre");
        len_err(forward(&s.cfg, &s.x, &s.x_pre, &f(&s.w), &s.p), "w");
        let mut p = s.p.clone();
        p.ln_weight = f(&p.ln_weight);
        len_err(forward(&s.cfg, &s.x, &s.x_pre, &s.w, &p), "ln_weight");
        let mut p = s.p.clone();
        p.ln_bias = f(&p.ln_bias);
        len_err(forward(&s.cfg, &s.x, &s.x_pre, &s.w, &p), "ln_bias");
        let mut p = s.p.clone();
        p.eta = f(&p.eta);
        len_err(forward(&s.cfg, &s.x, &s.x_pre, &s.w, &p), "eta");
    }
}

#[test]
fn backward_wrong_lengths() {
    let s = setup();
    let b = |dy: &[f64], x: &[f64], xp: &[f64], w: &[f64], p: &IieuParams<f64>| {
        backward(&s.cfg, dy, x, xp, w, p, &s.saved)
    };
    for f in [short, long] {
        len_err(b(&f(&s.dy), &s.x, &s.x_pre, &s.w, &s.p), "dy");
        len_err(b(&s.dy, &f(&s.x), &s.x_pre, &s.w, &s.p), "x");
        len_err(b(&s.dy, &s.x, &f(&s.x_pre), &s.w, &s.p), "x_pre");
        len_err(b(&s.dy, &s.x, &s.x_pre, &f(&s.w), &s.p), "w");
        let mut p = s.p.clone();
        p.ln_weight = f(&p.ln_weight);
        len_err(b(&s.dy, &s.x, &s.x_pre, &s.w, &p), "ln_weight");
        let mut p = s.p.clone();
        p.ln_bias = f(&p.ln_bias);
        len_err(b(&s.dy, &s.x, &s.x_pre, &s.w, &p), "ln_bias");
        let mut p = s.p.clone();
        p.eta = f(&p.eta);
        len_err(b(&s.dy, &s.x, &s.x_pre, &s.w, &p), "eta");
    }
    // The valid call succeeds (so the errors above are due to the lengths).
    assert!(b(&s.dy, &s.x, &s.x_pre, &s.w, &s.p).is_ok());
}

#[test]
fn norm_functions_wrong_lengths() {
    let s = setup();
    len_err(filter_inv_norm(&s.cfg, &short(&s.w)), "w");
    len_err(patch_inv_norm(&s.cfg, &long(&s.x_pre)), "x_pre");
}

#[test]
fn invalid_geometry() {
    let s = setup();
    let bad = [
        geo().with_groups(3),                         // does not divide C = 4
        geo().with_stride(0, 1),                      // zero stride
        geo().with_dilation(1, 0),                    // zero dilation
        Conv2dGeometry::new(1, 1, 2, 2, 1, 3, 3),     // kernel larger than the input
        geo().with_dilation(3, 3).with_padding(0, 0), // dilated extent 7 > 5
    ];
    for g in bad {
        for mode in [PatchNorm::PerGroup, PatchNorm::AllChannels] {
            let cfg = IieuConfig::new(g).with_patch_norm(mode);
            let is_geo = |e: Error| matches!(e, Error::Geometry(_));
            assert!(is_geo(
                forward(&cfg, &s.x, &s.x_pre, &s.w, &s.p).unwrap_err()
            ));
            assert!(is_geo(
                backward(&cfg, &s.dy, &s.x, &s.x_pre, &s.w, &s.p, &s.saved).unwrap_err()
            ));
            assert!(is_geo(filter_inv_norm(&cfg, &s.w).unwrap_err()));
            assert!(is_geo(patch_inv_norm(&cfg, &s.x_pre).unwrap_err()));
        }
    }
}

#[test]
fn zero_dims() {
    let s = setup();
    let zeros = [
        Conv2dGeometry { n: 0, ..geo() },
        Conv2dGeometry { c_in: 0, ..geo() },
        Conv2dGeometry { h: 0, ..geo() },
        Conv2dGeometry { w: 0, ..geo() },
        Conv2dGeometry { c_out: 0, ..geo() },
        Conv2dGeometry { kh: 0, ..geo() },
        Conv2dGeometry { kw: 0, ..geo() },
    ];
    let empty: Vec<f64> = Vec::new();
    for g in zeros {
        let cfg = IieuConfig::new(g);
        let is_empty = |e: Error| matches!(e, Error::Empty { .. });
        let p = IieuParams::<f64>::init(g.c_out);
        assert!(is_empty(
            forward(&cfg, &empty, &empty, &empty, &p).unwrap_err()
        ));
        assert!(is_empty(
            backward(&cfg, &empty, &empty, &empty, &empty, &p, &s.saved).unwrap_err()
        ));
        assert!(is_empty(filter_inv_norm(&cfg, &empty).unwrap_err()));
        assert!(is_empty(patch_inv_norm(&cfg, &empty).unwrap_err()));
    }
}

#[test]
fn saved_state_from_a_different_config() {
    let s = setup();
    let is_shape = |e: Error| matches!(e, Error::Shape { what: "saved", .. });
    // Different patch-norm mode, same tensors.
    let cfg = s.cfg.with_patch_norm(PatchNorm::AllChannels);
    let e = backward(&cfg, &s.dy, &s.x, &s.x_pre, &s.w, &s.p, &s.saved).unwrap_err();
    assert!(is_shape(e));
    // Different geometry with the same buffer lengths (stride 1 → same sizes, groups 1
    // changes the weight length, so use a transposed spatial size instead: 5×6 → 6×5).
    let g2 = Conv2dGeometry {
        h: 6,
        w: 5,
        ..geo()
    };
    let (oh, ow) = g2.validate().unwrap();
    assert_eq!(oh * ow, 30);
    let cfg2 = IieuConfig::new(g2);
    let e = backward(&cfg2, &s.dy, &s.x, &s.x_pre, &s.w, &s.p, &s.saved).unwrap_err();
    assert!(is_shape(e));
    // Saved state from a different batch size.
    let g3 = Conv2dGeometry { n: 1, ..geo() };
    let cfg3 = IieuConfig::new(g3);
    let half = |v: &[f64]| v[..v.len() / 2].to_vec();
    let (x3, xp3, dy3) = (half(&s.x), half(&s.x_pre), half(&s.dy));
    let e = backward(&cfg3, &dy3, &x3, &xp3, &s.w, &s.p, &s.saved).unwrap_err();
    assert!(is_shape(e));
    // And it works with its own state.
    let (_, saved3) = forward(&cfg3, &x3, &xp3, &s.w, &s.p).unwrap();
    assert!(backward(&cfg3, &dy3, &x3, &xp3, &s.w, &s.p, &saved3).is_ok());
}

#[test]
fn non_finite_input_propagates_without_panicking() {
    let s = setup();
    let mut x = s.x.clone();
    x[0] = f64::NAN;
    let (y, saved) = forward(&s.cfg, &x, &s.x_pre, &s.w, &s.p).unwrap();
    assert!(y[0].is_nan());
    // Sample 1 is untouched by a NaN in sample 0.
    assert!(y[y.len() / 2..].iter().all(|v| v.is_finite()));
    let g = backward(&s.cfg, &s.dy, &x, &s.x_pre, &s.w, &s.p, &saved).unwrap();
    assert_eq!(g.dx.len(), x.len());
    assert!(g.dx[g.dx.len() / 2..].iter().all(|v| v.is_finite()));
    assert!(g.dx_pre[g.dx_pre.len() / 2..].iter().all(|v| v.is_finite()));
}

#[test]
fn into_variants_wrong_lengths_leave_outputs_untouched() {
    let s = setup();
    // forward_into: y of the wrong length, and every input check of forward.
    for f in [short, long] {
        let mut y = f(&s.x);
        len_err(
            forward_into(&s.cfg, &s.x, &s.x_pre, &s.w, &s.p, &mut y),
            "y",
        );
        let mut y = vec![7.0; s.x.len()];
        len_err(
            forward_into(&s.cfg, &s.x, &f(&s.x_pre), &s.w, &s.p, &mut y),
            "x_pre",
        );
        assert!(y.iter().all(|&v| v == 7.0), "y written before the error");
    }
    // backward_into: an Err leaves the caller's buffers as they were.
    let mut g = IieuGrads {
        dx: vec![3.0; 5],
        ..Default::default()
    };
    len_err(
        backward_into(
            &s.cfg,
            &short(&s.dy),
            &s.x,
            &s.x_pre,
            &s.w,
            &s.p,
            &s.saved,
            &mut g,
        ),
        "dy",
    );
    assert_eq!(g.dx, vec![3.0; 5]);
    assert!(g.dx_pre.is_empty() && g.dw.is_empty() && g.d_eta.is_empty());
}

/// `forward_into` / `backward_into` give the same bits as the allocating calls, also
/// when the output buffers start with other lengths and garbage contents (every
/// element must be overwritten).
#[test]
fn into_variants_match_allocating_calls_bit_for_bit() {
    let s = setup();
    let (y, saved) = forward(&s.cfg, &s.x, &s.x_pre, &s.w, &s.p).unwrap();
    let mut y2 = vec![f64::NAN; s.x.len()];
    let saved2 = forward_into(&s.cfg, &s.x, &s.x_pre, &s.w, &s.p, &mut y2).unwrap();
    let bits = |v: &[f64]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&y), bits(&y2));
    assert_eq!(bits(saved.r_x()), bits(saved2.r_x()));
    let want = backward(&s.cfg, &s.dy, &s.x, &s.x_pre, &s.w, &s.p, &saved).unwrap();
    let mut g = IieuGrads {
        dx: vec![f64::NAN; 3],
        dx_pre: vec![f64::NAN; s.x_pre.len()],
        dw: vec![f64::NAN; s.w.len() + 9],
        d_ln_weight: vec![f64::NAN; 6],
        d_ln_bias: vec![],
        d_eta: vec![f64::NAN; 1],
    };
    for _ in 0..2 {
        backward_into(&s.cfg, &s.dy, &s.x, &s.x_pre, &s.w, &s.p, &saved2, &mut g).unwrap();
        assert_eq!(bits(&g.dx), bits(&want.dx));
        assert_eq!(bits(&g.dx_pre), bits(&want.dx_pre));
        assert_eq!(bits(&g.dw), bits(&want.dw));
        assert_eq!(bits(&g.d_ln_weight), bits(&want.d_ln_weight));
        assert_eq!(bits(&g.d_ln_bias), bits(&want.d_ln_bias));
        assert_eq!(bits(&g.d_eta), bits(&want.d_eta));
    }
}
