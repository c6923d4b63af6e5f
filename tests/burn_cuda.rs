//! burn's CUDA backend (feature `burn-cuda`): every op family, forward and every
//! gradient from burn's `backward()` under `Autodiff`, on `Device::cuda(0)`, on ragged
//! shapes (no dimension a multiple of 4 or 32).
//!
//! * ACON-C with every β source, ACON-B and ACON-A against the crate's CPU reference in
//!   f64, f32 (the first two tests; bound below).
//! * Every family — ACON-A/B/C, the meta-ACON generators, TAU, IIEU-B, IIEU-DC,
//!   IieuConv2d with every ψ, the AIEC training step — against the same op on burn's
//!   CPU backend (`Device::flex().autodiff()`, f32) from the same inputs, in f32, f16 and
//!   bf16 (inputs rounded to the dtype first, so both backends see the same values);
//!   the side effects too (IieuConv2d's running statistics, AIEC's counters and
//!   statistics). Bounds: `tol` (f32: the parity suites' terms; f16/bf16: the storage
//!   format's unit roundoff `u` per element and `16·u` of the tensor's max, as
//!   tests/parity_iieu_conv.rs). In f16/bf16 the IIEU adjusters' η is set above every
//!   `ρ̂` (`etas`): rounding may otherwise put an element near `η` on the other branch
//!   on one backend only.
//! * One bad length per family: an `Err` (the one burn's CPU backend returns), never a
//!   panic.
//!
//! Runs on a real GPU only (`scripts/gpu-check.sh` with a pack built by
//! `scripts/gpu-pack.sh --with-burn`): CubeCL's own kernels (`from_data`'s layout,
//! `mul`, `sum`, `into_contiguous`) are PTX, which the emulated device cannot run, and
//! cubecl-cuda links a prebuilt LLVM that its build script downloads. Without a CUDA
//! driver the tests fail loudly unless `AK_SKIP_GPU_TESTS` is set.
//!
//! Reference of the first two tests: the CPU op in f64 on the same f32 inputs, with
//! `dy = w` (burn's gradient of `Σ w·y` w.r.t. `y` is `w`, computed by CubeCL's
//! `mul`/`sum` backward, exact). Bound, as the GPU parity suites' (tests/parity_acon.rs,
//! `tests/common` `assert_parity`): `|got − ref| ≤ (u + E_REL)·|ref| + e·max|ref|`,
//! `u = 2^-24` for the f32 outputs and `dx`, 0 for the parameter gradients (f32 sums,
//! their rounding inside `e`); `e = 1e-5` for `y`, `dx`, `dp*` (f32 arithmetic,
//! `__expf`; f32 sums over N·H·W = 189 terms) and `1e-4` for `dβ` (sums of
//! `dy·d²·s(1 − s)` of both signs). These are the parity suites' measured-and-margined
//! terms for the same kernels.
#![cfg(feature = "burn-cuda")]

mod common;

use std::sync::{Arc, Mutex};

use activation_kernels::burn::ops::{self, BetaTensor, DcTensors, IieuOpts};
use activation_kernels::cpu::acon::{self, Beta};
use activation_kernels::cpu::aiec::{AiecConfig, Counters};
use activation_kernels::{ActShape, Layout};
use burn::tensor::{DType, Device, Tensor, TensorCreationOptions, TensorData};
use common::{assert_parity, randn, rng, uniform};

const U32: f64 = 1.0 / 16777216.0;
const E_ELEM: f64 = 1e-5;
const E_RED: f64 = 1e-4;
const DIMS: [usize; 4] = [3, 5, 7, 9];

/// The CUDA device with autodiff, or `None` (skipped) without a GPU when
/// `AK_SKIP_GPU_TESTS` is set.
fn dev() -> Option<Device> {
    if !activation_kernels::cuda::real_driver_present() {
        assert!(
            std::env::var_os("AK_SKIP_GPU_TESTS").is_some(),
            "no CUDA driver: tests/burn_cuda.rs needs a real GPU (set AK_SKIP_GPU_TESTS=1 to skip)"
        );
        eprintln!("!!! NO CUDA DEVICE: burn_cuda SKIPPED (AK_SKIP_GPU_TESTS set) !!!");
        return None;
    }
    Some(Device::cuda(0).autodiff())
}

/// The values rounded to f32 (the inputs both sides see).
fn f32s(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&a| a as f32 as f64).collect()
}

fn t<const D: usize>(v: &[f64], dims: [usize; D], d: &Device) -> Tensor<D> {
    let data = TensorData::new(v.iter().map(|&a| a as f32).collect::<Vec<_>>(), dims);
    let opts = TensorCreationOptions::new(d.clone()).with_dtype(DType::F32);
    Tensor::from_data(data, opts).require_grad()
}

fn host<const D: usize>(x: Tensor<D>) -> Vec<f64> {
    let v = x.into_data().try_to_vec::<f32>().expect("f32 tensor");
    v.into_iter().map(f64::from).collect()
}

fn grad<const D: usize>(x: &Tensor<D>, g: &burn::tensor::Gradients) -> Vec<f64> {
    host(x.grad(g).expect("a gradient"))
}

