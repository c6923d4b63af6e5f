//! β as a tensor in the candle ACON ops (issue 18 item 7): `ops::acon_a`, `acon_b` and
//! `acon_c` take β per channel `(C,)`, per (sample, channel) `(N, C)` / `(N, C, 1, 1)`
//! / `(N, 1, C)`, or per sample `(N, 1)` (`candle::BetaShape`), and pass β its
//! gradient, so a generator built from candle's own layers composes with the op.
//!
//! * Reference: for every op, layout and β layout, the forward and candle's gradients
//!   (`loss = Σ w·y`) equal the CPU op called directly with the matching
//!   `cpu::acon::Beta` — **exactly**, for the reasons given in tests/candle_acon.rs
//!   (the pack is built with `cat`/`flatten_all`, whose backward is a `narrow` and a
//!   reshape: exact).
//! * The authors' meta-ACON-C generator (`MetaAconC` in the ACON code: GAP → 1×1
//!   conv → BN → 1×1 conv → BN → σ; on a `(N, C, 1, 1)` GAP a 1×1 conv is a linear
//!   layer) built from `candle_nn::Linear` and `candle_nn::BatchNorm` in training mode
//!   (batch statistics), its β fed to `ops::acon_c`: the composed forward equals a
//!   direct f64 evaluation of the formula (tolerance 1e-12 relative: two f64
//!   evaluations of the same formula in different operation orders), and every
//!   gradient — x, p1, p2 and all eight generator tensors — equals central finite
//!   differences through candle (`check_grad`: atol 1e-8, rtol 1e-6, h = 1e-5).
//! * Bad β dims (`(N,)` when N ≠ C, `(N, C+1)`, wrong N, rank 0) are a candle `Err`.
#![cfg(feature = "candle")]

mod common;

use activation_kernels::candle::ops;
use activation_kernels::candle::BetaShape;
use activation_kernels::cpu::acon::{self, Beta};
use activation_kernels::{ActShape, Layout};
use candle_core::{Device, Module, Tensor, Var};
use common::{check_grad, numeric_grad, randn, rng, uniform};

type R = candle_core::Result<()>;
type Res<T> = candle_core::Result<T>;

fn var(v: &[f64], dims: &[usize]) -> Res<Var> {
    Var::from_vec(v.to_vec(), dims, &Device::Cpu)
}

fn t(v: &[f64], dims: &[usize]) -> Res<Tensor> {
    Tensor::from_vec(v.to_vec(), dims, &Device::Cpu)
}

fn host(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
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

/// The β layouts tried for an activation of `n` samples and `c` channels: dims, the
/// layout they must be read as, and the CPU β over flat values.
fn beta_cases(layout: Layout, n: usize, c: usize) -> Vec<(Vec<usize>, BetaShape)> {
    let per_sc = match layout {
        Layout::Nchw => vec![n, c, 1, 1],
        Layout::Nlc => vec![n, 1, c],
    };
    vec![
        (vec![c], BetaShape::PerChannel),
        (vec![n, c], BetaShape::PerSampleChannel),
        (per_sc, BetaShape::PerSampleChannel),
        (vec![n, 1], BetaShape::PerSample),
    ]
}

fn cpu_beta(kind: BetaShape, v: &[f64]) -> Beta<'_, f64> {
    match kind {
        BetaShape::PerChannel => Beta::PerChannel(v),
        BetaShape::PerSampleChannel => Beta::PerSampleChannel(v),
        BetaShape::PerSample => Beta::PerSample(v),
    }
}

fn x_dims(layout: Layout, n: usize, c: usize, s: usize) -> (Vec<usize>, ActShape) {
    match layout {
        Layout::Nchw => (vec![n, c, s], ActShape::nchw(n, c, s, 1)),
        Layout::Nlc => (vec![n, s, c], ActShape::nlc(n, s, c)),
    }
}

