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
//! `H·W ≤ 1024`, else one block per plane); the coupler in GEMM-shaped stages —
//! `iieu_dc_w1_norms_f32` (`‖W1[j]‖`, `r_w[j]` once per call), `iieu_dc_ln1_f32`
//! (LayerNorm-1, a block per sample), `iieu_dc_hidden_f32` (`h = a'·W1ᵀ`, a warp per
//! (sample, hidden unit)), `iieu_dc_out_f32` (`h' = ς·h` and `c = h'·W2ᵀ`, a block per
//! (sample, 128 channels)), `iieu_dc_ln2_f32` (LayerNorm-2 and `λ`, a block per sample);
//! then `iieu_dc_mix_<T>` (elementwise, 128-bit vectors when aligned). Backward:
//! `iieu_dc_dots_<T>` (plane sums `Σ dy·x`, `Σ dy·res`), the forward's coupler stages
//! again (recomputed bit-identically), `iieu_dc_ln2_bwd_f32`, `iieu_dc_dhp_f32`
//! (`dh' = dc·W2`), `iieu_dc_adj_bwd_f32` (adjuster, term-B, term-S and the std
//! normalisation), `iieu_dc_da_f32` (`da' = dh·W1` + the `r_x` path),
//! `iieu_dc_ln1_bwd_f32` (→ `dgap`), the parameter gradients as a fixed-order two-stage
//! reduction over sample chunks (`iieu_dc_param_part_f32`: grid x over the gradient
//! elements, grid y over chunks sized so that the grid has ≥ 264 blocks where `N`
//! allows; `iieu_dc_param_sum_f32`: the chunks in order), and `iieu_dc_dx_<T>`
//! (elementwise `dx`, `dres`). No atomics: results are bit-identical from run to run.
//!
//! # Scratch
//! Per call, f32 device buffers of the coupler's per-sample intermediates: forward
//! `N·(10C + 2·hidden + 8) + 2·hidden` floats (GAPs, `â`, `a'`, `c`, `λ`, `h`, …), backward
//! `N·(20C + 12·hidden + 8) + 2·hidden` floats plus the stage-1 partials, `chunks × (8C +
//! 2C·hidden + 6·hidden)` floats with `chunks ≤ N` and at most 64 MiB
//! (`PARTIAL_BUDGET`; one chunk if a single row is larger) — all proportional to the
//! saved GAPs (`N·2C`) or the parameters, never to `H·W`.
//!
//! # Limits
//! The adjuster's backward keeps `10·hidden` f32 values of one sample in shared memory
//! and the LayerNorm-2 backward `4C`; both must fit the default 48 KiB per block
//! (`hidden ≤ 1222`, `C ≤ 3056`): larger configurations are refused with
//! [`Error::Shape`] before anything is launched. `C`, `hidden`, `N·2C`,
//! `N·hidden` and the parameter-gradient length must fit the kernels' 32-bit indices;
//! tensor offsets are 64-bit.

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
/// At most this many blocks run a one-block-per-sample coupler kernel (samples are
/// grid-strided).
const MAX_SAMPLE_BLOCKS: usize = 1024;
/// Threads per block of the (sample, output) item kernels (`iieu_dc_hidden`,
/// `iieu_dc_dhp`: a warp per item; `iieu_dc_out`, `iieu_dc_da`: a thread per channel of
/// a 128-channel chunk). Their `__launch_bounds__` in kernels/iieu_dc.cu.
const ITEM_BLOCK: u32 = 128;
/// Blocks the parameter-gradient stage 1 aims for (two per H100 SM): the sample chunks
/// are sized so that element blocks × chunks reaches it where `N` allows.
const PARAM_TARGET_BLOCKS: usize = 264;
/// Budget of the stage-1 partial buffer, in f32 values (64 MiB).
const PARTIAL_BUDGET: usize = 16 << 20;
/// Per-sample scalars of the coupler (`ST` in kernels/iieu_dc.cu).
const ST: usize = 8;
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
    planes: i32,
    /// Length of one stage-1 partial row (every parameter gradient, then the `r_w`
    /// path's `hidden` coefficients).
    part_len: usize,
    /// Length of one per-sample parameter-gradient row (`vrow`): `8C + 6·hidden`.
    vrow_len: usize,
    /// Dynamic shared memory of `iieu_dc_out` / `iieu_dc_da` (2·hidden floats) and of
    /// `iieu_dc_adj_bwd` (10·hidden floats).
    smem_item: u32,
    smem_adj: u32,
    /// Dynamic shared memory of `iieu_dc_ln2_bwd` (4C floats; `iieu_dc_ln1_bwd` uses
    /// half of it).
    smem_ln: u32,
}

