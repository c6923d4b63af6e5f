//! candle's fused IieuConv2d (`ops::iieu_conv2d`, `nn::IieuConv2d`) vs the CPU op it
//! calls (`cpu::iieu_conv`): for every ψ (none, bias, affine, BatchNorm training and
//! eval), f32 and f64, a plain and a ragged geometry (stride 2, padding 1, groups 2),
//! the forward equals `cpu::iieu_conv::forward` and the gradients from
//! `loss.backward()` (`loss = Σ r·y`, fixed random `r`) equal
//! `cpu::iieu_conv::backward` with `dy = r`, for every variable. BatchNorm's running
//! statistics are updated exactly once per training forward (never by the backward)
//! and untouched in eval. Bad input is a candle error, not a panic.
//!
//! Tolerance: f32 `|candle − reference| ≤ 1e-6·(1 + |reference|)` per element (as in
//! candle_grad.rs: both sides run the same CPU code on the same `dy`, so the results
//! are expected to be bit-identical; the tolerance only allows for candle's gradient
//! accumulation); f64 `≤ 1e-12·(1 + |reference|)`. The forward outputs and the running
//! statistics are compared the same way.
#![cfg(feature = "candle")]

mod common;

use activation_kernels::candle::nn::{IieuConv2d, PsiKind};
use activation_kernels::candle::ops::{self, IieuConvPsi, IieuOpts};
use activation_kernels::cpu::iieu::{IieuConfig, IieuParams, PatchNorm};
use activation_kernels::cpu::iieu_conv::{self, BatchNorm, IieuConvParams, Psi};
use activation_kernels::{Conv2dGeometry, Real};
use approx::abs_diff_eq;
use candle_core::{DType, Device, ModuleT, Tensor, Var, WithDType};
use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
use common::{randn, rng, uniform};

type R = candle_core::Result<()>;

trait El: Real + WithDType {
    const TOL: f64;
}
impl El for f32 {
    const TOL: f64 = 1e-6;
}
impl El for f64 {
    const TOL: f64 = 1e-12;
}

fn cast<T: El>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::of(x)).collect()
}

fn var<T: El>(v: &[T], dims: &[usize]) -> candle_core::Result<Var> {
    Var::from_vec(v.to_vec(), dims, &Device::Cpu)
}

fn host<T: El>(t: &Tensor) -> Vec<T> {
    t.flatten_all().unwrap().to_vec1::<T>().unwrap()
}

#[track_caller]
fn close<T: El>(name: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (Real::to_f64(g), Real::to_f64(w));
        assert!(
            abs_diff_eq!(g, w, epsilon = T::TOL * (1.0 + w.abs())),
            "{name}[{i}]: candle {g} vs reference {w}"
        );
    }
}

fn grad<T: El>(g: &candle_core::backprop::GradStore, v: &Tensor) -> Vec<T> {
    host(g.get(v).expect("a gradient for every variable"))
}

/// `(N, C, H, W, O, K)` and the conv settings.
#[derive(Clone, Copy)]
struct Case {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    opts: IieuOpts,
}

