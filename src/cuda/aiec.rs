//! AIEC on the GPU (SPEC §3): the CUDA mirror of [`crate::cpu::aiec`], with the
//! same function names and argument order and the stream first.
//!
//! * **TAU** ([`tau_forward`], [`tau_backward`], [`infer_forward`]):
//!   `A = F if F > τ else 0`, `dF = dA·[F > τ]`.
//! * **global feature** ([`global_feature`], [`global_feature_backward`]): mean over
//!   space (NCHW) or tokens (`(N, L, C)`), or a class-token row.
//! * **DMU** ([`dmu_forward`], [`dmu_backward`]): `z = a·Wdᵀ`, `p = softmax(z)`,
//!   `L_aux = −log p[y]`, correctness (first argmax, NaN ⇒ not correct).
//! * **ACU** ([`DeviceCounters`]): θ, η (`K × C`) and φ (`K`) as `u64` device
//!   buffers, updated on the device with integer atomics (order-independent).
//! * **CGU** ([`gate_masks`], [`gate_loss`], [`gate_loss_backward`]).
//! * the whole layer ([`train_forward`], [`train_backward`]).
//!
//! # Dtypes
//! The activation tensors `F`, `A`, `d_out`, `dF` are device buffers of the storage
//! dtype `T` (f32, f16, bf16). The small tensors — the feature `a` (`N × C`), `Wd`
//! (`K × C`), logits / probabilities (`N × K`), per-sample losses, `v`, `dWd` —
//! are always f32; masks and correctness flags are `u8` (0 / 1); labels are
//! [`Labels`]: a host slice (validated on the host, then uploaded as `u32`) or `u32`
//! labels already on the device (no copy; a label `≥ K` is flagged by the kernels —
//! NaN losses, never counted, no gradient — never followed). All arithmetic
//! and accumulation is f32 (the CPU reference accumulates in f64), except `v`,
//! which is formed from the integer counters in f64 exactly like the CPU.
//!
//! # Decisions (as on the CPU; see the CPU module's docs)
//! τ must be finite and `≥ 0` and is rounded to f32 for the comparison;
//! correctness takes the first maximal f32 logit, and a sample with a NaN logit is
//! never correct; `sign(0) = 0` in the gate gradient; [`Pool::ClassToken`] on NCHW
//! is `Err(Shape)`, a token index `≥ L` is `Err(InvalidParam)`.
//!
//! Determinism: no float atomics; every reduction has a fixed order (block trees
//! for fixed block sizes, in-order sums in the GEMM tiles, `dWd` in two stages when
//! its samples are split), so the same input gives the same
//! bits on every run. The counters use integer atomics, whose sums do not depend on
//! order.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, LaunchConfig, PushKernelArg};

use super::handles::kernel_fn;
use super::{grid_for, launcher, to_i32, ArgOpt, DType, DeviceInput, BLOCK};
use crate::cpu::aiec::{AiecConfig, AiecDims, Counters, Pool};
use crate::error::{check_len, check_nonzero, Error, Result};
use crate::layout::{ActShape, Layout};

// ---------------------------------------------------------------------------
// host-side validation (the CPU module's checks, shared)

use crate::cpu::aiec::{check_pool, check_tau};

/// Validates the labels on the host (count `n`, each `< k`, exactly as the CPU
/// side) and returns them as the `u32`s the kernels read.
fn check_labels(labels: &[usize], n: usize, k: usize) -> Result<Vec<u32>> {
    crate::cpu::aiec::check_labels(labels, n, k)?;
    // k fits in i32 (checked by the callers through `dims_i32`), so every label does.
    Ok(labels.iter().map(|&y| y as u32).collect())
}

/// Class labels of a batch, as the AIEC entry points take them.
///
/// * [`Labels::Host`]: a host slice, validated on the host (count `N`, each `< K`:
///   `LabelOutOfRange` before any launch) and uploaded as `u32` — one small
///   host-to-device copy per call.
/// * [`Labels::Device`]: `N` `u32` labels already on the device (e.g. the batch's
///   label tensor): no copy. Their count is checked on the host; their values cannot
///   be, so the kernels check them: a sample whose label is `≥ K` is never followed
///   out of bounds — its `L_aux` and `L_gate` are NaN (so a loss mean turns NaN), it
///   is never correct and never counted, and it contributes no gradient.
///
/// Converts from `&[usize]`, `&Vec<usize>`, `&[usize; N]` (host) and `&CudaSlice<u32>`,
/// `CudaView<u32>` (device).
#[derive(Debug)]
pub enum Labels<'a> {
    /// Labels on the host.
    Host(&'a [usize]),
    /// `u32` labels on the device.
    Device(CudaView<'a, u32>),
}

impl<'a> From<&'a [usize]> for Labels<'a> {
    fn from(v: &'a [usize]) -> Self {
        Labels::Host(v)
    }
}
impl<'a> From<&'a Vec<usize>> for Labels<'a> {
    fn from(v: &'a Vec<usize>) -> Self {
        Labels::Host(v)
    }
}
impl<'a, const N: usize> From<&'a [usize; N]> for Labels<'a> {
    fn from(v: &'a [usize; N]) -> Self {
        Labels::Host(v)
    }
}
impl<'a> From<&'a CudaSlice<u32>> for Labels<'a> {
    fn from(v: &'a CudaSlice<u32>) -> Self {
        Labels::Device(v.as_view())
    }
}
impl<'a> From<CudaView<'a, u32>> for Labels<'a> {
    fn from(v: CudaView<'a, u32>) -> Self {
        Labels::Device(v)
    }
}

/// Labels ready for a launch: uploaded from the host, or the caller's device buffer.
enum LabelsOnDevice<'a> {
    Uploaded(CudaSlice<u32>),
    Given(CudaView<'a, u32>),
}

impl LabelsOnDevice<'_> {
    fn view(&self) -> CudaView<'_, u32> {
        match self {
            LabelsOnDevice::Uploaded(s) => s.as_view(),
            LabelsOnDevice::Given(v) => v.slice(..),
        }
    }
}

/// Checks `labels` for `n` samples of `k` classes (host labels: every value; device
/// labels: the count) and puts them on the device (host labels: one upload).
fn labels_on_device<'a>(
    stream: &Arc<CudaStream>,
    labels: Labels<'a>,
    n: usize,
    k: usize,
) -> Result<LabelsOnDevice<'a>> {
    match labels {
        Labels::Host(h) => {
            let lab = check_labels(h, n, k)?;
            Ok(LabelsOnDevice::Uploaded(stream.clone_htod(&lab)?))
        }
        Labels::Device(v) => {
            check_nonzero("labels", v.len())?;
            check_len("labels", n, v.len())?;
            Ok(LabelsOnDevice::Given(v))
        }
    }
}

/// `(n, c, k)` as i32 after checking that `N·C`, `K·C` and `N·K` fit the kernels'
/// 32-bit indices.
fn dims_i32(dims: AiecDims) -> Result<(i32, i32, i32)> {
    dims.validate()?;
    to_i32("N x C", dims.n * dims.c)?;
    to_i32("K x C", dims.k * dims.c)?;
    to_i32("N x K", dims.n * dims.k)?;
    Ok((
        to_i32("batch N", dims.n)?,
        to_i32("channels C", dims.c)?,
        to_i32("classes K", dims.k)?,
    ))
}

/// i64 view of an element count (kernel `long long`).
fn to_i64(what: &'static str, v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::Shape {
        what,
        msg: format!("{v} exceeds the kernels' 64-bit index range"),
    })
}

/// Validates an activation shape for the kernels: nonzero dims, `len` matches,
/// `N·C` fits i32 (the feature), and returns `(numel, s)` as i64.
fn check_shape(shape: &ActShape, what: &'static str, len: usize) -> Result<(i64, i64)> {
    shape.validate(what, len)?;
    to_i32("N x C", shape.n * shape.c)?;
    Ok((to_i64(what, len)?, to_i64("positions S", shape.s)?))
}

// ---------------------------------------------------------------------------
// launch helpers

