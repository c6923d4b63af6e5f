//! The candle ops on candle's CUDA device (feature `candle-cuda`): each op's
//! `cuda_fwd` runs this crate's kernels ([`crate::cuda`]) on the candle device's own
//! stream, and each op's `bwd` on a CUDA tensor applies a *backward op* whose
//! `cuda_fwd` runs the matching CUDA backward.
//!
//! * Dtypes: `f32`, `f16`, `bf16` (the kernels' storage types; arithmetic is f32). Any
//!   other dtype is `Error::UnsupportedDTypeForOp`, never a panic.
//! * Inputs must be contiguous (the public functions in [`super::ops`] make them so);
//!   a strided input is an error naming the op.
//! * Ops: TAU, ACON-A, ACON-B, ACON-C, meta-ACON-C (channel-wise
//!   [`super::ops::MetaAconCOp`], layer-/pixel-wise [`super::ops::MetaAconCGenOp`]),
//!   IIEU-B, IIEU-DC and the AIEC loss.
//! * Parameter packs arrive in the activation's dtype (as on the CPU); the kernels take
//!   f32 parameters, so the pack (`3·C` values for ACON-C) is widened to f32 on the
//!   device ([`kc::cast`], one small launch per parameter). IIEU-B's conv weight `W`
//!   (the head of its pack) is used in place, in the storage dtype.
//! * No host round trip: no op, forward or backward, copies between host and device
//!   or synchronises the stream (`tests/no_host_roundtrip.rs` counts the emulated
//!   driver's copies and synchronisations over a forward + backward of every op).
//! * Backward: candle keeps no state between forward and backward, so the backward
//!   op recomputes what the CUDA backward needs. It outputs ONE packed 1-D tensor —
//!   the gradient of every input, flattened and concatenated in input order, in the
//!   activation's dtype (parameter gradients are f32 on the device and rounded once)
//!   — which `bwd` splits with `narrow` + `reshape` (views: no kernel runs). The CUDA
//!   path of an op therefore launches only this crate's kernels. Backward ops of a
//!   three-input forward (channel-wise meta-ACON-C, IIEU-B, IIEU-DC) hold `dy` in the
//!   op ([`MetaAconCBwdOp::dy`]), as candle ops take at most three tensors.
//! * AIEC loss: no fused CUDA entry point takes fixed masks, so the op is assembled
//!   from the pieces of [`crate::cuda::aiec`] (TAU, global feature, DMU, gate loss,
//!   [`crate::cuda::aiec::aux_gate_backward`]); the labels (`U32`) and masks (`U8`)
//!   are tensors on the device held by the op, the loss means are reduced on the
//!   device and the upstream gradient `dL` is read by a kernel. A label `≥ K` cannot
//!   be checked by the host: the kernels flag it (NaN loss, no gradient, never
//!   counted) instead of following it.
//! * The `Aiec` module's counter / mask step ([`super::nn::Aiec`]) runs on the device
//!   with its counters there ([`crate::cuda::aiec::DeviceCounters`]).
//!
//! Tested on the emulated device (features `emulate` + `candle-cuda`,
//! `tests/candle_cuda.rs`): forward and backward ops against the CPU reference. A
//! whole `loss.backward()` on a CUDA tensor also needs candle's own kernels (fill,
//! add, copy) which the emulated device cannot run; it is untested here.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType as CDType, Layout as CLayout, Shape, Tensor};

use super::{act_shape, cerr, check_dims, op_err};
use crate::cuda::{self as kc, CudaSlice, CudaStream, CudaView, DType};

type CResult<T> = candle_core::Result<T>;

/// Element types of the CUDA ops: both a candle CUDA dtype and a kernel dtype.
pub(crate) trait CudaEl: DType + CudaDType + candle_core::WithDType {}
impl CudaEl for f32 {}
impl CudaEl for half::f16 {}
impl CudaEl for half::bf16 {}

/// Calls `$f::<f32|f16|bf16>` by `$dt`; any other dtype is `UnsupportedDTypeForOp`.
macro_rules! by_cuda_dtype {
    ($dt:expr, $name:expr, $f:ident ( $($a:expr),* $(,)? )) => {
        match $dt {
            CDType::F32 => $f::<f32>($($a),*),
            CDType::F16 => $f::<half::f16>($($a),*),
            CDType::BF16 => $f::<half::bf16>($($a),*),
            dt => Err(candle_core::Error::UnsupportedDTypeForOp(dt, $name)),
        }
    };
}

/// The candle device's stream (our kernels run on it, ordered with candle's work).
fn stream(s: &CudaStorage) -> Arc<CudaStream> {
    s.device().cuda_stream()
}

/// The contiguous elements of a storage as a device view.
fn view<'a, T: CudaEl>(op: &str, s: &'a CudaStorage, l: &CLayout) -> CResult<CudaView<'a, T>> {
    if s.dtype() != T::DTYPE {
        return Err(op_err(
            op,
            format!(
                "inputs must share one dtype, got {:?} and {:?}",
                T::DTYPE,
                s.dtype()
            ),
        ));
    }
    let slice = s.as_cuda_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) if b <= slice.len() => Ok(slice.slice(a..b)),
        _ => Err(op_err(op, "input is not contiguous")),
    }
}

/// Consecutive pieces of the parameter pack `v` (lengths `lens`, adding up to its
/// length; every length nonzero) widened to f32 on the device ([`kc::cast`]: no host
/// copy). The lengths are checked before anything runs.
fn f32_parts<T: CudaEl>(
    name: &str,
    st: &Arc<CudaStream>,
    v: &CudaView<'_, T>,
    lens: &[usize],
) -> CResult<Vec<CudaSlice<f32>>> {
    let total: usize = lens.iter().sum();
    if total != v.len() || lens.contains(&0) {
        return Err(op_err(
            name,
            format!(
                "packed parameters have {} elements, expected {total} in parts {lens:?}",
                v.len()
            ),
        ));
    }
    let mut at = 0;
    lens.iter()
        .map(|&l| {
            let part = kc::cast::to_f32(st, &v.slice(at..at + l)).map_err(cerr);
            at += l;
            part
        })
        .collect()
}

fn kc_err(e: impl Into<crate::Error>) -> candle_core::Error {
    cerr(e.into())
}

/// Packs gradients into one `T` buffer, in the given order, on the device: `T` parts
/// copied, f32 parts rounded to `T` by [`kc::cast`] (no host round trip), zero parts
/// left as the zero-filled allocation.
pub(crate) enum Part<'a, T> {
    /// A gradient already in the storage dtype.
    Dev(&'a CudaSlice<T>),
    /// An f32 parameter gradient.
    F32(&'a CudaSlice<f32>),
    /// `n` zeros (the gradient of a non-differentiable input, e.g. running statistics).
    Zeros(usize),
}

fn pack<T: CudaEl>(st: &Arc<CudaStream>, parts: &[Part<'_, T>]) -> CResult<CudaSlice<T>> {
    let len = |p: &Part<'_, T>| match p {
        Part::Dev(s) => s.len(),
        Part::F32(s) => s.len(),
        Part::Zeros(n) => *n,
    };
    let total: usize = parts.iter().map(len).sum();
    let mut out = st.alloc_zeros::<T>(total.max(1)).map_err(kc_err)?;
    let mut at = 0;
    for p in parts {
        let n = len(p);
        if n == 0 {
            continue;
        }
        let mut dst = out.slice_mut(at..at + n);
        match p {
            Part::Dev(s) => st.memcpy_dtod(*s, &mut dst).map_err(kc_err)?,
            Part::F32(s) => kc::cast::from_f32_into(st, *s, &mut dst).map_err(cerr)?,
            Part::Zeros(_) => {}
        }
        at += n;
    }
    if total == 0 {
        return Err(op_err("pack", "no gradients"));
    }
    Ok(out)
}

fn wrap<T: CudaEl>(s: &CudaStorage, y: CudaSlice<T>) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(y, s.device().clone())
}

