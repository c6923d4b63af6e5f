//! IIEU-DC — the Dynamic Coupler (SPEC §1.6) on the GPU: `out = λ0·x + λ1·res` with
//! the mixing weights `λ (N, 2, C)` produced by a per-sample coupler MLP on the GAPs of
//! `x` and `res`. The math (every step of the forward and of the backward, and the
//! choices the SPEC leaves open: `std = 0` for `hidden = 1`, zero gradient through a
//! zero norm or a zero std) is exactly that of [`crate::cpu::iieu_dc`]; see its module
//! docs for the formulas.
//!
//! # Dtypes
//! `x`, `res`, `dy`, `out`, `dx`, `dres` are device buffers of the storage type
//! `T: DType` (f32, f16, bf16). The parameters ([`DcDeviceParams`]) and their gradients
//! are f32 device buffers, as are the saved GAPs and `λ`. All arithmetic and every
//! accumulation is f32 (the CPU reference uses f64); outputs are rounded to `T` once.
//!
//! # Kernels (kernels/iieu_dc.cu)
//! Forward: `iieu_dc_gap_<T>` (plane means of x and res, one warp per plane for
//! `H·W ≤ 1024`, else one block per plane), `iieu_dc_coupler_fwd_f32` (one block per
//! sample, the whole coupler in shared memory), `iieu_dc_mix_<T>` (elementwise, 128-bit
//! vectors when aligned). Backward: `iieu_dc_dots_<T>` (plane sums `Σ dy·x`, `Σ dy·res`),
//! `iieu_dc_coupler_bwd_f32` (coupler backward; per-block parameter-gradient partials,
//! stage 1), `iieu_dc_param_sum_f32` (stage 2: fixed-order sum over the blocks),
//! `iieu_dc_dx_<T>` (elementwise `dx`, `dres`). No atomics: results are bit-identical
//! from run to run.
//!
//! # Limits
//! The coupler keeps `(4C + 13·hidden)` f32 values of one sample in shared memory and
//! must fit the default 48 KiB per block (`C = 2048` with `r = 16` or `r = 8` fits):
//! larger configurations are refused with [`Error::Shape`] before anything is launched.
//! `C`, `hidden`, `N` and the coupler's per-sample sizes must fit the kernels' 32-bit
//! indices; tensor offsets are 64-bit.

use std::sync::Arc;

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::handles::kernel_fn;
use super::{grid_for, launcher, to_i32, CudaSlice, CudaStream, DType, DeviceInput, BLOCK};
use crate::cpu::iieu_dc::{DcConfig, DcParams};
use crate::error::{check_len, check_nonzero, Error, Result};

/// Most threads per block of the coupler kernels.
const COUPLER_BLOCK_MAX: usize = 256;

/// Threads per coupler block: one per LayerNorm element (2C) rounded up to a warp,
/// clamped to [64, 256] (the kernels need a multiple of 32 and at least two warps);
/// small C does not launch idle threads.
fn coupler_block(c: usize) -> u32 {
    (2 * c)
        .div_ceil(32)
        .saturating_mul(32)
        .clamp(64, COUPLER_BLOCK_MAX) as u32
}
/// Dynamic shared memory the coupler may use: the default 48 KiB per block, less a
/// margin for the kernels' static shared memory (block-sum scratch and scalars).
pub const MAX_COUPLER_SMEM_BYTES: usize = 48 * 1024 - 256;
/// At most this many blocks run the coupler forward (samples are grid-strided).
const MAX_FWD_BLOCKS: usize = 1024;
/// At most this many blocks (and partial rows) run the coupler backward.
const MAX_BWD_BLOCKS: usize = 64;
/// Budget of the stage-1 partial buffer, in f32 values (64 MiB).
const PARTIAL_BUDGET: usize = 16 << 20;
/// Planes of at most this many positions are reduced by one warp each.
const WARP_PLANE_MAX: usize = 1024;

