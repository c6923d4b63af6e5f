//! The burn ops on burn's CUDA backend (feature `burn-cuda`): [`super::AkBackend`] and
//! [`super::AkAutodiffInner`] for burn's CubeCL backend `Cube` on a CUDA device run this
//! crate's kernels ([`crate::cuda`]) on burn's own device buffers. The same design as
//! the candle integration (`src/candle/cuda.rs`): device pointers in, the crate's
//! launchers on a stream, device tensors out.
//!
//! * Ops on the device: ACON-C, ACON-B and ACON-A with every β source (per channel,
//!   per (sample, channel), per sample, pixel-wise), forward and backward. Any other
//!   op family on a `Cube` tensor is an `Err` naming the op (no silent host fallback);
//!   it follows the same pattern (see `docs/burn.md#cuda`).
//! * Dtypes: `f32`, `f16`, `bf16` (burn's CUDA backend has no `f64`). Parameters and β
//!   are widened to f32 on the device ([`crate::cuda::cast`], one small launch each),
//!   parameter gradients rounded back to the tensor dtype on the device.
//! * Buffers: each input is made contiguous (`into_contiguous`, a CubeCL kernel, only
//!   for a strided tensor), and its raw device pointer taken with
//!   `Client::get_resource` (cubecl-cuda's `GpuResource::ptr`, the handle's offset
//!   included). The pointer is wrapped in a cudarc `CudaSlice` for the launch and
//!   *leaked* afterwards (never freed by cudarc); the `ManagedResource` held beside it
//!   keeps CubeCL from freeing, reusing or moving the allocation meanwhile. Outputs are
//!   allocated by CubeCL (`Client::empty`), so burn owns them; the crate's result is
//!   copied into them device to device (or cast into them, for f32 parameter gradients).
//!   Nothing is copied to or from the host.
//! * Context: cubecl-cuda 0.11 and this crate use the same cudarc (0.19.10) and the
//!   device's *primary* context, so the pointers are valid in both. The crate's kernels
//!   run on one stream per device of its own ([`stream_for`]).
//!
//! # Synchronization
//!
//! CubeCL's streams are private to its server: nothing outside can make them wait on
//! an event of ours, nor make ours wait on theirs. So every op (forward or backward) is
//! bracketed by two host-blocking waits:
//!
//! 1. after the outputs are allocated and every pointer is taken, `Cube::sync(device)`
//!    (CubeCL's device barrier: every launch burn queued before — the ones writing our
//!    inputs, and any still reading memory CubeCL may hand out again — has finished);
//! 2. the crate's kernels (and the device-to-device copies into the outputs) run on the
//!    crate's stream; then that stream is synchronized, so when the output tensors go
//!    back to burn, their contents are written and our reads of the inputs are done
//!    (CubeCL may reuse the inputs' memory as soon as they are dropped).
//!
//! The waits cost latency (two host round trips of a synchronization, no data), not
//! correctness; an event-based ordering would need CubeCL to expose its stream.
//!
//! # Fusion
//!
//! burn's `fusion` feature (on by default in burn-cuda, off here: this crate takes burn
//! with default features off) wraps `Cube` in `Fusion<Cube>`, a backend this extension
//! does not list: with fusion on, a call panics in burn's dispatch. Build burn without
//! `fusion` (the default of this crate's `burn-cuda` feature), or add a `Fusion` arm
//! (`#[backend_extension(.., Fusion)]` with `#[fusion(meta = ..)]` output metadata).
//!
//! # Testing
//!
//! Not run on the emulated device: cubecl-cuda 0.11 links LLVM statically (cubecl-llvm,
//! a prebuilt LLVM its build script downloads from GitHub), so a test binary cannot be
//! linked without that download, and CubeCL's own kernels (`into_contiguous`, burn's
//! elementwise ops in a model) are PTX the emulated device cannot run. CI only
//! type-checks and lints this module; `tests/burn_cuda.rs` runs on a real GPU
//! (`scripts/gpu-check.sh`). See `docs/burn.md#cuda`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Cube, DType, Shape, TensorMetadata};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeDevice;
use cubecl_cuda::CudaRuntime;
use cubecl_runtime::runtime::Runtime;