fn cfg1(grid: u32, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads per block for `work` parallel items per block: `work` rounded up to a
/// whole warp, at least 32 and at most [`BLOCK`] (small planes / rows do not
/// launch mostly idle 256-thread blocks).
fn block_for(work: usize) -> u32 {
    (work.div_ceil(32) * 32).clamp(32, BLOCK as usize) as u32
}

/// Launch shape of a grid-stride element-wise loop over `work` items, `per`
/// items per thread per iteration.
fn elementwise(work: usize, per: usize) -> LaunchConfig {
    let block = block_for(work.div_ceil(per));
    cfg1(grid_for(work, block as usize * per), block)
}

/// Blocks of a one-block-per-row kernel (grid-stride beyond the cap).
fn rows_grid(rows: usize) -> u32 {
    rows.clamp(1, 4096.min(super::grid_cap())) as u32
}

/// Grid dimension for `items` tiles / rows, capped (the kernels grid-stride over
/// every dimension) at `limit` and the crate's grid cap.
fn dim_grid(items: usize, limit: usize) -> u32 {
    items.clamp(1, limit.min(super::grid_cap())) as u32
}

/// Blocks the tiled AIEC kernels aim for: one per SM of an H100 (the launch audit's
/// `blocks` target), so small batches still spread over the device.
const TARGET_BLOCKS: usize = 132;

#[cfg(feature = "emulate")]
thread_local! {
    static TILE_TARGET: std::cell::Cell<usize> = const { std::cell::Cell::new(TARGET_BLOCKS) };
}

/// The block target of [`rows_per_thread`] and [`dwd_chunks`]: [`TARGET_BLOCKS`], or
/// (feature `emulate`) the one [`with_tile_target`] set on this thread.
fn target_blocks() -> usize {
    #[cfg(feature = "emulate")]
    {
        TILE_TARGET.with(|t| t.get())
    }
    #[cfg(not(feature = "emulate"))]
    {
        TARGET_BLOCKS
    }
}

/// Test hook (feature `emulate`): runs `f` with the tiled AIEC kernels' block target
/// (normally 132, an H100's SMs) set to `blocks` on this thread, so that test shapes
/// reach the large-batch tile sizes (target 1: the largest sample tiles, `dWd` in one
/// stage) or the split `dWd` (a large target). Only the launch geometry changes;
/// results stay within the parity tolerances (logits and `da` are bitwise unchanged:
/// their sums run in the same order for every tile size).
#[doc(hidden)]
#[cfg(feature = "emulate")]
pub fn with_tile_target<R>(blocks: usize, f: impl FnOnce() -> R) -> R {
    let old = TILE_TARGET.with(|t| t.replace(blocks.max(1)));
    let r = f();
    TILE_TARGET.with(|t| t.set(old));
    r
}

/// Rows per thread of a tiled kernel whose tile holds `lanes · rows` samples
/// (`rows` a power of two `≤ max_rows`): the largest that still gives
/// [`target_blocks`] blocks with `other_tiles` tiles along the other dimension (so
/// large batches get big tiles — fewer re-reads of `Wd` — and small ones a full
/// grid), 1 if none does.
fn rows_per_thread(n: usize, lanes: usize, other_tiles: usize, max_rows: usize) -> usize {
    let mut rows = max_rows;
    let target = target_blocks();
    while rows > 1 && n.div_ceil(lanes * rows) * other_tiles < target {
        rows /= 2;
    }
    rows
}

/// Largest `dWd` partials buffer (bytes) of the two-stage reduction: the sample
/// chunks are capped so that `chunks · K · C · 4` stays within it (one stage, no
/// partials, when the `K × C` output tiles alone give enough blocks).
pub const DWD_SCRATCH_BYTES: usize = 4 << 20;

/// Sample chunks of the `dWd` kernel for `n` samples and `tiles` 32 × 32 output
/// tiles: 1 (no partials, no second stage) when the tiles alone give
/// [`target_blocks`] blocks, else enough chunks of at least 4 samples to reach it,
/// at most [`DWD_SCRATCH_BYTES`] of partials (`kc` = K·C floats per chunk).
fn dwd_chunks(n: usize, tiles: usize, kc: usize) -> usize {
    let want = target_blocks().div_ceil(tiles.max(1));
    let cap = (DWD_SCRATCH_BYTES / (4 * kc.max(1))).max(1);
    want.min(n.div_ceil(4)).min(cap).max(1)
}

/// Bytes of one 16-byte vector in elements of `T`.
fn vec_elems<T>() -> usize {
    16 / std::mem::size_of::<T>()
}

// ---------------------------------------------------------------------------
// TAU

/// TAU forward (element-wise): `A = F if F > τ else 0` (NaN → 0), in the storage
/// dtype `T` (exact: every output is an input or 0). Gradient: [`tau_backward`].
/// CPU mirror: [`crate::cpu::aiec::tau_forward`]. τ is rounded to f32.
///
/// Errors: `InvalidParam` if `τ` is negative, NaN or infinite; `Empty` if `x` is empty.
///
/// # Example (forward and backward)
///
/// ```
/// use activation_kernels::cuda::{aiec, real_driver_present, CudaContext};
///
/// # #[cfg(not(feature = "emulate"))]
/// # if !real_driver_present() { return Ok(()); } // no GPU and no emulator: nothing to run on
/// // Without a GPU, the emulated device (feature `emulate`) stands in for one.
/// #[cfg(feature = "emulate")]
/// if !real_driver_present() {
///     activation_kernels::emu::install().expect("the emulated device");
/// }
/// let stream = CudaContext::new(0)?.default_stream();
/// let f = stream.clone_htod(&[-1.0f32, 0.25, 0.5, 2.0])?;
/// let a = aiec::tau_forward(&stream, &f, 0.25)?;
/// assert_eq!(stream.clone_dtoh(&a)?, [0.0, 0.0, 0.5, 2.0]);
/// let da = stream.clone_htod(&[1.0f32, 2.0, 3.0, 4.0])?;
/// let df = aiec::tau_backward(&stream, &da, &f, 0.25)?; // dF = dA·[F > τ]
/// assert_eq!(stream.clone_dtoh(&df)?, [0.0, 0.0, 3.0, 4.0]);
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn tau_forward<T: DType>(
    stream: &Arc<CudaStream>,
    x: &impl DeviceInput<T>,
    tau: f32,
) -> Result<CudaSlice<T>> {
    check_tau(tau as f64)?;
    let x = x.view();
    check_nonzero("x", x.len())?;
    let n = to_i64("x", x.len())?;
    let f = kernel_fn!(stream, "aiec_tau_fwd", T)?;
    // SAFETY: every element is written by the kernel before it is read back.
    let mut y = unsafe { stream.alloc::<T>(x.len()) }?;
    let mut b = launcher(stream, &f);
    b.arg(&x).arg(&mut y).arg(&n).arg(&tau);
    // SAFETY: the kernel touches x[0..n) and y[0..n), both of length n (x.len()).
    unsafe { b.launch(elementwise(x.len(), vec_elems::<T>())) }?;
    Ok(y)
}

/// TAU backward: `dF = dA·[F > τ]` (exact). CPU mirror:
/// [`crate::cpu::aiec::tau_backward`].
///
/// Errors: as [`tau_forward`], plus `LengthMismatch` if `dy` and `x` differ in length.
///
/// Example: [`tau_forward`]'s runs the forward and this backward on the device.
pub fn tau_backward<T: DType>(
    stream: &Arc<CudaStream>,
    dy: &impl DeviceInput<T>,
    x: &impl DeviceInput<T>,
    tau: f32,
) -> Result<CudaSlice<T>> {
    check_tau(tau as f64)?;
    let (dy, x) = (dy.view(), x.view());
    check_nonzero("x", x.len())?;
    check_len("dy", x.len(), dy.len())?;
    let n = to_i64("x", x.len())?;
    let f = kernel_fn!(stream, "aiec_tau_bwd", T)?;
    // SAFETY: every element is written by the kernel before it is read back.
    let mut dx = unsafe { stream.alloc::<T>(x.len()) }?;
    let mut b = launcher(stream, &f);
    b.arg(&dy).arg(&x).arg(&mut dx).arg(&n).arg(&tau);
    // SAFETY: dy, x, dx all have n elements; the kernel touches [0, n) of each.
    unsafe { b.launch(elementwise(x.len(), vec_elems::<T>())) }?;
    Ok(dx)
}

/// Inference forward of an AIEC layer: TAU only, `A = F if F > cfg.tau else 0`.
/// CPU mirror: [`crate::cpu::aiec::infer_forward`].
///
/// Errors: `InvalidParam` for a bad config; `Empty` if `f` is empty.
///
/// # Example (forward and backward)
///
/// ```
/// use activation_kernels::cpu::aiec::AiecConfig;
/// use activation_kernels::cuda::{aiec, real_driver_present, CudaContext};
///
/// # #[cfg(not(feature = "emulate"))]
/// # if !real_driver_present() { return Ok(()); } // no GPU and no emulator: nothing to run on
/// // Without a GPU, the emulated device (feature `emulate`) stands in for one.
/// #[cfg(feature = "emulate")]
/// if !real_driver_present() {
///     activation_kernels::emu::install().expect("the emulated device");
/// }
/// let stream = CudaContext::new(0)?.default_stream();
/// let cfg = AiecConfig { tau: 0.5, ..AiecConfig::default() };
/// let f = stream.clone_htod(&[0.25f32, 0.75, -2.0])?;
/// let a = aiec::infer_forward(&stream, &cfg, &f)?;
/// assert_eq!(stream.clone_dtoh(&a)?, [0.0, 0.75, 0.0]);
/// let df = aiec::tau_backward(&stream, &stream.clone_htod(&[1.0f32; 3])?, &f, 0.5)?; // its gradient
/// assert_eq!(stream.clone_dtoh(&df)?, [0.0, 1.0, 0.0]);
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn infer_forward<T: DType>(
    stream: &Arc<CudaStream>,
    cfg: &AiecConfig,
    f: &impl DeviceInput<T>,
) -> Result<CudaSlice<T>> {
    cfg.validate()?;
    tau_forward(stream, f, cfg.tau as f32)
}

// ---------------------------------------------------------------------------
// global feature (fused TAU + pooling)

/// Launches the fused TAU + pooling pass: writes the feature (`N × C`, f32) and,
/// when `y` is given, `A` (`tau = Some`) or a copy. Inputs must be validated.
fn feature_pass<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &ActShape,
    x: &cudarc::driver::CudaView<'_, T>,
    pool: Pool,
    tau: Option<f32>,
    y: Option<&mut CudaSlice<T>>,
) -> Result<CudaSlice<f32>> {
    let nc = shape.n * shape.c;
    // SAFETY: every feature entry is written by the kernel (one per (n, c)).
    let mut feat = unsafe { stream.alloc::<f32>(nc) }?;
    let (tau_v, apply) = match tau {
        Some(t) => (t, 1i32),
        None => (0.0f32, 0i32),
    };
    match shape.layout {
        Layout::Nchw => {
            let f = kernel_fn!(stream, "aiec_feat_nchw", T)?;
            let planes = to_i64("N x C", nc)?;
            let s = to_i64("positions S", shape.s)?;
            let mut b = launcher(stream, &f);
            b.arg(x);
            b.arg_opt(y);
            b.arg(&mut feat)
                .arg(&planes)
                .arg(&s)
                .arg(&tau_v)
                .arg(&apply);
            // SAFETY: x (and y) hold planes·s = N·C·S elements (validated), feat
            // holds `planes`; block j touches plane j only.
            unsafe {
                b.launch(cfg1(
                    rows_grid(nc),
                    block_for(shape.s.div_ceil(vec_elems::<T>())),
                ))
            }?;
        }
        Layout::Nlc => {
            let f = kernel_fn!(stream, "aiec_feat_nlc", T)?;
            let n = to_i32("batch N", shape.n)?;
            let l = to_i32("tokens L", shape.s)?;
            let c = to_i32("channels C", shape.c)?;
            let token = match pool {
                Pool::Mean => -1i32,
                Pool::ClassToken(i) => to_i32("pool", i)?,
            };
            let mut b = launcher(stream, &f);
            b.arg(x);
            b.arg_opt(y);
            b.arg(&mut feat)
                .arg(&n)
                .arg(&l)
                .arg(&c)
                .arg(&token)
                .arg(&tau_v)
                .arg(&apply);
            let cfg = nlc_cfg::<T>(shape, 1);
            // SAFETY: x (and y) hold N·L·C elements (validated); the kernel reads
            // (n, t, c) with n < N, t < L (token < L checked), c < C; feat is N·C.
            unsafe { b.launch(cfg) }?;
        }
    }
    Ok(feat)
}

