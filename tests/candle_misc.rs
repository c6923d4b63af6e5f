//! candle integration: dtypes (f64 works; f16/bf16/integers are errors, not panics),
//! bad shapes and parameters are errors, the modules' variables (names, shapes, inits)
//! and that every module variable receives a gradient of its own shape, AIEC's
//! counters / labels / stored losses.
#![cfg(feature = "candle")]

mod common;

use activation_kernels::candle::nn::{AconC, AconInit, Aiec, IieuB, IieuDc, MetaAconC};
use activation_kernels::candle::ops::{self, DcTensors, IieuOpts};
use activation_kernels::cpu::acon::{self, Beta};
use activation_kernels::cpu::aiec::AiecConfig;
use activation_kernels::{ActShape, Layout};
use approx::assert_abs_diff_eq;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{randn, rng};

type R = candle_core::Result<()>;

fn t(v: Vec<f64>, dims: &[usize]) -> Tensor {
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn vb(map: &VarMap, dt: DType) -> VarBuilder<'static> {
    VarBuilder::from_varmap(map, dt, &Device::Cpu)
}

fn err_text<T: std::fmt::Debug>(r: candle_core::Result<T>) -> String {
    format!("{}", r.expect_err("expected an error"))
}

#[test]
fn f64_acon_c_matches_cpu_f64() -> R {
    let (n, c, s) = (2, 3, 4);
    let x = randn(&mut rng(1), n * c * s);
    let (p1, p2, b) = (
        vec![1.1, 0.4, -0.3],
        vec![0.2, -0.5, 0.1],
        vec![0.9, 1.3, 0.7],
    );
    let xv = candle_core::Var::from_tensor(&t(x.clone(), &[n, c, s]))?;
    let y = ops::acon_c(
        &xv,
        &t(p1.clone(), &[c]),
        &t(p2.clone(), &[c]),
        &t(b.clone(), &[c]),
        Layout::Nchw,
    )?;
    assert_eq!(y.dtype(), DType::F64);
    let g = y.sum_all()?.backward()?;
    let shape = ActShape::nchw(n, c, s, 1);
    let want = acon::acon_c_forward(&shape, &x, &p1, &p2, Beta::PerChannel(&b)).unwrap();
    assert_eq!(y.flatten_all()?.to_vec1::<f64>()?, want);
    let dy = vec![1.0; n * c * s];
    let gr = acon::acon_c_backward(&shape, &dy, &x, &p1, &p2, Beta::PerChannel(&b)).unwrap();
    assert_eq!(g.get(&xv).unwrap().flatten_all()?.to_vec1::<f64>()?, gr.dx);
    Ok(())
}

#[test]
fn unsupported_dtypes_are_errors() -> R {
    for dt in [DType::F16, DType::BF16, DType::U32] {
        let x = Tensor::ones((2, 4, 3, 3), dt, &Device::Cpu)?;
        let p = Tensor::ones(4, dt, &Device::Cpu)?;
        assert!(err_text(ops::acon_c(&x, &p, &p, &p, Layout::Nchw)).contains("acon_c"));
        assert!(err_text(ops::tau(&x, 0.0)).contains("aiec_tau"));
        let w = Tensor::ones((4, 4, 3, 3), dt, &Device::Cpu)?;
        assert!(ops::iieu_b(&x, &x, &w, &p, &p, &p, IieuOpts::default()).is_err());
        let m = Aiec::new(vb(&VarMap::new(), DType::F32), 4, 3, AiecConfig::default())?;
        assert!(m.forward_train(&x, &[0, 1]).is_err());
    }
    // Mixed dtypes (f32 input, f64 parameters) are an error too.
    let x = Tensor::ones((2, 3, 4), DType::F32, &Device::Cpu)?;
    let p = Tensor::ones(3, DType::F64, &Device::Cpu)?;
    assert!(ops::acon_c(&x, &p, &p, &p, Layout::Nchw).is_err());
    Ok(())
}

