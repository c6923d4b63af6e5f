//! candle integration of ACON-A, ACON-B and meta-ACON-C with the layer-wise and
//! pixel-wise generators (`ops::acon_a`, `ops::acon_b`, `ops::meta_acon_c_layer`,
//! `ops::meta_acon_c_pixel`; modules `AconA`, `AconB`, `MetaAconCLayer`,
//! `MetaAconCPixel`).
//!
//! * Reference: gradients from candle's autograd (`loss = Σ w·y`, fixed random `w`)
//!   equal the CPU backward called directly with `dy = w`, for the input and every
//!   parameter, in f64 (both layouts), compared **exactly**. Why exact: candle's
//!   gradient of `Σ w·y` w.r.t. `y` is `1·w = w` bit for bit, the op's `bwd` runs the
//!   same deterministic CPU code on the same values (fixed-order reductions), and
//!   candle's `stack` backward (a `narrow` of the packed gradient) and its first
//!   accumulation (`0 + g`) are exact. Any packing mix-up (rows swapped, wrong
//!   parameter) shows up as a mismatch. One test repeats this in f32 (dtype dispatch).
//! * Independent check: central finite differences of the candle forward (f64,
//!   h = 1e-5) against candle's autograd for the input and every parameter, with the
//!   crate's standard tolerance (`check_grad`: atol 1e-8, rtol 1e-6). ACON is smooth
//!   everywhere (no kinks), so any data works; β is kept in [0.5, 2] and `x` ~ N(0, 1).
//! * Bad input (wrong parameter dims, wrong rank, f16/bf16/u8/u32, mixed dtypes,
//!   empty tensors, C = 0 modules) returns `Err`, never panics.
//! * Modules: variable names, shapes and SPEC §2 inits; at the paper init each module
//!   is Swish `x·σ(x)` (checked against a direct formula); every variable gets a
//!   gradient of its own shape.
#![cfg(feature = "candle")]

mod common;

use activation_kernels::candle::nn::{AconA, AconB, AconInit, MetaAconCLayer, MetaAconCPixel};
use activation_kernels::candle::ops::{self, MetaGenKind};
use activation_kernels::cpu::acon::{self, Beta, MetaGen};
use activation_kernels::{ActShape, Layout};
use approx::abs_diff_eq;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::{check_grad, numeric_grad, randn, rng, uniform};

type R = candle_core::Result<()>;
type Res<T> = candle_core::Result<T>;

const LAYOUTS: [Layout; 2] = [Layout::Nchw, Layout::Nlc];

fn var(v: &[f64], dims: &[usize]) -> Res<Var> {
    Var::from_vec(v.to_vec(), dims, &Device::Cpu)
}

fn t(v: &[f64], dims: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), dims, &Device::Cpu).unwrap()
}

fn host(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

fn vb(map: &VarMap, dt: DType) -> VarBuilder<'static> {
    VarBuilder::from_varmap(map, dt, &Device::Cpu)
}

/// `(dims of x, ActShape)` for `n` samples, `c` channels, `s` positions.
fn dims_shape(layout: Layout, n: usize, c: usize, s: usize) -> (Vec<usize>, ActShape) {
    match layout {
        Layout::Nchw => (vec![n, c, s], ActShape::nchw(n, c, s, 1)),
        Layout::Nlc => (vec![n, s, c], ActShape::nlc(n, s, c)),
    }
}

/// `Σ w·y` and `w` (random, fixed by `seed`).
fn weighted_sum(y: &Tensor, seed: u64) -> Res<(Tensor, Vec<f64>)> {
    let w = randn(&mut rng(seed), y.elem_count());
    let wt = Tensor::from_vec(w.clone(), y.shape(), y.device())?;
    Ok(((y * wt)?.sum_all()?, w))
}

#[track_caller]
fn exact(name: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g == w, "{name}[{i}]: candle {g} vs reference {w}");
    }
}

fn grad(g: &candle_core::backprop::GradStore, v: &Var) -> Vec<f64> {
    let t = g.get(v).expect("a gradient for every variable");
    assert_eq!(t.dims(), v.dims(), "gradient dims");
    host(t)
}

// ---------------------------------------------------------------------------
// candle autograd == CPU reference (f64, exact)

