//! ACON — "Activate or Not" (SPEC §2): ACON-A (Swish), ACON-B, ACON-C and the
//! meta-ACON β generators (channel-wise fc–fc, layer-wise, pixel-wise).
//!
//! All ops accept NCHW `(N, C, S)` and channels-last `(N, L, C)` tensors through
//! [`ActShape`]. Per-channel parameters (`p1`, `p2`, `p`) have length `C`; the
//! switching factor β comes from a [`Beta`] source (per channel, per
//! (sample, channel), per sample, or pixel-wise `β = σ(x)`).
//!
//! # Implementation
//! * Forward is one fused pass over `x` (one `exp` per element, two for
//!   [`Beta::PixelWise`]).
//! * Backward computes `dx` and the partial sums of every parameter gradient in
//!   the same pass. NCHW: one task per (sample, channel) plane (the channel
//!   parameters are scalars there), each plane producing three f64 partials.
//!   NLC: one task per block of rows of one sample (block size depends on `C`
//!   only), each producing three C-length f64 partial vectors. The partials are
//!   then summed sequentially in a fixed order (samples, then blocks), so every
//!   parameter gradient has identical bits on every run and for every thread
//!   count. Element products are formed in `T` and accumulated in f64 (within a
//!   plane in 32 fixed lanes, combined in lane order, so the loops vectorise;
//!   32-element blocks give LLVM four independent 8-wide chains to overlap).
//! * The element loops run in AVX2 / AVX-512 copies chosen at run time
//!   (`fastmath::simd_fn`; bit-identical to the baseline SSE2 build). Measured
//!   ratios to a ReLU floor: docs/performance.md.
//! * The sigmoid is `1/(1+e^{−x})`: [`crate::cpu::common::sigmoid`] in f64 (for
//!   very negative arguments `e^{−x}` overflows to +∞ and σ is exactly 0, never
//!   NaN), and for f32 [`crate::fastmath::sigmoid_f32`] (vectorisable Cephes
//!   `expf`, ≤ 2 ulp) that saturates the same way.

use rayon::prelude::*;

use crate::cpu::common::{fit, sigmoid};
use crate::error::{check_len, check_nonzero, Error, Result};
use crate::layout::{ActShape, Layout};
use crate::real::Real;

/// Elements per parallel task (NLC row blocks, minimum NCHW planes per task).
const GRAIN: usize = 32_768;
/// Minimum rows per NLC block (bounds the partial-buffer size for huge `C`).
const MIN_BLOCK_ROWS: usize = 8;
/// Above this |β·d| the sigmoid is exactly 0 or 1 in both f32 and f64.
const SAT_LIM: f64 = 1e3;

/// `Real::to_f64` (named to avoid the ambiguity with `ToPrimitive::to_f64`).
#[inline(always)]
fn r64<T: Real>(v: T) -> f64 {
    Real::to_f64(v)
}

/// Where the switching factor β comes from.
#[derive(Debug, Clone, Copy)]
pub enum Beta<'a, T> {
    /// One β per channel (length `C`): plain ACON.
    PerChannel(&'a [T]),
    /// One β per (sample, channel), row-major `N × C`: channel-wise meta-ACON
    /// (see [`ChannelGen`]).
    PerSampleChannel(&'a [T]),
    /// One β per sample (length `N`): layer-wise meta-ACON (see [`layer_gen_forward`]).
    PerSample(&'a [T]),
    /// Pixel-wise meta-ACON: `β = σ(x)` element-wise. No β buffer; the gradient
    /// that reaches β flows on into `x` (`∂β/∂x = σ(x)(1 − σ(x))`), so the
    /// returned `dbeta` is empty and `dx` includes that path.
    PixelWise,
}

impl<T> Beta<'_, T> {
    /// Checks the β buffer against the shape.
    fn validate(&self, shape: &ActShape) -> Result<()> {
        // shape.validate() ran first, so n·c cannot overflow (n·c·s did not).
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
}

/// Gradients of ACON-C ([`acon_c_backward`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AconCGrads<T> {
    /// `∂L/∂x`, same shape as `x` (includes the path through β for [`Beta::PixelWise`]).
    pub dx: Vec<T>,
    /// `∂L/∂p1`, length `C`.
    pub dp1: Vec<T>,
    /// `∂L/∂p2`, length `C`.
    pub dp2: Vec<T>,
    /// `∂L/∂β`, same length as the [`Beta`] variant's slice (`C`, `N×C` or `N`);
    /// empty for [`Beta::PixelWise`].
    pub dbeta: Vec<T>,
}

/// Gradients of ACON-B ([`acon_b_backward`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AconBGrads<T> {
    /// `∂L/∂x`, same shape as `x`.
    pub dx: Vec<T>,
    /// `∂L/∂p`, length `C`.
    pub dp: Vec<T>,
    /// `∂L/∂β`, shaped as the [`Beta`] variant's slice; empty for [`Beta::PixelWise`].
    pub dbeta: Vec<T>,
}

/// Gradients of ACON-A ([`acon_a_backward`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AconAGrads<T> {
    /// `∂L/∂x`, same shape as `x`.
    pub dx: Vec<T>,
    /// `∂L/∂β`, shaped as the [`Beta`] variant's slice; empty for [`Beta::PixelWise`].
    pub dbeta: Vec<T>,
}

/// Learnable per-channel ACON-C parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct AconCParams<T> {
    /// `p1`, length `C`.
    pub p1: Vec<T>,
    /// `p2`, length `C`.
    pub p2: Vec<T>,
    /// β, length `C` (use as [`Beta::PerChannel`]).
    pub beta: Vec<T>,
}

impl<T: Real> AconCParams<T> {
    /// The paper's init: `β = p1 = 1`, `p2 = 0` (ACON-C then starts as Swish).
    /// `Err(Empty)` if `c == 0`.
    pub fn init_paper(c: usize) -> Result<Self> {
        check_nonzero("channels C", c)?;
        Ok(Self {
            p1: vec![T::one(); c],
            p2: vec![T::zero(); c],
            beta: vec![T::one(); c],
        })
    }

    /// The authors' code init: `p1, p2 ~ N(0, 1)` (deterministic from `seed`:
    /// splitmix64 + Box–Muller, p1 drawn first, then p2), `β = 1`.
    /// `Err(Empty)` if `c == 0`.
    pub fn init_reference(c: usize, seed: u64) -> Result<Self> {
        check_nonzero("channels C", c)?;
        let mut rng = SplitMix64(seed);
        let p1 = (0..c).map(|_| T::of(rng.normal())).collect();
        let p2 = (0..c).map(|_| T::of(rng.normal())).collect();
        Ok(Self {
            p1,
            p2,
            beta: vec![T::one(); c],
        })
    }
}

/// splitmix64 (Steele, Lea & Flood 2014): a small deterministic PRNG for inits.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)` with 53 random bits.
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Standard normal by Box–Muller (one value per call; `u1` in `(0, 1]`).
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// σ used by the element loops: [`crate::cpu::common::sigmoid`] for f64; for
/// f32 (detected by size, resolved at compile time) the inlinable
/// [`sigmoid_f32`], which avoids a libm call per element.
#[inline(always)]
fn sig<T: Real>(x: T) -> T {
    if std::mem::size_of::<T>() == 4 {
        // f32 → f64 → f32 round trips are exact and fold away.
        T::of(sigmoid_f32(r64(x) as f32) as f64)
    } else {
        sigmoid(x)
    }
}

use crate::fastmath::{sigmoid_f32, simd_fn};

// ---------------------------------------------------------------------------
// Fused element loops.
//
// The loops run in blocks of `LANES` elements with per-lane f64 accumulators
// (fixed lane assignment, so the sums stay deterministic); the per-element
// parameter sources below hand out a whole block at once. With the inline f32
// sigmoid this lets LLVM vectorise the loops; a short tail runs element-wise.

/// Block width of the element loops.
const LANES: usize = 32;

/// A per-element source of a parameter (p1, p2 or β) along one plane or row.
trait Src<T: Real>: Copy {
    /// Values for elements `i0 .. i0 + LANES` (with their inputs `x`).
    fn block(&self, i0: usize, x: &[T; LANES]) -> [T; LANES];
    /// Value for element `i` (input `x`).
    fn at(&self, i: usize, x: T) -> T;
}

/// The same value for every element (an NCHW plane's channel parameter).
#[derive(Clone, Copy)]
struct Same<T>(T);
impl<T: Real> Src<T> for Same<T> {
    #[inline(always)]
    fn block(&self, _: usize, _: &[T; LANES]) -> [T; LANES] {
        [self.0; LANES]
    }
    #[inline(always)]
    fn at(&self, _: usize, _: T) -> T {
        self.0
    }
}

/// One value per element index (an NLC row's per-channel parameter); the
/// slice is as long as the row.
#[derive(Clone, Copy)]
struct Per<'a, T>(&'a [T]);
impl<T: Real> Src<T> for Per<'_, T> {
    #[inline(always)]
    fn block(&self, i0: usize, _: &[T; LANES]) -> [T; LANES] {
        arr(&self.0[i0..i0 + LANES])
    }
    #[inline(always)]
    fn at(&self, i: usize, _: T) -> T {
        self.0[i]
    }
}

