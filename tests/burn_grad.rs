//! burn autodiff vs the CPU reference, f64 on burn's `Flex` backend.
//!
//! Parity: for every op family, gradients from burn's `backward()` of `L = Σ w·y`
//! (fixed random `w`) must equal the crate's CPU backward called directly with
//! `dy = w`, for every input and parameter. Both sides run the same f64 CPU code on
//! the same `dy` (burn's gradient of `sum(w·y)` w.r.t. `y` is exactly `w`), so they are
//! expected to agree to the last bit; the bound `1e-12 + 1e-12·|v|` only allows for a
//! different summation order where burn adds two paths into one gradient (meta-ACON:
//! `x` feeds the generator and the activation; IIEU-DC's packed parameters are split
//! by burn's `cat` backward, which also checks the packing order).
//!
//! Finite differences through burn (one op per family): the loss is evaluated by burn
//! forwards (f64), central differences with `h = 1e-5` (tests/common `H`), compared to
//! burn's gradient with `atol = 1e-8, rtol = 1e-6` (tests/common `check_grad`: the
//! truncation and rounding errors are ~1e-11, a wrong term is O(1e-2) relative).
#![cfg(feature = "burn")]

mod common;

use std::sync::{Arc, Mutex};

use activation_kernels::burn::nn::{AconConfig, IieuDcConfig, MetaAconCConfig, MetaGenKind};
use activation_kernels::burn::ops::{self, BetaTensor, DcTensors, IieuOpts};
use activation_kernels::cpu::acon::{self, Beta, ChannelGen};
use activation_kernels::cpu::aiec::{self, AiecConfig, Counters};
use activation_kernels::cpu::iieu::{self, IieuConfig, IieuParams, PatchNorm};
use activation_kernels::cpu::iieu_dc::{self, DcConfig, DcParams};
use activation_kernels::{ActShape, Conv2dGeometry, Layout};
use burn::tensor::{DType, Device, Tensor, TensorCreationOptions, TensorData};
use common::{assert_close, check_grad, numeric_grad, randn, rng, uniform};

fn dev() -> Device {
    Device::flex().autodiff()
}

fn opts(d: &Device) -> TensorCreationOptions {
    TensorCreationOptions::new(d.clone()).with_dtype(DType::F64)
}

/// An f64 leaf tensor on `d` that requires a gradient (when `d` is autodiff).
fn t<const D: usize>(v: &[f64], dims: [usize; D], d: &Device) -> Tensor<D> {
    let x = Tensor::from_data(TensorData::new(v.to_vec(), dims), opts(d));
    if d.is_autodiff() {
        x.require_grad()
    } else {
        x
    }
}

fn host<const D: usize>(x: Tensor<D>) -> Vec<f64> {
    x.into_data().try_to_vec::<f64>().expect("f64 tensor")
}

fn grad<const D: usize>(x: &Tensor<D>, g: &burn::tensor::Gradients) -> Vec<f64> {
    host(x.grad(g).expect("a gradient"))
}

/// `Σ w·y` as a burn scalar.
fn wsum<const D: usize>(y: Tensor<D>, w: &[f64], d: &Device) -> Tensor<1> {
    let dims = y.dims();
    let wt = Tensor::<D>::from_data(TensorData::new(w.to_vec(), dims), opts(d));
    (y * wt).sum()
}

/// Parity bound (see the file docs).
fn same(name: &str, got: &[f64], want: &[f64]) {
    assert_close(name, got, want, 1e-12, 1e-12);
}

const SHAPE: (usize, usize, usize, usize) = (2, 3, 2, 2);

fn shape() -> ActShape {
    let (n, c, h, w) = SHAPE;
    ActShape::nchw(n, c, h, w)
}

fn dims4() -> [usize; 4] {
    let (n, c, h, w) = SHAPE;
    [n, c, h, w]
}

#[test]
fn acon_c_every_beta_matches_cpu_backward() {
    let d = dev();
    let sh = shape();
    let mut r = rng(1);
    let xv = randn(&mut r, 24);
    let wv = randn(&mut r, 24);
    let p1v = uniform(&mut r, 3, 0.5, 1.5);
    let p2v = uniform(&mut r, 3, -0.5, 0.5);
    let cases: [(&str, Vec<f64>); 4] = [
        ("per channel", uniform(&mut r, 3, 0.5, 2.0)),
        ("per sample-channel", uniform(&mut r, 6, 0.5, 2.0)),
        ("per sample", uniform(&mut r, 2, 0.5, 2.0)),
        ("pixel-wise", vec![]),
    ];
    for (name, bv) in cases {
        let (x, p1, p2) = (t(&xv, dims4(), &d), t(&p1v, [3], &d), t(&p2v, [3], &d));
        let (bt, beta, b1, b2) = match name {
            "per channel" => {
                let b = t(&bv, [3], &d);
                (
                    BetaTensor::PerChannel(b.clone()),
                    Beta::PerChannel(&bv[..]),
                    Some(b),
                    None,
                )
            }
            "per sample-channel" => {
                let b = t(&bv, [2, 3], &d);
                (
                    BetaTensor::PerSampleChannel(b.clone()),
                    Beta::PerSampleChannel(&bv[..]),
                    None,
                    Some(b),
                )
            }
            "per sample" => {
                let b = t(&bv, [2], &d);
                (
                    BetaTensor::PerSample(b.clone()),
                    Beta::PerSample(&bv[..]),
                    Some(b),
                    None,
                )
            }
            _ => (BetaTensor::PixelWise, Beta::PixelWise, None, None),
        };
        let y = ops::acon_c(x.clone(), p1.clone(), p2.clone(), bt, Layout::Nchw).expect("acon_c");
        let yv = acon::acon_c_forward(&sh, &xv, &p1v, &p2v, beta).expect("cpu");
        same(&format!("{name}: y"), &host(y.clone()), &yv);
        let g = wsum(y, &wv, &d).backward();
        let want = acon::acon_c_backward(&sh, &wv, &xv, &p1v, &p2v, beta).expect("cpu");
        same(&format!("{name}: dx"), &grad(&x, &g), &want.dx);
        same(&format!("{name}: dp1"), &grad(&p1, &g), &want.dp1);
        same(&format!("{name}: dp2"), &grad(&p2, &g), &want.dp2);
        if let Some(b) = b1 {
            same(&format!("{name}: dbeta"), &grad(&b, &g), &want.dbeta);
        }
        if let Some(b) = b2 {
            same(&format!("{name}: dbeta"), &grad(&b, &g), &want.dbeta);
        }
    }
}

