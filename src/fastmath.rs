//! Branch-free, auto-vectorisable `exp` for f32 (used in the hot loops of the CPU
//! backend, where libm's scalar `expf` would dominate the run time).
//!
//! Method (Cephes `expf`): `e^x = 2^n · e^r` with `n = round(x·log₂e)` (round to
//! nearest even via the 1.5·2²³ magic constant, so it vectorises on baseline SSE2),
//! `r = x − n·ln2` in two parts (Cody–Waite), and a degree-6 polynomial for `e^r` on
//! |r| ≤ ln2/2. `2^n` is applied as two exact power-of-two factors, so results in the
//! subnormal range and up to `f32::MAX` are correct. Maximum error measured against
//! f64 `exp` over the whole finite range: ≤ 2 ulp (see the unit test). `±∞` and NaN
//! behave as IEEE `exp` does (`e^{+∞} = +∞`, `e^{−∞} = 0`, NaN propagates).
//!
//! The reduction and the polynomial are fused multiply-adds (`mul_add`): one
//! `vfmadd` each in the AVX2 / AVX-512 copies of the hot loops (runtime-dispatched), which
//! made the exponential-heavy IIEU-B 1×1 forward about 10 % faster. A fused
//! multiply-add is exactly rounded wherever it is computed, so every path gives the
//! same bits; on an x86-64 CPU without FMA the baseline copy calls libm's `fmaf`
//! (correct, but several times slower there).

/// Largest x with finite `e^x` in f32 (ln(f32::MAX)).
const MAX_ARG: f32 = 88.722_83;
/// Below this `e^x` rounds to 0 even as a subnormal.
const MIN_ARG: f32 = -103.972_08;

/// The shared core of [`exp_f32`] and [`exp_nonpos_f32`] for an already clamped
/// `xc`: `(e^r, n)` with `n = round(xc·log₂e)` (ties to even, via the 1.5·2²³ magic
/// constant), `r = xc − n·ln2` (Cody–Waite, two parts) and `e^r` from the degree-6
/// polynomial, so that `e^xc = e^r · 2^n`.
#[inline(always)]
fn exp_reduced(xc: f32) -> (f32, i32) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    let t = xc.mul_add(LOG2E, MAGIC);
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32) - (MAGIC.to_bits() as i32);
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, xc));
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    ((p * r).mul_add(r, r) + 1.0, ni)
}

/// `e^x` for f32, ≤ 2 ulp, branch-free (vectorises when called in a loop).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let (er, ni) = exp_reduced(x.clamp(MIN_ARG, MAX_ARG));
    // 2^n = 2^a · 2^b with a = n/2, b = n − a, both in the normal exponent range
    // for n ∈ [−150, 128].
    let a = ni >> 1;
    let b = ni - a;
    let sa = f32::from_bits(((a + 127) as u32) << 23);
    let sb = f32::from_bits(((b + 127) as u32) << 23);
    let y = er * sa * sb;
    let y = if x > MAX_ARG { f32::INFINITY } else { y };
    let y = if x < MIN_ARG { 0.0 } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// `e^x` for `x ≤ 0` (and NaN): the same bits as [`exp_f32`] there, with less work —
/// no overflow case, and `2^n` (`n ∈ [−150, 0]`) applied as `2^(n+64)·2^−64`, one
/// exact product then one rounding, as [`exp_f32`]'s two factors round once. For
/// `x > 0` it returns `e^0 = 1` (the argument is clamped): callers use it where only
/// lanes with `x ≤ 0` keep the result (the IIEU adjuster's lower branch, `ρ̂ − η < 0`).
#[inline(always)]
pub fn exp_nonpos_f32(x: f32) -> f32 {
    let two_m64 = f32::from_bits((127 - 64) << 23); // 2^−64, exactly
                                                    // clamp propagates NaN (then every step below is NaN).
    let (er, ni) = exp_reduced(x.clamp(MIN_ARG, 0.0));
    let s = f32::from_bits(((ni + 64 + 127) as u32) << 23);
    let y = er * s * two_m64;
    if x < MIN_ARG {
        0.0
    } else {
        y
    }
}

/// Logistic sigmoid `1/(1 + e^{−x})` on top of [`exp_f32`]'s reduction: the same bits
/// as `1/(1 + exp_f32(−x))` for `x ≥ −88` (relative error ≤ 3 ulp where σ is a normal
/// number), and 0 below (where σ < 6.1·10⁻³⁹ is subnormal; absolute error <
/// `f32::MIN_POSITIVE`). `e^{−x}` is only needed where it is a normal
/// number: for `x > 87`, `1 + e^{−x}` rounds to 1 whatever tiny `e^{−x}` is, so the
/// argument is clamped to `[−87, 88]` and `2^n` applied as one factor — one select
/// instead of `exp_f32`'s three and one scaling instead of two (7 fewer vector
/// instructions per 8 lanes in the ACON loops). NaN propagates.
#[inline(always)]
pub fn sigmoid_f32(x: f32) -> f32 {
    // clamp propagates NaN (then every step below is NaN).
    let (er, ni) = exp_reduced((-x).clamp(-87.0, 88.0));
    let e = er * f32::from_bits(((ni + 127) as u32) << 23);
    let s = 1.0 / (1.0 + e);
    if x < -88.0 {
        0.0
    } else {
        s
    }
}

