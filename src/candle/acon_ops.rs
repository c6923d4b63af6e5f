//! candle custom ops for the ACON variants not in [`super::ops`]: ACON-A (Swish with
//! a learnable β), ACON-B, and meta-ACON-C with the layer-wise and the pixel-wise β
//! generators (SPEC §2). Re-exported from [`super::ops`].
//!
//! Same pattern as [`super::ops::AconCOp`]: `cpu_fwd` checks the input dims against the
//! op's layout and calls the CPU forward ([`crate::cpu::acon`]); `bwd` reads its inputs
//! back to host vectors, re-runs what the CPU backward needs and returns one gradient
//! per input, each of that input's shape. Several per-channel parameters travel packed
//! in one `[k, C]` tensor built with `Tensor::stack`, whose backward hands each
//! parameter its own row of the packed gradient. Inputs are made contiguous first;
//! f32 and f64 on the CPU device, any other dtype or device is a candle error.
//!
//! The layer-wise and pixel-wise generators have no learnable tensors of their own:
//! `β = σ(Σ_c GAP(x)[n, c])` per sample and `β = σ(x)` per element are functions of
//! `x` alone, so their whole gradient flows back into `x` (added to the activation's
//! own `∂y/∂x`); the learnable tensors of those meta-ACON-C forms are `p1` and `p2`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout as CLayout, Shape, Tensor};

use super::{act_shape, cerr, check_dims, check_float, check_numel, cpu_data, host, BetaShape, El};
use crate::cpu::acon::{self, MetaGen};
use crate::layout::Layout;

type CResult<T> = candle_core::Result<T>;
type Grads2 = (Option<Tensor>, Option<Tensor>);

// ---------------------------------------------------------------------------
// ACON-A

/// ACON-A (Swish with a learnable β, SPEC §2): inputs `x` and `β` (per channel, per
/// (sample, channel) or per sample, as [`Self::beta`] says); output `y = x·σ(β·x)`
/// ([`acon::acon_a_forward`]). Gradients, with `s = σ(β·x)`:
/// `dx = dy·(s + β·x·s(1 − s))` and `dβ = Σ dy·x²·s(1 − s)` summed over what shares
/// one β (N and positions for a per-channel β; [`acon::acon_a_backward`]: f64 sums,
/// deterministic), of β's own dims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AconAOp {
    /// Where the channel axis is: [`Layout::Nchw`] `(N, C, ...)` or [`Layout::Nlc`]
    /// `(N, L, C)`.
    pub layout: Layout,
    /// How β is laid out.
    pub beta: BetaShape,
}

fn acon_a_fwd<T: El>(
    op: &AconAOp,
    s1: &CpuStorage,
    l1: &CLayout,
    s2: &CpuStorage,
    l2: &CLayout,
) -> CResult<(CpuStorage, Shape)> {
    let name = "acon_a";
    let shape = act_shape(name, l1.dims(), op.layout)?;
    check_numel(name, "beta", l2.dims(), op.beta.len(&shape))?;
    let x = cpu_data::<T>(name, s1, l1)?;
    let beta = cpu_data::<T>(name, s2, l2)?;
    let y = acon::acon_a_forward(&shape, &x, op.beta.cpu(&beta)).map_err(cerr)?;
    Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
}

fn acon_a_bwd<T: El>(op: &AconAOp, x: &Tensor, beta: &Tensor, g: &Tensor) -> CResult<Grads2> {
    let shape = act_shape("acon_a", x.dims(), op.layout)?;
    let (xv, bv, gv) = (host::<T>(x)?, host::<T>(beta)?, host::<T>(g)?);
    let gr = acon::acon_a_backward(&shape, &gv, &xv, op.beta.cpu(&bv)).map_err(cerr)?;
    Ok((
        Some(Tensor::from_vec(gr.dx, x.shape(), x.device())?),
        Some(Tensor::from_vec(gr.dbeta, beta.shape(), beta.device())?),
    ))
}

impl CustomOp2 for AconAOp {
    fn name(&self) -> &'static str {
        "acon_a"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &CLayout,
        s2: &CpuStorage,
        l2: &CLayout,
    ) -> CResult<(CpuStorage, Shape)> {
        by_dtype!(s1.dtype(), "acon_a", acon_a_fwd(self, s1, l1, s2, l2))
    }
    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &CLayout,
        s2: &candle_core::CudaStorage,
        l2: &CLayout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        super::cuda::acon_a_fwd(self, s1, l1, s2, l2)
    }
    fn bwd(&self, x: &Tensor, beta: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<Grads2> {
        #[cfg(feature = "candle-cuda")]
        if x.device().is_cuda() {
            return super::cuda::acon_a_bwd(self, x, beta, g);
        }
        by_dtype!(x.dtype(), "acon_a", acon_a_bwd(self, x, beta, g))
    }
}