#[test]
fn acon_a_b_match_cpu_backward() {
    let d = dev();
    let sh = shape();
    let mut r = rng(2);
    let xv = randn(&mut r, 24);
    let wv = randn(&mut r, 24);
    let pv = uniform(&mut r, 3, -0.5, 0.5);
    let bv = uniform(&mut r, 6, 0.5, 2.0);

    let (x, p, b) = (t(&xv, dims4(), &d), t(&pv, [3], &d), t(&bv, [2, 3], &d));
    let y = ops::acon_b(
        x.clone(),
        p.clone(),
        BetaTensor::PerSampleChannel(b.clone()),
        Layout::Nchw,
    )
    .unwrap();
    let g = wsum(y, &wv, &d).backward();
    let want = acon::acon_b_backward(&sh, &wv, &xv, &pv, Beta::PerSampleChannel(&bv)).unwrap();
    same("acon_b dx", &grad(&x, &g), &want.dx);
    same("acon_b dp", &grad(&p, &g), &want.dp);
    same("acon_b dbeta", &grad(&b, &g), &want.dbeta);

    let (x, b) = (t(&xv, dims4(), &d), t(&bv[..2], [2], &d));
    let y = ops::acon_a(x.clone(), BetaTensor::PerSample(b.clone()), Layout::Nchw).unwrap();
    let g = wsum(y, &wv, &d).backward();
    let want = acon::acon_a_backward(&sh, &wv, &xv, Beta::PerSample(&bv[..2])).unwrap();
    same("acon_a dx", &grad(&x, &g), &want.dx);
    same("acon_a dbeta", &grad(&b, &g), &want.dbeta);
}

#[test]
fn meta_acon_generators_match_cpu_backward() {
    let d = dev();
    let sh = shape();
    let mut r = rng(3);
    let xv = randn(&mut r, 24);
    let wv = randn(&mut r, 24);
    let gen = ChannelGen::<f64>::init(3, 1, true, 7).unwrap();
    let wd = gen.width;
    // Channel-wise generator alone: L = Σ w_β·β.
    let wb = randn(&mut r, 6);
    let x = t(&xv, dims4(), &d);
    let (w1, w2) = (t(&gen.w1, [wd, 3], &d), t(&gen.w2, [3, wd], &d));
    let b1v = gen.b1.clone().unwrap();
    let b2v = gen.b2.clone().unwrap();
    let (b1, b2) = (t(&b1v, [wd], &d), t(&b2v, [3], &d));
    let beta = ops::channel_gen(
        x.clone(),
        w1.clone(),
        w2.clone(),
        Some((b1.clone(), b2.clone())),
        Layout::Nchw,
    )
    .unwrap();
    let (bv, saved) = gen.forward(&sh, &xv).unwrap();
    same("gen beta", &host(beta.clone()), &bv);
    let g = wsum(beta, &wb, &d).backward();
    let want = gen.backward(&sh, &wb, &saved).unwrap();
    same("gen dx", &grad(&x, &g), &want.dx);
    same("gen dw1", &grad(&w1, &g), &want.dw1);
    same("gen dw2", &grad(&w2, &g), &want.dw2);
    same("gen db1", &grad(&b1, &g), want.db1.as_deref().unwrap());
    same("gen db2", &grad(&b2, &g), want.db2.as_deref().unwrap());

    // Layer-wise generator composed with ACON-C: dx sums both paths.
    let (p1v, p2v) = (vec![1.2, 0.9, 1.1], vec![0.1, -0.2, 0.05]);
    let (x, p1, p2) = (t(&xv, dims4(), &d), t(&p1v, [3], &d), t(&p2v, [3], &d));
    let beta = ops::layer_gen(x.clone(), Layout::Nchw).unwrap();
    let y = ops::acon_c(
        x.clone(),
        p1.clone(),
        p2.clone(),
        BetaTensor::PerSample(beta),
        Layout::Nchw,
    )
    .unwrap();
    let g = wsum(y, &wv, &d).backward();
    let bl = acon::layer_gen_forward(&sh, &xv).unwrap();
    let ga = acon::acon_c_backward(&sh, &wv, &xv, &p1v, &p2v, Beta::PerSample(&bl)).unwrap();
    let gx_gen = acon::layer_gen_backward(&sh, &ga.dbeta, &bl).unwrap();
    let dx: Vec<f64> = ga.dx.iter().zip(&gx_gen).map(|(a, b)| a + b).collect();
    same("layer meta dx", &grad(&x, &g), &dx);
    same("layer meta dp1", &grad(&p1, &g), &ga.dp1);
    same("layer meta dp2", &grad(&p2, &g), &ga.dp2);
}

