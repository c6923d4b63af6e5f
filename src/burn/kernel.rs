//! The host side of every burn op: which CPU forward/backward of [`crate::cpu`] an op
//! runs, on flat `f32`/`f64` slices. No burn types here; [`super::backend`] moves the
//! tensors to and from these slices.

use std::any::Any;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::cpu::acon::{self, Beta, ChannelGen, ChannelGenSaved};
use crate::cpu::aiec::{self, AiecConfig, AiecSaved, Counters};
use crate::cpu::iieu::{self, IieuConfig, IieuParams, IieuSaved};
use crate::cpu::iieu_conv::{self, IieuConvParams, IieuConvSaved, Psi, PsiKind};
use crate::cpu::iieu_dc::{self, DcConfig, DcParams, DcSaved};
use crate::real::Real;
use crate::{ActShape, Error, Result};

/// Most tensor inputs one op takes (IIEU-B: `x`, `x_pre`, `W`, `γ̇`, `β̇`, `η`). Ops
/// with more parameters take them packed into one tensor (IIEU-DC).
pub const MAX_INPUTS: usize = 6;

/// Where ACON's β comes from (the axis of the β tensor); see [`crate::cpu::acon::Beta`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaAxis {
    /// `(C)`.
    PerChannel,
    /// `(N, C)`.
    PerSampleChannel,
    /// `(N)`.
    PerSample,
    /// `β = σ(x)`, no β tensor.
    PixelWise,
}

/// What an AIEC training step reports besides its output (host values, for logging).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AiecStats {
    /// `mean_n L_aux[n]`.
    pub aux_mean: f64,
    /// `mean_n L_gate[n]`.
    pub gate_mean: f64,
    /// `λ_aux·mean L_aux + λ_gate·mean L_gate` (the loss the step returns).
    pub total: f64,
    /// Fraction of the batch the DMU predicted correctly.
    pub dmu_accuracy: f64,
}

/// The shared state of one AIEC training step: labels, the layer's counters (updated
/// by the forward) and the slot the forward writes its [`AiecStats`] to.
#[derive(Debug, Clone)]
pub(crate) struct AiecStep {
    pub cfg: AiecConfig,
    pub shape: ActShape,
    pub labels: Arc<Vec<usize>>,
    pub counters: Arc<Mutex<Counters>>,
    pub stats: Arc<Mutex<Option<AiecStats>>>,
}

/// BatchNorm's running statistics after a training forward: `(mean, var)`, host f64.
pub(crate) type RunningSlot = Arc<Mutex<Option<(Vec<f64>, Vec<f64>)>>>;

/// Which CPU op runs, with its non-tensor arguments.
#[derive(Debug, Clone)]
pub(crate) enum OpKind {
    /// Inputs `x, p1, p2[, β]`.
    AconC { shape: ActShape, beta: BetaAxis },
    /// Inputs `x, p[, β]`.
    AconB { shape: ActShape, beta: BetaAxis },
    /// Inputs `x[, β]`.
    AconA { shape: ActShape, beta: BetaAxis },
    /// Input `x`; output β `(N)`.
    LayerGen { shape: ActShape },
    /// Inputs `x, W1, W2[, b1, b2]`; output β `(N, C)`.
    ChannelGen {
        shape: ActShape,
        width: usize,
        bias: bool,
    },
    /// Input `F`.
    Tau { tau: f64 },
    /// Inputs `x, x_pre, W, γ̇, β̇, η`.
    Iieu { cfg: IieuConfig },
    /// Inputs `x, res, packed parameters` (the nine of [`DcParams`], flattened, in field order).
    Dc { cfg: DcConfig },
    /// Inputs `x_pre, W, pack` with pack `[ψ vectors; γ̇; β̇; η; running mean; running
    /// var]` (ψ's as [`PsiKind`] says, the running statistics for BatchNorm only);
    /// a training BatchNorm leaves its updated statistics in `running_out`.
    IieuConv {
        cfg: IieuConfig,
        psi: PsiKind,
        running_out: RunningSlot,
    },
    /// Inputs `F, Wd`; output `[A (flat), total loss]`.
    Aiec(AiecStep),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked while holding it; the data
    // (counters, a stats slot) is still consistent between whole updates.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Opaque description of one host-computed op, passed through burn's dispatch to
/// [`super::AkBackend::ak_host_op`]. Built by the functions of [`super::ops`]; holds
/// the op, its output dims and the slot an error of the CPU forward is reported in.
#[derive(Debug, Clone)]
pub struct HostOp {
    pub(crate) kind: OpKind,
    pub(crate) out_dims: Vec<usize>,
    pub(crate) error: Arc<Mutex<Option<Error>>>,
}

impl HostOp {
    pub(crate) fn new(kind: OpKind, out_dims: Vec<usize>) -> Self {
        Self {
            kind,
            out_dims,
            error: Arc::new(Mutex::new(None)),
        }
    }