#[test]
fn acon_a_grads_match_reference() -> R {
    for (li, layout) in LAYOUTS.into_iter().enumerate() {
        let (n, c, s) = (3, 4, 5);
        let (dims, shape) = dims_shape(layout, n, c, s);
        let mut r = rng(100 + li as u64);
        let x = randn(&mut r, n * c * s);
        let beta = uniform(&mut r, c, 0.5, 2.0);
        let (xv, bv) = (var(&x, &dims)?, var(&beta, &[c])?);
        let y = ops::acon_a(&xv, &bv, layout)?;
        let (loss, w) = weighted_sum(&y, 110 + li as u64)?;
        let g = loss.backward()?;

        let y_ref = acon::acon_a_forward(&shape, &x, Beta::PerChannel(&beta)).unwrap();
        let gr = acon::acon_a_backward(&shape, &w, &x, Beta::PerChannel(&beta)).unwrap();
        exact("y", &host(&y), &y_ref);
        exact("dx", &grad(&g, &xv), &gr.dx);
        exact("dbeta", &grad(&g, &bv), &gr.dbeta);
    }
    Ok(())
}

#[test]
fn acon_b_grads_match_reference() -> R {
    for (li, layout) in LAYOUTS.into_iter().enumerate() {
        let (n, c, s) = (2, 3, 6);
        let (dims, shape) = dims_shape(layout, n, c, s);
        let mut r = rng(200 + li as u64);
        let x = randn(&mut r, n * c * s);
        let p = uniform(&mut r, c, -0.8, 0.8);
        let beta = uniform(&mut r, c, 0.5, 2.0);
        let (xv, pv, bv) = (var(&x, &dims)?, var(&p, &[c])?, var(&beta, &[c])?);
        let y = ops::acon_b(&xv, &pv, &bv, layout)?;
        let (loss, w) = weighted_sum(&y, 210 + li as u64)?;
        let g = loss.backward()?;

        let y_ref = acon::acon_b_forward(&shape, &x, &p, Beta::PerChannel(&beta)).unwrap();
        let gr = acon::acon_b_backward(&shape, &w, &x, &p, Beta::PerChannel(&beta)).unwrap();
        exact("y", &host(&y), &y_ref);
        exact("dx", &grad(&g, &xv), &gr.dx);
        exact("dp", &grad(&g, &pv), &gr.dp);
        exact("dbeta", &grad(&g, &bv), &gr.dbeta);
    }
    Ok(())
}

#[test]
fn meta_acon_c_layer_and_pixel_grads_match_reference() -> R {
    for (ki, kind) in [MetaGenKind::Layer, MetaGenKind::Pixel]
        .into_iter()
        .enumerate()
    {
        for (li, layout) in LAYOUTS.into_iter().enumerate() {
            let seed = 300 + 10 * ki as u64 + li as u64;
            let (n, c, s) = (3, 4, 5);
            let (dims, shape) = dims_shape(layout, n, c, s);
            let mut r = rng(seed);
            let x = randn(&mut r, n * c * s);
            let p1 = randn(&mut r, c);
            let p2 = randn(&mut r, c);
            let (xv, p1v, p2v) = (var(&x, &dims)?, var(&p1, &[c])?, var(&p2, &[c])?);
            let y = match kind {
                MetaGenKind::Layer => ops::meta_acon_c_layer(&xv, &p1v, &p2v, layout)?,
                MetaGenKind::Pixel => ops::meta_acon_c_pixel(&xv, &p1v, &p2v, layout)?,
            };
            let (loss, w) = weighted_sum(&y, seed + 1000)?;
            let g = loss.backward()?;

            let gen = match kind {
                MetaGenKind::Layer => MetaGen::Layer,
                MetaGenKind::Pixel => MetaGen::Pixel,
            };
            let (y_ref, saved) = acon::meta_acon_c_forward(&shape, &x, &p1, &p2, gen).unwrap();
            let gr = acon::meta_acon_c_backward(&shape, &w, &x, &p1, &p2, gen, &saved).unwrap();
            exact("y", &host(&y), &y_ref);
            exact("dx", &grad(&g, &xv), &gr.dx);
            exact("dp1", &grad(&g, &p1v), &gr.dp1);
            exact("dp2", &grad(&g, &p2v), &gr.dp2);
            // The generic entry point is the same op.
            let y2 = ops::meta_acon_c_gen(&xv, &p1v, &p2v, kind, layout)?;
            exact("y (meta_acon_c_gen)", &host(&y2), &y_ref);
        }
    }
    Ok(())
}

