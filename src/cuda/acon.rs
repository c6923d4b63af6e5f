//! ACON on the device (SPEC §2): ACON-A (Swish), ACON-B, ACON-C and the
//! meta-ACON β generators, mirroring [`crate::cpu::acon`] with the stream first.
//!
//! # Dtypes
//! `x`, `y`, `dy`, `dx` are device buffers of the storage type `T` ([`DType`]:
//! f32, f16, bf16); every computation and accumulation is f32 and outputs are
//! rounded to `T` once. The per-channel parameters (`p1`, `p2`, `p`), β, the
//! generator weights and all their gradients are f32 device buffers.
//!
//! # Kernels (kernels/acon.cu)
//! * forward: one elementwise pass, 128-bit loads/stores when the buffers are
//!   16-byte aligned (`acon_{a,b,c}_fwd_<dtype>`), both layouts;
//! * backward: one pass over `x` and `dy` writing `dx` and per-tile f32 partials
//!   of `dp1`, `dp2`, `dβ` (`acon_{a,b,c}_bwd_{nchw,nlc}_<dtype>`), then two small
//!   fixed-order stage-2 kernels (`acon_reduce_tiles`, `acon_reduce_params`).
//!   No atomics: every gradient has the same bits on every run. The tiling (and
//!   so the summation order) is chosen from the shape only, never from the
//!   device's SM count: results are the same bits on every GPU. `(N, L, C)` tiles
//!   are at least 32 rows (or as many as `L` has), so the partials' round trip
//!   adds at most 24/32 bytes per element (+12.5 % of the f16 minimum of 6 bytes).
//! * σ uses the `__expf` intrinsic: relative error ≈ 2^-22·(2 + 1.16|u|) in σ,
//!   i.e. a few f32 ulp for the usual |β·d| ≲ 10.
//!
//! Nothing is saved by the forward of plain ACON: the backward recomputes from
//! `x` (one extra `exp` per element is cheaper than storing σ).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, LaunchArgs, LaunchConfig, PushKernelArg};

use super::handles::{kernel_fn, Kernel};
use super::{launcher, ArgOpt, DType, DeviceInput};
use crate::error::{check_len, check_nonzero, Error, Result};
use crate::layout::{ActShape, Layout};

/// Threads per block of the elementwise and NLC kernels.
const THREADS: u32 = 256;
/// Vectors per thread per NCHW tile (kernels/acon.cu `TILE_UNROLL`).
const TILE_UNROLL: usize = 4;
/// Channels per column of the `(N, L, C)` tile kernels (kernels/acon.cu `NLC_W`):
/// a thread owns 4 channels (16 bytes of f32, 8 of f16/bf16) when `C` is a
/// multiple of 4 and the buffers are aligned, else one.
const NLC_W: usize = 4;
/// Least rows per `(N, L, C)` tile: each tile writes 3·C (backward) or C (GAP) f32
/// partials that stage 2 reads back, ≤ 24 / 32 bytes per element for the backward
/// (12.5 % of its f16 minimum of 6 bytes).
const NLC_MIN_ROWS: usize = 32;
/// Least rows each thread walks per `(N, L, C)` tile (rows per tile ≥ this × the
/// row groups of a block), so the shared-memory combine stays a small share.
const NLC_ROWS_PER_THREAD: usize = 2;
/// Blocks an `(N, L, C)` tile launch aims for (the floor of [`nlc_tiling`]): two
/// waves of 3 resident 256-thread blocks (the backward's `__launch_bounds__(256, 3)`)
/// on a 132-SM H100. A fixed constant, never the device's: the tiling, and so the
/// bits of every result, depend on the shape only.
const NLC_MIN_BLOCKS: usize = 2 * 132 * 3;

const BETA_CH: i32 = 0;
const BETA_NC: i32 = 1;
const BETA_N: i32 = 2;
const BETA_PIX: i32 = 3;

/// Where the switching factor β comes from (the device mirror of
/// [`crate::cpu::acon::Beta`]); every buffer is f32.
#[derive(Debug, Clone, Copy)]
pub enum Beta<'a> {
    /// One β per channel (length `C`): plain ACON.
    PerChannel(&'a CudaSlice<f32>),
    /// One β per (sample, channel), row-major `N × C`: channel-wise meta-ACON.
    PerSampleChannel(&'a CudaSlice<f32>),
    /// One β per sample (length `N`): layer-wise meta-ACON.
    PerSample(&'a CudaSlice<f32>),
    /// Pixel-wise meta-ACON `β = σ(x)`: no buffer; the gradient reaching β flows
    /// on into `x` (`∂β/∂x = σ(x)(1 − σ(x))`) and no `dβ` is returned.
    PixelWise,
}

impl Beta<'_> {
    fn validate(&self, shape: &ActShape) -> Result<()> {
        match self {
            Beta::PerChannel(b) => check_len("beta (per channel, C)", shape.c, b.len()),
            Beta::PerSampleChannel(b) => check_len(
                "beta (per sample and channel, N×C)",
                shape.n * shape.c,
                b.len(),
            ),
            Beta::PerSample(b) => check_len("beta (per sample, N)", shape.n, b.len()),
            Beta::PixelWise => Ok(()),
        }
    }
    fn kind(&self) -> i32 {
        match self {
            Beta::PerChannel(_) => BETA_CH,
            Beta::PerSampleChannel(_) => BETA_NC,
            Beta::PerSample(_) => BETA_N,
            Beta::PixelWise => BETA_PIX,
        }
    }
    fn buf(&self) -> Option<&CudaSlice<f32>> {
        match self {
            Beta::PerChannel(b) | Beta::PerSampleChannel(b) | Beta::PerSample(b) => Some(b),
            Beta::PixelWise => None,
        }
    }
    /// Length of `dβ` (0 for pixel-wise).
    fn grad_len(&self, shape: &ActShape) -> usize {
        match self {
            Beta::PerChannel(_) => shape.c,
            Beta::PerSampleChannel(_) => shape.n * shape.c,
            Beta::PerSample(_) => shape.n,
            Beta::PixelWise => 0,
        }
    }
}

/// Gradients of ACON-C ([`acon_c_backward`]).
#[derive(Debug)]
pub struct AconCGrads<T> {
    /// `∂L/∂x` (storage `T`), including the path through β for [`Beta::PixelWise`].
    pub dx: CudaSlice<T>,
    /// `∂L/∂p1`, length `C`.
    pub dp1: CudaSlice<f32>,
    /// `∂L/∂p2`, length `C`.
    pub dp2: CudaSlice<f32>,
    /// `∂L/∂β`, shaped as the [`Beta`] buffer; `None` for [`Beta::PixelWise`].
    pub dbeta: Option<CudaSlice<f32>>,
}

/// Gradients of ACON-B ([`acon_b_backward`]).
#[derive(Debug)]
pub struct AconBGrads<T> {
    /// `∂L/∂x` (storage `T`).
    pub dx: CudaSlice<T>,
    /// `∂L/∂p`, length `C`.
    pub dp: CudaSlice<f32>,
    /// `∂L/∂β`, shaped as the [`Beta`] buffer; `None` for [`Beta::PixelWise`].
    pub dbeta: Option<CudaSlice<f32>>,
}

/// Gradients of ACON-A ([`acon_a_backward`]).
#[derive(Debug)]
pub struct AconAGrads<T> {
    /// `∂L/∂x` (storage `T`).
    pub dx: CudaSlice<T>,
    /// `∂L/∂β`, shaped as the [`Beta`] buffer; `None` for [`Beta::PixelWise`].
    pub dbeta: Option<CudaSlice<f32>>,
}

/// Which per-channel parameters the op has (ACON-A: none, B: `p`, C: `p1`, `p2`).
enum Params<'a> {
    A,
    B(CudaView<'a, f32>),
    C(CudaView<'a, f32>, CudaView<'a, f32>),
}

impl<'p> Params<'p> {
    /// Pushes the kernel arguments of the variant's parameters: none (A), `p` (B),
    /// `p1, p2` (C).
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        match self {
            Params::A => {}
            Params::B(p) => {
                b.arg(p);
            }
            Params::C(p1, p2) => {
                b.arg(p1).arg(p2);
            }
        }
    }

    /// The forward kernel of this ACON variant for storage dtype `T`.
    fn fwd_kernel<T: DType>(&self, stream: &Arc<CudaStream>) -> Result<Kernel> {
        match self {
            Params::A => kernel_fn!(stream, "acon_a_fwd", T),
            Params::B(_) => kernel_fn!(stream, "acon_b_fwd", T),
            Params::C(..) => kernel_fn!(stream, "acon_c_fwd", T),
        }
    }

    /// The backward kernel of this ACON variant for the layout (`nlc`) and `T`.
    fn bwd_kernel<T: DType>(&self, stream: &Arc<CudaStream>, nlc: bool) -> Result<Kernel> {
        match (self, nlc) {
            (Params::A, true) => kernel_fn!(stream, "acon_a_bwd_nlc", T),
            (Params::B(_), true) => kernel_fn!(stream, "acon_b_bwd_nlc", T),
            (Params::C(..), true) => kernel_fn!(stream, "acon_c_bwd_nlc", T),
            (Params::A, false) => kernel_fn!(stream, "acon_a_bwd_nchw", T),
            (Params::B(_), false) => kernel_fn!(stream, "acon_b_bwd_nchw", T),
            (Params::C(..), false) => kernel_fn!(stream, "acon_c_bwd_nchw", T),
        }
    }
}