use super::backend::AkSaved;
use super::kernel::{BetaAxis, HostOp, OpKind};
use crate::cuda::acon::{self as dacon, Beta as DBeta};
use crate::cuda::{self as kc, CudaContext, CudaSlice, CudaStream, DType as KDType};
use crate::error::check_len;
use crate::{ActShape, Error, Result};

/// cubecl-cuda's compute server (private in cubecl-cuda; named through its runtime).
type CudaServer = <CudaRuntime as Runtime>::Server;

/// The crate's stream on CUDA device `ordinal` (one per device, made once, on the
/// device's primary context — the one CubeCL uses).
pub fn stream_for(ordinal: usize) -> Result<Arc<CudaStream>> {
    static STREAMS: OnceLock<Mutex<HashMap<usize, Arc<CudaStream>>>> = OnceLock::new();
    let map = STREAMS.get_or_init(Default::default);
    // A poisoned lock only means another thread panicked while holding it; the map
    // holds whole entries only.
    let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = m.get(&ordinal) {
        return Ok(s.clone());
    }
    let s = CudaContext::new(ordinal)?.new_stream()?;
    m.insert(ordinal, s.clone());
    Ok(s)
}

fn cube_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Driver(format!("burn CUDA backend: {what}: {e:?}"))
}

/// The CUDA ordinal of a `Cube` device; any other CubeCL runtime is an error.
fn cuda_ordinal(device: &CubeDevice) -> Result<usize> {
    match device {
        CubeDevice::Cuda(d) => Ok(d.index),
        other => Err(Error::InvalidParam {
            what: "device",
            msg: format!(
                "the activation-kernels burn ops run on CubeCL's CUDA runtime only, got {other:?}"
            ),
        }),
    }
}

/// A CubeCL buffer seen as a cudarc slice for the duration of one op. The slice is
/// leaked on drop (CubeCL owns the memory); `_res` keeps CubeCL from freeing, reusing
/// or moving the allocation while the slice exists.
struct Borrowed<T, R> {
    slice: Option<CudaSlice<T>>,
    _res: R,
}

impl<T, R> Borrowed<T, R> {
    fn get(&self) -> &CudaSlice<T> {
        // Set at construction, taken only in `drop`.
        self.slice.as_ref().unwrap_or_else(|| unreachable!())
    }
    fn get_mut(&mut self) -> &mut CudaSlice<T> {
        self.slice.as_mut().unwrap_or_else(|| unreachable!())
    }
}

impl<T, R> Drop for Borrowed<T, R> {
    fn drop(&mut self) {
        if let Some(s) = self.slice.take() {
            // Work of ours still queued on the stream may use the buffer: wait for it
            // before CubeCL may reuse the memory (`_res` dropped after this), also where
            // an op returns early on an error after a launch. On the success paths the
            // stream was synchronized already, and this is a no-op wait.
            let _ = s.stream().synchronize();
            // CubeCL's memory: cudarc must not free it.
            let _ = s.leak();
        }
    }
}

/// The first `len` elements of `t`'s buffer as a `CudaSlice<T>` on `st`.
fn borrow<T>(st: &Arc<CudaStream>, t: &CubeTensor, len: usize) -> Result<Borrowed<T, impl Sized>> {
    let res = t
        .client
        .get_resource::<CudaServer>(t.handle.clone())
        .map_err(|e| cube_err("a tensor's device buffer", e))?;
    let (ptr, size) = (res.resource().ptr, res.resource().size);
    let bytes = len * std::mem::size_of::<T>();
    if (size as usize) < bytes {
        return Err(cube_err(
            "a tensor's device buffer",
            format!("{size} bytes, {bytes} needed"),
        ));
    }
    // SAFETY: `ptr` is a live device allocation of CubeCL's on the device's primary
    // context (the one `st` belongs to) with at least `len · size_of::<T>()` bytes
    // (checked above), held in place by `res` for the lifetime of the returned value;
    // the slice is leaked, never freed, on drop (`Borrowed::drop`).
    let slice = unsafe { st.upgrade_device_ptr::<T>(ptr, len) };
    Ok(Borrowed {
        slice: Some(slice),
        _res: res,
    })
}