/// The f32 dispatch path: same comparison in f32 (exact for the same reason).
#[test]
fn f32_path_matches_reference() -> R {
    let (n, c, s) = (2, 3, 4);
    let shape = ActShape::nchw(n, c, s, 1);
    let f = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect::<Vec<f32>>();
    let x = f(randn(&mut rng(400), n * c * s));
    let p = f(uniform(&mut rng(401), c, -0.5, 0.5));
    let beta = f(uniform(&mut rng(402), c, 0.5, 2.0));
    let w = f(randn(&mut rng(403), n * c * s));
    let dev = &Device::Cpu;
    let xv = Var::from_vec(x.clone(), (n, c, s), dev)?;
    let pv = Var::from_vec(p.clone(), c, dev)?;
    let bv = Var::from_vec(beta.clone(), c, dev)?;
    let wt = Tensor::from_vec(w.clone(), (n, c, s), dev)?;
    let h = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();

    let y = ops::acon_b(&xv, &pv, &bv, Layout::Nchw)?;
    let g = (&y * &wt)?.sum_all()?.backward()?;
    let gr = acon::acon_b_backward(&shape, &w, &x, &p, Beta::PerChannel(&beta)).unwrap();
    assert_eq!(
        h(&y),
        acon::acon_b_forward(&shape, &x, &p, Beta::PerChannel(&beta)).unwrap()
    );
    assert_eq!(h(g.get(&xv).unwrap()), gr.dx);
    assert_eq!(h(g.get(&pv).unwrap()), gr.dp);
    assert_eq!(h(g.get(&bv).unwrap()), gr.dbeta);

    let y = ops::acon_a(&xv, &bv, Layout::Nchw)?;
    let g = (&y * &wt)?.sum_all()?.backward()?;
    let gr = acon::acon_a_backward(&shape, &w, &x, Beta::PerChannel(&beta)).unwrap();
    assert_eq!(h(g.get(&xv).unwrap()), gr.dx);
    assert_eq!(h(g.get(&bv).unwrap()), gr.dbeta);

    let y = ops::meta_acon_c_pixel(&xv, &bv, &pv, Layout::Nchw)?;
    let g = (&y * &wt)?.sum_all()?.backward()?;
    let (_, sv) = acon::meta_acon_c_forward(&shape, &x, &beta, &p, MetaGen::Pixel).unwrap();
    let gr = acon::meta_acon_c_backward(&shape, &w, &x, &beta, &p, MetaGen::Pixel, &sv).unwrap();
    assert_eq!(h(g.get(&xv).unwrap()), gr.dx);
    assert_eq!(h(g.get(&bv).unwrap()), gr.dp1);
    assert_eq!(h(g.get(&pv).unwrap()), gr.dp2);
    Ok(())
}

// ---------------------------------------------------------------------------
// Independent check: finite differences of the candle forward

/// For `f(inputs) = y`, compares candle's autograd gradient of `Σ w·y` w.r.t. each
/// input with central finite differences of the same scalar computed by `f`'s forward.
fn fd_check(
    name: &str,
    inputs: &[(Vec<f64>, Vec<usize>)],
    seed: u64,
    f: impl Fn(&[Tensor]) -> Res<Tensor>,
) -> R {
    let vars = inputs
        .iter()
        .map(|(v, d)| var(v, d))
        .collect::<Res<Vec<_>>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts)?;
    let (loss, w) = weighted_sum(&y, seed)?;
    let g = loss.backward()?;
    for (i, (v0, dims)) in inputs.iter().enumerate() {
        let analytic = grad(&g, &vars[i]);
        let numeric = numeric_grad(v0, |vi| {
            let mut ts2: Vec<Tensor> = inputs.iter().map(|(v, d)| t(v, d)).collect();
            ts2[i] = t(vi, dims);
            let y = f(&ts2).unwrap();
            host(&y).iter().zip(&w).map(|(a, b)| a * b).sum()
        });
        check_grad(&format!("{name}: input {i}"), &analytic, &numeric);
    }
    Ok(())
}

