//! IieuConv2d — convolution, ψ and IIEU-B as one fused op (SPEC §1, §1.5):
//!
//! ```text
//! c = conv(x_pre, W)            (N, O, H', W'), any stride / padding / dilation / groups
//! x = ψ(c)                      per-channel: none, bias, affine, BatchNorm (train / eval)
//! y = IIEU-B(x, x_pre, W)       SPEC §1.1–1.3, exactly as `cpu::iieu::forward`
//! ```
//!
//! SPEC §1 is explicit about which tensor IIEU-B sees: its input `x` is "the conv output
//! after ψ", so term-S is `s = x·r_w[o]·r_x` with `x = ψ(c)`, term-B's GAP is
//! `m[n,o] = GAP(x[n,o]) = GAP(ψ(c)[n,o])`, and the adjuster multiplies `x`. The norms
//! `r_w = 1/(‖W[o]‖+EPS)` and `r_x = 1/(‖P‖+EPS)` are those of the conv's own weight and
//! input patches (`x_pre`, `W`), both back-propagated (not detached).
//!
//! ψ (see [`Psi`]) is a per-channel affine map of `c` once its statistics are known:
//! `x = ((c − sub[o])·k[o])·scale[o] + add[o]` (evaluated in f64, one rounding to `T`):
//! * [`Psi::None`]: `x = c`;
//! * [`Psi::Bias`]: `x = c + b[o]`;
//! * [`Psi::Affine`]: `x = a[o]·c + b[o]` (inference BatchNorm folded into two vectors);
//! * [`Psi::BatchNorm`], training: `x = γ[o]·(c − μ[o])/sqrt(var[o] + eps) + β[o]` with
//!   the batch statistics over the `N·H'·W'` values of channel `o` (biased variance for
//!   the normalisation); the running statistics are updated as PyTorch does:
//!   `running_mean ← (1−momentum)·running_mean + momentum·μ`,
//!   `running_var ← (1−momentum)·running_var + momentum·var·M/(M−1)` (unbiased,
//!   `M = N·H'·W'`);
//! * [`Psi::BatchNorm`], eval: the same with `running_mean` / `running_var` for `μ`, `var`.
//!
//! # What is fused where (CPU)
//! 1. **Conv + patch norms + epilogue**, one rayon task per sample `n`: for each group
//!    and each cache-sized tile of output pixels ([`TILE_BYTES`]), the im2col tile
//!    (`pixels × K`, `K = C/g·KH·KW`, zero padding included) is built once and
//!    * multiplied by the group's filters with the `gemm` crate (`c` for the tile);
//!    * squared and summed along each row in f64 (over 8 interleaved partial sums in a
//!      fixed order, so it vectorizes): `‖P‖²` of each output pixel (the zeros of the
//!      padding add nothing, so the sum is exact for free).
//!      [`PatchNorm::PerGroup`]: the row sum of group `grp`'s tile is `‖P‖²` of that
//!      group. [`PatchNorm::AllChannels`] (reference-code compatible, undilated taps):
//!      with dilation 1 the conv's taps are the undilated ones, and the `g` group tiles
//!      of the same pixels together hold every channel of the all-channel patch, so their
//!      row sums are added over the groups (in group order) before the square root.
//!      With dilation > 1 the all-channel window's (undilated) taps are in no tile; then
//!      `r_x` comes from `cpu::iieu`'s cheap `Σ_c x_pre²` window-sum path instead;
//!    * the epilogue folds each output row of the tile into the per-`(n, o)` statistics
//!      `(mean, M2)` of `c` (tile mean and centred sum of squares, merged tile by tile
//!      in order with Chan's formula — instead of `Σc`, `Σc²`, which lose every digit
//!      to cancellation when `|mean| ≫ std`). They give term-B's GAP and BatchNorm's
//!      batch statistics.
//!
//!    **1×1 direct path** (kernel 1×1, stride 1, no padding, any dilation): the
//!    sample's group slice `(C/g, H·W)` already is the GEMM's `K × H'W'` operand, so
//!    there are no tiles: one GEMM per (sample, group) on `x_pre` as it lies, then the
//!    same epilogue on the same tile-sized pixel runs, each pixel's `‖P‖²` summed over
//!    its channel column in the tile row's order (the same bits as the tiles'; the
//!    conv output too, unless `gemm` blocks the two paths' GEMM shapes differently).
//! 2. **Tiny pass** (`O(N·O)`): BatchNorm batch statistics (per-sample `(mean, M2)`
//!    merged over `n` in order), running-stat update, `GAP(x) = ψ(GAP(c))` (ψ is affine
//!    per channel), LayerNorm over `o` and `ν = σ(γ̇·m̂ + β̇)`.
//! 3. **Elementwise pass**, per `(n, o)` plane: `x = ψ(c)` into a plane-sized scratch,
//!    then `cpu::iieu`'s blocked adjuster `y = ς(ρ̂)·x`, `ρ̂ = x·r_w·r_x + ν` (the same
//!    code as the unfused op, so the same bits for the same `x`, `r_x`, `ν`).
//!
//!
//! Every reduction runs in f64 in a fixed order (tiles, groups, samples); the GEMM runs
//! in `T` with `gemm::Parallelism::None` inside the per-sample tasks; the backward's
//! `dW` partials are per fixed chunk of samples, summed in chunk order. So the result
//! has the same bits on every run and for every rayon thread count (on one machine:
//! `gemm` picks its kernels by CPU features).
//!
//! # What forward saves for backward ([`IieuConvSaved`])
//! Per output element: the conv output `c` (one `T`; `x = ψ(c)` is recomputed with the
//! same expression, so the adjuster branches are bit-identical). Per `(n, G', h', w')`:
//! `r_x` (one `T`) and `‖P‖` (one f64). Per `(n, o)`: `ν`, `m̂` (f64). Per `o`: `r_w`,
//! `‖W[o]‖`, ψ's `(sub, k, scale, add)`. Per `n`: the LayerNorm `rstd`. So
//! `sizeof(T)` bytes per output element plus `sizeof(T) + 8` per patch-norm element
//! (`G'/O` of the output elements) — the im2col tiles are not kept (the backward
//! rebuilds them, one tile at a time).
//!
//! # Backward
//! With `dx` the gradient at IIEU-B's input `x` (from `cpu::iieu::backward`, which also
//! gives the `r_x`-path of `dx_pre`, the `r_w`-path of `dW`, and `dγ̇`, `dβ̇`, `dη`):
//! * ψ: `d_shift[o] = Σ dx`, `d_scale[o] = Σ dx·x̂` (`x̂ = c` for Affine, the normalised
//!   `(c − μ)/sqrt(var + eps)` for BatchNorm), and
//!   `dc = scale·k·dx` (None, Bias, Affine, BatchNorm eval), or for BatchNorm training
//!   `dc = γ·rstd·(dx − mean(dx) − x̂·mean(dx·x̂))` (means over `N·H'·W'`);
//! * conv, per sample, group and tile: the im2col tile is rebuilt; `dcol = dcᵀ·W_g`
//!   (GEMM) is scattered back to `dx_pre` (col2im, sequential inside the sample's task:
//!   no atomics), and `dW_g += dc·col` (GEMM);
//!   on the 1×1 direct path, per sample and group, `dx_pre_g += W_gᵀ·dc_g` straight
//!   into `dx_pre` and `dW_g += dc_g·x_gᵀ` (no tiles, no col2im);
//! * `dx_pre = dx_pre|r_x + dx_pre|conv`, `dW = dW|r_w + dW|conv`.
//!
//! # The bare convolution
//! [`conv2d`] and [`conv2d_backward`] are the convolution alone (no patch norms, no
//! statistics, no ψ, no IIEU-B) on the same code: the same per-sample tasks, im2col
//! tiles and `gemm` calls as step 1 above (with an empty epilogue), and the same conv
//! backward (col2im, fixed-chunk `dW` reduction). They are the baseline that
//! `benches/iieu_conv.rs` measures the fused op against.
//!
//! # Errors
//! Every bad input is an `Err` before any work: invalid geometry ([`Error::Geometry`],
//! [`Error::Empty`]), buffers and per-channel vectors of the wrong length
//! ([`Error::LengthMismatch`]), BatchNorm `eps ≤ 0` or not finite, `momentum` outside
//! `[0, 1]`, a negative running variance, training statistics over a single value
//! (`N·H'·W' = 1`, as PyTorch refuses) ([`Error::InvalidParam`]), and a backward whose
//! config, ψ or saved state do not match the forward ([`Error::Shape`]).

use std::any::TypeId;

use rayon::prelude::*;

use crate::cpu::common::{layer_norm_fwd, sigmoid};
use crate::cpu::iieu::{
    self, IieuConfig, IieuGrads, IieuParams, IieuSaved, PatchNorm, EPS, EPS_LN,
};
use crate::error::{check_len, Error, Result};
use crate::fastmath::simd_fn;
use crate::geometry::Conv2dGeometry;
use crate::real::Real;

/// Target size in bytes of one im2col tile (`pixels × K` values of `T`): about half of
/// a typical L2, so the tile, the group's filters and the output rows stay in cache
/// while the GEMM and the patch norms read it. The tile has at least 16 and at most
/// 1024 pixels (fewer if the plane is smaller).
pub const TILE_BYTES: usize = 256 * 1024;

/// Fixed number of sample chunks in the backward's `dW` reduction (independent of the
/// thread count, so the sum has the same bits for every thread count).
const DW_CHUNKS: usize = 8;

