//! AIEC — Activation with Intrinsic-Extrinsic Consensus (SPEC §3, seed 003).
//!
//! Training-time mechanism on one activation layer with `K` classes and `C`
//! channels:
//!
//! * **TAU** (threshold activation unit): `A = F if F > τ else 0`, `τ ≥ 0`;
//!   `∂A/∂F = [F > τ]` ([`tau_forward`], [`tau_backward`]).
//! * **global feature** `a[n,c]`: mean of `A` over space (NCHW) or tokens `(N, L, C)`
//!   ([`Pool::Mean`]), or one token's row, e.g. a ViT class token
//!   ([`Pool::ClassToken`]) ([`global_feature`], [`global_feature_backward`]).
//! * **DMU** (decision-making unit): `z = a·Wdᵀ` (no bias), `p = softmax(z)`,
//!   `L_aux[n] = −log p[n, y_n]` ([`dmu_forward`], [`dmu_backward`]).
//! * **ACU** (activation-counting unit): integer counters θ, η (`K × C`) and φ (`K`),
//!   updated only by correctly predicted samples ([`Counters`]); relative firing
//!   rate `v = (θ − η)/φ` ([`Counters::relative_rate`]).
//! * **CGU** (consensus gatekeeping unit): `G = [v ≤ 0] ∧ [Wd ≤ 0]`
//!   ([`gate_masks`]) and `L_gate[n] = Σ_c |a[n,c]·G[y_n,c]| / Σ_c G[y_n,c]`
//!   ([`gate_loss`], [`gate_loss_backward`]).
//! * the whole layer for one training step ([`train_forward`], [`train_backward`])
//!   and for inference ([`infer_forward`]: TAU only).
//!
//! All slices are flat and row-major: `a` is `N × C`, `Wd` and `v` are `K × C`
//! (row `k` = class `k`), logits/probabilities are `N × K`, the activation tensor
//! follows its [`ActShape`] (NCHW or `(N, L, C)`).
//!
//! Decisions where SPEC §3 is silent (each is repeated at the function concerned):
//! * τ must be finite and `≥ 0` (negative, NaN and ±∞ are `InvalidParam`).
//! * correctness uses the **first** maximal logit (like `torch.argmax`), taken over
//!   the f64-accumulated logits; a sample with a NaN logit is never correct (it
//!   leaves the counters untouched).
//! * `sign(0) = 0` in the gate-loss gradient (so a channel that TAU switched off
//!   entirely receives no gate gradient), and `sign(NaN) = NaN`.
//! * [`Pool::ClassToken`] on an NCHW tensor is `Err(Shape)`; a token index `≥ L` is
//!   `Err(InvalidParam)`.
//! * [`AiecLosses`] holds `λ_aux·mean(L_aux) + λ_gate·mean(L_gate)` of *this* layer;
//!   averaging over several AIEC layers is done by the caller through `loss_scale`
//!   in [`train_backward`].

use rayon::prelude::*;

use crate::error::{check_len, check_nonzero, Error, Result};
use crate::fastmath::simd_fn;
use crate::layout::{ActShape, Layout};
use crate::real::Real;

// ---------------------------------------------------------------------------
// small private helpers

/// `Err(InvalidParam)` unless `tau` is finite and `≥ 0`.
pub(crate) fn check_tau(tau: f64) -> Result<()> {
    if tau.is_finite() && tau >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidParam {
            what: "tau",
            msg: format!("the TAU threshold must be finite and >= 0, got {tau}"),
        })
    }
}

/// `Err(LabelOutOfRange)` if any label is `≥ k`; `Err(LengthMismatch)` if there are
/// not `n` labels.
pub(crate) fn check_labels(labels: &[usize], n: usize, k: usize) -> Result<()> {
    check_len("labels", n, labels.len())?;
    match labels.iter().position(|&y| y >= k) {
        Some(sample) => Err(Error::LabelOutOfRange {
            sample,
            label: labels[sample],
            classes: k,
        }),
        None => Ok(()),
    }
}

/// `a·b` accumulated in f64.
#[inline(always)]
fn dot64_impl<T: Real>(a: &[T], b: &[T]) -> f64 {
    // 8 fixed lanes (lane = index mod 8, combined in order): deterministic, and the
    // loop vectorises instead of waiting on one serial f64 add chain.
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut l = [0.0f64; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for j in 0..8 {
            l[j] += x[j].to_f64() * y[j].to_f64();
        }
    }
    for (&x, &y) in a[n - n % 8..].iter().zip(&b[n - n % 8..]) {
        l[0] += x.to_f64() * y.to_f64();
    }
    l.iter().sum()
}

simd_fn! {
    /// `Σ a·b` in f64 (fixed lanes), runtime-dispatched to AVX2 where available.
    fn dot64<T: Real>(a: &[T], b: &[T]) -> f64 => dot64_impl;
}

/// `sign(x)` with `sign(0) = 0` and `sign(NaN) = NaN`.
#[inline]
fn sign0(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else if x == 0.0 {
        0.0
    } else {
        f64::NAN
    }
}

/// Elements per parallel task of the element-wise TAU passes.
const ELEM_CHUNK: usize = 1 << 16;

/// TAU of one value.
#[inline(always)]
fn tau1<T: Real>(v: T, tau: T) -> T {
    if v > tau {
        v
    } else {
        T::zero()
    }
}

// ---------------------------------------------------------------------------
// TAU

/// TAU forward (element-wise): `A = F if F > τ else 0`.
///
/// Gradient: `∂A/∂F = [F > τ]` (at `F == τ` the gradient is 0, matching the
/// forward's strict inequality). NaN inputs give 0 (the comparison is false).
///
/// Errors: `InvalidParam` if `τ` is negative, NaN or infinite; `Empty` if `x` is empty.
///
/// # Example (forward and backward)
///
/// ```
/// use activation_kernels::cpu::aiec::{tau_backward, tau_forward};
///
/// let f = [-1.0f32, 0.25, 0.5, 2.0];
/// let a = tau_forward(&f, 0.25)?; // keep F > τ, zero the rest
/// assert_eq!(a, [0.0, 0.0, 0.5, 2.0]);
/// let df = tau_backward(&[1.0, 2.0, 3.0, 4.0], &f, 0.25)?; // dF = dA·[F > τ]
/// assert_eq!(df, [0.0, 0.0, 3.0, 4.0]); // 0 at F == τ, as the strict forward
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn tau_forward<T: Real>(x: &[T], tau: T) -> Result<Vec<T>> {
    check_tau(tau.to_f64())?;
    check_nonzero("x", x.len())?;
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(ELEM_CHUNK)
        .zip(x.par_chunks(ELEM_CHUNK))
        .for_each(|(y, x)| {
            for (o, &v) in y.iter_mut().zip(x) {
                *o = tau1(v, tau);
            }
        });
    Ok(y)
}

/// TAU backward: `dF = dA·[F > τ]`.
///
/// Errors: as [`tau_forward`], plus `LengthMismatch` if `dy` and `x` differ in length.
///
/// Example: [`tau_forward`]'s runs the forward and this backward.
pub fn tau_backward<T: Real>(dy: &[T], x: &[T], tau: T) -> Result<Vec<T>> {
    check_tau(tau.to_f64())?;
    check_nonzero("x", x.len())?;
    check_len("dy", x.len(), dy.len())?;
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(ELEM_CHUNK)
        .zip(x.par_chunks(ELEM_CHUNK).zip(dy.par_chunks(ELEM_CHUNK)))
        .for_each(|(o, (x, g))| {
            for ((o, &v), &g) in o.iter_mut().zip(x).zip(g) {
                *o = if v > tau { g } else { T::zero() };
            }
        });
    Ok(dx)
}

