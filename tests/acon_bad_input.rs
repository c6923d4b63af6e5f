//! Every bad-input path of the ACON ops returns the specific `Err` variant.
use activation_kernels::cpu::acon::*;
use activation_kernels::{ActShape, Error};

fn lm<T: std::fmt::Debug>(r: Result<T, Error>, want: &str) {
    match r {
        Err(Error::LengthMismatch { what, .. }) => {
            assert!(
                what.starts_with(want),
                "expected mismatch on {want}, got {what}"
            )
        }
        other => panic!("expected LengthMismatch({want}), got {other:?}"),
    }
}
fn empty<T: std::fmt::Debug>(r: Result<T, Error>) {
    assert!(matches!(r, Err(Error::Empty { .. })), "{r:?}");
}
fn shape_err<T: std::fmt::Debug>(r: Result<T, Error>) {
    assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
}

const N: usize = 2;
const C: usize = 3;
const S: usize = 4;

fn shapes() -> [ActShape; 2] {
    [ActShape::nchw(N, C, 2, 2), ActShape::nlc(N, S, C)]
}

#[test]
fn acon_c_length_mismatches() {
    for sh in shapes() {
        let x = vec![0.5f64; N * C * S];
        let p = vec![1.0f64; C];
        let bc = vec![1.0f64; C];
        let bad_x = vec![0.5f64; N * C * S - 1];
        let bad_p = vec![1.0f64; C + 1];
        let ok = Beta::PerChannel(&bc);
        lm(acon_c_forward(&sh, &bad_x, &p, &p, ok), "x");
        lm(acon_c_forward(&sh, &x, &bad_p, &p, ok), "p1");
        lm(acon_c_forward(&sh, &x, &p, &bad_p, ok), "p2");
        lm(acon_c_backward(&sh, &x, &bad_x, &p, &p, ok), "x");
        lm(acon_c_backward(&sh, &bad_x, &x, &p, &p, ok), "dy");
        lm(acon_c_backward(&sh, &x, &x, &bad_p, &p, ok), "p1");
        lm(acon_c_backward(&sh, &x, &x, &p, &bad_p, ok), "p2");
        // Each β variant with the wrong length (including another variant's length).
        let b_nc = vec![1.0f64; N * C];
        let b_n = vec![1.0f64; N];
        let b_cp = [1.0f64; C + 1];
        for (src, what) in [
            (Beta::PerChannel(&b_nc[..]), "beta (per channel"),
            (Beta::PerChannel(&b_cp[..]), "beta (per channel"),
            (Beta::PerSampleChannel(&bc[..]), "beta (per sample and"),
            (Beta::PerSampleChannel(&b_cp[..]), "beta (per sample and"),
            (Beta::PerSample(&bc[..]), "beta (per sample,"),
            (Beta::PerSample(&b_nc[..]), "beta (per sample,"),
        ] {
            lm(acon_c_forward(&sh, &x, &p, &p, src), what);
            lm(acon_c_backward(&sh, &x, &x, &p, &p, src), what);
            lm(acon_b_forward(&sh, &x, &p, src), what);
            lm(acon_b_backward(&sh, &x, &x, &p, src), what);
            lm(acon_a_forward(&sh, &x, src), what);
            lm(acon_a_backward(&sh, &x, &x, src), what);
        }
        // and the good lengths pass
        assert!(acon_c_forward(&sh, &x, &p, &p, Beta::PerSampleChannel(&b_nc)).is_ok());
        assert!(acon_c_backward(&sh, &x, &x, &p, &p, Beta::PerSample(&b_n)).is_ok());
    }
}

#[test]
fn acon_a_b_length_mismatches() {
    for sh in shapes() {
        let x = vec![0.5f32; N * C * S];
        let bad_x = vec![0.5f32; N * C * S + 1];
        let p = vec![0.0f32; C];
        let bad_p = vec![0.0f32; C - 1];
        let bc = vec![1.0f32; C];
        let ok = Beta::PerChannel(&bc);
        lm(acon_b_forward(&sh, &bad_x, &p, ok), "x");
        lm(acon_b_forward(&sh, &x, &bad_p, ok), "p");
        lm(acon_b_backward(&sh, &x, &bad_x, &p, ok), "x");
        lm(acon_b_backward(&sh, &bad_x, &x, &p, ok), "dy");
        lm(acon_b_backward(&sh, &x, &x, &bad_p, ok), "p");
        lm(acon_a_forward(&sh, &bad_x, ok), "x");
        lm(acon_a_backward(&sh, &x, &bad_x, ok), "x");
        lm(acon_a_backward(&sh, &bad_x, &x, ok), "dy");
    }
}