fn iieu_case() -> (IieuConfig, [usize; 4], [usize; 4], [usize; 4]) {
    let mut geo = Conv2dGeometry::new(2, 2, 4, 4, 3, 3, 3);
    geo.padding = (1, 1);
    (
        IieuConfig::new(geo),
        [2, 3, 4, 4],
        [2, 2, 4, 4],
        [3, 2, 3, 3],
    )
}

#[test]
fn iieu_b_matches_cpu_backward() {
    let d = dev();
    let (cfg, xd, pd, wdims) = iieu_case();
    let mut r = rng(4);
    let xv = randn(&mut r, 96);
    let xpv = randn(&mut r, 64);
    let wv = randn(&mut r, 54);
    let dyv = randn(&mut r, 96);
    let params = IieuParams {
        ln_weight: uniform(&mut r, 3, 0.5, 1.5),
        ln_bias: uniform(&mut r, 3, -0.3, 0.3),
        eta: uniform(&mut r, 3, 0.05, 0.5),
    };
    let (x, xp, w) = (t(&xv, xd, &d), t(&xpv, pd, &d), t(&wv, wdims, &d));
    let (lw, lb, eta) = (
        t(&params.ln_weight, [3], &d),
        t(&params.ln_bias, [3], &d),
        t(&params.eta, [3], &d),
    );
    let o = IieuOpts {
        padding: (1, 1),
        ..Default::default()
    };
    let y = ops::iieu_b(
        x.clone(),
        xp.clone(),
        w.clone(),
        lw.clone(),
        lb.clone(),
        eta.clone(),
        o,
    )
    .unwrap();
    let (yv, saved) = iieu::forward(&cfg, &xv, &xpv, &wv, &params).unwrap();
    same("iieu y", &host(y.clone()), &yv);
    let g = wsum(y, &dyv, &d).backward();
    let want = iieu::backward(&cfg, &dyv, &xv, &xpv, &wv, &params, &saved).unwrap();
    same("iieu dx", &grad(&x, &g), &want.dx);
    same("iieu dx_pre", &grad(&xp, &g), &want.dx_pre);
    same("iieu dw", &grad(&w, &g), &want.dw);
    same("iieu d_ln_weight", &grad(&lw, &g), &want.d_ln_weight);
    same("iieu d_ln_bias", &grad(&lb, &g), &want.d_ln_bias);
    same("iieu d_eta", &grad(&eta, &g), &want.d_eta);
}

fn dc_tensors(p: &DcParams<f64>, c: usize, hd: usize, d: &Device) -> DcTensors {
    DcTensors {
        ln1_weight: t(&p.ln1_weight, [2 * c], d),
        ln1_bias: t(&p.ln1_bias, [2 * c], d),
        w1: t(&p.w1, [hd, c], d),
        gamma2: t(&p.gamma2, [2, hd], d),
        beta2: t(&p.beta2, [2, hd], d),
        eta2: t(&p.eta2, [hd], d),
        w2: t(&p.w2, [c, hd], d),
        ln2_weight: t(&p.ln2_weight, [2 * c], d),
        ln2_bias: t(&p.ln2_bias, [2 * c], d),
    }
}

#[test]
fn iieu_dc_matches_cpu_backward() {
    let d = dev();
    let cfg = DcConfig::new(2, 4, 2, 2, 2).unwrap();
    let mut r = rng(5);
    let xv = randn(&mut r, 32);
    let resv = randn(&mut r, 32);
    let dyv = randn(&mut r, 32);
    let mut p = DcParams::<f64>::init(&cfg, 11).unwrap();
    // Away from the init's constants so every parameter matters.
    for v in p.gamma2.iter_mut().chain(p.ln2_weight.iter_mut()) {
        *v += 0.3;
    }
    let (x, res) = (t(&xv, [2, 4, 2, 2], &d), t(&resv, [2, 4, 2, 2], &d));
    let pt = dc_tensors(&p, 4, 2, &d);
    let y = ops::iieu_dc(x.clone(), res.clone(), &pt, 2).unwrap();
    let (yv, saved) = iieu_dc::forward(&cfg, &xv, &resv, &p).unwrap();
    same("dc y", &host(y.clone()), &yv);
    let g = wsum(y, &dyv, &d).backward();
    let w = iieu_dc::backward(&cfg, &dyv, &xv, &resv, &p, &saved).unwrap();
    same("dc dx", &grad(&x, &g), &w.dx);
    same("dc dres", &grad(&res, &g), &w.dres);
    same(
        "dc d_ln1_weight",
        &grad(&pt.ln1_weight, &g),
        &w.d_ln1_weight,
    );
    same("dc d_ln1_bias", &grad(&pt.ln1_bias, &g), &w.d_ln1_bias);
    same("dc d_w1", &grad(&pt.w1, &g), &w.d_w1);
    same("dc d_gamma2", &grad(&pt.gamma2, &g), &w.d_gamma2);
    same("dc d_beta2", &grad(&pt.beta2, &g), &w.d_beta2);
    same("dc d_eta2", &grad(&pt.eta2, &g), &w.d_eta2);
    same("dc d_w2", &grad(&pt.w2, &g), &w.d_w2);
    same(
        "dc d_ln2_weight",
        &grad(&pt.ln2_weight, &g),
        &w.d_ln2_weight,
    );
    same("dc d_ln2_bias", &grad(&pt.ln2_bias, &g), &w.d_ln2_bias);
}

