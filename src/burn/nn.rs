//! burn modules (`#[derive(Module)]`, `Param`s at the SPEC inits, a `Config` each) for
//! every op family; each `forward` is one of [`super::ops`] and returns
//! `Result<Tensor, crate::Error>`. Inits are drawn by the crate's CPU constructors
//! ([`crate::cpu::acon::ChannelGen::init`], [`crate::cpu::iieu_dc::DcParams::init`]) from
//! the config's seed, so a burn module starts from the same values as a CPU or candle
//! one with the same seed.

use std::sync::{Arc, Mutex};

use ::burn::config::Config;
use ::burn::module::{Module, Param, RunningState};
use ::burn::tensor::{Device, Int, Tensor, TensorData};

use super::ops::{self, AiecOut, BetaTensor, ConvPsi, DcTensors, IieuOpts};
use crate::cpu::acon::ChannelGen;
use crate::cpu::aiec::{AiecConfig, Counters};
use crate::cpu::iieu::PatchNorm;
use crate::cpu::iieu_dc::{DcConfig, DcParams};
use crate::Error as AkError;
use crate::Layout;

fn param<const D: usize>(v: Vec<f32>, dims: [usize; D], device: &Device) -> Param<Tensor<D>> {
    Param::from_tensor(Tensor::from_data(TensorData::new(v, dims), device))
}

fn full(c: usize, v: f32, device: &Device) -> Param<Tensor<1>> {
    param(vec![v; c], [c], device)
}

fn nonzero(what: &'static str, v: usize) -> crate::Result<()> {
    if v == 0 {
        Err(AkError::Empty { what })
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// ACON

/// Where a module's input has its channel axis (the `Config` form of
/// [`crate::Layout`]).
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum ChannelAxis {
    /// `(N, C, ...)`: images (the default).
    Nchw,
    /// `(N, L, C)`: tokens, channels last (a ViT's activations).
    Nlc,
}

impl From<ChannelAxis> for Layout {
    fn from(a: ChannelAxis) -> Self {
        match a {
            ChannelAxis::Nchw => Layout::Nchw,
            ChannelAxis::Nlc => Layout::Nlc,
        }
    }
}

/// Config of [`AconC`], [`AconB`] and [`AconA`]: channel count and layout.
#[derive(Config, Debug)]
pub struct AconConfig {
    /// Channels C.
    pub channels: usize,
    /// Where the input's channel axis is.
    #[config(default = "ChannelAxis::Nchw")]
    pub layout: ChannelAxis,
}

/// ACON-C with per-channel `p1`, `p2`, `β` (each `(C)`, paper init `p1 = β = 1`,
/// `p2 = 0`: starts as Swish): `y = (p1 − p2)·x·σ(β·(p1 − p2)·x) + p2·x`
/// ([`ops::acon_c`]; gradients [`crate::cpu::acon::acon_c_backward`]).
#[derive(Module, Debug)]
pub struct AconC {
    /// `p1`, `(C)`.
    pub p1: Param<Tensor<1>>,
    /// `p2`, `(C)`.
    pub p2: Param<Tensor<1>>,
    /// β, `(C)`.
    pub beta: Param<Tensor<1>>,
    /// Layout of the input.
    #[module(skip)]
    pub layout: Layout,
}

impl AconConfig {
    /// ACON-C at the paper's init. `Err(Empty)` if `channels == 0`.
    pub fn init_acon_c(&self, device: &Device) -> crate::Result<AconC> {
        nonzero("channels C", self.channels)?;
        let c = self.channels;
        Ok(AconC {
            p1: full(c, 1.0, device),
            p2: full(c, 0.0, device),
            beta: full(c, 1.0, device),
            layout: self.layout.into(),
        })
    }

    /// ACON-B at `p = 0`, `β = 1` (starts as Swish). `Err(Empty)` if `channels == 0`.
    pub fn init_acon_b(&self, device: &Device) -> crate::Result<AconB> {
        nonzero("channels C", self.channels)?;
        let c = self.channels;
        Ok(AconB {
            p: full(c, 0.0, device),
            beta: full(c, 1.0, device),
            layout: self.layout.into(),
        })
    }

    /// ACON-A at `β = 1` (Swish). `Err(Empty)` if `channels == 0`.
    pub fn init_acon_a(&self, device: &Device) -> crate::Result<AconA> {
        nonzero("channels C", self.channels)?;
        Ok(AconA {
            beta: full(self.channels, 1.0, device),
            layout: self.layout.into(),
        })
    }
}

impl AconC {
    /// ACON-C of `x` (`(N, C, ...)` or `(N, L, C)`, as configured).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> crate::Result<Tensor<D>> {
        ops::acon_c(
            x,
            self.p1.val(),
            self.p2.val(),
            BetaTensor::PerChannel(self.beta.val()),
            self.layout,
        )
    }

    /// ACON-C of `x` with β from elsewhere (`(N, C)` or `(N)` from a generator, or
    /// pixel-wise); the module's own β is unused.
    pub fn forward_beta<const D: usize>(
        &self,
        x: Tensor<D>,
        beta: BetaTensor,
    ) -> crate::Result<Tensor<D>> {
        ops::acon_c(x, self.p1.val(), self.p2.val(), beta, self.layout)
    }
}

/// ACON-B, `y = (1 − p)·x·σ(β·(1 − p)·x) + p·x`, `p` and β `(C)` ([`ops::acon_b`];
/// gradients [`crate::cpu::acon::acon_b_backward`]).
#[derive(Module, Debug)]
pub struct AconB {
    /// `p`, `(C)`.
    pub p: Param<Tensor<1>>,
    /// β, `(C)`.
    pub beta: Param<Tensor<1>>,
    /// Layout of the input.
    #[module(skip)]
    pub layout: Layout,
}

impl AconB {
    /// ACON-B of `x` (`(N, C, ...)` or `(N, L, C)`, as configured).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> crate::Result<Tensor<D>> {
        ops::acon_b(
            x,
            self.p.val(),
            BetaTensor::PerChannel(self.beta.val()),
            self.layout,
        )
    }
}

