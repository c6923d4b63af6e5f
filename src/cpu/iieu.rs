//! IIEU — Instantaneous Importance Estimation Unit, variant IIEU-B (SPEC §1.1–1.4):
//! term-S (norm-decoupled similarity), term-B (adaptive shift) and the adjuster.
//!
//! An IIEU follows a convolution `x = ψ(conv(x_pre, W))`. With `P(n, grp, h', w')`
//! the input patch that filter `o` (of group `grp`) sees at output position
//! `(h', w')`:
//!
//! * term-S: `s = x · r_w[o] · r_x[n, grp(o), h', w']`, with
//!   `r_w[o] = 1/(‖W[o]‖₂ + EPS)` and `r_x = 1/(‖P‖₂ + EPS)`;
//! * term-B: `m[n,o] = GAP(x[n,o])`, `m̂ = LayerNorm_o(m)` (biased variance,
//!   `EPS_LN`), `ν[n,o] = σ(γ̇[o]·m̂[n,o] + β̇[o])`;
//! * adjuster: `ρ̂ = s + ν`; `y = ρ̂·x` if `ρ̂ ≥ η[o]` (ties take this upper branch),
//!   else `y = η[o]·exp(ρ̂ − η[o])·x`.
//!
//! The patch norm is computed the cheap way: `q = Σ_c x_pre²` over the channels of the
//! patch, then a separable KH×KW (dilated, strided, zero-padded) window sum of `q`
//! (row pass then column pass): `O(C·H·W + (KH+KW)·H·W')` per sample, never a full
//! convolution. Its adjoint in [`backward`] is a gather over the windows that contain
//! a tap (no scatter, no atomics).
//!
//! Shapes (NCHW, row-major): `x`, `y`, `dy`: `(N, O, H', W')` with
//! `(H', W') = geometry.validate()?`; `x_pre`: `(N, C, H, W)`; `W`: `(O, C/g, KH, KW)`;
//! `r_x`: `(N, G', H', W')` with `G' = g` for [`PatchNorm::PerGroup`] and `G' = 1`
//! for [`PatchNorm::AllChannels`]; parameters: `(O,)`.
//!
//! Numerics: norms, GAP, LayerNorm statistics and every reduction (dr_x, dr_w, dγ̇,
//! dβ̇, dη, the dx_pre gather) are accumulated in f64; the elementwise adjuster runs in
//! `T`. Parallel work is split over (sample, patch group) and (sample, channel)
//! planes in the forward and over samples in the backward; parameter gradients are
//! per-task partials summed in task order, so every result has the same bits on every
//! run and for every thread count.
//!
//! Speed: the element loops are branch-free per block (both adjuster branches
//! evaluated, then selected; a block all on the upper branch skips the `exp`), use the
//! vectorisable [`Real::exp_fast`] (≤ 2 ulp for f32), keep their f64 sums in 32 fixed
//! lanes, and run in AVX2 / AVX-512 copies chosen at run time (bit-identical to the
//! baseline SSE2 build, see `fastmath::simd_fn`). The streaming reads (`x_pre` in the
//! patch norms and the `dx_pre` pass, `x` in the GAP, `x` and `dy` in the backward
//! adjuster) are prefetched 16 KB ahead. The forward handles one sample per task
//! (patch norms, GAP, adjuster while `x[n]` is in cache); the backward too, adding the
//! term-B `dm/(H'·W')` into that sample's `dx` while it is still in cache (no extra
//! pass over `dx`).

use rayon::prelude::*;

use crate::cpu::common::{fit, layer_norm_bwd, layer_norm_fwd, sigmoid};
use crate::error::{check_len, Error, Result};
use crate::fastmath::{prefetch_ahead, simd_fn};
use crate::geometry::Conv2dGeometry;
use crate::real::Real;

/// `eps` of the inverse norms: `r = 1/(‖v‖₂ + EPS)` (SPEC §1).
pub const EPS: f64 = 1e-8;
/// `eps` of the term-B LayerNorm: `m̂ = (m − μ)/sqrt(var + EPS_LN)` (SPEC §1.2).
pub const EPS_LN: f64 = 1e-6;

/// Which input channels and taps the patch norm `‖P‖` of term-S covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PatchNorm {
    /// The definition (default): the patch filter `o` really sees — the `C/g` channels
    /// of `o`'s group, taps `(h'·sh − ph + i·dh, w'·sw − pw + j·dw)`, zeros outside the
    /// image. `r_x` has one plane per group: `(N, g, H', W')`. With `x = conv(x_pre, W)`
    /// this makes `s` the exact cosine between `W[o]` and the patch, so `|s| ≤ 1`.
    #[default]
    PerGroup,
    /// Reference-code compatible: the authors' code (avg-pool of `Σ_c x_pre²`) takes the
    /// norm over ALL `C` input channels even for grouped/depthwise convs, and ignores
    /// dilation. We evaluate it on the conv's own output grid `(H', W')` with the conv's
    /// stride and padding but undilated taps `(h'·sh − ph + i, w'·sw − pw + j)`, zeros
    /// outside the image (avg-pool with `count_include_pad`). For dilation 1 this is
    /// exactly the authors' window; for dilation > 1 their avg-pool grid would not even
    /// match the conv output size, so this (documented) choice keeps the op defined.
    /// Caveat for dilation > 1: the undilated window covers different pixels than the
    /// conv's, and can even lie entirely in the padding while the conv window does not
    /// (then `r_x = 1/EPS` and `s = x·r_w/EPS` is huge); prefer `PerGroup` there.
    /// `r_x` has a single plane per sample: `(N, 1, H', W')`. The authors' eps scaling
    /// (`eps` multiplied by `KH·KW`, SPEC §1.1) is not copied: `r_x = 1/(‖P‖ + EPS)`.
    AllChannels,
}

/// Configuration of one IIEU: the geometry of the convolution it follows and the
/// patch-norm convention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IieuConfig {
    /// The conv `x = conv(x_pre, W)` (stride, padding, dilation, groups, shapes).
    pub geometry: Conv2dGeometry,
    /// Patch-norm convention (default [`PatchNorm::PerGroup`]).
    pub patch_norm: PatchNorm,
}

/// Convolution settings an IIEU-B needs besides the tensor dims: the conv's stride,
/// padding, dilation and groups (they define the patch each output sees) and the
/// patch-norm convention — what the candle and burn ops take (`candle::ops::IieuOpts`,
/// `burn::ops::IieuOpts` are this type); [`IieuOpts::config`] makes the full
/// [`IieuConfig`] once the tensor dims are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IieuOpts {
    /// Stride (vertical, horizontal).
    pub stride: (usize, usize),
    /// Zero padding (vertical, horizontal).
    pub padding: (usize, usize),
    /// Dilation (vertical, horizontal).
    pub dilation: (usize, usize),
    /// Groups.
    pub groups: usize,
    /// Patch-norm convention (default [`PatchNorm::PerGroup`]).
    pub patch_norm: PatchNorm,
}

impl Default for IieuOpts {
    fn default() -> Self {
        Self {
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
            groups: 1,
            patch_norm: PatchNorm::PerGroup,
        }
    }
}

impl IieuOpts {
    /// The [`IieuConfig`] of a conv on `x_pre` of dims `(n, c_in, h, w)` with a weight of
    /// dims `(c_out, c_in / groups, kh, kw)` under these settings (not validated here:
    /// the ops validate it).
    #[allow(clippy::too_many_arguments)]
    pub fn config(
        &self,
        n: usize,
        c_in: usize,
        h: usize,
        w: usize,
        c_out: usize,
        kh: usize,
        kw: usize,
    ) -> IieuConfig {
        let mut geo = Conv2dGeometry::new(n, c_in, h, w, c_out, kh, kw);
        geo.stride = self.stride;
        geo.padding = self.padding;
        geo.dilation = self.dilation;
        geo.groups = self.groups;
        IieuConfig::new(geo).with_patch_norm(self.patch_norm)
    }
}

impl IieuConfig {
    /// Config with the default [`PatchNorm::PerGroup`].
    pub fn new(geometry: Conv2dGeometry) -> Self {
        Self {
            geometry,
            patch_norm: PatchNorm::PerGroup,
        }
    }

    /// Builder: patch-norm convention.
    pub fn with_patch_norm(mut self, patch_norm: PatchNorm) -> Self {
        self.patch_norm = patch_norm;
        self
    }

    /// Number `G'` of patch-norm planes per sample: `groups` for
    /// [`PatchNorm::PerGroup`], 1 for [`PatchNorm::AllChannels`].
    pub fn patch_groups(&self) -> usize {
        match self.patch_norm {
            PatchNorm::PerGroup => self.geometry.groups,
            PatchNorm::AllChannels => 1,
        }
    }