#[test]
fn finite_differences_agree_with_autograd() -> R {
    // Smooth ops: x ~ N(0, 1), β in [0.5, 2], p's ~ N(0, 1) or in [-0.8, 0.8].
    for (li, layout) in LAYOUTS.into_iter().enumerate() {
        let (n, c, s) = (2, 3, 4);
        let (dims, _) = dims_shape(layout, n, c, s);
        let mut r = rng(500 + li as u64);
        let x = (randn(&mut r, n * c * s), dims.clone());
        let beta = (uniform(&mut r, c, 0.5, 2.0), vec![c]);
        let p = (uniform(&mut r, c, -0.8, 0.8), vec![c]);
        let p1 = (randn(&mut r, c), vec![c]);
        let p2 = (randn(&mut r, c), vec![c]);
        let seed = 510 + li as u64;
        fd_check("acon_a", &[x.clone(), beta.clone()], seed, |v| {
            ops::acon_a(&v[0], &v[1], layout)
        })?;
        fd_check("acon_b", &[x.clone(), p.clone(), beta.clone()], seed, |v| {
            ops::acon_b(&v[0], &v[1], &v[2], layout)
        })?;
        let ins = [x.clone(), p1.clone(), p2.clone()];
        fd_check("meta layer", &ins, seed, |v| {
            ops::meta_acon_c_layer(&v[0], &v[1], &v[2], layout)
        })?;
        fd_check("meta pixel", &ins, seed, |v| {
            ops::meta_acon_c_pixel(&v[0], &v[1], &v[2], layout)
        })?;
    }
    // A 4-D NCHW input (N, C, H, W): positions = H·W for the layer-wise GAP.
    let mut r = rng(520);
    let x = (randn(&mut r, 2 * 3 * 2 * 3), vec![2, 3, 2, 3]);
    let p1 = (randn(&mut r, 3), vec![3]);
    let p2 = (randn(&mut r, 3), vec![3]);
    fd_check("meta layer 4-D", &[x, p1, p2], 521, |v| {
        ops::meta_acon_c_layer(&v[0], &v[1], &v[2], Layout::Nchw)
    })
}

/// A strided (transposed) input is made contiguous by the op: same output and the
/// gradient lands on the original tensor with its dims.
#[test]
fn non_contiguous_input() -> R {
    let x = randn(&mut rng(600), 2 * 5 * 3);
    let xv = var(&x, &[2, 5, 3])?; // (N, S, C) viewed as NCHW after a transpose
    let xt = xv.transpose(1, 2)?; // (2, 3, 5), strided
    assert!(!xt.is_contiguous());
    let (p1, p2) = (t(&[1.2, 0.3, -0.4], &[3]), t(&[0.1, -0.2, 0.5], &[3]));
    let y = ops::meta_acon_c_layer(&xt, &p1, &p2, Layout::Nchw)?;
    let y2 = ops::meta_acon_c_layer(&xt.contiguous()?, &p1, &p2, Layout::Nchw)?;
    exact("y", &host(&y), &host(&y2));
    let g = y.sum_all()?.backward()?;
    assert_eq!(g.get(&xv).unwrap().dims(), &[2, 5, 3]);
    Ok(())
}

// ---------------------------------------------------------------------------
// Bad input: Err, never a panic

