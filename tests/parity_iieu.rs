//! GPU parity of IIEU-B (src/cuda/iieu.rs, kernels/iieu.cu) against the CPU reference
//! (`cpu::iieu` evaluated in f64 on the SAME dtype-rounded inputs and f32-rounded
//! parameters): forward output, all six gradients, and the two inverse-norm helpers,
//! for f32 / f16 / bf16, both patch-norm modes, over nine geometries (batch 1 and 3,
//! odd spatial sizes, stride 2 + padding, dilation 2, groups 2, depthwise, 1×1, 3×1,
//! a combined grouped/strided/dilated/asymmetric one). The geometries mix plane sizes
//! that allow the kernels' 128-bit paths (H'·W' and H·W multiples of 4 or 8) and
//! ragged ones (15, 35) that force the scalar paths; one case also passes offset
//! (misaligned) views so the scalar path runs on vector-friendly shapes.
//!
//! Every GPU computation runs under `Gpu::check_schedules` (bitwise identical under
//! four thread orders, no leaked allocation), and backward is run twice inside it and
//! required to give identical bits.
//!
//! Kink: the adjuster switches branch at ρ̂ = η. η[o] is put in a gap of channel o's
//! reference ρ̂ values so every element is at least `margin = 2·u_T·max(1, max|ρ̂|)`
//! away from η (asserted; u_T = unit roundoff of the storage dtype, with 2^-13 as the
//! floor for f32), far more than the f32-vs-f64 difference of the device's ρ̂ — so
//! device and reference take the same branch everywhere, by construction.
//!
//! Tolerances, |gpu − ref| ≤ (u_T + E_REL)·|ref_i| + r·max|ref| per element:
//! * u_T: storage rounding of the dtype's outputs (y, dx, dx_pre, dW are computed in
//!   f32 and rounded once to T: at most half an ulp = u_T·|v|): 2^-11 f16, 2^-8 bf16,
//!   0 for f32 (its rounding is inside E_REL).
//! * E_REL = 2^-21 (8 f32 ulps): the per-element f32 term, so every element is
//!   bounded relative to itself and not only to the tensor's largest entry.
//! * r = 2e-6 for the tensors: f32 arithmetic and accumulation (norms over ≤ 36
//!   squares, window sums, GAP over ≤ 60 elements, group gathers) vs f64, relative
//!   to the tensor's largest entry where terms cancel.
//! * r = 1e-5 for the f32 parameter gradients (dγ̇, dβ̇, dη): reductions over N·H'·W'
//!   elements followed by the LayerNorm backward, whose mean subtractions cancel.
//!
//! Measured on the emulated device over every case (the smallest r that passes given
//! the per-element term; `PARITY_MEASURE=1 … -- --nocapture` prints it): tensors
//! ≤ 1.4e-7 (dx_pre), 14× under r; parameter gradients ≤ 4.4e-7 (dβ̇), 23× under r.
#![cfg(any(feature = "cuda", feature = "emulate"))]

mod common;
#[path = "common/iieu_naive.rs"]
mod naive;

use std::sync::Arc;

use activation_kernels::cpu::iieu::{self as cpu, IieuConfig, IieuParams, PatchNorm};
use activation_kernels::cuda::iieu::{self as gpu, IieuDeviceParams};
use activation_kernels::cuda::{CudaStream, DType};
use activation_kernels::{Conv2dGeometry, Error};
use approx::abs_diff_eq;
use common::device::gpu as open_gpu;
use common::{assert_parity, randn, rng, uniform};
use rand::Rng;

/// Storage rounding and unit roundoff of each dtype.
trait Storage: DType {
    /// Unit roundoff of the storage format (0 for f32: covered by the f32 term).
    const U: f64;
    /// Unit roundoff used for the η margin.
    const MARGIN_U: f64;
}
impl Storage for f32 {
    const U: f64 = 0.0;
    const MARGIN_U: f64 = 1.0 / 8192.0; // 2^-13
}
impl Storage for half::f16 {
    const U: f64 = 1.0 / 2048.0; // 2^-11
    const MARGIN_U: f64 = 1.0 / 2048.0;
}
impl Storage for half::bf16 {
    const U: f64 = 1.0 / 256.0; // 2^-8
    const MARGIN_U: f64 = 1.0 / 256.0;
}

fn to_t<T: DType>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&a| T::from_f32(a as f32)).collect()
}
fn to_f64<T: DType>(v: &[T]) -> Vec<f64> {
    v.iter().map(|a| a.to_f32() as f64).collect()
}
fn bits<T: DType>(v: &[T]) -> Vec<u32> {
    v.iter().map(|a| a.to_f32().to_bits()).collect()
}
fn f32_round(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&a| a as f32 as f64).collect()
}

/// A case in storage dtype T, with the f64 values of exactly what the device sees.
struct Case<T> {
    cfg: IieuConfig,
    x: Vec<T>,
    x_pre: Vec<T>,
    w: Vec<T>,
    dy: Vec<T>,
    /// f32 parameters (what the device gets).
    p32: IieuParams<f32>,
    /// The same values in f64 for the reference.
    p64: IieuParams<f64>,
}

