//! IIEU-B on the GPU (SPEC §1.1–1.4): term-S, term-B and the adjuster, forward and
//! backward — the device mirror of [`crate::cpu::iieu`] (same names, same argument
//! order, `stream` first). Kernels: `kernels/iieu.cu`.
//!
//! Dtypes: the large tensors (`x`, `x_pre`, `W`, `y`, `dy`, and the gradients `dx`,
//! `dx_pre`, `dW`) are device buffers of the storage dtype `T` ([`DType`]: `f32`,
//! `f16`, `bf16`); the per-channel parameters `γ̇`, `β̇`, `η` and their gradients are
//! `f32` device buffers ([`IieuDeviceParams`]). Every intermediate — the inverse norms
//! `r_w`, `r_x` and the norms, the GAP `m`, `m̂`, `rstd`, `ν`, and all partial sums — is
//! kept in `f32`, and all arithmetic and accumulation is `f32` (the CPU reference
//! accumulates in f64; see the parity tests for the tolerances this implies). The only
//! roundings to `T` are the final stores of `y`, `dx`, `dx_pre`, `dW`.
//!
//! Shapes are those of the CPU side: `x`, `y`, `dy`: `(N, O, H', W')`; `x_pre`:
//! `(N, C, H, W)`; `W`: `(O, C/g, KH, KW)`; `r_x`: `(N, G', H', W')` with `G'` =
//! [`IieuConfig::patch_groups`]; parameters `(O,)`. Both [`PatchNorm`] modes and every
//! geometry [`crate::Conv2dGeometry::validate`] accepts are supported, with one extra
//! limit: every dimension, `H + 2·pad_h`, `W + 2·pad_w`, the dilated kernel extents,
//! `H·W`, `H'·W'` and `C/g·KH·KW` must fit in `i32` (the kernels' per-axis index type;
//! flat tensor offsets are 64-bit), and so must the kernels' work-item counts —
//! `N·G'·H·W` and `N·G'·H'·W'` plus 2¹⁹, and `N·G'·⌈O/(8·G')⌉·H'·W'` (flat 32-bit item
//! indices, no 64-bit division in the kernels). Violations are [`Error::Shape`].
//!
//! Every argument is validated on the host before any allocation or launch, with the
//! same [`Error`] variants as the CPU functions. Results are bitwise deterministic: no
//! float atomics, every reduction (block reductions, two-stage parameter gradients,
//! the channel-chunk partials of the split kernels) has a fixed order, and the channel
//! splits depend on the shape and dtype only, never on the device.

use std::sync::Arc;

use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};

use crate::cpu::iieu::{IieuConfig, IieuParams, PatchNorm};
use crate::cuda::abi::IieuGeom;
use crate::cuda::handles::kernel_fn;
use crate::cuda::{grid_for, launcher, to_i32, ArgOpt, DType, DeviceInput, BLOCK};
use crate::error::{check_len, Error, Result};

// ------------------------------------------------------------------------------------
// Public types

/// Learnable per-channel parameters of an IIEU on the device, each `f32` of length `O`.
#[derive(Debug, Clone)]
pub struct IieuDeviceParams {
    /// term-B LayerNorm weight `γ̇[o]` (init 0.01).
    pub ln_weight: CudaSlice<f32>,
    /// term-B LayerNorm bias `β̇[o]` (init 0).
    pub ln_bias: CudaSlice<f32>,
    /// Adjuster threshold `η[o]` (init 0.05).
    pub eta: CudaSlice<f32>,
}

impl IieuDeviceParams {
    /// Uploads host parameters (any lengths; they are checked against the config by
    /// [`forward`] / [`backward`]).
    pub fn from_host(stream: &Arc<CudaStream>, p: &IieuParams<f32>) -> Result<Self> {
        Ok(Self {
            ln_weight: stream.clone_htod(&p.ln_weight)?,
            ln_bias: stream.clone_htod(&p.ln_bias)?,
            eta: stream.clone_htod(&p.eta)?,
        })
    }

    /// The SPEC initialisation for `c_out` channels: `γ̇ = 0.01`, `β̇ = 0`, `η = 0.05`.
    pub fn init(stream: &Arc<CudaStream>, c_out: usize) -> Result<Self> {
        Self::from_host(stream, &IieuParams::<f32>::init(c_out))
    }

    pub(crate) fn check(&self, c_out: usize) -> Result<()> {
        check_len("ln_weight", c_out, self.ln_weight.len())?;
        check_len("ln_bias", c_out, self.ln_bias.len())?;
        check_len("eta", c_out, self.eta.len())
    }
}

/// What [`forward`] saves for [`backward`], all `f32` on the device, tied to the config
/// it was computed for: the inverse norms `r_w` `(O,)` and `r_x` `(N, G', H', W')`, the
/// norms `‖W[o]‖` and `‖P‖` (for `∂r/∂v = −r²·v/‖v‖`), and the term-B statistics
/// `ν`, `m̂` `(N, O)` and `rstd` `(N,)`.
#[derive(Debug, Clone)]
pub struct IieuDeviceSaved {
    cfg: IieuConfig,
    r_w: CudaSlice<f32>,
    w_norm: CudaSlice<f32>,
    r_x: CudaSlice<f32>,
    x_norm: CudaSlice<f32>,
    nu: CudaSlice<f32>,
    m_hat: CudaSlice<f32>,
    rstd: CudaSlice<f32>,
}

impl IieuDeviceSaved {
    /// The config the state was computed for.
    pub fn config(&self) -> &IieuConfig {
        &self.cfg
    }
    /// Filter inverse norms `r_w`, `(O,)`.
    pub fn r_w(&self) -> &CudaSlice<f32> {
        &self.r_w
    }
    /// Patch inverse norms `r_x`, `(N, G', H', W')`.
    pub fn r_x(&self) -> &CudaSlice<f32> {
        &self.r_x
    }
    /// term-B shift `ν[n, o] = σ(γ̇·m̂ + β̇)`, `(N, O)`.
    pub fn nu(&self) -> &CudaSlice<f32> {
        &self.nu
    }
    /// LayerNorm-ed GAP `m̂[n, o]`, `(N, O)`.
    pub fn m_hat(&self) -> &CudaSlice<f32> {
        &self.m_hat
    }
}

