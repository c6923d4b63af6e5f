//! burn functions for every op family, differentiable under burn's `Autodiff`.
//!
//! On burn's CPU backend (`Flex`) each function moves its tensors to the host, runs the
//! crate's CPU forward ([`crate::cpu`]) and, under `Autodiff`, registers a backward node
//! that runs the crate's CPU backward ([`super::AkBackend`]); on burn's CUDA backend
//! (feature `burn-cuda`) the crate's CUDA forward and backward run on burn's device
//! buffers instead, with the same semantics (module `burn::cuda`). Formulas and
//! gradients are those of the CPU op each function names. Tensors are `f32` or `f64` on
//! `Flex`, `f32`, `f16` or `bf16` on CUDA (all inputs of one call the same dtype); the
//! ACON ops, the meta-ACON generators and AIEC take activations in either [`Layout`]:
//! NCHW-like `(N, C, ...)` (`S` = product of the trailing dims, `1` for a rank-2
//! `(N, C)` input) or tokens `(N, L, C)` (channels last, e.g. a ViT's).
//!
//! Errors: every function returns [`crate::Error`] for bad input (wrong shapes or
//! lengths, empty tensors, labels out of range, bad parameters, another dtype) — the
//! CPU op's own validation — and never panics on it.

use std::sync::{Arc, Mutex};

use ::burn::backend::{Dispatch, DispatchTensor};
use ::burn::tensor::{Int, Tensor, TensorCreationOptions, TensorData};

use super::backend::AkBackend;
pub use super::kernel::{AiecStats, BetaAxis};
use super::kernel::{HostOp, OpKind, RunningSlot, MAX_INPUTS};
use crate::cpu::aiec::{AiecConfig, Counters};
use crate::cpu::iieu_conv::PsiKind;
use crate::cpu::iieu_dc::DcConfig;
pub use crate::Layout;
use crate::{ActShape, Error, Result};

/// ACON's switching factor β as a tensor that receives its gradient (any generator
/// built from burn layers composes with the ACON ops through it); see
/// [`crate::cpu::acon::Beta`].
#[derive(Debug, Clone)]
pub enum BetaTensor {
    /// `(C)`: plain ACON (a learnable parameter).
    PerChannel(Tensor<1>),
    /// `(N, C)`: channel-wise meta-ACON (e.g. from [`channel_gen`] or your own generator).
    PerSampleChannel(Tensor<2>),
    /// `(N)`: layer-wise meta-ACON (e.g. from [`layer_gen`]).
    PerSample(Tensor<1>),
    /// Pixel-wise meta-ACON, `β = σ(x)`: no tensor, the β path flows into `x`.
    PixelWise,
}

impl BetaTensor {
    /// Checks the β tensor's dims against `shape` (`(C)`, `(N, C)` or `(N)`), then
    /// splits it into its axis and dispatch tensor.
    fn split(self, shape: &ActShape) -> Result<(BetaAxis, Option<DispatchTensor>)> {
        let (got, want): (Vec<usize>, Vec<usize>) = match &self {
            BetaTensor::PerChannel(b) => (b.dims().to_vec(), vec![shape.c]),
            BetaTensor::PerSampleChannel(b) => (b.dims().to_vec(), vec![shape.n, shape.c]),
            BetaTensor::PerSample(b) => (b.dims().to_vec(), vec![shape.n]),
            BetaTensor::PixelWise => (vec![], vec![]),
        };
        if got != want {
            return Err(Error::Shape {
                what: "beta",
                msg: format!("expected dims {want:?}, got {got:?}"),
            });
        }
        Ok(match self {
            BetaTensor::PerChannel(b) => (BetaAxis::PerChannel, Some(b.into_dispatch())),
            BetaTensor::PerSampleChannel(b) => {
                (BetaAxis::PerSampleChannel, Some(b.into_dispatch()))
            }
            BetaTensor::PerSample(b) => (BetaAxis::PerSample, Some(b.into_dispatch())),
            BetaTensor::PixelWise => (BetaAxis::PixelWise, None),
        })
    }
}