#[test]
fn every_beta_layout_matches_the_cpu_ops_exactly() -> R {
    let (n, c, s) = (3, 4, 5);
    for (li, layout) in [Layout::Nchw, Layout::Nlc].into_iter().enumerate() {
        let (dims, shape) = x_dims(layout, n, c, s);
        for (bi, (bdims, kind)) in beta_cases(layout, n, c).into_iter().enumerate() {
            assert_eq!(BetaShape::of("test", &bdims, &shape)?, kind, "{bdims:?}");
            let seed = 1000 + 10 * li as u64 + bi as u64;
            let mut r = rng(seed);
            let x = randn(&mut r, n * c * s);
            let beta = uniform(&mut r, kind.len(&shape), 0.5, 2.0);
            let p1 = uniform(&mut r, c, 0.5, 1.5);
            let p2 = uniform(&mut r, c, -0.5, 0.5);
            let w = randn(&mut r, n * c * s);
            let wt = t(&w, &dims)?;
            let cb = cpu_beta(kind, &beta);

            // ACON-C
            let (xv, p1v, p2v, bv) = (
                var(&x, &dims)?,
                var(&p1, &[c])?,
                var(&p2, &[c])?,
                var(&beta, &bdims)?,
            );
            let y = ops::acon_c(&xv, &p1v, &p2v, &bv, layout)?;
            let g = (&y * &wt)?.sum_all()?.backward()?;
            exact(
                "acon_c y",
                &host(&y),
                &acon::acon_c_forward(&shape, &x, &p1, &p2, cb).unwrap(),
            );
            let gr = acon::acon_c_backward(&shape, &w, &x, &p1, &p2, cb).unwrap();
            exact("acon_c dx", &grad(&g, &xv), &gr.dx);
            exact("acon_c dp1", &grad(&g, &p1v), &gr.dp1);
            exact("acon_c dp2", &grad(&g, &p2v), &gr.dp2);
            exact("acon_c dbeta", &grad(&g, &bv), &gr.dbeta);

            // ACON-B (p = p2)
            let y = ops::acon_b(&xv, &p2v, &bv, layout)?;
            let g = (&y * &wt)?.sum_all()?.backward()?;
            exact(
                "acon_b y",
                &host(&y),
                &acon::acon_b_forward(&shape, &x, &p2, cb).unwrap(),
            );
            let gr = acon::acon_b_backward(&shape, &w, &x, &p2, cb).unwrap();
            exact("acon_b dx", &grad(&g, &xv), &gr.dx);
            exact("acon_b dp", &grad(&g, &p2v), &gr.dp);
            exact("acon_b dbeta", &grad(&g, &bv), &gr.dbeta);

            // ACON-A
            let y = ops::acon_a(&xv, &bv, layout)?;
            let g = (&y * &wt)?.sum_all()?.backward()?;
            exact(
                "acon_a y",
                &host(&y),
                &acon::acon_a_forward(&shape, &x, cb).unwrap(),
            );
            let gr = acon::acon_a_backward(&shape, &w, &x, cb).unwrap();
            exact("acon_a dx", &grad(&g, &xv), &gr.dx);
            exact("acon_a dbeta", &grad(&g, &bv), &gr.dbeta);
        }
    }
    Ok(())
}

#[test]
fn a_per_sample_beta_gradient_agrees_with_finite_differences() -> R {
    // Independent of the CPU backward: central differences of the candle forward.
    let (n, c, s) = (2, 3, 4);
    let (dims, _) = x_dims(Layout::Nchw, n, c, s);
    let mut r = rng(77);
    let x = randn(&mut r, n * c * s);
    let (p1, p2) = (uniform(&mut r, c, 0.5, 1.5), uniform(&mut r, c, -0.5, 0.5));
    let w = randn(&mut r, n * c * s);
    for bdims in [vec![n, 1], vec![n, c]] {
        let beta = uniform(&mut r, bdims.iter().product(), 0.5, 2.0);
        let loss = |b: &[f64]| -> f64 {
            let y = ops::acon_c(
                &t(&x, &dims).unwrap(),
                &t(&p1, &[c]).unwrap(),
                &t(&p2, &[c]).unwrap(),
                &t(b, &bdims).unwrap(),
                Layout::Nchw,
            )
            .unwrap();
            host(&y).iter().zip(&w).map(|(a, b)| a * b).sum()
        };
        let bv = var(&beta, &bdims)?;
        let y = ops::acon_c(
            &t(&x, &dims)?,
            &t(&p1, &[c])?,
            &t(&p2, &[c])?,
            &bv,
            Layout::Nchw,
        )?;
        let g = (&y * t(&w, &dims)?)?.sum_all()?.backward()?;
        check_grad("dbeta", &grad(&g, &bv), &numeric_grad(&beta, loss));
    }
    Ok(())
}