/// Splits a packed gradient (1-D) into tensors of the given shapes (views).
pub(crate) fn unpack(packed: &Tensor, shapes: &[&Shape]) -> CResult<Vec<Tensor>> {
    let mut at = 0;
    let mut out = Vec::with_capacity(shapes.len());
    for s in shapes {
        let n = s.elem_count();
        out.push(packed.narrow(0, at, n)?.reshape(*s)?);
        at += n;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// TAU

fn tau_fwd_t<T: CudaEl>(tau: f64, s: &CudaStorage, l: &CLayout) -> CResult<(CudaStorage, Shape)> {
    let st = stream(s);
    let x = view::<T>("aiec_tau", s, l)?;
    let y = kc::aiec::tau_forward(&st, &x, tau as f32).map_err(cerr)?;
    Ok((wrap(s, y), l.shape().clone()))
}

/// `TauOp::cuda_fwd`.
pub(crate) fn tau_fwd(
    op: &super::ops::TauOp,
    s: &CudaStorage,
    l: &CLayout,
) -> CResult<(CudaStorage, Shape)> {
    by_cuda_dtype!(s.dtype(), "aiec_tau", tau_fwd_t(op.tau, s, l))
}

/// TAU backward as an op of `(x, dA)`: output `dx` (same dims as `x`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TauBwdOp {
    /// Threshold τ.
    pub tau: f64,
}

fn tau_bwd_t<T: CudaEl>(
    tau: f64,
    s1: &CudaStorage,
    l1: &CLayout,
    s2: &CudaStorage,
    l2: &CLayout,
) -> CResult<(CudaStorage, Shape)> {
    let name = "aiec_tau_bwd";
    check_dims(name, "dA", l2.dims(), l1.dims())?;
    let st = stream(s1);
    let (x, g) = (view::<T>(name, s1, l1)?, view::<T>(name, s2, l2)?);
    let dx = kc::aiec::tau_backward(&st, &g, &x, tau as f32).map_err(cerr)?;
    Ok((wrap(s1, dx), l1.shape().clone()))
}

impl candle_core::CustomOp2 for TauBwdOp {
    fn name(&self) -> &'static str {
        "aiec_tau_bwd"
    }
    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &CLayout,
        _: &candle_core::CpuStorage,
        _: &CLayout,
    ) -> CResult<(candle_core::CpuStorage, Shape)> {
        Err(op_err(
            self.name(),
            "CUDA only (the CPU backward is TauOp::bwd)",
        ))
    }
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &CLayout,
        s2: &CudaStorage,
        l2: &CLayout,
    ) -> CResult<(CudaStorage, Shape)> {
        by_cuda_dtype!(
            s1.dtype(),
            "aiec_tau_bwd",
            tau_bwd_t(self.tau, s1, l1, s2, l2)
        )
    }
}

/// `TauOp::bwd` for a CUDA tensor.
pub(crate) fn tau_bwd(op: &super::ops::TauOp, x: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
    Ok(Some(x.apply_op2_no_bwd(
        &g.contiguous()?,
        &TauBwdOp { tau: op.tau },
    )?))
}

// ---------------------------------------------------------------------------
// ACON-C

/// ACON-C's x shape and `[p1, p2, β]` on the device as f32.
fn acon_c_inputs<'a, T: CudaEl>(
    name: &str,
    op: &super::ops::AconCOp,
    s1: &'a CudaStorage,
    l1: &CLayout,
    s2: &CudaStorage,
    l2: &CLayout,
) -> CResult<(crate::ActShape, CudaView<'a, T>, Vec<CudaSlice<f32>>)> {
    let shape = act_shape(name, l1.dims(), op.layout)?;
    let lens = op.lens(&shape);
    check_dims(name, "p = [p1; p2; beta]", l2.dims(), &[lens.iter().sum()])?;
    let st = stream(s1);
    let x = view::<T>(name, s1, l1)?;
    let p = f32_parts(name, &st, &view::<T>(name, s2, l2)?, &lens)?;
    Ok((shape, x, p))
}

fn acon_c_fwd_t<T: CudaEl>(
    op: &super::ops::AconCOp,
    s1: &CudaStorage,
    l1: &CLayout,
    s2: &CudaStorage,
    l2: &CLayout,
) -> CResult<(CudaStorage, Shape)> {
    let (shape, x, p) = acon_c_inputs::<T>("acon_c", op, s1, l1, s2, l2)?;
    let st = stream(s1);
    let beta = op.beta.cuda(&p[2]);
    let y = kc::acon::acon_c_forward(&st, &shape, &x, &p[0], &p[1], beta).map_err(cerr)?;
    Ok((wrap(s1, y), l1.shape().clone()))
}

/// `AconCOp::cuda_fwd`.
pub(crate) fn acon_c_fwd(
    op: &super::ops::AconCOp,
    s1: &CudaStorage,
    l1: &CLayout,
    s2: &CudaStorage,
    l2: &CLayout,
) -> CResult<(CudaStorage, Shape)> {
    by_cuda_dtype!(s1.dtype(), "acon_c", acon_c_fwd_t(op, s1, l1, s2, l2))
}

/// ACON-C backward as an op of `(x, p, dy)`: output the packed `[dx; dp]` (1-D,
/// `numel(x) + 2·C + len(β)`), `dp` = `[dp1; dp2; dβ]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AconCBwdOp {
    /// The forward op.
    pub fwd: super::ops::AconCOp,
}

fn acon_c_bwd_t<T: CudaEl>(
    op: &super::ops::AconCOp,
    s1: &CudaStorage,
    l1: &CLayout,
    s2: &CudaStorage,
    l2: &CLayout,
    s3: &CudaStorage,
    l3: &CLayout,
) -> CResult<(CudaStorage, Shape)> {
    let name = "acon_c_bwd";
    let (shape, x, p) = acon_c_inputs::<T>(name, op, s1, l1, s2, l2)?;
    check_dims(name, "dy", l3.dims(), l1.dims())?;
    let dy = view::<T>(name, s3, l3)?;
    let st = stream(s1);
    let beta = op.beta.cuda(&p[2]);
    let g = kc::acon::acon_c_backward(&st, &shape, &dy, &x, &p[0], &p[1], beta).map_err(cerr)?;
    let dbeta = need(name, &g.dbeta, "dbeta")?;
    let out = pack(
        &st,
        &[
            Part::Dev(&g.dx),
            Part::F32(&g.dp1),
            Part::F32(&g.dp2),
            Part::F32(dbeta),
        ],
    )?;
    let len = out.len();
    Ok((wrap(s1, out), Shape::from(len)))
}

impl candle_core::CustomOp3 for AconCBwdOp {
    fn name(&self) -> &'static str {
        "acon_c_bwd"
    }
    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &CLayout,
        _: &candle_core::CpuStorage,
        _: &CLayout,
        _: &candle_core::CpuStorage,
        _: &CLayout,
    ) -> CResult<(candle_core::CpuStorage, Shape)> {
        Err(op_err(
            self.name(),
            "CUDA only (the CPU backward is AconCOp::bwd)",
        ))
    }
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &CLayout,
        s2: &CudaStorage,
        l2: &CLayout,
        s3: &CudaStorage,
        l3: &CLayout,
    ) -> CResult<(CudaStorage, Shape)> {
        by_cuda_dtype!(
            s1.dtype(),
            "acon_c_bwd",
            acon_c_bwd_t(&self.fwd, s1, l1, s2, l2, s3, l3)
        )
    }
}

/// `AconCOp::bwd` for CUDA tensors: `(dx, dp)`.
pub(crate) fn acon_c_bwd(
    op: &super::ops::AconCOp,
    x: &Tensor,
    p: &Tensor,
    g: &Tensor,
) -> CResult<(Option<Tensor>, Option<Tensor>)> {
    let packed = x.apply_op3_no_bwd(p, &g.contiguous()?, &AconCBwdOp { fwd: *op })?;
    let mut v = unpack(&packed, &[x.shape(), p.shape()])?.into_iter();
    Ok((v.next(), v.next()))
}

// ---------------------------------------------------------------------------
// Shared helpers of the ops below.

/// `x`'s [`crate::ActShape`] and view, and the parameter pack (input 2, dims
/// `pdims(C)`) widened to f32 on the device in pieces of the given lengths.
#[allow(clippy::type_complexity)]
fn x_and_params<'a, T: CudaEl>(
    name: &str,
    layout: crate::Layout,
    (s1, l1): (&'a CudaStorage, &CLayout),
    (s2, l2): (&CudaStorage, &CLayout),
    pdims: &[usize],
    lens: &[usize],
) -> CResult<(crate::ActShape, CudaView<'a, T>, Vec<CudaSlice<f32>>)> {
    let shape = act_shape(name, l1.dims(), layout)?;
    check_dims(name, "parameter pack", l2.dims(), pdims)?;
    let st = stream(s1);
    let x = view::<T>(name, s1, l1)?;
    let p = f32_parts(name, &st, &view::<T>(name, s2, l2)?, lens)?;
    Ok((shape, x, p))
}