fn cfg(grid: usize, block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.clamp(1, super::grid_cap()) as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// Elements per 128-bit vector of `T`.
fn vec_width<T: DType>() -> usize {
    16 / std::mem::size_of::<T>()
}

fn dims(shape: &ActShape) -> (i64, i64, i64, i32) {
    (
        shape.n as i64,
        shape.c as i64,
        shape.s as i64,
        i32::from(shape.layout == Layout::Nlc),
    )
}

/// NCHW tile geometry: (threads, tile_elems, tiles per plane, tiles).
fn nchw_geometry<T: DType>(shape: &ActShape) -> (u32, usize, usize, usize) {
    let w = vec_width::<T>();
    let units = shape.s.div_ceil(w);
    let threads = units.next_multiple_of(32).clamp(32, THREADS as usize);
    let tile = threads * TILE_UNROLL * w;
    let tpp = shape.s.div_ceil(tile);
    (threads as u32, tile, tpp, shape.n * shape.c * tpp)
}

/// `(N, L, C)` tile geometry (kernels/acon.cu `nlc_tiles_w`), from the shape only
/// (never from the device: results are the same bits on every GPU). Public only
/// for the launch audit's bytes model and the tests ([`nlc_tiling`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NlcGeom {
    /// Columns (of `NLC_W` channels) per column chunk: a power of two dividing
    /// `THREADS`; the block has `THREADS / cc` row groups.
    pub cc: usize,
    /// Rows per tile.
    pub rows: usize,
    /// Tiles of rows per sample, `⌈L / rows⌉`.
    pub tps: usize,
    /// Column chunks `⌈(C / NLC_W) / cc⌉` (the grid's y).
    pub chunks: usize,
}

impl NlcGeom {
    /// Tiles of rows, `N · tps` (the grid's x; stage 2 sums `tps` partials).
    fn row_tiles(&self, shape: &ActShape) -> usize {
        shape.n * self.tps
    }