/// Global feature `a` (`N × C`, f32) of an activated tensor `A` of shape `shape`:
/// the mean over the `S` positions ([`Pool::Mean`], f32 block reduction) or the row
/// of token `i` ([`Pool::ClassToken`], `(N, L, C)` only). Gradient:
/// [`global_feature_backward`]. CPU mirror: [`crate::cpu::aiec::global_feature`].
///
/// Errors: `Empty`/`LengthMismatch` from the shape; `Shape` for `ClassToken` on
/// NCHW; `InvalidParam` for a token index `≥ L`.
///
/// # Example (forward and backward)
///
/// ```
/// use activation_kernels::cpu::aiec::Pool;
/// use activation_kernels::cuda::{aiec, real_driver_present, CudaContext, CudaSlice};
/// use activation_kernels::ActShape;
///
/// # #[cfg(not(feature = "emulate"))]
/// # if !real_driver_present() { return Ok(()); } // no GPU and no emulator: nothing to run on
/// // Without a GPU, the emulated device (feature `emulate`) stands in for one.
/// #[cfg(feature = "emulate")]
/// if !real_driver_present() {
///     activation_kernels::emu::install().expect("the emulated device");
/// }
/// let stream = CudaContext::new(0)?.default_stream();
/// let shape = ActShape::nlc(1, 2, 3); // 2 tokens of 3 channels
/// let a = stream.clone_htod(&[1.0f32, 0.0, 4.0, 3.0, 2.0, 0.0])?;
/// let feat = aiec::global_feature(&stream, &shape, &a, Pool::Mean)?; // token mean
/// assert_eq!(stream.clone_dtoh(&feat)?, [2.0, 1.0, 2.0]);
/// let da = stream.clone_htod(&[1.0f32, 2.0, 4.0])?;
/// let d_a: CudaSlice<f32> = aiec::global_feature_backward(&stream, &shape, &da, Pool::Mean)?;
/// assert_eq!(stream.clone_dtoh(&d_a)?, [0.5, 1.0, 2.0, 0.5, 1.0, 2.0]); // da / L
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn global_feature<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &ActShape,
    a: &impl DeviceInput<T>,
    pool: Pool,
) -> Result<CudaSlice<f32>> {
    let a = a.view();
    check_shape(shape, "A", a.len())?;
    check_pool(shape, pool)?;
    feature_pass(stream, shape, &a, pool, None, None)
}

/// Channels per block of the `(N, L, C)` feature and dF kernels: 8 groups of one
/// 16-byte vector of `T` (`FEAT_GX` in aiec.cu).
fn nlc_chunk<T>() -> usize {
    8 * vec_elems::<T>()
}

/// Tokens per block of the `(N, L, C)` dF kernel (`DF_TOKENS` in aiec.cu).
const DF_TOKENS: usize = 256;

/// Launch shape of the `(N, L, C)` feature / dF kernels: blocks of 8 channel groups ×
/// 32 token lanes; grid x = channel chunks, y = samples, z = `zt` token chunks.
fn nlc_cfg<T>(shape: &ActShape, zt: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            dim_grid(shape.c.div_ceil(nlc_chunk::<T>()), 65_535),
            dim_grid(shape.n, 65_535),
            dim_grid(zt, 65_535),
        ),
        block_dim: (8, 32, 1),
        shared_mem_bytes: 0,
    }
}

/// Launches the fused backward `dF = mask·(d_out + (∂a/∂A)ᵀ·da)` (mask = `[F > τ]`
/// when `f_tau` is given, else 1; `d_out` = 0 when absent). Inputs validated.
fn backward_pass<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &ActShape,
    pool: Pool,
    da: &cudarc::driver::CudaView<'_, f32>,
    f_tau: Option<(&cudarc::driver::CudaView<'_, T>, f32)>,
    d_out: Option<&cudarc::driver::CudaView<'_, T>>,
) -> Result<CudaSlice<T>> {
    let numel = shape.numel()?;
    to_i64("activation", numel)?;
    let tau = f_tau.map(|(_, t)| t).unwrap_or(0.0);
    // SAFETY: every element of dF is written by the kernel.
    let mut df = unsafe { stream.alloc::<T>(numel) }?;
    match shape.layout {
        Layout::Nchw => {
            let f = kernel_fn!(stream, "aiec_df_nchw", T)?;
            let planes = to_i64("N x C", shape.n * shape.c)?;
            let s = to_i64("positions S", shape.s)?;
            let inv_s = 1.0f32 / shape.s as f32;
            let mut b = launcher(stream, &f);
            b.arg_opt(f_tau.map(|(fv, _)| fv));
            b.arg_opt(d_out);
            b.arg(da)
                .arg(&mut df)
                .arg(&planes)
                .arg(&s)
                .arg(&tau)
                .arg(&inv_s);
            // SAFETY: f, d_out (when given) and df hold N·C·S elements (validated),
            // da holds N·C; block j touches plane j and da[j] only.
            unsafe {
                b.launch(cfg1(
                    rows_grid(shape.n * shape.c),
                    block_for(shape.s.div_ceil(vec_elems::<T>())),
                ))
            }?;
        }
        Layout::Nlc => {
            let f = kernel_fn!(stream, "aiec_df_nlc", T)?;
            let l = to_i32("tokens L", shape.s)?;
            let c = to_i32("channels C", shape.c)?;
            let token = match pool {
                Pool::Mean => -1i32,
                Pool::ClassToken(i) => to_i32("pool", i)?,
            };
            let n = to_i32("batch N", shape.n)?;
            let inv_l = 1.0f32 / shape.s as f32;
            let mut b = launcher(stream, &f);
            b.arg_opt(f_tau.map(|(fv, _)| fv));
            b.arg_opt(d_out);
            b.arg(da)
                .arg(&mut df)
                .arg(&n)
                .arg(&l)
                .arg(&c)
                .arg(&token)
                .arg(&tau)
                .arg(&inv_l);
            // SAFETY: f, d_out (when given) and df hold N·L·C elements (validated);
            // the kernel touches (n, t, c) with n < N, t < L, c < C, and da[n·C + c]
            // < N·C = da.len().
            unsafe { b.launch(nlc_cfg::<T>(shape, shape.s.div_ceil(DF_TOKENS))) }?;
        }
    }
    Ok(df)
}

/// Backward of [`global_feature`]: from `da = ∂L/∂a` (`N × C`, f32) returns
/// `∂L/∂A` (full shape, dtype `T`): `da[n,c]/S` at every position for
/// [`Pool::Mean`]; `da[n,c]` at token `i` and 0 elsewhere for
/// [`Pool::ClassToken`]. CPU mirror: [`crate::cpu::aiec::global_feature_backward`].
///
/// Errors: as [`global_feature`], plus `LengthMismatch` if `da` is not `N × C`.
///
/// Example: [`global_feature`]'s runs the forward and this backward on the device.
pub fn global_feature_backward<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &ActShape,
    da: &impl DeviceInput<f32>,
    pool: Pool,
) -> Result<CudaSlice<T>> {
    let numel = shape.numel()?;
    check_shape(shape, "A", numel)?;
    check_pool(shape, pool)?;
    let da = da.view();
    check_len("da", shape.n * shape.c, da.len())?;
    backward_pass::<T>(stream, shape, pool, &da, None, None)
}

// ---------------------------------------------------------------------------
// ACU counters on the device

/// ACU counters of one AIEC layer on the device: `θ[k,c]` (activations), `η[k,c]`
/// (inhibitions), `K × C`, and `φ[k]` (samples), `K`, as `u64` device buffers.
/// They are updated on the device ([`DeviceCounters::update`], [`train_forward`])
/// with integer atomics, only by samples the DMU predicted correctly; integer
/// sums do not depend on order, so the result is deterministic and equals the CPU
/// [`Counters`] for the same decisions. The counts wrap at 2⁶⁴ (the CPU saturates;
/// neither is reachable in practice). Clear them with [`DeviceCounters::reset`]
/// at the start of every epoch.
#[derive(Debug)]
pub struct DeviceCounters {
    classes: usize,
    channels: usize,
    theta: CudaSlice<u64>,
    eta: CudaSlice<u64>,
    phi: CudaSlice<u64>,
}

impl DeviceCounters {
    /// Zeroed counters for `k` classes and `c` channels.
    ///
    /// Errors: `Empty` if `k` or `c` is 0; `Shape` if `K·C` does not fit the
    /// kernels' 32-bit indices.
    pub fn new(stream: &Arc<CudaStream>, k: usize, c: usize) -> Result<Self> {
        check_nonzero("classes K", k)?;
        check_nonzero("channels C", c)?;
        let kc = k.checked_mul(c).ok_or_else(|| Error::Shape {
            what: "counters",
            msg: format!("{k} x {c} overflows usize"),
        })?;
        to_i32("K x C", kc)?;
        Ok(Self {
            classes: k,
            channels: c,
            theta: stream.alloc_zeros::<u64>(kc)?,
            eta: stream.alloc_zeros::<u64>(kc)?,
            phi: stream.alloc_zeros::<u64>(k)?,
        })
    }

    /// Device copy of host counters (e.g. restored from a checkpoint).
    ///
    /// Errors: as [`DeviceCounters::new`].
    pub fn from_host(stream: &Arc<CudaStream>, host: &Counters) -> Result<Self> {
        let mut d = Self::new(stream, host.classes(), host.channels())?;
        stream.memcpy_htod(host.theta(), &mut d.theta)?;
        stream.memcpy_htod(host.eta(), &mut d.eta)?;
        stream.memcpy_htod(host.phi(), &mut d.phi)?;
        Ok(d)
    }

    /// Number of classes K.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Number of channels C.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// θ on the device (`K × C`).
    pub fn theta(&self) -> &CudaSlice<u64> {
        &self.theta
    }

    /// η on the device (`K × C`).
    pub fn eta(&self) -> &CudaSlice<u64> {
        &self.eta
    }

    /// φ on the device (`K`).
    pub fn phi(&self) -> &CudaSlice<u64> {
        &self.phi
    }

    /// Clears every counter to 0 (a device memset; call at the start of every epoch).
    pub fn reset(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        stream.memset_zeros(&mut self.theta)?;
        stream.memset_zeros(&mut self.eta)?;
        stream.memset_zeros(&mut self.phi)?;
        Ok(())
    }

    /// Copies the counters to the host (synchronises `stream`) as CPU [`Counters`].
    ///
    /// Errors: a driver error; `InvalidParam` if the device values break the
    /// invariant `θ + η ≤ φ` (only possible after a wrap at 2⁶⁴).
    pub fn to_host(&self, stream: &Arc<CudaStream>) -> Result<Counters> {
        let theta = stream.clone_dtoh(&self.theta)?;
        let eta = stream.clone_dtoh(&self.eta)?;
        let phi = stream.clone_dtoh(&self.phi)?;
        Counters::from_parts(self.classes, self.channels, theta, eta, phi)
    }