/// Every check [`forward`] and [`backward`] make on `cfg` (the CPU side's and the GPU
/// plan's 32-bit limits), without a launch: for a caller that launches something
/// before [`forward`] (the burn backend widens the parameter pack first).
#[cfg_attr(not(feature = "burn-cuda"), allow(dead_code))]
pub(crate) fn check_config(cfg: &DcConfig) -> Result<()> {
    plan(cfg).map(|_| ())
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
    let nc2 = cfg.n.checked_mul(c2).ok_or_else(over)?;
    let nhd = cfg.n.checked_mul(cfg.hidden).ok_or_else(over)?;
    let part_len = c2
        .checked_mul(4)
        .and_then(|v| v.checked_add(chd.checked_mul(2)?))
        .and_then(|v| v.checked_add(cfg.hidden.checked_mul(6)?))
        .ok_or_else(over)?;
    let vrow_len = cfg
        .c
        .checked_mul(8)
        .and_then(|v| v.checked_add(cfg.hidden.checked_mul(6)?))
        .ok_or_else(over)?;
    let smem_adj = cfg.hidden.checked_mul(10 * 4).ok_or_else(over)?;
    let smem_ln = cfg.c.checked_mul(4 * 4).ok_or_else(over)?;
    if smem_ln > MAX_COUPLER_SMEM_BYTES {
        return Err(Error::Shape {
            what: "DcConfig",
            msg: format!(
                "C = {}: the coupler's LayerNorm-2 backward needs {smem_ln} bytes of shared \
                 memory per block (4C floats), more than the supported {MAX_COUPLER_SMEM_BYTES}",
                cfg.c
            ),
        });
    }
    if smem_adj > MAX_COUPLER_SMEM_BYTES {
        return Err(Error::Shape {
            what: "DcConfig",
            msg: format!(
                "C = {}, hidden = {}: the coupler backward needs {smem_adj} bytes of shared \
                 memory per block (10·hidden floats), more than the supported \
                 {MAX_COUPLER_SMEM_BYTES}",
                cfg.c, cfg.hidden
            ),
        });
    }
    let n = to_i32("batch N", cfg.n)?;
    let c = to_i32("channels C", cfg.c)?;
    let hd = to_i32("hidden width", cfg.hidden)?;
    let planes = to_i32("N·2C", nc2)?;
    to_i32("N·hidden", nhd)?;
    to_i32("C·hidden", chd)?;
    to_i32("parameter-gradient row", part_len)?;
    let s = i64::try_from(cfg.s).map_err(|_| over())?;
    i64::try_from(numel).map_err(|_| over())?;
    Ok(Plan {
        numel,
        n,
        c,
        hd,
        s,
        // N·C planes (N·2C fits i32, checked above).
        planes: planes / 2,
        part_len,
        vrow_len,
        smem_item: (2 * cfg.hidden * 4) as u32,
        smem_adj: smem_adj as u32,
        smem_ln: smem_ln as u32,
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

    // (2) Coupler (the GEMM-shaped stages), then LayerNorm-2 and λ.
    let cf = coupler_forward(stream, &p, cfg, &gap, params)?;
    // SAFETY: the LayerNorm-2 kernel writes λ[n·2C + k] and λ[n·2C + C + k] for every
    // n < N, k < C.
    let mut lambda = unsafe { stream.alloc::<f32>(nc2) }?;
    let f = kernel_fn!(stream, "iieu_dc_ln2_f32")?;
    let mut b = launcher(stream, &f);
    b.arg(&cf.cpre)
        .arg(&params.ln2_weight)
        .arg(&params.ln2_bias)
        .arg(&mut lambda)
        .arg(&p.n)
        .arg(&p.c);
    // SAFETY: c and λ have N·2C elements (rows n < N, indices < 2C); ln2 weight and
    // bias have 2C (validated).
    unsafe { b.launch(launch_cfg(sample_grid(cfg.n), coupler_block(cfg.c), 0)) }?;

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

/// Grid of a one-block-per-sample kernel (samples grid-strided beyond it).
fn sample_grid(n: usize) -> u32 {
    grid_for(n, 1).min(MAX_SAMPLE_BLOCKS as u32)
}

/// The coupler's forward intermediates of one call (f32 device buffers).
struct CouplerFwd {
    /// `‖W1[j]‖` then `r_w[j]`, `2·hidden`.
    nrw: CudaSlice<f32>,
    /// `â` (LayerNorm-1 output before its affine), `(N, 2C)`.
    ah: CudaSlice<f32>,
    /// `a' = ln1_w·â + ln1_b`, `(N, 2C)`.
    ap: CudaSlice<f32>,
    /// Per-sample scalars, `(N, ST)`: rstd1, `‖a'[0]‖`, `‖a'[1]‖` (the backward adds
    /// `dr_x[0]`, `dr_x[1]`).
    st: CudaSlice<f32>,
    /// `h = a'·W1ᵀ`, `(N, 2·hidden)`.
    h: CudaSlice<f32>,
    /// `c = h'·W2ᵀ` before LayerNorm-2, `(N, 2C)`.
    cpre: CudaSlice<f32>,
}

/// Runs the coupler's stages up to `c` (before LayerNorm-2): W1 norms, LayerNorm-1,
/// `h`, `h'` and `c`. The same launches in [`forward`] and [`backward`] (hence the
/// backward's recomputed values are bit-identical to the forward's).
fn coupler_forward(
    stream: &Arc<CudaStream>,
    p: &Plan,
    cfg: &DcConfig,
    gap: &CudaSlice<f32>,
    params: &DcDeviceParams,
) -> Result<CouplerFwd> {
    let (n, c, hd) = (cfg.n, cfg.c, cfg.hidden);
    // SAFETY (all six): each is written in full by the stage that produces it before
    // any read (norms: every j < hidden; LayerNorm-1: â, a' at every n·2C + i and
    // st[n·ST + 0..3); hidden: h at every (n, t, j); out: c at every (n, t, k)). The
    // slots st[n·ST + 3..8) are written by the backward's adjuster kernel or never read.
    let mut nrw = unsafe { stream.alloc::<f32>(2 * hd) }?;
    let mut ah = unsafe { stream.alloc::<f32>(n * 2 * c) }?;
    let mut ap = unsafe { stream.alloc::<f32>(n * 2 * c) }?;
    let mut st = unsafe { stream.alloc::<f32>(n * ST) }?;
    let mut h = unsafe { stream.alloc::<f32>(n * 2 * hd) }?;
    let mut cpre = unsafe { stream.alloc::<f32>(n * 2 * c) }?;

    let f = kernel_fn!(stream, "iieu_dc_w1_norms_f32")?;
    let mut b = launcher(stream, &f);
    b.arg(&params.w1).arg(&mut nrw).arg(&p.c).arg(&p.hd);
    // SAFETY: reads W1[j·C + k] for j < hidden, k < C (its validated length) and writes
    // nrw[j], nrw[hidden + j] (length 2·hidden).
    unsafe { b.launch(launch_cfg(grid_for(hd, (BLOCK / 32) as usize), BLOCK, 0)) }?;

    let f = kernel_fn!(stream, "iieu_dc_ln1_f32")?;
    let mut b = launcher(stream, &f);
    b.arg(gap)
        .arg(&params.ln1_weight)
        .arg(&params.ln1_bias)
        .arg(&mut ah)
        .arg(&mut ap)
        .arg(&mut st)
        .arg(&p.n)
        .arg(&p.c);
    // SAFETY: gap, â, a' have N·2C elements, st N·ST; rows n < N of 2C (ST) values;
    // the LayerNorm-1 affine has 2C (validated).
    unsafe { b.launch(launch_cfg(sample_grid(n), coupler_block(c), 0)) }?;

    let f = kernel_fn!(stream, "iieu_dc_hidden_f32")?;
    let mut b = launcher(stream, &f);
    b.arg(&ap)
        .arg(&params.w1)
        .arg(&mut h)
        .arg(&p.n)
        .arg(&p.c)
        .arg(&p.hd);
    // SAFETY: items (n, j) < N·hidden (fits i32, checked in `plan`); reads a'[n·2C + t·C
    // + k] and W1[j·C + k] (k < C), writes h[n·2·hidden + t·hidden + j].
    unsafe {
        b.launch(launch_cfg(
            grid_for(n * hd, (ITEM_BLOCK / 32) as usize),
            ITEM_BLOCK,
            0,
        ))
    }?;

    let f = kernel_fn!(stream, "iieu_dc_out_f32")?;
    let mut b = launcher(stream, &f);
    b.arg(&h)
        .arg(&st)
        .arg(&params.gamma2)
        .arg(&params.beta2)
        .arg(&params.eta2)
        .arg(&nrw)
        .arg(&params.w2)
        .arg(&mut cpre)
        .arg(&p.n)
        .arg(&p.c)
        .arg(&p.hd);
    // SAFETY: items (n, chunk) < N·⌈C/128⌉ ≤ N·C (fits i32); reads h, γ₂, β₂ at
    // t·hidden + j (< 2·hidden per sample), η₂ and nrw at j, hidden + j, st at
    // n·ST + 1..3, W2[k·hidden + j] (k < C); writes c[n·2C + t·C + k]; the shared
    // memory holds the 2·hidden h' values.
    unsafe {
        b.launch(launch_cfg(
            grid_for(n * c.div_ceil(ITEM_BLOCK as usize), 1),
            ITEM_BLOCK,
            p.smem_item,
        ))
    }?;
    Ok(CouplerFwd {
        nrw,
        ah,
        ap,
        st,
        h,
        cpre,
    })
}

/// IIEU-DC backward on the GPU: gradients w.r.t. `x`, `res` (through the mix and through
/// the GAPs) and all nine parameters, given `dy = ∂L/∂out` (in `T`) and the forward's
/// inputs, parameters and [`DcDeviceSaved`] (formulas: [`crate::cpu::iieu_dc::backward`];
/// nothing is detached). `dx`, `dres` are returned in `T`, parameter gradients in f32.
///
/// Parameter gradients are two-stage: stage 1 sums each sample chunk's per-sample
/// contributions in sample order into a partial row (the chunking depends only on
/// `cfg`), stage 2 sums the rows in chunk order — bit-identical on every run, no
/// atomics.
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

    // (b) The coupler's forward values again (same kernels: bit-identical to forward's).
    let CouplerFwd {
        nrw,
        ah,
        ap,
        mut st,
        h,
        cpre,
    } = coupler_forward(stream, &p, cfg, &saved.gap, params)?;

    // (c) Softmax + LayerNorm-2 backward: dc and the l2w | l2b contributions.
    // SAFETY: dc is written at every n·2C + i by the LayerNorm-2 backward; vrow's regions
    // by their kernels before stage 1 reads them: l2w | l2b here, g2 | b2 | η₂ | wc by
    // the adjuster backward, l1w | l1b by the LayerNorm-1 backward (8C + 6·hidden per
    // sample, all of it); hp by the adjuster backward at every (n, t, j).
    let mut dc = unsafe { stream.alloc::<f32>(nc2) }?;
    let mut vrow = unsafe { stream.alloc::<f32>(cfg.n * p.vrow_len) }?;
    let mut hp = unsafe { stream.alloc::<f32>(cfg.n * 2 * hd) }?;
    let f = kernel_fn!(stream, "iieu_dc_ln2_bwd_f32")?;
    let mut b = launcher(stream, &f);
    b.arg(&cpre)
        .arg(&pd)
        .arg(&params.ln2_weight)
        .arg(&params.ln2_bias)
        .arg(&mut dc)
        .arg(&mut vrow)
        .arg(&p.n)
        .arg(&p.c)
        .arg(&p.hd);
    // SAFETY: c, pd, dc have N·2C elements (rows n < N of 2C); vrow N·(8C + 6·hidden)
    // with this kernel writing row n's l2w | l2b region (4C at 4C + 6·hidden); the
    // shared memory holds the 4C floats the kernel carves (checked in `plan`).
    unsafe { b.launch(launch_cfg(sample_grid(cfg.n), coupler_block(c), p.smem_ln)) }?;

    // (d) dh' = dc·W2 (written into dhd, which the adjuster backward turns into dh).
    // SAFETY: written at every (n, t, j) by the dh' kernel.
    let mut dhd = unsafe { stream.alloc::<f32>(cfg.n * 2 * hd) }?;
    let f = kernel_fn!(stream, "iieu_dc_dhp_f32")?;
    let mut b = launcher(stream, &f);
    b.arg(&dc)
        .arg(&params.w2)
        .arg(&mut dhd)
        .arg(&p.n)
        .arg(&p.c)
        .arg(&p.hd);
    // SAFETY: items (n, j) < N·hidden; reads dc[n·2C + t·C + k], W2[k·hidden + j];
    // writes dhd[n·2·hidden + t·hidden + j].
    unsafe {
        b.launch(launch_cfg(
            grid_for(cfg.n * hd, (ITEM_BLOCK / 32) as usize),
            ITEM_BLOCK,
            0,
        ))
    }?;

    // (e) Adjuster, term-B, term-S and std backward: dh (in place), h', dr_x, vrow.
    let f = kernel_fn!(stream, "iieu_dc_adj_bwd_f32")?;
    let mut b = launcher(stream, &f);
    b.arg(&h)
        .arg(&mut dhd)
        .arg(&mut hp)
        .arg(&mut st)
        .arg(&params.gamma2)
        .arg(&params.beta2)
        .arg(&params.eta2)
        .arg(&nrw)
        .arg(&mut vrow)
        .arg(&p.n)
        .arg(&p.hd)
        .arg(&p.c);
    // SAFETY: h, dhd, hp have N·2·hidden elements, st N·ST (reads slots 1, 2, writes
    // 3, 4), vrow rows of 8C + 6·hidden (writes g2 | b2 | η₂ | wc at 4C .. 4C + 6·hidden);
    // γ₂, β₂ 2·hidden, η₂ hidden, nrw 2·hidden; the shared memory holds 10·hidden floats
    // (checked against the limit in `plan`).
    unsafe { b.launch(launch_cfg(sample_grid(cfg.n), coupler_block(c), p.smem_adj)) }?;

    // (f) da' = dh·W1 + the r_x path, into the dead c buffer.
    let mut acc = cpre;
    let f = kernel_fn!(stream, "iieu_dc_da_f32")?;
    let mut b = launcher(stream, &f);
    b.arg(&dhd)
        .arg(&params.w1)
        .arg(&ap)
        .arg(&st)
        .arg(&mut acc)
        .arg(&p.n)
        .arg(&p.c)
        .arg(&p.hd);
    // SAFETY: items (n, chunk) < N·⌈C/128⌉; reads dh (2·hidden per sample, into the
    // 2·hidden floats of shared memory), W1[j·C + k], a'[n·2C + t·C + k], st[n·ST + 1..5);
    // writes acc[n·2C + t·C + k] (N·2C long) for every k < C, t < 2.
    unsafe {
        b.launch(launch_cfg(
            grid_for(cfg.n * c.div_ceil(ITEM_BLOCK as usize), 1),
            ITEM_BLOCK,
            p.smem_item,
        ))
    }?;

    // (g) LayerNorm-1 backward: dgap and the l1w | l1b contributions.
    // SAFETY: written at every n·2C + i by the LayerNorm-1 backward.
    let mut dgap = unsafe { stream.alloc::<f32>(nc2) }?;
    let f = kernel_fn!(stream, "iieu_dc_ln1_bwd_f32")?;
    let mut b = launcher(stream, &f);
    b.arg(&acc)
        .arg(&ah)
        .arg(&params.ln1_weight)
        .arg(&st)
        .arg(&mut dgap)
        .arg(&mut vrow)
        .arg(&p.n)
        .arg(&p.c)
        .arg(&p.hd);
    // SAFETY: acc, â, dgap have N·2C elements, st N·ST (slot 0), ln1 weight 2C; vrow
    // rows of 8C + 6·hidden (writes l1w | l1b, the first 4C); the shared memory holds
    // the 2C floats of da.
    unsafe {
        b.launch(launch_cfg(
            sample_grid(cfg.n),
            coupler_block(c),
            p.smem_ln / 2,
        ))
    }?;

    // (h) Parameter gradients, stage 1: chunks of samples (grid y) × gradient elements.
    let eblocks = p.part_len.div_ceil(BLOCK as usize);
    let want = PARAM_TARGET_BLOCKS.div_ceil(eblocks);
    let chunks0 = want
        .min((PARTIAL_BUDGET / p.part_len).max(1))
        .min(cfg.n)
        .clamp(1, 65_535);
    let per = cfg.n.div_ceil(chunks0);
    let chunks = cfg.n.div_ceil(per);
    let per_i32 = to_i32("samples per chunk", per)?;
    let rows_i32 = to_i32("partial rows", chunks)?;
    // SAFETY: stage 1 writes every (chunk, e) of the chunks × part_len partials once.
    let mut part = unsafe { stream.alloc::<f32>(chunks * p.part_len) }?;
    let f = kernel_fn!(stream, "iieu_dc_param_part_f32")?;
    let mut b = launcher(stream, &f);
    b.arg(&vrow)
        .arg(&dhd)
        .arg(&ap)
        .arg(&dc)
        .arg(&hp)
        .arg(&mut part)
        .arg(&p.n)
        .arg(&p.c)
        .arg(&p.hd)
        .arg(&per_i32);
    // SAFETY: chunk y < chunks covers samples y·per .. min(N, (y+1)·per) (< N); element
    // e < part_len reads vrow[n·(8C + 6·hidden) + …] below its row length, dh / h' at
    // n·2·hidden + t·hidden + j, a' / dc at n·2C + t·C + k (j < hidden, k < C), and
    // writes part[y·part_len + e] (chunks·part_len long).
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: (grid_for(p.part_len, BLOCK as usize), chunks as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        })
    }?;

    // (i) Stage 2: fixed-order sum over the chunks into the nine gradients.
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
        .arg(&params.w1)
        .arg(&mut g_l1w)
        .arg(&mut g_l1b)
        .arg(&mut g_w1)
        .arg(&mut g_g2)
        .arg(&mut g_b2)
        .arg(&mut g_eta)
        .arg(&mut g_w2)
        .arg(&mut g_l2w)
        .arg(&mut g_l2b);
    // SAFETY: reads part[r·part_len + e] for r < rows, e < part_len (its length
    // rows·part_len) and W1 at the W1 region's q < hidden·C; each element e of the
    // gradient row (part_len − hidden long) is written to exactly one output at
    // e − (region offset), below that output's length (2C, 2C, hidden·C, 2·hidden,
    // 2·hidden, hidden, C·hidden, 2C, 2C).
    let glen = p.part_len - hd;
    unsafe { b.launch(launch_cfg(grid_for(glen, BLOCK as usize), BLOCK, 0)) }?;

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
    fn smem_plan_fits_resnet_sizes_and_refuses_huge_hidden_widths() {
        let ok = |c: usize, r: usize| plan(&DcConfig::new(2, c, 7, 7, r).unwrap()).is_ok();
        assert!(ok(2048, 16));
        assert!(ok(2048, 8));
        assert!(ok(2048, 2));
        assert!(ok(256, 1));
        // hidden = 1222 is the last width whose 10·hidden floats fit.
        assert!(ok(1222, 1));
        assert!(!ok(1223, 1));
        assert!(!ok(4096, 2));
        assert!(ok(3056, 16));
        assert!(!ok(3072, 16));
    }
}