    /// The launch: `(N·tps, chunks)` blocks of [`THREADS`], each grid dimension
    /// capped (the kernel's loops are grid-stride in both), `smem` bytes.
    fn cfg(&self, shape: &ActShape, smem: u32) -> LaunchConfig {
        let cap = super::grid_cap();
        LaunchConfig {
            grid_dim: (
                self.row_tiles(shape).clamp(1, cap) as u32,
                self.chunks.clamp(1, cap) as u32,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem,
        }
    }
}

/// `(N, L, C)` tile geometry of the launcher ([`nlc_tiling`] of the shape).
fn nlc_geometry(shape: &ActShape) -> NlcGeom {
    nlc_tiling(shape.n, shape.s, shape.c)
}

/// Test hook (feature `emulate`): the block floor of [`nlc_tiling`] in force, 0
/// restoring [`NLC_MIN_BLOCKS`]. The parity tests lower it to 1 to run the tilings
/// that only model-size shapes get (one row group, `cc` = 256) at small shapes.
#[cfg(feature = "emulate")]
static NLC_FLOOR_OVERRIDE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Sets the block floor of [`nlc_tiling`] (feature `emulate`, tests only; 0: the
/// default `NLC_MIN_BLOCKS`); returns the previous setting. Process-wide: the GPU
/// tests hold their device lock around it and restore it.
#[cfg(feature = "emulate")]
#[doc(hidden)]
pub fn set_nlc_min_blocks(blocks: usize) -> usize {
    NLC_FLOOR_OVERRIDE.swap(blocks, std::sync::atomic::Ordering::SeqCst)
}

/// The block floor in force ([`NLC_MIN_BLOCKS`] unless a test lowered it).
fn nlc_min_blocks() -> usize {
    #[cfg(feature = "emulate")]
    {
        let v = NLC_FLOOR_OVERRIDE.load(std::sync::atomic::Ordering::SeqCst);
        if v > 0 {
            return v;
        }
    }
    NLC_MIN_BLOCKS
}

/// `(N, L, C)` tile geometry from the shape `(n, l, c)` only. Columns: `C / 4` when 4
/// divides `C`, else `C` (the kernel takes its scalar path, with the same `cc`).
///
/// Preferred tiling: `cc` = the power of two in 8..=256 (or `cols` rounded up to
/// one, below 8) leaving the fewest idle lanes in the last chunk, the larger on a tie
/// (e.g. C = 768: 192 columns, cc = 64, 3 chunks; C = 192: 48 columns, cc = 16), and
/// `⌊L / R₀⌋` tiles per sample (at least one) of `⌈L / tiles⌉` rows, `R₀` = the larger
/// of `NLC_MIN_ROWS` and `NLC_ROWS_PER_THREAD` per row group, so a tile has at
/// least `R₀` rows when `L ≥ R₀` (L = 197 at cc = 64: 6 tiles of 33 rows).
///
/// Block floor: while `N · tps · chunks` is below `NLC_MIN_BLOCKS` (792), the next
/// candidate is tried, in order: `cc` halved (down to 8; never more idle lanes), and
/// at each `cc` first `R₀`, then `R₀` = `NLC_MIN_ROWS` (1 row per thread at cc = 8).
/// The first candidate reaching the floor is taken, else the one with the most
/// blocks (the first on a tie). Tiles keep ≥ 32 rows when `L ≥ 32`, so the f32
/// partials stay ≤ 12·C bytes per 32 rows: bytes ≤ 1.0625 × the f16 backward's
/// minimum (6 bytes per element; GAP: ≤ 1.0625 × 2 bytes), within the audit's 1.25.
/// E.g. (32, 49, 2048): cc 256 → 16, 32 chunks × 32 tiles = 1024 blocks (was 64);
/// (8, 197, 768): cc 64 → 8 with 33-row tiles, 24 × 48 = 1152 blocks (was 144);
/// ViT-B (64, 197, 768) already has 384 × 3 and keeps cc = 64.
#[doc(hidden)]
pub fn nlc_tiling(n: usize, l: usize, c: usize) -> NlcGeom {
    let threads = THREADS as usize;
    let (n, l) = (n.max(1), l.max(1));
    let cols = if c % NLC_W == 0 { c / NLC_W } else { c }.max(1);
    let mut cc = cols.next_power_of_two().min(8);
    let mut idle = cols.div_ceil(cc) * cc - cols;
    let mut k = 16;
    while k <= threads {
        let i = cols.div_ceil(k) * k - cols;
        if i <= idle {
            (cc, idle) = (k, i);
        }
        k *= 2;
    }
    let geom = |cc: usize, min_rows: usize| {
        let tps0 = (l / min_rows).max(1);
        let rows = l.div_ceil(tps0);
        NlcGeom {
            cc,
            rows,
            tps: l.div_ceil(rows),
            chunks: cols.div_ceil(cc),
        }
    };
    let blocks = |g: &NlcGeom| n.saturating_mul(g.tps).saturating_mul(g.chunks);
    let floor = nlc_min_blocks();
    // (blocks, geometry) of the best candidate so far; every candidate has ≥ 1 block.
    let mut best = (0usize, geom(cc, NLC_MIN_ROWS));
    let mut k = cc;
    loop {
        let r0 = NLC_MIN_ROWS.max(NLC_ROWS_PER_THREAD * (threads / k));
        for r in [r0, NLC_MIN_ROWS] {
            let g = geom(k, r);
            let b = blocks(&g);
            if b >= floor {
                return g;
            }
            if b > best.0 {
                best = (b, g);
            }
        }
        if k <= 8 {
            break;
        }
        k /= 2;
    }
    best.1
}

/// The `(N, L, C)` kernels index tiles of rows and column chunks with 32-bit
/// integers: `N · tps` and `C` must fit (they do for any tensor that fits a
/// device: a tile has at least 32 rows).
fn check_nlc_tiles(shape: &ActShape, g: &NlcGeom) -> Result<()> {
    super::to_i32("(N, L, C) tiles of rows", g.row_tiles(shape))?;
    super::to_i32("channels", shape.c)?;
    Ok(())
}

/// The NCHW tile kernels index tiles, planes, samples and channels with 32-bit
/// integers (kernels/acon.cu `nchw_tiles`: no 64-bit division per tile): the `N·C·tpp`
/// tiles must fit in an `i32`. A tile has at least one element (and, for planes of
/// several tiles, thousands), so only tensors of more than 2^31 − 1 elements can be
/// refused.
fn check_nchw_tiles(ntiles: usize) -> Result<()> {
    super::to_i32("NCHW tiles (N·C planes × tiles per plane)", ntiles)?;
    Ok(())
}

/// Stage 2 (`acon_reduce_tiles`) indexes its `ns × N × C` totals with 32-bit integers
/// (no 64-bit division per total): `ns·N·C` must fit in an `i32`. Checked before the
/// first launch of an op.
fn check_totals(shape: &ActShape, ns: usize) -> Result<()> {
    super::to_i32("ACON totals (sums × N × C)", ns * shape.n * shape.c)?;
    Ok(())
}

/// The 32-bit index checks of the ACON backward ([`acon_c_backward`],
/// [`acon_b_backward`], [`acon_a_backward`]) for `shape` and storage `T`, without a
/// launch. The forward needs none of them (its kernel indexes with 64-bit integers);
/// a caller whose backward must not fail on user input after a successful forward
/// (the burn backend's autodiff node, `src/burn/cuda.rs`) runs them with the forward.
#[cfg_attr(not(feature = "burn-cuda"), allow(dead_code))]
pub(crate) fn check_backward_fits<T: DType>(shape: &ActShape) -> Result<()> {
    check_totals(shape, 3)?;
    if shape.layout == Layout::Nlc {
        check_nlc_tiles(shape, &nlc_geometry(shape))
    } else {
        check_nchw_tiles(nchw_geometry::<T>(shape).3)
    }
}

/// Sums the tile partials: returns `ns × N × C` totals (times `scale`; `ns·N·C`
/// checked by [`check_totals`]).
fn reduce_tiles(
    stream: &Arc<CudaStream>,
    shape: &ActShape,
    part: &CudaSlice<f32>,
    tiles_per: usize,
    ns: usize,
    scale: f32,
) -> Result<CudaSlice<f32>> {
    let total = ns * shape.n * shape.c;
    check_totals(shape, ns)?;
    let f = kernel_fn!(stream, "acon_reduce_tiles")?;
    // SAFETY: every element of `tot` is written by the kernel below.
    let mut tot = unsafe { stream.alloc::<f32>(total) }?;
    let (n, c, _, nlc) = dims(shape);
    let (k, nsi) = (tiles_per as i64, ns as i32);
    let mut b = launcher(stream, &f);
    b.arg(part)
        .arg(&mut tot)
        .arg(&n)
        .arg(&c)
        .arg(&k)
        .arg(&nsi)
        .arg(&nlc)
        .arg(&scale);
    // SAFETY: `part` holds N·C·K·ns floats (allocated by the caller for exactly
    // this tiling), `tot` ns·N·C; the kernel indexes only within those.
    unsafe { b.launch(cfg(total.div_ceil(THREADS as usize), THREADS, 0)) }?;
    Ok(tot)
}

/// Output of [`core_backward`].
struct Core<T> {
    dx: CudaSlice<T>,
    dp1: Option<CudaSlice<f32>>,
    dp2: Option<CudaSlice<f32>>,
    dbeta: Option<CudaSlice<f32>>,
}

/// The fused forward for validated inputs.
fn core_forward<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &ActShape,
    x: &CudaView<'_, T>,
    params: &Params<'_>,
    beta: &Beta<'_>,
) -> Result<CudaSlice<T>> {
    let numel = x.len();
    let f = params.fwd_kernel::<T>(stream)?;
    // SAFETY: the kernel writes every element of `y` (flat loop over all numel).
    let mut y = unsafe { stream.alloc::<T>(numel) }?;
    let (n, c, s, nlc) = dims(shape);
    let kind = beta.kind();
    let mut b = launcher(stream, &f);
    b.arg(x).arg(&mut y);
    params.push(&mut b);
    b.arg_opt(beta.buf());
    b.arg(&kind).arg(&n).arg(&c).arg(&s).arg(&nlc);
    let grid = numel.div_ceil(vec_width::<T>() * THREADS as usize);
    // SAFETY: shape, x (numel = N·C·S), p1/p2/p (C) and β (C, N·C or N, or no
    // buffer for pixel-wise, then never read) were validated; the kernel reads
    // x[0..numel), writes y[0..numel), and reads parameters at channel < C,
    // sample < N.
    unsafe { b.launch(cfg(grid, THREADS, 0)) }?;
    Ok(y)
}

/// The fused backward for validated inputs: `dx`, `dp1`/`dp2` (C, A/B/C as
/// applicable: B gets only `dp2`), `dβ` (by kind).
fn core_backward<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &ActShape,
    dy: &CudaView<'_, T>,
    x: &CudaView<'_, T>,
    params: &Params<'_>,
    beta: &Beta<'_>,
) -> Result<Core<T>> {
    let numel = x.len();
    let (n, c, s, _) = dims(shape);
    let kind = beta.kind();
    let nlc = shape.layout == Layout::Nlc;
    check_totals(shape, 3)?;
    // Every shape check before the first allocation.
    if nlc {
        check_nlc_tiles(shape, &nlc_geometry(shape))?;
    } else {
        check_nchw_tiles(nchw_geometry::<T>(shape).3)?;
    }
    // SAFETY: the backward kernel writes every element of dx (each tile covers
    // its plane / rows fully; the tiles cover the tensor).
    let mut dx = unsafe { stream.alloc::<T>(numel) }?;
    let (part, tiles_per) = if nlc {
        let g = nlc_geometry(shape);
        // SAFETY: every (sample, row tile) has its 3·C partials written, each
        // column chunk its channels.
        let mut part = unsafe { stream.alloc::<f32>(g.row_tiles(shape) * 3 * shape.c) }?;
        let f = params.bwd_kernel::<T>(stream, true)?;
        let (cc_i, rows_i) = (g.cc as i32, g.rows as i64);
        let mut b = launcher(stream, &f);
        b.arg(dy).arg(x).arg(&mut dx);
        params.push(&mut b);
        b.arg_opt(beta.buf());
        b.arg(&kind)
            .arg(&n)
            .arg(&s)
            .arg(&c)
            .arg(&cc_i)
            .arg(&rows_i)
            .arg(&mut part);
        let smem = (THREADS as usize * 3 * NLC_W * 4) as u32;
        // SAFETY: x, dy, dx hold N·L·C elements (validated), parameters C, β as
        // its kind (validated); tile (n, k, chunk) touches rows [k·rows, min(L, ..))
        // of sample n < N, channels of its chunk < C, and writes those channels of
        // part[(n·tps + k)·3·C ..][..3·C] inside the N·tps·3·C buffer; cc divides
        // the block; the dynamic shared memory is blockDim·3·NLC_W floats.
        unsafe { b.launch(g.cfg(shape, smem)) }?;
        (part, g.tps)
    } else {
        let (threads, tile, tpp, ntiles) = nchw_geometry::<T>(shape);
        // SAFETY: every tile writes its 3 partials.
        let mut part = unsafe { stream.alloc::<f32>(ntiles * 3) }?;
        let f = params.bwd_kernel::<T>(stream, false)?;
        let (tpp_i, tile_i) = (tpp as i64, tile as i64);
        let mut b = launcher(stream, &f);
        b.arg(dy).arg(x).arg(&mut dx);
        params.push(&mut b);
        b.arg_opt(beta.buf());
        b.arg(&kind)
            .arg(&n)
            .arg(&c)
            .arg(&s)
            .arg(&tpp_i)
            .arg(&tile_i)
            .arg(&mut part);
        // SAFETY: x, dy, dx hold N·C·S elements (validated); tile (plane, k)
        // touches only elements of its plane < N·C; part has N·C·tpp·3 floats.
        unsafe { b.launch(cfg(ntiles, threads, 0)) }?;
        (part, tpp)
    };
    let tot = reduce_tiles(stream, shape, &part, tiles_per, 3, 1.0)?;
    let want_p1 = matches!(params, Params::C(..));
    let want_p2 = !matches!(params, Params::A);
    // SAFETY (all three): acon_reduce_params writes every element it is given.
    let mut dp1 = if want_p1 {
        Some(unsafe { stream.alloc::<f32>(shape.c) }?)
    } else {
        None
    };
    let mut dp2 = if want_p2 {
        Some(unsafe { stream.alloc::<f32>(shape.c) }?)
    } else {
        None
    };
    let blen = beta.grad_len(shape);
    let mut dbeta = if blen > 0 {
        Some(unsafe { stream.alloc::<f32>(blen) }?)
    } else {
        None
    };
    let f = kernel_fn!(stream, "acon_reduce_params")?;
    let mut b = launcher(stream, &f);
    b.arg(&tot);
    b.arg_opt(dp1.as_mut());
    b.arg_opt(dp2.as_mut());
    b.arg_opt(dbeta.as_mut());
    b.arg(&kind).arg(&n).arg(&c);
    let work = shape.n * shape.c;
    // SAFETY: tot holds 3·N·C floats; dp1/dp2 (C) are written only when
    // non-null, dβ only for its kind with its length (C, N·C or N).
    unsafe { b.launch(cfg(work.div_ceil(THREADS as usize), THREADS, 0)) }?;
    Ok(Core {
        dx,
        dp1,
        dp2,
        dbeta,
    })
}

/// Driver error for an internal invariant that cannot fail (a gradient the op
/// always produces).
fn missing(what: &'static str) -> Error {
    Error::Driver(format!("internal: {what} was not produced"))
}

fn check_params(shape: &ActShape, what: &'static str, p: usize) -> Result<()> {
    check_len(what, shape.c, p)
}

