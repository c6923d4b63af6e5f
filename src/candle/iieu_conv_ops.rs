//! candle custom op for the fused IieuConv2d (convolution → ψ → IIEU-B as ONE op,
//! [`crate::cpu::iieu_conv`]). Re-exported from [`super::ops`].
//!
//! Same pattern as [`super::ops::IieuBOp`]: `cpu_fwd` checks the dims and calls
//! [`iieu_conv::forward`]; `bwd` reads the inputs back to host vectors, re-runs the CPU
//! forward to rebuild the saved state (on a private copy of the parameters, so
//! BatchNorm's running statistics are never updated a second time) and calls
//! [`iieu_conv::backward`]. The learnable per-channel vectors travel packed in one 1-D
//! tensor `[ψ scale (if any); ψ shift (if any); γ̇; β̇; η]` built with `Tensor::cat`, whose
//! backward hands every parameter its own slice of the packed gradient.
//!
//! BatchNorm's running statistics are not learnable: they travel detached at the end of
//! the pack (`[…; η; running_mean; running_var]`, their gradient is zero) and, in
//! training mode, the op hands the updated values back through [`iieu_conv2d`]'s
//! [`IieuConvOut::running`] — the caller (e.g. [`super::nn::IieuConv2d`]) stores them,
//! as `candle_nn::BatchNorm` does with `Var::set`.
//!
//! Devices and dtypes: the CPU (f32, f64) and, with feature `candle-cuda`, candle's
//! CUDA device (f32, f16, bf16): `cuda_fwd` runs [`crate::cuda::iieu_conv::forward`] on
//! the candle device's stream, and `bwd` applies a backward op running
//! [`crate::cuda::iieu_conv::backward`] — the parameter pack is widened to f32 and the
//! gradients rounded back on the device, so neither direction copies to the host. Any
//! other dtype is `UnsupportedDTypeForOp`; tensors on different devices, or on a CUDA
//! device without feature `candle-cuda`, or on Metal, are a candle error.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout as CLayout, Shape, Tensor};

use super::ops::IieuOpts;
use super::{cerr, check_dims, cpu_data, host, op_err, El};
use crate::cpu::iieu::IieuConfig;
use crate::cpu::iieu_conv::{self, IieuConvParams, Psi, PsiKind};
use crate::real::Real;

type CResult<T> = candle_core::Result<T>;
type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

const NAME: &str = "iieu_conv2d";

/// Which ψ an [`IieuConvOp`] applies, with BatchNorm's non-learnable state (its
/// learnable vectors are in the op's parameter pack, laid out as [`PsiKind`] says).
pub type IieuConvPsiSpec = PsiKind;

/// The fused IieuConv2d as a candle op (SPEC §1, §1.5; formula and gradients in
/// [`crate::cpu::iieu_conv`]):
///
/// ```text
/// c = conv(x_pre, W),  x = ψ(c),  y = ς(ρ̂)·x,  ρ̂ = x·r_w[o]·r_x + ν[n,o]
/// ```
///
/// Inputs: `x_pre` `(N, C, H, W)`, `W` `(O, C/g, KH, KW)`, and the 1-D pack
/// `[ψ scale; ψ shift; γ̇; β̇; η; running_mean; running_var]` (ψ's vectors as in
/// [`IieuConvPsiSpec`], the running statistics for BatchNorm only, each `(O,)`).
/// Output `y` `(N, O, H', W')` from [`iieu_conv::forward`]. Gradients from
/// [`iieu_conv::backward`]: `dx_pre` and `dW` (through the conv and through `r_x`,
/// `r_w`), and the pack's (`dψ`, `dγ̇`, `dβ̇`, `dη`). Build it with [`iieu_conv2d`].
#[derive(Debug, Clone)]
pub struct IieuConvOp {
    /// Conv settings and patch-norm convention.
    pub opts: IieuOpts,
    /// Dims of the conv weight `(O, C/g, KH, KW)`.
    pub w_dims: [usize; 4],
    /// ψ.
    pub psi: IieuConvPsiSpec,
    /// Where the forward leaves BatchNorm's updated running statistics (training mode).
    pub(crate) running_out: RunningSlot,
}

/// BatchNorm's updated `(running_mean, running_var)`, left by the forward for
/// [`iieu_conv2d`] (candle ops have one output tensor).
pub(crate) type RunningSlot = Arc<Mutex<Option<Running>>>;

