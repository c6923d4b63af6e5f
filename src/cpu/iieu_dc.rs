//! IIEU-DC — the Dynamic Coupler (SPEC §1.6): a learned, per-(sample, channel)
//! convex mix of a main branch `x` and a shortcut `res` (both NCHW, same shape),
//! replacing the residual sum of a ResNet block.
//!
//! # Forward (per sample `n`; `C` channels, `S = H·W` positions, `Hd = C/r` hidden)
//! 1. `a = [GAP(x[n]), GAP(res[n])]` (2C); `a' = ln1_w ⊙ LN(a) + ln1_b`, LayerNorm over
//!    the 2C values with biased variance and `eps = 1e-6`; viewed `(2, C)`, rows
//!    `t ∈ {0: main, 1: shortcut}`.
//! 2. `h[t,j] = Σ_c a'[t,c]·W1[j,c]` (`W1`: `(Hd, C)`, no bias).
//! 3. 1-D IIEU on `h` with `x_pre = a'` and filter `W1`:
//!    * `r_x[t] = 1/(‖a'[t,:]‖ + 1e-8)`, `r_w[j] = 1/(‖W1[j,:]‖ + 1e-8)`,
//!      `s[t,j] = h[t,j]·r_w[j]·r_x[t]`;
//!    * `ĥ[t,j] = (h[t,j] − μ_t)/(std_t + 1e-6)` with `μ_t` the mean over `j` and `std_t`
//!      the UNBIASED standard deviation over `j` (divide by `Hd − 1`);
//!      `ν[t,j] = σ(γ₂[t,j]·ĥ[t,j] + β₂[t,j])`;
//!    * `ρ̂ = s + ν`; `h'[t,j] = ς(ρ̂, η₂[j])·h[t,j]` with the adjuster [`adjuster`]
//!      (`ρ̂` if `ρ̂ ≥ η`, else `η·exp(ρ̂ − η)`; the upper branch wins at `ρ̂ = η`).
//! 4. `c[t,k] = Σ_j h'[t,j]·W2[k,j]` (`W2`: `(C, Hd)`, no bias).
//! 5. `c' = ln2_w ⊙ LN(c) + ln2_b`, LayerNorm over the 2C values (flattened `(t, k)`,
//!    biased variance, `eps = 1e-6`); softmax over `t`:
//!    `λ[0,k] = σ(c'[0,k] − c'[1,k])`, `λ[1,k] = σ(c'[1,k] − c'[0,k])`.
//! 6. `out[n,k,:] = λ[0,k]·x[n,k,:] + λ[1,k]·res[n,k,:]`.
//!
//! # Backward
//! With `P_x[n,k] = Σ_s dy·x` and `P_r[n,k] = Σ_s dy·res`:
//! * softmax: `dc'[0,k] = λ0·λ1·(P_x − P_r) = −dc'[1,k]`; LayerNorm-2 backward
//!   (`d ln2_w = Σ_n dc'·ĉ`, `d ln2_b = Σ_n dc'`);
//! * linear 2: `dh' = dc·W2`, `dW2[k,j] = Σ_{n,t} dc[t,k]·h'[t,j]`;
//! * adjuster: `dh += dh'·ς`, `g = dh'·h·∂ς/∂ρ̂` (`1` upper, `η·exp(ρ̂−η)` lower),
//!   `dη[j] = Σ dh'·h·exp(ρ̂−η)·(1−η)` over lower-branch entries;
//! * term-B: `dz = g·ν(1−ν)`, `dγ₂ = Σ_n dz·ĥ`, `dβ₂ = Σ_n dz`, then through the
//!   unbiased-std normalisation back to `h`;
//! * term-S (not detached): `dh += g·r_w·r_x`, `dr_x[t] = Σ_j g·h·r_w`,
//!   `dr_w[j] = Σ_{n,t} g·h·r_x`, `∂r/∂v = −r²·v/‖v‖` (0 where `‖v‖ = 0`);
//! * linear 1: `da' = dh·W1 + dr_x·(−r_x²/‖a'‖)·a'`, `dW1 = Σ_{n,t} dh ⊗ a' +
//!   dr_w·(−r_w²/‖W1[j]‖)·W1[j]`; LayerNorm-1 backward → `da`;
//! * `dx = λ0·dy + da[k]/S`, `dres = λ1·dy + da[C+k]/S` (the mix plus the GAP path).
//!
//! # Choices the SPEC leaves open (recorded here)
//! * `Hd = 1`: the unbiased std over a single value is undefined (PyTorch returns NaN);
//!   we take `std = 0`, so `ĥ = 0` (and `ν = σ(β₂)`), and its gradient is 0.
//!   More generally, where `std_t = 0` (all `h[t,:]` equal) the gradient through
//!   `std_t` is taken as 0 (`ĥ` is then `0` with zero sensitivity to the shared value).
//! * Zero norms (`‖a'[t]‖ = 0` or `‖W1[j]‖ = 0`) give `r = 1e8` and a zero gradient
//!   through that `r`, as in SPEC §1.4.
//! * The per-sample coupler math (vectors of length 2C and 2·Hd) runs in f64 for every
//!   `T`; the GAP and `P_x/P_r` plane sums accumulate in f64.
//! * Weight init ([`DcParams::init`]): `W1`, `W2` uniform in `±1/sqrt(fan_in)` like
//!   PyTorch's `nn.Linear` default, drawn from a seeded splitmix64 stream.
//!
//! # Performance
//! The heavy work streams over `(n, c)` planes, fused per sample (one rayon task per
//! sample, the plane loops inside it parallel too): the forward takes the GAP of
//! `x[n]` and `res[n]`, runs the coupler and mixes while `x[n]` and `res[n]` are still
//! in cache; the backward takes `P_x/P_r`, runs the coupler backward and writes
//! `dx/dres` while `dy[n]` is still in cache. So each input crosses memory once (the
//! CUDA kernels, whose grid cannot wait per sample, read `x` and `res` twice).
//! Parameter gradients are per-sample partials summed in sample order (bit-identical
//! on every run).