// ---------------------------------------------------------------------------
// global feature

/// How the global feature `a[n, ·]` is taken from the activated tensor `A`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pool {
    /// Global average over the spatial positions (NCHW) or tokens (`(N, L, C)`):
    /// `a[n,c] = (1/S)·Σ_s A[n,c,s]`, accumulated in f64.
    #[default]
    Mean,
    /// The row of one token of an `(N, L, C)` tensor (a ViT class token):
    /// `a[n,c] = A[n, i, c]`. Only valid for [`Layout::Nlc`] with `i < L`.
    ClassToken(usize),
}

/// Validates `pool` against `shape`.
pub(crate) fn check_pool(shape: &ActShape, pool: Pool) -> Result<()> {
    if let Pool::ClassToken(i) = pool {
        if shape.layout != Layout::Nlc {
            return Err(Error::Shape {
                what: "pool",
                msg: "Pool::ClassToken needs an (N, L, C) tensor, got NCHW".into(),
            });
        }
        if i >= shape.s {
            return Err(Error::InvalidParam {
                what: "pool",
                msg: format!("class token index {i} out of range for L = {}", shape.s),
            });
        }
    }
    Ok(())
}

/// Lanes of the f64 plane sums (fixed lane = position mod `LANES`, lanes combined in
/// order, so the sum is deterministic and the loop vectorises).
const LANES: usize = 8;

/// `Σ act(x)` over one plane in f64 (8 fixed lanes), writing `act(x)` into `out`
/// when given.
#[inline(always)]
fn plane_sum_impl<T: Real>(xs: &[T], out: Option<&mut [T]>, tau: T, apply: bool) -> f64 {
    let act = |v: T| if apply { tau1(v, tau) } else { v };
    let mut lanes = [0.0f64; LANES];
    let xc = xs.chunks_exact(LANES);
    let xr = xc.remainder();
    match out {
        Some(o) => {
            let o = &mut o[..xs.len()];
            let mut oc = o.chunks_exact_mut(LANES);
            for (ob, xb) in (&mut oc).zip(xc) {
                for j in 0..LANES {
                    let y = act(xb[j]);
                    ob[j] = y;
                    lanes[j] += y.to_f64();
                }
            }
            for (o, &v) in oc.into_remainder().iter_mut().zip(xr) {
                let y = act(v);
                *o = y;
                lanes[0] += y.to_f64();
            }
        }
        None => {
            for xb in xc {
                for j in 0..LANES {
                    lanes[j] += act(xb[j]).to_f64();
                }
            }
            for &v in xr {
                lanes[0] += act(v).to_f64();
            }
        }
    }
    lanes.iter().sum()
}

simd_fn! {
    /// [`plane_sum_impl`], runtime-dispatched to AVX2 where available.
    fn plane_sum<T: Real>(xs: &[T], out: Option<&mut [T]>, tau: T, apply: bool) -> f64
        => plane_sum_impl;
}

/// Per-channel sums `acc[c] += Σ_rows act(x[row, c])` over `(rows, C)` tokens,
/// writing `act(x)` into `out` when given.
#[inline(always)]
fn rows_sum_impl<T: Real>(xs: &[T], out: Option<&mut [T]>, acc: &mut [f64], tau: T, apply: bool) {
    let c = acc.len();
    let act = |v: T| if apply { tau1(v, tau) } else { v };
    match out {
        Some(o) => {
            for (orow, xrow) in o.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
                for ((o, &v), a) in orow.iter_mut().zip(xrow).zip(acc.iter_mut()) {
                    let y = act(v);
                    *o = y;
                    *a += y.to_f64();
                }
            }
        }
        None => {
            for xrow in xs.chunks_exact(c) {
                for (&v, a) in xrow.iter().zip(acc.iter_mut()) {
                    *a += act(v).to_f64();
                }
            }
        }
    }
}

simd_fn! {
    /// [`rows_sum_impl`], runtime-dispatched to AVX2 where available.
    fn rows_sum<T: Real>(xs: &[T], out: Option<&mut [T]>, acc: &mut [f64], tau: T, apply: bool)
        => rows_sum_impl;
}

/// One parallel pass over the activation tensor `x`: optionally applies TAU
/// (writing `A` into `out`) and returns the global feature (`N × C`) of the
/// (activated) tensor. `shape` and `pool` must be validated.
fn feature_pass<T: Real>(
    shape: &ActShape,
    x: &[T],
    pool: Pool,
    tau: Option<T>,
    out: Option<&mut [T]>,
) -> Vec<T> {
    let (c, s) = (shape.c, shape.s);
    let inv_s = 1.0 / s as f64;
    let (tv, apply) = (tau.unwrap_or(T::zero()), tau.is_some());
    let act = |v: T| if apply { tau1(v, tv) } else { v };
    match shape.layout {
        Layout::Nchw => {
            // One (sample, channel) plane per task; the pooled value is its mean.
            let plane = |o: Option<&mut [T]>, xs: &[T]| -> T {
                let acc = plane_sum(xs, o, tv, apply);
                T::of(acc * inv_s)
            };
            match out {
                Some(o) => o
                    .par_chunks_mut(s)
                    .zip(x.par_chunks(s))
                    .map(|(o, xs)| plane(Some(o), xs))
                    .collect(),
                None => x.par_chunks(s).map(|xs| plane(None, xs)).collect(),
            }
        }
        Layout::Nlc => {
            // One sample (L × C, channels contiguous) per task.
            let mut feat = vec![T::zero(); shape.n * c];
            let sample = |o: Option<&mut [T]>, xs: &[T], row: &mut [T]| match pool {
                Pool::Mean => {
                    let mut acc = vec![0.0f64; c];
                    rows_sum(xs, o, &mut acc, tv, apply);
                    for (r, a) in row.iter_mut().zip(&acc) {
                        *r = T::of(a * inv_s);
                    }
                }
                Pool::ClassToken(i) => {
                    if let Some(o) = o {
                        for (o, &v) in o.iter_mut().zip(xs) {
                            *o = act(v);
                        }
                    }
                    for (r, &v) in row.iter_mut().zip(&xs[i * c..(i + 1) * c]) {
                        *r = act(v);
                    }
                }
            };
            match out {
                Some(o) => o
                    .par_chunks_mut(s * c)
                    .zip(x.par_chunks(s * c))
                    .zip(feat.par_chunks_mut(c))
                    .for_each(|((o, xs), row)| sample(Some(o), xs, row)),
                None => x
                    .par_chunks(s * c)
                    .zip(feat.par_chunks_mut(c))
                    .for_each(|(xs, row)| sample(None, xs, row)),
            }
            feat
        }
    }
}

