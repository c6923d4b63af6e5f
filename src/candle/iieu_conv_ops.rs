//! candle custom op for the fused IieuConv2d (convolution → ψ → IIEU-B as ONE op,
//! [`crate::cpu::iieu_conv`]). Re-exported from [`super::ops`].
//!
//! Same pattern as [`super::ops::IieuBOp`]: `cpu_fwd` checks the dims and calls
//! [`iieu_conv::forward`]; `bwd` reads the inputs back to host vectors, re-runs the CPU
//! forward to rebuild the saved state (on a private copy of the parameters, so
//! BatchNorm's running statistics are never updated a second time) and calls
//! [`iieu_conv::backward`]. The learnable per-channel vectors travel packed in one 1-D
//! tensor `[ψ scale (if any); ψ shift (if any); γ̇; β̇; η]` built with `Tensor::cat`, whose
//! backward hands every parameter its own slice of the packed gradient.
//!
//! BatchNorm's running statistics are not learnable and are not in the pack: the op
//! carries their values (read once, before the op) and, in training mode, hands the
//! updated values back through [`iieu_conv2d`]'s [`IieuConvOut::running`] — the caller
//! (e.g. [`super::nn::IieuConv2d`]) stores them, as `candle_nn::BatchNorm` does with
//! `Var::set`.
//!
//! CPU device only, f32 and f64; any other dtype is `UnsupportedDTypeForOp`, a CUDA or
//! Metal tensor a candle error saying that the CUDA path is not implemented yet.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout as CLayout, Shape, Tensor};

use super::ops::{split, IieuOpts};
use super::{cerr, check_dims, cpu_data, host, op_err, El};
use crate::cpu::iieu::{IieuConfig, IieuParams};
use crate::cpu::iieu_conv::{self, BatchNorm, IieuConvParams, Psi};
use crate::real::Real;

type CResult<T> = candle_core::Result<T>;
type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

const NAME: &str = "iieu_conv2d";

/// Which ψ an [`IieuConvOp`] applies, with BatchNorm's non-learnable state (its
/// learnable vectors are in the op's parameter pack).
#[derive(Debug, Clone, PartialEq)]
pub enum IieuConvPsiSpec {
    /// `x = c` (pack: no ψ vectors).
    None,
    /// `x = c + b[o]` (pack: `b`).
    Bias,
    /// `x = a[o]·c + b[o]` (pack: `a`, `b`).
    Affine,
    /// BatchNorm (pack: `γ`, `β`): `x = γ·(c − μ)/sqrt(var + eps) + β` with the batch
    /// statistics (training) or the running ones (eval).
    BatchNorm {
        /// Running mean, `(O,)` (read in eval mode; the start of the update in training).
        running_mean: Vec<f64>,
        /// Running (unbiased) variance, `(O,)`.
        running_var: Vec<f64>,
        /// Running-stat momentum in `[0, 1]`.
        momentum: f64,
        /// `eps > 0` added to the variance.
        eps: f64,
        /// Training (batch statistics, running stats updated) or eval.
        training: bool,
    },
}

impl IieuConvPsiSpec {
    /// Number of ψ vectors in the pack (each `(O,)`).
    fn n_vectors(&self) -> usize {
        match self {
            IieuConvPsiSpec::None => 0,
            IieuConvPsiSpec::Bias => 1,
            IieuConvPsiSpec::Affine | IieuConvPsiSpec::BatchNorm { .. } => 2,
        }
    }
}

/// The fused IieuConv2d as a candle op (SPEC §1, §1.5; formula and gradients in
/// [`crate::cpu::iieu_conv`]):
///
/// ```text
/// c = conv(x_pre, W),  x = ψ(c),  y = ς(ρ̂)·x,  ρ̂ = x·r_w[o]·r_x + ν[n,o]
/// ```
///
/// Inputs: `x_pre` `(N, C, H, W)`, `W` `(O, C/g, KH, KW)`, and the 1-D pack
/// `[ψ scale; ψ shift; γ̇; β̇; η]` (ψ's vectors as in [`IieuConvPsiSpec`], each `(O,)`).
/// Output `y` `(N, O, H', W')` from [`iieu_conv::forward`]. Gradients from
/// [`iieu_conv::backward`]: `dx_pre` and `dW` (through the conv and through `r_x`,
/// `r_w`), and the pack's (`dψ`, `dγ̇`, `dβ̇`, `dη`). Build it with [`iieu_conv2d`].
#[derive(Debug, Clone)]
pub struct IieuConvOp {
    /// Conv settings and patch-norm convention.
    pub opts: IieuOpts,
    /// Dims of the conv weight `(O, C/g, KH, KW)`.
    pub w_dims: [usize; 4],
    /// ψ.
    pub psi: IieuConvPsiSpec,
    /// Where `cpu_fwd` leaves BatchNorm's updated running statistics (training mode).
    running_out: RunningSlot,
}

