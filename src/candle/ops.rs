//! candle custom ops over the CPU backend, one per op family, and the functions that
//! apply them.
//!
//! Every op follows one pattern: `cpu_fwd` validates the input dims against the op's
//! configuration and calls the CPU forward ([`crate::cpu`]); `bwd` reads its inputs
//! back to host vectors, calls the CPU forward again to rebuild the state the CPU
//! backward needs (candle keeps nothing between forward and backward), calls the CPU
//! backward and returns one gradient per input, each of that input's shape. Learnable
//! parameters arrive packed in one input tensor (candle ops take at most three inputs);
//! the `pub fn`s below build the pack from the separate parameter tensors with
//! `Tensor::stack`/`Tensor::cat`, whose own backward hands each parameter its slice of
//! the packed gradient — so `loss.backward()` yields a gradient for every parameter
//! with exactly that parameter's shape.
//!
//! The formulas and gradients are those of the CPU functions each op calls (see their
//! rustdoc and SPEC.md). Every input is made contiguous first; f32 and f64 on the CPU
//! device; any other dtype or device is a candle error.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout as CLayout, Shape, Tensor,
};

use super::{act_shape, cerr, check_dims, check_float, cpu_data, host, op_err, BetaShape, El};
use crate::cpu::acon::{self, ChannelGen, MetaGen};
use crate::cpu::aiec::{self, AiecConfig};
use crate::cpu::iieu::{self, IieuConfig, IieuParams, PatchNorm};
use crate::cpu::iieu_dc::{self, DcConfig, DcParams};
use crate::layout::Layout;

type CResult<T> = candle_core::Result<T>;

/// Concatenates flattened tensors into one 1-D tensor (the parameter pack).
fn pack(parts: &[&Tensor]) -> CResult<Tensor> {
    let flat = parts
        .iter()
        .map(|t| t.flatten_all())
        .collect::<CResult<Vec<_>>>()?;
    Tensor::cat(&flat, 0)
}

/// Splits `v` into consecutive slices of the given lengths (`Err` if they do not add up).
pub(crate) fn split<'a, T>(op: &str, v: &'a [T], lens: &[usize]) -> CResult<Vec<&'a [T]>> {
    let total: usize = lens.iter().sum();
    if total != v.len() {
        return Err(op_err(
            op,
            format!(
                "packed parameters have {} elements, expected {total}",
                v.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(lens.len());
    let mut at = 0;
    for &l in lens {
        out.push(&v[at..at + l]);
        at += l;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// ACON-C

/// ACON-C (SPEC §2): inputs `x` and the 1-D pack `p = [p1 (C); p2 (C); β]`, β laid
/// out as [`Self::beta`] says (`C`, `N·C` or `N` values); output
/// `y = d·σ(β·d) + p2·x`, `d = (p1 − p2)·x` ([`acon::acon_c_forward`]). Gradients:
/// `dx` and `dp = [dp1; dp2; dβ]` from [`acon::acon_c_backward`] (`dβ` of β's length;
/// sums over N and positions in f64, deterministic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AconCOp {
    /// Where the channel axis is: [`Layout::Nchw`] `(N, C, ...)` or [`Layout::Nlc`]
    /// `(N, L, C)`.
    pub layout: Layout,
    /// How the pack's β part is laid out.
    pub beta: BetaShape,
}

impl AconCOp {
    /// The lengths of the pack's parts `[p1, p2, β]` for `shape`.
    pub(crate) fn lens(&self, shape: &crate::ActShape) -> [usize; 3] {
        [shape.c, shape.c, self.beta.len(shape)]
    }
}

fn acon_c_fwd<T: El>(
    op: &AconCOp,
    s1: &CpuStorage,
    l1: &CLayout,
    s2: &CpuStorage,
    l2: &CLayout,
) -> CResult<(CpuStorage, Shape)> {
    let name = "acon_c";
    let shape = act_shape(name, l1.dims(), op.layout)?;
    let lens = op.lens(&shape);
    check_dims(name, "p = [p1; p2; beta]", l2.dims(), &[lens.iter().sum()])?;
    let x = cpu_data::<T>(name, s1, l1)?;
    let p = cpu_data::<T>(name, s2, l2)?;
    let pp = split(name, &p, &lens)?;
    let y = acon::acon_c_forward(&shape, &x, pp[0], pp[1], op.beta.cpu(pp[2])).map_err(cerr)?;
    Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
}

fn acon_c_bwd<T: El>(
    op: &AconCOp,
    x: &Tensor,
    p: &Tensor,
    g: &Tensor,
) -> CResult<(Option<Tensor>, Option<Tensor>)> {
    let name = "acon_c";
    let shape = act_shape(name, x.dims(), op.layout)?;
    let (xv, pv, gv) = (host::<T>(x)?, host::<T>(p)?, host::<T>(g)?);
    let pp = split(name, &pv, &op.lens(&shape))?;
    let gr =
        acon::acon_c_backward(&shape, &gv, &xv, pp[0], pp[1], op.beta.cpu(pp[2])).map_err(cerr)?;
    let mut dp = gr.dp1;
    dp.extend(gr.dp2);
    dp.extend(gr.dbeta);
    Ok((
        Some(Tensor::from_vec(gr.dx, x.shape(), x.device())?),
        Some(Tensor::from_vec(dp, p.shape(), p.device())?),
    ))
}

impl CustomOp2 for AconCOp {
    fn name(&self) -> &'static str {
        "acon_c"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &CLayout,
        s2: &CpuStorage,
        l2: &CLayout,
    ) -> CResult<(CpuStorage, Shape)> {
        by_dtype!(s1.dtype(), "acon_c", acon_c_fwd(self, s1, l1, s2, l2))
    }
    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &CLayout,
        s2: &candle_core::CudaStorage,
        l2: &CLayout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        super::cuda::acon_c_fwd(self, s1, l1, s2, l2)
    }
    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "candle-cuda")]
        if x.device().is_cuda() {
            return super::cuda::acon_c_bwd(self, x, p, g);
        }
        by_dtype!(x.dtype(), "acon_c", acon_c_bwd(self, x, p, g))
    }
}

