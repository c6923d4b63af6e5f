//! GPU parity of AIEC (src/cuda/aiec.rs) against the CPU reference (src/cpu/aiec.rs)
//! run in f64 on the SAME dtype-rounded inputs.
//!
//! Tolerances (each comparison names its own):
//! * exact: TAU outputs and gradients (a copy or 0), correctness flags, masks,
//!   counters (integers), `v` (formed in f64 from the counters, then rounded, like
//!   the CPU's f32 path — compared bitwise against `relative_rate::<f32>`);
//! * `F32`: f32 results of short f32 reductions (feature mean over ≤ 300 values,
//!   logits over C ≤ 70 channels, softmax over K ≤ 45, losses, da over K ≤ 45, dWd
//!   over ≤ 37 samples): the f32 accumulation error is a few ulps of the largest
//!   term, so 1e-6 of the tensor's max magnitude; measured worst (the smallest term
//!   passing, given the per-element term below; `PARITY_MEASURE=1 … -- --nocapture`
//!   prints it): 2.7e-7 (probs at N = 37, C = 70, K = 45), a 3.6× margin (6.8e-8
//!   at the shapes of ≤ 11 channels);
//! * every element is also bounded relative to itself: `E_REL = 2^-21` (8 f32
//!   ulps) of `|ref_i|` for f32 arithmetic, plus, for storage outputs (dF in f16 /
//!   bf16, rounded to storage once), 1 unit roundoff of the dtype (2^-11 f16,
//!   2^-8 bf16). So an element passes if
//!   `|got − ref| ≤ (u_T + E_REL)·|ref_i| + F32·max|ref|`.
//!
//! Every GPU computation runs inside `Gpu::check_schedules` (bitwise identical
//! under 4 thread orders, no leaked allocation), which also proves determinism.
#![cfg(any(feature = "cuda", feature = "emulate"))]

mod common;

use std::sync::Arc;

use activation_kernels::cpu::aiec::{self as cpu, AiecConfig, AiecDims, Counters, Pool};
use activation_kernels::cuda::aiec as dev;
use activation_kernels::cuda::{CudaSlice, CudaStream, DType};
use activation_kernels::{ActShape, Error, Layout};
use approx::abs_diff_eq;
use common::device::{gpu, Gpu};
use common::E_REL;
use half::{bf16, f16};

/// Tolerance of f32 results relative to the tensor's max (see the module doc).
const F32: f64 = 1e-6;

/// Unit roundoff of the storage dtype (0 for f32: its rounding is inside `F32`).
fn unit<T: DType>() -> f64 {
    match T::NAME {
        "f16" => 2f64.powi(-11),
        "bf16" => 2f64.powi(-8),
        _ => 0.0,
    }
}

/// Rounds `v` to storage `T`; returns the device-ready values and their exact f64.
fn round<T: DType>(v: &[f64]) -> (Vec<T>, Vec<f64>) {
    let t: Vec<T> = v.iter().map(|&x| T::from_f32(x as f32)).collect();
    let back = t.iter().map(|&x| x.to_f32() as f64).collect();
    (t, back)
}

fn tbits<T: DType>(v: &[T]) -> Vec<u32> {
    v.iter().map(|&x| x.to_f32().to_bits()).collect()
}

fn from_bits(v: &[u32]) -> Vec<f64> {
    v.iter().map(|&b| f32::from_bits(b) as f64).collect()
}

fn dl<T: DType>(s: &Arc<CudaStream>, d: &CudaSlice<T>) -> Vec<u32> {
    tbits(&s.clone_dtoh(d).unwrap())
}

/// `|got − want| ≤ (rel + E_REL)·|want| + abs·max|want|` element-wise (NaN must
/// match NaN; a NaN or infinite `got` where the reference is finite fails).
fn close(name: &str, got: &[f64], want: &[f64], rel: f64, abs: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let max = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(0.0f64, |m, v| m.max(v.abs()));
    let mut need = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() {
            assert!(g.is_nan(), "{name}[{i}]: got {g}, want NaN");
            continue;
        }
        if w.is_infinite() {
            assert_eq!(g, w, "{name}[{i}]: got {g}, want {w}");
            continue;
        }
        let tol = (rel + E_REL) * w.abs() + abs * max + 1e-30;
        if std::env::var_os("PARITY_MEASURE").is_some() {
            need = need.max(((g - w).abs() - (rel + E_REL) * w.abs()).max(0.0) / max.max(1e-300));
        }
        assert!(
            abs_diff_eq!(g, w, epsilon = tol),
            "{name}[{i}]: got {g}, want {w} (|diff| {} > tol {tol})",
            (g - w).abs()
        );
    }
    if std::env::var_os("PARITY_MEASURE").is_some() {
        let what = name.split(' ').next().unwrap();
        eprintln!("MEASURE|aiec|abs={abs}|{what}|{need:.3e}");
    }
}

fn uniform(r: &mut rand::rngs::SmallRng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    common::uniform(r, n, lo, hi)
}

/// Smallest gap between the best and second-best logit over all samples, relative
/// to max(1, max |z|): the DMU decision is robust when this is ≫ the f32 error.
/// `dev::with_tile_target` (an `emulate`-only test hook) on the emulated device; on a real
/// GPU (feature `cuda` alone, as `scripts/gpu-pack.sh` builds this suite) the hook does
/// not exist and `f` runs at the production block target, so the large-tile cases run
/// with the production tiling there.
fn tile_target<R>(blocks: usize, f: impl FnOnce() -> R) -> R {
    #[cfg(feature = "emulate")]
    {
        dev::with_tile_target(blocks, f)
    }
    #[cfg(not(feature = "emulate"))]
    {
        let _ = blocks;
        f()
    }
}

fn min_margin(logits: &[f64], k: usize) -> f64 {
    if k < 2 {
        return f64::INFINITY;
    }
    let scale = logits.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    logits
        .chunks(k)
        .map(|z| {
            let mut s = z.to_vec();
            s.sort_by(|a, b| b.partial_cmp(a).unwrap());
            (s[0] - s[1]) / scale
        })
        .fold(f64::INFINITY, f64::min)
}

/// Required margin: 1e-3 relative, ~100x the f32 logit error and far above the
/// difference between f32 and f64 accumulation of the same rounded inputs.
const MARGIN: f64 = 1e-3;

// ---------------------------------------------------------------------------
// TAU