impl Case {
    fn plain() -> Self {
        Self {
            n: 2,
            c: 3,
            h: 6,
            w: 5,
            o: 4,
            k: 3,
            opts: IieuOpts {
                padding: (1, 1),
                ..Default::default()
            },
        }
    }
    /// Stride 2, padding 1, groups 2, odd sizes (the last window is cut).
    fn ragged() -> Self {
        Self {
            n: 3,
            c: 4,
            h: 7,
            w: 6,
            o: 6,
            k: 3,
            opts: IieuOpts {
                stride: (2, 2),
                padding: (1, 1),
                groups: 2,
                ..Default::default()
            },
        }
    }
    /// Dilation 2 with the reference-code patch norm.
    fn dilated_all_channels() -> Self {
        Self {
            n: 2,
            c: 4,
            h: 7,
            w: 7,
            o: 4,
            k: 3,
            opts: IieuOpts {
                padding: (2, 1),
                dilation: (2, 2),
                groups: 2,
                patch_norm: PatchNorm::AllChannels,
                ..Default::default()
            },
        }
    }
    fn cfg(&self) -> IieuConfig {
        let o = self.opts;
        let geometry = Conv2dGeometry {
            n: self.n,
            c_in: self.c,
            h: self.h,
            w: self.w,
            c_out: self.o,
            kh: self.k,
            kw: self.k,
            stride: o.stride,
            padding: o.padding,
            dilation: o.dilation,
            groups: o.groups,
        };
        IieuConfig::new(geometry).with_patch_norm(o.patch_norm)
    }
    fn w_dims(&self) -> [usize; 4] {
        [self.o, self.c / self.opts.groups, self.k, self.k]
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    None,
    Bias,
    Affine,
    BnTrain,
    BnEval,
}

const KINDS: [Kind; 5] = [
    Kind::None,
    Kind::Bias,
    Kind::Affine,
    Kind::BnTrain,
    Kind::BnEval,
];

/// The op through candle vs the CPU op, one case, one ψ, one dtype.
fn op_matches_cpu<T: El>(case: Case, kind: Kind, seed: u64) -> R {
    let mut r = rng(seed);
    let cfg = case.cfg();
    let g = cfg.geometry;
    let o = case.o;
    let x_pre: Vec<T> = cast(&randn(&mut r, g.input_len()));
    let w: Vec<T> = cast(&randn(&mut r, g.weight_len()));
    let iieu = IieuParams {
        ln_weight: cast(&randn(&mut r, o)),
        ln_bias: cast(&randn(&mut r, o)),
        eta: cast(&uniform(&mut r, o, 0.02, 0.3)),
    };
    let va: Vec<T> = cast(&uniform(&mut r, o, 0.5, 1.5));
    let vb_: Vec<T> = cast(&randn(&mut r, o));
    let rm: Vec<T> = cast(&randn(&mut r, o));
    let rv: Vec<T> = cast(&uniform(&mut r, o, 0.5, 3.0));
    let bn = |training| {
        Psi::BatchNorm(BatchNorm {
            weight: va.clone(),
            bias: vb_.clone(),
            running_mean: rm.clone(),
            running_var: rv.clone(),
            momentum: 0.1,
            eps: 1e-5,
            training,
        })
    };
    let psi = match kind {
        Kind::None => Psi::None,
        Kind::Bias => Psi::Bias(vb_.clone()),
        Kind::Affine => Psi::Affine {
            scale: va.clone(),
            shift: vb_.clone(),
        },
        Kind::BnTrain => bn(true),
        Kind::BnEval => bn(false),
    };
    let params = IieuConvParams {
        iieu: iieu.clone(),
        psi,
    };

    let xv = var(&x_pre, &[g.n, g.c_in, g.h, g.w])?;
    let wv = var(&w, &case.w_dims())?;
    let (av, bv) = (var(&va, &[o])?, var(&vb_, &[o])?);
    let (rmt, rvt) = (var(&rm, &[o])?, var(&rv, &[o])?);
    let lw = var(&iieu.ln_weight, &[o])?;
    let lb = var(&iieu.ln_bias, &[o])?;
    let eta = var(&iieu.eta, &[o])?;
    let bn_t = |training| IieuConvPsi::BatchNorm {
        weight: &av,
        bias: &bv,
        running_mean: &rmt,
        running_var: &rvt,
        momentum: 0.1,
        eps: 1e-5,
        training,
    };
    let cpsi = match kind {
        Kind::None => IieuConvPsi::None,
        Kind::Bias => IieuConvPsi::Bias(&bv),
        Kind::Affine => IieuConvPsi::Affine {
            scale: &av,
            shift: &bv,
        },
        Kind::BnTrain => bn_t(true),
        Kind::BnEval => bn_t(false),
    };
    let out = ops::iieu_conv2d(&xv, &wv, cpsi, &lw, &lb, &eta, case.opts)?;
    let y = out.y;
    let rw: Vec<T> = cast(&randn(&mut r, y.elem_count()));
    let loss = (&y * Tensor::from_vec(rw.clone(), y.shape(), y.device())?)?.sum_all()?;
    let grads = loss.backward()?;

    let mut p_ref = params.clone();
    let (y_ref, saved) = iieu_conv::forward(&cfg, &x_pre, &w, &mut p_ref).unwrap();
    let gr = iieu_conv::backward(&cfg, &rw, &x_pre, &w, &p_ref, &saved).unwrap();
    let (oh, ow) = cfg.validate().unwrap();
    assert_eq!(y.dims(), &[g.n, o, oh, ow]);
    assert_eq!(y.dtype(), T::DTYPE);
    let tag = format!("{kind:?} {:?}", T::DTYPE);
    close(&format!("{tag} y"), &host::<T>(&y), &y_ref);
    close(
        &format!("{tag} dx_pre"),
        &grad::<T>(&grads, &xv),
        &gr.dx_pre,
    );
    close(&format!("{tag} dw"), &grad::<T>(&grads, &wv), &gr.dw);
    close(
        &format!("{tag} dγ̇"),
        &grad::<T>(&grads, &lw),
        &gr.d_ln_weight,
    );
    close(&format!("{tag} dβ̇"), &grad::<T>(&grads, &lb), &gr.d_ln_bias);
    close(&format!("{tag} dη"), &grad::<T>(&grads, &eta), &gr.d_eta);
    match kind {
        Kind::None => {
            assert!(grads.get(&av).is_none() && grads.get(&bv).is_none());
        }
        Kind::Bias => close(
            &format!("{tag} dbias"),
            &grad::<T>(&grads, &bv),
            &gr.d_psi_shift,
        ),
        _ => {
            close(
                &format!("{tag} dscale"),
                &grad::<T>(&grads, &av),
                &gr.d_psi_scale,
            );
            close(
                &format!("{tag} dshift"),
                &grad::<T>(&grads, &bv),
                &gr.d_psi_shift,
            );
        }
    }
    // Running statistics: never differentiated; returned (updated once) in training only.
    assert!(grads.get(&rmt).is_none() && grads.get(&rvt).is_none());
    match (kind, &p_ref.psi, &out.running) {
        (Kind::BnTrain, Psi::BatchNorm(b), Some((m, v))) => {
            close(
                &format!("{tag} running_mean"),
                &host::<T>(m),
                &b.running_mean,
            );
            close(&format!("{tag} running_var"), &host::<T>(v), &b.running_var);
            assert_ne!(host::<T>(m), rm, "running mean moved");
        }
        (Kind::BnTrain, ..) => panic!("training BatchNorm must return running stats"),
        (_, _, None) => {}
        (_, _, Some(_)) => panic!("{kind:?}: no running stats expected"),
    }
    // The op's input tensors are not written.
    assert_eq!(host::<T>(&rmt), rm);
    assert_eq!(host::<T>(&rvt), rv);
    Ok(())
}

#[test]
fn op_grads_match_cpu_f32() -> R {
    for (i, case) in [Case::plain(), Case::ragged(), Case::dilated_all_channels()]
        .into_iter()
        .enumerate()
    {
        for (j, kind) in KINDS.into_iter().enumerate() {
            op_matches_cpu::<f32>(case, kind, (10 * i + j) as u64)?;
        }
    }
    Ok(())
}

#[test]
fn op_grads_match_cpu_f64() -> R {
    for (i, case) in [Case::plain(), Case::ragged(), Case::dilated_all_channels()]
        .into_iter()
        .enumerate()
    {
        for (j, kind) in KINDS.into_iter().enumerate() {
            op_matches_cpu::<f64>(case, kind, (100 + 10 * i + j) as u64)?;
        }
    }
    Ok(())
}

fn vbuilder(map: &VarMap, dt: DType) -> VarBuilder<'static> {
    VarBuilder::from_varmap(map, dt, &Device::Cpu)
}