use rayon::prelude::*;

use crate::cpu::common::{fit, layer_norm_bwd, layer_norm_fwd, sigmoid};
use crate::error::{check_len, check_nonzero, Error, Result};
use crate::fastmath::simd_fn;
use crate::real::Real;

/// `eps` of the inverse norms `r = 1/(‖v‖ + eps)`.
pub const EPS_NORM: f64 = 1e-8;
/// `eps` of both LayerNorms (inside the square root).
pub const EPS_LN: f64 = 1e-6;
/// `eps` added to the unbiased std in term-B's normalisation of `h`.
pub const EPS_STD: f64 = 1e-6;

/// Shape of an IIEU-DC call.
///
/// Build it with [`DcConfig::new`]; if built directly, every field must be non-zero
/// (`hidden` need not equal `C / r` then — any width ≥ 1 is valid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DcConfig {
    /// Batch size N.
    pub n: usize,
    /// Channels C of `x` and `res`.
    pub c: usize,
    /// Spatial positions per (sample, channel): H·W.
    pub s: usize,
    /// Hidden width of the coupler MLP, `C / r`.
    pub hidden: usize,
}

impl DcConfig {
    /// Shape for `x`, `res` of shape `(n, c, h, w)` and reduction ratio `r`
    /// (`hidden = C / r`, rounded down; the authors use `r = 16`).
    ///
    /// Errors: `Empty` if `n`, `c`, `h` or `w` is 0; `InvalidParam` if `r == 0` or
    /// `C < r` (the hidden width would be 0 — C must be ≥ r); `Shape` if the element
    /// count overflows `usize`.
    pub fn new(n: usize, c: usize, h: usize, w: usize, r: usize) -> Result<Self> {
        check_nonzero("batch N", n)?;
        check_nonzero("channels C", c)?;
        check_nonzero("height H", h)?;
        check_nonzero("width W", w)?;
        if r == 0 {
            return Err(Error::InvalidParam {
                what: "r",
                msg: "reduction ratio must be >= 1".into(),
            });
        }
        let hidden = c / r;
        if hidden == 0 {
            return Err(Error::InvalidParam {
                what: "r",
                msg: format!("C = {c} < r = {r}: hidden width C/r would be 0 (C must be >= r)"),
            });
        }
        let s = h.checked_mul(w).ok_or_else(|| Error::Shape {
            what: "spatial H·W",
            msg: format!("{h}×{w} overflows usize"),
        })?;
        let cfg = Self { n, c, s, hidden };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Elements of `x` (and of `res`, `out`, `dy`): `N·C·S`, or `Err(Shape)` on overflow.
    pub fn numel(&self) -> Result<usize> {
        self.n
            .checked_mul(self.c)
            .and_then(|v| v.checked_mul(self.s))
            .ok_or_else(|| Error::Shape {
                what: "x",
                msg: format!("{self:?} overflows usize"),
            })
    }

    /// Checks every dimension is non-zero and all derived sizes fit in `usize`;
    /// returns `numel`.
    pub(crate) fn validate(&self) -> Result<usize> {
        check_nonzero("batch N", self.n)?;
        check_nonzero("channels C", self.c)?;
        check_nonzero("positions S (H·W)", self.s)?;
        check_nonzero("hidden width C/r", self.hidden)?;
        let over = || Error::Shape {
            what: "DcConfig",
            msg: format!("{self:?}: parameter sizes overflow usize"),
        };
        self.c.checked_mul(self.hidden).ok_or_else(over)?;
        self.n
            .checked_mul(self.c)
            .and_then(|v| v.checked_mul(4))
            .ok_or_else(over)?;
        self.numel()
    }
}

/// Learnable parameters of IIEU-DC (row-major flat buffers).
#[derive(Debug, Clone, PartialEq)]
pub struct DcParams<T> {
    /// LayerNorm-1 weight, `2C`, init 1.
    pub ln1_weight: Vec<T>,
    /// LayerNorm-1 bias, `2C`, init 0.
    pub ln1_bias: Vec<T>,
    /// First linear map `W1`, `(hidden, C)`, init uniform `±1/sqrt(C)`.
    pub w1: Vec<T>,
    /// term-B LayerNorm-like scale `γ₂`, `(2, hidden)`, init 0.01.
    pub gamma2: Vec<T>,
    /// term-B shift `β₂`, `(2, hidden)`, init 0.
    pub beta2: Vec<T>,
    /// Adjuster threshold `η₂`, `hidden`, init 0.01.
    pub eta2: Vec<T>,
    /// Second linear map `W2`, `(C, hidden)`, init uniform `±1/sqrt(hidden)`.
    pub w2: Vec<T>,
    /// LayerNorm-2 weight, `2C`, init 0.01.
    pub ln2_weight: Vec<T>,
    /// LayerNorm-2 bias, `2C`, init 0.
    pub ln2_bias: Vec<T>,
}

/// splitmix64 step (Steele, Lea, Flood 2014): a tiny, seedable, portable PRNG.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in `[lo, hi)` from the top 53 bits of a splitmix64 draw.
fn uniform_draw(state: &mut u64, lo: f64, hi: f64) -> f64 {
    let u = (splitmix64(state) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    lo + (hi - lo) * u
}

impl<T: Real> DcParams<T> {
    /// The authors' initialisation: `ln1_weight = 1`, `ln1_bias = 0`, `γ₂ = 0.01`,
    /// `β₂ = 0`, `η₂ = 0.01`, `ln2_weight = 0.01`, `ln2_bias = 0`; `W1` then `W2`
    /// (row-major, one splitmix64 stream seeded with `seed`) uniform in
    /// `[−1/sqrt(fan_in), 1/sqrt(fan_in))`, `fan_in = C` for `W1` and `hidden` for `W2`
    /// (PyTorch `nn.Linear`'s default bound). Deterministic in `seed`.
    ///
    /// Errors: as [`DcConfig`] validation (zero dimension, size overflow).
    pub fn init(cfg: &DcConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let (c, hd) = (cfg.c, cfg.hidden);
        let mut st = seed;
        let b1 = 1.0 / (c as f64).sqrt();
        let w1 = (0..hd * c)
            .map(|_| T::of(uniform_draw(&mut st, -b1, b1)))
            .collect();
        let b2 = 1.0 / (hd as f64).sqrt();
        let w2 = (0..c * hd)
            .map(|_| T::of(uniform_draw(&mut st, -b2, b2)))
            .collect();
        Ok(Self {
            ln1_weight: vec![T::one(); 2 * c],
            ln1_bias: vec![T::zero(); 2 * c],
            w1,
            gamma2: vec![T::of(0.01); 2 * hd],
            beta2: vec![T::zero(); 2 * hd],
            eta2: vec![T::of(0.01); hd],
            w2,
            ln2_weight: vec![T::of(0.01); 2 * c],
            ln2_bias: vec![T::zero(); 2 * c],
        })
    }

    /// `Err(LengthMismatch)` naming the first parameter whose length does not match `cfg`.
    pub fn validate(&self, cfg: &DcConfig) -> Result<()> {
        cfg.validate()?;
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

/// What [`backward`] needs from [`forward`]: the GAP statistics `a` (N, 2C, f64) and the
/// mixing weights `λ` (N, 2, C). The coupler intermediates (length 2C / 2·Hd per
/// sample) are recomputed in backward from `a`, bit-identically.
#[derive(Debug, Clone, PartialEq)]
pub struct DcSaved<T> {
    gap: Vec<f64>,
    lambda: Vec<T>,
}

impl<T: Real> DcSaved<T> {
    /// Mixing weights `λ`, laid out `(N, 2, C)`: `λ[n,0,c]` multiplies `x`,
    /// `λ[n,1,c]` multiplies `res`.
    pub fn lambda(&self) -> &[T] {
        &self.lambda
    }

    /// GAP statistics `a = [GAP(x[n]), GAP(res[n])]`, laid out `(N, 2C)`, in f64.
    pub fn gap(&self) -> &[f64] {
        &self.gap
    }
}

/// Gradients of IIEU-DC: one per input and per parameter, each of that tensor's shape.
/// `Default` gives empty buffers for [`backward_into`] to size on its first call.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DcGrads<T> {
    /// `∂L/∂x`, `(N, C, H, W)`.
    pub dx: Vec<T>,
    /// `∂L/∂res`, `(N, C, H, W)`.
    pub dres: Vec<T>,
    /// `∂L/∂ln1_weight`, `2C`.
    pub d_ln1_weight: Vec<T>,
    /// `∂L/∂ln1_bias`, `2C`.
    pub d_ln1_bias: Vec<T>,
    /// `∂L/∂W1`, `(hidden, C)`.
    pub d_w1: Vec<T>,
    /// `∂L/∂γ₂`, `(2, hidden)`.
    pub d_gamma2: Vec<T>,
    /// `∂L/∂β₂`, `(2, hidden)`.
    pub d_beta2: Vec<T>,
    /// `∂L/∂η₂`, `hidden`.
    pub d_eta2: Vec<T>,
    /// `∂L/∂W2`, `(C, hidden)`.
    pub d_w2: Vec<T>,
    /// `∂L/∂ln2_weight`, `2C`.
    pub d_ln2_weight: Vec<T>,
    /// `∂L/∂ln2_bias`, `2C`.
    pub d_ln2_bias: Vec<T>,
}

/// The IIEU adjuster `ς(ρ̂, η)`: `ρ̂` if `ρ̂ ≥ η` (upper branch, wins at the tie),
/// else `η·exp(ρ̂ − η)`. Continuous at `ρ̂ = η` (both sides equal `η`).
///
/// Gradient: `∂ς/∂ρ̂ = 1` (upper) or `η·exp(ρ̂ − η)` (lower);
/// `∂ς/∂η = 0` (upper) or `(1 − η)·exp(ρ̂ − η)` (lower).
///
/// ```
/// use activation_kernels::cpu::iieu_dc::adjuster;
/// use approx::assert_relative_eq;
///
/// assert_eq!(adjuster(0.3, 0.1), 0.3); // upper branch: ρ̂
/// assert_eq!(adjuster(0.1, 0.1), 0.1); // the tie takes the upper branch
/// assert_relative_eq!(adjuster(-0.9, 0.1), 0.1 * (-1.0f64).exp(), max_relative = 1e-15); // η·e^(ρ̂ − η)
/// // ∂ς/∂ρ̂ on the lower branch is η·e^(ρ̂ − η): a central difference agrees.
/// let h = 1e-6;
/// let fd = (adjuster(-0.9 + h, 0.1) - adjuster(-0.9 - h, 0.1)) / (2.0 * h);
/// assert_relative_eq!(fd, 0.1 * (-1.0f64).exp(), max_relative = 1e-8);
/// ```
#[inline]
pub fn adjuster<T: Real>(rho: T, eta: T) -> T {
    if rho >= eta {
        rho
    } else {
        eta * (rho - eta).exp()
    }
}

/// Parameters converted to f64 once per call, plus `‖W1[j]‖` and `r_w`.
struct P64 {
    ln1w: Vec<f64>,
    ln1b: Vec<f64>,
    w1: Vec<f64>,
    g2: Vec<f64>,
    b2: Vec<f64>,
    eta: Vec<f64>,
    w2: Vec<f64>,
    ln2w: Vec<f64>,
    ln2b: Vec<f64>,
    nw: Vec<f64>,
    rw: Vec<f64>,
}

fn to64<T: Real>(v: &[T]) -> Vec<f64> {
    v.iter().map(|a| Real::to_f64(*a)).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl P64 {
    fn new<T: Real>(p: &DcParams<T>, c: usize) -> Self {
        let w1 = to64(&p.w1);
        let nw: Vec<f64> = w1.chunks(c).map(|r| dot(r, r).sqrt()).collect();
        let rw = nw.iter().map(|n| 1.0 / (n + EPS_NORM)).collect();
        Self {
            ln1w: to64(&p.ln1_weight),
            ln1b: to64(&p.ln1_bias),
            w1,
            g2: to64(&p.gamma2),
            b2: to64(&p.beta2),
            eta: to64(&p.eta2),
            w2: to64(&p.w2),
            ln2w: to64(&p.ln2_weight),
            ln2b: to64(&p.ln2_bias),
            nw,
            rw,
        }
    }
}

/// Per-sample coupler intermediates (all f64).
struct SampleFwd {
    a_hat: Vec<f64>,
    rstd1: f64,
    ap: Vec<f64>,
    h: Vec<f64>,
    nx: [f64; 2],
    rx: [f64; 2],
    dev: Vec<f64>,
    sd: [f64; 2],
    hhat: Vec<f64>,
    nu: Vec<f64>,
    rho: Vec<f64>,
    vs: Vec<f64>,
    hp: Vec<f64>,
    c_hat: Vec<f64>,
    rstd2: f64,
    lam: Vec<f64>,
}

/// Coupler forward for one sample from its GAP vector `a` (2C).
// Index loops over t ∈ {0, 1} touch several parallel arrays; clearer than zips.
#[allow(clippy::needless_range_loop)]
fn sample_forward(c: usize, hd: usize, p: &P64, a: &[f64]) -> SampleFwd {
    let c2 = 2 * c;
    let mut a_hat = vec![0.0; c2];
    let rstd1 = layer_norm_fwd(a, EPS_LN, &mut a_hat);
    let ap: Vec<f64> = (0..c2).map(|i| p.ln1w[i] * a_hat[i] + p.ln1b[i]).collect();

    let mut h = vec![0.0; 2 * hd];
    let mut nx = [0.0; 2];
    let mut rx = [0.0; 2];
    let mut dev = vec![0.0; 2 * hd];
    let mut sd = [0.0; 2];
    let mut hhat = vec![0.0; 2 * hd];
    for t in 0..2 {
        let row = &ap[t * c..(t + 1) * c];
        nx[t] = dot(row, row).sqrt();
        rx[t] = 1.0 / (nx[t] + EPS_NORM);
        let ht = &mut h[t * hd..(t + 1) * hd];
        for (j, hv) in ht.iter_mut().enumerate() {
            *hv = dot(row, &p.w1[j * c..(j + 1) * c]);
        }
        let mean = ht.iter().sum::<f64>() / hd as f64;
        let dt = &mut dev[t * hd..(t + 1) * hd];
        for (d, &hv) in dt.iter_mut().zip(ht.iter()) {
            *d = hv - mean;
        }
        sd[t] = if hd > 1 {
            (dt.iter().map(|d| d * d).sum::<f64>() / (hd - 1) as f64).sqrt()
        } else {
            0.0
        };
        let denom = sd[t] + EPS_STD;
        for (o, &d) in hhat[t * hd..(t + 1) * hd].iter_mut().zip(dt.iter()) {
            *o = d / denom;
        }
    }

    let mut nu = vec![0.0; 2 * hd];
    let mut rho = vec![0.0; 2 * hd];
    let mut vs = vec![0.0; 2 * hd];
    let mut hp = vec![0.0; 2 * hd];
    for t in 0..2 {
        for j in 0..hd {
            let i = t * hd + j;
            let s = h[i] * p.rw[j] * rx[t];
            nu[i] = sigmoid(p.g2[i] * hhat[i] + p.b2[i]);
            rho[i] = s + nu[i];
            vs[i] = adjuster(rho[i], p.eta[j]);
            hp[i] = vs[i] * h[i];
        }
    }

    let mut cv = vec![0.0; c2];
    for t in 0..2 {
        let hpt = &hp[t * hd..(t + 1) * hd];
        for k in 0..c {
            cv[t * c + k] = dot(hpt, &p.w2[k * hd..(k + 1) * hd]);
        }
    }
    let mut c_hat = vec![0.0; c2];
    let rstd2 = layer_norm_fwd(&cv, EPS_LN, &mut c_hat);
    let mut lam = vec![0.0; c2];
    for k in 0..c {
        let c0 = p.ln2w[k] * c_hat[k] + p.ln2b[k];
        let c1 = p.ln2w[c + k] * c_hat[c + k] + p.ln2b[c + k];
        lam[k] = sigmoid(c0 - c1);
        lam[c + k] = sigmoid(c1 - c0);
    }
    SampleFwd {
        a_hat,
        rstd1,
        ap,
        h,
        nx,
        rx,
        dev,
        sd,
        hhat,
        nu,
        rho,
        vs,
        hp,
        c_hat,
        rstd2,
        lam,
    }
}

/// Offsets of each parameter gradient inside a per-sample partial vector.
struct Offs {
    l1w: usize,
    l1b: usize,
    w1: usize,
    g2: usize,
    b2: usize,
    eta: usize,
    w2: usize,
    l2w: usize,
    l2b: usize,
    rw: usize,
    len: usize,
}

impl Offs {
    fn new(c: usize, hd: usize) -> Self {
        let l1w = 0;
        let l1b = l1w + 2 * c;
        let w1 = l1b + 2 * c;
        let g2 = w1 + hd * c;
        let b2 = g2 + 2 * hd;
        let eta = b2 + 2 * hd;
        let w2 = eta + hd;
        let l2w = w2 + c * hd;
        let l2b = l2w + 2 * c;
        let rw = l2b + 2 * c;
        let len = rw + hd;
        Self {
            l1w,
            l1b,
            w1,
            g2,
            b2,
            eta,
            w2,
            l2w,
            l2b,
            rw,
            len,
        }
    }
}

/// Coupler backward for one sample. `pxr[k] = (Σ_s dy·x, Σ_s dy·res)` for this
/// sample's channels. Writes parameter-gradient partials (plus `dr_w`) into `part`
/// (zeroed, layout [`Offs`]) and `∂L/∂a` (2C) into `dgap`.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn sample_backward(
    c: usize,
    hd: usize,
    p: &P64,
    st: &SampleFwd,
    pxr: &[(f64, f64)],
    o: &Offs,
    part: &mut [f64],
    dgap: &mut [f64],
) {
    let c2 = 2 * c;
    // softmax over t, then LayerNorm-2 affine.
    let mut dchat = vec![0.0; c2];
    for (k, &(px, pr)) in pxr.iter().enumerate() {
        let du = (px - pr) * st.lam[k] * st.lam[c + k];
        for (i, d) in [(k, du), (c + k, -du)] {
            part[o.l2w + i] = d * st.c_hat[i];
            part[o.l2b + i] = d;
            dchat[i] = d * p.ln2w[i];
        }
    }
    let mut dc = vec![0.0; c2];
    layer_norm_bwd(&dchat, &st.c_hat, st.rstd2, &mut dc);

    // linear 2: c[t,k] = Σ_j h'[t,j]·W2[k,j].
    let mut dhp = vec![0.0; 2 * hd];
    for t in 0..2 {
        let dct = &dc[t * c..(t + 1) * c];
        let dhpt = &mut dhp[t * hd..(t + 1) * hd];
        let hpt = &st.hp[t * hd..(t + 1) * hd];
        for (k, &g) in dct.iter().enumerate() {
            let w2r = &p.w2[k * hd..(k + 1) * hd];
            let dw2r = &mut part[o.w2 + k * hd..o.w2 + (k + 1) * hd];
            for j in 0..hd {
                dhpt[j] += g * w2r[j];
                dw2r[j] += g * hpt[j];
            }
        }
    }

    // adjuster, term-B (ν), term-S (s = h·r_w·r_x).
    let mut dh = vec![0.0; 2 * hd];
    let mut dhhat = vec![0.0; 2 * hd];
    let mut drx = [0.0; 2];
    for t in 0..2 {
        for j in 0..hd {
            let i = t * hd + j;
            let (rho, eta, h) = (st.rho[i], p.eta[j], st.h[i]);
            let dyh = dhp[i] * h;
            dh[i] = dhp[i] * st.vs[i];
            let g = if rho >= eta {
                dyh
            } else {
                let e = (rho - eta).exp();
                part[o.eta + j] += dyh * e * (1.0 - eta);
                dyh * eta * e
            };
            let dz = g * st.nu[i] * (1.0 - st.nu[i]);
            part[o.g2 + i] = dz * st.hhat[i];
            part[o.b2 + i] = dz;
            dhhat[i] = dz * p.g2[i];
            dh[i] += g * p.rw[j] * st.rx[t];
            part[o.rw + j] += g * h * st.rx[t];
            drx[t] += g * h * p.rw[j];
        }
    }

    // ĥ = (h − μ)/(std + eps), std unbiased.
    for t in 0..2 {
        let denom = st.sd[t] + EPS_STD;
        let dev = &st.dev[t * hd..(t + 1) * hd];
        let dht = &dhhat[t * hd..(t + 1) * hd];
        let mut dd: Vec<f64> = dht.iter().map(|g| g / denom).collect();
        if hd > 1 && st.sd[t] > 0.0 {
            let dsd = -dot(dht, dev) / (denom * denom);
            let coef = dsd / ((hd - 1) as f64 * st.sd[t]);
            for (d, &v) in dd.iter_mut().zip(dev) {
                *d += coef * v;
            }
        }
        let mean = dd.iter().sum::<f64>() / hd as f64;
        for (o, d) in dh[t * hd..(t + 1) * hd].iter_mut().zip(&dd) {
            *o += d - mean;
        }
    }

    // linear 1: h[t,j] = Σ_c a'[t,c]·W1[j,c], plus r_x.
    let mut dap = vec![0.0; c2];
    for t in 0..2 {
        let apt = &st.ap[t * c..(t + 1) * c];
        let dapt = &mut dap[t * c..(t + 1) * c];
        for j in 0..hd {
            let g = dh[t * hd + j];
            let w1r = &p.w1[j * c..(j + 1) * c];
            let dw1r = &mut part[o.w1 + j * c..o.w1 + (j + 1) * c];
            for k in 0..c {
                dapt[k] += g * w1r[k];
                dw1r[k] += g * apt[k];
            }
        }
        if st.nx[t] > 0.0 {
            let coef = -drx[t] * st.rx[t] * st.rx[t] / st.nx[t];
            for (d, &a) in dapt.iter_mut().zip(apt) {
                *d += coef * a;
            }
        }
    }

    // LayerNorm-1 affine, then LayerNorm-1.
    let mut dahat = vec![0.0; c2];
    for i in 0..c2 {
        part[o.l1w + i] = dap[i] * st.a_hat[i];
        part[o.l1b + i] = dap[i];
        dahat[i] = dap[i] * p.ln1w[i];
    }
    layer_norm_bwd(&dahat, &st.a_hat, st.rstd1, dgap);
}

/// Lanes of the f64 accumulators in the plane reductions (lane = position mod
/// `LANES`, the tail separate, lanes combined in order): four AVX-512 (eight AVX2)
/// accumulators, so the sums are not bound by the latency of one chain of additions,
/// and the loops vectorise. The combination order is fixed (deterministic).
const LANES: usize = 32;

/// Σ of a plane in f64 (fixed summation order).
#[inline(always)]
fn plane_sum_impl<T: Real>(v: &[T]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut it = v.chunks_exact(LANES);
    for ch in &mut it {
        for (a, &e) in acc.iter_mut().zip(ch) {
            *a += Real::to_f64(e);
        }
    }
    let tail: f64 = it.remainder().iter().map(|&e| Real::to_f64(e)).sum();
    acc.iter().sum::<f64>() + tail
}

/// `(Σ dy·x, Σ dy·res)` of one plane in f64 (fixed summation order).
#[inline(always)]
fn plane_dots_impl<T: Real>(dy: &[T], x: &[T], res: &[T]) -> (f64, f64) {
    let mut ax = [0.0f64; LANES];
    let mut ar = [0.0f64; LANES];
    let (mut tx, mut tr) = (0.0f64, 0.0f64);
    let mut gi = dy.chunks_exact(LANES);
    let mut xi = x.chunks_exact(LANES);
    let mut ri = res.chunks_exact(LANES);
    for ((g, xv), rv) in (&mut gi).zip(&mut xi).zip(&mut ri) {
        for l in 0..LANES {
            let gl = Real::to_f64(g[l]);
            ax[l] += gl * Real::to_f64(xv[l]);
            ar[l] += gl * Real::to_f64(rv[l]);
        }
    }
    for ((&g, &xv), &rv) in gi
        .remainder()
        .iter()
        .zip(xi.remainder())
        .zip(ri.remainder())
    {
        let g = Real::to_f64(g);
        tx += g * Real::to_f64(xv);
        tr += g * Real::to_f64(rv);
    }
    (ax.iter().sum::<f64>() + tx, ar.iter().sum::<f64>() + tr)
}

/// The mix of one plane: `out = l0·x + l1·res`.
#[inline(always)]
fn mix_plane_impl<T: Real>(out: &mut [T], x: &[T], res: &[T], l0: T, l1: T) {
    for ((o, &xv), &rv) in out.iter_mut().zip(x).zip(res) {
        *o = l0 * xv + l1 * rv;
    }
}

/// The input gradients of one plane: `dx = l0·dy + gx`, `dres = l1·dy + gr`.
#[inline(always)]
fn grad_plane_impl<T: Real>(dx: &mut [T], dres: &mut [T], dy: &[T], l: [T; 2], g: [T; 2]) {
    for ((a, b), &d) in dx.iter_mut().zip(dres.iter_mut()).zip(dy) {
        *a = l[0] * d + g[0];
        *b = l[1] * d + g[1];
    }
}

simd_fn! {
    /// [`plane_sum_impl`], runtime-dispatched to AVX2 / AVX-512 where available.
    fn plane_sum<T: Real>(v: &[T]) -> f64 => plane_sum_impl;
}

simd_fn! {
    /// [`plane_dots_impl`], runtime-dispatched to AVX2 / AVX-512 where available.
    fn plane_dots<T: Real>(dy: &[T], x: &[T], res: &[T]) -> (f64, f64) => plane_dots_impl;
}

simd_fn! {
    /// [`mix_plane_impl`], runtime-dispatched to AVX2 / AVX-512 where available.
    fn mix_plane<T: Real>(out: &mut [T], x: &[T], res: &[T], l0: T, l1: T) => mix_plane_impl;
}

simd_fn! {
    /// [`grad_plane_impl`], runtime-dispatched to AVX2 / AVX-512 where available.
    fn grad_plane<T: Real>(dx: &mut [T], dres: &mut [T], dy: &[T], l: [T; 2], g: [T; 2])
        => grad_plane_impl;
}

/// IIEU-DC forward: `out = λ[n,0,c]·x + λ[n,1,c]·res` with `λ` from the coupler (see
/// the module docs for every step). `x`, `res`: NCHW `(N, C, H, W)` with `S = H·W`.
///
/// Returns `out` (same shape) and the [`DcSaved`] state for [`backward`].
///
/// Errors: `Empty`/`Shape` for a bad `cfg`; `LengthMismatch` for `x`, `res` or any
/// parameter of the wrong length.
///
/// # Example (forward and backward)
///
/// ```
/// use activation_kernels::cpu::iieu_dc::{backward, forward, DcConfig, DcParams};
/// use approx::assert_relative_eq;
///
/// let cfg = DcConfig::new(2, 4, 2, 2, 2)?; // x, res: (2, 4, 2, 2); hidden = 4 / 2
/// let x: Vec<f64> = (0..32).map(|i| ((i * 7 % 11) as f64 - 5.0) / 4.0).collect();
/// let res: Vec<f64> = (0..32).map(|i| ((i * 5 % 13) as f64 - 6.0) / 3.0).collect();
/// let mut params = DcParams::init(&cfg, 1)?;
/// params.ln2_weight = vec![1.0; 8]; // a livelier mix than the init's 0.01
/// let (out, saved) = forward(&cfg, &x, &res, &params)?;
///
/// // out = λ0·x + λ1·res per (sample, channel), with λ0 + λ1 = 1.
/// let lam = saved.lambda(); // (N, 2, C)
/// let (l0, l1) = (lam[8 + 1], lam[8 + 4 + 1]); // sample 1, channel 1
/// assert_relative_eq!(l0 + l1, 1.0, epsilon = 1e-12);
/// let i = 16 + 4 + 3; // sample 1, channel 1, position 3
/// assert_relative_eq!(out[i], l0 * x[i] + l1 * res[i], max_relative = 1e-12);
///
/// // Backward of L = Σ out·dy: ∂L/∂x (through the mix and the GAPs), ∂L/∂W1 and
/// // ∂L/∂η₂ against central differences.
/// let dy: Vec<f64> = (0..32).map(|i| ((i * 3 % 7) as f64 - 3.0) / 2.0).collect();
/// let g = backward(&cfg, &dy, &x, &res, &params, &saved)?;
/// let loss = |x: &[f64], p: &DcParams<f64>| -> f64 {
///     let out = forward(&cfg, x, &res, p).unwrap().0;
///     out.iter().zip(&dy).map(|(o, d)| o * d).sum()
/// };
/// let h = 1e-6;
/// let (mut xp, mut xm) = (x.clone(), x.clone());
/// xp[i] += h;
/// xm[i] -= h;
/// assert_relative_eq!(g.dx[i], (loss(&xp, &params) - loss(&xm, &params)) / (2.0 * h), max_relative = 1e-6);
/// let (mut pp, mut pm) = (params.clone(), params.clone());
/// pp.w1[2] += h;
/// pm.w1[2] -= h;
/// assert_relative_eq!(g.d_w1[2], (loss(&x, &pp) - loss(&x, &pm)) / (2.0 * h), max_relative = 1e-6);
/// assert_eq!((g.dres.len(), g.d_eta2.len(), g.d_ln2_bias.len()), (32, 2, 8));
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn forward<T: Real>(
    cfg: &DcConfig,
    x: &[T],
    res: &[T],
    params: &DcParams<T>,
) -> Result<(Vec<T>, DcSaved<T>)> {
    let numel = cfg.validate()?;
    check_len("x", numel, x.len())?;
    let mut out = vec![T::zero(); numel];
    let saved = forward_into(cfg, x, res, params, &mut out)?;
    Ok((out, saved))
}

/// [`forward`] writing `out` into a caller-owned buffer of `x`'s length (every element
/// is overwritten), so a training loop reuses its output memory instead of paying for
/// a fresh allocation (and its page faults) on every call. Same formula, same bits.
///
/// Errors: as [`forward`], plus an `out` of the wrong length (`LengthMismatch`); on
/// `Err`, `out` is untouched.
///
/// # Example (forward and backward into reused buffers)
///
/// ```
/// use activation_kernels::cpu::iieu_dc::{
///     backward, backward_into, forward, forward_into, DcConfig, DcGrads, DcParams,
/// };
///
/// let cfg = DcConfig::new(1, 2, 1, 3, 1)?; // x, res: (1, 2, 1, 3); hidden = 2
/// let x = [0.5f32, -1.0, 2.0, 0.0, 1.5, -0.5];
/// let res = [1.0f32, 0.25, -0.75, 2.0, -1.0, 0.5];
/// let params = DcParams::init(&cfg, 3)?;
/// let (mut out, mut grads) = (vec![0.0f32; 6], DcGrads::default());
/// for _step in 0..2 {
///     let saved = forward_into(&cfg, &x, &res, &params, &mut out)?;
///     backward_into(&cfg, &out, &x, &res, &params, &saved, &mut grads)?;
/// }
/// // Same bits as the allocating ops.
/// let (out1, saved) = forward(&cfg, &x, &res, &params)?;
/// assert_eq!(out, out1);
/// assert_eq!(grads, backward(&cfg, &out, &x, &res, &params, &saved)?);
/// # Ok::<(), activation_kernels::Error>(())
/// ```
pub fn forward_into<T: Real>(
    cfg: &DcConfig,
    x: &[T],
    res: &[T],
    params: &DcParams<T>,
    out: &mut [T],
) -> Result<DcSaved<T>> {
    let numel = cfg.validate()?;
    check_len("x", numel, x.len())?;
    check_len("res", numel, res.len())?;
    check_len("out", numel, out.len())?;
    params.validate(cfg)?;
    let (n, c, s, hd) = (cfg.n, cfg.c, cfg.s, cfg.hidden);
    let p = P64::new(params, c);

    // One task per sample, fused: the GAP of x[n] and res[n], the coupler, then the
    // mix while x[n] and res[n] (2·C·S values) are still in cache, so each input
    // crosses memory once. The inner loops over planes run in parallel too (small
    // batches).
    let inv_s = 1.0 / s as f64;
    let mut gap = vec![0.0f64; n * 2 * c];
    let mut lambda = vec![T::zero(); n * 2 * c];
    out.par_chunks_mut(c * s)
        .zip(x.par_chunks(c * s).zip(res.par_chunks(c * s)))
        .zip(gap.par_chunks_mut(2 * c).zip(lambda.par_chunks_mut(2 * c)))
        .for_each(|((os, (xs, rs)), (g, lam))| {
            let (gx, gr) = g.split_at_mut(c);
            gx.par_iter_mut()
                .zip(gr.par_iter_mut())
                .zip(xs.par_chunks(s).zip(rs.par_chunks(s)))
                .for_each(|((mx, mr), (xp, rp))| {
                    *mx = plane_sum(xp) * inv_s;
                    *mr = plane_sum(rp) * inv_s;
                });
            let st = sample_forward(c, hd, &p, g);
            for (l, &v) in lam.iter_mut().zip(&st.lam) {
                *l = T::of(v);
            }
            let lam = &*lam;
            os.par_chunks_mut(s)
                .zip(xs.par_chunks(s).zip(rs.par_chunks(s)))
                .enumerate()
                .for_each(|(k, (o, (xp, rp)))| mix_plane(o, xp, rp, lam[k], lam[c + k]));
        });
    Ok(DcSaved { gap, lambda })
}

/// IIEU-DC backward: gradients of `L` w.r.t. `x`, `res` (through the mix AND through
/// the GAPs) and every parameter, given `dy = ∂L/∂out` and the forward's inputs,
/// parameters and [`DcSaved`] (see the module docs for every formula). Gradients flow
/// through `r_x`, `r_w` and the unbiased-std normalisation (nothing is detached).
/// Parameter gradients are per-sample partials summed in sample order (deterministic).
///
/// Errors: as [`forward`], plus `LengthMismatch` for `dy` and for a `saved` that does
/// not match `cfg`. (`saved` must come from `forward` with the same `x`, `res` and
/// `params`; that is not checked.)
///
/// Example: [`forward`]'s runs the forward and this backward and checks gradients
/// against central differences.
pub fn backward<T: Real>(
    cfg: &DcConfig,
    dy: &[T],
    x: &[T],
    res: &[T],
    params: &DcParams<T>,
    saved: &DcSaved<T>,
) -> Result<DcGrads<T>> {
    let mut grads = DcGrads::default();
    backward_into(cfg, dy, x, res, params, saved, &mut grads)?;
    Ok(grads)
}

/// [`backward`] writing into a caller-owned [`DcGrads`]: each buffer is resized to its
/// tensor's length if it has another length (keeping its allocation otherwise) and
/// every element is overwritten, so a training loop that keeps one `DcGrads` allocates
/// nothing activation-sized after the first call. Same formulas, same bits as
/// [`backward`]. On `Err` the buffers are left untouched.
///
/// Errors: as [`backward`].
///
/// Example: [`forward_into`]'s runs both `_into` ops.
pub fn backward_into<T: Real>(
    cfg: &DcConfig,
    dy: &[T],
    x: &[T],
    res: &[T],
    params: &DcParams<T>,
    saved: &DcSaved<T>,
    grads: &mut DcGrads<T>,
) -> Result<()> {
    let numel = cfg.validate()?;
    check_len("dy", numel, dy.len())?;
    check_len("x", numel, x.len())?;
    check_len("res", numel, res.len())?;
    params.validate(cfg)?;
    let (n, c, s, hd) = (cfg.n, cfg.c, cfg.s, cfg.hidden);
    check_len("saved.gap", n * 2 * c, saved.gap.len())?;
    check_len("saved.lambda", n * 2 * c, saved.lambda.len())?;
    let p = P64::new(params, c);
    let o = Offs::new(c, hd);

    // One task per sample, fused: P_x = Σ dy·x and P_r = Σ dy·res per plane of sample
    // n, the coupler backward (its forward recomputed from the saved GAP), then
    // dx = λ0·dy + da[k]/S and dres = λ1·dy + da[C+k]/S while dy[n] is still in
    // cache. Returns the sample's parameter partials, summed in sample order below.
    let inv_s = 1.0 / s as f64;
    fit(&mut grads.dx, numel);
    fit(&mut grads.dres, numel);
    let per: Vec<Vec<f64>> = grads
        .dx
        .par_chunks_mut(c * s)
        .zip(grads.dres.par_chunks_mut(c * s))
        .zip(dy.par_chunks(c * s))
        .zip(x.par_chunks(c * s).zip(res.par_chunks(c * s)))
        .enumerate()
        .map(|(ni, (((dxs, drs), dys), (xs, rs)))| {
            let pxr: Vec<(f64, f64)> = dys
                .par_chunks(s)
                .zip(xs.par_chunks(s).zip(rs.par_chunks(s)))
                .map(|(dp, (xp, rp))| plane_dots(dp, xp, rp))
                .collect();
            let st = sample_forward(c, hd, &p, &saved.gap[ni * 2 * c..(ni + 1) * 2 * c]);
            let mut part = vec![0.0; o.len];
            let mut dgap = vec![0.0; 2 * c];
            sample_backward(c, hd, &p, &st, &pxr, &o, &mut part, &mut dgap);
            let lam = &saved.lambda[ni * 2 * c..(ni + 1) * 2 * c];
            let dgap = &dgap;
            dxs.par_chunks_mut(s)
                .zip(drs.par_chunks_mut(s))
                .zip(dys.par_chunks(s))
                .enumerate()
                .for_each(|(k, ((dxp, drp), dp))| {
                    let g = [T::of(dgap[k] * inv_s), T::of(dgap[c + k] * inv_s)];
                    grad_plane(dxp, drp, dp, [lam[k], lam[c + k]], g);
                });
            part
        })
        .collect();
    let mut acc = vec![0.0f64; o.len];
    for part in &per {
        for (a, v) in acc.iter_mut().zip(part) {
            *a += v;
        }
    }
    // r_w = 1/(‖W1[j]‖ + eps): dW1[j,·] += dr_w[j]·(−r_w²/‖W1[j]‖)·W1[j,·].
    for j in 0..hd {
        if p.nw[j] > 0.0 {
            let coef = -acc[o.rw + j] * p.rw[j] * p.rw[j] / p.nw[j];
            for k in 0..c {
                acc[o.w1 + j * c + k] += coef * p.w1[j * c + k];
            }
        }
    }
    // Parameter gradients: (destination, offset in acc, length).
    for (dst, off, len) in [
        (&mut grads.d_ln1_weight, o.l1w, 2 * c),
        (&mut grads.d_ln1_bias, o.l1b, 2 * c),
        (&mut grads.d_w1, o.w1, hd * c),
        (&mut grads.d_gamma2, o.g2, 2 * hd),
        (&mut grads.d_beta2, o.b2, 2 * hd),
        (&mut grads.d_eta2, o.eta, hd),
        (&mut grads.d_w2, o.w2, c * hd),
        (&mut grads.d_ln2_weight, o.l2w, 2 * c),
        (&mut grads.d_ln2_bias, o.l2b, 2 * c),
    ] {
        fit(dst, len);
        for (d, &v) in dst.iter_mut().zip(&acc[off..off + len]) {
            *d = T::of(v);
        }
    }

    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runtime-dispatched (AVX2 / AVX-512) plane loops give the same bits as the
    /// baseline build of the same code, on a length that is not a multiple of the
    /// lanes or of any vector width (a ragged tail on every path).
    #[test]
    fn dispatched_plane_loops_match_baseline_bits() {
        let n = 1003;
        let f = |i: usize, a: f32| (i as f32 * a).sin() * 2.0;
        let x: Vec<f32> = (0..n).map(|i| f(i, 0.37)).collect();
        let r: Vec<f32> = (0..n).map(|i| f(i, 1.3)).collect();
        let dy: Vec<f32> = (0..n).map(|i| f(i, 0.91)).collect();
        let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
        assert_eq!(plane_sum_impl(&x).to_bits(), plane_sum(&x).to_bits());
        let (a0, b0) = plane_dots_impl(&dy, &x, &r);
        let (a1, b1) = plane_dots(&dy, &x, &r);
        assert_eq!((a0.to_bits(), b0.to_bits()), (a1.to_bits(), b1.to_bits()));
        let (mut o0, mut o1) = (vec![0.0f32; n], vec![0.0f32; n]);
        mix_plane_impl(&mut o0, &x, &r, 0.7, -1.3);
        mix_plane(&mut o1, &x, &r, 0.7, -1.3);
        assert_eq!(bits(&o0), bits(&o1));
        let (mut d0, mut e0) = (vec![0.0f32; n], vec![0.0f32; n]);
        let (mut d1, mut e1) = (vec![0.0f32; n], vec![0.0f32; n]);
        grad_plane_impl(&mut d0, &mut e0, &dy, [0.4, 1.1], [0.01, -0.02]);
        grad_plane(&mut d1, &mut e1, &dy, [0.4, 1.1], [0.01, -0.02]);
        assert_eq!((bits(&d0), bits(&e0)), (bits(&d1), bits(&e1)));
        // The sums against an f64 reference (inputs are exact in f64; n terms).
        let want: f64 = x.iter().map(|&v| v as f64).sum();
        assert!((plane_sum(&x) - want).abs() <= 1e-12 * n as f64);
    }
}
