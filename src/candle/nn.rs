//! candle-nn style modules: each is built from a `candle_nn::VarBuilder` and replaces
//! a ReLU in one line.
//!
//! ```
//! # fn main() -> candle_core::Result<()> {
//! use activation_kernels::candle::nn::{
//!     Aiec, AconA, AconB, AconC, IieuB, IieuDc, MetaAconC, MetaAconCLayer, MetaAconCPixel,
//! };
//! use activation_kernels::cpu::aiec::AiecConfig;
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let x = Tensor::randn(0f32, 1.0, (2, 32, 5, 7), &Device::Cpu)?; // (N, C, H, W)
//!
//! let act = AconC::new(vb.pp("act1"), 32)?; // y = d·σ(β·d) + p2·x, d = (p1 − p2)·x
//! assert_eq!(act.forward(&x)?.dims(), x.dims());
//! for y in [
//!     MetaAconC::new(vb.pp("act2"), 32, 16, true)?.forward(&x)?, // β from fc–fc–σ(GAP(x))
//!     AconA::new(vb.pp("act3"), 32)?.forward(&x)?,               // Swish, learnable β
//!     AconB::new(vb.pp("act4"), 32)?.forward(&x)?,
//!     MetaAconCLayer::new(vb.pp("act5"), 32)?.forward(&x)?, // β = σ(Σ_c GAP(x))
//!     MetaAconCPixel::new(vb.pp("act6"), 32)?.forward(&x)?, // β = σ(x)
//! ] {
//!     assert_eq!(y.dims(), x.dims());
//! }
//!
//! // IIEU-B owns its convolution: forward takes the conv's input.
//! let cfg = Conv2dConfig { padding: 1, ..Default::default() };
//! let conv = candle_nn::conv2d_no_bias(16, 32, 3, cfg, vb.pp("conv1"))?;
//! let block = IieuB::new(conv, vb.pp("iieu1"))?;
//! let x_pre = Tensor::randn(0f32, 1.0, (2, 16, 5, 7), &Device::Cpu)?;
//! assert_eq!(block.forward(&x_pre)?.dims(), &[2, 32, 5, 7]);
//!
//! // IIEU-DC mixes a main branch and a shortcut.
//! let dc = IieuDc::new(vb.pp("dc"), 32, 16)?;
//! assert_eq!(dc.forward(&x, &x.relu()?)?.dims(), x.dims());
//!
//! // AIEC: TAU in the forward, plus a loss to add to the task loss while training.
//! let aiec = Aiec::new(vb.pp("aiec"), 32, 10, AiecConfig::default())?;
//! let (a, loss) = aiec.forward_train(&x, &[3, 7])?;
//! assert_eq!(a.dims(), x.dims());
//! assert!(loss.total.to_scalar::<f32>()?.is_finite());
//! # Ok(())
//! # }
//! ```
//!
//! Initialisations follow SPEC.md and the CPU modules' init functions. Where those use
//! a uniform `±1/sqrt(fan_in)` draw (IIEU-DC's `W1`, `W2`, the meta-ACON generator)
//! the modules use `candle_nn::Init::Uniform` with the same bounds — the same
//! distribution, drawn by candle's RNG instead of the CPU module's splitmix64 stream.
//! A `VarBuilder` backed by stored tensors (safetensors, a `VarMap` that already holds
//! them) ignores the inits and loads the stored values.

use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2d, Init, VarBuilder};

use super::ops::{self, ChannelGenTensors, DcTensors, IieuOpts};
use super::{act_shape, cerr, host, op_err, El};
use crate::cpu::acon::ChannelGen;
use crate::cpu::aiec::{self, AiecConfig, Counters};
use crate::cpu::iieu::PatchNorm;
use crate::cpu::iieu_dc::DcConfig;
use crate::layout::Layout;
use crate::real::Real;

fn uniform(fan_in: usize) -> Init {
    let b = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform { lo: -b, up: b }
}

fn nonzero(what: &str, v: usize) -> Result<()> {
    if v == 0 {
        Err(candle_core::Error::Msg(format!("{what} must be >= 1")))
    } else {
        Ok(())
    }
}

/// How ACON's `p1`, `p2` start (SPEC §2; β always starts at 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AconInit {
    /// The paper: `p1 = 1`, `p2 = 0` (ACON-C starts as Swish).
    #[default]
    Paper,
    /// The authors' code: `p1, p2 ~ N(0, 1)`.
    Reference,
}

impl AconInit {
    fn p1_p2(self) -> (Init, Init) {
        match self {
            AconInit::Paper => (Init::Const(1.0), Init::Const(0.0)),
            AconInit::Reference => {
                let r = Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                };
                (r, r)
            }
        }
    }
}

// ---------------------------------------------------------------------------

/// ACON-C with per-channel `p1`, `p2`, `β` (variables `p1`, `p2`, `beta`, dims `(C,)`):
/// `y = d·σ(β·d) + p2·x`, `d = (p1 − p2)·x` ([`ops::acon_c`]).
#[derive(Debug, Clone)]
pub struct AconC {
    p1: Tensor,
    p2: Tensor,
    beta: Tensor,
    layout: Layout,
}