/// ACON-A (Swish with learnable β `(C)`), `y = x·σ(β·x)` ([`ops::acon_a`]; gradients
/// [`crate::cpu::acon::acon_a_backward`]).
#[derive(Module, Debug)]
pub struct AconA {
    /// β, `(C)`.
    pub beta: Param<Tensor<1>>,
    /// Layout of the input.
    #[module(skip)]
    pub layout: Layout,
}

impl AconA {
    /// ACON-A of `x` (`(N, C, ...)` or `(N, L, C)`, as configured).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> crate::Result<Tensor<D>> {
        ops::acon_a(x, BetaTensor::PerChannel(self.beta.val()), self.layout)
    }
}

/// Which meta-ACON generator a [`MetaAconC`] uses.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum MetaGenKind {
    /// Channel-wise (the paper's default): `β = σ(W2·(W1·GAP(x) + b1) + b2)`, `(N, C)`.
    Channel,
    /// Layer-wise: `β[n] = σ(Σ_c GAP(x)[n, c])`, `(N)`, no parameters.
    Layer,
    /// Pixel-wise: `β = σ(x)`, no parameters.
    Pixel,
}

/// Config of [`MetaAconC`].
#[derive(Config, Debug)]
pub struct MetaAconCConfig {
    /// Channels C.
    pub channels: usize,
    /// Generator.
    #[config(default = "MetaGenKind::Channel")]
    pub generator: MetaGenKind,
    /// Reduction ratio `r` of the channel-wise generator (hidden width `max(r, C/r)`).
    #[config(default = 16)]
    pub r: usize,
    /// Biases `b1`, `b2` in the channel-wise generator.
    #[config(default = true)]
    pub bias: bool,
    /// Seed of the generator's init ([`ChannelGen::init`]).
    #[config(default = 0)]
    pub seed: u64,
    /// Where the input's channel axis is.
    #[config(default = "ChannelAxis::Nchw")]
    pub layout: ChannelAxis,
}