/// The [`ActShape`] of `dims` in `layout`: [`Layout::Nchw`] `(N, C, ...)` (`S` = product
/// of the trailing dims) or [`Layout::Nlc`] `(N, L, C)` (tokens, channels last).
pub(crate) fn act_shape(dims: &[usize], layout: Layout) -> Result<ActShape> {
    match layout {
        Layout::Nchw => {
            if dims.len() < 2 {
                return Err(Error::Shape {
                    what: "x",
                    msg: format!("expected (N, C, ...), got rank {}", dims.len()),
                });
            }
            let s = dims[2..]
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| Error::Shape {
                    what: "x",
                    msg: "N·C·S overflows usize".into(),
                })?;
            Ok(ActShape {
                n: dims[0],
                c: dims[1],
                s,
                layout: Layout::Nchw,
            })
        }
        Layout::Nlc => match dims {
            &[n, l, c] => Ok(ActShape::nlc(n, l, c)),
            _ => Err(Error::Shape {
                what: "x",
                msg: format!("expected (N, L, C), got dims {dims:?}"),
            }),
        },
    }
}

/// Runs `kind` through [`AkBackend::ak_host_op`] on `ins` (at least one, at most
/// [`MAX_INPUTS`]); returns the output as a rank-`D` tensor of `out_dims`, or the
/// CPU op's error.
fn run<const D: usize>(
    kind: OpKind,
    out_dims: [usize; D],
    ins: Vec<DispatchTensor>,
) -> Result<Tensor<D>> {
    let op = HostOp::new(kind, out_dims.to_vec());
    if ins.is_empty() || ins.len() > MAX_INPUTS {
        return Err(Error::InvalidParam {
            what: "inputs",
            msg: format!("1 to {MAX_INPUTS} tensors, got {}", ins.len()),
        });
    }
    let mut slots: Vec<DispatchTensor> = ins;
    while slots.len() < MAX_INPUTS {
        slots.push(slots[0].clone());
    }
    let mut it = slots.into_iter();
    let mut next = || it.next().ok_or(Error::Empty { what: "inputs" });
    let (x0, x1, x2, x3, x4, x5) = (next()?, next()?, next()?, next()?, next()?, next()?);
    let out = Dispatch::ak_host_op(op.clone(), x0, x1, x2, x3, x4, x5);
    match op.take_error() {
        Some(e) => Err(e),
        None => Ok(Tensor::from_dispatch(out)),
    }
}

fn with_beta(mut ins: Vec<DispatchTensor>, beta: Option<DispatchTensor>) -> Vec<DispatchTensor> {
    ins.extend(beta);
    ins
}

/// ACON-C, `y = (p1 − p2)·x·σ(β·(p1 − p2)·x) + p2·x` with `p1`, `p2` of shape `(C)`
/// and β from `beta`. Gradients for `x`, `p1`, `p2` and the β tensor:
/// [`crate::cpu::acon::acon_c_backward`].
pub fn acon_c<const D: usize>(
    x: Tensor<D>,
    p1: Tensor<1>,
    p2: Tensor<1>,
    beta: BetaTensor,
    layout: Layout,
) -> Result<Tensor<D>> {
    let dims = x.dims();
    let shape = act_shape(&dims, layout)?;
    let (axis, b) = beta.split(&shape)?;
    let ins = vec![x.into_dispatch(), p1.into_dispatch(), p2.into_dispatch()];
    run(OpKind::AconC { shape, beta: axis }, dims, with_beta(ins, b))
}

/// ACON-B, `y = (1 − p)·x·σ(β·(1 − p)·x) + p·x`, `p` of shape `(C)`. Gradients:
/// [`crate::cpu::acon::acon_b_backward`].
pub fn acon_b<const D: usize>(
    x: Tensor<D>,
    p: Tensor<1>,
    beta: BetaTensor,
    layout: Layout,
) -> Result<Tensor<D>> {
    let dims = x.dims();
    let shape = act_shape(&dims, layout)?;
    let (axis, b) = beta.split(&shape)?;
    let ins = vec![x.into_dispatch(), p.into_dispatch()];
    run(OpKind::AconB { shape, beta: axis }, dims, with_beta(ins, b))
}

