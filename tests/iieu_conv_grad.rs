//! f64 central finite-difference gradient checks of the fused IieuConv2d
//! (`cpu::iieu_conv`: conv → ψ → IIEU-B) for every input (x_pre, W) and every
//! parameter (γ̇, β̇, η, ψ's scale and shift), over the geometry matrix of
//! `tests/iieu_grad.rs` (batch 1/2, odd sizes, stride, padding, dilation, groups,
//! depthwise, 1×1 and non-square kernels), both patch-norm modes and every ψ (none,
//! bias, affine, BatchNorm training and eval). Each case also checks the forward
//! against the naive reference (direct conv, textbook ψ, `naive::rho`) at 1e-12.
//!
//! Kinks: as in `iieu_grad.rs`, η[o] is put in a gap of channel o's ρ̂ values so
//! every ρ̂ is ≥ 1e-3 from η (asserted) and both branches hold ≥ 15 % of the elements;
//! patch and filter norms never vanish (random data, every window has an in-image tap).
//! Tolerances: `check_grad` (atol 1e-8, rtol 1e-6), see `common::H`.

#[path = "common/iieu_conv_naive.rs"]
mod cnaive;
mod common;
#[path = "common/iieu_naive.rs"]
mod naive;

use activation_kernels::cpu::iieu::{IieuConfig, IieuParams, PatchNorm};
use activation_kernels::cpu::iieu_conv::{backward, forward, IieuConvParams, Psi};
use activation_kernels::Conv2dGeometry;
use cnaive::{Kind, KINDS};
use common::{assert_close, check_grad, dot, numeric_grad, randn, rng, uniform};
use rand::Rng;

struct Case {
    cfg: IieuConfig,
    x_pre: Vec<f64>,
    w: Vec<f64>,
    params: IieuConvParams<f64>,
    dy: Vec<f64>,
    y_ref: Vec<f64>,
}

fn make_case(geo: Conv2dGeometry, mode: PatchNorm, kind: Kind, seed: u64, margin: f64) -> Case {
    let cfg = IieuConfig::new(geo).with_patch_norm(mode);
    let (oh, ow) = geo.validate().unwrap();
    let plane = oh * ow;
    let mut r = rng(seed);
    let x_pre = randn(&mut r, geo.input_len());
    let w = randn(&mut r, geo.weight_len());
    let psi = cnaive::make_psi(kind, geo.c_out, &mut r);
    let c = naive::conv(&geo, &x_pre, &w);
    let x = cnaive::psi_fwd(&psi, &c, geo.n, geo.c_out, plane);
    let gamma: Vec<f64> = (0..geo.c_out)
        .map(|_| {
            let m: f64 = r.gen_range(0.5..2.0);
            if r.gen_bool(0.5) {
                m
            } else {
                -m
            }
        })
        .collect();
    let beta = uniform(&mut r, geo.c_out, -0.5, 0.5);
    let rho = naive::rho(&cfg, &x, &x_pre, &w, &gamma, &beta);
    let eta = naive::choose_eta(&rho, geo.n, geo.c_out, plane, margin);
    let (lower, gap) = naive::branch_stats(&rho, &eta, plane);
    assert!(
        (0.15..=0.85).contains(&lower),
        "lower-branch share {lower} not balanced"
    );
    assert!(gap > margin, "an element is within {gap} of η");
    let y_ref = naive::adjust(&rho, &x, &eta, plane);
    let dy = randn(&mut r, x.len());
    let params = IieuConvParams {
        iieu: IieuParams {
            ln_weight: gamma,
            ln_bias: beta,
            eta,
        },
        psi,
    };
    Case {
        cfg,
        x_pre,
        w,
        params,
        dy,
        y_ref,
    }
}

fn loss(c: &Case, x_pre: &[f64], w: &[f64], p: &IieuConvParams<f64>) -> f64 {
    let mut p = p.clone();
    let (y, _) = forward(&c.cfg, x_pre, w, &mut p).unwrap();
    dot(&c.dy, &y)
}

/// ψ's (scale, shift) vectors, mutable.
fn psi_vecs(p: &mut Psi<f64>) -> (Option<&mut Vec<f64>>, Option<&mut Vec<f64>>) {
    match p {
        Psi::None => (None, None),
        Psi::Bias(b) => (None, Some(b)),
        Psi::Affine { scale, shift } => (Some(scale), Some(shift)),
        Psi::BatchNorm(bn) => (Some(&mut bn.weight), Some(&mut bn.bias)),
    }
}

fn check_case(geo: Conv2dGeometry, mode: PatchNorm, kind: Kind, seed: u64) {
    let c = make_case(geo, mode, kind, seed, 1e-3);
    let tag = |s: &str| format!("{mode:?} {kind:?} {geo:?} {s}");
    let mut p = c.params.clone();
    let (y, saved) = forward(&c.cfg, &c.x_pre, &c.w, &mut p).unwrap();
    assert_close(&tag("y"), &y, &c.y_ref, 1e-12, 1e-10);
    let g = backward(&c.cfg, &c.dy, &c.x_pre, &c.w, &c.params, &saved).unwrap();

    let n = numeric_grad(&c.x_pre, |v| loss(&c, v, &c.w, &c.params));
    check_grad(&tag("dx_pre"), &g.dx_pre, &n);
    let n = numeric_grad(&c.w, |v| loss(&c, &c.x_pre, v, &c.params));
    check_grad(&tag("dw"), &g.dw, &n);
    type Sel = fn(&mut IieuConvParams<f64>) -> Option<&mut Vec<f64>>;
    let sels: [(&str, Sel, &[f64]); 5] = [
        (
            "d_ln_weight",
            |p| Some(&mut p.iieu.ln_weight),
            &g.d_ln_weight,
        ),
        ("d_ln_bias", |p| Some(&mut p.iieu.ln_bias), &g.d_ln_bias),
        ("d_eta", |p| Some(&mut p.iieu.eta), &g.d_eta),
        ("d_psi_scale", |p| psi_vecs(&mut p.psi).0, &g.d_psi_scale),
        ("d_psi_shift", |p| psi_vecs(&mut p.psi).1, &g.d_psi_shift),
    ];
    for (name, sel, got) in sels {
        let mut p0 = c.params.clone();
        let Some(v0) = sel(&mut p0).cloned() else {
            assert!(got.is_empty(), "{}: ψ has no such parameter", tag(name));
            continue;
        };
        let n = numeric_grad(&v0, |v| {
            let mut p = c.params.clone();
            if let Some(t) = sel(&mut p) {
                t.copy_from_slice(v);
            }
            loss(&c, &c.x_pre, &c.w, &p)
        });
        check_grad(&tag(name), got, &n);
    }
    assert!(
        g.d_eta.iter().any(|v| v.abs() > 1e-6),
        "{}",
        tag("dη all 0")
    );
}