/// meta-ACON-C: ACON-C (`p1`, `p2` `(C)`, paper init) with β from a generator
/// ([`ops::channel_gen`] with `W1` `(width, C)`, `W2` `(C, width)`, `b1`, `b2` uniform
/// `±1/sqrt(fan_in)` as [`ChannelGen::init`]; [`ops::layer_gen`]; or pixel-wise). Gradients
/// reach `x` through both the activation and the generator, and every parameter.
#[derive(Module, Debug)]
pub struct MetaAconC {
    /// `p1`, `(C)`.
    pub p1: Param<Tensor<1>>,
    /// `p2`, `(C)`.
    pub p2: Param<Tensor<1>>,
    /// `W1` `(width, C)` of the channel-wise generator.
    pub w1: Option<Param<Tensor<2>>>,
    /// `W2` `(C, width)`.
    pub w2: Option<Param<Tensor<2>>>,
    /// `b1` `(width)`.
    pub b1: Option<Param<Tensor<1>>>,
    /// `b2` `(C)`.
    pub b2: Option<Param<Tensor<1>>>,
    /// The generator kind.
    #[module(skip)]
    pub generator: MetaGenKind,
    /// Layout of the input.
    #[module(skip)]
    pub layout: Layout,
}

impl MetaAconCConfig {
    /// Builds the module. Errors: `Empty` for `channels == 0`, `InvalidParam` for `r == 0`.
    pub fn init(&self, device: &Device) -> crate::Result<MetaAconC> {
        nonzero("channels C", self.channels)?;
        let c = self.channels;
        let (mut w1, mut w2, mut b1, mut b2) = (None, None, None, None);
        if self.generator == MetaGenKind::Channel {
            let g = ChannelGen::<f32>::init(c, self.r, self.bias, self.seed)?;
            w1 = Some(param(g.w1, [g.width, c], device));
            w2 = Some(param(g.w2, [c, g.width], device));
            b1 = g.b1.map(|b| param(b, [g.width], device));
            b2 = g.b2.map(|b| param(b, [c], device));
        }
        Ok(MetaAconC {
            p1: full(c, 1.0, device),
            p2: full(c, 0.0, device),
            w1,
            w2,
            b1,
            b2,
            generator: self.generator,
            layout: self.layout.into(),
        })
    }
}

impl MetaAconC {
    /// β of `x` from the module's generator.
    pub fn beta<const D: usize>(&self, x: Tensor<D>) -> crate::Result<BetaTensor> {
        Ok(match self.generator {
            MetaGenKind::Channel => {
                let (Some(w1), Some(w2)) = (&self.w1, &self.w2) else {
                    return Err(AkError::InvalidParam {
                        what: "generator",
                        msg: "channel-wise generator without W1/W2".into(),
                    });
                };
                let bias = match (&self.b1, &self.b2) {
                    (Some(b1), Some(b2)) => Some((b1.val(), b2.val())),
                    _ => None,
                };
                BetaTensor::PerSampleChannel(ops::channel_gen(
                    x,
                    w1.val(),
                    w2.val(),
                    bias,
                    self.layout,
                )?)
            }
            MetaGenKind::Layer => BetaTensor::PerSample(ops::layer_gen(x, self.layout)?),
            MetaGenKind::Pixel => BetaTensor::PixelWise,
        })
    }

    /// meta-ACON-C of `x` (`(N, C, ...)` or `(N, L, C)`, as configured).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> crate::Result<Tensor<D>> {
        let beta = self.beta(x.clone())?;
        ops::acon_c(x, self.p1.val(), self.p2.val(), beta, self.layout)
    }
}

// ---------------------------------------------------------------------------
// IIEU-B, IIEU-DC

/// The conv settings both IIEU configs carry, as [`IieuOpts`].
fn conv_opts(
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    groups: usize,
    patch_norm_all_channels: bool,
) -> IieuOpts {
    IieuOpts {
        stride,
        padding,
        dilation,
        groups,
        patch_norm: if patch_norm_all_channels {
            PatchNorm::AllChannels
        } else {
            PatchNorm::PerGroup
        },
    }
}

