//! IieuConv2d on the GPU — convolution, ψ and IIEU-B as one fused op: the device
//! mirror of [`crate::cpu::iieu_conv`] (same formula, names and argument order,
//! `stream` first). Kernels: `kernels/iieu_conv.cu` plus the IIEU-B kernels of
//! `kernels/iieu.cu`, which read `x = ψ(c)` through a per-channel vector so `x` is
//! never stored.
//!
//! ```text
//! c = conv(x_pre, W)        y = IIEU-B(ψ(c), x_pre, W)
//! ```
//!
//! # What is fused where
//! Forward (8 launches): filter norms `r_w`; **one implicit-GEMM convolution** that
//! reads `x_pre` and `W` through 64×64×16 shared-memory tiles and, in the same pass,
//! sums `‖P‖²` from the A tiles it already loaded (the zero padding adds nothing) and
//! writes per-(n, o, 64-pixel tile) `(mean, M2)` of `c` from its epilogue; `r_x` from
//! those sums (`AllChannels`: summed over the groups in order; with dilation > 1 its
//! undilated window is in no tile, so `r_x` comes from IIEU-B's two-kernel window sum
//! instead, as on the CPU); the per-(n, o) merge of the tile statistics; a per-channel
//! pass for ψ (BatchNorm batch statistics and running-stat update, `GAP(x) = ψ(GAP(c))`);
//! term-B's LayerNorm and ν; one elementwise pass `y = ς(ρ̂)·ψ(c)`.
//!
//! On compute capability ≥ 8.0 the f16 / bf16 convolution runs on tensor cores
//! (`iieu_conv_fwd_tc_*`: `mma.sync.m16n8k16` with f32 accumulation, `ldmatrix` from
//! swizzled shared stages, `W` and (1×1 stride-1 layers) `x_pre` by `cp.async`; the same
//! tiles, sums and statistics, see
//! docs/iieu-conv.md), and so do the data gradient (`iieu_conv_dgrad_tc_*`) and the
//! weight gradient (`iieu_conv_wgrad_tc_*`: the CUDA-core `iieu_conv_wgrad`'s tiles, f32
//! partials and ordered chunk sum, with the reduction split into more chunks where that
//! fills the GPU at no more than the operands' traffic, see `wgrad_splits_tc`);
//! on compute capability 7.5 – 7.x the f16 forward, data gradient and weight gradient
//! run the Turing forms (`iieu_conv_{fwd,dgrad,wgrad}_tc75_f16`: the same kernels with
//! two `mma.sync.m16n8k8` per k-step and every operand staged through registers, no
//! `cp.async`); f32, bf16 below 8.0 and older GPUs use the CUDA-core kernels. f32
//! storage can opt in to TF32 tensor cores for the three GEMMs on ≥ 8.0
//! (`iieu_conv_{fwd,dgrad,wgrad}_tc_tf32`; off by default, see [`set_allow_tf32`] for
//! the precision).
//!
//! Backward: IIEU-B's five backward kernels (reading `ψ(c)` the same way) give
//! `dx = ∂L/∂x`, the `r_x` path of `dx_pre`, the `r_w` path of `dW` and `dγ̇`, `dβ̇`,
//! `dη`; ψ's backward is two small reductions and one elementwise pass forming
//! `dc = A[o]·dx + B[o]·x̂ + C[o]` (`A = scale·k`; BatchNorm training also
//! `B = −A·mean(dx·x̂)`, `C = −A·mean(dx)`); the **data-gradient implicit GEMM** adds
//! the `r_x` path in its epilogue (f16 / bf16 on compute capability ≥ 8.0: on tensor
//! cores, `iieu_conv_dgrad_tc_*`, the forward's tiles and pipeline; `W` by `cp.async`
//! for 1×1 kernels, `dc` too for 1×1 stride-1 layers; f16 on 7.5 – 7.x: the Turing form
//! `iieu_conv_dgrad_tc75_f16`); the **weight-gradient implicit GEMM** writes f32
//! partials per fixed chunk of the `N·H'·W'` reduction (on tensor cores where the data
//! gradient is: `iieu_conv_wgrad_tc_*`, `iieu_conv_wgrad_tc75_f16`), summed in chunk
//! order with the `r_w` path added (no float atomics anywhere: bitwise reproducible).
//!
//! # Bytes per pass (`E` = N·O·H'·W' output elements, `s` = sizeof(T))
//! | pass | reads | writes |
//! |---|---|---|
//! | conv (fused) | `x_pre`, `W` (through L1/L2) | `c`: `s·E`; `‖P‖²`: 4 B per (n, g, pixel); stats: 8 B per (n, o, tile) |
//! | r_x, plane stats, ψ, LayerNorm | the above, O(N·O) | `r_x`, `‖P‖`: 8 B per patch-norm element; O(N·O) |
//! | adjuster | `c`: `s·E`, `r_x` | `y`: `s·E` |
//!
//! Against the unfused path (candle conv → BN → `cuda::iieu::forward`): the unfused
//! path also writes and reads BN's output (`2·s·E`), reads `x` once more for the GAP
//! (`s·E`), and reads `x_pre` twice more for the patch norms; BN itself reads `c`
//! twice (statistics, normalisation). So the fused forward moves `3·s·E` (c written,
//! c read, y written) of activation traffic against `≥ 7·s·E`.
//!
//! # Saved for backward ([`IieuConvDeviceSaved`])
//! `c` (`T` per output element), `r_x` and `‖P‖` (8 B per patch-norm element), `r_w`,
//! `‖W‖`, `lin` (16 B per channel), `ν`, `m̂` (8 B per (n, o)), `rstd` (per n).
//!
//! # Precision and limits
//! All arithmetic and accumulation is f32 (the CPU reference accumulates in f64); the
//! roundings to `T` are the stores of `c`, `x = ψ(c)` (recomputed identically by every
//! kernel), `y`, `dx`, `dc`, `dx_pre`, `dW`. BatchNorm's `momentum` and `eps` are used as
//! f32. Every dimension and plane size must fit in `i32`, and the grids in CUDA's limits
//! ([`Error::Shape`] otherwise). Unlike the CPU op, a negative running variance in eval
//! mode is not detected (that would need a device-to-host copy): it gives NaN, as in
//! PyTorch.
//!
//! # Errors
//! Every bad input is an `Err` before any allocation or launch: geometry
//! ([`Error::Geometry`], [`Error::Empty`], [`Error::Shape`]), lengths
//! ([`Error::LengthMismatch`]), BatchNorm `eps`/`momentum` out of domain and training
//! statistics over a single value ([`Error::InvalidParam`]), a backward whose config,
//! ψ or saved state do not match ([`Error::Shape`]).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, LaunchConfig, PushKernelArg};

use crate::cpu::iieu::{IieuConfig, PatchNorm};
use crate::cpu::iieu_conv::{IieuConvParams, Psi};
use crate::cuda::abi::ConvGeom;
use crate::cuda::handles::{compute_capability, kernel_fn};
use crate::cuda::iieu::{
    self as iieu_dev, elementwise, per_block, scratch, Dims, IieuDeviceParams, IieuDeviceSaved,
    Norms,
};
use crate::cuda::{grid_for, launcher, to_i32, ArgOpt, DType, DeviceInput, BLOCK};
use crate::error::{check_len, Error, Result};

/// GEMM tile rows / columns / depth and threads of `kernels/iieu_conv.cu`.
const TILE: usize = 64;
const TILE_K: usize = 16;
const GEMM_THREADS: u32 = 256;
/// Threads and depth of the tensor-core forward (`iieu_conv_fwd_tc_*`: 64×64×32 block
/// tiles, 4 warps of 32×32; its pixel and filter tiles are [`TILE`], as the CUDA-core
/// forward's, so the per-tile statistics mean the same). The tensor-core weight
/// gradient (`iieu_conv_wgrad_tc_*`) runs TC_THREADS threads on the CUDA-core weight
/// gradient's 64 × 64 tiles (32 pixels of the reduction per stage), with its own
/// chunk count (`ConvDims::wgrad_splits_tc`).
const TC_THREADS: u32 = 128;
const TC_TILE_K: usize = 32;