/// Gradients of every input and parameter of an IIEU on the device.
#[derive(Debug)]
pub struct IieuDeviceGrads<T> {
    /// `∂L/∂x`, `(N, O, H', W')`, dtype `T`.
    pub dx: CudaSlice<T>,
    /// `∂L/∂x_pre`, `(N, C, H, W)` (through `r_x`), dtype `T`.
    pub dx_pre: CudaSlice<T>,
    /// `∂L/∂W`, `(O, C/g, KH, KW)` (through `r_w`), dtype `T`.
    pub dw: CudaSlice<T>,
    /// `∂L/∂γ̇`, `(O,)`, f32.
    pub d_ln_weight: CudaSlice<f32>,
    /// `∂L/∂β̇`, `(O,)`, f32.
    pub d_ln_bias: CudaSlice<f32>,
    /// `∂L/∂η`, `(O,)`, f32.
    pub d_eta: CudaSlice<f32>,
}

// ------------------------------------------------------------------------------------
// Internal: validated dimensions

pub(crate) struct Dims {
    pub(crate) g: IieuGeom,
    pub(crate) n: usize,
    pub(crate) o: usize,
    pub(crate) plane_out: usize,
    pub(crate) x_len: usize,
    pub(crate) x_pre_len: usize,
    pub(crate) w_len: usize,
    pub(crate) rx_len: usize,
    pub(crate) q_len: usize,
    /// N·G': the (sample, patch group) pairs.
    ng: usize,
    plane_in: usize,
}

/// Output channels per `iieu_fwd` thread (`FWD_CH` in kernels/iieu.cu): `r_x` is loaded
/// once per 8 channels, 0.5 B of re-read per f32 element instead of 4 B.
const FWD_CH: usize = 8;
/// Planes per `iieu_bwd_sums` block (`SUMS_CH` in kernels/iieu.cu), for the same reason
/// (4, not 8: its 3 sums per plane live in registers).
const SUMS_CH: usize = 4;
/// Channel-split target: a split kernel's channels are cut into chunks until it has
/// about this many work items (threads): 256 blocks of [`BLOCK`], ≥ 1.9 blocks per SM
/// on a 132-SM H100, ≥ 3 on an 84-SM A6000. A fixed number, not the device's SM count:
/// the split, and so the bits of every result, depend on the shape only.
const SPLIT_TARGET: usize = 1 << 16;
/// At most this many chunks per group.
const SPLIT_MAX: usize = 64;
/// At least this many channels per chunk (below it the per-chunk `r_x` / window re-reads
/// and partials stop being small next to the channel traffic).
const SPLIT_MIN_CHUNK: usize = 8;

/// How a channel loop of `per` channels is cut into `splits` chunks of `chunk` channels
/// (the last one may be shorter; none is empty; with `splits > 1`, `chunk` ≥
/// [`SPLIT_MIN_CHUNK`]). The split kernels write one f32
/// partial per work item and chunk: with `splits > 1` the scratch holds
/// `splits · base · V` floats for `base` pixel vectors of V pixels, less than
/// `2 · SPLIT_TARGET · 8` floats (4 MiB); with `splits = 1` it is the unsplit output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Split {
    pub(crate) chunk: i32,
    pub(crate) splits: i32,
}

impl Split {
    /// The split of `per` channels for a grid of `base` work items per chunk.
    fn new(per: usize, base: usize) -> Self {
        let want = if base >= SPLIT_TARGET {
            1
        } else {
            SPLIT_TARGET
                .div_ceil(base.max(1))
                .min(SPLIT_MAX)
                .min(per / SPLIT_MIN_CHUNK)
                .max(1)
        };
        let chunk = per.div_ceil(want).max(1);
        let splits = per.div_ceil(chunk).max(1);
        // per < 2^31 (validated), so both fit.
        Self {
            chunk: chunk as i32,
            splits: splits as i32,
        }
    }
}

/// Work items per plane of a kernel on planes of `plane` pixels: `plane / V` 128-bit
/// vectors when `plane` is a multiple of the vector width `V`, else one pixel each.
fn plane_items(plane: usize, v: usize) -> usize {
    if plane % v == 0 {
        plane / v
    } else {
        plane
    }
}

fn fits_i32(what: &'static str, v: Option<usize>) -> Result<i32> {
    match v {
        Some(v) => to_i32(what, v),
        None => Err(Error::Shape {
            what,
            msg: "size overflows usize".into(),
        }),
    }
}

impl Dims {
    /// Channel split of `iieu_patch_sq` and `iieu_bwd_dxpre` (over the C/G' input
    /// channels of a group) for vector width `v`.
    pub(crate) fn in_split(&self, v: usize) -> Split {
        Split::new(
            self.g.c_per as usize,
            self.ng * plane_items(self.plane_in, v),
        )
    }

    /// Channel split of `iieu_bwd_dx` (over the O/G' output channels of a group).
    pub(crate) fn out_split(&self, v: usize) -> Split {
        Split::new(
            self.g.o_per as usize,
            self.ng * plane_items(self.plane_out, v),
        )
    }

    /// Work items of `iieu_fwd`: pixel vectors × chunks of [`FWD_CH`] channels.
    fn fwd_items(&self, v: usize) -> usize {
        self.ng * (self.g.o_per as usize).div_ceil(FWD_CH) * plane_items(self.plane_out, v)
    }

    /// Blocks of `iieu_bwd_sums`: chunks of [`SUMS_CH`] planes of one (n, group).
    fn sums_rows(&self) -> usize {
        self.ng * (self.g.o_per as usize).div_ceil(SUMS_CH)
    }

