//! burn integration (feature `burn`, burn 0.22): every op family as a burn function
//! ([`ops`]) and module ([`nn`]), differentiable under burn's `Autodiff`.
//!
//! * [`backend`] — the backend extension [`AkBackend`]: one entry point,
//!   `ak_host_op`, implemented for burn's CPU backend `Flex` (the op's tensors go to
//!   host slices, the crate's CPU forward runs, the result comes back as a tensor) and
//!   for `Autodiff<B, C>` (the same forward plus a backward node — burn's
//!   `Backward<B, N>` with `prepare(..).compute_bound().stateful()`, `OpsKind::Tracked`
//!   / `UnTracked`, `grads.consume` / `grads.register` — that runs the crate's CPU
//!   backward and registers a gradient for every input).
//! * [`ops`] — `acon_c`, `acon_b`, `acon_a` (β per channel, per (sample, channel) or
//!   per sample as a tensor that gets its gradient, or pixel-wise), the meta-ACON
//!   generators `channel_gen` and `layer_gen`, `iieu_b`, the fused `iieu_conv2d`
//!   (convolution → ψ → IIEU-B as one op), `iieu_dc`, `tau` and `aiec_train`. Every function returns `Result<Tensor, crate::Error>`: bad input
//!   (shapes, lengths, empty tensors, labels, parameters, dtype) is the CPU op's own
//!   error, never a panic.
//! * [`nn`] — `#[derive(Module)]` modules with a `Config` and `Param`s at the SPEC
//!   inits: [`nn::AconC`], [`nn::AconB`], [`nn::AconA`], [`nn::MetaAconC`],
//!   [`nn::IieuB`], [`nn::IieuConv2d`], [`nn::IieuDc`], [`nn::Aiec`], [`nn::Tau`].
//!
//! Supported: `f32` and `f64` tensors on burn's `Flex` device, with or without
//! autodiff (`Device::flex()`, `Device::flex().autodiff()`); with feature `burn-cuda`,
//! every op family in `f32`, `f16` or `bf16` on burn's CUDA device (`Device::cuda(i)`,
//! burn's CubeCL backend: module `cuda`, the crate's kernels on burn's device buffers). A tensor on another backend panics in burn's dispatch
//! (burn's rule for a backend an extension does not list). Gradients are first order.
//! Design: `docs/burn.md`.

pub mod backend;
#[cfg(feature = "burn-cuda")]
pub mod cuda;
pub mod kernel;
pub mod nn;
pub mod ops;

pub use backend::{AkAutodiffInner, AkBackend, AkSaved};
pub use kernel::HostOp;