impl<T: Storage> Case<T> {
    fn new(geo: Conv2dGeometry, mode: PatchNorm, seed: u64) -> Self {
        let cfg = IieuConfig::new(geo).with_patch_norm(mode);
        let (oh, ow) = geo.validate().unwrap();
        let plane = oh * ow;
        let mut r = rng(seed);
        let x_pre = to_t::<T>(&randn(&mut r, geo.input_len()));
        let w = to_t::<T>(&randn(&mut r, geo.weight_len()));
        let noise = randn(&mut r, geo.n * geo.c_out * plane);
        // x = conv(x_pre, W) + noise (in the rounded inputs): s is O(1).
        let x64: Vec<f64> = naive::conv(&geo, &to_f64(&x_pre), &to_f64(&w))
            .iter()
            .zip(&noise)
            .map(|(a, b)| a + 0.5 * b)
            .collect();
        let x = to_t::<T>(&x64);
        let gamma: Vec<f64> = (0..geo.c_out)
            .map(|_| {
                let m: f64 = r.gen_range(0.5..2.0);
                if r.gen_bool(0.5) {
                    m
                } else {
                    -m
                }
            })
            .collect();
        let gamma = f32_round(&gamma);
        let beta = f32_round(&uniform(&mut r, geo.c_out, -0.5, 0.5));
        let (x64, xp64, w64) = (to_f64(&x), to_f64(&x_pre), to_f64(&w));
        let rho = naive::rho(&cfg, &x64, &xp64, &w64, &gamma, &beta);
        let rmax = rho.iter().fold(1.0f64, |a, v| a.max(v.abs()));
        let margin = 2.0 * T::MARGIN_U * rmax;
        let eta = f32_round(&naive::choose_eta(&rho, geo.n, geo.c_out, plane, margin));
        let (lower, gap) = naive::branch_stats(&rho, &eta, plane);
        assert!(
            gap > margin,
            "an element is within {gap} (< {margin}) of η: branch not robust"
        );
        assert!(
            (0.1..=0.9).contains(&lower),
            "lower-branch share {lower} not balanced"
        );
        let dy = to_t::<T>(&randn(&mut r, x.len()));
        let p64 = IieuParams {
            ln_weight: gamma,
            ln_bias: beta,
            eta,
        };
        let p32 = IieuParams {
            ln_weight: p64.ln_weight.iter().map(|&v| v as f32).collect(),
            ln_bias: p64.ln_bias.iter().map(|&v| v as f32).collect(),
            eta: p64.eta.iter().map(|&v| v as f32).collect(),
        };
        Self {
            cfg,
            x,
            x_pre,
            w,
            dy,
            p32,
            p64,
        }
    }
}

/// The suite's name in `PARITY_MEASURE` lines ([`common::assert_parity`]).
const FAMILY: &str = "iieu";
/// The max-relative terms (see the module doc; the per-element term is
/// [`common::E_REL`]).
const R_TENSOR: f64 = 2e-6;
const R_PARAM: f64 = 1e-5;

/// Device outputs, as f64 plus the bit patterns used for the determinism checks.
#[derive(Debug, PartialEq)]
struct Out {
    bits: Vec<Vec<u32>>,
}

fn upload<T: DType>(s: &Arc<CudaStream>, v: &[T], offset: usize) -> cudarc::driver::CudaSlice<T> {
    // With an offset, the data starts `offset` elements into the buffer (a view of it
    // is then not 16-byte aligned for offset not a multiple of 16/sizeof(T)).
    let mut buf = vec![T::default(); offset];
    buf.extend_from_slice(v);
    s.clone_htod(&buf).unwrap()
}

/// Runs forward + backward (twice) on the device; returns [y, r_x, r_w, dx, dx_pre,
/// dw, dγ̇, dβ̇, dη] as f64 and the bit patterns.
fn run_device<T: Storage>(
    stream: &Arc<CudaStream>,
    c: &Case<T>,
    offset: usize,
) -> (Vec<Vec<f64>>, Out) {
    let x = upload(stream, &c.x, offset);
    let xp = upload(stream, &c.x_pre, offset);
    let w = upload(stream, &c.w, offset);
    let dy = upload(stream, &c.dy, offset);
    let (xv, xpv, wv, dyv) = (
        x.slice(offset..),
        xp.slice(offset..),
        w.slice(offset..),
        dy.slice(offset..),
    );
    let params = IieuDeviceParams::from_host(stream, &c.p32).unwrap();
    let (y, saved) = gpu::forward(stream, &c.cfg, &xv, &xpv, &wv, &params).unwrap();
    let rx = gpu::patch_inv_norm(stream, &c.cfg, &xpv).unwrap();
    let rw = gpu::filter_inv_norm(stream, &c.cfg, &wv).unwrap();
    let g1 = gpu::backward(stream, &c.cfg, &dyv, &xv, &xpv, &wv, &params, &saved).unwrap();
    let g2 = gpu::backward(stream, &c.cfg, &dyv, &xv, &xpv, &wv, &params, &saved).unwrap();
    let h = |s: &cudarc::driver::CudaSlice<T>| stream.clone_dtoh(s).unwrap();
    let hf = |s: &cudarc::driver::CudaSlice<f32>| stream.clone_dtoh(s).unwrap();
    let grads = |g: &gpu::IieuDeviceGrads<T>| {
        (
            h(&g.dx),
            h(&g.dx_pre),
            h(&g.dw),
            hf(&g.d_ln_weight),
            hf(&g.d_ln_bias),
            hf(&g.d_eta),
        )
    };
    let (a, b) = (grads(&g1), grads(&g2));
    assert!(
        bits(&a.0) == bits(&b.0)
            && bits(&a.1) == bits(&b.1)
            && bits(&a.2) == bits(&b.2)
            && bits(&a.3) == bits(&b.3)
            && bits(&a.4) == bits(&b.4)
            && bits(&a.5) == bits(&b.5),
        "backward twice gave different bits"
    );
    // Saved r_x / r_w equal the standalone helpers bit for bit.
    assert_eq!(bits(&hf(saved.r_x())), bits(&hf(&rx)));
    assert_eq!(bits(&hf(saved.r_w())), bits(&hf(&rw)));
    let y = h(&y);
    let (rx, rw) = (hf(&rx), hf(&rw));
    let vals = vec![
        to_f64(&y),
        to_f64(&rx),
        to_f64(&rw),
        to_f64(&a.0),
        to_f64(&a.1),
        to_f64(&a.2),
        to_f64(&a.3),
        to_f64(&a.4),
        to_f64(&a.5),
    ];
    let out = Out {
        bits: vec![
            bits(&y),
            bits(&rx),
            bits(&rw),
            bits(&a.0),
            bits(&a.1),
            bits(&a.2),
            bits(&a.3),
            bits(&a.4),
            bits(&a.5),
        ],
    };
    (vals, out)
}