/// ACON-C forward on the device: `y = d·σ(β·d) + p2·x`, `d = (p1 − p2)·x`
/// ([`crate::cpu::acon::acon_c_forward`]); `p1`, `p2` f32 (length `C`), β from
/// `beta`. Nothing is saved (the backward recomputes from `x`).
///
/// Errors: `Empty` for a zero dimension, `LengthMismatch` for `x`, `p1`, `p2`
/// or the β buffer.
///
/// # Example (forward and backward, against the CPU reference)
///
/// ```
/// use activation_kernels::cuda::{acon, real_driver_present, CudaContext};
/// use activation_kernels::{cpu, ActShape};
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
/// let shape = ActShape::nchw(1, 2, 1, 2);
/// let (x, dy) = ([0.5f32, -1.0, 2.0, -0.25], [1.0f32, -0.5, 0.25, 2.0]);
/// let (p1, p2, beta) = ([1.0f32, 0.5], [0.0f32, 0.25], [1.0f32, 2.0]);
/// let (xd, dyd) = (stream.clone_htod(&x)?, stream.clone_htod(&dy)?);
/// let (p1d, p2d, bd) = (stream.clone_htod(&p1)?, stream.clone_htod(&p2)?, stream.clone_htod(&beta)?);
/// let y = acon::acon_c_forward(&stream, &shape, &xd, &p1d, &p2d, acon::Beta::PerChannel(&bd))?;
/// let g = acon::acon_c_backward(&stream, &shape, &dyd, &xd, &p1d, &p2d, acon::Beta::PerChannel(&bd))?;
///
/// let cpu_beta = cpu::acon::Beta::PerChannel(&beta);
/// let y_ref = cpu::acon::acon_c_forward(&shape, &x, &p1, &p2, cpu_beta)?;
/// let g_ref = cpu::acon::acon_c_backward(&shape, &dy, &x, &p1, &p2, cpu_beta)?;
/// let pairs = [
///     (stream.clone_dtoh(&y)?, y_ref),
///     (stream.clone_dtoh(&g.dx)?, g_ref.dx),
///     (stream.clone_dtoh(&g.dp1)?, g_ref.dp1),
///     (stream.clone_dtoh(&g.dp2)?, g_ref.dp2),
///     (stream.clone_dtoh(g.dbeta.as_ref().unwrap())?, g_ref.dbeta),
/// ];
/// for (gpu, reference) in pairs {
///     for (a, b) in gpu.iter().zip(&reference) {
///         assert_relative_eq!(a, b, epsilon = 1e-6, max_relative = 1e-5); // __expf: a few ulp
///     }
/// }
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn acon_c_forward<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &ActShape,
    x: &impl DeviceInput<T>,
    p1: &impl DeviceInput<f32>,
    p2: &impl DeviceInput<f32>,
    beta: Beta<'_>,
) -> Result<CudaSlice<T>> {
    let (xv, p1v, p2v) = (x.view(), p1.view(), p2.view());
    shape.validate("x", xv.len())?;
    check_params(shape, "p1", p1v.len())?;
    check_params(shape, "p2", p2v.len())?;
    beta.validate(shape)?;
    core_forward(stream, shape, &xv, &Params::C(p1v, p2v), &beta)
}

/// ACON-C backward on the device ([`crate::cpu::acon::acon_c_backward`]): with
/// `s = σ(β·d)`, `∂y/∂d = s + β·d·s(1 − s)`:
/// `dx = dy·((p1 − p2)·∂y/∂d + p2)` (+ `dy·∂y/∂β·σ(x)(1 − σ(x))` pixel-wise),
/// `dp1 = Σ dy·x·∂y/∂d`, `dp2 = Σ dy·x·(1 − ∂y/∂d)`, `dβ = Σ dy·d²·s(1 − s)`
/// over the elements sharing each β. Sums are f32, two-stage, fixed order
/// (bitwise reproducible).
///
/// Errors: as [`acon_c_forward`], plus `LengthMismatch` for `dy`; `Shape` past the
/// kernels' 32-bit tile indices: more than 2^31 − 1 NCHW tiles (`N·C` planes times
/// tiles per plane) or `3·N·C` above 2^31 − 1.
///
/// Example: [`acon_c_forward`]'s runs the forward and this backward on the device.
pub fn acon_c_backward<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &ActShape,
    dy: &impl DeviceInput<T>,
    x: &impl DeviceInput<T>,
    p1: &impl DeviceInput<f32>,
    p2: &impl DeviceInput<f32>,
    beta: Beta<'_>,
) -> Result<AconCGrads<T>> {
    let (dyv, xv, p1v, p2v) = (dy.view(), x.view(), p1.view(), p2.view());
    shape.validate("x", xv.len())?;
    check_len("dy", xv.len(), dyv.len())?;
    check_params(shape, "p1", p1v.len())?;
    check_params(shape, "p2", p2v.len())?;
    beta.validate(shape)?;
    let g = core_backward(stream, shape, &dyv, &xv, &Params::C(p1v, p2v), &beta)?;
    Ok(AconCGrads {
        dx: g.dx,
        dp1: g.dp1.ok_or_else(|| missing("dp1"))?,
        dp2: g.dp2.ok_or_else(|| missing("dp2"))?,
        dbeta: g.dbeta,
    })
}

/// ACON-B forward: `y = (1 − p)·x·σ(β(1 − p)·x) + p·x` (ACON-C with `p1 = 1`,
/// `p2 = p`; [`crate::cpu::acon::acon_b_forward`]).
///
/// Errors: `Empty`, or `LengthMismatch` for `x`, `p` or the β buffer.
///
/// # Example (forward and backward, against the CPU reference)
///
/// ```
/// use activation_kernels::cuda::{acon, real_driver_present, CudaContext};
/// use activation_kernels::{cpu, ActShape};
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
/// let shape = ActShape::nlc(2, 1, 2); // 2 samples of 1 token, 2 channels (last)
/// let (x, p, beta) = ([1.5f32, -2.0, 0.5, 3.0], [0.25f32, -0.5], [3.0f32, 0.5]);
/// let (xd, pd, bd) = (stream.clone_htod(&x)?, stream.clone_htod(&p)?, stream.clone_htod(&beta)?);
/// let y = acon::acon_b_forward(&stream, &shape, &xd, &pd, acon::Beta::PerSample(&bd))?;
/// let g = acon::acon_b_backward(&stream, &shape, &xd, &xd, &pd, acon::Beta::PerSample(&bd))?;
///
/// let cpu_beta = cpu::acon::Beta::PerSample(&beta);
/// let y_ref = cpu::acon::acon_b_forward(&shape, &x, &p, cpu_beta)?;
/// let g_ref = cpu::acon::acon_b_backward(&shape, &x, &x, &p, cpu_beta)?; // dy = x
/// for (gpu, reference) in [(stream.clone_dtoh(&y)?, y_ref), (stream.clone_dtoh(&g.dp)?, g_ref.dp)] {
///     for (a, b) in gpu.iter().zip(&reference) {
///         assert_relative_eq!(a, b, epsilon = 1e-6, max_relative = 1e-5);
///     }
/// }
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn acon_b_forward<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &ActShape,
    x: &impl DeviceInput<T>,
    p: &impl DeviceInput<f32>,
    beta: Beta<'_>,
) -> Result<CudaSlice<T>> {
    let (xv, pv) = (x.view(), p.view());
    shape.validate("x", xv.len())?;
    check_params(shape, "p", pv.len())?;
    beta.validate(shape)?;
    core_forward(stream, shape, &xv, &Params::B(pv), &beta)
}

/// ACON-B backward: `dx = dy·((1 − p)·∂y/∂d + p)` (+ the β path pixel-wise),
/// `dp = Σ dy·x·(1 − ∂y/∂d)`, `dβ = Σ dy·d²·s(1 − s)`, `d = (1 − p)·x`
/// ([`crate::cpu::acon::acon_b_backward`]).
///
/// Errors: as [`acon_b_forward`], plus `LengthMismatch` for `dy`; `Shape` past the
/// kernels' 32-bit tile indices: more than 2^31 − 1 NCHW tiles (`N·C` planes times
/// tiles per plane) or `3·N·C` above 2^31 − 1.
///
/// Example: [`acon_b_forward`]'s runs the forward and this backward on the device.
pub fn acon_b_backward<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &ActShape,
    dy: &impl DeviceInput<T>,
    x: &impl DeviceInput<T>,
    p: &impl DeviceInput<f32>,
    beta: Beta<'_>,
) -> Result<AconBGrads<T>> {
    let (dyv, xv, pv) = (dy.view(), x.view(), p.view());
    shape.validate("x", xv.len())?;
    check_len("dy", xv.len(), dyv.len())?;
    check_params(shape, "p", pv.len())?;
    beta.validate(shape)?;
    let g = core_backward(stream, shape, &dyv, &xv, &Params::B(pv), &beta)?;
    Ok(AconBGrads {
        dx: g.dx,
        dp: g.dp2.ok_or_else(|| missing("dp"))?,
        dbeta: g.dbeta,
    })
}

/// ACON-A (Swish) forward: `y = x·σ(β·x)` ([`crate::cpu::acon::acon_a_forward`]).
///
/// Errors: `Empty`, or `LengthMismatch` for `x` or the β buffer.
///
/// # Example (forward and backward in f16 storage)
///
/// ```
/// use activation_kernels::cuda::{acon, real_driver_present, CudaContext};
/// use activation_kernels::ActShape;
/// use approx::assert_relative_eq;
/// use half::f16;
///
/// # #[cfg(not(feature = "emulate"))]
/// # if !real_driver_present() { return Ok(()); } // no GPU and no emulator: nothing to run on
/// // Without a GPU, the emulated device (feature `emulate`) stands in for one.
/// #[cfg(feature = "emulate")]
/// if !real_driver_present() {
///     activation_kernels::emu::install().expect("the emulated device");
/// }
/// let stream = CudaContext::new(0)?.default_stream();
/// let shape = ActShape::nchw(1, 1, 1, 3);
/// let x = [1.0f32, 0.0, -2.0].map(f16::from_f32); // f16 storage, f32 arithmetic
/// let xd = stream.clone_htod(&x)?;
/// let bd = stream.clone_htod(&[1.0f32])?; // β per channel, always f32
/// let y = acon::acon_a_forward(&stream, &shape, &xd, acon::Beta::PerChannel(&bd))?;
/// let dy = stream.clone_htod(&[f16::ONE; 3])?;
/// let g = acon::acon_a_backward(&stream, &shape, &dy, &xd, acon::Beta::PerChannel(&bd))?;
///
/// let (y, dx) = (stream.clone_dtoh(&y)?, stream.clone_dtoh(&g.dx)?);
/// let silu = |v: f32| v / (1.0 + (-v).exp()); // Swish at β = 1
/// assert_relative_eq!(y[0].to_f32(), silu(1.0), max_relative = 1e-3); // f16: 2^-11
/// assert_eq!(y[1].to_f32(), 0.0);
/// assert_eq!(dx[1].to_f32(), 0.5); // SiLU'(0) = 1/2
/// let dbeta = stream.clone_dtoh(g.dbeta.as_ref().unwrap())?; // Σ dy·x²·s(1 − s)
/// let s = |v: f32| 1.0 / (1.0 + (-v).exp());
/// let want: f32 = [1.0f32, -2.0].iter().map(|&v| v * v * s(v) * (1.0 - s(v))).sum();
/// assert_relative_eq!(dbeta[0], want, max_relative = 1e-5);
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn acon_a_forward<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &ActShape,
    x: &impl DeviceInput<T>,
    beta: Beta<'_>,
) -> Result<CudaSlice<T>> {
    let xv = x.view();
    shape.validate("x", xv.len())?;
    beta.validate(shape)?;
    core_forward(stream, shape, &xv, &Params::A, &beta)
}