/// ACON-A: `y = x·σ(β·x)` (Swish for β = 1) with `beta` per channel `(C,)`, per
/// (sample, channel) `(N, C)` / `(N, C, 1, 1)` or per sample `(N, 1)`
/// ([`BetaShape`]). Differentiable w.r.t. `x` and `beta` (see [`AconAOp`] for the
/// gradients).
///
/// # Example (forward and backward through candle's autograd)
///
/// ```
/// use activation_kernels::candle::ops::acon_a;
/// use activation_kernels::Layout;
/// use approx::assert_relative_eq;
/// use candle_core::{Device, Var};
///
/// let dev = Device::Cpu;
/// let x = Var::new(&[[[1.0f64], [0.0], [-2.0]]], &dev)?; // tokens (N, L, C) = (1, 3, 1)
/// let beta = Var::new(&[1.0f64], &dev)?;
/// let y = acon_a(&x, &beta, Layout::Nlc)?; // Swish (SiLU) at β = 1
/// let sigma = |v: f64| 1.0 / (1.0 + (-v).exp());
/// assert_relative_eq!(y.flatten_all()?.to_vec1::<f64>()?[0], sigma(1.0), max_relative = 1e-12);
///
/// // Backward of L = Σ y: dβ = Σ x²·s(1 − s) with s = σ(β·x); SiLU'(0) = 1/2.
/// let grads = y.sum_all()?.backward()?;
/// let dbeta = grads.get(&beta).expect("dβ").to_vec1::<f64>()?[0];
/// let want: f64 = [1.0f64, -2.0].iter().map(|&v| v * v * sigma(v) * (1.0 - sigma(v))).sum();
/// assert_relative_eq!(dbeta, want, max_relative = 1e-12);
/// assert_eq!(grads.get(&x).expect("dx").flatten_all()?.to_vec1::<f64>()?[1], 0.5);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn acon_a(x: &Tensor, beta: &Tensor, layout: Layout) -> CResult<Tensor> {
    check_float(x.dtype(), "acon_a")?;
    let shape = act_shape("acon_a", x.dims(), layout)?;
    let op = AconAOp {
        layout,
        beta: BetaShape::of("acon_a", beta.dims(), &shape)?,
    };
    x.contiguous()?.apply_op2(&beta.contiguous()?, op)
}

// ---------------------------------------------------------------------------
// ACON-B

/// ACON-B (SPEC §2): inputs `x` and the 1-D pack `[p (C); β]`, β laid out as
/// [`Self::beta`] says (`C`, `N·C` or `N` values); output `y = (1 − p)·x·σ(β(1 − p)·x) + p·x`
/// ([`acon::acon_b_forward`], i.e. ACON-C with `p1 = 1`, `p2 = p`). Gradients, with
/// `d = (1 − p)·x`, `s = σ(β·d)`, `∂y/∂d = s + β·d·s(1 − s)`:
/// `dx = dy·((1 − p)·∂y/∂d + p)`, `dp[c] = Σ dy·(x − x·∂y/∂d)`,
/// `dβ[c] = Σ dy·d²·s(1 − s)` (sums over N and positions, f64, deterministic;
/// [`acon::acon_b_backward`]); the pack's gradient is `[dp; dβ]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AconBOp {
    /// Channel axis of `x`.
    pub layout: Layout,
    /// How the pack's β part is laid out.
    pub beta: BetaShape,
}

fn acon_b_fwd<T: El>(
    op: &AconBOp,
    s1: &CpuStorage,
    l1: &CLayout,
    s2: &CpuStorage,
    l2: &CLayout,
) -> CResult<(CpuStorage, Shape)> {
    let name = "acon_b";
    let shape = act_shape(name, l1.dims(), op.layout)?;
    let c = shape.c;
    check_dims(name, "[p; beta]", l2.dims(), &[c + op.beta.len(&shape)])?;
    let x = cpu_data::<T>(name, s1, l1)?;
    let pb = cpu_data::<T>(name, s2, l2)?;
    let y = acon::acon_b_forward(&shape, &x, &pb[..c], op.beta.cpu(&pb[c..])).map_err(cerr)?;
    Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
}