fn tau_case<T: DType>(g: &Gpu, len: usize, tau: f32, offset: usize) {
    let s = g.ctx.default_stream();
    let mut r = common::rng(len as u64 * 31 + offset as u64);
    let mut xv = common::randn(&mut r, len + offset);
    xv[offset] = tau as f64; // F == τ: output 0, gradient 0
    if len > 3 {
        xv[offset + 2] = f64::NAN; // NaN -> 0
    }
    let dyv = common::randn(&mut r, len + offset);
    let (x, xr) = round::<T>(&xv);
    let (dy, dyr) = round::<T>(&dyv);
    let (y, dx) = g.check_schedules(|| {
        let dx_ = s.clone_htod(&x).unwrap();
        let ddy = s.clone_htod(&dy).unwrap();
        // A view at `offset` elements: offset 1 makes every pointer unaligned
        // (scalar path), offset 0 the 128-bit path.
        let xv = dx_.slice(offset..);
        let dyv = ddy.slice(offset..);
        let y = dev::tau_forward::<T>(&s, &xv, tau).unwrap();
        let dxx = dev::tau_backward::<T>(&s, &dyv, &xv, tau).unwrap();
        (dl(&s, &y), dl(&s, &dxx))
    });
    let want_y = cpu::tau_forward(&xr[offset..], tau as f64).unwrap();
    let want_dx = cpu::tau_backward(&dyr[offset..], &xr[offset..], tau as f64).unwrap();
    // Exact: the output is an input value or 0.
    assert_eq!(from_bits(&y), want_y, "tau_forward {} len {len}", T::NAME);
    assert_eq!(
        from_bits(&dx),
        want_dx,
        "tau_backward {} len {len}",
        T::NAME
    );
}

#[test]
fn tau_forward_backward_all_dtypes() {
    let Some(g) = gpu() else { return };
    for &len in &[1usize, 7, 45, 1001] {
        for &tau in &[0.0f32, 0.25] {
            for &off in &[0usize, 1] {
                tau_case::<f32>(&g, len, tau, off);
                tau_case::<f16>(&g, len, tau, off);
                tau_case::<bf16>(&g, len, tau, off);
            }
        }
    }
}

#[test]
fn infer_forward_is_tau() {
    let Some(g) = gpu() else { return };
    let s = g.ctx.default_stream();
    let (x, xr) = round::<f16>(&common::randn(&mut common::rng(5), 77));
    let cfg = AiecConfig {
        tau: 0.5,
        ..AiecConfig::default()
    };
    let y = g.check_schedules(|| {
        let d = s.clone_htod(&x).unwrap();
        dl(&s, &dev::infer_forward(&s, &cfg, &d).unwrap())
    });
    assert_eq!(from_bits(&y), cpu::infer_forward(&cfg, &xr).unwrap());
}

// ---------------------------------------------------------------------------
// global feature

fn feature_case<T: DType>(g: &Gpu, shape: ActShape, pool: Pool) {
    let s = g.ctx.default_stream();
    let numel = shape.numel().unwrap();
    let mut r = common::rng(numel as u64 + 7);
    let (a, ar) = round::<T>(&common::randn(&mut r, numel));
    let dav: Vec<f32> = common::randn(&mut r, shape.n * shape.c)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let (feat, dfull) = g.check_schedules(|| {
        let da_ = s.clone_htod(&a).unwrap();
        let f = dev::global_feature::<T>(&s, &shape, &da_, pool).unwrap();
        let dd = s.clone_htod(&dav).unwrap();
        let b = dev::global_feature_backward::<T>(&s, &shape, &dd, pool).unwrap();
        (dl(&s, &f), dl(&s, &b))
    });
    let want = cpu::global_feature(&shape, &ar, pool).unwrap();
    let what = format!("{} {shape:?} {pool:?}", T::NAME);
    close(
        &format!("feature {what}"),
        &from_bits(&feat),
        &want,
        0.0,
        F32,
    );
    let da64: Vec<f64> = dav.iter().map(|&v| v as f64).collect();
    let want_b = cpu::global_feature_backward(&shape, &da64, pool).unwrap();
    // da/S rounded once to storage.
    close(
        &format!("feature backward {what}"),
        &from_bits(&dfull),
        &want_b,
        unit::<T>(),
        F32,
    );
}

fn feature_all<T: DType>(g: &Gpu) {
    for shape in [
        ActShape::nchw(1, 7, 5, 3),
        ActShape::nchw(5, 7, 5, 3),
        ActShape::nchw(3, 5, 4, 4), // S = 16: whole 128-bit vectors per plane
        ActShape::nchw(2, 3, 7, 9), // S = 63: head / vector / tail per plane
    ] {
        feature_case::<T>(g, shape, Pool::Mean);
    }
    for n in [1, 5] {
        let shape = ActShape::nlc(n, 9, 7);
        for pool in [Pool::Mean, Pool::ClassToken(0), Pool::ClassToken(4)] {
            feature_case::<T>(g, shape, pool);
        }
    }
    // C a multiple of every dtype's vector (16-byte path), several ragged channel
    // chunks (32 f32 / 64 f16 channels per block), L > 32 token lanes; and L > 256
    // (two token chunks of the dF kernel).
    for (shape, pool) in [
        (ActShape::nlc(2, 40, 72), Pool::Mean),
        (ActShape::nlc(2, 40, 72), Pool::ClassToken(37)),
        (ActShape::nlc(1, 300, 16), Pool::Mean),
        (ActShape::nlc(1, 300, 16), Pool::ClassToken(290)),
    ] {
        feature_case::<T>(g, shape, pool);
    }
}

#[test]
fn global_feature_and_backward_all_dtypes() {
    let Some(g) = gpu() else { return };
    feature_all::<f32>(&g);
    feature_all::<f16>(&g);
    feature_all::<bf16>(&g);
}

/// The bits do not depend on where A starts in memory: a view one element into its
/// buffer (no 128-bit loads) gives exactly the aligned run's features — the NCHW
/// plane sums walk the same groups of V elements (by index) either way, the (N, L, C)
/// sums each channel's tokens in order either way.
#[test]
fn global_feature_offset_views_same_bits() {
    let Some(g) = gpu() else { return };
    fn same<T: DType>(g: &Gpu, shape: ActShape) {
        let s = g.ctx.default_stream();
        let numel = shape.numel().unwrap();
        let mut r = common::rng(numel as u64 + 11);
        let (a, _) = round::<T>(&common::randn(&mut r, numel));
        let run = |off: usize| {
            let mut buf = vec![a[0]; off];
            buf.extend_from_slice(&a);
            let d = s.clone_htod(&buf).unwrap();
            let f = dev::global_feature::<T>(&s, &shape, &d.slice(off..), Pool::Mean).unwrap();
            dl(&s, &f)
        };
        assert!(
            run(0) == run(1),
            "{} {shape:?}: features differ at offset 1",
            T::NAME
        );
    }
    for shape in [
        ActShape::nchw(3, 5, 4, 4),   // S = 16: whole vectors per plane
        ActShape::nchw(2, 3, 7, 9),   // S = 63: head / vectors / tail
        ActShape::nchw(1, 2, 40, 50), // S = 2000: many groups per thread
        ActShape::nlc(2, 40, 72),
    ] {
        same::<f32>(&g, shape);
        same::<f16>(&g, shape);
        same::<bf16>(&g, shape);
    }
}

// ---------------------------------------------------------------------------
// DMU