/// ACON-C: `y = d·σ(β·d) + p2·x`, `d = (p1 − p2)·x`, with `p1`, `p2` of dims `(C,)`
/// and `beta` per channel `(C,)`, per (sample, channel) `(N, C)` / `(N, C, 1, 1)`, or
/// per sample `(N, 1)` ([`BetaShape`]): β may be the output of any generator built
/// from candle layers, and its gradient flows back into that generator.
/// Differentiable w.r.t. `x`, `p1`, `p2` and `beta` (see [`AconCOp`]).
///
/// # Example (forward and backward through candle's autograd)
///
/// ```
/// use activation_kernels::candle::ops::acon_c;
/// use activation_kernels::Layout;
/// use approx::assert_relative_eq;
/// use candle_core::{Device, Tensor, Var};
///
/// let dev = Device::Cpu;
/// let x = Var::new(&[[[0.5f64, -1.0], [2.0, -0.25]]], &dev)?; // (N, C, H·W) = (1, 2, 2)
/// let p1 = Var::new(&[1.0f64, 0.5], &dev)?;
/// let p2 = Var::new(&[0.0f64, 0.25], &dev)?;
/// let beta = Var::new(&[1.0f64, 2.0], &dev)?;
/// let y = acon_c(&x, &p1, &p2, &beta, Layout::Nchw)?;
/// // y[0, 1, 0]: d = (p1 − p2)·x = 0.5, y = d·σ(β·d) + p2·x.
/// let sigma = |v: f64| 1.0 / (1.0 + (-v).exp());
/// let y010 = y.get(0)?.get(1)?.get(0)?.to_scalar::<f64>()?;
/// assert_relative_eq!(y010, 0.5 * sigma(1.0) + 0.25 * 2.0, max_relative = 1e-12);
///
/// // Backward of L = Σ y: each parameter gets its own gradient, of its own shape.
/// let grads = y.sum_all()?.backward()?;
/// assert_eq!(grads.get(&x).expect("dx").dims(), &[1, 2, 2]);
/// let dbeta = grads.get(&beta).expect("dβ").to_vec1::<f64>()?;
/// let loss = |b1: f64| -> candle_core::Result<f64> {
///     let beta = Tensor::new(&[1.0f64, b1], &dev)?;
///     acon_c(&x, &p1, &p2, &beta, Layout::Nchw)?.sum_all()?.to_scalar::<f64>()
/// };
/// let h = 1e-6;
/// assert_relative_eq!(dbeta[1], (loss(2.0 + h)? - loss(2.0 - h)?) / (2.0 * h), max_relative = 1e-6);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn acon_c(
    x: &Tensor,
    p1: &Tensor,
    p2: &Tensor,
    beta: &Tensor,
    layout: Layout,
) -> CResult<Tensor> {
    check_float(x.dtype(), "acon_c")?;
    let shape = act_shape("acon_c", x.dims(), layout)?;
    let beta_shape = BetaShape::of("acon_c", beta.dims(), &shape)?;
    let p = Tensor::cat(
        &[p1.flatten_all()?, p2.flatten_all()?, beta.flatten_all()?],
        0,
    )?;
    let op = AconCOp {
        layout,
        beta: beta_shape,
    };
    x.contiguous()?.apply_op2(&p.contiguous()?, op)
}

// ---------------------------------------------------------------------------
// meta-ACON-C (channel-wise generator)

/// meta-ACON-C with the channel-wise generator (SPEC §2):
/// `β[n,:] = σ(W2·(W1·GAP(x)[n,:] + b1) + b2)`, then ACON-C with that β
/// ([`acon::meta_acon_c_forward`] with [`MetaGen::Channel`]). Inputs: `x`, the pack
/// `p` of dims `[2, C]` = `[p1; p2]`, and the generator pack `[W1 (width×C), b1
/// (width, if present), W2 (C×width), b2 (C, if present)]` (1-D). Gradients: `dx`
/// (through the activation and the generator's GAP), `dp`, and the generator pack's
/// gradient ([`acon::meta_acon_c_backward`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaAconCOp {
    /// Channel axis of `x`.
    pub layout: Layout,
    /// Hidden width of the generator.
    pub width: usize,
    /// Whether the pack holds `b1`.
    pub b1: bool,
    /// Whether the pack holds `b2`.
    pub b2: bool,
}

impl MetaAconCOp {
    pub(crate) fn lens(&self, c: usize) -> [usize; 4] {
        [
            self.width * c,
            if self.b1 { self.width } else { 0 },
            c * self.width,
            if self.b2 { c } else { 0 },
        ]
    }

    fn generator<T: El>(&self, c: usize, g: &[T]) -> CResult<ChannelGen<T>> {
        let parts = split("meta_acon_c", g, &self.lens(c))?;
        Ok(ChannelGen {
            c,
            width: self.width,
            w1: parts[0].to_vec(),
            b1: self.b1.then(|| parts[1].to_vec()),
            w2: parts[2].to_vec(),
            b2: self.b2.then(|| parts[3].to_vec()),
        })
    }
}

fn meta_fwd<T: El>(
    op: &MetaAconCOp,
    s1: &CpuStorage,
    l1: &CLayout,
    s2: &CpuStorage,
    l2: &CLayout,
    s3: &CpuStorage,
    l3: &CLayout,
) -> CResult<(CpuStorage, Shape)> {
    let name = "meta_acon_c";
    let shape = act_shape(name, l1.dims(), op.layout)?;
    let c = shape.c;
    check_dims(name, "p = [p1; p2]", l2.dims(), &[2, c])?;
    let x = cpu_data::<T>(name, s1, l1)?;
    let p = cpu_data::<T>(name, s2, l2)?;
    let g = cpu_data::<T>(name, s3, l3)?;
    let gen = op.generator(c, &g)?;
    let (y, _) = acon::meta_acon_c_forward(&shape, &x, &p[..c], &p[c..], MetaGen::Channel(&gen))
        .map_err(cerr)?;
    Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
}

type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

fn meta_bwd<T: El>(
    op: &MetaAconCOp,
    x: &Tensor,
    p: &Tensor,
    gp: &Tensor,
    g: &Tensor,
) -> CResult<Grads3> {
    let name = "meta_acon_c";
    let shape = act_shape(name, x.dims(), op.layout)?;
    let c = shape.c;
    let (xv, pv, gpv, gv) = (host::<T>(x)?, host::<T>(p)?, host::<T>(gp)?, host::<T>(g)?);
    let gen = op.generator(c, &gpv)?;
    let (p1, p2) = (&pv[..c], &pv[c..]);
    let (_, saved) =
        acon::meta_acon_c_forward(&shape, &xv, p1, p2, MetaGen::Channel(&gen)).map_err(cerr)?;
    let gr = acon::meta_acon_c_backward(&shape, &gv, &xv, p1, p2, MetaGen::Channel(&gen), &saved)
        .map_err(cerr)?;
    let mut dp = gr.dp1;
    dp.extend(gr.dp2);
    let mut dg = gr.dw1;
    dg.extend(gr.db1.unwrap_or_default());
    dg.extend(gr.dw2);
    dg.extend(gr.db2.unwrap_or_default());
    Ok((
        Some(Tensor::from_vec(gr.dx, x.shape(), x.device())?),
        Some(Tensor::from_vec(dp, (2, c), p.device())?),
        Some(Tensor::from_vec(dg, gp.shape(), gp.device())?),
    ))
}