/// Updated running statistics: host values (CPU forward) or device buffers in the
/// activation's dtype (CUDA forward; no host copy).
#[derive(Debug)]
pub(crate) enum Running {
    /// Running mean, running var.
    Host(Vec<f64>, Vec<f64>),
    #[cfg(feature = "candle-cuda")]
    /// Running mean, running var (dtype of the activation), length `O`.
    Device(
        Box<(candle_core::CudaStorage, candle_core::CudaStorage)>,
        usize,
    ),
}

impl IieuConvOp {
    /// The op for conv settings `opts`, weight dims `(O, C/g, KH, KW)` and ψ (what
    /// [`iieu_conv2d`] builds; for applying the op to a hand-made pack).
    pub fn new(opts: IieuOpts, w_dims: [usize; 4], psi: IieuConvPsiSpec) -> Self {
        Self {
            opts,
            w_dims,
            psi,
            running_out: Arc::new(Mutex::new(None)),
        }
    }

    /// BatchNorm training: the updated `(running_mean, running_var)` the last forward
    /// of this op left, `(O,)` each, detached, in `dtype` on `device` (the forward's
    /// device: a CUDA forward's values never leave it); taken, so a second call
    /// returns `None`; `None` also when no forward updated them.
    pub fn take_running(
        &self,
        dtype: DType,
        device: &candle_core::Device,
    ) -> CResult<Option<(Tensor, Tensor)>> {
        op_running(&self.running_out, dtype, device)
    }

    pub(crate) fn config(&self, x_pre_dims: &[usize]) -> CResult<IieuConfig> {
        let cfg = super::ops::iieu_config(NAME, self.w_dims, &self.opts, x_pre_dims)?;
        cfg.validate().map_err(cerr)?;
        Ok(cfg)
    }

    /// Number of running-statistics values at the end of the pack (`2·O` for BatchNorm).
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    pub(crate) fn fwd_running_len(&self) -> usize {
        self.psi.n_running() * self.w_dims[0]
    }

    /// Splits the pack into ψ and IIEU-B's parameters.
    fn params<T: El>(&self, p: &[T]) -> CResult<IieuConvParams<T>> {
        IieuConvParams::from_pack(self.psi, self.w_dims[0], p).map_err(cerr)
    }
}

fn conv_fwd<T: El>(
    op: &IieuConvOp,
    s1: &CpuStorage,
    l1: &CLayout,
    s2: &CpuStorage,
    l2: &CLayout,
    s3: &CpuStorage,
    l3: &CLayout,
) -> CResult<(CpuStorage, Shape)> {
    let cfg = op.config(l1.dims())?;
    check_dims(NAME, "w", l2.dims(), &op.w_dims)?;
    let (oh, ow) = cfg.validate().map_err(cerr)?;
    let x_pre = cpu_data::<T>(NAME, s1, l1)?;
    let w = cpu_data::<T>(NAME, s2, l2)?;
    let p = cpu_data::<T>(NAME, s3, l3)?;
    let mut params = op.params(&p)?;
    let (y, _) = iieu_conv::forward(&cfg, &x_pre, &w, &mut params).map_err(cerr)?;
    if let Psi::BatchNorm(bn) = &params.psi {
        if bn.training {
            let f = |v: &[T]| v.iter().map(|&x| Real::to_f64(x)).collect::<Vec<f64>>();
            let mut slot = op
                .running_out
                .lock()
                .map_err(|_| op_err(NAME, "running-stat slot poisoned"))?;
            *slot = Some(Running::Host(f(&bn.running_mean), f(&bn.running_var)));
        }
    }
    let g = cfg.geometry;
    Ok((
        T::to_cpu_storage_owned(y),
        Shape::from((g.n, g.c_out, oh, ow)),
    ))
}

fn conv_bwd<T: El>(
    op: &IieuConvOp,
    xp: &Tensor,
    w: &Tensor,
    p: &Tensor,
    g: &Tensor,
) -> CResult<Grads3> {
    let cfg = op.config(xp.dims())?;
    let (xpv, wv, pv, gv) = (host::<T>(xp)?, host::<T>(w)?, host::<T>(p)?, host::<T>(g)?);
    // A private copy: re-running the forward updates only this copy's running stats.
    let mut params = op.params(&pv)?;
    let (_, saved) = iieu_conv::forward(&cfg, &xpv, &wv, &mut params).map_err(cerr)?;
    let gr = iieu_conv::backward(&cfg, &gv, &xpv, &wv, &params, &saved).map_err(cerr)?;
    let mut gr = gr;
    // The running statistics are not differentiated (zeros in the pack).
    let dp = gr.take_pack(op.psi.pack_len(op.w_dims[0]));
    Ok((
        Some(Tensor::from_vec(gr.dx_pre, xp.shape(), xp.device())?),
        Some(Tensor::from_vec(gr.dw, w.shape(), w.device())?),
        Some(Tensor::from_vec(dp, p.shape(), p.device())?),
    ))
}