/// Global feature `a` (`N × C`) of an activated tensor `A` of shape `shape`.
///
/// * [`Pool::Mean`]: `a[n,c] = (1/S)·Σ_s A[n,c,s]` (GAP over H·W for NCHW, over the
///   L tokens for `(N, L, C)`), accumulated in f64.
/// * [`Pool::ClassToken(i)`](Pool::ClassToken): `a[n,c] = A[n,i,c]` (`(N, L, C)` only).
///
/// Gradient: see [`global_feature_backward`].
///
/// Errors: `Empty`/`LengthMismatch` from the shape; `Shape` for `ClassToken` on
/// NCHW; `InvalidParam` for a token index `≥ L`.
///
/// # Example (forward and backward)
///
/// ```
/// use activation_kernels::cpu::aiec::{global_feature, global_feature_backward, Pool};
/// use activation_kernels::ActShape;
///
/// let shape = ActShape::nlc(1, 2, 3); // 2 tokens of 3 channels
/// let a = [1.0, 0.0, 4.0, 3.0, 2.0, 0.0];
/// assert_eq!(global_feature(&shape, &a, Pool::Mean)?, [2.0, 1.0, 2.0]); // token mean
/// assert_eq!(global_feature(&shape, &a, Pool::ClassToken(1))?, [3.0, 2.0, 0.0]);
///
/// let da = [1.0, 2.0, 4.0]; // ∂L/∂a
/// // Mean: da/L at every token; class token: da at token 1, 0 elsewhere.
/// assert_eq!(global_feature_backward(&shape, &da, Pool::Mean)?, [0.5, 1.0, 2.0, 0.5, 1.0, 2.0]);
/// assert_eq!(
///     global_feature_backward(&shape, &da, Pool::ClassToken(1))?,
///     [0.0, 0.0, 0.0, 1.0, 2.0, 4.0]
/// );
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn global_feature<T: Real>(shape: &ActShape, a: &[T], pool: Pool) -> Result<Vec<T>> {
    shape.validate("A", a.len())?;
    check_pool(shape, pool)?;
    Ok(feature_pass(shape, a, pool, None, None))
}

/// Backward of [`global_feature`]: given `da = ∂L/∂a` (`N × C`) returns `∂L/∂A`
/// (full shape): `da[n,c]/S` at every position for [`Pool::Mean`]; `da[n,c]` at
/// token `i` and 0 elsewhere for [`Pool::ClassToken(i)`](Pool::ClassToken).
///
/// Errors: as [`global_feature`], plus `LengthMismatch` if `da` is not `N × C`.
///
/// Example: [`global_feature`]'s runs the forward and this backward.
pub fn global_feature_backward<T: Real>(shape: &ActShape, da: &[T], pool: Pool) -> Result<Vec<T>> {
    shape.validate("A", shape.numel()?)?;
    check_pool(shape, pool)?;
    check_len("da", shape.n * shape.c, da.len())?;
    let da64: Vec<f64> = da.iter().map(|&v| Real::to_f64(v)).collect();
    let mut out = vec![T::zero(); shape.numel()?];
    backward_pass(shape, pool, &da64, None, &mut out);
    Ok(out)
}

/// One parallel pass writing `out = mask·(d_out + ∂a/∂A ᵀ·da)` where `mask` is
/// `[F > τ]` when `tau_f = Some((τ, F))` and 1 otherwise, and `d_out` is zero when
/// absent. `da` is the `N × C` feature gradient in f64. Inputs must be validated.
fn backward_pass<T: Real>(
    shape: &ActShape,
    pool: Pool,
    da: &[f64],
    tau_f_dout: Option<(T, &[T], &[T])>,
    out: &mut [T],
) {
    let (c, s) = (shape.c, shape.s);
    let inv_s = 1.0 / s as f64;
    match shape.layout {
        Layout::Nchw => {
            // Pool is Mean (ClassToken was rejected for NCHW).
            let plane = |(j, o): (usize, &mut [T])| {
                let g = T::of(da[j] * inv_s);
                match tau_f_dout {
                    Some((tau, f, dout)) => {
                        let fs = &f[j * s..(j + 1) * s];
                        let ds = &dout[j * s..(j + 1) * s];
                        for ((o, &fv), &d) in o.iter_mut().zip(fs).zip(ds) {
                            *o = if fv > tau { d + g } else { T::zero() };
                        }
                    }
                    None => o.iter_mut().for_each(|o| *o = g),
                }
            };
            out.par_chunks_mut(s).enumerate().for_each(plane);
        }
        Layout::Nlc => {
            let sample = |(n, o): (usize, &mut [T])| {
                let dar = &da[n * c..(n + 1) * c];
                let base = n * s * c;
                // Per-channel feature gradient for token `t` (None: no contribution).
                let g: Vec<T> = match pool {
                    Pool::Mean => dar.iter().map(|&v| T::of(v * inv_s)).collect(),
                    Pool::ClassToken(_) => dar.iter().map(|&v| T::of(v)).collect(),
                };
                {
                    for (t, orow) in o.chunks_mut(c).enumerate() {
                        let use_g = match pool {
                            Pool::Mean => true,
                            Pool::ClassToken(i) => t == i,
                        };
                        let off = base + t * c;
                        match (tau_f_dout, use_g) {
                            (Some((tau, f, dout)), true) => {
                                let fr = &f[off..off + c];
                                let dr = &dout[off..off + c];
                                for (((o, &fv), &d), &gv) in orow.iter_mut().zip(fr).zip(dr).zip(&g)
                                {
                                    *o = if fv > tau { d + gv } else { T::zero() };
                                }
                            }
                            (Some((tau, f, dout)), false) => {
                                let fr = &f[off..off + c];
                                let dr = &dout[off..off + c];
                                for ((o, &fv), &d) in orow.iter_mut().zip(fr).zip(dr) {
                                    *o = if fv > tau { d } else { T::zero() };
                                }
                            }
                            (None, true) => orow.copy_from_slice(&g),
                            (None, false) => orow.iter_mut().for_each(|o| *o = T::zero()),
                        }
                    }
                }
            };
            out.par_chunks_mut(s * c).enumerate().for_each(sample);
        }
    }
}

// ---------------------------------------------------------------------------
// dimensions

/// Batch, channel and class counts of the DMU / counter / gate ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AiecDims {
    /// Batch size N.
    pub n: usize,
    /// Channels C (length of the global feature).
    pub c: usize,
    /// Classes K.
    pub k: usize,
}

impl AiecDims {
    /// `N` samples, `C` channels, `K` classes.
    pub fn new(n: usize, c: usize, k: usize) -> Self {
        Self { n, c, k }
    }

    /// `Err(Empty)` if a dimension is 0; `Err(Shape)` if `N·C`, `K·C` or `N·K`
    /// overflows.
    pub fn validate(&self) -> Result<()> {
        check_nonzero("batch N", self.n)?;
        check_nonzero("channels C", self.c)?;
        check_nonzero("classes K", self.k)?;
        let ok = self.n.checked_mul(self.c).is_some()
            && self.k.checked_mul(self.c).is_some()
            && self.n.checked_mul(self.k).is_some();
        if ok {
            Ok(())
        } else {
            Err(Error::Shape {
                what: "dims",
                msg: format!("{self:?} overflows usize"),
            })
        }
    }
}

// ---------------------------------------------------------------------------
// ACU counters

/// ACU counters of one AIEC layer: per class `k` and channel `c`, `θ[k,c]` counts
/// activations (`a > 0`), `η[k,c]` inhibitions (`a == 0`) and `φ[k]` counts samples,
/// each only over samples the DMU predicted correctly.
///
/// Invariant (checked by every constructor, kept by [`Counters::update`]):
/// `θ[k,c] + η[k,c] ≤ φ[k]`, hence `v = (θ − η)/φ ∈ [−1, 1]`. The fields are
/// private so the shape and invariant cannot be broken; read them with the
/// accessors. Counters are cleared by an explicit [`Counters::reset`] (the paper
/// does so at the start of every epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    classes: usize,
    channels: usize,
    theta: Vec<u64>,
    eta: Vec<u64>,
    phi: Vec<u64>,
}

impl Counters {
    /// Zeroed counters for `k` classes and `c` channels.
    ///
    /// Errors: `Empty` if `k` or `c` is 0; `Shape` if `k·c` overflows.
    pub fn new(k: usize, c: usize) -> Result<Self> {
        check_nonzero("classes K", k)?;
        check_nonzero("channels C", c)?;
        let kc = k.checked_mul(c).ok_or_else(|| Error::Shape {
            what: "counters",
            msg: format!("{k} x {c} overflows usize"),
        })?;
        Ok(Self {
            classes: k,
            channels: c,
            theta: vec![0; kc],
            eta: vec![0; kc],
            phi: vec![0; k],
        })
    }