/// BatchNorm's updated `(running_mean, running_var)`, left by `cpu_fwd` for
/// [`iieu_conv2d`] (candle ops have one output tensor).
type RunningSlot = Arc<Mutex<Option<(Vec<f64>, Vec<f64>)>>>;

impl IieuConvOp {
    fn config(&self, x_pre_dims: &[usize]) -> CResult<IieuConfig> {
        let cfg = super::ops::iieu_config(NAME, self.w_dims, &self.opts, x_pre_dims)?;
        cfg.validate().map_err(cerr)?;
        Ok(cfg)
    }

    /// Splits the pack into ψ and IIEU-B's parameters.
    fn params<T: El>(&self, p: &[T]) -> CResult<IieuConvParams<T>> {
        let o = self.w_dims[0];
        let k = self.psi.n_vectors();
        let parts = split(NAME, p, &vec![o; k + 3])?;
        let v = |i: usize| parts[i].to_vec();
        let of = |s: &[f64]| s.iter().map(|&x| T::of(x)).collect::<Vec<T>>();
        let psi = match &self.psi {
            IieuConvPsiSpec::None => Psi::None,
            IieuConvPsiSpec::Bias => Psi::Bias(v(0)),
            IieuConvPsiSpec::Affine => Psi::Affine {
                scale: v(0),
                shift: v(1),
            },
            IieuConvPsiSpec::BatchNorm {
                running_mean,
                running_var,
                momentum,
                eps,
                training,
            } => Psi::BatchNorm(BatchNorm {
                weight: v(0),
                bias: v(1),
                running_mean: of(running_mean),
                running_var: of(running_var),
                momentum: *momentum,
                eps: *eps,
                training: *training,
            }),
        };
        Ok(IieuConvParams {
            iieu: IieuParams {
                ln_weight: v(k),
                ln_bias: v(k + 1),
                eta: v(k + 2),
            },
            psi,
        })
    }
}

fn conv_fwd<T: El>(
    op: &IieuConvOp,
    s1: &CpuStorage,
    l1: &CLayout,
    s2: &CpuStorage,
    l2: &CLayout,
    s3: &CpuStorage,
    l3: &CLayout,
) -> CResult<(CpuStorage, Shape)> {
    let cfg = op.config(l1.dims())?;
    check_dims(NAME, "w", l2.dims(), &op.w_dims)?;
    let (oh, ow) = cfg.validate().map_err(cerr)?;
    let x_pre = cpu_data::<T>(NAME, s1, l1)?;
    let w = cpu_data::<T>(NAME, s2, l2)?;
    let p = cpu_data::<T>(NAME, s3, l3)?;
    let mut params = op.params(&p)?;
    let (y, _) = iieu_conv::forward(&cfg, &x_pre, &w, &mut params).map_err(cerr)?;
    if let Psi::BatchNorm(bn) = &params.psi {
        if bn.training {
            let f = |v: &[T]| v.iter().map(|&x| Real::to_f64(x)).collect::<Vec<f64>>();
            let mut slot = op
                .running_out
                .lock()
                .map_err(|_| op_err(NAME, "running-stat slot poisoned"))?;
            *slot = Some((f(&bn.running_mean), f(&bn.running_var)));
        }
    }
    let g = cfg.geometry;
    Ok((
        T::to_cpu_storage_owned(y),
        Shape::from((g.n, g.c_out, oh, ow)),
    ))
}