/// `CustomOp3` for a CUDA-only backward op of `(x, params, dy)`: `cpu_fwd` is an
/// error, `cuda_fwd` calls `$f::<T>(&self.fwd, ...)` by dtype.
macro_rules! cuda_bwd_op3 {
    ($ty:ty, $name:expr, $cpu:expr, $f:ident) => {
        impl candle_core::CustomOp3 for $ty {
            fn name(&self) -> &'static str {
                $name
            }
            fn cpu_fwd(
                &self,
                _: &candle_core::CpuStorage,
                _: &CLayout,
                _: &candle_core::CpuStorage,
                _: &CLayout,
                _: &candle_core::CpuStorage,
                _: &CLayout,
            ) -> CResult<(candle_core::CpuStorage, Shape)> {
                Err(op_err(
                    $name,
                    concat!("CUDA only (the CPU backward is ", $cpu, ")"),
                ))
            }
            fn cuda_fwd(
                &self,
                s1: &CudaStorage,
                l1: &CLayout,
                s2: &CudaStorage,
                l2: &CLayout,
                s3: &CudaStorage,
                l3: &CLayout,
            ) -> CResult<(CudaStorage, Shape)> {
                by_cuda_dtype!(
                    s1.dtype(),
                    $name,
                    $f(&self.fwd, (s1, l1), (s2, l2), (s3, l3))
                )
            }
        }
    };
}

/// A packed gradient as the op's output storage and 1-D shape.
fn packed_out<T: CudaEl>(
    s: &CudaStorage,
    st: &Arc<CudaStream>,
    parts: &[Part<'_, T>],
) -> CResult<(CudaStorage, Shape)> {
    let out = pack(st, parts)?;
    let len = out.len();
    Ok((wrap(s, out), Shape::from(len)))
}

/// `dy`'s view after checking its dims against `x`'s.
fn dy_view<'a, T: CudaEl>(
    name: &str,
    (s3, l3): (&'a CudaStorage, &CLayout),
    l1: &CLayout,
) -> CResult<CudaView<'a, T>> {
    check_dims(name, "dy", l3.dims(), l1.dims())?;
    view::<T>(name, s3, l3)
}

fn need<'a>(name: &str, g: &'a Option<CudaSlice<f32>>, what: &str) -> CResult<&'a CudaSlice<f32>> {
    g.as_ref()
        .ok_or_else(|| op_err(name, format!("the kernels returned no {what}")))
}

type Sl<'a> = (&'a CudaStorage, &'a CLayout);

// ---------------------------------------------------------------------------
// ACON-A

/// ACON-A's `x` and β (any [`super::BetaShape`]; β's dims are free as long as its
/// element count fits: the public function checked them).
fn acon_a_inputs<'a, T: CudaEl>(
    name: &str,
    op: &super::acon_ops::AconAOp,
    x: Sl<'a>,
    p: Sl<'_>,
) -> CResult<(crate::ActShape, CudaView<'a, T>, Vec<CudaSlice<f32>>)> {
    let shape = act_shape(name, x.1.dims(), op.layout)?;
    let len = op.beta.len(&shape);
    super::check_numel(name, "beta", p.1.dims(), len)?;
    let p_dims = p.1.dims().to_vec();
    x_and_params::<T>(name, op.layout, x, p, &p_dims, &[len])
}

fn acon_a_fwd_t<T: CudaEl>(
    op: &super::acon_ops::AconAOp,
    x: Sl<'_>,
    p: Sl<'_>,
) -> CResult<(CudaStorage, Shape)> {
    let (shape, xv, b) = acon_a_inputs::<T>("acon_a", op, x, p)?;
    let st = stream(x.0);
    let y = kc::acon::acon_a_forward(&st, &shape, &xv, op.beta.cuda(&b[0])).map_err(cerr)?;
    Ok((wrap(x.0, y), x.1.shape().clone()))
}

/// `AconAOp::cuda_fwd`.
pub(crate) fn acon_a_fwd(
    op: &super::acon_ops::AconAOp,
    s1: &CudaStorage,
    l1: &CLayout,
    s2: &CudaStorage,
    l2: &CLayout,
) -> CResult<(CudaStorage, Shape)> {
    by_cuda_dtype!(s1.dtype(), "acon_a", acon_a_fwd_t(op, (s1, l1), (s2, l2)))
}

/// ACON-A backward as an op of `(x, β, dy)`: output the packed `[dx; dβ]` (1-D,
/// `numel(x) + len(β)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AconABwdOp {
    /// The forward op.
    pub fwd: super::acon_ops::AconAOp,
}

fn acon_a_bwd_t<T: CudaEl>(
    op: &super::acon_ops::AconAOp,
    x: Sl<'_>,
    p: Sl<'_>,
    dy: Sl<'_>,
) -> CResult<(CudaStorage, Shape)> {
    let name = "acon_a_bwd";
    let (shape, xv, b) = acon_a_inputs::<T>(name, op, x, p)?;
    let dyv = dy_view::<T>(name, dy, x.1)?;
    let st = stream(x.0);
    let g = kc::acon::acon_a_backward(&st, &shape, &dyv, &xv, op.beta.cuda(&b[0])).map_err(cerr)?;
    let db = need(name, &g.dbeta, "dbeta")?;
    packed_out(x.0, &st, &[Part::Dev(&g.dx), Part::F32(db)])
}

cuda_bwd_op3!(AconABwdOp, "acon_a_bwd", "AconAOp::bwd", acon_a_bwd_t);

/// `AconAOp::bwd` for CUDA tensors: `(dx, dβ)`.
pub(crate) fn acon_a_bwd(
    op: &super::acon_ops::AconAOp,
    x: &Tensor,
    beta: &Tensor,
    g: &Tensor,
) -> CResult<(Option<Tensor>, Option<Tensor>)> {
    let packed = x.apply_op3_no_bwd(beta, &g.contiguous()?, &AconABwdOp { fwd: *op })?;
    let mut v = unpack(&packed, &[x.shape(), beta.shape()])?.into_iter();
    Ok((v.next(), v.next()))
}

// ---------------------------------------------------------------------------
// ACON-B

/// ACON-B's `x` and the 1-D pack `[p (C); β]` split into two f32 buffers.
fn acon_b_inputs<'a, T: CudaEl>(
    name: &str,
    op: &super::acon_ops::AconBOp,
    x: Sl<'a>,
    p: Sl<'_>,
) -> CResult<(crate::ActShape, CudaView<'a, T>, Vec<CudaSlice<f32>>)> {
    let shape = act_shape(name, x.1.dims(), op.layout)?;
    let (c, len) = (shape.c, op.beta.len(&shape));
    x_and_params::<T>(name, op.layout, x, p, &[c + len], &[c, len])
}

fn acon_b_fwd_t<T: CudaEl>(
    op: &super::acon_ops::AconBOp,
    x: Sl<'_>,
    p: Sl<'_>,
) -> CResult<(CudaStorage, Shape)> {
    let name = "acon_b";
    let (shape, xv, pb) = acon_b_inputs::<T>(name, op, x, p)?;
    let st = stream(x.0);
    let beta = op.beta.cuda(&pb[1]);
    let y = kc::acon::acon_b_forward(&st, &shape, &xv, &pb[0], beta).map_err(cerr)?;
    Ok((wrap(x.0, y), x.1.shape().clone()))
}

/// `AconBOp::cuda_fwd`.
pub(crate) fn acon_b_fwd(
    op: &super::acon_ops::AconBOp,
    s1: &CudaStorage,
    l1: &CLayout,
    s2: &CudaStorage,
    l2: &CLayout,
) -> CResult<(CudaStorage, Shape)> {
    by_cuda_dtype!(s1.dtype(), "acon_b", acon_b_fwd_t(op, (s1, l1), (s2, l2)))
}

/// ACON-B backward as an op of `(x, [p; β], dy)`: output the packed `[dx; dp; dβ]`
/// (1-D, `numel(x) + C + len(β)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AconBBwdOp {
    /// The forward op.
    pub fwd: super::acon_ops::AconBOp,
}

fn acon_b_bwd_t<T: CudaEl>(
    op: &super::acon_ops::AconBOp,
    x: Sl<'_>,
    p: Sl<'_>,
    dy: Sl<'_>,
) -> CResult<(CudaStorage, Shape)> {
    let name = "acon_b_bwd";
    let (shape, xv, pb) = acon_b_inputs::<T>(name, op, x, p)?;
    let dyv = dy_view::<T>(name, dy, x.1)?;
    let st = stream(x.0);
    let beta = op.beta.cuda(&pb[1]);
    let g = kc::acon::acon_b_backward(&st, &shape, &dyv, &xv, &pb[0], beta).map_err(cerr)?;
    let db = need(name, &g.dbeta, "dbeta")?;
    packed_out(
        x.0,
        &st,
        &[Part::Dev(&g.dx), Part::F32(&g.dp), Part::F32(db)],
    )
}

cuda_bwd_op3!(AconBBwdOp, "acon_b_bwd", "AconBOp::bwd", acon_b_bwd_t);

/// `AconBOp::bwd` for CUDA tensors: `(dx, d[p; β])`.
pub(crate) fn acon_b_bwd(
    op: &super::acon_ops::AconBOp,
    x: &Tensor,
    pb: &Tensor,
    g: &Tensor,
) -> CResult<(Option<Tensor>, Option<Tensor>)> {
    let packed = x.apply_op3_no_bwd(pb, &g.contiguous()?, &AconBBwdOp { fwd: *op })?;
    let mut v = unpack(&packed, &[x.shape(), pb.shape()])?.into_iter();
    Ok((v.next(), v.next()))
}