    /// Counters restored from saved values (e.g. a checkpoint or a GPU copy):
    /// `theta`, `eta` are `K × C`, `phi` is `K`.
    ///
    /// Errors: as [`Counters::new`]; `LengthMismatch` for a wrong length;
    /// `InvalidParam` if some `θ[k,c] + η[k,c] > φ[k]` (impossible for counts).
    pub fn from_parts(
        k: usize,
        c: usize,
        theta: Vec<u64>,
        eta: Vec<u64>,
        phi: Vec<u64>,
    ) -> Result<Self> {
        let z = Self::new(k, c)?;
        check_len("theta", z.theta.len(), theta.len())?;
        check_len("eta", z.eta.len(), eta.len())?;
        check_len("phi", k, phi.len())?;
        for (kk, &ph) in phi.iter().enumerate() {
            for cc in 0..c {
                let j = kk * c + cc;
                let ok = matches!(theta[j].checked_add(eta[j]), Some(s) if s <= ph);
                if !ok {
                    return Err(Error::InvalidParam {
                        what: "counters",
                        msg: format!("theta + eta > phi at class {kk}, channel {cc}"),
                    });
                }
            }
        }
        Ok(Self {
            classes: k,
            channels: c,
            theta,
            eta,
            phi,
        })
    }

    /// Number of classes K.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Number of channels C.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Activation counts θ (`K × C`, row = class).
    pub fn theta(&self) -> &[u64] {
        &self.theta
    }

    /// Inhibition counts η (`K × C`, row = class).
    pub fn eta(&self) -> &[u64] {
        &self.eta
    }

    /// Sample counts φ (`K`).
    pub fn phi(&self) -> &[u64] {
        &self.phi
    }

    /// Clears every counter to 0 (call at the start of every epoch).
    pub fn reset(&mut self) {
        self.theta.iter_mut().for_each(|v| *v = 0);
        self.eta.iter_mut().for_each(|v| *v = 0);
        self.phi.iter_mut().for_each(|v| *v = 0);
    }

    /// Relative firing rate `v[k,c] = (θ[k,c] − η[k,c]) / φ[k]` (`K × C`), in
    /// `[−1, 1]`; `v = 0` for a class with `φ = 0` (no correct sample yet).
    /// Computed in f64.
    pub fn relative_rate<T: Real>(&self) -> Vec<T> {
        let c = self.channels;
        let mut v = vec![T::zero(); self.theta.len()];
        for (k, row) in v.chunks_mut(c).enumerate() {
            let phi = self.phi[k];
            if phi == 0 {
                continue;
            }
            let phi = phi as f64;
            for (j, o) in row.iter_mut().enumerate() {
                let i = k * c + j;
                *o = T::of((self.theta[i] as f64 - self.eta[i] as f64) / phi);
            }
        }
        v
    }

    /// Counter update for one batch: for every sample `n` with `correct[n]`,
    /// `θ[y,c] += [a[n,c] > 0]`, `η[y,c] += [a[n,c] == 0]`, `φ[y] += 1`
    /// (`y = labels[n]`). Samples with `correct[n] == false` change nothing. A NaN
    /// or negative `a[n,c]` counts as neither activation nor inhibition.
    ///
    /// Deterministic: the update is sequential over the `N × C` feature (it is
    /// integer, so the result is order-independent anyway). Counts saturate at
    /// `u64::MAX` instead of wrapping.
    ///
    /// Errors (all checked before any counter changes): `Empty` for `N = 0`;
    /// `LengthMismatch` if `a` is not `N × C` or `correct` not `N`
    /// (`N = labels.len()`); `LabelOutOfRange` for a label `≥ K`.
    pub fn update<T: Real>(&mut self, a: &[T], labels: &[usize], correct: &[bool]) -> Result<()> {
        let n = labels.len();
        check_nonzero("batch N", n)?;
        let nc = n.checked_mul(self.channels).ok_or_else(|| Error::Shape {
            what: "a",
            msg: "N x C overflows usize".into(),
        })?;
        check_len("a", nc, a.len())?;
        check_len("correct", n, correct.len())?;
        check_labels(labels, n, self.classes)?;
        let c = self.channels;
        for ((row, &y), &ok) in a.chunks(c).zip(labels).zip(correct) {
            if !ok {
                continue;
            }
            let th = &mut self.theta[y * c..(y + 1) * c];
            let et = &mut self.eta[y * c..(y + 1) * c];
            for ((&v, t), e) in row.iter().zip(th.iter_mut()).zip(et.iter_mut()) {
                if v > T::zero() {
                    *t = t.saturating_add(1);
                } else if v == T::zero() {
                    *e = e.saturating_add(1);
                }
            }
            self.phi[y] = self.phi[y].saturating_add(1);
        }
        Ok(())
    }

    /// `Err(Shape)` unless these counters are `K × C`.
    fn check_dims(&self, k: usize, c: usize) -> Result<()> {
        if self.classes == k && self.channels == c {
            Ok(())
        } else {
            Err(Error::Shape {
                what: "counters",
                msg: format!(
                    "counters are {} classes x {} channels, the op needs {k} x {c}",
                    self.classes, self.channels
                ),
            })
        }
    }
}

// ---------------------------------------------------------------------------
// DMU

/// Output of [`dmu_forward`].
#[derive(Debug, Clone, PartialEq)]
pub struct DmuOut<T> {
    /// Logits `z[n,k] = Σ_c a[n,c]·Wd[k,c]` (`N × K`), accumulated in f64.
    pub logits: Vec<T>,
    /// `p = softmax(z)` per sample (`N × K`).
    pub probs: Vec<T>,
    /// `L_aux[n] = −log p[n, y_n]` (`N`).
    pub loss: Vec<T>,
    /// `argmax_k z[n,k] == y_n` (`N`); first maximal index wins a tie; a sample
    /// with any NaN logit is not correct.
    pub correct: Vec<bool>,
}

/// Gradients of [`dmu_backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct DmuGrads<T> {
    /// `∂L/∂a` (`N × C`).
    pub da: Vec<T>,
    /// `∂L/∂Wd` (`K × C`).
    pub dwd: Vec<T>,
}