    /// Validates the geometry and returns the output size `(H', W')`.
    pub fn validate(&self) -> Result<(usize, usize)> {
        self.geometry.validate()
    }
}

/// Learnable per-channel parameters of an IIEU, each of length `O`.
#[derive(Debug, Clone, PartialEq)]
pub struct IieuParams<T> {
    /// term-B LayerNorm weight `γ̇[o]` (init 0.01).
    pub ln_weight: Vec<T>,
    /// term-B LayerNorm bias `β̇[o]` (init 0).
    pub ln_bias: Vec<T>,
    /// Adjuster threshold `η[o]` (init 0.05).
    pub eta: Vec<T>,
}

impl<T: Real> IieuParams<T> {
    /// The SPEC initialisation for `c_out` channels: `γ̇ = 0.01`, `β̇ = 0`, `η = 0.05`.
    pub fn init(c_out: usize) -> Self {
        Self {
            ln_weight: vec![T::of(0.01); c_out],
            ln_bias: vec![T::zero(); c_out],
            eta: vec![T::of(0.05); c_out],
        }
    }

    pub(crate) fn check(&self, c_out: usize) -> Result<()> {
        check_len("ln_weight", c_out, self.ln_weight.len())?;
        check_len("ln_bias", c_out, self.ln_bias.len())?;
        check_len("eta", c_out, self.eta.len())
    }
}

/// What [`forward`] saves for [`backward`]: the inverse norms (and the norms, in f64)
/// and the term-B statistics. Tied to the config it was produced with.
#[derive(Debug, Clone)]
pub struct IieuSaved<T> {
    cfg: IieuConfig,
    r_w: Vec<T>,
    w_norm: Vec<f64>,
    r_x: Vec<T>,
    x_norm: Vec<f64>,
    nu: Vec<f64>,
    m_hat: Vec<f64>,
    rstd: Vec<f64>,
}

impl<T: Real> IieuSaved<T> {
    /// Assembles the state from its parts (for fused ops that compute the norms and
    /// term-B statistics themselves, e.g. `cpu::iieu_conv`). Lengths: `r_w`, `w_norm`
    /// `(O,)`; `r_x`, `x_norm` `(N, G', H', W')`; `nu`, `m_hat` `(N, O)`; `rstd` `(N,)`
    /// — [`backward`] checks them against the config.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        cfg: IieuConfig,
        r_w: Vec<T>,
        w_norm: Vec<f64>,
        r_x: Vec<T>,
        x_norm: Vec<f64>,
        nu: Vec<f64>,
        m_hat: Vec<f64>,
        rstd: Vec<f64>,
    ) -> Self {
        Self {
            cfg,
            r_w,
            w_norm,
            r_x,
            x_norm,
            nu,
            m_hat,
            rstd,
        }
    }
    /// The config the state was computed for.
    pub fn config(&self) -> &IieuConfig {
        &self.cfg
    }
    /// Filter inverse norms `r_w`, `(O,)`.
    pub fn r_w(&self) -> &[T] {
        &self.r_w
    }
    /// Patch inverse norms `r_x`, `(N, G', H', W')` (see [`IieuConfig::patch_groups`]).
    pub fn r_x(&self) -> &[T] {
        &self.r_x
    }
    /// term-B shift `ν[n, o] = σ(γ̇·m̂ + β̇)`, `(N, O)`, in f64.
    pub fn nu(&self) -> &[f64] {
        &self.nu
    }
    /// LayerNorm-ed GAP `m̂[n, o]`, `(N, O)`, in f64.
    pub fn m_hat(&self) -> &[f64] {
        &self.m_hat
    }
}

/// Gradients of every input and parameter of an IIEU, each with its input's shape.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct IieuGrads<T> {
    /// `∂L/∂x`, `(N, O, H', W')`.
    pub dx: Vec<T>,
    /// `∂L/∂x_pre`, `(N, C, H, W)` (through `r_x`).
    pub dx_pre: Vec<T>,
    /// `∂L/∂W`, `(O, C/g, KH, KW)` (through `r_w`).
    pub dw: Vec<T>,
    /// `∂L/∂γ̇`, `(O,)`.
    pub d_ln_weight: Vec<T>,
    /// `∂L/∂β̇`, `(O,)`.
    pub d_ln_bias: Vec<T>,
    /// `∂L/∂η`, `(O,)`.
    pub d_eta: Vec<T>,
}

// ------------------------------------------------------------------------------------
// Internal geometry

/// Tap tables of one spatial axis of the patch window.
struct Axis {
    /// Window size K (taps).
    k: usize,
    /// `fwd[o·k + i]`: input index of tap `i` of output `o`, or `NONE` (padding).
    fwd: Vec<usize>,
    /// `adj[h·k + i]`: output index whose tap `i` lands on input `h`, or `NONE`.
    adj: Vec<usize>,
}

const NONE: usize = usize::MAX;

impl Axis {
    fn new(inp: usize, out: usize, k: usize, s: usize, p: usize, d: usize) -> Self {
        let mut fwd = vec![NONE; out * k];
        for o in 0..out {
            for i in 0..k {
                // o·s + i·d ≤ (in + 2p − span) + span − 1: fits (validated geometry).
                let t = o * s + i * d;
                if t >= p && t - p < inp {
                    fwd[o * k + i] = t - p;
                }
            }
        }
        let mut adj = vec![NONE; inp * k];
        for h in 0..inp {
            for i in 0..k {
                let t = h + p;
                if t >= i * d {
                    let u = t - i * d;
                    if u % s == 0 && u / s < out {
                        adj[h * k + i] = u / s;
                    }
                }
            }
        }
        Self { k, fwd, adj }
    }

    /// Whether every output reads exactly the input at its own index (a 1-tap window
    /// with stride 1 and no padding, as in a 1×1 convolution).
    fn is_identity(&self, inp: usize) -> bool {
        self.k == 1 && self.fwd.len() == inp && self.fwd.iter().enumerate().all(|(i, &t)| t == i)
    }
}

/// Everything derived from a validated config.
struct Dims {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    oh: usize,
    ow: usize,
    /// Patch-norm planes per sample G'.
    gp: usize,
    /// Input channels per patch plane, C/G'.
    c_per: usize,
    /// Output channels per patch plane, O/G'.
    o_per: usize,
    /// Weight entries per filter, C/g·KH·KW.
    w_per: usize,
    ax_h: Axis,
    ax_w: Axis,
    /// The patch window is one tap at its own position (1×1, stride 1, no padding):
    /// the window sum and the window gather are the identity.
    identity_window: bool,
}

impl Dims {
    fn new(cfg: &IieuConfig) -> Result<Self> {
        let (oh, ow) = cfg.validate()?;
        let g = &cfg.geometry;
        let gp = cfg.patch_groups();
        let (dh, dw) = match cfg.patch_norm {
            PatchNorm::PerGroup => g.dilation,
            PatchNorm::AllChannels => (1, 1),
        };
        let ax_h = Axis::new(g.h, oh, g.kh, g.stride.0, g.padding.0, dh);
        let ax_w = Axis::new(g.w, ow, g.kw, g.stride.1, g.padding.1, dw);
        let identity_window = ax_h.is_identity(g.h) && ax_w.is_identity(g.w);
        Ok(Self {
            n: g.n,
            c: g.c_in,
            h: g.h,
            w: g.w,
            o: g.c_out,
            oh,
            ow,
            gp,
            c_per: g.c_in / gp,
            o_per: g.c_out / gp,
            w_per: g.cin_per_group() * g.kh * g.kw,
            ax_h,
            ax_w,
            identity_window,
        })
    }
    fn plane_out(&self) -> usize {
        self.oh * self.ow
    }
    fn plane_in(&self) -> usize {
        self.h * self.w
    }
    fn x_len(&self) -> usize {
        self.n * self.o * self.plane_out()
    }
    fn x_pre_len(&self) -> usize {
        self.n * self.c * self.plane_in()
    }
    fn w_len(&self) -> usize {
        self.o * self.w_per
    }
    fn rx_len(&self) -> usize {
        self.n * self.gp * self.plane_out()
    }

