//! candle autograd vs the CPU reference, f32: for every op family, gradients obtained
//! through candle (`loss.backward()` with `loss = Σ w·y`, fixed random `w`) must equal
//! the CPU backward called directly with `dy = w`, for every input and every
//! parameter (the packed parameter gradients are split by candle's own `cat`/`stack`
//! backward, so this also checks the packing order and shapes).
//!
//! Tolerance: `|candle − reference| ≤ 1e-6·(1 + |reference|)` per element. Both sides
//! run the same f32 CPU code on the same `dy` (candle's gradient of `sum(w·y)` w.r.t.
//! `y` is exactly `w`), so the results are expected to agree to the last bit; the
//! tolerance only allows for a different summation path in candle's gradient
//! accumulation. Forward outputs are compared the same way.
#![cfg(feature = "candle")]

mod common;

use activation_kernels::candle::nn::{Aiec, IieuB};
use activation_kernels::candle::ops::{self, ChannelGenTensors, DcTensors, IieuOpts};
use activation_kernels::cpu::acon::{self, Beta, ChannelGen, MetaGen};
use activation_kernels::cpu::aiec::{self, AiecConfig, Counters, Pool};
use activation_kernels::cpu::iieu::{self, IieuConfig, IieuParams, PatchNorm};
use activation_kernels::cpu::iieu_dc::{self, DcConfig, DcParams};
use activation_kernels::{ActShape, Conv2dGeometry, Layout, Real};
use approx::abs_diff_eq;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::{randn, rng, uniform};

type R = candle_core::Result<()>;

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn var(v: &[f32], dims: &[usize]) -> candle_core::Result<Var> {
    Var::from_vec(v.to_vec(), dims, &Device::Cpu)
}

fn host(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[track_caller]
fn close(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            abs_diff_eq!(g, w, epsilon = 1e-6 * (1.0 + w.abs())),
            "{name}[{i}]: candle {g} vs reference {w}"
        );
    }
}

/// `Σ w·y` and `w` (random, fixed).
fn weighted_sum(y: &Tensor, seed: u64) -> candle_core::Result<(Tensor, Vec<f32>)> {
    let w = f32s(&randn(&mut rng(seed), y.elem_count()));
    let wt = Tensor::from_vec(w.clone(), y.shape(), y.device())?;
    Ok(((y * wt)?.sum_all()?, w))
}

fn grad(g: &candle_core::backprop::GradStore, v: &Var) -> Vec<f32> {
    host(g.get(v).expect("a gradient for every variable"))
}

#[test]
fn acon_c_grads_match_reference() -> R {
    for layout in [Layout::Nchw, Layout::Nlc] {
        let mut r = rng(1);
        let (n, c, s) = (2, 3, 5);
        let dims: Vec<usize> = match layout {
            Layout::Nchw => vec![n, c, s],
            Layout::Nlc => vec![n, s, c],
        };
        let x = f32s(&randn(&mut r, n * c * s));
        let p1 = f32s(&randn(&mut r, c));
        let p2 = f32s(&randn(&mut r, c));
        let beta = f32s(&uniform(&mut r, c, 0.5, 2.0));
        let (xv, p1v, p2v, bv) = (
            var(&x, &dims)?,
            var(&p1, &[c])?,
            var(&p2, &[c])?,
            var(&beta, &[c])?,
        );
        let y = ops::acon_c(&xv, &p1v, &p2v, &bv, layout)?;
        let (loss, w) = weighted_sum(&y, 2)?;
        let g = loss.backward()?;

        let shape = match layout {
            Layout::Nchw => ActShape::nchw(n, c, s, 1),
            Layout::Nlc => ActShape::nlc(n, s, c),
        };
        let y_ref = acon::acon_c_forward(&shape, &x, &p1, &p2, Beta::PerChannel(&beta)).unwrap();
        let gr = acon::acon_c_backward(&shape, &w, &x, &p1, &p2, Beta::PerChannel(&beta)).unwrap();
        close("y", &host(&y), &y_ref);
        close("dx", &grad(&g, &xv), &gr.dx);
        close("dp1", &grad(&g, &p1v), &gr.dp1);
        close("dp2", &grad(&g, &p2v), &gr.dp2);
        close("dbeta", &grad(&g, &bv), &gr.dbeta);
    }
    Ok(())
}