impl CustomOp3 for MetaAconCOp {
    fn name(&self) -> &'static str {
        "meta_acon_c"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &CLayout,
        s2: &CpuStorage,
        l2: &CLayout,
        s3: &CpuStorage,
        l3: &CLayout,
    ) -> CResult<(CpuStorage, Shape)> {
        by_dtype!(
            s1.dtype(),
            "meta_acon_c",
            meta_fwd(self, s1, l1, s2, l2, s3, l3)
        )
    }
    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &CLayout,
        s2: &candle_core::CudaStorage,
        l2: &CLayout,
        s3: &candle_core::CudaStorage,
        l3: &CLayout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        super::cuda::meta_fwd(self, (s1, l1), (s2, l2), (s3, l3))
    }
    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        gp: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<Grads3> {
        #[cfg(feature = "candle-cuda")]
        if x.device().is_cuda() {
            return super::cuda::meta_bwd(self, x, p, gp, g);
        }
        by_dtype!(x.dtype(), "meta_acon_c", meta_bwd(self, x, p, gp, g))
    }
}

/// The channel-wise meta-ACON generator's parameter tensors.
#[derive(Debug, Clone)]
pub struct ChannelGenTensors {
    /// `W1`, dims `(width, C)`.
    pub w1: Tensor,
    /// Optional `b1`, dims `(width,)`.
    pub b1: Option<Tensor>,
    /// `W2`, dims `(C, width)`.
    pub w2: Tensor,
    /// Optional `b2`, dims `(C,)`.
    pub b2: Option<Tensor>,
}

/// meta-ACON-C with the channel-wise generator: `β = σ(W2·(W1·GAP(x) + b1) + b2)`
/// per (sample, channel), `y = d·σ(β·d) + p2·x`, `d = (p1 − p2)·x`. Differentiable
/// w.r.t. `x`, `p1`, `p2` (dims `(C,)`) and every generator tensor (see [`MetaAconCOp`]).
///
/// # Example (forward and backward through candle's autograd)
///
/// ```
/// use activation_kernels::candle::ops::{meta_acon_c, ChannelGenTensors};
/// use activation_kernels::Layout;
/// use approx::assert_relative_eq;
/// use candle_core::{Device, Tensor, Var};
///
/// let dev = Device::Cpu;
/// let x = Var::new(&[[[0.5f64, -1.0], [2.0, -0.25]], [[1.0, 0.0], [-3.0, 0.75]]], &dev)?; // (2, 2, 2)
/// let (p1, p2) = (Var::new(&[1.0f64, 0.5], &dev)?, Var::new(&[0.0f64, 0.25], &dev)?);
/// let w1 = Var::new(&[[0.5f64, -0.25]], &dev)?; // (width, C) = (1, 2)
/// let w2 = Var::new(&[[1.0f64], [-2.0]], &dev)?; // (C, width)
/// let gen = ChannelGenTensors { w1: w1.as_tensor().clone(), b1: None, w2: w2.as_tensor().clone(), b2: None };
/// let y = meta_acon_c(&x, &p1, &p2, &gen, Layout::Nchw)?;
/// assert_eq!(y.dims(), &[2, 2, 2]);
///
/// // Backward of L = Σ y: the generator's weights get gradients through β.
/// let grads = y.sum_all()?.backward()?;
/// let dw2 = grads.get(&w2).expect("dW2").flatten_all()?.to_vec1::<f64>()?;
/// let loss = |w2_1: f64| -> candle_core::Result<f64> {
///     let gen = ChannelGenTensors { w2: Tensor::new(&[[1.0f64], [w2_1]], &dev)?, ..gen.clone() };
///     meta_acon_c(&x, &p1, &p2, &gen, Layout::Nchw)?.sum_all()?.to_scalar::<f64>()
/// };
/// let h = 1e-6;
/// assert_relative_eq!(dw2[1], (loss(-2.0 + h)? - loss(-2.0 - h)?) / (2.0 * h), max_relative = 1e-6);
/// assert!(grads.get(&w1).is_some() && grads.get(&p2).is_some());
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn meta_acon_c(
    x: &Tensor,
    p1: &Tensor,
    p2: &Tensor,
    gen: &ChannelGenTensors,
    layout: Layout,
) -> CResult<Tensor> {
    check_float(x.dtype(), "meta_acon_c")?;
    let (width, c) = gen.w1.dims2()?;
    check_dims("meta_acon_c", "w2", gen.w2.dims(), &[c, width])?;
    let p = Tensor::stack(&[p1, p2], 0)?;
    let mut parts = vec![&gen.w1];
    parts.extend(gen.b1.as_ref());
    parts.push(&gen.w2);
    parts.extend(gen.b2.as_ref());
    let op = MetaAconCOp {
        layout,
        width,
        b1: gen.b1.is_some(),
        b2: gen.b2.is_some(),
    };
    x.contiguous()?
        .apply_op3(&p.contiguous()?, &pack(&parts)?, op)
}

// ---------------------------------------------------------------------------
// IIEU-B

pub use crate::cpu::iieu::IieuOpts;

impl IieuOpts {
    /// The settings of a `candle_nn::Conv2d` (symmetric stride, padding, dilation).
    pub fn from_conv2d_config(cfg: &candle_nn::Conv2dConfig) -> Self {
        Self {
            stride: (cfg.stride, cfg.stride),
            padding: (cfg.padding, cfg.padding),
            dilation: (cfg.dilation, cfg.dilation),
            groups: cfg.groups,
            patch_norm: PatchNorm::PerGroup,
        }
    }
}

/// IIEU-B (SPEC §1.1–1.4): inputs `x` (`(N, O, H', W')`, the conv output after ψ),
/// `x_pre` (`(N, C, H, W)`, the conv input) and the pack `[W (O, C/g, KH, KW) flattened;
/// γ̇ (O); β̇ (O); η (O)]`; output `y = ς(ρ̂)·x` ([`iieu::forward`]). Gradients: `dx`,
/// `dx_pre` (through `r_x`), and the pack's (`dW` through `r_w`, `dγ̇`, `dβ̇`, `dη`)
/// from [`iieu::backward`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IieuBOp {
    /// Conv settings.
    pub opts: IieuOpts,
    /// Dims of the conv weight `(O, C/g, KH, KW)`.
    pub w_dims: [usize; 4],
}