/// IIEU-DC parameters on the device (f32), the same nine tensors and layouts as
/// [`DcParams`].
#[derive(Debug)]
pub struct DcDeviceParams {
    /// LayerNorm-1 weight, `2C`.
    pub ln1_weight: CudaSlice<f32>,
    /// LayerNorm-1 bias, `2C`.
    pub ln1_bias: CudaSlice<f32>,
    /// First linear map `W1`, `(hidden, C)` row-major.
    pub w1: CudaSlice<f32>,
    /// term-B scale `γ₂`, `(2, hidden)`.
    pub gamma2: CudaSlice<f32>,
    /// term-B shift `β₂`, `(2, hidden)`.
    pub beta2: CudaSlice<f32>,
    /// Adjuster threshold `η₂`, `hidden`.
    pub eta2: CudaSlice<f32>,
    /// Second linear map `W2`, `(C, hidden)` row-major.
    pub w2: CudaSlice<f32>,
    /// LayerNorm-2 weight, `2C`.
    pub ln2_weight: CudaSlice<f32>,
    /// LayerNorm-2 bias, `2C`.
    pub ln2_bias: CudaSlice<f32>,
}

impl DcDeviceParams {
    /// Uploads host parameters after checking them against `cfg`
    /// (`Err(LengthMismatch)` naming the first parameter of the wrong length, or the
    /// config's own errors); nothing is allocated on error.
    pub fn upload(stream: &Arc<CudaStream>, cfg: &DcConfig, p: &DcParams<f32>) -> Result<Self> {
        p.validate(cfg)?;
        Ok(Self {
            ln1_weight: stream.clone_htod(&p.ln1_weight)?,
            ln1_bias: stream.clone_htod(&p.ln1_bias)?,
            w1: stream.clone_htod(&p.w1)?,
            gamma2: stream.clone_htod(&p.gamma2)?,
            beta2: stream.clone_htod(&p.beta2)?,
            eta2: stream.clone_htod(&p.eta2)?,
            w2: stream.clone_htod(&p.w2)?,
            ln2_weight: stream.clone_htod(&p.ln2_weight)?,
            ln2_bias: stream.clone_htod(&p.ln2_bias)?,
        })
    }

    /// `Err(LengthMismatch)` naming the first parameter whose length does not match
    /// `cfg` (same names and order as [`DcParams::validate`]).
    fn validate(&self, cfg: &DcConfig) -> Result<()> {
        let (c, hd) = (cfg.c, cfg.hidden);
        check_len("ln1_weight", 2 * c, self.ln1_weight.len())?;
        check_len("ln1_bias", 2 * c, self.ln1_bias.len())?;
        check_len("w1", hd * c, self.w1.len())?;
        check_len("gamma2", 2 * hd, self.gamma2.len())?;
        check_len("beta2", 2 * hd, self.beta2.len())?;
        check_len("eta2", hd, self.eta2.len())?;
        check_len("w2", c * hd, self.w2.len())?;
        check_len("ln2_weight", 2 * c, self.ln2_weight.len())?;
        check_len("ln2_bias", 2 * c, self.ln2_bias.len())
    }
}

/// What [`backward`] needs from [`forward`] (f32 device buffers): the GAPs
/// `a = [GAP(x[n]), GAP(res[n])]` laid out `(N, 2C)` and the mixing weights `λ`
/// laid out `(N, 2, C)`. The coupler's intermediates are recomputed in backward from
/// the GAPs with the same kernel code, hence bit-identically.
#[derive(Debug)]
pub struct DcDeviceSaved {
    gap: CudaSlice<f32>,
    lambda: CudaSlice<f32>,
}

impl DcDeviceSaved {
    /// GAP statistics, `(N, 2C)`: `gap[n·2C + c] = GAP(x[n,c])`,
    /// `gap[n·2C + C + c] = GAP(res[n,c])`.
    pub fn gap(&self) -> &CudaSlice<f32> {
        &self.gap
    }

    /// Mixing weights, `(N, 2, C)`: `λ[n,0,c]` multiplies `x`, `λ[n,1,c]` multiplies `res`.
    pub fn lambda(&self) -> &CudaSlice<f32> {
        &self.lambda
    }
}