/// Whether this CPU can run the AVX2 + FMA versions of the hot loops (x86 and
/// x86-64 only; `std` caches the CPUID probe, so this is one atomic load).
#[inline]
pub fn has_avx2_fma() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        false
    }
}

/// Whether this CPU can run the AVX-512 (F + BW + DQ + VL) versions of the hot loops.
#[inline]
pub fn has_avx512() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && has_avx2_fma()
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        false
    }
}

/// Which copy of the runtime-dispatched hot loops runs (every CPU op and the ReLU
/// floor, [`crate::cpu::relu`]). All copies give the same bits (see `simd_fn!`);
/// only the speed differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// As compiled for the build target (baseline x86-64 = SSE2, or any other
    /// architecture).
    Scalar,
    /// The `avx2,fma` copy (8 f32 lanes).
    Avx2,
    /// The `avx512f,avx512bw,avx512dq,avx512vl` copy (16 f32 lanes).
    Avx512,
}

impl SimdLevel {
    /// The name `AK_SIMD` takes for this level: `scalar`, `avx2` or `avx512`.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    /// Parses an `AK_SIMD` value (`scalar`, `avx2`, `avx512`; ASCII case ignored).
    pub fn parse(s: &str) -> Option<SimdLevel> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(SimdLevel::Scalar),
            "avx2" => Some(SimdLevel::Avx2),
            "avx512" => Some(SimdLevel::Avx512),
            _ => None,
        }
    }
}

impl std::fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The highest level this CPU can run (CPUID; ignores `AK_SIMD`).
pub fn detected_simd_level() -> SimdLevel {
    if has_avx512() {
        SimdLevel::Avx512
    } else if has_avx2_fma() {
        SimdLevel::Avx2
    } else {
        SimdLevel::Scalar
    }
}

/// The level a request resolves to on a CPU whose best is `detected`: the request,
/// capped at what the CPU can run (a copy the CPU cannot run is never called); no
/// request (`None`) means `detected`.
pub fn resolve_simd_level(request: Option<SimdLevel>, detected: SimdLevel) -> SimdLevel {
    request.map_or(detected, |r| r.min(detected))
}

/// What `AK_SIMD` asks for, read once per process: `Ok(None)` when unset or empty,
/// `Err(value)` for a value that is not `scalar`, `avx2` or `avx512` (then ignored:
/// the CPU's own level runs; [`simd_level_report`] says so).
pub fn simd_request() -> &'static std::result::Result<Option<SimdLevel>, String> {
    static REQ: std::sync::OnceLock<std::result::Result<Option<SimdLevel>, String>> =
        std::sync::OnceLock::new();
    REQ.get_or_init(|| match std::env::var("AK_SIMD") {
        Err(_) => Ok(None),
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => SimdLevel::parse(&v).map(Some).ok_or(v),
    })
}

/// The level the dispatched hot loops run at in this process: the CPU's highest
/// ([`detected_simd_level`]), or lower if `AK_SIMD=scalar|avx2|avx512` asks for it
/// (read once, at the first call). A request above what the CPU has is capped at
/// the CPU's level, never run. One atomic load after the first call.
#[inline]
pub fn simd_level() -> SimdLevel {
    static LEVEL: std::sync::OnceLock<SimdLevel> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let req = simd_request().as_ref().ok().copied().flatten();
        resolve_simd_level(req, detected_simd_level())
    })
}

/// One line for reports and benchmarks: the level in force, what the CPU has and
/// what `AK_SIMD` asked for (e.g. `avx2 (cpu: avx2; AK_SIMD unset)`).
pub fn simd_level_report() -> String {
    let req = match simd_request() {
        Ok(None) => "AK_SIMD unset".to_string(),
        Ok(Some(l)) => format!("AK_SIMD={l}"),
        Err(v) => format!("AK_SIMD={v:?} not understood, ignored"),
    };
    format!("{} (cpu: {}; {req})", simd_level(), detected_simd_level())
}