/// Which GEMM path the forward convolution, the data gradient and the weight gradient
/// take (see [`set_gemm_path`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmPath {
    /// Tensor cores for f16 / bf16 on compute capability ≥ 8.0 and for f16 on 7.5 – 7.x
    /// (the Turing form), else CUDA cores (the default). f32: TF32 tensor cores only
    /// under [`set_allow_tf32`].
    Auto,
    /// CUDA cores for every dtype and device.
    CudaCores,
    /// The sm_80 tensor-core kernels (`mma.sync.m16n8k16`) for f16 / bf16 wherever they
    /// can run (≥ 8.0, and a kernel image built for ≥ 8.0); CUDA cores elsewhere (never
    /// the Turing form), and for f32 unless [`set_allow_tf32`] (then TF32, as `Auto`).
    TensorCores,
    /// The Turing forms of the tensor-core forward, data gradient and weight gradient
    /// (`iieu_conv_{fwd,dgrad,wgrad}_tc75_f16`: `mma.sync.m16n8k8`, no `cp.async`) for
    /// f16 on any device with tensor cores (≥ 7.5), as [`GemmPath::Auto`] picks them on a
    /// 7.x device; everything else (bf16, f32) on CUDA cores.
    TuringTensorCores,
}

/// 0: Auto, 1: CudaCores, 2: TensorCores, 3: TuringTensorCores.
static GEMM_PATH: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Test hook: forces the GEMM path of the forward convolution, the data gradient and
/// the weight gradient ([`GemmPath::Auto`] restores the default); returns the previous
/// setting. Process-wide: the parity tests hold their device lock around it and restore
/// it. Both paths compute the same quantities (f32 accumulation; the sums are ordered
/// differently, so `c`, `dx_pre` and `dW` may differ in their last bits; each path alone
/// is bitwise reproducible).
#[doc(hidden)]
pub fn set_gemm_path(p: GemmPath) -> GemmPath {
    let v = match p {
        GemmPath::Auto => 0,
        GemmPath::CudaCores => 1,
        GemmPath::TensorCores => 2,
        GemmPath::TuringTensorCores => 3,
    };
    match GEMM_PATH.swap(v, std::sync::atomic::Ordering::SeqCst) {
        1 => GemmPath::CudaCores,
        2 => GemmPath::TensorCores,
        3 => GemmPath::TuringTensorCores,
        _ => GemmPath::Auto,
    }
}

/// TF32 opt-in: 0 not yet read from `AK_ALLOW_TF32`, 1 off, 2 on.
static ALLOW_TF32: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether f32-storage IieuConv2d may run its convolution GEMMs on TF32 tensor cores
/// (see [`set_allow_tf32`]). Initially `true` iff the environment variable
/// `AK_ALLOW_TF32` is `1` when first consulted; [`set_allow_tf32`] overrides it.
pub fn allow_tf32() -> bool {
    use std::sync::atomic::Ordering::SeqCst;
    match ALLOW_TF32.load(SeqCst) {
        1 => false,
        2 => true,
        _ => {
            let env = env_allow_tf32();
            // A concurrent set_allow_tf32 wins over the environment.
            match ALLOW_TF32.compare_exchange(0, if env { 2 } else { 1 }, SeqCst, SeqCst) {
                Ok(_) => env,
                Err(v) => v == 2,
            }
        }
    }
}

fn env_allow_tf32() -> bool {
    std::env::var("AK_ALLOW_TF32").is_ok_and(|v| v.trim() == "1")
}

/// Opts f32-storage IieuConv2d in to (or out of) TF32 tensor cores for its three
/// convolution GEMMs (forward, data gradient, weight gradient); returns the
/// previous setting. Process-wide, like PyTorch's `torch.backends.cuda.matmul.allow_tf32`
/// or candle's `set_gemm_reduced_precision_f32`; the initial value is `true` iff the
/// environment variable `AK_ALLOW_TF32` is `1`.
///
/// **Off by default**: f32 convolutions run on CUDA cores in exact f32 arithmetic (f32
/// products, f32 accumulation). With the opt-in on a device of compute capability ≥ 8.0
/// (and kernels compiled for ≥ 8.0) the GEMMs run on `mma.sync.m16n8k8.tf32`
/// (`iieu_conv_{fwd,dgrad,wgrad}_tc_tf32`): each operand element (`x_pre` and `W` for
/// `c = W ⋆ x_pre`; `dc` and `W` for `dx_pre`; `dc` and `x_pre` for `dW`) is rounded to
/// TF32 — 10 explicit mantissa bits, round to nearest (`cvt.rna`), relative error
/// ≤ 2⁻¹¹ per operand, so ≤ about 2⁻¹⁰ per product — and the products are accumulated
/// in f32. Each GEMM output then differs from the exact f32 result by up to about
/// 2⁻¹⁰·Σ|a·b| over its reduction (vs ~√K·2⁻²⁴ for CUDA cores), the usual precision of
/// TF32 training. The patch norms `‖P‖` and `r_x`, the filter norms, ψ, IIEU-B and
/// every other reduction stay exact f32 (`r_x` is bitwise the CUDA-core value), and the
/// weight gradient stays bitwise reproducible (the same fixed chunks and ordered sum).
/// f16 / bf16 storage is unaffected (always tensor cores on ≥ 8.0, see the module
/// documentation).
pub fn set_allow_tf32(on: bool) -> bool {
    match ALLOW_TF32.swap(if on { 2 } else { 1 }, std::sync::atomic::Ordering::SeqCst) {
        1 => false,
        2 => true,
        _ => env_allow_tf32(),
    }
}

/// Whether the forward convolution, the data gradient and the weight gradient of
/// storage dtype `T` run on
/// tensor cores on `stream`'s device:
/// f16 / bf16 on compute capability ≥ 8.0 (`mma.sync.m16n8k16`, `cp.async`), unless a
/// test forced [`GemmPath::CudaCores`] or [`GemmPath::TuringTensorCores`]. f32 takes
/// the CUDA-core path unless [`allow_tf32`] (then, on ≥ 8.0, the TF32 kernels
/// `iieu_conv_{fwd,dgrad,wgrad}_tc_tf32`). The loaded kernels must also have been
/// compiled for ≥ 8.0:
/// a build for sm_75 only (`AK_CUDA_ARCHS=75`) carries `compute_75` PTX, which a newer
/// driver JIT-compiles for an 8.x device with `__CUDA_ARCH__` = 750, where these
/// kernels' bodies are a trap — so the PTX version of the loaded function decides too.
fn use_tensor_cores<T: DType>(stream: &Arc<CudaStream>) -> Result<bool> {
    if matches!(GEMM_PATH.load(std::sync::atomic::Ordering::SeqCst), 1 | 3) {
        return Ok(false);
    }
    if T::NAME == "f32" && !allow_tf32() {
        return Ok(false);
    }
    sm80_tensor_cores(stream)
}

/// Whether the sm_80 tensor-core forms (`iieu_conv_*_tc_f16|bf16|tf32`) can run on
/// `stream`'s device: compute capability ≥ 8.0 and the loaded kernels compiled for a
/// virtual arch ≥ 8.0 (see [`use_tensor_cores`]). Public as a test hook: the parity
/// cases that force those forms skip themselves where this is false (a Turing GPU, or an
/// sm_75-only build). Errors: the driver's.
#[doc(hidden)]
pub fn sm80_tensor_cores(stream: &Arc<CudaStream>) -> Result<bool> {
    let (major, _) = compute_capability(stream)?;
    if major < 8 {
        return Ok(false);
    }
    let f = kernel_fn!(stream, "iieu_conv_fwd_tc_f16")?;
    Ok(f.ptx_version() >= 80)
}