fn run(geo: Conv2dGeometry, seed: u64) {
    for mode in [PatchNorm::PerGroup, PatchNorm::AllChannels] {
        for (k, kind) in KINDS.into_iter().enumerate() {
            check_case(geo, mode, kind, seed * 16 + k as u64);
        }
    }
}

#[test]
fn batch1_odd_spatial() {
    run(Conv2dGeometry::new(1, 3, 5, 7, 4, 3, 3), 1);
}

#[test]
fn batch2_odd_spatial() {
    run(Conv2dGeometry::new(2, 3, 5, 7, 4, 3, 3), 2);
}

#[test]
fn stride2_padding1() {
    run(
        Conv2dGeometry::new(2, 3, 7, 6, 3, 3, 3)
            .with_stride(2, 2)
            .with_padding(1, 1),
        3,
    );
}

#[test]
fn padding1() {
    run(
        Conv2dGeometry::new(1, 2, 5, 7, 3, 3, 3).with_padding(1, 1),
        4,
    );
}

#[test]
fn dilation2() {
    run(
        Conv2dGeometry::new(2, 2, 7, 8, 3, 3, 3)
            .with_dilation(2, 2)
            .with_padding(1, 2),
        5,
    );
}

#[test]
fn groups2() {
    run(
        Conv2dGeometry::new(2, 4, 5, 7, 6, 3, 3)
            .with_groups(2)
            .with_padding(1, 1),
        6,
    );
}

#[test]
fn depthwise() {
    run(
        Conv2dGeometry::new(2, 3, 5, 7, 3, 3, 3)
            .with_groups(3)
            .with_padding(1, 1),
        7,
    );
}

#[test]
fn kernel_1x1() {
    run(Conv2dGeometry::new(2, 3, 5, 7, 4, 1, 1), 8);
}

#[test]
fn kernel_3x1() {
    run(
        Conv2dGeometry::new(2, 3, 5, 7, 3, 3, 1).with_padding(1, 0),
        9,
    );
}

#[test]
fn kernel_1x3_stride_2x1() {
    run(
        Conv2dGeometry::new(1, 2, 6, 7, 3, 1, 3)
            .with_stride(2, 1)
            .with_padding(0, 1),
        10,
    );
}

#[test]
fn combined_groups_stride_dilation_asymmetric() {
    run(
        Conv2dGeometry::new(2, 4, 9, 8, 4, 2, 3)
            .with_groups(2)
            .with_stride(2, 1)
            .with_padding(1, 2)
            .with_dilation(1, 2),
        11,
    );
}

/// A tile boundary inside the plane (more output pixels than one tile holds for
/// f64 at this K) and a larger batch: the tiled statistics and patch norms merge.
#[test]
fn multi_tile_plane() {
    // K = 96·3·3 = 864 f64 = 6912 B per row: 37 pixels per tile; plane 8×8 = 64.
    let geo = Conv2dGeometry::new(2, 96, 8, 8, 2, 3, 3).with_padding(1, 1);
    for (k, kind) in [Kind::None, Kind::BnTrain].into_iter().enumerate() {
        // Gradients of W and the parameters only (x_pre has 9216 entries).
        // 128 ρ̂ per channel: η's gap margin 3e-4 (still 30× the ρ̂ shift of a step).
        let c = make_case(geo, PatchNorm::PerGroup, kind, 100 + k as u64, 3e-4);
        let mut p = c.params.clone();
        let (y, saved) = forward(&c.cfg, &c.x_pre, &c.w, &mut p).unwrap();
        assert_close("multi-tile y", &y, &c.y_ref, 1e-12, 1e-10);
        let g = backward(&c.cfg, &c.dy, &c.x_pre, &c.w, &c.params, &saved).unwrap();
        let n = numeric_grad(&c.w, |v| loss(&c, &c.x_pre, v, &c.params));
        check_grad("multi-tile dw", &g.dw, &n);
        // A sample of x_pre coordinates (every 37th).
        let idx: Vec<usize> = (0..c.x_pre.len()).step_by(37).collect();
        let sub: Vec<f64> = idx.iter().map(|&i| c.x_pre[i]).collect();
        let n = numeric_grad(&sub, |v| {
            let mut xp = c.x_pre.clone();
            for (&i, &a) in idx.iter().zip(v) {
                xp[i] = a;
            }
            loss(&c, &xp, &c.w, &c.params)
        });
        let got: Vec<f64> = idx.iter().map(|&i| g.dx_pre[i]).collect();
        check_grad("multi-tile dx_pre", &got, &n);
    }
}