fn parity_case<T: Storage>(geo: Conv2dGeometry, mode: PatchNorm, seed: u64, offset: usize) {
    let Some(dev) = open_gpu() else { return };
    let c = Case::<T>::new(geo, mode, seed);
    let stream = dev.ctx.default_stream();
    let vals = std::cell::RefCell::new(Vec::new());
    dev.check_schedules(|| {
        let (v, out) = run_device(&stream, &c, offset);
        *vals.borrow_mut() = v;
        out
    });
    let got = vals.into_inner();

    // Reference: f64 on the same rounded inputs and parameters.
    let (x, xp, w, dy) = (to_f64(&c.x), to_f64(&c.x_pre), to_f64(&c.w), to_f64(&c.dy));
    let (y, saved) = cpu::forward(&c.cfg, &x, &xp, &w, &c.p64).unwrap();
    let g = cpu::backward(&c.cfg, &dy, &x, &xp, &w, &c.p64, &saved).unwrap();
    let tag = |s: &str| format!("{} {mode:?} {geo:?} offset {offset}: {s}", T::NAME);
    let u = T::U;
    assert_parity(FAMILY, &tag("y"), &got[0], &y, u, R_TENSOR);
    // r_x, r_w are f32 on the device whatever T is.
    assert_parity(FAMILY, &tag("r_x"), &got[1], saved.r_x(), 0.0, R_TENSOR);
    assert_parity(FAMILY, &tag("r_w"), &got[2], saved.r_w(), 0.0, R_TENSOR);
    assert_parity(FAMILY, &tag("dx"), &got[3], &g.dx, u, R_TENSOR);
    assert_parity(FAMILY, &tag("dx_pre"), &got[4], &g.dx_pre, u, R_TENSOR);
    assert_parity(FAMILY, &tag("dw"), &got[5], &g.dw, u, R_TENSOR);
    assert_parity(
        FAMILY,
        &tag("d_ln_weight"),
        &got[6],
        &g.d_ln_weight,
        0.0,
        R_PARAM,
    );
    assert_parity(
        FAMILY,
        &tag("d_ln_bias"),
        &got[7],
        &g.d_ln_bias,
        0.0,
        R_PARAM,
    );
    assert_parity(FAMILY, &tag("d_eta"), &got[8], &g.d_eta, 0.0, R_PARAM);
}

/// Every dtype × both patch-norm modes.
fn all(geo: Conv2dGeometry, seed: u64) {
    for mode in [PatchNorm::PerGroup, PatchNorm::AllChannels] {
        parity_case::<f32>(geo, mode, seed, 0);
        parity_case::<half::f16>(geo, mode, seed, 0);
        parity_case::<half::bf16>(geo, mode, seed, 0);
    }
}

#[test]
fn batch1_odd_spatial() {
    // H'W' = 15, HW = 35: scalar paths.
    all(Conv2dGeometry::new(1, 3, 5, 7, 4, 3, 3), 1);
}

#[test]
fn batch3_padding1() {
    // H'W' = HW = 60: f32 vector paths, f16/bf16 scalar.
    all(
        Conv2dGeometry::new(3, 3, 6, 10, 5, 3, 3).with_padding(1, 1),
        2,
    );
}

#[test]
fn stride2_padding1() {
    // 8×16 → 4×8: H'W' = 32, HW = 128: vector paths for every dtype.
    all(
        Conv2dGeometry::new(3, 3, 8, 16, 4, 3, 3)
            .with_stride(2, 2)
            .with_padding(1, 1),
        3,
    );
}

#[test]
fn stride2_padding1_misaligned_views() {
    // Same vector-friendly shape, but every tensor is a view starting 1 element into
    // its buffer: the kernels must fall back to their scalar paths.
    let geo = Conv2dGeometry::new(3, 3, 8, 16, 4, 3, 3)
        .with_stride(2, 2)
        .with_padding(1, 1);
    parity_case::<f32>(geo, PatchNorm::PerGroup, 3, 1);
    parity_case::<half::f16>(geo, PatchNorm::PerGroup, 3, 1);
    parity_case::<half::bf16>(geo, PatchNorm::AllChannels, 3, 1);
}

#[test]
fn dilation2() {
    // 7×8 → 5×8 (H'W' = 40, HW = 56): vector paths for every dtype.
    all(
        Conv2dGeometry::new(2, 2, 7, 8, 3, 3, 3)
            .with_dilation(2, 2)
            .with_padding(1, 2),
        5,
    );
}