/// Config of [`IieuB`]: output channels of the conv it follows, and that conv's geometry.
#[derive(Config, Debug)]
pub struct IieuBConfig {
    /// Output channels O of the conv.
    pub channels: usize,
    /// `(stride_h, stride_w)` of the conv.
    #[config(default = "(1, 1)")]
    pub stride: (usize, usize),
    /// `(pad_h, pad_w)` of the conv.
    #[config(default = "(0, 0)")]
    pub padding: (usize, usize),
    /// `(dilation_h, dilation_w)` of the conv.
    #[config(default = "(1, 1)")]
    pub dilation: (usize, usize),
    /// Groups of the conv.
    #[config(default = 1)]
    pub groups: usize,
    /// Normalise each patch over all input channels instead of per group.
    #[config(default = false)]
    pub patch_norm_all_channels: bool,
}

/// IIEU-B (SPEC §1) after a conv: `ln_weight` γ̇ (init 0.01), `ln_bias` β̇ (0) and `eta`
/// η (0.05), each `(O)`. [`IieuB::forward`] takes the conv's input `x_pre`, its output
/// `x` (after any ψ) and its weight `W`, which gets gradients through both the conv
/// and `r_w` ([`ops::iieu_b`]; gradients [`crate::cpu::iieu::backward`]).
#[derive(Module, Debug)]
pub struct IieuB {
    /// γ̇, `(O)`.
    pub ln_weight: Param<Tensor<1>>,
    /// β̇, `(O)`.
    pub ln_bias: Param<Tensor<1>>,
    /// η, `(O)`.
    pub eta: Param<Tensor<1>>,
    /// The conv's geometry.
    #[module(skip)]
    pub opts: IieuOpts,
}

impl IieuBConfig {
    /// Builds the module. `Err(Empty)` if `channels == 0`.
    pub fn init(&self, device: &Device) -> crate::Result<IieuB> {
        nonzero("channels O", self.channels)?;
        let o = self.channels;
        Ok(IieuB {
            ln_weight: full(o, 0.01, device),
            ln_bias: full(o, 0.0, device),
            eta: full(o, 0.05, device),
            opts: conv_opts(
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
                self.patch_norm_all_channels,
            ),
        })
    }
}

impl IieuB {
    /// IIEU-B of `x = ψ(conv(x_pre, w))`.
    pub fn forward(
        &self,
        x: Tensor<4>,
        x_pre: Tensor<4>,
        w: Tensor<4>,
    ) -> crate::Result<Tensor<4>> {
        ops::iieu_b(
            x,
            x_pre,
            w,
            self.ln_weight.val(),
            self.ln_bias.val(),
            self.eta.val(),
            self.opts,
        )
    }
}

/// Which ψ an [`IieuConv2d`] applies between its convolution and IIEU-B.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum IieuConvPsiKind {
    /// `x = c` (no parameters).
    None,
    /// `x = c + bias[o]` (`bias` uniform `±1/sqrt(fan_in)`, PyTorch's conv bias init).
    Bias,
    /// BatchNorm2d (PyTorch semantics): `bn_weight` (init 1), `bn_bias` (init 0), running
    /// mean (0) and variance (1) as burn `RunningState`s (saved with the module, no
    /// gradient).
    BatchNorm,
}

/// Config of [`IieuConv2d`]: a `KH×KW` convolution from `in_channels` to
/// `out_channels`, ψ, then IIEU-B.
#[derive(Config, Debug)]
pub struct IieuConv2dConfig {
    /// Input channels C.
    pub in_channels: usize,
    /// Output channels O.
    pub out_channels: usize,
    /// `(KH, KW)`.
    pub kernel_size: (usize, usize),
    /// `(stride_h, stride_w)`.
    #[config(default = "(1, 1)")]
    pub stride: (usize, usize),
    /// `(pad_h, pad_w)`.
    #[config(default = "(0, 0)")]
    pub padding: (usize, usize),
    /// `(dilation_h, dilation_w)`.
    #[config(default = "(1, 1)")]
    pub dilation: (usize, usize),
    /// Groups.
    #[config(default = 1)]
    pub groups: usize,
    /// ψ.
    #[config(default = "IieuConvPsiKind::None")]
    pub psi: IieuConvPsiKind,
    /// BatchNorm's running-stat momentum (PyTorch's 0.1).
    #[config(default = 0.1)]
    pub bn_momentum: f64,
    /// BatchNorm's eps (PyTorch's 1e-5).
    #[config(default = 1e-5)]
    pub bn_eps: f64,
    /// Normalise each patch over all input channels instead of per group.
    #[config(default = false)]
    pub patch_norm_all_channels: bool,
    /// Seed of the weight (and bias) init.
    #[config(default = 0)]
    pub seed: u64,
}