#[test]
fn aiec_and_tau_match_cpu_backward() {
    let d = dev();
    let sh = shape();
    let mut r = rng(6);
    let fv = randn(&mut r, 24);
    let dav = randn(&mut r, 24);
    let k = 4;
    let wdv = uniform(&mut r, k * 3, -0.6, 0.6);
    let labels = [1usize, 3];
    let cfg = AiecConfig {
        tau: 0.1,
        lambda_gate: 2.0,
        ..Default::default()
    };
    let loss_scale = 0.7;
    let counters = Arc::new(Mutex::new(Counters::new(k, 3).unwrap()));
    let (f, wd) = (t(&fv, dims4(), &d), t(&wdv, [k, 3], &d));
    let out =
        ops::aiec_train(f.clone(), wd.clone(), &labels, cfg, &counters, Layout::Nchw).unwrap();
    let lw = Tensor::<1>::from_data(TensorData::new(vec![loss_scale], [1]), opts(&d));
    let total = wsum(out.out.clone(), &dav, &d) + out.loss.clone() * lw;
    let g = total.backward();

    let mut cnt = Counters::new(k, 3).unwrap();
    let want_fwd = aiec::train_forward(&cfg, &sh, &fv, &wdv, &labels, &mut cnt).unwrap();
    assert_eq!(
        *counters.lock().unwrap(),
        cnt,
        "counters updated as the CPU step"
    );
    same("aiec A", &host(out.out), &want_fwd.out);
    same(
        "aiec loss",
        &host(out.loss),
        &[want_fwd.losses.total_aux_gate],
    );
    assert_close(
        "aiec stats",
        &[out.stats.aux_mean, out.stats.gate_mean],
        &[want_fwd.losses.aux_mean, want_fwd.losses.gate_mean],
        1e-12,
        1e-12,
    );
    let want =
        aiec::train_backward(&cfg, &sh, &dav, loss_scale, &fv, &wdv, &want_fwd.saved).unwrap();
    same("aiec dF", &grad(&f, &g), &want.df);
    same("aiec dWd", &grad(&wd, &g), &want.dwd);

    let f = t(&fv, dims4(), &d);
    let a = ops::tau(f.clone(), 0.2).unwrap();
    let g = wsum(a, &dav, &d).backward();
    same(
        "tau dF",
        &grad(&f, &g),
        &aiec::tau_backward(&dav, &fv, 0.2).unwrap(),
    );
}

#[test]
fn modules_start_at_spec_inits_and_train() {
    let d = dev();
    let m = AconConfig::new(3).init_acon_c(&d).unwrap();
    assert_eq!(host_f32(m.p1.val()), vec![1.0; 3]);
    assert_eq!(host_f32(m.p2.val()), vec![0.0; 3]);
    assert_eq!(host_f32(m.beta.val()), vec![1.0; 3]);
    let meta = MetaAconCConfig::new(4)
        .with_r(2)
        .with_generator(MetaGenKind::Channel)
        .init(&d)
        .unwrap();
    let gen = ChannelGen::<f32>::init(4, 2, true, 0).unwrap();
    assert_eq!(host_f32(meta.w1.as_ref().unwrap().val()), gen.w1);
    let dc = IieuDcConfig::new(4).init(&d).unwrap();
    assert_eq!(host_f32(dc.ln2_weight.val()), vec![0.01; 8]);
    // A module's forward is differentiable w.r.t. its parameters.
    let x = Tensor::<4>::from_data(TensorData::new(vec![0.5f32; 16], [1, 4, 2, 2]), &d);
    let y = meta.forward(x).unwrap();
    let g = y.sum().backward();
    let gw = meta
        .w1
        .as_ref()
        .unwrap()
        .val()
        .grad(&g)
        .expect("W1 gradient");
    assert_eq!(gw.dims(), [gen.width, 4]);
}

fn host_f32<const D: usize>(x: Tensor<D>) -> Vec<f32> {
    x.into_data().try_to_vec::<f32>().expect("f32 tensor")
}

// ---------------------------------------------------------------------------
// finite differences through burn (forwards on the non-autodiff device)

/// `L(v)` for a burn forward `f` of the perturbed input `v`.
fn fd(v: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    numeric_grad(v, f)
}

fn scalar(x: Tensor<1>) -> f64 {
    host(x)[0]
}