impl AconC {
    /// `c` channels, paper init (`p1 = β = 1`, `p2 = 0`), NCHW-like input `(N, C, ...)`.
    pub fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        Self::new_with(vb, c, AconInit::Paper)
    }

    /// `c` channels with the chosen init of `p1`, `p2` (β = 1).
    pub fn new_with(vb: VarBuilder, c: usize, init: AconInit) -> Result<Self> {
        nonzero("channels C", c)?;
        let (i1, i2) = init.p1_p2();
        Ok(Self {
            p1: vb.get_with_hints(c, "p1", i1)?,
            p2: vb.get_with_hints(c, "p2", i2)?,
            beta: vb.get_with_hints(c, "beta", Init::Const(1.0))?,
            layout: Layout::Nchw,
        })
    }

    /// Builder: channel axis ([`Layout::Nlc`] for `(N, L, C)` tokens).
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// `(p1, p2, β)`.
    pub fn params(&self) -> (&Tensor, &Tensor, &Tensor) {
        (&self.p1, &self.p2, &self.beta)
    }
}

impl Module for AconC {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::acon_c(x, &self.p1, &self.p2, &self.beta, self.layout)
    }
}

// ---------------------------------------------------------------------------

/// meta-ACON-C with the channel-wise generator (SPEC §2):
/// `β = σ(W2·(W1·GAP(x) + b1) + b2)` per (sample, channel), then ACON-C
/// ([`ops::meta_acon_c`]). Variables: `p1`, `p2` `(C,)`; `fc1.weight` `(width, C)`,
/// `fc1.bias` `(width,)`, `fc2.weight` `(C, width)`, `fc2.bias` `(C,)` with
/// `width = max(r, C/r)` (the authors' code, [`ChannelGen::width_for`]); weights and
/// biases uniform `±1/sqrt(fan_in)` as [`ChannelGen::init`].
#[derive(Debug, Clone)]
pub struct MetaAconC {
    p1: Tensor,
    p2: Tensor,
    gen: ChannelGenTensors,
    layout: Layout,
}

impl MetaAconC {
    /// `c` channels, reduction `r` (authors: 16), generator biases if `bias`; paper
    /// init of `p1`, `p2`.
    pub fn new(vb: VarBuilder, c: usize, r: usize, bias: bool) -> Result<Self> {
        Self::new_with(vb, c, r, bias, AconInit::Paper)
    }

    /// As [`MetaAconC::new`] with the chosen init of `p1`, `p2`.
    pub fn new_with(
        vb: VarBuilder,
        c: usize,
        r: usize,
        bias: bool,
        init: AconInit,
    ) -> Result<Self> {
        let width = ChannelGen::<f32>::width_for(c, r).map_err(cerr)?;
        let (i1, i2) = init.p1_p2();
        let gen = ChannelGenTensors {
            w1: vb.get_with_hints((width, c), "fc1.weight", uniform(c))?,
            b1: if bias {
                Some(vb.get_with_hints(width, "fc1.bias", uniform(c))?)
            } else {
                None
            },
            w2: vb.get_with_hints((c, width), "fc2.weight", uniform(width))?,
            b2: if bias {
                Some(vb.get_with_hints(c, "fc2.bias", uniform(width))?)
            } else {
                None
            },
        };
        Ok(Self {
            p1: vb.get_with_hints(c, "p1", i1)?,
            p2: vb.get_with_hints(c, "p2", i2)?,
            gen,
            layout: Layout::Nchw,
        })
    }

    /// Builder: channel axis.
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// `(p1, p2)`.
    pub fn params(&self) -> (&Tensor, &Tensor) {
        (&self.p1, &self.p2)
    }

    /// The generator's tensors.
    pub fn generator(&self) -> &ChannelGenTensors {
        &self.gen
    }
}

impl Module for MetaAconC {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::meta_acon_c(x, &self.p1, &self.p2, &self.gen, self.layout)
    }
}

// ---------------------------------------------------------------------------

/// A `candle_nn::Conv2d` followed by IIEU-B (SPEC §1): `forward(x_pre)` computes
/// `x = conv(x_pre)` and returns `ς(ρ̂)·x` ([`ops::iieu_b`]), with term-S using the
/// conv's own weight, stride, padding, dilation and groups. Variables (under the
/// module's `VarBuilder`): `ln_weight` (γ̇, init 0.01), `ln_bias` (β̇, init 0), `eta`
/// (η, init 0.05), each `(O,)`. The conv weight gets gradients through both the conv
/// and `r_w`.
#[derive(Debug, Clone)]
pub struct IieuB {
    conv: Conv2d,
    ln_weight: Tensor,
    ln_bias: Tensor,
    eta: Tensor,
    opts: IieuOpts,
}

impl IieuB {
    /// IIEU-B after `conv` (its bias, if any, is ψ).
    pub fn new(conv: Conv2d, vb: VarBuilder) -> Result<Self> {
        let o = conv.weight().dim(0)?;
        let opts = IieuOpts::from_conv2d_config(conv.config());
        Ok(Self {
            ln_weight: vb.get_with_hints(o, "ln_weight", Init::Const(0.01))?,
            ln_bias: vb.get_with_hints(o, "ln_bias", Init::Const(0.0))?,
            eta: vb.get_with_hints(o, "eta", Init::Const(0.05))?,
            conv,
            opts,
        })
    }

    /// Builder: patch-norm convention (default [`PatchNorm::PerGroup`]).
    pub fn with_patch_norm(mut self, patch_norm: PatchNorm) -> Self {
        self.opts.patch_norm = patch_norm;
        self
    }

    /// The wrapped convolution.
    pub fn conv(&self) -> &Conv2d {
        &self.conv
    }

    /// `(γ̇, β̇, η)`.
    pub fn params(&self) -> (&Tensor, &Tensor, &Tensor) {
        (&self.ln_weight, &self.ln_bias, &self.eta)
    }

    /// IIEU-B on a conv output `x` you computed yourself (after ψ) from `x_pre`.
    pub fn activate(&self, x: &Tensor, x_pre: &Tensor) -> Result<Tensor> {
        ops::iieu_b(
            x,
            x_pre,
            self.conv.weight(),
            &self.ln_weight,
            &self.ln_bias,
            &self.eta,
            self.opts,
        )
    }

