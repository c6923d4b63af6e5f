//! The burn backend extension: [`AkBackend`], implemented for burn's CPU backend
//! (`Flex`) by moving tensors to host slices and running [`crate::cpu`], for burn's
//! CubeCL backend on a CUDA device (`Cube`, feature `burn-cuda`: module `burn::cuda`) with
//! this crate's kernels on burn's device buffers, and for `Autodiff<B, C>` with a
//! backward node that runs the inner backend's backward ([`AkAutodiffInner`]).

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::FloatTensor;
#[cfg(feature = "burn-cuda")]
use burn::backend::Cube;
use burn::backend::{
    backend_extension, try_read_sync, Backend, DType, Flex, TensorData, TensorMetadata,
};

use super::kernel::{self, HostOp, SavedAny, MAX_INPUTS};
use crate::{Error, Result};

/// burn backend extension of this crate: one entry point that runs any op of
/// [`super::ops`] on host memory.
///
/// `op` says which CPU op runs (and carries its non-tensor arguments); `x0..x5` are the
/// op's tensor inputs in the order [`super::ops`] documents, unused trailing slots
/// holding a clone of `x0` (ignored, no gradient). The result has `op`'s output dims.
/// An error of the CPU op does not panic: it is recorded in `op` (the public functions
/// of [`super::ops`] return it as `Err`) and the result is zeros.
///
/// Implemented for burn's `Flex` CPU backend (the crate's CPU ops on host slices), for
/// burn's `Cube` backend on a CUDA device (feature `burn-cuda`: the crate's kernels on
/// burn's device buffers, see module `burn::cuda` for the synchronization) and for
/// `Autodiff<B, C>` over any `B: AkBackend + AkAutodiffInner` (the inner forward, plus
/// a backward node that runs the inner backend's backward:
/// [`AkAutodiffInner::ak_backward`]). A tensor on another backend panics in burn's
/// dispatch (burn's rule for a backend an extension does not list).
#[backend_extension(Flex, Cube: cfg(feature = "burn-cuda"), Autodiff)]
pub trait AkBackend: burn::backend::Backend {
    /// Runs `op` on `x0..x5` (see the trait docs).
    #[allow(clippy::too_many_arguments)]
    fn ak_host_op(
        op: HostOp,
        x0: FloatTensor<Self>,
        x1: FloatTensor<Self>,
        x2: FloatTensor<Self>,
        x3: FloatTensor<Self>,
        x4: FloatTensor<Self>,
        x5: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// The inputs of one op on the host: `f32` or `f64` (burn's float dtype of the tensors).
#[derive(Clone)]
pub(crate) enum HostInputs {
    F32(Vec<Vec<f32>>),
    F64(Vec<Vec<f64>>),
}

fn read<B: Backend>(t: FloatTensor<B>) -> Result<TensorData> {
    match try_read_sync(B::float_into_data(t)) {
        Some(Ok(d)) => Ok(d),
        Some(Err(e)) => Err(Error::Driver(format!(
            "burn: reading a tensor failed: {e:?}"
        ))),
        None => Err(Error::Driver(
            "burn: this platform cannot read tensors synchronously".into(),
        )),
    }
}

fn to_vec<E: burn::tensor::Element>(d: &TensorData) -> Result<Vec<E>> {
    d.try_to_vec::<E>().map_err(|e| Error::InvalidParam {
        what: "tensor data",
        msg: format!("{e:?}"),
    })
}

/// Reads the first `n` inputs to the host; all must be `f32` or all `f64`.
fn read_inputs<B: Backend>(ins: Vec<FloatTensor<B>>, n: usize) -> Result<HostInputs> {
    let data = ins
        .into_iter()
        .take(n)
        .map(read::<B>)
        .collect::<Result<Vec<_>>>()?;
    let dtype = data.first().map(TensorData::dtype).unwrap_or(DType::F32);
    if data.iter().any(|d| d.dtype() != dtype) {
        return Err(Error::InvalidParam {
            what: "dtype",
            msg: "all tensors of one op must have the same float dtype".into(),
        });
    }
    match dtype {
        DType::F32 => Ok(HostInputs::F32(
            data.iter().map(to_vec::<f32>).collect::<Result<_>>()?,
        )),
        DType::F64 => Ok(HostInputs::F64(
            data.iter().map(to_vec::<f64>).collect::<Result<_>>()?,
        )),
        dt => Err(Error::InvalidParam {
            what: "dtype",
            msg: format!("{dt:?} is not supported (f32 or f64)"),
        }),
    }
}

fn slices<T>(v: &[Vec<T>]) -> Vec<&[T]> {
    v.iter().map(Vec::as_slice).collect()
}

/// Forward on the host: the output tensor (on `device`) and, on success, the state
/// its backward needs. On error: the error is recorded in `op`, the output is zeros.
fn host_forward<B: Backend>(
    op: &HostOp,
    ins: Vec<FloatTensor<B>>,
) -> (FloatTensor<B>, Option<(HostInputs, SavedAny)>) {
    let device = ins[0].device();
    let dtype = ins[0].dtype();
    let run = || -> Result<(TensorData, HostInputs, SavedAny)> {
        let host = read_inputs::<B>(ins, op.arity())?;
        let (data, saved) = match &host {
            HostInputs::F32(v) => {
                let (y, s) = kernel::forward::<f32>(op, &slices(v))?;
                (TensorData::new(y, op.out_dims.clone()), s)
            }
            HostInputs::F64(v) => {
                let (y, s) = kernel::forward::<f64>(op, &slices(v))?;
                (TensorData::new(y, op.out_dims.clone()), s)
            }
        };
        Ok((data, host, saved))
    };
    match run() {
        Ok((data, host, saved)) => (B::float_from_data(data, &device), Some((host, saved))),
        Err(e) => {
            op.fail(e);
            let zeros = match dtype {
                DType::F64 => TensorData::zeros::<f64, _>(op.out_dims.clone()),
                _ => TensorData::zeros::<f32, _>(op.out_dims.clone()),
            };
            (B::float_from_data(zeros, &device), None)
        }
    }
}

impl AkBackend for Flex {
    fn ak_host_op(
        op: HostOp,
        x0: FloatTensor<Self>,
        x1: FloatTensor<Self>,
        x2: FloatTensor<Self>,
        x3: FloatTensor<Self>,
        x4: FloatTensor<Self>,
        x5: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        host_forward::<Self>(&op, vec![x0, x1, x2, x3, x4, x5]).0
    }
}

/// What an op's backward needs from its forward, as the inner backend keeps it
/// (host inputs and the CPU forward's state on `Flex`; the device input tensors on
/// `Cube`). Opaque outside the backend that made it.
pub type AkSaved = Arc<dyn Any + Send + Sync>;

/// The forward and backward an `Autodiff<B, C>` node of [`AkBackend::ak_host_op`] runs
/// on its inner backend `B`. Implemented for `Flex` (the crate's CPU forward and
/// backward on host slices) and, with feature `burn-cuda`, for `Cube` (the crate's
/// CUDA forward and backward on the device buffers). A new backend implements this
/// trait and [`AkBackend`] the same way.
pub trait AkAutodiffInner: Backend {
    /// Runs `op` on `ins` (slots as in [`AkBackend::ak_host_op`]): the output and, if
    /// the forward succeeded, what [`Self::ak_backward`] needs. An error is recorded
    /// in `op` and the output is zeros (as in [`AkBackend::ak_host_op`]).
    fn ak_forward_saved(
        op: &HostOp,
        ins: Vec<FloatTensor<Self>>,
    ) -> (FloatTensor<Self>, Option<AkSaved>);

    /// The gradients of the op's first `op.arity()` inputs, shaped `in_dims`, for the
    /// output gradient `dout`. Runs only after a successful forward on the same
    /// inputs: it cannot fail on user input, and an internal inconsistency panics.
    fn ak_backward(
        op: &HostOp,
        saved: &AkSaved,
        dout: FloatTensor<Self>,
        in_dims: &[Vec<usize>],
    ) -> Vec<FloatTensor<Self>>;
}

/// The host state of a `Flex` forward: its inputs and the CPU forward's state.
type HostSaved = (HostInputs, SavedAny);

impl AkAutodiffInner for Flex {
    fn ak_forward_saved(
        op: &HostOp,
        ins: Vec<FloatTensor<Self>>,
    ) -> (FloatTensor<Self>, Option<AkSaved>) {
        let (out, saved) = host_forward::<Self>(op, ins);
        (out, saved.map(|s| Arc::new(s) as AkSaved))
    }

    fn ak_backward(
        op: &HostOp,
        saved: &AkSaved,
        dout: FloatTensor<Self>,
        in_dims: &[Vec<usize>],
    ) -> Vec<FloatTensor<Self>> {
        host_backward::<Self>(op, saved, dout, in_dims)
    }
}

/// The CPU backward on the host: reads `dout`, runs the crate's CPU backward on the
/// saved host inputs, and builds one gradient tensor per input on `dout`'s device.
fn host_backward<B: Backend>(
    op: &HostOp,
    saved: &AkSaved,
    dout: FloatTensor<B>,
    in_dims: &[Vec<usize>],
) -> Vec<FloatTensor<B>> {
    let device = dout.device();
    let Some((inputs, saved)) = saved.downcast_ref::<HostSaved>() else {
        panic!("activation-kernels burn backward: the forward state is not the host's");
    };
    // The forward succeeded on these inputs, so the CPU backward can fail only on
    // an internal inconsistency: no user input reaches this point unvalidated.
    let dout = read::<B>(dout).unwrap_or_else(|e| panic!("activation-kernels burn: {e}"));
    let grads_host: Vec<TensorData> = match inputs {
        HostInputs::F32(v) => {
            let d = to_vec::<f32>(&dout)
                .and_then(|d| kernel::backward::<f32>(op, &slices(v), saved, &d));
            let g = d.unwrap_or_else(|e| panic!("activation-kernels burn backward: {e}"));
            g.into_iter()
                .zip(in_dims)
                .map(|(g, dims)| TensorData::new(g, dims.clone()))
                .collect()
        }
        HostInputs::F64(v) => {
            let d = to_vec::<f64>(&dout)
                .and_then(|d| kernel::backward::<f64>(op, &slices(v), saved, &d));
            let g = d.unwrap_or_else(|e| panic!("activation-kernels burn backward: {e}"));
            g.into_iter()
                .zip(in_dims)
                .map(|(g, dims)| TensorData::new(g, dims.clone()))
                .collect()
        }
    };
    grads_host
        .into_iter()
        .map(|g| B::float_from_data(g, &device))
        .collect()
}

#[cfg(feature = "burn-cuda")]
impl AkBackend for Cube {
    fn ak_host_op(
        op: HostOp,
        x0: FloatTensor<Self>,
        x1: FloatTensor<Self>,
        x2: FloatTensor<Self>,
        x3: FloatTensor<Self>,
        x4: FloatTensor<Self>,
        x5: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        super::cuda::forward(&op, vec![x0, x1, x2, x3, x4, x5]).0
    }
}

#[cfg(feature = "burn-cuda")]
impl AkAutodiffInner for Cube {
    fn ak_forward_saved(
        op: &HostOp,
        ins: Vec<FloatTensor<Self>>,
    ) -> (FloatTensor<Self>, Option<AkSaved>) {
        super::cuda::forward(op, ins)
    }

    fn ak_backward(
        op: &HostOp,
        saved: &AkSaved,
        dout: FloatTensor<Self>,
        in_dims: &[Vec<usize>],
    ) -> Vec<FloatTensor<Self>> {
        super::cuda::backward(op, saved, dout, in_dims)
    }
}

/// State of the backward node: the op, the inner backend's forward state and the
/// input dims.
#[derive(Clone)]
struct NodeState {
    op: HostOp,
    /// The inner forward's state; `None` if the forward failed.
    saved: Option<AkSaved>,
    in_dims: Arc<Vec<Vec<usize>>>,
}

impl fmt::Debug for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeState")
            .field("op", &self.op)
            .field("in_dims", &self.in_dims)
            .finish_non_exhaustive()
    }
}