/// How far ahead of their reads the streaming loops (the IIEU-B patch sum of
/// squares, GAP, backward adjuster, `dx_pre` scaling, and the ReLU floor) prefetch,
/// in bytes. On the benchmark machine (AMD Zen 5, 2 cores) one thread sweeping
/// `q += x_pre²` over a 26 MB tensor that is not in cache read 22 GB/s on the
/// hardware prefetcher alone and 32 GB/s prefetching 16 KB ahead (4 KB: 27, 8 KB:
/// 31), against 36 GB/s for a plain sum over the same tensor: every read there comes
/// with a read-modify-write of `q`, which shortens how far ahead the core runs. In
/// the whole IIEU-B 1x1 forward (2 threads, 32x64x56x56), 16 KB beat 8 KB by 3–5% in
/// interleaved runs and 32 KB gained nothing more. In the backward (the adjuster's
/// `x` and `dy`, the `dx_pre` pass's `x_pre`) it took the 1x1 `backward_into` from
/// 3.9–4.0 ms to 3.5–3.6 ms.
pub(crate) const AHEAD: usize = 16384;

/// Hints the cache lines of `s[i + A..i + A + len]` into L1, `A` being [`AHEAD`]
/// bytes in elements of `T`: called once per block of `len` elements that a loop is
/// about to read at `s[i..]`. Lines past the end of `s` are skipped.
#[inline(always)]
pub(crate) fn prefetch_ahead<T>(s: &[T], i: usize, len: usize) {
    let size = std::mem::size_of::<T>();
    let at = i + AHEAD / size;
    for l in (0..len).step_by(64 / size) {
        prefetch(s, at + l);
    }
}