#[test]
fn dmu_forward_backward_parity() {
    let Some(g) = gpu() else { return };
    let s = g.ctx.default_stream();
    // (N, C, K, block target of the tiled kernels, see `dev::with_tile_target`). The
    // 37 × 70 × 45 cases span several ragged tiles of every GEMM (16-class / 32-class /
    // 32-channel tiles, 32-column chunks of C, 16-sample stages of dWd). Samples per
    // tile (logits, da) and dWd chunks: target 1: (32, 16), one stage; 9: (16, 16), 2
    // chunks; 12: (8, 8), 2 chunks; 132: (8, 4), 10 chunks. The small cases split dWd
    // into 2 chunks.
    for &(n, c, k, target) in &[
        (5usize, 7usize, 3usize, 132usize),
        (5, 7, 10, 132),
        (1, 11, 3, 132),
        (6, 7, 10, 132),
        (37, 70, 45, 1),
        (37, 70, 45, 9),
        (37, 70, 45, 12),
        (37, 70, 45, 132),
    ] {
        // Random rows; retry seeds until every random sample has a robust argmax.
        let mut found = None;
        for seed in 0..200u64 {
            let mut r = common::rng(1000 + seed);
            let mut a = uniform(&mut r, n * c, 0.0, 1.0);
            let wd = uniform(&mut r, k * c, -1.0, 1.0);
            if n >= 5 {
                // sample 1: all-zero feature -> all logits 0 -> tie -> class 0 wins.
                a[c..2 * c].iter_mut().for_each(|v| *v = 0.0);
            }
            let a32: Vec<f64> = a.iter().map(|&v| v as f32 as f64).collect();
            let w32: Vec<f64> = wd.iter().map(|&v| v as f32 as f64).collect();
            let labels: Vec<usize> = (0..n).map(|i| (i * 2 + seed as usize) % k).collect();
            let out = cpu::dmu_forward(&a32, &w32, &labels, AiecDims::new(n, c, k)).unwrap();
            let rand_rows: Vec<f64> = out
                .logits
                .chunks(k)
                .enumerate()
                .filter(|(i, _)| !(n >= 5 && *i == 1))
                .flat_map(|(_, z)| z.to_vec())
                .collect();
            if min_margin(&rand_rows, k) > MARGIN {
                found = Some((a32, w32, labels));
                break;
            }
        }
        let (mut a, wd, mut labels) = found.expect("a seed with robust DMU margins");
        if n >= 6 {
            // sample 5: a NaN feature -> NaN logits -> never correct; others unharmed.
            a[5 * c + 2] = f64::NAN;
            labels[5] = 0;
        }
        let dims = AiecDims::new(n, c, k);
        let dloss = uniform(&mut common::rng(9), n, 0.5, 2.0);
        let a32: Vec<f32> = a.iter().map(|&v| v as f32).collect();
        let w32: Vec<f32> = wd.iter().map(|&v| v as f32).collect();
        let dl32: Vec<f32> = dloss.iter().map(|&v| v as f32).collect();
        let got = g.check_schedules(|| {
            tile_target(target, || {
                let da_ = s.clone_htod(&a32).unwrap();
                let dw = s.clone_htod(&w32).unwrap();
                let o = dev::dmu_forward(&s, &da_, &dw, &labels, dims).unwrap();
                let dd = s.clone_htod(&dl32).unwrap();
                let gr = dev::dmu_backward(&s, &da_, &dw, &o.probs, &labels, &dd, dims).unwrap();
                (
                    dl(&s, &o.logits),
                    dl(&s, &o.probs),
                    dl(&s, &o.loss),
                    s.clone_dtoh(&o.correct).unwrap(),
                    dl(&s, &gr.da),
                    dl(&s, &gr.dwd),
                )
            })
        });
        let want = cpu::dmu_forward(&a, &wd, &labels, dims).unwrap();
        let what = format!("N={n} C={c} K={k} target={target}");
        close(
            &format!("logits {what}"),
            &from_bits(&got.0),
            &want.logits,
            0.0,
            F32,
        );
        close(
            &format!("probs {what}"),
            &from_bits(&got.1),
            &want.probs,
            0.0,
            F32,
        );
        close(
            &format!("loss {what}"),
            &from_bits(&got.2),
            &want.loss,
            0.0,
            F32,
        );
        let corr: Vec<bool> = got.3.iter().map(|&b| b != 0).collect();
        assert_eq!(corr, want.correct, "correct {what}");
        if n >= 5 {
            assert_eq!(corr[1], labels[1] == 0, "tie: first max (class 0) wins");
        }
        if n >= 6 {
            assert!(!corr[5], "NaN logits are never correct");
        }
        // The CPU backward with the GPU's probs (the saved forward state).
        let probs_gpu = from_bits(&got.1);
        let want_g =
            cpu::dmu_backward(&a, &wd, &probs_gpu, &labels, &dloss_f32(&dl32), dims).unwrap();
        close(
            &format!("da {what}"),
            &from_bits(&got.4),
            &want_g.da,
            0.0,
            F32,
        );
        if n < 6 {
            close(
                &format!("dwd {what}"),
                &from_bits(&got.5),
                &want_g.dwd,
                0.0,
                F32,
            );
        } else {
            // The NaN sample's logits, probabilities, loss and da row are all NaN and
            // every other sample's are finite and within tolerance (`close` above
            // requires NaN exactly where the reference has NaN). Its whole
            // probability row is NaN, so it reaches every dWd[k, c] =
            // Σ_n dloss_n·(p[n,k] − [k = y_n])·a[n,c] (NaN·0 is NaN): the reference
            // dWd is entirely NaN, and a "NaN pattern" comparison would compare no
            // dWd value at all. So: state both patterns explicitly, then compare
            // the N = 6 dWd by value on the same data with the NaN replaced.
            let nan_rows = |v: &[f64], w: usize| -> Vec<bool> {
                v.chunks(w).map(|r| r.iter().all(|x| x.is_nan())).collect()
            };
            let finite_rows = |v: &[f64], w: usize| -> Vec<bool> {
                v.chunks(w)
                    .map(|r| r.iter().all(|x| x.is_finite()))
                    .collect()
            };
            let only5: Vec<bool> = (0..n).map(|i| i == 5).collect();
            let not5: Vec<bool> = (0..n).map(|i| i != 5).collect();
            for (what2, v, w) in [
                ("logits", from_bits(&got.0), k),
                ("probs", from_bits(&got.1), k),
                ("loss", from_bits(&got.2), 1),
                ("da", from_bits(&got.4), c),
            ] {
                assert_eq!(nan_rows(&v, w), only5, "{what2} {what}: NaN rows");
                assert_eq!(finite_rows(&v, w), not5, "{what2} {what}: finite rows");
            }
            assert!(
                want_g.dwd.iter().all(|v| v.is_nan()),
                "reference dWd all NaN"
            );
            let g5 = from_bits(&got.5);
            assert!(g5.iter().all(|v| v.is_nan()), "dwd {what}: all NaN");
            // The same N = 6 batch with a finite feature for sample 5: dWd by value.
            let mut af = a.clone();
            af[5 * c + 2] = 0.5;
            let af32: Vec<f32> = af.iter().map(|&v| v as f32).collect();
            let (pf, dwf) = g.check_schedules(|| {
                tile_target(target, || {
                    let da_ = s.clone_htod(&af32).unwrap();
                    let dw = s.clone_htod(&w32).unwrap();
                    let o = dev::dmu_forward(&s, &da_, &dw, &labels, dims).unwrap();
                    let dd = s.clone_htod(&dl32).unwrap();
                    let gr =
                        dev::dmu_backward(&s, &da_, &dw, &o.probs, &labels, &dd, dims).unwrap();
                    (dl(&s, &o.probs), dl(&s, &gr.dwd))
                })
            });
            let want_f =
                cpu::dmu_backward(&af, &wd, &from_bits(&pf), &labels, &dloss_f32(&dl32), dims)
                    .unwrap();
            assert!(want_f.dwd.iter().all(|v| v.is_finite()));
            close(
                &format!("dwd {what} (finite)"),
                &from_bits(&dwf),
                &want_f.dwd,
                0.0,
                F32,
            );
        }
    }
}