/// ACON-A (Swish with learnable β), `y = x·σ(β·x)`. Gradients:
/// [`crate::cpu::acon::acon_a_backward`].
pub fn acon_a<const D: usize>(x: Tensor<D>, beta: BetaTensor, layout: Layout) -> Result<Tensor<D>> {
    let dims = x.dims();
    let shape = act_shape(&dims, layout)?;
    let (axis, b) = beta.split(&shape)?;
    run(
        OpKind::AconA { shape, beta: axis },
        dims,
        with_beta(vec![x.into_dispatch()], b),
    )
}

/// Layer-wise meta-ACON generator, `β[n] = σ(Σ_c GAP(x)[n, c])`, shape `(N)`; feed it
/// to an ACON op as [`BetaTensor::PerSample`]. Gradient:
/// [`crate::cpu::acon::layer_gen_backward`].
pub fn layer_gen<const D: usize>(x: Tensor<D>, layout: Layout) -> Result<Tensor<1>> {
    let shape = act_shape(&x.dims(), layout)?;
    run(
        OpKind::LayerGen { shape },
        [shape.n],
        vec![x.into_dispatch()],
    )
}

/// Channel-wise meta-ACON generator (SPEC §2, the authors' fc–fc without BN),
/// `β[n, :] = σ(W2·(W1·GAP(x)[n, :] + b1) + b2)`, shape `(N, C)`; feed it to an ACON op
/// as [`BetaTensor::PerSampleChannel`]. `w1` is `(width, C)`, `w2` `(C, width)`,
/// `bias` the optional `(b1 (width), b2 (C))`. Gradients for `x`, `W1`, `W2`, `b1`,
/// `b2`: [`crate::cpu::acon::ChannelGen::backward`].
pub fn channel_gen<const D: usize>(
    x: Tensor<D>,
    w1: Tensor<2>,
    w2: Tensor<2>,
    bias: Option<(Tensor<1>, Tensor<1>)>,
    layout: Layout,
) -> Result<Tensor<2>> {
    let shape = act_shape(&x.dims(), layout)?;
    let [width, c1] = w1.dims();
    let [c2, width2] = w2.dims();
    if c1 != shape.c || c2 != shape.c || width2 != width {
        return Err(Error::Shape {
            what: "channel_gen",
            msg: format!(
                "w1 {:?} and w2 {:?} must be (width, C) and (C, width) with C = {}",
                [width, c1],
                [c2, width2],
                shape.c
            ),
        });
    }
    let mut ins = vec![x.into_dispatch(), w1.into_dispatch(), w2.into_dispatch()];
    let has_bias = bias.is_some();
    if let Some((b1, b2)) = bias {
        ins.push(b1.into_dispatch());
        ins.push(b2.into_dispatch());
    }
    run(
        OpKind::ChannelGen {
            shape,
            width,
            bias: has_bias,
        },
        [shape.n, shape.c],
        ins,
    )
}

/// TAU, `A = F·[F > τ]` (ReLU at τ = 0). Gradient `[F > τ]·dA`:
/// [`crate::cpu::aiec::tau_backward`].
pub fn tau<const D: usize>(f: Tensor<D>, tau: f64) -> Result<Tensor<D>> {
    crate::cpu::aiec::AiecConfig {
        tau,
        ..Default::default()
    }
    .validate()?;
    let dims = f.dims();
    run(OpKind::Tau { tau }, dims, vec![f.into_dispatch()])
}

pub use crate::cpu::iieu::IieuOpts;

/// IIEU-B (SPEC §1) on a conv output `x` `(N, O, H', W')` computed from `x_pre`
/// `(N, C, H, W)` with weight `w` `(O, C/g, KH, KW)`; `ln_weight` (γ̇), `ln_bias` (β̇),
/// `eta` (η) are `(O)`. Formula: [`crate::cpu::iieu::forward`]; gradients for all six
/// tensors (`x`, `x_pre` through `r_x`, `W` through `r_w`, γ̇, β̇, η):
/// [`crate::cpu::iieu::backward`].
pub fn iieu_b(
    x: Tensor<4>,
    x_pre: Tensor<4>,
    w: Tensor<4>,
    ln_weight: Tensor<1>,
    ln_bias: Tensor<1>,
    eta: Tensor<1>,
    opts: IieuOpts,
) -> Result<Tensor<4>> {
    let [n, c_in, h, wd] = x_pre.dims();
    let [c_out, _, kh, kw] = w.dims();
    let cfg = opts.config(n, c_in, h, wd, c_out, kh, kw);
    cfg.validate()?;
    let dims = x.dims();
    run(
        OpKind::Iieu { cfg },
        dims,
        vec![
            x.into_dispatch(),
            x_pre.into_dispatch(),
            w.into_dispatch(),
            ln_weight.into_dispatch(),
            ln_bias.into_dispatch(),
            eta.into_dispatch(),
        ],
    )
}