/// Pixel-wise β = σ(x).
#[derive(Clone, Copy)]
struct Pix;
impl<T: Real> Src<T> for Pix {
    #[inline(always)]
    fn block(&self, _: usize, x: &[T; LANES]) -> [T; LANES] {
        // A plain loop, not `array::from_fn`: that stays an out-of-line call compiled
        // without the caller's target features, i.e. a scalar sigmoid per element.
        let mut b = *x;
        for v in &mut b {
            *v = sig(*v);
        }
        b
    }
    #[inline(always)]
    fn at(&self, _: usize, x: T) -> T {
        sig(x)
    }
}

/// The first [`LANES`] elements of `s` as an array (a plain copy; see [`Pix::block`]
/// for why not `array::from_fn`).
#[inline(always)]
fn arr<T: Copy>(s: &[T]) -> [T; LANES] {
    let mut b = [s[0]; LANES];
    b.copy_from_slice(&s[..LANES]);
    b
}

/// `y = d·σ(β·d) + p2·x`, `d = (p1 − p2)·x`, over one plane or row.
#[inline(always)]
fn fwd_loop<T: Real>(x: &[T], y: &mut [T], p1: impl Src<T>, p2: impl Src<T>, beta: impl Src<T>) {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &mut y[..n]);
    let mut yc = y.chunks_exact_mut(LANES);
    let mut xc = x.chunks_exact(LANES);
    let mut i0 = 0;
    for (yb, xb) in (&mut yc).zip(&mut xc) {
        let xa = arr(xb);
        let (a, b, bt) = (p1.block(i0, &xa), p2.block(i0, &xa), beta.block(i0, &xa));
        for j in 0..LANES {
            let d = (a[j] - b[j]) * xa[j];
            yb[j] = d * sig(bt[j] * d) + b[j] * xa[j];
        }
        i0 += LANES;
    }
    for (k, (yo, &xv)) in yc
        .into_remainder()
        .iter_mut()
        .zip(xc.remainder())
        .enumerate()
    {
        let i = i0 + k;
        let (a, b) = (p1.at(i, xv), p2.at(i, xv));
        let d = (a - b) * xv;
        *yo = d * sig(beta.at(i, xv) * d) + b * xv;
    }
}

/// One element of the backward: returns `(dx, dy·x·∂y/∂d, dy·x, dy·∂y/∂β)`.
/// With `PIX`, `β = σ(x)` and `dx` also gets `dy·∂y/∂β·β(1 − β)`.
#[inline(always)]
fn bwd_elem<T: Real, const PIX: bool>(g: T, xv: T, a: T, b: T, bt: T) -> (T, T, T, T) {
    let (zero, one, lim) = (T::zero(), T::one(), T::of(SAT_LIM));
    let d = (a - b) * xv;
    let u = bt * d;
    let s = sig(u);
    // |β·d| > SAT_LIM: σ is exactly 0 or 1 in f32 and f64, so s(1 − s) = 0 and
    // the terms u·s(1 − s), d²·s(1 − s) are 0 — set them so explicitly, since
    // u or d² may have overflowed to ±∞ (∞·0 = NaN) for finite inputs.
    // (A NaN u is not > SAT_LIM and propagates.)
    let sat = u.abs() > lim;
    let t = if sat { zero } else { s * (one - s) };
    let gd = if sat { s } else { s + u * t }; // ∂y/∂d
    let gb = if sat { zero } else { g * d * d * t }; // dy·∂y/∂β
    let mut v = g * ((a - b) * gd + b);
    if PIX {
        v = v + gb * bt * (one - bt);
    }
    let gx = g * xv;
    (v, gx * gd, gx, gb)
}

/// Where the backward's per-element partials `(dy·x·∂y/∂d, dy·x, dy·∂y/∂β)` go.
trait Acc<T> {
    /// Partials of elements `i0 .. i0 + LANES`.
    fn block(&mut self, i0: usize, u: &[T; LANES], v: &[T; LANES], w: &[T; LANES]);
    /// Partials of element `i`.
    fn one(&mut self, i: usize, u: T, v: T, w: T);
}

/// NCHW plane: three sums, kept in `LANES` f64 lanes each (lane = position
/// within the block; the tail goes to lane 0), combined in lane order.
struct Lanes([[f64; LANES]; 3]);
impl<T: Real> Acc<T> for Lanes {
    #[inline(always)]
    fn block(&mut self, _: usize, u: &[T; LANES], v: &[T; LANES], w: &[T; LANES]) {
        for j in 0..LANES {
            self.0[0][j] += r64(u[j]);
            self.0[1][j] += r64(v[j]);
            self.0[2][j] += r64(w[j]);
        }
    }
    #[inline(always)]
    fn one(&mut self, _: usize, u: T, v: T, w: T) {
        self.0[0][0] += r64(u);
        self.0[1][0] += r64(v);
        self.0[2][0] += r64(w);
    }
}
impl Lanes {
    fn sums(&self) -> [f64; 3] {
        std::array::from_fn(|k| self.0[k].iter().sum())
    }
}

/// NLC row: per-channel sums (each slice as long as the row).
struct PerChan<'a>(&'a mut [f64], &'a mut [f64], &'a mut [f64]);
impl<T: Real> Acc<T> for PerChan<'_> {
    #[inline(always)]
    fn block(&mut self, i0: usize, u: &[T; LANES], v: &[T; LANES], w: &[T; LANES]) {
        let a = &mut self.0[i0..i0 + LANES];
        let b = &mut self.1[i0..i0 + LANES];
        let e = &mut self.2[i0..i0 + LANES];
        for j in 0..LANES {
            a[j] += r64(u[j]);
            b[j] += r64(v[j]);
            e[j] += r64(w[j]);
        }
    }
    #[inline(always)]
    fn one(&mut self, i: usize, u: T, v: T, w: T) {
        self.0[i] += r64(u);
        self.1[i] += r64(v);
        self.2[i] += r64(w);
    }
}

/// Backward of [`fwd_loop`] for one plane or row: writes `dx` and hands the
/// partials to `acc` (`dp1 = Σ dy·x·∂y/∂d`, `dp2 = Σ dy·x − dp1`, `dβ = Σ dy·∂y/∂β`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn bwd_loop<T: Real, const PIX: bool>(
    dy: &[T],
    x: &[T],
    dx: &mut [T],
    p1: impl Src<T>,
    p2: impl Src<T>,
    beta: impl Src<T>,
    acc: &mut impl Acc<T>,
) {
    let n = x.len().min(dx.len()).min(dy.len());
    let (dy, x, dx) = (&dy[..n], &x[..n], &mut dx[..n]);
    let mut oc = dx.chunks_exact_mut(LANES);
    let mut gc = dy.chunks_exact(LANES);
    let mut xc = x.chunks_exact(LANES);
    let mut i0 = 0;
    for ((ob, gb), xb) in (&mut oc).zip(&mut gc).zip(&mut xc) {
        let (xa, ga) = (arr(xb), arr(gb));
        let (a, b, bt) = (p1.block(i0, &xa), p2.block(i0, &xa), beta.block(i0, &xa));
        let mut u = [T::zero(); LANES];
        let mut v = [T::zero(); LANES];
        let mut w = [T::zero(); LANES];
        for j in 0..LANES {
            let r = bwd_elem::<T, PIX>(ga[j], xa[j], a[j], b[j], bt[j]);
            ob[j] = r.0;
            u[j] = r.1;
            v[j] = r.2;
            w[j] = r.3;
        }
        acc.block(i0, &u, &v, &w);
        i0 += LANES;
    }
    let tail = oc
        .into_remainder()
        .iter_mut()
        .zip(gc.remainder())
        .zip(xc.remainder());
    for (k, ((o, &g), &xv)) in tail.enumerate() {
        let i = i0 + k;
        let r = bwd_elem::<T, PIX>(g, xv, p1.at(i, xv), p2.at(i, xv), beta.at(i, xv));
        *o = r.0;
        acc.one(i, r.1, r.2, r.3);
    }
}

/// `bwd_loop` without pixel-wise β.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn bwd_loop_np<T: Real, A: Src<T>, B: Src<T>, C: Src<T>, K: Acc<T>>(
    dy: &[T],
    x: &[T],
    dx: &mut [T],
    p1: A,
    p2: B,
    beta: C,
    acc: &mut K,
) {
    bwd_loop::<T, false>(dy, x, dx, p1, p2, beta, acc)
}

/// `bwd_loop` with pixel-wise β.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn bwd_loop_pix<T: Real, A: Src<T>, B: Src<T>, C: Src<T>, K: Acc<T>>(
    dy: &[T],
    x: &[T],
    dx: &mut [T],
    p1: A,
    p2: B,
    beta: C,
    acc: &mut K,
) {
    bwd_loop::<T, true>(dy, x, dx, p1, p2, beta, acc)
}

simd_fn! {
    /// [`fwd_loop`], runtime-dispatched to AVX2 where available.
    fn fwd_plane<T: Real, A: Src<T>, B: Src<T>, C: Src<T>>(
        x: &[T], y: &mut [T], p1: A, p2: B, beta: C,
    ) => fwd_loop;
}