    pub(crate) fn new(cfg: &IieuConfig) -> Result<Self> {
        let (oh, ow) = cfg.validate()?;
        let geo = &cfg.geometry;
        let gp = cfg.patch_groups();
        let (dh, dw) = match cfg.patch_norm {
            PatchNorm::PerGroup => geo.dilation,
            PatchNorm::AllChannels => (1, 1),
        };
        let w_per = geo
            .cin_per_group()
            .checked_mul(geo.kh)
            .and_then(|v| v.checked_mul(geo.kw));
        let g = IieuGeom {
            n: to_i32("batch N", geo.n)?,
            c: to_i32("input channels C", geo.c_in)?,
            h: to_i32("input height H", geo.h)?,
            w: to_i32("input width W", geo.w)?,
            o: to_i32("output channels O", geo.c_out)?,
            oh: to_i32("output height H'", oh)?,
            ow: to_i32("output width W'", ow)?,
            kh: to_i32("kernel height KH", geo.kh)?,
            kw: to_i32("kernel width KW", geo.kw)?,
            sh: to_i32("stride", geo.stride.0)?,
            sw: to_i32("stride", geo.stride.1)?,
            ph: to_i32("padding", geo.padding.0)?,
            pw: to_i32("padding", geo.padding.1)?,
            dh: to_i32("dilation", dh)?,
            dw: to_i32("dilation", dw)?,
            gp: to_i32("groups", gp)?,
            c_per: to_i32("channels per group", geo.c_in / gp)?,
            o_per: to_i32("channels per group", geo.c_out / gp)?,
            w_per: fits_i32("filter size C/g·KH·KW", w_per)?,
            mode: match cfg.patch_norm {
                PatchNorm::PerGroup => 0,
                PatchNorm::AllChannels => 1,
            },
        };
        // Per-axis kernel index arithmetic stays within i32.
        let pad = |v: usize| v.checked_mul(2);
        fits_i32(
            "padded height",
            pad(geo.padding.0).and_then(|p| p.checked_add(geo.h)),
        )?;
        fits_i32(
            "padded width",
            pad(geo.padding.1).and_then(|p| p.checked_add(geo.w)),
        )?;
        fits_i32(
            "dilated kernel height",
            geo.dilation.0.checked_mul(geo.kh - 1),
        )?;
        fits_i32(
            "dilated kernel width",
            geo.dilation.1.checked_mul(geo.kw - 1),
        )?;
        fits_i32("input plane H·W", geo.h.checked_mul(geo.w))?;
        fits_i32("output plane H'·W'", oh.checked_mul(ow))?;
        // Every length below is bounded by a tensor size validate() proved finite.
        let plane_out = oh * ow;
        let plane_in = geo.h * geo.w;
        let ng = geo.n * gp;
        // The kernels' flat 32-bit work-item indices (kernels/iieu.cu): every item count
        // fits in i32 at its scalar path's (largest) value. A split kernel has
        // N·G'·plane items unsplit; split (only when N·G'·plane/V < SPLIT_TARGET), at
        // most SPLIT_TARGET·V + N·G'·plane with V ≤ 8.
        let split_slack = SPLIT_TARGET * 8;
        let with_slack = |v: usize| ng.checked_mul(v).and_then(|v| v.checked_add(split_slack));
        fits_i32("input work items N·G'·H·W", with_slack(plane_in))?;
        fits_i32("output work items N·G'·H'·W'", with_slack(plane_out))?;
        fits_i32(
            "output work items N·G'·⌈O/(8·G')⌉·H'·W'",
            ng.checked_mul((geo.c_out / gp).div_ceil(FWD_CH))
                .and_then(|v| v.checked_mul(plane_out)),
        )?;
        Ok(Self {
            g,
            n: geo.n,
            o: geo.c_out,
            plane_out,
            x_len: geo.n * geo.c_out * plane_out,
            x_pre_len: geo.n * geo.c_in * plane_in,
            w_len: geo.c_out * geo.cin_per_group() * geo.kh * geo.kw,
            rx_len: geo.n * gp * plane_out,
            q_len: geo.n * gp * plane_in,
            ng,
            plane_in,
        })
    }
}

/// Values per 128-bit access of `T` (the kernels' vector width).
/// A copy of `v` in fresh (256-byte aligned) device memory when `wanted` and `v` does
/// not start on a 16-byte boundary (a view at an odd offset), else `None` (use `v`).
fn aligned_copy<T: DType>(
    stream: &Arc<CudaStream>,
    v: &CudaView<'_, T>,
    wanted: bool,
) -> Result<Option<CudaSlice<T>>> {
    if !wanted || v.is_empty() {
        return Ok(None);
    }
    let misaligned = {
        let (ptr, _record) = v.device_ptr(stream);
        ptr % 16 != 0
    };
    if !misaligned {
        return Ok(None);
    }
    let mut c = scratch::<T>(stream, v.len())?;
    stream.memcpy_dtod(v, &mut c)?;
    Ok(Some(c))
}

pub(crate) fn vec_width<T>() -> usize {
    16 / std::mem::size_of::<T>()
}

