//! candle integration (feature `candle`): custom ops with autograd and candle-nn style
//! modules for every op family, computed by this crate's CPU backend ([`crate::cpu`]).
//!
//! * [`ops`] — one `candle_core::CustomOp1/2/3` per op family, plus functions that
//!   apply them: [`ops::acon_c`], [`ops::meta_acon_c`], [`ops::iieu_b`],
//!   [`ops::iieu_dc`], [`ops::tau`], [`ops::aiec_loss`], and the fused
//!   convolution → ψ → IIEU-B [`ops::iieu_conv2d`] (CPU only so far; defined in
//!   [`iieu_conv_ops`]). Each op's `cpu_fwd` calls the CPU forward; its `bwd` calls the CPU forward again to rebuild the saved state
//!   (candle keeps no state between forward and backward) and then the CPU backward,
//!   and returns a gradient for every input tensor. candle ops take at most three
//!   inputs, so learnable parameters travel packed in one tensor (e.g. ACON-C's
//!   `[p1; p2; β]`, IIEU-B's `[W; γ̇; β̇; η]`); the functions build the pack with
//!   `Tensor::stack`/`Tensor::cat` from the separate parameter tensors, so candle's
//!   autograd splits the packed gradient back onto each parameter with its exact shape.
//! * [`acon_ops`] — the other ACON forms, same pattern, re-exported from [`ops`]:
//!   [`ops::acon_a`] (Swish `x·σ(βx)`, learnable β), [`ops::acon_b`]
//!   (`(1−p)x·σ(β(1−p)x) + p·x`), and meta-ACON-C with the parameter-free generators,
//!   [`ops::meta_acon_c_layer`] (`β[n] = σ(Σ_c GAP(x)[n,c])`) and
//!   [`ops::meta_acon_c_pixel`] (`β = σ(x)`), whose β gradient flows on into `x`.
//! * [`nn`] — modules built from a `candle_nn::VarBuilder`, each a one-line
//!   replacement for a ReLU: [`nn::AconC`], [`nn::AconA`], [`nn::AconB`],
//!   [`nn::MetaAconC`] (channel-wise generator), [`nn::MetaAconCLayer`],
//!   [`nn::MetaAconCPixel`], [`nn::IieuB`] (wraps a `candle_nn::Conv2d`),
//!   [`nn::IieuDc`] (`forward(x, res)`), [`nn::Aiec`], and [`nn::IieuConv2d`] (owns its
//!   weight, ψ — none, bias or BatchNorm — and IIEU-B's parameters; one fused op).
//!
//! Supported: tensors on the CPU device in `f32` or `f64` (all inputs of one op in
//! the same dtype); with feature `candle-cuda`, also every op except
//! [`ops::iieu_conv2d`] on candle's CUDA device in `f32`, `f16` or `bf16` (`cuda`;
//! [`ops::iieu_conv2d`] on a CUDA tensor is an error saying its CUDA path is not
//! implemented yet). Any other dtype returns
//! `candle_core::Error::UnsupportedDTypeForOp` and any other device candle's "no
//! cuda/metal implementation" error — never a panic.
//! Errors of the CPU backend (bad shapes, bad parameters, labels out of range) are
//! returned wrapped in a `candle_core::Error` (`Error::wrap` of [`crate::Error`]).
//! Gradients are first order only (the tensors `bwd` returns are not themselves
//! differentiable).

/// Calls `$f::<f32>` or `$f::<f64>` by `$dt`; any other dtype is
/// `UnsupportedDTypeForOp` (the CPU ops' dtype dispatch; textually scoped to the
/// modules declared below).
macro_rules! by_dtype {
    ($dt:expr, $name:expr, $f:ident ( $($a:expr),* $(,)? )) => {
        match $dt {
            DType::F32 => $f::<f32>($($a),*),
            DType::F64 => $f::<f64>($($a),*),
            dt => Err(candle_core::Error::UnsupportedDTypeForOp(dt, $name)),
        }
    };
}

pub mod acon_ops;
#[cfg(feature = "candle-cuda")]
pub mod cuda;
pub mod iieu_conv_ops;
pub mod nn;
pub mod ops;

use std::borrow::Cow;

use candle_core::{CpuStorage, DType, Layout as CLayout, Tensor, WithDType};

use crate::layout::{ActShape, Layout};
use crate::real::Real;

/// Element types the candle ops run on: `f32` and `f64`.
pub(crate) trait El: Real + WithDType {}
impl El for f32 {}
impl El for f64 {}

/// Our error as a candle error.
pub(crate) fn cerr(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// A candle error with a message naming the op.
pub(crate) fn op_err(op: &str, msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: {msg}"))
}

/// The contiguous data of a CPU storage as `&[T]` (the public functions make every
/// input contiguous before applying an op, so a strided layout is an error here).
pub(crate) fn cpu_data<'a, T: WithDType>(
    op: &str,
    s: &'a CpuStorage,
    l: &CLayout,
) -> candle_core::Result<Cow<'a, [T]>> {
    let data = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) if b <= data.len() => Ok(Cow::Borrowed(&data[a..b])),
        _ => Err(op_err(op, "input is not contiguous")),
    }
}

/// A tensor's elements in row-major order, as `Vec<T>` (any layout).
pub(crate) fn host<T: WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// `Err(UnsupportedDTypeForOp)` unless `dt` is f32 or f64 (or, with feature
/// `candle-cuda`, f16/bf16, which the CUDA ops take; the CPU ops still reject them).
pub(crate) fn check_float(dt: DType, op: &'static str) -> candle_core::Result<()> {
    match dt {
        DType::F32 | DType::F64 => Ok(()),
        #[cfg(feature = "candle-cuda")]
        DType::F16 | DType::BF16 => Ok(()),
        dt => Err(candle_core::Error::UnsupportedDTypeForOp(dt, op)),
    }
}