#[test]
fn finite_differences_through_burn() {
    let d = dev();
    let plain = Device::flex();
    let sh = dims4();
    let mut r = rng(7);
    let xv = randn(&mut r, 24);
    let wv = randn(&mut r, 24);

    // ACON family: meta-ACON-C with the channel-wise generator (x through both paths).
    let gen = ChannelGen::<f64>::init(3, 1, true, 3).unwrap();
    let wd = gen.width;
    let (p1v, p2v) = (vec![1.3, 0.8, 1.0], vec![0.2, -0.1, 0.0]);
    let meta = |x: Tensor<4>, w1: Tensor<2>, dd: &Device| {
        let b = ops::channel_gen(
            x.clone(),
            w1,
            t(&gen.w2, [3, wd], dd),
            Some((
                t(gen.b1.as_ref().unwrap(), [wd], dd),
                t(gen.b2.as_ref().unwrap(), [3], dd),
            )),
            Layout::Nchw,
        )
        .unwrap();
        let y = ops::acon_c(
            x,
            t(&p1v, [3], dd),
            t(&p2v, [3], dd),
            BetaTensor::PerSampleChannel(b),
            Layout::Nchw,
        )
        .unwrap();
        wsum(y, &wv, dd)
    };
    let (x, w1) = (t(&xv, sh, &d), t(&gen.w1, [wd, 3], &d));
    let g = meta(x.clone(), w1.clone(), &d).backward();
    let num = fd(&xv, |v| {
        scalar(meta(t(v, sh, &plain), t(&gen.w1, [wd, 3], &plain), &plain))
    });
    check_grad("meta-ACON-C dx", &grad(&x, &g), &num);
    let num = fd(&gen.w1, |v| {
        scalar(meta(t(&xv, sh, &plain), t(v, [wd, 3], &plain), &plain))
    });
    check_grad("meta-ACON-C dW1", &grad(&w1, &g), &num);

    // IIEU family: IIEU-B, gradient of x_pre (through r_x) and W (through r_w).
    let (_, xd, pd, wdims) = iieu_case();
    let xiv = randn(&mut r, 96);
    let xpv = randn(&mut r, 64);
    let wcv = randn(&mut r, 54);
    let dyv = randn(&mut r, 96);
    let o = IieuOpts {
        padding: (1, 1),
        patch_norm: PatchNorm::PerGroup,
        ..Default::default()
    };
    let iieu_l = |xp: Tensor<4>, w: Tensor<4>, dd: &Device| {
        let y = ops::iieu_b(
            t(&xiv, xd, dd),
            xp,
            w,
            t(&[0.8, 1.1, 0.9], [3], dd),
            t(&[0.1, -0.1, 0.0], [3], dd),
            t(&[0.2, 0.3, 0.1], [3], dd),
            o,
        )
        .unwrap();
        wsum(y, &dyv, dd)
    };
    let (xp, w) = (t(&xpv, pd, &d), t(&wcv, wdims, &d));
    let g = iieu_l(xp.clone(), w.clone(), &d).backward();
    let num = fd(&xpv, |v| {
        scalar(iieu_l(t(v, pd, &plain), t(&wcv, wdims, &plain), &plain))
    });
    check_grad("IIEU-B dx_pre", &grad(&xp, &g), &num);
    let num = fd(&wcv, |v| {
        scalar(iieu_l(t(&xpv, pd, &plain), t(v, wdims, &plain), &plain))
    });
    check_grad("IIEU-B dW", &grad(&w, &g), &num);

    // AIEC family: the training step's output and loss w.r.t. F and Wd, each
    // evaluation from the same (fresh) counters, so the masks are those of one step.
    let k = 3;
    let wdv = uniform(&mut r, k * 3, -0.6, 0.6);
    let labels = [0usize, 2];
    let cfg = AiecConfig {
        tau: 0.05,
        lambda_gate: 1.5,
        ..Default::default()
    };
    let aiec_l = |f: Tensor<4>, wdt: Tensor<2>, dd: &Device| {
        let cnt = Arc::new(Mutex::new(Counters::new(k, 3).unwrap()));
        let out = ops::aiec_train(f, wdt, &labels, cfg, &cnt, Layout::Nchw).unwrap();
        wsum(out.out, &wv, dd) + out.loss
    };
    let (f, wdt) = (t(&xv, sh, &d), t(&wdv, [k, 3], &d));
    let g = aiec_l(f.clone(), wdt.clone(), &d).backward();
    let num = fd(&xv, |v| {
        scalar(aiec_l(t(v, sh, &plain), t(&wdv, [k, 3], &plain), &plain))
    });
    check_grad("AIEC dF", &grad(&f, &g), &num);
    let num = fd(&wdv, |v| {
        scalar(aiec_l(t(&xv, sh, &plain), t(v, [k, 3], &plain), &plain))
    });
    check_grad("AIEC dWd", &grad(&wdt, &g), &num);
}

// ---------------------------------------------------------------------------
// IieuConv2d (conv → ψ → IIEU-B fused)

/// `x_pre (2, 4, 5, 4)`, `W (3, 4, 3, 3)`, stride 1, padding 1: a ragged 5×4 plane.
fn conv_case() -> (IieuConfig, [usize; 4], [usize; 4], IieuOpts) {
    let mut geo = Conv2dGeometry::new(2, 4, 5, 4, 3, 3, 3);
    geo.padding = (1, 1);
    let o = IieuOpts {
        padding: (1, 1),
        ..Default::default()
    };
    (IieuConfig::new(geo), [2, 4, 5, 4], [3, 4, 3, 3], o)
}