fn dloss_f32(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

// ---------------------------------------------------------------------------
// counters, masks, gate loss

#[test]
fn counters_update_rate_reset_roundtrip() {
    let Some(g) = gpu() else { return };
    let s = g.ctx.default_stream();
    let (n, c, k) = (6usize, 7usize, 4usize);
    let mut r = common::rng(77);
    let mut batches = Vec::new();
    for step in 0..3 {
        let mut a: Vec<f64> = uniform(&mut r, n * c, -0.5, 1.0)
            .into_iter()
            .map(|v| if v < 0.2 { 0.0 } else { v as f32 as f64 })
            .collect();
        a[3] = f64::NAN; // neither activation nor inhibition
        a[4] = -0.5; // neither
        let labels: Vec<usize> = (0..n).map(|i| (i + step) % (k - 1)).collect(); // class 3 never seen
        let correct: Vec<bool> = (0..n).map(|i| (i + step) % 3 != 0).collect();
        batches.push((a, labels, correct));
    }
    let (theta_bits, host, zero) = g.check_schedules(|| {
        let mut dc = dev::DeviceCounters::new(&s, k, c).unwrap();
        for (a, labels, correct) in &batches {
            let a32: Vec<f32> = a.iter().map(|&v| v as f32).collect();
            let cu: Vec<u8> = correct.iter().map(|&b| b as u8).collect();
            let da = s.clone_htod(&a32).unwrap();
            let dcor = s.clone_htod(&cu).unwrap();
            dc.update(&s, &da, labels, &dcor).unwrap();
        }
        let v = dl(&s, &dc.relative_rate(&s).unwrap());
        let host = dc.to_host(&s).unwrap();
        dc.reset(&s).unwrap();
        let zero = dc.to_host(&s).unwrap();
        (v, host, zero)
    });
    let mut want = Counters::new(k, c).unwrap();
    for (a, labels, correct) in &batches {
        want.update(a, labels, correct).unwrap();
    }
    assert_eq!(host, want, "counters equal the CPU's exactly");
    // The NaN (and the negative value) count as neither activation nor inhibition:
    // the reference counters are the same with both replaced by −1, and sample 0
    // (which holds them) is correct in two of the three batches, so it is counted.
    assert!(batches.iter().filter(|b| b.2[0]).count() >= 1);
    let mut neither = Counters::new(k, c).unwrap();
    for (a, labels, correct) in &batches {
        let mut a = a.clone();
        a[3] = -1.0;
        a[4] = -1.0;
        neither.update(&a, labels, correct).unwrap();
    }
    assert_eq!(want, neither, "NaN counts as neither");
    assert_eq!(want.phi()[3], 0, "a class with no correct sample");
    let v_cpu: Vec<u32> = want
        .relative_rate::<f32>()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    assert_eq!(theta_bits, v_cpu, "v bitwise");
    assert_eq!(zero, Counters::new(k, c).unwrap(), "reset clears");
    // from_host round trip.
    let back = g.check_schedules(|| {
        dev::DeviceCounters::from_host(&s, &want)
            .unwrap()
            .to_host(&s)
            .unwrap()
    });
    assert_eq!(back, want);
}

#[test]
fn gate_masks_loss_backward_parity() {
    let Some(g) = gpu() else { return };
    let s = g.ctx.default_stream();
    let (n, c, k) = (5usize, 7usize, 3usize);
    let mut r = common::rng(4242);
    let mut v: Vec<f32> = uniform(&mut r, k * c, -1.0, 1.0)
        .iter()
        .map(|&x| x as f32)
        .collect();
    let mut wd: Vec<f32> = uniform(&mut r, k * c, -1.0, 1.0)
        .iter()
        .map(|&x| x as f32)
        .collect();
    v[0] = 0.0;
    wd[0] = 0.0; // both at the boundary: gated
    v[1] = f32::NAN; // NaN: not gated
    wd[c..2 * c].iter_mut().for_each(|w| *w = w.abs() + 0.1); // class 1: no gated channel
    let mut a: Vec<f32> = uniform(&mut r, n * c, -1.0, 1.0)
        .iter()
        .map(|&x| x as f32)
        .collect();
    a[2] = 0.0; // sign(0) = 0
    let labels = vec![0usize, 1, 2, 0, 1];
    let dloss: Vec<f32> = uniform(&mut r, n, 0.5, 2.0)
        .iter()
        .map(|&x| x as f32)
        .collect();
    let dims = AiecDims::new(n, c, k);
    let (m, loss, da) = g.check_schedules(|| {
        let dv = s.clone_htod(&v).unwrap();
        let dw = s.clone_htod(&wd).unwrap();
        let m = dev::gate_masks(&s, &dv, &dw).unwrap();
        let d_a = s.clone_htod(&a).unwrap();
        let l = dev::gate_loss(&s, &d_a, &m, &labels, dims).unwrap();
        let dd = s.clone_htod(&dloss).unwrap();
        let da = dev::gate_loss_backward(&s, &d_a, &m, &labels, &dd, dims).unwrap();
        (s.clone_dtoh(&m).unwrap(), dl(&s, &l), dl(&s, &da))
    });
    let want_m = cpu::gate_masks(&v, &wd).unwrap();
    let mb: Vec<bool> = m.iter().map(|&x| x != 0).collect();
    assert_eq!(mb, want_m, "masks exact");
    assert!(want_m[0] && !want_m[1]);
    assert!(!want_m[c..2 * c].iter().any(|&x| x), "class 1 row all zero");
    let a64: Vec<f64> = a.iter().map(|&x| x as f64).collect();
    let want_l = cpu::gate_loss(&a64, &want_m, &labels, dims).unwrap();
    close("gate loss", &from_bits(&loss), &want_l, 0.0, F32);
    assert_eq!(from_bits(&loss)[1], 0.0, "all-zero mask row -> 0");
    let want_da =
        cpu::gate_loss_backward(&a64, &want_m, &labels, &dloss_f32(&dloss), dims).unwrap();
    close("gate backward", &from_bits(&da), &want_da, 0.0, F32);
}

// ---------------------------------------------------------------------------
// the whole layer: several steps, counters, losses, backward

struct Step {
    f: Vec<f64>,
    labels: Vec<usize>,
    d_out: Vec<f64>,
}

/// Builds `steps` batches whose CPU DMU decisions are robust (asserted margin),
/// retrying seeds. Channel `(n + step) % C` of sample n is made all-negative, so
/// TAU zeroes it and the feature there is exactly 0 (an inhibition). Class 1's
/// weight row is positive, so its mask row is all zero.
#[allow(clippy::type_complexity)]
fn make_case<T: DType>(
    cfg: &AiecConfig,
    shape: ActShape,
    k: usize,
    steps: usize,
) -> (Vec<Step>, Vec<f64>) {
    let numel = shape.numel().unwrap();
    let (n, c) = (shape.n, shape.c);
    for seed in 0..300u64 {
        let mut r = common::rng(seed * 7919 + numel as u64 + k as u64);
        let mut wd: Vec<f64> = uniform(&mut r, k * c, -1.0, 1.0)
            .iter()
            .map(|&v| v as f32 as f64)
            .collect();
        if k > 1 {
            for w in &mut wd[c..2 * c] {
                *w = (w.abs() * 0.05 + 0.01) as f32 as f64;
            }
        }
        let mut out = Vec::new();
        let mut ok = true;
        for step in 0..steps {
            let mut f = common::randn(&mut r, numel);
            for nn in 0..n {
                let cc = (nn + step) % c;
                for t in 0..shape.s {
                    let i = shape.idx(nn, cc, t);
                    f[i] = -f[i].abs() - 0.01;
                }
            }
            let (_, fr) = round::<T>(&f);
            let labels: Vec<usize> = (0..n)
                .map(|i| {
                    if i == 0 && step == 0 {
                        1 % k
                    } else {
                        (3 * i + step + seed as usize) % k
                    }
                })
                .collect();
            let out_cpu =
                cpu::train_forward_with_masks(cfg, &shape, &fr, &wd, &labels, &vec![false; k * c])
                    .unwrap();
            if min_margin(out_cpu.saved.logits(), k) <= MARGIN {
                ok = false;
                break;
            }
            let (_, d_out) = round::<T>(&common::randn(&mut r, numel));
            out.push(Step {
                f: fr,
                labels,
                d_out,
            });
        }
        if ok {
            return (out, wd);
        }
    }
    panic!("no seed with robust DMU margins");
}

/// GPU outputs of one step as bit patterns (comparable across schedules).
#[derive(Debug, PartialEq)]
struct StepOut {
    out: Vec<u32>,
    feature: Vec<u32>,
    logits: Vec<u32>,
    probs: Vec<u32>,
    correct: Vec<u8>,
    masks: Vec<u8>,
    aux: Vec<u32>,
    gate: Vec<u32>,
    means: (u32, u32, u32),
    counters: Counters,
    df: Vec<u32>,
    dwd: Vec<u32>,
}

fn train_case<T: DType>(g: &Gpu, shape: ActShape, pool: Pool, k: usize, tau: f64) -> u64 {
    let s = g.ctx.default_stream();
    let cfg = AiecConfig {
        tau,
        lambda_aux: 1.0,
        lambda_gate: 200.0,
        pool,
    };
    let steps = 3;
    let (data, wd) = make_case::<T>(&cfg, shape, k, steps);
    let loss_scale = 0.5f32;
    let wd32: Vec<f32> = wd.iter().map(|&v| v as f32).collect();
    let got: Vec<StepOut> = g.check_schedules(|| {
        let dwd_in = s.clone_htod(&wd32).unwrap();
        let mut counters = dev::DeviceCounters::new(&s, k, shape.c).unwrap();
        let mut res = Vec::new();
        for st in &data {
            let (f, _) = round::<T>(&st.f);
            let (d_out, _) = round::<T>(&st.d_out);
            let df_in = s.clone_htod(&f).unwrap();
            let dd = s.clone_htod(&d_out).unwrap();
            let o = dev::train_forward::<T>(
                &s,
                &cfg,
                &shape,
                &df_in,
                &dwd_in,
                &st.labels,
                &mut counters,
            )
            .unwrap();
            let gr = dev::train_backward::<T>(
                &s, &cfg, &shape, &dd, loss_scale, &df_in, &dwd_in, &o.saved,
            )
            .unwrap();
            let (m0, m1, m2) = o.losses.means_to_host(&s).unwrap();
            res.push(StepOut {
                out: dl(&s, &o.out),
                feature: dl(&s, o.saved.feature()),
                logits: dl(&s, o.saved.logits()),
                probs: dl(&s, o.saved.probs()),
                correct: s.clone_dtoh(o.saved.correct()).unwrap(),
                masks: s.clone_dtoh(o.saved.masks()).unwrap(),
                aux: dl(&s, &o.losses.aux),
                gate: dl(&s, &o.losses.gate),
                means: (m0.to_bits(), m1.to_bits(), m2.to_bits()),
                counters: counters.to_host(&s).unwrap(),
                df: dl(&s, &gr.df),
                dwd: dl(&s, &gr.dwd),
            });
        }
        res
    });

    let mut counters = Counters::new(k, shape.c).unwrap();
    let mut correct_total = 0u64;
    for (step, (st, go)) in data.iter().zip(&got).enumerate() {
        let what = format!(
            "{} {:?} N={} C={} S={} {pool:?} K={k} tau={tau} step {step}",
            T::NAME,
            shape.layout,
            shape.n,
            shape.c,
            shape.s
        );
        let o = cpu::train_forward(&cfg, &shape, &st.f, &wd, &st.labels, &mut counters).unwrap();
        // Exact: A is F or 0.
        assert_eq!(from_bits(&go.out), o.out, "out {what}");
        close(
            &format!("feature {what}"),
            &from_bits(&go.feature),
            o.saved.feature(),
            0.0,
            F32,
        );
        close(
            &format!("logits {what}"),
            &from_bits(&go.logits),
            o.saved.logits(),
            0.0,
            F32,
        );
        close(
            &format!("probs {what}"),
            &from_bits(&go.probs),
            o.saved.probs(),
            0.0,
            F32,
        );
        let corr: Vec<bool> = go.correct.iter().map(|&b| b != 0).collect();
        assert_eq!(corr, o.saved.correct(), "correct {what}");
        correct_total += corr.iter().filter(|&&b| b).count() as u64;
        assert_eq!(go.counters, counters, "counters {what}");
        let masks: Vec<bool> = go.masks.iter().map(|&b| b != 0).collect();
        assert_eq!(masks, o.saved.masks(), "masks {what}");
        if k > 1 {
            assert!(
                !masks[shape.c..2 * shape.c].iter().any(|&b| b),
                "class 1 mask row is zero"
            );
        }
        if step == 0 && k > 1 {
            assert_eq!(st.labels[0], 1);
            assert_eq!(
                from_bits(&go.gate)[0],
                0.0,
                "all-zero mask row -> gate loss 0"
            );
        }
        close(
            &format!("aux {what}"),
            &from_bits(&go.aux),
            &o.losses.aux,
            0.0,
            F32,
        );
        close(
            &format!("gate {what}"),
            &from_bits(&go.gate),
            &o.losses.gate,
            0.0,
            F32,
        );
        let means = from_bits(&[go.means.0, go.means.1, go.means.2]);
        let want_means = [
            o.losses.aux_mean,
            o.losses.gate_mean,
            o.losses.total_aux_gate,
        ];
        close(&format!("means {what}"), &means, &want_means, F32, 0.0);

        let gr = cpu::train_backward(
            &cfg,
            &shape,
            &st.d_out,
            loss_scale as f64,
            &st.f,
            &wd,
            &o.saved,
        )
        .unwrap();
        // dF rounded once to storage; f32 term for da.
        close(
            &format!("df {what}"),
            &from_bits(&go.df),
            &gr.df,
            unit::<T>(),
            F32,
        );
        close(
            &format!("dwd {what}"),
            &from_bits(&go.dwd),
            &gr.dwd,
            0.0,
            F32,
        );
    }
    if k == 10 {
        assert!(
            counters.phi().contains(&0),
            "some class has no correct sample"
        );
    }
    correct_total
}

fn train_all<T: DType>(g: &Gpu) {
    let mut correct = 0;
    for &(n, k, tau) in &[(1usize, 3usize, 0.0f64), (5, 10, 0.25), (5, 3, 0.0)] {
        correct += train_case::<T>(g, ActShape::nchw(n, 7, 5, 3), Pool::Mean, k, tau);
        correct += train_case::<T>(g, ActShape::nlc(n, 9, 7), Pool::Mean, k, tau);
        correct += train_case::<T>(g, ActShape::nlc(n, 9, 7), Pool::ClassToken(4), k, tau);
    }
    // The 16-byte (N, L, C) path (C = 16) with L > 32 token lanes, and the tiled
    // kernels' largest sample tiles (block target 1; da with the gate term).
    correct += tile_target(1, || {
        train_case::<T>(g, ActShape::nlc(5, 40, 16), Pool::Mean, 10, 0.25)
    });
    assert!(
        correct > 0,
        "some samples were correct: counters were exercised"
    );
}

#[test]
fn train_parity_f32() {
    let Some(g) = gpu() else { return };
    train_all::<f32>(&g);
}

#[test]
fn train_parity_f16() {
    let Some(g) = gpu() else { return };
    train_all::<f16>(&g);
}

#[test]
fn train_parity_bf16() {
    let Some(g) = gpu() else { return };
    train_all::<bf16>(&g);
}

// ---------------------------------------------------------------------------
// bad input: every validation path returns the right Err, before any launch

#[test]
fn bad_input() {
    let Some(g) = gpu() else { return };
    let s = g.ctx.default_stream();
    let shape = ActShape::nchw(2, 3, 2, 2);
    let (k, c) = (4usize, 3usize);
    let f: Vec<f32> = (0..24).map(|i| (i as f32 - 10.0) * 0.1).collect();
    let df = s.clone_htod(&f).unwrap();
    let wd: Vec<f32> = (0..k * c).map(|i| i as f32 * 0.1 - 0.5).collect();
    let dwd = s.clone_htod(&wd).unwrap();
    let cfg = AiecConfig::default();
    let mut counters = dev::DeviceCounters::new(&s, k, c).unwrap();
    // A successful step first, so the counters are non-trivial.
    let good =
        dev::train_forward::<f32>(&s, &cfg, &shape, &df, &dwd, &[0, 0], &mut counters).unwrap();
    let before = counters.to_host(&s).unwrap();

    let r = dev::train_forward::<f32>(&s, &cfg, &shape, &df, &dwd, &[0, 4], &mut counters);
    assert!(
        matches!(
            r,
            Err(Error::LabelOutOfRange {
                sample: 1,
                label: 4,
                classes: 4
            })
        ),
        "{r:?}"
    );
    assert_eq!(counters.to_host(&s).unwrap(), before, "counters untouched");
    let r = dev::train_forward::<f32>(&s, &cfg, &shape, &df, &dwd, &[0], &mut counters);
    assert!(
        matches!(r, Err(Error::LengthMismatch { what: "labels", .. })),
        "{r:?}"
    );
    let short = s.clone_htod(&wd[..k * c - 1]).unwrap();
    let r = dev::train_forward::<f32>(&s, &cfg, &shape, &df, &short, &[0, 0], &mut counters);
    assert!(
        matches!(r, Err(Error::LengthMismatch { what: "wd", .. })),
        "{r:?}"
    );
    for tau in [-0.1, f64::NAN, f64::INFINITY] {
        let bad = AiecConfig { tau, ..cfg };
        let r = dev::train_forward::<f32>(&s, &bad, &shape, &df, &dwd, &[0, 0], &mut counters);
        assert!(
            matches!(r, Err(Error::InvalidParam { what: "tau", .. })),
            "{r:?}"
        );
        let r = dev::infer_forward::<f32>(&s, &bad, &df);
        assert!(
            matches!(r, Err(Error::InvalidParam { what: "tau", .. })),
            "{r:?}"
        );
    }
    let bad = AiecConfig {
        lambda_gate: -1.0,
        ..cfg
    };
    let r = dev::train_forward::<f32>(&s, &bad, &shape, &df, &dwd, &[0, 0], &mut counters);
    assert!(matches!(r, Err(Error::InvalidParam { .. })), "{r:?}");
    for t in [-1.0f32, f32::NAN] {
        let r = dev::tau_forward::<f32>(&s, &df, t);
        assert!(
            matches!(r, Err(Error::InvalidParam { what: "tau", .. })),
            "{r:?}"
        );
        let r = dev::tau_backward::<f32>(&s, &df, &df, t);
        assert!(
            matches!(r, Err(Error::InvalidParam { what: "tau", .. })),
            "{r:?}"
        );
    }
    // zero dims
    let zero = ActShape::nchw(0, 3, 2, 2);
    let r = dev::train_forward::<f32>(&s, &cfg, &zero, &df, &dwd, &[], &mut counters);
    assert!(matches!(r, Err(Error::Empty { .. })), "{r:?}");
    let r = dev::global_feature::<f32>(&s, &ActShape::nlc(2, 0, 3), &df, Pool::Mean);
    assert!(matches!(r, Err(Error::Empty { .. })), "{r:?}");
    assert!(matches!(
        dev::DeviceCounters::new(&s, 0, 3),
        Err(Error::Empty { .. })
    ));
    assert!(matches!(
        dev::DeviceCounters::new(&s, 3, 0),
        Err(Error::Empty { .. })
    ));
    let empty = df.slice(0..0);
    let r = dev::tau_forward::<f32>(&s, &empty, 0.0);
    assert!(matches!(r, Err(Error::Empty { .. })), "{r:?}");
    let r = dev::tau_backward::<f32>(&s, &df.slice(0..3), &df, 0.0);
    assert!(
        matches!(r, Err(Error::LengthMismatch { what: "dy", .. })),
        "{r:?}"
    );
    // ClassToken misuse
    let tok = AiecConfig {
        pool: Pool::ClassToken(0),
        ..cfg
    };
    let r = dev::train_forward::<f32>(&s, &tok, &shape, &df, &dwd, &[0, 0], &mut counters);
    assert!(matches!(r, Err(Error::Shape { what: "pool", .. })), "{r:?}");
    let nlc = ActShape::nlc(2, 4, 3);
    let r = dev::global_feature::<f32>(&s, &nlc, &df, Pool::ClassToken(4));
    assert!(
        matches!(r, Err(Error::InvalidParam { what: "pool", .. })),
        "{r:?}"
    );
    let da = s.clone_htod(&[0.0f32; 6]).unwrap();
    let r = dev::global_feature_backward::<f32>(&s, &shape, &da, Pool::ClassToken(0));
    assert!(matches!(r, Err(Error::Shape { what: "pool", .. })), "{r:?}");
    let r = dev::global_feature_backward::<f32>(&s, &shape, &da.slice(0..5), Pool::Mean);
    assert!(
        matches!(r, Err(Error::LengthMismatch { what: "da", .. })),
        "{r:?}"
    );
    // counters of the wrong width
    let mut other = dev::DeviceCounters::new(&s, k, c + 1).unwrap();
    let r = dev::train_forward::<f32>(&s, &cfg, &shape, &df, &dwd, &[0, 0], &mut other);
    assert!(
        matches!(
            r,
            Err(Error::Shape {
                what: "counters",
                ..
            })
        ),
        "{r:?}"
    );
    // f of the wrong length
    let r = dev::train_forward::<f32>(
        &s,
        &cfg,
        &shape,
        &df.slice(0..23),
        &dwd,
        &[0, 0],
        &mut counters,
    );
    assert!(
        matches!(r, Err(Error::LengthMismatch { what: "f", .. })),
        "{r:?}"
    );
    // backward: cfg mismatch, shape mismatch, d_out length
    let other_cfg = AiecConfig { tau: 0.5, ..cfg };
    let r = dev::train_backward::<f32>(&s, &other_cfg, &shape, &df, 1.0, &df, &dwd, &good.saved);
    assert!(
        matches!(r, Err(Error::InvalidParam { what: "cfg", .. })),
        "{r:?}"
    );
    let sh2 = ActShape::nchw(2, 3, 4, 1);
    let r = dev::train_backward::<f32>(&s, &cfg, &sh2, &df, 1.0, &df, &dwd, &good.saved);
    assert!(
        r.is_ok(),
        "same N, C with another S is a valid shape: {:?}",
        r.err()
    );
    let sh3 = ActShape::nchw(4, 3, 2, 1);
    let r = dev::train_backward::<f32>(&s, &cfg, &sh3, &df, 1.0, &df, &dwd, &good.saved);
    assert!(
        matches!(r, Err(Error::Shape { what: "shape", .. })),
        "{r:?}"
    );
    let r = dev::train_backward::<f32>(
        &s,
        &cfg,
        &shape,
        &df.slice(0..20),
        1.0,
        &df,
        &dwd,
        &good.saved,
    );
    assert!(
        matches!(r, Err(Error::LengthMismatch { what: "d_out", .. })),
        "{r:?}"
    );
    let r = dev::train_backward::<f32>(&s, &cfg, &shape, &df, 1.0, &df, &short, &good.saved);
    assert!(
        matches!(r, Err(Error::LengthMismatch { what: "wd", .. })),
        "{r:?}"
    );
    // standalone ops
    let dims = AiecDims::new(2, c, k);
    let a = s.clone_htod(&[0.5f32; 6]).unwrap();
    let r = dev::dmu_forward(&s, &a, &dwd, &[0, 9], dims);
    assert!(matches!(r, Err(Error::LabelOutOfRange { .. })), "{r:?}");
    let r = dev::dmu_forward(&s, &a.slice(0..5), &dwd, &[0, 1], dims);
    assert!(
        matches!(r, Err(Error::LengthMismatch { what: "a", .. })),
        "{r:?}"
    );
    let r = dev::dmu_forward(&s, &a, &dwd, &[0, 1], AiecDims::new(2, c, 0));
    assert!(matches!(r, Err(Error::Empty { .. })), "{r:?}");
    let probs = s.clone_htod(&[0.25f32; 8]).unwrap();
    let r = dev::dmu_backward(
        &s,
        &a,
        &dwd,
        &probs.slice(0..7),
        &[0, 1],
        &a.slice(0..2),
        dims,
    );
    assert!(
        matches!(r, Err(Error::LengthMismatch { what: "probs", .. })),
        "{r:?}"
    );
    let r = dev::dmu_backward(&s, &a, &dwd, &probs, &[0, 1], &a.slice(0..3), dims);
    assert!(
        matches!(r, Err(Error::LengthMismatch { what: "dloss", .. })),
        "{r:?}"
    );
    let r = dev::gate_masks(&s, &dwd, &dwd.slice(0..3));
    assert!(
        matches!(r, Err(Error::LengthMismatch { what: "wd", .. })),
        "{r:?}"
    );
    let masks = s.clone_htod(&[1u8; 12]).unwrap();
    let r = dev::gate_loss(&s, &a, &masks.slice(0..11), &[0, 1], dims);
    assert!(
        matches!(r, Err(Error::LengthMismatch { what: "masks", .. })),
        "{r:?}"
    );
    let r = dev::gate_loss(&s, &a, &masks, &[0, 4], dims);
    assert!(matches!(r, Err(Error::LabelOutOfRange { .. })), "{r:?}");
    let r = dev::gate_loss_backward(&s, &a, &masks, &[0, 1], &a.slice(0..1), dims);
    assert!(
        matches!(r, Err(Error::LengthMismatch { what: "dloss", .. })),
        "{r:?}"
    );
    let cor = s.clone_htod(&[1u8, 1]).unwrap();
    let r = counters.update(&s, &a, &[0, 5], &cor);
    assert!(matches!(r, Err(Error::LabelOutOfRange { .. })), "{r:?}");
    let r = counters.update(&s, &a, &[0, 1], &cor.slice(0..1));
    assert!(
        matches!(
            r,
            Err(Error::LengthMismatch {
                what: "correct",
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(counters.to_host(&s).unwrap(), before, "counters untouched");
    let _ = Layout::Nchw;
}

// ---------------------------------------------------------------------------
// labels on the device, the fixed-mask loss backward with a device scale

/// `train_forward` with the labels as a device buffer gives the same bits as with
/// host labels; `aux_gate_backward` (scale read on the device) matches the DMU and
/// gate backwards with host-made weights; out-of-range device labels are flagged
/// (NaN losses, never correct, never counted, zero gradient rows), never followed.
#[test]
fn device_labels_and_aux_gate_backward() {
    let Some(g) = gpu() else { return };
    let s = g.ctx.default_stream();
    let shape = ActShape::nchw(5, 4, 2, 3);
    let (n, c, k) = (shape.n, shape.c, 3usize);
    let cfg = AiecConfig {
        tau: 0.1,
        lambda_aux: 1.0,
        lambda_gate: 5.0,
        pool: Pool::Mean,
    };
    let mut r = common::rng(901);
    let f32v = |v: Vec<f64>| -> Vec<f32> { v.iter().map(|&x| x as f32).collect() };
    let f = f32v(uniform(&mut r, shape.numel().unwrap(), -1.0, 1.0));
    let wd = f32v(uniform(&mut r, k * c, -1.0, 1.0));
    let labels: Vec<usize> = (0..n).map(|i| (2 * i + 1) % k).collect();
    let lab32: Vec<u32> = labels.iter().map(|&y| y as u32).collect();
    let dims = AiecDims::new(n, c, k);
    let run = |device: bool| {
        let (df, dwd) = (s.clone_htod(&f).unwrap(), s.clone_htod(&wd).unwrap());
        let dlab = s.clone_htod(&lab32).unwrap();
        let mut counters = dev::DeviceCounters::new(&s, k, c).unwrap();
        let o = if device {
            dev::train_forward::<f32>(&s, &cfg, &shape, &df, &dwd, &dlab, &mut counters)
        } else {
            dev::train_forward::<f32>(&s, &cfg, &shape, &df, &dwd, &labels, &mut counters)
        }
        .unwrap();
        assert_eq!(o.saved.labels().is_none(), device);
        let (m0, m1, m2) = o.losses.means_to_host(&s).unwrap();
        (
            dl(&s, &o.out),
            s.clone_dtoh(o.saved.masks()).unwrap(),
            (m0.to_bits(), m1.to_bits(), m2.to_bits()),
            s.clone_dtoh(&o.losses.means).unwrap()[3].to_bits(),
            counters.to_host(&s).unwrap(),
        )
    };
    let host = g.check_schedules(|| run(false));
    let device = g.check_schedules(|| run(true));
    assert_eq!(host, device, "device labels change nothing");
    // The accuracy (4th mean) is the fraction of counted samples.
    let phi: u64 = host.4.phi().iter().sum();
    assert_eq!(f32::from_bits(host.3), phi as f32 / n as f32);

    // aux_gate_backward vs dmu_backward + gate_loss_backward with host-made weights.
    let a = f32v(uniform(&mut r, n * c, -1.0, 1.0));
    let masks: Vec<u8> = (0..k * c).map(|i| u8::from(i % 3 != 1)).collect();
    let scale = 0.75f32;
    let (got, want) = g.check_schedules(|| {
        let (da_, dw) = (s.clone_htod(&a).unwrap(), s.clone_htod(&wd).unwrap());
        let dm = s.clone_htod(&masks).unwrap();
        let dlab = s.clone_htod(&lab32).unwrap();
        let o = dev::dmu_forward(&s, &da_, &dw, &dlab, dims).unwrap();
        let sc = s.clone_htod(&[scale]).unwrap();
        let lam = (cfg.lambda_aux, cfg.lambda_gate);
        let gr =
            dev::aux_gate_backward(&s, &da_, &dw, &o.probs, &dm, &dlab, &sc, lam, dims).unwrap();
        let w = |l: f64| {
            s.clone_htod(&vec![(scale as f64 * l / n as f64) as f32; n])
                .unwrap()
        };
        let (wa, wg) = (w(cfg.lambda_aux), w(cfg.lambda_gate));
        let g1 = dev::dmu_backward(&s, &da_, &dw, &o.probs, &labels, &wa, dims).unwrap();
        let g2 = dev::gate_loss_backward(&s, &da_, &dm, &labels, &wg, dims).unwrap();
        let (d1, d2) = (from_bits(&dl(&s, &g1.da)), from_bits(&dl(&s, &g2)));
        let sum_bits: Vec<u32> = d1
            .iter()
            .zip(&d2)
            .map(|(x, y)| (*x as f32 + *y as f32).to_bits())
            .collect();
        let got = (dl(&s, &gr.da), dl(&s, &gr.dwd));
        (got, (sum_bits, dl(&s, &g1.dwd)))
    });
    close(
        "aux_gate da",
        &from_bits(&got.0),
        &from_bits(&want.0),
        0.0,
        F32,
    );
    close(
        "aux_gate dWd",
        &from_bits(&got.1),
        &from_bits(&want.1),
        0.0,
        F32,
    );

    // Out-of-range labels on the device: sample 1 has label K, sample 3 u32::MAX.
    let mut bad = lab32.clone();
    bad[1] = k as u32;
    bad[3] = u32::MAX;
    let (loss, correct, gate, da_bad, phi_bad) = g.check_schedules(|| {
        let (da_, dw) = (s.clone_htod(&a).unwrap(), s.clone_htod(&wd).unwrap());
        let dm = s.clone_htod(&masks).unwrap();
        let dlab = s.clone_htod(&bad).unwrap();
        let o = dev::dmu_forward(&s, &da_, &dw, &dlab, dims).unwrap();
        let gl = dev::gate_loss(&s, &da_, &dm, &dlab, dims).unwrap();
        let sc = s.clone_htod(&[scale]).unwrap();
        let gr = dev::aux_gate_backward(&s, &da_, &dw, &o.probs, &dm, &dlab, &sc, (1.0, 5.0), dims)
            .unwrap();
        let mut counters = dev::DeviceCounters::new(&s, k, c).unwrap();
        let all = s.clone_htod(&vec![1u8; n]).unwrap();
        counters.update(&s, &da_, &dlab, &all).unwrap();
        let phi = counters.to_host(&s).unwrap().phi().iter().sum::<u64>();
        (
            dl(&s, &o.loss),
            s.clone_dtoh(&o.correct).unwrap(),
            dl(&s, &gl),
            dl(&s, &gr.da),
            phi,
        )
    });
    let (loss, gate, da_bad) = (from_bits(&loss), from_bits(&gate), from_bits(&da_bad));
    for i in 0..n {
        let flagged = i == 1 || i == 3;
        assert_eq!(loss[i].is_nan(), flagged, "L_aux[{i}]");
        assert_eq!(gate[i].is_nan(), flagged, "L_gate[{i}]");
        if flagged {
            assert_eq!(correct[i], 0);
            assert!(da_bad[i * c..(i + 1) * c].iter().all(|&v| v == 0.0));
        }
    }
    assert_eq!(phi_bad, (n - 2) as u64, "flagged samples are not counted");
    // A device label buffer of the wrong length is an error before any launch.
    let short = s.clone_htod(&lab32[..n - 1]).unwrap();
    let da_ = s.clone_htod(&a).unwrap();
    let dw = s.clone_htod(&wd).unwrap();
    assert!(matches!(
        dev::dmu_forward(&s, &da_, &dw, &short, dims),
        Err(Error::LengthMismatch { .. })
    ));
}