/// ACON-A backward: with `s = σ(β·x)`, `dx = dy·(s + β·x·s(1 − s))`
/// (+ `dy·x²·s(1 − s)·σ(x)(1 − σ(x))` pixel-wise), `dβ = Σ dy·x²·s(1 − s)`
/// ([`crate::cpu::acon::acon_a_backward`]).
///
/// Errors: as [`acon_a_forward`], plus `LengthMismatch` for `dy`; `Shape` past the
/// kernels' 32-bit tile indices: more than 2^31 − 1 NCHW tiles (`N·C` planes times
/// tiles per plane) or `3·N·C` above 2^31 − 1.
///
/// Example: [`acon_a_forward`]'s runs the forward and this backward on the device.
pub fn acon_a_backward<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &ActShape,
    dy: &impl DeviceInput<T>,
    x: &impl DeviceInput<T>,
    beta: Beta<'_>,
) -> Result<AconAGrads<T>> {
    let (dyv, xv) = (dy.view(), x.view());
    shape.validate("x", xv.len())?;
    check_len("dy", xv.len(), dyv.len())?;
    beta.validate(shape)?;
    let g = core_backward(stream, shape, &dyv, &xv, &Params::A, &beta)?;
    Ok(AconAGrads {
        dx: g.dx,
        dbeta: g.dbeta,
    })
}

// ---------------------------------------------------------------------------
// meta-ACON generators.

/// GAP(x) in f32, `N × C` (block reductions + fixed-order stage 2).
fn gap<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &ActShape,
    x: &CudaView<'_, T>,
) -> Result<CudaSlice<f32>> {
    let (n, c, s, _) = dims(shape);
    check_totals(shape, 1)?;
    let (part, tiles_per) = if shape.layout == Layout::Nlc {
        let g = nlc_geometry(shape);
        check_nlc_tiles(shape, &g)?;
        // SAFETY: every (sample, row tile) has its C partials written, each
        // column chunk its channels.
        let mut part = unsafe { stream.alloc::<f32>(g.row_tiles(shape) * shape.c) }?;
        let f = kernel_fn!(stream, "acon_gap_nlc", T)?;
        let (cc_i, rows_i) = (g.cc as i32, g.rows as i64);
        let mut b = launcher(stream, &f);
        b.arg(x)
            .arg(&n)
            .arg(&s)
            .arg(&c)
            .arg(&cc_i)
            .arg(&rows_i)
            .arg(&mut part);
        // SAFETY: x holds N·L·C elements (validated); tile (n, k, chunk) reads rows
        // of sample n, channels of its chunk, and writes those channels of
        // part[(n·tps + k)·C ..][..C]; cc divides the block; smem blockDim·NLC_W
        // floats.
        unsafe { b.launch(g.cfg(shape, (THREADS as usize * NLC_W * 4) as u32)) }?;
        (part, g.tps)
    } else {
        let (threads, tile, tpp, ntiles) = nchw_geometry::<T>(shape);
        check_nchw_tiles(ntiles)?;
        // SAFETY: every tile writes its partial.
        let mut part = unsafe { stream.alloc::<f32>(ntiles) }?;
        let f = kernel_fn!(stream, "acon_gap_nchw", T)?;
        let (tpp_i, tile_i) = (tpp as i64, tile as i64);
        let mut b = launcher(stream, &f);
        b.arg(x)
            .arg(&n)
            .arg(&c)
            .arg(&s)
            .arg(&tpp_i)
            .arg(&tile_i)
            .arg(&mut part);
        // SAFETY: x holds N·C·S elements; tile (plane, k) reads its plane only and
        // writes part[tile].
        unsafe { b.launch(cfg(ntiles, threads, 0)) }?;
        (part, tpp)
    };
    reduce_tiles(stream, shape, &part, tiles_per, 1, 1.0 / shape.s as f32)
}

/// `dx[n, c, s] += dg[n, c]` (or `dg[n]` with `per_sample`) times `scale`, in place.
fn gap_add<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &ActShape,
    dx: &mut CudaSlice<T>,
    dg: &CudaSlice<f32>,
    per_sample: bool,
    scale: f32,
) -> Result<()> {
    let (n, c, s, nlc) = dims(shape);
    let f = kernel_fn!(stream, "acon_gap_add", T)?;
    let ps = i32::from(per_sample);
    let numel = dx.len();
    let mut b = launcher(stream, &f);
    b.arg(dx)
        .arg(dg)
        .arg(&ps)
        .arg(&scale)
        .arg(&n)
        .arg(&c)
        .arg(&s)
        .arg(&nlc);
    // SAFETY: dx holds N·C·S elements (allocated for the validated shape), dg
    // N (per_sample) or N·C floats; the flat loop stays below N·C·S.
    unsafe {
        b.launch(cfg(
            numel.div_ceil(vec_width::<T>() * THREADS as usize),
            THREADS,
            0,
        ))
    }?;
    Ok(())
}

/// Channel-wise meta-ACON β generator on the device (mirror of
/// [`crate::cpu::acon::ChannelGen`]): `β[n, :] = σ(W2·(W1·GAP(x)[n, :] + b1) + b2)`,
/// `W1` `(width, C)` and `W2` `(C, width)` row-major, optional biases, all f32.
#[derive(Debug)]
pub struct ChannelGen {
    /// Channels C.
    pub c: usize,
    /// Hidden width (the authors use `max(r, C / r)`, [`ChannelGen::width_for`]).
    pub width: usize,
    /// `W1`, `(width, C)` row-major.
    pub w1: CudaSlice<f32>,
    /// Optional `b1`, length `width`.
    pub b1: Option<CudaSlice<f32>>,
    /// `W2`, `(C, width)` row-major.
    pub w2: CudaSlice<f32>,
    /// Optional `b2`, length `C`.
    pub b2: Option<CudaSlice<f32>>,
}

/// What [`ChannelGen::backward`] needs from its forward (device buffers, f32):
/// GAP (N × C), the hidden layer (N × width) and β (N × C). Opaque; tied to the
/// shape and width it was produced for.
#[derive(Debug)]
pub struct ChannelGenSaved {
    shape: ActShape,
    width: usize,
    gap: CudaSlice<f32>,
    h: CudaSlice<f32>,
    beta: CudaSlice<f32>,
}

/// Gradients of [`ChannelGen::backward`].
#[derive(Debug)]
pub struct ChannelGenGrads<T> {
    /// `∂L/∂x` through GAP (storage `T`), full shape of `x`.
    pub dx: CudaSlice<T>,
    /// `∂L/∂W1`, `(width, C)`.
    pub dw1: CudaSlice<f32>,
    /// `∂L/∂b1`, `None` if the generator has no `b1`.
    pub db1: Option<CudaSlice<f32>>,
    /// `∂L/∂W2`, `(C, width)`.
    pub dw2: CudaSlice<f32>,
    /// `∂L/∂b2`, `None` if the generator has no `b2`.
    pub db2: Option<CudaSlice<f32>>,
}

/// Generator weight gradients and `∂L/∂GAP / S` (internal).
struct GenInner {
    dg: CudaSlice<f32>,
    dw1: CudaSlice<f32>,
    db1: Option<CudaSlice<f32>>,
    dw2: CudaSlice<f32>,
    db2: Option<CudaSlice<f32>>,
}

impl ChannelGen {
    /// Hidden width `max(r, C / r)` ([`crate::cpu::acon::ChannelGen::width_for`]).
    pub fn width_for(c: usize, r: usize) -> Result<usize> {
        crate::cpu::acon::ChannelGen::<f32>::width_for(c, r)
    }

    /// Uploads a host generator (f32 weights) to the device.
    pub fn from_host(
        stream: &Arc<CudaStream>,
        g: &crate::cpu::acon::ChannelGen<f32>,
    ) -> Result<Self> {
        Ok(Self {
            c: g.c,
            width: g.width,
            w1: stream.clone_htod(&g.w1)?,
            b1: g.b1.as_ref().map(|b| stream.clone_htod(b)).transpose()?,
            w2: stream.clone_htod(&g.w2)?,
            b2: g.b2.as_ref().map(|b| stream.clone_htod(b)).transpose()?,
        })
    }