fn acon_b_bwd<T: El>(op: &AconBOp, x: &Tensor, pb: &Tensor, g: &Tensor) -> CResult<Grads2> {
    let name = "acon_b";
    let shape = act_shape(name, x.dims(), op.layout)?;
    let c = shape.c;
    check_dims(name, "[p; beta]", pb.dims(), &[c + op.beta.len(&shape)])?;
    let (xv, pv, gv) = (host::<T>(x)?, host::<T>(pb)?, host::<T>(g)?);
    let gr =
        acon::acon_b_backward(&shape, &gv, &xv, &pv[..c], op.beta.cpu(&pv[c..])).map_err(cerr)?;
    let mut dpb = gr.dp;
    dpb.extend(gr.dbeta);
    Ok((
        Some(Tensor::from_vec(gr.dx, x.shape(), x.device())?),
        Some(Tensor::from_vec(dpb, pb.shape(), pb.device())?),
    ))
}

impl CustomOp2 for AconBOp {
    fn name(&self) -> &'static str {
        "acon_b"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &CLayout,
        s2: &CpuStorage,
        l2: &CLayout,
    ) -> CResult<(CpuStorage, Shape)> {
        by_dtype!(s1.dtype(), "acon_b", acon_b_fwd(self, s1, l1, s2, l2))
    }
    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &CLayout,
        s2: &candle_core::CudaStorage,
        l2: &CLayout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        super::cuda::acon_b_fwd(self, s1, l1, s2, l2)
    }
    fn bwd(&self, x: &Tensor, pb: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<Grads2> {
        #[cfg(feature = "candle-cuda")]
        if x.device().is_cuda() {
            return super::cuda::acon_b_bwd(self, x, pb, g);
        }
        by_dtype!(x.dtype(), "acon_b", acon_b_bwd(self, x, pb, g))
    }
}

/// ACON-B: `y = (1 − p)·x·σ(β(1 − p)·x) + p·x` with `p` of dims `(C,)` and `beta`
/// per channel `(C,)`, per (sample, channel) `(N, C)` / `(N, C, 1, 1)` or per sample
/// `(N, 1)` ([`BetaShape`]). Differentiable w.r.t. `x`, `p` and `beta` (see
/// [`AconBOp`] for the gradients).
///
/// # Example (forward and backward through candle's autograd)
///
/// ```
/// use activation_kernels::candle::ops::acon_b;
/// use activation_kernels::Layout;
/// use approx::assert_relative_eq;
/// use candle_core::{Device, Tensor, Var};
///
/// let dev = Device::Cpu;
/// let x = Var::new(&[[[1.5f64, -2.0]], [[0.5, 3.0]]], &dev)?; // (N, C, H·W) = (2, 1, 2)
/// let (p, beta) = (Var::new(&[0.25f64], &dev)?, Var::new(&[3.0f64], &dev)?);
/// let y = acon_b(&x, &p, &beta, Layout::Nchw)?;
/// // y[0, 0, 1]: d = (1 − p)·x = −1.5, y = d·σ(β·d) + p·x.
/// let sigma = |v: f64| 1.0 / (1.0 + (-v).exp());
/// let y001 = y.flatten_all()?.to_vec1::<f64>()?[1];
/// assert_relative_eq!(y001, -1.5 * sigma(3.0 * -1.5) + 0.25 * -2.0, max_relative = 1e-12);
///
/// // Backward of L = Σ y: ∂L/∂p against a central difference.
/// let grads = y.sum_all()?.backward()?;
/// let dp = grads.get(&p).expect("dp").to_vec1::<f64>()?[0];
/// let loss = |p: f64| -> candle_core::Result<f64> {
///     acon_b(&x, &Tensor::new(&[p], &dev)?, &beta, Layout::Nchw)?.sum_all()?.to_scalar::<f64>()
/// };
/// let h = 1e-6;
/// assert_relative_eq!(dp, (loss(0.25 + h)? - loss(0.25 - h)?) / (2.0 * h), max_relative = 1e-6);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn acon_b(x: &Tensor, p: &Tensor, beta: &Tensor, layout: Layout) -> CResult<Tensor> {
    check_float(x.dtype(), "acon_b")?;
    let shape = act_shape("acon_b", x.dims(), layout)?;
    let op = AconBOp {
        layout,
        beta: BetaShape::of("acon_b", beta.dims(), &shape)?,
    };
    let pb = Tensor::cat(&[p.flatten_all()?, beta.flatten_all()?], 0)?;
    x.contiguous()?.apply_op2(&pb.contiguous()?, op)
}

// ---------------------------------------------------------------------------
// meta-ACON-C, layer-wise and pixel-wise generators