/// The per-channel map ψ between the convolution and IIEU-B in [`iieu_conv2d`]
/// ([`crate::cpu::iieu_conv::Psi`]); every tensor is `(O)`.
// Built once per call and consumed at once: boxing BatchNorm's tensors would only
// cost the caller an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum ConvPsi {
    /// `x = c`.
    None,
    /// `x = c + bias[o]`.
    Bias(Tensor<1>),
    /// `x = scale[o]·c + shift[o]`.
    Affine {
        /// `a[o]`.
        scale: Tensor<1>,
        /// `b[o]`.
        shift: Tensor<1>,
    },
    /// BatchNorm2d (PyTorch semantics): `x = γ·(c − μ)/sqrt(var + eps) + β` with the
    /// batch statistics (training; the running ones are updated and returned in
    /// [`IieuConvOut::running`]) or the running ones (eval). The running statistics get
    /// no gradient.
    BatchNorm {
        /// `γ`.
        weight: Tensor<1>,
        /// `β`.
        bias: Tensor<1>,
        /// Running mean (used in eval mode).
        running_mean: Tensor<1>,
        /// Running (unbiased) variance (used in eval mode).
        running_var: Tensor<1>,
        /// Running-stat momentum in `[0, 1]`.
        momentum: f64,
        /// `eps > 0` added to the variance.
        eps: f64,
        /// Training (batch statistics) or eval (running statistics).
        training: bool,
    },
}

/// What [`iieu_conv2d`] returns.
#[derive(Debug, Clone)]
pub struct IieuConvOut {
    /// `y`, `(N, O, H', W')`.
    pub y: Tensor<4>,
    /// BatchNorm in training mode: the updated `(running_mean, running_var)`, `(O)`
    /// each, detached, in `x_pre`'s dtype and device (store them in the module);
    /// `None` otherwise.
    pub running: Option<(Tensor<1>, Tensor<1>)>,
}