/// Every ψ (none, bias, affine, BatchNorm training and eval): burn's gradients of
/// `Σ w·y` for x_pre, W, ψ's vectors, γ̇, β̇, η equal the CPU backward's, and BatchNorm
/// training returns the CPU forward's updated running statistics (eval returns none).
#[test]
fn iieu_conv2d_matches_cpu_backward() {
    use activation_kernels::cpu::iieu_conv::{self, BatchNorm, IieuConvParams, Psi};
    let d = dev();
    let (cfg, pd, wdims, o) = conv_case();
    let mut r = rng(11);
    let xpv = randn(&mut r, 160);
    let wv = randn(&mut r, 108);
    let dyv = randn(&mut r, 2 * 3 * 5 * 4);
    let iieu = IieuParams {
        ln_weight: uniform(&mut r, 3, 0.5, 1.5),
        ln_bias: uniform(&mut r, 3, -0.3, 0.3),
        eta: uniform(&mut r, 3, 0.05, 0.5),
    };
    let (a, b) = (uniform(&mut r, 3, 0.5, 1.5), uniform(&mut r, 3, -0.5, 0.5));
    let (rm, rv) = (uniform(&mut r, 3, -0.2, 0.2), uniform(&mut r, 3, 0.5, 2.0));
    let bn = |training| {
        Psi::BatchNorm(BatchNorm {
            weight: a.clone(),
            bias: b.clone(),
            running_mean: rm.clone(),
            running_var: rv.clone(),
            momentum: 0.1,
            eps: 1e-5,
            training,
        })
    };
    let cases = [
        ("none", Psi::None),
        ("bias", Psi::Bias(b.clone())),
        (
            "affine",
            Psi::Affine {
                scale: a.clone(),
                shift: b.clone(),
            },
        ),
        ("bn train", bn(true)),
        ("bn eval", bn(false)),
    ];
    for (name, psi) in cases {
        let (xp, w) = (t(&xpv, pd, &d), t(&wv, wdims, &d));
        let (lw, lb, eta) = (
            t(&iieu.ln_weight, [3], &d),
            t(&iieu.ln_bias, [3], &d),
            t(&iieu.eta, [3], &d),
        );
        let (ta, tb) = (t(&a, [3], &d), t(&b, [3], &d));
        let bpsi = match &psi {
            Psi::None => ops::ConvPsi::None,
            Psi::Bias(_) => ops::ConvPsi::Bias(tb.clone()),
            Psi::Affine { .. } => ops::ConvPsi::Affine {
                scale: ta.clone(),
                shift: tb.clone(),
            },
            Psi::BatchNorm(bn) => ops::ConvPsi::BatchNorm {
                weight: ta.clone(),
                bias: tb.clone(),
                running_mean: t(&rm, [3], &d),
                running_var: t(&rv, [3], &d),
                momentum: bn.momentum,
                eps: bn.eps,
                training: bn.training,
            },
        };
        let out = ops::iieu_conv2d(
            xp.clone(),
            w.clone(),
            bpsi,
            lw.clone(),
            lb.clone(),
            eta.clone(),
            o,
        )
        .unwrap();
        let mut params = IieuConvParams {
            iieu: iieu.clone(),
            psi: psi.clone(),
        };
        let (yv, saved) = iieu_conv::forward(&cfg, &xpv, &wv, &mut params).unwrap();
        same(&format!("{name} y"), &host(out.y.clone()), &yv);
        match (&params.psi, out.running) {
            (Psi::BatchNorm(bn), Some((m, v))) if bn.training => {
                same(&format!("{name} running mean"), &host(m), &bn.running_mean);
                same(&format!("{name} running var"), &host(v), &bn.running_var);
                assert_ne!(bn.running_mean, rm, "the CPU forward updated the mean");
            }
            (Psi::BatchNorm(bn), None) if !bn.training => {}
            (Psi::BatchNorm(_), got) => panic!("{name}: running stats {got:?}"),
            (_, got) => assert!(got.is_none(), "{name}: running stats without BatchNorm"),
        }
        let g = wsum(out.y, &dyv, &d).backward();
        let want = iieu_conv::backward(&cfg, &dyv, &xpv, &wv, &params, &saved).unwrap();
        same(&format!("{name} dx_pre"), &grad(&xp, &g), &want.dx_pre);
        same(&format!("{name} dw"), &grad(&w, &g), &want.dw);
        same(
            &format!("{name} d_ln_weight"),
            &grad(&lw, &g),
            &want.d_ln_weight,
        );
        same(
            &format!("{name} d_ln_bias"),
            &grad(&lb, &g),
            &want.d_ln_bias,
        );
        same(&format!("{name} d_eta"), &grad(&eta, &g), &want.d_eta);
        match &psi {
            Psi::None => {}
            Psi::Bias(_) => same(&format!("{name} d_bias"), &grad(&tb, &g), &want.d_psi_shift),
            _ => {
                same(
                    &format!("{name} d_scale"),
                    &grad(&ta, &g),
                    &want.d_psi_scale,
                );
                same(
                    &format!("{name} d_shift"),
                    &grad(&tb, &g),
                    &want.d_psi_shift,
                );
            }
        }
    }
}