/// The element type of a burn dtype, as a runtime tag.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum El {
    F32,
    F16,
    Bf16,
}

fn el_of(dtype: DType) -> Result<El> {
    match dtype {
        DType::F32 | DType::Flex32 => Ok(El::F32),
        DType::F16 => Ok(El::F16),
        DType::BF16 => Ok(El::Bf16),
        dt => Err(Error::InvalidParam {
            what: "dtype",
            msg: format!("{dt:?} is not supported on burn's CUDA backend (f32, f16 or bf16)"),
        }),
    }
}

/// One op's device context: the tensors' device, client, the crate's stream, dtype.
struct Ctx {
    device: CubeDevice,
    client: cubecl_runtime::client::Client,
    st: Arc<CudaStream>,
    dtype: DType,
}

impl Ctx {
    fn of(t: &CubeTensor) -> Result<Self> {
        Ok(Self {
            device: t.device.clone(),
            client: t.client.clone(),
            st: stream_for(cuda_ordinal(&t.device)?)?,
            dtype: t.dtype,
        })
    }

    /// A new contiguous output of `dims` in the op's dtype, allocated by CubeCL.
    fn output(&self, dims: &[usize]) -> CubeTensor {
        let n: usize = dims.iter().product();
        let handle = self.client.empty(n * self.dtype.size());
        CubeTensor::new_contiguous(
            self.client.clone(),
            self.device.clone(),
            Shape::from(dims.to_vec()),
            handle,
            self.dtype,
        )
    }

    /// Step 1 of the synchronization: CubeCL's device barrier.
    fn cube_barrier(&self) -> Result<()> {
        Cube::sync(&self.device).map_err(|e| cube_err("CubeCL's device barrier", e))
    }

    /// Step 2: wait for the crate's stream.
    fn stream_barrier(&self) -> Result<()> {
        self.st.synchronize().map_err(Error::from)
    }
}

fn numel(t: &CubeTensor) -> usize {
    t.shape().num_elements()
}

/// The op's inputs, contiguous, all of the first one's dtype and device.
fn prepare(op: &HostOp, ins: Vec<CubeTensor>) -> Result<(Ctx, Vec<CubeTensor>)> {
    let ins: Vec<CubeTensor> = ins
        .into_iter()
        .take(op.arity())
        .map(burn_cubecl::kernel::into_contiguous)
        .collect();
    let first = ins.first().ok_or(Error::Empty { what: "inputs" })?;
    let ctx = Ctx::of(first)?;
    el_of(ctx.dtype)?;
    for t in &ins {
        if t.dtype != ctx.dtype {
            return Err(Error::InvalidParam {
                what: "dtype",
                msg: "all tensors of one op must have the same float dtype".into(),
            });
        }
        if t.device != ctx.device {
            return Err(Error::InvalidParam {
                what: "device",
                msg: "all tensors of one op must be on the same device".into(),
            });
        }
    }
    Ok((ctx, ins))
}

/// The ACON op families this module runs on the device: `(variant, shape, β axis)`.
#[derive(Clone, Copy)]
enum Acon {
    A,
    B,
    C,
}

fn acon_of(kind: &OpKind) -> Option<(Acon, ActShape, BetaAxis)> {
    match kind {
        OpKind::AconA { shape, beta } => Some((Acon::A, *shape, *beta)),
        OpKind::AconB { shape, beta } => Some((Acon::B, *shape, *beta)),
        OpKind::AconC { shape, beta } => Some((Acon::C, *shape, *beta)),
        _ => None,
    }
}

fn not_on_cuda(kind: &OpKind) -> Error {
    let name = format!("{kind:?}");
    let name = name.split([' ', '{', '(']).next().unwrap_or("this op");
    Error::InvalidParam {
        what: "backend",
        msg: format!(
            "{name} has no CUDA path on burn's CUDA backend yet (ACON-A/B/C have); \
             run it on burn's CPU backend (Device::flex())"
        ),
    }
}