fn conv_bwd<T: El>(
    op: &IieuConvOp,
    xp: &Tensor,
    w: &Tensor,
    p: &Tensor,
    g: &Tensor,
) -> CResult<Grads3> {
    let cfg = op.config(xp.dims())?;
    let (xpv, wv, pv, gv) = (host::<T>(xp)?, host::<T>(w)?, host::<T>(p)?, host::<T>(g)?);
    // A private copy: re-running the forward updates only this copy's running stats.
    let mut params = op.params(&pv)?;
    let (_, saved) = iieu_conv::forward(&cfg, &xpv, &wv, &mut params).map_err(cerr)?;
    let gr = iieu_conv::backward(&cfg, &gv, &xpv, &wv, &params, &saved).map_err(cerr)?;
    let mut dp = gr.d_psi_scale;
    dp.extend(gr.d_psi_shift);
    dp.extend(gr.d_ln_weight);
    dp.extend(gr.d_ln_bias);
    dp.extend(gr.d_eta);
    Ok((
        Some(Tensor::from_vec(gr.dx_pre, xp.shape(), xp.device())?),
        Some(Tensor::from_vec(gr.dw, w.shape(), w.device())?),
        Some(Tensor::from_vec(dp, p.shape(), p.device())?),
    ))
}

impl CustomOp3 for IieuConvOp {
    fn name(&self) -> &'static str {
        NAME
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &CLayout,
        s2: &CpuStorage,
        l2: &CLayout,
        s3: &CpuStorage,
        l3: &CLayout,
    ) -> CResult<(CpuStorage, Shape)> {
        by_dtype!(s1.dtype(), NAME, conv_fwd(self, s1, l1, s2, l2, s3, l3))
    }
    fn bwd(
        &self,
        xp: &Tensor,
        w: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<Grads3> {
        if !xp.device().is_cpu() {
            return Err(not_cpu(xp));
        }
        by_dtype!(xp.dtype(), NAME, conv_bwd(self, xp, w, p, g))
    }
}

fn not_cpu(t: &Tensor) -> candle_core::Error {
    op_err(
        NAME,
        format!(
            "tensors on {:?} are not supported: the CUDA path of the fused IieuConv2d is \
             not implemented yet (CPU device only)",
            t.device().location()
        ),
    )
}

/// ψ of [`iieu_conv2d`], with its tensors (each `(O,)`, same dtype as `x_pre`).
#[derive(Debug, Clone, Copy)]
pub enum IieuConvPsi<'a> {
    /// `x = c`.
    None,
    /// `x = c + bias[o]`; gradient `Σ dx` over `(n, h', w')`.
    Bias(&'a Tensor),
    /// `x = scale[o]·c + shift[o]`; gradients `Σ dx·c`, `Σ dx`.
    Affine {
        /// `a[o]`.
        scale: &'a Tensor,
        /// `b[o]`.
        shift: &'a Tensor,
    },
    /// BatchNorm (PyTorch `BatchNorm2d` semantics):
    /// `x = weight·(c − μ)/sqrt(var + eps) + bias`, batch statistics in training (then
    /// the updated running statistics are returned in [`IieuConvOut::running`]),
    /// `running_mean` / `running_var` in eval. Gradients `Σ dx·x̂` (weight), `Σ dx`
    /// (bias); in training `dc = weight·rstd·(dx − mean(dx) − x̂·mean(dx·x̂))`. The
    /// running statistics get no gradient.
    BatchNorm {
        /// `γ[o]`.
        weight: &'a Tensor,
        /// `β[o]`.
        bias: &'a Tensor,
        /// Running mean (not differentiated).
        running_mean: &'a Tensor,
        /// Running unbiased variance (not differentiated).
        running_var: &'a Tensor,
        /// Running-stat momentum in `[0, 1]` (PyTorch default 0.1).
        momentum: f64,
        /// `eps > 0` (PyTorch default 1e-5).
        eps: f64,
        /// Training or eval mode.
        training: bool,
    },
}

/// What [`iieu_conv2d`] returns.
#[derive(Debug, Clone)]
pub struct IieuConvOut {
    /// `y`, `(N, O, H', W')`, differentiable w.r.t. every input tensor.
    pub y: Tensor,
    /// BatchNorm in training mode: the updated `(running_mean, running_var)`,
    /// `running ← (1 − momentum)·running + momentum·batch` (the variance unbiased,
    /// `·M/(M − 1)`, `M = N·H'·W'`), detached, same dtype as `x_pre`; `None` otherwise.
    pub running: Option<(Tensor, Tensor)>,
}