simd_fn! {
    /// [`bwd_loop`] (β not pixel-wise), runtime-dispatched to AVX2 where available.
    fn bwd_plane<T: Real, A: Src<T>, B: Src<T>, C: Src<T>, K: Acc<T>>(
        dy: &[T], x: &[T], dx: &mut [T], p1: A, p2: B, beta: C, acc: &mut K,
    ) => bwd_loop_np;
}

simd_fn! {
    /// [`bwd_loop`] with pixel-wise β, runtime-dispatched to AVX2 where available.
    fn bwd_plane_pix<T: Real, A: Src<T>, B: Src<T>, C: Src<T>, K: Acc<T>>(
        dy: &[T], x: &[T], dx: &mut [T], p1: A, p2: B, beta: C, acc: &mut K,
    ) => bwd_loop_pix;
}

fn nchw_min_len(s: usize) -> usize {
    (GRAIN / s).max(1)
}

fn nlc_block_rows(c: usize) -> usize {
    (GRAIN / c).max(MIN_BLOCK_ROWS)
}

/// Fused ACON-C forward for already validated inputs.
fn core_forward<T: Real>(
    shape: &ActShape,
    x: &[T],
    p1: &[T],
    p2: &[T],
    beta: Beta<'_, T>,
) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    core_forward_into(shape, x, p1, p2, beta, &mut y);
    y
}

/// [`core_forward`] into `y` (`x`'s length; every element is overwritten).
fn core_forward_into<T: Real>(
    shape: &ActShape,
    x: &[T],
    p1: &[T],
    p2: &[T],
    beta: Beta<'_, T>,
    y: &mut [T],
) {
    let (cc, ss) = (shape.c, shape.s);
    match shape.layout {
        Layout::Nchw => {
            y.par_chunks_mut(ss)
                .zip(x.par_chunks(ss))
                .enumerate()
                .with_min_len(nchw_min_len(ss))
                .for_each(|(i, (yp, xp))| {
                    let (n, c) = (i / cc, i % cc);
                    let (a, b) = (Same(p1[c]), Same(p2[c]));
                    match beta {
                        Beta::PerChannel(v) => fwd_plane(xp, yp, a, b, Same(v[c])),
                        Beta::PerSampleChannel(v) => fwd_plane(xp, yp, a, b, Same(v[i])),
                        Beta::PerSample(v) => fwd_plane(xp, yp, a, b, Same(v[n])),
                        Beta::PixelWise => fwd_plane(xp, yp, a, b, Pix),
                    }
                });
        }
        Layout::Nlc => {
            let blk = nlc_block_rows(cc) * cc;
            let (a, b) = (Per(&p1[..cc]), Per(&p2[..cc]));
            y.par_chunks_mut(ss * cc)
                .zip(x.par_chunks(ss * cc))
                .enumerate()
                .for_each(|(n, (ys, xs))| {
                    ys.par_chunks_mut(blk)
                        .zip(xs.par_chunks(blk))
                        .for_each(|(yb, xb)| {
                            for (yr, xr) in yb.chunks_exact_mut(cc).zip(xb.chunks_exact(cc)) {
                                match beta {
                                    Beta::PerChannel(v) => fwd_plane(xr, yr, a, b, Per(&v[..cc])),
                                    Beta::PerSampleChannel(v) => {
                                        fwd_plane(xr, yr, a, b, Per(&v[n * cc..(n + 1) * cc]))
                                    }
                                    Beta::PerSample(v) => fwd_plane(xr, yr, a, b, Same(v[n])),
                                    Beta::PixelWise => fwd_plane(xr, yr, a, b, Pix),
                                }
                            }
                        });
                });
        }
    }
}

/// Result of [`core_backward`]: `dx`, per-channel f64 sums `a = Σ dy·x·∂y/∂d`
/// and `b = Σ dy·x`, and `dβ` shaped as the β source.
struct CoreGrads<T> {
    dx: Vec<T>,
    a: Vec<f64>,
    b: Vec<f64>,
    dbeta: Vec<T>,
}

/// Fused ACON-C backward for already validated inputs (see module docs).
fn core_backward<T: Real>(
    shape: &ActShape,
    dy: &[T],
    x: &[T],
    p1: &[T],
    p2: &[T],
    beta: Beta<'_, T>,
) -> CoreGrads<T> {
    let mut dx = vec![T::zero(); x.len()];
    let (a, b, dbeta) = core_backward_into(shape, dy, x, p1, p2, beta, &mut dx);
    CoreGrads { dx, a, b, dbeta }
}

/// [`core_backward`] writing `dx` into a buffer of `x`'s length (every element is
/// overwritten); returns `(a, b, dβ)`.
#[allow(clippy::type_complexity)]
fn core_backward_into<T: Real>(
    shape: &ActShape,
    dy: &[T],
    x: &[T],
    p1: &[T],
    p2: &[T],
    beta: Beta<'_, T>,
    dx: &mut [T],
) -> (Vec<f64>, Vec<f64>, Vec<T>) {
    let (nn, cc, ss) = (shape.n, shape.c, shape.s);
    let mut a = vec![0.0f64; cc];
    let mut b = vec![0.0f64; cc];
    // Σ over the positions of one (sample, channel) of dy·∂y/∂β: N×C.
    let mut e = vec![0.0f64; nn * cc];
    match shape.layout {
        Layout::Nchw => {
            // Per plane: [Σ dy·x·gd, Σ dy·x, Σ dy·∂y/∂β].
            let mut part = vec![0.0f64; nn * cc * 3];
            dx.par_chunks_mut(ss)
                .zip(part.par_chunks_mut(3))
                .enumerate()
                .with_min_len(nchw_min_len(ss))
                .for_each(|(i, (dxp, pp))| {
                    let (n, c) = (i / cc, i % cc);
                    let xp = &x[i * ss..(i + 1) * ss];
                    let gp = &dy[i * ss..(i + 1) * ss];
                    let (pa, pb) = (Same(p1[c]), Same(p2[c]));
                    let mut acc = Lanes([[0.0; LANES]; 3]);
                    match beta {
                        Beta::PerChannel(v) => bwd_plane(gp, xp, dxp, pa, pb, Same(v[c]), &mut acc),
                        Beta::PerSampleChannel(v) => {
                            bwd_plane(gp, xp, dxp, pa, pb, Same(v[i]), &mut acc)
                        }
                        Beta::PerSample(v) => bwd_plane(gp, xp, dxp, pa, pb, Same(v[n]), &mut acc),
                        Beta::PixelWise => bwd_plane_pix(gp, xp, dxp, pa, pb, Pix, &mut acc),
                    }
                    pp.copy_from_slice(&acc.sums());
                });
            for n in 0..nn {
                for c in 0..cc {
                    let p = &part[(n * cc + c) * 3..(n * cc + c) * 3 + 3];
                    a[c] += p[0];
                    b[c] += p[1];
                    e[n * cc + c] = p[2];
                }
            }
        }
        Layout::Nlc => {
            let rows = nlc_block_rows(cc);
            let blk = rows * cc;
            let nb = ss.div_ceil(rows);
            let (f1, f2) = (Per(&p1[..cc]), Per(&p2[..cc]));
            // Per (sample, block): [a (C), b (C), e (C)].
            let mut part = vec![0.0f64; nn * nb * 3 * cc];
            dx.par_chunks_mut(ss * cc)
                .zip(part.par_chunks_mut(nb * 3 * cc))
                .enumerate()
                .for_each(|(n, (dxs, ps))| {
                    let off = n * ss * cc;
                    dxs.par_chunks_mut(blk)
                        .zip(ps.par_chunks_mut(3 * cc))
                        .enumerate()
                        .for_each(|(k, (dxb, pb))| {
                            let start = off + k * blk;
                            let xb = &x[start..start + dxb.len()];
                            let gb = &dy[start..start + dxb.len()];
                            let (pa_, rest) = pb.split_at_mut(cc);
                            let (pb_, pe_) = rest.split_at_mut(cc);
                            let mut acc = PerChan(pa_, pb_, pe_);
                            for ((dxr, xr), gr) in dxb
                                .chunks_exact_mut(cc)
                                .zip(xb.chunks_exact(cc))
                                .zip(gb.chunks_exact(cc))
                            {
                                match beta {
                                    Beta::PerChannel(v) => {
                                        bwd_plane(gr, xr, dxr, f1, f2, Per(&v[..cc]), &mut acc)
                                    }
                                    Beta::PerSampleChannel(v) => bwd_plane(
                                        gr,
                                        xr,
                                        dxr,
                                        f1,
                                        f2,
                                        Per(&v[n * cc..(n + 1) * cc]),
                                        &mut acc,
                                    ),
                                    Beta::PerSample(v) => {
                                        bwd_plane(gr, xr, dxr, f1, f2, Same(v[n]), &mut acc)
                                    }
                                    Beta::PixelWise => {
                                        bwd_plane_pix(gr, xr, dxr, f1, f2, Pix, &mut acc)
                                    }
                                }
                            }
                        });
                });
            for n in 0..nn {
                let en = &mut e[n * cc..(n + 1) * cc];
                for k in 0..nb {
                    let p = &part[(n * nb + k) * 3 * cc..(n * nb + k + 1) * 3 * cc];
                    for c in 0..cc {
                        a[c] += p[c];
                        b[c] += p[cc + c];
                        en[c] += p[2 * cc + c];
                    }
                }
            }
        }
    }
    let dbeta = match beta {
        Beta::PerChannel(_) => (0..cc)
            .map(|c| T::of((0..nn).map(|n| e[n * cc + c]).sum()))
            .collect(),
        Beta::PerSampleChannel(_) => e.iter().map(|&v| T::of(v)).collect(),
        Beta::PerSample(_) => e.chunks_exact(cc).map(|r| T::of(r.iter().sum())).collect(),
        Beta::PixelWise => Vec::new(),
    };
    (a, b, dbeta)
}