#[test]
fn meta_acon_c_grads_match_reference() -> R {
    for bias in [true, false] {
        let mut r = rng(3);
        let (n, c, h, wd) = (2, 4, 3, 2);
        let gen = ChannelGen::<f32>::init(c, 2, bias, 7).unwrap();
        let x = f32s(&randn(&mut r, n * c * h * wd));
        let p1 = f32s(&randn(&mut r, c));
        let p2 = f32s(&randn(&mut r, c));
        let xv = var(&x, &[n, c, h, wd])?;
        let (p1v, p2v) = (var(&p1, &[c])?, var(&p2, &[c])?);
        let w1 = var(&gen.w1, &[gen.width, c])?;
        let w2 = var(&gen.w2, &[c, gen.width])?;
        let b1 = gen.b1.as_ref().map(|b| var(b, &[gen.width])).transpose()?;
        let b2 = gen.b2.as_ref().map(|b| var(b, &[c])).transpose()?;
        let gt = ChannelGenTensors {
            w1: w1.as_tensor().clone(),
            b1: b1.as_ref().map(|v| v.as_tensor().clone()),
            w2: w2.as_tensor().clone(),
            b2: b2.as_ref().map(|v| v.as_tensor().clone()),
        };
        let y = ops::meta_acon_c(&xv, &p1v, &p2v, &gt, Layout::Nchw)?;
        let (loss, w) = weighted_sum(&y, 4)?;
        let g = loss.backward()?;

        let shape = ActShape::nchw(n, c, h, wd);
        let (y_ref, saved) =
            acon::meta_acon_c_forward(&shape, &x, &p1, &p2, MetaGen::Channel(&gen)).unwrap();
        let gr =
            acon::meta_acon_c_backward(&shape, &w, &x, &p1, &p2, MetaGen::Channel(&gen), &saved)
                .unwrap();
        close("y", &host(&y), &y_ref);
        close("dx", &grad(&g, &xv), &gr.dx);
        close("dp1", &grad(&g, &p1v), &gr.dp1);
        close("dp2", &grad(&g, &p2v), &gr.dp2);
        close("dw1", &grad(&g, &w1), &gr.dw1);
        close("dw2", &grad(&g, &w2), &gr.dw2);
        if let (Some(v), Some(d)) = (&b1, &gr.db1) {
            close("db1", &grad(&g, v), d);
        }
        if let (Some(v), Some(d)) = (&b2, &gr.db2) {
            close("db2", &grad(&g, v), d);
        }
        assert_eq!(b1.is_some(), bias);
    }
    Ok(())
}