    /// Window sum of the `(H, W)` plane `q` into the `(H', W')` plane `out`
    /// (separable: row pass into `tmp` `(H, W')`, then column pass).
    fn window_sum(&self, q: &[f64], tmp: &mut [f64], out: &mut [f64]) {
        let (kh, kw, ow) = (self.ax_h.k, self.ax_w.k, self.ow);
        for (qrow, trow) in q.chunks_exact(self.w).zip(tmp.chunks_exact_mut(ow)) {
            for (wo, t) in trow.iter_mut().enumerate() {
                *t = self.ax_w.fwd[wo * kw..(wo + 1) * kw]
                    .iter()
                    .filter(|&&wi| wi != NONE)
                    .map(|&wi| qrow[wi])
                    .sum();
            }
        }
        for (ho, orow) in out.chunks_exact_mut(ow).enumerate() {
            orow.fill(0.0);
            for &hi in &self.ax_h.fwd[ho * kh..(ho + 1) * kh] {
                if hi != NONE {
                    for (o, t) in orow.iter_mut().zip(&tmp[hi * ow..(hi + 1) * ow]) {
                        *o += t;
                    }
                }
            }
        }
    }

    /// Adjoint of [`Dims::window_sum`] as a gather: `out[h, w] = Σ a[h', w']` over the
    /// windows `(h', w')` one of whose taps is `(h, w)`; `tmp` is `(H, W')`.
    fn window_gather(&self, a: &[f64], tmp: &mut [f64], out: &mut [f64]) {
        let (kh, kw, ow) = (self.ax_h.k, self.ax_w.k, self.ow);
        for (hi, trow) in tmp.chunks_exact_mut(ow).enumerate() {
            trow.fill(0.0);
            for &ho in &self.ax_h.adj[hi * kh..(hi + 1) * kh] {
                if ho != NONE {
                    for (t, v) in trow.iter_mut().zip(&a[ho * ow..(ho + 1) * ow]) {
                        *t += v;
                    }
                }
            }
        }
        for (trow, orow) in tmp.chunks_exact(ow).zip(out.chunks_exact_mut(self.w)) {
            for (wi, o) in orow.iter_mut().enumerate() {
                *o = self.ax_w.adj[wi * kw..(wi + 1) * kw]
                    .iter()
                    .filter(|&&wo| wo != NONE)
                    .map(|&wo| trow[wo])
                    .sum();
            }
        }
    }
}

#[inline(always)]
fn inv_norm(norm: f64) -> f64 {
    1.0 / (norm + EPS)
}

/// `∂r/∂(‖v‖²)·2 = −r²/‖v‖` (the factor multiplying `v` in `∂r/∂v`), 0 where `‖v‖ = 0`.
#[inline(always)]
fn inv_norm_slope(norm: f64) -> f64 {
    if norm > 0.0 {
        let r = inv_norm(norm);
        -r * r / norm
    } else {
        0.0
    }
}

/// The adjuster input `ρ̂ = x·r_w·r_x + ν`, evaluated identically in forward and backward.
#[inline(always)]
fn rho<T: Real>(x: T, rw: T, rx: T, nu: T) -> T {
    x * rw * rx + nu
}

/// Lanes of the in-plane f64 sums: lane = position mod `LANES`, lanes combined in
/// order, so sums are deterministic and the loops vectorise. 32 f64 lanes are four
/// AVX-512 (eight AVX2) accumulators: with one, the sum was bound by the latency of
/// its chain of additions rather than by memory.
const LANES: usize = 32;

/// `Σ f(v)` over `all[start..start + len]` in f64 (fixed lanes): lane = position mod
/// `LANES` counted from `start`, the last `len mod LANES` elements in lane 0, lanes
/// combined in order, so the sum is deterministic and the loop vectorises. Prefetches
/// [`AHEAD`](crate::fastmath::AHEAD) bytes ahead within `all`, so a sweep over consecutive planes keeps
/// reading ahead across plane boundaries.
#[inline(always)]
fn lane_fold<T: Real>(all: &[T], start: usize, len: usize, f: impl Fn(f64) -> f64) -> f64 {
    let v = &all[start..start + len];
    let mut l = [0.0f64; LANES];
    let c = v.chunks_exact(LANES);
    let r = c.remainder();
    for (k, b) in c.enumerate() {
        prefetch_ahead(all, start + k * LANES, LANES);
        for j in 0..LANES {
            l[j] += f(b[j].to_f64());
        }
    }
    for &a in r {
        l[0] += f(a.to_f64());
    }
    l.iter().sum()
}

/// `Σ v` over the plane `all[start..start + len]` in f64 (fixed lanes).
#[inline(always)]
fn plane_sum_impl<T: Real>(all: &[T], start: usize, len: usize) -> f64 {
    lane_fold(all, start, len, |a| a)
}

/// `Σ v²` over a slice in f64 (fixed lanes).
#[inline(always)]
fn lane_sum_sq_impl<T: Real>(v: &[T]) -> f64 {
    lane_fold(v, 0, v.len(), |a| a * a)
}

/// Elements per branch decision of the backward adjuster (a chunk whose `ρ̂` are all
/// on the upper branch skips the `exp`; any other chunk runs the branch-free loop)
/// and per prefetch step of [`sum_sq_impl`]. A multiple of [`LANES`] and of [`SUB`];
/// long enough for the loops to vectorise as loops.
const CHUNK: usize = 64;

/// `true` if any `ρ̂ = x·r_w·r_x + ν` of the chunk takes the lower (exponential)
/// branch, i.e. is not `≥ η` (NaN counts as lower, as in the branch-free select).
#[inline(always)]
// `!(v >= eta)` on purpose: NaN must count as lower, exactly like the select.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn any_lower<T: Real>(xc: &[T], rc: &[T], rw: T, nu: T, eta: T) -> bool {
    xc.iter()
        .zip(rc)
        .fold(false, |a, (&x, &r)| a | !(rho(x, rw, r, nu) >= eta))
}

/// `ς(ρ̂)·x`, both branches evaluated, then selected on `ρ̂ ≥ η`. The `exp` is
/// [`Real::exp_nonpos`]: the lower branch only keeps lanes with `ρ̂ − η < 0`, where it
/// has the same bits as `exp_fast`.
#[inline(always)]
fn adjust_full<T: Real>(xv: T, rxv: T, rw: T, nu: T, eta: T) -> T {
    let r = rho(xv, rw, rxv, nu);
    let lo = eta * (r - eta).exp_nonpos() * xv;
    if r >= eta {
        r * xv
    } else {
        lo
    }
}

/// Elements per branch decision of the forward adjuster: one AVX-512 vector of f32.
const SUB: usize = 16;

/// The adjuster `ς(ρ̂)·x` over one plane, in blocks of [`SUB`]: `ρ̂` of the block is
/// computed once; a block all on the upper branch writes `ρ̂·x`, any other block (and
/// the tail) evaluates both branches branch-free and selects. Both paths give the
/// same bits as the elementwise definition ([`adjust_full`]), so [`backward`] sees the
/// same branches. No prefetching here: `x` was just read by the GAP and comes from
/// L2/L3 (prefetching it across planes measured no different).
#[inline(always)]
fn adjust_plane_impl<T: Real>(xp: &[T], rx: &[T], yp: &mut [T], rw: T, nu: T, eta: T) {
    let n = xp.len();
    let (rx, yp) = (&rx[..n], &mut yp[..n]);
    let mut xb = xp.chunks_exact(SUB);
    let mut rb = rx.chunks_exact(SUB);
    let mut yb = yp.chunks_exact_mut(SUB);
    for ((xc, rc), yc) in (&mut xb).zip(&mut rb).zip(&mut yb) {
        // `chunks_exact` slices are `SUB` long: the conversions cannot fail.
        let (Ok(xa), Ok(ra), Ok(ya)) = (
            <&[T; SUB]>::try_from(xc),
            <&[T; SUB]>::try_from(rc),
            <&mut [T; SUB]>::try_from(yc),
        ) else {
            continue;
        };
        let mut r = [T::zero(); SUB];
        let mut lower = false;
        for j in 0..SUB {
            r[j] = rho(xa[j], rw, ra[j], nu);
            // `!(ρ̂ >= η)` on purpose: NaN must count as lower, as in `adjust_full`.
            #[allow(clippy::neg_cmp_op_on_partial_ord)]
            let lo = !(r[j] >= eta);
            lower |= lo;
        }
        if lower {
            for j in 0..SUB {
                let lo = eta * (r[j] - eta).exp_nonpos() * xa[j];
                ya[j] = if r[j] >= eta { r[j] * xa[j] } else { lo };
            }
        } else {
            for j in 0..SUB {
                ya[j] = r[j] * xa[j];
            }
        }
    }
    let tail = yb
        .into_remainder()
        .iter_mut()
        .zip(xb.remainder())
        .zip(rb.remainder());
    for ((y, &xv), &rxv) in tail {
        *y = adjust_full(xv, rxv, rw, nu, eta);
    }
}