// ---------------------------------------------------------------------------
// ACON-C / -B / -A.

fn check_params<T>(shape: &ActShape, what: &'static str, p: &[T]) -> Result<()> {
    check_len(what, shape.c, p.len())
}

/// ACON-C forward (SPEC §2): `y = d·σ(β·d) + p2·x` with `d = (p1 − p2)·x`;
/// `p1`, `p2` per channel (length `C`), β from `beta`.
///
/// Gradient (see [`acon_c_backward`]): with `s = σ(β·d)`,
/// `∂y/∂d = s + β·d·s(1 − s)`.
///
/// Errors: `Empty` for a zero dimension, `LengthMismatch` for `x`, `p1`, `p2`
/// or the β buffer.
///
/// # Example (forward and backward)
///
/// ```
/// use activation_kernels::cpu::acon::{acon_c_backward, acon_c_forward, Beta};
/// use activation_kernels::ActShape;
/// use approx::assert_relative_eq;
///
/// let shape = ActShape::nchw(1, 2, 1, 2); // N = 1, C = 2, 2 positions
/// let x = [0.5, -1.0, 2.0, -0.25]; // channel 0: x[0..2], channel 1: x[2..4]
/// let (p1, p2, beta) = ([1.0, 0.5], [0.0, 0.25], [1.0, 2.0]);
/// let y = acon_c_forward(&shape, &x, &p1, &p2, Beta::PerChannel(&beta))?;
/// // Element 2 (channel 1): d = (p1 − p2)·x = 0.5, y = d·σ(β·d) + p2·x.
/// let sigma = |v: f64| 1.0 / (1.0 + (-v).exp());
/// assert_relative_eq!(y[2], 0.5 * sigma(2.0 * 0.5) + 0.25 * 2.0, max_relative = 1e-12);
///
/// // Backward of L = Σ y (dy = 1): every gradient against a central difference.
/// let g = acon_c_backward(&shape, &[1.0; 4], &x, &p1, &p2, Beta::PerChannel(&beta))?;
/// let loss = |x: &[f64], p1: &[f64], p2: &[f64], b: &[f64]| -> f64 {
///     acon_c_forward(&shape, x, p1, p2, Beta::PerChannel(b)).unwrap().iter().sum()
/// };
/// let h = 1e-6;
/// let fd = |f: &dyn Fn(f64) -> f64| (f(h) - f(-h)) / (2.0 * h);
/// let dx2 = fd(&|e| loss(&[0.5, -1.0, 2.0 + e, -0.25], &p1, &p2, &beta));
/// let dp1 = fd(&|e| loss(&x, &[1.0, 0.5 + e], &p2, &beta));
/// let dp2 = fd(&|e| loss(&x, &p1, &[0.0, 0.25 + e], &beta));
/// let dbeta = fd(&|e| loss(&x, &p1, &p2, &[1.0, 2.0 + e]));
/// assert_relative_eq!(g.dx[2], dx2, max_relative = 1e-6);
/// assert_relative_eq!(g.dp1[1], dp1, max_relative = 1e-6);
/// assert_relative_eq!(g.dp2[1], dp2, max_relative = 1e-6);
/// assert_relative_eq!(g.dbeta[1], dbeta, max_relative = 1e-6);
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn acon_c_forward<T: Real>(
    shape: &ActShape,
    x: &[T],
    p1: &[T],
    p2: &[T],
    beta: Beta<'_, T>,
) -> Result<Vec<T>> {
    shape.validate("x", x.len())?;
    check_params(shape, "p1", p1)?;
    check_params(shape, "p2", p2)?;
    beta.validate(shape)?;
    Ok(core_forward(shape, x, p1, p2, beta))
}

/// ACON-C backward: given `dy = ∂L/∂y`, returns
/// * `dx = dy·((p1 − p2)·∂y/∂d + p2)` (+ `dy·∂y/∂β·σ(x)(1 − σ(x))` for [`Beta::PixelWise`]),
/// * `dp1 = Σ dy·x·∂y/∂d`, `dp2 = Σ dy·(x − x·∂y/∂d)` (sums over N and positions),
/// * `dβ = Σ dy·d²·s(1 − s)` summed over the elements sharing each β,
///
/// with `s = σ(β·d)`, `∂y/∂d = s + β·d·s(1 − s)`. Sums are in f64 and
/// deterministic (fixed-order two-stage reduction). `dp2` is formed as
/// `Σ dy·x − dp1` in f64.
///
/// Errors: as [`acon_c_forward`], plus `LengthMismatch` for `dy`.
///
/// Example: [`acon_c_forward`]'s runs the forward and this backward and checks every
/// gradient against a central finite difference.
pub fn acon_c_backward<T: Real>(
    shape: &ActShape,
    dy: &[T],
    x: &[T],
    p1: &[T],
    p2: &[T],
    beta: Beta<'_, T>,
) -> Result<AconCGrads<T>> {
    shape.validate("x", x.len())?;
    check_len("dy", x.len(), dy.len())?;
    check_params(shape, "p1", p1)?;
    check_params(shape, "p2", p2)?;
    beta.validate(shape)?;
    let g = core_backward(shape, dy, x, p1, p2, beta);
    Ok(AconCGrads {
        dx: g.dx,
        dp1: g.a.iter().map(|&v| T::of(v)).collect(),
        dp2: g.b.iter().zip(&g.a).map(|(&b, &a)| T::of(b - a)).collect(),
        dbeta: g.dbeta,
    })
}

/// [`acon_c_forward`] writing `y` into a caller-owned buffer of `x`'s length (every
/// element is overwritten): a training loop can reuse its output memory instead of
/// paying for a fresh, zero-filled allocation per call. Same formula, same bits.
///
/// Errors: as [`acon_c_forward`], plus `LengthMismatch` for `y`. On `Err`, `y` is
/// untouched.
///
/// # Example (forward and backward into reused buffers)
///
/// ```
/// use activation_kernels::cpu::acon::{
///     acon_c_backward, acon_c_backward_into, acon_c_forward, acon_c_forward_into, AconCGrads,
///     Beta,
/// };
/// use activation_kernels::ActShape;
///
/// let shape = ActShape::nlc(1, 3, 2); // 3 tokens of 2 channels, channels last
/// let x = [0.5f32, -1.0, 2.0, -0.25, 0.0, 3.0];
/// let (p1, p2, beta) = ([1.0, 0.5], [0.0, 0.25], [1.0, 2.0]);
/// let (mut y, mut grads) = (vec![0.0f32; 6], AconCGrads::default());
/// for step in 0..2 {
///     // The same buffers every step: no allocation for y or dx after the first.
///     acon_c_forward_into(&shape, &x, &p1, &p2, Beta::PerChannel(&beta), &mut y)?;
///     acon_c_backward_into(&shape, &y, &x, &p1, &p2, Beta::PerChannel(&beta), &mut grads)?;
/// }
/// // Same bits as the allocating ops.
/// assert_eq!(y, acon_c_forward(&shape, &x, &p1, &p2, Beta::PerChannel(&beta))?);
/// assert_eq!(grads, acon_c_backward(&shape, &y, &x, &p1, &p2, Beta::PerChannel(&beta))?);
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn acon_c_forward_into<T: Real>(
    shape: &ActShape,
    x: &[T],
    p1: &[T],
    p2: &[T],
    beta: Beta<'_, T>,
    y: &mut [T],
) -> Result<()> {
    shape.validate("x", x.len())?;
    check_len("y", x.len(), y.len())?;
    check_params(shape, "p1", p1)?;
    check_params(shape, "p2", p2)?;
    beta.validate(shape)?;
    core_forward_into(shape, x, p1, p2, beta, y);
    Ok(())
}

/// [`acon_c_backward`] writing into a caller-owned [`AconCGrads`]: `dx` is resized
/// to `x`'s length only if it has another length (keeping its allocation otherwise)
/// and every element is overwritten; the small parameter gradients are replaced.
/// Same formulas, same bits as [`acon_c_backward`].
///
/// Errors: as [`acon_c_backward`]. On `Err`, `grads` is untouched.
///
/// Example: [`acon_c_forward_into`]'s runs both `_into` ops.
pub fn acon_c_backward_into<T: Real>(
    shape: &ActShape,
    dy: &[T],
    x: &[T],
    p1: &[T],
    p2: &[T],
    beta: Beta<'_, T>,
    grads: &mut AconCGrads<T>,
) -> Result<()> {
    shape.validate("x", x.len())?;
    check_len("dy", x.len(), dy.len())?;
    check_params(shape, "p1", p1)?;
    check_params(shape, "p2", p2)?;
    beta.validate(shape)?;
    fit(&mut grads.dx, x.len());
    let (a, b, dbeta) = core_backward_into(shape, dy, x, p1, p2, beta, &mut grads.dx);
    grads.dp1 = a.iter().map(|&v| T::of(v)).collect();
    grads.dp2 = b.iter().zip(&a).map(|(&b, &a)| T::of(b - a)).collect();
    grads.dbeta = dbeta;
    Ok(())
}