/// DMU forward: `z[n,k] = Σ_c a[n,c]·Wd[k,c]` (no bias), `p = softmax(z)`,
/// `L_aux[n] = −log p[n,y_n]`, and the correctness `argmax_k z[n,k] == y_n`.
///
/// Numerics: the logits are accumulated in f64; the softmax and the loss use the
/// max-subtracted f64 logits (`L_aux = log Σ_k e^{z_k − m} − (z_y − m)`), so they
/// never overflow. Correctness takes the argmax of those f64 logits with the first
/// maximal index winning a tie (like `torch.argmax`); a sample with a NaN logit is
/// never counted as correct.
///
/// Gradient: see [`dmu_backward`].
///
/// Errors: `Empty` for a zero dimension; `LengthMismatch` if `a` is not `N × C`,
/// `wd` not `K × C`, `labels` not `N`; `LabelOutOfRange` for a label `≥ K`.
///
/// # Example (forward and backward)
///
/// ```
/// use activation_kernels::cpu::aiec::{dmu_backward, dmu_forward, AiecDims};
/// use approx::assert_relative_eq;
///
/// let dims = AiecDims::new(2, 2, 3); // N = 2 samples, C = 2 channels, K = 3 classes
/// let a = [1.0f64, 0.5, 0.0, 2.0];
/// let wd = [1.0, -1.0, 0.5, 0.5, -1.0, 1.0]; // K × C
/// let labels = [0, 2];
/// let out = dmu_forward(&a, &wd, &labels, dims)?;
/// assert_eq!(out.logits, [0.5, 0.75, -0.5, -2.0, 1.0, 2.0]); // z = a·Wdᵀ
/// assert_eq!(out.correct, [false, true]); // argmax: class 1, class 2
/// assert_relative_eq!(out.loss[1], -out.probs[5].ln(), max_relative = 1e-12);
///
/// // Backward of L = Σ_n L_aux[n]: ∂L/∂Wd[0, 1] against a central difference.
/// let g = dmu_backward(&a, &wd, &out.probs, &labels, &[1.0, 1.0], dims)?;
/// let loss = |w01: f64| -> f64 {
///     let mut w = wd;
///     w[1] = w01;
///     dmu_forward(&a, &w, &labels, dims).unwrap().loss.iter().sum()
/// };
/// let h = 1e-6;
/// assert_relative_eq!(g.dwd[1], (loss(-1.0 + h) - loss(-1.0 - h)) / (2.0 * h), max_relative = 1e-6);
/// assert_eq!(g.da.len(), 4);
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn dmu_forward<T: Real>(
    a: &[T],
    wd: &[T],
    labels: &[usize],
    dims: AiecDims,
) -> Result<DmuOut<T>> {
    dims.validate()?;
    let AiecDims { n, c, k } = dims;
    check_len("a", n * c, a.len())?;
    check_len("wd", k * c, wd.len())?;
    check_labels(labels, n, k)?;
    Ok(dmu_forward_unchecked(a, wd, labels, dims))
}

fn dmu_forward_unchecked<T: Real>(
    a: &[T],
    wd: &[T],
    labels: &[usize],
    dims: AiecDims,
) -> DmuOut<T> {
    let AiecDims { n, c, k } = dims;
    let mut logits = vec![T::zero(); n * k];
    let mut probs = vec![T::zero(); n * k];
    let mut loss = vec![T::zero(); n];
    let mut correct = vec![false; n];
    logits
        .par_chunks_mut(k)
        .zip(probs.par_chunks_mut(k))
        .zip(loss.par_iter_mut())
        .zip(correct.par_iter_mut())
        .enumerate()
        .for_each(|(i, (((z, p), l), ok))| {
            let arow = &a[i * c..(i + 1) * c];
            let y = labels[i];
            let zf: Vec<f64> = wd.chunks(c).map(|w| dot64(arow, w)).collect();
            // First argmax (strict `>` keeps the first of equal maxima).
            let mut best = 0usize;
            for (j, &v) in zf.iter().enumerate() {
                if v > zf[best] {
                    best = j;
                }
            }
            let any_nan = zf.iter().any(|v| v.is_nan());
            *ok = !any_nan && best == y;
            // Max for the stable softmax; NaN if any logit is NaN (IEEE propagation).
            let m = if any_nan { f64::NAN } else { zf[best] };
            let sum: f64 = zf.iter().map(|&v| (v - m).exp()).sum();
            for ((zo, po), &v) in z.iter_mut().zip(p.iter_mut()).zip(&zf) {
                *zo = T::of(v);
                *po = T::of((v - m).exp() / sum);
            }
            *l = T::of(sum.ln() - (zf[y] - m));
        });
    DmuOut {
        logits,
        probs,
        loss,
        correct,
    }
}

/// DMU backward for `L = Σ_n dloss[n]·L_aux[n]`, with `g[n,k] = dloss[n]·(p[n,k] −
/// [k == y_n])`: `∂L/∂a[n,c] = Σ_k g[n,k]·Wd[k,c]`, `∂L/∂Wd[k,c] = Σ_n g[n,k]·a[n,c]`.
/// `probs` are the [`DmuOut::probs`] of the forward. Sums are in f64; `dWd` is
/// reduced per class row in fixed sample order (deterministic).
///
/// Errors: as [`dmu_forward`], plus `LengthMismatch` if `probs` is not `N × K` or
/// `dloss` not `N`.
///
/// Example: [`dmu_forward`]'s runs the forward and this backward.
pub fn dmu_backward<T: Real>(
    a: &[T],
    wd: &[T],
    probs: &[T],
    labels: &[usize],
    dloss: &[T],
    dims: AiecDims,
) -> Result<DmuGrads<T>> {
    dims.validate()?;
    let AiecDims { n, c, k } = dims;
    check_len("a", n * c, a.len())?;
    check_len("wd", k * c, wd.len())?;
    check_len("probs", n * k, probs.len())?;
    check_len("dloss", n, dloss.len())?;
    check_labels(labels, n, k)?;
    let dl: Vec<f64> = dloss.iter().map(|&v| Real::to_f64(v)).collect();
    let mut da = vec![0.0f64; n * c];
    let g = dmu_logit_grad(probs, labels, &dl, dims);
    let mut dwd = vec![T::zero(); k * c];
    dmu_bwd_into(a, wd, &g, dims, &mut da, &mut dwd);
    Ok(DmuGrads {
        da: da.into_iter().map(T::of).collect(),
        dwd,
    })
}

/// `g[n,k] = dloss[n]·(p[n,k] − [k == y_n])` in f64.
fn dmu_logit_grad<T: Real>(probs: &[T], labels: &[usize], dl: &[f64], dims: AiecDims) -> Vec<f64> {
    let k = dims.k;
    let mut g = vec![0.0f64; dims.n * k];
    for (i, row) in g.chunks_mut(k).enumerate() {
        let y = labels[i];
        for (j, o) in row.iter_mut().enumerate() {
            let onehot = if j == y { 1.0 } else { 0.0 };
            *o = dl[i] * (probs[i * k + j].to_f64() - onehot);
        }
    }
    g
}

/// Adds `g·Wd` into `da` (f64, `N × C`) and writes `gᵀ·a` into `dwd` (`K × C`).
fn dmu_bwd_into<T: Real>(
    a: &[T],
    wd: &[T],
    g: &[f64],
    dims: AiecDims,
    da: &mut [f64],
    dwd: &mut [T],
) {
    let AiecDims { n, c, k } = dims;
    da.par_chunks_mut(c).enumerate().for_each(|(i, row)| {
        for (j, w) in wd.chunks(c).enumerate() {
            let gv = g[i * k + j];
            if gv == 0.0 {
                continue;
            }
            for (o, &wv) in row.iter_mut().zip(w) {
                *o += gv * wv.to_f64();
            }
        }
    });
    // One class row per task, summed over samples in order: deterministic.
    dwd.par_chunks_mut(c).enumerate().for_each(|(j, row)| {
        let mut acc = vec![0.0f64; c];
        for i in 0..n {
            let gv = g[i * k + j];
            for (o, &av) in acc.iter_mut().zip(&a[i * c..(i + 1) * c]) {
                *o += gv * av.to_f64();
            }
        }
        for (o, v) in row.iter_mut().zip(acc) {
            *o = T::of(v);
        }
    });
}

// ---------------------------------------------------------------------------
// CGU: masks and gate loss