/// The fused IieuConv2d, one candle op ([`IieuConvOp`]):
/// `y = IIEU-B(ψ(conv(x_pre, w)), x_pre, w)` with IIEU-B's `ln_weight` (γ̇),
/// `ln_bias` (β̇), `eta` (η), each `(O,)`, and the conv settings in `opts`.
/// `x_pre`: `(N, C, H, W)`, `w`: `(O, C/g, KH, KW)`.
///
/// Differentiable (first order) w.r.t. `x_pre`, `w` (through the conv and `r_w`), ψ's
/// tensors (not BatchNorm's running statistics), `ln_weight`, `ln_bias`, `eta`; the
/// gradients are [`iieu_conv::backward`]'s. Errors: a dtype other than f32/f64, mixed
/// dtypes, a non-CPU tensor (the CUDA path is not implemented yet), dims that do not
/// fit, and every error of [`iieu_conv::forward`] (e.g. BatchNorm training statistics
/// over a single value) — all as `candle_core::Error`, never a panic.
pub fn iieu_conv2d(
    x_pre: &Tensor,
    w: &Tensor,
    psi: IieuConvPsi<'_>,
    ln_weight: &Tensor,
    ln_bias: &Tensor,
    eta: &Tensor,
    opts: IieuOpts,
) -> CResult<IieuConvOut> {
    let dt = x_pre.dtype();
    if !matches!(dt, DType::F32 | DType::F64) {
        return Err(candle_core::Error::UnsupportedDTypeForOp(dt, NAME));
    }
    let &[o, cpg, kh, kw] = w.dims() else {
        return Err(op_err(
            NAME,
            format!("w must be (O, C/g, KH, KW), got {:?}", w.dims()),
        ));
    };
    let mut vecs: Vec<(&str, &Tensor)> = Vec::new();
    let spec = match psi {
        IieuConvPsi::None => IieuConvPsiSpec::None,
        IieuConvPsi::Bias(b) => {
            vecs.push(("psi bias", b));
            IieuConvPsiSpec::Bias
        }
        IieuConvPsi::Affine { scale, shift } => {
            vecs.extend([("psi scale", scale), ("psi shift", shift)]);
            IieuConvPsiSpec::Affine
        }
        IieuConvPsi::BatchNorm {
            weight,
            bias,
            running_mean,
            running_var,
            momentum,
            eps,
            training,
        } => {
            vecs.extend([("bn weight", weight), ("bn bias", bias)]);
            for (what, t) in [("running_mean", running_mean), ("running_var", running_var)] {
                check_dims(NAME, what, t.dims(), &[o])?;
            }
            let f = |t: &Tensor| -> CResult<Vec<f64>> {
                t.detach().to_dtype(DType::F64)?.to_vec1::<f64>()
            };
            IieuConvPsiSpec::BatchNorm {
                running_mean: f(running_mean)?,
                running_var: f(running_var)?,
                momentum,
                eps,
                training,
            }
        }
    };
    vecs.extend([("ln_weight", ln_weight), ("ln_bias", ln_bias), ("eta", eta)]);
    let mut all = vec![("x_pre", x_pre), ("w", w)];
    all.extend(vecs.iter().copied());
    for (what, t) in &all {
        if !t.device().is_cpu() {
            return Err(not_cpu(t));
        }
        if t.dtype() != dt {
            return Err(op_err(
                NAME,
                format!("{what} is {:?}, expected {dt:?} like x_pre", t.dtype()),
            ));
        }
    }
    for (what, t) in &vecs {
        check_dims(NAME, what, t.dims(), &[o])?;
    }
    let op = IieuConvOp {
        opts,
        w_dims: [o, cpg, kh, kw],
        psi: spec,
        running_out: Arc::new(Mutex::new(None)),
    };
    let slot = Arc::clone(&op.running_out);
    let parts: Vec<&Tensor> = vecs.iter().map(|(_, t)| *t).collect();
    let pack = Tensor::cat(&parts, 0)?;
    let y = x_pre
        .contiguous()?
        .apply_op3(&w.contiguous()?, &pack.contiguous()?, op)?;
    let running = slot
        .lock()
        .map_err(|_| op_err(NAME, "running-stat slot poisoned"))?
        .take();
    let running = match running {
        Some((m, v)) => Some((
            Tensor::from_vec(m, o, x_pre.device())?.to_dtype(dt)?,
            Tensor::from_vec(v, o, x_pre.device())?.to_dtype(dt)?,
        )),
        None => None,
    };
    Ok(IieuConvOut { y, running })
}