#[test]
fn bad_inputs_are_errors() -> R {
    let x = t(&[0.5; 2 * 3 * 4], &[2, 3, 4]);
    let p3 = t(&[1.0; 3], &[3]);
    let p4 = t(&[1.0; 4], &[4]);
    // (N, C) = (2, 3) is a per-(sample, channel) β for NCHW (candle::BetaShape); with
    // N = 3 it fits neither layout.
    let p23 = t(&[1.0; 6], &[2, 3]);
    let p32 = t(&[1.0; 6], &[3, 2]);
    for layout in LAYOUTS {
        let c_ok = match layout {
            Layout::Nchw => &p3,
            Layout::Nlc => &p4,
        };
        let c_bad = match layout {
            Layout::Nchw => &p4,
            Layout::Nlc => &p3,
        };
        assert!(ops::acon_a(&x, c_ok, layout).is_ok());
        assert!(ops::acon_b(&x, c_ok, c_ok, layout).is_ok());
        assert!(ops::meta_acon_c_layer(&x, c_ok, c_ok, layout).is_ok());
        assert!(ops::meta_acon_c_pixel(&x, c_ok, c_ok, layout).is_ok());
        // Parameter length ≠ C (each parameter in turn), or a 2-D β of other dims.
        assert!(ops::acon_a(&x, c_bad, layout).is_err());
        assert!(ops::acon_a(&x, &p32, layout).is_err());
        assert_eq!(
            ops::acon_a(&x, &p23, layout).is_ok(),
            layout == Layout::Nchw
        );
        assert!(ops::acon_b(&x, c_bad, c_ok, layout).is_err());
        assert!(ops::acon_b(&x, c_ok, c_bad, layout).is_err());
        assert!(ops::acon_b(&x, c_bad, c_bad, layout).is_err());
        for kind in [MetaGenKind::Layer, MetaGenKind::Pixel] {
            assert!(ops::meta_acon_c_gen(&x, c_bad, c_ok, kind, layout).is_err());
            assert!(ops::meta_acon_c_gen(&x, c_ok, c_bad, kind, layout).is_err());
            assert!(ops::meta_acon_c_gen(&x, c_bad, c_bad, kind, layout).is_err());
        }
    }
    // Rank: NCHW needs ≥ 2 dims, NLC exactly 3.
    let x1 = t(&[1.0; 3], &[3]);
    let x2 = t(&[1.0; 6], &[2, 3]);
    assert!(ops::acon_a(&x1, &p3, Layout::Nchw).is_err());
    assert!(ops::acon_a(&x2, &p3, Layout::Nchw).is_ok()); // (N, C): one position
    assert!(ops::acon_a(&x2, &p3, Layout::Nlc).is_err());
    assert!(ops::acon_b(&x1, &p3, &p3, Layout::Nchw).is_err());
    assert!(ops::meta_acon_c_layer(&x2, &p3, &p3, Layout::Nlc).is_err());
    assert!(ops::meta_acon_c_pixel(&x1, &p3, &p3, Layout::Nchw).is_err());
    Ok(())
}

#[test]
fn unsupported_and_mixed_dtypes_are_errors() -> R {
    let dev = &Device::Cpu;
    for dt in [DType::F16, DType::BF16, DType::U8, DType::U32] {
        let x = Tensor::ones((2, 3, 4), dt, dev)?;
        let p = Tensor::ones(3, dt, dev)?;
        let e = format!("{}", ops::acon_a(&x, &p, Layout::Nchw).unwrap_err());
        assert!(e.contains("acon_a"), "{e}");
        let e = format!("{}", ops::acon_b(&x, &p, &p, Layout::Nchw).unwrap_err());
        assert!(e.contains("acon_b"), "{e}");
        let e = format!(
            "{}",
            ops::meta_acon_c_layer(&x, &p, &p, Layout::Nchw).unwrap_err()
        );
        assert!(e.contains("meta_acon_c_layer"), "{e}");
        let e = format!(
            "{}",
            ops::meta_acon_c_pixel(&x, &p, &p, Layout::Nchw).unwrap_err()
        );
        assert!(e.contains("meta_acon_c_pixel"), "{e}");
        // A float input with parameters of that dtype is an error too.
        let xf = Tensor::ones((2, 3, 4), DType::F32, dev)?;
        assert!(ops::acon_a(&xf, &p, Layout::Nchw).is_err());
        assert!(ops::acon_b(&xf, &p, &p, Layout::Nchw).is_err());
        assert!(ops::meta_acon_c_layer(&xf, &p, &p, Layout::Nchw).is_err());
    }
    // f32 input, f64 parameters (and one of each for the packed ones).
    let x = Tensor::ones((2, 3, 4), DType::F32, dev)?;
    let p32 = Tensor::ones(3, DType::F32, dev)?;
    let p64 = Tensor::ones(3, DType::F64, dev)?;
    assert!(ops::acon_a(&x, &p64, Layout::Nchw).is_err());
    assert!(ops::acon_b(&x, &p64, &p64, Layout::Nchw).is_err());
    assert!(ops::acon_b(&x, &p32, &p64, Layout::Nchw).is_err());
    assert!(ops::meta_acon_c_pixel(&x, &p64, &p64, Layout::Nchw).is_err());
    assert!(ops::meta_acon_c_layer(&x, &p32, &p64, Layout::Nchw).is_err());
    // Modules built in f32 on an f64 input.
    let map = VarMap::new();
    let v = vb(&map, DType::F32);
    let x64 = Tensor::ones((2, 3, 4), DType::F64, dev)?;
    assert!(AconA::new(v.pp("a"), 3)?.forward(&x64).is_err());
    assert!(AconB::new(v.pp("b"), 3)?.forward(&x64).is_err());
    assert!(MetaAconCLayer::new(v.pp("l"), 3)?.forward(&x64).is_err());
    assert!(MetaAconCPixel::new(v.pp("p"), 3)?.forward(&x64).is_err());
    Ok(())
}