/// Consensus masks `G[k,c] = [v[k,c] ≤ 0] ∧ [Wd[k,c] ≤ 0]` (`K × C`): a channel is a
/// potential irrelevant one for class `k` when both the intrinsic (relative firing
/// rate `v`) and the extrinsic (decision weight) assessments say so. A NaN in `v` or
/// `Wd` gives `false`. Masks are piecewise constant and carry no gradient.
///
/// Errors: `Empty` if `v` is empty; `LengthMismatch` if `wd` differs in length.
///
/// Example: [`gate_loss`]'s forms masks with this function.
pub fn gate_masks<T: Real>(v: &[T], wd: &[T]) -> Result<Vec<bool>> {
    check_nonzero("v", v.len())?;
    check_len("wd", v.len(), wd.len())?;
    Ok(v.iter()
        .zip(wd)
        .map(|(&vv, &w)| vv <= T::zero() && w <= T::zero())
        .collect())
}

fn check_gate_inputs(a_len: usize, masks: &[bool], labels: &[usize], dims: AiecDims) -> Result<()> {
    dims.validate()?;
    check_len("a", dims.n * dims.c, a_len)?;
    check_len("masks", dims.k * dims.c, masks.len())?;
    check_labels(labels, dims.n, dims.k)
}

/// `Σ_c G[k,c]` per class.
fn mask_counts(masks: &[bool], c: usize) -> Vec<usize> {
    masks
        .chunks(c)
        .map(|r| r.iter().filter(|&&g| g).count())
        .collect()
}

/// Gate loss per sample: `L_gate[n] = Σ_c |a[n,c]·G[y_n,c]| / Σ_c G[y_n,c]`, and 0
/// when `Σ_c G[y_n,c] = 0` (a class with no gated channel). Summed in f64.
///
/// Gradient: see [`gate_loss_backward`].
///
/// Errors: `Empty` for a zero dimension; `LengthMismatch` if `a` is not `N × C`,
/// `masks` not `K × C`, `labels` not `N`; `LabelOutOfRange` for a label `≥ K`.
///
/// # Example (masks, forward and backward)
///
/// ```
/// use activation_kernels::cpu::aiec::{gate_loss, gate_loss_backward, gate_masks, AiecDims};
///
/// let dims = AiecDims::new(1, 3, 2); // N = 1, C = 3, K = 2
/// let v = [-0.5, 0.5, 0.0, 1.0, -1.0, 0.0]; // relative firing rates, K × C
/// let wd = [-1.0, -1.0, -0.5, 1.0, 1.0, 1.0]; // decision weights, K × C
/// let masks = gate_masks(&v, &wd)?; // G = [v ≤ 0] ∧ [Wd ≤ 0]
/// assert_eq!(masks, [true, false, true, false, false, false]);
///
/// let a = [2.0, 7.0, -1.0]; // global feature of one sample of class 0
/// let l = gate_loss(&a, &masks, &[0], dims)?; // Σ_c |a·G| / Σ_c G = (2 + 1) / 2
/// assert_eq!(l, [1.5]);
/// let da = gate_loss_backward(&a, &masks, &[0], &[1.0], dims)?; // G·sign(a) / Σ_c G
/// assert_eq!(da, [0.5, 0.0, -0.5]);
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn gate_loss<T: Real>(
    a: &[T],
    masks: &[bool],
    labels: &[usize],
    dims: AiecDims,
) -> Result<Vec<T>> {
    check_gate_inputs(a.len(), masks, labels, dims)?;
    let cnt = mask_counts(masks, dims.c);
    Ok(gate_loss_unchecked(a, masks, labels, &cnt, dims))
}

fn gate_loss_unchecked<T: Real>(
    a: &[T],
    masks: &[bool],
    labels: &[usize],
    cnt: &[usize],
    dims: AiecDims,
) -> Vec<T> {
    let c = dims.c;
    a.par_chunks(c)
        .zip(labels.par_iter())
        .map(|(row, &y)| {
            if cnt[y] == 0 {
                return T::zero();
            }
            let g = &masks[y * c..(y + 1) * c];
            let s: f64 = row
                .iter()
                .zip(g)
                .filter(|(_, &m)| m)
                .map(|(&v, _)| Real::to_f64(v).abs())
                .sum();
            T::of(s / cnt[y] as f64)
        })
        .collect()
}

/// Backward of [`gate_loss`] for `L = Σ_n dloss[n]·L_gate[n]`:
/// `∂L/∂a[n,c] = dloss[n]·G[y_n,c]·sign(a[n,c]) / Σ_c G[y_n,c]`, with `sign(0) = 0`
/// (the subgradient of |·| at 0 chosen as 0), and 0 for the whole row when
/// `Σ_c G[y_n,c] = 0` (never NaN). The masks are constants (no gradient).
///
/// Errors: as [`gate_loss`], plus `LengthMismatch` if `dloss` is not `N`.
///
/// Example: [`gate_loss`]'s runs the forward and this backward.
pub fn gate_loss_backward<T: Real>(
    a: &[T],
    masks: &[bool],
    labels: &[usize],
    dloss: &[T],
    dims: AiecDims,
) -> Result<Vec<T>> {
    check_gate_inputs(a.len(), masks, labels, dims)?;
    check_len("dloss", dims.n, dloss.len())?;
    let cnt = mask_counts(masks, dims.c);
    let dl: Vec<f64> = dloss.iter().map(|&v| Real::to_f64(v)).collect();
    let mut da = vec![0.0f64; a.len()];
    gate_bwd_into(a, masks, labels, &cnt, &dl, dims, &mut da);
    Ok(da.into_iter().map(T::of).collect())
}

/// Adds the gate-loss gradient into `da` (f64, `N × C`).
fn gate_bwd_into<T: Real>(
    a: &[T],
    masks: &[bool],
    labels: &[usize],
    cnt: &[usize],
    dl: &[f64],
    dims: AiecDims,
    da: &mut [f64],
) {
    let c = dims.c;
    da.par_chunks_mut(c).enumerate().for_each(|(i, row)| {
        let y = labels[i];
        if cnt[y] == 0 {
            return;
        }
        let scale = dl[i] / cnt[y] as f64;
        let g = &masks[y * c..(y + 1) * c];
        for ((o, &m), &v) in row.iter_mut().zip(g).zip(&a[i * c..(i + 1) * c]) {
            if m {
                *o += scale * sign0(v.to_f64());
            }
        }
    });
}

// ---------------------------------------------------------------------------
// the whole layer

/// Hyper-parameters of one AIEC layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AiecConfig {
    /// TAU threshold τ (finite, ≥ 0; default 0).
    pub tau: f64,
    /// Weight of the DMU auxiliary loss λ_aux (finite, ≥ 0; default 1).
    pub lambda_aux: f64,
    /// Weight of the gate loss λ_gate (finite, ≥ 0; default 200).
    pub lambda_gate: f64,
    /// How the global feature is taken (default [`Pool::Mean`]).
    pub pool: Pool,
}

impl Default for AiecConfig {
    fn default() -> Self {
        Self {
            tau: 0.0,
            lambda_aux: 1.0,
            lambda_gate: 200.0,
            pool: Pool::Mean,
        }
    }
}

impl AiecConfig {
    /// `Err(InvalidParam)` unless τ, λ_aux and λ_gate are finite and ≥ 0.
    pub fn validate(&self) -> Result<()> {
        check_tau(self.tau)?;
        for (what, v) in [
            ("lambda_aux", self.lambda_aux),
            ("lambda_gate", self.lambda_gate),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::InvalidParam {
                    what,
                    msg: format!("must be finite and >= 0, got {v}"),
                });
            }
        }
        Ok(())
    }
}

/// Losses of one AIEC layer for one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct AiecLosses<T> {
    /// `L_aux[n]` (`N`).
    pub aux: Vec<T>,
    /// `L_gate[n]` (`N`).
    pub gate: Vec<T>,
    /// `mean_n L_aux[n]`.
    pub aux_mean: T,
    /// `mean_n L_gate[n]`.
    pub gate_mean: T,
    /// `λ_aux·mean(L_aux) + λ_gate·mean(L_gate)` (this layer's term of the total loss;
    /// add `L_task`, and average over AIEC layers, outside).
    pub total_aux_gate: T,
}