/// Whether the forward convolution, the data gradient and the weight gradient of
/// storage dtype `T` run the Turing forms of the tensor-core kernels
/// (`iieu_conv_{fwd,dgrad,wgrad}_tc75_f16`; the three are built together, so the
/// forward's PTX version stands for all): f16 on compute capability 7.5 – 7.x (the
/// m16n8k8 shape; sm_75 has no bf16 `mma` and no `cp.async`), or forced by
/// [`GemmPath::TuringTensorCores`] on any device ≥ 7.5 — and, on a device ≥ 8.0 whose
/// loaded kernels were compiled for a virtual arch below 8.0 (see
/// [`use_tensor_cores`]), as the tensor-core kernels that can run there. Never under
/// [`GemmPath::CudaCores`] or [`GemmPath::TensorCores`].
fn use_turing_tensor_cores<T: DType>(stream: &Arc<CudaStream>) -> Result<bool> {
    let path = GEMM_PATH.load(std::sync::atomic::Ordering::SeqCst);
    if T::NAME != "f16" || matches!(path, 1 | 2) {
        return Ok(false);
    }
    let cc = compute_capability(stream)?;
    if cc < (7, 5) {
        return Ok(false);
    }
    let f = kernel_fn!(stream, "iieu_conv_fwd_tc75_f16")?;
    let ptx = f.ptx_version();
    Ok(ptx >= 75 && (path == 3 || cc.0 < 8 || ptx < 80))
}

/// The kernel of one of the three implicit GEMMs (`$stem`: `"iieu_conv_fwd"`,
/// `"iieu_conv_dgrad"` or `"iieu_conv_wgrad"`) for storage `$t` on this device and GEMM
/// path, and whether it is a tensor-core form (launched with [`TC_THREADS`] threads):
/// the Turing form where [`use_turing_tensor_cores`] says so, else the tensor-core form
/// where [`use_tensor_cores`] does (TF32 for f32 storage), else the CUDA-core kernel.
/// Evaluates to `Result<(CudaFunction, bool)>`.
macro_rules! gemm_kernel {
    ($stream:expr, $t:ty, $stem:literal) => {
        (|| -> Result<_> {
            let stream = $stream;
            let tc75 = use_turing_tensor_cores::<$t>(stream)?;
            let tc = tc75 || use_tensor_cores::<$t>(stream)?;
            let f = match (tc75, tc, <$t as DType>::NAME) {
                (true, _, _) => kernel_fn!(stream, concat!($stem, "_tc75_f16"))?,
                (false, true, "f16") => kernel_fn!(stream, concat!($stem, "_tc_f16"))?,
                (false, true, "f32") => kernel_fn!(stream, concat!($stem, "_tc_tf32"))?,
                (false, true, _) => kernel_fn!(stream, concat!($stem, "_tc_bf16"))?,
                (false, false, _) => kernel_fn!(stream, $stem, $t)?,
            };
            Ok((f, tc))
        })()
    };
}

/// The weight-gradient reduction is split until about this many blocks run (a fixed
/// number, not the device's SM count: the split, and so the bits, depend on the shape
/// only).
const WGRAD_BLOCKS: usize = 256;
/// At most this many weight-gradient chunks (bounds the f32 partial buffer).
const WGRAD_MAX_SPLITS: usize = 64;
/// The tensor-core weight gradient aims for this many blocks: two waves of an H100
/// (132 SMs) at the kernels' 4 resident 128-thread blocks per SM — issue 15's `fill`
/// target, which the CUDA-core split's 256 blocks miss at 4 warps per block. A fixed
/// number, so the split (and the bits) depend on the shape and the path only.
const WGRAD_TC_BLOCKS: usize = 1056;
/// At most this many tensor-core weight-gradient chunks (with the traffic bound of
/// `wgrad_splits_tc`, the partial buffer stays under half the operands' bytes).
const WGRAD_TC_MAX_SPLITS: usize = 512;

/// BatchNorm after the convolution, on the device (PyTorch `BatchNorm2d` semantics;
/// see [`crate::cpu::iieu_conv::BatchNorm`]). Vectors are f32 of length `O`.
#[derive(Debug, Clone)]
pub struct DeviceBatchNorm {
    /// `γ[o]`.
    pub weight: CudaSlice<f32>,
    /// `β[o]`.
    pub bias: CudaSlice<f32>,
    /// Running mean: read in eval mode, updated in training mode.
    pub running_mean: CudaSlice<f32>,
    /// Running (unbiased) variance: read in eval mode, updated in training mode.
    pub running_var: CudaSlice<f32>,
    /// Momentum in `[0, 1]`.
    pub momentum: f64,
    /// `eps > 0`.
    pub eps: f64,
    /// Training (batch statistics) or eval (running statistics).
    pub training: bool,
}

/// ψ on the device (see [`crate::cpu::iieu_conv::Psi`]).
#[derive(Debug, Clone)]
pub enum DevicePsi {
    /// `x = c`.
    None,
    /// `x = c + bias[o]`.
    Bias(CudaSlice<f32>),
    /// `x = scale[o]·c + shift[o]`.
    Affine {
        /// `a[o]`.
        scale: CudaSlice<f32>,
        /// `b[o]`.
        shift: CudaSlice<f32>,
    },
    /// BatchNorm in training or eval mode.
    BatchNorm(DeviceBatchNorm),
}

impl DevicePsi {
    /// Kernel mode: 0 none, 1 bias, 2 affine, 3 BatchNorm training, 4 BatchNorm eval.
    fn mode(&self) -> i32 {
        match self {
            DevicePsi::None => 0,
            DevicePsi::Bias(_) => 1,
            DevicePsi::Affine { .. } => 2,
            DevicePsi::BatchNorm(b) if b.training => 3,
            DevicePsi::BatchNorm(_) => 4,
        }
    }

    fn check(&self, o: usize, m: usize) -> Result<()> {
        match self {
            DevicePsi::None => Ok(()),
            DevicePsi::Bias(b) => check_len("psi bias", o, b.len()),
            DevicePsi::Affine { scale, shift } => {
                check_len("psi scale", o, scale.len())?;
                check_len("psi shift", o, shift.len())
            }
            DevicePsi::BatchNorm(bn) => {
                check_len("bn weight", o, bn.weight.len())?;
                check_len("bn bias", o, bn.bias.len())?;
                check_len("bn running_mean", o, bn.running_mean.len())?;
                check_len("bn running_var", o, bn.running_var.len())?;
                crate::cpu::iieu_conv::check_bn_scalars(bn.eps, bn.momentum, bn.training, m)
            }
        }
    }
}

/// Learnable parameters (and BatchNorm state) of an IieuConv2d on the device.
#[derive(Debug, Clone)]
pub struct IieuConvDeviceParams {
    /// IIEU-B's `γ̇`, `β̇`, `η`.
    pub iieu: IieuDeviceParams,
    /// ψ and its vectors.
    pub psi: DevicePsi,
}

impl IieuConvDeviceParams {
    /// Uploads host parameters (lengths are checked by [`forward`] / [`backward`]).
    pub fn from_host(stream: &Arc<CudaStream>, p: &IieuConvParams<f32>) -> Result<Self> {
        let psi = match &p.psi {
            Psi::None => DevicePsi::None,
            Psi::Bias(b) => DevicePsi::Bias(stream.clone_htod(b)?),
            Psi::Affine { scale, shift } => DevicePsi::Affine {
                scale: stream.clone_htod(scale)?,
                shift: stream.clone_htod(shift)?,
            },
            Psi::BatchNorm(bn) => DevicePsi::BatchNorm(DeviceBatchNorm {
                weight: stream.clone_htod(&bn.weight)?,
                bias: stream.clone_htod(&bn.bias)?,
                running_mean: stream.clone_htod(&bn.running_mean)?,
                running_var: stream.clone_htod(&bn.running_var)?,
                momentum: bn.momentum,
                eps: bn.eps,
                training: bn.training,
            }),
        };
        Ok(Self {
            iieu: IieuDeviceParams::from_host(stream, &p.iieu)?,
            psi,
        })
    }
}