/// ACON-B forward: `y = (1 − p)·x·σ(β(1 − p)·x) + p·x` with `p` per channel
/// (ACON-C with `p1 = 1`, `p2 = p`).
///
/// Errors: `Empty`, or `LengthMismatch` for `x`, `p` or the β buffer.
///
/// # Example (forward and backward)
///
/// ```
/// use activation_kernels::cpu::acon::{acon_b_backward, acon_b_forward, Beta};
/// use activation_kernels::ActShape;
/// use approx::assert_relative_eq;
///
/// let shape = ActShape::nchw(2, 1, 1, 1); // two samples, one channel, one pixel
/// let (x, p) = ([1.5, -2.0], [0.25]);
/// let beta = [3.0, 0.5]; // one β per sample
/// let y = acon_b_forward(&shape, &x, &p, Beta::PerSample(&beta))?;
/// // Sample 1: d = (1 − p)·x = −1.5, y = d·σ(β·d) + p·x.
/// let sigma = |v: f64| 1.0 / (1.0 + (-v).exp());
/// assert_relative_eq!(y[1], -1.5 * sigma(0.5 * -1.5) + 0.25 * -2.0, max_relative = 1e-12);
///
/// // Backward of L = Σ y: ∂L/∂p against a central difference.
/// let g = acon_b_backward(&shape, &[1.0, 1.0], &x, &p, Beta::PerSample(&beta))?;
/// let loss = |p: f64| -> f64 {
///     acon_b_forward(&shape, &x, &[p], Beta::PerSample(&beta)).unwrap().iter().sum()
/// };
/// let h = 1e-6;
/// assert_relative_eq!(g.dp[0], (loss(0.25 + h) - loss(0.25 - h)) / (2.0 * h), max_relative = 1e-6);
/// assert_eq!((g.dx.len(), g.dbeta.len()), (2, 2));
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn acon_b_forward<T: Real>(
    shape: &ActShape,
    x: &[T],
    p: &[T],
    beta: Beta<'_, T>,
) -> Result<Vec<T>> {
    shape.validate("x", x.len())?;
    check_params(shape, "p", p)?;
    beta.validate(shape)?;
    let ones = vec![T::one(); shape.c];
    Ok(core_forward(shape, x, &ones, p, beta))
}

/// ACON-B backward: the ACON-C gradients with `p1 = 1`, `p2 = p`:
/// `dx = dy·((1 − p)·∂y/∂d + p)` (+ the β path for [`Beta::PixelWise`]),
/// `dp = Σ dy·(x − x·∂y/∂d)`, `dβ = Σ dy·d²·s(1 − s)`, `d = (1 − p)·x`.
///
/// Errors: as [`acon_b_forward`], plus `LengthMismatch` for `dy`.
///
/// Example: [`acon_b_forward`]'s runs the forward and this backward.
pub fn acon_b_backward<T: Real>(
    shape: &ActShape,
    dy: &[T],
    x: &[T],
    p: &[T],
    beta: Beta<'_, T>,
) -> Result<AconBGrads<T>> {
    shape.validate("x", x.len())?;
    check_len("dy", x.len(), dy.len())?;
    check_params(shape, "p", p)?;
    beta.validate(shape)?;
    let ones = vec![T::one(); shape.c];
    let g = core_backward(shape, dy, x, &ones, p, beta);
    Ok(AconBGrads {
        dx: g.dx,
        dp: g.b.iter().zip(&g.a).map(|(&b, &a)| T::of(b - a)).collect(),
        dbeta: g.dbeta,
    })
}

/// ACON-A (Swish) forward: `y = x·σ(β·x)` (ACON-C with `p1 = 1`, `p2 = 0`).
///
/// Errors: `Empty`, or `LengthMismatch` for `x` or the β buffer.
///
/// # Example (forward and backward)
///
/// ```
/// use activation_kernels::cpu::acon::{acon_a_backward, acon_a_forward, Beta};
/// use activation_kernels::ActShape;
/// use approx::assert_relative_eq;
///
/// let shape = ActShape::nchw(1, 1, 2, 2);
/// let x = [1.0, -1.0, 0.0, 2.0];
/// let y = acon_a_forward(&shape, &x, Beta::PerChannel(&[1.0]))?; // Swish (SiLU) at β = 1
/// assert_relative_eq!(y[0], 1.0 / (1.0 + (-1.0f64).exp()), max_relative = 1e-12);
/// assert_eq!(y[2], 0.0);
///
/// // Backward of L = Σ y: ∂L/∂β against a central difference.
/// let g = acon_a_backward(&shape, &[1.0; 4], &x, Beta::PerChannel(&[1.0]))?;
/// let loss = |b: f64| -> f64 {
///     acon_a_forward(&shape, &x, Beta::PerChannel(&[b])).unwrap().iter().sum()
/// };
/// let h = 1e-6;
/// assert_relative_eq!(g.dbeta[0], (loss(1.0 + h) - loss(1.0 - h)) / (2.0 * h), max_relative = 1e-6);
/// // SiLU'(0) = 1/2.
/// assert_relative_eq!(g.dx[2], 0.5);
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn acon_a_forward<T: Real>(shape: &ActShape, x: &[T], beta: Beta<'_, T>) -> Result<Vec<T>> {
    shape.validate("x", x.len())?;
    beta.validate(shape)?;
    let ones = vec![T::one(); shape.c];
    let zeros = vec![T::zero(); shape.c];
    Ok(core_forward(shape, x, &ones, &zeros, beta))
}

/// ACON-A backward: with `s = σ(β·x)`,
/// `dx = dy·(s + β·x·s(1 − s))` (+ `dy·x²·s(1 − s)·σ(x)(1 − σ(x))` for
/// [`Beta::PixelWise`]) and `dβ = Σ dy·x²·s(1 − s)`.
///
/// Errors: as [`acon_a_forward`], plus `LengthMismatch` for `dy`.
///
/// Example: [`acon_a_forward`]'s runs the forward and this backward.
pub fn acon_a_backward<T: Real>(
    shape: &ActShape,
    dy: &[T],
    x: &[T],
    beta: Beta<'_, T>,
) -> Result<AconAGrads<T>> {
    shape.validate("x", x.len())?;
    check_len("dy", x.len(), dy.len())?;
    beta.validate(shape)?;
    let ones = vec![T::one(); shape.c];
    let zeros = vec![T::zero(); shape.c];
    let g = core_backward(shape, dy, x, &ones, &zeros, beta);
    Ok(AconAGrads {
        dx: g.dx,
        dbeta: g.dbeta,
    })
}

// ---------------------------------------------------------------------------
// meta-ACON generators.

/// Global average pool in f64: `N × C`, `gap[n, c] = mean_s x[n, c, s]`.
fn gap_f64<T: Real>(shape: &ActShape, x: &[T]) -> Vec<f64> {
    let (cc, ss) = (shape.c, shape.s);
    let inv = 1.0 / ss as f64;
    let mut g = vec![0.0f64; shape.n * cc];
    match shape.layout {
        Layout::Nchw => {
            g.par_iter_mut()
                .zip(x.par_chunks(ss))
                .with_min_len(nchw_min_len(ss))
                .for_each(|(o, p)| *o = p.iter().map(|&v| r64(v)).sum::<f64>() * inv);
        }
        Layout::Nlc => {
            g.par_chunks_mut(cc)
                .zip(x.par_chunks(ss * cc))
                .for_each(|(o, xs)| {
                    for r in xs.chunks_exact(cc) {
                        for (a, v) in o.iter_mut().zip(r) {
                            *a += r64(*v);
                        }
                    }
                    for a in o.iter_mut() {
                        *a *= inv;
                    }
                });
        }
    }
    g
}

/// Writes `dx[n, c, s] = dgap[n, c] / S` (the backward of GAP) into a new buffer.
fn gap_backward<T: Real>(shape: &ActShape, dgap: &[f64]) -> Vec<T> {
    let (cc, ss) = (shape.c, shape.s);
    let inv = 1.0 / ss as f64;
    let mut dx = vec![T::zero(); shape.n * cc * ss];
    add_gap_backward(shape, dgap, inv, &mut dx);
    dx
}