    /// Checks the generator's own buffers and that it matches `shape`, and that its
    /// `2·C·width + C + width` weight-gradient outputs fit the 32-bit indices of
    /// `acon_gen_wgrad` (no 64-bit division per output; `Error::Shape` otherwise).
    fn validate(&self, shape: &ActShape) -> Result<()> {
        crate::cpu::acon::check_gen_dims(
            self.c,
            self.width,
            shape,
            [self.w1.len(), self.w2.len()],
            [
                self.b1.as_ref().map(|b| b.len()),
                self.b2.as_ref().map(|b| b.len()),
            ],
        )?;
        let outputs = self
            .c
            .saturating_mul(self.width)
            .saturating_mul(2)
            .saturating_add(self.c)
            .saturating_add(self.width);
        super::to_i32("channel generator weights (2·C·width + C + width)", outputs)?;
        Ok(())
    }

    /// Every check [`ChannelGen::forward`] makes on a generator of `width` for `shape`
    /// (buffer lengths as given, `b*` `None` when absent), without the buffers: a
    /// caller that widens the weights to f32 on the device first (the burn backend,
    /// `src/burn/cuda.rs`) runs it before that launch.
    #[cfg_attr(not(feature = "burn-cuda"), allow(dead_code))]
    pub(crate) fn check_dims(
        shape: &ActShape,
        width: usize,
        w_lens: [usize; 2],
        b_lens: [Option<usize>; 2],
    ) -> Result<()> {
        crate::cpu::acon::check_gen_dims(shape.c, width, shape, w_lens, b_lens)?;
        let outputs = shape
            .c
            .saturating_mul(width)
            .saturating_mul(2)
            .saturating_add(shape.c)
            .saturating_add(width);
        super::to_i32("channel generator weights (2·C·width + C + width)", outputs)?;
        Ok(())
    }

    fn check_saved(&self, shape: &ActShape, saved: &ChannelGenSaved) -> Result<()> {
        if saved.shape != *shape || saved.width != self.width {
            return Err(Error::Shape {
                what: "saved",
                msg: format!(
                    "saved from shape {:?} width {}, used with shape {:?} width {}",
                    saved.shape, saved.width, shape, self.width
                ),
            });
        }
        Ok(())
    }

    /// Forward: returns β (`N × C` f32, use as [`Beta::PerSampleChannel`]) and the
    /// saved state. GAP by block reductions (fixed order), then the fc layers as
    /// two kernels over (sample, slice of outputs) — `h`, then `β` with σ — each
    /// output a fixed-order warp reduction; all f32.
    ///
    /// Errors: `Empty`/`LengthMismatch` for `x`; `Shape` if the generator's `C`
    /// differs from the tensor's, or if `2·C·width + C + width` (its weight gradients)
    /// or `N·C` exceed 2^31 − 1 (the kernels' 32-bit indices); `Empty` for width 0;
    /// `LengthMismatch` for `w1`, `w2`, `b1`, `b2`.
    ///
    /// # Example (forward and backward, against the CPU reference)
    ///
    /// ```
    /// use activation_kernels::cuda::{acon, real_driver_present, CudaContext};
    /// use activation_kernels::{cpu, ActShape};
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
    /// let host_gen = cpu::acon::ChannelGen::<f32>::init(4, 2, true, 7)?; // C = 4, width 2
    /// let gen = acon::ChannelGen::from_host(&stream, &host_gen)?;
    /// let shape = ActShape::nchw(2, 4, 1, 2);
    /// let x: Vec<f32> = (0..16).map(|i| (i as f32 - 7.5) / 4.0).collect();
    /// let (beta, saved) = gen.forward(&stream, &shape, &stream.clone_htod(&x)?)?;
    /// let dbeta = stream.clone_htod(&[1.0f32; 8])?;
    /// let g: acon::ChannelGenGrads<f32> = gen.backward(&stream, &shape, &dbeta, &saved)?;
    ///
    /// let (beta_ref, saved_ref) = host_gen.forward(&shape, &x)?;
    /// let g_ref = host_gen.backward(&shape, &[1.0; 8], &saved_ref)?;
    /// let pairs = [
    ///     (stream.clone_dtoh(&beta)?, beta_ref),
    ///     (stream.clone_dtoh(&g.dx)?, g_ref.dx),
    ///     (stream.clone_dtoh(&g.dw1)?, g_ref.dw1),
    ///     (stream.clone_dtoh(&g.dw2)?, g_ref.dw2),
    /// ];
    /// for (gpu, reference) in pairs {
    ///     for (a, b) in gpu.iter().zip(&reference) {
    ///         assert_relative_eq!(a, b, epsilon = 1e-6, max_relative = 1e-5);
    ///     }
    /// }
    /// # Ok::<(), activation_kernels::Error>(())
    /// ```
    pub fn forward<T: DType>(
        &self,
        stream: &Arc<CudaStream>,
        shape: &ActShape,
        x: &impl DeviceInput<T>,
    ) -> Result<(CudaSlice<f32>, ChannelGenSaved)> {
        let xv = x.view();
        shape.validate("x", xv.len())?;
        self.validate(shape)?;
        self.forward_inner(stream, shape, &xv)
    }

    fn forward_inner<T: DType>(
        &self,
        stream: &Arc<CudaStream>,
        shape: &ActShape,
        x: &CudaView<'_, T>,
    ) -> Result<(CudaSlice<f32>, ChannelGenSaved)> {
        let g = gap(stream, shape, x)?;
        // SAFETY: acon_gen_fc_h writes all N·width hidden values, acon_gen_fc_beta
        // all N·C βs.
        let mut h = unsafe { stream.alloc::<f32>(shape.n * self.width) }?;
        let mut beta = unsafe { stream.alloc::<f32>(shape.n * shape.c) }?;
        let (n, c, wd) = (shape.n as i64, shape.c as i64, self.width as i64);
        let f = kernel_fn!(stream, "acon_gen_fc_h")?;
        let mut b = launcher(stream, &f);
        b.arg(&g).arg(&self.w1);
        b.arg_opt(self.b1.as_ref());
        b.arg(&n).arg(&c).arg(&wd).arg(&mut h);
        // SAFETY: (n, j) for n < N, j < width reads gap[n·C..][..C], W1 (width·C,
        // validated), b1 (width) when present, and writes h[n·width + j].
        unsafe { b.launch(cfg_gen(shape.n, self.width.div_ceil(WARPS))) }?;
        let f = kernel_fn!(stream, "acon_gen_fc_beta")?;
        let mut b = launcher(stream, &f);
        b.arg(&h).arg(&self.w2);
        b.arg_opt(self.b2.as_ref());
        b.arg(&n).arg(&c).arg(&wd).arg(&mut beta);
        // SAFETY: (n, c) for n < N, c < C reads h[n·width..][..width], W2 (C·width,
        // validated), b2 (C) when present, and writes β[n·C + c].
        unsafe { b.launch(cfg_gen(shape.n, shape.c.div_ceil(WARPS))) }?;
        Ok((
            beta.clone(),
            ChannelGenSaved {
                shape: *shape,
                width: self.width,
                gap: g,
                h,
                beta,
            },
        ))
    }

    /// Backward through σ, both fc layers and GAP (f32; per-sample products in
    /// two kernels over (sample, slice of outputs), weight gradients summed over
    /// samples in fixed order): with `z = W2·h + b2`, `h = W1·g + b1`, `g = GAP(x)`:
    /// `dz = dβ·β(1 − β)`, `dW2 = Σ_n dz ⊗ h`, `db2 = Σ_n dz`, `dh = W2ᵀ·dz`,
    /// `dW1 = Σ_n dh ⊗ g`, `db1 = Σ_n dh`, `dx[n, c, s] = (W1ᵀ·dh)[n, c] / S`.
    ///
    /// Errors: `LengthMismatch` for `dbeta` (`N × C`); `Shape` if `saved` came
    /// from another shape or width; as [`ChannelGen::forward`] for the generator.
    ///
    /// Example: [`ChannelGen::forward`]'s runs the forward and this backward on the
    /// device.
    pub fn backward<T: DType>(
        &self,
        stream: &Arc<CudaStream>,
        shape: &ActShape,
        dbeta: &CudaSlice<f32>,
        saved: &ChannelGenSaved,
    ) -> Result<ChannelGenGrads<T>> {
        let numel = shape.numel()?;
        check_nonzero("batch N", shape.n)?;
        check_nonzero("channels C", shape.c)?;
        check_nonzero("positions S (H·W or L)", shape.s)?;
        self.validate(shape)?;
        check_len("dbeta (N×C)", shape.n * shape.c, dbeta.len())?;
        self.check_saved(shape, saved)?;
        let gi = self.backward_inner(stream, shape, dbeta, saved)?;
        let mut dx = stream.alloc_zeros::<T>(numel)?;
        gap_add(stream, shape, &mut dx, &gi.dg, false, 1.0)?;
        Ok(ChannelGenGrads {
            dx,
            dw1: gi.dw1,
            db1: gi.db1,
            dw2: gi.dw2,
            db2: gi.db2,
        })
    }