#[test]
fn zero_dims_are_empty() {
    for sh in [
        ActShape::nchw(0, C, 2, 2),
        ActShape::nchw(N, 0, 2, 2),
        ActShape::nchw(N, C, 0, 2),
        ActShape::nlc(0, S, C),
        ActShape::nlc(N, 0, C),
        ActShape::nlc(N, S, 0),
    ] {
        let x: Vec<f64> = vec![];
        let p = vec![1.0f64; sh.c];
        let b = vec![1.0f64; sh.c];
        let src = Beta::PerChannel(&b);
        empty(acon_c_forward(&sh, &x, &p, &p, src));
        empty(acon_c_backward(&sh, &x, &x, &p, &p, src));
        empty(acon_b_forward(&sh, &x, &p, src));
        empty(acon_b_backward(&sh, &x, &x, &p, src));
        empty(acon_a_forward(&sh, &x, Beta::PixelWise));
        empty(acon_a_backward(&sh, &x, &x, Beta::PixelWise));
        empty(layer_gen_forward(&sh, &x));
        let bn = vec![0.5f64; sh.n];
        empty(layer_gen_backward(&sh, &bn, &bn));
        let g = ChannelGen::<f64>::init(C, 2, true, 1).unwrap();
        let r = g.forward(&sh, &x);
        assert!(matches!(r, Err(Error::Empty { .. })), "{r:?}");
        let r = meta_acon_c_forward(&sh, &x, &p, &p, MetaGen::Layer);
        assert!(matches!(r, Err(Error::Empty { .. })), "{r:?}");
    }
    empty(AconCParams::<f32>::init_paper(0));
    empty(AconCParams::<f32>::init_reference(0, 1));
    empty(ChannelGen::<f32>::init(0, 16, true, 1));
    empty(ChannelGen::<f32>::width_for(0, 16));
}

#[test]
fn generator_bad_inputs() {
    let sh = ShapeSet::new();
    let x = vec![0.25f64; N * C * S];
    // r = 0
    assert!(matches!(
        ChannelGen::<f64>::init(C, 0, true, 1),
        Err(Error::InvalidParam { what: "r", .. })
    ));
    assert!(matches!(
        ChannelGen::<f64>::width_for(C, 0),
        Err(Error::InvalidParam { .. })
    ));
    let g = ChannelGen::<f64>::init(C, 2, true, 1).unwrap();
    // generator built for another C
    let g5 = ChannelGen::<f64>::init(5, 2, true, 1).unwrap();
    shape_err(g5.forward(&sh.a, &x));
    // wrong buffer lengths
    let mut b = g.clone();
    b.w1.pop();
    lm(b.forward(&sh.a, &x), "w1");
    let mut b = g.clone();
    b.w2.push(0.0);
    lm(b.forward(&sh.a, &x), "w2");
    let mut b = g.clone();
    b.b1 = Some(vec![0.0; g.width + 1]);
    lm(b.forward(&sh.a, &x), "b1");
    let mut b = g.clone();
    b.b2 = Some(vec![0.0; C - 1]);
    lm(b.forward(&sh.a, &x), "b2");
    let mut b = g.clone();
    b.width = 0;
    b.w1.clear();
    b.w2.clear();
    b.b1 = None;
    empty(b.forward(&sh.a, &x));
    // x length
    lm(g.forward(&sh.a, &x[1..]), "x");
    // backward: dbeta length, saved from another shape / width
    let (beta, saved) = g.forward(&sh.a, &x).unwrap();
    lm(g.backward(&sh.a, &beta[1..], &saved), "dbeta");
    shape_err(g.backward(&sh.t, &beta, &saved));
    let mut wider = ChannelGen::<f64>::init(C, 4, true, 1).unwrap();
    assert_ne!(wider.width, g.width);
    shape_err(wider.backward(&sh.a, &beta, &saved));
    wider.c = 5;
    shape_err(wider.backward(&sh.a, &beta, &saved));
    let mut bad = g.clone();
    bad.w2.pop();
    lm(bad.backward(&sh.a, &beta, &saved), "w2");
    empty(g.backward(&ActShape::nchw(N, C, 0, 2), &beta, &saved));
    // layer-wise generator
    lm(layer_gen_forward(&sh.a, &x[1..]), "x");
    let bn = vec![0.5f64; N];
    lm(layer_gen_backward(&sh.a, &bn[1..], &bn), "dbeta");
    lm(layer_gen_backward(&sh.a, &bn, &x), "beta");
}