/// Grid-stride elementwise launch over `work` items (vectorised by `vec`).
pub(crate) fn elementwise(work: usize, vec: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid_for(work, BLOCK as usize * vec), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per item (grid-stride over `items`), `per_item` elements reduced by each
/// block: the block is sized to the work (a multiple of 32, at most [`BLOCK`]).
pub(crate) fn per_block(items: usize, per_item: usize) -> LaunchConfig {
    let threads = (per_item.div_ceil(32) * 32).clamp(32, BLOCK as usize) as u32;
    LaunchConfig {
        grid_dim: (items.clamp(1, super::grid_cap()) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A device buffer every element of which the next kernel writes before any read.
pub(crate) fn scratch<T: DeviceRepr>(stream: &Arc<CudaStream>, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: callers pass it only as a kernel output that writes all `len` elements
    // (documented at each launch) before anything reads it.
    Ok(unsafe { stream.alloc::<T>(len) }?)
}

pub(crate) fn check_saved(d: &Dims, cfg: &IieuConfig, saved: &IieuDeviceSaved) -> Result<()> {
    if saved.cfg != *cfg {
        return Err(Error::Shape {
            what: "saved",
            msg: format!(
                "state was computed for {:?}, backward called with {:?}",
                saved.cfg, cfg
            ),
        });
    }
    let consistent = saved.r_w.len() == d.o
        && saved.w_norm.len() == d.o
        && saved.r_x.len() == d.rx_len
        && saved.x_norm.len() == d.rx_len
        && saved.nu.len() == d.n * d.o
        && saved.m_hat.len() == d.n * d.o
        && saved.rstd.len() == d.n;
    if consistent {
        Ok(())
    } else {
        Err(Error::Shape {
            what: "saved",
            msg: "saved state buffers do not match the config".into(),
        })
    }
}

// ------------------------------------------------------------------------------------
// Launch helpers (validated dims only)

/// `(r_w, ‖W‖)`.
pub(crate) fn launch_filter_norm<T: DType>(
    stream: &Arc<CudaStream>,
    d: &Dims,
    w: &impl DeviceInput<T>,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let f = kernel_fn!(stream, "iieu_filter_norm", T)?;
    let mut r_w = scratch::<f32>(stream, d.o)?;
    let mut w_norm = scratch::<f32>(stream, d.o)?;
    let wv = w.view();
    let mut b = launcher(stream, &f);
    b.arg(&wv).arg(&mut r_w).arg(&mut w_norm).arg(&d.g);
    // SAFETY: blocks grid-stride over o < O; each reads w[o·w_per .. (o+1)·w_per)
    // (w.len() = O·w_per was validated) and writes r_w[o], w_norm[o] (length O).
    unsafe { b.launch(per_block(d.o, d.g.w_per as usize)) }?;
    Ok((r_w, w_norm))
}

/// `(r_x, ‖P‖)`: per-chunk partials of q = Σ_c x_pre² per patch plane (channel-split
/// grid, [`Dims::in_split`]), their fixed-order sum q (only with several chunks), then the
/// window sum of q.
///
/// Scratch: `splits · N·G'·H·W` f32 partials — `q` itself when `splits = 1`, else less
/// than 2²⁰ floats (4 MiB; see [`Split`]) plus q, freed when this returns.
pub(crate) fn launch_patch_norm<T: DType>(
    stream: &Arc<CudaStream>,
    d: &Dims,
    x_pre: &impl DeviceInput<T>,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let f_sq = kernel_fn!(stream, "iieu_patch_sq", T)?;
    let f_win = kernel_fn!(stream, "iieu_patch_window")?;
    let v = vec_width::<T>();
    let sp = d.in_split(v);
    let mut q_part = scratch::<f32>(stream, sp.splits as usize * d.q_len)?;
    let xv = x_pre.view();
    let mut b = launcher(stream, &f_sq);
    b.arg(&xv)
        .arg(&mut q_part)
        .arg(&d.g)
        .arg(&sp.chunk)
        .arg(&sp.splits);
    // SAFETY: items (t = n·G' + grp, s, pixel vector) cover every (s, t, pixel): each
    // writes q_part[s·N·G'·HW + t·HW + pix] (every element of the splits·N·G'·HW
    // written) and reads x_pre[(t·c_per + c)·HW + pix] for c < c_per, < N·C·H·W =
    // x_pre.len() (validated); item counts fit i32 (Dims::new).
    unsafe {
        b.launch(elementwise(
            sp.splits as usize * d.ng * plane_items(d.plane_in, v),
            1,
        ))
    }?;
    let q = if sp.splits == 1 {
        q_part
    } else {
        let f = kernel_fn!(stream, "iieu_sum_chunks")?;
        let mut q = scratch::<f32>(stream, d.q_len)?;
        let len = to_i32("patch planes N·G'·H·W", d.q_len)?;
        let mut b = launcher(stream, &f);
        b.arg(&q_part).arg(&mut q).arg(&len).arg(&sp.splits);
        // SAFETY: threads cover e < len = N·G'·HW = q.len() (every element written) and
        // read q_part[s·len + e] for s < splits (length splits·len).
        unsafe { b.launch(elementwise(d.q_len, 1)) }?;
        q
    };
    let mut r_x = scratch::<f32>(stream, d.rx_len)?;
    let mut x_norm = scratch::<f32>(stream, d.rx_len)?;
    let mut b = launcher(stream, &f_win);
    b.arg(&q).arg(&mut x_norm).arg(&mut r_x).arg(&d.g);
    // SAFETY: threads cover e < N·G'·H'·W' (= r_x.len() = x_norm.len()); q is read at
    // t·HW + hi·W + wi with 0 ≤ hi < H, 0 ≤ wi < W checked in the kernel.
    unsafe { b.launch(elementwise(d.rx_len, 1)) }?;
    Ok((r_x, x_norm))
}

// ------------------------------------------------------------------------------------
// Public API

/// Filter inverse norms `r_w[o] = 1/(‖W[o]‖₂ + EPS)` over the `C/g·KH·KW` entries of
/// each filter, `(O,)`, as f32 (see [`crate::cpu::iieu::filter_inv_norm`]). One block
/// per filter, f32 accumulation.
///
/// Errors: invalid geometry ([`Error::Geometry`] / [`Error::Empty`] / [`Error::Shape`]
/// for i32 overflow), wrong `w` length ([`Error::LengthMismatch`]), driver errors
/// ([`Error::Driver`]).
///
/// Example: [`forward`]'s reads both inverse norms back.
pub fn filter_inv_norm<T: DType>(
    stream: &Arc<CudaStream>,
    cfg: &IieuConfig,
    w: &impl DeviceInput<T>,
) -> Result<CudaSlice<f32>> {
    let d = Dims::new(cfg)?;
    check_len("w", d.w_len, w.view().len())?;
    Ok(launch_filter_norm(stream, &d, w)?.0)
}

/// Patch inverse norms `r_x[n, grp, h', w'] = 1/(‖P‖₂ + EPS)`, `(N, G', H', W')`, as
/// f32 (see [`crate::cpu::iieu::patch_inv_norm`] and [`PatchNorm`] for which channels
/// and taps `P` covers). Two kernels: `q = Σ_{c∈grp} x_pre²` per pixel, then a KH×KW
/// strided/dilated window sum of `q` with zero padding — never a convolution.
///
/// Errors: as [`filter_inv_norm`], for `x_pre`.
///
/// Example: [`forward`]'s reads both inverse norms back.
pub fn patch_inv_norm<T: DType>(
    stream: &Arc<CudaStream>,
    cfg: &IieuConfig,
    x_pre: &impl DeviceInput<T>,
) -> Result<CudaSlice<f32>> {
    let d = Dims::new(cfg)?;
    check_len("x_pre", d.x_pre_len, x_pre.view().len())?;
    Ok(launch_patch_norm(stream, &d, x_pre)?.0)
}

/// IIEU-B forward (see [`crate::cpu::iieu::forward`] for the full definition):
/// `y = ς(ρ̂)·x`, `ρ̂ = x·r_w[o]·r_x[n,grp(o),h',w'] + ν[n,o]`,
/// `ν = σ(γ̇·LayerNorm_o(GAP(x)) + β̇)`, `ς(ρ̂) = ρ̂` if `ρ̂ ≥ η[o]` (ties: upper
/// branch), else `η·exp(ρ̂ − η)`.
///
/// `x`: `(N, O, H', W')`, `x_pre`: `(N, C, H, W)`, `w`: `(O, C/g, KH, KW)`, all `T`;
/// `params`: f32 `(O,)` each. Returns `y` (`T`, `(N, O, H', W')`) and the f32 state
/// [`backward`] needs ([`IieuDeviceSaved`]: `r_w`, `‖W‖`, `r_x`, `‖P‖`, `ν`, `m̂`,
/// `rstd`). Six or seven launches: filter norms, patch squares (per-chunk partials over a
/// channel-split grid, then their sum when split), patch window sums, GAP, LayerNorm +
/// sigmoid, and the adjuster
/// (one thread per pixel vector and 8 channels, 128-bit when `H'·W'` allows).
///
/// Errors: invalid geometry; any buffer or parameter of the wrong length
/// ([`Error::LengthMismatch`]); driver errors.
///
/// # Example (forward and backward, against the CPU reference)
///
/// ```
/// use activation_kernels::cpu::iieu::{IieuConfig, IieuParams};
/// use activation_kernels::cuda::{iieu, real_driver_present, CudaContext};
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
/// // IIEU-B after a 3×3 conv (padding 1), 2 → 2 channels, one 3×3 image.
/// let cfg = IieuConfig::new(Conv2dGeometry::new(1, 2, 3, 3, 2, 3, 3).with_padding(1, 1));
/// let x_pre: Vec<f32> = (0..18).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
/// let w: Vec<f32> = (0..36).map(|i| ((i * 5 % 13) as f32 - 6.0) / 8.0).collect();
/// let x = cpu::iieu_conv::conv2d(&cfg.geometry, &x_pre, &w)?;
/// let dy: Vec<f32> = (0..18).map(|i| ((i * 3 % 7) as f32 - 3.0) / 2.0).collect();
/// let params = IieuParams::<f32>::init(2);
///
/// let (xd, xpd, wd, dyd) = (stream.clone_htod(&x)?, stream.clone_htod(&x_pre)?, stream.clone_htod(&w)?, stream.clone_htod(&dy)?);
/// let pd = iieu::IieuDeviceParams::from_host(&stream, &params)?;
/// let (y, saved) = iieu::forward(&stream, &cfg, &xd, &xpd, &wd, &pd)?;
/// let g = iieu::backward(&stream, &cfg, &dyd, &xd, &xpd, &wd, &pd, &saved)?;
/// let (r_w, r_x) = (iieu::filter_inv_norm(&stream, &cfg, &wd)?, iieu::patch_inv_norm(&stream, &cfg, &xpd)?);
///
/// let (y_ref, saved_ref) = cpu::iieu::forward(&cfg, &x, &x_pre, &w, &params)?;
/// let g_ref = cpu::iieu::backward(&cfg, &dy, &x, &x_pre, &w, &params, &saved_ref)?;
/// let pairs = [
///     (stream.clone_dtoh(&y)?, y_ref),
///     (stream.clone_dtoh(&r_w)?, cpu::iieu::filter_inv_norm(&cfg, &w)?),
///     (stream.clone_dtoh(&r_x)?, cpu::iieu::patch_inv_norm(&cfg, &x_pre)?),
///     (stream.clone_dtoh(&g.dx)?, g_ref.dx),
///     (stream.clone_dtoh(&g.dx_pre)?, g_ref.dx_pre),
///     (stream.clone_dtoh(&g.dw)?, g_ref.dw),
///     (stream.clone_dtoh(&g.d_ln_weight)?, g_ref.d_ln_weight),
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
    x: &impl DeviceInput<T>,
    x_pre: &impl DeviceInput<T>,
    w: &impl DeviceInput<T>,
    params: &IieuDeviceParams,
) -> Result<(CudaSlice<T>, IieuDeviceSaved)> {
    let d = Dims::new(cfg)?;
    check_len("x", d.x_len, x.view().len())?;
    check_len("x_pre", d.x_pre_len, x_pre.view().len())?;
    check_len("w", d.w_len, w.view().len())?;
    params.check(d.o)?;

    let (r_w, w_norm) = launch_filter_norm(stream, &d, w)?;
    let (r_x, x_norm) = launch_patch_norm(stream, &d, x_pre)?;
    let xv = x.view();
    let no = d.n * d.o;

    // term-B: GAP per (n,o) plane.
    let mut m = scratch::<f32>(stream, no)?;
    let f = kernel_fn!(stream, "iieu_gap", T)?;
    let mut b = launcher(stream, &f);
    b.arg(&xv).arg(&mut m).arg(&d.g);
    // SAFETY: blocks grid-stride over planes pl < N·O, reading x[pl·P .. (pl+1)·P)
    // (x.len() = N·O·P validated) and writing m[pl] (m.len() = N·O).
    // Threads per plane item: a vector of the plane, or one pixel where the plane is
    // not a whole number of vectors (the kernel's scalar path then walks P pixels).
    unsafe { b.launch(per_block(no, plane_items(d.plane_out, vec_width::<T>()))) }?;
    let norms = Norms {
        r_w,
        w_norm,
        r_x,
        x_norm,
    };
    finish_forward(stream, cfg, &d, &xv, None, &m, params, norms)
}

/// The inverse norms and norms of one forward (all f32 on the device).
pub(crate) struct Norms {
    pub(crate) r_w: CudaSlice<f32>,
    pub(crate) w_norm: CudaSlice<f32>,
    pub(crate) r_x: CudaSlice<f32>,
    pub(crate) x_norm: CudaSlice<f32>,
}

/// The end of the forward shared with IieuConv2d: term-B from the GAP `m` (LayerNorm,
/// ν) and the adjuster. `x` is IIEU-B's input, or with `lin` the conv output `c` and
/// `x = ψ(c)` is formed in the kernel (`lin` = `(sub, k, scale, add)` per channel).
/// Every length was validated by the caller.
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish_forward<T: DType>(
    stream: &Arc<CudaStream>,
    cfg: &IieuConfig,
    d: &Dims,
    xv: &CudaView<'_, T>,
    lin: Option<&CudaSlice<f32>>,
    m: &CudaSlice<f32>,
    params: &IieuDeviceParams,
    norms: Norms,
) -> Result<(CudaSlice<T>, IieuDeviceSaved)> {
    let no = d.n * d.o;
    let Norms {
        r_w,
        w_norm,
        r_x,
        x_norm,
    } = norms;
    // LayerNorm over O per sample, then ν.
    let mut m_hat = scratch::<f32>(stream, no)?;
    let mut rstd = scratch::<f32>(stream, d.n)?;
    let mut nu = scratch::<f32>(stream, no)?;
    let f = kernel_fn!(stream, "iieu_ln_fwd")?;
    let mut b = launcher(stream, &f);
    b.arg(m)
        .arg(&params.ln_weight)
        .arg(&params.ln_bias)
        .arg(&mut m_hat)
        .arg(&mut rstd)
        .arg(&mut nu)
        .arg(&d.g);
    // SAFETY: blocks grid-stride over n < N; index n·O + o < N·O (m, m_hat, nu), o < O
    // (params, lengths validated), n < N (rstd). Every m_hat, nu, rstd entry is written.
    unsafe { b.launch(per_block(d.n, d.o)) }?;

    // Adjuster.
    let mut y = scratch::<T>(stream, d.x_len)?;
    let f = kernel_fn!(stream, "iieu_fwd", T)?;
    let mut b = launcher(stream, &f);
    b.arg(xv)
        .arg_opt(lin)
        .arg(&r_w)
        .arg(&r_x)
        .arg(&nu)
        .arg(&params.eta)
        .arg(&mut y)
        .arg(&d.g);
    // SAFETY: items (n·G' + grp, chunk of FWD_CH channels, pixel vector) cover every
    // (n, o, pixel) once: e < N·O·P = x.len() = y.len() (every y written); lin (if any)
    // at 4·o + 3 < 4·O; r_x is read at (n·G' + grp)·P + p < N·G'·P, r_w/eta at o < O,
    // nu at n·O + o < N·O; the item count fits i32 (Dims::new).
    unsafe { b.launch(elementwise(d.fwd_items(vec_width::<T>()), 1)) }?;

    Ok((
        y,
        IieuDeviceSaved {
            cfg: *cfg,
            r_w,
            w_norm,
            r_x,
            x_norm,
            nu,
            m_hat,
            rstd,
        },
    ))
}

/// IIEU-B backward (SPEC §1.4; see [`crate::cpu::iieu::backward`]), back-propagating
/// through `r_x` and `r_w`. With `g = dy·∂y/∂ρ̂` (`x` on the upper branch,
/// `η·exp(ρ̂−η)·x` on the lower):
/// * `dx = dy·ς(ρ̂) + g·r_w·r_x + dm[n,o]/(H'·W')`;
/// * `dz = ν(1−ν)·Σ_{h',w'} g`, `dm` = LayerNorm backward of `γ̇·dz`,
///   `dγ̇ = Σ_n dz·m̂`, `dβ̇ = Σ_n dz`, `dη = Σ dy·x·exp(ρ̂−η)·(1−η)` (lower branch);
/// * `dr_x = Σ_{o∈grp} g·x·r_w[o]`, `dx_pre = x_pre·Σ_{windows ∋ tap} dr_x·(−r_x²/‖P‖)`
///   (a gather over the windows, no atomics); `dr_w = Σ g·x·r_x`,
///   `dW = dr_w·(−r_w²/‖W‖)·W`.
///
/// `ρ̂` is recomputed from the saved f32 `r_w`, `r_x`, `ν` by the same expression as in
/// [`forward`], so every element takes the forward's branch. Parameter gradients are
/// two-stage (per-(n,o) partials, then a fixed-order reduction over `n` per channel).
/// Five or six launches: per-plane sums (4 planes per block), LayerNorm backward, parameter
/// gradients + `dW`, `dx` + per-chunk partials of `dr_x` (channel-split grid), their
/// fixed-order sum into the patch coefficients (only when the split has several chunks;
/// else `dx`'s kernel writes them), `dx_pre` (channel-split grid). The split scratch is
/// bounded (< 4 MiB) and freed before return.
///
/// Errors: as [`forward`], plus a wrong `dy` length ([`Error::LengthMismatch`]) and a
/// `saved` from a different config ([`Error::Shape`]).
///
/// Example: [`forward`]'s runs the forward and this backward on the device.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: DType>(
    stream: &Arc<CudaStream>,
    cfg: &IieuConfig,
    dy: &impl DeviceInput<T>,
    x: &impl DeviceInput<T>,
    x_pre: &impl DeviceInput<T>,
    w: &impl DeviceInput<T>,
    params: &IieuDeviceParams,
    saved: &IieuDeviceSaved,
) -> Result<IieuDeviceGrads<T>> {
    let d = Dims::new(cfg)?;
    check_len("dy", d.x_len, dy.view().len())?;
    check_len("x", d.x_len, x.view().len())?;
    check_len("x_pre", d.x_pre_len, x_pre.view().len())?;
    check_len("w", d.w_len, w.view().len())?;
    params.check(d.o)?;
    check_saved(&d, cfg, saved)?;

    let views = (dy.view(), x.view(), x_pre.view(), w.view());
    backward_core(stream, &d, views, None, params, saved)
}

/// The backward shared with IieuConv2d (every length validated by the caller): `x` is
/// IIEU-B's input, or with `lin` the conv output `c` (see [`finish_forward`]).
pub(crate) fn backward_core<T: DType>(
    stream: &Arc<CudaStream>,
    d: &Dims,
    (dyv, xv, xpv, wv): (
        CudaView<'_, T>,
        CudaView<'_, T>,
        CudaView<'_, T>,
        CudaView<'_, T>,
    ),
    lin: Option<&CudaSlice<f32>>,
    params: &IieuDeviceParams,
    saved: &IieuDeviceSaved,
) -> Result<IieuDeviceGrads<T>> {
    let no = d.n * d.o;
    let s = saved;

    // Stage 1: per-(n,o) [Σg, Σ g·x·r_x, Σ dη-term]. The kernel groups a plane's
    // pixels by 128-bit vectors only from 16-byte aligned x and dy (its scalar path
    // sums in another order, and one over the same groups does not fit its register
    // bound): a misaligned view of a groupable plane is copied to aligned scratch
    // first, so the sums' bits depend on the shape only.
    let grouped = d.plane_out % vec_width::<T>() == 0;
    let dy_own = aligned_copy(stream, &dyv, grouped)?;
    let x_own = aligned_copy(stream, &xv, grouped)?;
    let dy_k = dy_own
        .as_ref()
        .map_or_else(|| dyv.slice(..), |c| c.as_view());
    let x_k = x_own.as_ref().map_or_else(|| xv.slice(..), |c| c.as_view());
    let mut part = scratch::<f32>(stream, 3 * no)?;
    let f = kernel_fn!(stream, "iieu_bwd_sums", T)?;
    let mut b = launcher(stream, &f);
    b.arg(&dy_k)
        .arg(&x_k)
        .arg_opt(lin)
        .arg(&s.r_w)
        .arg(&s.r_x)
        .arg(&s.nu)
        .arg(&params.eta)
        .arg(&mut part)
        .arg(&d.g);
    // A power-of-two block (32..=256 threads): at the kernel's 64–80 registers an SM holds
    // 24–32 warps, which 1, 2, 4 or 8-warp blocks fill evenly (7-warp blocks of a 784-pixel
    // plane left an H100 at 44 % occupancy and 1.9 waves at N = 32, O = 128). Sized by
    // the items the kernel walks: a 14×14 plane in f16 / bf16 (196 % 8 ≠ 0) takes the
    // scalar path, 196 pixels, not 196 / 8 vectors (32-thread blocks there held an A6000
    // at 33 % occupancy, 1.5 waves).
    let mut cfg = per_block(d.sums_rows(), plane_items(d.plane_out, vec_width::<T>()));
    cfg.block_dim.0 = cfg.block_dim.0.next_power_of_two().min(BLOCK);
    // SAFETY: blocks grid-stride over rows (n·G' + grp, chunk of SUMS_CH planes), each
    // plane no = n·O + o < N·O in exactly one row, reading dy/x[no·P .. (no+1)·P)
    // (lengths N·O·P validated), r_x[(n·G'+grp)·P + p] (saved length N·G'·P checked),
    // r_w/eta at o < O, nu at no; writing part[3·no .. 3·no+3) (length 3·N·O).
    unsafe { b.launch(cfg) }?;

    // term-B backward per sample.
    let mut dz = scratch::<f32>(stream, no)?;
    let mut dm = scratch::<f32>(stream, no)?;
    let f = kernel_fn!(stream, "iieu_ln_bwd")?;
    let mut b = launcher(stream, &f);
    b.arg(&part)
        .arg(&s.nu)
        .arg(&params.ln_weight)
        .arg(&s.m_hat)
        .arg(&s.rstd)
        .arg(&mut dz)
        .arg(&mut dm)
        .arg(&d.g);
    // SAFETY: blocks grid-stride over n < N; indices n·O + o < N·O (part ×3, nu, m_hat,
    // dz, dm — every dz/dm entry written), o < O (ln_weight), n < N (rstd).
    unsafe { b.launch(per_block(d.n, d.o)) }?;

    // Stage 2: parameter gradients and dW, one block per filter.
    let mut d_gamma = scratch::<f32>(stream, d.o)?;
    let mut d_beta = scratch::<f32>(stream, d.o)?;
    let mut d_eta = scratch::<f32>(stream, d.o)?;
    let mut dw = scratch::<T>(stream, d.w_len)?;
    let f = kernel_fn!(stream, "iieu_bwd_params", T)?;
    let mut b = launcher(stream, &f);
    b.arg(&wv)
        .arg(&part)
        .arg(&dz)
        .arg(&s.m_hat)
        .arg(&s.r_w)
        .arg(&s.w_norm)
        .arg(&mut d_gamma)
        .arg(&mut d_beta)
        .arg(&mut d_eta)
        .arg(&mut dw)
        .arg(&d.g);
    // SAFETY: blocks grid-stride over o < O; they read n·O + o < N·O (dz, m_hat, part
    // ×3), o < O (r_w, w_norm), w[o·w_per + i] < O·w_per = w.len(); they write
    // d_*[o] (length O) and all of dw[o·w_per .. (o+1)·w_per) (length O·w_per).
    unsafe { b.launch(per_block(d.o, d.n.max(d.g.w_per as usize))) }?;

    // dx and the per-chunk partials of dr_x (channel-split grid), or with one chunk the
    // patch coefficients themselves. Scratch: splits·N·G'·P f32 partials (< 2²⁰ floats
    // when splits > 1, see Split), freed at return.
    let v = vec_width::<T>();
    let sp = d.out_split(v);
    let mut dx = scratch::<T>(stream, d.x_len)?;
    let mut coef_part = scratch::<f32>(stream, sp.splits as usize * d.rx_len)?;
    let f = kernel_fn!(stream, "iieu_bwd_dx", T)?;
    let mut b = launcher(stream, &f);
    b.arg(&dyv)
        .arg(&xv)
        .arg_opt(lin)
        .arg(&s.r_w)
        .arg(&s.r_x)
        .arg(&s.x_norm)
        .arg(&s.nu)
        .arg(&params.eta)
        .arg(&dm)
        .arg(&mut dx)
        .arg(&mut coef_part)
        .arg(&d.g)
        .arg(&sp.chunk)
        .arg(&sp.splits);
    // SAFETY: items (t = n·G' + grp, s, pixel vector) cover every (s, t, pixel): each
    // reads r_x[t·P + p] (and x_norm there if splits = 1) < N·G'·P and writes coef_part[s·N·G'·P + t·P + p] (every
    // partial written); for each o of chunk s of the group's O/G' channels it reads/
    // writes (n·O + o)·P + p < N·O·P (dy, x, dx — together every dx element) and reads
    // o < O, n·O + o; the item count fits i32 (Dims::new).
    unsafe {
        b.launch(elementwise(
            sp.splits as usize * d.ng * plane_items(d.plane_out, v),
            1,
        ))
    }?;

    // The patch-norm coefficients: Σ of the partials times −r_x²/‖P‖ (with one chunk,
    // bwd_dx wrote them).
    let coef = if sp.splits == 1 {
        coef_part
    } else {
        let mut coef = scratch::<f32>(stream, d.rx_len)?;
        let f = kernel_fn!(stream, "iieu_coef_reduce")?;
        let mut b = launcher(stream, &f);
        b.arg(&coef_part)
            .arg(&s.r_x)
            .arg(&s.x_norm)
            .arg(&mut coef)
            .arg(&d.g)
            .arg(&sp.splits);
        // SAFETY: threads cover e < N·G'·P (r_x, x_norm, coef — every coef written) and
        // read coef_part[s·N·G'·P + e] for s < splits (length splits·N·G'·P).
        unsafe { b.launch(elementwise(d.rx_len, 1)) }?;
        coef
    };

    // dx_pre: gather over windows, channel-split grid.
    let sp = d.in_split(v);
    let mut dx_pre = scratch::<T>(stream, d.x_pre_len)?;
    let f = kernel_fn!(stream, "iieu_bwd_dxpre", T)?;
    let mut b = launcher(stream, &f);
    b.arg(&xpv)
        .arg(&coef)
        .arg(&mut dx_pre)
        .arg(&d.g)
        .arg(&sp.chunk)
        .arg(&sp.splits);
    // SAFETY: items (t = n·G' + grp, s, pixel vector) cover every (t, s, pixel); for each
    // channel c of chunk s they read/write (t·c_per + c)·HW + pix < N·C·HW (x_pre,
    // dx_pre — every element written); coef is read at t·P + ho·W' + wo with ho < H',
    // wo < W' checked; the item count fits i32 (Dims::new).
    unsafe {
        b.launch(elementwise(
            sp.splits as usize * d.ng * plane_items(d.plane_in, v),
            1,
        ))
    }?;

    Ok(IieuDeviceGrads {
        dx,
        dx_pre,
        dw,
        d_ln_weight: d_gamma,
        d_ln_bias: d_beta,
        d_eta,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Conv2dGeometry;

    #[test]
    fn dims_of_grouped_and_all_channels() {
        let geo = Conv2dGeometry::new(2, 4, 5, 7, 6, 3, 3)
            .with_groups(2)
            .with_padding(1, 1)
            .with_dilation(2, 1);
        let d = Dims::new(&IieuConfig::new(geo)).unwrap();
        assert_eq!((d.g.gp, d.g.c_per, d.g.o_per, d.g.w_per), (2, 2, 3, 18));
        assert_eq!((d.g.dh, d.g.dw, d.g.mode), (2, 1, 0));
        let d = Dims::new(&IieuConfig::new(geo).with_patch_norm(PatchNorm::AllChannels)).unwrap();
        assert_eq!((d.g.gp, d.g.c_per, d.g.o_per), (1, 4, 6));
        assert_eq!((d.g.dh, d.g.dw, d.g.mode), (1, 1, 1));
        assert_eq!((d.rx_len, d.q_len), (2 * d.plane_out, 2 * 35));
    }

    #[test]
    fn kernel_chunk_constants_match() {
        let cu = include_str!("../../kernels/iieu.cu");
        assert!(cu.contains(&format!("constexpr int FWD_CH = {FWD_CH};")));
        assert!(cu.contains(&format!("constexpr int SUMS_CH = {SUMS_CH};")));
        assert!(cu.contains(&format!("#define IIEU_THREADS {BLOCK}")));
    }

    #[test]
    fn splits_cover_every_channel_and_bound_the_scratch() {
        for per in [1, 2, 7, 8, 9, 20, 64, 512, 2048] {
            for base in [1, 49, 1568, 25_088, 65_535, 65_536, 1 << 20] {
                let s = Split::new(per, base);
                let (chunk, splits) = (s.chunk as usize, s.splits as usize);
                assert!(chunk >= 1 && (1..=SPLIT_MAX).contains(&splits));
                // Every chunk non-empty, together exactly `per` channels.
                assert!((splits - 1) * chunk < per && splits * chunk >= per);
                if splits > 1 {
                    assert!(chunk >= SPLIT_MIN_CHUNK && base < SPLIT_TARGET);
                    assert!(splits * base < 2 * SPLIT_TARGET);
                }
            }
        }
        // ResNet-50's last stage at N = 32 (7×7, C = 2048): ≥ 256 blocks of 256.
        let s = Split::new(2048, 32 * 49);
        assert!(s.splits as usize * 32 * 49 >= 256 * BLOCK as usize);
    }

    #[test]
    fn i32_overflow_is_a_shape_error() {
        let geo = Conv2dGeometry::new(1, 1, 1, 1, 1, 1, 1).with_padding(1 << 31, 0);
        assert!(matches!(
            Dims::new(&IieuConfig::new(geo)),
            Err(Error::Shape { .. })
        ));
    }
}