/// What [`forward`] saves for [`backward`] (module docs: its memory).
#[derive(Debug, Clone)]
pub struct IieuConvDeviceSaved<T: DType> {
    cfg: IieuConfig,
    mode: i32,
    conv: CudaSlice<T>,
    lin: CudaSlice<f32>,
    batch_mean: Option<CudaSlice<f32>>,
    batch_var: Option<CudaSlice<f32>>,
    iieu: IieuDeviceSaved,
}

impl<T: DType> IieuConvDeviceSaved<T> {
    /// The config the state was computed for.
    pub fn config(&self) -> &IieuConfig {
        &self.cfg
    }
    /// The conv output `c` (before ψ), `(N, O, H', W')`.
    pub fn conv_out(&self) -> &CudaSlice<T> {
        &self.conv
    }
    /// The IIEU-B state (`r_w`, `r_x`, `ν`, `m̂`).
    pub fn iieu(&self) -> &IieuDeviceSaved {
        &self.iieu
    }
    /// BatchNorm training: the batch mean of `c` per channel; `None` otherwise.
    pub fn batch_mean(&self) -> Option<&CudaSlice<f32>> {
        self.batch_mean.as_ref()
    }
    /// BatchNorm training: the biased batch variance of `c` per channel; `None`
    /// otherwise.
    pub fn batch_var(&self) -> Option<&CudaSlice<f32>> {
        self.batch_var.as_ref()
    }
}

/// Gradients of every input and parameter (see [`crate::cpu::iieu_conv::IieuConvGrads`]).
#[derive(Debug)]
pub struct IieuConvDeviceGrads<T> {
    /// `∂L/∂x_pre`, `(N, C, H, W)` (through the conv and through `r_x`).
    pub dx_pre: CudaSlice<T>,
    /// `∂L/∂W`, `(O, C/g, KH, KW)` (through the conv and through `r_w`).
    pub dw: CudaSlice<T>,
    /// `∂L/∂γ̇`, `(O,)`.
    pub d_ln_weight: CudaSlice<f32>,
    /// `∂L/∂β̇`, `(O,)`.
    pub d_ln_bias: CudaSlice<f32>,
    /// `∂L/∂η`, `(O,)`.
    pub d_eta: CudaSlice<f32>,
    /// `∂L/∂a` (Affine) or `∂L/∂γ` (BatchNorm); `None` for None and Bias.
    pub d_psi_scale: Option<CudaSlice<f32>>,
    /// `∂L/∂bias` (Bias), `∂L/∂b` (Affine), `∂L/∂β` (BatchNorm); `None` for None.
    pub d_psi_shift: Option<CudaSlice<f32>>,
}

// ------------------------------------------------------------------------------------
// Internal geometry

struct ConvDims {
    d: Dims,
    g: ConvGeom,
    /// r_x from the forward GEMM's A tiles (else IIEU-B's window-sum kernels).
    fused_rx: bool,
    /// `(grid x, grid y)` of the forward, data-gradient and weight-gradient GEMMs.
    fwd_grid: (u32, u32),
    dgrad_grid: (u32, u32),
    wgrad_grid: (u32, u32),
    /// `N·H'·W'` (BatchNorm's count).
    m: usize,
}

fn grid_dim(what: &'static str, v: usize, max: usize) -> Result<u32> {
    if v > max {
        return Err(Error::Shape {
            what,
            msg: format!("{v} blocks exceed the CUDA grid limit {max}"),
        });
    }
    Ok(v as u32)
}

impl ConvDims {
    fn new(cfg: &IieuConfig) -> Result<Self> {
        let d = Dims::new(cfg)?;
        let geo = &cfg.geometry;
        let groups = geo.groups;
        let (cg, og) = (geo.cin_per_group(), geo.cout_per_group());
        let taps = geo.kh * geo.kw;
        let p = d.plane_out;
        let hw = geo.h * geo.w;
        let mtiles = p.div_ceil(TILE);
        // Index arithmetic in i32: the last 64-row tile of a plane and the last
        // 16-deep slab of either GEMM depth stay below 2^31.
        to_i32(
            "GEMM depth O/g·KH·KW",
            og.saturating_mul(taps)
                .saturating_add(TILE_K.max(TC_TILE_K)),
        )?;
        to_i32(
            "GEMM depth C/g·KH·KW",
            (d.g.w_per as usize).saturating_add(TILE_K.max(TC_TILE_K)),
        )?;
        to_i32("output plane H'·W'", p.saturating_add(TILE))?;
        to_i32("input plane H·W", hw.saturating_add(TILE))?;
        const X: usize = i32::MAX as usize;
        const Y: usize = 65_535;
        let fwd_grid = (
            grid_dim("forward grid x", geo.n.saturating_mul(mtiles), X)?,
            grid_dim("forward grid y", groups * og.div_ceil(TILE), Y)?,
        );
        let dgrad_grid = (
            grid_dim(
                "data-gradient grid x",
                geo.n.saturating_mul(hw.div_ceil(TILE)),
                X,
            )?,
            grid_dim("data-gradient grid y", groups * cg.div_ceil(TILE), Y)?,
        );
        let kdim = d.g.w_per as usize;
        let wgrad_grid = (
            grid_dim("weight-gradient grid x", groups * og.div_ceil(TILE), X)?,
            grid_dim("weight-gradient grid y", kdim.div_ceil(TILE), Y)?,
        );
        let fused_rx = match cfg.patch_norm {
            PatchNorm::PerGroup => true,
            PatchNorm::AllChannels => geo.dilation == (1, 1),
        };
        let g = ConvGeom {
            n: d.g.n,
            c: d.g.c,
            h: d.g.h,
            w: d.g.w,
            o: d.g.o,
            oh: d.g.oh,
            ow: d.g.ow,
            kh: d.g.kh,
            kw: d.g.kw,
            sh: d.g.sh,
            sw: d.g.sw,
            ph: d.g.ph,
            pw: d.g.pw,
            dh: to_i32("dilation", geo.dilation.0)?,
            dw: to_i32("dilation", geo.dilation.1)?,
            groups: to_i32("groups", groups)?,
            cg: to_i32("channels per group", cg)?,
            og: to_i32("channels per group", og)?,
            kdim: d.g.w_per,
            mtiles: to_i32("pixel tiles", mtiles)?,
            gp: d.g.gp,
            splits: 1,
        };
        Ok(Self {
            m: geo.n * p,
            d,
            g,
            fused_rx,
            fwd_grid,
            dgrad_grid,
            wgrad_grid,
        })
    }

    /// The weight-gradient split: enough chunks of the `N·H'·W'` reduction that about
    /// [`WGRAD_BLOCKS`] blocks run, at least one 16-pixel slab per chunk and at most
    /// [`WGRAD_MAX_SPLITS`]. A function of the shape only.
    fn wgrad_splits(&self) -> usize {
        let slabs = self.m.div_ceil(TILE_K);
        WGRAD_BLOCKS
            .div_ceil(self.wgrad_tiles())
            .clamp(1, WGRAD_MAX_SPLITS.min(slabs.max(1)))
    }

    /// 64 × 64 tiles of `dW` (the weight-gradient grid's x·y).
    fn wgrad_tiles(&self) -> usize {
        ((self.wgrad_grid.0 as usize) * (self.wgrad_grid.1 as usize)).max(1)
    }

    /// The tensor-core weight-gradient split for `elem`-byte storage: the CUDA-core
    /// split's, raised toward [`WGRAD_TC_BLOCKS`] blocks as long as the f32 partials
    /// (each chunk writes one per `dW` entry, the ordered sum reads it: 8 bytes) move no
    /// more bytes than the GEMM's operands (`dc`, `x_pre`) — the split may at most
    /// double the kernel's DRAM traffic, never more, to fill the GPU — with at most
    /// [`WGRAD_TC_MAX_SPLITS`] chunks and at least one 16-pixel slab per chunk. So a
    /// large-batch layer (a long reduction over `N·H'·W'`) splits into enough chunks for
    /// two waves, while a layer whose `dW` is as large as its activations keeps the
    /// CUDA-core split. A function of the shape and `elem` only.
    fn wgrad_splits_tc(&self, elem: usize) -> usize {
        let slabs = self.m.div_ceil(TILE_K).max(1);
        let operand_bytes = self
            .d
            .x_len
            .saturating_add(self.d.x_pre_len)
            .saturating_mul(elem);
        let traffic_cap = operand_bytes / self.d.w_len.max(1).saturating_mul(8);
        let want = WGRAD_TC_BLOCKS
            .div_ceil(self.wgrad_tiles())
            .min(traffic_cap)
            .min(WGRAD_TC_MAX_SPLITS)
            .min(slabs);
        self.wgrad_splits().max(want)
    }
}