    /// `conv`, then `psi` (e.g. a BatchNorm), then IIEU-B: `x̃ = ψ(conv(x_pre))`.
    pub fn forward_with(
        &self,
        x_pre: &Tensor,
        psi: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let x = psi(&self.conv.forward(x_pre)?)?;
        self.activate(&x, x_pre)
    }
}

impl Module for IieuB {
    fn forward(&self, x_pre: &Tensor) -> Result<Tensor> {
        self.activate(&self.conv.forward(x_pre)?, x_pre)
    }
}

// ---------------------------------------------------------------------------

/// IIEU-DC, the Dynamic Coupler (SPEC §1.6): `forward(x, res) = λ₀·x + λ₁·res`, in
/// place of a residual sum ([`ops::iieu_dc`]). Variables (hidden width `Hd = C/r`):
/// `ln1.weight` (1), `ln1.bias` (0) `(2C,)`; `w1` `(Hd, C)` uniform `±1/sqrt(C)`;
/// `gamma2` (0.01), `beta2` (0) `(2, Hd)`; `eta2` (0.01) `(Hd,)`; `w2` `(C, Hd)` uniform
/// `±1/sqrt(Hd)`; `ln2.weight` (0.01), `ln2.bias` (0) `(2C,)`.
#[derive(Debug, Clone)]
pub struct IieuDc {
    p: DcTensors,
}

impl IieuDc {
    /// `c` channels, reduction `r` (authors: 16; `C ≥ r`).
    pub fn new(vb: VarBuilder, c: usize, r: usize) -> Result<Self> {
        let hd = DcConfig::new(1, c, 1, 1, r).map_err(cerr)?.hidden;
        let c2 = 2 * c;
        let p = DcTensors {
            ln1_weight: vb.get_with_hints(c2, "ln1.weight", Init::Const(1.0))?,
            ln1_bias: vb.get_with_hints(c2, "ln1.bias", Init::Const(0.0))?,
            w1: vb.get_with_hints((hd, c), "w1", uniform(c))?,
            gamma2: vb.get_with_hints((2, hd), "gamma2", Init::Const(0.01))?,
            beta2: vb.get_with_hints((2, hd), "beta2", Init::Const(0.0))?,
            eta2: vb.get_with_hints(hd, "eta2", Init::Const(0.01))?,
            w2: vb.get_with_hints((c, hd), "w2", uniform(hd))?,
            ln2_weight: vb.get_with_hints(c2, "ln2.weight", Init::Const(0.01))?,
            ln2_bias: vb.get_with_hints(c2, "ln2.bias", Init::Const(0.0))?,
        };
        Ok(Self { p })
    }

    /// The nine parameter tensors.
    pub fn params(&self) -> &DcTensors {
        &self.p
    }

    /// `λ₀·x + λ₁·res` (`x`: main branch, `res`: shortcut, same dims `(N, C, ...)`).
    pub fn forward(&self, x: &Tensor, res: &Tensor) -> Result<Tensor> {
        ops::iieu_dc(x, res, &self.p)
    }
}

// ---------------------------------------------------------------------------

/// The auxiliary losses of one AIEC training step.
#[derive(Debug, Clone)]
pub struct AiecLoss {
    /// `λ_aux·mean(L_aux) + λ_gate·mean(L_gate)`, a scalar tensor differentiable
    /// w.r.t. `F` and `Wd`: add it to the task loss (averaged over AIEC layers).
    pub total: Tensor,
    /// For logging, on the device of `F` (no host copy during the step):
    /// `[mean_n L_aux[n], mean_n L_gate[n], λ_aux·mean L_aux + λ_gate·mean L_gate,
    /// DMU accuracy]`, dims `(4,)` — f32 on a CUDA device, f64 on the CPU. The DMU
    /// accuracy is the fraction of the batch the DMU predicted correctly (the samples
    /// that were counted). Read it with [`AiecLoss::aux_mean`] & co. (each a
    /// device-to-host copy on a GPU: read it when you log, not every step).
    pub stats: Tensor,
    /// The consensus masks `G` of this step (`U8`, dims of `Wd`, on its device), held
    /// constant by [`AiecLoss::total`] (with the labels: [`ops::AiecLossOp`]).
    pub masks: Tensor,
}

impl AiecLoss {
    fn stat(&self, i: usize) -> Result<f64> {
        let v = self
            .stats
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        v.get(i).copied().ok_or_else(|| {
            candle_core::Error::Msg("aiec: loss stats hold fewer than 4 values".into())
        })
    }

    /// `mean_n L_aux[n]` (copies [`AiecLoss::stats`] to the host).
    pub fn aux_mean(&self) -> Result<f64> {
        self.stat(0)
    }

    /// `mean_n L_gate[n]` (copies [`AiecLoss::stats`] to the host).
    pub fn gate_mean(&self) -> Result<f64> {
        self.stat(1)
    }

    /// Fraction of the batch the DMU predicted correctly (copies
    /// [`AiecLoss::stats`] to the host).
    pub fn dmu_accuracy(&self) -> Result<f64> {
        self.stat(3)
    }
}

/// Where an [`Aiec`] module keeps its ACU counters: on the host for a CPU module, on
/// the device for a CUDA module (feature `candle-cuda`).
#[derive(Debug)]
enum CounterStore {
    Host(Counters),
    #[cfg(feature = "candle-cuda")]
    Device(
        Box<crate::cuda::aiec::DeviceCounters>,
        std::sync::Arc<crate::cuda::CudaStream>,
    ),
}