/// Backward of [`adjust_plane_impl`] for one plane: writes `dx = dy·ς(ρ̂) + g·r_w·r_x`
/// (`g = dy·∂y/∂ρ̂`), adds `g·x·r_w` into `drx`, and returns the plane sums
/// `[Σ g, Σ g·x·r_x, Σ dη-terms]` (f64; element `i` goes to lane `i mod LANES`, the
/// last `n mod LANES` elements to lane 0; lanes combined in order). Per chunk of
/// [`CHUNK`]: the element math runs as one vectorisable loop into small buffers (the
/// `exp` skipped when the whole chunk is on the upper branch), then the f64
/// accumulation runs as a second loop. Same bits on either path.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn adjust_plane_bwd_impl<T: Real>(
    xs: &[T],
    dys: &[T],
    rx: &[T],
    dxp: &mut [T],
    drx: &mut [f64],
    rw: T,
    nu: T,
    eta: T,
) -> [f64; 3] {
    let one_m_eta = T::one() - eta;
    let zero = T::zero();
    let n = dxp.len();
    let (xp, dyp, rx, drx) = (&xs[..n], &dys[..n], &rx[..n], &mut drx[..n]);
    let mut acc = [[0.0f64; LANES]; 3];
    // Products in T, sums in f64 (as the other families do). Returns
    // (dx, g, g·x·r_w, g·x·r_x, dη-term).
    let full = |xv: T, dyv: T, rxv: T| {
        let r = rho(xv, rw, rxv, nu);
        let ex = (r - eta).exp_nonpos();
        let e = eta * ex;
        let up = r >= eta;
        let sc = if up { r } else { e };
        let dydr = if up { xv } else { e * xv };
        let te = if up { zero } else { dyv * xv * ex * one_m_eta };
        let g = dyv * dydr;
        let dx = dyv * sc + g * rw * rxv;
        let gx = g * xv;
        (dx, g, gx * rw, gx * rxv, te)
    };
    let main = n - n % CHUNK;
    let (mut gb, mut wb, mut rb, mut tb) =
        ([zero; CHUNK], [zero; CHUNK], [zero; CHUNK], [zero; CHUNK]);
    let chunks = xp[..main]
        .chunks_exact(CHUNK)
        .zip(dyp.chunks_exact(CHUNK))
        .zip(rx.chunks_exact(CHUNK))
        .zip(dxp.chunks_exact_mut(CHUNK))
        .zip(drx.chunks_exact_mut(CHUNK));
    for (k, ((((xc, dc), rc), oc), ac)) in chunks.enumerate() {
        prefetch_ahead(xs, k * CHUNK, CHUNK);
        prefetch_ahead(dys, k * CHUNK, CHUNK);
        let lower = any_lower(xc, rc, rw, nu, eta);
        let bufs = gb.iter_mut().zip(wb.iter_mut()).zip(rb.iter_mut());
        let elems = oc.iter_mut().zip(xc).zip(dc).zip(rc);
        if lower {
            for ((((o, &xv), &dyv), &rxv), (((g, w), r), t)) in elems.zip(bufs.zip(tb.iter_mut())) {
                let (dx, gv, gxw, grx, te) = full(xv, dyv, rxv);
                *o = dx;
                *g = gv;
                *w = gxw;
                *r = grx;
                *t = te;
            }
        } else {
            for ((((o, &xv), &dyv), &rxv), ((g, w), r)) in elems.zip(bufs) {
                let rr = rho(xv, rw, rxv, nu);
                let gv = dyv * xv;
                *o = dyv * rr + gv * rw * rxv;
                let gx = gv * xv;
                *g = gv;
                *w = gx * rw;
                *r = gx * rxv;
            }
        }
        for (a, &w) in ac.iter_mut().zip(&wb) {
            *a += w.to_f64();
        }
        for (gk, rk) in gb.chunks_exact(LANES).zip(rb.chunks_exact(LANES)) {
            for j in 0..LANES {
                acc[0][j] += gk[j].to_f64();
                acc[1][j] += rk[j].to_f64();
            }
        }
        if lower {
            for tk in tb.chunks_exact(LANES) {
                for j in 0..LANES {
                    acc[2][j] += tk[j].to_f64();
                }
            }
        }
    }
    let lane_end = n - n % LANES;
    for i in main..n {
        let (dx, g, gxw, grx, te) = full(xp[i], dyp[i], rx[i]);
        let lane = if i < lane_end { i % LANES } else { 0 };
        dxp[i] = dx;
        drx[i] += gxw.to_f64();
        acc[0][lane] += g.to_f64();
        acc[1][lane] += grx.to_f64();
        acc[2][lane] += te.to_f64();
    }
    std::array::from_fn(|k| acc[k].iter().sum())
}

simd_fn! {
    /// [`plane_sum_impl`], runtime-dispatched to AVX2 / AVX-512 where available.
    fn plane_sum<T: Real>(all: &[T], start: usize, len: usize) -> f64 => plane_sum_impl;
}

simd_fn! {
    /// [`adjust_plane_impl`], runtime-dispatched to AVX2 where available.
    pub(crate) fn adjust_plane<T: Real>(xp: &[T], rx: &[T], yp: &mut [T], rw: T, nu: T, eta: T)
        => adjust_plane_impl;
}

simd_fn! {
    /// [`adjust_plane_bwd_impl`], runtime-dispatched to AVX2 where available.
    fn adjust_plane_bwd<T: Real>(
        xs: &[T], dys: &[T], rx: &[T], dxp: &mut [T], drx: &mut [f64], rw: T, nu: T, eta: T,
    ) -> [f64; 3] => adjust_plane_bwd_impl;
}

/// `q += v²` (in f64) over the `pi`-long channel planes of `xs`, one channel plane
/// per sweep of `q` (channels added in order), in blocks of [`CHUNK`] that prefetch
/// [`AHEAD`](crate::fastmath::AHEAD) bytes ahead within `xs`. Squares of f32 are exact in f64; the order of
/// the additions is fixed.
#[inline(always)]
fn sum_sq_impl<T: Real>(xs: &[T], q: &mut [f64]) {
    let pi = q.len();
    let sq = |v: T| v.to_f64() * v.to_f64();
    for (c, plane) in xs.chunks_exact(pi).enumerate() {
        let mut qb = q.chunks_exact_mut(CHUNK);
        let mut pb = plane.chunks_exact(CHUNK);
        for (k, (qa, pa)) in (&mut qb).zip(&mut pb).enumerate() {
            prefetch_ahead(xs, c * pi + k * CHUNK, CHUNK);
            for (acc, &v) in qa.iter_mut().zip(pa) {
                *acc += sq(v);
            }
        }
        for (acc, &v) in qb.into_remainder().iter_mut().zip(pb.remainder()) {
            *acc += sq(v);
        }
    }
}

/// `out[c, i] = x[c, i]·a[i]` over the `a.len()`-long channel planes, prefetching `x`
/// [`AHEAD`](crate::fastmath::AHEAD) bytes ahead across the planes.
#[inline(always)]
fn scale_planes_impl<T: Real>(out: &mut [T], x: &[T], a: &[f64]) {
    for (c, (dch, xch)) in out
        .chunks_exact_mut(a.len())
        .zip(x.chunks_exact(a.len()))
        .enumerate()
    {
        let mut ob = dch.chunks_exact_mut(CHUNK);
        let mut xb = xch.chunks_exact(CHUNK);
        let mut ab = a.chunks_exact(CHUNK);
        for (k, ((oc, xc), ac)) in (&mut ob).zip(&mut xb).zip(&mut ab).enumerate() {
            prefetch_ahead(x, c * a.len() + k * CHUNK, CHUNK);
            for ((g, &xv), &a) in oc.iter_mut().zip(xc).zip(ac) {
                *g = T::of(xv.to_f64() * a);
            }
        }
        let tail = ob
            .into_remainder()
            .iter_mut()
            .zip(xb.remainder())
            .zip(ab.remainder());
        for ((g, &xv), &a) in tail {
            *g = T::of(xv.to_f64() * a);
        }
    }
}

/// `v[o·po + p] += T(add[o]/po)`: the term-B share of `dx`, broadcast over each plane.
#[inline(always)]
fn add_per_plane_impl<T: Real>(v: &mut [T], add: &[f64], po: usize) {
    for (p, &a) in v.chunks_exact_mut(po).zip(add) {
        let a = T::of(a / po as f64);
        p.iter_mut().for_each(|x| *x = *x + a);
    }
}

simd_fn! {
    /// [`add_per_plane_impl`], runtime-dispatched to AVX2 where available.
    fn add_per_plane<T: Real>(v: &mut [T], add: &[f64], po: usize) => add_per_plane_impl;
}

