//! Bad-input paths of the shared shape and geometry validation.
use activation_kernels::{ActShape, Conv2dGeometry, Error};

#[test]
fn geometry_rejects_impossible_shapes() {
    let g = Conv2dGeometry::new(2, 4, 5, 5, 8, 3, 3);
    assert_eq!(g.validate(), Ok((3, 3)));
    assert!(matches!(
        g.with_stride(0, 1).validate(),
        Err(Error::Geometry(_))
    ));
    assert!(matches!(
        g.with_dilation(1, 0).validate(),
        Err(Error::Geometry(_))
    ));
    assert!(matches!(
        g.with_groups(3).validate(),
        Err(Error::Geometry(_))
    ));
    assert!(matches!(
        g.with_groups(0).validate(),
        Err(Error::Geometry(_))
    ));
    // 5 + 0 < dilated extent 2·(3−1)+1 = 5 is fine; dilation 3 gives extent 7 > 5.
    assert!(matches!(
        g.with_dilation(3, 1).validate(),
        Err(Error::Geometry(_))
    ));
    assert_eq!(
        g.with_dilation(3, 1).with_padding(1, 0).validate(),
        Ok((1, 3))
    );
    let mut z = g;
    z.h = 0;
    assert!(matches!(z.validate(), Err(Error::Empty { .. })));
    let mut z = g;
    z.kw = 0;
    assert!(matches!(z.validate(), Err(Error::Empty { .. })));
    let huge = Conv2dGeometry::new(usize::MAX / 2, 4, 5, 5, 8, 3, 3);
    assert!(matches!(huge.validate(), Err(Error::Geometry(_))));
}

#[test]
fn geometry_output_size_matches_pytorch_formula() {
    // out = floor((in + 2p − d(k−1) − 1)/s) + 1
    let g = Conv2dGeometry::new(1, 2, 7, 8, 2, 3, 2)
        .with_stride(2, 3)
        .with_padding(1, 2)
        .with_dilation(2, 1);
    // h: (7 + 2 − 4 − 1)/2 + 1 = 3; w: (8 + 4 − 1 − 1)/3 + 1 = 4
    assert_eq!(g.validate(), Ok((3, 4)));
}

#[test]
fn act_shape_validation() {
    let s = ActShape::nchw(2, 3, 4, 5);
    assert!(s.validate("x", 120).is_ok());
    assert_eq!(
        s.validate("x", 119),
        Err(Error::LengthMismatch {
            what: "x",
            expected: 120,
            got: 119
        })
    );
    assert!(matches!(
        ActShape::nlc(0, 3, 4).validate("x", 0),
        Err(Error::Empty { .. })
    ));
    assert!(matches!(
        ActShape::nlc(usize::MAX, 3, 4).validate("x", 0),
        Err(Error::Shape { .. })
    ));
    let t = ActShape::nlc(2, 3, 4);
    assert_eq!(t.idx(1, 2, 1), (3 + 1) * 4 + 2);
    assert_eq!(s.idx(1, 2, 3), (3 + 2) * 20 + 3);
}