impl CustomOp3 for IieuConvOp {
    fn name(&self) -> &'static str {
        NAME
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
        by_dtype!(s1.dtype(), NAME, conv_fwd(self, s1, l1, s2, l2, s3, l3))
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
        super::cuda::iieu_conv_fwd(self, (s1, l1), (s2, l2), (s3, l3))
    }
    fn bwd(
        &self,
        xp: &Tensor,
        w: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<Grads3> {
        #[cfg(feature = "candle-cuda")]
        if xp.device().is_cuda() {
            return super::cuda::iieu_conv_bwd(self, xp, w, p, g);
        }
        if !xp.device().is_cpu() {
            return Err(unsupported_device(xp));
        }
        by_dtype!(xp.dtype(), NAME, conv_bwd(self, xp, w, p, g))
    }
}

fn op_running(
    slot: &RunningSlot,
    dt: DType,
    dev: &candle_core::Device,
) -> CResult<Option<(Tensor, Tensor)>> {
    let running = slot
        .lock()
        .map_err(|_| op_err(NAME, "running-stat slot poisoned"))?
        .take();
    Ok(match running {
        Some(Running::Host(m, v)) => {
            let o = m.len();
            Some((
                Tensor::from_vec(m, o, dev)?.to_dtype(dt)?,
                Tensor::from_vec(v, o, dev)?.to_dtype(dt)?,
            ))
        }
        #[cfg(feature = "candle-cuda")]
        Some(Running::Device(mv, o)) => {
            let (m, v) = *mv;
            let t = |s| {
                Tensor::from_storage(
                    candle_core::Storage::Cuda(s),
                    o,
                    candle_core::op::BackpropOp::none(),
                    false,
                )
            };
            Some((t(m), t(v)))
        }
        None => None,
    })
}

fn unsupported_device(t: &Tensor) -> candle_core::Error {
    op_err(
        NAME,
        format!(
            "tensors on {:?} are not supported (the CPU, and CUDA with feature \
             `candle-cuda`)",
            t.device().location()
        ),
    )
}

/// ψ of [`iieu_conv2d`], with its tensors (each `(O,)`, same dtype as `x_pre`).
#[derive(Debug, Clone, Copy)]
pub enum IieuConvPsi<'a> {
    /// `x = c`.
    None,
    /// `x = c + bias[o]`; gradient `Σ dx` over `(n, h', w')`.
    Bias(&'a Tensor),
    /// `x = scale[o]·c + shift[o]`; gradients `Σ dx·c`, `Σ dx`.
    Affine {
        /// `a[o]`.
        scale: &'a Tensor,
        /// `b[o]`.
        shift: &'a Tensor,
    },
    /// BatchNorm (PyTorch `BatchNorm2d` semantics):
    /// `x = weight·(c − μ)/sqrt(var + eps) + bias`, batch statistics in training (then
    /// the updated running statistics are returned in [`IieuConvOut::running`]),
    /// `running_mean` / `running_var` in eval. Gradients `Σ dx·x̂` (weight), `Σ dx`
    /// (bias); in training `dc = weight·rstd·(dx − mean(dx) − x̂·mean(dx·x̂))`. The
    /// running statistics get no gradient.
    BatchNorm {
        /// `γ[o]`.
        weight: &'a Tensor,
        /// `β[o]`.
        bias: &'a Tensor,
        /// Running mean (not differentiated).
        running_mean: &'a Tensor,
        /// Running unbiased variance (not differentiated).
        running_var: &'a Tensor,
        /// Running-stat momentum in `[0, 1]` (PyTorch default 0.1).
        momentum: f64,
        /// `eps > 0` (PyTorch default 1e-5).
        eps: f64,
        /// Training or eval mode.
        training: bool,
    },
}