#[test]
fn groups2() {
    all(
        Conv2dGeometry::new(3, 4, 5, 7, 6, 3, 3)
            .with_groups(2)
            .with_padding(1, 1),
        6,
    );
}

#[test]
fn depthwise() {
    // H'W' = HW = 48.
    all(
        Conv2dGeometry::new(2, 3, 6, 8, 3, 3, 3)
            .with_groups(3)
            .with_padding(1, 1),
        7,
    );
}

#[test]
fn kernel_1x1() {
    all(Conv2dGeometry::new(3, 3, 5, 7, 4, 1, 1), 8);
}

#[test]
fn kernel_3x1() {
    all(
        Conv2dGeometry::new(2, 3, 5, 7, 3, 3, 1).with_padding(1, 0),
        9,
    );
}

#[test]
fn combined_groups_stride_dilation_asymmetric() {
    all(
        Conv2dGeometry::new(2, 4, 9, 8, 4, 2, 3)
            .with_groups(2)
            .with_stride(2, 1)
            .with_padding(1, 2)
            .with_dilation(1, 2),
        11,
    );
}

/// The chunked kernels with ragged chunks (src/cuda/iieu.rs `Split`, kernels/iieu.cu
/// FWD_CH / SUMS_CH): 26 channels per group split into chunks of 9, 9, 8 (`patch_sq`,
/// `bwd_dx`, `bwd_dxpre`, partials summed by `sum_chunks` / `coef_reduce`), 8, 8, 8, 2
/// (`fwd`) and 4 × 6, 2 (`bwd_sums`); with 2 groups (per-group patch norms), 17
/// channels per group in chunks of 9, 8, of 8, 8, 1 and of 4 × 4, 1. Planes of 16 pixels take every vector path (f32,
/// f16, bf16), planes of 30 the scalar ones.
#[test]
fn channel_split_ragged_chunks() {
    all(
        Conv2dGeometry::new(2, 26, 4, 4, 26, 3, 3).with_padding(1, 1),
        12,
    );
    all(
        Conv2dGeometry::new(2, 34, 5, 6, 34, 3, 3)
            .with_padding(1, 1)
            .with_groups(2),
        13,
    );
}

// ------------------------------------------------------------------------------------
// Bad input: every validation path returns its Err before any allocation or launch.

fn bad_geo() -> Conv2dGeometry {
    Conv2dGeometry::new(2, 4, 5, 6, 6, 3, 3)
        .with_padding(1, 1)
        .with_groups(2)
}

fn len_err<R>(r: Result<R, Error>, what: &str) {
    match r {
        Err(Error::LengthMismatch { what: w, .. }) => assert_eq!(w, what),
        Err(e) => panic!("expected LengthMismatch({what}), got {e:?}"),
        Ok(_) => panic!("expected LengthMismatch({what}), got Ok"),
    }
}

#[cfg(feature = "emulate")]
fn live() -> Option<i64> {
    activation_kernels::emu::live_allocations()
}
#[cfg(not(feature = "emulate"))]
fn live() -> Option<i64> {
    None
}