/// What [`train_backward`] needs from [`train_forward`] (besides `F` and `Wd`).
/// Read-only: the fields are private so they stay consistent with each other.
#[derive(Debug, Clone, PartialEq)]
pub struct AiecSaved<T> {
    cfg: AiecConfig,
    dims: AiecDims,
    feature: Vec<T>,
    probs: Vec<T>,
    logits: Vec<T>,
    correct: Vec<bool>,
    masks: Vec<bool>,
    labels: Vec<usize>,
}

impl<T> AiecSaved<T> {
    /// Global feature `a` (`N × C`).
    pub fn feature(&self) -> &[T] {
        &self.feature
    }
    /// DMU logits (`N × K`).
    pub fn logits(&self) -> &[T] {
        &self.logits
    }
    /// DMU probabilities (`N × K`).
    pub fn probs(&self) -> &[T] {
        &self.probs
    }
    /// DMU correctness per sample (`N`).
    pub fn correct(&self) -> &[bool] {
        &self.correct
    }
    /// Consensus masks `G` used for the gate loss (`K × C`).
    pub fn masks(&self) -> &[bool] {
        &self.masks
    }
    /// Dimensions `(N, C, K)`.
    pub fn dims(&self) -> AiecDims {
        self.dims
    }
}

/// Result of [`train_forward`] / [`train_forward_with_masks`].
#[derive(Debug, Clone, PartialEq)]
pub struct AiecTrainOut<T> {
    /// Activated tensor `A = TAU(F)` (shape of `F`): the layer's output.
    pub out: Vec<T>,
    /// This layer's auxiliary and gate losses.
    pub losses: AiecLosses<T>,
    /// Saved state for [`train_backward`].
    pub saved: AiecSaved<T>,
}

/// Gradients of [`train_backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct AiecGrads<T> {
    /// `∂L/∂F` (shape of `F`).
    pub df: Vec<T>,
    /// `∂L/∂Wd` (`K × C`).
    pub dwd: Vec<T>,
}

/// Validation shared by the training entry points; returns the dims.
fn check_train(
    cfg: &AiecConfig,
    shape: &ActShape,
    f_len: usize,
    wd_len: usize,
    labels: &[usize],
    k: usize,
) -> Result<AiecDims> {
    cfg.validate()?;
    shape.validate("f", f_len)?;
    check_pool(shape, cfg.pool)?;
    let dims = AiecDims::new(shape.n, shape.c, k);
    dims.validate()?;
    check_labels(labels, shape.n, k)?;
    check_len("wd", k * shape.c, wd_len)?;
    Ok(dims)
}

/// TAU + global feature + DMU (validated inputs).
fn layer_front<T: Real>(
    cfg: &AiecConfig,
    shape: &ActShape,
    f: &[T],
    wd: &[T],
    labels: &[usize],
    dims: AiecDims,
) -> (Vec<T>, Vec<T>, DmuOut<T>) {
    let mut out = vec![T::zero(); f.len()];
    let feat = feature_pass(shape, f, cfg.pool, Some(T::of(cfg.tau)), Some(&mut out));
    let dmu = dmu_forward_unchecked(&feat, wd, labels, dims);
    (out, feat, dmu)
}

/// Gate loss + loss aggregation + saved state (validated inputs).
fn layer_back<T: Real>(
    cfg: &AiecConfig,
    dims: AiecDims,
    labels: &[usize],
    out: Vec<T>,
    feature: Vec<T>,
    dmu: DmuOut<T>,
    masks: Vec<bool>,
) -> AiecTrainOut<T> {
    let cnt = mask_counts(&masks, dims.c);
    let gate = gate_loss_unchecked(&feature, &masks, labels, &cnt, dims);
    let nf = dims.n as f64;
    let aux_mean = dmu.loss.iter().map(|&v| Real::to_f64(v)).sum::<f64>() / nf;
    let gate_mean = gate.iter().map(|&v| Real::to_f64(v)).sum::<f64>() / nf;
    let total = cfg.lambda_aux * aux_mean + cfg.lambda_gate * gate_mean;
    AiecTrainOut {
        out,
        losses: AiecLosses {
            aux: dmu.loss,
            gate,
            aux_mean: T::of(aux_mean),
            gate_mean: T::of(gate_mean),
            total_aux_gate: T::of(total),
        },
        saved: AiecSaved {
            cfg: *cfg,
            dims,
            feature,
            probs: dmu.probs,
            logits: dmu.logits,
            correct: dmu.correct,
            masks,
            labels: labels.to_vec(),
        },
    }
}

/// One training step of an AIEC layer, in SPEC order: TAU → global feature →
/// logits → correctness → counter update → `v` → masks → losses.
///
/// * `f`: pre-activation `F` of shape `shape` (NCHW or `(N, L, C)`);
/// * `wd`: DMU decision weights `K × C` (`K = counters.classes()`);
/// * `labels`: `N` class labels in `0..K`;
/// * `counters`: this layer's ACU counters, updated in place with this batch's
///   correctly predicted samples *before* the masks are formed (so this batch
///   already influences its own masks, as in the paper's Algorithm 1).
///
/// Returns `A = TAU(F)`, the losses `L_aux`, `L_gate` (per sample, means, and
/// `λ_aux·mean(L_aux) + λ_gate·mean(L_gate)`), and the saved state for
/// [`train_backward`].
///
/// Errors (all checked before any counter is touched): `InvalidParam` for a bad
/// config; `Empty`/`LengthMismatch` from the shape; `Shape`/`InvalidParam` for a
/// bad pool; `Shape` if the counters' channels differ from `C`; `LengthMismatch`
/// for `wd` or `labels`; `LabelOutOfRange` for a label `≥ K`.
///
/// # Example (forward and backward)
///
/// ```
/// use activation_kernels::cpu::aiec::{
///     train_backward, train_forward, train_forward_with_masks, AiecConfig, Counters,
/// };
/// use activation_kernels::ActShape;
/// use approx::assert_relative_eq;
///
/// let cfg = AiecConfig { tau: 0.1, lambda_gate: 2.0, ..AiecConfig::default() };
/// let shape = ActShape::nchw(2, 3, 1, 2); // N = 2, C = 3, 2 pixels
/// let f = [0.5, -1.0, 2.0, 0.05, -0.3, 0.4, 1.0, 1.5, -0.2, 0.3, 0.0, 0.7];
/// let wd = [0.5, -0.25, -1.0, -0.5, 0.75, 0.25]; // K = 2 classes × C
/// let labels = [0, 1];
/// let mut counters = Counters::new(2, 3)?;
/// let step = train_forward(&cfg, &shape, &f, &wd, &labels, &mut counters)?;
/// assert_eq!(step.out[0..4], [0.5, 0.0, 2.0, 0.0]); // A = TAU(F), τ = 0.1
/// // Only correctly predicted samples are counted.
/// let counted = step.saved.correct().iter().filter(|&&c| c).count() as u64;
/// assert_eq!(counters.phi().iter().sum::<u64>(), counted);
///
/// // Backward of L = Σ A + this layer's loss: ∂L/∂F[2] against a central difference
/// // of the same function with the step's masks held fixed (they carry no gradient).
/// let g = train_backward(&cfg, &shape, &[1.0; 12], 1.0, &f, &wd, &step.saved)?;
/// let masks = step.saved.masks();
/// let loss = |f2: f64| -> f64 {
///     let mut f = f;
///     f[2] = f2;
///     let o = train_forward_with_masks(&cfg, &shape, &f, &wd, &labels, masks).unwrap();
///     o.out.iter().sum::<f64>() + o.losses.total_aux_gate
/// };
/// let h = 1e-6;
/// assert_relative_eq!(g.df[2], (loss(2.0 + h) - loss(2.0 - h)) / (2.0 * h), max_relative = 1e-6);
/// assert_eq!(g.df[1], 0.0); // F ≤ τ: no gradient
/// assert_eq!(g.dwd.len(), 6);
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn train_forward<T: Real>(
    cfg: &AiecConfig,
    shape: &ActShape,
    f: &[T],
    wd: &[T],
    labels: &[usize],
    counters: &mut Counters,
) -> Result<AiecTrainOut<T>> {
    let k = counters.classes();
    counters.check_dims(k, shape.c)?;
    let dims = check_train(cfg, shape, f.len(), wd.len(), labels, k)?;
    let (out, feature, dmu) = layer_front(cfg, shape, f, wd, labels, dims);
    counters.update(&feature, labels, &dmu.correct)?;
    let v: Vec<T> = counters.relative_rate();
    let masks = gate_masks(&v, wd)?;
    Ok(layer_back(cfg, dims, labels, out, feature, dmu, masks))
}