    /// Records the first error of the forward.
    pub(crate) fn fail(&self, e: Error) {
        let mut slot = lock(&self.error);
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    /// The error the forward recorded, if any.
    pub(crate) fn take_error(&self) -> Option<Error> {
        lock(&self.error).take()
    }

    /// Number of tensor inputs the op reads.
    pub(crate) fn arity(&self) -> usize {
        let b = |axis: BetaAxis| usize::from(axis != BetaAxis::PixelWise);
        match &self.kind {
            OpKind::AconC { beta, .. } => 3 + b(*beta),
            OpKind::AconB { beta, .. } => 2 + b(*beta),
            OpKind::AconA { beta, .. } => 1 + b(*beta),
            OpKind::LayerGen { .. } | OpKind::Tau { .. } => 1,
            OpKind::ChannelGen { bias, .. } => 3 + 2 * usize::from(*bias),
            OpKind::Iieu { .. } => 6,
            OpKind::Dc { .. } | OpKind::IieuConv { .. } => 3,
            OpKind::Aiec(_) => 2,
        }
    }
}

/// What the backward of an op needs from its forward (type-erased `Saved<T>`).
pub(crate) type SavedAny = Arc<dyn Any + Send + Sync>;

/// Forward state per op family.
enum Saved<T> {
    None,
    Beta(Vec<T>),
    Gen(ChannelGenSaved),
    Iieu(Box<IieuSaved<T>>),
    Dc(Box<DcSaved<T>>),
    Aiec(Box<AiecSaved<T>>),
    /// The forward's state and the parameters it ran with.
    Conv(Box<(IieuConvSaved<T>, IieuConvParams<T>)>),
}

fn beta_of<T>(axis: BetaAxis, b: Option<&[T]>) -> Beta<'_, T> {
    match (axis, b) {
        (BetaAxis::PerChannel, Some(b)) => Beta::PerChannel(b),
        (BetaAxis::PerSampleChannel, Some(b)) => Beta::PerSampleChannel(b),
        (BetaAxis::PerSample, Some(b)) => Beta::PerSample(b),
        // Arity is fixed by the axis (HostOp::arity), so a missing β slice only
        // happens for PixelWise.
        _ => Beta::PixelWise,
    }
}

fn gen_of<T: Real>(c: usize, width: usize, bias: bool, ins: &[&[T]]) -> ChannelGen<T> {
    ChannelGen {
        c,
        width,
        w1: ins[1].to_vec(),
        w2: ins[2].to_vec(),
        b1: bias.then(|| ins[3].to_vec()),
        b2: bias.then(|| ins[4].to_vec()),
    }
}

fn iieu_params<T: Real>(ins: &[&[T]]) -> IieuParams<T> {
    IieuParams {
        ln_weight: ins[3].to_vec(),
        ln_bias: ins[4].to_vec(),
        eta: ins[5].to_vec(),
    }
}

/// Lengths of the nine IIEU-DC parameters in [`DcParams`] field order.
pub(crate) fn dc_param_lens(cfg: &DcConfig) -> [usize; 9] {
    let (c, hd) = (cfg.c, cfg.hidden);
    [
        2 * c,
        2 * c,
        hd * c,
        2 * hd,
        2 * hd,
        hd,
        c * hd,
        2 * c,
        2 * c,
    ]
}

fn dc_unpack<T: Real>(cfg: &DcConfig, packed: &[T]) -> Result<DcParams<T>> {
    let lens = dc_param_lens(cfg);
    let total: usize = lens.iter().sum();
    if packed.len() != total {
        return Err(Error::LengthMismatch {
            what: "iieu_dc packed parameters",
            expected: total,
            got: packed.len(),
        });
    }
    let mut parts = Vec::with_capacity(9);
    let mut at = 0;
    for l in lens {
        parts.push(packed[at..at + l].to_vec());
        at += l;
    }
    let mut it = parts.into_iter();
    let mut next = || it.next().unwrap_or_default();
    Ok(DcParams {
        ln1_weight: next(),
        ln1_bias: next(),
        w1: next(),
        gamma2: next(),
        beta2: next(),
        eta2: next(),
        w2: next(),
        ln2_weight: next(),
        ln2_bias: next(),
    })
}

fn dc_pack<T: Real>(g: iieu_dc::DcGrads<T>) -> Vec<T> {
    [
        g.d_ln1_weight,
        g.d_ln1_bias,
        g.d_w1,
        g.d_gamma2,
        g.d_beta2,
        g.d_eta2,
        g.d_w2,
        g.d_ln2_weight,
        g.d_ln2_bias,
    ]
    .concat()
}

/// Runs the CPU forward of `op` on `ins` (one slice per input, `op.arity()` of them).
pub(crate) fn forward<T: Real>(op: &HostOp, ins: &[&[T]]) -> Result<(Vec<T>, SavedAny)> {
    if ins.len() != op.arity() {
        return Err(Error::InvalidParam {
            what: "inputs",
            msg: format!("op takes {} tensors, got {}", op.arity(), ins.len()),
        });
    }
    let (out, saved): (Vec<T>, Saved<T>) = match &op.kind {
        OpKind::AconC { shape, beta } => {
            let b = beta_of(*beta, ins.get(3).copied());
            (
                acon::acon_c_forward(shape, ins[0], ins[1], ins[2], b)?,
                Saved::None,
            )
        }
        OpKind::AconB { shape, beta } => {
            let b = beta_of(*beta, ins.get(2).copied());
            (acon::acon_b_forward(shape, ins[0], ins[1], b)?, Saved::None)
        }
        OpKind::AconA { shape, beta } => {
            let b = beta_of(*beta, ins.get(1).copied());
            (acon::acon_a_forward(shape, ins[0], b)?, Saved::None)
        }
        OpKind::LayerGen { shape } => {
            let beta = acon::layer_gen_forward(shape, ins[0])?;
            (beta.clone(), Saved::Beta(beta))
        }
        OpKind::ChannelGen { shape, width, bias } => {
            let gen = gen_of(shape.c, *width, *bias, ins);
            let (beta, saved) = gen.forward(shape, ins[0])?;
            (beta, Saved::Gen(saved))
        }
        OpKind::Tau { tau } => (aiec::tau_forward(ins[0], T::of(*tau))?, Saved::None),
        OpKind::Iieu { cfg } => {
            let (y, saved) = iieu::forward(cfg, ins[0], ins[1], ins[2], &iieu_params(ins))?;
            (y, Saved::Iieu(Box::new(saved)))
        }
        OpKind::Dc { cfg } => {
            let params = dc_unpack(cfg, ins[2])?;
            let (y, saved) = iieu_dc::forward(cfg, ins[0], ins[1], &params)?;
            (y, Saved::Dc(Box::new(saved)))
        }
        OpKind::IieuConv {
            cfg,
            psi,
            running_out,
        } => {
            let mut params = IieuConvParams::from_pack(*psi, cfg.geometry.c_out, ins[2])?;
            let (y, saved) = iieu_conv::forward(cfg, ins[0], ins[1], &mut params)?;
            if let Psi::BatchNorm(bn) = &params.psi {
                if bn.training {
                    let f = |v: &[T]| v.iter().map(|&x| Real::to_f64(x)).collect::<Vec<f64>>();
                    *lock(running_out) = Some((f(&bn.running_mean), f(&bn.running_var)));
                }
            }
            (y, Saved::Conv(Box::new((saved, params))))
        }
        OpKind::Aiec(step) => {
            let mut counters = lock(&step.counters);
            let out = aiec::train_forward(
                &step.cfg,
                &step.shape,
                ins[0],
                ins[1],
                &step.labels,
                &mut counters,
            )?;
            let ok = out.saved.correct().iter().filter(|&&b| b).count();
            let l = &out.losses;
            let stats = AiecStats {
                aux_mean: l.aux_mean.to_f64(),
                gate_mean: l.gate_mean.to_f64(),
                total: l.total_aux_gate.to_f64(),
                dmu_accuracy: ok as f64 / step.labels.len().max(1) as f64,
            };
            *lock(&step.stats) = Some(stats);
            let mut flat = out.out;
            flat.push(l.total_aux_gate);
            (flat, Saved::Aiec(Box::new(out.saved)))
        }
    };
    Ok((out, Arc::new(saved)))
}

/// Runs the CPU backward of `op`: one gradient per input, each of its input's length.
pub(crate) fn backward<T: Real>(
    op: &HostOp,
    ins: &[&[T]],
    saved: &SavedAny,
    dout: &[T],
) -> Result<Vec<Vec<T>>> {
    let saved = saved
        .downcast_ref::<Saved<T>>()
        .ok_or(Error::InvalidParam {
            what: "saved",
            msg: "forward state of another dtype".into(),
        })?;
    let mismatch = || Error::InvalidParam {
        what: "saved",
        msg: "forward state of another op".into(),
    };
    Ok(match &op.kind {
        OpKind::AconC { shape, beta } => {
            let b = beta_of(*beta, ins.get(3).copied());
            let g = acon::acon_c_backward(shape, dout, ins[0], ins[1], ins[2], b)?;
            let mut v = vec![g.dx, g.dp1, g.dp2];
            if *beta != BetaAxis::PixelWise {
                v.push(g.dbeta);
            }
            v
        }
        OpKind::AconB { shape, beta } => {
            let b = beta_of(*beta, ins.get(2).copied());
            let g = acon::acon_b_backward(shape, dout, ins[0], ins[1], b)?;
            let mut v = vec![g.dx, g.dp];
            if *beta != BetaAxis::PixelWise {
                v.push(g.dbeta);
            }
            v
        }
        OpKind::AconA { shape, beta } => {
            let b = beta_of(*beta, ins.get(1).copied());
            let g = acon::acon_a_backward(shape, dout, ins[0], b)?;
            let mut v = vec![g.dx];
            if *beta != BetaAxis::PixelWise {
                v.push(g.dbeta);
            }
            v
        }
        OpKind::LayerGen { shape } => {
            let Saved::Beta(beta) = saved else {
                return Err(mismatch());
            };
            vec![acon::layer_gen_backward(shape, dout, beta)?]
        }
        OpKind::ChannelGen { shape, width, bias } => {
            let Saved::Gen(s) = saved else {
                return Err(mismatch());
            };
            let gen = gen_of(shape.c, *width, *bias, ins);
            let g = gen.backward(shape, dout, s)?;
            let mut v = vec![g.dx, g.dw1, g.dw2];
            if let (Some(b1), Some(b2)) = (g.db1, g.db2) {
                v.push(b1);
                v.push(b2);
            }
            v
        }
        OpKind::Tau { tau } => vec![aiec::tau_backward(dout, ins[0], T::of(*tau))?],
        OpKind::Iieu { cfg } => {
            let Saved::Iieu(s) = saved else {
                return Err(mismatch());
            };
            let g = iieu::backward(cfg, dout, ins[0], ins[1], ins[2], &iieu_params(ins), s)?;
            vec![g.dx, g.dx_pre, g.dw, g.d_ln_weight, g.d_ln_bias, g.d_eta]
        }
        OpKind::Dc { cfg } => {
            let Saved::Dc(s) = saved else {
                return Err(mismatch());
            };
            let params = dc_unpack(cfg, ins[2])?;
            let g = iieu_dc::backward(cfg, dout, ins[0], ins[1], &params, s)?;
            let (dx, dres) = (g.dx.clone(), g.dres.clone());
            vec![dx, dres, dc_pack(g)]
        }
        OpKind::IieuConv { cfg, .. } => {
            let Saved::Conv(b) = saved else {
                return Err(mismatch());
            };
            let (s, params) = &**b;
            let mut g = iieu_conv::backward(cfg, dout, ins[0], ins[1], params, s)?;
            // The running statistics are state, not parameters: zero gradient.
            let dp = g.take_pack(ins[2].len());
            vec![g.dx_pre, g.dw, dp]
        }
        OpKind::Aiec(step) => {
            let Saved::Aiec(s) = saved else {
                return Err(mismatch());
            };
            let n = ins[0].len();
            let (d_a, d_total) = (&dout[..n], dout[n]);
            let g = aiec::train_backward(&step.cfg, &step.shape, d_a, d_total, ins[0], ins[1], s)?;
            vec![g.df, g.dwd]
        }
    })
}