simd_fn! {
    /// [`sum_sq_impl`], runtime-dispatched to AVX2 where available.
    fn sum_sq<T: Real>(xs: &[T], q: &mut [f64]) => sum_sq_impl;
}

simd_fn! {
    /// [`scale_planes_impl`], runtime-dispatched to AVX2 where available.
    fn scale_planes<T: Real>(out: &mut [T], x: &[T], a: &[f64]) => scale_planes_impl;
}

/// `out[i] = T(k·x[i])` (the conversion to f64 is exact, one rounding at the end).
#[inline(always)]
fn scale_into_impl<T: Real>(out: &mut [T], x: &[T], k: f64) {
    for (g, &v) in out.iter_mut().zip(x) {
        *g = T::of(k * v.to_f64());
    }
}

simd_fn! {
    /// [`lane_sum_sq_impl`], runtime-dispatched to AVX2 / AVX-512 where available.
    fn lane_sum_sq<T: Real>(v: &[T]) -> f64 => lane_sum_sq_impl;
}

simd_fn! {
    /// [`scale_into_impl`], runtime-dispatched to AVX2 / AVX-512 where available.
    fn scale_into<T: Real>(out: &mut [T], x: &[T], k: f64) => scale_into_impl;
}

/// `(r_w, ‖W[o]‖)` per filter. The sum of squares runs in fixed f64 lanes (a plain
/// sequential f64 sum does not vectorise: at C = 2048, 3×3, W is 151 MB and that
/// sum alone took 16 ms).
fn filter_norms<T: Real>(d: &Dims, w: &[T]) -> (Vec<T>, Vec<f64>) {
    let norms: Vec<f64> = w
        .par_chunks(d.w_per)
        .map(|f| lane_sum_sq(f).sqrt())
        .collect();
    let r = norms.iter().map(|&nm| T::of(inv_norm(nm))).collect();
    (r, norms)
}

/// Patch norms of one (sample, patch group): `q = Σ_c x_pre²` over the group's
/// `C/G'` channel planes `xg`, its window sum, then `‖P‖` into `xn` and `r_x` into `rx`.
fn patch_norm_plane<T: Real>(d: &Dims, xg: &[T], xn: &mut [f64], rx: &mut [T]) {
    if d.identity_window {
        // 1-tap window, stride 1, no padding: the window sum of `q` is `q` itself.
        xn.fill(0.0);
        sum_sq(xg, xn);
    } else {
        let mut q = vec![0.0f64; d.plane_in()];
        let mut tmp = vec![0.0f64; d.h * d.ow];
        sum_sq(xg, &mut q);
        d.window_sum(&q, &mut tmp, xn);
    }
    norms_from_sq(xn, rx);
}

/// `‖P‖ = sqrt(max(q, 0))` in place in `xn` and `r_x = 1/(‖P‖ + EPS)` into `rx`. A NaN
/// `q` stays NaN (`f64::max` would return 0 for it: a NaN in `x_pre` would become a zero
/// norm, `r_x = 1/EPS`, instead of propagating as SPEC §4 requires).
#[inline(always)]
fn norms_from_sq_impl<T: Real>(xn: &mut [f64], rx: &mut [T]) {
    for (v, r) in xn.iter_mut().zip(rx.iter_mut()) {
        *v = if *v < 0.0 { 0.0 } else { v.sqrt() };
        *r = T::of(inv_norm(*v));
    }
}

simd_fn! {
    /// [`norms_from_sq_impl`], runtime-dispatched to AVX2 / AVX-512 where available
    /// (IEEE `sqrt` and division: the same bits at every width).
    fn norms_from_sq<T: Real>(xn: &mut [f64], rx: &mut [T]) => norms_from_sq_impl;
}

/// `r_x` per (sample, patch group, output position).
fn patch_norms<T: Real>(d: &Dims, x_pre: &[T]) -> Vec<T> {
    let po = d.plane_out();
    let mut norms = vec![0.0f64; d.rx_len()];
    let mut r = vec![T::zero(); d.rx_len()];
    norms
        .par_chunks_mut(po)
        .zip(r.par_chunks_mut(po))
        .zip(x_pre.par_chunks(d.c_per * d.plane_in()))
        .for_each(|((xn, rx), xg)| patch_norm_plane(d, xg, xn, rx));
    r
}

/// `(r_w, ‖W[o]‖)` of a validated config and a `w` of the right length (for fused ops).
pub(crate) fn filter_norms_checked<T: Real>(
    cfg: &IieuConfig,
    w: &[T],
) -> Result<(Vec<T>, Vec<f64>)> {
    let d = Dims::new(cfg)?;
    check_len("w", d.w_len(), w.len())?;
    Ok(filter_norms(&d, w))
}

/// `(r_x, ‖P‖)`, `(N, G', H', W')` each, by the cheap `q` window-sum path (for fused
/// ops that cannot read the patch from their im2col tiles).
pub(crate) fn patch_norms_checked<T: Real>(
    cfg: &IieuConfig,
    x_pre: &[T],
) -> Result<(Vec<T>, Vec<f64>)> {
    let d = Dims::new(cfg)?;
    check_len("x_pre", d.x_pre_len(), x_pre.len())?;
    let po = d.plane_out();
    let mut norms = vec![0.0f64; d.rx_len()];
    let mut r = vec![T::zero(); d.rx_len()];
    norms
        .par_chunks_mut(po)
        .zip(r.par_chunks_mut(po))
        .zip(x_pre.par_chunks(d.c_per * d.plane_in()))
        .for_each(|((xn, rx), xg)| patch_norm_plane(&d, xg, xn, rx));
    Ok((r, norms))
}

// ------------------------------------------------------------------------------------
// Public API

/// Filter inverse norms `r_w[o] = 1/(‖W[o]‖₂ + EPS)` over the `C/g·KH·KW` entries of
/// each filter, `(O,)`. The norm is accumulated in f64.
///
/// Errors: invalid geometry ([`Error::Geometry`] / [`Error::Empty`]), wrong `w` length
/// ([`Error::LengthMismatch`]).
///
/// Example: [`forward`]'s uses it (and [`patch_inv_norm`]) to check term-S.
pub fn filter_inv_norm<T: Real>(cfg: &IieuConfig, w: &[T]) -> Result<Vec<T>> {
    let d = Dims::new(cfg)?;
    check_len("w", d.w_len(), w.len())?;
    Ok(filter_norms(&d, w).0)
}

/// Patch inverse norms `r_x[n, grp, h', w'] = 1/(‖P‖₂ + EPS)`, `(N, G', H', W')` with
/// `G'` = [`IieuConfig::patch_groups`]; see [`PatchNorm`] for which channels and taps
/// `P` covers. Computed as `q = Σ_c x_pre²` (f64) followed by a KH×KW window sum of
/// `q` — never a convolution.
///
/// Errors: invalid geometry, wrong `x_pre` length.
///
/// Example: [`forward`]'s uses it (and [`filter_inv_norm`]) to check term-S.
pub fn patch_inv_norm<T: Real>(cfg: &IieuConfig, x_pre: &[T]) -> Result<Vec<T>> {
    let d = Dims::new(cfg)?;
    check_len("x_pre", d.x_pre_len(), x_pre.len())?;
    Ok(patch_norms(&d, x_pre))
}