    fn backward_inner(
        &self,
        stream: &Arc<CudaStream>,
        shape: &ActShape,
        dbeta: &CudaSlice<f32>,
        saved: &ChannelGenSaved,
    ) -> Result<GenInner> {
        let (nn, cc, wdu) = (shape.n, shape.c, self.width);
        // SAFETY: acon_gen_fc_dh writes all of dz (N·C) and dh (N·width),
        // acon_gen_fc_dg all of dg (N·C).
        let mut dz = unsafe { stream.alloc::<f32>(nn * cc) }?;
        let mut dh = unsafe { stream.alloc::<f32>(nn * wdu) }?;
        let mut dg = unsafe { stream.alloc::<f32>(nn * cc) }?;
        let (n, c, wd) = (nn as i64, cc as i64, wdu as i64);
        let scale = 1.0 / shape.s as f32;
        let f = kernel_fn!(stream, "acon_gen_fc_dh")?;
        let mut b = launcher(stream, &f);
        b.arg(dbeta)
            .arg(&saved.beta)
            .arg(&self.w2)
            .arg(&n)
            .arg(&c)
            .arg(&wd)
            .arg(&mut dz)
            .arg(&mut dh);
        // SAFETY: block (n, group of 8 outputs) reads row n of dβ, β (C) and W2
        // (C·width, validated) at columns < width, writes dz[n·C + c] (group 0) and
        // dh[n·width + j] for j < width; THREADS is a multiple of 32 and the
        // kernel's bound.
        unsafe { b.launch(cfg_gen(nn, wdu.div_ceil(8))) }?;
        let f = kernel_fn!(stream, "acon_gen_fc_dg")?;
        let mut b = launcher(stream, &f);
        b.arg(&self.w1)
            .arg(&dh)
            .arg(&n)
            .arg(&c)
            .arg(&wd)
            .arg(&scale)
            .arg(&mut dg);
        // SAFETY: (n, c) reads W1 (width·C, validated) and row n of dh (width),
        // writes dg at n·C + c.
        unsafe { b.launch(cfg_gen(nn, cc.div_ceil(THREADS as usize))) }?;
        // SAFETY: acon_gen_wgrad writes every element of dW1, dW2 and, when
        // present, db1, db2.
        let mut dw1 = unsafe { stream.alloc::<f32>(wdu * cc) }?;
        let mut dw2 = unsafe { stream.alloc::<f32>(wdu * cc) }?;
        let mut db1 = match self.b1 {
            Some(_) => Some(unsafe { stream.alloc::<f32>(wdu) }?),
            None => None,
        };
        let mut db2 = match self.b2 {
            Some(_) => Some(unsafe { stream.alloc::<f32>(cc) }?),
            None => None,
        };
        let f = kernel_fn!(stream, "acon_gen_wgrad")?;
        let mut b = launcher(stream, &f);
        b.arg(&dz)
            .arg(&dh)
            .arg(&saved.h)
            .arg(&saved.gap)
            .arg(&n)
            .arg(&c)
            .arg(&wd)
            .arg(&mut dw1);
        b.arg_opt(db1.as_mut());
        b.arg(&mut dw2);
        b.arg_opt(db2.as_mut());
        let work = 2 * wdu * cc + cc + wdu;
        // SAFETY: reads dz, gap (N·C), dh, h (N·width); writes dW1, dW2
        // (width·C), db1 (width) and db2 (C) only when non-null.
        unsafe { b.launch(cfg(work.div_ceil(THREADS as usize), THREADS, 0)) }?;
        Ok(GenInner {
            dg,
            dw1,
            db1,
            dw2,
            db2,
        })
    }
}

/// Warps per block of [`THREADS`].
const WARPS: usize = THREADS as usize / 32;

/// The channel-wise generator's fc kernels: blocks of [`THREADS`] over (sample,
/// slice of outputs), both dimensions capped (the kernels' loops are grid-stride in
/// both). ViT-B (64, 197, 768) with width 48: 384 blocks for `h` and `dh` (groups
/// of 8 outputs), 6144 for `β`, 192 for `dg` (was 64, one per sample).
fn cfg_gen(n: usize, slices: usize) -> LaunchConfig {
    let cap = super::grid_cap();
    LaunchConfig {
        grid_dim: (n.clamp(1, cap) as u32, slices.clamp(1, cap) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of [`THREADS`] per sample.
fn cfg_blocks(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Grid dimension limit of the one-block-per-sample kernels.
fn check_batch_grid(shape: &ActShape) -> Result<()> {
    if shape.n > i32::MAX as usize {
        return Err(Error::Shape {
            what: "batch N",
            msg: format!(
                "{} exceeds the grid limit of the generator kernels",
                shape.n
            ),
        });
    }
    Ok(())
}

/// Layer-wise meta-ACON generator: `β[n] = σ(Σ_c GAP(x)[n, c])`
/// ([`crate::cpu::acon::layer_gen_forward`]); returns β (length `N`, f32; use as
/// [`Beta::PerSample`]).
///
/// Errors: `Empty`/`LengthMismatch` for `x`; `Shape` for more than 2^31 − 1 planes
/// `N·C` (the GAP kernels' 32-bit tile indices).
///
/// # Example (forward and backward)
///
/// ```
/// use activation_kernels::cuda::{acon, real_driver_present, CudaContext, CudaSlice};
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
/// let shape = ActShape::nchw(1, 2, 1, 2);
/// let x = stream.clone_htod(&[1.0f32, 3.0, -1.0, 0.0])?; // channel means 2 and −0.5
/// let beta = acon::layer_gen_forward(&stream, &shape, &x)?;
/// let b = stream.clone_dtoh(&beta)?[0];
/// assert_relative_eq!(b, 1.0 / (1.0 + (-1.5f32).exp()), max_relative = 1e-6);
/// // Backward of L = β[0]: dx = β(1 − β)/S everywhere (S = 2).
/// let dbeta = stream.clone_htod(&[1.0f32])?;
/// let dx: CudaSlice<f32> = acon::layer_gen_backward(&stream, &shape, &dbeta, &beta)?;
/// for d in stream.clone_dtoh(&dx)? {
///     assert_relative_eq!(d, b * (1.0 - b) / 2.0, max_relative = 1e-6);
/// }
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn layer_gen_forward<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &ActShape,
    x: &impl DeviceInput<T>,
) -> Result<CudaSlice<f32>> {
    let xv = x.view();
    shape.validate("x", xv.len())?;
    check_batch_grid(shape)?;
    layer_forward_inner(stream, shape, &xv)
}

fn layer_forward_inner<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &ActShape,
    x: &CudaView<'_, T>,
) -> Result<CudaSlice<f32>> {
    let g = gap(stream, shape, x)?;
    // SAFETY: acon_layer_gen_fwd writes β[n] for every block n < N.
    let mut beta = unsafe { stream.alloc::<f32>(shape.n) }?;
    let c = shape.c as i64;
    let f = kernel_fn!(stream, "acon_layer_gen_fwd")?;
    let mut b = launcher(stream, &f);
    b.arg(&g).arg(&c).arg(&mut beta);
    // SAFETY: block n reads gap[n·C..][..C] and writes β[n].
    unsafe { b.launch(cfg_blocks(shape.n)) }?;
    Ok(beta)
}

/// `dg[n] = dβ[n]·β[n](1 − β[n])` then `dx += dg[n] / S` (in place).
fn layer_backward_add<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &ActShape,
    dbeta: &CudaView<'_, f32>,
    beta: &CudaView<'_, f32>,
    dx: &mut CudaSlice<T>,
) -> Result<()> {
    // SAFETY: acon_layer_gen_bwd writes dg[0..N).
    let mut dg = unsafe { stream.alloc::<f32>(shape.n) }?;
    let n = shape.n as i64;
    let f = kernel_fn!(stream, "acon_layer_gen_bwd")?;
    let mut b = launcher(stream, &f);
    b.arg(dbeta).arg(beta).arg(&n).arg(&mut dg);
    // SAFETY: dβ, β and dg have N elements (validated).
    unsafe { b.launch(cfg(shape.n.div_ceil(THREADS as usize), THREADS, 0)) }?;
    gap_add(stream, shape, dx, &dg, true, 1.0 / shape.s as f32)
}

/// Backward of [`layer_gen_forward`], given its output `beta` (length `N`):
/// `dx[n, c, s] = dβ[n]·β[n](1 − β[n]) / S` (storage `T`).
///
/// Errors: `Empty` for a zero dimension, `LengthMismatch` for `dbeta` or `beta`.
///
/// Example: [`layer_gen_forward`]'s runs the forward and this backward on the device.
pub fn layer_gen_backward<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &ActShape,
    dbeta: &impl DeviceInput<f32>,
    beta: &impl DeviceInput<f32>,
) -> Result<CudaSlice<T>> {
    let (dbv, bv) = (dbeta.view(), beta.view());
    let numel = shape.numel()?;
    check_nonzero("batch N", shape.n)?;
    check_nonzero("channels C", shape.c)?;
    check_nonzero("positions S (H·W or L)", shape.s)?;
    check_len("dbeta (N)", shape.n, dbv.len())?;
    check_len("beta (N)", shape.n, bv.len())?;
    let mut dx = stream.alloc_zeros::<T>(numel)?;
    layer_backward_add(stream, shape, &dbv, &bv, &mut dx)?;
    Ok(dx)
}

// ---------------------------------------------------------------------------
// Full meta-ACON-C.

/// Which meta-ACON generator produces β for [`meta_acon_c_forward`].
#[derive(Debug, Clone, Copy)]
pub enum MetaGen<'a> {
    /// Channel-wise: β (N × C) from a [`ChannelGen`].
    Channel(&'a ChannelGen),
    /// Layer-wise: β (N) from [`layer_gen_forward`].
    Layer,
    /// Pixel-wise: `β = σ(x)` ([`Beta::PixelWise`]).
    Pixel,
}

