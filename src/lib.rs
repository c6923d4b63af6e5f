//! # activation-kernels
//!
//! Fused implementations of three families of neural activations, forward and
//! backward, with gradients for every input and parameter:
//!
//! * **IIEU** — Instantaneous Importance Estimation Units ([`cpu::iieu`]) and the
//!   IIEU Dynamic Coupler ([`cpu::iieu_dc`]);
//! * **ACON** — ACON-A/B/C and the meta-ACON β generators ([`cpu::acon`]);
//! * **AIEC** — TAU, DMU, per-class counters and the consensus gate loss ([`cpu::aiec`]).
//!
//! The math contract is `SPEC.md` (shared with the project); every function's
//! rustdoc states its formula and gradient. The CPU backend ([`cpu`]) is generic over
//! `f32` and `f64` ([`Real`]) and is both the reference for GPU parity and the
//! default backend.
#![deny(missing_docs)]
// docs.rs (Cargo.toml `[package.metadata.docs.rs]`) passes `--cfg docsrs`: label the items
// that need a crate feature ("Available on crate feature … only").
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "burn")]
pub mod burn;
#[cfg(feature = "candle")]
pub mod candle;
pub mod cpu;
#[cfg(any(feature = "cuda", feature = "emulate"))]
pub mod cuda;
#[cfg(feature = "emulate")]
pub mod emu;
pub mod error;
pub mod fastmath;
pub mod geometry;
pub mod layout;
pub mod real;

pub use error::{Error, Result};
pub use geometry::Conv2dGeometry;
pub use layout::{ActShape, Layout};
pub use real::Real;