#[test]
fn empty_tensors_are_errors() -> R {
    // Zero samples, zero channels, zero positions (NCHW and NLC): the CPU backend's
    // `Empty` error, wrapped; never a panic and never a silently empty result.
    let cases: [(&[usize], usize, Layout); 5] = [
        (&[0, 3, 4], 3, Layout::Nchw),
        (&[2, 0, 4], 0, Layout::Nchw),
        (&[2, 3, 0], 3, Layout::Nchw),
        (&[2, 0, 3], 3, Layout::Nlc),
        (&[2, 4, 0], 0, Layout::Nlc),
    ];
    for (dims, c, layout) in cases {
        let x = Tensor::zeros(dims, DType::F64, &Device::Cpu)?;
        let p = Tensor::ones(c, DType::F64, &Device::Cpu)?;
        let what = format!("{dims:?} {layout:?}");
        assert!(ops::acon_a(&x, &p, layout).is_err(), "acon_a {what}");
        assert!(ops::acon_b(&x, &p, &p, layout).is_err(), "acon_b {what}");
        assert!(
            ops::meta_acon_c_layer(&x, &p, &p, layout).is_err(),
            "layer {what}"
        );
        assert!(
            ops::meta_acon_c_pixel(&x, &p, &p, layout).is_err(),
            "pixel {what}"
        );
    }
    // Modules with C = 0.
    let map = VarMap::new();
    let v = vb(&map, DType::F64);
    assert!(AconA::new(v.pp("a"), 0).is_err());
    assert!(AconB::new(v.pp("b"), 0).is_err());
    assert!(MetaAconCLayer::new(v.pp("l"), 0).is_err());
    assert!(MetaAconCPixel::new(v.pp("p"), 0).is_err());
    Ok(())
}

// ---------------------------------------------------------------------------
// Modules