/// [`train_forward`] with given consensus masks `G` (`K × C`, `K = wd.len() / C`
/// must divide exactly) instead of counters: nothing is counted and the masks are
/// used as given. This is the same function of `(F, Wd)` that [`train_backward`]
/// differentiates — the masks and counters are piecewise-constant functions of the
/// data with zero derivative almost everywhere, so holding them fixed is exactly
/// the SPEC's "masks carry no gradient". Useful for gradient checks and for
/// masks computed elsewhere (e.g. counters aggregated across devices).
///
/// Errors: as [`train_forward`]; `Shape` if `wd.len()` is not a positive multiple
/// of `C`; `LengthMismatch` if `masks` is not `K × C`.
///
/// Example: [`train_forward`]'s checks [`train_backward`] against a finite difference
/// of this function.
pub fn train_forward_with_masks<T: Real>(
    cfg: &AiecConfig,
    shape: &ActShape,
    f: &[T],
    wd: &[T],
    labels: &[usize],
    masks: &[bool],
) -> Result<AiecTrainOut<T>> {
    check_nonzero("channels C", shape.c)?;
    if wd.is_empty() || wd.len() % shape.c != 0 {
        return Err(Error::Shape {
            what: "wd",
            msg: format!(
                "length {} is not a positive multiple of C = {}",
                wd.len(),
                shape.c
            ),
        });
    }
    let k = wd.len() / shape.c;
    let dims = check_train(cfg, shape, f.len(), wd.len(), labels, k)?;
    check_len("masks", k * shape.c, masks.len())?;
    let (out, feature, dmu) = layer_front(cfg, shape, f, wd, labels, dims);
    Ok(layer_back(
        cfg,
        dims,
        labels,
        out,
        feature,
        dmu,
        masks.to_vec(),
    ))
}

/// Backward of one AIEC training step.
///
/// With `s = loss_scale` (the gradient of the final scalar w.r.t. this layer's
/// `λ_aux·mean(L_aux) + λ_gate·mean(L_gate)`: 1, or `1/#layers` when averaging over
/// AIEC layers) and `d_out = ∂L_task/∂A`:
///
/// * `∂/∂a[n,c] = s·(λ_aux/N)·Σ_k (p[n,k] − [k = y_n])·Wd[k,c]`
///   `+ s·(λ_gate/N)·G[y_n,c]·sign(a[n,c]) / Σ_c G[y_n,c]` (`sign(0) = 0`; the gate
///   term is 0 when `Σ_c G[y_n,c] = 0`);
/// * `∂L/∂A = d_out + (∂a/∂A)ᵀ·∂/∂a` (`da/S` everywhere for [`Pool::Mean`], `da` at
///   the class token only for [`Pool::ClassToken`]);
/// * `∂L/∂F = [F > τ]·∂L/∂A`;
/// * `∂L/∂Wd[k,c] = s·(λ_aux/N)·Σ_n (p[n,k] − [k = y_n])·a[n,c]`.
///
/// Masks and counters carry no gradient. One parallel pass over `F`; `dWd` reduced
/// in fixed order (deterministic).
///
/// Errors: `InvalidParam` if `cfg` differs from the forward's; the forward's shape
/// errors; `Shape` if `shape` does not match the saved dims; `LengthMismatch` for
/// `d_out`, `f` or `wd`.
///
/// Example: [`train_forward`]'s runs the forward and this backward.
pub fn train_backward<T: Real>(
    cfg: &AiecConfig,
    shape: &ActShape,
    d_out: &[T],
    loss_scale: T,
    f: &[T],
    wd: &[T],
    saved: &AiecSaved<T>,
) -> Result<AiecGrads<T>> {
    if *cfg != saved.cfg {
        return Err(Error::InvalidParam {
            what: "cfg",
            msg: "differs from the config of the forward pass".into(),
        });
    }
    cfg.validate()?;
    shape.validate("f", f.len())?;
    check_pool(shape, cfg.pool)?;
    let dims = saved.dims;
    if shape.n != dims.n || shape.c != dims.c {
        return Err(Error::Shape {
            what: "shape",
            msg: format!("{shape:?} does not match the forward's dims {dims:?}"),
        });
    }
    check_len("d_out", f.len(), d_out.len())?;
    check_len("wd", dims.k * dims.c, wd.len())?;

    let s = loss_scale.to_f64();
    let nf = dims.n as f64;
    let aux_scale = vec![s * cfg.lambda_aux / nf; dims.n];
    let gate_scale = vec![s * cfg.lambda_gate / nf; dims.n];
    let g = dmu_logit_grad(&saved.probs, &saved.labels, &aux_scale, dims);
    let mut da = vec![0.0f64; dims.n * dims.c];
    let mut dwd = vec![T::zero(); dims.k * dims.c];
    dmu_bwd_into(&saved.feature, wd, &g, dims, &mut da, &mut dwd);
    let cnt = mask_counts(&saved.masks, dims.c);
    gate_bwd_into(
        &saved.feature,
        &saved.masks,
        &saved.labels,
        &cnt,
        &gate_scale,
        dims,
        &mut da,
    );
    let mut df = vec![T::zero(); f.len()];
    backward_pass(
        shape,
        cfg.pool,
        &da,
        Some((T::of(cfg.tau), f, d_out)),
        &mut df,
    );
    Ok(AiecGrads { df, dwd })
}

/// Inference forward of an AIEC layer: TAU only, `A = F if F > τ else 0` (the ACU,
/// DMU and CGU are training-time only). Gradient as [`tau_backward`].
///
/// Errors: `InvalidParam` for a bad config; `Empty` if `f` is empty.
///
/// # Example (forward and backward)
///
/// ```
/// use activation_kernels::cpu::aiec::{infer_forward, tau_backward, AiecConfig};
///
/// let cfg = AiecConfig { tau: 0.5, ..AiecConfig::default() };
/// let f = [0.25, 0.75, -2.0];
/// assert_eq!(infer_forward(&cfg, &f)?, [0.0, 0.75, 0.0]);
/// assert_eq!(tau_backward(&[1.0; 3], &f, cfg.tau)?, [0.0, 1.0, 0.0]); // its gradient
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn infer_forward<T: Real>(cfg: &AiecConfig, f: &[T]) -> Result<Vec<T>> {
    cfg.validate()?;
    tau_forward(f, T::of(cfg.tau))
}