/// Gradients of IIEU-DC on the device: `dx`, `dres` in the storage type `T`, every
/// parameter gradient in f32, each with its tensor's shape (names as [`crate::cpu::iieu_dc::DcGrads`]).
#[derive(Debug)]
pub struct DcDeviceGrads<T> {
    /// `∂L/∂x`, `(N, C, H, W)`.
    pub dx: CudaSlice<T>,
    /// `∂L/∂res`, `(N, C, H, W)`.
    pub dres: CudaSlice<T>,
    /// `∂L/∂ln1_weight`, `2C`.
    pub d_ln1_weight: CudaSlice<f32>,
    /// `∂L/∂ln1_bias`, `2C`.
    pub d_ln1_bias: CudaSlice<f32>,
    /// `∂L/∂W1`, `(hidden, C)`.
    pub d_w1: CudaSlice<f32>,
    /// `∂L/∂γ₂`, `(2, hidden)`.
    pub d_gamma2: CudaSlice<f32>,
    /// `∂L/∂β₂`, `(2, hidden)`.
    pub d_beta2: CudaSlice<f32>,
    /// `∂L/∂η₂`, `hidden`.
    pub d_eta2: CudaSlice<f32>,
    /// `∂L/∂W2`, `(C, hidden)`.
    pub d_w2: CudaSlice<f32>,
    /// `∂L/∂ln2_weight`, `2C`.
    pub d_ln2_weight: CudaSlice<f32>,
    /// `∂L/∂ln2_bias`, `2C`.
    pub d_ln2_bias: CudaSlice<f32>,
}

/// Validated sizes of one call.
struct Plan {
    numel: usize,
    n: i32,
    c: i32,
    hd: i32,
    s: i64,
    planes: i64,
    /// Length of one stage-1 partial row (every parameter gradient).
    part_len: usize,
    smem_fwd: u32,
    smem_bwd: u32,
}

/// Shared-memory bytes of the coupler kernels: `(4C + 6·hidden)` floats forward,
/// `(4C + 13·hidden)` backward (layout in kernels/iieu_dc.cu).
fn coupler_smem(c: usize, hd: usize) -> Option<(usize, usize)> {
    let base = c.checked_mul(4)?;
    let fwd = base.checked_add(hd.checked_mul(6)?)?.checked_mul(4)?;
    let bwd = base.checked_add(hd.checked_mul(13)?)?.checked_mul(4)?;
    Some((fwd, bwd))
}

/// Every check on `cfg` (as the CPU side's, plus the GPU plan's limits), before any
/// allocation.
fn plan(cfg: &DcConfig) -> Result<Plan> {
    check_nonzero("batch N", cfg.n)?;
    check_nonzero("channels C", cfg.c)?;
    check_nonzero("positions S (H·W)", cfg.s)?;
    check_nonzero("hidden width C/r", cfg.hidden)?;
    let over = || Error::Shape {
        what: "DcConfig",
        msg: format!("{cfg:?}: sizes overflow usize"),
    };
    let numel = cfg.numel()?;
    let c2 = cfg.c.checked_mul(2).ok_or_else(over)?;
    let chd = cfg.c.checked_mul(cfg.hidden).ok_or_else(over)?;
    cfg.n.checked_mul(c2).ok_or_else(over)?;
    let part_len = c2
        .checked_mul(4)
        .and_then(|v| v.checked_add(chd.checked_mul(2)?))
        .and_then(|v| v.checked_add(cfg.hidden.checked_mul(5)?))
        .ok_or_else(over)?;
    let (smem_fwd, smem_bwd) = coupler_smem(cfg.c, cfg.hidden).ok_or_else(over)?;
    if smem_bwd > MAX_COUPLER_SMEM_BYTES {
        return Err(Error::Shape {
            what: "DcConfig",
            msg: format!(
                "C = {}, hidden = {}: the coupler needs {smem_bwd} bytes of shared memory per \
                 block (4C + 13·hidden floats), more than the supported {MAX_COUPLER_SMEM_BYTES}",
                cfg.c, cfg.hidden
            ),
        });
    }
    let n = to_i32("batch N", cfg.n)?;
    let c = to_i32("channels C", cfg.c)?;
    let hd = to_i32("hidden width", cfg.hidden)?;
    to_i32("2·C", c2)?;
    to_i32("C·hidden", chd)?;
    to_i32("parameter-gradient row", part_len)?;
    let s = i64::try_from(cfg.s).map_err(|_| over())?;
    let planes = i64::try_from(cfg.n * cfg.c).map_err(|_| over())?;
    i64::try_from(numel).map_err(|_| over())?;
    Ok(Plan {
        numel,
        n,
        c,
        hd,
        s,
        planes,
        part_len,
        smem_fwd: smem_fwd as u32,
        smem_bwd: smem_bwd as u32,
    })
}