fn get(map: &VarMap, name: &str) -> Var {
    map.data()
        .lock()
        .unwrap()
        .get(name)
        .unwrap_or_else(|| panic!("variable {name}"))
        .clone()
}

/// The module vs the CPU op, one ψ, one dtype, the ragged geometry; BatchNorm's
/// running stats updated once per training forward, untouched in eval.
fn module_matches_cpu<T: El>(psi: PsiKind, seed: u64) -> R {
    let case = Case::ragged();
    let cfg = case.cfg();
    let g = cfg.geometry;
    let o = case.o;
    let map = VarMap::new();
    let ccfg = Conv2dConfig {
        stride: 2,
        padding: 1,
        groups: 2,
        ..Default::default()
    };
    let m = IieuConv2d::new(
        vbuilder(&map, T::DTYPE).pp("blk"),
        case.c,
        o,
        case.k,
        ccfg,
        psi,
        PatchNorm::PerGroup,
    )?;
    assert_eq!(m.opts(), case.opts);
    assert!(m.training());

    // Variables, shapes, inits.
    let mut names: Vec<String> = map.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    let want: &[&str] = match psi {
        PsiKind::None => &["blk.eta", "blk.ln_bias", "blk.ln_weight", "blk.weight"],
        PsiKind::Bias => &[
            "blk.bias",
            "blk.eta",
            "blk.ln_bias",
            "blk.ln_weight",
            "blk.weight",
        ],
        PsiKind::BatchNorm => &[
            "blk.bn.bias",
            "blk.bn.running_mean",
            "blk.bn.running_var",
            "blk.bn.weight",
            "blk.eta",
            "blk.ln_bias",
            "blk.ln_weight",
            "blk.weight",
        ],
    };
    assert_eq!(names, want);
    assert_eq!(get(&map, "blk.weight").dims(), &case.w_dims());
    assert_eq!(host::<T>(&get(&map, "blk.ln_weight")), vec![T::of(0.01); o]);
    assert_eq!(host::<T>(&get(&map, "blk.ln_bias")), vec![T::of(0.0); o]);
    assert_eq!(host::<T>(&get(&map, "blk.eta")), vec![T::of(0.05); o]);
    if psi == PsiKind::BatchNorm {
        assert_eq!(host::<T>(&get(&map, "blk.bn.weight")), vec![T::of(1.0); o]);
        assert_eq!(host::<T>(&get(&map, "blk.bn.bias")), vec![T::of(0.0); o]);
        assert_eq!(
            host::<T>(&get(&map, "blk.bn.running_mean")),
            vec![T::of(0.0); o]
        );
        assert_eq!(
            host::<T>(&get(&map, "blk.bn.running_var")),
            vec![T::of(1.0); o]
        );
    }
    if psi == PsiKind::Bias {
        let b = 1.0 / (case.c as f64).sqrt();
        assert!(host::<T>(&get(&map, "blk.bias"))
            .iter()
            .all(|&v| Real::to_f64(v).abs() <= b));
    }
    // Move γ̇, β̇ off their inits so their gradients are not degenerate.
    let mut r = rng(seed);
    get(&map, "blk.ln_weight").set(&Tensor::from_vec(
        cast::<T>(&randn(&mut r, o)),
        o,
        &Device::Cpu,
    )?)?;
    get(&map, "blk.ln_bias").set(&Tensor::from_vec(
        cast::<T>(&randn(&mut r, o)),
        o,
        &Device::Cpu,
    )?)?;

    let vec_of = |name: &str| host::<T>(&get(&map, name));
    let params_now = |training: bool| IieuConvParams {
        iieu: IieuParams {
            ln_weight: vec_of("blk.ln_weight"),
            ln_bias: vec_of("blk.ln_bias"),
            eta: vec_of("blk.eta"),
        },
        psi: match psi {
            PsiKind::None => Psi::None,
            PsiKind::Bias => Psi::Bias(vec_of("blk.bias")),
            PsiKind::BatchNorm => Psi::BatchNorm(BatchNorm {
                weight: vec_of("blk.bn.weight"),
                bias: vec_of("blk.bn.bias"),
                running_mean: vec_of("blk.bn.running_mean"),
                running_var: vec_of("blk.bn.running_var"),
                momentum: 0.1,
                eps: 1e-5,
                training,
            }),
        },
    };

    for step in 0..2 {
        let x_pre: Vec<T> = cast(&randn(&mut r, g.input_len()));
        let xv = var(&x_pre, &[g.n, g.c_in, g.h, g.w])?;
        let w = vec_of("blk.weight");
        let mut p_ref = params_now(true);
        let y = m.forward(&xv)?;
        // Updated once by the forward ...
        let (y_ref, saved) = iieu_conv::forward(&cfg, &x_pre, &w, &mut p_ref).unwrap();
        close(&format!("{psi:?} step {step} y"), &host::<T>(&y), &y_ref);
        let stats_after_fwd = params_now(true).psi;
        assert_eq!(
            stats_after_fwd, p_ref.psi,
            "running stats after the forward"
        );
        let rw: Vec<T> = cast(&randn(&mut r, y.elem_count()));
        let loss = (&y * Tensor::from_vec(rw.clone(), y.shape(), y.device())?)?.sum_all()?;
        let grads = loss.backward()?;
        // ... and not again by the backward.
        assert_eq!(
            params_now(true).psi,
            p_ref.psi,
            "running stats after backward"
        );
        let gr = iieu_conv::backward(&cfg, &rw, &x_pre, &w, &p_ref, &saved).unwrap();
        let tag = format!("{psi:?} {:?} step {step}", T::DTYPE);
        close(
            &format!("{tag} dx_pre"),
            &grad::<T>(&grads, &xv),
            &gr.dx_pre,
        );
        let gv = |n: &str| grad::<T>(&grads, &get(&map, n));
        close(&format!("{tag} dw"), &gv("blk.weight"), &gr.dw);
        close(&format!("{tag} dγ̇"), &gv("blk.ln_weight"), &gr.d_ln_weight);
        close(&format!("{tag} dβ̇"), &gv("blk.ln_bias"), &gr.d_ln_bias);
        close(&format!("{tag} dη"), &gv("blk.eta"), &gr.d_eta);
        match psi {
            PsiKind::None => {}
            PsiKind::Bias => close(&format!("{tag} dbias"), &gv("blk.bias"), &gr.d_psi_shift),
            PsiKind::BatchNorm => {
                close(
                    &format!("{tag} dbn.w"),
                    &gv("blk.bn.weight"),
                    &gr.d_psi_scale,
                );
                close(&format!("{tag} dbn.b"), &gv("blk.bn.bias"), &gr.d_psi_shift);
                assert!(grads.get(&get(&map, "blk.bn.running_mean")).is_none());
                assert!(grads.get(&get(&map, "blk.bn.running_var")).is_none());
            }
        }
    }

    // Eval: running statistics used, not updated; gradients still match.
    let x_pre: Vec<T> = cast(&randn(&mut r, g.input_len()));
    let xv = var(&x_pre, &[g.n, g.c_in, g.h, g.w])?;
    let w = vec_of("blk.weight");
    let before = params_now(false);
    let y = ModuleT::forward_t(&m, &xv, false)?;
    let mut p_ref = before.clone();
    let (y_ref, saved) = iieu_conv::forward(&cfg, &x_pre, &w, &mut p_ref).unwrap();
    assert_eq!(p_ref, before);
    close(&format!("{psi:?} eval y"), &host::<T>(&y), &y_ref);
    let grads = y.sum_all()?.backward()?;
    assert_eq!(
        params_now(false),
        before,
        "eval must not touch running stats"
    );
    let ones = vec![T::of(1.0); y.elem_count()];
    let gr = iieu_conv::backward(&cfg, &ones, &x_pre, &w, &p_ref, &saved).unwrap();
    close(
        &format!("{psi:?} eval dx_pre"),
        &grad::<T>(&grads, &xv),
        &gr.dx_pre,
    );
    close(
        &format!("{psi:?} eval dw"),
        &grad::<T>(&grads, &get(&map, "blk.weight")),
        &gr.dw,
    );
    // The eval switch of the module itself.
    let m_eval = m.clone().with_training(false);
    assert!(!m_eval.training());
    let y2 = m_eval.forward(&xv)?;
    assert_eq!(host::<T>(&y2), host::<T>(&y));
    assert_eq!(params_now(false), before);
    Ok(())
}