fn wsum<const D: usize>(y: Tensor<D>, w: &[f64], d: &Device) -> Tensor<1> {
    let wt = Tensor::<D>::from_data(
        TensorData::new(w.iter().map(|&a| a as f32).collect::<Vec<_>>(), y.dims()),
        TensorCreationOptions::new(d.clone()).with_dtype(DType::F32),
    );
    (y * wt).sum()
}

fn shape() -> ActShape {
    let [n, c, h, w] = DIMS;
    ActShape::nchw(n, c, h, w)
}

#[test]
fn acon_c_every_beta_on_burn_cuda_matches_cpu() {
    let Some(d) = dev() else { return };
    let sh = shape();
    let (n, c) = (DIMS[0], DIMS[1]);
    let len = DIMS.iter().product();
    let mut r = rng(11);
    let xv = f32s(&randn(&mut r, len));
    let wv = f32s(&randn(&mut r, len));
    let p1v = f32s(&uniform(&mut r, c, 0.5, 1.5));
    let p2v = f32s(&uniform(&mut r, c, -0.5, 0.5));
    let cases: [(&str, Vec<f64>); 4] = [
        ("per channel", f32s(&uniform(&mut r, c, 0.5, 2.0))),
        (
            "per sample-channel",
            f32s(&uniform(&mut r, n * c, 0.5, 2.0)),
        ),
        ("per sample", f32s(&uniform(&mut r, n, 0.5, 2.0))),
        ("pixel-wise", vec![]),
    ];
    for (name, bv) in cases {
        let (x, p1, p2) = (t(&xv, DIMS, &d), t(&p1v, [c], &d), t(&p2v, [c], &d));
        let (bt, beta, b1, b2) = match name {
            "per channel" => {
                let b = t(&bv, [c], &d);
                (
                    BetaTensor::PerChannel(b.clone()),
                    Beta::PerChannel(&bv[..]),
                    Some(b),
                    None,
                )
            }
            "per sample-channel" => {
                let b = t(&bv, [n, c], &d);
                let cpu = Beta::PerSampleChannel(&bv[..]);
                (BetaTensor::PerSampleChannel(b.clone()), cpu, None, Some(b))
            }
            "per sample" => {
                let b = t(&bv, [n], &d);
                (
                    BetaTensor::PerSample(b.clone()),
                    Beta::PerSample(&bv[..]),
                    Some(b),
                    None,
                )
            }
            _ => (BetaTensor::PixelWise, Beta::PixelWise, None, None),
        };
        let y = ops::acon_c(x.clone(), p1.clone(), p2.clone(), bt, Layout::Nchw).expect("acon_c");
        let want_y = acon::acon_c_forward(&sh, &xv, &p1v, &p2v, beta).expect("cpu");
        let fam = "burn-cuda acon_c";
        assert_parity(
            fam,
            &format!("f32 {name}: y"),
            &host(y.clone()),
            &want_y,
            U32,
            E_ELEM,
        );
        let g = wsum(y, &wv, &d).backward();
        let want = acon::acon_c_backward(&sh, &wv, &xv, &p1v, &p2v, beta).expect("cpu");
        assert_parity(
            fam,
            &format!("f32 {name}: dx"),
            &grad(&x, &g),
            &want.dx,
            U32,
            E_ELEM,
        );
        assert_parity(
            fam,
            &format!("f32 {name}: dp1"),
            &grad(&p1, &g),
            &want.dp1,
            0.0,
            E_ELEM,
        );
        assert_parity(
            fam,
            &format!("f32 {name}: dp2"),
            &grad(&p2, &g),
            &want.dp2,
            0.0,
            E_ELEM,
        );
        for b in [b1.map(|b| grad(&b, &g)), b2.map(|b| grad(&b, &g))]
            .into_iter()
            .flatten()
        {
            assert_parity(
                fam,
                &format!("f32 {name}: dbeta"),
                &b,
                &want.dbeta,
                0.0,
                E_RED,
            );
        }
    }
}