#[test]
fn bad_shapes_are_errors() -> R {
    let x = t(vec![0.5; 2 * 3 * 4], &[2, 3, 4]);
    let p3 = t(vec![1.0; 3], &[3]);
    let p4 = t(vec![1.0; 4], &[4]);
    // ACON-C: parameter length ≠ C; rank-1 input; NLC needs rank 3.
    assert!(ops::acon_c(&x, &p4, &p4, &p4, Layout::Nchw).is_err());
    assert!(ops::acon_c(&x, &p3, &p3, &p4, Layout::Nchw).is_err());
    assert!(ops::acon_c(&t(vec![1.0; 3], &[3]), &p3, &p3, &p3, Layout::Nchw).is_err());
    assert!(ops::acon_c(&t(vec![1.0; 6], &[2, 3]), &p3, &p3, &p3, Layout::Nlc).is_err());
    // IIEU-B: x not the conv output size; channel/groups mismatch.
    let x_pre = t(vec![0.3; 2 * 3 * 5 * 5], &[2, 3, 5, 5]);
    let w = t(vec![0.1; 4 * 3 * 3 * 3], &[4, 3, 3, 3]);
    let x_ok = t(vec![0.2; 2 * 4 * 3 * 3], &[2, 4, 3, 3]);
    let x_bad = t(vec![0.2; 2 * 4 * 5 * 5], &[2, 4, 5, 5]);
    let o = IieuOpts::default();
    assert!(ops::iieu_b(&x_ok, &x_pre, &w, &p4, &p4, &p4, o).is_ok());
    assert!(ops::iieu_b(&x_bad, &x_pre, &w, &p4, &p4, &p4, o).is_err());
    assert!(ops::iieu_b(&x_ok, &x_pre, &w, &p3, &p4, &p4, o).is_err());
    let grouped = IieuOpts { groups: 2, ..o };
    assert!(ops::iieu_b(&x_ok, &x_pre, &w, &p4, &p4, &p4, grouped).is_err());
    // IIEU-DC: res dims differ from x dims; wrong parameter dims.
    let map = VarMap::new();
    let dc = IieuDc::new(vb(&map, DType::F64), 4, 2)?;
    let xx = t(vec![0.1; 2 * 4 * 3], &[2, 4, 3]);
    assert!(dc.forward(&xx, &xx).is_ok());
    assert!(dc
        .forward(&xx, &t(vec![0.1; 2 * 4 * 2], &[2, 4, 2]))
        .is_err());
    let mut bad: DcTensors = dc.params().clone();
    bad.eta2 = t(vec![0.01; 3], &[3]);
    assert!(ops::iieu_dc(&xx, &xx, &bad).is_err());
    // IIEU-DC with C < r; meta-ACON with r = 0.
    assert!(IieuDc::new(vb(&VarMap::new(), DType::F32), 4, 8).is_err());
    assert!(MetaAconC::new(vb(&VarMap::new(), DType::F32), 4, 0, true).is_err());
    assert!(AconC::new(vb(&VarMap::new(), DType::F32), 0).is_err());
    // TAU threshold must be >= 0; AIEC config validated at construction.
    assert!(ops::tau(&x, -1.0).is_err());
    let cfg = AiecConfig {
        lambda_gate: -1.0,
        ..Default::default()
    };
    assert!(Aiec::new(vb(&VarMap::new(), DType::F32), 3, 2, cfg).is_err());
    Ok(())
}

#[test]
fn aiec_labels_counters_and_stored_loss() -> R {
    let map = VarMap::new();
    let m = Aiec::new(vb(&map, DType::F32), 3, 2, AiecConfig::default())?;
    let f = Tensor::from_vec(
        randn(&mut rng(5), 4 * 3 * 2)
            .iter()
            .map(|&v| v as f32)
            .collect::<Vec<_>>(),
        (4, 3, 2),
        &Device::Cpu,
    )?;
    // Label out of range: error, counters untouched.
    assert!(err_text(m.forward_train(&f, &[0, 1, 2, 0])).contains("out of range"));
    assert!(m.counters()?.phi().iter().all(|&p| p == 0));
    // Wrong label count.
    assert!(m.forward_train(&f, &[0, 1]).is_err());
    // Training forward_t needs labels.
    assert!(m.forward_t(&f, true).is_err());
    m.set_labels(&[0, 1, 1, 0])?;
    let a = m.forward_t(&f, true)?;
    let loss = m.take_loss()?.expect("stored loss");
    assert!(m.take_loss()?.is_none());
    // φ counts exactly the correctly predicted samples.
    let phi: u64 = m.counters()?.phi().iter().sum();
    assert_eq!(phi as f64, (loss.dmu_accuracy()? * 4.0).round());
    // Inference is TAU only and equals the training output; it leaves the counters alone.
    let inf = m.forward(&f)?;
    let relu = f.relu()?;
    assert_eq!(
        a.flatten_all()?.to_vec1::<f32>()?,
        relu.flatten_all()?.to_vec1::<f32>()?
    );
    assert_eq!(
        inf.flatten_all()?.to_vec1::<f32>()?,
        relu.flatten_all()?.to_vec1::<f32>()?
    );
    assert_eq!(m.counters()?.phi().iter().sum::<u64>(), phi);
    // The total is λ_aux·aux + λ_gate·gate.
    let total = loss.total.to_scalar::<f32>()? as f64;
    let (aux, gate) = (loss.aux_mean()?, loss.gate_mean()?);
    assert_abs_diff_eq!(
        total,
        aux + 200.0 * gate,
        epsilon = 1e-5 * (1.0 + total.abs())
    );
    m.reset_counters()?;
    assert_eq!(m.counters()?.phi(), &[0, 0]);
    Ok(())
}