/// BatchNorm after the convolution (PyTorch `BatchNorm2d` semantics).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNorm<T> {
    /// Affine weight `γ[o]` (PyTorch init 1).
    pub weight: Vec<T>,
    /// Affine bias `β[o]` (init 0).
    pub bias: Vec<T>,
    /// Running mean (init 0): used in eval mode, updated in training mode.
    pub running_mean: Vec<T>,
    /// Running (unbiased) variance (init 1): used in eval mode, updated in training mode.
    pub running_var: Vec<T>,
    /// Running-stat momentum in `[0, 1]` (PyTorch default 0.1).
    pub momentum: f64,
    /// `eps > 0` added to the variance (PyTorch default 1e-5).
    pub eps: f64,
    /// Training mode (batch statistics, running stats updated) or eval (running stats).
    pub training: bool,
}

impl<T: Real> BatchNorm<T> {
    /// PyTorch's initialisation for `c_out` channels, in training mode: `γ = 1`,
    /// `β = 0`, running mean 0, running var 1, momentum 0.1, eps 1e-5.
    pub fn init(c_out: usize) -> Self {
        Self {
            weight: vec![T::one(); c_out],
            bias: vec![T::zero(); c_out],
            running_mean: vec![T::zero(); c_out],
            running_var: vec![T::one(); c_out],
            momentum: 0.1,
            eps: 1e-5,
            training: true,
        }
    }
}

/// The per-channel map ψ between the convolution and IIEU-B.
#[derive(Debug, Clone, PartialEq)]
pub enum Psi<T> {
    /// `x = c`.
    None,
    /// `x = c + bias[o]`.
    Bias(Vec<T>),
    /// `x = scale[o]·c + shift[o]` (e.g. an inference BatchNorm folded).
    Affine {
        /// `a[o]`.
        scale: Vec<T>,
        /// `b[o]`.
        shift: Vec<T>,
    },
    /// BatchNorm in training or eval mode.
    BatchNorm(BatchNorm<T>),
}

/// Which ψ a saved state belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PsiMode {
    None,
    Bias,
    Affine,
    BnTrain,
    BnEval,
}

impl<T: Real> Psi<T> {
    fn mode(&self) -> PsiMode {
        match self {
            Psi::None => PsiMode::None,
            Psi::Bias(_) => PsiMode::Bias,
            Psi::Affine { .. } => PsiMode::Affine,
            Psi::BatchNorm(b) if b.training => PsiMode::BnTrain,
            Psi::BatchNorm(_) => PsiMode::BnEval,
        }
    }

    /// Lengths and scalar domains, before any work.
    fn check(&self, o: usize, m: usize) -> Result<()> {
        match self {
            Psi::None => Ok(()),
            Psi::Bias(b) => check_len("psi bias", o, b.len()),
            Psi::Affine { scale, shift } => {
                check_len("psi scale", o, scale.len())?;
                check_len("psi shift", o, shift.len())
            }
            Psi::BatchNorm(bn) => {
                check_len("bn weight", o, bn.weight.len())?;
                check_len("bn bias", o, bn.bias.len())?;
                check_len("bn running_mean", o, bn.running_mean.len())?;
                check_len("bn running_var", o, bn.running_var.len())?;
                if bn.running_var.iter().any(|&v| v.to_f64() < 0.0) {
                    return Err(Error::InvalidParam {
                        what: "bn running_var",
                        msg: "a running variance is negative".into(),
                    });
                }
                check_bn_scalars(bn.eps, bn.momentum, bn.training, m)?;
                Ok(())
            }
        }
    }
}

/// BatchNorm's scalar domains, shared by this op and `cuda::iieu_conv`: `eps` finite
/// and > 0, `momentum` in `[0, 1]`, and in training mode more than one value per
/// channel (`m = N·H'·W'`, as PyTorch refuses batch statistics over one value).
pub(crate) fn check_bn_scalars(eps: f64, momentum: f64, training: bool, m: usize) -> Result<()> {
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::InvalidParam {
            what: "bn eps",
            msg: format!("must be finite and > 0, got {eps}"),
        });
    }
    if !(0.0..=1.0).contains(&momentum) {
        return Err(Error::InvalidParam {
            what: "bn momentum",
            msg: format!("must be in [0, 1], got {momentum}"),
        });
    }
    if training && m < 2 {
        return Err(Error::InvalidParam {
            what: "bn training",
            msg: format!("batch statistics need more than 1 value per channel (N·H'·W' = {m})"),
        });
    }
    Ok(())
}

/// Learnable parameters (and BatchNorm state) of an IieuConv2d.
#[derive(Debug, Clone, PartialEq)]
pub struct IieuConvParams<T> {
    /// IIEU-B's `γ̇`, `β̇`, `η`, each `(O,)`.
    pub iieu: IieuParams<T>,
    /// ψ and its per-channel vectors, each `(O,)`.
    pub psi: Psi<T>,
}

impl<T: Real> IieuConvParams<T> {
    /// IIEU-B's SPEC initialisation with the given ψ.
    pub fn init(c_out: usize, psi: Psi<T>) -> Self {
        Self {
            iieu: IieuParams::init(c_out),
            psi,
        }
    }
}

/// Gradients of every input and parameter.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct IieuConvGrads<T> {
    /// `∂L/∂x_pre`, `(N, C, H, W)` (through the conv and through `r_x`).
    pub dx_pre: Vec<T>,
    /// `∂L/∂W`, `(O, C/g, KH, KW)` (through the conv and through `r_w`).
    pub dw: Vec<T>,
    /// `∂L/∂γ̇`, `(O,)`.
    pub d_ln_weight: Vec<T>,
    /// `∂L/∂β̇`, `(O,)`.
    pub d_ln_bias: Vec<T>,
    /// `∂L/∂η`, `(O,)`.
    pub d_eta: Vec<T>,
    /// ψ's multiplicative parameter: `∂L/∂a` (Affine), `∂L/∂γ` (BatchNorm, either mode);
    /// empty for None and Bias.
    pub d_psi_scale: Vec<T>,
    /// ψ's additive parameter: `∂L/∂bias` (Bias), `∂L/∂b` (Affine), `∂L/∂β`
    /// (BatchNorm); empty for None.
    pub d_psi_shift: Vec<T>,
}

/// Which ψ, without its vectors: how ψ and IIEU-B's parameters lie in one flat pack,
/// the form the framework ops (candle, burn) hand to the CPU op.
///
/// Pack layout, each vector `(O,)`: `[ψ scale; ψ shift; γ̇; β̇; η; running_mean;
/// running_var]` — ψ's vectors as the variant says ([`PsiKind::n_vectors`]), the
/// running statistics for BatchNorm only ([`PsiKind::n_running`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PsiKind {
    /// `x = c` (pack: no ψ vectors).
    None,
    /// `x = c + b[o]` (pack: `b`).
    Bias,
    /// `x = a[o]·c + b[o]` (pack: `a`, `b`).
    Affine,
    /// BatchNorm (pack: `γ`, `β`): `x = γ·(c − μ)/sqrt(var + eps) + β` with the batch
    /// statistics (training) or the running ones (eval). The running statistics are
    /// the last `2·O` values of the pack.
    BatchNorm {
        /// Running-stat momentum in `[0, 1]`.
        momentum: f64,
        /// `eps > 0` added to the variance.
        eps: f64,
        /// Training (batch statistics, running stats updated) or eval.
        training: bool,
    },
}

impl PsiKind {
    /// Number of learnable ψ vectors at the head of the pack.
    pub fn n_vectors(self) -> usize {
        match self {
            PsiKind::None => 0,
            PsiKind::Bias => 1,
            PsiKind::Affine | PsiKind::BatchNorm { .. } => 2,
        }
    }

    /// Number of running-statistics vectors at the tail of the pack (2 for BatchNorm).
    pub fn n_running(self) -> usize {
        usize::from(matches!(self, PsiKind::BatchNorm { .. })) * 2
    }

    /// Length of the pack for `c_out` channels.
    pub fn pack_len(self, c_out: usize) -> usize {
        (self.n_vectors() + 3 + self.n_running()) * c_out
    }
}

impl<T: Real> IieuConvParams<T> {
    /// The parameters from a flat pack laid out as [`PsiKind`] says, for `c_out`
    /// channels. `Err(LengthMismatch)` when the pack has the wrong length.
    pub fn from_pack(kind: PsiKind, c_out: usize, pack: &[T]) -> Result<Self> {
        check_len(
            "iieu_conv2d packed parameters",
            kind.pack_len(c_out),
            pack.len(),
        )?;
        let k = kind.n_vectors();
        let v = |i: usize| pack[i * c_out..(i + 1) * c_out].to_vec();
        let psi = match kind {
            PsiKind::None => Psi::None,
            PsiKind::Bias => Psi::Bias(v(0)),
            PsiKind::Affine => Psi::Affine {
                scale: v(0),
                shift: v(1),
            },
            PsiKind::BatchNorm {
                momentum,
                eps,
                training,
            } => Psi::BatchNorm(BatchNorm {
                weight: v(0),
                bias: v(1),
                running_mean: v(k + 3),
                running_var: v(k + 4),
                momentum,
                eps,
                training,
            }),
        };
        Ok(Self {
            iieu: IieuParams {
                ln_weight: v(k),
                ln_bias: v(k + 1),
                eta: v(k + 2),
            },
            psi,
        })
    }
}

impl<T: Real> IieuConvGrads<T> {
    /// The parameter gradients as one pack of `pack_len` values in [`PsiKind`]'s layout
    /// (`dψ`, `dγ̇`, `dβ̇`, `dη`), with zeros for the running statistics (state, not
    /// parameters). Moves the vectors out; `dx_pre` and `dw` stay.
    pub fn take_pack(&mut self, pack_len: usize) -> Vec<T> {
        let mut dp = Vec::with_capacity(pack_len);
        for v in [
            &mut self.d_psi_scale,
            &mut self.d_psi_shift,
            &mut self.d_ln_weight,
            &mut self.d_ln_bias,
            &mut self.d_eta,
        ] {
            dp.append(v);
        }
        dp.resize(pack_len, T::zero());
        dp
    }
}

