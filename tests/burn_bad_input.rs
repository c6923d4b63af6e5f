//! Bad input to the burn ops and modules returns `activation_kernels::Error` (the CPU
//! op's own validation), never a panic: wrong shapes and lengths, empty tensors,
//! labels out of range, bad parameters, an unsupported dtype — on the plain and on the
//! autodiff device (whose error path builds no backward node).
#![cfg(feature = "burn")]

use std::sync::{Arc, Mutex};

use activation_kernels::burn::nn::{AconConfig, AiecModuleConfig, IieuDcConfig};
use activation_kernels::burn::ops::{self, BetaTensor, IieuOpts};
use activation_kernels::cpu::aiec::{AiecConfig, Counters};
use activation_kernels::{Error, Layout};
use burn::tensor::{DType, Device, Tensor, TensorCreationOptions, TensorData};

fn devices() -> [Device; 2] {
    [Device::flex(), Device::flex().autodiff()]
}

fn t<const D: usize>(dims: [usize; D], d: &Device) -> Tensor<D> {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    Tensor::from_data(TensorData::new(v, dims), d)
}

#[test]
fn acon_wrong_parameter_and_beta_lengths() {
    for d in devices() {
        let x = t([2, 3, 2, 2], &d);
        let e = ops::acon_c(
            x.clone(),
            t([4], &d),
            t([3], &d),
            BetaTensor::PerChannel(t([3], &d)),
            Layout::Nchw,
        );
        assert!(
            matches!(
                e,
                Err(Error::LengthMismatch {
                    what: "p1",
                    expected: 3,
                    got: 4
                })
            ),
            "{e:?}"
        );
        let e = ops::acon_c(
            x.clone(),
            t([3], &d),
            t([3], &d),
            BetaTensor::PerSample(t([3], &d)),
            Layout::Nchw,
        );
        assert!(matches!(e, Err(Error::Shape { what: "beta", .. })), "{e:?}");
        // Right element count, wrong layout: (C, N) for an (N, C) β.
        let e = ops::acon_b(
            x.clone(),
            t([3], &d),
            BetaTensor::PerSampleChannel(t([3, 2], &d)),
            Layout::Nchw,
        );
        assert!(matches!(e, Err(Error::Shape { what: "beta", .. })), "{e:?}");
        let e = ops::acon_a(t([3], &d), BetaTensor::PerChannel(t([3], &d)), Layout::Nchw);
        assert!(matches!(e, Err(Error::Shape { what: "x", .. })), "{e:?}");
    }
}

#[test]
fn empty_tensors_are_errors() {
    for d in devices() {
        let x = Tensor::<4>::from_data(TensorData::new(Vec::<f32>::new(), [0, 3, 2, 2]), &d);
        let e = ops::acon_c(
            x.clone(),
            t([3], &d),
            t([3], &d),
            BetaTensor::PerChannel(t([3], &d)),
            Layout::Nchw,
        );
        assert!(matches!(e, Err(Error::Empty { .. })), "{e:?}");
        let e = ops::tau(x.clone(), 0.0);
        assert!(matches!(e, Err(Error::Empty { what: "x" })), "{e:?}");
        let e = ops::layer_gen(x, Layout::Nchw);
        assert!(matches!(e, Err(Error::Empty { .. })), "{e:?}");
        assert!(matches!(
            AconConfig::new(0).init_acon_c(&d),
            Err(Error::Empty { .. })
        ));
    }
}

#[test]
fn aiec_labels_out_of_range_and_wrong_count() {
    for d in devices() {
        let cnt = Arc::new(Mutex::new(Counters::new(4, 3).expect("counters")));
        let cfg = AiecConfig::default();
        let e = ops::aiec_train(
            t([2, 3, 2, 2], &d),
            t([4, 3], &d),
            &[1, 4],
            cfg,
            &cnt,
            Layout::Nchw,
        );
        assert!(
            matches!(
                e,
                Err(Error::LabelOutOfRange {
                    sample: 1,
                    label: 4,
                    classes: 4
                })
            ),
            "{:?}",
            e.map(|o| o.stats)
        );
        let e = ops::aiec_train(
            t([2, 3, 2, 2], &d),
            t([4, 3], &d),
            &[1],
            cfg,
            &cnt,
            Layout::Nchw,
        );
        assert!(e.is_err(), "one label for two samples");
        // Nothing was counted by the failed steps.
        assert_eq!(
            *cnt.lock().expect("lock"),
            Counters::new(4, 3).expect("counters")
        );
        let e = ops::aiec_train(
            t([2, 3, 2, 2], &d),
            t([4, 2], &d),
            &[1, 2],
            cfg,
            &cnt,
            Layout::Nchw,
        );
        assert!(e.is_err(), "Wd with the wrong channel count");
        let e = ops::tau(t([2, 3], &d), -1.0);
        assert!(
            matches!(e, Err(Error::InvalidParam { what: "tau", .. })),
            "{e:?}"
        );
        assert!(AiecModuleConfig::new(3, 0).init(&d).is_err());
    }
}