/// The IIEU configuration of an op on `x_pre` of `x_pre_dims` with a weight of
/// `w_dims` (O, C/g, KH, KW) and `opts`; `name` is the op's name in errors.
pub(crate) fn iieu_config(
    name: &'static str,
    w_dims: [usize; 4],
    opts: &IieuOpts,
    x_pre_dims: &[usize],
) -> CResult<IieuConfig> {
    let [o, cpg, kh, kw] = w_dims;
    let &[n, c, h, w] = x_pre_dims else {
        return Err(op_err(
            name,
            format!("x_pre must be (N, C, H, W), got {x_pre_dims:?}"),
        ));
    };
    if cpg.checked_mul(opts.groups) != Some(c) {
        return Err(op_err(
            name,
            format!(
                "weight {w_dims:?} with {} groups does not fit x_pre with {c} channels",
                opts.groups
            ),
        ));
    }
    Ok(opts.config(n, c, h, w, o, kh, kw))
}

impl IieuBOp {
    pub(crate) fn config(&self, x_pre_dims: &[usize]) -> CResult<IieuConfig> {
        iieu_config("iieu_b", self.w_dims, &self.opts, x_pre_dims)
    }

    /// Validates `x` against the config, splits the pack into `W` and the params.
    fn unpack<T: El>(
        &self,
        cfg: &IieuConfig,
        x_dims: &[usize],
        wp: &[T],
    ) -> CResult<(Vec<T>, IieuParams<T>)> {
        let (oh, ow) = cfg.validate().map_err(cerr)?;
        let g = cfg.geometry;
        check_dims("iieu_b", "x", x_dims, &[g.n, g.c_out, oh, ow])?;
        let o = g.c_out;
        let wl = self.w_dims.iter().product::<usize>();
        let parts = split("iieu_b", wp, &[wl, o, o, o])?;
        Ok((
            parts[0].to_vec(),
            IieuParams {
                ln_weight: parts[1].to_vec(),
                ln_bias: parts[2].to_vec(),
                eta: parts[3].to_vec(),
            },
        ))
    }
}

fn iieu_fwd<T: El>(
    op: &IieuBOp,
    s1: &CpuStorage,
    l1: &CLayout,
    s2: &CpuStorage,
    l2: &CLayout,
    s3: &CpuStorage,
    l3: &CLayout,
) -> CResult<(CpuStorage, Shape)> {
    let name = "iieu_b";
    let cfg = op.config(l2.dims())?;
    let x = cpu_data::<T>(name, s1, l1)?;
    let x_pre = cpu_data::<T>(name, s2, l2)?;
    let wp = cpu_data::<T>(name, s3, l3)?;
    let (w, params) = op.unpack(&cfg, l1.dims(), &wp)?;
    let (y, _) = iieu::forward(&cfg, &x, &x_pre, &w, &params).map_err(cerr)?;
    Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
}

fn iieu_bwd<T: El>(
    op: &IieuBOp,
    x: &Tensor,
    xp: &Tensor,
    wp: &Tensor,
    g: &Tensor,
) -> CResult<Grads3> {
    let cfg = op.config(xp.dims())?;
    let (xv, xpv, wpv, gv) = (host::<T>(x)?, host::<T>(xp)?, host::<T>(wp)?, host::<T>(g)?);
    let (w, params) = op.unpack(&cfg, x.dims(), &wpv)?;
    let (_, saved) = iieu::forward(&cfg, &xv, &xpv, &w, &params).map_err(cerr)?;
    let gr = iieu::backward(&cfg, &gv, &xv, &xpv, &w, &params, &saved).map_err(cerr)?;
    let mut dwp = gr.dw;
    dwp.extend(gr.d_ln_weight);
    dwp.extend(gr.d_ln_bias);
    dwp.extend(gr.d_eta);
    Ok((
        Some(Tensor::from_vec(gr.dx, x.shape(), x.device())?),
        Some(Tensor::from_vec(gr.dx_pre, xp.shape(), xp.device())?),
        Some(Tensor::from_vec(dwp, wp.shape(), wp.device())?),
    ))
}

impl CustomOp3 for IieuBOp {
    fn name(&self) -> &'static str {
        "iieu_b"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &CLayout,
        s2: &CpuStorage,
        l2: &CLayout,
        s3: &CpuStorage,
        l3: &CLayout,
    ) -> CResult<(CpuStorage, Shape)> {
        by_dtype!(s1.dtype(), "iieu_b", iieu_fwd(self, s1, l1, s2, l2, s3, l3))
    }
    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &CLayout,
        s2: &candle_core::CudaStorage,
        l2: &CLayout,
        s3: &candle_core::CudaStorage,
        l3: &CLayout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        super::cuda::iieu_fwd(self, (s1, l1), (s2, l2), (s3, l3))
    }
    fn bwd(
        &self,
        x: &Tensor,
        xp: &Tensor,
        wp: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<Grads3> {
        #[cfg(feature = "candle-cuda")]
        if x.device().is_cuda() {
            return super::cuda::iieu_bwd(self, x, xp, wp, g);
        }
        by_dtype!(x.dtype(), "iieu_b", iieu_bwd(self, x, xp, wp, g))
    }
}

