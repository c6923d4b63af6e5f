//! The burn ops on burn's CUDA backend (feature `burn-cuda`): [`super::AkBackend`] and
//! [`super::AkAutodiffInner`] for burn's CubeCL backend `Cube` on a CUDA device run this
//! crate's kernels ([`crate::cuda`]) on burn's own device buffers. The same design as
//! the candle integration (`src/candle/cuda.rs`): device pointers in, the crate's
//! launchers on a stream, device tensors out.
//!
//! * Ops on the device: every op family, forward and backward — ACON-C, ACON-B and
//!   ACON-A with every β source (per channel, per (sample, channel), per sample,
//!   pixel-wise), the meta-ACON generators (layer-wise, channel-wise with or without
//!   biases), TAU, IIEU-B, IIEU-DC, the fused IieuConv2d (every ψ, BatchNorm in training
//!   and eval mode) and the AIEC training step — through the crate's CUDA ops
//!   ([`crate::cuda::acon`], [`crate::cuda::aiec`], [`crate::cuda::iieu`],
//!   [`crate::cuda::iieu_dc`], [`crate::cuda::iieu_conv`]), with the CPU path's
//!   semantics ([`super::backend`]): the same inputs, outputs, gradients (one per input,
//!   in input order) and side effects (IieuConv2d's running statistics, AIEC's counters
//!   and statistics). No op falls back to the host.
//! * Dtypes: `f32`, `f16`, `bf16` for every family (the kernels' storage types;
//!   arithmetic is f32; burn's CUDA backend has no `f64`, any other dtype is an `Err`).
//!   Parameters, β and parameter packs are widened to f32 on the device
//!   ([`crate::cuda::cast`], one small launch each; IIEU-B's and IieuConv2d's conv
//!   weight `W` is used in place, in the storage dtype, as on candle), f32 results
//!   (parameter gradients, a generator's β) rounded to the tensor dtype on the device.
//! * Validation: every length, shape and parameter is checked on the host before the
//!   first launch of an op (the crate's validators: `ActShape::validate`, `check_len`,
//!   the configs' `validate`), and with them the 32-bit index limits of the op's
//!   *backward*, so a forward that succeeds has a backward that cannot fail on its input
//!   (the autodiff node panics on a backward error).
//! * Forward state: the backward of IIEU-B, IIEU-DC, IieuConv2d, the generators and
//!   AIEC uses the forward's device state (the crate's `*DeviceSaved`, kept with the
//!   f32 parameters in the autodiff node): nothing is recomputed, and AIEC's counters and
//!   BatchNorm's running statistics are updated once per step.
//! * Host copies (no activation, no gradient of one): IieuConv2d with BatchNorm in
//!   training mode copies its updated running statistics (`2·O` values) to the host,
//!   where the CPU path leaves them (`ops::iieu_conv2d` returns them as tensors); the
//!   AIEC step keeps its counters on the host (the `Arc<Mutex<Counters>>` the CPU path
//!   updates): they go to the device for the step (`2·K·C + K` integers) and back, its
//!   labels (`N`) are uploaded, and its four loss statistics come back for
//!   `AiecOut::stats`. The upstream gradient of AIEC's loss output stays on the device.
//! * Buffers: each input is made contiguous (`into_contiguous`, a CubeCL kernel, only
//!   for a strided tensor), and its raw device pointer taken with
//!   `Client::get_resource` (cubecl-cuda's `GpuResource::ptr`, the handle's offset
//!   included). The pointer is wrapped in a cudarc `CudaSlice` for the launch and
//!   *leaked* afterwards (never freed by cudarc); the `ManagedResource` held beside it
//!   keeps CubeCL from freeing, reusing or moving the allocation meanwhile. Outputs are
//!   allocated by CubeCL (`Client::empty`), so burn owns them; the crate's result is
//!   copied into them device to device (or cast into them, for f32 parameter gradients).
//!   Besides the host copies above, nothing is copied to or from the host.
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
//!    (CubeCL's barrier of the calling thread's stream). That covers every launch burn
//!    queued before on any stream because of the order: taking a buffer's pointer
//!    (`Client::get_resource`) first makes the calling thread's CubeCL stream wait on
//!    the streams that wrote it (cubecl-runtime's event tracking), so after the barrier
//!    every producer of our inputs — and every earlier user of the outputs' memory —
//!    has finished. Taking the pointers after the barrier would not be enough;
//! 2. the crate's kernels (and the device-to-device copies into the outputs) run on the
//!    crate's stream; then that stream is synchronized, so when the output tensors go
//!    back to burn, their contents are written and our reads of the inputs are done
//!    (CubeCL may reuse the inputs' memory as soon as they are dropped).
//!
//! Every op goes through one function, `on_device`, which takes the pointers, allocates
//! the outputs, runs step 1, the op's launches, then step 2. The forward state an op
//! keeps for its backward lives in buffers of the crate's stream that CubeCL never sees.
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

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Cube, DType, Shape, TensorMetadata};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeDevice;
use cubecl_cuda::CudaRuntime;
use cubecl_runtime::runtime::Runtime;

use super::backend::AkSaved;
use super::kernel::{dc_param_lens, AiecStats, AiecStep, BetaAxis, HostOp, OpKind, RunningSlot};
use crate::cpu::iieu::IieuConfig;
use crate::cpu::iieu_conv::PsiKind;
use crate::cpu::iieu_dc::DcConfig;
use crate::cuda::acon::{self as dacon, Beta as DBeta};
use crate::cuda::{self as kc, CudaContext, CudaSlice, CudaStream, CudaView, DType as KDType};
use crate::error::{check_len, check_nonzero};
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