/// AIEC (SPEC §3) in place of a ReLU: `A = TAU(F)` plus, in training, the DMU, the ACU
/// counters and the consensus gate.
///
/// How one training step ([`Aiec::forward_train`]) maps to SPEC §3:
/// 1. under the counters' lock, the SPEC order runs — on the CPU
///    ([`aiec::train_forward`]) for a CPU module, on the device
///    ([`crate::cuda::aiec::train_forward`]'s kernels, counters on the device, nothing
///    copied to or from the host) for a CUDA module: TAU → global feature `a` →
///    logits `z = a·Wdᵀ` → correctness → counter update (θ, η, φ, only correctly
///    predicted samples) → `v = (θ − η)/φ` → `G = [v ≤ 0] ∧ [Wd ≤ 0]`;
/// 2. the output `A = TAU(F)` is the candle op [`ops::tau`] (gradient `[F > τ]`);
/// 3. the loss is the candle op [`ops::aiec_loss_tensors`] on `(F, Wd)` with the
///    labels and the masks `G` of step 1 held constant (masks carry no gradient): its
///    value is `λ_aux·mean(L_aux) + λ_gate·mean(L_gate)` and its gradient flows into
///    `F` through the global feature and TAU, and into `Wd` through the DMU.
///
/// With several AIEC layers, SPEC's total is `L_task + mean over layers of each
/// layer's total`; add `sum(totals)/layers` to the task loss. Inference
/// ([`Module::forward`], or [`Aiec::forward_t`] with `train = false`) is TAU only.
/// Counters live in the module (a `Mutex`, so `&self` forwards can update them; on the
/// device of `Wd`) and are cleared by [`Aiec::reset_counters`] at the start of every
/// epoch.
///
/// Labels: [`Aiec::forward_train_labels`] takes them as a tensor on `F`'s device
/// (`U32` on a CUDA device; a label `≥ K` there is flagged by the kernels — NaN
/// losses, never counted, no gradient — since the host never reads it);
/// [`Aiec::forward_train`] takes a host slice and copies it to the device.
///
/// Variables: `wd` `(K, C)`, uniform `±1/sqrt(C)` (PyTorch `nn.Linear`'s default; the
/// SPEC does not fix an init for the decision weights).
#[derive(Debug)]
pub struct Aiec {
    wd: Tensor,
    cfg: AiecConfig,
    layout: Layout,
    counters: Mutex<CounterStore>,
    labels: Mutex<Option<Tensor>>,
    last: Mutex<Option<AiecLoss>>,
}

fn lock<'a, T>(m: &'a Mutex<T>) -> Result<MutexGuard<'a, T>> {
    m.lock()
        .map_err(|_| candle_core::Error::Msg("aiec: a lock was poisoned".into()))
}

/// Host labels as a `U32` tensor on `dev`.
fn labels_tensor(labels: &[usize], dev: &candle_core::Device) -> Result<Tensor> {
    let v = labels
        .iter()
        .map(|&y| u32::try_from(y).map_err(|_| op_err("aiec", format!("label {y} exceeds u32"))))
        .collect::<Result<Vec<u32>>>()?;
    let n = v.len();
    Tensor::from_vec(v, n, dev)
}

impl Aiec {
    /// `c` channels, `k` classes; `cfg` holds τ, λ_aux, λ_gate and the pooling. The
    /// counters live on the device of `vb` (zeroed).
    pub fn new(vb: VarBuilder, c: usize, k: usize, cfg: AiecConfig) -> Result<Self> {
        cfg.validate().map_err(cerr)?;
        let counters = Counters::new(k, c).map_err(cerr)?;
        #[cfg(feature = "candle-cuda")]
        let counters = match vb.device() {
            candle_core::Device::Cuda(dev) => {
                let st = dev.cuda_stream();
                let d = crate::cuda::aiec::DeviceCounters::new(&st, k, c).map_err(cerr)?;
                CounterStore::Device(Box::new(d), st)
            }
            _ => CounterStore::Host(counters),
        };
        #[cfg(not(feature = "candle-cuda"))]
        let counters = CounterStore::Host(counters);
        Ok(Self {
            wd: vb.get_with_hints((k, c), "wd", uniform(c))?,
            cfg,
            layout: Layout::Nchw,
            counters: Mutex::new(counters),
            labels: Mutex::new(None),
            last: Mutex::new(None),
        })
    }

    /// Builder: channel axis ([`Layout::Nlc`] for `(N, L, C)` tokens, e.g. with
    /// [`aiec::Pool::ClassToken`]).
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// The decision weights `Wd` `(K, C)`.
    pub fn wd(&self) -> &Tensor {
        &self.wd
    }

    /// τ, λ_aux, λ_gate, pooling.
    pub fn config(&self) -> &AiecConfig {
        &self.cfg
    }

    /// A copy of the ACU counters (θ, η, φ) on the host (for a CUDA module: a
    /// device-to-host copy that waits for the device).
    pub fn counters(&self) -> Result<Counters> {
        match &*lock(&self.counters)? {
            CounterStore::Host(c) => Ok(c.clone()),
            #[cfg(feature = "candle-cuda")]
            CounterStore::Device(d, st) => d.to_host(st).map_err(cerr),
        }
    }

    /// Clears the counters (call at the start of every epoch; a device memset for a
    /// CUDA module).
    pub fn reset_counters(&self) -> Result<()> {
        match &mut *lock(&self.counters)? {
            CounterStore::Host(c) => c.reset(),
            #[cfg(feature = "candle-cuda")]
            CounterStore::Device(d, st) => d.reset(st).map_err(cerr)?,
        }
        Ok(())
    }