/// IIEU-B after a convolution: `x` = the conv output (after ψ, e.g. its bias or a
/// BatchNorm), `x_pre` = the conv input, `w` = the conv weight `(O, C/g, KH, KW)`,
/// `ln_weight` (γ̇), `ln_bias` (β̇), `eta` (η) of dims `(O,)`. Returns
/// `y = ς(s + ν)·x` (see [`IieuBOp`]). Differentiable w.r.t. all six tensors; the
/// weight's gradient here is only its path through `r_w` (its path through the
/// convolution is candle's conv backward).
///
/// # Example (forward and backward through candle's autograd)
///
/// ```
/// use activation_kernels::candle::ops::{iieu_b, IieuOpts};
/// use approx::assert_relative_eq;
/// use candle_core::{Device, Tensor, Var};
///
/// let dev = Device::Cpu;
/// let x_pre = Tensor::arange(0.0f64, 18.0, &dev)?.affine(0.7, -5.0)?.sin()?.reshape((1, 2, 3, 3))?;
/// let w = Var::from_tensor(&Tensor::arange(0.0f64, 36.0, &dev)?.affine(0.5, 1.0)?.cos()?.reshape((2, 2, 3, 3))?)?;
/// let ln_weight = Var::new(&[0.01f64, 0.01], &dev)?;
/// let ln_bias = Var::new(&[0.0f64, 0.0], &dev)?;
/// let eta = Var::new(&[0.05f64, 0.05], &dev)?;
/// // IIEU-B after a 3×3 conv with padding 1: the conv is candle's own.
/// let x = x_pre.conv2d(&w, 1, 1, 1, 1)?;
/// let opts = IieuOpts { padding: (1, 1), ..IieuOpts::default() };
/// let y = iieu_b(&x, &x_pre, &w, &ln_weight, &ln_bias, &eta, opts)?;
/// assert_eq!(y.dims(), &[1, 2, 3, 3]);
///
/// // Backward of L = Σ y: autograd adds the conv's path to IIEU-B's own (through x
/// // and r_w); ∂L/∂W[0] and ∂L/∂γ̇[1] against central differences.
/// let grads = y.sum_all()?.backward()?;
/// let loss = |w: &Tensor, ln_weight: &Tensor| -> candle_core::Result<f64> {
///     let x = x_pre.conv2d(w, 1, 1, 1, 1)?;
///     iieu_b(&x, &x_pre, w, ln_weight, &ln_bias, &eta, opts)?.sum_all()?.to_scalar::<f64>()
/// };
/// let h = 1e-6;
/// let w_at = |e: f64| -> candle_core::Result<Tensor> {
///     let mut v = w.flatten_all()?.to_vec1::<f64>()?;
///     v[0] += e;
///     Tensor::new(v, &dev)?.reshape((2, 2, 3, 3))
/// };
/// let dw = grads.get(&w).expect("dW").flatten_all()?.to_vec1::<f64>()?;
/// let fd = (loss(&w_at(h)?, &ln_weight)? - loss(&w_at(-h)?, &ln_weight)?) / (2.0 * h);
/// assert_relative_eq!(dw[0], fd, max_relative = 1e-6);
/// let gamma_at = |e: f64| Tensor::new(&[0.01f64, 0.01 + e], &dev);
/// let d_gamma = grads.get(&ln_weight).expect("dγ̇").to_vec1::<f64>()?;
/// let fd = (loss(&w, &gamma_at(h)?)? - loss(&w, &gamma_at(-h)?)?) / (2.0 * h);
/// assert_relative_eq!(d_gamma[1], fd, epsilon = 1e-8, max_relative = 1e-6);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn iieu_b(
    x: &Tensor,
    x_pre: &Tensor,
    w: &Tensor,
    ln_weight: &Tensor,
    ln_bias: &Tensor,
    eta: &Tensor,
    opts: IieuOpts,
) -> CResult<Tensor> {
    check_float(x.dtype(), "iieu_b")?;
    let &[o, cpg, kh, kw] = w.dims() else {
        return Err(op_err(
            "iieu_b",
            format!("w must be (O, C/g, KH, KW), got {:?}", w.dims()),
        ));
    };
    for (what, t) in [("ln_weight", ln_weight), ("ln_bias", ln_bias), ("eta", eta)] {
        check_dims("iieu_b", what, t.dims(), &[o])?;
    }
    let op = IieuBOp {
        opts,
        w_dims: [o, cpg, kh, kw],
    };
    let wp = pack(&[w, ln_weight, ln_bias, eta])?;
    x.contiguous()?.apply_op3(&x_pre.contiguous()?, &wp, op)
}

// ---------------------------------------------------------------------------
// IIEU-DC

/// IIEU-DC (SPEC §1.6): inputs `x`, `res` (`(N, C, ...)`, same dims) and the pack of
/// the nine parameters in [`DcParams`] field order (`ln1_weight`, `ln1_bias`, `W1`,
/// `γ₂`, `β₂`, `η₂`, `W2`, `ln2_weight`, `ln2_bias`); output
/// `λ[n,0,c]·x + λ[n,1,c]·res` ([`iieu_dc::forward`]). Gradients: `dx`, `dres` and the
/// pack's, from [`iieu_dc::backward`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IieuDcOp {
    /// Hidden width of the coupler (`C / r`).
    pub hidden: usize,
}

impl IieuDcOp {
    pub(crate) fn config(&self, dims: &[usize]) -> CResult<DcConfig> {
        if dims.len() < 2 {
            return Err(op_err(
                "iieu_dc",
                format!("x must be (N, C, ...), got {dims:?}"),
            ));
        }
        Ok(DcConfig {
            n: dims[0],
            c: dims[1],
            s: dims[2..].iter().product(),
            hidden: self.hidden,
        })
    }

    pub(crate) fn params<T: El>(&self, c: usize, p: &[T]) -> CResult<DcParams<T>> {
        let (c2, hd) = (2 * c, self.hidden);
        let v = split(
            "iieu_dc",
            p,
            &[c2, c2, hd * c, 2 * hd, 2 * hd, hd, c * hd, c2, c2],
        )?;
        Ok(DcParams {
            ln1_weight: v[0].to_vec(),
            ln1_bias: v[1].to_vec(),
            w1: v[2].to_vec(),
            gamma2: v[3].to_vec(),
            beta2: v[4].to_vec(),
            eta2: v[5].to_vec(),
            w2: v[6].to_vec(),
            ln2_weight: v[7].to_vec(),
            ln2_bias: v[8].to_vec(),
        })
    }
}

fn dc_fwd<T: El>(
    op: &IieuDcOp,
    s1: &CpuStorage,
    l1: &CLayout,
    s2: &CpuStorage,
    l2: &CLayout,
    s3: &CpuStorage,
    l3: &CLayout,
) -> CResult<(CpuStorage, Shape)> {
    let name = "iieu_dc";
    let cfg = op.config(l1.dims())?;
    check_dims(name, "res", l2.dims(), l1.dims())?;
    let x = cpu_data::<T>(name, s1, l1)?;
    let res = cpu_data::<T>(name, s2, l2)?;
    let p = cpu_data::<T>(name, s3, l3)?;
    let params = op.params(cfg.c, &p)?;
    let (y, _) = iieu_dc::forward(&cfg, &x, &res, &params).map_err(cerr)?;
    Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
}

fn dc_bwd<T: El>(op: &IieuDcOp, x: &Tensor, r: &Tensor, p: &Tensor, g: &Tensor) -> CResult<Grads3> {
    let cfg = op.config(x.dims())?;
    let (xv, rv, pv, gv) = (host::<T>(x)?, host::<T>(r)?, host::<T>(p)?, host::<T>(g)?);
    let params = op.params(cfg.c, &pv)?;
    let (_, saved) = iieu_dc::forward(&cfg, &xv, &rv, &params).map_err(cerr)?;
    let gr = iieu_dc::backward(&cfg, &gv, &xv, &rv, &params, &saved).map_err(cerr)?;
    let mut dp = Vec::with_capacity(pv.len());
    for part in [
        gr.d_ln1_weight,
        gr.d_ln1_bias,
        gr.d_w1,
        gr.d_gamma2,
        gr.d_beta2,
        gr.d_eta2,
        gr.d_w2,
        gr.d_ln2_weight,
        gr.d_ln2_bias,
    ] {
        dp.extend(part);
    }
    Ok((
        Some(Tensor::from_vec(gr.dx, x.shape(), x.device())?),
        Some(Tensor::from_vec(gr.dres, r.shape(), r.device())?),
        Some(Tensor::from_vec(dp, p.shape(), p.device())?),
    ))
}