struct ShapeSet {
    a: ActShape,
    t: ActShape,
}
impl ShapeSet {
    fn new() -> Self {
        Self {
            a: ActShape::nchw(N, C, 2, 2),
            t: ActShape::nlc(N, S, C),
        }
    }
}

#[test]
fn meta_bad_inputs() {
    let sh = ShapeSet::new();
    let x = vec![0.25f64; N * C * S];
    let p = vec![1.0f64; C];
    let g = ChannelGen::<f64>::init(C, 2, false, 1).unwrap();
    let (_, saved) = meta_acon_c_forward(&sh.a, &x, &p, &p, MetaGen::Channel(&g)).unwrap();
    let (_, saved_l) = meta_acon_c_forward(&sh.a, &x, &p, &p, MetaGen::Layer).unwrap();
    lm(
        meta_acon_c_forward(&sh.a, &x[1..], &p, &p, MetaGen::Pixel),
        "x",
    );
    lm(
        meta_acon_c_forward(&sh.a, &x, &p[1..], &p, MetaGen::Pixel),
        "p1",
    );
    lm(
        meta_acon_c_forward(&sh.a, &x, &p, &p[1..], MetaGen::Layer),
        "p2",
    );
    let g5 = ChannelGen::<f64>::init(5, 2, false, 1).unwrap();
    shape_err(meta_acon_c_forward(
        &sh.a,
        &x,
        &p,
        &p,
        MetaGen::Channel(&g5),
    ));
    let ch = MetaGen::Channel(&g);
    lm(
        meta_acon_c_backward(&sh.a, &x[1..], &x, &p, &p, ch, &saved),
        "dy",
    );
    lm(
        meta_acon_c_backward(&sh.a, &x, &x[1..], &p, &p, ch, &saved),
        "x",
    );
    lm(
        meta_acon_c_backward(&sh.a, &x, &x, &p[1..], &p, ch, &saved),
        "p1",
    );
    lm(
        meta_acon_c_backward(&sh.a, &x, &x, &p, &p[1..], ch, &saved),
        "p2",
    );
    // saved from another generator kind / shape
    shape_err(meta_acon_c_backward(&sh.a, &x, &x, &p, &p, ch, &saved_l));
    shape_err(meta_acon_c_backward(
        &sh.a,
        &x,
        &x,
        &p,
        &p,
        MetaGen::Layer,
        &saved,
    ));
    shape_err(meta_acon_c_backward(&sh.t, &x, &x, &p, &p, ch, &saved));
    // a generator with a different width than the one that made `saved`
    let g4 = ChannelGen::<f64>::init(C, 4, false, 1).unwrap();
    shape_err(meta_acon_c_backward(
        &sh.a,
        &x,
        &x,
        &p,
        &p,
        MetaGen::Channel(&g4),
        &saved,
    ));
    let mut gbad = g.clone();
    gbad.w1.pop();
    lm(
        meta_acon_c_backward(&sh.a, &x, &x, &p, &p, MetaGen::Channel(&gbad), &saved),
        "w1",
    );
    assert!(meta_acon_c_backward(&sh.a, &x, &x, &p, &p, ch, &saved).is_ok());
}