#[test]
fn iieu_b_grads_match_reference() -> R {
    // (groups, stride, padding, dilation, patch norm)
    let cases = [
        (1, 1, 1, 1, PatchNorm::PerGroup),
        (2, 2, 1, 1, PatchNorm::PerGroup),
        (1, 1, 2, 2, PatchNorm::AllChannels),
    ];
    for (ci, &(groups, stride, pad, dil, pn)) in cases.iter().enumerate() {
        let mut r = rng(10 + ci as u64);
        let (n, c, h, wi, o, k) = (2, 4, 6, 5, 4, 3);
        let geom = Conv2dGeometry::new(n, c, h, wi, o, k, k)
            .with_stride(stride, stride)
            .with_padding(pad, pad)
            .with_dilation(dil, dil)
            .with_groups(groups);
        let cfg = IieuConfig::new(geom).with_patch_norm(pn);
        let (oh, ow) = cfg.validate().unwrap();
        let x = f32s(&randn(&mut r, n * o * oh * ow));
        let x_pre = f32s(&randn(&mut r, n * c * h * wi));
        let wlen = o * (c / groups) * k * k;
        let w = f32s(&randn(&mut r, wlen));
        let params = IieuParams {
            ln_weight: f32s(&uniform(&mut r, o, 0.5, 1.5)),
            ln_bias: f32s(&uniform(&mut r, o, -0.5, 0.5)),
            eta: f32s(&uniform(&mut r, o, 0.1, 0.6)),
        };
        let xv = var(&x, &[n, o, oh, ow])?;
        let xpv = var(&x_pre, &[n, c, h, wi])?;
        let wv = var(&w, &[o, c / groups, k, k])?;
        let lw = var(&params.ln_weight, &[o])?;
        let lb = var(&params.ln_bias, &[o])?;
        let et = var(&params.eta, &[o])?;
        let opts = IieuOpts {
            stride: (stride, stride),
            padding: (pad, pad),
            dilation: (dil, dil),
            groups,
            patch_norm: pn,
        };
        let y = ops::iieu_b(&xv, &xpv, &wv, &lw, &lb, &et, opts)?;
        let (loss, dy) = weighted_sum(&y, 20 + ci as u64)?;
        let g = loss.backward()?;

        let (y_ref, saved) = iieu::forward(&cfg, &x, &x_pre, &w, &params).unwrap();
        let gr = iieu::backward(&cfg, &dy, &x, &x_pre, &w, &params, &saved).unwrap();
        // Both branches of the adjuster are exercised (else d_eta would be trivially 0).
        assert!(
            gr.d_eta.iter().any(|&v| v != 0.0),
            "case {ci}: no lower-branch element"
        );
        close("y", &host(&y), &y_ref);
        close("dx", &grad(&g, &xv), &gr.dx);
        close("dx_pre", &grad(&g, &xpv), &gr.dx_pre);
        close("dw", &grad(&g, &wv), &gr.dw);
        close("d_ln_weight", &grad(&g, &lw), &gr.d_ln_weight);
        close("d_ln_bias", &grad(&g, &lb), &gr.d_ln_bias);
        close("d_eta", &grad(&g, &et), &gr.d_eta);
    }
    Ok(())
}

#[test]
fn iieu_dc_grads_match_reference() -> R {
    let mut r = rng(30);
    let (n, c, h, wi, rr) = (2, 8, 3, 3, 4);
    let cfg = DcConfig::new(n, c, h, wi, rr).unwrap();
    let hd = cfg.hidden;
    let mut p = DcParams::<f32>::init(&cfg, 31).unwrap();
    // Move the parameters off their constant inits so every gradient is generic.
    let mut jitter = |v: &mut Vec<f32>, scale: f64| {
        let noise = randn(&mut r, v.len());
        for (a, d) in v.iter_mut().zip(noise) {
            *a += (scale * d) as f32;
        }
    };
    jitter(&mut p.ln1_weight, 0.1);
    jitter(&mut p.ln1_bias, 0.1);
    jitter(&mut p.gamma2, 0.5);
    jitter(&mut p.beta2, 0.5);
    jitter(&mut p.ln2_weight, 0.5);
    jitter(&mut p.ln2_bias, 0.1);
    let mut r = rng(32);
    let x = f32s(&randn(&mut r, n * c * h * wi));
    let res = f32s(&randn(&mut r, n * c * h * wi));
    let xv = var(&x, &[n, c, h, wi])?;
    let rv = var(&res, &[n, c, h, wi])?;
    let vars = [
        var(&p.ln1_weight, &[2 * c])?,
        var(&p.ln1_bias, &[2 * c])?,
        var(&p.w1, &[hd, c])?,
        var(&p.gamma2, &[2, hd])?,
        var(&p.beta2, &[2, hd])?,
        var(&p.eta2, &[hd])?,
        var(&p.w2, &[c, hd])?,
        var(&p.ln2_weight, &[2 * c])?,
        var(&p.ln2_bias, &[2 * c])?,
    ];
    let t = |i: usize| vars[i].as_tensor().clone();
    let dt = DcTensors {
        ln1_weight: t(0),
        ln1_bias: t(1),
        w1: t(2),
        gamma2: t(3),
        beta2: t(4),
        eta2: t(5),
        w2: t(6),
        ln2_weight: t(7),
        ln2_bias: t(8),
    };
    let y = ops::iieu_dc(&xv, &rv, &dt)?;
    let (loss, dy) = weighted_sum(&y, 33)?;
    let g = loss.backward()?;

    let (y_ref, saved) = iieu_dc::forward(&cfg, &x, &res, &p).unwrap();
    let gr = iieu_dc::backward(&cfg, &dy, &x, &res, &p, &saved).unwrap();
    close("y", &host(&y), &y_ref);
    close("dx", &grad(&g, &xv), &gr.dx);
    close("dres", &grad(&g, &rv), &gr.dres);
    let want = [
        ("d_ln1_weight", &gr.d_ln1_weight),
        ("d_ln1_bias", &gr.d_ln1_bias),
        ("d_w1", &gr.d_w1),
        ("d_gamma2", &gr.d_gamma2),
        ("d_beta2", &gr.d_beta2),
        ("d_eta2", &gr.d_eta2),
        ("d_w2", &gr.d_w2),
        ("d_ln2_weight", &gr.d_ln2_weight),
        ("d_ln2_bias", &gr.d_ln2_bias),
    ];
    for (v, (name, w)) in vars.iter().zip(want) {
        close(name, &grad(&g, v), w);
    }
    Ok(())
}

