//! Rust mirror of `kernels/abi.h`: the structs passed by value to kernels.
//! `#[repr(C)]` with the header's field order; the tests at the bottom pin sizes
//! and offsets so a drift between header and mirror fails CI.
#![allow(missing_docs)]

use cudarc::driver::DeviceRepr;

// ---- iieu ----------------------------------------------------------------

/// Geometry and patch-norm mode of one IIEU-B, passed by value to every kernel of
/// `kernels/iieu.cu` (mirror of `IieuGeom` in `kernels/abi.h`). Built from a
/// validated [`crate::cpu::iieu::IieuConfig`] by `src/cuda/iieu.rs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IieuGeom {
    pub n: i32,
    pub c: i32,
    pub h: i32,
    pub w: i32,
    pub o: i32,
    pub oh: i32,
    pub ow: i32,
    pub kh: i32,
    pub kw: i32,
    pub sh: i32,
    pub sw: i32,
    pub ph: i32,
    pub pw: i32,
    /// Dilation of the patch-norm window (1 for `AllChannels`).
    pub dh: i32,
    pub dw: i32,
    /// Patch-norm planes per sample G'.
    pub gp: i32,
    /// C/G'.
    pub c_per: i32,
    /// O/G'.
    pub o_per: i32,
    /// C/g·KH·KW.
    pub w_per: i32,
    /// 0 = `PerGroup`, 1 = `AllChannels`.
    pub mode: i32,
}
// SAFETY: #[repr(C)], plain i32 fields with no padding, identical to the C struct
// `IieuGeom` in kernels/abi.h (pinned by the compile-time layout assertions below); valid for any bits.
unsafe impl DeviceRepr for IieuGeom {}

// Layout of IieuGeom pinned against kernels/abi.h, checked at compile time (a drift
// fails the build, not only the tests).
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<IieuGeom>() == 80);
    assert!(align_of::<IieuGeom>() == 4);
    assert!(offset_of!(IieuGeom, n) == 0);
    assert!(offset_of!(IieuGeom, o) == 16);
    assert!(offset_of!(IieuGeom, kh) == 28);
    assert!(offset_of!(IieuGeom, dh) == 52);
    assert!(offset_of!(IieuGeom, gp) == 60);
    assert!(offset_of!(IieuGeom, w_per) == 72);
    assert!(offset_of!(IieuGeom, mode) == 76);
};