/// IIEU-B forward: `y = ς(ρ̂)·x` with `ρ̂ = x·r_w[o]·r_x[n,grp(o),h',w'] + ν[n,o]`,
/// `ν = σ(γ̇·LayerNorm_o(GAP(x)) + β̇)`, and the adjuster
/// `ς(ρ̂) = ρ̂` if `ρ̂ ≥ η[o]` (the upper branch wins the tie), else `η·exp(ρ̂ − η)`.
/// The adjuster is continuous at `ρ̂ = η` (both branches give `η·x`).
///
/// `x`: `(N, O, H', W')`, `x_pre`: `(N, C, H, W)`, `w`: `(O, C/g, KH, KW)`; returns
/// `y` `(N, O, H', W')` and the state [`backward`] needs. Parameters may take any
/// value (no domain restriction in the SPEC); NaN/Inf propagate as IEEE arithmetic.
/// [`forward_into`] is the same op writing into a caller-owned `y`.
///
/// Errors: invalid geometry ([`Error::Geometry`], [`Error::Empty`]); any buffer or
/// parameter of the wrong length ([`Error::LengthMismatch`]).
///
/// # Example (forward and backward)
///
/// ```
/// use activation_kernels::cpu::iieu::{
///     backward, filter_inv_norm, forward, patch_inv_norm, IieuConfig, IieuParams,
/// };
/// use activation_kernels::cpu::iieu_conv::conv2d;
/// use activation_kernels::Conv2dGeometry;
/// use approx::assert_relative_eq;
///
/// // A 3×3 conv (padding 1) from 2 to 2 channels on one 3×3 image, then IIEU-B.
/// let geo = Conv2dGeometry::new(1, 2, 3, 3, 2, 3, 3).with_padding(1, 1);
/// let cfg = IieuConfig::new(geo);
/// let x_pre: Vec<f64> = (0..18).map(|i| ((i * 7 % 11) as f64 - 5.0) / 4.0).collect();
/// let w: Vec<f64> = (0..36).map(|i| ((i * 5 % 13) as f64 - 6.0) / 8.0).collect();
/// let x = conv2d(&geo, &x_pre, &w)?; // (1, 2, 3, 3)
/// let params = IieuParams::init(2); // γ̇ = 0.01, β̇ = 0, η = 0.05
/// let (y, saved) = forward(&cfg, &x, &x_pre, &w, &params)?;
///
/// // term-S is the cosine between W[o] and its patch, so |s| ≤ 1; element 4 of
/// // channel 1 by the formula: ρ̂ = s + ν, y = ς(ρ̂)·x.
/// let (r_w, r_x) = (filter_inv_norm(&cfg, &w)?, patch_inv_norm(&cfg, &x_pre)?);
/// for (i, xi) in x.iter().enumerate() {
///     assert!((xi * r_w[i / 9] * r_x[i % 9]).abs() <= 1.0 + 1e-12);
/// }
/// let i = 9 + 4;
/// let rho = x[i] * r_w[1] * r_x[4] + saved.nu()[1];
/// let eta = params.eta[1];
/// let adj = if rho >= eta { rho } else { eta * (rho - eta).exp() };
/// assert_relative_eq!(y[i], adj * x[i], max_relative = 1e-12);
///
/// // Backward of L = Σ y, the three tensors taken as independent inputs (as the op
/// // does; the conv's own chain rule is cpu::iieu_conv's job): central differences.
/// let g = backward(&cfg, &vec![1.0; 18], &x, &x_pre, &w, &params, &saved)?;
/// let loss = |x: &[f64], x_pre: &[f64], p: &IieuParams<f64>| -> f64 {
///     forward(&cfg, x, x_pre, &w, p).unwrap().0.iter().sum()
/// };
/// let h = 1e-6;
/// let nudge = |v: &[f64], j: usize, e: f64| {
///     let mut v = v.to_vec();
///     v[j] += e;
///     v
/// };
/// let fd_x = (loss(&nudge(&x, i, h), &x_pre, &params) - loss(&nudge(&x, i, -h), &x_pre, &params)) / (2.0 * h);
/// let fd_xp = (loss(&x, &nudge(&x_pre, 4, h), &params) - loss(&x, &nudge(&x_pre, 4, -h), &params)) / (2.0 * h);
/// let with_gamma = |e: f64| IieuParams { ln_weight: nudge(&params.ln_weight, 0, e), ..params.clone() };
/// let fd_gamma = (loss(&x, &x_pre, &with_gamma(h)) - loss(&x, &x_pre, &with_gamma(-h))) / (2.0 * h);
/// assert_relative_eq!(g.dx[i], fd_x, max_relative = 1e-6);
/// assert_relative_eq!(g.dx_pre[4], fd_xp, max_relative = 1e-6);
/// assert_relative_eq!(g.d_ln_weight[0], fd_gamma, max_relative = 1e-6);
/// assert_eq!((g.dw.len(), g.d_ln_bias.len(), g.d_eta.len()), (36, 2, 2));
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn forward<T: Real>(
    cfg: &IieuConfig,
    x: &[T],
    x_pre: &[T],
    w: &[T],
    params: &IieuParams<T>,
) -> Result<(Vec<T>, IieuSaved<T>)> {
    let d = Dims::new(cfg)?;
    check_len("x", d.x_len(), x.len())?;
    let mut y = vec![T::zero(); x.len()];
    let saved = forward_into(cfg, x, x_pre, w, params, &mut y)?;
    Ok((y, saved))
}

/// [`forward`] writing `y` into a caller-owned buffer of `x`'s length (every element
/// is overwritten), so a training loop can reuse its output memory instead of paying
/// for a fresh allocation (and its page faults) on every call. Same formula, same
/// bits as [`forward`].
///
/// The work is fused per sample: the patch norms of sample `n`, its GAP, LayerNorm
/// and the adjuster run back to back while `x[n]` is still in cache, so `x_pre`, `x`
/// and `y` each cross memory once.
///
/// Errors: as [`forward`], plus a `y` of the wrong length ([`Error::LengthMismatch`]).
///
/// # Example (forward and backward into reused buffers)
///
/// ```
/// use activation_kernels::cpu::iieu::{
///     backward, backward_into, forward, forward_into, IieuConfig, IieuGrads, IieuParams,
/// };
/// use activation_kernels::Conv2dGeometry;
///
/// // IIEU-B after a 1×1 conv, 3 → 2 channels, on a 2×2 image (x given directly).
/// let cfg = IieuConfig::new(Conv2dGeometry::new(1, 3, 2, 2, 2, 1, 1));
/// let x_pre = [0.5f32, -1.0, 2.0, 0.0, 1.0, 1.5, -0.5, 0.25, -2.0, 0.75, 1.0, -1.0];
/// let w = [0.3f32, -0.2, 0.9, -0.5, 0.1, 0.4];
/// let x = [0.2f32, -0.7, 1.1, 0.4, -0.3, 0.8, -1.2, 0.05];
/// let params = IieuParams::init(2);
/// let (mut y, mut grads) = (vec![0.0f32; 8], IieuGrads::default());
/// for _step in 0..2 {
///     // The same buffers every step: nothing activation-sized allocated after the first.
///     let saved = forward_into(&cfg, &x, &x_pre, &w, &params, &mut y)?;
///     backward_into(&cfg, &y, &x, &x_pre, &w, &params, &saved, &mut grads)?;
/// }
/// // Same bits as the allocating ops.
/// let (y1, saved) = forward(&cfg, &x, &x_pre, &w, &params)?;
/// assert_eq!(y, y1);
/// assert_eq!(grads, backward(&cfg, &y, &x, &x_pre, &w, &params, &saved)?);
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn forward_into<T: Real>(
    cfg: &IieuConfig,
    x: &[T],
    x_pre: &[T],
    w: &[T],
    params: &IieuParams<T>,
    y: &mut [T],
) -> Result<IieuSaved<T>> {
    let d = Dims::new(cfg)?;
    check_len("x", d.x_len(), x.len())?;
    check_len("x_pre", d.x_pre_len(), x_pre.len())?;
    check_len("w", d.w_len(), w.len())?;
    check_len("y", d.x_len(), y.len())?;
    params.check(d.o)?;

    let (r_w, w_norm) = filter_norms(&d, w);
    let (po, pi) = (d.plane_out(), d.plane_in());
    let mut r_x = vec![T::zero(); d.rx_len()];
    let mut x_norm = vec![0.0f64; d.rx_len()];
    let mut m_hat = vec![0.0f64; d.n * d.o];
    let mut rstd = vec![0.0f64; d.n];
    let mut nu = vec![0.0f64; d.n * d.o];

    // One task per sample (nested parallel loops inside keep small batches busy).
    y.par_chunks_mut(d.o * po)
        .zip(x.par_chunks(d.o * po))
        .zip(x_pre.par_chunks(d.c * pi))
        .zip(r_x.par_chunks_mut(d.gp * po))
        .zip(x_norm.par_chunks_mut(d.gp * po))
        .zip(m_hat.par_chunks_mut(d.o))
        .zip(nu.par_chunks_mut(d.o))
        .zip(rstd.par_iter_mut())
        .for_each(|(((((((ys, xs), xps), rxs), xns), mh), nun), rs)| {
            // term-S: patch norms of this sample, one plane per patch group.
            rxs.par_chunks_mut(po)
                .zip(xns.par_chunks_mut(po))
                .zip(xps.par_chunks(d.c_per * pi))
                .for_each(|((rx, xn), xg)| patch_norm_plane(&d, xg, xn, rx));
            // term-B: GAP, LayerNorm over the O channels, sigmoid.
            let mut m = vec![0.0f64; d.o];
            m.par_iter_mut()
                .enumerate()
                .for_each(|(o, mv)| *mv = plane_sum(xs, o * po, po) / po as f64);
            *rs = layer_norm_fwd(&m, EPS_LN, mh);
            for (o, (v, &mhv)) in nun.iter_mut().zip(mh.iter()).enumerate() {
                *v = sigmoid(params.ln_weight[o].to_f64() * mhv + params.ln_bias[o].to_f64());
            }
            // Adjuster, per channel plane (x[n] is still in cache).
            let (rxs, nun) = (&*rxs, &*nun);
            ys.par_chunks_mut(po)
                .zip(xs.par_chunks(po))
                .enumerate()
                .for_each(|(o, (yp, xp))| {
                    let g = o / d.o_per;
                    let rx = &rxs[g * po..(g + 1) * po];
                    adjust_plane(xp, rx, yp, r_w[o], T::of(nun[o]), params.eta[o]);
                });
        });

    Ok(IieuSaved {
        cfg: *cfg,
        r_w,
        w_norm,
        r_x,
        x_norm,
        nu,
        m_hat,
        rstd,
    })
}