/// Convolution → ψ → IIEU-B as ONE fused op ([`ops::iieu_conv2d`], SPEC §1, §1.5):
///
/// ```text
/// c = conv(x_pre, W),  x = ψ(c),  y = ς(ρ̂)·x,  ρ̂ = x·r_w[o]·r_x + ν[n,o]
/// ```
///
/// Parameters: `weight` `(O, C/g, KH, KW)` (Kaiming normal, `std = sqrt(2/fan_in)`, from
/// the config's seed), ψ's ([`IieuConvPsiKind`]), `ln_weight` γ̇ (0.01), `ln_bias` β̇ (0),
/// `eta` η (0.05), each `(O)`. Gradients for every parameter and `x_pre`:
/// [`crate::cpu::iieu_conv::backward`]. BatchNorm trains (batch statistics, running
/// statistics updated once per forward) when the input is on an autodiff device, as
/// burn's `BatchNorm` does; [`IieuConv2d::forward_t`] picks the mode explicitly.
#[derive(Module, Debug)]
pub struct IieuConv2d {
    /// Conv weight `(O, C/g, KH, KW)`.
    pub weight: Param<Tensor<4>>,
    /// ψ's bias ([`IieuConvPsiKind::Bias`]).
    pub bias: Option<Param<Tensor<1>>>,
    /// BatchNorm's γ ([`IieuConvPsiKind::BatchNorm`]).
    pub bn_weight: Option<Param<Tensor<1>>>,
    /// BatchNorm's β.
    pub bn_bias: Option<Param<Tensor<1>>>,
    /// BatchNorm's running mean.
    pub running_mean: Option<RunningState<Tensor<1>>>,
    /// BatchNorm's running variance.
    pub running_var: Option<RunningState<Tensor<1>>>,
    /// γ̇, `(O)`.
    pub ln_weight: Param<Tensor<1>>,
    /// β̇, `(O)`.
    pub ln_bias: Param<Tensor<1>>,
    /// η, `(O)`.
    pub eta: Param<Tensor<1>>,
    /// Conv settings and patch-norm convention.
    #[module(skip)]
    pub opts: IieuOpts,
    /// BatchNorm's `(momentum, eps)`.
    #[module(skip)]
    pub bn_momentum_eps: (f64, f64),
}