#[test]
fn bad_input() {
    let Some(dev) = open_gpu() else { return };
    let s = dev.ctx.default_stream();
    let geo = bad_geo();
    let cfg = IieuConfig::new(geo);
    let (oh, ow) = geo.validate().unwrap();
    let xl = geo.n * geo.c_out * oh * ow;
    let f = |n: usize| s.clone_htod(&vec![0.5f32; n]).unwrap();
    let (x, xp, w, dy) = (f(xl), f(geo.input_len()), f(geo.weight_len()), f(xl));
    let (xs, xps, ws, dys) = (
        f(xl - 1),
        f(geo.input_len() + 1),
        f(geo.weight_len() - 1),
        f(xl + 3),
    );
    let p = IieuDeviceParams::init(&s, geo.c_out).unwrap();
    let (_, saved) = gpu::forward(&s, &cfg, &x, &xp, &w, &p).unwrap();
    let geo1 = Conv2dGeometry::new(1, 4, 5, 6, 6, 3, 3)
        .with_padding(1, 1)
        .with_groups(2);
    let cfg1 = IieuConfig::new(geo1);
    let x1 = f(xl / 2);
    let xp1 = f(geo1.input_len());
    let (_, saved1) = gpu::forward(&s, &cfg1, &x1, &xp1, &w, &p).unwrap();
    let before = live();

    // Lengths of each argument.
    len_err(gpu::filter_inv_norm(&s, &cfg, &ws), "w");
    len_err(gpu::patch_inv_norm(&s, &cfg, &xps), "x_pre");
    len_err(gpu::forward(&s, &cfg, &xs, &xp, &w, &p), "x");
    len_err(gpu::forward(&s, &cfg, &x, &xps, &w, &p), "x_pre");
    len_err(gpu::forward(&s, &cfg, &x, &xp, &ws, &p), "w");
    len_err(gpu::backward(&s, &cfg, &dys, &x, &xp, &w, &p, &saved), "dy");
    len_err(gpu::backward(&s, &cfg, &dy, &xs, &xp, &w, &p, &saved), "x");
    len_err(
        gpu::backward(&s, &cfg, &dy, &x, &xps, &w, &p, &saved),
        "x_pre",
    );
    len_err(gpu::backward(&s, &cfg, &dy, &x, &xp, &ws, &p, &saved), "w");
    // A view is checked by its own length.
    len_err(gpu::forward(&s, &cfg, &x.slice(1..), &xp, &w, &p), "x");

    // Parameter lengths.
    let short = |n: usize| s.clone_htod(&vec![0.0f32; n]).unwrap();
    for (which, name) in [(0, "ln_weight"), (1, "ln_bias"), (2, "eta")] {
        let mut q = p.clone();
        match which {
            0 => q.ln_weight = short(geo.c_out - 1),
            1 => q.ln_bias = short(geo.c_out + 1),
            _ => q.eta = short(1),
        }
        len_err(gpu::forward(&s, &cfg, &x, &xp, &w, &q), name);
        len_err(gpu::backward(&s, &cfg, &dy, &x, &xp, &w, &q, &saved), name);
    }

    // Geometry: zero dims, zero stride, groups not dividing, output size <= 0.
    let zero_n = IieuConfig::new(Conv2dGeometry { n: 0, ..geo });
    assert!(matches!(
        gpu::forward(&s, &zero_n, &x, &xp, &w, &p),
        Err(Error::Empty { .. })
    ));
    let zero_kw = IieuConfig::new(Conv2dGeometry { kw: 0, ..geo });
    assert!(matches!(
        gpu::filter_inv_norm(&s, &zero_kw, &w),
        Err(Error::Empty { .. })
    ));
    let zero_c = IieuConfig::new(Conv2dGeometry { c_in: 0, ..geo });
    assert!(matches!(
        gpu::patch_inv_norm(&s, &zero_c, &xp),
        Err(Error::Empty { .. })
    ));
    for bad in [
        geo.with_stride(0, 1),
        geo.with_dilation(1, 0),
        geo.with_groups(3),
        geo.with_padding(0, 0).with_dilation(3, 1),
    ] {
        let c = IieuConfig::new(bad);
        assert!(
            matches!(
                gpu::forward(&s, &c, &x, &xp, &w, &p),
                Err(Error::Geometry(_))
            ),
            "{bad:?}"
        );
        assert!(matches!(
            gpu::backward(&s, &c, &dy, &x, &xp, &w, &p, &saved),
            Err(Error::Geometry(_))
        ));
    }
    // Sizes beyond the kernels' i32 per-axis range.
    let huge = IieuConfig::new(Conv2dGeometry::new(1, 1, 1, 1, 1, 1, 1).with_padding(1 << 31, 0));
    assert!(matches!(
        gpu::filter_inv_norm(&s, &huge, &f(1)),
        Err(Error::Shape { .. })
    ));
    // Work items beyond the kernels' flat 32-bit indices: N·H·W = 2^32 input pixels
    // (each axis fits i32, the product does not). Err(Shape) from the shape alone,
    // before the length checks (the small buffers are never read) and before any launch.
    let items = IieuConfig::new(Conv2dGeometry::new(1 << 16, 1, 256, 256, 1, 1, 1));
    let e = gpu::forward(&s, &items, &x, &xp, &w, &p).unwrap_err();
    assert!(
        matches!(&e, Error::Shape { what, .. } if what.contains("work items")),
        "{e:?}"
    );
    let e = gpu::backward(&s, &items, &dy, &x, &xp, &w, &p, &saved).unwrap_err();
    assert!(
        matches!(&e, Error::Shape { what, .. } if what.contains("work items")),
        "{e:?}"
    );

    // Saved state from a different config: another patch-norm mode, another geometry
    // with the same tensor lengths (stride/padding trade), another batch.
    let other_mode = cfg.with_patch_norm(PatchNorm::AllChannels);
    assert!(matches!(
        gpu::backward(&s, &other_mode, &dy, &x, &xp, &w, &p, &saved),
        Err(Error::Shape { what: "saved", .. })
    ));
    assert!(matches!(
        gpu::backward(&s, &cfg, &dy, &x, &xp, &w, &p, &saved1),
        Err(Error::Shape { what: "saved", .. })
    ));
    let ok = gpu::backward(&s, &cfg1, &x1, &x1, &xp1, &w, &p, &saved).map(|_| ());
    assert!(matches!(ok, Err(Error::Shape { what: "saved", .. })));

    // Nothing was allocated by any rejected call.
    assert_eq!(live(), before, "a rejected call allocated device memory");
}

// ------------------------------------------------------------------------------------
// Realistic shapes: the shape-dependent loops past their first trip

#[path = "common/paths.rs"]
mod paths;

/// Threads per block of `per_block` launches (src/cuda/iieu.rs): the block is sized to
/// the per-item work, a multiple of 32, at most `BLOCK` (src/cuda/mod.rs).
fn per_block_threads(per_item: usize) -> usize {
    let block = paths::src_const(include_str!("../src/cuda/mod.rs"), "BLOCK");
    (per_item.div_ceil(32) * 32).clamp(32, block)
}

/// Asserts that the elementwise kernels on planes of `p` pixels take their scalar path
/// (`p` not a multiple of the f32 vector width 4), and that the channel-split kernels
/// over `per` channels per group split them into chunks (src/cuda/iieu.rs `Split`: a
/// plane this small is far below the split target, so there are ⌊per/SPLIT_MIN_CHUNK⌋
/// chunks, at most SPLIT_MAX).
fn assert_scalar_and_split(p: usize, per: usize) {
    let src = include_str!("../src/cuda/iieu.rs");
    let (max, min_chunk) = (
        paths::src_const(src, "SPLIT_MAX"),
        paths::src_const(src, "SPLIT_MIN_CHUNK"),
    );
    assert!(p % 4 != 0, "planes of {p} pixels take the vector path");
    assert!(
        (per / min_chunk).min(max) >= 2,
        "{per} channels are not split"
    );
}