fn kind_of(gen: &MetaGen<'_>) -> u8 {
    match gen {
        MetaGen::Channel(_) => 0,
        MetaGen::Layer => 1,
        MetaGen::Pixel => 2,
    }
}

/// What [`meta_acon_c_backward`] needs from [`meta_acon_c_forward`]: the
/// generated β (device, f32) and the channel generator's saved state. Opaque.
#[derive(Debug)]
pub struct MetaAconCSaved {
    shape: ActShape,
    beta: Option<CudaSlice<f32>>,
    gen: Option<ChannelGenSaved>,
    kind: u8,
}

impl MetaAconCSaved {
    /// The β the forward used (`N × C` channel-wise, `N` layer-wise, `None`
    /// pixel-wise).
    pub fn beta(&self) -> Option<&CudaSlice<f32>> {
        self.beta.as_ref()
    }
}

/// Gradients of the full meta-ACON-C ([`meta_acon_c_backward`]).
#[derive(Debug)]
pub struct MetaAconCGrads<T> {
    /// `∂L/∂x` through both the activation and the generator (storage `T`).
    pub dx: CudaSlice<T>,
    /// `∂L/∂p1`, length `C`.
    pub dp1: CudaSlice<f32>,
    /// `∂L/∂p2`, length `C`.
    pub dp2: CudaSlice<f32>,
    /// `∂L/∂β` at the generator's output (`N × C` or `N`; `None` pixel-wise);
    /// informational, already propagated.
    pub dbeta: Option<CudaSlice<f32>>,
    /// `∂L/∂W1` (channel-wise only).
    pub dw1: Option<CudaSlice<f32>>,
    /// `∂L/∂b1` (channel-wise generator with `b1` only).
    pub db1: Option<CudaSlice<f32>>,
    /// `∂L/∂W2` (channel-wise only).
    pub dw2: Option<CudaSlice<f32>>,
    /// `∂L/∂b2` (channel-wise generator with `b2` only).
    pub db2: Option<CudaSlice<f32>>,
}

/// meta-ACON-C forward: `β = G(x)` from `gen`, then [`acon_c_forward`] with that
/// β ([`crate::cpu::acon::meta_acon_c_forward`]). Saves β (and the channel
/// generator's GAP and hidden layer).
///
/// Errors: those of [`acon_c_forward`] and of the generator.
///
/// # Example (forward and backward, against the CPU reference)
///
/// ```
/// use activation_kernels::cuda::{acon, real_driver_present, CudaContext};
/// use activation_kernels::{cpu, ActShape};
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
/// let shape = ActShape::nchw(2, 2, 1, 2);
/// let x = [0.5f32, -1.0, 2.0, -0.25, 1.0, 0.0, -3.0, 0.75];
/// let (p1, p2) = ([1.0f32, 0.5], [0.0f32, 0.25]);
/// let (xd, p1d, p2d) = (stream.clone_htod(&x)?, stream.clone_htod(&p1)?, stream.clone_htod(&p2)?);
/// let (y, saved) = acon::meta_acon_c_forward(&stream, &shape, &xd, &p1d, &p2d, acon::MetaGen::Layer)?;
/// let g = acon::meta_acon_c_backward(&stream, &shape, &xd, &xd, &p1d, &p2d, acon::MetaGen::Layer, &saved)?;
///
/// let layer = cpu::acon::MetaGen::Layer;
/// let (y_ref, saved_ref) = cpu::acon::meta_acon_c_forward(&shape, &x, &p1, &p2, layer)?;
/// let g_ref = cpu::acon::meta_acon_c_backward(&shape, &x, &x, &p1, &p2, layer, &saved_ref)?; // dy = x
/// let pairs = [
///     (stream.clone_dtoh(&y)?, y_ref),
///     (stream.clone_dtoh(&g.dx)?, g_ref.dx),
///     (stream.clone_dtoh(&g.dp2)?, g_ref.dp2),
/// ];
/// for (gpu, reference) in pairs {
///     for (a, b) in gpu.iter().zip(&reference) {
///         assert_relative_eq!(a, b, epsilon = 1e-6, max_relative = 1e-5);
///     }
/// }
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn meta_acon_c_forward<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &ActShape,
    x: &impl DeviceInput<T>,
    p1: &impl DeviceInput<f32>,
    p2: &impl DeviceInput<f32>,
    gen: MetaGen<'_>,
) -> Result<(CudaSlice<T>, MetaAconCSaved)> {
    let (xv, p1v, p2v) = (x.view(), p1.view(), p2.view());
    shape.validate("x", xv.len())?;
    check_params(shape, "p1", p1v.len())?;
    check_params(shape, "p2", p2v.len())?;
    check_batch_grid(shape)?;
    if let MetaGen::Channel(g) = gen {
        g.validate(shape)?;
    }
    let (beta, gsaved) = match gen {
        MetaGen::Channel(g) => {
            let (b, s) = g.forward_inner(stream, shape, &xv)?;
            (Some(b), Some(s))
        }
        MetaGen::Layer => (Some(layer_forward_inner(stream, shape, &xv)?), None),
        MetaGen::Pixel => (None, None),
    };
    let src = match (&gen, &beta) {
        (MetaGen::Channel(_), Some(b)) => Beta::PerSampleChannel(b),
        (MetaGen::Layer, Some(b)) => Beta::PerSample(b),
        _ => Beta::PixelWise,
    };
    let y = core_forward(stream, shape, &xv, &Params::C(p1v, p2v), &src)?;
    Ok((
        y,
        MetaAconCSaved {
            shape: *shape,
            beta,
            gen: gsaved,
            kind: kind_of(&gen),
        },
    ))
}

/// meta-ACON-C backward ([`crate::cpu::acon::meta_acon_c_backward`]): the
/// ACON-C backward with the saved β, then `dβ` back through the generator
/// (channel-wise: [`ChannelGen::backward`]'s math; layer-wise:
/// [`layer_gen_backward`]'s; pixel-wise inside the activation), the generator's
/// share of `dx` added in place (so f16/bf16 `dx` is rounded twice).
///
/// Errors: those of [`acon_c_backward`] and of the generator; `Shape` if `saved`
/// came from another shape or generator kind.
///
/// Example: [`meta_acon_c_forward`]'s runs the forward and this backward on the device.
#[allow(clippy::too_many_arguments)]
pub fn meta_acon_c_backward<T: DType>(
    stream: &Arc<CudaStream>,
    shape: &ActShape,
    dy: &impl DeviceInput<T>,
    x: &impl DeviceInput<T>,
    p1: &impl DeviceInput<f32>,
    p2: &impl DeviceInput<f32>,
    gen: MetaGen<'_>,
    saved: &MetaAconCSaved,
) -> Result<MetaAconCGrads<T>> {
    let (dyv, xv, p1v, p2v) = (dy.view(), x.view(), p1.view(), p2.view());
    shape.validate("x", xv.len())?;
    check_len("dy", xv.len(), dyv.len())?;
    check_params(shape, "p1", p1v.len())?;
    check_params(shape, "p2", p2v.len())?;
    if saved.shape != *shape || saved.kind != kind_of(&gen) {
        return Err(Error::Shape {
            what: "saved",
            msg: "saved state comes from another shape or generator kind".into(),
        });
    }
    let no_beta = || Error::Shape {
        what: "saved",
        msg: "no generated beta".into(),
    };
    let src = match gen {
        MetaGen::Channel(g) => {
            g.validate(shape)?;
            let gs = saved.gen.as_ref().ok_or_else(|| Error::Shape {
                what: "saved",
                msg: "no channel-generator state".into(),
            })?;
            g.check_saved(shape, gs)?;
            Beta::PerSampleChannel(saved.beta.as_ref().ok_or_else(no_beta)?)
        }
        MetaGen::Layer => Beta::PerSample(saved.beta.as_ref().ok_or_else(no_beta)?),
        MetaGen::Pixel => Beta::PixelWise,
    };
    src.validate(shape)?;
    let mut core = core_backward(stream, shape, &dyv, &xv, &Params::C(p1v, p2v), &src)?;
    let mut out = MetaAconCGrads {
        dx: core.dx,
        dp1: core.dp1.take().ok_or_else(|| missing("dp1"))?,
        dp2: core.dp2.take().ok_or_else(|| missing("dp2"))?,
        dbeta: None,
        dw1: None,
        db1: None,
        dw2: None,
        db2: None,
    };
    match (gen, src) {
        (MetaGen::Channel(g), _) => {
            let gs = saved
                .gen
                .as_ref()
                .ok_or_else(|| missing("generator state"))?;
            let db = core.dbeta.as_ref().ok_or_else(|| missing("dbeta"))?;
            let gi = g.backward_inner(stream, shape, db, gs)?;
            gap_add(stream, shape, &mut out.dx, &gi.dg, false, 1.0)?;
            out.dw1 = Some(gi.dw1);
            out.db1 = gi.db1;
            out.dw2 = Some(gi.dw2);
            out.db2 = gi.db2;
        }
        (MetaGen::Layer, Beta::PerSample(b)) => {
            let db = core.dbeta.as_ref().ok_or_else(|| missing("dbeta"))?;
            layer_backward_add(stream, shape, &db.as_view(), &b.as_view(), &mut out.dx)?;
        }
        _ => {}
    }
    out.dbeta = core.dbeta;
    Ok(out)
}