impl CustomOp3 for IieuDcOp {
    fn name(&self) -> &'static str {
        "iieu_dc"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &CLayout,
        s2: &CpuStorage,
        l2: &CLayout,
        s3: &CpuStorage,
        l3: &CLayout,
    ) -> CResult<(CpuStorage, Shape)> {
        by_dtype!(s1.dtype(), "iieu_dc", dc_fwd(self, s1, l1, s2, l2, s3, l3))
    }
    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &CLayout,
        s2: &candle_core::CudaStorage,
        l2: &CLayout,
        s3: &candle_core::CudaStorage,
        l3: &CLayout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        super::cuda::dc_fwd(self, (s1, l1), (s2, l2), (s3, l3))
    }
    fn bwd(
        &self,
        x: &Tensor,
        r: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<Grads3> {
        #[cfg(feature = "candle-cuda")]
        if x.device().is_cuda() {
            return super::cuda::dc_bwd(self, x, r, p, g);
        }
        by_dtype!(x.dtype(), "iieu_dc", dc_bwd(self, x, r, p, g))
    }
}

/// The nine IIEU-DC parameter tensors (dims for `C` channels, hidden width `Hd`).
#[derive(Debug, Clone)]
pub struct DcTensors {
    /// LayerNorm-1 weight `(2C,)`.
    pub ln1_weight: Tensor,
    /// LayerNorm-1 bias `(2C,)`.
    pub ln1_bias: Tensor,
    /// `W1`, `(Hd, C)`.
    pub w1: Tensor,
    /// `γ₂`, `(2, Hd)`.
    pub gamma2: Tensor,
    /// `β₂`, `(2, Hd)`.
    pub beta2: Tensor,
    /// `η₂`, `(Hd,)`.
    pub eta2: Tensor,
    /// `W2`, `(C, Hd)`.
    pub w2: Tensor,
    /// LayerNorm-2 weight `(2C,)`.
    pub ln2_weight: Tensor,
    /// LayerNorm-2 bias `(2C,)`.
    pub ln2_bias: Tensor,
}

/// IIEU-DC: `out = λ₀·x + λ₁·res` with `λ` from the coupler (see [`IieuDcOp`] and
/// [`crate::cpu::iieu_dc`]). Differentiable w.r.t. `x`, `res` and all nine parameters.
///
/// # Example (forward and backward through candle's autograd)
///
/// ```
/// use activation_kernels::candle::ops::{iieu_dc, DcTensors};
/// use activation_kernels::cpu::iieu_dc::{DcConfig, DcParams};
/// use approx::assert_relative_eq;
/// use candle_core::{Device, Tensor, Var};
///
/// let dev = Device::Cpu;
/// let x = Var::from_tensor(&Tensor::arange(0.0f64, 32.0, &dev)?.affine(0.1, -1.5)?.reshape((2, 4, 2, 2))?)?;
/// let res = Var::from_tensor(&Tensor::arange(0.0f64, 32.0, &dev)?.affine(-0.05, 1.0)?.reshape((2, 4, 2, 2))?)?;
/// // The authors' init for C = 4, r = 2 (hidden width 2), as candle tensors.
/// let p = DcParams::<f64>::init(&DcConfig::new(2, 4, 2, 2, 2)?, 1)?;
/// let t = |v: &[f64], dims: &[usize]| Tensor::new(v, &dev)?.reshape(dims);
/// let w2 = Var::from_tensor(&t(&p.w2, &[4, 2])?)?;
/// let params = DcTensors {
///     ln1_weight: t(&p.ln1_weight, &[8])?,
///     ln1_bias: t(&p.ln1_bias, &[8])?,
///     w1: t(&p.w1, &[2, 4])?,
///     gamma2: t(&p.gamma2, &[2, 2])?,
///     beta2: t(&p.beta2, &[2, 2])?,
///     eta2: t(&p.eta2, &[2])?,
///     w2: w2.as_tensor().clone(),
///     ln2_weight: t(&[1.0; 8], &[8])?, // a livelier mix than the init's 0.01
///     ln2_bias: t(&p.ln2_bias, &[8])?,
/// };
/// let out = iieu_dc(&x, &res, &params)?;
/// assert_eq!(out.dims(), &[2, 4, 2, 2]);
///
/// // Backward of L = Σ out²: ∂L/∂W2[0, 1] against a central difference.
/// let grads = out.sqr()?.sum_all()?.backward()?;
/// let dw2 = grads.get(&w2).expect("dW2").flatten_all()?.to_vec1::<f64>()?;
/// let loss = |e: f64| -> candle_core::Result<f64> {
///     let mut v = p.w2.clone();
///     v[1] += e;
///     let params = DcTensors { w2: t(&v, &[4, 2])?, ..params.clone() };
///     iieu_dc(&x, &res, &params)?.sqr()?.sum_all()?.to_scalar::<f64>()
/// };
/// let h = 1e-6;
/// assert_relative_eq!(dw2[1], (loss(h)? - loss(-h)?) / (2.0 * h), max_relative = 1e-6);
/// assert_eq!(grads.get(&res).expect("dres").dims(), &[2, 4, 2, 2]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn iieu_dc(x: &Tensor, res: &Tensor, p: &DcTensors) -> CResult<Tensor> {
    check_float(x.dtype(), "iieu_dc")?;
    let (hd, c) = p.w1.dims2()?;
    let name = "iieu_dc";
    for (what, t, want) in [
        ("ln1_weight", &p.ln1_weight, vec![2 * c]),
        ("ln1_bias", &p.ln1_bias, vec![2 * c]),
        ("gamma2", &p.gamma2, vec![2, hd]),
        ("beta2", &p.beta2, vec![2, hd]),
        ("eta2", &p.eta2, vec![hd]),
        ("w2", &p.w2, vec![c, hd]),
        ("ln2_weight", &p.ln2_weight, vec![2 * c]),
        ("ln2_bias", &p.ln2_bias, vec![2 * c]),
    ] {
        check_dims(name, what, t.dims(), &want)?;
    }
    let packed = pack(&[
        &p.ln1_weight,
        &p.ln1_bias,
        &p.w1,
        &p.gamma2,
        &p.beta2,
        &p.eta2,
        &p.w2,
        &p.ln2_weight,
        &p.ln2_bias,
    ])?;
    x.contiguous()?
        .apply_op3(&res.contiguous()?, &packed, IieuDcOp { hidden: hd })
}

// ---------------------------------------------------------------------------
// AIEC

/// TAU (SPEC §3): `A = F if F > τ else 0`, element-wise ([`aiec::tau_forward`]);
/// gradient `dF = dA·[F > τ]` ([`aiec::tau_backward`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TauOp {
    /// Threshold τ (finite, ≥ 0).
    pub tau: f64,
}