/// `dx[n, c, s] += dgap[n, c]·scale`.
fn add_gap_backward<T: Real>(shape: &ActShape, dgap: &[f64], scale: f64, dx: &mut [T]) {
    let (cc, ss) = (shape.c, shape.s);
    match shape.layout {
        Layout::Nchw => {
            dx.par_chunks_mut(ss)
                .zip(dgap.par_iter())
                .with_min_len(nchw_min_len(ss))
                .for_each(|(p, &g)| {
                    let v = T::of(g * scale);
                    for o in p {
                        *o = *o + v;
                    }
                });
        }
        Layout::Nlc => {
            dx.par_chunks_mut(ss * cc)
                .zip(dgap.par_chunks(cc))
                .for_each(|(xs, gn)| {
                    let v: Vec<T> = gn.iter().map(|&g| T::of(g * scale)).collect();
                    for r in xs.chunks_exact_mut(cc) {
                        for (o, &w) in r.iter_mut().zip(&v) {
                            *o = *o + w;
                        }
                    }
                });
        }
    }
}

/// Channel-wise meta-ACON β generator (SPEC §2, authors' code without the BNs):
/// `β[n, :] = σ(W2·(W1·GAP(x)[n, :] + b1) + b2)`, no non-linearity between the
/// two fully connected layers. `W1` is `(width, C)` and `W2` is `(C, width)`,
/// both row-major; the biases are optional (the authors' 1×1 convs have them;
/// their BatchNorms belong to the user's stack).
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelGen<T> {
    /// Channels C.
    pub c: usize,
    /// Hidden width; the authors use `max(r, C / r)` (integer division), see [`ChannelGen::width_for`].
    pub width: usize,
    /// `W1`, `(width, C)` row-major.
    pub w1: Vec<T>,
    /// Optional `b1`, length `width`.
    pub b1: Option<Vec<T>>,
    /// `W2`, `(C, width)` row-major.
    pub w2: Vec<T>,
    /// Optional `b2`, length `C`.
    pub b2: Option<Vec<T>>,
}

/// What [`ChannelGen::backward`] needs from its forward (kept in f64, the
/// precision the generator is computed in). Opaque; tied to the shape it was
/// produced for.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelGenSaved {
    shape: ActShape,
    width: usize,
    /// GAP(x), N×C.
    gap: Vec<f64>,
    /// Hidden `W1·gap + b1`, N×width.
    h: Vec<f64>,
    /// β, N×C.
    beta: Vec<f64>,
}

/// Gradients of [`ChannelGen::backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelGenGrads<T> {
    /// `∂L/∂x` through GAP, full shape of `x`.
    pub dx: Vec<T>,
    /// `∂L/∂W1`, `(width, C)`.
    pub dw1: Vec<T>,
    /// `∂L/∂b1` (`width`), `None` if the generator has no `b1`.
    pub db1: Option<Vec<T>>,
    /// `∂L/∂W2`, `(C, width)`.
    pub dw2: Vec<T>,
    /// `∂L/∂b2` (`C`), `None` if the generator has no `b2`.
    pub db2: Option<Vec<T>>,
}

/// Parameter grads and `∂L/∂GAP` of the channel generator (internal).
struct GenInner {
    dgap: Vec<f64>,
    dw1: Vec<f64>,
    db1: Vec<f64>,
    dw2: Vec<f64>,
    db2: Vec<f64>,
}

/// Checks a channel-wise generator's dimensions against `shape` (shared by the CPU
/// and CUDA generators): `C` and `width` non-zero, `C` equal to the tensor's,
/// `w1`/`w2` of `width·C` elements, `b1` of `width`, `b2` of `C` (when present).
pub(crate) fn check_gen_dims(
    c: usize,
    width: usize,
    shape: &ActShape,
    [w1_len, w2_len]: [usize; 2],
    [b1_len, b2_len]: [Option<usize>; 2],
) -> Result<()> {
    check_nonzero("generator channels C", c)?;
    check_nonzero("generator width", width)?;
    if c != shape.c {
        return Err(Error::Shape {
            what: "generator",
            msg: format!("built for C = {c}, tensor has C = {}", shape.c),
        });
    }
    let wc = width.checked_mul(c).ok_or_else(|| Error::Shape {
        what: "generator",
        msg: "width·C overflows usize".into(),
    })?;
    check_len("w1 (width×C)", wc, w1_len)?;
    check_len("w2 (C×width)", wc, w2_len)?;
    if let Some(b) = b1_len {
        check_len("b1 (width)", width, b)?;
    }
    if let Some(b) = b2_len {
        check_len("b2 (C)", c, b)?;
    }
    Ok(())
}

impl<T: Real> ChannelGen<T> {
    /// Hidden width `max(r, C / r)` of the authors' code. `Err(InvalidParam)` if
    /// `r == 0`, `Err(Empty)` if `c == 0`.
    pub fn width_for(c: usize, r: usize) -> Result<usize> {
        check_nonzero("channels C", c)?;
        if r == 0 {
            return Err(Error::InvalidParam {
                what: "r",
                msg: "reduction ratio must be >= 1".into(),
            });
        }
        Ok(r.max(c / r))
    }

    /// A generator for `c` channels with width [`ChannelGen::width_for`]`(c, r)`,
    /// initialised as PyTorch initialises the authors' 1×1 convolutions:
    /// weights and biases uniform in `±1/sqrt(fan_in)` (fan_in = C for W1/b1,
    /// width for W2/b2), drawn from splitmix64 seeded with `seed` in the order
    /// W1, b1, W2, b2. `bias = false` leaves both biases `None`.
    pub fn init(c: usize, r: usize, bias: bool, seed: u64) -> Result<Self> {
        let width = Self::width_for(c, r)?;
        width.checked_mul(c).ok_or_else(|| Error::Shape {
            what: "generator",
            msg: "width·C overflows usize".into(),
        })?;
        let mut rng = SplitMix64(seed);
        let mut draw = |n: usize, fan_in: usize| -> Vec<T> {
            let k = 1.0 / (fan_in as f64).sqrt();
            (0..n)
                .map(|_| T::of((2.0 * rng.uniform() - 1.0) * k))
                .collect()
        };
        let w1 = draw(width * c, c);
        let b1 = bias.then(|| draw(width, c));
        let w2 = draw(c * width, width);
        let b2 = bias.then(|| draw(c, width));
        Ok(Self {
            c,
            width,
            w1,
            b1,
            w2,
            b2,
        })
    }

    /// Checks the generator's own buffers and that it matches `shape`.
    fn validate(&self, shape: &ActShape) -> Result<()> {
        check_gen_dims(
            self.c,
            self.width,
            shape,
            [self.w1.len(), self.w2.len()],
            [
                self.b1.as_ref().map(Vec::len),
                self.b2.as_ref().map(Vec::len),
            ],
        )
    }