/// ψ of one channel as `x = ((c − sub)·k)·scale + add` (f64).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Lin {
    sub: f64,
    k: f64,
    scale: f64,
    add: f64,
}

impl Lin {
    const ID: Lin = Lin {
        sub: 0.0,
        k: 1.0,
        scale: 1.0,
        add: 0.0,
    };
    #[inline(always)]
    fn xhat(&self, c: f64) -> f64 {
        (c - self.sub) * self.k
    }
    #[inline(always)]
    fn apply<T: Real>(&self, c: T) -> T {
        T::of(self.xhat(c.to_f64()) * self.scale + self.add)
    }
}

/// What [`forward`] saves for [`backward`] (see the module docs for its memory).
#[derive(Debug, Clone)]
pub struct IieuConvSaved<T> {
    cfg: IieuConfig,
    mode: PsiMode,
    conv: Vec<T>,
    lin: Vec<Lin>,
    batch_mean: Vec<f64>,
    batch_var: Vec<f64>,
    iieu: IieuSaved<T>,
}

impl<T: Real> IieuConvSaved<T> {
    /// The config the state was computed for.
    pub fn config(&self) -> &IieuConfig {
        &self.cfg
    }
    /// The conv output `c = conv(x_pre, W)` (before ψ), `(N, O, H', W')`.
    pub fn conv_out(&self) -> &[T] {
        &self.conv
    }
    /// The IIEU-B state (`r_w`, `r_x`, `ν`, `m̂`), as `cpu::iieu::forward` would save it.
    pub fn iieu(&self) -> &IieuSaved<T> {
        &self.iieu
    }
    /// BatchNorm training: the batch mean of `c` per channel (f64); empty otherwise.
    pub fn batch_mean(&self) -> &[f64] {
        &self.batch_mean
    }
    /// BatchNorm training: the biased batch variance of `c` per channel (f64); empty
    /// otherwise.
    pub fn batch_var(&self) -> &[f64] {
        &self.batch_var
    }
}

// ------------------------------------------------------------------------------------
// Internal geometry and GEMM

struct Dims {
    g: Conv2dGeometry,
    ow: usize,
    /// Output plane H'·W'.
    po: usize,
    /// Input plane H·W.
    pi: usize,
    /// C/g.
    cg: usize,
    /// O/g.
    og: usize,
    /// C/g·KH·KW.
    k: usize,
    /// Pixels per im2col tile.
    tile: usize,
    /// Patch planes per sample G'.
    gp: usize,
    /// r_x from the im2col tiles (else from cpu::iieu's window sum).
    fused_rx: bool,
    /// 1×1 kernel, stride 1, no padding (any dilation): the sample's `(C/g, H·W)`
    /// group slice is already the GEMM's `K × H'W'` operand, so no im2col tiles.
    direct: bool,
}

impl Dims {
    /// The convolution's dimensions alone (the bare [`conv2d`]: no patch norms, so
    /// `gp = 1` and `fused_rx = false`, both unused).
    fn conv<T>(g: &Conv2dGeometry) -> Result<Self> {
        let (oh, ow) = g.validate()?;
        let k = g.cin_per_group() * g.kh * g.kw;
        let po = oh * ow;
        let row = k.saturating_mul(std::mem::size_of::<T>()).max(1);
        let tile = (TILE_BYTES / row).clamp(16, 1024).min(po);
        Ok(Self {
            g: *g,
            ow,
            po,
            pi: g.h * g.w,
            cg: g.cin_per_group(),
            og: g.cout_per_group(),
            k,
            tile,
            gp: 1,
            fused_rx: false,
            direct: g.kh == 1 && g.kw == 1 && g.stride == (1, 1) && g.padding == (0, 0),
        })
    }
    /// Test switch: `direct_ok = false` forces the im2col-tile path on 1×1 convs too.
    fn allow_direct(mut self, direct_ok: bool) -> Self {
        self.direct &= direct_ok;
        self
    }
    /// The fused op's dimensions: the conv's, plus where `r_x` comes from.
    fn new<T>(cfg: &IieuConfig) -> Result<Self> {
        let mut d = Self::conv::<T>(&cfg.geometry)?;
        d.gp = cfg.patch_groups();
        d.fused_rx = match cfg.patch_norm {
            PatchNorm::PerGroup => true,
            PatchNorm::AllChannels => d.g.dilation == (1, 1),
        };
        Ok(d)
    }
    fn out_len(&self) -> usize {
        self.g.n * self.g.c_out * self.po
    }

    /// Input coordinate of tap `i` of output `o` along one axis, if inside the image.
    #[inline(always)]
    fn tap(o: usize, i: usize, s: usize, p: usize, d: usize, len: usize) -> Option<usize> {
        let t = o * s + i * d;
        (t >= p && t - p < len).then(|| t - p)
    }

    /// The im2col tile of sample `xs` (`(C, H, W)`), group `grp`, output pixels
    /// `p0..p0+tp`: `col[j·K + (cl·KH + i)·KW + jj]` = the input under tap `(i, jj)` of
    /// channel `cl` of the group for pixel `p0 + j`, 0 in the padding.
    fn im2col<T: Real>(&self, xs: &[T], grp: usize, p0: usize, tp: usize, col: &mut [T]) {
        let g = &self.g;
        for (j, row) in col.chunks_exact_mut(self.k).take(tp).enumerate() {
            let (ho, wo) = ((p0 + j) / self.ow, (p0 + j) % self.ow);
            let mut it = row.iter_mut();
            for cl in 0..self.cg {
                let plane = &xs[(grp * self.cg + cl) * self.pi..][..self.pi];
                for i in 0..g.kh {
                    let hi = Self::tap(ho, i, g.stride.0, g.padding.0, g.dilation.0, g.h);
                    for jj in 0..g.kw {
                        let wi = Self::tap(wo, jj, g.stride.1, g.padding.1, g.dilation.1, g.w);
                        if let Some(v) = it.next() {
                            *v = match (hi, wi) {
                                (Some(hi), Some(wi)) => plane[hi * g.w + wi],
                                _ => T::zero(),
                            };
                        }
                    }
                }
            }
        }
    }

    /// Adjoint of [`Dims::im2col`]: adds each tile entry into the input position it
    /// was read from (`dxs` is the sample's `(C, H, W)` gradient).
    fn col2im_add<T: Real>(&self, col: &[T], grp: usize, p0: usize, tp: usize, dxs: &mut [T]) {
        let g = &self.g;
        for (j, row) in col.chunks_exact(self.k).take(tp).enumerate() {
            let (ho, wo) = ((p0 + j) / self.ow, (p0 + j) % self.ow);
            let mut it = row.iter();
            for cl in 0..self.cg {
                let plane = &mut dxs[(grp * self.cg + cl) * self.pi..][..self.pi];
                for i in 0..g.kh {
                    let hi = Self::tap(ho, i, g.stride.0, g.padding.0, g.dilation.0, g.h);
                    for jj in 0..g.kw {
                        let wi = Self::tap(wo, jj, g.stride.1, g.padding.1, g.dilation.1, g.w);
                        if let (Some(&v), Some(hi), Some(wi)) = (it.next(), hi, wi) {
                            let d = &mut plane[hi * g.w + wi];
                            *d = *d + v;
                        }
                    }
                }
            }
        }
    }
}

/// A strided matrix view: element `(r, c)` at `r·rs + c·cs`.
#[derive(Clone, Copy)]
struct Mat {
    rs: usize,
    cs: usize,
}

impl Mat {
    /// One past the largest index an `m × n` view touches.
    fn extent(&self, m: usize, n: usize) -> usize {
        (m - 1) * self.rs + (n - 1) * self.cs + 1
    }
}

/// `dst (m×n) = [dst +] lhs (m×k) · rhs (k×n)` with the `gemm` crate for f32 / f64
/// (single-threaded: callers parallelise over samples), a plain triple loop for any
/// other [`Real`]. `m, n, k ≥ 1`.
#[allow(clippy::too_many_arguments)]
fn matmul<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    dv: Mat,
    accumulate: bool,
    lhs: &[T],
    lv: Mat,
    rhs: &[T],
    rv: Mat,
) {
    // Internal invariant (sizes come from a validated geometry); checked always because
    // the unsafe call below relies on it.
    assert!(
        m > 0
            && n > 0
            && k > 0
            && dv.extent(m, n) <= dst.len()
            && lv.extent(m, k) <= lhs.len()
            && rv.extent(k, n) <= rhs.len(),
        "iieu_conv: GEMM operand out of bounds"
    );
    let is = |t: TypeId| TypeId::of::<T>() == t;
    if is(TypeId::of::<f32>()) || is(TypeId::of::<f64>()) {
        // SAFETY: T is f32 or f64 (types `gemm::gemm` supports, checked above); every
        // index the m×n / m×k / k×n strided views touch is in bounds of its slice
        // (asserted above); `dst` is exclusively borrowed and does not alias the inputs.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                dv.cs as isize,
                dv.rs as isize,
                accumulate,
                lhs.as_ptr(),
                lv.cs as isize,
                lv.rs as isize,
                rhs.as_ptr(),
                rv.cs as isize,
                rv.rs as isize,
                T::one(),
                T::one(),
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    } else {
        for r in 0..m {
            for c in 0..n {
                let mut acc = T::zero();
                for i in 0..k {
                    acc = acc + lhs[r * lv.rs + i * lv.cs] * rhs[i * rv.rs + c * rv.cs];
                }
                let d = &mut dst[r * dv.rs + c * dv.cs];
                *d = if accumulate { *d + acc } else { acc };
            }
        }
    }
}

/// Interleaved partial sums of the f64 reductions over a tile row.
const LANES: usize = 8;