    /// One training step with labels on the host: copies them to `F`'s device, then
    /// [`Aiec::forward_train_labels`].
    pub fn forward_train(&self, f: &Tensor, labels: &[usize]) -> Result<(Tensor, AiecLoss)> {
        let labels = labels_tensor(labels, f.device())?;
        self.forward_train_labels(f, &labels)
    }

    /// One training step: returns `A = TAU(F)` and this layer's losses (see the type's
    /// docs for the order and the gradients). Updates the counters. `labels`: `(N,)`
    /// class indices on `F`'s device (`U32`; on the CPU any integer dtype). For a CUDA
    /// module nothing is copied between host and device.
    pub fn forward_train_labels(&self, f: &Tensor, labels: &Tensor) -> Result<(Tensor, AiecLoss)> {
        let (masks, stats) = {
            let mut store = lock(&self.counters)?;
            match &mut *store {
                CounterStore::Host(cnt) => {
                    let host: Vec<usize> = labels
                        .to_dtype(DType::U32)?
                        .flatten_all()?
                        .to_vec1::<u32>()?
                        .into_iter()
                        .map(|y| y as usize)
                        .collect();
                    let (masks, aux, gate, acc) = match f.dtype() {
                        DType::F32 => self.count::<f32>(f, &host, cnt)?,
                        DType::F64 => self.count::<f64>(f, &host, cnt)?,
                        dt => return Err(candle_core::Error::UnsupportedDTypeForOp(dt, "aiec")),
                    };
                    let m: Vec<u8> = masks.iter().map(|&b| u8::from(b)).collect();
                    let masks = Tensor::from_vec(m, self.wd.dims(), f.device())?;
                    let total = self.cfg.lambda_aux * aux + self.cfg.lambda_gate * gate;
                    let stats = Tensor::new(&[aux, gate, total, acc], f.device())?;
                    (masks, stats)
                }
                #[cfg(feature = "candle-cuda")]
                CounterStore::Device(d, _) => {
                    super::cuda::aiec_module_step(&self.cfg, self.layout, f, &self.wd, labels, d)?
                }
            }
        };
        let a = ops::tau(f, self.cfg.tau)?;
        let total = ops::aiec_loss_tensors(f, &self.wd, labels, &masks, self.cfg, self.layout)?;
        Ok((
            a,
            AiecLoss {
                total,
                stats,
                masks,
            },
        ))
    }

    /// Step 1 of the SPEC order on the CPU: counters updated, masks returned.
    fn count<T: El>(
        &self,
        f: &Tensor,
        labels: &[usize],
        cnt: &mut Counters,
    ) -> Result<(Vec<bool>, f64, f64, f64)> {
        let shape = act_shape("aiec", f.dims(), self.layout)?;
        let (fv, wdv) = (host::<T>(f)?, host::<T>(&self.wd)?);
        let out = aiec::train_forward(&self.cfg, &shape, &fv, &wdv, labels, cnt).map_err(cerr)?;
        let ok = out.saved.correct().iter().filter(|&&b| b).count();
        Ok((
            out.saved.masks().to_vec(),
            Real::to_f64(out.losses.aux_mean),
            Real::to_f64(out.losses.gate_mean),
            ok as f64 / labels.len().max(1) as f64,
        ))
    }

    /// Sets the labels the next `forward_t(x, true)` uses (for models whose forward
    /// takes only the input), copied to the device of `Wd`.
    pub fn set_labels(&self, labels: &[usize]) -> Result<()> {
        let t = labels_tensor(labels, self.wd.device())?;
        *lock(&self.labels)? = Some(t);
        Ok(())
    }

    /// [`Aiec::set_labels`] with a label tensor already on the device (no copy).
    pub fn set_labels_tensor(&self, labels: &Tensor) -> Result<()> {
        *lock(&self.labels)? = Some(labels.clone());
        Ok(())
    }

    /// Training (`train = true`: needs [`Aiec::set_labels`] first; stores the losses
    /// for [`Aiec::take_loss`]) or inference (TAU only).
    pub fn forward_t(&self, f: &Tensor, train: bool) -> Result<Tensor> {
        if !train {
            return self.forward(f);
        }
        let labels = lock(&self.labels)?
            .clone()
            .ok_or_else(|| op_err("aiec", "forward_t(train = true) needs set_labels first"))?;
        let (a, loss) = self.forward_train_labels(f, &labels)?;
        *lock(&self.last)? = Some(loss);
        Ok(a)
    }

    /// The losses stored by the last training `forward_t`, taken out.
    pub fn take_loss(&self) -> Result<Option<AiecLoss>> {
        Ok(lock(&self.last)?.take())
    }
}

impl Module for Aiec {
    /// Inference: `A = TAU(F)`.
    fn forward(&self, f: &Tensor) -> Result<Tensor> {
        ops::tau(f, self.cfg.tau)
    }
}

// ---------------------------------------------------------------------------
// ACON-A, ACON-B, layer-/pixel-wise meta-ACON-C

/// ACON-A, Swish with a learnable per-channel β (SPEC §2): `y = x·σ(β·x)`
/// ([`ops::acon_a`]). Variable `beta` `(C,)`, init 1 (SPEC: β always starts at 1, so
/// the module starts as Swish / SiLU). Gradients (`s = σ(β·x)`):
/// `∂L/∂x = dy·(s + β·x·s(1 − s))`, `∂L/∂β[c] = Σ dy·x²·s(1 − s)` over N and positions.
#[derive(Debug, Clone)]
pub struct AconA {
    beta: Tensor,
    layout: Layout,
}