/// The CUDA storage and layout of a tensor an op holds (a backward op's fourth
/// input: candle ops take at most three tensors).
fn held_cuda<'a>(name: &str, t: &'a Tensor) -> CResult<(candle_core::StorageRef<'a>, &'a CLayout)> {
    held_cuda_what(name, "dy", t)
}

/// [`held_cuda`] for any held tensor, named `what` in the error.
fn held_cuda_what<'a>(
    name: &str,
    what: &str,
    t: &'a Tensor,
) -> CResult<(candle_core::StorageRef<'a>, &'a CLayout)> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cuda(_) => Ok((s, l)),
        _ => Err(op_err(
            name,
            format!("{what} must be on the same CUDA device"),
        )),
    }
}

fn as_cuda<'a>(s: &'a candle_core::StorageRef<'_>) -> &'a CudaStorage {
    match &**s {
        candle_core::Storage::Cuda(c) => c,
        _ => unreachable!("checked by held_cuda"),
    }
}

// ---------------------------------------------------------------------------
// meta-ACON-C, layer-wise and pixel-wise generators

fn meta_kind(g: super::acon_ops::MetaGenKind) -> kc::acon::MetaGen<'static> {
    match g {
        super::acon_ops::MetaGenKind::Layer => kc::acon::MetaGen::Layer,
        super::acon_ops::MetaGenKind::Pixel => kc::acon::MetaGen::Pixel,
    }
}

fn meta_gen_fwd_t<T: CudaEl>(
    op: &super::acon_ops::MetaAconCGenOp,
    x: Sl<'_>,
    p: Sl<'_>,
) -> CResult<(CudaStorage, Shape)> {
    let name = op.gen.name();
    let c = act_shape(name, x.1.dims(), op.layout)?.c;
    let (shape, xv, p) = x_and_params::<T>(name, op.layout, x, p, &[2, c], &[c, c])?;
    let st = stream(x.0);
    let (y, _) = kc::acon::meta_acon_c_forward(&st, &shape, &xv, &p[0], &p[1], meta_kind(op.gen))
        .map_err(cerr)?;
    Ok((wrap(x.0, y), x.1.shape().clone()))
}

/// `MetaAconCGenOp::cuda_fwd`.
pub(crate) fn meta_gen_fwd(
    op: &super::acon_ops::MetaAconCGenOp,
    s1: &CudaStorage,
    l1: &CLayout,
    s2: &CudaStorage,
    l2: &CLayout,
) -> CResult<(CudaStorage, Shape)> {
    by_cuda_dtype!(
        s1.dtype(),
        op.gen.name(),
        meta_gen_fwd_t(op, (s1, l1), (s2, l2))
    )
}

/// Layer-/pixel-wise meta-ACON-C backward as an op of `(x, [p1; p2], dy)`: output
/// the packed `[dx; dp1; dp2]` (1-D, `numel(x) + 2·C`); `dx` includes the path
/// through the generated β.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaAconCGenBwdOp {
    /// The forward op.
    pub fwd: super::acon_ops::MetaAconCGenOp,
}

fn meta_gen_bwd_t<T: CudaEl>(
    op: &super::acon_ops::MetaAconCGenOp,
    x: Sl<'_>,
    p: Sl<'_>,
    dy: Sl<'_>,
) -> CResult<(CudaStorage, Shape)> {
    let name = "meta_acon_c_gen_bwd";
    let c = act_shape(name, x.1.dims(), op.layout)?.c;
    let (shape, xv, p) = x_and_params::<T>(name, op.layout, x, p, &[2, c], &[c, c])?;
    let dyv = dy_view::<T>(name, dy, x.1)?;
    let st = stream(x.0);
    let gen = meta_kind(op.gen);
    let (_, saved) =
        kc::acon::meta_acon_c_forward(&st, &shape, &xv, &p[0], &p[1], gen).map_err(cerr)?;
    let g = kc::acon::meta_acon_c_backward(&st, &shape, &dyv, &xv, &p[0], &p[1], gen, &saved)
        .map_err(cerr)?;
    packed_out(
        x.0,
        &st,
        &[Part::Dev(&g.dx), Part::F32(&g.dp1), Part::F32(&g.dp2)],
    )
}

cuda_bwd_op3!(
    MetaAconCGenBwdOp,
    "meta_acon_c_gen_bwd",
    "MetaAconCGenOp::bwd",
    meta_gen_bwd_t
);

/// `MetaAconCGenOp::bwd` for CUDA tensors: `(dx, d[p1; p2])`.
pub(crate) fn meta_gen_bwd(
    op: &super::acon_ops::MetaAconCGenOp,
    x: &Tensor,
    p: &Tensor,
    g: &Tensor,
) -> CResult<(Option<Tensor>, Option<Tensor>)> {
    let packed = x.apply_op3_no_bwd(p, &g.contiguous()?, &MetaAconCGenBwdOp { fwd: *op })?;
    let mut v = unpack(&packed, &[x.shape(), p.shape()])?.into_iter();
    Ok((v.next(), v.next()))
}

// ---------------------------------------------------------------------------
// meta-ACON-C, channel-wise generator

/// `x`, `[p1; p2]` and the generator pack of the channel-wise meta-ACON-C, on the
/// device as the kernels take them.
#[allow(clippy::type_complexity)]
fn meta_inputs<'a, T: CudaEl>(
    name: &str,
    op: &super::ops::MetaAconCOp,
    x: Sl<'a>,
    p: Sl<'_>,
    gp: Sl<'_>,
) -> CResult<(
    crate::ActShape,
    CudaView<'a, T>,
    Vec<CudaSlice<f32>>,
    kc::acon::ChannelGen,
)> {
    let c = act_shape(name, x.1.dims(), op.layout)?.c;
    let (shape, xv, pp) = x_and_params::<T>(name, op.layout, x, p, &[2, c], &[c, c])?;
    let st = stream(x.0);
    let lens = op.lens(c);
    let gv = view::<T>(name, gp.0, gp.1)?;
    // Absent biases are empty parts: not cast (no zero-length allocations).
    let present: Vec<usize> = lens.iter().copied().filter(|&l| l > 0).collect();
    let mut parts = f32_parts(name, &st, &gv, &present)?.into_iter();
    let mut next = || {
        parts
            .next()
            .ok_or_else(|| op_err(name, "generator parameters"))
    };
    let w1 = next()?;
    let b1 = if op.b1 { Some(next()?) } else { None };
    let w2 = next()?;
    let b2 = if op.b2 { Some(next()?) } else { None };
    let gen = kc::acon::ChannelGen {
        c,
        width: op.width,
        w1,
        b1,
        w2,
        b2,
    };
    Ok((shape, xv, pp, gen))
}

fn meta_fwd_t<T: CudaEl>(
    op: &super::ops::MetaAconCOp,
    x: Sl<'_>,
    p: Sl<'_>,
    gp: Sl<'_>,
) -> CResult<(CudaStorage, Shape)> {
    let (shape, xv, p, gen) = meta_inputs::<T>("meta_acon_c", op, x, p, gp)?;
    let st = stream(x.0);
    let g = kc::acon::MetaGen::Channel(&gen);
    let (y, _) = kc::acon::meta_acon_c_forward(&st, &shape, &xv, &p[0], &p[1], g).map_err(cerr)?;
    Ok((wrap(x.0, y), x.1.shape().clone()))
}

/// `MetaAconCOp::cuda_fwd`.
pub(crate) fn meta_fwd(
    op: &super::ops::MetaAconCOp,
    x: Sl<'_>,
    p: Sl<'_>,
    gp: Sl<'_>,
) -> CResult<(CudaStorage, Shape)> {
    by_cuda_dtype!(x.0.dtype(), "meta_acon_c", meta_fwd_t(op, x, p, gp))
}

/// Channel-wise meta-ACON-C backward as an op of `(x, [p1; p2], generator pack)`,
/// with `dy` held by the op (candle ops take at most three tensors; `dy` must be a
/// contiguous tensor on the same CUDA device): output the packed
/// `[dx; dp1; dp2; dW1; db1; dW2; db2]` (1-D, `numel(x) + 2·C + ` the generator
/// pack's length; the biases only if the pack holds them).
#[derive(Debug, Clone)]
pub struct MetaAconCBwdOp {
    /// The forward op.
    pub fwd: super::ops::MetaAconCOp,
    /// The output gradient, dims of `x`.
    pub dy: Tensor,
}