fn launch_cfg(grid: u32, block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// Grid and mode of the plane-reduction kernels: one warp per plane for small planes,
/// one block per plane otherwise.
fn plane_grid(planes: usize, s: usize) -> (u32, i32) {
    if s <= WARP_PLANE_MAX {
        (grid_for(planes, (BLOCK / 32) as usize), 1)
    } else {
        (grid_for(planes, 1), 0)
    }
}

/// Grid of the elementwise kernels: one 128-bit vector (16 / sizeof(T) elements) per
/// thread per iteration.
fn elementwise_grid<T>(numel: usize) -> u32 {
    let w = (16 / std::mem::size_of::<T>()).max(1);
    grid_for(numel.div_ceil(w), BLOCK as usize)
}

/// IIEU-DC forward on the GPU: `out = λ[n,0,c]·x + λ[n,1,c]·res` with `λ` from the
/// coupler (formulas: [`crate::cpu::iieu_dc::forward`]). `x`, `res`: NCHW
/// `(N, C, H, W)` in `T` with `S = H·W = cfg.s`.
///
/// Returns `out` (`T`, same shape) and the [`DcDeviceSaved`] state (GAPs and `λ`, f32)
/// for [`backward`].
///
/// Errors (before any allocation or launch): `Empty`/`Shape` for a bad `cfg`
/// (including a configuration whose coupler does not fit in shared memory, see the
/// module docs); `LengthMismatch` for `x`, `res` or any parameter of the wrong length;
/// `Driver` if the device fails.
///
/// # Example (forward and backward, against the CPU reference)
///
/// ```
/// use activation_kernels::cpu::iieu_dc::{DcConfig, DcParams};
/// use activation_kernels::cuda::{iieu_dc, real_driver_present, CudaContext};
/// use activation_kernels::cpu;
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
/// let cfg = DcConfig::new(2, 4, 2, 2, 2)?; // x, res: (2, 4, 2, 2); hidden = 2
/// let x: Vec<f32> = (0..32).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
/// let res: Vec<f32> = (0..32).map(|i| ((i * 5 % 13) as f32 - 6.0) / 3.0).collect();
/// let dy: Vec<f32> = (0..32).map(|i| ((i * 3 % 7) as f32 - 3.0) / 2.0).collect();
/// let params = DcParams::<f32>::init(&cfg, 1)?;
///
/// let (xd, rd, dyd) = (stream.clone_htod(&x)?, stream.clone_htod(&res)?, stream.clone_htod(&dy)?);
/// let pd = iieu_dc::DcDeviceParams::upload(&stream, &cfg, &params)?;
/// let (out, saved) = iieu_dc::forward(&stream, &cfg, &xd, &rd, &pd)?;
/// let g = iieu_dc::backward(&stream, &cfg, &dyd, &xd, &rd, &pd, &saved)?;
///
/// let (out_ref, saved_ref) = cpu::iieu_dc::forward(&cfg, &x, &res, &params)?;
/// let g_ref = cpu::iieu_dc::backward(&cfg, &dy, &x, &res, &params, &saved_ref)?;
/// let pairs = [
///     (stream.clone_dtoh(&out)?, out_ref),
///     (stream.clone_dtoh(saved.lambda())?, saved_ref.lambda().to_vec()),
///     (stream.clone_dtoh(&g.dx)?, g_ref.dx),
///     (stream.clone_dtoh(&g.dres)?, g_ref.dres),
///     (stream.clone_dtoh(&g.d_w1)?, g_ref.d_w1),
///     (stream.clone_dtoh(&g.d_ln2_weight)?, g_ref.d_ln2_weight),
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
    cfg: &DcConfig,
    x: &impl DeviceInput<T>,
    res: &impl DeviceInput<T>,
    params: &DcDeviceParams,
) -> Result<(CudaSlice<T>, DcDeviceSaved)> {
    let p = plan(cfg)?;
    let (x, res) = (x.view(), res.view());
    check_len("x", p.numel, x.len())?;
    check_len("res", p.numel, res.len())?;
    params.validate(cfg)?;
    let nc2 = cfg.n * 2 * cfg.c;
    let inv_s = (1.0 / cfg.s as f64) as f32;
    let numel = p.numel as i64;

    // (1) GAPs.
    // SAFETY: every element is written by the GAP kernel before it is read
    // (one write per (plane, branch): n·2C + k and n·2C + C + k for all planes).
    let mut gap = unsafe { stream.alloc::<f32>(nc2) }?;
    let (grid, warp_mode) = plane_grid(cfg.n * cfg.c, cfg.s);
    let f = kernel_fn!(stream, "iieu_dc_gap", T)?;
    let mut b = launcher(stream, &f);
    b.arg(&x)
        .arg(&res)
        .arg(&mut gap)
        .arg(&p.planes)
        .arg(&p.c)
        .arg(&p.s)
        .arg(&warp_mode)
        .arg(&inv_s);
    // SAFETY: the kernel reads x, res at p·S + i for planes p < N·C and i < S, i.e.
    // below numel = their validated length, and writes gap[n·2C + k], gap[n·2C + C + k]
    // for n < N, k < C (length N·2C).
    unsafe { b.launch(launch_cfg(grid, BLOCK, 0)) }?;

    // (2) Coupler.
    // SAFETY: the coupler writes λ[n·2C + k] and λ[n·2C + C + k] for every n < N, k < C.
    let mut lambda = unsafe { stream.alloc::<f32>(nc2) }?;
    let f = kernel_fn!(stream, "iieu_dc_coupler_fwd_f32")?;
    let mut b = launcher(stream, &f);
    b.arg(&gap);
    push_params(&mut b, params);
    b.arg(&mut lambda).arg(&p.n).arg(&p.c).arg(&p.hd);
    let grid = cfg.n.min(MAX_FWD_BLOCKS) as u32;
    // SAFETY: gap and λ have N·2C elements (n < N, indices < 2C); the parameters were
    // checked against C and hidden (ln 2C, W1 hidden·C, γ₂/β₂ 2·hidden, η₂ hidden,
    // W2 C·hidden); the shared memory holds the 4C + 6·hidden floats the forward
    // carves (checked against the limit in `plan`).
    unsafe { b.launch(launch_cfg(grid, coupler_block(cfg.c), p.smem_fwd)) }?;

    // (3) Mix.
    // SAFETY: the mix kernel writes every element of out (vector body + scalar tail).
    let mut out = unsafe { stream.alloc::<T>(p.numel) }?;
    let f = kernel_fn!(stream, "iieu_dc_mix", T)?;
    let mut b = launcher(stream, &f);
    b.arg(&x)
        .arg(&res)
        .arg(&lambda)
        .arg(&mut out)
        .arg(&numel)
        .arg(&p.s)
        .arg(&p.c);
    // SAFETY: flat indices < numel for x, res, out (all numel long); λ at
    // n·2C + k (+ C) with n = i / (C·S) < N.
    unsafe { b.launch(launch_cfg(elementwise_grid::<T>(p.numel), BLOCK, 0)) }?;

    Ok((out, DcDeviceSaved { gap, lambda }))
}