#[test]
fn bad_beta_dims_are_errors() -> R {
    let (n, c, s) = (2, 3, 4);
    let x = t(&vec![0.5; n * c * s], &[n, c, s])?;
    let p = t(&[1.0; 3], &[c])?;
    for bdims in [
        vec![n],
        vec![n, c + 1],
        vec![n + 1, c],
        vec![n, 2, 1],
        vec![],
    ] {
        let b = Tensor::ones(bdims.as_slice(), candle_core::DType::F64, &Device::Cpu)?;
        let e = ops::acon_c(&x, &p, &p, &b, Layout::Nchw).expect_err("bad beta dims");
        assert!(e.to_string().contains("beta has dims"), "{bdims:?}: {e}");
        assert!(
            ops::acon_a(&x, &b, Layout::Nchw).is_err(),
            "acon_a {bdims:?}"
        );
        assert!(
            ops::acon_b(&x, &p, &b, Layout::Nchw).is_err(),
            "acon_b {bdims:?}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The authors' meta-ACON-C generator from candle layers

/// Sizes of the generator test: N samples, C channels, H·W positions, hidden width.
const N: usize = 4;
const C: usize = 3;
const HW: usize = 6;
const HID: usize = 2;
const BN_EPS: f64 = 1e-5;

/// Every learnable tensor, flat, in a fixed order.
#[derive(Clone)]
struct Params {
    x: Vec<f64>,
    p1: Vec<f64>,
    p2: Vec<f64>,
    w1: Vec<f64>, // (HID, C)
    b1: Vec<f64>,
    g1: Vec<f64>,
    s1: Vec<f64>,
    w2: Vec<f64>, // (C, HID)
    b2: Vec<f64>,
    g2: Vec<f64>,
    s2: Vec<f64>,
}

impl Params {
    fn random(seed: u64) -> Self {
        let mut r = rng(seed);
        Params {
            x: randn(&mut r, N * C * HW),
            p1: uniform(&mut r, C, 0.5, 1.5),
            p2: uniform(&mut r, C, -0.5, 0.5),
            w1: uniform(&mut r, HID * C, -1.0, 1.0),
            b1: uniform(&mut r, HID, -0.5, 0.5),
            g1: uniform(&mut r, HID, 0.5, 1.5),
            s1: uniform(&mut r, HID, -0.5, 0.5),
            w2: uniform(&mut r, C * HID, -1.0, 1.0),
            b2: uniform(&mut r, C, -0.5, 0.5),
            g2: uniform(&mut r, C, 0.5, 1.5),
            s2: uniform(&mut r, C, -0.5, 0.5),
        }
    }

    fn fields(&mut self) -> [(&'static str, &mut Vec<f64>); 11] {
        [
            ("x", &mut self.x),
            ("p1", &mut self.p1),
            ("p2", &mut self.p2),
            ("fc1.weight", &mut self.w1),
            ("fc1.bias", &mut self.b1),
            ("bn1.weight", &mut self.g1),
            ("bn1.bias", &mut self.s1),
            ("fc2.weight", &mut self.w2),
            ("fc2.bias", &mut self.b2),
            ("bn2.weight", &mut self.g2),
            ("bn2.bias", &mut self.s2),
        ]
    }
}

/// `fc → BN(train)` on `(N, k)`: candle_nn's Linear and BatchNorm.
fn fc_bn(h: &Tensor, w: &Tensor, b: &Tensor, g: &Tensor, s: &Tensor) -> Res<Tensor> {
    let k = w.dim(0)?;
    let z = candle_nn::Linear::new(w.clone(), Some(b.clone())).forward(h)?;
    let zeros = Tensor::zeros(k, candle_core::DType::F64, &Device::Cpu)?;
    let ones = Tensor::ones(k, candle_core::DType::F64, &Device::Cpu)?;
    let bn = candle_nn::BatchNorm::new(k, zeros, ones, g.clone(), s.clone(), BN_EPS)?;
    bn.forward_train(&z)
}

/// The composed forward: β = σ(BN₂(fc₂(BN₁(fc₁(GAP(x)))))) as `(N, C, 1, 1)`, then
/// `ops::acon_c(x, p1, p2, β)`. Tensors are taken as given (Vars or constants).
#[allow(clippy::too_many_arguments)]
fn composed(ts: &[Tensor; 11]) -> Res<Tensor> {
    let [x, p1, p2, w1, b1, g1, s1, w2, b2, g2, s2] = ts;
    let gap = x.mean(2)?; // (N, C)
    let h = fc_bn(&gap, w1, b1, g1, s1)?;
    let z = fc_bn(&h, w2, b2, g2, s2)?;
    let beta = candle_nn::ops::sigmoid(&z)?.reshape((N, C, 1, 1))?;
    ops::acon_c(x, p1, p2, &beta, Layout::Nchw)
}

fn tensors(p: &Params) -> Res<[Tensor; 11]> {
    Ok([
        t(&p.x, &[N, C, HW])?,
        t(&p.p1, &[C])?,
        t(&p.p2, &[C])?,
        t(&p.w1, &[HID, C])?,
        t(&p.b1, &[HID])?,
        t(&p.g1, &[HID])?,
        t(&p.s1, &[HID])?,
        t(&p.w2, &[C, HID])?,
        t(&p.b2, &[C])?,
        t(&p.g2, &[C])?,
        t(&p.s2, &[C])?,
    ])
}

/// The same formula evaluated directly in f64, no candle.
fn direct(p: &Params) -> Vec<f64> {
    let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
    let gap: Vec<f64> = (0..N * C)
        .map(|i| p.x[i * HW..(i + 1) * HW].iter().sum::<f64>() / HW as f64)
        .collect();
    let fc_bn = |h: &[f64], kin: usize, kout: usize, w: &[f64], b: &[f64], g: &[f64], s: &[f64]| {
        let mut z = vec![0.0; N * kout];
        for n in 0..N {
            for o in 0..kout {
                z[n * kout + o] = b[o]
                    + (0..kin)
                        .map(|i| w[o * kin + i] * h[n * kin + i])
                        .sum::<f64>();
            }
        }
        for o in 0..kout {
            let mean = (0..N).map(|n| z[n * kout + o]).sum::<f64>() / N as f64;
            let var = (0..N)
                .map(|n| (z[n * kout + o] - mean).powi(2))
                .sum::<f64>()
                / N as f64;
            for n in 0..N {
                let v = &mut z[n * kout + o];
                *v = (*v - mean) / (var + BN_EPS).sqrt() * g[o] + s[o];
            }
        }
        z
    };
    let h = fc_bn(&gap, C, HID, &p.w1, &p.b1, &p.g1, &p.s1);
    let z = fc_bn(&h, HID, C, &p.w2, &p.b2, &p.g2, &p.s2);
    let mut y = vec![0.0; N * C * HW];
    for n in 0..N {
        for c in 0..C {
            let beta = sig(z[n * C + c]);
            for k in 0..HW {
                let i = (n * C + c) * HW + k;
                let d = (p.p1[c] - p.p2[c]) * p.x[i];
                y[i] = d * sig(beta * d) + p.p2[c] * p.x[i];
            }
        }
    }
    y
}

#[test]
fn authors_generator_from_candle_layers_composes_with_acon_c() -> R {
    let p = Params::random(4242);
    // Forward: composed op == direct formula.
    let y = host(&composed(&tensors(&p)?)?);
    let want = direct(&p);
    for (i, (a, b)) in y.iter().zip(&want).enumerate() {
        assert!(
            (a - b).abs() <= 1e-12 * b.abs().max(1.0),
            "y[{i}]: composed {a} vs direct {b}"
        );
    }

    // Backward: candle's autograd through generator + op vs finite differences.
    let w = randn(&mut rng(4343), N * C * HW);
    let loss_of = |q: &Params| -> f64 {
        let y = host(&composed(&tensors(q).unwrap()).unwrap());
        y.iter().zip(&w).map(|(a, b)| a * b).sum()
    };
    let ts = tensors(&p)?;
    let vars: Vec<Var> = ts.iter().map(Var::from_tensor).collect::<Res<_>>()?;
    let vt: [Tensor; 11] = std::array::from_fn(|i| vars[i].as_tensor().clone());
    let y = composed(&vt)?;
    let g = (&y * t(&w, &[N, C, HW])?)?.sum_all()?.backward()?;
    let names: Vec<&str> = p.clone().fields().iter().map(|(n, _)| *n).collect();
    for (k, name) in names.iter().enumerate() {
        let analytic = grad(&g, &vars[k]);
        let v0 = p.clone().fields()[k].1.clone();
        let numeric = numeric_grad(&v0, |v| {
            let mut q = p.clone();
            *q.fields()[k].1 = v.to_vec();
            loss_of(&q)
        });
        check_grad(name, &analytic, &numeric);
        // Not vacuous: every tensor moves the loss except fc1.bias, bn1.bias and
        // fc2.bias, per-channel constants over the batch that the next BatchNorm in
        // training mode subtracts exactly (their gradients are 0 both ways).
        if !["fc1.bias", "bn1.bias", "fc2.bias"].contains(name) {
            assert!(
                analytic.iter().any(|v| v.abs() > 1e-6),
                "{name}: all-zero gradient"
            );
        }
    }
    Ok(())
}