fn meta_bwd_t<T: CudaEl>(
    op: &super::ops::MetaAconCOp,
    x: Sl<'_>,
    p: Sl<'_>,
    gp: Sl<'_>,
    dy: Sl<'_>,
) -> CResult<(CudaStorage, Shape)> {
    let name = "meta_acon_c_bwd";
    let (shape, xv, p, gen) = meta_inputs::<T>(name, op, x, p, gp)?;
    let dyv = dy_view::<T>(name, dy, x.1)?;
    let st = stream(x.0);
    let mg = kc::acon::MetaGen::Channel(&gen);
    let (_, saved) =
        kc::acon::meta_acon_c_forward(&st, &shape, &xv, &p[0], &p[1], mg).map_err(cerr)?;
    let g = kc::acon::meta_acon_c_backward(&st, &shape, &dyv, &xv, &p[0], &p[1], mg, &saved)
        .map_err(cerr)?;
    let mut parts = vec![
        Part::Dev(&g.dx),
        Part::F32(&g.dp1),
        Part::F32(&g.dp2),
        Part::F32(need(name, &g.dw1, "dW1")?),
    ];
    if op.b1 {
        parts.push(Part::F32(need(name, &g.db1, "db1")?));
    }
    parts.push(Part::F32(need(name, &g.dw2, "dW2")?));
    if op.b2 {
        parts.push(Part::F32(need(name, &g.db2, "db2")?));
    }
    packed_out(x.0, &st, &parts)
}

impl candle_core::CustomOp3 for MetaAconCBwdOp {
    fn name(&self) -> &'static str {
        "meta_acon_c_bwd"
    }
    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &CLayout,
        _: &candle_core::CpuStorage,
        _: &CLayout,
        _: &candle_core::CpuStorage,
        _: &CLayout,
    ) -> CResult<(candle_core::CpuStorage, Shape)> {
        Err(op_err(
            self.name(),
            "CUDA only (the CPU backward is MetaAconCOp::bwd)",
        ))
    }
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &CLayout,
        s2: &CudaStorage,
        l2: &CLayout,
        s3: &CudaStorage,
        l3: &CLayout,
    ) -> CResult<(CudaStorage, Shape)> {
        let name = self.name();
        let (ds, dl) = held_cuda(name, &self.dy)?;
        let dy = (as_cuda(&ds), dl);
        by_cuda_dtype!(
            s1.dtype(),
            name,
            meta_bwd_t(&self.fwd, (s1, l1), (s2, l2), (s3, l3), dy)
        )
    }
}

/// `MetaAconCOp::bwd` for CUDA tensors: `(dx, d[p1; p2], d(generator pack))`.
pub(crate) fn meta_bwd(
    op: &super::ops::MetaAconCOp,
    x: &Tensor,
    p: &Tensor,
    gp: &Tensor,
    g: &Tensor,
) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let bop = MetaAconCBwdOp {
        fwd: *op,
        dy: g.contiguous()?,
    };
    let packed = x.apply_op3_no_bwd(p, gp, &bop)?;
    let mut v = unpack(&packed, &[x.shape(), p.shape(), gp.shape()])?.into_iter();
    Ok((v.next(), v.next(), v.next()))
}

/// `CustomOp3` for a CUDA-only backward op of three inputs with `dy` held by the op
/// (`self.dy`): `cpu_fwd` is an error, `cuda_fwd` calls
/// `$f::<T>(&self.fwd, a, b, c, dy)` by dtype.
macro_rules! cuda_bwd_op3_dy {
    ($ty:ty, $name:expr, $cpu:expr, $f:ident) => {
        impl candle_core::CustomOp3 for $ty {
            fn name(&self) -> &'static str {
                $name
            }
            fn cpu_fwd(
                &self,
                _: &candle_core::CpuStorage,
                _: &CLayout,
                _: &candle_core::CpuStorage,
                _: &CLayout,
                _: &candle_core::CpuStorage,
                _: &CLayout,
            ) -> CResult<(candle_core::CpuStorage, Shape)> {
                Err(op_err(
                    $name,
                    concat!("CUDA only (the CPU backward is ", $cpu, ")"),
                ))
            }
            fn cuda_fwd(
                &self,
                s1: &CudaStorage,
                l1: &CLayout,
                s2: &CudaStorage,
                l2: &CLayout,
                s3: &CudaStorage,
                l3: &CLayout,
            ) -> CResult<(CudaStorage, Shape)> {
                let (ds, dl) = held_cuda($name, &self.dy)?;
                let dy = (as_cuda(&ds), dl);
                by_cuda_dtype!(
                    s1.dtype(),
                    $name,
                    $f(&self.fwd, (s1, l1), (s2, l2), (s3, l3), dy)
                )
            }
        }
    };
}

// ---------------------------------------------------------------------------
// IIEU-B

/// IIEU-B's config, `x`, `x_pre`, `W` (a view of the pack) and the f32 parameters.
#[allow(clippy::type_complexity)]
fn iieu_inputs<'a, T: CudaEl>(
    name: &str,
    op: &super::ops::IieuBOp,
    x: Sl<'a>,
    xp: Sl<'a>,
    wp: Sl<'a>,
) -> CResult<(
    crate::cpu::iieu::IieuConfig,
    [CudaView<'a, T>; 3],
    kc::iieu::IieuDeviceParams,
)> {
    let cfg = op.config(xp.1.dims())?;
    let (oh, ow) = cfg.validate().map_err(cerr)?;
    let g = cfg.geometry;
    check_dims(name, "x", x.1.dims(), &[g.n, g.c_out, oh, ow])?;
    let o = g.c_out;
    let wl = op.w_dims.iter().product::<usize>();
    let st = stream(x.0);
    let (xv, xpv) = (view::<T>(name, x.0, x.1)?, view::<T>(name, xp.0, xp.1)?);
    let pv = view::<T>(name, wp.0, wp.1)?;
    if pv.len() != wl + 3 * o {
        return Err(op_err(
            name,
            format!(
                "packed parameters have {} elements, expected {}",
                pv.len(),
                wl + 3 * o
            ),
        ));
    }
    let mut parts = f32_parts(name, &st, &pv.slice(wl..), &[o, o, o])?.into_iter();
    let mut next = || parts.next().ok_or_else(|| op_err(name, "parameters"));
    let params = kc::iieu::IieuDeviceParams {
        ln_weight: next()?,
        ln_bias: next()?,
        eta: next()?,
    };
    Ok((cfg, [xv, xpv, pv.slice(..wl)], params))
}

fn iieu_fwd_t<T: CudaEl>(
    op: &super::ops::IieuBOp,
    x: Sl<'_>,
    xp: Sl<'_>,
    wp: Sl<'_>,
) -> CResult<(CudaStorage, Shape)> {
    let (cfg, [xv, xpv, w], params) = iieu_inputs::<T>("iieu_b", op, x, xp, wp)?;
    let st = stream(x.0);
    let (y, _) = kc::iieu::forward(&st, &cfg, &xv, &xpv, &w, &params).map_err(cerr)?;
    Ok((wrap(x.0, y), x.1.shape().clone()))
}

/// `IieuBOp::cuda_fwd`.
pub(crate) fn iieu_fwd(
    op: &super::ops::IieuBOp,
    x: Sl<'_>,
    xp: Sl<'_>,
    wp: Sl<'_>,
) -> CResult<(CudaStorage, Shape)> {
    by_cuda_dtype!(x.0.dtype(), "iieu_b", iieu_fwd_t(op, x, xp, wp))
}

/// IIEU-B backward as an op of `(x, x_pre, [W; γ̇; β̇; η])`, with `dy` held by the
/// op (candle ops take at most three tensors; `dy` must be a contiguous tensor on the
/// same CUDA device): output the packed `[dx; dx_pre; dW; dγ̇; dβ̇; dη]` (1-D,
/// `numel(x) + numel(x_pre) + ` the pack's length).
#[derive(Debug, Clone)]
pub struct IieuBBwdOp {
    /// The forward op.
    pub fwd: super::ops::IieuBOp,
    /// The output gradient, dims of `x`.
    pub dy: Tensor,
}

fn iieu_bwd_t<T: CudaEl>(
    op: &super::ops::IieuBOp,
    x: Sl<'_>,
    xp: Sl<'_>,
    wp: Sl<'_>,
    dy: Sl<'_>,
) -> CResult<(CudaStorage, Shape)> {
    let name = "iieu_b_bwd";
    let (cfg, [xv, xpv, w], params) = iieu_inputs::<T>(name, op, x, xp, wp)?;
    let dyv = dy_view::<T>(name, dy, x.1)?;
    let st = stream(x.0);
    let (_, saved) = kc::iieu::forward(&st, &cfg, &xv, &xpv, &w, &params).map_err(cerr)?;
    let g = kc::iieu::backward(&st, &cfg, &dyv, &xv, &xpv, &w, &params, &saved).map_err(cerr)?;
    packed_out(
        x.0,
        &st,
        &[
            Part::Dev(&g.dx),
            Part::Dev(&g.dx_pre),
            Part::Dev(&g.dw),
            Part::F32(&g.d_ln_weight),
            Part::F32(&g.d_ln_bias),
            Part::F32(&g.d_eta),
        ],
    )
}

cuda_bwd_op3_dy!(IieuBBwdOp, "iieu_b_bwd", "IieuBOp::bwd", iieu_bwd_t);

/// `IieuBOp::bwd` for CUDA tensors: `(dx, dx_pre, d[W; γ̇; β̇; η])`.
pub(crate) fn iieu_bwd(
    op: &super::ops::IieuBOp,
    x: &Tensor,
    xp: &Tensor,
    wp: &Tensor,
    g: &Tensor,
) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let bop = IieuBBwdOp {
        fwd: *op,
        dy: g.contiguous()?,
    };
    let packed = x.apply_op3_no_bwd(xp, wp, &bop)?;
    let mut v = unpack(&packed, &[x.shape(), xp.shape(), wp.shape()])?.into_iter();
    Ok((v.next(), v.next(), v.next()))
}