impl AconA {
    /// `c` channels, β = 1, NCHW-like input `(N, C, ...)`.
    pub fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        nonzero("channels C", c)?;
        Ok(Self {
            beta: vb.get_with_hints(c, "beta", Init::Const(1.0))?,
            layout: Layout::Nchw,
        })
    }

    /// Builder: channel axis ([`Layout::Nlc`] for `(N, L, C)` tokens).
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// β.
    pub fn beta(&self) -> &Tensor {
        &self.beta
    }
}

impl Module for AconA {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::acon_a(x, &self.beta, self.layout)
    }
}

/// ACON-B with per-channel `p`, `β` (SPEC §2): `y = (1 − p)·x·σ(β(1 − p)·x) + p·x`
/// ([`ops::acon_b`]), i.e. ACON-C with `p1 = 1`, `p2 = p`. Variables `p`, `beta`
/// `(C,)`. Init: β = 1 and `p` as ACON-C's `p2` (SPEC gives no separate ACON-B init;
/// the authors' code has no ACON-B): [`AconInit::Paper`] `p = 0` (starts as Swish),
/// [`AconInit::Reference`] `p ~ N(0, 1)`. Gradients (`d = (1 − p)·x`, `s = σ(β·d)`,
/// `∂y/∂d = s + β·d·s(1 − s)`): `∂L/∂x = dy·((1 − p)·∂y/∂d + p)`,
/// `∂L/∂p[c] = Σ dy·(x − x·∂y/∂d)`, `∂L/∂β[c] = Σ dy·d²·s(1 − s)`.
#[derive(Debug, Clone)]
pub struct AconB {
    p: Tensor,
    beta: Tensor,
    layout: Layout,
}

impl AconB {
    /// `c` channels, paper init (`p = 0`, `β = 1`), NCHW-like input `(N, C, ...)`.
    pub fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        Self::new_with(vb, c, AconInit::Paper)
    }

    /// `c` channels with the chosen init of `p` (that of ACON-C's `p2`; β = 1).
    pub fn new_with(vb: VarBuilder, c: usize, init: AconInit) -> Result<Self> {
        nonzero("channels C", c)?;
        let (_, ip) = init.p1_p2();
        Ok(Self {
            p: vb.get_with_hints(c, "p", ip)?,
            beta: vb.get_with_hints(c, "beta", Init::Const(1.0))?,
            layout: Layout::Nchw,
        })
    }

    /// Builder: channel axis.
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// `(p, β)`.
    pub fn params(&self) -> (&Tensor, &Tensor) {
        (&self.p, &self.beta)
    }
}

impl Module for AconB {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::acon_b(x, &self.p, &self.beta, self.layout)
    }
}

/// `p1`, `p2` of a meta-ACON-C with a parameter-free generator.
fn meta_p(vb: &VarBuilder, c: usize, init: AconInit) -> Result<(Tensor, Tensor)> {
    nonzero("channels C", c)?;
    let (i1, i2) = init.p1_p2();
    Ok((
        vb.get_with_hints(c, "p1", i1)?,
        vb.get_with_hints(c, "p2", i2)?,
    ))
}