/// IieuConv2d with a training BatchNorm by finite differences through burn: `W`
/// (through the conv, `r_w` and the batch statistics) and BatchNorm's γ.
#[test]
fn iieu_conv2d_finite_differences_through_burn() {
    let d = dev();
    let plain = Device::flex();
    let (_, pd, wdims, o) = conv_case();
    let mut r = rng(12);
    let xpv = randn(&mut r, 160);
    let wv = randn(&mut r, 108);
    let dyv = randn(&mut r, 120);
    let gv = vec![1.2, 0.7, 0.9];
    let loss = |w: Tensor<4>, gamma: Tensor<1>, dd: &Device| {
        let out = ops::iieu_conv2d(
            t(&xpv, pd, dd),
            w,
            ops::ConvPsi::BatchNorm {
                weight: gamma,
                bias: t(&[0.1, -0.2, 0.0], [3], dd),
                running_mean: t(&[0.0; 3], [3], dd),
                running_var: t(&[1.0; 3], [3], dd),
                momentum: 0.1,
                eps: 1e-5,
                training: true,
            },
            t(&[0.8, 1.1, 0.9], [3], dd),
            t(&[0.1, -0.1, 0.0], [3], dd),
            t(&[0.2, 0.3, 0.1], [3], dd),
            o,
        )
        .unwrap();
        wsum(out.y, &dyv, dd)
    };
    let (w, gamma) = (t(&wv, wdims, &d), t(&gv, [3], &d));
    let g = loss(w.clone(), gamma.clone(), &d).backward();
    let num = fd(&wv, |v| {
        scalar(loss(t(v, wdims, &plain), t(&gv, [3], &plain), &plain))
    });
    check_grad("IieuConv2d dW", &grad(&w, &g), &num);
    let num = fd(&gv, |v| {
        scalar(loss(t(&wv, wdims, &plain), t(v, [3], &plain), &plain))
    });
    check_grad("IieuConv2d dγ (BatchNorm)", &grad(&gamma, &g), &num);
}

/// The module: SPEC inits, a training forward on the autodiff device updates the
/// running statistics once (to the CPU forward's values), an eval forward leaves them,
/// and every parameter gets a gradient.
#[test]
fn iieu_conv2d_module_trains_and_updates_running_stats() {
    use activation_kernels::burn::nn::{IieuConv2dConfig, IieuConvPsiKind};
    let d = Device::flex().autodiff();
    let m = IieuConv2dConfig::new(4, 3, (3, 3))
        .with_padding((1, 1))
        .with_psi(IieuConvPsiKind::BatchNorm)
        .init(&d)
        .unwrap();
    assert_eq!(host_f32(m.ln_weight.val()), vec![0.01f32; 3]);
    assert_eq!(host_f32(m.eta.val()), vec![0.05f32; 3]);
    let rm = m.running_mean.as_ref().unwrap();
    let rv = m.running_var.as_ref().unwrap();
    assert_eq!(host_f32(rm.value_sync()), vec![0.0f32; 3]);
    assert_eq!(host_f32(rv.value_sync()), vec![1.0f32; 3]);
    let mut r = rng(13);
    let xv: Vec<f32> = randn(&mut r, 160).iter().map(|&v| v as f32).collect();
    let x = Tensor::<4>::from_data(TensorData::new(xv.clone(), [2, 4, 5, 4]), &d);
    let y = m.forward(x.clone()).unwrap();
    assert_eq!(y.dims(), [2, 3, 5, 4]);
    let after = host_f32(rm.value_sync());
    assert!(
        after.iter().any(|&v| v != 0.0),
        "the training forward updated the mean"
    );
    // The CPU forward from the module's values gives the same running mean.
    let mut params = activation_kernels::cpu::iieu_conv::IieuConvParams {
        iieu: IieuParams {
            ln_weight: vec![0.01f32; 3],
            ln_bias: vec![0.0; 3],
            eta: vec![0.05; 3],
        },
        psi: activation_kernels::cpu::iieu_conv::Psi::BatchNorm(
            activation_kernels::cpu::iieu_conv::BatchNorm::init(3),
        ),
    };
    let (cfg, ..) = conv_case();
    let wv = host_f32(m.weight.val());
    activation_kernels::cpu::iieu_conv::forward(&cfg, &xv, &wv, &mut params).unwrap();
    let activation_kernels::cpu::iieu_conv::Psi::BatchNorm(bn) = &params.psi else {
        unreachable!()
    };
    assert_eq!(after, bn.running_mean);
    // Eval: nothing updated.
    m.forward_t(x.clone(), false).unwrap();
    assert_eq!(host_f32(rm.value_sync()), after);
    // Gradients for every parameter, each of its parameter's dims.
    let g = y.sum().backward();
    let gw = m.weight.val().grad(&g).expect("weight has a gradient");
    assert_eq!(gw.dims(), [3, 4, 3, 3]);
    for (name, p) in [
        ("bn_weight", m.bn_weight.as_ref().unwrap().val()),
        ("bn_bias", m.bn_bias.as_ref().unwrap().val()),
        ("ln_weight", m.ln_weight.val()),
        ("ln_bias", m.ln_bias.val()),
        ("eta", m.eta.val()),
    ] {
        let gp = p
            .grad(&g)
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        assert_eq!(gp.dims(), [3], "{name}");
    }
}

// ---------------------------------------------------------------------------
// Tokens (N, L, C): the NLC layout