/// The device β of an ACON op from its (f32) buffer.
fn dbeta(axis: BetaAxis, b: Option<&CudaSlice<f32>>) -> DBeta<'_> {
    match (axis, b) {
        (BetaAxis::PerChannel, Some(b)) => DBeta::PerChannel(b),
        (BetaAxis::PerSampleChannel, Some(b)) => DBeta::PerSampleChannel(b),
        (BetaAxis::PerSample, Some(b)) => DBeta::PerSample(b),
        // The arity is fixed by the axis (HostOp::arity): no buffer only pixel-wise.
        _ => DBeta::PixelWise,
    }
}

/// The forward state kept for the backward: the contiguous input tensors (handles:
/// the device buffers stay alive while the autodiff graph holds them).
struct CubeSaved {
    ins: Vec<CubeTensor>,
}

/// Forward of `op` on `Cube` tensors: the output and, on success, the state for
/// [`backward`]. An error (bad input, an op without a CUDA path, a driver error) is
/// recorded in `op` and the output is zeros (written by the crate's stream).
pub(crate) fn forward(
    op: &HostOp,
    ins: Vec<FloatTensor<Cube>>,
) -> (FloatTensor<Cube>, Option<AkSaved>) {
    let device = ins[0].device.clone();
    let client = ins[0].client.clone();
    let dtype = ins[0].dtype;
    match try_forward(op, ins) {
        Ok((out, saved)) => (out, Some(Arc::new(saved) as AkSaved)),
        Err(e) => {
            op.fail(e);
            (zeros(&device, &client, dtype, &op.out_dims), None)
        }
    }
}

/// A zero tensor for a failed forward, memset on the crate's stream (no CubeCL kernel);
/// if even that fails (no CUDA device behind `device`), CubeCL's own zeros.
fn zeros(
    device: &CubeDevice,
    client: &cubecl_runtime::client::Client,
    dtype: DType,
    dims: &[usize],
) -> CubeTensor {
    let fill = || -> Result<CubeTensor> {
        let ctx = Ctx {
            device: device.clone(),
            client: client.clone(),
            st: stream_for(cuda_ordinal(device)?)?,
            dtype,
        };
        let out = ctx.output(dims);
        let bytes = numel(&out) * dtype.size();
        let mut b = borrow::<u8>(&ctx.st, &out, bytes)?;
        ctx.cube_barrier()?;
        ctx.st.memset_zeros(b.get_mut())?;
        ctx.stream_barrier()?;
        drop(b);
        Ok(out)
    };
    fill().unwrap_or_else(|_| backend_zeros::<Cube>(device, dtype, dims))
}

/// The backend's own zeros (a CubeCL fill kernel on `Cube`).
fn backend_zeros<B: Backend>(device: &B::Device, dtype: DType, dims: &[usize]) -> FloatTensor<B> {
    // f32 where `dtype` is not a float type (a quantized input: `into` would panic).
    let fd = if dtype.is_float() {
        dtype.into()
    } else {
        DType::F32.into()
    };
    B::float_zeros(Shape::from(dims.to_vec()), device, fd)
}

/// Every length of an ACON op checked on the host, before any launch (the cast of the
/// parameters to f32 runs before the crate's launcher, which checks them again).
fn validate_acon(acon: Acon, shape: &ActShape, axis: BetaAxis, ins: &[CubeTensor]) -> Result<()> {
    shape.validate("x", numel(&ins[0]))?;
    let names: &[&'static str] = match acon {
        Acon::A => &[],
        Acon::B => &["p"],
        Acon::C => &["p1", "p2"],
    };
    for (what, t) in names.iter().zip(&ins[1..]) {
        check_len(what, shape.c, numel(t))?;
    }
    let beta_len = match axis {
        BetaAxis::PerChannel => Some(shape.c),
        BetaAxis::PerSampleChannel => Some(shape.n * shape.c),
        BetaAxis::PerSample => Some(shape.n),
        BetaAxis::PixelWise => None,
    };
    if let (Some(want), Some(b)) = (beta_len, ins.get(1 + names.len())) {
        check_len("beta", want, numel(b))?;
    }
    Ok(())
}