/// The fused IieuConv2d (SPEC §1, §1.5) — convolution, ψ and IIEU-B as ONE op:
///
/// ```text
/// c = conv(x_pre, W),  x = ψ(c),  y = ς(ρ̂)·x,  ρ̂ = x·r_w[o]·r_x + ν[n,o]
/// ```
///
/// `x_pre` `(N, C, H, W)`, `w` `(O, C/g, KH, KW)`, ψ's tensors and `ln_weight` (γ̇),
/// `ln_bias` (β̇), `eta` (η) `(O)`; conv settings and patch-norm convention in `opts`.
/// Formula: [`crate::cpu::iieu_conv::forward`]; gradients for `x_pre` and `W` (through
/// the conv and through `r_x`, `r_w`), ψ's learnable tensors, γ̇, β̇ and η:
/// [`crate::cpu::iieu_conv::backward`] (the per-channel vectors travel packed in one
/// tensor, a `Tensor::cat` burn differentiates back onto each).
///
/// Errors: a vector not `(O)`, a bad geometry, or any error of the CPU op.
pub fn iieu_conv2d(
    x_pre: Tensor<4>,
    w: Tensor<4>,
    psi: ConvPsi,
    ln_weight: Tensor<1>,
    ln_bias: Tensor<1>,
    eta: Tensor<1>,
    opts: IieuOpts,
) -> Result<IieuConvOut> {
    let [n, c_in, h, wd] = x_pre.dims();
    let [c_out, _, kh, kw] = w.dims();
    let cfg = opts.config(n, c_in, h, wd, c_out, kh, kw);
    let (oh, ow) = cfg.validate()?;
    let (dtype, device) = (x_pre.dtype(), x_pre.device());
    let mut vecs: Vec<(&'static str, Tensor<1>)> = Vec::new();
    let mut running = Vec::new();
    let kind = match psi {
        ConvPsi::None => PsiKind::None,
        ConvPsi::Bias(b) => {
            vecs.push(("psi bias", b));
            PsiKind::Bias
        }
        ConvPsi::Affine { scale, shift } => {
            vecs.extend([("psi scale", scale), ("psi shift", shift)]);
            PsiKind::Affine
        }
        ConvPsi::BatchNorm {
            weight,
            bias,
            running_mean,
            running_var,
            momentum,
            eps,
            training,
        } => {
            vecs.extend([("bn weight", weight), ("bn bias", bias)]);
            running.extend([
                ("running_mean", running_mean.detach()),
                ("running_var", running_var.detach()),
            ]);
            PsiKind::BatchNorm {
                momentum,
                eps,
                training,
            }
        }
    };
    vecs.extend([("ln_weight", ln_weight), ("ln_bias", ln_bias), ("eta", eta)]);
    vecs.extend(running);
    for (what, t) in &vecs {
        if t.dims() != [c_out] {
            return Err(Error::Shape {
                what,
                msg: format!("expected dims [{c_out}], got {:?}", t.dims()),
            });
        }
    }
    let pack = Tensor::cat(vecs.into_iter().map(|(_, t)| t).collect(), 0);
    let slot: RunningSlot = Arc::new(Mutex::new(None));
    let y = run(
        OpKind::IieuConv {
            cfg,
            psi: kind,
            running_out: Arc::clone(&slot),
        },
        [n, c_out, oh, ow],
        vec![
            x_pre.into_dispatch(),
            w.into_dispatch(),
            pack.into_dispatch(),
        ],
    )?;
    let taken = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    let running = taken.map(|(m, v)| {
        let t = |v: Vec<f64>| {
            Tensor::from_data(
                TensorData::new(v, [c_out]),
                TensorCreationOptions::new(device.clone()).with_dtype(dtype),
            )
        };
        (t(m), t(v))
    });
    Ok(IieuConvOut { y, running })
}

/// IIEU-DC parameters as tensors, in [`crate::cpu::iieu_dc::DcParams`] order
/// (hidden width `Hd = C/r`).
#[derive(Debug, Clone)]
pub struct DcTensors {
    /// `(2C)`.
    pub ln1_weight: Tensor<1>,
    /// `(2C)`.
    pub ln1_bias: Tensor<1>,
    /// `(Hd, C)`.
    pub w1: Tensor<2>,
    /// `(2, Hd)`.
    pub gamma2: Tensor<2>,
    /// `(2, Hd)`.
    pub beta2: Tensor<2>,
    /// `(Hd)`.
    pub eta2: Tensor<1>,
    /// `(C, Hd)`.
    pub w2: Tensor<2>,
    /// `(2C)`.
    pub ln2_weight: Tensor<1>,
    /// `(2C)`.
    pub ln2_bias: Tensor<1>,
}

/// IIEU-DC, the Dynamic Coupler (SPEC §1.6): `y = λ₀·x + λ₁·res` with `(λ₀, λ₁)` from
/// the coupler's generator; `x`, `res` `(N, C, H, W)`, reduction ratio `r`. Formula:
/// [`crate::cpu::iieu_dc::forward`]; gradients for `x`, `res` and all nine parameters:
/// [`crate::cpu::iieu_dc::backward`] (the parameters travel packed in one tensor, a
/// `Tensor::cat` burn differentiates back onto each).
pub fn iieu_dc(x: Tensor<4>, res: Tensor<4>, p: &DcTensors, r: usize) -> Result<Tensor<4>> {
    let dims = x.dims();
    let [n, c, h, w] = dims;
    let cfg = DcConfig::new(n, c, h, w, r)?;
    let flat: Vec<Tensor<1>> = vec![
        p.ln1_weight.clone(),
        p.ln1_bias.clone(),
        p.w1.clone().flatten(0, 1),
        p.gamma2.clone().flatten(0, 1),
        p.beta2.clone().flatten(0, 1),
        p.eta2.clone(),
        p.w2.clone().flatten(0, 1),
        p.ln2_weight.clone(),
        p.ln2_bias.clone(),
    ];
    let packed = Tensor::cat(flat, 0);
    run(
        OpKind::Dc { cfg },
        dims,
        vec![
            x.into_dispatch(),
            res.into_dispatch(),
            packed.into_dispatch(),
        ],
    )
}

/// What [`aiec_train`] returns: the layer's output, its loss and host statistics.
#[derive(Debug, Clone)]
pub struct AiecOut<const D: usize> {
    /// `A = TAU(F)`, the layer's output (shape of `F`).
    pub out: Tensor<D>,
    /// `λ_aux·mean(L_aux) + λ_gate·mean(L_gate)`, shape `(1)`, differentiable w.r.t. `F`
    /// and `Wd`: add it to the task loss (averaged over AIEC layers).
    pub loss: Tensor<1>,
    /// The step's losses and DMU accuracy on the host (for logging).
    pub stats: AiecStats,
}

/// One AIEC training step (SPEC §3): TAU, global feature, DMU logits `a·Wdᵀ`,
/// counter update (θ, η, φ) in `counters`, gate masks, losses. `F` is `(N, C, ...)`,
/// `Wd` `(K, C)`, `labels` `N` class indices `< K`. Formula:
/// [`crate::cpu::aiec::train_forward`]; gradients of `A` and `loss` for `F` and `Wd`
/// (the masks and labels held constant): [`crate::cpu::aiec::train_backward`].
pub fn aiec_train<const D: usize>(
    f: Tensor<D>,
    wd: Tensor<2>,
    labels: &[usize],
    cfg: AiecConfig,
    counters: &Arc<Mutex<Counters>>,
    layout: Layout,
) -> Result<AiecOut<D>> {
    let dims = f.dims();
    let shape = act_shape(&dims, layout)?;
    let numel = shape.numel()?;
    let stats = Arc::new(Mutex::new(None));
    let step = super::kernel::AiecStep {
        cfg,
        shape,
        labels: Arc::new(labels.to_vec()),
        counters: counters.clone(),
        stats: stats.clone(),
    };
    let flat: Tensor<1> = run(
        OpKind::Aiec(step),
        [numel + 1],
        vec![f.into_dispatch(), wd.into_dispatch()],
    )?;
    let out = flat.clone().narrow(0, 0, numel).reshape(dims);
    let loss = flat.narrow(0, numel, 1);
    let stats = stats
        .lock()
        .map(|s| s.unwrap_or_default())
        .unwrap_or_default();
    Ok(AiecOut { out, loss, stats })
}

/// [`aiec_train`] with the labels as an integer tensor `(N)` (e.g. from a burn data
/// loader's batch). The labels are read to the host (the CPU step needs them there).
/// Errors: `labels` not `(N)`, a negative label (`InvalidParam`), a label `≥ K`
/// (`LabelOutOfRange`, from the step), and every error of [`aiec_train`].
pub fn aiec_train_labels<const D: usize>(
    f: Tensor<D>,
    wd: Tensor<2>,
    labels: Tensor<1, Int>,
    cfg: AiecConfig,
    counters: &Arc<Mutex<Counters>>,
    layout: Layout,
) -> Result<AiecOut<D>> {
    let n = act_shape(&f.dims(), layout)?.n;
    let [got] = labels.dims();
    if got != n {
        return Err(Error::LengthMismatch {
            what: "labels",
            expected: n,
            got,
        });
    }
    let raw = labels
        .into_data()
        .try_into_vec_as::<i64>()
        .map_err(|e| Error::InvalidParam {
            what: "labels",
            msg: format!("not readable as integers: {e:?}"),
        })?;
    let host = raw
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            usize::try_from(l).map_err(|_| Error::InvalidParam {
                what: "labels",
                msg: format!("label {l} of sample {i} is negative"),
            })
        })
        .collect::<Result<Vec<usize>>>()?;
    aiec_train(f, wd, &host, cfg, counters, layout)
}