/// A standard normal draw (Box–Muller on [`uniform01`]).
fn normal01(state: &mut u64) -> f64 {
    let u1 = uniform01(state).max(f64::MIN_POSITIVE);
    let u2 = uniform01(state);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

impl IieuConv2dConfig {
    /// Builds the module. Errors: a zero size, channels not multiples of `groups`, or
    /// a bad BatchNorm momentum / eps.
    pub fn init(&self, device: &Device) -> crate::Result<IieuConv2d> {
        let (c, o, (kh, kw)) = (self.in_channels, self.out_channels, self.kernel_size);
        for (what, v) in [
            ("in_channels", c),
            ("out_channels", o),
            ("kernel_size", kh.min(kw)),
            ("stride", self.stride.0.min(self.stride.1)),
            ("dilation", self.dilation.0.min(self.dilation.1)),
            ("groups", self.groups),
        ] {
            nonzero(what, v)?;
        }
        if c % self.groups != 0 || o % self.groups != 0 {
            return Err(AkError::InvalidParam {
                what: "groups",
                msg: format!(
                    "in_channels {c} and out_channels {o} must be multiples of groups {}",
                    self.groups
                ),
            });
        }
        let bn = self.psi == IieuConvPsiKind::BatchNorm;
        if bn && !((0.0..=1.0).contains(&self.bn_momentum) && self.bn_eps > 0.0) {
            return Err(AkError::InvalidParam {
                what: "bn_momentum / bn_eps",
                msg: format!(
                    "momentum in [0, 1] and eps > 0, got {} and {}",
                    self.bn_momentum, self.bn_eps
                ),
            });
        }
        let fan_in = c / self.groups * kh * kw;
        let mut st = self.seed;
        let std = (2.0 / fan_in as f64).sqrt();
        let w = (0..o * fan_in)
            .map(|_| (normal01(&mut st) * std) as f32)
            .collect();
        let bound = 1.0 / (fan_in as f64).sqrt();
        let bias = (self.psi == IieuConvPsiKind::Bias).then(|| {
            let b = (0..o)
                .map(|_| ((2.0 * uniform01(&mut st) - 1.0) * bound) as f32)
                .collect();
            param(b, [o], device)
        });
        let state =
            |v: f32| RunningState::new(Tensor::from_data(TensorData::new(vec![v; o], [o]), device));
        Ok(IieuConv2d {
            weight: param(w, [o, c / self.groups, kh, kw], device),
            bias,
            bn_weight: bn.then(|| full(o, 1.0, device)),
            bn_bias: bn.then(|| full(o, 0.0, device)),
            running_mean: bn.then(|| state(0.0)),
            running_var: bn.then(|| state(1.0)),
            ln_weight: full(o, 0.01, device),
            ln_bias: full(o, 0.0, device),
            eta: full(o, 0.05, device),
            opts: conv_opts(
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
                self.patch_norm_all_channels,
            ),
            bn_momentum_eps: (self.bn_momentum, self.bn_eps),
        })
    }
}

impl IieuConv2d {
    /// [`IieuConv2d::forward_t`], training when `x_pre` is on an autodiff device.
    pub fn forward(&self, x_pre: Tensor<4>) -> crate::Result<Tensor<4>> {
        let train = x_pre.device().is_autodiff();
        self.forward_t(x_pre, train)
    }

    /// `y = IIEU-B(ψ(conv(x_pre)))`, `x_pre` `(N, C, H, W)` → `(N, O, H', W')`. `train`:
    /// BatchNorm uses the batch statistics and updates the running ones once; otherwise
    /// it uses the running ones and updates nothing (no effect without BatchNorm).
    pub fn forward_t(&self, x_pre: Tensor<4>, train: bool) -> crate::Result<Tensor<4>> {
        let psi = match (
            &self.bias,
            &self.bn_weight,
            &self.bn_bias,
            &self.running_mean,
            &self.running_var,
        ) {
            (_, Some(w), Some(b), Some(m), Some(v)) => ConvPsi::BatchNorm {
                weight: w.val(),
                bias: b.val(),
                running_mean: m.value_sync(),
                running_var: v.value_sync(),
                momentum: self.bn_momentum_eps.0,
                eps: self.bn_momentum_eps.1,
                training: train,
            },
            (Some(b), ..) => ConvPsi::Bias(b.val()),
            _ => ConvPsi::None,
        };
        let out = ops::iieu_conv2d(
            x_pre,
            self.weight.val(),
            psi,
            self.ln_weight.val(),
            self.ln_bias.val(),
            self.eta.val(),
            self.opts,
        )?;
        if let (Some(m), Some(v), Some((nm, nv))) =
            (&self.running_mean, &self.running_var, out.running)
        {
            m.update(nm);
            v.update(nv);
        }
        Ok(out.y)
    }
}

/// Config of [`IieuDc`].
#[derive(Config, Debug)]
pub struct IieuDcConfig {
    /// Channels C.
    pub channels: usize,
    /// Reduction ratio `r` (hidden width `C/r`).
    #[config(default = 4)]
    pub r: usize,
    /// Seed of the `W1`, `W2` init ([`DcParams::init`]).
    #[config(default = 0)]
    pub seed: u64,
}

/// IIEU-DC, the Dynamic Coupler (SPEC §1.6), in place of a residual sum:
/// `forward(x, res) = λ₀·x + λ₁·res` ([`ops::iieu_dc`]; gradients
/// [`crate::cpu::iieu_dc::backward`]). Parameters at [`DcParams::init`]: `ln1` weight 1 /
/// bias 0 `(2C)`, `W1` `(Hd, C)` uniform `±1/sqrt(C)`, `gamma2` 0.01 / `beta2` 0
/// `(2, Hd)`, `eta2` 0.01 `(Hd)`, `W2` `(C, Hd)` uniform `±1/sqrt(Hd)`, `ln2` weight 0.01
/// / bias 0 `(2C)`.
#[derive(Module, Debug)]
pub struct IieuDc {
    /// `(2C)`.
    pub ln1_weight: Param<Tensor<1>>,
    /// `(2C)`.
    pub ln1_bias: Param<Tensor<1>>,
    /// `(Hd, C)`.
    pub w1: Param<Tensor<2>>,
    /// `(2, Hd)`.
    pub gamma2: Param<Tensor<2>>,
    /// `(2, Hd)`.
    pub beta2: Param<Tensor<2>>,
    /// `(Hd)`.
    pub eta2: Param<Tensor<1>>,
    /// `(C, Hd)`.
    pub w2: Param<Tensor<2>>,
    /// `(2C)`.
    pub ln2_weight: Param<Tensor<1>>,
    /// `(2C)`.
    pub ln2_bias: Param<Tensor<1>>,
    /// Reduction ratio.
    pub r: usize,
}

impl IieuDcConfig {
    /// Builds the module. Errors as [`DcConfig::new`] (`C ≥ r ≥ 1`).
    pub fn init(&self, device: &Device) -> crate::Result<IieuDc> {
        let cfg = DcConfig::new(1, self.channels, 1, 1, self.r)?;
        let p = DcParams::<f32>::init(&cfg, self.seed)?;
        let (c, hd) = (cfg.c, cfg.hidden);
        Ok(IieuDc {
            ln1_weight: param(p.ln1_weight, [2 * c], device),
            ln1_bias: param(p.ln1_bias, [2 * c], device),
            w1: param(p.w1, [hd, c], device),
            gamma2: param(p.gamma2, [2, hd], device),
            beta2: param(p.beta2, [2, hd], device),
            eta2: param(p.eta2, [hd], device),
            w2: param(p.w2, [c, hd], device),
            ln2_weight: param(p.ln2_weight, [2 * c], device),
            ln2_bias: param(p.ln2_bias, [2 * c], device),
            r: self.r,
        })
    }
}

impl IieuDc {
    /// The parameters as tensors.
    pub fn tensors(&self) -> DcTensors {
        DcTensors {
            ln1_weight: self.ln1_weight.val(),
            ln1_bias: self.ln1_bias.val(),
            w1: self.w1.val(),
            gamma2: self.gamma2.val(),
            beta2: self.beta2.val(),
            eta2: self.eta2.val(),
            w2: self.w2.val(),
            ln2_weight: self.ln2_weight.val(),
            ln2_bias: self.ln2_bias.val(),
        }
    }

    /// `λ₀·x + λ₁·res`.
    pub fn forward(&self, x: Tensor<4>, res: Tensor<4>) -> crate::Result<Tensor<4>> {
        ops::iieu_dc(x, res, &self.tensors(), self.r)
    }
}

// ---------------------------------------------------------------------------
// AIEC, TAU

/// Config of [`Aiec`].
#[derive(Config, Debug)]
pub struct AiecModuleConfig {
    /// Channels C.
    pub channels: usize,
    /// Classes K.
    pub classes: usize,
    /// TAU threshold τ.
    #[config(default = 0.0)]
    pub tau: f64,
    /// λ_aux.
    #[config(default = 1.0)]
    pub lambda_aux: f64,
    /// λ_gate (SPEC default 200).
    #[config(default = 200.0)]
    pub lambda_gate: f64,
    /// Seed of the `Wd` init.
    #[config(default = 0)]
    pub seed: u64,
    /// Where the input's channel axis is.
    #[config(default = "ChannelAxis::Nchw")]
    pub layout: ChannelAxis,
}

/// AIEC (SPEC §3) in place of a ReLU: `A = TAU(F)`, plus in training the DMU, the ACU
/// counters (θ, η, φ, held by the module, cleared by [`Aiec::reset_counters`] at each
/// epoch) and the gate. `wd` `(K, C)` is uniform `±1/sqrt(C)` (PyTorch `nn.Linear`'s
/// default, as the candle module). Training: [`Aiec::forward_train`] ([`ops::aiec_train`]);
/// inference: [`Aiec::forward`] ([`ops::tau`]).
#[derive(Module, Debug)]
pub struct Aiec {
    /// Decision weights `Wd`, `(K, C)`.
    pub wd: Param<Tensor<2>>,
    /// τ, λ_aux, λ_gate, pooling.
    #[module(skip)]
    pub cfg: AiecConfig,
    /// The ACU counters.
    #[module(skip)]
    pub counters: Arc<Mutex<Counters>>,
    /// Layout of the input.
    #[module(skip)]
    pub layout: Layout,
}

/// splitmix64 uniform in `[0, 1)` (deterministic init of `Wd`).
fn uniform01(state: &mut u64) -> f64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

impl AiecModuleConfig {
    /// Builds the module. Errors: `Empty` for a zero `channels`/`classes`,
    /// `InvalidParam` for a bad τ or λ.
    pub fn init(&self, device: &Device) -> crate::Result<Aiec> {
        let cfg = AiecConfig {
            tau: self.tau,
            lambda_aux: self.lambda_aux,
            lambda_gate: self.lambda_gate,
            ..Default::default()
        };
        cfg.validate()?;
        let (k, c) = (self.classes, self.channels);
        let counters = Counters::new(k, c)?;
        let b = 1.0 / (c as f64).sqrt();
        let mut st = self.seed;
        let wd = (0..k * c)
            .map(|_| ((2.0 * uniform01(&mut st) - 1.0) * b) as f32)
            .collect();
        Ok(Aiec {
            wd: param(wd, [k, c], device),
            cfg,
            counters: Arc::new(Mutex::new(counters)),
            layout: self.layout.into(),
        })
    }
}

impl Aiec {
    /// One training step: `A = TAU(F)`, this layer's loss `(1)` and its host stats;
    /// updates the counters.
    pub fn forward_train<const D: usize>(
        &self,
        f: Tensor<D>,
        labels: &[usize],
    ) -> crate::Result<AiecOut<D>> {
        ops::aiec_train(
            f,
            self.wd.val(),
            labels,
            self.cfg,
            &self.counters,
            self.layout,
        )
    }

    /// [`Aiec::forward_train`] with the labels as an integer tensor `(N)` (read to the
    /// host: the CPU step needs them there). A negative label or one `≥ K` is an
    /// `Err`, as in [`ops::aiec_train_labels`].
    pub fn forward_train_labels<const D: usize>(
        &self,
        f: Tensor<D>,
        labels: Tensor<1, Int>,
    ) -> crate::Result<AiecOut<D>> {
        ops::aiec_train_labels(
            f,
            self.wd.val(),
            labels,
            self.cfg,
            &self.counters,
            self.layout,
        )
    }

    /// Inference: `A = TAU(F)`.
    pub fn forward<const D: usize>(&self, f: Tensor<D>) -> crate::Result<Tensor<D>> {
        ops::tau(f, self.cfg.tau)
    }

    /// Clears the counters (call at the start of every epoch).
    pub fn reset_counters(&self) {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reset();
    }

    /// A copy of the counters.
    pub fn counters(&self) -> Counters {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// TAU, `A = F·[F > τ]`, as a module with no parameters ([`ops::tau`]).
#[derive(Module, Debug)]
pub struct Tau {
    /// τ (finite, ≥ 0).
    pub tau: f64,
}

impl Tau {
    /// TAU of `f`.
    pub fn forward<const D: usize>(&self, f: Tensor<D>) -> crate::Result<Tensor<D>> {
        ops::tau(f, self.tau)
    }
}