fn try_forward(op: &HostOp, ins: Vec<CubeTensor>) -> Result<(CubeTensor, CubeSaved)> {
    let (acon, shape, axis) = acon_of(&op.kind).ok_or_else(|| not_on_cuda(&op.kind))?;
    let (ctx, ins) = prepare(op, ins)?;
    validate_acon(acon, &shape, axis, &ins)?;
    let out = match el_of(ctx.dtype)? {
        El::F32 => acon_forward::<f32>(&ctx, acon, &shape, axis, &ins, &op.out_dims)?,
        El::F16 => acon_forward::<half::f16>(&ctx, acon, &shape, axis, &ins, &op.out_dims)?,
        El::Bf16 => acon_forward::<half::bf16>(&ctx, acon, &shape, axis, &ins, &op.out_dims)?,
    };
    Ok((out, CubeSaved { ins }))
}

/// The ACON forward: `ins` = `x`, the variant's parameters (`p1, p2` / `p` / none),
/// then β unless pixel-wise.
fn acon_forward<T: KDType>(
    ctx: &Ctx,
    acon: Acon,
    shape: &ActShape,
    axis: BetaAxis,
    ins: &[CubeTensor],
    out_dims: &[usize],
) -> Result<CubeTensor> {
    // Pointers first (allocations resolved), then CubeCL's barrier, then our launches.
    let x = borrow::<T>(&ctx.st, &ins[0], numel(&ins[0]))?;
    let rest = ins[1..]
        .iter()
        .map(|t| borrow::<T>(&ctx.st, t, numel(t)))
        .collect::<Result<Vec<_>>>()?;
    let out = ctx.output(out_dims);
    let mut y_dev = borrow::<T>(&ctx.st, &out, numel(&out))?;
    ctx.cube_barrier()?;

    // Parameters and β in f32 on the device (one small cast launch each).
    let f32s = rest
        .iter()
        .map(|b| kc::cast::to_f32(&ctx.st, b.get()))
        .collect::<Result<Vec<_>>>()?;
    let (params, beta_buf) = match (acon, axis) {
        (Acon::A, BetaAxis::PixelWise) => (&f32s[..0], None),
        (Acon::A, _) => (&f32s[..0], f32s.first()),
        (Acon::B, BetaAxis::PixelWise) => (&f32s[..1], None),
        (Acon::B, _) => (&f32s[..1], f32s.get(1)),
        (Acon::C, BetaAxis::PixelWise) => (&f32s[..2], None),
        (Acon::C, _) => (&f32s[..2], f32s.get(2)),
    };
    let beta = dbeta(axis, beta_buf);
    let y = match acon {
        Acon::A => dacon::acon_a_forward(&ctx.st, shape, x.get(), beta)?,
        Acon::B => dacon::acon_b_forward(&ctx.st, shape, x.get(), &params[0], beta)?,
        Acon::C => dacon::acon_c_forward(&ctx.st, shape, x.get(), &params[0], &params[1], beta)?,
    };
    ctx.st.memcpy_dtod(&y, y_dev.get_mut())?;
    ctx.stream_barrier()?;
    drop((x, rest, y_dev));
    Ok(out)
}

/// Backward of `op` on `Cube` tensors: the gradients of its first `arity()` inputs,
/// shaped `in_dims`, computed by the crate's CUDA backward on the device.
pub(crate) fn backward(
    op: &HostOp,
    saved: &AkSaved,
    dout: FloatTensor<Cube>,
    in_dims: &[Vec<usize>],
) -> Vec<FloatTensor<Cube>> {
    let Some(saved) = saved.downcast_ref::<CubeSaved>() else {
        panic!("activation-kernels burn backward: the forward state is not the CUDA backend's");
    };
    // The forward succeeded on these inputs, so the backward can fail only on an
    // internal inconsistency or a driver error.
    try_backward(op, saved, dout, in_dims)
        .unwrap_or_else(|e| panic!("activation-kernels burn CUDA backward: {e}"))
}