    /// Counter update for one batch on the device (thread per `(n, c)`, integer
    /// atomics): for every sample with `correct[n] != 0`, `θ[y,c] += [a[n,c] > 0]`,
    /// `η[y,c] += [a[n,c] == 0]`, `φ[y] += 1`. CPU mirror: [`Counters::update`].
    ///
    /// Labels: [`Labels`] (host or device; a device label `≥ K` is not counted).
    ///
    /// Errors (all before any counter changes): `Empty` for `N = 0`;
    /// `LengthMismatch` if `a` is not `N × C` or `correct` not `N`
    /// (`N = labels.len()`); `LabelOutOfRange` for a host label `≥ K`.
    pub fn update<'l>(
        &mut self,
        stream: &Arc<CudaStream>,
        a: &impl DeviceInput<f32>,
        labels: impl Into<Labels<'l>>,
        correct: &impl DeviceInput<u8>,
    ) -> Result<()> {
        let labels = labels.into();
        let n = match &labels {
            Labels::Host(h) => h.len(),
            Labels::Device(v) => v.len(),
        };
        let dims = AiecDims::new(n, self.channels, self.classes);
        dims_i32(dims)?;
        let (a, correct) = (a.view(), correct.view());
        check_len("a", n * self.channels, a.len())?;
        check_len("correct", n, correct.len())?;
        let lab = labels_on_device(stream, labels, n, self.classes)?;
        self.update_dev(stream, &a, &lab.view(), &correct, n)
    }

    /// [`DeviceCounters::update`] on validated device inputs.
    fn update_dev(
        &mut self,
        stream: &Arc<CudaStream>,
        a: &cudarc::driver::CudaView<'_, f32>,
        labels: &CudaView<'_, u32>,
        correct: &cudarc::driver::CudaView<'_, u8>,
        n: usize,
    ) -> Result<()> {
        let f = kernel_fn!(stream, "aiec_count_f32")?;
        let (ni, ci) = (to_i32("batch N", n)?, to_i32("channels C", self.channels)?);
        let ki = to_i32("classes K", self.classes)?;
        let mut b = launcher(stream, &f);
        b.arg(a)
            .arg(labels)
            .arg(correct)
            .arg(&mut self.theta)
            .arg(&mut self.eta)
            .arg(&mut self.phi)
            .arg(&ni)
            .arg(&ci)
            .arg(&ki);
        let block = block_for(self.channels);
        let cfg = LaunchConfig {
            grid_dim: (
                dim_grid(self.channels.div_ceil(block as usize), 65_535),
                dim_grid(n, 65_535),
                1,
            ),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: a is N·C, labels and correct are N (blockIdx.y = n < N, channel c
        // < C); the kernel skips a label ≥ K, so θ/η indices y·C + c < K·C and φ
        // index y < K.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Relative firing rate `v[k,c] = (θ − η)/φ` (`K × C`, f32; formed in f64 and
    /// rounded, like the CPU), `0` where `φ = 0`. CPU mirror:
    /// [`Counters::relative_rate`].
    pub fn relative_rate(&self, stream: &Arc<CudaStream>) -> Result<CudaSlice<f32>> {
        let kc = self.classes * self.channels;
        // SAFETY: the kernel writes all K·C entries.
        let mut v = unsafe { stream.alloc::<f32>(kc) }?;
        self.rate_masks(stream, None, Some(&mut v), None)?;
        Ok(v)
    }

    /// Launches the v + masks kernel (thread per (k, c)); `wd` must be given with
    /// `masks` and be `K × C`.
    fn rate_masks(
        &self,
        stream: &Arc<CudaStream>,
        wd: Option<&cudarc::driver::CudaView<'_, f32>>,
        v: Option<&mut CudaSlice<f32>>,
        masks: Option<&mut CudaSlice<u8>>,
    ) -> Result<()> {
        let f = kernel_fn!(stream, "aiec_rate_masks_f32")?;
        let (k, c) = (
            to_i32("classes K", self.classes)?,
            to_i32("channels C", self.channels)?,
        );
        let mut b = launcher(stream, &f);
        b.arg(&self.theta).arg(&self.eta).arg(&self.phi);
        b.arg_opt(wd);
        b.arg_opt(v);
        b.arg_opt(masks);
        b.arg(&k).arg(&c);
        let block = block_for(self.channels);
        let cfg = LaunchConfig {
            grid_dim: (
                dim_grid(self.channels.div_ceil(block as usize), 65_535),
                dim_grid(self.classes, 65_535),
                1,
            ),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: θ, η (and wd, v, masks when given) are K·C, φ is K; the kernel
        // touches (k, c) with k < K (blockIdx.y), c < C: index k·C + c < K·C, φ[k].
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// DMU

/// Output of [`dmu_forward`] (all on the device).
#[derive(Debug)]
pub struct DeviceDmuOut {
    /// Logits `z[n,k] = Σ_c a[n,c]·Wd[k,c]` (`N × K`, f32).
    pub logits: CudaSlice<f32>,
    /// `p = softmax(z)` per sample (`N × K`, f32).
    pub probs: CudaSlice<f32>,
    /// `L_aux[n] = −log p[n, y_n]` (`N`, f32).
    pub loss: CudaSlice<f32>,
    /// `argmax_k z[n,k] == y_n` as 0/1 (`N`); first max wins a tie; NaN ⇒ 0.
    pub correct: CudaSlice<u8>,
}

/// Gradients of [`dmu_backward`] (on the device, f32).
#[derive(Debug)]
pub struct DeviceDmuGrads {
    /// `∂L/∂a` (`N × C`).
    pub da: CudaSlice<f32>,
    /// `∂L/∂Wd` (`K × C`).
    pub dwd: CudaSlice<f32>,
}

/// Launches the DMU forward kernel on validated inputs.
fn dmu_forward_dev(
    stream: &Arc<CudaStream>,
    a: &cudarc::driver::CudaView<'_, f32>,
    wd: &cudarc::driver::CudaView<'_, f32>,
    labels: &CudaView<'_, u32>,
    dims: AiecDims,
) -> Result<DeviceDmuOut> {
    let (n, c, k) = dims_i32(dims)?;
    // SAFETY (allocs): the two kernels write every logit, probability, loss and flag.
    let mut logits = unsafe { stream.alloc::<f32>(dims.n * dims.k) }?;
    let mut probs = unsafe { stream.alloc::<f32>(dims.n * dims.k) }?;
    let mut loss = unsafe { stream.alloc::<f32>(dims.n) }?;
    let mut correct = unsafe { stream.alloc::<u8>(dims.n) }?;
    // Logits: GEMM tiles of 16 classes × 8·rows samples (LG_* in aiec.cu).
    let k_tiles = dims.k.div_ceil(16);
    let rows = rows_per_thread(dims.n, 8, k_tiles, 4);
    let rows_i = to_i32("rows", rows)?;
    let f = kernel_fn!(stream, "aiec_logits_f32")?;
    let mut b = launcher(stream, &f);
    b.arg(a)
        .arg(wd)
        .arg(&mut logits)
        .arg(&n)
        .arg(&c)
        .arg(&k)
        .arg(&rows_i);
    let cfg = LaunchConfig {
        grid_dim: (
            dim_grid(k_tiles, 65_535),
            dim_grid(dims.n.div_ceil(8 * rows), 65_535),
            1,
        ),
        block_dim: (16, 8, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: a is N·C, wd K·C; the kernel reads a[n·C + c], wd[k·C + c] and writes
    // logits[n·K + k] only for n < N, k < K, c < C; 1 ≤ rows ≤ 4 (LG_MAXJ).
    unsafe { b.launch(cfg) }?;
    let f = kernel_fn!(stream, "aiec_dmu_fwd_f32")?;
    let mut b = launcher(stream, &f);
    b.arg(&logits)
        .arg(labels)
        .arg(&mut probs)
        .arg(&mut loss)
        .arg(&mut correct)
        .arg(&n)
        .arg(&k);
    // SAFETY: logits and probs are N·K, labels, loss and correct N (the kernel reads
    // z[y] only for y < K); block rows n < N touch z/p[n·K..n·K+K), loss/correct[n].
    unsafe { b.launch(cfg1(rows_grid(dims.n), block_for(dims.k))) }?;
    Ok(DeviceDmuOut {
        logits,
        probs,
        loss,
        correct,
    })
}

/// DMU forward on the device: `z = a·Wdᵀ` (f32, a tiled GEMM: shared-memory tiles of
/// `a` and `Wd`, each logit one in-order sum over C), `p = softmax(z)`
/// with the max subtracted, `L_aux[n] = log Σ_k e^{z_k − m} − (z_y − m)`, and the
/// correctness `argmax_k z[n,k] == y_n` (first maximal index; a NaN logit ⇒ not
/// correct). Gradient: [`dmu_backward`]. CPU mirror: [`crate::cpu::aiec::dmu_forward`].
///
/// Labels: [`Labels`] (host, validated; or device: a label `≥ K` gives a NaN loss
/// and is never correct).
///
/// Errors: `Empty` for a zero dimension; `LengthMismatch` if `a` is not `N × C`,
/// `wd` not `K × C`, `labels` not `N`; `LabelOutOfRange` for a host label `≥ K`.
///
/// # Example (forward and backward, against the CPU reference)
///
/// ```
/// use activation_kernels::cpu::{self, aiec::AiecDims};
/// use activation_kernels::cuda::{aiec, real_driver_present, CudaContext};
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
/// let dims = AiecDims::new(2, 2, 3); // N = 2, C = 2, K = 3
/// let (a, wd, labels) = ([1.0f32, 0.5, 0.0, 2.0], [1.0f32, -1.0, 0.5, 0.5, -1.0, 1.0], [0, 2]);
/// let (ad, wdd) = (stream.clone_htod(&a)?, stream.clone_htod(&wd)?);
/// let out = aiec::dmu_forward(&stream, &ad, &wdd, &labels, dims)?;
/// assert_eq!(stream.clone_dtoh(&out.logits)?, [0.5, 0.75, -0.5, -2.0, 1.0, 2.0]); // z = a·Wdᵀ
/// assert_eq!(stream.clone_dtoh(&out.correct)?, [0, 1]);
/// let dloss = stream.clone_htod(&[1.0f32, 1.0])?;
/// let g = aiec::dmu_backward(&stream, &ad, &wdd, &out.probs, &labels, &dloss, dims)?;
///
/// let out_ref = cpu::aiec::dmu_forward(&a, &wd, &labels, dims)?;
/// let g_ref = cpu::aiec::dmu_backward(&a, &wd, &out_ref.probs, &labels, &[1.0, 1.0], dims)?;
/// let pairs = [
///     (stream.clone_dtoh(&out.loss)?, out_ref.loss),
///     (stream.clone_dtoh(&g.da)?, g_ref.da),
///     (stream.clone_dtoh(&g.dwd)?, g_ref.dwd),
/// ];
/// for (gpu, reference) in pairs {
///     for (x, y) in gpu.iter().zip(&reference) {
///         assert_relative_eq!(x, y, epsilon = 1e-6, max_relative = 1e-5);
///     }
/// }
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn dmu_forward<'l>(
    stream: &Arc<CudaStream>,
    a: &impl DeviceInput<f32>,
    wd: &impl DeviceInput<f32>,
    labels: impl Into<Labels<'l>>,
    dims: AiecDims,
) -> Result<DeviceDmuOut> {
    dims_i32(dims)?;
    let (a, wd) = (a.view(), wd.view());
    check_len("a", dims.n * dims.c, a.len())?;
    check_len("wd", dims.k * dims.c, wd.len())?;
    let lab = labels_on_device(stream, labels.into(), dims.n, dims.k)?;
    dmu_forward_dev(stream, &a, &wd, &lab.view(), dims)
}

/// Feature gradient (aux and / or gate terms) on validated inputs.
#[allow(clippy::too_many_arguments)]
fn da_dev(
    stream: &Arc<CudaStream>,
    a: &cudarc::driver::CudaView<'_, f32>,
    wd: &cudarc::driver::CudaView<'_, f32>,
    probs: Option<&cudarc::driver::CudaView<'_, f32>>,
    labels: &CudaView<'_, u32>,
    masks: Option<&cudarc::driver::CudaView<'_, u8>>,
    dl_aux: Option<&cudarc::driver::CudaView<'_, f32>>,
    dl_gate: Option<&cudarc::driver::CudaView<'_, f32>>,
    aux_scale: f32,
    gate_scale: f32,
    dims: AiecDims,
) -> Result<CudaSlice<f32>> {
    let (n, c, k) = dims_i32(dims)?;
    // Gate term: the per-sample mask count Σ_c G[y_n, c] first (one block per sample).
    let cnt = match masks {
        Some(m) => {
            // SAFETY: the kernel writes all N counts.
            let mut cnt = unsafe { stream.alloc::<f32>(dims.n) }?;
            let f = kernel_fn!(stream, "aiec_mask_count_f32")?;
            let mut b = launcher(stream, &f);
            b.arg(m).arg(labels).arg(&mut cnt).arg(&n).arg(&c).arg(&k);
            // SAFETY: masks are K·C, labels and cnt N; a label ≥ K is not followed
            // (count 0), so mask rows y·C.. are in bounds.
            unsafe { b.launch(cfg1(rows_grid(dims.n), block_for(dims.c))) }?;
            Some(cnt)
        }
        None => None,
    };
    // GEMM tiles of 32 channels × 4·rows samples (DA_* in aiec.cu).
    let c_tiles = dims.c.div_ceil(32);
    let rows = rows_per_thread(dims.n, 4, c_tiles, 4);
    let rows_i = to_i32("rows", rows)?;
    let f = kernel_fn!(stream, "aiec_da_f32")?;
    // SAFETY: the kernel writes every da entry.
    let mut da = unsafe { stream.alloc::<f32>(dims.n * dims.c) }?;
    let mut b = launcher(stream, &f);
    b.arg(a).arg(wd);
    b.arg_opt(probs);
    b.arg(labels);
    b.arg_opt(masks);
    b.arg_opt(cnt.as_ref());
    b.arg_opt(dl_aux);
    b.arg_opt(dl_gate);
    b.arg(&aux_scale)
        .arg(&gate_scale)
        .arg(&mut da)
        .arg(&n)
        .arg(&c)
        .arg(&k)
        .arg(&rows_i);
    let cfg = LaunchConfig {
        grid_dim: (
            dim_grid(c_tiles, 65_535),
            dim_grid(dims.n.div_ceil(4 * rows), 65_535),
            1,
        ),
        block_dim: (32, 4, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: a, da are N·C; wd and masks K·C; probs N·K; labels, cnt, dl_* N; the
    // kernel touches n < N, c < C, k < K only; a label ≥ K gets a zero row and is
    // not followed, so mask rows y·C.. are in bounds; 1 ≤ rows ≤ 4 (DA_MAXJ).
    unsafe { b.launch(cfg) }?;
    Ok(da)
}

/// `dWd[k,c] = Σ_n g[n,k]·a[n,c]`, `g = aux_scale·dl[n]·(p − onehot)`: a tiled GEMM
/// over samples (32 × 32 output tiles, samples staged 16 at a time in shared memory,
/// summed in order). When the tiles alone do not fill the device, the samples are
/// split into [`dwd_chunks`] chunks whose partials (at most [`DWD_SCRATCH_BYTES`])
/// a second kernel sums in chunk order — fixed order, deterministic.
fn dwd_dev(
    stream: &Arc<CudaStream>,
    a: &cudarc::driver::CudaView<'_, f32>,
    probs: &cudarc::driver::CudaView<'_, f32>,
    labels: &CudaView<'_, u32>,
    dl_aux: Option<&cudarc::driver::CudaView<'_, f32>>,
    aux_scale: f32,
    dims: AiecDims,
) -> Result<CudaSlice<f32>> {
    let (n, c, k) = dims_i32(dims)?;
    let kc = dims.k * dims.c;
    let (c_tiles, k_tiles) = (dims.c.div_ceil(32), dims.k.div_ceil(32));
    let chunks = dwd_chunks(dims.n, c_tiles * k_tiles, kc);
    let spb = dims.n.div_ceil(chunks);
    let chunks = dims.n.div_ceil(spb);
    // SAFETY: every dWd entry is written: by stage 1 when chunks = 1 (k < K, c < C),
    // else by stage 2.
    let mut dwd = unsafe { stream.alloc::<f32>(kc) }?;
    let mut partial = if chunks > 1 {
        // SAFETY: stage 1 writes every partial (chunk z < chunks, k < K, c < C);
        // chunks · K · C · 4 ≤ DWD_SCRATCH_BYTES (dwd_chunks).
        Some(unsafe { stream.alloc::<f32>(chunks * kc) }?)
    } else {
        None
    };
    let f1 = kernel_fn!(stream, "aiec_dwd_partial_f32")?;
    let spb_i = to_i32("samples per block", spb)?;
    let mut b = launcher(stream, &f1);
    b.arg(a).arg(probs).arg(labels);
    b.arg_opt(dl_aux);
    b.arg(&aux_scale);
    match partial.as_mut() {
        Some(p) => b.arg(p),
        None => b.arg(&mut dwd),
    };
    b.arg(&n).arg(&c).arg(&k).arg(&spb_i);
    let cfg = LaunchConfig {
        grid_dim: (
            dim_grid(c_tiles, 65_535),
            dim_grid(k_tiles, 65_535),
            dim_grid(chunks, 65_535),
        ),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: chunk z reads samples [z·spb, min(N, z·spb + spb)) of a (N·C), probs
    // (N·K), labels / dl (N) (a label ≥ K is skipped); writes out[z·K·C + k·C + c],
    // k < K, c < C, z < chunks: within dwd (chunks = 1) or the partials.
    unsafe { b.launch(cfg) }?;
    if let Some(partial) = partial {
        let f2 = kernel_fn!(stream, "aiec_dwd_reduce_f32")?;
        let chunks_i = to_i32("chunks", chunks)?;
        let mut b = launcher(stream, &f2);
        b.arg(&partial).arg(&mut dwd).arg(&chunks_i).arg(&k).arg(&c);
        let block = block_for(dims.c);
        let cfg = LaunchConfig {
            grid_dim: (
                dim_grid(dims.c.div_ceil(block as usize), 65_535),
                dim_grid(dims.k, 65_535),
                1,
            ),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: reads partial[z·K·C + k·C + c] for z < chunks, k < K, c < C;
        // writes dwd[k·C + c].
        unsafe { b.launch(cfg) }?;
    }
    Ok(dwd)
}

/// DMU backward on the device for `L = Σ_n dloss[n]·L_aux[n]`, with `g[n,k] =
/// dloss[n]·(p[n,k] − [k = y_n])`: `∂L/∂a = g·Wd` and `∂L/∂Wd = gᵀ·a`, tiled GEMMs
/// with in-order sums (`dWd` in two fixed-order stages when the batch is split, see
/// [`DWD_SCRATCH_BYTES`]). `probs`
/// are the forward's. CPU mirror: [`crate::cpu::aiec::dmu_backward`].
///
/// Errors: as [`dmu_forward`], plus `LengthMismatch` if `probs` is not `N × K` or
/// `dloss` not `N`.
///
/// Example: [`dmu_forward`]'s runs the forward and this backward on the device.
pub fn dmu_backward<'l>(
    stream: &Arc<CudaStream>,
    a: &impl DeviceInput<f32>,
    wd: &impl DeviceInput<f32>,
    probs: &impl DeviceInput<f32>,
    labels: impl Into<Labels<'l>>,
    dloss: &impl DeviceInput<f32>,
    dims: AiecDims,
) -> Result<DeviceDmuGrads> {
    dims_i32(dims)?;
    let (a, wd, probs, dloss) = (a.view(), wd.view(), probs.view(), dloss.view());
    check_len("a", dims.n * dims.c, a.len())?;
    check_len("wd", dims.k * dims.c, wd.len())?;
    check_len("probs", dims.n * dims.k, probs.len())?;
    check_len("dloss", dims.n, dloss.len())?;
    let lab = labels_on_device(stream, labels.into(), dims.n, dims.k)?;
    let lab = lab.view();
    let da = da_dev(
        stream,
        &a,
        &wd,
        Some(&probs),
        &lab,
        None,
        Some(&dloss),
        None,
        1.0,
        0.0,
        dims,
    )?;
    let dwd = dwd_dev(stream, &a, &probs, &lab, Some(&dloss), 1.0, dims)?;
    Ok(DeviceDmuGrads { da, dwd })
}

// ---------------------------------------------------------------------------
// CGU

/// Consensus masks `G[k,c] = [v[k,c] ≤ 0] ∧ [Wd[k,c] ≤ 0]` as 0/1 bytes (NaN ⇒ 0).
/// Masks carry no gradient. CPU mirror: [`crate::cpu::aiec::gate_masks`].
///
/// Errors: `Empty` if `v` is empty; `LengthMismatch` if `wd` differs in length.
///
/// Example: [`gate_loss`]'s forms masks with this function.
pub fn gate_masks(
    stream: &Arc<CudaStream>,
    v: &impl DeviceInput<f32>,
    wd: &impl DeviceInput<f32>,
) -> Result<CudaSlice<u8>> {
    let (v, wd) = (v.view(), wd.view());
    check_nonzero("v", v.len())?;
    check_len("wd", v.len(), wd.len())?;
    let total = to_i64("v", v.len())?;
    let f = kernel_fn!(stream, "aiec_gate_masks_f32")?;
    // SAFETY: the kernel writes every mask.
    let mut m = unsafe { stream.alloc::<u8>(v.len()) }?;
    let mut b = launcher(stream, &f);
    b.arg(&v).arg(&wd).arg(&mut m).arg(&total);
    // SAFETY: v, wd, m all have `total` elements.
    unsafe { b.launch(elementwise(v.len(), 1)) }?;
    Ok(m)
}

/// Checks of the gate-loss entry points; returns the labels on the device.
fn check_gate<'a>(
    stream: &Arc<CudaStream>,
    a_len: usize,
    masks_len: usize,
    labels: Labels<'a>,
    dims: AiecDims,
) -> Result<LabelsOnDevice<'a>> {
    dims_i32(dims)?;
    check_len("a", dims.n * dims.c, a_len)?;
    check_len("masks", dims.k * dims.c, masks_len)?;
    labels_on_device(stream, labels, dims.n, dims.k)
}

/// Launches the gate-loss kernel on validated inputs.
fn gate_loss_dev(
    stream: &Arc<CudaStream>,
    a: &cudarc::driver::CudaView<'_, f32>,
    masks: &cudarc::driver::CudaView<'_, u8>,
    labels: &CudaView<'_, u32>,
    dims: AiecDims,
) -> Result<CudaSlice<f32>> {
    let (n, c, k) = dims_i32(dims)?;
    let f = kernel_fn!(stream, "aiec_gate_loss_f32")?;
    // SAFETY: the kernel writes every loss.
    let mut loss = unsafe { stream.alloc::<f32>(dims.n) }?;
    let mut b = launcher(stream, &f);
    b.arg(a)
        .arg(masks)
        .arg(labels)
        .arg(&mut loss)
        .arg(&n)
        .arg(&c)
        .arg(&k);
    // SAFETY: a is N·C, masks K·C (the kernel reads mask row y only for a label
    // y < K), loss N.
    unsafe { b.launch(cfg1(rows_grid(dims.n), block_for(dims.c))) }?;
    Ok(loss)
}

/// Gate loss per sample on the device: `L_gate[n] = Σ_c |a[n,c]|·G[y_n,c] / Σ_c
/// G[y_n,c]`, 0 when the class has no gated channel (block per sample, f32).
/// Gradient: [`gate_loss_backward`]. CPU mirror: [`crate::cpu::aiec::gate_loss`].
///
/// Labels: [`Labels`] (a device label `≥ K` gives a NaN loss).
///
/// Errors: `Empty` for a zero dimension; `LengthMismatch` if `a` is not `N × C`,
/// `masks` not `K × C`, `labels` not `N`; `LabelOutOfRange` for a host label `≥ K`.
///
/// # Example (masks, forward and backward)
///
/// ```
/// use activation_kernels::cpu::aiec::AiecDims;
/// use activation_kernels::cuda::{aiec, real_driver_present, CudaContext};
///
/// # #[cfg(not(feature = "emulate"))]
/// # if !real_driver_present() { return Ok(()); } // no GPU and no emulator: nothing to run on
/// // Without a GPU, the emulated device (feature `emulate`) stands in for one.
/// #[cfg(feature = "emulate")]
/// if !real_driver_present() {
///     activation_kernels::emu::install().expect("the emulated device");
/// }
/// let stream = CudaContext::new(0)?.default_stream();
/// let dims = AiecDims::new(1, 3, 2); // N = 1, C = 3, K = 2
/// let v = stream.clone_htod(&[-0.5f32, 0.5, 0.0, 1.0, -1.0, 0.0])?; // K × C
/// let wd = stream.clone_htod(&[-1.0f32, -1.0, -0.5, 1.0, 1.0, 1.0])?;
/// let masks = aiec::gate_masks(&stream, &v, &wd)?; // G = [v ≤ 0] ∧ [Wd ≤ 0]
/// assert_eq!(stream.clone_dtoh(&masks)?, [1, 0, 1, 0, 0, 0]);
///
/// let a = stream.clone_htod(&[2.0f32, 7.0, -1.0])?; // one sample of class 0
/// let l = aiec::gate_loss(&stream, &a, &masks, &[0], dims)?; // (|2| + |−1|) / 2
/// assert_eq!(stream.clone_dtoh(&l)?, [1.5]);
/// let dloss = stream.clone_htod(&[1.0f32])?;
/// let da = aiec::gate_loss_backward(&stream, &a, &masks, &[0], &dloss, dims)?;
/// assert_eq!(stream.clone_dtoh(&da)?, [0.5, 0.0, -0.5]); // G·sign(a) / Σ_c G
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn gate_loss<'l>(
    stream: &Arc<CudaStream>,
    a: &impl DeviceInput<f32>,
    masks: &impl DeviceInput<u8>,
    labels: impl Into<Labels<'l>>,
    dims: AiecDims,
) -> Result<CudaSlice<f32>> {
    let (a, masks) = (a.view(), masks.view());
    let lab = check_gate(stream, a.len(), masks.len(), labels.into(), dims)?;
    gate_loss_dev(stream, &a, &masks, &lab.view(), dims)
}

/// Backward of [`gate_loss`] for `L = Σ_n dloss[n]·L_gate[n]`:
/// `∂L/∂a[n,c] = dloss[n]·G[y_n,c]·sign(a[n,c]) / Σ_c G[y_n,c]` (`sign(0) = 0`;
/// the row is 0 when the count is 0). CPU mirror:
/// [`crate::cpu::aiec::gate_loss_backward`].
///
/// Errors: as [`gate_loss`], plus `LengthMismatch` if `dloss` is not `N`.
///
/// Example: [`gate_loss`]'s runs the forward and this backward on the device.
pub fn gate_loss_backward<'l>(
    stream: &Arc<CudaStream>,
    a: &impl DeviceInput<f32>,
    masks: &impl DeviceInput<u8>,
    labels: impl Into<Labels<'l>>,
    dloss: &impl DeviceInput<f32>,
    dims: AiecDims,
) -> Result<CudaSlice<f32>> {
    let (a, masks, dloss) = (a.view(), masks.view(), dloss.view());
    check_len("dloss", dims.n, dloss.len())?;
    let lab = check_gate(stream, a.len(), masks.len(), labels.into(), dims)?;
    let lab = lab.view();
    // The DMU weights are not read without probs; pass `a` as a placeholder of the
    // right type (never dereferenced by the kernel when probs is null).
    da_dev(
        stream,
        &a,
        &a,
        None,
        &lab,
        Some(&masks),
        None,
        Some(&dloss),
        0.0,
        1.0,
        dims,
    )
}

/// Backward of the fixed-mask AIEC loss `L = s·(λ_aux·mean_n L_aux[n] + λ_gate·mean_n
/// L_gate[n])` with the scale `s` read on the device (`scale`: one f32, e.g. the
/// upstream gradient of the loss — no host copy): `∂L/∂a` (DMU and gate terms in one
/// pass) and `∂L/∂Wd`. `probs` are [`dmu_forward`]'s. The per-sample weights
/// `s·λ/N` are formed on the device. CPU mirror: the `a` / `Wd` part of
/// [`crate::cpu::aiec::train_backward`].
///
/// Errors: as [`dmu_backward`] and [`gate_loss_backward`], plus `LengthMismatch` if
/// `scale` is not one value and `InvalidParam` for a non-finite λ.
#[allow(clippy::too_many_arguments)]
pub fn aux_gate_backward<'l>(
    stream: &Arc<CudaStream>,
    a: &impl DeviceInput<f32>,
    wd: &impl DeviceInput<f32>,
    probs: &impl DeviceInput<f32>,
    masks: &impl DeviceInput<u8>,
    labels: impl Into<Labels<'l>>,
    scale: &impl DeviceInput<f32>,
    (lambda_aux, lambda_gate): (f64, f64),
    dims: AiecDims,
) -> Result<DeviceDmuGrads> {
    let (n, _, _) = dims_i32(dims)?;
    let (a, wd, probs, masks, scale) = (
        a.view(),
        wd.view(),
        probs.view(),
        masks.view(),
        scale.view(),
    );
    check_len("wd", dims.k * dims.c, wd.len())?;
    check_len("probs", dims.n * dims.k, probs.len())?;
    check_len("scale", 1, scale.len())?;
    for (what, l) in [("lambda_aux", lambda_aux), ("lambda_gate", lambda_gate)] {
        if !l.is_finite() {
            return Err(Error::InvalidParam {
                what,
                msg: format!("{l} is not finite"),
            });
        }
    }
    let lab = check_gate(stream, a.len(), masks.len(), labels.into(), dims)?;
    let lab = lab.view();
    let nf = dims.n as f64;
    let (ca, cg) = ((lambda_aux / nf) as f32, (lambda_gate / nf) as f32);
    let f = kernel_fn!(stream, "aiec_loss_weights_f32")?;
    // SAFETY: the kernel writes all 2N weights.
    let mut w = unsafe { stream.alloc::<f32>(2 * dims.n) }?;
    let mut b = launcher(stream, &f);
    b.arg(&scale).arg(&mut w).arg(&n).arg(&ca).arg(&cg);
    // SAFETY: reads scale[0]; writes w[i] and w[N + i] for i < N (w holds 2N).
    unsafe { b.launch(elementwise(dims.n, 1)) }?;
    let (w_aux, w_gate) = (w.slice(..dims.n), w.slice(dims.n..));
    let da = da_dev(
        stream,
        &a,
        &wd,
        Some(&probs),
        &lab,
        Some(&masks),
        Some(&w_aux),
        Some(&w_gate),
        1.0,
        1.0,
        dims,
    )?;
    let dwd = dwd_dev(stream, &a, &probs, &lab, Some(&w_aux), 1.0, dims)?;
    Ok(DeviceDmuGrads { da, dwd })
}

/// `[mean(aux), mean(gate), λ_aux·mean(aux) + λ_gate·mean(gate)]` and, with
/// `correct`, a fourth value `mean(correct)` (the DMU's accuracy), on the device (one
/// block, fixed order). `aux`, `gate` (and `correct`) hold `n` values.
pub(crate) fn loss_means_dev(
    stream: &Arc<CudaStream>,
    aux: &CudaView<'_, f32>,
    gate: &CudaView<'_, f32>,
    correct: Option<&CudaView<'_, u8>>,
    (lambda_aux, lambda_gate): (f64, f64),
    n: usize,
) -> Result<CudaSlice<f32>> {
    check_nonzero("batch N", n)?;
    check_len("aux", n, aux.len())?;
    check_len("gate", n, gate.len())?;
    if let Some(c) = correct {
        check_len("correct", n, c.len())?;
    }
    let n_i = to_i32("batch N", n)?;
    let fm = kernel_fn!(stream, "aiec_loss_means_f32")?;
    // SAFETY: the kernel writes the 3 means (and the accuracy when `correct` is given).
    let mut means = unsafe { stream.alloc::<f32>(3 + usize::from(correct.is_some())) }?;
    let (la, lg) = (lambda_aux as f32, lambda_gate as f32);
    let mut b = launcher(stream, &fm);
    b.arg(aux).arg(gate);
    b.arg_opt(correct);
    b.arg(&mut means).arg(&n_i).arg(&la).arg(&lg);
    // SAFETY: aux, gate (and correct) hold N values, means 3 (4 with correct); one
    // block reads [0, N).
    unsafe { b.launch(cfg1(1, block_for(n))) }?;
    Ok(means)
}

// ---------------------------------------------------------------------------
// the whole layer

/// Losses of one AIEC layer for one batch, on the device (f32).
#[derive(Debug)]
pub struct DeviceLosses {
    /// `L_aux[n]` (`N`).
    pub aux: CudaSlice<f32>,
    /// `L_gate[n]` (`N`).
    pub gate: CudaSlice<f32>,
    /// `[mean(L_aux), mean(L_gate), λ_aux·mean(L_aux) + λ_gate·mean(L_gate), DMU
    /// accuracy]` (4 values; the accuracy is the fraction of samples the DMU predicted
    /// correctly, i.e. that were counted; one-block fixed-order reduction).
    pub means: CudaSlice<f32>,
}

impl DeviceLosses {
    /// `(aux_mean, gate_mean, total_aux_gate)` copied to the host (synchronises).
    pub fn means_to_host(&self, stream: &Arc<CudaStream>) -> Result<(f32, f32, f32)> {
        let m = stream.clone_dtoh(&self.means)?;
        match m.as_slice() {
            [a, g, t, ..] => Ok((*a, *g, *t)),
            _ => Err(Error::Driver("loss means: expected 4 values".into())),
        }
    }
}

/// What [`train_backward`] needs from [`train_forward`] (besides `F` and `Wd`),
/// kept on the device. Read-only: the fields are private so they stay consistent.
#[derive(Debug)]
pub struct DeviceSaved {
    cfg: AiecConfig,
    dims: AiecDims,
    feature: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    probs: CudaSlice<f32>,
    correct: CudaSlice<u8>,
    masks: CudaSlice<u8>,
    labels: Option<Vec<usize>>,
    labels_dev: CudaSlice<u32>,
}

impl DeviceSaved {
    /// Global feature `a` (`N × C`, f32).
    pub fn feature(&self) -> &CudaSlice<f32> {
        &self.feature
    }
    /// DMU logits (`N × K`, f32).
    pub fn logits(&self) -> &CudaSlice<f32> {
        &self.logits
    }
    /// DMU probabilities (`N × K`, f32).
    pub fn probs(&self) -> &CudaSlice<f32> {
        &self.probs
    }
    /// DMU correctness per sample (`N`, 0/1).
    pub fn correct(&self) -> &CudaSlice<u8> {
        &self.correct
    }
    /// Consensus masks `G` used for the gate loss (`K × C`, 0/1).
    pub fn masks(&self) -> &CudaSlice<u8> {
        &self.masks
    }
    /// The labels of the batch: a host copy when they were given on the host, `None`
    /// when they were given on the device (see [`DeviceSaved::labels_device`]).
    pub fn labels(&self) -> Option<&[usize]> {
        self.labels.as_deref()
    }
    /// The labels of the batch on the device (`N`, u32; a device-to-device copy of
    /// labels given on the device).
    pub fn labels_device(&self) -> &CudaSlice<u32> {
        &self.labels_dev
    }
    /// Dimensions `(N, C, K)`.
    pub fn dims(&self) -> AiecDims {
        self.dims
    }
    /// The masks, taking the saved state apart (the candle module keeps only them).
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    pub(crate) fn into_masks(self) -> CudaSlice<u8> {
        self.masks
    }
}

/// Result of [`train_forward`].
#[derive(Debug)]
pub struct DeviceTrainOut<T> {
    /// Activated tensor `A = TAU(F)` (shape of `F`, dtype `T`): the layer's output.
    pub out: CudaSlice<T>,
    /// This layer's auxiliary and gate losses.
    pub losses: DeviceLosses,
    /// Saved state for [`train_backward`].
    pub saved: DeviceSaved,
}

/// Gradients of [`train_backward`].
#[derive(Debug)]
pub struct DeviceGrads<T> {
    /// `∂L/∂F` (shape of `F`, dtype `T`).
    pub df: CudaSlice<T>,
    /// `∂L/∂Wd` (`K × C`, f32).
    pub dwd: CudaSlice<f32>,
}

/// One training step of an AIEC layer on the device, in SPEC order: fused TAU +
/// pooling → DMU logits → correctness → counter update (integer atomics) → `v` →
/// masks → losses. Everything runs on the device and nothing is copied back; with
/// [`Labels::Device`] nothing is copied to the device either (host labels: one
/// upload).
///
/// * `f`: pre-activation `F` (dtype `T`) of shape `shape`;
/// * `wd`: DMU weights `K × C` (f32), `K = counters.classes()`;
/// * `labels`: `N` labels in `0..K` ([`Labels`]: a host slice, validated then uploaded
///   as u32; or u32 labels on the device, whose values the kernels check: a label
///   `≥ K` gives NaN losses and is never counted);
/// * `counters`: this layer's device counters, updated with this batch's correctly
///   predicted samples *before* the masks are formed (as on the CPU).
///
/// Saved for backward: the feature, logits, probabilities, correctness, masks and
/// labels (all on the device). CPU mirror: [`crate::cpu::aiec::train_forward`].
///
/// Errors (all checked on the host before any launch or counter change): `Shape`
/// if the counters' channels differ from `C`; `InvalidParam` for a bad config;
/// `Empty`/`LengthMismatch` from the shape; `Shape`/`InvalidParam` for a bad pool;
/// `LengthMismatch` for `labels` or `wd`; `LabelOutOfRange` for a host label `≥ K`.
///
/// # Example (forward and backward, against the CPU reference)
///
/// ```
/// use activation_kernels::cpu::{self, aiec::{AiecConfig, Counters}};
/// use activation_kernels::cuda::{aiec, real_driver_present, CudaContext};
/// use activation_kernels::ActShape;
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
/// let cfg = AiecConfig { tau: 0.1, lambda_gate: 2.0, ..AiecConfig::default() };
/// let shape = ActShape::nchw(2, 3, 1, 2); // N = 2, C = 3, 2 pixels
/// let f = [0.5f32, -1.0, 2.0, 0.05, -0.3, 0.4, 1.0, 1.5, -0.2, 0.3, 0.0, 0.7];
/// let wd = [0.5f32, -0.25, -1.0, -0.5, 0.75, 0.25]; // K = 2 classes × C
/// let labels = [0, 1];
/// let (fd, wdd) = (stream.clone_htod(&f)?, stream.clone_htod(&wd)?);
/// let mut counters = aiec::DeviceCounters::new(&stream, 2, 3)?;
/// let step = aiec::train_forward(&stream, &cfg, &shape, &fd, &wdd, &labels, &mut counters)?;
/// let d_out = stream.clone_htod(&[1.0f32; 12])?;
/// let g = aiec::train_backward(&stream, &cfg, &shape, &d_out, 1.0, &fd, &wdd, &step.saved)?;
///
/// let mut host_counters = Counters::new(2, 3)?;
/// let step_ref = cpu::aiec::train_forward(&cfg, &shape, &f, &wd, &labels, &mut host_counters)?;
/// let g_ref = cpu::aiec::train_backward(&cfg, &shape, &[1.0; 12], 1.0, &f, &wd, &step_ref.saved)?;
/// assert_eq!(counters.to_host(&stream)?, host_counters); // the same integer counts
/// assert_eq!(stream.clone_dtoh(&step.out)?, step_ref.out); // TAU is exact
/// let (_, _, total) = step.losses.means_to_host(&stream)?;
/// assert_relative_eq!(total, step_ref.losses.total_aux_gate, max_relative = 1e-5);
/// for (gpu, reference) in [(stream.clone_dtoh(&g.df)?, g_ref.df), (stream.clone_dtoh(&g.dwd)?, g_ref.dwd)] {
///     for (x, y) in gpu.iter().zip(&reference) {
///         assert_relative_eq!(x, y, epsilon = 1e-6, max_relative = 1e-5);
///     }
/// }
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn train_forward<'l, T: DType>(
    stream: &Arc<CudaStream>,
    cfg: &AiecConfig,
    shape: &ActShape,
    f: &impl DeviceInput<T>,
    wd: &impl DeviceInput<f32>,
    labels: impl Into<Labels<'l>>,
    counters: &mut DeviceCounters,
) -> Result<DeviceTrainOut<T>> {
    let (out, losses, saved) = train_step(stream, cfg, shape, f, wd, labels, counters, true)?;
    let out = out.ok_or_else(|| Error::Driver("aiec train_forward: no output".into()))?;
    Ok(DeviceTrainOut { out, losses, saved })
}

/// [`train_forward`], writing `A = TAU(F)` only when `want_out` (the candle module
/// computes `A` with its own differentiable op).
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_step<'l, T: DType>(
    stream: &Arc<CudaStream>,
    cfg: &AiecConfig,
    shape: &ActShape,
    f: &impl DeviceInput<T>,
    wd: &impl DeviceInput<f32>,
    labels: impl Into<Labels<'l>>,
    counters: &mut DeviceCounters,
    want_out: bool,
) -> Result<(Option<CudaSlice<T>>, DeviceLosses, DeviceSaved)> {
    let k = counters.classes();
    if counters.channels() != shape.c {
        return Err(Error::Shape {
            what: "counters",
            msg: format!(
                "counters are {} classes x {} channels, the op needs {k} x {}",
                k,
                counters.channels(),
                shape.c
            ),
        });
    }
    let (f, wd) = (f.view(), wd.view());
    cfg.validate()?;
    check_shape(shape, "f", f.len())?;
    check_pool(shape, cfg.pool)?;
    let dims = AiecDims::new(shape.n, shape.c, k);
    dims_i32(dims)?;
    check_len("wd", k * shape.c, wd.len())?;
    let labels = labels.into();
    let host_labels = match &labels {
        Labels::Host(h) => Some(h.to_vec()),
        Labels::Device(_) => None,
    };
    let lab = labels_on_device(stream, labels, shape.n, k)?;
    let labels_dev = match lab {
        LabelsOnDevice::Uploaded(s) => s,
        LabelsOnDevice::Given(v) => stream.clone_dtod(&v)?,
    };

    let mut out = if want_out {
        // SAFETY: the fused pass writes every element of A.
        Some(unsafe { stream.alloc::<T>(f.len()) }?)
    } else {
        None
    };
    let feature = feature_pass(
        stream,
        shape,
        &f,
        cfg.pool,
        Some(cfg.tau as f32),
        out.as_mut(),
    )?;
    let lv = labels_dev.as_view();
    let dmu = dmu_forward_dev(stream, &feature.as_view(), &wd, &lv, dims)?;
    counters.update_dev(
        stream,
        &feature.as_view(),
        &lv,
        &dmu.correct.as_view(),
        dims.n,
    )?;
    // SAFETY: the v + masks kernel writes all K·C masks.
    let mut masks = unsafe { stream.alloc::<u8>(dims.k * dims.c) }?;
    counters.rate_masks(stream, Some(&wd), None, Some(&mut masks))?;
    let gate = gate_loss_dev(stream, &feature.as_view(), &masks.as_view(), &lv, dims)?;
    let means = loss_means_dev(
        stream,
        &dmu.loss.as_view(),
        &gate.as_view(),
        Some(&dmu.correct.as_view()),
        (cfg.lambda_aux, cfg.lambda_gate),
        dims.n,
    )?;

    Ok((
        out,
        DeviceLosses {
            aux: dmu.loss,
            gate,
            means,
        },
        DeviceSaved {
            cfg: *cfg,
            dims,
            feature,
            logits: dmu.logits,
            probs: dmu.probs,
            correct: dmu.correct,
            masks,
            labels: host_labels,
            labels_dev,
        },
    ))
}

/// The checks of [`train_backward`] (lengths `[d_out, f, wd]`); returns the saved dims.
fn check_backward(
    cfg: &AiecConfig,
    shape: &ActShape,
    [d_out_len, f_len, wd_len]: [usize; 3],
    saved: &DeviceSaved,
) -> Result<AiecDims> {
    if *cfg != saved.cfg {
        return Err(Error::InvalidParam {
            what: "cfg",
            msg: "differs from the config of the forward pass".into(),
        });
    }
    cfg.validate()?;
    check_shape(shape, "f", f_len)?;
    check_pool(shape, cfg.pool)?;
    let dims = saved.dims;
    if shape.n != dims.n || shape.c != dims.c {
        return Err(Error::Shape {
            what: "shape",
            msg: format!("{shape:?} does not match the forward's dims {dims:?}"),
        });
    }
    check_len("d_out", f_len, d_out_len)?;
    check_len("wd", dims.k * dims.c, wd_len)?;
    Ok(dims)
}

/// Every check [`train_forward`] makes on host values (config, shape, pool, the
/// kernels' 32-bit limits, `wd`'s length, the host labels against `K = classes`),
/// without a launch: for a caller that launches something before [`train_forward`]
/// (the burn backend widens `Wd` to f32 first). The counters' channels are the
/// caller's to check.
#[cfg_attr(not(feature = "burn-cuda"), allow(dead_code))]
pub(crate) fn check_train(
    cfg: &AiecConfig,
    shape: &ActShape,
    f_len: usize,
    wd_len: usize,
    labels: &[usize],
    classes: usize,
) -> Result<()> {
    cfg.validate()?;
    check_shape(shape, "f", f_len)?;
    check_pool(shape, cfg.pool)?;
    let dims = AiecDims::new(shape.n, shape.c, classes);
    dims_i32(dims)?;
    check_len("wd", classes * shape.c, wd_len)?;
    check_labels(labels, shape.n, classes).map(|_| ())
}

/// [`train_backward`] with the loss scale `s` read on the device (`scale`: one f32,
/// e.g. the upstream gradient of the loss output — no host copy): the DMU and gate
/// terms of `∂L/∂a` and `∂L/∂Wd` by [`aux_gate_backward`] (per-sample weights
/// `s·λ/N` formed on the device), then the same fused `∂L/∂F` pass. Used by the burn
/// backend, whose upstream gradient of the step's total loss is a device value.
///
/// Errors: as [`train_backward`], plus `LengthMismatch` if `scale` is not one value.
#[cfg_attr(not(feature = "burn-cuda"), allow(dead_code))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_backward_scaled<T: DType>(
    stream: &Arc<CudaStream>,
    cfg: &AiecConfig,
    shape: &ActShape,
    d_out: &impl DeviceInput<T>,
    scale: &impl DeviceInput<f32>,
    f: &impl DeviceInput<T>,
    wd: &impl DeviceInput<f32>,
    saved: &DeviceSaved,
) -> Result<DeviceGrads<T>> {
    let (d_out, f, wd) = (d_out.view(), f.view(), wd.view());
    let dims = check_backward(cfg, shape, [d_out.len(), f.len(), wd.len()], saved)?;
    let gr = aux_gate_backward(
        stream,
        &saved.feature,
        &wd,
        &saved.probs,
        &saved.masks,
        &saved.labels_dev,
        scale,
        (cfg.lambda_aux, cfg.lambda_gate),
        dims,
    )?;
    let df = backward_pass(
        stream,
        shape,
        cfg.pool,
        &gr.da.as_view(),
        Some((&f, cfg.tau as f32)),
        Some(&d_out),
    )?;
    Ok(DeviceGrads { df, dwd: gr.dwd })
}

/// Backward of one AIEC training step on the device. With `s = loss_scale` and
/// `d_out = ∂L_task/∂A` (dtype `T`):
///
/// * `∂/∂a[n,c] = s·(λ_aux/N)·Σ_k (p[n,k] − [k = y_n])·Wd[k,c]`
///   `+ s·(λ_gate/N)·G[y_n,c]·sign(a[n,c]) / Σ_c G[y_n,c]` (thread per (n, c));
/// * `∂L/∂F = [F > τ]·(d_out + (∂a/∂A)ᵀ·∂/∂a)` (one fused element-wise pass,
///   128-bit vectors where aligned);
/// * `∂L/∂Wd[k,c] = s·(λ_aux/N)·Σ_n (p[n,k] − [k = y_n])·a[n,c]` (two-stage,
///   deterministic).
///
/// Masks and counters carry no gradient. CPU mirror:
/// [`crate::cpu::aiec::train_backward`].
///
/// Errors: `InvalidParam` if `cfg` differs from the forward's; the forward's shape
/// errors; `Shape` if `shape` does not match the saved dims; `LengthMismatch` for
/// `d_out`, `f` or `wd`.
///
/// Example: [`train_forward`]'s runs the forward and this backward on the device.
#[allow(clippy::too_many_arguments)]
pub fn train_backward<T: DType>(
    stream: &Arc<CudaStream>,
    cfg: &AiecConfig,
    shape: &ActShape,
    d_out: &impl DeviceInput<T>,
    loss_scale: f32,
    f: &impl DeviceInput<T>,
    wd: &impl DeviceInput<f32>,
    saved: &DeviceSaved,
) -> Result<DeviceGrads<T>> {
    let (d_out, f, wd) = (d_out.view(), f.view(), wd.view());
    let dims = check_backward(cfg, shape, [d_out.len(), f.len(), wd.len()], saved)?;

    let s = loss_scale as f64;
    let nf = dims.n as f64;
    let aux_scale = (s * cfg.lambda_aux / nf) as f32;
    let gate_scale = (s * cfg.lambda_gate / nf) as f32;
    let feat = saved.feature.as_view();
    let probs = saved.probs.as_view();
    let da = da_dev(
        stream,
        &feat,
        &wd,
        Some(&probs),
        &saved.labels_dev.as_view(),
        Some(&saved.masks.as_view()),
        None,
        None,
        aux_scale,
        gate_scale,
        dims,
    )?;
    let dwd = dwd_dev(
        stream,
        &feat,
        &probs,
        &saved.labels_dev.as_view(),
        None,
        aux_scale,
        dims,
    )?;
    let df = backward_pass(
        stream,
        shape,
        cfg.pool,
        &da.as_view(),
        Some((&f, cfg.tau as f32)),
        Some(&d_out),
    )?;
    Ok(DeviceGrads { df, dwd })
}

#[cfg(all(test, feature = "emulate"))]
mod tests {
    use super::*;
    use crate::cuda::{real_driver_present, CudaContext};

    /// [`train_backward_scaled`] (the loss scale read on the device, as the burn
    /// backend's AIEC node has it) gives [`train_backward`]'s gradients.
    #[test]
    fn backward_with_a_device_scale_matches_train_backward() {
        if !real_driver_present() {
            crate::emu::install().expect("the emulated device");
        }
        let stream = CudaContext::new(0).unwrap().default_stream();
        let cfg = AiecConfig {
            tau: 0.1,
            lambda_gate: 2.0,
            ..AiecConfig::default()
        };
        let shape = ActShape::nchw(3, 5, 1, 3);
        let f: Vec<f32> = (0..45).map(|i| ((i * 7 % 11) as f32 - 4.5) / 3.0).collect();
        let wd: Vec<f32> = (0..20).map(|i| ((i * 5 % 9) as f32 - 4.0) / 5.0).collect();
        let labels = [0usize, 3, 1];
        let (fd, wdd) = (
            stream.clone_htod(&f).unwrap(),
            stream.clone_htod(&wd).unwrap(),
        );
        let mut counters = DeviceCounters::new(&stream, 4, 5).unwrap();
        let step = train_forward(&stream, &cfg, &shape, &fd, &wdd, &labels, &mut counters).unwrap();
        let d_out: Vec<f32> = (0..45).map(|i| ((i * 3 % 7) as f32 - 3.0) / 4.0).collect();
        let d_out = stream.clone_htod(&d_out).unwrap();
        let s = 0.7f32;
        let want =
            train_backward(&stream, &cfg, &shape, &d_out, s, &fd, &wdd, &step.saved).unwrap();
        let scale = stream.clone_htod(&[s]).unwrap();
        let got = train_backward_scaled(
            &stream,
            &cfg,
            &shape,
            &d_out,
            &scale,
            &fd,
            &wdd,
            &step.saved,
        )
        .unwrap();
        let pairs = [
            (
                stream.clone_dtoh(&got.df).unwrap(),
                stream.clone_dtoh(&want.df).unwrap(),
            ),
            (
                stream.clone_dtoh(&got.dwd).unwrap(),
                stream.clone_dtoh(&want.dwd).unwrap(),
            ),
        ];
        for (g, w) in pairs {
            assert!(
                w.iter().any(|v| *v != 0.0),
                "a zero reference verifies nothing"
            );
            for (a, b) in g.iter().zip(&w) {
                // s·λ/N formed in f32 on the device vs in f64 on the host: a few ulp.
                assert!((a - b).abs() <= 1e-6 + 1e-5 * b.abs(), "{a} vs {b}");
            }
        }
    }
}