/// ACON-C (per-channel and per-(sample, channel) β) and the layer generator on tokens
/// `(2, 5, 3)` (L = 5 ragged): burn's gradients equal the CPU backward on the NLC
/// shape; an NCHW reading of the same buffer would give other values (checked, so the
/// layout cannot be ignored silently).
#[test]
fn nlc_tokens_match_cpu_backward() {
    let d = dev();
    let (n, l, c) = (2, 5, 3);
    let sh = ActShape::nlc(n, l, c);
    let mut r = rng(21);
    let xv = randn(&mut r, n * l * c);
    let dyv = randn(&mut r, n * l * c);
    let (p1v, p2v) = (uniform(&mut r, c, 0.5, 1.5), uniform(&mut r, c, -0.5, 0.5));
    let bcv = uniform(&mut r, c, 0.5, 1.5);
    let bncv = uniform(&mut r, n * c, 0.5, 1.5);
    for (name, beta) in [
        ("per channel", Beta::PerChannel(&bcv[..])),
        ("per (sample, channel)", Beta::PerSampleChannel(&bncv[..])),
    ] {
        let (x, p1, p2) = (t(&xv, [n, l, c], &d), t(&p1v, [c], &d), t(&p2v, [c], &d));
        let bt = match beta {
            Beta::PerChannel(_) => t(&bcv, [c], &d),
            _ => t(&bncv, [n * c], &d),
        };
        let b = match beta {
            Beta::PerChannel(_) => BetaTensor::PerChannel(bt.clone()),
            _ => BetaTensor::PerSampleChannel(bt.clone().reshape([n, c])),
        };
        let y = ops::acon_c(x.clone(), p1.clone(), p2.clone(), b, Layout::Nlc).unwrap();
        let want_y = acon::acon_c_forward(&sh, &xv, &p1v, &p2v, beta).unwrap();
        same(&format!("nlc {name} y"), &host(y.clone()), &want_y);
        // The same buffer read as (N, C, L): same sizes, other channel of each value.
        let other =
            acon::acon_c_forward(&ActShape::nchw(n, c, l, 1), &xv, &p1v, &p2v, beta).unwrap();
        assert_ne!(other, want_y, "the layout changes the result");
        let g = wsum(y, &dyv, &d).backward();
        let want = acon::acon_c_backward(&sh, &dyv, &xv, &p1v, &p2v, beta).unwrap();
        same(&format!("nlc {name} dx"), &grad(&x, &g), &want.dx);
        same(&format!("nlc {name} dp1"), &grad(&p1, &g), &want.dp1);
        same(&format!("nlc {name} dp2"), &grad(&p2, &g), &want.dp2);
        same(&format!("nlc {name} dβ"), &grad(&bt, &g), &want.dbeta);
    }
    // The layer-wise generator reads the token layout too.
    let x = t(&xv, [n, l, c], &d);
    let beta = ops::layer_gen(x.clone(), Layout::Nlc).unwrap();
    same(
        "nlc layer_gen",
        &host(beta),
        &acon::layer_gen_forward(&sh, &xv).unwrap(),
    );
    // A rank-4 tensor is not tokens.
    let e = ops::layer_gen(t(&xv, [n, l, c, 1], &d), Layout::Nlc);
    assert!(
        matches!(e, Err(activation_kernels::Error::Shape { .. })),
        "{e:?}"
    );
}

/// AIEC on tokens with the labels as an integer tensor: the same output, loss,
/// counters and gradients as the CPU step on the NLC shape.
#[test]
fn aiec_nlc_with_label_tensor_matches_cpu() {
    use burn::tensor::Int;
    let d = dev();
    let (n, l, c, k) = (3, 4, 5, 6);
    let sh = ActShape::nlc(n, l, c);
    let mut r = rng(22);
    let fv = randn(&mut r, n * l * c);
    let dav = randn(&mut r, n * l * c);
    let wdv = uniform(&mut r, k * c, -0.6, 0.6);
    let labels = [5usize, 0, 2];
    let cfg = AiecConfig {
        tau: 0.1,
        lambda_gate: 2.0,
        ..Default::default()
    };
    let counters = Arc::new(Mutex::new(Counters::new(k, c).unwrap()));
    let (f, wd) = (t(&fv, [n, l, c], &d), t(&wdv, [k, c], &d));
    let lab = Tensor::<1, Int>::from_data(TensorData::new(vec![5i64, 0, 2], [3]), &d);
    let out =
        ops::aiec_train_labels(f.clone(), wd.clone(), lab, cfg, &counters, Layout::Nlc).unwrap();
    let total = wsum(out.out.clone(), &dav, &d) + out.loss.clone();
    let g = total.backward();
    let mut cnt = Counters::new(k, c).unwrap();
    let want_fwd = aiec::train_forward(&cfg, &sh, &fv, &wdv, &labels, &mut cnt).unwrap();
    assert_eq!(*counters.lock().unwrap(), cnt);
    same("aiec nlc A", &host(out.out), &want_fwd.out);
    same(
        "aiec nlc loss",
        &host(out.loss),
        &[want_fwd.losses.total_aux_gate],
    );
    let want = aiec::train_backward(&cfg, &sh, &dav, 1.0, &fv, &wdv, &want_fwd.saved).unwrap();
    same("aiec nlc dF", &grad(&f, &g), &want.df);
    same("aiec nlc dWd", &grad(&wd, &g), &want.dwd);
}