/// The parameter-free meta-ACON β generators (SPEC §2). The channel-wise generator,
/// which has learnable tensors, is [`super::ops::MetaAconCOp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetaGenKind {
    /// Layer-wise: one β per sample, `β[n] = σ(Σ_c GAP(x)[n, c])` (the sum of the
    /// per-channel means, [`acon::layer_gen_forward`]). Its gradient into `x`:
    /// `dx[n, c, s] += dβ[n]·β[n](1 − β[n]) / S` (S = positions per channel).
    Layer,
    /// Pixel-wise: `β = σ(x)` element-wise. Its gradient into `x`:
    /// `dx += dy·∂y/∂β·σ(x)(1 − σ(x))` with `∂y/∂β = d²·s(1 − s)`.
    Pixel,
}

impl MetaGenKind {
    fn gen<'a, T>(self) -> MetaGen<'a, T> {
        match self {
            MetaGenKind::Layer => MetaGen::Layer,
            MetaGenKind::Pixel => MetaGen::Pixel,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            MetaGenKind::Layer => "meta_acon_c_layer",
            MetaGenKind::Pixel => "meta_acon_c_pixel",
        }
    }
}

/// meta-ACON-C with a parameter-free generator (SPEC §2): inputs `x` and the pack of
/// dims `[2, C]` = `[p1; p2]`; `β = G(x)` from [`MetaGenKind`], then
/// `y = d·σ(β·d) + p2·x`, `d = (p1 − p2)·x` ([`acon::meta_acon_c_forward`]).
/// Gradients ([`acon::meta_acon_c_backward`]), with `s = σ(β·d)`,
/// `∂y/∂d = s + β·d·s(1 − s)`: `dp1[c] = Σ dy·x·∂y/∂d`,
/// `dp2[c] = Σ dy·(x − x·∂y/∂d)` (sums over N and positions, f64, deterministic), and
/// `dx = dy·((p1 − p2)·∂y/∂d + p2)` plus the path through β, `∂L/∂β = Σ dy·d²·s(1 − s)`
/// over the elements sharing β, carried into `x` as [`MetaGenKind`] states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaAconCGenOp {
    /// Channel axis of `x`.
    pub layout: Layout,
    /// Which generator produces β.
    pub gen: MetaGenKind,
}

fn meta_gen_fwd<T: El>(
    op: &MetaAconCGenOp,
    s1: &CpuStorage,
    l1: &CLayout,
    s2: &CpuStorage,
    l2: &CLayout,
) -> CResult<(CpuStorage, Shape)> {
    let name = op.gen.name();
    let shape = act_shape(name, l1.dims(), op.layout)?;
    let c = shape.c;
    check_dims(name, "[p1; p2]", l2.dims(), &[2, c])?;
    let x = cpu_data::<T>(name, s1, l1)?;
    let p = cpu_data::<T>(name, s2, l2)?;
    let (y, _) =
        acon::meta_acon_c_forward(&shape, &x, &p[..c], &p[c..], op.gen.gen()).map_err(cerr)?;
    Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
}

fn meta_gen_bwd<T: El>(op: &MetaAconCGenOp, x: &Tensor, p: &Tensor, g: &Tensor) -> CResult<Grads2> {
    let name = op.gen.name();
    let shape = act_shape(name, x.dims(), op.layout)?;
    let c = shape.c;
    check_dims(name, "[p1; p2]", p.dims(), &[2, c])?;
    let (xv, pv, gv) = (host::<T>(x)?, host::<T>(p)?, host::<T>(g)?);
    let (p1, p2) = (&pv[..c], &pv[c..]);
    let (_, saved) = acon::meta_acon_c_forward(&shape, &xv, p1, p2, op.gen.gen()).map_err(cerr)?;
    let gr =
        acon::meta_acon_c_backward(&shape, &gv, &xv, p1, p2, op.gen.gen(), &saved).map_err(cerr)?;
    let mut dp = gr.dp1;
    dp.extend(gr.dp2);
    Ok((
        Some(Tensor::from_vec(gr.dx, x.shape(), x.device())?),
        Some(Tensor::from_vec(dp, (2, c), p.device())?),
    ))
}

impl CustomOp2 for MetaAconCGenOp {
    fn name(&self) -> &'static str {
        self.gen.name()
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &CLayout,
        s2: &CpuStorage,
        l2: &CLayout,
    ) -> CResult<(CpuStorage, Shape)> {
        by_dtype!(
            s1.dtype(),
            self.gen.name(),
            meta_gen_fwd(self, s1, l1, s2, l2)
        )
    }
    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &CLayout,
        s2: &candle_core::CudaStorage,
        l2: &CLayout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        super::cuda::meta_gen_fwd(self, s1, l1, s2, l2)
    }
    fn bwd(&self, x: &Tensor, p: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<Grads2> {
        #[cfg(feature = "candle-cuda")]
        if x.device().is_cuda() {
            return super::cuda::meta_gen_bwd(self, x, p, g);
        }
        by_dtype!(x.dtype(), self.gen.name(), meta_gen_bwd(self, x, p, g))
    }
}