/// `Σ f(v[i])` in f64 over `LANES` interleaved partial sums (element `i` into lane
/// `i mod LANES`), combined in a fixed tree: independent dependency chains that
/// vectorize, and the same bits at every SIMD width and thread count (Rust does not
/// contract `a·b + c` into an FMA).
#[inline(always)]
fn lane_sum<T: Real>(v: &[T], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f(x.to_f64());
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a += f(x.to_f64());
    }
    lane_tree(&acc)
}

/// The fused forward's epilogue of one tile (`colt`, `tp × K`, rows of `k`): each
/// row's `‖P‖²` added to `q` (`tp` values; empty when `r_x` does not come from the
/// tiles), and the statistics of each of the group's output rows — `rows[j·po..][..tp]`
/// for `j < st.len()` — merged into `st`.
#[inline(always)]
fn epilogue_impl<T: Real>(
    colt: &[T],
    k: usize,
    q: &mut [f64],
    rows: &[T],
    po: usize,
    st: &mut [Stat],
) {
    for (qv, row) in q.iter_mut().zip(colt.chunks_exact(k)) {
        *qv += lane_sum(row, |v| v * v);
    }
    let tp = colt.len() / k;
    for (j, s) in st.iter_mut().enumerate() {
        *s = s.merge(Stat::of(&rows[j * po..][..tp]));
    }
}

simd_fn! {
    /// [`epilogue_impl`], runtime-dispatched to AVX2 / AVX-512 where available (the
    /// same bits at every width: see [`lane_sum`]).
    fn epilogue<T: Real>(
        colt: &[T],
        k: usize,
        q: &mut [f64],
        rows: &[T],
        po: usize,
        st: &mut [Stat],
    ) => epilogue_impl;
}

/// Pixels per block of [`epilogue_direct_impl`]'s lane accumulators.
const DIRECT_BLOCK: usize = 64;

/// [`epilogue_impl`] on the 1×1 direct path: the patch of pixel `j < tp` is column `j`
/// of `xg` (`k` rows of stride `pi`). Each `‖P‖²` is summed exactly as [`lane_sum`]
/// sums the tile row (channel `c` into lane `c mod LANES`, in channel order, then
/// [`lane_tree`]) — the same bits — but vectorised across pixels, the input read
/// row by row as it lies.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn epilogue_direct_impl<T: Real>(
    xg: &[T],
    pi: usize,
    k: usize,
    tp: usize,
    q: &mut [f64],
    rows: &[T],
    po: usize,
    st: &mut [Stat],
) {
    if !q.is_empty() {
        let mut acc = [[0.0f64; DIRECT_BLOCK]; LANES];
        for b0 in (0..tp).step_by(DIRECT_BLOCK) {
            let bn = DIRECT_BLOCK.min(tp - b0);
            for a in acc.iter_mut() {
                a[..bn].fill(0.0);
            }
            for c in 0..k {
                let xr = &xg[c * pi + b0..][..bn];
                for (a, &x) in acc[c % LANES][..bn].iter_mut().zip(xr) {
                    let v = x.to_f64();
                    *a += v * v;
                }
            }
            for (j, qv) in q[b0..b0 + bn].iter_mut().enumerate() {
                *qv += lane_tree(&std::array::from_fn(|l| acc[l][j]));
            }
        }
    }
    for (j, s) in st.iter_mut().enumerate() {
        *s = s.merge(Stat::of(&rows[j * po..][..tp]));
    }
}

simd_fn! {
    /// [`epilogue_direct_impl`], runtime-dispatched to AVX2 / AVX-512 where available.
    fn epilogue_direct<T: Real>(
        xg: &[T],
        pi: usize,
        k: usize,
        tp: usize,
        q: &mut [f64],
        rows: &[T],
        po: usize,
        st: &mut [Stat],
    ) => epilogue_direct_impl;
}

/// The lane tree of [`lane_sum`].
#[inline(always)]
fn lane_tree(a: &[f64; LANES]) -> f64 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// ψ backward's per-plane partials `[Σ dx, Σ dx·x̂]`, `x̂ = (c − sub)·k`, in f64 over
/// `LANES` interleaved partial sums each (as [`lane_sum`]: independent chains, the
/// same bits at every SIMD width).
#[inline(always)]
fn psi_partials_impl<T: Real>(dx: &[T], c: &[T], sub: f64, k: f64) -> [f64; 2] {
    let (mut a, mut b) = ([0.0f64; LANES], [0.0f64; LANES]);
    let (mut dch, mut cch) = (dx.chunks_exact(LANES), c.chunks_exact(LANES));
    for (d8, c8) in (&mut dch).zip(&mut cch) {
        for (((sa, sb), &g), &cv) in a.iter_mut().zip(b.iter_mut()).zip(d8).zip(c8) {
            let g = g.to_f64();
            *sa += g;
            *sb += g * ((cv.to_f64() - sub) * k);
        }
    }
    for (l, (&g, &cv)) in dch.remainder().iter().zip(cch.remainder()).enumerate() {
        let g = g.to_f64();
        a[l] += g;
        b[l] += g * ((cv.to_f64() - sub) * k);
    }
    [lane_tree(&a), lane_tree(&b)]
}

simd_fn! {
    /// [`psi_partials_impl`], runtime-dispatched to AVX2 / AVX-512 where available.
    fn psi_partials<T: Real>(dx: &[T], c: &[T], sub: f64, k: f64) -> [f64; 2] => psi_partials_impl;
}

/// `(count, mean, M2)` running statistics merged with Chan's formula.
#[derive(Debug, Clone, Copy, Default)]
struct Stat {
    n: f64,
    mean: f64,
    m2: f64,
}

impl Stat {
    /// Statistics of one output row (two passes: the mean, then the centred squares).
    #[inline(always)]
    fn of<T: Real>(v: &[T]) -> Self {
        let n = v.len() as f64;
        let mean = lane_sum(v, |a| a) / n;
        let m2 = lane_sum(v, |a| (a - mean) * (a - mean));
        Self { n, mean, m2 }
    }
    fn merge(self, b: Stat) -> Stat {
        if self.n == 0.0 {
            return b;
        }
        let n = self.n + b.n;
        let delta = b.mean - self.mean;
        Stat {
            n,
            mean: self.mean + delta * (b.n / n),
            m2: self.m2 + b.m2 + delta * delta * (self.n * b.n / n),
        }
    }
}

fn check_inputs<T: Real>(d: &Dims, x_pre: &[T], w: &[T], params: &IieuConvParams<T>) -> Result<()> {
    check_len("x_pre", d.g.input_len(), x_pre.len())?;
    check_len("w", d.g.weight_len(), w.len())?;
    params.iieu.check(d.g.c_out)?;
    params.psi.check(d.g.c_out, d.g.n * d.po)
}

// ------------------------------------------------------------------------------------
// Public API

/// IieuConv2d forward: `y = IIEU-B(ψ(conv(x_pre, W)), x_pre, W)` (module docs: formula,
/// what is fused where, what is saved).
///
/// `x_pre`: `(N, C, H, W)`, `w`: `(O, C/g, KH, KW)`; returns `y` `(N, O, H', W')` and the
/// state [`backward`] needs. With [`Psi::BatchNorm`] in training mode the running
/// statistics in `params` are updated (after all the work, never on `Err`); nothing
/// else in `params` changes.
///
/// Errors: see the module docs; all checked before any work.
///
/// # Example (forward and backward)
///
/// ```
/// use activation_kernels::cpu::iieu::{self, IieuConfig};
/// use activation_kernels::cpu::iieu_conv::{backward, conv2d, forward, IieuConvParams, Psi};
/// use activation_kernels::Conv2dGeometry;
/// use approx::assert_relative_eq;
///
/// // 3×3 conv (padding 1), 2 → 2 channels, 4×4 image, ψ = per-channel bias, IIEU-B.
/// let geo = Conv2dGeometry::new(1, 2, 4, 4, 2, 3, 3).with_padding(1, 1);
/// let cfg = IieuConfig::new(geo);
/// let x_pre: Vec<f64> = (0..32).map(|i| ((i * 7 % 11) as f64 - 5.0) / 4.0).collect();
/// let w: Vec<f64> = (0..36).map(|i| ((i * 5 % 13) as f64 - 6.0) / 8.0).collect();
/// let mut params = IieuConvParams::init(2, Psi::Bias(vec![0.1, -0.2]));
/// let (y, saved) = forward(&cfg, &x_pre, &w, &mut params)?;
///
/// // The fused op equals the unfused chain conv → + bias → cpu::iieu::forward.
/// let mut x = conv2d(&geo, &x_pre, &w)?;
/// x.iter_mut().enumerate().for_each(|(i, v)| *v += [0.1, -0.2][i / 16]);
/// let (y_ref, _) = iieu::forward(&cfg, &x, &x_pre, &w, &params.iieu)?;
/// for (a, b) in y.iter().zip(&y_ref) {
///     assert_relative_eq!(a, b, epsilon = 1e-12, max_relative = 1e-12);
/// }
///
/// // Backward of L = Σ y: ∂L/∂W (through the conv and r_w) and ∂L/∂bias against
/// // central differences.
/// let g = backward(&cfg, &vec![1.0; 32], &x_pre, &w, &params, &saved)?;
/// let loss = |w: &[f64], bias: [f64; 2]| -> f64 {
///     let mut p = IieuConvParams::init(2, Psi::Bias(bias.to_vec()));
///     forward(&cfg, &x_pre, w, &mut p).unwrap().0.iter().sum()
/// };
/// let h = 1e-6;
/// let (mut wp, mut wm) = (w.clone(), w.clone());
/// wp[5] += h;
/// wm[5] -= h;
/// assert_relative_eq!(g.dw[5], (loss(&wp, [0.1, -0.2]) - loss(&wm, [0.1, -0.2])) / (2.0 * h), max_relative = 1e-6);
/// let fd_b = (loss(&w, [0.1, -0.2 + h]) - loss(&w, [0.1, -0.2 - h])) / (2.0 * h);
/// assert_relative_eq!(g.d_psi_shift[1], fd_b, max_relative = 1e-6);
/// assert_eq!(g.dx_pre.len(), 32);
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn forward<T: Real>(
    cfg: &IieuConfig,
    x_pre: &[T],
    w: &[T],
    params: &mut IieuConvParams<T>,
) -> Result<(Vec<T>, IieuConvSaved<T>)> {
    forward_with(cfg, x_pre, w, params, true)
}