#[test]
fn acon_a_b_on_burn_cuda_match_cpu() {
    let Some(d) = dev() else { return };
    let sh = shape();
    let (n, c) = (DIMS[0], DIMS[1]);
    let len = DIMS.iter().product();
    let mut r = rng(12);
    let xv = f32s(&randn(&mut r, len));
    let wv = f32s(&randn(&mut r, len));
    let pv = f32s(&uniform(&mut r, c, -0.5, 0.5));
    let bv = f32s(&uniform(&mut r, n * c, 0.5, 2.0));

    let (x, p, b) = (t(&xv, DIMS, &d), t(&pv, [c], &d), t(&bv, [n, c], &d));
    let y = ops::acon_b(
        x.clone(),
        p.clone(),
        BetaTensor::PerSampleChannel(b.clone()),
        Layout::Nchw,
    )
    .expect("acon_b");
    let beta = Beta::PerSampleChannel(&bv[..]);
    let fam = "burn-cuda acon_b";
    let want_y = acon::acon_b_forward(&sh, &xv, &pv, beta).expect("cpu");
    assert_parity(fam, "f32: y", &host(y.clone()), &want_y, U32, E_ELEM);
    let g = wsum(y, &wv, &d).backward();
    let want = acon::acon_b_backward(&sh, &wv, &xv, &pv, beta).expect("cpu");
    assert_parity(fam, "f32: dx", &grad(&x, &g), &want.dx, U32, E_ELEM);
    assert_parity(fam, "f32: dp", &grad(&p, &g), &want.dp, 0.0, E_ELEM);
    assert_parity(fam, "f32: dbeta", &grad(&b, &g), &want.dbeta, 0.0, E_RED);

    let bv = f32s(&uniform(&mut r, n, 0.5, 2.0));
    let (x, b) = (t(&xv, DIMS, &d), t(&bv, [n], &d));
    let y = ops::acon_a(x.clone(), BetaTensor::PerSample(b.clone()), Layout::Nchw).expect("acon_a");
    let beta = Beta::PerSample(&bv[..]);
    let fam = "burn-cuda acon_a";
    let want_y = acon::acon_a_forward(&sh, &xv, beta).expect("cpu");
    assert_parity(fam, "f32: y", &host(y.clone()), &want_y, U32, E_ELEM);
    let g = wsum(y, &wv, &d).backward();
    let want = acon::acon_a_backward(&sh, &wv, &xv, beta).expect("cpu");
    assert_parity(fam, "f32: dx", &grad(&x, &g), &want.dx, U32, E_ELEM);
    assert_parity(fam, "f32: dbeta", &grad(&b, &g), &want.dbeta, 0.0, E_RED);
}

/// A `p1` of `C + 1` values passes burn's shape checks (it is 1-D) and reaches the
/// CUDA path, whose host-side validation must return the CPU op's `LengthMismatch`
/// before any launch.
#[test]
fn bad_parameter_length_is_an_err_on_burn_cuda() {
    let Some(d) = dev() else { return };
    let c = DIMS[1];
    let len = DIMS.iter().product();
    let mut r = rng(14);
    let x = t(&randn(&mut r, len), DIMS, &d);
    let p1 = t(&uniform(&mut r, c + 1, 0.5, 1.5), [c + 1], &d);
    let p2 = t(&uniform(&mut r, c, -0.5, 0.5), [c], &d);
    let e = ops::acon_c(x, p1, p2, BetaTensor::PixelWise, Layout::Nchw)
        .expect_err("a p1 of C + 1 values must be an Err");
    assert!(
        matches!(
            e,
            activation_kernels::Error::LengthMismatch { what: "p1", .. }
        ),
        "{e:?}"
    );
}

// ---------------------------------------------------------------------------
// Every op family against burn's CPU backend (Flex) from the same inputs.

/// Which tolerance a compared value gets: an element-wise result (`Elem`) or one
/// formed by long f32 reductions (`Red`: parameter gradients, and every value of the
/// IIEU families, whose outputs go through norms and LayerNorms).
#[derive(Clone, Copy)]
enum Kind {
    Elem,
    Red,
}