/// Blocks a thread-per-item small pass aims for (two per H100 SM).
const SMALL_PASS_BLOCKS: usize = 264;

/// Launch of a thread-per-item small pass over `work` items (`iieu_conv_plane_stats`:
/// per-(n, o) planes; `iieu_conv_wgrad_reduce`: dW elements): blocks of [`BLOCK`]
/// threads, halved down to 64 while the grid has fewer than [`SMALL_PASS_BLOCKS`]
/// blocks, so that a pass of a few thousand items still reaches every SM (64-thread
/// blocks keep the theoretical occupancy: 16 / 32 resident blocks of 2 warps).
fn small_pass(work: usize) -> LaunchConfig {
    let mut block = BLOCK;
    while block > 64 && work.div_ceil(block as usize) < SMALL_PASS_BLOCKS {
        block /= 2;
    }
    LaunchConfig {
        grid_dim: (grid_for(work, block as usize), 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn gemm_launch((x, y): (u32, u32), z: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x, y, z),
        block_dim: (GEMM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Every geometry check [`forward`] and [`backward`] make on `cfg` (the 32-bit index
/// and grid limits), without a launch: for a caller that launches something before
/// [`forward`] (the burn backend widens the parameter pack first).
#[cfg_attr(not(feature = "burn-cuda"), allow(dead_code))]
pub(crate) fn check_config(cfg: &IieuConfig) -> Result<()> {
    ConvDims::new(cfg).map(|_| ())
}

fn check_inputs(
    cd: &ConvDims,
    x_pre_len: usize,
    w_len: usize,
    params: &IieuConvDeviceParams,
) -> Result<()> {
    check_len("x_pre", cd.d.x_pre_len, x_pre_len)?;
    check_len("w", cd.d.w_len, w_len)?;
    params.iieu.check(cd.d.o)?;
    params.psi.check(cd.d.o, cd.m)
}

// ------------------------------------------------------------------------------------
// Public API

/// IieuConv2d forward: `y = IIEU-B(ψ(conv(x_pre, W)), x_pre, W)` (see
/// [`crate::cpu::iieu_conv::forward`] for the formula; module docs for what is fused
/// where and what is saved).
///
/// `x_pre`: `(N, C, H, W)`, `w`: `(O, C/g, KH, KW)`, both `T`; returns `y` (`T`,
/// `(N, O, H', W')`) and the state [`backward`] needs. With BatchNorm in training mode
/// the running statistics in `params` are updated on the device (by the ψ pass, so a
/// driver error in a later launch can leave them updated); nothing else changes.
///
/// Errors: see the module docs; all checked before any allocation or launch.
///
/// # Example (forward and backward, against the CPU reference)
///
/// ```
/// use activation_kernels::cpu::iieu::IieuConfig;
/// use activation_kernels::cpu::iieu_conv::{BatchNorm, IieuConvParams, Psi};
/// use activation_kernels::cuda::{iieu_conv, real_driver_present, CudaContext};
/// use activation_kernels::{cpu, Conv2dGeometry};
/// use approx::assert_relative_eq;
///
/// # #[cfg(not(feature = "emulate"))]
/// # if !real_driver_present() { return Ok(()); } // no GPU and no emulator: nothing to run on
/// // Without a GPU, the emulated device (feature `emulate`) stands in for one.
/// #[cfg(feature = "emulate")]
/// if !real_driver_present() {
///     activation_kernels::emu::install().expect("the emulated device");
/// }
/// let stream = CudaContext::new(0)?.default_stream();
/// // 3×3 conv (padding 1), 2 → 2 channels, two 4×4 images, BatchNorm (training), IIEU-B.
/// let cfg = IieuConfig::new(Conv2dGeometry::new(2, 2, 4, 4, 2, 3, 3).with_padding(1, 1));
/// let x_pre: Vec<f32> = (0..64).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
/// let w: Vec<f32> = (0..36).map(|i| ((i * 5 % 13) as f32 - 6.0) / 8.0).collect();
/// let dy: Vec<f32> = (0..64).map(|i| ((i * 3 % 7) as f32 - 3.0) / 2.0).collect();
/// let mut params = IieuConvParams::init(2, Psi::BatchNorm(BatchNorm::init(2)));
///
/// let (xpd, wd, dyd) = (stream.clone_htod(&x_pre)?, stream.clone_htod(&w)?, stream.clone_htod(&dy)?);
/// let mut pd = iieu_conv::IieuConvDeviceParams::from_host(&stream, &params)?;
/// let (y, saved) = iieu_conv::forward(&stream, &cfg, &xpd, &wd, &mut pd)?; // updates running stats
/// let g = iieu_conv::backward(&stream, &cfg, &dyd, &xpd, &wd, &pd, &saved)?;
///
/// let (y_ref, saved_ref) = cpu::iieu_conv::forward(&cfg, &x_pre, &w, &mut params)?;
/// let g_ref = cpu::iieu_conv::backward(&cfg, &dy, &x_pre, &w, &params, &saved_ref)?;
/// let (Psi::BatchNorm(bn), iieu_conv::DevicePsi::BatchNorm(bn_dev)) = (&params.psi, &pd.psi) else {
///     unreachable!()
/// };
/// let pairs = [
///     (stream.clone_dtoh(&y)?, y_ref),
///     (stream.clone_dtoh(&bn_dev.running_mean)?, bn.running_mean.clone()),
///     (stream.clone_dtoh(&g.dx_pre)?, g_ref.dx_pre),
///     (stream.clone_dtoh(&g.dw)?, g_ref.dw),
///     (stream.clone_dtoh(g.d_psi_scale.as_ref().unwrap())?, g_ref.d_psi_scale),
///     (stream.clone_dtoh(&g.d_eta)?, g_ref.d_eta),
/// ];
/// for (gpu, reference) in pairs {
///     for (a, b) in gpu.iter().zip(&reference) {
///         // f32 on both sides, different summation orders; the parity suites
///         // (tests/parity_*.rs) hold the tight bounds against an f64 reference.
///         assert_relative_eq!(a, b, epsilon = 1e-4, max_relative = 1e-4);
///     }
/// }
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn forward<T: DType>(
    stream: &Arc<CudaStream>,
    cfg: &IieuConfig,
    x_pre: &impl DeviceInput<T>,
    w: &impl DeviceInput<T>,
    params: &mut IieuConvDeviceParams,
) -> Result<(CudaSlice<T>, IieuConvDeviceSaved<T>)> {
    let cd = ConvDims::new(cfg)?;
    let (xpv, wv) = (x_pre.view(), w.view());
    check_inputs(&cd, xpv.len(), wv.len(), params)?;
    let d = &cd.d;
    let g = cd.g;
    let no = d.n * d.o;
    let mt = g.mtiles as usize;

    let (r_w, w_norm) = iieu_dev::launch_filter_norm(stream, d, &wv)?;

    // The fused convolution.
    let mut conv = scratch::<T>(stream, d.x_len)?;
    let sq_len = d.n * cfg.geometry.groups * d.plane_out;
    let mut sq = if cd.fused_rx {
        Some(scratch::<f32>(stream, sq_len)?)
    } else {
        None
    };
    let mut st_mean = scratch::<f32>(stream, no * mt)?;
    let mut st_m2 = scratch::<f32>(stream, no * mt)?;
    let (f, tc) = gemm_kernel!(stream, T, "iieu_conv_fwd")?;
    let mut b = launcher(stream, &f);
    b.arg(&xpv)
        .arg(&wv)
        .arg(&mut conv)
        .arg_opt(sq.as_mut())
        .arg(&mut st_mean)
        .arg(&mut st_m2)
        .arg(&g);
    // SAFETY: block (n·mtiles + mt, grp·ntiles + nt) reads x_pre of sample n < N at
    // channels grp·C/g + cl < C and in-image taps only (bounds checked per tap;
    // x_pre.len() = N·C·H·W validated), W rows grp·O/g + o < O with o < O/g and
    // k < C/g·KH·KW (w.len() validated); it writes c at (n·O + grp·O/g + o)·P + p with
    // o < O/g, p < P (every c element is written by exactly one block), stats at
    // (n·O + grp·O/g + o)·mtiles + mt (all N·O·mtiles written), and sq[(n·g + grp)·P + p]
    // (all N·g·P written by the nt = 0 blocks) when sq is given. The tensor-core kernels
    // (f16 / bf16, and f32 under the TF32 opt-in as iieu_conv_fwd_tc_tf32;
    // iieu_conv_fwd_tc_* chosen only on compute capability ≥ 8.0, the
    // arch its body is compiled for, iieu_conv_fwd_tc75_f16 only for f16 on ≥ 7.5, where
    // m16n8k8 and ldmatrix exist) have the same grid, reads and writes, with TC_THREADS
    // threads.
    let cfg_fwd = if tc {
        LaunchConfig {
            block_dim: (TC_THREADS, 1, 1),
            ..gemm_launch(cd.fwd_grid, 1)
        }
    } else {
        gemm_launch(cd.fwd_grid, 1)
    };
    unsafe { b.launch(cfg_fwd) }?;

    let (r_x, x_norm) = match &sq {
        Some(sq) => {
            let mut r_x = scratch::<f32>(stream, d.rx_len)?;
            let mut x_norm = scratch::<f32>(stream, d.rx_len)?;
            let f = kernel_fn!(stream, "iieu_conv_rx")?;
            let mut b = launcher(stream, &f);
            b.arg(sq).arg(&mut x_norm).arg(&mut r_x).arg(&g);
            // SAFETY: threads cover e < N·G'·P = r_x.len() = x_norm.len() (all written);
            // sq is read at e (G' = g) or (n·g + grp)·P + p < N·g·P = sq.len().
            unsafe { b.launch(elementwise(d.rx_len, 1)) }?;
            (r_x, x_norm)
        }
        None => iieu_dev::launch_patch_norm(stream, d, &xpv)?,
    };

    // Per-(n, o) statistics of c.
    let mut mean_c = scratch::<f32>(stream, no)?;
    let mut m2_c = scratch::<f32>(stream, no)?;
    let f = kernel_fn!(stream, "iieu_conv_plane_stats")?;
    let mut b = launcher(stream, &f);
    b.arg(&st_mean)
        .arg(&st_m2)
        .arg(&mut mean_c)
        .arg(&mut m2_c)
        .arg(&g);
    // SAFETY: threads cover no < N·O (mean_c, m2_c: all written), reading
    // no·mtiles + mt < N·O·mtiles (the forward wrote all of st_mean, st_m2).
    unsafe { b.launch(small_pass(no)) }?;

    // ψ per channel, GAP(x).
    let mode = params.psi.mode();
    let mut lin = scratch::<f32>(stream, 4 * d.o)?;
    let mut m = scratch::<f32>(stream, no)?;
    let training = mode == 3;
    let mut batch_mean = if training {
        Some(scratch::<f32>(stream, d.o)?)
    } else {
        None
    };
    let mut batch_var = if training {
        Some(scratch::<f32>(stream, d.o)?)
    } else {
        None
    };
    let (mut momentum, mut bn_eps) = (0.0f32, 1.0f32);
    let f = kernel_fn!(stream, "iieu_conv_psi")?;
    let mut b = launcher(stream, &f);
    b.arg(&mean_c).arg(&m2_c).arg(&mode);
    match &mut params.psi {
        DevicePsi::None => {
            b.arg_opt(None::<&CudaSlice<f32>>)
                .arg_opt(None::<&CudaSlice<f32>>)
                .arg_opt(None::<&mut CudaSlice<f32>>)
                .arg_opt(None::<&mut CudaSlice<f32>>);
        }
        DevicePsi::Bias(bias) => {
            b.arg_opt(None::<&CudaSlice<f32>>)
                .arg(&*bias)
                .arg_opt(None::<&mut CudaSlice<f32>>)
                .arg_opt(None::<&mut CudaSlice<f32>>);
        }
        DevicePsi::Affine { scale, shift } => {
            b.arg(&*scale)
                .arg(&*shift)
                .arg_opt(None::<&mut CudaSlice<f32>>)
                .arg_opt(None::<&mut CudaSlice<f32>>);
        }
        DevicePsi::BatchNorm(bn) => {
            momentum = bn.momentum as f32;
            bn_eps = bn.eps as f32;
            b.arg(&bn.weight)
                .arg(&bn.bias)
                .arg(&mut bn.running_mean)
                .arg(&mut bn.running_var);
        }
    }
    b.arg(&momentum)
        .arg(&bn_eps)
        .arg(&mut lin)
        .arg_opt(batch_mean.as_mut())
        .arg_opt(batch_var.as_mut())
        .arg(&mut m)
        .arg(&g);
    // SAFETY: threads cover o < O; they read mean_c/m2_c at n·O + o < N·O and the ψ
    // vectors at o (each given for exactly the modes that read it, lengths O
    // validated); they write lin[4·o .. 4·o + 4) (all 4·O), m[n·O + o] (all N·O), and in
    // training mode bmean/bvar[o] (all O) and running_mean/var[o] in place.
    unsafe { b.launch(elementwise(d.o, 1)) }?;

    let norms = Norms {
        r_w,
        w_norm,
        r_x,
        x_norm,
    };
    let (y, iieu) = iieu_dev::finish_forward(
        stream,
        cfg,
        d,
        &conv.as_view(),
        Some(&lin),
        &m,
        &params.iieu,
        norms,
    )?;
    Ok((
        y,
        IieuConvDeviceSaved {
            cfg: *cfg,
            mode,
            conv,
            lin,
            batch_mean,
            batch_var,
            iieu,
        },
    ))
}

/// IieuConv2d backward (see [`crate::cpu::iieu_conv::backward`] for the gradient
/// formulas; module docs for the passes). `dy`: `(N, O, H', W')`; `x_pre`, `w`,
/// `params` as given to [`forward`] (BatchNorm eval uses the statistics saved by the
/// forward). Returns the gradient of every input and parameter.
///
/// Errors: as [`forward`], plus a wrong `dy` length ([`Error::LengthMismatch`]) and a
/// `saved` from another config or ψ ([`Error::Shape`]).
///
/// Example: [`forward`]'s runs the forward and this backward on the device.
pub fn backward<T: DType>(
    stream: &Arc<CudaStream>,
    cfg: &IieuConfig,
    dy: &impl DeviceInput<T>,
    x_pre: &impl DeviceInput<T>,
    w: &impl DeviceInput<T>,
    params: &IieuConvDeviceParams,
    saved: &IieuConvDeviceSaved<T>,
) -> Result<IieuConvDeviceGrads<T>> {
    let mut cd = ConvDims::new(cfg)?;
    let (dyv, xpv, wv) = (dy.view(), x_pre.view(), w.view());
    check_len("dy", cd.d.x_len, dyv.len())?;
    check_inputs(&cd, xpv.len(), wv.len(), params)?;
    if saved.cfg != *cfg {
        return Err(Error::Shape {
            what: "saved",
            msg: format!(
                "state was computed for {:?}, backward called with {:?}",
                saved.cfg, cfg
            ),
        });
    }
    let mode = params.psi.mode();
    if saved.mode != mode {
        return Err(Error::Shape {
            what: "saved",
            msg: format!(
                "state was computed with psi mode {}, backward called with mode {mode}",
                saved.mode
            ),
        });
    }
    if saved.conv.len() != cd.d.x_len || saved.lin.len() != 4 * cd.d.o {
        return Err(Error::Shape {
            what: "saved",
            msg: "saved state buffers do not match the config".into(),
        });
    }
    iieu_dev::check_saved(&cd.d, cfg, &saved.iieu)?;
    let (wgrad_f, tc) = gemm_kernel!(stream, T, "iieu_conv_wgrad")?;
    let splits = if tc {
        cd.wgrad_splits_tc(std::mem::size_of::<T>())
    } else {
        cd.wgrad_splits()
    };
    cd.g.splits = to_i32("weight-gradient splits", splits)?;
    let d = &cd.d;
    let g = cd.g;

    // IIEU-B backward with x = ψ(c) read through lin.
    let ig = iieu_dev::backward_core(
        stream,
        d,
        (dyv, saved.conv.as_view(), xpv.slice(..), wv.slice(..)),
        Some(&saved.lin),
        &params.iieu,
        &saved.iieu,
    )?;

    // ψ backward. None: dc = dx, nothing to form. Otherwise stage 1: per-(n, o)
    // [Σ dx, Σ dx·x̂]; stage 2: dψ and the dc coefficients; then dc = A·dx + B·x̂ + C.
    let (d_scale, d_shift, dc_own) = if mode == 0 {
        (None, None, None)
    } else {
        let (a, b, dc) = psi_backward::<T>(stream, d, &g, mode, &ig.dx, saved)?;
        (a, b, Some(dc))
    };
    let dc = dc_own.as_ref().unwrap_or(&ig.dx);

    // dx_pre = conv-transpose(dc, W) + the r_x path.
    let dx_pre = launch_dgrad(stream, &cd, &dc.as_view(), &wv, Some(&ig.dx_pre.as_view()))?;

    // dW: per-chunk partials, then the ordered sum + the r_w path.
    let mut part = scratch::<f32>(stream, splits * d.w_len)?;
    let mut b = launcher(stream, &wgrad_f);
    b.arg(dc).arg(&xpv).arg(&mut part).arg(&g);
    // SAFETY: block (grp·otiles + ot, kt, s) reads dc at (n·O + grp·O/g + o)·P + p
    // (o < O/g, n·P + p < N·P) and x_pre at in-image taps of sample n < N, channel
    // grp·C/g + cl < C; it writes part[s·O·K + (grp·O/g + o)·K + k] for o < O/g,
    // k < K — with all (s, grp, ot, kt) every element of the splits·O·K buffer once.
    // The tensor-core kernels (f16 / bf16, or tf32 for f32 under the opt-in;
    // iieu_conv_wgrad_tc_* chosen only on compute capability ≥ 8.0, the arch its body is
    // compiled for, iieu_conv_wgrad_tc75_f16 only for f16 on ≥ 7.5, where m16n8k8 and
    // ldmatrix exist) have the same grid, reads and writes, with TC_THREADS threads and
    // their own `splits` (the part buffer above is sized by it).
    let cfg_wgrad = if tc {
        LaunchConfig {
            block_dim: (TC_THREADS, 1, 1),
            ..gemm_launch(cd.wgrad_grid, splits as u32)
        }
    } else {
        gemm_launch(cd.wgrad_grid, splits as u32)
    };
    unsafe { b.launch(cfg_wgrad) }?;
    let mut dw = scratch::<T>(stream, d.w_len)?;
    let f = kernel_fn!(stream, "iieu_conv_wgrad_reduce", T)?;
    let mut b = launcher(stream, &f);
    b.arg(&part).arg(&ig.dw).arg(&mut dw).arg(&g);
    // SAFETY: threads cover e < O·K (dw, add: length O·K; all dw written), reading
    // part[s·O·K + e] for s < splits.
    unsafe { b.launch(small_pass(d.w_len)) }?;

    Ok(IieuConvDeviceGrads {
        dx_pre,
        dw,
        d_ln_weight: ig.d_ln_weight,
        d_ln_bias: ig.d_ln_bias,
        d_eta: ig.d_eta,
        d_psi_scale: d_scale,
        d_psi_shift: d_shift,
    })
}

/// The data-gradient implicit GEMM `dx_pre = conv-transpose(dc, W) + add` (`add`: the
/// `r_x` path, or none), on tensor cores where [`use_turing_tensor_cores`] (the Turing
/// form) or [`use_tensor_cores`] says so (the forward's switches), else on CUDA cores. Lengths validated by the caller: `dc` is
/// `N·O·H'·W'`, `w` `O·C/g·KH·KW`, `add` `N·C·H·W`.
fn launch_dgrad<T: DType>(
    stream: &Arc<CudaStream>,
    cd: &ConvDims,
    dc: &CudaView<'_, T>,
    w: &CudaView<'_, T>,
    add: Option<&CudaView<'_, T>>,
) -> Result<CudaSlice<T>> {
    let mut dx_pre = scratch::<T>(stream, cd.d.x_pre_len)?;
    let (f, tc) = gemm_kernel!(stream, T, "iieu_conv_dgrad")?;
    let mut b = launcher(stream, &f);
    b.arg(dc).arg(w).arg_opt(add).arg(&mut dx_pre).arg(&cd.g);
    // SAFETY: block (n·itiles + it, grp·ctiles + ct) reads dc of sample n at channels
    // grp·O/g + ol < O and in-range (ho, wo) only (checked per tap), W at
    // ((grp·O/g + ol)·C/g + c')·KH·KW + t < O·C/g·KH·KW = w.len(), add (N·C·H·W) when
    // given; it writes dx_pre[(n·C + grp·C/g + c')·H·W + q] for c' < C/g, q < H·W —
    // every element exactly once. The tensor-core kernels (f16 / bf16, or tf32 for f32
    // under the opt-in; iieu_conv_dgrad_tc_* chosen only on compute capability ≥ 8.0,
    // the arch its body is compiled for, iieu_conv_dgrad_tc75_f16 only for f16 on ≥ 7.5,
    // where m16n8k8 and ldmatrix exist) have the same grid, reads and writes, with
    // TC_THREADS threads.
    let cfg = if tc {
        LaunchConfig {
            block_dim: (TC_THREADS, 1, 1),
            ..gemm_launch(cd.dgrad_grid, 1)
        }
    } else {
        gemm_launch(cd.dgrad_grid, 1)
    };
    unsafe { b.launch(cfg) }?;
    Ok(dx_pre)
}

/// Test hook: the number of chunks [`backward`] splits the weight gradient's `N·H'·W'`
/// reduction into for `cfg`, on the tensor-core path (`tensor_cores`, storage of
/// `elem_bytes` bytes) or the CUDA-core one (which ignores `elem_bytes`). Errors: the
/// geometry's.
#[doc(hidden)]
pub fn wgrad_splits(cfg: &IieuConfig, tensor_cores: bool, elem_bytes: usize) -> Result<usize> {
    let cd = ConvDims::new(cfg)?;
    Ok(if tensor_cores {
        cd.wgrad_splits_tc(elem_bytes)
    } else {
        cd.wgrad_splits()
    })
}

/// Test hook: the data-gradient GEMM of [`backward`] alone, `dx_pre =
/// conv-transpose(dc, W) + add` rounded to `T`, on the path [`set_gemm_path`] selects
/// (the same launch as [`backward`]'s). `dc`: `(N, O, H', W')`, `w`: `(O, C/g, KH, KW)`,
/// `add`: `(N, C, H, W)` or none. Errors: the geometry's, and any length mismatch.
#[doc(hidden)]
pub fn dgrad_gemm<T: DType>(
    stream: &Arc<CudaStream>,
    cfg: &IieuConfig,
    dc: &impl DeviceInput<T>,
    w: &impl DeviceInput<T>,
    add: Option<&CudaSlice<T>>,
) -> Result<CudaSlice<T>> {
    let cd = ConvDims::new(cfg)?;
    let (dcv, wv) = (dc.view(), w.view());
    check_len("dc", cd.d.x_len, dcv.len())?;
    check_len("w", cd.d.w_len, wv.len())?;
    if let Some(a) = add {
        check_len("add", cd.d.x_pre_len, a.len())?;
    }
    let addv = add.map(|a| a.as_view());
    launch_dgrad(stream, &cd, &dcv, &wv, addv.as_ref())
}

/// `(dψ scale, dψ shift, dc)`.
type PsiGrads<T> = (Option<CudaSlice<f32>>, Option<CudaSlice<f32>>, CudaSlice<T>);

/// ψ's backward for modes 1–4 (bias, affine, BatchNorm train / eval): `(dψ scale,
/// dψ shift, dc)` from `dx`, three launches. Lengths validated by the caller.
fn psi_backward<T: DType>(
    stream: &Arc<CudaStream>,
    d: &Dims,
    g: &ConvGeom,
    mode: i32,
    dx: &CudaSlice<T>,
    saved: &IieuConvDeviceSaved<T>,
) -> Result<PsiGrads<T>> {
    let no = d.n * d.o;
    // Stage 1: per-(n, o) [Σ dx, Σ dx·x̂].
    let mut part2 = scratch::<f32>(stream, 2 * no)?;
    let f = kernel_fn!(stream, "iieu_conv_psi_bwd_sums", T)?;
    let mut b = launcher(stream, &f);
    b.arg(dx)
        .arg(&saved.conv)
        .arg(&saved.lin)
        .arg(&mut part2)
        .arg(g);
    // SAFETY: blocks grid-stride over planes no < N·O, reading dx/c[no·P .. (no+1)·P)
    // (both N·O·P long) and lin[4·o ..] (4·O); writing part2[2·no], part2[2·no + 1]
    // (all 2·N·O).
    unsafe { b.launch(per_block(no, d.plane_out)) }?;

    // Stage 2: dψ and the dc coefficients.
    // Every mode here has a shift (bias, b, β); affine and BatchNorm a scale.
    let mut d_scale = if matches!(mode, 2..=4) {
        Some(scratch::<f32>(stream, d.o)?)
    } else {
        None
    };
    let mut d_shift = Some(scratch::<f32>(stream, d.o)?);
    let mut coef = scratch::<f32>(stream, 3 * d.o)?;
    let f = kernel_fn!(stream, "iieu_conv_psi_bwd_params")?;
    let mut b = launcher(stream, &f);
    b.arg(&part2)
        .arg(&saved.lin)
        .arg(&mode)
        .arg_opt(d_scale.as_mut())
        .arg_opt(d_shift.as_mut())
        .arg(&mut coef)
        .arg(g);
    // SAFETY: threads cover o < O, reading part2 at 2·(n·O + o) + 1 < 2·N·O and
    // lin[4·o + 2] < 4·O; writing coef[3·o .. 3·o + 3) (all 3·O) and d_scale[o],
    // d_shift[o] when given (length O).
    unsafe { b.launch(elementwise(d.o, 1)) }?;

    // dc = A·dx + B·x̂ + C.
    let mut dc = scratch::<T>(stream, d.x_len)?;
    let f = kernel_fn!(stream, "iieu_conv_dc", T)?;
    let mut b = launcher(stream, &f);
    b.arg(dx)
        .arg(&saved.conv)
        .arg(&saved.lin)
        .arg(&coef)
        .arg(&mut dc)
        .arg(g);
    // SAFETY: threads cover e < N·O·P (dx, c, dc: all dc written); lin/coef at
    // o = (e / P) % O < O.
    unsafe { b.launch(elementwise(d.x_len, 1)) }?;

    Ok((d_scale, d_shift, dc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Conv2dGeometry;

    #[test]
    fn dims_and_splits_depend_on_the_shape_only() {
        // ResNet-50 stage-4 3x3: 512 -> 512 at 7x7, N = 32.
        let geo = Conv2dGeometry::new(32, 512, 7, 7, 512, 3, 3).with_padding(1, 1);
        let cd = ConvDims::new(&IieuConfig::new(geo)).unwrap();
        assert_eq!(cd.g.kdim, 512 * 9);
        assert_eq!(cd.g.mtiles, 1);
        assert_eq!(cd.fwd_grid, (32, 8));
        assert_eq!(cd.dgrad_grid, (32, 8));
        assert_eq!(cd.wgrad_grid, (8, 72));
        assert_eq!(cd.wgrad_splits(), 1);
        // Tensor cores: 576 tiles want 2 chunks, but the f32 partials of a 2.36 M-entry
        // dW (18.9 MB a chunk) outweigh dc + x_pre (2 × 1.6 MB in f16): no more chunks.
        assert_eq!(cd.wgrad_splits_tc(2), 1);
        // At N = 256 the operands are 25.7 MB: still one chunk (cap 1).
        let geo = Conv2dGeometry::new(256, 512, 7, 7, 512, 3, 3).with_padding(1, 1);
        let cd = ConvDims::new(&IieuConfig::new(geo)).unwrap();
        assert_eq!(cd.wgrad_splits_tc(2), 1);
        // ResNet-50 stage-3 3x3 at N = 256: 144 tiles, ⌈1056 / 144⌉ = 8 chunks wanted,
        // the traffic cap is ⌊51.4 MB / 4.72 MB⌋ = 10: 8 chunks (1152 blocks), where the
        // CUDA-core split takes ⌈256 / 144⌉ = 2.
        let geo = Conv2dGeometry::new(256, 256, 14, 14, 256, 3, 3).with_padding(1, 1);
        let cd = ConvDims::new(&IieuConfig::new(geo)).unwrap();
        assert_eq!(cd.wgrad_tiles(), 144);
        assert_eq!(cd.wgrad_splits(), 2);
        assert_eq!(cd.wgrad_splits_tc(2), 8);
        // ... and at N = 32 the cap is 1: the CUDA-core split stands.
        let geo = Conv2dGeometry::new(32, 256, 14, 14, 256, 3, 3).with_padding(1, 1);
        let cd = ConvDims::new(&IieuConfig::new(geo)).unwrap();
        assert_eq!(cd.wgrad_splits_tc(2), cd.wgrad_splits());
        // A 1x1 56x56 256 -> 64 layer at N = 256: 4 tiles want 264 chunks, far under
        // the traffic cap: 264 (1056 blocks; the CUDA-core split stops at 64).
        let geo = Conv2dGeometry::new(256, 256, 56, 56, 64, 1, 1);
        let cd = ConvDims::new(&IieuConfig::new(geo)).unwrap();
        assert_eq!(cd.wgrad_splits(), 64);
        assert_eq!(cd.wgrad_splits_tc(2), 264);
        // A small layer splits its reduction: 1 x 1 tiles -> 64 chunks (capped).
        let geo = Conv2dGeometry::new(8, 16, 32, 32, 16, 3, 3).with_padding(1, 1);
        let cd = ConvDims::new(&IieuConfig::new(geo)).unwrap();
        assert_eq!(cd.wgrad_grid, (1, 3));
        assert_eq!(cd.wgrad_splits(), WGRAD_BLOCKS.div_ceil(3).min(64));
        // AllChannels with dilation: r_x is not taken from the GEMM tiles.
        let geo = Conv2dGeometry::new(1, 4, 9, 9, 4, 3, 3).with_dilation(2, 2);
        let cfg = IieuConfig::new(geo).with_patch_norm(PatchNorm::AllChannels);
        assert!(!ConvDims::new(&cfg).unwrap().fused_rx);
        assert!(ConvDims::new(&IieuConfig::new(geo)).unwrap().fused_rx);
    }

    #[test]
    fn oversized_grid_is_a_shape_error() {
        // 70 000 groups of 1 channel: grid y = 70 000 > 65 535.
        let geo = Conv2dGeometry::new(1, 70_000, 1, 1, 70_000, 1, 1).with_groups(70_000);
        assert!(matches!(
            ConvDims::new(&IieuConfig::new(geo)),
            Err(Error::Shape { .. })
        ));
    }
}