/// Every module: variable names, shapes and SPEC inits; forward = the op; after
/// `loss.backward()` every variable has a gradient of its own shape.
#[test]
fn modules_vars_inits_and_grads() -> R {
    let dev = Device::Cpu;
    let x4 = Tensor::from_vec(
        randn(&mut rng(9), 2 * 16 * 4 * 4)
            .iter()
            .map(|&v| v as f32)
            .collect::<Vec<_>>(),
        (2, 16, 4, 4),
        &dev,
    )?;
    let map = VarMap::new();
    let v = vb(&map, DType::F32);
    let acon = AconC::new(v.pp("acon"), 16)?;
    let acon_ref = AconC::new_with(v.pp("acon_ref"), 16, AconInit::Reference)?;
    let meta = MetaAconC::new(v.pp("meta"), 16, 4, true)?;
    let conv = candle_nn::conv2d(
        16,
        8,
        3,
        candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
        v.pp("conv"),
    )?;
    let iieu = IieuB::new(conv, v.pp("iieu"))?;
    let dc = IieuDc::new(v.pp("dc"), 16, 4)?;
    let aiec = Aiec::new(v.pp("aiec"), 8, 3, AiecConfig::default())?;

    let get = |name: &str| -> Vec<f32> {
        let d = map.data().lock().unwrap();
        d.get(name)
            .unwrap_or_else(|| panic!("variable {name}"))
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(get("acon.p1"), vec![1.0; 16]);
    assert_eq!(get("acon.p2"), vec![0.0; 16]);
    assert_eq!(get("acon.beta"), vec![1.0; 16]);
    assert_eq!(get("acon_ref.beta"), vec![1.0; 16]);
    assert!(get("acon_ref.p1").iter().any(|&p| p != 1.0));
    assert_eq!(get("iieu.ln_weight"), vec![0.01; 8]);
    assert_eq!(get("iieu.ln_bias"), vec![0.0; 8]);
    assert_eq!(get("iieu.eta"), vec![0.05; 8]);
    assert_eq!(get("dc.ln1.weight"), vec![1.0; 32]);
    assert_eq!(get("dc.ln2.weight"), vec![0.01; 32]);
    assert_eq!(get("dc.eta2"), vec![0.01; 4]);
    assert_eq!(get("dc.gamma2"), vec![0.01; 8]);
    // Uniform ±1/sqrt(fan_in) draws stay in bounds.
    assert!(get("dc.w1").iter().all(|&w| w.abs() <= 0.25));
    assert!(get("dc.w2").iter().all(|&w| w.abs() <= 0.5));
    assert_eq!(get("meta.fc1.weight").len(), 4 * 16); // width = max(r, C/r) = 4
    assert!(get("meta.fc1.weight").iter().all(|&w| w.abs() <= 0.25));
    assert!(get("aiec.wd").iter().all(|&w| w.abs() <= 1.0 / 8f32.sqrt()));

    // Forward: module = op.
    let (p1, p2, b) = acon.params();
    let y_op = ops::acon_c(&x4, p1, p2, b, Layout::Nchw)?;
    assert_eq!(
        acon.forward(&x4)?.flatten_all()?.to_vec1::<f32>()?,
        y_op.flatten_all()?.to_vec1::<f32>()?
    );

    // One loss through all modules; every variable gets a gradient of its shape.
    let h = acon.forward(&x4)?;
    let h = (acon_ref.forward(&h)? + meta.forward(&h)?)?;
    let h = dc.forward(&h, &x4)?;
    let h = iieu.forward(&h)?;
    let (a, aux) = aiec.forward_train(&h, &[0, 2])?;
    let loss = ((a.sqr()?.sum_all()? * 1e-2)? + aux.total)?;
    let grads = loss.backward()?;
    let data = map.data().lock().unwrap();
    assert_eq!(data.len(), 3 + 3 + 6 + 2 + 3 + 9 + 1);
    for (name, var) in data.iter() {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(g.dims(), var.dims(), "{name}");
        let gv = g.flatten_all()?.to_vec1::<f32>()?;
        assert!(gv.iter().all(|v| v.is_finite()), "{name}");
    }
    Ok(())
}