fn tau_fwd<T: El>(op: &TauOp, s: &CpuStorage, l: &CLayout) -> CResult<(CpuStorage, Shape)> {
    let x = cpu_data::<T>("tau", s, l)?;
    let y = aiec::tau_forward(&x, T::of(op.tau)).map_err(cerr)?;
    Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
}

fn tau_bwd<T: El>(op: &TauOp, x: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
    let dx = aiec::tau_backward(&host::<T>(g)?, &host::<T>(x)?, T::of(op.tau)).map_err(cerr)?;
    Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
}

impl CustomOp1 for TauOp {
    fn name(&self) -> &'static str {
        "aiec_tau"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &CLayout) -> CResult<(CpuStorage, Shape)> {
        by_dtype!(s.dtype(), "aiec_tau", tau_fwd(self, s, l))
    }
    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &CLayout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        super::cuda::tau_fwd(self, s, l)
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        #[cfg(feature = "candle-cuda")]
        if x.device().is_cuda() {
            return super::cuda::tau_bwd(self, x, g);
        }
        by_dtype!(x.dtype(), "aiec_tau", tau_bwd(self, x, g))
    }
}

/// TAU `A = F·[F > τ]`, differentiable w.r.t. `f`.
///
/// # Example (forward and backward through candle's autograd)
///
/// ```
/// use activation_kernels::candle::ops::tau;
/// use candle_core::{Device, Var};
///
/// let f = Var::new(&[-1.0f32, 0.25, 0.5, 2.0], &Device::Cpu)?;
/// let a = tau(&f, 0.25)?;
/// assert_eq!(a.to_vec1::<f32>()?, [0.0, 0.0, 0.5, 2.0]);
/// let grads = (a * 3.0)?.sum_all()?.backward()?; // L = 3·Σ A
/// assert_eq!(grads.get(&f).expect("dF").to_vec1::<f32>()?, [0.0, 0.0, 3.0, 3.0]); // 3·[F > τ]
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn tau(f: &Tensor, tau: f64) -> CResult<Tensor> {
    check_float(f.dtype(), "aiec_tau")?;
    f.contiguous()?.apply_op1(TauOp { tau })
}

/// AIEC auxiliary + gate loss of one layer (SPEC §3) as a scalar of `(F, Wd)`:
/// `λ_aux·mean_n L_aux[n] + λ_gate·mean_n L_gate[n]` with `A = TAU(F)`, `a` = the
/// global feature of `A`, `L_aux[n] = −log softmax(a·Wdᵀ)[n, y_n]` and
/// `L_gate[n] = Σ_c |a[n,c]·G[y_n,c]| / Σ_c G[y_n,c]` for the given masks `G`
/// ([`aiec::train_forward_with_masks`]). Inputs `F` (`(N, C, ...)` or `(N, L, C)`) and
/// `Wd` (`(K, C)`); output dims `()`. The labels and masks are constants of the op (the
/// masks carry no gradient, SPEC §3), held as tensors on the device of `F` so that the
/// CUDA path reads them in place. Gradients ([`aiec::train_backward`] with
/// `d_out = 0` and `loss_scale` = the upstream scalar gradient): `dF` through the
/// global feature and TAU, `dWd` through the DMU.
///
/// Labels: `N` class indices, dtype `U32` (on the CPU any integer dtype; checked:
/// every label `< K`). On a CUDA device their values are not read by the host; a label
/// `≥ K` is flagged by the kernels instead of followed (its sample's losses are NaN, so
/// the op's value is NaN, and it contributes no gradient). Masks: `K·C` values, dtype
/// `U8`, nonzero = gated.
#[derive(Debug, Clone)]
pub struct AiecLossOp {
    /// τ, λ_aux, λ_gate and the pooling.
    pub cfg: AiecConfig,
    /// Channel axis of `F`.
    pub layout: Layout,
    /// Class labels `y_n` (`(N,)`, `U32`, on the device of `F`).
    pub labels: Tensor,
    /// Consensus masks `G` (`K × C` values, row-major, `U8`, on the device of `F`).
    pub masks: Tensor,
}

impl AiecLossOp {
    /// Checks the dims of `F`, `Wd`, the labels and the masks; returns `F`'s shape.
    pub(crate) fn check(
        &self,
        f_dims: &[usize],
        wd_dims: &[usize],
    ) -> CResult<crate::layout::ActShape> {
        let shape = act_shape("aiec_loss", f_dims, self.layout)?;
        let &[k, c] = wd_dims else {
            return Err(op_err(
                "aiec_loss",
                format!("wd must be (K, C), got {wd_dims:?}"),
            ));
        };
        check_dims("aiec_loss", "wd", wd_dims, &[k, shape.c])?;
        if self.masks.elem_count() != k * c {
            return Err(op_err(
                "aiec_loss",
                format!("{} masks for a ({k}, {c}) Wd", self.masks.elem_count()),
            ));
        }
        if self.labels.dims() != [shape.n] {
            return Err(op_err(
                "aiec_loss",
                format!(
                    "labels have dims {:?}, expected ({},)",
                    self.labels.dims(),
                    shape.n
                ),
            ));
        }
        Ok(shape)
    }

    /// The labels and masks on the host (CPU path).
    fn host_labels_masks(&self) -> CResult<(Vec<usize>, Vec<bool>)> {
        let labels = self
            .labels
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?
            .into_iter()
            .map(|y| y as usize)
            .collect();
        let masks = self
            .masks
            .flatten_all()?
            .to_dtype(DType::U8)?
            .to_vec1::<u8>()?
            .into_iter()
            .map(|m| m != 0)
            .collect();
        Ok((labels, masks))
    }
}

fn aiec_loss_fwd<T: El>(
    op: &AiecLossOp,
    s1: &CpuStorage,
    l1: &CLayout,
    s2: &CpuStorage,
    l2: &CLayout,
) -> CResult<(CpuStorage, Shape)> {
    let shape = op.check(l1.dims(), l2.dims())?;
    let f = cpu_data::<T>("aiec_loss", s1, l1)?;
    let wd = cpu_data::<T>("aiec_loss", s2, l2)?;
    let (labels, masks) = op.host_labels_masks()?;
    let out =
        aiec::train_forward_with_masks(&op.cfg, &shape, &f, &wd, &labels, &masks).map_err(cerr)?;
    Ok((
        T::to_cpu_storage_owned(vec![out.losses.total_aux_gate]),
        Shape::from(()),
    ))
}

