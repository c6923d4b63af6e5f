//! CPU backend: the reference implementation of every op (generic over f32/f64 so
//! gradient checks run in f64) and the default backend when there is no GPU.
//!
//! Each family is one module with `forward` / `backward` style functions that take
//! flat slices plus a shape description, validate everything first, and return
//! owned outputs. Work over independent (sample, channel) planes runs on rayon;
//! parameter-gradient reductions are two-stage and deterministic.

pub mod acon;
pub mod aiec;
pub mod common;
pub mod iieu;
pub mod iieu_conv;
pub mod iieu_dc;
pub mod relu;