/// The named values of one run: outputs, then gradients, read back as f64.
type Vals = Vec<(&'static str, Kind, Vec<f64>)>;

/// One run of a case: the device, the dtype of its tensors, and the dtype every input
/// value is rounded to first (the CUDA run's dtype on both sides, so both backends see
/// the same values).
struct Run {
    d: Device,
    dt: DType,
    round: DType,
}

impl Run {
    fn vals(&self, v: &[f64]) -> Vec<f64> {
        v.iter()
            .map(|&a| match self.round {
                DType::F16 => half::f16::from_f64(a).to_f64(),
                DType::BF16 => half::bf16::from_f64(a).to_f64(),
                _ => a as f32 as f64,
            })
            .collect()
    }

    /// A leaf tensor of `v` (rounded) that requires a gradient.
    fn t<const D: usize>(&self, v: &[f64], dims: [usize; D]) -> Tensor<D> {
        let data = TensorData::new(
            self.vals(v).iter().map(|&a| a as f32).collect::<Vec<_>>(),
            dims,
        );
        let opts = TensorCreationOptions::new(self.d.clone()).with_dtype(self.dt);
        Tensor::from_data(data, opts).require_grad()
    }

    /// `Σ w·y` with `w` rounded: burn's gradient of it w.r.t. `y` is exactly `w`.
    fn wsum<const D: usize>(&self, y: Tensor<D>, w: &[f64]) -> Tensor<1> {
        let wt = Tensor::<D>::from_data(
            TensorData::new(
                self.vals(w).iter().map(|&a| a as f32).collect::<Vec<_>>(),
                y.dims(),
            ),
            TensorCreationOptions::new(self.d.clone()).with_dtype(self.dt),
        );
        (y * wt).sum()
    }
}

/// Any float tensor read back as f64.
fn read<const D: usize>(x: Tensor<D>) -> Vec<f64> {
    let v = x.try_into_vec_as::<f32>().expect("a float tensor");
    v.into_iter().map(f64::from).collect()
}

fn g_of<const D: usize>(x: &Tensor<D>, g: &burn::tensor::Gradients) -> Vec<f64> {
    read(x.grad(g).expect("a gradient"))
}

/// `(u, e)` of [`assert_parity`] for a value of `kind` computed in `dt` on the GPU,
/// against burn's CPU backend in f32 on the same (rounded) inputs:
/// * f32: `u = 2^-24`, `e = 1e-5` element-wise, `1e-4` for reductions — the GPU parity
///   suites' terms for the same kernels (tests/parity_*.rs: ≤ 2e-5 for the outputs,
///   1e-4 for the parameter gradients, measured against f64), the f32 CPU reference
///   adding an error of the same order;
/// * f16 / bf16: `u` = the format's unit roundoff (every result is stored in it) and
///   `e = 16·u`, parity_iieu_conv's term: intermediates stored in the format
///   (IieuConv2d's conv output, every `dx`) dominate, the f32 arithmetic does not.
fn tol(dt: DType, kind: Kind) -> (f64, f64) {
    match (dt, kind) {
        (DType::F16, _) => (1.0 / 2048.0, 16.0 / 2048.0),
        (DType::BF16, _) => (1.0 / 256.0, 16.0 / 256.0),
        (_, Kind::Elem) => (U32, E_ELEM),
        (_, Kind::Red) => (U32, E_RED),
    }
}

fn dt_name(dt: DType) -> &'static str {
    match dt {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

/// Runs `case` on burn's CUDA device (with autodiff) in each dtype of `dts` and on
/// burn's CPU backend (Flex, f32, with autodiff) from the same inputs, and compares
/// every output and gradient ([`tol`]).
fn against_flex(fam: &str, dts: &[DType], case: impl Fn(&Run) -> Vals) {
    let Some(cuda) = dev() else { return };
    for &dt in dts {
        let got = case(&Run {
            d: cuda.clone(),
            dt,
            round: dt,
        });
        let want = case(&Run {
            d: Device::flex().autodiff(),
            dt: DType::F32,
            round: dt,
        });
        assert_eq!(got.len(), want.len(), "{fam}: values");
        for ((name, kind, g), (_, _, w)) in got.iter().zip(&want) {
            let (u, e) = tol(dt, *kind);
            assert_parity(fam, &format!("{}: {name}", dt_name(dt)), g, w, u, e);
        }
    }
}

const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// ACON-C/B/A in every dtype on ragged token shapes `(N, L, C)` (the NLC kernels) and
/// NCHW, every β source once.
#[test]
fn acon_every_dtype_and_layout_matches_flex() {
    let (n, l, c) = (3, 37, 45);
    let len = n * l * c;
    let mut r = rng(21);
    let (xv, wv) = (randn(&mut r, len), randn(&mut r, len));
    let (p1v, p2v) = (uniform(&mut r, c, 0.5, 1.5), uniform(&mut r, c, -0.5, 0.5));
    let (bc, bnc, bn) = (
        uniform(&mut r, c, 0.5, 2.0),
        uniform(&mut r, n * c, 0.5, 2.0),
        uniform(&mut r, n, 0.5, 2.0),
    );
    against_flex("burn-cuda acon (N, L, C)", &ALL, |run| {
        let (x, p1, p2, b) = (
            run.t(&xv, [n, l, c]),
            run.t(&p1v, [c]),
            run.t(&p2v, [c]),
            run.t(&bnc, [n, c]),
        );
        let beta = BetaTensor::PerSampleChannel(b.clone());
        let y = ops::acon_c(x.clone(), p1.clone(), p2.clone(), beta, Layout::Nlc).expect("acon_c");
        let yv = read(y.clone());
        let g = run.wsum(y, &wv).backward();
        vec![
            ("y", Kind::Elem, yv),
            ("dx", Kind::Elem, g_of(&x, &g)),
            ("dp1", Kind::Red, g_of(&p1, &g)),
            ("dp2", Kind::Red, g_of(&p2, &g)),
            ("dbeta", Kind::Red, g_of(&b, &g)),
        ]
    });
    against_flex("burn-cuda acon_b, acon_a (N, C, H, W)", &ALL, |run| {
        let dims = [n, c, l, 1];
        let (x, p, b) = (run.t(&xv, dims), run.t(&p2v, [c]), run.t(&bc, [c]));
        let y = ops::acon_b(
            x.clone(),
            p.clone(),
            BetaTensor::PerChannel(b.clone()),
            Layout::Nchw,
        )
        .expect("acon_b");
        let yv = read(y.clone());
        let g = run.wsum(y, &wv).backward();
        let mut v = vec![
            ("b y", Kind::Elem, yv),
            ("b dx", Kind::Elem, g_of(&x, &g)),
            ("b dp", Kind::Red, g_of(&p, &g)),
            ("b dbeta", Kind::Red, g_of(&b, &g)),
        ];
        let (x, b) = (run.t(&xv, dims), run.t(&bn, [n]));
        let y =
            ops::acon_a(x.clone(), BetaTensor::PerSample(b.clone()), Layout::Nchw).expect("acon_a");
        let yv = read(y.clone());
        let g = run.wsum(y, &wv).backward();
        v.extend([
            ("a y", Kind::Elem, yv),
            ("a dx", Kind::Elem, g_of(&x, &g)),
            ("a dbeta", Kind::Red, g_of(&b, &g)),
        ]);
        let x = run.t(&xv, dims);
        let y = ops::acon_a(x.clone(), BetaTensor::PixelWise, Layout::Nchw).expect("acon_a");
        let yv = read(y.clone());
        let g = run.wsum(y, &wv).backward();
        v.extend([
            ("a pixel y", Kind::Elem, yv),
            ("a pixel dx", Kind::Elem, g_of(&x, &g)),
        ]);
        v
    });
}

/// The meta-ACON generators alone (`L = Σ w·β`): channel-wise with and without
/// biases (width 3, C = 7), layer-wise; NCHW and tokens.
#[test]
fn meta_generators_match_flex() {
    let (n, c, h, w, width) = (3, 7, 5, 9, 3);
    let len = n * c * h * w;
    let mut r = rng(22);
    let xv = randn(&mut r, len);
    let (w1v, w2v) = (
        uniform(&mut r, width * c, -0.6, 0.6),
        uniform(&mut r, c * width, -0.6, 0.6),
    );
    let (b1v, b2v) = (
        uniform(&mut r, width, -0.3, 0.3),
        uniform(&mut r, c, -0.3, 0.3),
    );
    let (wb, wl) = (randn(&mut r, n * c), randn(&mut r, n));
    against_flex("burn-cuda meta-ACON generators", &ALL, |run| {
        let mut v = Vals::new();
        // Channel-wise with biases on (N, C, H, W); without, and layer-wise, on tokens.
        let x = run.t(&xv, [n, c, h, w]);
        let (w1, w2) = (run.t(&w1v, [width, c]), run.t(&w2v, [c, width]));
        let (b1, b2) = (run.t(&b1v, [width]), run.t(&b2v, [c]));
        let bias = Some((b1.clone(), b2.clone()));
        let beta = ops::channel_gen(x.clone(), w1.clone(), w2.clone(), bias, Layout::Nchw)
            .expect("channel_gen");
        let bv = read(beta.clone());
        let g = run.wsum(beta, &wb).backward();
        v.extend([
            ("channel beta", Kind::Elem, bv),
            ("channel dx", Kind::Red, g_of(&x, &g)),
            ("channel dw1", Kind::Red, g_of(&w1, &g)),
            ("channel dw2", Kind::Red, g_of(&w2, &g)),
            ("channel db1", Kind::Red, g_of(&b1, &g)),
            ("channel db2", Kind::Red, g_of(&b2, &g)),
        ]);
        let x = run.t(&xv, [n, h * w, c]);
        let (w1, w2) = (run.t(&w1v, [width, c]), run.t(&w2v, [c, width]));
        let beta = ops::channel_gen(x.clone(), w1.clone(), w2.clone(), None, Layout::Nlc)
            .expect("channel_gen");
        let bv = read(beta.clone());
        let g = run.wsum(beta, &wb).backward();
        v.extend([
            ("tokens channel beta", Kind::Elem, bv),
            ("tokens channel dx", Kind::Red, g_of(&x, &g)),
            ("tokens channel dw1", Kind::Red, g_of(&w1, &g)),
            ("tokens channel dw2", Kind::Red, g_of(&w2, &g)),
        ]);
        for (layout, x) in [
            (Layout::Nchw, run.t(&xv, [n, c, h * w])),
            (Layout::Nlc, run.t(&xv, [n, h * w, c])),
        ] {
            let beta = ops::layer_gen(x.clone(), layout).expect("layer_gen");
            let bv = read(beta.clone());
            let g = run.wsum(beta, &wl).backward();
            v.extend([
                ("layer beta", Kind::Elem, bv),
                ("layer dx", Kind::Red, g_of(&x, &g)),
            ]);
        }
        v
    });
}

/// TAU on a ragged 4-D tensor.
#[test]
fn tau_matches_flex() {
    let len = DIMS.iter().product();
    let mut r = rng(23);
    let (fv, wv) = (randn(&mut r, len), randn(&mut r, len));
    against_flex("burn-cuda tau", &ALL, |run| {
        let f = run.t(&fv, DIMS);
        let a = ops::tau(f.clone(), 0.3).expect("tau");
        let av = read(a.clone());
        let g = run.wsum(a, &wv).backward();
        vec![("A", Kind::Elem, av), ("dF", Kind::Elem, g_of(&f, &g))]
    });
}

/// A ragged IIEU geometry: `x_pre (3, 5, 7, 6)`, `W (7, 5, 3, 3)`, padding 1.
fn iieu_geo() -> ([usize; 4], [usize; 4], [usize; 4], IieuOpts) {
    let o = IieuOpts {
        padding: (1, 1),
        ..Default::default()
    };
    ([3, 5, 7, 6], [7, 5, 3, 3], [3, 7, 7, 6], o)
}

/// η for a dtype: in f32 inside the range of `ρ̂` (both adjuster branches run); in
/// f16/bf16 above it (`ρ̂ = x·r_w·r_x + ν < 2` here), so every element is on the lower
/// branch on both backends: the storage rounding moves `ρ̂` by ~`u`, which could put an
/// element near `η` on the other branch on one side only (a different derivative, not
/// a rounding error).
fn etas(dt: DType, r: &mut rand::rngs::SmallRng, n: usize) -> Vec<f64> {
    match dt {
        DType::F16 | DType::BF16 => vec![2.5; n],
        _ => uniform(r, n, 0.05, 0.5),
    }
}

/// IIEU-B: every input's gradient.
#[test]
fn iieu_b_matches_flex() {
    let (pd, wdims, xd, o) = iieu_geo();
    let oc = wdims[0];
    for dt in ALL {
        let mut r = rng(24);
        let xv = randn(&mut r, xd.iter().product());
        let xpv = randn(&mut r, pd.iter().product());
        let wv = randn(&mut r, wdims.iter().product());
        let dyv = randn(&mut r, xd.iter().product());
        let (lwv, lbv) = (
            uniform(&mut r, oc, 0.5, 1.5),
            uniform(&mut r, oc, -0.3, 0.3),
        );
        let etav = etas(dt, &mut r, oc);
        against_flex("burn-cuda iieu_b", &[dt], |run| {
            let (x, xp, w) = (run.t(&xv, xd), run.t(&xpv, pd), run.t(&wv, wdims));
            let (lw, lb, eta) = (run.t(&lwv, [oc]), run.t(&lbv, [oc]), run.t(&etav, [oc]));
            let y = ops::iieu_b(
                x.clone(),
                xp.clone(),
                w.clone(),
                lw.clone(),
                lb.clone(),
                eta.clone(),
                o,
            )
            .expect("iieu_b");
            let yv = read(y.clone());
            let g = run.wsum(y, &dyv).backward();
            vec![
                ("y", Kind::Red, yv),
                ("dx", Kind::Red, g_of(&x, &g)),
                ("dx_pre", Kind::Red, g_of(&xp, &g)),
                ("dw", Kind::Red, g_of(&w, &g)),
                ("d_ln_weight", Kind::Red, g_of(&lw, &g)),
                ("d_ln_bias", Kind::Red, g_of(&lb, &g)),
                ("d_eta", Kind::Red, g_of(&eta, &g)),
            ]
        });
    }
}

/// IIEU-DC on `(3, 6, 5, 7)`, `r = 2` (hidden width 3): `dx`, `dres` and every
/// parameter's gradient (split by burn from the packed one).
#[test]
fn iieu_dc_matches_flex() {
    let dims = [3, 6, 5, 7];
    let (c, hd) = (6, 3);
    let len: usize = dims.iter().product();
    for dt in ALL {
        let mut r = rng(25);
        let (xv, resv, dyv) = (randn(&mut r, len), randn(&mut r, len), randn(&mut r, len));
        let p: Vec<Vec<f64>> = [2 * c, 2 * c, hd * c, 2 * hd, 2 * hd]
            .iter()
            .map(|&l| uniform(&mut r, l, -0.8, 0.8))
            .collect();
        // η₂ as IIEU-B's η (see `etas`).
        let eta2 = etas(dt, &mut r, hd);
        let q: Vec<Vec<f64>> = [c * hd, 2 * c, 2 * c]
            .iter()
            .map(|&l| uniform(&mut r, l, -0.8, 0.8))
            .collect();
        against_flex("burn-cuda iieu_dc", &[dt], |run| {
            let (x, res) = (run.t(&xv, dims), run.t(&resv, dims));
            let pt = DcTensors {
                ln1_weight: run.t(&p[0], [2 * c]),
                ln1_bias: run.t(&p[1], [2 * c]),
                w1: run.t(&p[2], [hd, c]),
                gamma2: run.t(&p[3], [2, hd]),
                beta2: run.t(&p[4], [2, hd]),
                eta2: run.t(&eta2, [hd]),
                w2: run.t(&q[0], [c, hd]),
                ln2_weight: run.t(&q[1], [2 * c]),
                ln2_bias: run.t(&q[2], [2 * c]),
            };
            let y = ops::iieu_dc(x.clone(), res.clone(), &pt, 2).expect("iieu_dc");
            let yv = read(y.clone());
            let g = run.wsum(y, &dyv).backward();
            vec![
                ("y", Kind::Red, yv),
                ("dx", Kind::Red, g_of(&x, &g)),
                ("dres", Kind::Red, g_of(&res, &g)),
                ("d_ln1_weight", Kind::Red, g_of(&pt.ln1_weight, &g)),
                ("d_ln1_bias", Kind::Red, g_of(&pt.ln1_bias, &g)),
                ("d_w1", Kind::Red, g_of(&pt.w1, &g)),
                ("d_gamma2", Kind::Red, g_of(&pt.gamma2, &g)),
                ("d_beta2", Kind::Red, g_of(&pt.beta2, &g)),
                ("d_eta2", Kind::Red, g_of(&pt.eta2, &g)),
                ("d_w2", Kind::Red, g_of(&pt.w2, &g)),
                ("d_ln2_weight", Kind::Red, g_of(&pt.ln2_weight, &g)),
                ("d_ln2_bias", Kind::Red, g_of(&pt.ln2_bias, &g)),
            ]
        });
    }
}

/// IieuConv2d with every ψ (none, bias, affine, BatchNorm training and eval): `y`, the
/// gradients of `x_pre`, `W`, ψ's vectors, `γ̇, β̇, η`, and BatchNorm training's updated
/// running statistics (the same host side effect as the CPU path).
#[test]
fn iieu_conv2d_every_psi_matches_flex() {
    let (pd, wdims, yd, o) = iieu_geo();
    let oc = wdims[0];
    for dt in ALL {
        let mut r = rng(26);
        let xpv = randn(&mut r, pd.iter().product());
        let wv = randn(&mut r, wdims.iter().product());
        let dyv = randn(&mut r, yd.iter().product());
        let (lwv, lbv) = (
            uniform(&mut r, oc, 0.5, 1.5),
            uniform(&mut r, oc, -0.3, 0.3),
        );
        let etav = etas(dt, &mut r, oc);
        let (av, bv) = (
            uniform(&mut r, oc, 0.5, 1.5),
            uniform(&mut r, oc, -0.5, 0.5),
        );
        let (rmv, rvv) = (
            uniform(&mut r, oc, -0.2, 0.2),
            uniform(&mut r, oc, 0.5, 2.0),
        );
        for psi in ["none", "bias", "affine", "bn train", "bn eval"] {
            let fam = format!("burn-cuda iieu_conv2d {psi}");
            against_flex(&fam, &[dt], |run| {
                let (xp, w) = (run.t(&xpv, pd), run.t(&wv, wdims));
                let (lw, lb, eta) = (run.t(&lwv, [oc]), run.t(&lbv, [oc]), run.t(&etav, [oc]));
                let (a, b) = (run.t(&av, [oc]), run.t(&bv, [oc]));
                let bn = |training| ops::ConvPsi::BatchNorm {
                    weight: a.clone(),
                    bias: b.clone(),
                    running_mean: run.t(&rmv, [oc]),
                    running_var: run.t(&rvv, [oc]),
                    momentum: 0.1,
                    eps: 1e-5,
                    training,
                };
                let cpsi = match psi {
                    "none" => ops::ConvPsi::None,
                    "bias" => ops::ConvPsi::Bias(b.clone()),
                    "affine" => ops::ConvPsi::Affine {
                        scale: a.clone(),
                        shift: b.clone(),
                    },
                    "bn train" => bn(true),
                    _ => bn(false),
                };
                let out = ops::iieu_conv2d(
                    xp.clone(),
                    w.clone(),
                    cpsi,
                    lw.clone(),
                    lb.clone(),
                    eta.clone(),
                    o,
                )
                .expect("iieu_conv2d");
                let mut v = vec![("y", Kind::Red, read(out.y.clone()))];
                match (psi, out.running) {
                    ("bn train", Some((m, s))) => v.extend([
                        ("running mean", Kind::Red, read(m)),
                        ("running var", Kind::Red, read(s)),
                    ]),
                    ("bn train", None) => panic!("{psi}: no running statistics"),
                    (_, got) => assert!(got.is_none(), "{psi}: running statistics"),
                }
                let g = run.wsum(out.y, &dyv).backward();
                v.extend([
                    ("dx_pre", Kind::Red, g_of(&xp, &g)),
                    ("dw", Kind::Red, g_of(&w, &g)),
                    ("d_ln_weight", Kind::Red, g_of(&lw, &g)),
                    ("d_ln_bias", Kind::Red, g_of(&lb, &g)),
                    ("d_eta", Kind::Red, g_of(&eta, &g)),
                ]);
                if psi != "none" {
                    v.push(("d_psi_shift", Kind::Red, g_of(&b, &g)));
                }
                if psi != "none" && psi != "bias" {
                    v.push(("d_psi_scale", Kind::Red, g_of(&a, &g)));
                }
                v
            });
        }
    }
}

/// The AIEC training step: `A`, the loss, `dF`, `dWd` (the loss weighted by 0.7 in the
/// objective, so its upstream gradient is not 1), and the host side effects — the
/// counters (integers: equal) and the step's statistics — as on burn's CPU backend;
/// then a second step from the updated (non-zero) counters.
#[test]
fn aiec_train_matches_flex() {
    let (n, c, k) = (DIMS[0], DIMS[1], 4);
    let len: usize = DIMS.iter().product();
    let mut r = rng(27);
    let (fv, dav) = (randn(&mut r, len), randn(&mut r, len));
    let wdv = uniform(&mut r, k * c, -0.6, 0.6);
    let labels: Vec<usize> = (0..n).map(|i| (i * 3 + 1) % k).collect();
    let labels2: Vec<usize> = (0..n).map(|i| (i + 2) % k).collect();
    let cfg = AiecConfig {
        tau: 0.1,
        lambda_gate: 2.0,
        ..Default::default()
    };
    let counters = Mutex::new(Vec::new());
    against_flex("burn-cuda aiec_train", &ALL, |run| {
        let cnt = Arc::new(Mutex::new(Counters::new(k, c).expect("counters")));
        let (f, wd) = (run.t(&fv, DIMS), run.t(&wdv, [k, c]));
        let out = ops::aiec_train(f.clone(), wd.clone(), &labels, cfg, &cnt, Layout::Nchw)
            .expect("aiec_train");
        let lw = run.t(&[0.7], [1]);
        let (av, lv) = (read(out.out.clone()), read(out.loss.clone()));
        let g = (run.wsum(out.out, &dav) + out.loss * lw).backward();
        let stats = out.stats;
        // A second step on the counters the first one updated: the device path starts
        // from non-zero counters copied from the host (its gate masks read them).
        let out2 = ops::aiec_train(f.clone(), wd.clone(), &labels2, cfg, &cnt, Layout::Nchw)
            .expect("aiec_train, second step");
        let (av2, lv2) = (read(out2.out), read(out2.loss));
        counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(cnt.lock().unwrap_or_else(|e| e.into_inner()).clone());
        vec![
            ("A", Kind::Elem, av),
            ("loss", Kind::Red, lv),
            (
                "stats",
                Kind::Red,
                vec![
                    stats.aux_mean,
                    stats.gate_mean,
                    stats.total,
                    stats.dmu_accuracy,
                ],
            ),
            ("dF", Kind::Red, g_of(&f, &g)),
            ("dWd", Kind::Red, g_of(&wd, &g)),
            ("A, second step", Kind::Elem, av2),
            ("loss, second step", Kind::Red, lv2),
        ]
    });
    // One CUDA run, then one Flex run, per dtype: each pair updated equal counters
    // (over both steps).
    let runs = counters.into_inner().unwrap_or_else(|e| e.into_inner());
    for pair in runs.chunks(2) {
        assert_eq!(pair[0], pair[1], "AIEC counters: CUDA vs Flex");
    }
}

/// One bad length per family reaches the CUDA path's host-side validation (or the
/// op's own checks before it) and is an `Err` — the error burn's CPU backend returns
/// for the same input — never a panic or a launch on a short buffer.
#[test]
fn bad_length_per_family_is_the_flex_err() {
    let Some(cuda) = dev() else { return };
    let errs = |run: &Run| -> Vec<activation_kernels::Error> {
        let mut r = rng(28);
        let (n, c, h, w) = (DIMS[0], DIMS[1], DIMS[2], DIMS[3]);
        let xv = randn(&mut r, n * c * h * w);
        let x = || run.t(&xv, DIMS);
        let mut e = Vec::new();
        // channel_gen: b1 of width + 1.
        let (w1, w2) = (run.t(&xv[..2 * c], [2, c]), run.t(&xv[..2 * c], [c, 2]));
        let bias = Some((run.t(&xv[..3], [3]), run.t(&xv[..c], [c])));
        e.push(ops::channel_gen(x(), w1, w2, bias, Layout::Nchw).expect_err("channel_gen"));
        // layer_gen: a rank-4 tensor read as tokens (N, L, C).
        e.push(ops::layer_gen(x(), Layout::Nlc).expect_err("layer_gen"));
        // tau: no length but F's; a non-finite τ.
        e.push(ops::tau(x(), f64::NAN).expect_err("tau"));
        // iieu_b: γ̇ of O + 1.
        let (pd, wdims, xd, o) = iieu_geo();
        let oc = wdims[0];
        let v = |len: usize| randn(&mut rng(29), len);
        let (xt, xp, wt) = (
            run.t(&v(xd.iter().product()), xd),
            run.t(&v(pd.iter().product()), pd),
            run.t(&v(wdims.iter().product()), wdims),
        );
        let p = |l: usize| run.t(&vec![0.1; l], [l]);
        e.push(
            ops::iieu_b(xt, xp.clone(), wt.clone(), p(oc + 1), p(oc), p(oc), o)
                .expect_err("iieu_b"),
        );
        // iieu_conv2d: ψ bias of O + 1.
        let psi = ops::ConvPsi::Bias(p(oc + 1));
        e.push(ops::iieu_conv2d(xp, wt, psi, p(oc), p(oc), p(oc), o).expect_err("iieu_conv2d"));
        // iieu_dc: η₂ of hidden + 1 (the pack one value long).
        let (dc, hd) = (6, 3);
        let dd = [2, dc, 3, 5];
        let xd2 = run.t(&v(dd.iter().product()), dd);
        let pt = DcTensors {
            ln1_weight: p(2 * dc),
            ln1_bias: p(2 * dc),
            w1: run.t(&vec![0.1; hd * dc], [hd, dc]),
            gamma2: run.t(&vec![0.1; 2 * hd], [2, hd]),
            beta2: run.t(&vec![0.1; 2 * hd], [2, hd]),
            eta2: p(hd + 1),
            w2: run.t(&vec![0.1; dc * hd], [dc, hd]),
            ln2_weight: p(2 * dc),
            ln2_bias: p(2 * dc),
        };
        e.push(ops::iieu_dc(xd2.clone(), xd2, &pt, 2).expect_err("iieu_dc"));
        // aiec_train: N + 1 labels.
        let k = 3;
        let cnt = Arc::new(Mutex::new(Counters::new(k, c).expect("counters")));
        let wd = run.t(&vec![0.1; k * c], [k, c]);
        let labels = vec![0; n + 1];
        let cfg = AiecConfig::default();
        e.push(ops::aiec_train(x(), wd, &labels, cfg, &cnt, Layout::Nchw).expect_err("aiec"));
        e
    };
    let got = errs(&Run {
        d: cuda,
        dt: DType::F32,
        round: DType::F32,
    });
    let want = errs(&Run {
        d: Device::flex().autodiff(),
        dt: DType::F32,
        round: DType::F32,
    });
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(
            std::mem::discriminant(g),
            std::mem::discriminant(w),
            "CUDA {g:?} vs Flex {w:?}"
        );
    }
    assert_eq!(got.len(), want.len());
}