// ---------------------------------------------------------------------------
// IIEU-DC

/// IIEU-DC's config, `x`, `res` and the nine parameters on the device as f32.
#[allow(clippy::type_complexity)]
fn dc_inputs<'a, T: CudaEl>(
    name: &str,
    op: &super::ops::IieuDcOp,
    x: Sl<'a>,
    r: Sl<'a>,
    p: Sl<'_>,
) -> CResult<(
    crate::cpu::iieu_dc::DcConfig,
    [CudaView<'a, T>; 2],
    kc::iieu_dc::DcDeviceParams,
)> {
    let cfg = op.config(x.1.dims())?;
    check_dims(name, "res", r.1.dims(), x.1.dims())?;
    cfg.validate().map_err(cerr)?;
    let st = stream(x.0);
    let (xv, rv) = (view::<T>(name, x.0, x.1)?, view::<T>(name, r.0, r.1)?);
    let (c2, hd) = (2 * cfg.c, cfg.hidden);
    let lens = [c2, c2, hd * cfg.c, 2 * hd, 2 * hd, hd, cfg.c * hd, c2, c2];
    let pv = view::<T>(name, p.0, p.1)?;
    let mut parts = f32_parts(name, &st, &pv, &lens)?.into_iter();
    let mut next = || parts.next().ok_or_else(|| op_err(name, "parameters"));
    let dp = kc::iieu_dc::DcDeviceParams {
        ln1_weight: next()?,
        ln1_bias: next()?,
        w1: next()?,
        gamma2: next()?,
        beta2: next()?,
        eta2: next()?,
        w2: next()?,
        ln2_weight: next()?,
        ln2_bias: next()?,
    };
    Ok((cfg, [xv, rv], dp))
}

fn dc_fwd_t<T: CudaEl>(
    op: &super::ops::IieuDcOp,
    x: Sl<'_>,
    r: Sl<'_>,
    p: Sl<'_>,
) -> CResult<(CudaStorage, Shape)> {
    let (cfg, [xv, rv], params) = dc_inputs::<T>("iieu_dc", op, x, r, p)?;
    let st = stream(x.0);
    let (y, _) = kc::iieu_dc::forward(&st, &cfg, &xv, &rv, &params).map_err(cerr)?;
    Ok((wrap(x.0, y), x.1.shape().clone()))
}

/// `IieuDcOp::cuda_fwd`.
pub(crate) fn dc_fwd(
    op: &super::ops::IieuDcOp,
    x: Sl<'_>,
    r: Sl<'_>,
    p: Sl<'_>,
) -> CResult<(CudaStorage, Shape)> {
    by_cuda_dtype!(x.0.dtype(), "iieu_dc", dc_fwd_t(op, x, r, p))
}

/// IIEU-DC backward as an op of `(x, res, parameter pack)`, with `dy` held by the op
/// (as [`IieuBBwdOp`]): output the packed `[dx; dres; d(pack)]` (1-D,
/// `2·numel(x) + ` the pack's length; the pack's gradient in [`IieuDcOp`]'s order).
///
/// [`IieuDcOp`]: super::ops::IieuDcOp
#[derive(Debug, Clone)]
pub struct IieuDcBwdOp {
    /// The forward op.
    pub fwd: super::ops::IieuDcOp,
    /// The output gradient, dims of `x`.
    pub dy: Tensor,
}

fn dc_bwd_t<T: CudaEl>(
    op: &super::ops::IieuDcOp,
    x: Sl<'_>,
    r: Sl<'_>,
    p: Sl<'_>,
    dy: Sl<'_>,
) -> CResult<(CudaStorage, Shape)> {
    let name = "iieu_dc_bwd";
    let (cfg, [xv, rv], params) = dc_inputs::<T>(name, op, x, r, p)?;
    let dyv = dy_view::<T>(name, dy, x.1)?;
    let st = stream(x.0);
    let (_, saved) = kc::iieu_dc::forward(&st, &cfg, &xv, &rv, &params).map_err(cerr)?;
    let g = kc::iieu_dc::backward(&st, &cfg, &dyv, &xv, &rv, &params, &saved).map_err(cerr)?;
    packed_out(
        x.0,
        &st,
        &[
            Part::Dev(&g.dx),
            Part::Dev(&g.dres),
            Part::F32(&g.d_ln1_weight),
            Part::F32(&g.d_ln1_bias),
            Part::F32(&g.d_w1),
            Part::F32(&g.d_gamma2),
            Part::F32(&g.d_beta2),
            Part::F32(&g.d_eta2),
            Part::F32(&g.d_w2),
            Part::F32(&g.d_ln2_weight),
            Part::F32(&g.d_ln2_bias),
        ],
    )
}

cuda_bwd_op3_dy!(IieuDcBwdOp, "iieu_dc_bwd", "IieuDcOp::bwd", dc_bwd_t);

/// `IieuDcOp::bwd` for CUDA tensors: `(dx, dres, d(pack))`.
pub(crate) fn dc_bwd(
    op: &super::ops::IieuDcOp,
    x: &Tensor,
    r: &Tensor,
    p: &Tensor,
    g: &Tensor,
) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let bop = IieuDcBwdOp {
        fwd: *op,
        dy: g.contiguous()?,
    };
    let packed = x.apply_op3_no_bwd(r, p, &bop)?;
    let mut v = unpack(&packed, &[x.shape(), r.shape(), p.shape()])?.into_iter();
    Ok((v.next(), v.next(), v.next()))
}

// ---------------------------------------------------------------------------
// AIEC loss (fixed masks)

/// A contiguous integer tensor an op holds (labels, masks) as a device view of `len`
/// values of `T` (dtype `dt`).
fn held_int<'a, T: CudaDType + cudarc::driver::DeviceRepr>(
    name: &str,
    what: &str,
    dt: CDType,
    (s, l): (&'a CudaStorage, &CLayout),
    len: usize,
) -> CResult<CudaView<'a, T>> {
    if s.dtype() != dt {
        return Err(op_err(
            name,
            format!(
                "{what} must be {dt:?} on the CUDA device, got {:?}",
                s.dtype()
            ),
        ));
    }
    let slice = s.as_cuda_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) if b <= slice.len() && b - a == len => Ok(slice.slice(a..b)),
        _ => Err(op_err(
            name,
            format!("{what} must be {len} contiguous values"),
        )),
    }
}

/// What the AIEC loss forward computes on the device: `a = GAP(τ(F))` (f32 `N × C`),
/// the DMU output, and `Wd` widened to f32.
struct AiecFront {
    shape: crate::ActShape,
    dims: crate::cpu::aiec::AiecDims,
    wd: CudaSlice<f32>,
    a: CudaSlice<f32>,
    dmu: kc::aiec::DeviceDmuOut,
}

/// The labels (`U32`, `N`) and masks (`U8`, `K·C`) of an AIEC loss op as device views.
#[allow(clippy::type_complexity)]
fn aiec_held<'a>(
    name: &str,
    op: &'a super::ops::AiecLossOp,
) -> CResult<(
    (candle_core::StorageRef<'a>, &'a CLayout),
    (candle_core::StorageRef<'a>, &'a CLayout),
)> {
    let lab = held_cuda_what(name, "labels", &op.labels)?;
    let masks = held_cuda_what(name, "masks", &op.masks)?;
    Ok((lab, masks))
}

fn aiec_front<T: CudaEl>(
    name: &str,
    op: &super::ops::AiecLossOp,
    f: &CudaView<'_, T>,
    labels: &CudaView<'_, u32>,
    (s1, l1): Sl<'_>,
    (s2, l2): Sl<'_>,
) -> CResult<AiecFront> {
    let shape = op.check(l1.dims(), l2.dims())?;
    op.cfg.validate().map_err(cerr)?;
    let dims = crate::cpu::aiec::AiecDims::new(shape.n, shape.c, l2.dims()[0]);
    let st = stream(s1);
    let wd = kc::cast::to_f32(&st, &view::<T>(name, s2, l2)?).map_err(cerr)?;
    let act = kc::aiec::tau_forward(&st, f, op.cfg.tau as f32).map_err(cerr)?;
    let a = kc::aiec::global_feature(&st, &shape, &act, op.cfg.pool).map_err(cerr)?;
    let dmu = kc::aiec::dmu_forward(&st, &a, &wd, labels.slice(..), dims).map_err(cerr)?;
    Ok(AiecFront {
        shape,
        dims,
        wd,
        a,
        dmu,
    })
}