/// [`forward`], with the 1×1 direct path allowed or not (`direct_ok = false`: the
/// im2col tiles on every geometry, for the tests that compare the two paths).
fn forward_with<T: Real>(
    cfg: &IieuConfig,
    x_pre: &[T],
    w: &[T],
    params: &mut IieuConvParams<T>,
    direct_ok: bool,
) -> Result<(Vec<T>, IieuConvSaved<T>)> {
    let d = Dims::new::<T>(cfg)?.allow_direct(direct_ok);
    check_inputs(&d, x_pre, w, params)?;
    let g = d.g;
    let (n_, o_, po, pi) = (g.n, g.c_out, d.po, d.pi);
    let (r_w, w_norm) = iieu::filter_norms_checked(cfg, w)?;

    // 1. Conv + patch norms + per-(n, o) statistics, one task per sample. `sq` holds
    //    ‖P‖² per (n, G', h', w') (only filled on the fused path; the other path fills
    //    the norms below).
    let mut conv = vec![T::zero(); d.out_len()];
    let mut sq = vec![0.0f64; n_ * d.gp * po];
    let mut stats = vec![Stat::default(); n_ * o_];
    conv.par_chunks_mut(o_ * po)
        .zip(stats.par_chunks_mut(o_))
        .zip(sq.par_chunks_mut(d.gp * po))
        .zip(x_pre.par_chunks(g.c_in * pi))
        .for_each(|(((cs, st), qs), xs)| {
            // Written before the epilogue reads it (see `conv_backward_into`: the
            // zeroed allocation's pages must not be read first).
            qs.fill(0.0);
            // Epilogue of each tile: ‖P‖² row sums (fused r_x path) and the statistics
            // of each output row. PerGroup: group `grp`'s plane; AllChannels (gp = 1):
            // summed over the groups, in group order.
            conv_sample(&d, xs, w, cs, |grp, p0, tp, patches, cs| {
                let q = if d.fused_rx {
                    &mut qs[(grp % d.gp) * po + p0..][..tp]
                } else {
                    &mut []
                };
                let og = grp * d.og..(grp + 1) * d.og;
                let rows = &cs[og.start * po + p0..];
                match patches {
                    Patches::Tile(colt) => epilogue(colt, d.k, q, rows, po, &mut st[og]),
                    Patches::Direct(xg) => {
                        epilogue_direct(xg, pi, d.k, tp, q, rows, po, &mut st[og])
                    }
                }
            })
        });

    let (r_x, x_norm) = if d.fused_rx {
        let mut r_x = vec![T::zero(); sq.len()];
        r_x.par_iter_mut()
            .zip(sq.par_iter_mut())
            .for_each(|(r, q)| {
                // As `cpu::iieu`: a NaN sum stays NaN (`f64::max` would turn it into 0).
                *q = if *q < 0.0 { 0.0 } else { q.sqrt() };
                *r = T::of(1.0 / (*q + EPS));
            });
        (r_x, sq)
    } else {
        iieu::patch_norms_checked(cfg, x_pre)?
    };

    // 2. Tiny pass: ψ per channel (BatchNorm statistics), GAP(x), LayerNorm, ν.
    let mode = params.psi.mode();
    let (mut batch_mean, mut batch_var) = (Vec::new(), Vec::new());
    let lin: Vec<Lin> = match &params.psi {
        Psi::None => vec![Lin::ID; o_],
        Psi::Bias(b) => b
            .iter()
            .map(|&b| Lin {
                add: b.to_f64(),
                ..Lin::ID
            })
            .collect(),
        Psi::Affine { scale, shift } => scale
            .iter()
            .zip(shift)
            .map(|(&a, &b)| Lin {
                scale: a.to_f64(),
                add: b.to_f64(),
                ..Lin::ID
            })
            .collect(),
        Psi::BatchNorm(bn) => {
            let (mean, var): (Vec<f64>, Vec<f64>) = if bn.training {
                (0..o_)
                    .map(|o| {
                        let s = (0..n_).fold(Stat::default(), |a, n| a.merge(stats[n * o_ + o]));
                        (s.mean, s.m2 / s.n)
                    })
                    .unzip()
            } else {
                bn.running_mean
                    .iter()
                    .zip(&bn.running_var)
                    .map(|(&m, &v)| (m.to_f64(), v.to_f64()))
                    .unzip()
            };
            let lin = (0..o_)
                .map(|o| Lin {
                    sub: mean[o],
                    k: 1.0 / (var[o] + bn.eps).sqrt(),
                    scale: bn.weight[o].to_f64(),
                    add: bn.bias[o].to_f64(),
                })
                .collect();
            if bn.training {
                batch_mean = mean;
                batch_var = var;
            }
            lin
        }
    };
    let mut m_hat = vec![0.0f64; n_ * o_];
    let mut nu = vec![0.0f64; n_ * o_];
    let mut rstd = vec![0.0f64; n_];
    let ip = &params.iieu;
    for n in 0..n_ {
        let m: Vec<f64> = (0..o_)
            .map(|o| lin[o].xhat(stats[n * o_ + o].mean) * lin[o].scale + lin[o].add)
            .collect();
        let mh = &mut m_hat[n * o_..(n + 1) * o_];
        rstd[n] = layer_norm_fwd(&m, EPS_LN, mh);
        for o in 0..o_ {
            nu[n * o_ + o] = sigmoid(ip.ln_weight[o].to_f64() * mh[o] + ip.ln_bias[o].to_f64());
        }
    }

    // 3. Elementwise pass: x = ψ(c), then the IIEU-B adjuster, per (n, o) plane.
    let mut y = vec![T::zero(); d.out_len()];
    y.par_chunks_mut(po)
        .zip(conv.par_chunks(po))
        .enumerate()
        .for_each_init(
            || vec![T::zero(); po],
            |xb, (no, (yp, cp))| {
                let (n, o) = (no / o_, no % o_);
                let t = n * d.gp + o / (o_ / d.gp);
                let rx = &r_x[t * po..(t + 1) * po];
                let l = lin[o];
                for (xv, &c) in xb.iter_mut().zip(cp) {
                    *xv = l.apply(c);
                }
                iieu::adjust_plane(xb, rx, yp, r_w[o], T::of(nu[no]), ip.eta[o]);
            },
        );

    // Running statistics (training BatchNorm), after all the work.
    if let Psi::BatchNorm(bn) = &mut params.psi {
        if bn.training {
            let m = (n_ * po) as f64;
            let mom = bn.momentum;
            for o in 0..o_ {
                let unbiased = batch_var[o] * m / (m - 1.0);
                let rm = &mut bn.running_mean[o];
                *rm = T::of((1.0 - mom) * rm.to_f64() + mom * batch_mean[o]);
                let rv = &mut bn.running_var[o];
                *rv = T::of((1.0 - mom) * rv.to_f64() + mom * unbiased);
            }
        }
    }

    let iieu_saved = IieuSaved::from_parts(*cfg, r_w, w_norm, r_x, x_norm, nu, m_hat, rstd);
    Ok((
        y,
        IieuConvSaved {
            cfg: *cfg,
            mode,
            conv,
            lin,
            batch_mean,
            batch_var,
            iieu: iieu_saved,
        },
    ))
}