#[test]
fn iieu_and_generator_shape_errors() {
    for d in devices() {
        // Weight with 4 input channels for an x_pre with 2.
        let e = ops::iieu_b(
            t([1, 3, 4, 4], &d),
            t([1, 2, 4, 4], &d),
            t([3, 4, 3, 3], &d),
            t([3], &d),
            t([3], &d),
            t([3], &d),
            IieuOpts {
                padding: (1, 1),
                ..Default::default()
            },
        );
        assert!(e.is_err(), "wrong weight shape");
        // x of the wrong spatial size for the geometry.
        let e = ops::iieu_b(
            t([1, 3, 2, 2], &d),
            t([1, 2, 4, 4], &d),
            t([3, 2, 3, 3], &d),
            t([3], &d),
            t([3], &d),
            t([3], &d),
            IieuOpts {
                padding: (1, 1),
                ..Default::default()
            },
        );
        assert!(
            matches!(e, Err(Error::LengthMismatch { what: "x", .. })),
            "{e:?}"
        );
        let e = ops::channel_gen(
            t([2, 3, 2, 2], &d),
            t([2, 3], &d),
            t([3, 4], &d),
            None,
            Layout::Nchw,
        );
        assert!(
            matches!(
                e,
                Err(Error::Shape {
                    what: "channel_gen",
                    ..
                })
            ),
            "{e:?}"
        );
        let dc = IieuDcConfig::new(4).with_r(8).init(&d);
        assert!(matches!(dc, Err(Error::InvalidParam { what: "r", .. })));
        let dc = IieuDcConfig::new(4).init(&d).expect("dc");
        let e = dc.forward(t([1, 4, 2, 2], &d), t([1, 4, 2, 3], &d));
        assert!(e.is_err(), "res of another shape");
    }
}

#[test]
fn unsupported_dtype_is_an_error() {
    for d in devices() {
        let o = TensorCreationOptions::new(d.clone()).with_dtype(DType::F16);
        if !d.supports_dtype(DType::F16) {
            continue;
        }
        let x = Tensor::<2>::from_data(TensorData::new(vec![0.5f32; 6], [2, 3]), o);
        let e = ops::tau(x, 0.0);
        assert!(
            matches!(e, Err(Error::InvalidParam { what: "dtype", .. })),
            "{e:?}"
        );
    }
}

/// IieuConv2d: a ψ / IIEU-B vector of the wrong length, a geometry with no output,
/// `x_pre` channels that do not match `W`, and a bad module config are errors.
#[test]
fn iieu_conv2d_bad_vectors_geometry_and_config() {
    use activation_kernels::burn::nn::{IieuConv2dConfig, IieuConvPsiKind};
    for d in devices() {
        let call = |xp: [usize; 4], w: [usize; 4], bias: usize, eta: usize, pad: usize| {
            ops::iieu_conv2d(
                t(xp, &d),
                t(w, &d),
                ops::ConvPsi::Bias(t([bias], &d)),
                t([w[0]], &d),
                t([w[0]], &d),
                t([eta], &d),
                IieuOpts {
                    padding: (pad, pad),
                    ..Default::default()
                },
            )
        };
        assert!(call([2, 4, 5, 5], [3, 4, 3, 3], 3, 3, 1).is_ok());
        let e = call([2, 4, 5, 5], [3, 4, 3, 3], 2, 3, 1);
        assert!(
            matches!(
                &e,
                Err(Error::Shape {
                    what: "psi bias",
                    ..
                })
            ),
            "{e:?}"
        );
        let e = call([2, 4, 5, 5], [3, 4, 3, 3], 3, 4, 1);
        assert!(matches!(&e, Err(Error::Shape { what: "eta", .. })), "{e:?}");
        // A 3×3 filter on a 2×2 input without padding: no output position.
        let e = call([2, 4, 2, 2], [3, 4, 3, 3], 3, 3, 0);
        assert!(e.is_err(), "{e:?}");
        // x_pre has 5 channels, W expects 4 (groups 1).
        let e = call([2, 5, 5, 5], [3, 4, 3, 3], 3, 3, 1);
        assert!(e.is_err(), "{e:?}");
        // Module configs.
        assert!(IieuConv2dConfig::new(4, 6, (3, 3))
            .with_groups(4)
            .init(&d)
            .is_err());
        assert!(IieuConv2dConfig::new(0, 6, (3, 3)).init(&d).is_err());
        assert!(IieuConv2dConfig::new(4, 6, (3, 3))
            .with_psi(IieuConvPsiKind::BatchNorm)
            .with_bn_eps(0.0)
            .init(&d)
            .is_err());
    }
}

/// AIEC labels as a tensor: a negative label, a label ≥ K and a wrong count are errors.
#[test]
fn aiec_label_tensor_out_of_range_or_wrong_length() {
    use burn::tensor::Int;
    for d in devices() {
        let counters = Arc::new(Mutex::new(Counters::new(4, 3).unwrap()));
        let run = |labels: Vec<i64>| {
            let n = labels.len();
            let lab = Tensor::<1, Int>::from_data(TensorData::new(labels, [n]), &d);
            ops::aiec_train_labels(
                t([2, 3, 2, 2], &d),
                t([4, 3], &d),
                lab,
                AiecConfig::default(),
                &counters,
                Layout::Nchw,
            )
        };
        assert!(run(vec![1, 3]).is_ok());
        let e = run(vec![1, -2]);
        assert!(
            matches!(&e, Err(Error::InvalidParam { what: "labels", .. })),
            "{e:?}"
        );
        let e = run(vec![1, 4]);
        assert!(matches!(&e, Err(Error::LabelOutOfRange { .. })), "{e:?}");
        let e = run(vec![1, 2, 3]);
        assert!(
            matches!(&e, Err(Error::LengthMismatch { what: "labels", .. })),
            "{e:?}"
        );
    }
}