/// Forward + backward once on the device (no standalone norm helpers, no second
/// backward: [`run_device`] does those for the small shapes): the bits of [y, r_x, r_w,
/// dx, dx_pre, dw, dγ̇, dβ̇, dη], each widened to f32.
fn run_device_once<T: Storage>(stream: &Arc<CudaStream>, c: &Case<T>) -> Vec<Vec<u32>> {
    let up = |v: &[T]| stream.clone_htod(v).unwrap();
    let (x, xp, w, dy) = (up(&c.x), up(&c.x_pre), up(&c.w), up(&c.dy));
    let params = IieuDeviceParams::from_host(stream, &c.p32).unwrap();
    let (y, saved) = gpu::forward(stream, &c.cfg, &x, &xp, &w, &params).unwrap();
    let g = gpu::backward(stream, &c.cfg, &dy, &x, &xp, &w, &params, &saved).unwrap();
    let h = |s: &cudarc::driver::CudaSlice<T>| bits(&stream.clone_dtoh(s).unwrap());
    let hf = |s: &cudarc::driver::CudaSlice<f32>| bits(&stream.clone_dtoh(s).unwrap());
    vec![
        h(&y),
        hf(saved.r_x()),
        hf(saved.r_w()),
        h(&g.dx),
        h(&g.dx_pre),
        h(&g.dw),
        hf(&g.d_ln_weight),
        hf(&g.d_ln_bias),
        hf(&g.d_eta),
    ]
}

/// A path case: [`parity_case`]'s inputs, reference and tolerances, with the device run
/// once per thread order under [`paths::two_orders`] (the four-order, two-backward run
/// of [`parity_case`] costs ~80 s on the emulator at these sizes).
fn path_case<T: Storage>(geo: Conv2dGeometry, mode: PatchNorm, seed: u64) {
    let Some(dev) = open_gpu() else { return };
    let c = Case::<T>::new(geo, mode, seed);
    let stream = dev.ctx.default_stream();
    let got: Vec<Vec<f64>> = paths::two_orders(&dev, || run_device_once(&stream, &c))
        .iter()
        .map(|b| b.iter().map(|&v| f32::from_bits(v) as f64).collect())
        .collect();
    let (x, xp, w, dy) = (to_f64(&c.x), to_f64(&c.x_pre), to_f64(&c.w), to_f64(&c.dy));
    let (y, saved) = cpu::forward(&c.cfg, &x, &xp, &w, &c.p64).unwrap();
    let g = cpu::backward(&c.cfg, &dy, &x, &xp, &w, &c.p64, &saved).unwrap();
    let tag = |s: &str| format!("{} {mode:?} {geo:?}: {s}", T::NAME);
    let u = T::U;
    assert_parity(FAMILY, &tag("y"), &got[0], &y, u, 1e-5);
    assert_parity(FAMILY, &tag("r_x"), &got[1], saved.r_x(), 0.0, 1e-5);
    assert_parity(FAMILY, &tag("r_w"), &got[2], saved.r_w(), 0.0, 1e-5);
    assert_parity(FAMILY, &tag("dx"), &got[3], &g.dx, u, 1e-5);
    assert_parity(FAMILY, &tag("dx_pre"), &got[4], &g.dx_pre, u, 1e-5);
    assert_parity(FAMILY, &tag("dw"), &got[5], &g.dw, u, 1e-5);
    assert_parity(
        FAMILY,
        &tag("d_ln_weight"),
        &got[6],
        &g.d_ln_weight,
        0.0,
        1e-4,
    );
    assert_parity(FAMILY, &tag("d_ln_bias"), &got[7], &g.d_ln_bias, 0.0, 1e-4);
    assert_parity(FAMILY, &tag("d_eta"), &got[8], &g.d_eta, 0.0, 1e-4);
}