/// Hints the cache line holding `s[i]` into L1; nothing when `i` is out of bounds (or
/// off x86-64).
#[inline(always)]
pub(crate) fn prefetch<T>(s: &[T], i: usize) {
    #[cfg(target_arch = "x86_64")]
    if i < s.len() {
        // `_mm_prefetch` is a safe fn in newer std (SSE is baseline on x86-64).
        #[allow(unused_unsafe)]
        // SAFETY: `i < s.len()`, so the pointer stays inside `s`; a prefetch is only a
        // hint to the cache: it never faults and never writes.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(s.as_ptr().add(i).cast::<i8>());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (s, i);
}

/// Defines a runtime-dispatched hot loop: `fn name<generics>(args) -> ret => inner;`
/// defines `name`, which calls the `#[inline(always)]` fn `inner` compiled inside an
/// `#[target_feature(enable = "avx2,fma")]` copy (LLVM vectorises it 8 lanes wide)
/// or an AVX-512 copy (16 lanes), as [`simd_level`] says — the CPU's best, or what
/// `AK_SIMD` forces below it — else as compiled for the build target (baseline
/// x86-64 = SSE2, or any other architecture).
///
/// Bit-identical on every path: Rust never contracts `a·b + c` into an FMA on its
/// own, the only fused operations are explicit `mul_add`s (exactly rounded in
/// hardware and in libm alike), and every reduction uses fixed lanes, so each copy
/// performs exactly the same IEEE operations in the same order. Results do not
/// depend on the CPU.
macro_rules! simd_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident $(<$($g:ident : $b:path),* $(,)?>)?
        ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $inner:path;) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name $(<$($g: $b),*>)? ($($arg: $ty),*) $(-> $ret)? {
            #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2 $(<$($g: $b),*>)? ($($arg: $ty),*) $(-> $ret)? {
                    $inner($($arg),*)
                }
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512 $(<$($g: $b),*>)? ($($arg: $ty),*) $(-> $ret)? {
                    $inner($($arg),*)
                }
                match $crate::fastmath::simd_level() {
                    $crate::fastmath::SimdLevel::Avx512 => {
                        // SAFETY: `avx512` requires only the AVX-512 F/BW/DQ/VL, `avx2`
                        // and `fma` target features; `simd_level` returns `Avx512` only
                        // when `has_avx512` detected them at run time on this CPU.
                        return unsafe { avx512($($arg),*) };
                    }
                    $crate::fastmath::SimdLevel::Avx2 => {
                        // SAFETY: `avx2` requires only the `avx2` and `fma` target
                        // features; `simd_level` returns `Avx2` only when
                        // `has_avx2_fma` detected them at run time on this CPU.
                        return unsafe { avx2($($arg),*) };
                    }
                    $crate::fastmath::SimdLevel::Scalar => {}
                }
            }
            $inner($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

#[cfg(test)]
mod tests {
    use super::*;

    fn ulp_err(got: f32, want: f64) -> f64 {
        let w = want as f32;
        if w == got {
            return 0.0;
        }
        let ulp = if w == 0.0 {
            f32::from_bits(1) as f64
        } else {
            let b = w.abs().to_bits();
            (f32::from_bits(b + 1) - f32::from_bits(b)) as f64
        };
        (got as f64 - want).abs() / ulp
    }

    #[test]
    fn simd_requests_parse_and_are_capped_at_the_cpu() {
        use SimdLevel::*;
        assert_eq!(SimdLevel::parse("AVX2 "), Some(Avx2));
        assert_eq!(SimdLevel::parse("avx512"), Some(Avx512));
        assert_eq!(SimdLevel::parse("scalar"), Some(Scalar));
        assert_eq!(SimdLevel::parse("sse4"), None);
        for l in [Scalar, Avx2, Avx512] {
            assert_eq!(SimdLevel::parse(l.name()), Some(l));
        }
        assert_eq!(resolve_simd_level(None, Avx2), Avx2);
        assert_eq!(resolve_simd_level(Some(Scalar), Avx512), Scalar);
        assert_eq!(resolve_simd_level(Some(Avx2), Avx512), Avx2);
        // A level the CPU lacks is never run.
        assert_eq!(resolve_simd_level(Some(Avx512), Avx2), Avx2);
        assert_eq!(resolve_simd_level(Some(Avx2), Scalar), Scalar);
        assert!(simd_level() <= detected_simd_level());
    }

    #[test]
    fn exp_within_two_ulp_over_the_finite_range() {
        let mut worst = 0.0f64;
        let steps = 2_000_000;
        for i in 0..=steps {
            let x = MIN_ARG + (MAX_ARG - MIN_ARG) * (i as f32 / steps as f32);
            let want = (x as f64).exp();
            let e = ulp_err(exp_f32(x), want);
            worst = worst.max(e);
        }
        // Cephes expf is specified at ~1 ulp on the normal range; the two-factor
        // scaling adds at most one more rounding in the subnormal range.
        assert!(worst <= 2.0, "worst error {worst} ulp");
    }

    /// `exp_nonpos_f32` is `exp_f32` bit for bit on `x ≤ 0` (dense sweep down past the
    /// underflow point, the subnormal range included) and for −∞ and NaN.
    #[test]
    fn exp_nonpos_matches_exp_bits_on_nonpositive_args() {
        let steps = 4_000_000;
        for i in 0..=steps {
            let x = -110.0f32 * (i as f32 / steps as f32);
            assert_eq!(exp_nonpos_f32(x).to_bits(), exp_f32(x).to_bits(), "x = {x}");
        }
        for x in [
            0.0f32,
            -0.0,
            -1e-30,
            -87.33655,
            -103.97208,
            -103.97209,
            f32::NEG_INFINITY,
        ] {
            assert_eq!(exp_nonpos_f32(x).to_bits(), exp_f32(x).to_bits(), "x = {x}");
        }
        assert!(exp_nonpos_f32(f32::NAN).is_nan());
    }

    #[test]
    fn exp_special_values() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(MAX_ARG).is_finite());
    }

    #[test]
    fn sigmoid_matches_f64() {
        for i in -4000..=4000 {
            let x = i as f32 * 0.025;
            let want = 1.0 / (1.0 + (-(x as f64)).exp());
            let got = sigmoid_f32(x) as f64;
            // e^{-x} overflows for x < −88.7, so σ underflows to 0 there (as with libm);
            // the absolute slack f32::MIN_POSITIVE covers exactly that range.
            let bound = 4.0 * f32::EPSILON as f64 * want + f32::MIN_POSITIVE as f64;
            assert!((got - want).abs() <= bound, "x {x}: {got} vs {want}");
        }
        assert_eq!(sigmoid_f32(-200.0), 0.0);
        assert_eq!(sigmoid_f32(200.0), 1.0);
        assert!(sigmoid_f32(f32::NAN).is_nan());
        assert_eq!(sigmoid_f32(f32::INFINITY), 1.0);
        assert_eq!(sigmoid_f32(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn sigmoid_has_the_bits_of_the_exp_f32_form_above_minus_88() {
        // Every 97th f32 in [−88, 200] (both signs of the clamp, the subnormal e^{−x}).
        let (lo, hi) = (-88.0f32, 200.0f32);
        let mut checked = 0;
        let mut x = lo;
        while x <= hi {
            let want = 1.0 / (1.0 + exp_f32(-x));
            assert_eq!(sigmoid_f32(x).to_bits(), want.to_bits(), "x = {x}");
            checked += 1;
            x = if x < 0.0 {
                f32::from_bits(x.to_bits() - 97)
            } else if x == 0.0 {
                f32::from_bits(97)
            } else {
                f32::from_bits(x.to_bits() + 97)
            };
            if x > -1e-30 && x < 0.0 {
                x = 0.0;
            }
        }
        assert!(checked > 1_000_000, "{checked}");
        // Below −88: 0 instead of a subnormal below 6.1e-39.
        assert_eq!(sigmoid_f32(-88.5), 0.0);
        assert!(1.0 / (1.0 + exp_f32(88.5)) < 6.1e-39);
    }
}