/// meta-ACON-C with a parameter-free β generator: `β = σ(Σ_c GAP(x)[n, c])` per sample
/// ([`MetaGenKind::Layer`]) or `β = σ(x)` per element ([`MetaGenKind::Pixel`]), then
/// `y = d·σ(β·d) + p2·x`, `d = (p1 − p2)·x`, with `p1`, `p2` of dims `(C,)`.
/// Differentiable w.r.t. `x` (through the activation and through β) and `p1`, `p2`
/// (see [`MetaAconCGenOp`] for the gradients).
///
/// # Example (forward and backward through candle's autograd)
///
/// ```
/// use activation_kernels::candle::ops::{meta_acon_c_gen, meta_acon_c_layer, meta_acon_c_pixel, MetaGenKind};
/// use activation_kernels::Layout;
/// use approx::assert_relative_eq;
/// use candle_core::{Device, Tensor, Var};
///
/// let dev = Device::Cpu;
/// let x = Var::new(&[[[0.5f64, -1.0], [2.0, -0.25]], [[1.0, 0.0], [-3.0, 0.75]]], &dev)?;
/// let (p1, p2) = (Var::new(&[1.0f64, 0.5], &dev)?, Var::new(&[0.0f64, 0.25], &dev)?);
/// for kind in [MetaGenKind::Layer, MetaGenKind::Pixel] {
///     let y = meta_acon_c_gen(&x, &p1, &p2, kind, Layout::Nchw)?;
///     // The two shorthands are this op with one generator each.
///     let y2 = match kind {
///         MetaGenKind::Layer => meta_acon_c_layer(&x, &p1, &p2, Layout::Nchw)?,
///         MetaGenKind::Pixel => meta_acon_c_pixel(&x, &p1, &p2, Layout::Nchw)?,
///     };
///     assert_eq!(y.flatten_all()?.to_vec1::<f64>()?, y2.flatten_all()?.to_vec1::<f64>()?);
///
///     // Backward of L = Σ y: dx includes the path through the generated β.
///     let grads = y.sum_all()?.backward()?;
///     let dx = grads.get(&x).expect("dx").flatten_all()?.to_vec1::<f64>()?;
///     let loss = |e: f64| -> candle_core::Result<f64> {
///         let mut v = x.flatten_all()?.to_vec1::<f64>()?;
///         v[3] += e;
///         let x = Tensor::new(v, &dev)?.reshape((2, 2, 2))?;
///         meta_acon_c_gen(&x, &p1, &p2, kind, Layout::Nchw)?.sum_all()?.to_scalar::<f64>()
///     };
///     let h = 1e-6;
///     assert_relative_eq!(dx[3], (loss(h)? - loss(-h)?) / (2.0 * h), max_relative = 1e-6);
/// }
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn meta_acon_c_gen(
    x: &Tensor,
    p1: &Tensor,
    p2: &Tensor,
    gen: MetaGenKind,
    layout: Layout,
) -> CResult<Tensor> {
    check_float(x.dtype(), gen.name())?;
    let p = Tensor::stack(&[p1, p2], 0)?;
    x.contiguous()?
        .apply_op2(&p.contiguous()?, MetaAconCGenOp { layout, gen })
}

/// Layer-wise meta-ACON-C, `β[n] = σ(Σ_c GAP(x)[n, c])`:
/// [`meta_acon_c_gen`] with [`MetaGenKind::Layer`].
///
/// Example: [`meta_acon_c_gen`]'s runs this op forward and backward.
pub fn meta_acon_c_layer(x: &Tensor, p1: &Tensor, p2: &Tensor, layout: Layout) -> CResult<Tensor> {
    meta_acon_c_gen(x, p1, p2, MetaGenKind::Layer, layout)
}

/// Pixel-wise meta-ACON-C, `β = σ(x)`: [`meta_acon_c_gen`] with [`MetaGenKind::Pixel`].
///
/// Example: [`meta_acon_c_gen`]'s runs this op forward and backward.
pub fn meta_acon_c_pixel(x: &Tensor, p1: &Tensor, p2: &Tensor, layout: Layout) -> CResult<Tensor> {
    meta_acon_c_gen(x, p1, p2, MetaGenKind::Pixel, layout)
}
