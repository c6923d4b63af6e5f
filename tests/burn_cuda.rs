//! burn's CUDA backend (feature `burn-cuda`) against the crate's CPU reference: ACON-C
//! with every β source, ACON-B and ACON-A, forward and every gradient from burn's
//! `backward()` under `Autodiff`, f32 on `Device::cuda(0)`, on a ragged NCHW shape
//! (N = 3, C = 5, H = 7, W = 9: no multiple of 4, 32 or a block).
//!
//! Runs on a real GPU only (`scripts/gpu-check.sh` with a pack built by
//! `scripts/gpu-pack.sh --with-burn`): CubeCL's own kernels (`from_data`'s layout,
//! `mul`, `sum`, `into_contiguous`) are PTX, which the emulated device cannot run, and
//! cubecl-cuda links a prebuilt LLVM that its build script downloads. Without a CUDA
//! driver the tests fail loudly unless `AK_SKIP_GPU_TESTS` is set.
//!
//! Reference: the CPU op in f64 on the same f32 inputs, with `dy = w` (burn's gradient
//! of `Σ w·y` w.r.t. `y` is `w`, computed by CubeCL's `mul`/`sum` backward, exact). Bound,
//! as the GPU parity suites' (tests/parity_acon.rs, `tests/common` `assert_parity`):
//! `|got − ref| ≤ (u + E_REL)·|ref| + e·max|ref|`, `u = 2^-24` for the f32 outputs and
//! `dx`, 0 for the parameter gradients (f32 sums, their rounding inside `e`);
//! `e = 1e-5` for `y`, `dx`, `dp*` (f32 arithmetic, `__expf`; f32 sums over N·H·W = 189
//! terms) and `1e-4` for `dβ` (sums of `dy·d²·s(1 − s)` of both signs). These are the
//! parity suites' measured-and-margined terms for the same kernels.
#![cfg(feature = "burn-cuda")]

mod common;

use activation_kernels::burn::ops::{self, BetaTensor};
use activation_kernels::cpu::acon::{self, Beta};
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

#[test]
fn op_without_a_cuda_path_is_an_err_on_burn_cuda() {
    let Some(d) = dev() else { return };
    let len = DIMS.iter().product();
    let x = t(&randn(&mut rng(13), len), DIMS, &d);
    let e = ops::tau(x, 0.5).expect_err("TAU has no CUDA path on burn's CUDA backend yet");
    assert!(format!("{e}").contains("CUDA"), "{e}");
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