/// meta-ACON-C modules whose β generator has no learnable tensors (layer-wise,
/// pixel-wise): the same variables `p1`, `p2`, constructors and builder; `$op` is the
/// op the module applies.
macro_rules! param_free_meta_acon {
    ($(#[$m:meta])* $name:ident, $op:path) => {
        $(#[$m])*
        #[derive(Debug, Clone)]
        pub struct $name {
            p1: Tensor,
            p2: Tensor,
            layout: Layout,
        }

        impl $name {
            /// `c` channels, paper init (`p1 = 1`, `p2 = 0`), NCHW-like input `(N, C, ...)`.
            pub fn new(vb: VarBuilder, c: usize) -> Result<Self> {
                Self::new_with(vb, c, AconInit::Paper)
            }

            /// `c` channels with the chosen init of `p1`, `p2`.
            pub fn new_with(vb: VarBuilder, c: usize, init: AconInit) -> Result<Self> {
                let (p1, p2) = meta_p(&vb, c, init)?;
                Ok(Self {
                    p1,
                    p2,
                    layout: Layout::Nchw,
                })
            }

            /// Builder: channel axis.
            pub fn with_layout(mut self, layout: Layout) -> Self {
                self.layout = layout;
                self
            }

            /// `(p1, p2)`.
            pub fn params(&self) -> (&Tensor, &Tensor) {
                (&self.p1, &self.p2)
            }
        }

        impl Module for $name {
            fn forward(&self, x: &Tensor) -> Result<Tensor> {
                $op(x, &self.p1, &self.p2, self.layout)
            }
        }
    };
}

param_free_meta_acon!(
    /// meta-ACON-C with the layer-wise generator (SPEC §2): `β[n] = σ(Σ_c GAP(x)[n, c])`
    /// (one β per sample, the sum of the per-channel means), then
    /// `y = d·σ(β·d) + p2·x`, `d = (p1 − p2)·x` ([`ops::meta_acon_c_layer`]). Variables
    /// `p1`, `p2` `(C,)` with ACON-C's inits ([`AconInit`]); the generator has no
    /// learnable tensors. Gradients (`s = σ(β·d)`, `∂y/∂d = s + β·d·s(1 − s)`):
    /// `∂L/∂p1[c] = Σ dy·x·∂y/∂d`, `∂L/∂p2[c] = Σ dy·(x − x·∂y/∂d)`, and
    /// `∂L/∂x = dy·((p1 − p2)·∂y/∂d + p2) + ∂L/∂β[n]·β[n](1 − β[n])/S` with
    /// `∂L/∂β[n] = Σ_{c,s} dy·d²·s(1 − s)` (S = positions per channel).
    MetaAconCLayer,
    ops::meta_acon_c_layer
);

param_free_meta_acon!(
    /// meta-ACON-C with the pixel-wise generator (SPEC §2): `β = σ(x)` element-wise, then
    /// `y = d·σ(β·d) + p2·x`, `d = (p1 − p2)·x` ([`ops::meta_acon_c_pixel`]). Variables
    /// `p1`, `p2` `(C,)` with ACON-C's inits ([`AconInit`]); the generator has no
    /// learnable tensors. Gradients (`s = σ(β·d)`, `∂y/∂d = s + β·d·s(1 − s)`):
    /// `∂L/∂p1[c] = Σ dy·x·∂y/∂d`, `∂L/∂p2[c] = Σ dy·(x − x·∂y/∂d)`, and
    /// `∂L/∂x = dy·((p1 − p2)·∂y/∂d + p2 + d²·s(1 − s)·σ(x)(1 − σ(x)))`.
    MetaAconCPixel,
    ops::meta_acon_c_pixel
);

// ---------------------------------------------------------------------------

/// Which ψ an [`IieuConv2d`] applies between its convolution and IIEU-B.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PsiKind {
    /// `x = c` (no variables).
    #[default]
    None,
    /// `x = c + bias[o]` (variable `bias`, `candle_nn::conv2d`'s init
    /// `U(±1/sqrt(in_c))`).
    Bias,
    /// BatchNorm2d (PyTorch semantics, momentum 0.1, eps 1e-5): variables `bn.weight`
    /// (init 1), `bn.bias` (init 0), and the non-trainable state `bn.running_mean`
    /// (init 0), `bn.running_var` (init 1) — as `candle_nn::batch_norm` names and
    /// initialises them.
    BatchNorm,
}

/// Convolution → ψ → IIEU-B as ONE fused op ([`ops::iieu_conv2d`], SPEC §1, §1.5):
///
/// ```text
/// c = conv(x_pre, W),  x = ψ(c),  y = ς(ρ̂)·x,  ρ̂ = x·r_w[o]·r_x + ν[n,o]
/// ```
///
/// with `r_w = 1/(‖W[o]‖ + EPS)`, `r_x = 1/(‖P‖ + EPS)` the inverse norms of the
/// filter and of the input patch, `ν = σ(γ̇·LN(GAP(x)) + β̇)`, `ς` the adjuster with
/// threshold `η` (formulas and gradients: [`crate::cpu::iieu_conv`]). Unlike
/// [`IieuB`] (a candle conv, then IIEU-B), the convolution, ψ and IIEU-B run as one
/// op — [`crate::cpu::iieu_conv`] on the CPU, [`crate::cuda::iieu_conv`]'s fused
/// implicit-GEMM kernels on a CUDA device (feature `candle-cuda`) — and so does the
/// backward:
/// `W` gets its gradient through the conv and through `r_w`, `x_pre` through the conv
/// and through `r_x`.
///
/// Variables (under the module's `VarBuilder`): `weight` `(O, C/g, K, K)`
/// (`candle_nn::conv2d`'s init, `candle_nn::init::DEFAULT_KAIMING_NORMAL`), ψ's (see
/// [`PsiKind`]), `ln_weight` (γ̇, init 0.01), `ln_bias` (β̇, init 0), `eta` (η, init
/// 0.05), each `(O,)`.
///
/// BatchNorm: in training mode ([`IieuConv2d::forward_t`] with `train = true`, or
/// [`IieuConv2d::forward`] while [`IieuConv2d::training`] is true — the default, as in
/// PyTorch) ψ uses the batch statistics and each forward updates `bn.running_mean` /
/// `bn.running_var` once, with `Var::set` (like `candle_nn::BatchNorm`, they live in
/// the `VarMap` when the `VarBuilder` has one, get no gradient, and are saved with
/// it); the backward never touches them. In eval mode ψ uses the running statistics
/// and nothing is updated.
///
/// Devices and dtypes: the CPU (f32, f64) and, with feature `candle-cuda`, CUDA (f32,
/// f16, bf16), as [`crate::candle::ops::iieu_conv2d`].
#[derive(Debug, Clone)]
pub struct IieuConv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    bn: Option<IieuConvBn>,
    ln_weight: Tensor,
    ln_bias: Tensor,
    eta: Tensor,
    opts: IieuOpts,
    training: bool,
}

/// BatchNorm's tensors of an [`IieuConv2d`].
#[derive(Debug, Clone)]
struct IieuConvBn {
    weight: Tensor,
    bias: Tensor,
    running_mean: candle_core::Var,
    running_var: candle_core::Var,
    momentum: f64,
    eps: f64,
}