/// IIEU-B backward (SPEC §1.4), back-propagating through `r_x` and `r_w` (not detached).
///
/// With `g = dy·∂y/∂ρ̂`, `∂y/∂ρ̂ = x` (upper branch, `ρ̂ ≥ η`) or `η·exp(ρ̂−η)·x` (lower):
/// * `dx = dy·ς(ρ̂) + g·r_w·r_x + dm[n,o]/(H'·W')`;
/// * term-B: `dz[n,o] = ν(1−ν)·Σ_{h',w'} g`, `dm̂ = γ̇·dz`, `dm` = LayerNorm backward
///   of `dm̂`, `dγ̇[o] = Σ_n dz·m̂`, `dβ̇[o] = Σ_n dz`;
/// * `dη[o] = Σ dy·x·exp(ρ̂−η)·(1−η)` over lower-branch elements;
/// * `dr_x[n,grp,h',w'] = Σ_{o∈grp} g·x·r_w[o]`, `dr_w[o] = Σ_{n,h',w'} g·x·r_x`;
/// * with `∂r/∂v = −r²·v/‖v‖` (0 where `‖v‖ = 0`):
///   `dx_pre[n,c,h,w] = x_pre[n,c,h,w]·Σ_{windows ∋ (c,h,w)} dr_x·(−r_x²/‖P‖)` — a gather
///   over the output windows whose patch contains the tap, one task per
///   (sample, patch group); `dW[o,·] = dr_w[o]·(−r_w[o]²/‖W[o]‖)·W[o,·]`.
///
/// `ρ̂` is recomputed from the saved `r_w`, `r_x`, `ν` with the same expression as in
/// [`forward`], so the branch taken is bit-identical. All reductions are in f64 and
/// in a fixed order (deterministic).
///
/// Cost of the allocating form: it returns two fresh activation-sized buffers (`dx`,
/// `dx_pre`) per call. Under glibc, freeing them can lift the heap's top chunk above
/// the trim threshold (depending on the allocator's state), so the memory goes back to
/// the kernel and the next call page-faults it in again. On the benchmark machine
/// (2026-12-01, before the backward's prefetching) the backward for 32×64×56×56 (1×1)
/// took 29.7 ms this way, 7.1 ms with
/// `GLIBC_TUNABLES=glibc.malloc.trim_threshold=1073741824` (and a fixed
/// `mmap_threshold`), and 4.7 ms as [`backward_into`] with kept buffers. In a training
/// loop, use [`backward_into`].
///
/// Errors: as [`forward`], plus a wrong `dy` length ([`Error::LengthMismatch`]) and
/// `saved` produced for a different config ([`Error::Shape`]).
///
/// Example: [`forward`]'s runs the forward and this backward and checks gradients
/// against central differences.
pub fn backward<T: Real>(
    cfg: &IieuConfig,
    dy: &[T],
    x: &[T],
    x_pre: &[T],
    w: &[T],
    params: &IieuParams<T>,
    saved: &IieuSaved<T>,
) -> Result<IieuGrads<T>> {
    let mut grads = IieuGrads::default();
    backward_into(cfg, dy, x, x_pre, w, params, saved, &mut grads)?;
    Ok(grads)
}

