//! Structs passed by value to kernels. They are declared once, in `kernels/abi.h`;
//! the Rust side is generated from that header by bindgen (`scripts/gen-abi.sh`)
//! into `abi_generated.rs`, which is checked in (default builds need no libclang)
//! and carries bindgen's compile-time layout assertions. CI regenerates it and
//! fails if the header and the checked-in mirror disagree.
//!
//! Field meanings are documented in `kernels/abi.h`.

use cudarc::driver::DeviceRepr;

#[path = "abi_generated.rs"]
mod generated;
pub use generated::*;

// SAFETY (all impls below): bindgen emitted these as #[repr(C)] plain-old-data
// structs with the header's exact layout (asserted at compile time in
// abi_generated.rs); any bit pattern is a valid value, so copying them into a
// kernel's parameter buffer is sound.
unsafe impl DeviceRepr for IieuGeom {}
unsafe impl DeviceRepr for ConvGeom {}