fn aiec_loss_fwd_t<T: CudaEl>(
    op: &super::ops::AiecLossOp,
    x: Sl<'_>,
    w: Sl<'_>,
) -> CResult<(CudaStorage, Shape)> {
    let name = "aiec_loss";
    let shape = op.check(x.1.dims(), w.1.dims())?;
    let kc_len = op.masks.elem_count();
    let ((ls, ll), (ms, ml)) = aiec_held(name, op)?;
    let labels = held_int::<u32>(name, "labels", CDType::U32, (as_cuda(&ls), ll), shape.n)?;
    let masks = held_int::<u8>(name, "masks", CDType::U8, (as_cuda(&ms), ml), kc_len)?;
    let f = view::<T>(name, x.0, x.1)?;
    let fr = aiec_front::<T>(name, op, &f, &labels, x, w)?;
    let st = stream(x.0);
    let gate = kc::aiec::gate_loss(&st, &fr.a, &masks, labels.slice(..), fr.dims).map_err(cerr)?;
    // [mean L_aux, mean L_gate, λ_aux·mean L_aux + λ_gate·mean L_gate] on the device
    // (f32, fixed order); the total rounded to T on the device.
    let means = kc::aiec::loss_means_dev(
        &st,
        &fr.dmu.loss.as_view(),
        &gate.as_view(),
        None,
        (op.cfg.lambda_aux, op.cfg.lambda_gate),
        fr.dims.n,
    )
    .map_err(cerr)?;
    let mut out = st.alloc_zeros::<T>(1).map_err(kc_err)?;
    kc::cast::from_f32_into(&st, &means.slice(2..3), &mut out.slice_mut(..)).map_err(cerr)?;
    Ok((wrap(x.0, out), Shape::from(())))
}

/// `AiecLossOp::cuda_fwd`.
pub(crate) fn aiec_loss_fwd(
    op: &super::ops::AiecLossOp,
    s1: &CudaStorage,
    l1: &CLayout,
    s2: &CudaStorage,
    l2: &CLayout,
) -> CResult<(CudaStorage, Shape)> {
    by_cuda_dtype!(
        s1.dtype(),
        "aiec_loss",
        aiec_loss_fwd_t(op, (s1, l1), (s2, l2))
    )
}

/// AIEC loss backward as an op of `(F, Wd, dL)` (`dL` the scalar upstream gradient):
/// output the packed `[dF; dWd]` (1-D, `numel(F) + K·C`). Assembled from the device
/// pieces: `τ` + global feature and DMU forward, then
/// [`kc::aiec::aux_gate_backward`] (DMU and gate terms of `∂L/∂a` in one pass, and
/// `∂L/∂Wd`, with the per-sample weights `dL·λ/N` formed on the device from `dL`),
/// `dF = [F > τ]·global_feature_backward(∂L/∂a)`. Nothing is copied to or from the host.
#[derive(Debug, Clone)]
pub struct AiecLossBwdOp {
    /// The forward op.
    pub fwd: super::ops::AiecLossOp,
}

fn aiec_loss_bwd_t<T: CudaEl>(
    op: &super::ops::AiecLossOp,
    x: Sl<'_>,
    w: Sl<'_>,
    g: Sl<'_>,
) -> CResult<(CudaStorage, Shape)> {
    let name = "aiec_loss_bwd";
    if g.1.shape().elem_count() != 1 {
        return Err(op_err(
            name,
            format!("dL has dims {:?}, expected a scalar", g.1.dims()),
        ));
    }
    let shape = op.check(x.1.dims(), w.1.dims())?;
    let kc_len = op.masks.elem_count();
    let ((ls, ll), (ms, ml)) = aiec_held(name, op)?;
    let labels = held_int::<u32>(name, "labels", CDType::U32, (as_cuda(&ls), ll), shape.n)?;
    let masks = held_int::<u8>(name, "masks", CDType::U8, (as_cuda(&ms), ml), kc_len)?;
    let f = view::<T>(name, x.0, x.1)?;
    let gv = view::<T>(name, g.0, g.1)?;
    let fr = aiec_front::<T>(name, op, &f, &labels, x, w)?;
    let st = stream(x.0);
    let scale = kc::cast::to_f32(&st, &gv).map_err(cerr)?;
    let gr = kc::aiec::aux_gate_backward(
        &st,
        &fr.a,
        &fr.wd,
        &fr.dmu.probs,
        &masks,
        labels.slice(..),
        &scale,
        (op.cfg.lambda_aux, op.cfg.lambda_gate),
        fr.dims,
    )
    .map_err(cerr)?;
    let d_act = kc::aiec::global_feature_backward::<T>(&st, &fr.shape, &gr.da, op.cfg.pool)
        .map_err(cerr)?;
    let df = kc::aiec::tau_backward(&st, &d_act, &f, op.cfg.tau as f32).map_err(cerr)?;
    packed_out(x.0, &st, &[Part::Dev(&df), Part::F32(&gr.dwd)])
}

cuda_bwd_op3!(
    AiecLossBwdOp,
    "aiec_loss_bwd",
    "AiecLossOp::bwd",
    aiec_loss_bwd_t
);

/// `AiecLossOp::bwd` for CUDA tensors: `(dF, dWd)`.
pub(crate) fn aiec_loss_bwd(
    op: &super::ops::AiecLossOp,
    f: &Tensor,
    wd: &Tensor,
    g: &Tensor,
) -> CResult<(Option<Tensor>, Option<Tensor>)> {
    let bop = AiecLossBwdOp { fwd: op.clone() };
    let packed = f.apply_op3_no_bwd(wd, &g.contiguous()?, &bop)?;
    let mut v = unpack(&packed, &[f.shape(), wd.shape()])?.into_iter();
    Ok((v.next(), v.next()))
}

// ---------------------------------------------------------------------------
// IieuConv2d