fn aiec_loss_bwd<T: El>(
    op: &AiecLossOp,
    f: &Tensor,
    wd: &Tensor,
    g: &Tensor,
) -> CResult<(Option<Tensor>, Option<Tensor>)> {
    let shape = op.check(f.dims(), wd.dims())?;
    let (fv, wdv) = (host::<T>(f)?, host::<T>(wd)?);
    let scale = host::<T>(g)?
        .first()
        .copied()
        .ok_or_else(|| op_err("aiec_loss", "empty upstream gradient"))?;
    let (labels, masks) = op.host_labels_masks()?;
    let out = aiec::train_forward_with_masks(&op.cfg, &shape, &fv, &wdv, &labels, &masks)
        .map_err(cerr)?;
    let d_out = vec![T::zero(); fv.len()];
    let gr = aiec::train_backward(&op.cfg, &shape, &d_out, scale, &fv, &wdv, &out.saved)
        .map_err(cerr)?;
    Ok((
        Some(Tensor::from_vec(gr.df, f.shape(), f.device())?),
        Some(Tensor::from_vec(gr.dwd, wd.shape(), wd.device())?),
    ))
}

impl CustomOp2 for AiecLossOp {
    fn name(&self) -> &'static str {
        "aiec_loss"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &CLayout,
        s2: &CpuStorage,
        l2: &CLayout,
    ) -> CResult<(CpuStorage, Shape)> {
        by_dtype!(s1.dtype(), "aiec_loss", aiec_loss_fwd(self, s1, l1, s2, l2))
    }
    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &CLayout,
        s2: &candle_core::CudaStorage,
        l2: &CLayout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        super::cuda::aiec_loss_fwd(self, s1, l1, s2, l2)
    }
    fn bwd(
        &self,
        f: &Tensor,
        wd: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "candle-cuda")]
        if f.device().is_cuda() {
            return super::cuda::aiec_loss_bwd(self, f, wd, g);
        }
        by_dtype!(f.dtype(), "aiec_loss", aiec_loss_bwd(self, f, wd, g))
    }
}

/// The AIEC auxiliary + gate loss scalar `λ_aux·mean(L_aux) + λ_gate·mean(L_gate)` for
/// pre-activation `f`, decision weights `wd` `(K, C)`, `labels` and fixed consensus
/// `masks` (`K × C`) given on the host; differentiable w.r.t. `f` and `wd` (see
/// [`AiecLossOp`]). The labels and masks are copied to `f`'s device on every call: on a
/// GPU use [`aiec_loss_tensors`] with tensors already there (no host copy).
/// [`super::nn::Aiec`] computes the masks from its counters and calls this.
///
/// # Example (forward and backward through candle's autograd)
///
/// ```
/// use activation_kernels::candle::ops::aiec_loss;
/// use activation_kernels::cpu::aiec::AiecConfig;
/// use activation_kernels::Layout;
/// use approx::assert_relative_eq;
/// use candle_core::{Device, Tensor, Var};
///
/// let dev = Device::Cpu;
/// let cfg = AiecConfig { lambda_gate: 2.0, ..AiecConfig::default() };
/// let f = Var::new(&[[[0.5f64, -1.0], [2.0, 0.25]], [[1.0, 1.5], [-0.2, 0.7]]], &dev)?; // (N, C, H·W)
/// let wd = Var::new(&[[0.5f64, -1.0], [-0.5, 0.75]], &dev)?; // (K, C) = (2, 2)
/// let (labels, masks) = ([0, 1], [false, true, true, false]); // G, K × C
/// let loss = aiec_loss(&f, &wd, &labels, &masks, cfg, Layout::Nchw)?;
/// assert_eq!(loss.rank(), 0); // a scalar
///
/// // Backward: ∂loss/∂Wd[1, 0] against a central difference (masks are constants).
/// let grads = loss.backward()?;
/// let dwd = grads.get(&wd).expect("dWd").flatten_all()?.to_vec1::<f64>()?;
/// let at = |e: f64| -> candle_core::Result<f64> {
///     let wd = Tensor::new(&[[0.5f64, -1.0], [-0.5 + e, 0.75]], &dev)?;
///     aiec_loss(&f, &wd, &labels, &masks, cfg, Layout::Nchw)?.to_scalar::<f64>()
/// };
/// let h = 1e-6;
/// assert_relative_eq!(dwd[2], (at(h)? - at(-h)?) / (2.0 * h), max_relative = 1e-6);
/// assert_eq!(grads.get(&f).expect("dF").dims(), &[2, 2, 2]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn aiec_loss(
    f: &Tensor,
    wd: &Tensor,
    labels: &[usize],
    masks: &[bool],
    cfg: AiecConfig,
    layout: Layout,
) -> CResult<Tensor> {
    check_float(f.dtype(), "aiec_loss")?;
    let lab = labels
        .iter()
        .map(|&y| {
            u32::try_from(y).map_err(|_| op_err("aiec_loss", format!("label {y} exceeds u32")))
        })
        .collect::<CResult<Vec<u32>>>()?;
    let m: Vec<u8> = masks.iter().map(|&b| u8::from(b)).collect();
    let (nl, nm) = (lab.len(), m.len());
    let labels = Tensor::from_vec(lab, nl, f.device())?;
    let masks = Tensor::from_vec(m, nm, f.device())?;
    aiec_loss_tensors(f, wd, &labels, &masks, cfg, layout)
}

/// [`aiec_loss`] with the labels (`(N,)`, `U32`; on the CPU any integer dtype) and
/// the masks (`K·C` values, `U8`) as tensors on `f`'s device: on a CUDA device nothing
/// is copied between host and device (see [`AiecLossOp`] for out-of-range labels).
pub fn aiec_loss_tensors(
    f: &Tensor,
    wd: &Tensor,
    labels: &Tensor,
    masks: &Tensor,
    cfg: AiecConfig,
    layout: Layout,
) -> CResult<Tensor> {
    check_float(f.dtype(), "aiec_loss")?;
    if !labels.device().same_device(f.device()) || !masks.device().same_device(f.device()) {
        return Err(op_err(
            "aiec_loss",
            "labels and masks must be on the device of f",
        ));
    }
    let op = AiecLossOp {
        cfg,
        layout,
        labels: labels.contiguous()?,
        masks: masks.contiguous()?,
    };
    f.contiguous()?.apply_op2(&wd.contiguous()?, op)
}

// ---------------------------------------------------------------------------
// ACON-A, ACON-B, layer-/pixel-wise meta-ACON-C (defined in `acon_ops`)

pub use super::acon_ops::{
    acon_a, acon_b, meta_acon_c_gen, meta_acon_c_layer, meta_acon_c_pixel, AconAOp, AconBOp,
    MetaAconCGenOp, MetaGenKind,
};

// ---------------------------------------------------------------------------
// Fused IieuConv2d: conv → ψ → IIEU-B as one op (defined in `iieu_conv_ops`)

pub use super::iieu_conv_ops::{
    iieu_conv2d, IieuConvOp, IieuConvOut, IieuConvPsi, IieuConvPsiSpec,
};