impl IieuConv2d {
    /// A `kernel × kernel` convolution from `in_c` to `out_c` channels with `cfg`'s
    /// stride, padding, dilation and groups (`cudnn_fwd_algo` is ignored), then `psi`,
    /// then IIEU-B with the given patch-norm convention. Errors: a zero size, `in_c` or
    /// `out_c` not a multiple of `groups`, or variables of the wrong shape in the
    /// `VarBuilder`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        cfg: candle_nn::Conv2dConfig,
        psi: PsiKind,
        patch_norm: PatchNorm,
    ) -> Result<Self> {
        for (what, v) in [
            ("in_c", in_c),
            ("out_c", out_c),
            ("kernel", kernel),
            ("stride", cfg.stride),
            ("dilation", cfg.dilation),
            ("groups", cfg.groups),
        ] {
            nonzero(what, v)?;
        }
        if in_c % cfg.groups != 0 || out_c % cfg.groups != 0 {
            return Err(op_err(
                "IieuConv2d",
                format!(
                    "in_c {in_c} and out_c {out_c} must be multiples of groups {}",
                    cfg.groups
                ),
            ));
        }
        let weight = vb.get_with_hints(
            (out_c, in_c / cfg.groups, kernel, kernel),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let bias = match psi {
            PsiKind::Bias => Some(vb.get_with_hints(out_c, "bias", uniform(in_c))?),
            _ => None,
        };
        let bn = match psi {
            PsiKind::BatchNorm => {
                let b = vb.pp("bn");
                let rm = b.get_with_hints(out_c, "running_mean", Init::Const(0.0))?;
                let rv = b.get_with_hints(out_c, "running_var", Init::Const(1.0))?;
                Some(IieuConvBn {
                    weight: b.get_with_hints(out_c, "weight", Init::Const(1.0))?,
                    bias: b.get_with_hints(out_c, "bias", Init::Const(0.0))?,
                    running_mean: candle_core::Var::from_tensor(&rm)?,
                    running_var: candle_core::Var::from_tensor(&rv)?,
                    momentum: 0.1,
                    eps: 1e-5,
                })
            }
            _ => None,
        };
        let mut opts = IieuOpts::from_conv2d_config(&cfg);
        opts.patch_norm = patch_norm;
        Ok(Self {
            weight,
            bias,
            bn,
            ln_weight: vb.get_with_hints(out_c, "ln_weight", Init::Const(0.01))?,
            ln_bias: vb.get_with_hints(out_c, "ln_bias", Init::Const(0.0))?,
            eta: vb.get_with_hints(out_c, "eta", Init::Const(0.05))?,
            opts,
            training: true,
        })
    }

    /// Builder: training (`true`, the default) or eval mode for [`IieuConv2d::forward`].
    pub fn with_training(mut self, training: bool) -> Self {
        self.training = training;
        self
    }

    /// Sets training (`true`) or eval mode for [`IieuConv2d::forward`].
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// Whether [`IieuConv2d::forward`] runs in training mode.
    pub fn training(&self) -> bool {
        self.training
    }

    /// [`IieuConv2d::forward_t`] in the module's mode ([`IieuConv2d::training`], true
    /// unless set otherwise).
    pub fn forward(&self, x_pre: &Tensor) -> Result<Tensor> {
        self.forward_t(x_pre, self.training)
    }

    /// Builder: BatchNorm's running-stat momentum (default 0.1) and eps (default 1e-5);
    /// no effect without BatchNorm. Checked by the op (`momentum` in `[0, 1]`,
    /// `eps > 0`).
    pub fn with_bn_momentum_eps(mut self, momentum: f64, eps: f64) -> Self {
        if let Some(bn) = &mut self.bn {
            bn.momentum = momentum;
            bn.eps = eps;
        }
        self
    }

    /// The conv weight `(O, C/g, K, K)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// ψ's bias (for [`PsiKind::Bias`]).
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// BatchNorm's `(weight, bias)` (for [`PsiKind::BatchNorm`]).
    pub fn bn_weight_bias(&self) -> Option<(&Tensor, &Tensor)> {
        self.bn.as_ref().map(|b| (&b.weight, &b.bias))
    }

    /// BatchNorm's `(running_mean, running_var)` (for [`PsiKind::BatchNorm`]).
    pub fn bn_running_stats(&self) -> Option<(&Tensor, &Tensor)> {
        self.bn
            .as_ref()
            .map(|b| (b.running_mean.as_tensor(), b.running_var.as_tensor()))
    }

    /// IIEU-B's `(γ̇, β̇, η)`.
    pub fn params(&self) -> (&Tensor, &Tensor, &Tensor) {
        (&self.ln_weight, &self.ln_bias, &self.eta)
    }

    /// The conv settings and patch-norm convention.
    pub fn opts(&self) -> IieuOpts {
        self.opts
    }

    /// `y = IIEU-B(ψ(conv(x_pre)))` in training (`train = true`: BatchNorm uses the batch
    /// statistics and updates the running ones once) or eval mode (running statistics,
    /// nothing updated). `x_pre`: `(N, in_c, H, W)`; returns `(N, out_c, H', W')`.
    pub fn forward_t(&self, x_pre: &Tensor, train: bool) -> Result<Tensor> {
        let psi = match (&self.bias, &self.bn) {
            (_, Some(bn)) => ops::IieuConvPsi::BatchNorm {
                weight: &bn.weight,
                bias: &bn.bias,
                running_mean: bn.running_mean.as_tensor(),
                running_var: bn.running_var.as_tensor(),
                momentum: bn.momentum,
                eps: bn.eps,
                training: train,
            },
            (Some(b), None) => ops::IieuConvPsi::Bias(b),
            (None, None) => ops::IieuConvPsi::None,
        };
        let out = ops::iieu_conv2d(
            x_pre,
            &self.weight,
            psi,
            &self.ln_weight,
            &self.ln_bias,
            &self.eta,
            self.opts,
        )?;
        if let (Some(bn), Some((m, v))) = (&self.bn, &out.running) {
            bn.running_mean.set(m)?;
            bn.running_var.set(v)?;
        }
        Ok(out.y)
    }
}

/// Train/eval through candle's `ModuleT` (as `candle_nn::BatchNorm`; the module does
/// not implement `Module`, whose blanket `ModuleT` would ignore `train`).
impl candle_core::ModuleT for IieuConv2d {
    fn forward_t(&self, x_pre: &Tensor, train: bool) -> Result<Tensor> {
        IieuConv2d::forward_t(self, x_pre, train)
    }
}