#[test]
fn module_matches_cpu_f32() -> R {
    for (i, psi) in [PsiKind::None, PsiKind::Bias, PsiKind::BatchNorm]
        .into_iter()
        .enumerate()
    {
        module_matches_cpu::<f32>(psi, 300 + i as u64)?;
    }
    Ok(())
}

#[test]
fn module_matches_cpu_f64() -> R {
    for (i, psi) in [PsiKind::None, PsiKind::Bias, PsiKind::BatchNorm]
        .into_iter()
        .enumerate()
    {
        module_matches_cpu::<f64>(psi, 400 + i as u64)?;
    }
    Ok(())
}

fn t32(v: Vec<f32>, dims: &[usize]) -> Tensor {
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

#[test]
fn bad_input_is_an_error() -> R {
    let map = VarMap::new();
    let m = IieuConv2d::new(
        vbuilder(&map, DType::F32),
        4,
        6,
        3,
        Conv2dConfig {
            padding: 1,
            groups: 2,
            ..Default::default()
        },
        PsiKind::BatchNorm,
        PatchNorm::PerGroup,
    )?;
    let good = t32(vec![0.5; 2 * 4 * 5 * 5], &[2, 4, 5, 5]);
    m.forward(&good)?;
    // Wrong channel count, wrong rank.
    assert!(m
        .forward(&t32(vec![0.5; 2 * 3 * 5 * 5], &[2, 3, 5, 5]))
        .is_err());
    assert!(m.forward(&t32(vec![0.5; 4 * 5 * 5], &[4, 5, 5])).is_err());
    // Wrong dtypes: f64 input to an f32 module, f16, integers.
    assert!(m.forward(&good.to_dtype(DType::F64)?).is_err());
    assert!(m.forward(&good.to_dtype(DType::F16)?).is_err());
    assert!(m.forward(&good.to_dtype(DType::U32)?).is_err());
    // Kernel larger than the padded input.
    assert!(m.forward(&t32(vec![0.5; 4], &[1, 4, 1, 1])).is_err());
    // Training BatchNorm over a single value per channel (N·H'·W' = 1), as PyTorch.
    let one = IieuConv2d::new(
        vbuilder(&VarMap::new(), DType::F32),
        4,
        6,
        3,
        Default::default(),
        PsiKind::BatchNorm,
        PatchNorm::PerGroup,
    )?;
    let x1 = t32(vec![0.5; 4 * 9], &[1, 4, 3, 3]);
    assert!(one.forward(&x1).is_err());
    assert!(ModuleT::forward_t(&one, &x1, false).is_ok());
    // Bad BatchNorm eps / momentum.
    let bad_eps = m.clone().with_bn_momentum_eps(0.1, 0.0);
    assert!(bad_eps.forward(&good).is_err());
    let bad_mom = m.clone().with_bn_momentum_eps(1.5, 1e-5);
    assert!(bad_mom.forward(&good).is_err());
    // A failed forward leaves the running stats untouched.
    let (rm, rv) = m.bn_running_stats().unwrap();
    let (rm0, rv0) = (host::<f32>(rm), host::<f32>(rv));
    assert!(m
        .forward(&t32(vec![0.5; 2 * 3 * 5 * 5], &[2, 3, 5, 5]))
        .is_err());
    assert_eq!(host::<f32>(rm), rm0);
    assert_eq!(host::<f32>(rv), rv0);

    // Module construction errors.
    assert!(IieuConv2d::new(
        vbuilder(&VarMap::new(), DType::F32),
        3,
        6,
        3,
        Conv2dConfig {
            groups: 2,
            ..Default::default()
        },
        PsiKind::None,
        PatchNorm::PerGroup,
    )
    .is_err());
    assert!(IieuConv2d::new(
        vbuilder(&VarMap::new(), DType::F32),
        4,
        6,
        0,
        Default::default(),
        PsiKind::None,
        PatchNorm::PerGroup,
    )
    .is_err());

    // The op: parameter vectors of the wrong length or dtype, a 3-D weight.
    let x = t32(vec![0.5; 2 * 4 * 5 * 5], &[2, 4, 5, 5]);
    let w = t32(vec![0.1; 6 * 2 * 9], &[6, 2, 3, 3]);
    let p6 = t32(vec![0.1; 6], &[6]);
    let p5 = t32(vec![0.1; 5], &[5]);
    let opts = IieuOpts {
        padding: (1, 1),
        groups: 2,
        ..Default::default()
    };
    assert!(ops::iieu_conv2d(&x, &w, IieuConvPsi::None, &p6, &p6, &p6, opts).is_ok());
    assert!(ops::iieu_conv2d(&x, &w, IieuConvPsi::None, &p5, &p6, &p6, opts).is_err());
    assert!(ops::iieu_conv2d(&x, &w, IieuConvPsi::Bias(&p5), &p6, &p6, &p6, opts).is_err());
    let p6d = p6.to_dtype(DType::F64)?;
    assert!(ops::iieu_conv2d(&x, &w, IieuConvPsi::None, &p6d, &p6, &p6, opts).is_err());
    let w3 = w.reshape((6, 2, 9))?;
    assert!(ops::iieu_conv2d(&x, &w3, IieuConvPsi::None, &p6, &p6, &p6, opts).is_err());
    let wf64 = w.to_dtype(DType::F64)?;
    assert!(ops::iieu_conv2d(&x, &wf64, IieuConvPsi::None, &p6, &p6, &p6, opts).is_err());
    let ungrouped = IieuOpts {
        padding: (1, 1),
        ..Default::default()
    };
    assert!(ops::iieu_conv2d(&x, &w, IieuConvPsi::None, &p6, &p6, &p6, ungrouped).is_err());
    let bn_short = IieuConvPsi::BatchNorm {
        weight: &p6,
        bias: &p6,
        running_mean: &p5,
        running_var: &p6,
        momentum: 0.1,
        eps: 1e-5,
        training: false,
    };
    assert!(ops::iieu_conv2d(&x, &w, bn_short, &p6, &p6, &p6, opts).is_err());
    let neg_var = t32(vec![-1.0; 6], &[6]);
    let bn_neg = IieuConvPsi::BatchNorm {
        weight: &p6,
        bias: &p6,
        running_mean: &p6,
        running_var: &neg_var,
        momentum: 0.1,
        eps: 1e-5,
        training: false,
    };
    assert!(ops::iieu_conv2d(&x, &w, bn_neg, &p6, &p6, &p6, opts).is_err());
    Ok(())
}