/// Interprets tensor dims as an [`ActShape`]: NCHW-like `(N, C, ...)` (channel dim 1,
/// positions = product of the remaining dims, 1 for a rank-2 tensor) or channels-last
/// `(N, L, C)` (rank 3 exactly).
pub(crate) fn act_shape(op: &str, dims: &[usize], layout: Layout) -> candle_core::Result<ActShape> {
    match layout {
        Layout::Nchw => {
            if dims.len() < 2 {
                return Err(op_err(
                    op,
                    format!("expected a (N, C, ...) tensor, got dims {dims:?}"),
                ));
            }
            let s = dims[2..].iter().product::<usize>();
            Ok(ActShape {
                n: dims[0],
                c: dims[1],
                s,
                layout: Layout::Nchw,
            })
        }
        Layout::Nlc => {
            if dims.len() != 3 {
                return Err(op_err(
                    op,
                    format!("expected an (N, L, C) tensor, got dims {dims:?}"),
                ));
            }
            Ok(ActShape::nlc(dims[0], dims[1], dims[2]))
        }
    }
}

/// `Err` unless `dims == want`.
pub(crate) fn check_dims(
    op: &str,
    what: &str,
    dims: &[usize],
    want: &[usize],
) -> candle_core::Result<()> {
    if dims == want {
        Ok(())
    } else {
        Err(op_err(
            op,
            format!("{what} has dims {dims:?}, expected {want:?}"),
        ))
    }
}

/// `Err` unless a tensor of dims `dims` has `want` elements.
pub(crate) fn check_numel(
    op: &str,
    what: &str,
    dims: &[usize],
    want: usize,
) -> candle_core::Result<()> {
    let n: usize = dims.iter().product();
    if n == want {
        Ok(())
    } else {
        Err(op_err(
            op,
            format!("{what} has dims {dims:?} ({n} elements), expected {want} elements"),
        ))
    }
}

/// How an ACON op's β tensor is laid out, read from its dims by the public functions
/// ([`ops::acon_a`], [`ops::acon_b`], [`ops::acon_c`]), so β can come from any
/// generator built from candle's own layers (e.g. the authors' fc → BN → fc → BN → σ
/// on the GAP, whose output is `(N, C, 1, 1)`) and receive its gradient:
///
/// | β dims | meaning | CPU [`crate::cpu::acon::Beta`] |
/// |---|---|---|
/// | `(C,)` | one β per channel | `PerChannel` |
/// | `(N, C)`, `(N, C, 1, 1)`, `(N, 1, C)` — `N` then dims whose product is `C` | one β per (sample, channel) | `PerSampleChannel` |
/// | `(N, 1)`, `(N, 1, 1, 1)` — `N` then dims whose product is 1 | one β per sample | `PerSample` |
///
/// A per-sample β must keep a trailing dim (`(N, 1)`, not `(N,)`): a rank-1 β is
/// per channel. With `C = 1` the last two rows mean the same and `PerSampleChannel`
/// is used. Any other dims are an error naming them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BetaShape {
    /// `(C,)`.
    PerChannel,
    /// `(N, …)` with `C` elements per sample.
    PerSampleChannel,
    /// `(N, …)` with one element per sample.
    PerSample,
}

impl BetaShape {
    /// The layout of a β of dims `dims` for an activation of shape `shape` (see the
    /// table above); `Err` naming the dims if it is none of them.
    pub fn of(op: &str, dims: &[usize], shape: &ActShape) -> candle_core::Result<Self> {
        let bad = || {
            op_err(
                op,
                format!(
                    "beta has dims {dims:?}; expected ({c},) per channel, ({n}, {c}) per \
                     (sample, channel) or ({n}, 1) per sample (trailing dims of size 1 allowed)",
                    n = shape.n,
                    c = shape.c
                ),
            )
        };
        match dims {
            [c] if *c == shape.c => Ok(BetaShape::PerChannel),
            [n, rest @ ..] if !rest.is_empty() && *n == shape.n => {
                let r: usize = rest.iter().product();
                if r == shape.c {
                    Ok(BetaShape::PerSampleChannel)
                } else if r == 1 {
                    Ok(BetaShape::PerSample)
                } else {
                    Err(bad())
                }
            }
            _ => Err(bad()),
        }
    }

    /// Elements of such a β: `C`, `N·C` or `N`.
    pub fn len(self, shape: &ActShape) -> usize {
        match self {
            BetaShape::PerChannel => shape.c,
            BetaShape::PerSampleChannel => shape.n * shape.c,
            BetaShape::PerSample => shape.n,
        }
    }

    /// The CPU backend's β over the flat values `v` (length [`Self::len`]).
    pub(crate) fn cpu<T>(self, v: &[T]) -> crate::cpu::acon::Beta<'_, T> {
        use crate::cpu::acon::Beta;
        match self {
            BetaShape::PerChannel => Beta::PerChannel(v),
            BetaShape::PerSampleChannel => Beta::PerSampleChannel(v),
            BetaShape::PerSample => Beta::PerSample(v),
        }
    }

    /// The CUDA launchers' β over the f32 device buffer `v` (length [`Self::len`]).
    #[cfg(feature = "candle-cuda")]
    pub(crate) fn cuda(self, v: &cudarc::driver::CudaSlice<f32>) -> crate::cuda::acon::Beta<'_> {
        use crate::cuda::acon::Beta;
        match self {
            BetaShape::PerChannel => Beta::PerChannel(v),
            BetaShape::PerSampleChannel => Beta::PerSampleChannel(v),
            BetaShape::PerSample => Beta::PerSample(v),
        }
    }
}