fn push_params<'a>(b: &mut cudarc::driver::LaunchArgs<'a>, p: &'a DcDeviceParams) {
    b.arg(&p.ln1_weight)
        .arg(&p.ln1_bias)
        .arg(&p.w1)
        .arg(&p.gamma2)
        .arg(&p.beta2)
        .arg(&p.eta2)
        .arg(&p.w2)
        .arg(&p.ln2_weight)
        .arg(&p.ln2_bias);
}

/// IIEU-DC backward on the GPU: gradients w.r.t. `x`, `res` (through the mix and through
/// the GAPs) and all nine parameters, given `dy = ∂L/∂out` (in `T`) and the forward's
/// inputs, parameters and [`DcDeviceSaved`] (formulas: [`crate::cpu::iieu_dc::backward`];
/// nothing is detached). `dx`, `dres` are returned in `T`, parameter gradients in f32.
///
/// Parameter gradients are two-stage: each coupler block writes a partial row for the
/// samples it handled (the block count depends only on `cfg`), then the rows are summed
/// in block order — bit-identical on every run, no atomics.
///
/// Errors (before any allocation or launch): as [`forward`], plus `LengthMismatch` for
/// `dy` and for a `saved` whose buffers do not match `cfg`. (`saved` must come from
/// [`forward`] with the same `x`, `res` and `params`; that is not checked.)
///
/// Example: [`forward`]'s runs the forward and this backward on the device.
pub fn backward<T: DType>(
    stream: &Arc<CudaStream>,
    cfg: &DcConfig,
    dy: &impl DeviceInput<T>,
    x: &impl DeviceInput<T>,
    res: &impl DeviceInput<T>,
    params: &DcDeviceParams,
    saved: &DcDeviceSaved,
) -> Result<DcDeviceGrads<T>> {
    let p = plan(cfg)?;
    let (dy, x, res) = (dy.view(), x.view(), res.view());
    check_len("dy", p.numel, dy.len())?;
    check_len("x", p.numel, x.len())?;
    check_len("res", p.numel, res.len())?;
    params.validate(cfg)?;
    let nc2 = cfg.n * 2 * cfg.c;
    check_len("saved.gap", nc2, saved.gap.len())?;
    check_len("saved.lambda", nc2, saved.lambda.len())?;
    let (c, hd) = (cfg.c, cfg.hidden);
    let numel = p.numel as i64;

    // (a) Plane sums Σ dy·x, Σ dy·res.
    // SAFETY: written for every (plane, branch) by the dots kernel before use.
    let mut pd = unsafe { stream.alloc::<f32>(nc2) }?;
    let (grid, warp_mode) = plane_grid(cfg.n * cfg.c, cfg.s);
    let f = kernel_fn!(stream, "iieu_dc_dots", T)?;
    let mut b = launcher(stream, &f);
    b.arg(&dy)
        .arg(&x)
        .arg(&res)
        .arg(&mut pd)
        .arg(&p.planes)
        .arg(&p.c)
        .arg(&p.s)
        .arg(&warp_mode);
    // SAFETY: reads dy, x, res below numel (their validated length); writes
    // pd[n·2C + k], pd[n·2C + C + k] for n < N, k < C (length N·2C).
    unsafe { b.launch(launch_cfg(grid, BLOCK, 0)) }?;

    // (b) Coupler backward, stage 1.
    let rows = cfg
        .n
        .min(MAX_BWD_BLOCKS)
        .min((PARTIAL_BUDGET / p.part_len).max(1));
    let rows_i32 = to_i32("partial rows", rows)?;
    // SAFETY: block b < rows writes every element of its row b·len .. (b+1)·len when
    // it handles its first sample (each block handles at least one since rows <= N),
    // and dgap[n·2C + i] for every n < N, i < 2C.
    let mut part = unsafe { stream.alloc::<f32>(rows * p.part_len) }?;
    let mut dgap = unsafe { stream.alloc::<f32>(nc2) }?;
    let f = kernel_fn!(stream, "iieu_dc_coupler_bwd_f32")?;
    let mut b = launcher(stream, &f);
    b.arg(&saved.gap).arg(&pd);
    push_params(&mut b, params);
    b.arg(&mut dgap)
        .arg(&mut part)
        .arg(&p.n)
        .arg(&p.c)
        .arg(&p.hd);
    // SAFETY: gap, pd, dgap have N·2C elements; the parameters were checked against C
    // and hidden; part has rows·len elements and block b < rows = grid writes row b only;
    // the shared memory holds the 4C + 13·hidden floats the kernel carves (checked in
    // `plan`).
    unsafe { b.launch(launch_cfg(rows as u32, coupler_block(cfg.c), p.smem_bwd)) }?;

    // (c) Stage 2: fixed-order sum over the rows into the nine gradients.
    // SAFETY (all nine): the stage-2 kernel writes every element of each (its region of
    // the row, offsets computed from C and hidden as on the host).
    let mut g_l1w = unsafe { stream.alloc::<f32>(2 * c) }?;
    let mut g_l1b = unsafe { stream.alloc::<f32>(2 * c) }?;
    let mut g_w1 = unsafe { stream.alloc::<f32>(hd * c) }?;
    let mut g_g2 = unsafe { stream.alloc::<f32>(2 * hd) }?;
    let mut g_b2 = unsafe { stream.alloc::<f32>(2 * hd) }?;
    let mut g_eta = unsafe { stream.alloc::<f32>(hd) }?;
    let mut g_w2 = unsafe { stream.alloc::<f32>(c * hd) }?;
    let mut g_l2w = unsafe { stream.alloc::<f32>(2 * c) }?;
    let mut g_l2b = unsafe { stream.alloc::<f32>(2 * c) }?;
    let f = kernel_fn!(stream, "iieu_dc_param_sum_f32")?;
    let mut b = launcher(stream, &f);
    b.arg(&part)
        .arg(&rows_i32)
        .arg(&p.c)
        .arg(&p.hd)
        .arg(&mut g_l1w)
        .arg(&mut g_l1b)
        .arg(&mut g_w1)
        .arg(&mut g_g2)
        .arg(&mut g_b2)
        .arg(&mut g_eta)
        .arg(&mut g_w2)
        .arg(&mut g_l2w)
        .arg(&mut g_l2b);
    // SAFETY: reads part[r·len + e] for r < rows, e < len (its length rows·len); each
    // element e < len is written to exactly one output at e − (region offset), below
    // that output's length (2C, 2C, hidden·C, 2·hidden, 2·hidden, hidden, C·hidden,
    // 2C, 2C).
    unsafe { b.launch(launch_cfg(grid_for(p.part_len, BLOCK as usize), BLOCK, 0)) }?;

    // (d) dx, dres.
    // SAFETY: the dx kernel writes every element of dx and dres.
    let mut dx = unsafe { stream.alloc::<T>(p.numel) }?;
    let mut dres = unsafe { stream.alloc::<T>(p.numel) }?;
    let inv_s = (1.0 / cfg.s as f64) as f32;
    let f = kernel_fn!(stream, "iieu_dc_dx", T)?;
    let mut b = launcher(stream, &f);
    b.arg(&dy)
        .arg(&saved.lambda)
        .arg(&dgap)
        .arg(&mut dx)
        .arg(&mut dres)
        .arg(&numel)
        .arg(&p.s)
        .arg(&p.c)
        .arg(&inv_s);
    // SAFETY: flat indices < numel for dy, dx, dres (all numel long); λ and dgap at
    // n·2C + k (+ C) with n < N (both N·2C long).
    unsafe { b.launch(launch_cfg(elementwise_grid::<T>(p.numel), BLOCK, 0)) }?;

    Ok(DcDeviceGrads {
        dx,
        dres,
        d_ln1_weight: g_l1w,
        d_ln1_bias: g_l1b,
        d_w1: g_w1,
        d_gamma2: g_g2,
        d_beta2: g_b2,
        d_eta2: g_eta,
        d_w2: g_w2,
        d_ln2_weight: g_l2w,
        d_ln2_bias: g_l2b,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smem_plan_fits_resnet_sizes_and_refuses_huge_ones() {
        let ok = |c: usize, r: usize| plan(&DcConfig::new(2, c, 7, 7, r).unwrap()).is_ok();
        assert!(ok(2048, 16));
        assert!(ok(2048, 8));
        assert!(ok(256, 1));
        assert!(!ok(2048, 4));
        assert!(!ok(4096, 16));
    }
}