#[test]
fn tau_grads_match_reference() -> R {
    let x = f32s(&randn(&mut rng(40), 2 * 3 * 4));
    let xv = var(&x, &[2, 3, 4])?;
    let y = ops::tau(&xv, 0.1)?;
    let (loss, w) = weighted_sum(&y, 41)?;
    let g = loss.backward()?;
    close("A", &host(&y), &aiec::tau_forward(&x, 0.1f32).unwrap());
    close(
        "dF",
        &grad(&g, &xv),
        &aiec::tau_backward(&w, &x, 0.1f32).unwrap(),
    );
    Ok(())
}

/// The whole AIEC module step: `L = Σ w·A + total_aux_gate`; candle's gradients of F
/// and Wd must equal `train_backward(d_out = w, loss_scale = 1)` of the CPU
/// `train_forward` run on a copy of the module's counters (same order, same masks).
#[test]
fn aiec_module_grads_match_reference() -> R {
    for (layout, pool) in [
        (Layout::Nchw, Pool::Mean),
        (Layout::Nlc, Pool::Mean),
        (Layout::Nlc, Pool::ClassToken(0)),
    ] {
        let (n, c, s, k) = (6, 5, 4, 3);
        let cfg = AiecConfig {
            tau: 0.05,
            lambda_aux: 1.0,
            lambda_gate: 2.0,
            pool,
        };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let m = Aiec::new(vb, c, k, cfg)?.with_layout(layout);
        let dims = match layout {
            Layout::Nchw => [n, c, s],
            Layout::Nlc => [n, s, c],
        };
        let shape = match layout {
            Layout::Nchw => ActShape::nchw(n, c, s, 1),
            Layout::Nlc => ActShape::nlc(n, s, c),
        };
        let labels: Vec<usize> = (0..n).map(|i| i % k).collect();
        let wd0 = host(m.wd());
        let wd_var = varmap.all_vars().into_iter().next().unwrap();
        let mut counters = Counters::new(k, c).unwrap();
        let mut live_gate = false;
        for step in 0..3u64 {
            // Shifted down so that many (sample, channel) features are exactly 0 after
            // TAU: their inhibition counts make v ≤ 0 and the gate term live.
            let f: Vec<f32> = randn(&mut rng(50 + step), n * c * s)
                .iter()
                .map(|&v| (v - 0.8) as f32)
                .collect();
            let fv = var(&f, &dims)?;
            let (a, loss) = m.forward_train(&fv, &labels)?;
            let (task, w) = weighted_sum(&a, 60 + step)?;
            let total = (task + &loss.total)?;
            let g = total.backward()?;

            let out = aiec::train_forward(&cfg, &shape, &f, &wd0, &labels, &mut counters).unwrap();
            let gr = aiec::train_backward(&cfg, &shape, &w, 1.0f32, &f, &wd0, &out.saved).unwrap();
            assert_eq!(m.counters()?, counters, "counters after step {step}");
            close("A", &host(&a), &out.out);
            close(
                "total",
                &[loss.total.to_scalar::<f32>()?],
                &[out.losses.total_aux_gate],
            );
            close("dF", &grad(&g, &fv), &gr.df);
            close("dWd", &grad(&g, &wd_var), &gr.dwd);
            live_gate |= Real::to_f64(out.losses.gate_mean) > 0.0;
        }
        // The gate term was live (a labelled class had a gated, non-zero channel).
        assert!(live_gate, "{layout:?} {pool:?}: gate loss never live");
        m.reset_counters()?;
        assert!(m.counters()?.phi().iter().all(|&p| p == 0));
    }
    Ok(())
}