    /// Forward: returns `β` (`N × C`, use as [`Beta::PerSampleChannel`]) and what
    /// the backward needs. GAP and both fc layers are computed in f64.
    ///
    /// Errors: `Empty`/`LengthMismatch` for `x`; `Shape` if the generator's `C`
    /// differs from the tensor's; `Empty` for width 0; `LengthMismatch` for
    /// `w1`, `w2`, `b1`, `b2`.
    ///
    /// # Example (forward and backward)
    ///
    /// ```
    /// use activation_kernels::cpu::acon::ChannelGen;
    /// use activation_kernels::ActShape;
    /// use approx::assert_relative_eq;
    ///
    /// let gen = ChannelGen::<f64>::init(4, 2, true, 7)?; // C = 4, width max(2, 4/2) = 2
    /// let shape = ActShape::nchw(2, 4, 1, 2);
    /// let x: Vec<f64> = (0..16).map(|i| (i as f64 - 7.5) / 4.0).collect();
    /// let (beta, saved) = gen.forward(&shape, &x)?;
    /// assert_eq!(beta.len(), 2 * 4); // one β per (sample, channel), each in (0, 1)
    /// assert!(beta.iter().all(|&b| b > 0.0 && b < 1.0));
    ///
    /// // Backward of L = Σ β: ∂L/∂x[0] and ∂L/∂W1[0] against central differences.
    /// let g = gen.backward(&shape, &[1.0; 8], &saved)?;
    /// assert_eq!((g.dw1.len(), g.dw2.len(), g.db1.as_ref().map(Vec::len)), (8, 8, Some(2)));
    /// let loss = |gen: &ChannelGen<f64>, x: &[f64]| -> f64 {
    ///     gen.forward(&shape, x).unwrap().0.iter().sum()
    /// };
    /// let h = 1e-6;
    /// let (mut xp, mut xm) = (x.clone(), x.clone());
    /// xp[0] += h;
    /// xm[0] -= h;
    /// let (mut gp, mut gm) = (gen.clone(), gen.clone());
    /// gp.w1[0] += h;
    /// gm.w1[0] -= h;
    /// assert_relative_eq!(g.dx[0], (loss(&gen, &xp) - loss(&gen, &xm)) / (2.0 * h), max_relative = 1e-6);
    /// assert_relative_eq!(g.dw1[0], (loss(&gp, &x) - loss(&gm, &x)) / (2.0 * h), max_relative = 1e-6);
    /// # Ok::<(), activation_kernels::Error>(())
    /// ```
    pub fn forward(&self, shape: &ActShape, x: &[T]) -> Result<(Vec<T>, ChannelGenSaved)> {
        shape.validate("x", x.len())?;
        self.validate(shape)?;
        let (nn, cc, wd) = (shape.n, self.c, self.width);
        let gap = gap_f64(shape, x);
        let mut h = vec![0.0f64; nn * wd];
        let mut beta = vec![0.0f64; nn * cc];
        for n in 0..nn {
            let g = &gap[n * cc..(n + 1) * cc];
            let hn = &mut h[n * wd..(n + 1) * wd];
            for (j, o) in hn.iter_mut().enumerate() {
                let row = &self.w1[j * cc..(j + 1) * cc];
                let b = self.b1.as_ref().map_or(0.0, |b| r64(b[j]));
                *o = b + row.iter().zip(g).map(|(&w, v)| r64(w) * v).sum::<f64>();
            }
            for (c, o) in beta[n * cc..(n + 1) * cc].iter_mut().enumerate() {
                let row = &self.w2[c * wd..(c + 1) * wd];
                let b = self.b2.as_ref().map_or(0.0, |b| r64(b[c]));
                let z = b + row.iter().zip(&*hn).map(|(&w, v)| r64(w) * v).sum::<f64>();
                *o = sigmoid(z);
            }
        }
        let out = beta.iter().map(|&v| T::of(v)).collect();
        Ok((
            out,
            ChannelGenSaved {
                shape: *shape,
                width: wd,
                gap,
                h,
                beta,
            },
        ))
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

    /// Backward through σ, both fc layers and GAP, in f64 (deterministic:
    /// sequential fixed-order sums). With `z = W2·h + b2`, `h = W1·g + b1`,
    /// `g = GAP(x)`:
    /// `dz = dβ·β(1 − β)`, `dW2 = Σ_n dz ⊗ h`, `db2 = Σ_n dz`, `dh = W2ᵀ·dz`,
    /// `dW1 = Σ_n dh ⊗ g`, `db1 = Σ_n dh`, `dg = W1ᵀ·dh`, `dx[n, c, s] = dg[n, c]/S`.
    ///
    /// Errors: `LengthMismatch` for `dbeta` (`N × C`); `Shape` if `saved` came from
    /// another shape or width; as [`ChannelGen::forward`] for the generator.
    ///
    /// Example: [`ChannelGen::forward`]'s runs the forward and this backward.
    pub fn backward(
        &self,
        shape: &ActShape,
        dbeta: &[T],
        saved: &ChannelGenSaved,
    ) -> Result<ChannelGenGrads<T>> {
        shape.numel()?;
        check_nonzero("batch N", shape.n)?;
        check_nonzero("channels C", shape.c)?;
        check_nonzero("positions S (H·W or L)", shape.s)?;
        self.validate(shape)?;
        check_len("dbeta (N×C)", shape.n * shape.c, dbeta.len())?;
        self.check_saved(shape, saved)?;
        let g = self.backward_inner(shape, dbeta, saved);
        let cv = |v: &[f64]| v.iter().map(|&a| T::of(a)).collect::<Vec<T>>();
        Ok(ChannelGenGrads {
            dx: gap_backward(shape, &g.dgap),
            dw1: cv(&g.dw1),
            db1: self.b1.as_ref().map(|_| cv(&g.db1)),
            dw2: cv(&g.dw2),
            db2: self.b2.as_ref().map(|_| cv(&g.db2)),
        })
    }

    fn backward_inner(&self, shape: &ActShape, dbeta: &[T], saved: &ChannelGenSaved) -> GenInner {
        let (nn, cc, wd) = (shape.n, self.c, self.width);
        let mut dw1 = vec![0.0f64; wd * cc];
        let mut db1 = vec![0.0f64; wd];
        let mut dw2 = vec![0.0f64; cc * wd];
        let mut db2 = vec![0.0f64; cc];
        let mut dgap = vec![0.0f64; nn * cc];
        let mut dz = vec![0.0f64; cc];
        let mut dh = vec![0.0f64; wd];
        for n in 0..nn {
            let h = &saved.h[n * wd..(n + 1) * wd];
            let g = &saved.gap[n * cc..(n + 1) * cc];
            for c in 0..cc {
                let b = saved.beta[n * cc + c];
                dz[c] = r64(dbeta[n * cc + c]) * b * (1.0 - b);
            }
            dh.iter_mut().for_each(|v| *v = 0.0);
            for c in 0..cc {
                let row = &self.w2[c * wd..(c + 1) * wd];
                let drow = &mut dw2[c * wd..(c + 1) * wd];
                let z = dz[c];
                db2[c] += z;
                for j in 0..wd {
                    drow[j] += z * h[j];
                    dh[j] += r64(row[j]) * z;
                }
            }
            let dg = &mut dgap[n * cc..(n + 1) * cc];
            for j in 0..wd {
                let row = &self.w1[j * cc..(j + 1) * cc];
                let drow = &mut dw1[j * cc..(j + 1) * cc];
                let v = dh[j];
                db1[j] += v;
                for c in 0..cc {
                    drow[c] += v * g[c];
                    dg[c] += r64(row[c]) * v;
                }
            }
        }
        GenInner {
            dgap,
            dw1,
            db1,
            dw2,
            db2,
        }
    }
}

/// Layer-wise meta-ACON generator: `β[n] = σ(Σ_c GAP(x)[n, c])` (SPEC §2 / the
/// paper's Table 5; the sum of per-channel means, not the raw sum of the paper's
/// eq. in §3.1). Returns β of length `N` (use as [`Beta::PerSample`]); computed in f64.
///
/// Errors: `Empty`/`LengthMismatch` for `x`.
///
/// # Example (forward and backward)
///
/// ```
/// use activation_kernels::cpu::acon::{layer_gen_backward, layer_gen_forward};
/// use activation_kernels::ActShape;
/// use approx::assert_relative_eq;
///
/// let shape = ActShape::nchw(1, 2, 1, 2);
/// let x = [1.0, 3.0, -1.0, 0.0]; // channel means 2 and −0.5
/// let beta = layer_gen_forward(&shape, &x)?;
/// assert_relative_eq!(beta[0], 1.0 / (1.0 + (-1.5f64).exp()), max_relative = 1e-12);
///
/// // Backward of L = β[0]: dx = β(1 − β)/S at every element (S = 2).
/// let dx = layer_gen_backward(&shape, &[1.0], &beta)?;
/// let want = beta[0] * (1.0 - beta[0]) / 2.0;
/// assert!(dx.iter().all(|&d| (d - want).abs() < 1e-15));
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn layer_gen_forward<T: Real>(shape: &ActShape, x: &[T]) -> Result<Vec<T>> {
    shape.validate("x", x.len())?;
    let gap = gap_f64(shape, x);
    Ok(gap
        .chunks_exact(shape.c)
        .map(|g| T::of(sigmoid(g.iter().sum::<f64>())))
        .collect())
}

/// Backward of [`layer_gen_forward`], given its output `beta` (length `N`):
/// `dx[n, c, s] = dβ[n]·β[n](1 − β[n]) / S`.
///
/// Errors: `Empty` for a zero dimension, `LengthMismatch` for `dbeta` or `beta`.
///
/// Example: [`layer_gen_forward`]'s runs the forward and this backward.
pub fn layer_gen_backward<T: Real>(shape: &ActShape, dbeta: &[T], beta: &[T]) -> Result<Vec<T>> {
    shape.numel()?;
    check_nonzero("batch N", shape.n)?;
    check_nonzero("channels C", shape.c)?;
    check_nonzero("positions S (H·W or L)", shape.s)?;
    check_len("dbeta (N)", shape.n, dbeta.len())?;
    check_len("beta (N)", shape.n, beta.len())?;
    let dg = layer_dgap(shape, dbeta, beta);
    Ok(gap_backward(shape, &dg))
}

/// `∂L/∂GAP[n, c] = dβ[n]·β(1 − β)` for the layer-wise generator (N × C).
fn layer_dgap<T: Real>(shape: &ActShape, dbeta: &[T], beta: &[T]) -> Vec<f64> {
    let mut dg = vec![0.0f64; shape.n * shape.c];
    for (n, row) in dg.chunks_exact_mut(shape.c).enumerate() {
        let b = r64(beta[n]);
        row.fill(r64(dbeta[n]) * b * (1.0 - b));
    }
    dg
}

// ---------------------------------------------------------------------------
// Full meta-ACON-C.

/// Which meta-ACON generator produces β for [`meta_acon_c_forward`].
#[derive(Debug, Clone, Copy)]
pub enum MetaGen<'a, T> {
    /// Channel-wise: β (N × C) from a [`ChannelGen`] (the paper's default).
    Channel(&'a ChannelGen<T>),
    /// Layer-wise: β (N) from [`layer_gen_forward`].
    Layer,
    /// Pixel-wise: `β = σ(x)` ([`Beta::PixelWise`]).
    Pixel,
}

/// What [`meta_acon_c_backward`] needs from [`meta_acon_c_forward`]. Opaque.
#[derive(Debug, Clone, PartialEq)]
pub struct MetaAconCSaved<T> {
    shape: ActShape,
    /// β as produced (N×C, N, or empty for pixel-wise).
    beta: Vec<T>,
    /// Channel generator state (channel-wise only).
    gen: Option<ChannelGenSaved>,
    /// 0 = channel, 1 = layer, 2 = pixel.
    kind: u8,
}

impl<T> MetaAconCSaved<T> {
    /// The β the forward used (`N × C` channel-wise, `N` layer-wise, empty pixel-wise).
    pub fn beta(&self) -> &[T] {
        &self.beta
    }
}

/// Gradients of the full meta-ACON-C ([`meta_acon_c_backward`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MetaAconCGrads<T> {
    /// `∂L/∂x` through both the activation and the generator.
    pub dx: Vec<T>,
    /// `∂L/∂p1`, length `C`.
    pub dp1: Vec<T>,
    /// `∂L/∂p2`, length `C`.
    pub dp2: Vec<T>,
    /// `∂L/∂β` at the generator's output (`N × C`, `N`, or empty for pixel-wise);
    /// informational, already propagated.
    pub dbeta: Vec<T>,
    /// `∂L/∂W1` (channel-wise only; empty otherwise).
    pub dw1: Vec<T>,
    /// `∂L/∂b1` (channel-wise generator with `b1` only).
    pub db1: Option<Vec<T>>,
    /// `∂L/∂W2` (channel-wise only; empty otherwise).
    pub dw2: Vec<T>,
    /// `∂L/∂b2` (channel-wise generator with `b2` only).
    pub db2: Option<Vec<T>>,
}