/// Variable names, shapes and SPEC §2 inits; paper init = Swish; module = op; every
/// variable gets a gradient of its own shape.
#[test]
fn modules_vars_inits_and_grads() -> R {
    let (n, c, h, w) = (2, 5, 3, 3);
    let x = randn(&mut rng(700), n * c * h * w);
    let xt = t(&x, &[n, c, h, w]);
    let map = VarMap::new();
    let v = vb(&map, DType::F64);
    let a = AconA::new(v.pp("a"), c)?;
    let b = AconB::new(v.pp("b"), c)?;
    let b_ref = AconB::new_with(v.pp("b_ref"), c, AconInit::Reference)?;
    let l = MetaAconCLayer::new(v.pp("l"), c)?;
    let l_ref = MetaAconCLayer::new_with(v.pp("l_ref"), c, AconInit::Reference)?;
    let p = MetaAconCPixel::new(v.pp("p"), c)?;
    let p_ref = MetaAconCPixel::new_with(v.pp("p_ref"), c, AconInit::Reference)?;

    let get = |name: &str| -> Vec<f64> {
        let d = map.data().lock().unwrap();
        let t = d.get(name).unwrap_or_else(|| panic!("variable {name}"));
        assert_eq!(t.dims(), &[c], "{name}");
        host(t.as_tensor())
    };
    let ones = vec![1.0; c];
    let zeros = vec![0.0; c];
    assert_eq!(get("a.beta"), ones);
    assert_eq!(get("b.p"), zeros);
    assert_eq!(get("b.beta"), ones);
    assert_eq!(get("b_ref.beta"), ones);
    for m in ["l", "p"] {
        assert_eq!(get(&format!("{m}.p1")), ones);
        assert_eq!(get(&format!("{m}.p2")), zeros);
    }
    // Reference init: N(0, 1) draws (not the constants, and not all equal).
    for name in ["b_ref.p", "l_ref.p1", "l_ref.p2", "p_ref.p1", "p_ref.p2"] {
        let v = get(name);
        assert!(v.iter().all(|&a| a.is_finite() && a.abs() < 10.0), "{name}");
        assert!(v.windows(2).any(|q| q[0] != q[1]), "{name}: {v:?}");
    }

    // Paper init: ACON-A / ACON-B are Swish x·σ(x); the meta forms are x·σ(β·x)
    // with β = σ(Σ_c GAP(x)) (layer) or σ(x) (pixel). Direct formulas.
    let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
    let swish: Vec<f64> = x.iter().map(|&a| a * sig(a)).collect();
    let s = h * w;
    let layer_beta: Vec<f64> = (0..n)
        .map(|i| sig(x[i * c * s..(i + 1) * c * s].iter().sum::<f64>() / s as f64))
        .collect();
    let layer_y: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(k, &a)| a * sig(layer_beta[k / (c * s)] * a))
        .collect();
    let pixel_y: Vec<f64> = x.iter().map(|&a| a * sig(sig(a) * a)).collect();
    let near = |name: &str, got: &[f64], want: &[f64]| {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                abs_diff_eq!(g, w, epsilon = 1e-14 * (1.0 + w.abs())),
                "{name}[{i}]: {g} vs {w}"
            );
        }
    };
    near("AconA", &host(&a.forward(&xt)?), &swish);
    near("AconB", &host(&b.forward(&xt)?), &swish);
    near("MetaAconCLayer", &host(&l.forward(&xt)?), &layer_y);
    near("MetaAconCPixel", &host(&p.forward(&xt)?), &pixel_y);

    // Module = op (reference-init modules, so p's are generic).
    let (pp, pb) = b_ref.params();
    exact(
        "AconB = op",
        &host(&b_ref.forward(&xt)?),
        &host(&ops::acon_b(&xt, pp, pb, Layout::Nchw)?),
    );
    let (q1, q2) = l_ref.params();
    exact(
        "MetaAconCLayer = op",
        &host(&l_ref.forward(&xt)?),
        &host(&ops::meta_acon_c_layer(&xt, q1, q2, Layout::Nchw)?),
    );
    let (q1, q2) = p_ref.params();
    exact(
        "MetaAconCPixel = op",
        &host(&p_ref.forward(&xt)?),
        &host(&ops::meta_acon_c_pixel(&xt, q1, q2, Layout::Nchw)?),
    );
    exact(
        "AconA = op",
        &host(&a.forward(&xt)?),
        &host(&ops::acon_a(&xt, a.beta(), Layout::Nchw)?),
    );

    // One loss through all modules; every variable gets a gradient of its shape.
    let hh = a.forward(&xt)?;
    let hh = (b.forward(&hh)? + b_ref.forward(&hh)?)?;
    let hh = (l.forward(&hh)? + l_ref.forward(&hh)?)?;
    let hh = (p.forward(&hh)? + p_ref.forward(&hh)?)?;
    let (loss, _) = weighted_sum(&hh, 701)?;
    let grads = loss.backward()?;
    let data = map.data().lock().unwrap();
    assert_eq!(data.len(), 1 + 2 + 2 + 2 + 2 + 2 + 2);
    for (name, var) in data.iter() {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(g.dims(), var.dims(), "{name}");
        let gv = host(g);
        assert!(gv.iter().all(|v| v.is_finite()), "{name}");
        assert!(gv.iter().any(|&v| v != 0.0), "{name}: all-zero gradient");
    }
    Ok(())
}

/// `with_layout(Nlc)`: the modules read the channel axis last.
#[test]
fn modules_nlc_layout() -> R {
    let (n, l, c) = (2, 4, 3);
    let x = randn(&mut rng(800), n * l * c);
    let xt = t(&x, &[n, l, c]);
    let map = VarMap::new();
    let v = vb(&map, DType::F64);
    let b = AconB::new_with(v.pp("b"), c, AconInit::Reference)?.with_layout(Layout::Nlc);
    let (p, beta) = b.params();
    let shape = ActShape::nlc(n, l, c);
    let want = acon::acon_b_forward(&shape, &x, &host(p), Beta::PerChannel(&host(beta))).unwrap();
    exact("AconB NLC", &host(&b.forward(&xt)?), &want);
    let a = AconA::new(v.pp("a"), c)?.with_layout(Layout::Nlc);
    assert!(a.forward(&xt).is_ok());
    let m = MetaAconCLayer::new(v.pp("l"), c)?.with_layout(Layout::Nlc);
    assert!(m.forward(&xt).is_ok());
    let m = MetaAconCPixel::new(v.pp("p"), c)?.with_layout(Layout::Nlc);
    assert!(m.forward(&xt).is_ok());
    // NLC modules reject a channel count in the wrong position.
    let bad = t(&x, &[n, c, l]);
    assert!(AconA::new(v.pp("a2"), c)?
        .with_layout(Layout::Nlc)
        .forward(&bad)
        .is_err());
    Ok(())
}