/// The patches of the output pixels `p0..p0+tp` that [`conv_sample`] hands to its
/// epilogue.
#[derive(Clone, Copy)]
enum Patches<'a, T> {
    /// The im2col tile, `tp × K` (row `j`: the patch of pixel `p0 + j`).
    Tile(&'a [T]),
    /// The 1×1 direct path ([`Dims::direct`]): the group's input from pixel `p0` on,
    /// `K = C/g` rows of stride `H·W` (the patch of pixel `p0 + j` is column `j`).
    Direct(&'a [T]),
}

/// The convolution of one sample `xs` (`(C, H, W)`) into `cs` (`(O, H'·W')`), shared by
/// [`forward`] and [`conv2d`]: per group and tile of output pixels (in that order), the
/// im2col tile and its GEMM with the group's filters; then
/// `epilogue(grp, p0, tp, Patches::Tile(tile), cs)` with the tile (`tp × K`, pixels
/// `p0..p0+tp`) and the sample's output so far (the tile's output rows
/// `cs[o·H'W' + p0..][..tp]` are final). On the 1×1 direct path ([`Dims::direct`]) one
/// GEMM per group straight on the group's `(C/g, H·W)` input, then the epilogue on the
/// same pixel runs as the tiled path's (`Patches::Direct`), so the epilogue's sums have
/// the same partition and order on both paths.
fn conv_sample<T: Real>(
    d: &Dims,
    xs: &[T],
    w: &[T],
    cs: &mut [T],
    mut epilogue: impl FnMut(usize, usize, usize, Patches<'_, T>, &[T]),
) {
    let (po, k, og) = (d.po, d.k, d.og);
    if d.direct {
        for grp in 0..d.g.groups {
            let wg = &w[grp * og * k..(grp + 1) * og * k];
            let xg = &xs[grp * k * d.pi..(grp + 1) * k * d.pi];
            // c[og × H'W'] = W_g (og × C/g) · x_g (C/g × HW), HW = H'W'
            matmul(
                (og, po, k),
                &mut cs[grp * og * po..],
                Mat { rs: po, cs: 1 },
                false,
                wg,
                Mat { rs: k, cs: 1 },
                xg,
                Mat { rs: d.pi, cs: 1 },
            );
            for p0 in (0..po).step_by(d.tile) {
                let tp = d.tile.min(po - p0);
                epilogue(grp, p0, tp, Patches::Direct(&xg[p0..]), cs);
            }
        }
        return;
    }
    let mut col = vec![T::zero(); d.tile * k];
    for grp in 0..d.g.groups {
        let wg = &w[grp * og * k..(grp + 1) * og * k];
        for p0 in (0..po).step_by(d.tile) {
            let tp = d.tile.min(po - p0);
            let colt = &mut col[..tp * k];
            d.im2col(xs, grp, p0, tp, colt);
            // c[og × tp] = W_g (og × K) · colᵀ (K × tp)
            matmul(
                (og, tp, k),
                &mut cs[grp * og * po + p0..],
                Mat { rs: po, cs: 1 },
                false,
                wg,
                Mat { rs: k, cs: 1 },
                colt,
                Mat { rs: 1, cs: k },
            );
            epilogue(grp, p0, tp, Patches::Tile(colt), cs);
        }
    }
}

/// IieuConv2d backward (module docs: the gradient formulas). `dy`: `(N, O, H', W')`;
/// `x_pre`, `w`, `params` as given to [`forward`] (BatchNorm's running statistics are
/// not read: eval mode uses the values saved by the forward). Returns the gradient of
/// every input and parameter.
///
/// Errors: as [`forward`], plus a wrong `dy` length ([`Error::LengthMismatch`]), and a
/// `saved` from another config or another ψ ([`Error::Shape`]).
///
/// Example: [`forward`]'s runs the forward and this backward and checks gradients
/// against central differences.
pub fn backward<T: Real>(
    cfg: &IieuConfig,
    dy: &[T],
    x_pre: &[T],
    w: &[T],
    params: &IieuConvParams<T>,
    saved: &IieuConvSaved<T>,
) -> Result<IieuConvGrads<T>> {
    backward_with(cfg, dy, x_pre, w, params, saved, true)
}

/// [`backward`], with the 1×1 direct path allowed or not (see [`forward_with`]).
fn backward_with<T: Real>(
    cfg: &IieuConfig,
    dy: &[T],
    x_pre: &[T],
    w: &[T],
    params: &IieuConvParams<T>,
    saved: &IieuConvSaved<T>,
    direct_ok: bool,
) -> Result<IieuConvGrads<T>> {
    let d = Dims::new::<T>(cfg)?.allow_direct(direct_ok);
    check_len("dy", d.out_len(), dy.len())?;
    // The training-statistics rule (N·H'·W' > 1) was enforced by the forward.
    check_len("x_pre", d.g.input_len(), x_pre.len())?;
    check_len("w", d.g.weight_len(), w.len())?;
    params.iieu.check(d.g.c_out)?;
    params.psi.check(d.g.c_out, usize::MAX)?;
    if saved.cfg != *cfg {
        return Err(Error::Shape {
            what: "saved",
            msg: format!(
                "state was computed for {:?}, backward called with {:?}",
                saved.cfg, cfg
            ),
        });
    }
    if saved.mode != params.psi.mode() {
        return Err(Error::Shape {
            what: "saved",
            msg: format!(
                "state was computed with psi {:?}, backward called with {:?}",
                saved.mode,
                params.psi.mode()
            ),
        });
    }
    if saved.conv.len() != d.out_len() || saved.lin.len() != d.g.c_out {
        return Err(Error::Shape {
            what: "saved",
            msg: "saved state buffers do not match the config".into(),
        });
    }
    let g = d.g;
    let (n_, o_, po) = (g.n, g.c_out, d.po);

    // x = ψ(c), recomputed with the forward's expression (same bits, same branches).
    let mut x = vec![T::zero(); d.out_len()];
    x.par_chunks_mut(po)
        .zip(saved.conv.par_chunks(po))
        .enumerate()
        .for_each(|(no, (xp, cp))| {
            let l = saved.lin[no % o_];
            for (xv, &c) in xp.iter_mut().zip(cp) {
                *xv = l.apply(c);
            }
        });

    // IIEU-B backward: dx, dx_pre|r_x, dW|r_w, dγ̇, dβ̇, dη.
    let mut ig = IieuGrads::default();
    iieu::backward_into(cfg, dy, &x, x_pre, w, &params.iieu, &saved.iieu, &mut ig)?;
    drop(x);
    let IieuGrads {
        dx: mut dc,
        dx_pre: dx_pre_rx,
        dw: dw_rw,
        d_ln_weight,
        d_ln_bias,
        d_eta,
    } = ig;

    // ψ backward: per (n, o) partials [Σ dx, Σ dx·x̂], summed over n in order.
    let part: Vec<[f64; 2]> = dc
        .par_chunks(po)
        .zip(saved.conv.par_chunks(po))
        .enumerate()
        .map(|(no, (dp, cp))| {
            let l = saved.lin[no % o_];
            psi_partials(dp, cp, l.sub, l.k)
        })
        .collect();
    let mut s1 = vec![0.0f64; o_];
    let mut s2 = vec![0.0f64; o_];
    for n in 0..n_ {
        for o in 0..o_ {
            s1[o] += part[n * o_ + o][0];
            s2[o] += part[n * o_ + o][1];
        }
    }
    let to_t = |v: &[f64]| v.iter().map(|&a| T::of(a)).collect::<Vec<T>>();
    let (d_psi_scale, d_psi_shift) = match saved.mode {
        PsiMode::None => (Vec::new(), Vec::new()),
        PsiMode::Bias => (Vec::new(), to_t(&s1)),
        _ => (to_t(&s2), to_t(&s1)),
    };
    if saved.mode != PsiMode::None {
        let m = (n_ * po) as f64;
        let train = saved.mode == PsiMode::BnTrain;
        dc.par_chunks_mut(po)
            .zip(saved.conv.par_chunks(po))
            .enumerate()
            .for_each(|(no, (dp, cp))| {
                let o = no % o_;
                let l = saved.lin[o];
                let f = l.scale * l.k;
                if train {
                    let (m1, m2) = (s1[o] / m, s2[o] / m);
                    for (gv, &c) in dp.iter_mut().zip(cp) {
                        *gv = T::of(f * (gv.to_f64() - m1 - l.xhat(c.to_f64()) * m2));
                    }
                } else {
                    for gv in dp.iter_mut() {
                        *gv = T::of(f * gv.to_f64());
                    }
                }
            });
    }

    // Conv backward: dx_pre = dx_pre|r_x + dx_pre|conv, dW = dW|r_w + dW|conv.
    let mut dx_pre = dx_pre_rx;
    let mut dw = dw_rw;
    conv_backward_into(&d, &dc, x_pre, w, &mut dx_pre, &mut dw, true);

    Ok(IieuConvGrads {
        dx_pre,
        dw,
        d_ln_weight,
        d_ln_bias,
        d_eta,
        d_psi_scale,
        d_psi_shift,
    })
}

/// The bare convolution `c = conv(x_pre, W)` on the same code as [`forward`]'s step 1
/// (the same im2col tiles, `gemm` calls and per-sample rayon tasks) without the patch
/// norms, the statistics, ψ or IIEU-B — the baseline the fused op is measured against
/// (and a conv layer in its own right):
///
/// ```text
/// c[n,o,h',w'] = Σ_{cl < C/g, i < KH, j < KW} W[o,cl,i,j] · x_pre[n, grp(o)·C/g + cl,
///                                            h'·sh − ph + i·dh, w'·sw − pw + j·dw]
/// ```
///
/// with `grp(o) = o / (O/g)` and zero outside the image (PyTorch's `conv2d`, no bias).
/// `x_pre`: `(N, C, H, W)`, `w`: `(O, C/g, KH, KW)`; returns `c`, `(N, O, H', W')`. The
/// GEMM accumulates in `T`; the bits do not depend on the rayon thread count.
///
/// Errors: invalid geometry ([`Error::Geometry`], [`Error::Empty`]), `x_pre` or `w` of
/// the wrong length ([`Error::LengthMismatch`]); all checked before any work.
///
/// # Example (forward and backward)
///
/// ```
/// use activation_kernels::cpu::iieu_conv::{conv2d, conv2d_backward};
/// use activation_kernels::Conv2dGeometry;
///
/// let geo = Conv2dGeometry::new(1, 1, 3, 3, 1, 2, 2); // one 3×3 image, one 2×2 filter
/// let x_pre = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0];
/// let w = [1.0f32, 0.0, 0.0, -1.0]; // c[h', w'] = x[h', w'] − x[h' + 1, w' + 1]
/// assert_eq!(conv2d(&geo, &x_pre, &w)?, [-4.0; 4]);
///
/// // Backward of L = Σ c: dW[i, j] sums the taps each weight sees, dx_pre[h, w] the
/// // weights that see (h, w).
/// let (dx_pre, dw) = conv2d_backward(&geo, &[1.0; 4], &x_pre, &w)?;
/// assert_eq!(dw, [1.0 + 2.0 + 4.0 + 5.0, 2.0 + 3.0 + 5.0 + 6.0, 4.0 + 5.0 + 7.0 + 8.0, 5.0 + 6.0 + 8.0 + 9.0]);
/// assert_eq!(dx_pre, [1.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, -1.0, -1.0]);
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn conv2d<T: Real>(geo: &Conv2dGeometry, x_pre: &[T], w: &[T]) -> Result<Vec<T>> {
    conv2d_with(geo, x_pre, w, true)
}

/// [`conv2d`], with the 1×1 direct path allowed or not (see [`forward_with`]).
fn conv2d_with<T: Real>(
    geo: &Conv2dGeometry,
    x_pre: &[T],
    w: &[T],
    direct_ok: bool,
) -> Result<Vec<T>> {
    let d = Dims::conv::<T>(geo)?.allow_direct(direct_ok);
    check_len("x_pre", geo.input_len(), x_pre.len())?;
    check_len("w", geo.weight_len(), w.len())?;
    let mut c = vec![T::zero(); d.out_len()];
    c.par_chunks_mut(geo.c_out * d.po)
        .zip(x_pre.par_chunks(geo.c_in * d.pi))
        .for_each(|(cs, xs)| conv_sample(&d, xs, w, cs, |_, _, _, _, _| {}));
    Ok(c)
}

/// Backward of [`conv2d`] on the same code as [`backward`]'s conv step: from
/// `dc = ∂L/∂c` (`(N, O, H', W')`) returns `(dx_pre, dw)`,
///
/// ```text
/// dx_pre[n,c,h,w] = Σ dc[n,o,h',w'] · W[o,cl,i,j]   over o ∈ grp(c) and every (h',w',i,j)
///                                                   whose tap lands on (h, w)
/// dW[o,cl,i,j]    = Σ_{n,h',w'} dc[n,o,h',w'] · x_pre[n, grp(o)·C/g + cl, tap(h',i), tap(w',j)]
/// ```
///
/// (`cl = c mod C/g`; taps as in [`conv2d`], terms outside the image are 0).
/// `dx_pre` is a col2im of `dcᵀ·W_g` per sample and tile; `dW` sums `dc·col` per fixed
/// chunk of samples in `T`, then the chunks in order in f64: the bits do not depend on
/// the rayon thread count.
///
/// Errors: as [`conv2d`], plus a `dc` of the wrong length ([`Error::LengthMismatch`]).
///
/// Example: [`conv2d`]'s runs the forward and this backward.
pub fn conv2d_backward<T: Real>(
    geo: &Conv2dGeometry,
    dc: &[T],
    x_pre: &[T],
    w: &[T],
) -> Result<(Vec<T>, Vec<T>)> {
    conv2d_backward_with(geo, dc, x_pre, w, true)
}

/// [`conv2d_backward`], with the 1×1 direct path allowed or not (see [`forward_with`]).
fn conv2d_backward_with<T: Real>(
    geo: &Conv2dGeometry,
    dc: &[T],
    x_pre: &[T],
    w: &[T],
    direct_ok: bool,
) -> Result<(Vec<T>, Vec<T>)> {
    let d = Dims::conv::<T>(geo)?.allow_direct(direct_ok);
    check_len("dc", d.out_len(), dc.len())?;
    check_len("x_pre", geo.input_len(), x_pre.len())?;
    check_len("w", geo.weight_len(), w.len())?;
    let mut dx_pre = vec![T::zero(); x_pre.len()];
    let mut dw = vec![T::zero(); w.len()];
    conv_backward_into(&d, dc, x_pre, w, &mut dx_pre, &mut dw, false);
    Ok((dx_pre, dw))
}

/// Conv backward over the batch into `dx_pre` (`(N, C, H, W)`) and `dw`, shared by
/// [`backward`] and [`conv2d_backward`]: added to their values (`add`), or written over
/// them without reading them (`!add`: they may be fresh zeroed allocations, whose pages
/// must be written before they are read — a read maps the shared zero page, and the
/// write after it is a copy-on-write fault with a TLB shootdown on every core, which
/// cost the bare backward 25% of its time in a 2-core VM). Per fixed chunk of samples
/// ([`DW_CHUNKS`], independent of the thread count): each sample's `dx_pre|conv`
/// (col2im of `dcᵀ·W_g`, sequential inside the sample: no atomics), and the chunk's
/// `dW|conv` partial accumulated in `T`; then `dw[i] (+)= Σ_chunks partial[i]` in f64,
/// in chunk order.
fn conv_backward_into<T: Real>(
    d: &Dims,
    dc: &[T],
    x_pre: &[T],
    w: &[T],
    dx_pre: &mut [T],
    dw: &mut [T],
    add: bool,
) {
    let g = d.g;
    let (n_, in_len, out_len) = (g.n, g.c_in * d.pi, g.c_out * d.po);
    let per = n_.div_ceil(DW_CHUNKS.min(n_));
    let dw_parts: Vec<Vec<T>> = dx_pre
        .par_chunks_mut(per * in_len)
        .zip(x_pre.par_chunks(per * in_len))
        .zip(dc.par_chunks(per * out_len))
        .map(|((dxc, xc), dcc)| {
            let mut dwp = vec![T::zero(); w.len()];
            if d.direct {
                // No tiles: the GEMMs read x_pre and write (add) dx_pre as they lie.
                for ((dxs, xs), dcs) in dxc
                    .chunks_exact_mut(in_len)
                    .zip(xc.chunks_exact(in_len))
                    .zip(dcc.chunks_exact(out_len))
                {
                    conv_bwd_sample_direct(d, xs, w, dcs, dxs, &mut dwp, add);
                }
                return dwp;
            }
            let mut col = vec![T::zero(); d.tile * d.k];
            let mut dcol = vec![T::zero(); d.tile * d.k];
            let mut dxs_conv = vec![T::zero(); in_len];
            for ((dxs, xs), dcs) in dxc
                .chunks_exact_mut(in_len)
                .zip(xc.chunks_exact(in_len))
                .zip(dcc.chunks_exact(out_len))
            {
                dxs_conv.fill(T::zero());
                conv_bwd_sample(d, xs, w, dcs, &mut dxs_conv, &mut dwp, &mut col, &mut dcol);
                if add {
                    for (a, &b) in dxs.iter_mut().zip(&dxs_conv) {
                        *a = *a + b;
                    }
                } else {
                    dxs.copy_from_slice(&dxs_conv);
                }
            }
            dwp
        })
        .collect();
    dw.par_iter_mut().enumerate().for_each(|(i, v)| {
        let init = if add { v.to_f64() } else { 0.0 };
        let s = dw_parts.iter().fold(init, |a, p| a + p[i].to_f64());
        *v = T::of(s);
    });
}

/// Conv backward of one sample on the 1×1 direct path ([`Dims::direct`]): per group,
/// `dx_g (C/g × HW) (+)= W_gᵀ · dc_g` straight into the sample's `dxs` (added to it
/// when `add`, else written over it without reading it), and
/// `dwp_g += dc_g · x_gᵀ` (inner dimension `H'W' = HW`, the whole plane at once).
fn conv_bwd_sample_direct<T: Real>(
    d: &Dims,
    xs: &[T],
    w: &[T],
    dcs: &[T],
    dxs: &mut [T],
    dwp: &mut [T],
    add: bool,
) {
    let (po, k, og, pi) = (d.po, d.k, d.og, d.pi);
    for grp in 0..d.g.groups {
        let wg = &w[grp * og * k..(grp + 1) * og * k];
        let dcg = &dcs[grp * og * po..(grp + 1) * og * po];
        let xg = &xs[grp * k * pi..(grp + 1) * k * pi];
        // dx_g (C/g × HW) (+)= W_gᵀ (C/g × og) · dc_g (og × H'W')
        matmul(
            (k, po, og),
            &mut dxs[grp * k * pi..(grp + 1) * k * pi],
            Mat { rs: pi, cs: 1 },
            add,
            wg,
            Mat { rs: 1, cs: k },
            dcg,
            Mat { rs: po, cs: 1 },
        );
        // dW_g (og × C/g) += dc_g (og × H'W') · x_gᵀ (HW × C/g)
        matmul(
            (og, k, po),
            &mut dwp[grp * og * k..(grp + 1) * og * k],
            Mat { rs: k, cs: 1 },
            true,
            dcg,
            Mat { rs: po, cs: 1 },
            xg,
            Mat { rs: 1, cs: pi },
        );
    }
}

/// Conv backward of one sample: for each group and tile, rebuild the im2col tile,
/// `dcol = dcᵀ·W_g` scattered into `dxs` (col2im), and `dwp_g += dc·col`.
#[allow(clippy::too_many_arguments)]
fn conv_bwd_sample<T: Real>(
    d: &Dims,
    xs: &[T],
    w: &[T],
    dcs: &[T],
    dxs: &mut [T],
    dwp: &mut [T],
    col: &mut [T],
    dcol: &mut [T],
) {
    let (po, k, og) = (d.po, d.k, d.og);
    for grp in 0..d.g.groups {
        let wg = &w[grp * og * k..(grp + 1) * og * k];
        let dcg = &dcs[grp * og * po..(grp + 1) * og * po];
        let dwg = &mut dwp[grp * og * k..(grp + 1) * og * k];
        for p0 in (0..po).step_by(d.tile) {
            let tp = d.tile.min(po - p0);
            let (colt, dcolt) = (&mut col[..tp * k], &mut dcol[..tp * k]);
            d.im2col(xs, grp, p0, tp, colt);
            // dcol (tp × K) = dcᵀ (tp × og) · W_g (og × K)
            matmul(
                (tp, k, og),
                dcolt,
                Mat { rs: k, cs: 1 },
                false,
                &dcg[p0..],
                Mat { rs: 1, cs: po },
                wg,
                Mat { rs: k, cs: 1 },
            );
            d.col2im_add(dcolt, grp, p0, tp, dxs);
            // dW_g (og × K) += dc (og × tp) · col (tp × K)
            matmul(
                (og, k, tp),
                dwg,
                Mat { rs: k, cs: 1 },
                true,
                &dcg[p0..],
                Mat { rs: po, cs: 1 },
                colt,
                Mat { rs: k, cs: 1 },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NaN in `x_pre` gives a NaN `r_x` in exactly the windows whose patch contains it
    /// (SPEC §4: NaN propagates), for both patch norms — the fused im2col-row path
    /// (PerGroup; AllChannels undilated) and `cpu::iieu`'s window sum (AllChannels
    /// dilated) — and every other window of every sample keeps a finite `r_x`.
    #[test]
    fn nan_in_x_pre_gives_nan_r_x_in_its_windows() {
        let geos = [
            Conv2dGeometry::new(2, 4, 6, 5, 4, 3, 3)
                .with_padding(1, 1)
                .with_groups(2),
            Conv2dGeometry::new(2, 4, 9, 7, 4, 3, 2)
                .with_stride(2, 1)
                .with_padding(1, 0)
                .with_dilation(2, 1)
                .with_groups(2),
            Conv2dGeometry::new(2, 4, 6, 5, 4, 1, 1),
        ];
        // The NaN: sample 1, channel 1 (group 0), (h, w) = (3, 3).
        let (n0, c0, h0, w0) = (1, 1, 3, 3);
        for geo in geos {
            for pn in [PatchNorm::PerGroup, PatchNorm::AllChannels] {
                let cfg = IieuConfig::new(geo).with_patch_norm(pn);
                let mut x_pre: Vec<f64> = (0..geo.input_len())
                    .map(|i| ((i * 37 % 17) as f64 - 8.0) / 8.0)
                    .collect();
                x_pre[((n0 * geo.c_in + c0) * geo.h + h0) * geo.w + w0] = f64::NAN;
                let w: Vec<f64> = (0..geo.weight_len())
                    .map(|i| ((i * 13 % 11) as f64 - 5.0) / 5.0)
                    .collect();
                let mut p = IieuConvParams::init(geo.c_out, Psi::None);
                let (_, saved) = forward(&cfg, &x_pre, &w, &mut p).unwrap();
                let rx = saved.iieu().r_x();
                let (oh, ow) = geo.validate().unwrap();
                let gp = cfg.patch_groups();
                // PerGroup: dilated taps, group of c0 only; AllChannels: undilated taps.
                let (dh, dw) = match pn {
                    PatchNorm::PerGroup => geo.dilation,
                    PatchNorm::AllChannels => (1, 1),
                };
                let hits = |o: usize, k: usize, s: usize, pd: usize, dl: usize, len, at| {
                    (0..k).any(|i| Dims::tap(o, i, s, pd, dl, len) == Some(at))
                };
                let mut nans = 0;
                for n in 0..geo.n {
                    for t in 0..gp {
                        for ho in 0..oh {
                            for wo in 0..ow {
                                let inside = n == n0
                                    && (gp == 1 || t == c0 / geo.cin_per_group())
                                    && hits(ho, geo.kh, geo.stride.0, geo.padding.0, dh, geo.h, h0)
                                    && hits(wo, geo.kw, geo.stride.1, geo.padding.1, dw, geo.w, w0);
                                let v = rx[((n * gp + t) * oh + ho) * ow + wo];
                                let tag = format!("{geo:?} {pn:?} n{n} t{t} ({ho},{wo})");
                                if inside {
                                    assert!(v.is_nan(), "{tag}: r_x {v}, expected NaN");
                                    nans += 1;
                                } else {
                                    assert!(v.is_finite(), "{tag}: r_x {v}, expected finite");
                                }
                            }
                        }
                    }
                }
                assert!(nans > 0, "{geo:?} {pn:?}: the NaN is in no window");
            }
        }
    }

    /// 1×1 geometries on the direct path ([`Dims::direct`]): grouped, dilated (taps
    /// unaffected), ragged sizes, N = 9 > 8 `dW` chunks, several statistics tiles per
    /// plane (f64: K = 20 → 1024-pixel tiles over a 37² plane; K = 600 → 54-pixel tiles
    /// over 2×37 pixels, and K > the GEMM's 512-deep blocks), with whether every result
    /// has the tiled path's bits (`true`) or only the patch norms (`false`).
    ///
    /// The patch norms always have the same bits (same summands, same order). The GEMMs
    /// have the same operands on both paths but other shapes (one plane-wide product vs
    /// one per tile) and strides, and `gemm` picks its inner-dimension blocking by shape
    /// (K = 600: 512 + 88 for the tiles' n ≤ 64 products, its cache model for the
    /// plane's n = 74) and computes products of at most 16×16 outputs with horizontal
    /// dot-product kernels when the inner dimension is contiguous in both operands; so
    /// where the paths' GEMMs differ in these, the conv output (and all after it)
    /// differs in the last bits. The shapes marked `true` keep every GEMM above 16×16
    /// outputs and within one 512-deep block (or the same blocks).
    fn direct_geometries() -> Vec<(Conv2dGeometry, bool)> {
        vec![
            (
                Conv2dGeometry::new(2, 64, 5, 7, 24, 1, 1).with_groups(2),
                true,
            ),
            (
                Conv2dGeometry::new(2, 40, 7, 3, 30, 1, 1)
                    .with_groups(2)
                    .with_dilation(2, 3),
                true,
            ),
            (Conv2dGeometry::new(9, 20, 4, 6, 16, 1, 1), true),
            (Conv2dGeometry::new(2, 20, 37, 37, 16, 1, 1), true),
            (Conv2dGeometry::new(2, 600, 2, 37, 20, 1, 1), false),
            (
                Conv2dGeometry::new(3, 6, 5, 7, 9, 1, 1).with_groups(3),
                false,
            ),
        ]
    }

    fn filled<T: Real>(n: usize, seed: usize) -> Vec<T> {
        (0..n)
            .map(|i| T::of((((i * 7919 + seed * 104_729) % 2003) as f64 - 1001.0) / 600.0))
            .collect()
    }

    fn bits<T: Real>(v: &[T]) -> Vec<u64> {
        v.iter().map(|&a| Real::to_f64(a).to_bits()).collect()
    }

    /// Every result of the fused forward + backward and of the bare conv + backward, as
    /// bits, on the direct path (`direct_ok`) or forced onto the im2col tiles.
    fn all_bits<T: Real>(geo: Conv2dGeometry, pn: PatchNorm, direct_ok: bool) -> Vec<Vec<u64>> {
        assert!(
            Dims::conv::<T>(&geo).unwrap().direct,
            "{geo:?}: not a direct geometry"
        );
        let cfg = IieuConfig::new(geo).with_patch_norm(pn);
        let (oh, ow) = geo.validate().unwrap();
        let out = geo.n * geo.c_out * oh * ow;
        let x_pre = filled::<T>(geo.input_len(), 1);
        let w = filled::<T>(geo.weight_len(), 2);
        let dy = filled::<T>(out, 3);
        let psi = Psi::BatchNorm(BatchNorm {
            weight: filled(geo.c_out, 4),
            bias: filled(geo.c_out, 5),
            ..BatchNorm::init(geo.c_out)
        });
        let params = IieuConvParams {
            iieu: IieuParams {
                ln_weight: filled(geo.c_out, 6),
                ln_bias: filled(geo.c_out, 7),
                eta: filled::<T>(geo.c_out, 8)
                    .iter()
                    .map(|&e| T::of(Real::to_f64(e).abs() * 0.3))
                    .collect(),
            },
            psi,
        };
        let mut p = params.clone();
        let (y, saved) = forward_with(&cfg, &x_pre, &w, &mut p, direct_ok).unwrap();
        let g = backward_with(&cfg, &dy, &x_pre, &w, &params, &saved, direct_ok).unwrap();
        let c = conv2d_with(&geo, &x_pre, &w, direct_ok).unwrap();
        let (dx, dw) = conv2d_backward_with(&geo, &dy, &x_pre, &w, direct_ok).unwrap();
        let Psi::BatchNorm(bn) = &p.psi else {
            unreachable!()
        };
        vec![
            bits(&y),
            bits(saved.conv_out()),
            bits(saved.iieu().r_x()),
            bits(saved.batch_mean()),
            bits(saved.batch_var()),
            bits(&bn.running_mean),
            bits(&bn.running_var),
            bits(&g.dx_pre),
            bits(&g.dw),
            bits(&g.d_ln_weight),
            bits(&g.d_ln_bias),
            bits(&g.d_eta),
            bits(&g.d_psi_scale),
            bits(&g.d_psi_shift),
            bits(&c),
            bits(&dx),
            bits(&dw),
        ]
    }

    /// The 1×1 direct path gives the same bits as the im2col-tile path it replaces, for
    /// every output, saved state and gradient (f32 and f64, both patch norms), on the
    /// shapes where the two paths' GEMMs sum in the same order (see
    /// [`direct_geometries`]); on the others, the same patch norms `r_x`.
    #[test]
    fn direct_1x1_path_has_the_tiled_paths_bits() {
        let names = [
            "y",
            "conv",
            "r_x",
            "batch_mean",
            "batch_var",
            "running_mean",
            "running_var",
            "dx_pre",
            "dw",
            "dγ̇",
            "dβ̇",
            "dη",
            "dγ",
            "dβ",
            "bare c",
            "bare dx_pre",
            "bare dw",
        ];
        for (geo, every) in direct_geometries() {
            for pn in [PatchNorm::PerGroup, PatchNorm::AllChannels] {
                let diff = |a: Vec<Vec<u64>>, b: Vec<Vec<u64>>| {
                    names
                        .iter()
                        .zip(a.iter().zip(&b))
                        .filter(|(n, (x, y))| (every || **n == "r_x") && x != y)
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                };
                let d64 = diff(
                    all_bits::<f64>(geo, pn, true),
                    all_bits::<f64>(geo, pn, false),
                );
                assert!(
                    d64.is_empty(),
                    "f64 {geo:?} {pn:?}: {d64:?} differ from the tiles'"
                );
                let d32 = diff(
                    all_bits::<f32>(geo, pn, true),
                    all_bits::<f32>(geo, pn, false),
                );
                assert!(
                    d32.is_empty(),
                    "f32 {geo:?} {pn:?}: {d32:?} differ from the tiles'"
                );
            }
        }
    }
}