fn kind_of<T>(gen: &MetaGen<'_, T>) -> u8 {
    match gen {
        MetaGen::Channel(_) => 0,
        MetaGen::Layer => 1,
        MetaGen::Pixel => 2,
    }
}

/// meta-ACON-C forward: `β = G(x)` from `gen`, then [`acon_c_forward`] with that β.
///
/// Errors: those of [`acon_c_forward`] and of the generator.
///
/// # Example (forward and backward)
///
/// ```
/// use activation_kernels::cpu::acon::{meta_acon_c_backward, meta_acon_c_forward, MetaGen};
/// use activation_kernels::ActShape;
/// use approx::assert_relative_eq;
///
/// let shape = ActShape::nchw(2, 2, 1, 2);
/// let x = [0.5, -1.0, 2.0, -0.25, 1.0, 0.0, -3.0, 0.75];
/// let (p1, p2) = ([1.0, 0.5], [0.0, 0.25]);
/// // Layer-wise generator: β[n] = σ(Σ_c GAP(x)[n, c]), then ACON-C with that β.
/// let (y, saved) = meta_acon_c_forward(&shape, &x, &p1, &p2, MetaGen::Layer)?;
/// assert_eq!((y.len(), saved.beta().len()), (8, 2));
///
/// // Backward of L = Σ y: dx includes the path through the generator.
/// let g = meta_acon_c_backward(&shape, &[1.0; 8], &x, &p1, &p2, MetaGen::Layer, &saved)?;
/// let loss = |x: &[f64]| -> f64 {
///     meta_acon_c_forward(&shape, x, &p1, &p2, MetaGen::Layer).unwrap().0.iter().sum()
/// };
/// let h = 1e-6;
/// let (mut xp, mut xm) = (x, x);
/// xp[3] += h;
/// xm[3] -= h;
/// assert_relative_eq!(g.dx[3], (loss(&xp) - loss(&xm)) / (2.0 * h), max_relative = 1e-6);
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn meta_acon_c_forward<T: Real>(
    shape: &ActShape,
    x: &[T],
    p1: &[T],
    p2: &[T],
    gen: MetaGen<'_, T>,
) -> Result<(Vec<T>, MetaAconCSaved<T>)> {
    shape.validate("x", x.len())?;
    check_params(shape, "p1", p1)?;
    check_params(shape, "p2", p2)?;
    let (beta, gsaved) = match gen {
        MetaGen::Channel(g) => {
            let (b, s) = g.forward(shape, x)?;
            (b, Some(s))
        }
        MetaGen::Layer => (layer_gen_forward(shape, x)?, None),
        MetaGen::Pixel => (Vec::new(), None),
    };
    let src = match gen {
        MetaGen::Channel(_) => Beta::PerSampleChannel(&beta),
        MetaGen::Layer => Beta::PerSample(&beta),
        MetaGen::Pixel => Beta::PixelWise,
    };
    let y = core_forward(shape, x, p1, p2, src);
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

/// meta-ACON-C backward: [`acon_c_backward`] with the generated β, then `dβ`
/// back through the generator (`ChannelGen::backward` / [`layer_gen_backward`];
/// pixel-wise is handled inside the activation), adding the generator's share of
/// `dx` to the activation's.
///
/// Errors: those of [`acon_c_backward`] and of the generator; `Shape` if `saved`
/// came from another shape or another generator kind.
///
/// Example: [`meta_acon_c_forward`]'s runs the forward and this backward.
pub fn meta_acon_c_backward<T: Real>(
    shape: &ActShape,
    dy: &[T],
    x: &[T],
    p1: &[T],
    p2: &[T],
    gen: MetaGen<'_, T>,
    saved: &MetaAconCSaved<T>,
) -> Result<MetaAconCGrads<T>> {
    shape.validate("x", x.len())?;
    check_len("dy", x.len(), dy.len())?;
    check_params(shape, "p1", p1)?;
    check_params(shape, "p2", p2)?;
    if saved.shape != *shape || saved.kind != kind_of(&gen) {
        return Err(Error::Shape {
            what: "saved",
            msg: "saved state comes from another shape or generator kind".into(),
        });
    }
    let src = match gen {
        MetaGen::Channel(g) => {
            g.validate(shape)?;
            let gs = saved.gen.as_ref().ok_or_else(|| Error::Shape {
                what: "saved",
                msg: "no channel-generator state".into(),
            })?;
            g.check_saved(shape, gs)?;
            Beta::PerSampleChannel(&saved.beta)
        }
        MetaGen::Layer => Beta::PerSample(&saved.beta),
        MetaGen::Pixel => Beta::PixelWise,
    };
    src.validate(shape)?;
    let mut core = core_backward(shape, dy, x, p1, p2, src);
    let inv = 1.0 / shape.s as f64;
    let mut out = MetaAconCGrads {
        dx: Vec::new(),
        dp1: core.a.iter().map(|&v| T::of(v)).collect(),
        dp2: core
            .b
            .iter()
            .zip(&core.a)
            .map(|(&b, &a)| T::of(b - a))
            .collect(),
        dbeta: Vec::new(),
        dw1: Vec::new(),
        db1: None,
        dw2: Vec::new(),
        db2: None,
    };
    match gen {
        MetaGen::Channel(g) => {
            if let Some(gs) = saved.gen.as_ref() {
                let gi = g.backward_inner(shape, &core.dbeta, gs);
                add_gap_backward(shape, &gi.dgap, inv, &mut core.dx);
                let cv = |v: &[f64]| v.iter().map(|&a| T::of(a)).collect::<Vec<T>>();
                out.dw1 = cv(&gi.dw1);
                out.db1 = g.b1.as_ref().map(|_| cv(&gi.db1));
                out.dw2 = cv(&gi.dw2);
                out.db2 = g.b2.as_ref().map(|_| cv(&gi.db2));
            }
        }
        MetaGen::Layer => {
            let dg = layer_dgap(shape, &core.dbeta, &saved.beta);
            add_gap_backward(shape, &dg, inv, &mut core.dx);
        }
        MetaGen::Pixel => {}
    }
    out.dx = core.dx;
    out.dbeta = core.dbeta;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runtime-dispatched (AVX2 / AVX-512) loops give the same bits as the
    /// baseline build of the same code.
    #[test]
    fn dispatched_loops_match_baseline_bits() {
        let n = 203;
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let dy: Vec<f32> = (0..n).map(|i| (i as f32 * 0.91).cos()).collect();
        let (a, b, bt) = (Same(1.3f32), Same(-0.4f32), Same(0.8f32));
        let (mut y0, mut y1) = (vec![0.0f32; n], vec![0.0f32; n]);
        fwd_loop(&x, &mut y0, a, b, bt);
        fwd_plane(&x, &mut y1, a, b, bt);
        assert!(y0.iter().zip(&y1).all(|(p, q)| p.to_bits() == q.to_bits()));
        // Pixel-wise β and per-element parameters (the NLC row sources).
        let pv: Vec<f32> = (0..n).map(|i| 0.5 + (i as f32 * 0.13).cos()).collect();
        fwd_loop(&x, &mut y0, Per(&pv), b, Pix);
        fwd_plane(&x, &mut y1, Per(&pv), b, Pix);
        assert!(y0.iter().zip(&y1).all(|(p, q)| p.to_bits() == q.to_bits()));
        let (mut d0, mut d1) = (vec![0.0f32; n], vec![0.0f32; n]);
        let mut l0 = Lanes([[0.0; LANES]; 3]);
        let mut l1 = Lanes([[0.0; LANES]; 3]);
        bwd_loop::<f32, true>(&dy, &x, &mut d0, a, b, Pix, &mut l0);
        bwd_plane_pix(&dy, &x, &mut d1, a, b, Pix, &mut l1);
        assert!(d0.iter().zip(&d1).all(|(p, q)| p.to_bits() == q.to_bits()));
        assert_eq!(l0.sums().map(f64::to_bits), l1.sums().map(f64::to_bits));
    }
}