/// Backward node of [`AkBackend::ak_host_op`] under `Autodiff`.
#[derive(Debug)]
struct AkBackwardNode;

impl<B: AkAutodiffInner> Backward<B, MAX_INPUTS> for AkBackwardNode {
    type State = NodeState;

    fn backward(
        self,
        ops: Ops<Self::State, MAX_INPUTS>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let st = ops.state;
        let Some(saved) = &st.saved else {
            return;
        };
        let in_grads = B::ak_backward(&st.op, saved, grad, &st.in_dims);
        for (parent, g) in ops.parents.iter().zip(in_grads) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

impl<B: AkBackend + AkAutodiffInner, C: CheckpointStrategy> AkBackend for Autodiff<B, C> {
    fn ak_host_op(
        op: HostOp,
        x0: FloatTensor<Self>,
        x1: FloatTensor<Self>,
        x2: FloatTensor<Self>,
        x3: FloatTensor<Self>,
        x4: FloatTensor<Self>,
        x5: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let ins = [x0, x1, x2, x3, x4, x5];
        let prep = AkBackwardNode
            .prepare::<C>(ins.each_ref().map(|t| t.node()))
            .compute_bound()
            .stateful();
        let [p0, p1, p2, p3, p4, p5] = ins.map(|t| t.into_primitive());
        match prep {
            OpsKind::Tracked(prep) => {
                let in_dims: Vec<Vec<usize>> = [&p0, &p1, &p2, &p3, &p4, &p5]
                    .iter()
                    .take(op.arity())
                    .map(|p| p.shape().to_vec())
                    .collect();
                let (out, saved) = B::ak_forward_saved(&op, vec![p0, p1, p2, p3, p4, p5]);
                // On a failed forward (recorded in `op`, returned as `Err` by the
                // caller) the node has no state and its backward does nothing.
                let state = NodeState {
                    op,
                    saved,
                    in_dims: Arc::new(in_dims),
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::ak_host_op(op, p0, p1, p2, p3, p4, p5)),
        }
    }
}
