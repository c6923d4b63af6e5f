//! The burn backend extension: [`AkBackend`], implemented for burn's CPU backend
//! (`Flex`) by moving tensors to host slices and running [`crate::cpu`], and for
//! `Autodiff<B, C>` with a backward node that runs the crate's CPU backward.

use std::fmt;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::FloatTensor;
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
/// Implemented for burn's `Flex` CPU backend (forward only) and for `Autodiff<B, C>`
/// over any `B: AkBackend` (forward, plus a backward node calling the crate's CPU
/// backward). A GPU backend implements the same method with the crate's kernels on
/// the backend's device memory (see `docs/burn.md`).
#[backend_extension(Flex, Autodiff)]
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

/// State of the backward node: the op, its host inputs and the CPU forward's state.
#[derive(Clone)]
struct HostState {
    op: HostOp,
    /// Host inputs and the CPU forward's state; `None` if the forward failed.
    host: Option<(Arc<HostInputs>, SavedAny)>,
    in_dims: Arc<Vec<Vec<usize>>>,
}

impl fmt::Debug for HostState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostState")
            .field("op", &self.op)
            .field("in_dims", &self.in_dims)
            .finish_non_exhaustive()
    }
}

/// Backward node of [`AkBackend::ak_host_op`] under `Autodiff`.
#[derive(Debug)]
struct HostBackward;

impl<B: Backend> Backward<B, MAX_INPUTS> for HostBackward {
    type State = HostState;

    fn backward(
        self,
        ops: Ops<Self::State, MAX_INPUTS>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let device = grad.device();
        let st = ops.state;
        let Some((inputs, saved)) = &st.host else {
            return;
        };
        // The forward succeeded on these inputs, so the CPU backward can fail only on
        // an internal inconsistency: no user input reaches this point unvalidated.
        let dout = read::<B>(grad).unwrap_or_else(|e| panic!("activation-kernels burn: {e}"));
        let grads_host: Vec<TensorData> = match &**inputs {
            HostInputs::F32(v) => {
                let d = to_vec::<f32>(&dout)
                    .and_then(|d| kernel::backward::<f32>(&st.op, &slices(v), saved, &d));
                let g = d.unwrap_or_else(|e| panic!("activation-kernels burn backward: {e}"));
                g.into_iter()
                    .zip(st.in_dims.iter())
                    .map(|(g, dims)| TensorData::new(g, dims.clone()))
                    .collect()
            }
            HostInputs::F64(v) => {
                let d = to_vec::<f64>(&dout)
                    .and_then(|d| kernel::backward::<f64>(&st.op, &slices(v), saved, &d));
                let g = d.unwrap_or_else(|e| panic!("activation-kernels burn backward: {e}"));
                g.into_iter()
                    .zip(st.in_dims.iter())
                    .map(|(g, dims)| TensorData::new(g, dims.clone()))
                    .collect()
            }
        };
        for (parent, g) in ops.parents.iter().zip(grads_host) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, B::float_from_data(g, &device));
            }
        }
    }
}

impl<B: AkBackend, C: CheckpointStrategy> AkBackend for Autodiff<B, C> {
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
        let prep = HostBackward
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
                let (out, state) = host_forward::<B>(&op, vec![p0, p1, p2, p3, p4, p5]);
                // On a failed forward (recorded in `op`, returned as `Err` by the
                // caller) the node has no host state and its backward does nothing.
                let state = HostState {
                    op,
                    host: state.map(|(inputs, saved)| (Arc::new(inputs), saved)),
                    in_dims: Arc::new(in_dims),
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::ak_host_op(op, p0, p1, p2, p3, p4, p5)),
        }
    }
}