/// IieuConv2d's config, `x_pre`, `W` and the parameters on the device as f32 (the pack
/// widened on the device: no host copy).
#[allow(clippy::type_complexity)]
fn iieu_conv_inputs<'a, T: CudaEl>(
    name: &str,
    op: &super::iieu_conv_ops::IieuConvOp,
    xp: Sl<'a>,
    w: Sl<'a>,
    p: Sl<'a>,
) -> CResult<(
    crate::cpu::iieu::IieuConfig,
    [CudaView<'a, T>; 2],
    kc::iieu_conv::IieuConvDeviceParams,
)> {
    use super::iieu_conv_ops::IieuConvPsiSpec as Spec;
    use kc::iieu_conv::{DeviceBatchNorm, DevicePsi};
    let cfg = op.config(xp.1.dims())?;
    check_dims(name, "w", w.1.dims(), &op.w_dims)?;
    let st = stream(xp.0);
    let (xpv, wv, pv) = (
        view::<T>(name, xp.0, xp.1)?,
        view::<T>(name, w.0, w.1)?,
        view::<T>(name, p.0, p.1)?,
    );
    let o = op.w_dims[0];
    let k = op.psi.n_vectors();
    let plen = op.psi.pack_len(o);
    if pv.len() != plen {
        return Err(op_err(
            name,
            format!(
                "packed parameters have {} elements, expected {plen}",
                pv.len()
            ),
        ));
    }
    let part = |i: usize| kc::cast::to_f32(&st, &pv.slice(i * o..(i + 1) * o)).map_err(cerr);
    let psi = match &op.psi {
        Spec::None => DevicePsi::None,
        Spec::Bias => DevicePsi::Bias(part(0)?),
        Spec::Affine => DevicePsi::Affine {
            scale: part(0)?,
            shift: part(1)?,
        },
        Spec::BatchNorm {
            momentum,
            eps,
            training,
        } => DevicePsi::BatchNorm(DeviceBatchNorm {
            weight: part(0)?,
            bias: part(1)?,
            running_mean: part(k + 3)?,
            running_var: part(k + 4)?,
            momentum: *momentum,
            eps: *eps,
            training: *training,
        }),
    };
    let params = kc::iieu_conv::IieuConvDeviceParams {
        iieu: kc::iieu::IieuDeviceParams {
            ln_weight: part(k)?,
            ln_bias: part(k + 1)?,
            eta: part(k + 2)?,
        },
        psi,
    };
    Ok((cfg, [xpv, wv], params))
}

fn iieu_conv_fwd_t<T: CudaEl>(
    op: &super::iieu_conv_ops::IieuConvOp,
    xp: Sl<'_>,
    w: Sl<'_>,
    p: Sl<'_>,
) -> CResult<(CudaStorage, Shape)> {
    let name = "iieu_conv2d";
    let (cfg, [xpv, wv], mut params) = iieu_conv_inputs::<T>(name, op, xp, w, p)?;
    let st = stream(xp.0);
    let (y, _) = kc::iieu_conv::forward(&st, &cfg, &xpv, &wv, &mut params).map_err(cerr)?;
    if let kc::iieu_conv::DevicePsi::BatchNorm(bn) = &params.psi {
        if bn.training {
            let narrow = |v: &CudaSlice<f32>| -> CResult<CudaStorage> {
                let mut out = st.alloc_zeros::<T>(v.len()).map_err(kc_err)?;
                kc::cast::from_f32_into(&st, v, &mut out.slice_mut(..)).map_err(cerr)?;
                Ok(wrap(xp.0, out))
            };
            let running = super::iieu_conv_ops::Running::Device(
                Box::new((narrow(&bn.running_mean)?, narrow(&bn.running_var)?)),
                bn.running_mean.len(),
            );
            let mut slot = op
                .running_out
                .lock()
                .map_err(|_| op_err(name, "running-stat slot poisoned"))?;
            *slot = Some(running);
        }
    }
    let (oh, ow) = cfg.validate().map_err(cerr)?;
    let g = cfg.geometry;
    Ok((wrap(xp.0, y), Shape::from((g.n, g.c_out, oh, ow))))
}

/// `IieuConvOp::cuda_fwd`.
pub(crate) fn iieu_conv_fwd(
    op: &super::iieu_conv_ops::IieuConvOp,
    xp: Sl<'_>,
    w: Sl<'_>,
    p: Sl<'_>,
) -> CResult<(CudaStorage, Shape)> {
    by_cuda_dtype!(xp.0.dtype(), "iieu_conv2d", iieu_conv_fwd_t(op, xp, w, p))
}

/// IieuConv2d backward as an op of `(x_pre, W, pack)`, with `dy` held by the op:
/// output the packed `[dx_pre; dW; dpack]` (1-D), `dpack` =
/// `[dψ scale; dψ shift; dγ̇; dβ̇; dη; 0 (running statistics)]`. The forward is re-run
/// on a private copy of the parameters (BatchNorm's running statistics are not updated
/// a second time).
#[derive(Debug, Clone)]
pub struct IieuConvBwdOp {
    /// The forward op.
    pub fwd: super::iieu_conv_ops::IieuConvOp,
    /// The output gradient, dims of `y`.
    pub dy: Tensor,
}

fn iieu_conv_bwd_t<T: CudaEl>(
    op: &super::iieu_conv_ops::IieuConvOp,
    xp: Sl<'_>,
    w: Sl<'_>,
    p: Sl<'_>,
    dy: Sl<'_>,
) -> CResult<(CudaStorage, Shape)> {
    let name = "iieu_conv2d_bwd";
    let (cfg, [xpv, wv], mut params) = iieu_conv_inputs::<T>(name, op, xp, w, p)?;
    let (oh, ow) = cfg.validate().map_err(cerr)?;
    let g = cfg.geometry;
    check_dims(name, "dy", dy.1.dims(), &[g.n, g.c_out, oh, ow])?;
    let dyv = view::<T>(name, dy.0, dy.1)?;
    let st = stream(xp.0);
    let (_, saved) = kc::iieu_conv::forward(&st, &cfg, &xpv, &wv, &mut params).map_err(cerr)?;
    let gr = kc::iieu_conv::backward(&st, &cfg, &dyv, &xpv, &wv, &params, &saved).map_err(cerr)?;
    let mut parts = vec![Part::Dev(&gr.dx_pre), Part::Dev(&gr.dw)];
    if let Some(d) = &gr.d_psi_scale {
        parts.push(Part::F32(d));
    }
    if let Some(d) = &gr.d_psi_shift {
        parts.push(Part::F32(d));
    }
    parts.extend([
        Part::F32(&gr.d_ln_weight),
        Part::F32(&gr.d_ln_bias),
        Part::F32(&gr.d_eta),
        Part::Zeros(op.fwd_running_len()),
    ]);
    packed_out(xp.0, &st, &parts)
}

cuda_bwd_op3_dy!(
    IieuConvBwdOp,
    "iieu_conv2d_bwd",
    "IieuConvOp::bwd",
    iieu_conv_bwd_t
);

/// `IieuConvOp::bwd` for CUDA tensors: `(dx_pre, dW, dpack)`.
pub(crate) fn iieu_conv_bwd(
    op: &super::iieu_conv_ops::IieuConvOp,
    xp: &Tensor,
    w: &Tensor,
    p: &Tensor,
    g: &Tensor,
) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let bop = IieuConvBwdOp {
        fwd: op.clone(),
        dy: g.contiguous()?,
    };
    let packed = xp.apply_op3_no_bwd(w, p, &bop)?;
    let mut v = unpack(&packed, &[xp.shape(), w.shape(), p.shape()])?.into_iter();
    Ok((v.next(), v.next(), v.next()))
}

// ---------------------------------------------------------------------------
// The `Aiec` module's training step on the device

/// `nn::Aiec`'s counter / mask step on a CUDA device (SPEC §3 order, counters on the
/// device, nothing copied between host and device): runs
/// [`kc::aiec::train_forward`]'s kernels without writing `A` and returns the masks
/// (`U8`, dims of `Wd`) and the loss stats (`F32`, `(4,)`: mean `L_aux`, mean
/// `L_gate`, their weighted total, DMU accuracy) as tensors on the device.
pub(crate) fn aiec_module_step(
    cfg: &crate::cpu::aiec::AiecConfig,
    layout: crate::Layout,
    f: &Tensor,
    wd: &Tensor,
    labels: &Tensor,
    counters: &mut kc::aiec::DeviceCounters,
) -> CResult<(Tensor, Tensor)> {
    let name = "aiec";
    cfg.validate().map_err(cerr)?;
    let shape = act_shape(name, f.dims(), layout)?;
    check_dims(
        name,
        "wd",
        wd.dims(),
        &[counters.classes(), counters.channels()],
    )?;
    if counters.channels() != shape.c {
        return Err(op_err(
            name,
            format!("F has {} channels, Wd {}", shape.c, counters.channels()),
        ));
    }
    if labels.dims() != [shape.n] {
        return Err(op_err(
            name,
            format!(
                "labels have dims {:?}, expected ({},)",
                labels.dims(),
                shape.n
            ),
        ));
    }
    let (f, wd, labels) = (f.contiguous()?, wd.contiguous()?, labels.contiguous()?);
    let fs = held_cuda_what(name, "F", &f)?;
    let ws = held_cuda_what(name, "wd", &wd)?;
    let ls = held_cuda_what(name, "labels", &labels)?;
    let (fst, wst, lst) = (as_cuda(&fs.0), as_cuda(&ws.0), as_cuda(&ls.0));
    let lv = held_int::<u32>(name, "labels", CDType::U32, (lst, ls.1), shape.n)?;
    let (masks, stats) = by_cuda_dtype!(
        fst.dtype(),
        name,
        aiec_step_t(cfg, &shape, (fst, fs.1), (wst, ws.1), lv, counters)
    )?;
    let dev = fst.device().clone();
    let k = counters.classes();
    let wrap_t = |s: CudaStorage, shape: Shape| {
        Tensor::from_storage(
            candle_core::Storage::Cuda(s),
            shape,
            candle_core::op::BackpropOp::none(),
            false,
        )
    };
    let masks = wrap_t(
        CudaStorage::wrap_cuda_slice(masks, dev.clone()),
        Shape::from((k, shape.c)),
    );
    let stats = wrap_t(CudaStorage::wrap_cuda_slice(stats, dev), Shape::from(4));
    Ok((masks, stats))
}

fn aiec_step_t<T: CudaEl>(
    cfg: &crate::cpu::aiec::AiecConfig,
    shape: &crate::ActShape,
    f: Sl<'_>,
    wd: Sl<'_>,
    labels: CudaView<'_, u32>,
    counters: &mut kc::aiec::DeviceCounters,
) -> CResult<(CudaSlice<u8>, CudaSlice<f32>)> {
    let name = "aiec";
    let fv = view::<T>(name, f.0, f.1)?;
    let wv = view::<T>(name, wd.0, wd.1)?;
    let st = stream(f.0);
    let wd32 = kc::cast::to_f32(&st, &wv).map_err(cerr)?;
    let (_, losses, saved) =
        kc::aiec::train_step(&st, cfg, shape, &fv, &wd32, labels, counters, false).map_err(cerr)?;
    Ok((saved.into_masks(), losses.means))
}
