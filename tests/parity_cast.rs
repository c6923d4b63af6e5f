//! `cuda::cast` (kernels/cast.cu) on the device against the host conversions of the
//! `half` crate: widening is exact and rounding to f16/bf16 gives the same bits as
//! `half::{f16, bf16}::from_f32` (round to nearest even) for every value class —
//! normals, ties, subnormals, overflow to ±inf, ±0, NaN — on a ragged length, under
//! four thread orders; a length mismatch or an empty source is an `Err` before any launch.
#![cfg(any(feature = "cuda", feature = "emulate"))]

mod common;

use activation_kernels::cuda::{cast, DType};
use activation_kernels::Error;
use common::device::gpu as open_gpu;

/// f32 values of every class, plus a ragged run of random ones.
fn values() -> Vec<f32> {
    let mut v = vec![
        0.0,
        -0.0,
        1.0,
        -1.5,
        65504.0,
        65520.0, // rounds to +inf in f16
        1e30,
        -1e30,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1e-6,              // f16 subnormal
        5.96e-8,           // smallest f16 subnormal region
        1.0009766,         // f16 tie region: 1 + 2^-10 + tiny
        1.0 + 1.0 / 256.0, // bf16 tie: rounds to even
        3.0e-39,           // f32 subnormal
        f32::MIN_POSITIVE,
    ];
    let mut s = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..1000 {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let e = ((s >> 40) % 60) as i32 - 30;
        let m = (s >> 11) as f32 / (1u64 << 53) as f32 - 0.5;
        v.push(m * 2f32.powi(e));
    }
    v
}

fn bits32(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn round_trip<T: DType>() {
    let Some(dev) = open_gpu() else { return };
    let s = dev.ctx.default_stream();
    let v = values();
    let want_t: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    let got = dev.check_schedules(|| {
        let src = s.clone_htod(&v).unwrap();
        let mut t = s.alloc_zeros::<T>(v.len()).unwrap();
        cast::from_f32_into(&s, &src, &mut t.slice_mut(..)).unwrap();
        let wide = cast::to_f32(&s, &t).unwrap();
        let narrow: Vec<T> = s.clone_dtoh(&t).unwrap();
        (
            narrow
                .iter()
                .map(|x| x.to_f32().to_bits())
                .collect::<Vec<u32>>(),
            bits32(&s.clone_dtoh(&wide).unwrap()),
        )
    });
    let want: Vec<u32> = want_t.iter().map(|x| x.to_f32().to_bits()).collect();
    // NaN payloads may differ; compare NaN-ness there.
    for (i, (&g, &w)) in got.0.iter().zip(&want).enumerate() {
        let (gf, wf) = (f32::from_bits(g), f32::from_bits(w));
        assert!(
            g == w || (gf.is_nan() && wf.is_nan()),
            "{} [{i}] {}: device {gf:e} vs host {wf:e}",
            T::NAME,
            v[i]
        );
    }
    // Widening is exact: the f32 buffer holds the T values.
    assert_eq!(got.0.len(), got.1.len());
    for (a, b) in got.0.iter().zip(&got.1) {
        assert!(a == b || (f32::from_bits(*a).is_nan() && f32::from_bits(*b).is_nan()));
    }
}

#[test]
fn f32_round_trip_is_a_copy() {
    round_trip::<f32>();
}

#[test]
fn f16_rounds_like_the_half_crate() {
    round_trip::<half::f16>();
}

#[test]
fn bf16_rounds_like_the_half_crate() {
    round_trip::<half::bf16>();
}

#[test]
fn length_mismatch_is_an_error() {
    let Some(dev) = open_gpu() else { return };
    let s = dev.ctx.default_stream();
    let src = s.clone_htod(&[1.0f32; 5]).unwrap();
    let mut dst = s.alloc_zeros::<half::f16>(4).unwrap();
    match cast::from_f32_into(&s, &src, &mut dst.slice_mut(..)) {
        Err(Error::LengthMismatch { what, .. }) => assert_eq!(what, "cast destination"),
        other => panic!("expected LengthMismatch, got {other:?}"),
    }
    // Empty: rounding into an empty view is a no-op, widening an empty view an error.
    let empty = s.alloc_zeros::<f32>(1).unwrap();
    let mut none = s.alloc_zeros::<half::bf16>(1).unwrap();
    cast::from_f32_into(&s, &empty.slice(0..0), &mut none.slice_mut(0..0)).unwrap();
    assert!(matches!(
        cast::to_f32(&s, &none.slice(0..0)),
        Err(Error::Empty {
            what: "cast source"
        })
    ));
}