/// [`backward`] writing into a caller-owned [`IieuGrads`]: each buffer is resized to
/// its input's length if it has another length (keeping its allocation otherwise) and
/// every element is overwritten, so a training loop that keeps one `IieuGrads`
/// allocates nothing big after the first call. Same formulas, same bits as
/// [`backward`]. On `Err` the buffers are left untouched.
///
/// Errors: as [`backward`].
///
/// Example: [`forward_into`]'s runs both `_into` ops.
#[allow(clippy::too_many_arguments)]
pub fn backward_into<T: Real>(
    cfg: &IieuConfig,
    dy: &[T],
    x: &[T],
    x_pre: &[T],
    w: &[T],
    params: &IieuParams<T>,
    saved: &IieuSaved<T>,
    grads: &mut IieuGrads<T>,
) -> Result<()> {
    let d = Dims::new(cfg)?;
    check_len("dy", d.x_len(), dy.len())?;
    check_len("x", d.x_len(), x.len())?;
    check_len("x_pre", d.x_pre_len(), x_pre.len())?;
    check_len("w", d.w_len(), w.len())?;
    params.check(d.o)?;
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
        && saved.r_x.len() == d.rx_len()
        && saved.x_norm.len() == d.rx_len()
        && saved.nu.len() == d.n * d.o
        && saved.m_hat.len() == d.n * d.o
        && saved.rstd.len() == d.n;
    if !consistent {
        return Err(Error::Shape {
            what: "saved",
            msg: "saved state buffers do not match the config".into(),
        });
    }

    let (po, pi) = (d.plane_out(), d.plane_in());
    fit(&mut grads.dx, x.len());
    fit(&mut grads.dx_pre, x_pre.len());
    fit(&mut grads.dw, w.len());
    fit(&mut grads.d_ln_weight, d.o);
    fit(&mut grads.d_ln_bias, d.o);
    fit(&mut grads.d_eta, d.o);
    let IieuGrads {
        dx,
        dx_pre,
        dw,
        d_ln_weight,
        d_ln_bias,
        d_eta: d_eta_out,
    } = grads;

    // One task per sample n: for each patch group, the adjuster backward of the O/G'
    // channel planes that share r_x[n, grp], the dr_x reduction over them and the
    // dx_pre gather for the group's C/G' input channels; then term-B for the sample
    // (its LayerNorm couples only this sample's channels) and the dm/(H'·W') term
    // added to the sample's dx while it is still in cache. Returns the sample's
    // per-channel partials [dr_w, dη, dγ̇, dβ̇] for the ordered reduction below.
    let partials: Vec<Vec<f64>> = dx
        .par_chunks_mut(d.o * po)
        .zip(dx_pre.par_chunks_mut(d.c * pi))
        .enumerate()
        .map(|(n, (dxs, dxps))| {
            let mut part = vec![0.0f64; 4 * d.o];
            let (p_rw, rest) = part.split_at_mut(d.o);
            let (p_eta, rest) = rest.split_at_mut(d.o);
            let (p_gamma, p_beta) = rest.split_at_mut(d.o);
            let mut sg = vec![0.0f64; d.o];
            let mut drx = vec![0.0f64; po];
            let mut tmp = vec![0.0f64; d.h * d.ow];
            let mut acc = vec![0.0f64; pi];
            for (gp, (dxc, dxpc)) in dxs
                .chunks_exact_mut(d.o_per * po)
                .zip(dxps.chunks_exact_mut(d.c_per * pi))
                .enumerate()
            {
                let t = n * d.gp + gp;
                let rx = &saved.r_x[t * po..(t + 1) * po];
                drx.fill(0.0);
                for (ol, dxp) in dxc.chunks_exact_mut(po).enumerate() {
                    let o = gp * d.o_per + ol;
                    let no = n * d.o + o;
                    // From this plane to the end of the sample (prefetched ahead).
                    let xs = &x[no * po..(n + 1) * d.o * po];
                    let dys = &dy[no * po..(n + 1) * d.o * po];
                    let (rw, nu_t, eta) = (saved.r_w[o], T::of(saved.nu[no]), params.eta[o]);
                    let [a, b, c] = adjust_plane_bwd(xs, dys, rx, dxp, &mut drx, rw, nu_t, eta);
                    sg[o] = a;
                    p_rw[o] = b;
                    p_eta[o] = c;
                }
                // dr_x → coefficient per window, then gather over windows per input pixel.
                let xn = &saved.x_norm[t * po..(t + 1) * po];
                let xpc =
                    &x_pre[(n * d.c + gp * d.c_per) * pi..(n * d.c + (gp + 1) * d.c_per) * pi];
                for (a, &nm) in drx.iter_mut().zip(xn) {
                    *a *= inv_norm_slope(nm);
                }
                if d.identity_window {
                    // 1-tap window, stride 1, no padding: the gather is the identity.
                    scale_planes(dxpc, xpc, &drx);
                } else {
                    d.window_gather(&drx, &mut tmp, &mut acc);
                    scale_planes(dxpc, xpc, &acc);
                }
            }
            // term-B of sample n.
            let nu = &saved.nu[n * d.o..(n + 1) * d.o];
            let mh = &saved.m_hat[n * d.o..(n + 1) * d.o];
            let mut dmh = vec![0.0f64; d.o];
            for o in 0..d.o {
                let dz = nu[o] * (1.0 - nu[o]) * sg[o];
                p_gamma[o] = dz * mh[o];
                p_beta[o] = dz;
                dmh[o] = dz * params.ln_weight[o].to_f64();
            }
            let mut dm = vec![0.0f64; d.o];
            layer_norm_bwd(&dmh, mh, saved.rstd[n], &mut dm);
            // term-B path into dx: dm/(H'·W'), broadcast over the plane.
            add_per_plane(dxs, &dm, po);
            part
        })
        .collect();

    // Ordered reductions over samples (deterministic).
    let mut dr_w = vec![0.0f64; d.o];
    let mut d_eta = vec![0.0f64; d.o];
    let mut d_gamma = vec![0.0f64; d.o];
    let mut d_beta = vec![0.0f64; d.o];
    for p in &partials {
        for o in 0..d.o {
            dr_w[o] += p[o];
            d_eta[o] += p[d.o + o];
            d_gamma[o] += p[2 * d.o + o];
            d_beta[o] += p[3 * d.o + o];
        }
    }

    // dW through r_w.
    dw.par_chunks_mut(d.w_per)
        .zip(w.par_chunks(d.w_per))
        .enumerate()
        .for_each(|(o, (dwf, wf))| {
            scale_into(dwf, wf, dr_w[o] * inv_norm_slope(saved.w_norm[o]));
        });

    for (dst, src) in [
        (d_ln_weight, &d_gamma),
        (d_ln_bias, &d_beta),
        (d_eta_out, &d_eta),
    ] {
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = T::of(v);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocked adjusters (all-upper blocks take the short path: blocks of `SUB`
    /// forward, `CHUNK` backward) give the same bits as the branch-free definition
    /// applied to every element, for planes with all-upper, mixed and all-lower chunks
    /// and a ragged tail; the backward also gives the same `drx` and plane sums (same
    /// lanes, same order).
    #[test]
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    fn blocked_adjuster_matches_elementwise_definition() {
        let n = 3 * CHUNK + 13;
        let (rw, nu, eta) = (1.3f32, 0.2f32, 0.25f32);
        // Chunk 0 all upper, chunk 1 mixed, chunk 2 all lower, tail mixed.
        let x: Vec<f32> = (0..n)
            .map(|i| {
                let v = 0.5 + 0.002 * i as f32;
                match i / CHUNK {
                    0 => v,
                    1 if i % 3 == 0 => -v,
                    1 => v,
                    2 => -v,
                    _ if i % 2 == 0 => -v,
                    _ => v,
                }
            })
            .collect();
        let rx: Vec<f32> = (0..n).map(|i| 0.3 + 0.001 * i as f32).collect();
        let dy: Vec<f32> = (0..n).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1).collect();
        let lower = |i: usize| !(rho(x[i], rw, rx[i], nu) >= eta);
        let c = CHUNK;
        assert!((0..c).all(|i| !lower(i)));
        assert!((c..2 * c).any(lower) && !(c..2 * c).all(lower));
        assert!((2 * c..3 * c).all(lower));
        assert!((3 * c..n).any(lower) && !(3 * c..n).all(lower));

        let mut y = vec![0.0f32; n];
        adjust_plane_impl(&x, &rx, &mut y, rw, nu, eta);
        let (mut dx, mut drx) = (vec![0.0f32; n], vec![0.25f64; n]);
        let sums = adjust_plane_bwd_impl(&x, &dy, &rx, &mut dx, &mut drx, rw, nu, eta);

        let mut acc = [[0.0f64; LANES]; 3];
        for i in 0..n {
            let r = rho(x[i], rw, rx[i], nu);
            let ex = (r - eta).exp_fast();
            let e = eta * ex;
            let up = r >= eta;
            let want_y = if up { r * x[i] } else { eta * ex * x[i] };
            assert_eq!(y[i].to_bits(), want_y.to_bits(), "y[{i}]");
            let g = dy[i] * if up { x[i] } else { e * x[i] };
            let want_dx = dy[i] * if up { r } else { e } + g * rw * rx[i];
            assert_eq!(dx[i].to_bits(), want_dx.to_bits(), "dx[{i}]");
            let gx = g * x[i];
            assert_eq!(drx[i].to_bits(), (0.25 + (gx * rw) as f64).to_bits());
            let te = if up {
                0.0
            } else {
                dy[i] * x[i] * ex * (1.0 - eta)
            };
            let lane = if i < n - n % LANES { i % LANES } else { 0 };
            acc[0][lane] += g as f64;
            acc[1][lane] += (gx * rx[i]) as f64;
            acc[2][lane] += te as f64;
        }
        let want: [f64; 3] = std::array::from_fn(|k| acc[k].iter().sum());
        assert_eq!(sums.map(f64::to_bits), want.map(f64::to_bits));
    }

    /// The runtime-dispatched (AVX2 / AVX-512) loops give the same bits as the
    /// baseline build of the same code; the plane sum and the patch sum of squares
    /// also match plain f64 references (ragged lengths, an off-grid window).
    #[test]
    fn dispatched_loops_match_baseline_bits() {
        let n = 1003;
        let f = |i: usize, a: f32| (i as f32 * a).sin() * 2.0;
        let x: Vec<f32> = (0..n).map(|i| f(i, 0.37)).collect();
        let dy: Vec<f32> = (0..n).map(|i| f(i, 0.91)).collect();
        let rx: Vec<f32> = (0..n).map(|i| 0.2 + f(i, 1.3).abs()).collect();
        let (rw, nu, eta) = (1.7f32, 0.45f32, 0.3f32);
        let (mut y0, mut y1) = (vec![0.0f32; n], vec![0.0f32; n]);
        adjust_plane_impl(&x, &rx, &mut y0, rw, nu, eta);
        adjust_plane(&x, &rx, &mut y1, rw, nu, eta);
        assert!(y0.iter().zip(&y1).all(|(a, b)| a.to_bits() == b.to_bits()));
        let (mut d0, mut d1) = (vec![0.0f32; n], vec![0.0f32; n]);
        let (mut r0, mut r1) = (vec![0.5f64; n], vec![0.5f64; n]);
        let s0 = adjust_plane_bwd_impl(&x, &dy, &rx, &mut d0, &mut r0, rw, nu, eta);
        let s1 = adjust_plane_bwd(&x, &dy, &rx, &mut d1, &mut r1, rw, nu, eta);
        assert!(d0.iter().zip(&d1).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(r0.iter().zip(&r1).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert_eq!(s0.map(f64::to_bits), s1.map(f64::to_bits));
        assert_eq!(
            plane_sum_impl(&x, 7, 900).to_bits(),
            plane_sum(&x, 7, 900).to_bits()
        );
        assert_eq!(lane_sum_sq_impl(&x).to_bits(), lane_sum_sq(&x).to_bits());
        // A window that starts off the lane grid and ends in a ragged tail, against a
        // plain f64 sum (the terms are exact in f64; 900 of them).
        let want: f64 = x[7..907].iter().map(|&v| v as f64).sum();
        assert!((plane_sum(&x, 7, 900) - want).abs() <= 1e-12 * 900.0);
        // The patch sum of squares adds the channels in order, one plane at a time: the
        // same bits as the naive channel loop, on planes with a ragged block tail.
        let pi = 3 * CHUNK + 5;
        let xs: Vec<f32> = (0..5 * pi).map(|i| f(i, 0.53)).collect();
        let mut q = vec![0.25f64; pi];
        sum_sq(&xs, &mut q);
        for (p, &got) in q.iter().enumerate() {
            let mut want = 0.25f64;
            for c in 0..5 {
                let v = xs[c * pi + p] as f64;
                want += v * v;
            }
            assert_eq!(got.to_bits(), want.to_bits(), "q[{p}]");
        }
        let (mut w0, mut w1) = (vec![0.0f32; n], vec![0.0f32; n]);
        scale_into_impl(&mut w0, &x, -0.37);
        scale_into(&mut w1, &x, -0.37);
        assert!(w0.iter().zip(&w1).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