fn try_backward(
    op: &HostOp,
    saved: &CubeSaved,
    dout: CubeTensor,
    in_dims: &[Vec<usize>],
) -> Result<Vec<CubeTensor>> {
    let (acon, shape, axis) = acon_of(&op.kind).ok_or_else(|| not_on_cuda(&op.kind))?;
    let dout = burn_cubecl::kernel::into_contiguous(dout);
    let ctx = Ctx::of(&saved.ins[0])?;
    if dout.dtype != ctx.dtype {
        return Err(cube_err(
            "the output gradient",
            "dtype differs from the forward's",
        ));
    }
    match el_of(ctx.dtype)? {
        El::F32 => acon_backward::<f32>(&ctx, acon, &shape, axis, &saved.ins, &dout, in_dims),
        El::F16 => acon_backward::<half::f16>(&ctx, acon, &shape, axis, &saved.ins, &dout, in_dims),
        El::Bf16 => {
            acon_backward::<half::bf16>(&ctx, acon, &shape, axis, &saved.ins, &dout, in_dims)
        }
    }
}

/// The ACON backward: gradients in input order (`dx`, the parameters', then `dβ`
/// unless pixel-wise, whose β path is inside `dx`).
fn acon_backward<T: KDType>(
    ctx: &Ctx,
    acon: Acon,
    shape: &ActShape,
    axis: BetaAxis,
    ins: &[CubeTensor],
    dout: &CubeTensor,
    in_dims: &[Vec<usize>],
) -> Result<Vec<CubeTensor>> {
    let x = borrow::<T>(&ctx.st, &ins[0], numel(&ins[0]))?;
    let rest = ins[1..]
        .iter()
        .map(|t| borrow::<T>(&ctx.st, t, numel(t)))
        .collect::<Result<Vec<_>>>()?;
    let dy = borrow::<T>(&ctx.st, dout, numel(dout))?;
    let outs: Vec<CubeTensor> = in_dims.iter().map(|d| ctx.output(d)).collect();
    let mut out_dev = outs
        .iter()
        .map(|t| borrow::<T>(&ctx.st, t, numel(t)))
        .collect::<Result<Vec<_>>>()?;
    ctx.cube_barrier()?;

    let f32s = rest
        .iter()
        .map(|b| kc::cast::to_f32(&ctx.st, b.get()))
        .collect::<Result<Vec<_>>>()?;
    let n_params = match acon {
        Acon::A => 0,
        Acon::B => 1,
        Acon::C => 2,
    };
    let beta = dbeta(axis, f32s.get(n_params));
    // dx in T, the parameter and β gradients in f32.
    let (dx, param_grads): (CudaSlice<T>, Vec<CudaSlice<f32>>) = match acon {
        Acon::A => {
            let g = dacon::acon_a_backward(&ctx.st, shape, dy.get(), x.get(), beta)?;
            (g.dx, g.dbeta.into_iter().collect())
        }
        Acon::B => {
            let g = dacon::acon_b_backward(&ctx.st, shape, dy.get(), x.get(), &f32s[0], beta)?;
            (g.dx, std::iter::once(g.dp).chain(g.dbeta).collect())
        }
        Acon::C => {
            let g = dacon::acon_c_backward(
                &ctx.st,
                shape,
                dy.get(),
                x.get(),
                &f32s[0],
                &f32s[1],
                beta,
            )?;
            (g.dx, [g.dp1, g.dp2].into_iter().chain(g.dbeta).collect())
        }
    };
    if param_grads.len() + 1 != out_dev.len() {
        return Err(cube_err(
            "internal",
            format!(
                "{} gradients for {} inputs",
                param_grads.len() + 1,
                out_dev.len()
            ),
        ));
    }
    let (dx_dev, p_dev) = out_dev.split_at_mut(1);
    ctx.st.memcpy_dtod(&dx, dx_dev[0].get_mut())?;
    for (g, o) in param_grads.iter().zip(p_dev.iter_mut()) {
        kc::cast::from_f32_into(&ctx.st, g, &mut o.get_mut().slice_mut(..))?;
    }
    ctx.stream_barrier()?;
    drop((x, rest, dy, out_dev));
    Ok(outs)
}