/// What [`iieu_conv2d`] returns.
#[derive(Debug, Clone)]
pub struct IieuConvOut {
    /// `y`, `(N, O, H', W')`, differentiable w.r.t. every input tensor.
    pub y: Tensor,
    /// BatchNorm in training mode: the updated `(running_mean, running_var)`,
    /// `running ← (1 − momentum)·running + momentum·batch` (the variance unbiased,
    /// `·M/(M − 1)`, `M = N·H'·W'`), detached, same dtype as `x_pre`; `None` otherwise.
    pub running: Option<(Tensor, Tensor)>,
}

/// The fused IieuConv2d, one candle op ([`IieuConvOp`]):
/// `y = IIEU-B(ψ(conv(x_pre, w)), x_pre, w)` with IIEU-B's `ln_weight` (γ̇),
/// `ln_bias` (β̇), `eta` (η), each `(O,)`, and the conv settings in `opts`.
/// `x_pre`: `(N, C, H, W)`, `w`: `(O, C/g, KH, KW)`.
///
/// Differentiable (first order) w.r.t. `x_pre`, `w` (through the conv and `r_w`), ψ's
/// tensors (not BatchNorm's running statistics), `ln_weight`, `ln_bias`, `eta`; the
/// gradients are [`iieu_conv::backward`]'s (on CUDA tensors,
/// [`crate::cuda::iieu_conv::backward`]'s). Errors: a dtype other than f32/f64 (CPU) or
/// f32/f16/bf16 (CUDA), mixed dtypes or devices, an unsupported device, dims that do
/// not fit, and every error of the forward (e.g. BatchNorm training statistics over a
/// single value) — all as `candle_core::Error`, never a panic.
///
/// # Example (forward and backward through candle's autograd)
///
/// ```
/// use activation_kernels::candle::ops::{iieu_conv2d, IieuConvPsi, IieuOpts};
/// use approx::assert_relative_eq;
/// use candle_core::{DType, Device, Tensor, Var};
///
/// let dev = Device::Cpu;
/// let x_pre = Var::from_tensor(&Tensor::arange(0.0f64, 32.0, &dev)?.affine(0.3, -4.0)?.cos()?.reshape((2, 1, 4, 4))?)?;
/// let w = Var::from_tensor(&Tensor::arange(0.0f64, 18.0, &dev)?.affine(0.9, 0.5)?.sin()?.reshape((2, 1, 3, 3))?)?;
/// let (bn_w, bn_b) = (Var::new(&[1.0f64, 0.5], &dev)?, Var::new(&[0.0f64, 0.1], &dev)?);
/// let stats = (Tensor::zeros(2, DType::F64, &dev)?, Tensor::ones(2, DType::F64, &dev)?); // running mean, var
/// let ln_w = Var::new(&[0.01f64; 2], &dev)?;
/// let ln_b = Var::new(&[0.0f64; 2], &dev)?;
/// let eta = Var::new(&[0.05f64; 2], &dev)?;
/// // BatchNorm in training mode, with a given weight γ.
/// fn bn<'a>(weight: &'a Tensor, bias: &'a Tensor, stats: &'a (Tensor, Tensor)) -> IieuConvPsi<'a> {
///     let (running_mean, running_var) = (&stats.0, &stats.1);
///     IieuConvPsi::BatchNorm { weight, bias, running_mean, running_var, momentum: 0.1, eps: 1e-5, training: true }
/// }
/// let opts = IieuOpts { padding: (1, 1), ..IieuOpts::default() };
/// // conv 3×3 → BatchNorm (batch statistics) → IIEU-B, one op.
/// let out = iieu_conv2d(&x_pre, &w, bn(&bn_w, &bn_b, &stats), &ln_w, &ln_b, &eta, opts)?;
/// assert_eq!(out.y.dims(), &[2, 2, 4, 4]);
/// // Training mode hands back the updated running mean, 0.9·0 + 0.1·μ_batch.
/// let (mean, _var) = out.running.as_ref().expect("updated running statistics");
/// let mu = x_pre.conv2d(&w, 1, 1, 1, 1)?.transpose(0, 1)?.flatten_from(1)?.mean(1)?;
/// for (a, b) in mean.to_vec1::<f64>()?.iter().zip(&mu.to_vec1::<f64>()?) {
///     assert_relative_eq!(*a, 0.1 * b, epsilon = 1e-12);
/// }
///
/// // Backward of L = Σ y: x_pre, W, BatchNorm's affine and IIEU-B's parameters all
/// // get gradients; ∂L/∂γ[1] (BatchNorm's weight) against a central difference.
/// let grads = out.y.sum_all()?.backward()?;
/// let loss = |g1: f64| -> candle_core::Result<f64> {
///     let weight = Tensor::new(&[1.0f64, g1], &dev)?;
///     let y = iieu_conv2d(&x_pre, &w, bn(&weight, &bn_b, &stats), &ln_w, &ln_b, &eta, opts)?.y;
///     y.sum_all()?.to_scalar::<f64>()
/// };
/// let h = 1e-6;
/// let d_bn_w = grads.get(&bn_w).expect("dγ").to_vec1::<f64>()?;
/// let fd = (loss(0.5 + h)? - loss(0.5 - h)?) / (2.0 * h);
/// assert_relative_eq!(d_bn_w[1], fd, epsilon = 1e-8, max_relative = 1e-6);
/// for v in [&x_pre, &w, &bn_b, &ln_w, &ln_b, &eta] {
///     assert_eq!(grads.get(v).expect("a gradient").dims(), v.dims());
/// }
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn iieu_conv2d(
    x_pre: &Tensor,
    w: &Tensor,
    psi: IieuConvPsi<'_>,
    ln_weight: &Tensor,
    ln_bias: &Tensor,
    eta: &Tensor,
    opts: IieuOpts,
) -> CResult<IieuConvOut> {
    let dt = x_pre.dtype();
    let dev = x_pre.device();
    let cuda = cfg!(feature = "candle-cuda") && dev.is_cuda();
    if !(dev.is_cpu() || cuda) {
        return Err(unsupported_device(x_pre));
    }
    let dtype_ok = if cuda {
        matches!(dt, DType::F32 | DType::F16 | DType::BF16)
    } else {
        matches!(dt, DType::F32 | DType::F64)
    };
    if !dtype_ok {
        return Err(candle_core::Error::UnsupportedDTypeForOp(dt, NAME));
    }
    let &[o, cpg, kh, kw] = w.dims() else {
        return Err(op_err(
            NAME,
            format!("w must be (O, C/g, KH, KW), got {:?}", w.dims()),
        ));
    };
    let mut vecs: Vec<(&str, &Tensor)> = Vec::new();
    let mut running: Option<(Tensor, Tensor)> = None;
    let spec = match psi {
        IieuConvPsi::None => IieuConvPsiSpec::None,
        IieuConvPsi::Bias(b) => {
            vecs.push(("psi bias", b));
            IieuConvPsiSpec::Bias
        }
        IieuConvPsi::Affine { scale, shift } => {
            vecs.extend([("psi scale", scale), ("psi shift", shift)]);
            IieuConvPsiSpec::Affine
        }
        IieuConvPsi::BatchNorm {
            weight,
            bias,
            running_mean,
            running_var,
            momentum,
            eps,
            training,
        } => {
            vecs.extend([("bn weight", weight), ("bn bias", bias)]);
            running = Some((running_mean.detach(), running_var.detach()));
            IieuConvPsiSpec::BatchNorm {
                momentum,
                eps,
                training,
            }
        }
    };
    vecs.extend([("ln_weight", ln_weight), ("ln_bias", ln_bias), ("eta", eta)]);
    if let Some((m, v)) = &running {
        vecs.extend([("running_mean", m), ("running_var", v)]);
    }
    let mut all = vec![("x_pre", x_pre), ("w", w)];
    all.extend(vecs.iter().copied());
    for (what, t) in &all {
        if !t.device().same_device(dev) {
            return Err(op_err(
                NAME,
                format!(
                    "{what} is on {:?}, expected {:?} like x_pre",
                    t.device().location(),
                    dev.location()
                ),
            ));
        }
        if t.dtype() != dt {
            return Err(op_err(
                NAME,
                format!("{what} is {:?}, expected {dt:?} like x_pre", t.dtype()),
            ));
        }
    }
    for (what, t) in &vecs {
        check_dims(NAME, what, t.dims(), &[o])?;
    }
    let op = IieuConvOp::new(opts, [o, cpg, kh, kw], spec);
    let slot = Arc::clone(&op.running_out);
    let parts: Vec<&Tensor> = vecs.iter().map(|(_, t)| *t).collect();
    let pack = Tensor::cat(&parts, 0)?;
    let y = x_pre
        .contiguous()?
        .apply_op3(&w.contiguous()?, &pack.contiguous()?, op)?;
    let running = op_running(&slot, dt, dev)?;
    Ok(IieuConvOut { y, running })
}
