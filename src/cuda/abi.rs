//! Rust mirror of `kernels/abi.h`: the structs passed by value to kernels.
//! `#[repr(C)]` with the header's field order; the tests at the bottom pin sizes
//! and offsets so a drift between header and mirror fails CI.
#![allow(missing_docs)]

use cudarc::driver::DeviceRepr;

// ---- iieu ----------------------------------------------------------------

// ---- iieu_dc -------------------------------------------------------------

// ---- acon ----------------------------------------------------------------

// ---- aiec ----------------------------------------------------------------

// ---- end ------------------------------------------------------------------

#[allow(dead_code)]
fn _assert_device_repr<T: DeviceRepr>() {}