/// ResNet-18/34's last stage: C = O = 512, 3×3, padding 1, 7×7, N = 1 (f32). Reaches:
/// * `filter_norm` and `bwd_params`' dW loop over the C·KH·KW = 4608 entries of a filter
///   on a 256-thread block: 18 trips (the small cases: ≤ 36 entries, 1 trip);
/// * `ln_fwd` / `ln_bwd`, the term-B LayerNorm over O = 512 on a 256-thread block:
///   2 trips per pass, block_sum over 8 warps (the small cases: O ≤ 6, one warp);
/// * the scalar paths of `fwd` (8 channels per thread), `bwd_sums` (4 planes per block)
///   and of the channel-split kernels (H'·W' = 49 is not a multiple of 4);
/// * the channel splits: `patch_sq` and `bwd_dxpre` over 512 input channels and
///   `bwd_dx` over 512 output channels in 64 chunks of 8, the partials summed by
///   `sum_chunks` (then window sums of 9 taps: f32 sums of 4608 squares within 1e-5) and
///   `coef_reduce`. (The grid-stride loops past their first trip: the CI run with
///   `AK_EMU_GRID_CAP=2`.)
#[test]
fn path_resnet_late_stage_512_3x3() {
    let geo = Conv2dGeometry::new(1, 512, 7, 7, 512, 3, 3).with_padding(1, 1);
    let w_per: usize = 512 * 9;
    assert!(w_per.div_ceil(per_block_threads(w_per)) >= 2);
    assert!(512usize.div_ceil(per_block_threads(512)) >= 2);
    assert_scalar_and_split(49, 512);
    let t = std::time::Instant::now();
    path_case::<f32>(geo, PatchNorm::PerGroup, 600);
    eprintln!(
        "path_resnet_late_stage_512_3x3: {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

/// ResNet-50's last stage, the bottleneck's first 1×1 conv: C = 2048 → O = 512, 7×7,
/// N = 1 (f32). Reaches `filter_norm` / `bwd_params` over 2048-entry filters (8 trips
/// of 256 threads), the O = 512 LayerNorm (2 trips), `patch_sq` over 2048 channels in
/// 64 chunks of 32 (f32 sums of 2048 squares per pixel within 1e-5), the scalar paths
/// as above. (O = 2048 would take the LayerNorm loops to 8 trips, the same code,
/// at 4× the emulator time: `filter_norm` and `bwd_params` run O blocks of 256 threads.)
#[test]
fn path_resnet50_late_stage_2048_to_512_1x1() {
    let geo = Conv2dGeometry::new(1, 2048, 7, 7, 512, 1, 1);
    assert!(2048usize.div_ceil(per_block_threads(2048)) >= 2);
    assert!(512usize.div_ceil(per_block_threads(512)) >= 2);
    assert_scalar_and_split(49, 2048);
    let t = std::time::Instant::now();
    path_case::<f32>(geo, PatchNorm::PerGroup, 610);
    eprintln!(
        "path_resnet50_late_stage_2048_to_512_1x1: {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

// ------------------------------------------------------------------------------------
// NaN / ±Inf inputs on the device

/// Element-wise match of a device result with non-finite entries against the f64
/// reference: NaN exactly where the reference is NaN, the same-signed infinity where it
/// is infinite, every finite element within u·|ref_i| + r·max|finite ref|. Returns the
/// number of non-finite reference entries.
fn assert_nonfinite_parity(name: &str, got: &[f64], want: &[f64], u: f64, r: f64) -> usize {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let max = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(0.0f64, |a, v| a.max(v.abs()));
    let mut nonfinite = 0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() {
            assert!(g.is_nan(), "{name}[{i}]: gpu {g}, reference NaN");
            nonfinite += 1;
        } else if w.is_infinite() {
            assert!(g == w, "{name}[{i}]: gpu {g}, reference {w}");
            nonfinite += 1;
        } else {
            let tol = u * w.abs() + r * max;
            assert!(
                g.is_finite() && abs_diff_eq!(g, w, epsilon = tol),
                "{name}[{i}]: gpu {g} vs ref {w} (tol {tol:.3e})"
            );
        }
    }
    nonfinite
}

/// Where a non-finite value goes: `x[n, o, p]` or `x_pre[n, c, h, w]`.
#[derive(Clone, Copy, Debug)]
enum Poke {
    X(usize, usize, usize, f64),
    XPre(usize, usize, usize, usize, f64),
}

/// One NaN/Inf case: the inputs of `Case::new` (η chosen on the finite data), then the
/// pokes; device forward + backward under `check_schedules` against the f64 reference
/// on the same inputs, element by element ([`assert_nonfinite_parity`]).
fn nonfinite_case<T: Storage>(geo: Conv2dGeometry, seed: u64, pokes: &[Poke]) -> Vec<usize> {
    let Some(dev) = open_gpu() else {
        return vec![];
    };
    let mut c = Case::<T>::new(geo, PatchNorm::PerGroup, seed);
    let (oh, ow) = geo.validate().unwrap();
    for &p in pokes {
        match p {
            Poke::X(n, o, k, v) => c.x[(n * geo.c_out + o) * oh * ow + k] = T::from_f32(v as f32),
            Poke::XPre(n, ch, h, w, v) => {
                c.x_pre[((n * geo.c_in + ch) * geo.h + h) * geo.w + w] = T::from_f32(v as f32)
            }
        }
    }
    let stream = dev.ctx.default_stream();
    let got: Vec<Vec<f64>> = dev
        .check_schedules(|| run_device_once(&stream, &c))
        .iter()
        .map(|b| b.iter().map(|&v| f32::from_bits(v) as f64).collect())
        .collect();
    let (x, xp, w, dy) = (to_f64(&c.x), to_f64(&c.x_pre), to_f64(&c.w), to_f64(&c.dy));
    let (y, saved) = cpu::forward(&c.cfg, &x, &xp, &w, &c.p64).unwrap();
    let g = cpu::backward(&c.cfg, &dy, &x, &xp, &w, &c.p64, &saved).unwrap();
    let tag = |s: &str| format!("{} {pokes:?}: {s}", T::NAME);
    let u = T::U;
    let want: [(&str, &[f64], f64, f64); 9] = [
        ("y", &y, u, 1e-5),
        ("r_x", saved.r_x(), 0.0, 1e-5),
        ("r_w", saved.r_w(), 0.0, 1e-5),
        ("dx", &g.dx, u, 1e-5),
        ("dx_pre", &g.dx_pre, u, 1e-5),
        ("dw", &g.dw, u, 1e-5),
        ("d_ln_weight", &g.d_ln_weight, 0.0, 1e-4),
        ("d_ln_bias", &g.d_ln_bias, 0.0, 1e-4),
        ("d_eta", &g.d_eta, 0.0, 1e-4),
    ];
    let mut report = String::new();
    let mut counts = vec![];
    for (k, (name, want, u, r)) in want.into_iter().enumerate() {
        let bad = assert_nonfinite_parity(&tag(name), &got[k], want, u, r);
        report.push_str(&format!(" {name}={bad}"));
        counts.push(bad);
    }
    eprintln!(
        "{} {pokes:?}: non-finite reference entries{report}",
        T::NAME
    );
    counts
}

/// NaN / ±Inf in `x` and `x_pre` on the device (SPEC §4: IEEE propagation, no
/// corruption of the other sample), f32 (128-bit paths: H'·W' = H·W = 36) and bf16
/// (scalar paths), groups 2 so a patch poke stays in its group:
/// * NaN in x (sample 0): its GAP, hence sample 0's LayerNorm and every y, dx of
///   sample 0 is NaN; sample 1 is untouched; the parameter gradients sum over samples;
/// * +Inf in x (sample 1): the same through an infinite GAP;
/// * NaN in x_pre: r_x and y are NaN only in the 3×3 windows over that pixel (9 of
///   them, asserted), in its group's 3 output channels; the backward spreads it through
///   Σg and dm. Regression test: the patch norm used to clamp `max(q, 0)` (kernel
///   `fmaxf`, CPU `f64::max`), which maps a NaN to 0, so a NaN in x_pre became a zero
///   norm, r_x = 1/EPS = 1e8 and a finite y ≈ 1e8·x on both sides;
/// * ±Inf in x_pre: ‖P‖ = ∞ so r_x = 0 and ρ̂ = ν (y stays finite), the norm's slope
///   −r_x²/‖P‖ is −0, and dx_pre = x_pre·Σcoef is ∞·0 = NaN at the infinite taps only.
#[test]
fn nonfinite_inputs_match_cpu() {
    let geo = Conv2dGeometry::new(2, 4, 6, 6, 6, 3, 3)
        .with_groups(2)
        .with_padding(1, 1);
    let cases: [&[Poke]; 4] = [
        &[Poke::X(0, 1, 7, f64::NAN)],
        &[Poke::X(1, 4, 5, f64::INFINITY)],
        &[Poke::XPre(0, 0, 2, 3, f64::NAN)],
        &[
            Poke::XPre(1, 3, 0, 0, f64::INFINITY),
            Poke::XPre(1, 1, 5, 4, f64::NEG_INFINITY),
        ],
    ];
    for (i, pokes) in cases.iter().enumerate() {
        let counts = nonfinite_case::<f32>(geo, 700 + i as u64, pokes);
        if i == 2 && !counts.is_empty() {
            assert_eq!((counts[0], counts[1]), (27, 9), "NaN in x_pre: y and r_x");
        }
        nonfinite_case::<half::bf16>(geo, 710 + i as u64, pokes);
    }
}

/// `bwd_params`' per-filter sums over the batch (dγ̇, dβ̇, dη, dr_w: `n = tid; n < N;
/// n += blockDim`) past one trip: its block has min(256, ⌈max(N, C/g·KH·KW)⌉₃₂) threads,
/// so N = 257 samples give a second trip to thread 0. C = O = 2, 1×1 planes of 3×3
/// keep it cheap (257·2 planes of 9); all four thread orders, f32.
#[test]
fn path_batch_257_param_sums() {
    let n = 257;
    assert!(n > per_block_threads(n), "N = {n}: one trip over the batch");
    let t = std::time::Instant::now();
    let geo = Conv2dGeometry::new(n, 2, 3, 3, 2, 1, 1);
    parity_case::<f32>(geo, PatchNorm::PerGroup, 620, 0);
    eprintln!(
        "path_batch_257_param_sums: {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

/// The 128-bit per-plane reductions past one trip: `gap` and `bwd_sums` get
/// min(256, ⌈H'·W'/4⌉₃₂) threads per (n, o) plane and walk its float4s `j = tid;
/// j < H'·W'/4; j += threads`: H'·W' = 32·33 = 1056 gives 264 vectors, 2 trips (the
/// small cases' planes: ≤ 60 elements). 3×3, padding 1, C = O = 2, N = 1 (f32).
#[test]
fn path_plane_1056_vector_reductions() {
    let p: usize = 32 * 33;
    assert!(
        p % 4 == 0 && p / 4 > per_block_threads(p / 4),
        "one trip per plane"
    );
    let t = std::time::Instant::now();
    let geo = Conv2dGeometry::new(1, 2, 32, 33, 2, 3, 3).with_padding(1, 1);
    parity_case::<f32>(geo, PatchNorm::PerGroup, 630, 0);
    eprintln!(
        "path_plane_1056_vector_reductions: {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

/// The bits do not depend on where the tensors start in memory: every tensor a view
/// one element into its buffer (no 128-bit loads) gives exactly the aligned run's
/// outputs and gradients — the GAP and the backward's plane sums group their pixels
/// by the plane size only (H'·W' = 8·8 here, a multiple of every dtype's vector).
#[test]
fn misaligned_views_same_bits() {
    let Some(dev) = open_gpu() else { return };
    let stream = dev.ctx.default_stream();
    fn same<T: Storage>(stream: &Arc<CudaStream>, geo: Conv2dGeometry, mode: PatchNorm, seed: u64) {
        let c = Case::<T>::new(geo, mode, seed);
        let (_, a) = run_device(stream, &c, 0);
        let (_, o) = run_device(stream, &c, 1);
        assert!(a == o, "{} {geo:?}: outputs differ at offset 1", T::NAME);
    }
    let geo = Conv2dGeometry::new(2, 6, 8, 8, 5, 3, 3).with_padding(1, 1);
    same::<f32>(&stream, geo, PatchNorm::PerGroup, 31);
    same::<half::f16>(&stream, geo, PatchNorm::AllChannels, 32);
    same::<half::bf16>(&stream, geo, PatchNorm::PerGroup, 33);
}