/// The ACON variants: `(variant, shape, β axis)` of an ACON op.
#[derive(Clone, Copy)]
enum Acon {
    A,
    B,
    C,
}

impl Acon {
    /// Per-channel parameter tensors after `x` (`p1, p2` / `p` / none).
    fn n_params(self) -> usize {
        match self {
            Acon::A => 0,
            Acon::B => 1,
            Acon::C => 2,
        }
    }
}

fn acon_of(kind: &OpKind) -> Option<(Acon, ActShape, BetaAxis)> {
    match kind {
        OpKind::AconA { shape, beta } => Some((Acon::A, *shape, *beta)),
        OpKind::AconB { shape, beta } => Some((Acon::B, *shape, *beta)),
        OpKind::AconC { shape, beta } => Some((Acon::C, *shape, *beta)),
        _ => None,
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

/// A family's device state from its forward, for its backward (downcast there);
/// `None` for the families whose backward needs only the inputs (ACON, TAU).
type DevState = Option<Box<dyn Any + Send + Sync>>;

/// The forward state kept for the backward: the contiguous input tensors (handles:
/// the device buffers stay alive while the autodiff graph holds them) and the family's
/// device state (the crate's `*DeviceSaved`, the f32 parameters it ran with; buffers
/// of the crate's stream, freed when the graph drops the node).
struct CubeSaved {
    ins: Vec<CubeTensor>,
    state: DevState,
}

/// `s` as a family's device state.
fn keep<S: Any + Send + Sync>(s: S) -> DevState {
    Some(Box::new(s))
}

/// The forward's device state of type `S`.
fn state<S: 'static>(saved: &CubeSaved) -> Result<&S> {
    saved
        .state
        .as_deref()
        .and_then(|s| s.downcast_ref::<S>())
        .ok_or_else(|| cube_err("internal", "the forward state is not this op's"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked while holding it; the data
    // (counters, a stats or running-statistics slot) is whole between updates.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// The synchronization protocol, once for every op.

/// The device buffers of one op, borrowed: its inputs, and `dy` for a backward.
struct Bufs<'a, T> {
    ins: Vec<&'a CudaSlice<T>>,
    dy: Option<&'a CudaSlice<T>>,
}

impl<'a, T> Bufs<'a, T> {
    fn dy(&self) -> Result<&'a CudaSlice<T>> {
        self.dy
            .ok_or_else(|| cube_err("internal", "a backward without its output gradient"))
    }
}

/// Runs `f` on the device buffers of `ins` (and `dy`) with new outputs of `out_dims`,
/// under the module's synchronization protocol: every pointer taken and every output
/// allocated by CubeCL → CubeCL's device barrier → `f`'s launches on the crate's
/// stream (it writes the outputs) → the stream's barrier. Returns the outputs and
/// `f`'s result. The borrowed buffers sync on drop (also on an early error).
fn on_device<T: KDType, R>(
    ctx: &Ctx,
    ins: &[CubeTensor],
    dy: Option<&CubeTensor>,
    out_dims: &[Vec<usize>],
    f: impl FnOnce(&Bufs<'_, T>, &mut [&mut CudaSlice<T>]) -> Result<R>,
) -> Result<(Vec<CubeTensor>, R)> {
    let in_b = ins
        .iter()
        .map(|t| borrow::<T>(&ctx.st, t, numel(t)))
        .collect::<Result<Vec<_>>>()?;
    let dy_b = dy.map(|t| borrow::<T>(&ctx.st, t, numel(t))).transpose()?;
    let outs: Vec<CubeTensor> = out_dims.iter().map(|d| ctx.output(d)).collect();
    let mut out_b = outs
        .iter()
        .map(|t| borrow::<T>(&ctx.st, t, numel(t)))
        .collect::<Result<Vec<_>>>()?;
    ctx.cube_barrier()?;
    let bufs = Bufs {
        ins: in_b.iter().map(Borrowed::get).collect(),
        dy: dy_b.as_ref().map(Borrowed::get),
    };
    let mut o: Vec<&mut CudaSlice<T>> = out_b.iter_mut().map(Borrowed::get_mut).collect();
    let r = f(&bufs, &mut o)?;
    ctx.stream_barrier()?;
    drop((o, bufs));
    drop((in_b, dy_b, out_b));
    Ok((outs, r))
}

/// The only output of a forward.
fn one(outs: Vec<CubeTensor>) -> Result<CubeTensor> {
    outs.into_iter()
        .next()
        .ok_or_else(|| cube_err("internal", "a forward without its output"))
}

/// One piece of an output buffer: a result in the tensor dtype (copied), an f32 result
/// (rounded to the tensor dtype on the device), or zeros (the gradient of a
/// non-differentiable input: BatchNorm's running statistics).
enum Part<'a, T> {
    Dev(&'a CudaSlice<T>),
    F32(&'a CudaSlice<f32>),
    F32View(CudaView<'a, f32>),
    Zeros(usize),
}

impl<T> Part<'_, T> {
    fn len(&self) -> usize {
        match self {
            Part::Dev(s) => s.len(),
            Part::F32(s) => s.len(),
            Part::F32View(s) => s.len(),
            Part::Zeros(n) => *n,
        }
    }
}

/// Writes `parts` one after the other into `dst` (on the crate's stream); their
/// lengths must add up to `dst`'s.
fn fill<T: KDType>(
    st: &Arc<CudaStream>,
    dst: &mut CudaSlice<T>,
    parts: &[Part<'_, T>],
) -> Result<()> {
    let total: usize = parts.iter().map(Part::len).sum();
    if total != dst.len() {
        return Err(cube_err(
            "internal",
            format!("{total} values for an output of {}", dst.len()),
        ));
    }
    let mut at = 0;
    for p in parts {
        let n = p.len();
        if n == 0 {
            continue;
        }
        let mut d = dst.slice_mut(at..at + n);
        match p {
            Part::Dev(s) => st.memcpy_dtod(*s, &mut d)?,
            Part::F32(s) => kc::cast::from_f32_into(st, *s, &mut d)?,
            Part::F32View(s) => kc::cast::from_f32_into(st, s, &mut d)?,
            Part::Zeros(_) => st.memset_zeros(&mut d)?,
        }
        at += n;
    }
    Ok(())
}

/// [`fill`] for every output of a backward: `grads[i]` into `outs[i]`.
fn fill_all<T: KDType>(
    st: &Arc<CudaStream>,
    outs: &mut [&mut CudaSlice<T>],
    grads: &[Vec<Part<'_, T>>],
) -> Result<()> {
    if outs.len() != grads.len() {
        return Err(cube_err(
            "internal",
            format!("{} gradients for {} inputs", grads.len(), outs.len()),
        ));
    }
    for (o, g) in outs.iter_mut().zip(grads) {
        fill(st, o, g)?;
    }
    Ok(())
}

/// Consecutive pieces of `v` (lengths `lens`, adding up to its length) widened to f32
/// on the device (one cast launch each; no host copy).
fn f32_parts<T: KDType>(
    st: &Arc<CudaStream>,
    v: &CudaSlice<T>,
    lens: &[usize],
) -> Result<Vec<CudaSlice<f32>>> {
    check_len("packed parameters", lens.iter().sum(), v.len())?;
    let mut at = 0;
    lens.iter()
        .map(|&l| {
            let part = kc::cast::to_f32(st, &v.slice(at..at + l));
            at += l;
            part
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Dispatch

/// Forward of `op` on `Cube` tensors: the output and, on success, the state for
/// [`backward`]. An error (bad input, a driver error) is recorded in `op` and the
/// output is zeros (written by the crate's stream).
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

fn try_forward(op: &HostOp, ins: Vec<CubeTensor>) -> Result<(CubeTensor, CubeSaved)> {
    let (ctx, ins) = prepare(op, ins)?;
    let (out, state) = match el_of(ctx.dtype)? {
        El::F32 => forward_t::<f32>(&ctx, op, &ins)?,
        El::F16 => forward_t::<half::f16>(&ctx, op, &ins)?,
        El::Bf16 => forward_t::<half::bf16>(&ctx, op, &ins)?,
    };
    Ok((out, CubeSaved { ins, state }))
}

/// The forward of every family in storage type `T`.
fn forward_t<T: KDType>(
    ctx: &Ctx,
    op: &HostOp,
    ins: &[CubeTensor],
) -> Result<(CubeTensor, DevState)> {
    let dims = &op.out_dims;
    if let Some((acon, shape, axis)) = acon_of(&op.kind) {
        return Ok((acon_forward::<T>(ctx, acon, &shape, axis, ins, dims)?, None));
    }
    match &op.kind {
        OpKind::LayerGen { shape } => layer_gen_forward::<T>(ctx, shape, ins, dims),
        OpKind::ChannelGen { shape, width, bias } => {
            channel_gen_forward::<T>(ctx, shape, (*width, *bias), ins, dims)
        }
        OpKind::Tau { tau } => tau_forward::<T>(ctx, *tau, ins, dims),
        OpKind::Iieu { cfg } => iieu_forward::<T>(ctx, cfg, ins, dims),
        OpKind::Dc { cfg } => dc_forward::<T>(ctx, cfg, ins, dims),
        OpKind::IieuConv {
            cfg,
            psi,
            running_out,
        } => iieu_conv_forward::<T>(ctx, cfg, *psi, running_out, ins, dims),
        OpKind::Aiec(step) => aiec_forward::<T>(ctx, step, ins, dims),
        OpKind::AconA { .. } | OpKind::AconB { .. } | OpKind::AconC { .. } => {
            Err(cube_err("internal", "ACON dispatched past its arm"))
        }
    }
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
    // The forward succeeded on these inputs and ran every check the backward makes
    // (the i32 range checks included), so the backward can fail only on an internal
    // inconsistency or a driver error.
    try_backward(op, saved, dout, in_dims)
        .unwrap_or_else(|e| panic!("activation-kernels burn CUDA backward: {e}"))
}

fn try_backward(
    op: &HostOp,
    saved: &CubeSaved,
    dout: CubeTensor,
    in_dims: &[Vec<usize>],
) -> Result<Vec<CubeTensor>> {
    let dout = burn_cubecl::kernel::into_contiguous(dout);
    let first = saved.ins.first().ok_or(Error::Empty { what: "inputs" })?;
    let ctx = Ctx::of(first)?;
    if dout.dtype != ctx.dtype {
        return Err(cube_err(
            "the output gradient",
            "dtype differs from the forward's",
        ));
    }
    check_len("dout", op.out_dims.iter().product(), numel(&dout))?;
    match el_of(ctx.dtype)? {
        El::F32 => backward_t::<f32>(&ctx, op, saved, &dout, in_dims),
        El::F16 => backward_t::<half::f16>(&ctx, op, saved, &dout, in_dims),
        El::Bf16 => backward_t::<half::bf16>(&ctx, op, saved, &dout, in_dims),
    }
}

/// The backward of every family in storage type `T`.
fn backward_t<T: KDType>(
    ctx: &Ctx,
    op: &HostOp,
    saved: &CubeSaved,
    dout: &CubeTensor,
    in_dims: &[Vec<usize>],
) -> Result<Vec<CubeTensor>> {
    let io = (saved, dout, in_dims);
    if let Some((acon, shape, axis)) = acon_of(&op.kind) {
        return acon_backward::<T>(ctx, acon, &shape, axis, io);
    }
    match &op.kind {
        OpKind::LayerGen { shape } => layer_gen_backward::<T>(ctx, shape, io),
        OpKind::ChannelGen { shape, .. } => channel_gen_backward::<T>(ctx, shape, io),
        OpKind::Tau { tau } => tau_backward::<T>(ctx, *tau, io),
        OpKind::Iieu { cfg } => iieu_backward::<T>(ctx, cfg, io),
        OpKind::Dc { cfg } => dc_backward::<T>(ctx, cfg, io),
        OpKind::IieuConv { cfg, psi, .. } => iieu_conv_backward::<T>(ctx, cfg, *psi, io),
        OpKind::Aiec(step) => aiec_backward::<T>(ctx, step, io),
        OpKind::AconA { .. } | OpKind::AconB { .. } | OpKind::AconC { .. } => {
            Err(cube_err("internal", "ACON dispatched past its arm"))
        }
    }
}

/// What every backward takes: the forward's state, the output gradient (contiguous,
/// length checked) and the input dims.
type Io<'a> = (&'a CubeSaved, &'a CubeTensor, &'a [Vec<usize>]);

// ---------------------------------------------------------------------------
// ACON-A/B/C

/// Every length of an ACON op checked on the host, before any launch (the cast of the
/// parameters to f32 runs before the crate's launcher, which checks them again), and
/// the 32-bit index checks of the backward ([`dacon::check_backward_fits`]), so that
/// a forward that succeeds has a backward that cannot fail on this input.
fn validate_acon<T: KDType>(
    acon: Acon,
    shape: &ActShape,
    axis: BetaAxis,
    ins: &[CubeTensor],
) -> Result<()> {
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
    dacon::check_backward_fits::<T>(shape)
}

/// The ACON forward: `ins` = `x`, the variant's parameters (`p1, p2` / `p` / none),
/// then β unless pixel-wise. Parameters and β widened to f32 on the device.
fn acon_forward<T: KDType>(
    ctx: &Ctx,
    acon: Acon,
    shape: &ActShape,
    axis: BetaAxis,
    ins: &[CubeTensor],
    out_dims: &[usize],
) -> Result<CubeTensor> {
    validate_acon::<T>(acon, shape, axis, ins)?;
    let (outs, ()) = on_device::<T, _>(ctx, ins, None, &[out_dims.to_vec()], |b, o| {
        let f32s = b.ins[1..]
            .iter()
            .map(|s| kc::cast::to_f32(&ctx.st, *s))
            .collect::<Result<Vec<_>>>()?;
        let beta = dbeta(axis, f32s.get(acon.n_params()));
        let (st, x) = (&ctx.st, b.ins[0]);
        let y = match acon {
            Acon::A => dacon::acon_a_forward(st, shape, x, beta)?,
            Acon::B => dacon::acon_b_forward(st, shape, x, &f32s[0], beta)?,
            Acon::C => dacon::acon_c_forward(st, shape, x, &f32s[0], &f32s[1], beta)?,
        };
        fill(st, o[0], &[Part::Dev(&y)])
    })?;
    one(outs)
}

/// The ACON backward: gradients in input order (`dx`, the parameters', then `dβ`
/// unless pixel-wise, whose β path is inside `dx`).
fn acon_backward<T: KDType>(
    ctx: &Ctx,
    acon: Acon,
    shape: &ActShape,
    axis: BetaAxis,
    (saved, dout, in_dims): Io<'_>,
) -> Result<Vec<CubeTensor>> {
    let (outs, ()) = on_device::<T, _>(ctx, &saved.ins, Some(dout), in_dims, |b, o| {
        let st = &ctx.st;
        let f32s = b.ins[1..]
            .iter()
            .map(|s| kc::cast::to_f32(st, *s))
            .collect::<Result<Vec<_>>>()?;
        let beta = dbeta(axis, f32s.get(acon.n_params()));
        let (x, dy) = (b.ins[0], b.dy()?);
        // dx in T, the parameter and β gradients in f32.
        let (dx, pg): (CudaSlice<T>, Vec<CudaSlice<f32>>) = match acon {
            Acon::A => {
                let g = dacon::acon_a_backward(st, shape, dy, x, beta)?;
                (g.dx, g.dbeta.into_iter().collect())
            }
            Acon::B => {
                let g = dacon::acon_b_backward(st, shape, dy, x, &f32s[0], beta)?;
                (g.dx, std::iter::once(g.dp).chain(g.dbeta).collect())
            }
            Acon::C => {
                let g = dacon::acon_c_backward(st, shape, dy, x, &f32s[0], &f32s[1], beta)?;
                (g.dx, [g.dp1, g.dp2].into_iter().chain(g.dbeta).collect())
            }
        };
        let mut grads = vec![vec![Part::Dev(&dx)]];
        grads.extend(pg.iter().map(|g| vec![Part::F32(g)]));
        fill_all(st, o, &grads)
    })?;
    Ok(outs)
}

// ---------------------------------------------------------------------------
// Meta-ACON generators

/// Layer-wise generator: `x` → β `(N)` (f32 on the device, rounded into the output);
/// the f32 β is the state its backward needs.
fn layer_gen_forward<T: KDType>(
    ctx: &Ctx,
    shape: &ActShape,
    ins: &[CubeTensor],
    out_dims: &[usize],
) -> Result<(CubeTensor, DevState)> {
    shape.validate("x", numel(&ins[0]))?;
    let (outs, beta) = on_device::<T, _>(ctx, ins, None, &[out_dims.to_vec()], |b, o| {
        let beta = dacon::layer_gen_forward(&ctx.st, shape, b.ins[0])?;
        fill(&ctx.st, o[0], &[Part::F32(&beta)])?;
        Ok(beta)
    })?;
    Ok((one(outs)?, keep(beta)))
}

/// Layer-wise generator backward: `dx` (`dβ` widened to f32 on the device).
fn layer_gen_backward<T: KDType>(
    ctx: &Ctx,
    shape: &ActShape,
    (saved, dout, in_dims): Io<'_>,
) -> Result<Vec<CubeTensor>> {
    let beta = state::<CudaSlice<f32>>(saved)?;
    let (outs, ()) = on_device::<T, _>(ctx, &saved.ins, Some(dout), in_dims, |b, o| {
        let dbeta = kc::cast::to_f32(&ctx.st, b.dy()?)?;
        let dx = dacon::layer_gen_backward::<T>(&ctx.st, shape, &dbeta, beta)?;
        fill_all(&ctx.st, o, &[vec![Part::Dev(&dx)]])
    })?;
    Ok(outs)
}

/// The channel-wise generator (weights widened to f32) and its forward's state.
struct GenState {
    gen: dacon::ChannelGen,
    saved: dacon::ChannelGenSaved,
}

/// Channel-wise generator: `x, W1, W2[, b1, b2]` → β `(N, C)` (f32 on the device,
/// rounded into the output).
fn channel_gen_forward<T: KDType>(
    ctx: &Ctx,
    shape: &ActShape,
    (width, bias): (usize, bool),
    ins: &[CubeTensor],
    out_dims: &[usize],
) -> Result<(CubeTensor, DevState)> {
    shape.validate("x", numel(&ins[0]))?;
    let b_lens = match (bias, ins.get(3), ins.get(4)) {
        (true, Some(b1), Some(b2)) => [Some(numel(b1)), Some(numel(b2))],
        _ => [None, None],
    };
    let w_lens = [numel(&ins[1]), numel(&ins[2])];
    dacon::ChannelGen::check_dims(shape, width, w_lens, b_lens)?;
    let (outs, gs) = on_device::<T, _>(ctx, ins, None, &[out_dims.to_vec()], |b, o| {
        let wide = |i: usize| kc::cast::to_f32(&ctx.st, b.ins[i]);
        let gen = dacon::ChannelGen {
            c: shape.c,
            width,
            w1: wide(1)?,
            b1: if bias { Some(wide(3)?) } else { None },
            w2: wide(2)?,
            b2: if bias { Some(wide(4)?) } else { None },
        };
        let (beta, saved) = gen.forward::<T>(&ctx.st, shape, b.ins[0])?;
        fill(&ctx.st, o[0], &[Part::F32(&beta)])?;
        Ok(GenState { gen, saved })
    })?;
    Ok((one(outs)?, keep(gs)))
}

/// Channel-wise generator backward: `dx, dW1, dW2[, db1, db2]`.
fn channel_gen_backward<T: KDType>(
    ctx: &Ctx,
    shape: &ActShape,
    (saved, dout, in_dims): Io<'_>,
) -> Result<Vec<CubeTensor>> {
    let gs = state::<GenState>(saved)?;
    let (outs, ()) = on_device::<T, _>(ctx, &saved.ins, Some(dout), in_dims, |b, o| {
        let dbeta = kc::cast::to_f32(&ctx.st, b.dy()?)?;
        let g = gs.gen.backward::<T>(&ctx.st, shape, &dbeta, &gs.saved)?;
        let mut grads = vec![
            vec![Part::Dev(&g.dx)],
            vec![Part::F32(&g.dw1)],
            vec![Part::F32(&g.dw2)],
        ];
        if let (Some(b1), Some(b2)) = (&g.db1, &g.db2) {
            grads.extend([vec![Part::F32(b1)], vec![Part::F32(b2)]]);
        }
        fill_all(&ctx.st, o, &grads)
    })?;
    Ok(outs)
}

// ---------------------------------------------------------------------------
// TAU

/// TAU forward: `A = F·[F > τ]`.
fn tau_forward<T: KDType>(
    ctx: &Ctx,
    tau: f64,
    ins: &[CubeTensor],
    out_dims: &[usize],
) -> Result<(CubeTensor, DevState)> {
    check_nonzero("F", numel(&ins[0]))?;
    let (outs, ()) = on_device::<T, _>(ctx, ins, None, &[out_dims.to_vec()], |b, o| {
        let y = kc::aiec::tau_forward(&ctx.st, b.ins[0], tau as f32)?;
        fill(&ctx.st, o[0], &[Part::Dev(&y)])
    })?;
    Ok((one(outs)?, None))
}

/// TAU backward: `dF = dA·[F > τ]`.
fn tau_backward<T: KDType>(
    ctx: &Ctx,
    tau: f64,
    (saved, dout, in_dims): Io<'_>,
) -> Result<Vec<CubeTensor>> {
    let (outs, ()) = on_device::<T, _>(ctx, &saved.ins, Some(dout), in_dims, |b, o| {
        let dx = kc::aiec::tau_backward(&ctx.st, b.dy()?, b.ins[0], tau as f32)?;
        fill_all(&ctx.st, o, &[vec![Part::Dev(&dx)]])
    })?;
    Ok(outs)
}

// ---------------------------------------------------------------------------
// IIEU-B

/// IIEU-B's f32 parameters and its forward's state.
struct IieuState {
    params: kc::iieu::IieuDeviceParams,
    saved: kc::iieu::IieuDeviceSaved,
}

/// IIEU-B's lengths and the kernels' 32-bit limits (those of the backward too: one
/// `Dims`), before any launch.
fn validate_iieu(cfg: &IieuConfig, ins: &[CubeTensor]) -> Result<()> {
    let (oh, ow) = cfg.validate()?;
    kc::iieu::Dims::new(cfg)?;
    let g = &cfg.geometry;
    check_len("x", g.n * g.c_out * oh * ow, numel(&ins[0]))?;
    check_len("x_pre", g.input_len(), numel(&ins[1]))?;
    check_len("w", g.weight_len(), numel(&ins[2]))?;
    for (what, t) in ["ln_weight", "ln_bias", "eta"].into_iter().zip(&ins[3..]) {
        check_len(what, g.c_out, numel(t))?;
    }
    Ok(())
}

/// IIEU-B forward on `x, x_pre, W, γ̇, β̇, η`: `W` in place (storage dtype), `γ̇, β̇,
/// η` widened to f32 on the device (as the candle path).
fn iieu_forward<T: KDType>(
    ctx: &Ctx,
    cfg: &IieuConfig,
    ins: &[CubeTensor],
    out_dims: &[usize],
) -> Result<(CubeTensor, DevState)> {
    validate_iieu(cfg, ins)?;
    let (outs, s) = on_device::<T, _>(ctx, ins, None, &[out_dims.to_vec()], |b, o| {
        let wide = |i: usize| kc::cast::to_f32(&ctx.st, b.ins[i]);
        let params = kc::iieu::IieuDeviceParams {
            ln_weight: wide(3)?,
            ln_bias: wide(4)?,
            eta: wide(5)?,
        };
        let (y, saved) = kc::iieu::forward(&ctx.st, cfg, b.ins[0], b.ins[1], b.ins[2], &params)?;
        fill(&ctx.st, o[0], &[Part::Dev(&y)])?;
        Ok(IieuState { params, saved })
    })?;
    Ok((one(outs)?, keep(s)))
}

/// IIEU-B backward: `dx, dx_pre, dW, dγ̇, dβ̇, dη`.
fn iieu_backward<T: KDType>(
    ctx: &Ctx,
    cfg: &IieuConfig,
    (saved, dout, in_dims): Io<'_>,
) -> Result<Vec<CubeTensor>> {
    let s = state::<IieuState>(saved)?;
    let (outs, ()) = on_device::<T, _>(ctx, &saved.ins, Some(dout), in_dims, |b, o| {
        let (x, xp, w) = (b.ins[0], b.ins[1], b.ins[2]);
        let g = kc::iieu::backward(&ctx.st, cfg, b.dy()?, x, xp, w, &s.params, &s.saved)?;
        let grads = [
            vec![Part::Dev(&g.dx)],
            vec![Part::Dev(&g.dx_pre)],
            vec![Part::Dev(&g.dw)],
            vec![Part::F32(&g.d_ln_weight)],
            vec![Part::F32(&g.d_ln_bias)],
            vec![Part::F32(&g.d_eta)],
        ];
        fill_all(&ctx.st, o, &grads)
    })?;
    Ok(outs)
}

// ---------------------------------------------------------------------------
// IIEU-DC

/// IIEU-DC's nine f32 parameters and its forward's state.
struct DcState {
    params: kc::iieu_dc::DcDeviceParams,
    saved: kc::iieu_dc::DcDeviceSaved,
}

/// IIEU-DC on `x, res, pack` (pack = the nine [`crate::cpu::iieu_dc::DcParams`],
/// flattened in field order), widened to f32 on the device piece by piece.
fn dc_forward<T: KDType>(
    ctx: &Ctx,
    cfg: &DcConfig,
    ins: &[CubeTensor],
    out_dims: &[usize],
) -> Result<(CubeTensor, DevState)> {
    let n = cfg.validate()?;
    kc::iieu_dc::check_config(cfg)?;
    check_len("x", n, numel(&ins[0]))?;
    check_len("res", n, numel(&ins[1]))?;
    let lens = dc_param_lens(cfg);
    check_len(
        "iieu_dc packed parameters",
        lens.iter().sum(),
        numel(&ins[2]),
    )?;
    let (outs, s) = on_device::<T, _>(ctx, ins, None, &[out_dims.to_vec()], |b, o| {
        let mut it = f32_parts(&ctx.st, b.ins[2], &lens)?.into_iter();
        let mut next = || {
            it.next()
                .ok_or_else(|| cube_err("internal", "iieu_dc parameters"))
        };
        let params = kc::iieu_dc::DcDeviceParams {
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
        let (y, saved) = kc::iieu_dc::forward(&ctx.st, cfg, b.ins[0], b.ins[1], &params)?;
        fill(&ctx.st, o[0], &[Part::Dev(&y)])?;
        Ok(DcState { params, saved })
    })?;
    Ok((one(outs)?, keep(s)))
}

/// IIEU-DC backward: `dx, dres` and the pack's gradient (nine pieces, field order).
fn dc_backward<T: KDType>(
    ctx: &Ctx,
    cfg: &DcConfig,
    (saved, dout, in_dims): Io<'_>,
) -> Result<Vec<CubeTensor>> {
    let s = state::<DcState>(saved)?;
    let (outs, ()) = on_device::<T, _>(ctx, &saved.ins, Some(dout), in_dims, |b, o| {
        let (x, r) = (b.ins[0], b.ins[1]);
        let g = kc::iieu_dc::backward(&ctx.st, cfg, b.dy()?, x, r, &s.params, &s.saved)?;
        let pack = [
            &g.d_ln1_weight,
            &g.d_ln1_bias,
            &g.d_w1,
            &g.d_gamma2,
            &g.d_beta2,
            &g.d_eta2,
            &g.d_w2,
            &g.d_ln2_weight,
            &g.d_ln2_bias,
        ]
        .map(Part::F32);
        let grads = [
            vec![Part::Dev(&g.dx)],
            vec![Part::Dev(&g.dres)],
            pack.into_iter().collect(),
        ];
        fill_all(&ctx.st, o, &grads)
    })?;
    Ok(outs)
}

// ---------------------------------------------------------------------------
// IieuConv2d

/// IieuConv2d's f32 parameters (BatchNorm's running statistics as its forward left
/// them) and its forward's state.
struct ConvState<T: KDType> {
    params: kc::iieu_conv::IieuConvDeviceParams,
    saved: kc::iieu_conv::IieuConvDeviceSaved<T>,
}

/// IieuConv2d's lengths, BatchNorm's scalars and the kernels' 32-bit and grid limits
/// (those of the backward too), before any launch.
fn validate_iieu_conv(cfg: &IieuConfig, psi: PsiKind, ins: &[CubeTensor]) -> Result<()> {
    let (oh, ow) = cfg.validate()?;
    kc::iieu_conv::check_config(cfg)?;
    let g = &cfg.geometry;
    check_len("x_pre", g.input_len(), numel(&ins[0]))?;
    check_len("w", g.weight_len(), numel(&ins[1]))?;
    check_len(
        "iieu_conv2d packed parameters",
        psi.pack_len(g.c_out),
        numel(&ins[2]),
    )?;
    if let PsiKind::BatchNorm {
        momentum,
        eps,
        training,
    } = psi
    {
        crate::cpu::iieu_conv::check_bn_scalars(eps, momentum, training, g.n * oh * ow)?;
    }
    Ok(())
}

/// The pack `[ψ vectors; γ̇; β̇; η; running mean; running var]` as the device
/// parameters (f32, one cast launch per vector).
fn conv_params<T: KDType>(
    st: &Arc<CudaStream>,
    psi: PsiKind,
    c_out: usize,
    pack: &CudaSlice<T>,
) -> Result<kc::iieu_conv::IieuConvDeviceParams> {
    use kc::iieu_conv::{DeviceBatchNorm, DevicePsi};
    let lens = vec![c_out; psi.pack_len(c_out) / c_out.max(1)];
    let mut it = f32_parts(st, pack, &lens)?.into_iter();
    let mut next = || {
        it.next()
            .ok_or_else(|| cube_err("internal", "iieu_conv2d parameters"))
    };
    let head: Vec<CudaSlice<f32>> = (0..psi.n_vectors())
        .map(|_| next())
        .collect::<Result<_>>()?;
    let iieu = kc::iieu::IieuDeviceParams {
        ln_weight: next()?,
        ln_bias: next()?,
        eta: next()?,
    };
    let mut head = head.into_iter();
    let mut psi_vec = || {
        head.next()
            .ok_or_else(|| cube_err("internal", "iieu_conv2d ψ vectors"))
    };
    let psi = match psi {
        PsiKind::None => DevicePsi::None,
        PsiKind::Bias => DevicePsi::Bias(psi_vec()?),
        PsiKind::Affine => DevicePsi::Affine {
            scale: psi_vec()?,
            shift: psi_vec()?,
        },
        PsiKind::BatchNorm {
            momentum,
            eps,
            training,
        } => DevicePsi::BatchNorm(DeviceBatchNorm {
            weight: psi_vec()?,
            bias: psi_vec()?,
            running_mean: next()?,
            running_var: next()?,
            momentum,
            eps,
            training,
        }),
    };
    Ok(kc::iieu_conv::IieuConvDeviceParams { iieu, psi })
}

/// IieuConv2d forward on `x_pre, W, pack`. A training BatchNorm's updated running
/// statistics (`O` f32 each) are copied to the host into `running_out`, as the CPU path
/// leaves them there (`ops::iieu_conv2d` returns them as tensors).
fn iieu_conv_forward<T: KDType>(
    ctx: &Ctx,
    cfg: &IieuConfig,
    psi: PsiKind,
    running_out: &RunningSlot,
    ins: &[CubeTensor],
    out_dims: &[usize],
) -> Result<(CubeTensor, DevState)> {
    validate_iieu_conv(cfg, psi, ins)?;
    let (outs, s) = on_device::<T, _>(ctx, ins, None, &[out_dims.to_vec()], |b, o| {
        let st = &ctx.st;
        let mut params = conv_params(st, psi, cfg.geometry.c_out, b.ins[2])?;
        let (y, saved) = kc::iieu_conv::forward(st, cfg, b.ins[0], b.ins[1], &mut params)?;
        fill(st, o[0], &[Part::Dev(&y)])?;
        let mut stats = None;
        if let kc::iieu_conv::DevicePsi::BatchNorm(bn) = &params.psi {
            if bn.training {
                let host = |v: &CudaSlice<f32>| -> Result<Vec<f64>> {
                    Ok(st.clone_dtoh(v)?.into_iter().map(f64::from).collect())
                };
                stats = Some((host(&bn.running_mean)?, host(&bn.running_var)?));
            }
        }
        Ok((ConvState { params, saved }, stats))
    })?;
    // Only after the whole op succeeded (the final stream barrier included), as the
    // CPU path writes its slot.
    let (s, stats) = s;
    if let Some(stats) = stats {
        *lock(running_out) = Some(stats);
    }
    Ok((one(outs)?, keep(s)))
}

/// IieuConv2d backward: `dx_pre, dW` and the pack's gradient `[dψ scale; dψ shift; dγ̇;
/// dβ̇; dη; 0 (running statistics: state, not parameters)]`.
fn iieu_conv_backward<T: KDType>(
    ctx: &Ctx,
    cfg: &IieuConfig,
    psi: PsiKind,
    (saved, dout, in_dims): Io<'_>,
) -> Result<Vec<CubeTensor>> {
    let s = state::<ConvState<T>>(saved)?;
    let (outs, ()) = on_device::<T, _>(ctx, &saved.ins, Some(dout), in_dims, |b, o| {
        let (xp, w) = (b.ins[0], b.ins[1]);
        let g = kc::iieu_conv::backward(&ctx.st, cfg, b.dy()?, xp, w, &s.params, &s.saved)?;
        let mut pack: Vec<Part<'_, T>> = [&g.d_psi_scale, &g.d_psi_shift]
            .into_iter()
            .flatten()
            .map(Part::F32)
            .collect();
        pack.extend([
            Part::F32(&g.d_ln_weight),
            Part::F32(&g.d_ln_bias),
            Part::F32(&g.d_eta),
            Part::Zeros(psi.n_running() * cfg.geometry.c_out),
        ]);
        let grads = [vec![Part::Dev(&g.dx_pre)], vec![Part::Dev(&g.dw)], pack];
        fill_all(&ctx.st, o, &grads)
    })?;
    Ok(outs)
}

// ---------------------------------------------------------------------------
// AIEC training step

/// `Wd` widened to f32 and the step's device state (feature, DMU probabilities,
/// masks, labels).
struct AiecState {
    wd: CudaSlice<f32>,
    saved: kc::aiec::DeviceSaved,
}

/// One AIEC training step on `F, Wd`: output `[A (flat); total loss]`. The layer's
/// counters live on the host (`AiecStep::counters`, the CPU path's state): they are
/// copied to the device for the step (`θ, η` `K × C`, `φ` `K`) and the updated ones
/// back; the labels (`N`) are uploaded; the four loss statistics are copied to the
/// host for `AiecStep::stats`. No activation leaves the device.
fn aiec_forward<T: KDType>(
    ctx: &Ctx,
    step: &AiecStep,
    ins: &[CubeTensor],
    out_dims: &[usize],
) -> Result<(CubeTensor, DevState)> {
    let mut counters = lock(&step.counters);
    let k = counters.classes();
    if counters.channels() != step.shape.c {
        return Err(Error::Shape {
            what: "counters",
            msg: format!(
                "counters have {} channels, F has {}",
                counters.channels(),
                step.shape.c
            ),
        });
    }
    let (nf, nw) = (numel(&ins[0]), numel(&ins[1]));
    kc::aiec::check_train(&step.cfg, &step.shape, nf, nw, &step.labels, k)?;
    let (outs, (s, means, updated)) =
        on_device::<T, _>(ctx, ins, None, &[out_dims.to_vec()], |b, o| {
            let st = &ctx.st;
            let mut dev_counters = kc::aiec::DeviceCounters::from_host(st, &counters)?;
            let wd = kc::cast::to_f32(st, b.ins[1])?;
            let labels: &[usize] = &step.labels;
            let (cfg, shape) = (&step.cfg, &step.shape);
            let out =
                kc::aiec::train_forward(st, cfg, shape, b.ins[0], &wd, labels, &mut dev_counters)?;
            let total = Part::F32View(out.losses.means.slice(2..3));
            fill(st, o[0], &[Part::Dev(&out.out), total])?;
            let means = st.clone_dtoh(&out.losses.means)?;
            let updated = dev_counters.to_host(st)?;
            let s = AiecState {
                wd,
                saved: out.saved,
            };
            Ok((s, means, updated))
        })?;
    let [aux, gate, total, acc] = means[..] else {
        return Err(cube_err(
            "internal",
            "AIEC loss statistics: expected 4 values",
        ));
    };
    *counters = updated;
    *lock(&step.stats) = Some(AiecStats {
        aux_mean: f64::from(aux),
        gate_mean: f64::from(gate),
        total: f64::from(total),
        dmu_accuracy: f64::from(acc),
    });
    Ok((one(outs)?, keep(s)))
}

/// AIEC backward: `dF, dWd` for the output gradient `[dA; d total]`; the total's
/// gradient stays on the device (widened to f32, read by the kernels as the loss scale).
fn aiec_backward<T: KDType>(
    ctx: &Ctx,
    step: &AiecStep,
    (saved, dout, in_dims): Io<'_>,
) -> Result<Vec<CubeTensor>> {
    let s = state::<AiecState>(saved)?;
    let nf = numel(&saved.ins[0]);
    let (outs, ()) = on_device::<T, _>(ctx, &saved.ins, Some(dout), in_dims, |b, o| {
        let st = &ctx.st;
        let dy = b.dy()?;
        let scale = kc::cast::to_f32(st, &dy.slice(nf..nf + 1))?;
        let (cfg, shape, f) = (&step.cfg, &step.shape, b.ins[0]);
        let d_a = dy.slice(..nf);
        let g = kc::aiec::train_backward_scaled(st, cfg, shape, &d_a, &scale, f, &s.wd, &s.saved)?;
        fill_all(st, o, &[vec![Part::Dev(&g.df)], vec![Part::F32(&g.dwd)]])
    })?;
    Ok(outs)
}