/// The IieuB module = candle's conv followed by the op with the conv's own weight;
/// the weight's gradient is the sum of the conv path and the `r_w` path, so it must
/// equal (grad with the IIEU op on a detached copy of W) + (CPU dW through r_w).
#[test]
fn iieu_module_weight_grad_is_conv_plus_rw_path() -> R {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let cc = candle_nn::Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let conv = candle_nn::conv2d_no_bias(3, 4, 3, cc, vb.pp("conv"))?;
    let m = IieuB::new(conv.clone(), vb.pp("iieu"))?;
    let x_pre = Tensor::from_vec(
        f32s(&randn(&mut rng(70), 2 * 3 * 5 * 5)),
        (2, 3, 5, 5),
        &Device::Cpu,
    )?;
    let y = m.forward(&x_pre)?;
    let (loss, _) = weighted_sum(&y, 71)?;
    let g = loss.backward()?;
    let wvar = varmap
        .data()
        .lock()
        .unwrap()
        .get("conv.weight")
        .cloned()
        .unwrap();
    let dw_total = grad(&g, &wvar);

    // Same graph with W detached inside the IIEU op: only the conv path reaches W.
    let (lw, lb, et) = m.params();
    let x = conv.forward(&x_pre)?;
    let opts = IieuOpts {
        padding: (1, 1),
        ..Default::default()
    };
    let y2 = ops::iieu_b(&x, &x_pre, &wvar.as_tensor().detach(), lw, lb, et, opts)?;
    close("module y", &host(&y), &host(&y2));
    let (loss2, dy) = weighted_sum(&y2, 71)?;
    let dw_conv = grad(&loss2.backward()?, &wvar);

    let geom = Conv2dGeometry::new(2, 3, 5, 5, 4, 3, 3).with_padding(1, 1);
    let cfg = IieuConfig::new(geom);
    let (xh, xph, wh) = (host(&x), host(&x_pre), host(wvar.as_tensor()));
    let params = IieuParams {
        ln_weight: host(lw),
        ln_bias: host(lb),
        eta: host(et),
    };
    let (_, saved) = iieu::forward(&cfg, &xh, &xph, &wh, &params).unwrap();
    let gr = iieu::backward(&cfg, &dy, &xh, &xph, &wh, &params, &saved).unwrap();
    let want: Vec<f32> = dw_conv.iter().zip(&gr.dw).map(|(a, b)| a + b).collect();
    // Two f32 summands added in a different order: a few ulp.
    for (i, (&g, &w)) in dw_total.iter().zip(&want).enumerate() {
        assert!(
            abs_diff_eq!(g, w, epsilon = 1e-5 * (1.0 + w.abs())),
            "dW[{i}]: {g} vs {w}"
        );
    }
    Ok(())
}