#[test]
fn shape_overflow_is_an_error() {
    let sh = ActShape::nchw(usize::MAX / 2, 4, 2, 2);
    let x = vec![0.0f64; 4];
    let p = vec![0.0f64; 4];
    let r = acon_c_forward(&sh, &x, &p, &p, Beta::PixelWise);
    assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
    let g = ChannelGen::<f64>::init(4, 2, true, 1).unwrap();
    let r = g.forward(&sh, &x);
    assert!(matches!(r, Err(Error::Shape { .. })), "{r:?}");
}

#[test]
fn acon_c_into_wrong_lengths_leave_outputs_untouched() {
    for sh in shapes() {
        let x = vec![0.5f64; N * C * S];
        let p = vec![1.0f64; C];
        let bc = vec![1.0f64; C];
        let ok = Beta::PerChannel(&bc);
        for len in [N * C * S - 1, N * C * S + 1] {
            let mut y = vec![7.0f64; len];
            lm(acon_c_forward_into(&sh, &x, &p, &p, ok, &mut y), "y");
            assert!(y.iter().all(|&v| v == 7.0));
        }
        let mut y = vec![7.0f64; N * C * S];
        lm(
            acon_c_forward_into(&sh, &x, &p, &p[..C - 1], ok, &mut y),
            "p2",
        );
        assert!(y.iter().all(|&v| v == 7.0));
        let mut g = AconCGrads {
            dx: vec![3.0; 2],
            ..Default::default()
        };
        lm(
            acon_c_backward_into(&sh, &x[1..], &x, &p, &p, ok, &mut g),
            "dy",
        );
        assert_eq!(g.dx, vec![3.0; 2]);
        assert!(g.dp1.is_empty() && g.dbeta.is_empty());
    }
}

/// The `_into` forms give the same bits as the allocating calls for every β source
/// and both layouts, also when the output buffers start with other lengths and NaNs.
#[test]
fn acon_c_into_matches_allocating_calls_bit_for_bit() {
    let bits = |v: &[f64]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
    for sh in [ActShape::nchw(3, 5, 7, 5), ActShape::nlc(3, 37, 5)] {
        let len = sh.n * sh.c * sh.s;
        let x: Vec<f64> = (0..len).map(|i| (i as f64 * 0.71).sin() * 3.0).collect();
        let dy: Vec<f64> = (0..len).map(|i| (i as f64 * 0.29).cos()).collect();
        let p1: Vec<f64> = (0..sh.c).map(|c| 1.0 + 0.1 * c as f64).collect();
        let p2: Vec<f64> = (0..sh.c).map(|c| 0.2 - 0.05 * c as f64).collect();
        let bc: Vec<f64> = (0..sh.c).map(|c| 0.5 + 0.3 * c as f64).collect();
        let bnc: Vec<f64> = (0..sh.n * sh.c).map(|i| 0.2 + 0.1 * i as f64).collect();
        let bn: Vec<f64> = (0..sh.n).map(|i| 1.5 - 0.4 * i as f64).collect();
        for beta in [
            Beta::PerChannel(&bc),
            Beta::PerSampleChannel(&bnc),
            Beta::PerSample(&bn),
            Beta::PixelWise,
        ] {
            let y = acon_c_forward(&sh, &x, &p1, &p2, beta).unwrap();
            let mut y2 = vec![f64::NAN; len];
            acon_c_forward_into(&sh, &x, &p1, &p2, beta, &mut y2).unwrap();
            assert_eq!(bits(&y), bits(&y2));
            let want = acon_c_backward(&sh, &dy, &x, &p1, &p2, beta).unwrap();
            let mut g = AconCGrads {
                dx: vec![f64::NAN; 3],
                dp1: vec![f64::NAN; 9],
                dp2: vec![],
                dbeta: vec![f64::NAN],
            };
            for _ in 0..2 {
                acon_c_backward_into(&sh, &dy, &x, &p1, &p2, beta, &mut g).unwrap();
                assert_eq!(bits(&g.dx), bits(&want.dx));
                assert_eq!(bits(&g.dp1), bits(&want.dp1));
                assert_eq!(bits(&g.dp2), bits(&want.dp2));
                assert_eq!(bits(&g.dbeta), bits(&want.dbeta));
            }
        }
    }
}
