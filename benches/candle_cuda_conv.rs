//! The fused IieuConv2d against what a candle user writes without it, on candle's CUDA
//! device (feature `candle-cuda`), at ResNet-50's 3×3 layers (batch 32, C → C, pad 1:
//! 64@56, 128@28, 256@14, 512@7) in f16, and the 14×14 layer in bf16 and f32.
//!
//! Per shape, one criterion group `candle_conv_<N>x<C>x<H>x<W>_to_<O>_k<K>_<dtype>`:
//! * `fused_fwd`, `fused_fwd_bwd`: [`iieu_conv2d`] (conv → BatchNorm (training) →
//!   IIEU-B, one op; tensor cores for f16 / bf16 on sm_80+), forward, and forward +
//!   `backward()` of `Σ y` through candle's autograd;
//! * `fused_op_fwd`: the same forward as the bare [`IieuConvOp`] on a prepacked
//!   parameter vector (no `cat` of the parameters: what the wrapper adds is the
//!   difference to `fused_fwd`);
//! * `candle_conv2d`: candle's own `Tensor::conv2d` alone (candle's CUDA convolution:
//!   im2col + cuBLAS, or cuDNN when candle is built with its `cudnn` feature) — the
//!   bare convolution the fused op is measured against;
//! * `candle_unfused_fwd`, `candle_unfused_fwd_bwd`: `conv2d` →
//!   `candle_nn::BatchNorm::forward_train` → this crate's unfused IIEU-B
//!   ([`ops::iieu_b`]).
//!
//! Throughput is `Throughput::Elements` of the convolution's FLOPs
//! (`2·N·O·H'·W'·C·KH·KW`; three times that with the backward), so criterion's
//! elements/s read as FLOP/s; `scripts/gpu-bench.sh` turns them into TFLOP/s and the
//! fraction of the device's dense f16 tensor peak.
//!
//! Timing: each sample runs `iters` calls, then `Device::synchronize`; the time is the
//! host's wall time of the whole (launches, allocation, candle's graph included: the
//! cost a user pays).
//!
//! Devices: a real CUDA driver runs every job (`cargo bench --features candle-cuda
//! --bench candle_cuda_conv`, or the binary that `scripts/gpu-pack.sh --with-candle`
//! packs). With `emulate` the emulated device runs only `fused_op_fwd` on a tiny ragged
//! shape in criterion's `--test` mode (candle's own CUDA kernels — conv2d, BatchNorm,
//! the autograd's fills and sums — do not run on the emulated device): that proves the
//! fused op's path end to end, never speed. Otherwise the bench prints that it
//! skipped and exits 0.
//!
//! [`iieu_conv2d`]: activation_kernels::candle::ops::iieu_conv2d
//! [`ops::iieu_b`]: activation_kernels::candle::ops::iieu_b
//! [`IieuConvOp`]: activation_kernels::candle::ops::IieuConvOp

use std::time::{Duration, Instant};

use activation_kernels::candle::ops::{
    self as cops, IieuConvOp, IieuConvPsi, IieuConvPsiSpec, IieuOpts,
};
use activation_kernels::cpu::iieu::PatchNorm;
use candle_core::{DType, Device, Tensor, Var};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

/// One convolution layer: `(n, c, hw, o, k)`, "same" padding, stride 1.
type Layer = (usize, usize, usize, usize, usize);

/// How the bench runs: the device, and whether it is the emulated one.
struct Env {
    dev: Device,
    emulated: bool,
}

fn open() -> Option<Env> {
    let test_mode = std::env::args().any(|a| a == "--test");
    let real = activation_kernels::cuda::real_driver_present();
    let emulated = if real {
        false
    } else {
        #[cfg(feature = "emulate")]
        {
            if !test_mode {
                eprintln!(
                    "!!! candle_cuda_conv: no CUDA device present; on the emulated device the \
                     bench runs only in `--test` mode (`cargo bench --features \
                     emulate,candle-cuda --bench candle_cuda_conv -- --test`). !!!"
                );
                return None;
            }
            if let Err(e) = activation_kernels::emu::install() {
                eprintln!("!!! candle_cuda_conv: could not install the emulated device: {e} !!!");
                return None;
            }
            eprintln!(
                "!!! candle_cuda_conv on the EMULATED device, a tiny shape, --test mode, \
                 `fused_op_fwd` only: EMULATION PROVES LOGIC, NEVER SPEED. !!!"
            );
            true
        }
        #[cfg(not(feature = "emulate"))]
        {
            let _ = test_mode;
            eprintln!("!!! no CUDA device present: candle CUDA benches skipped !!!");
            return None;
        }
    };
    match Device::new_cuda(0) {
        Ok(dev) => Some(Env { dev, emulated }),
        Err(e) => {
            eprintln!("!!! candle_cuda_conv: cannot open CUDA device 0 ({e}): skipped !!!");
            None
        }
    }
}

/// Deterministic data in `[lo, hi)` (a 64-bit LCG; the values only need to be
/// realistic, not random).
fn data(len: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

/// Every tensor of one layer, on the device in `dt`; BatchNorm's and IIEU-B's
/// parameters at their inits.
struct Block {
    x_pre: Var,
    w: Var,
    bn_w: Var,
    bn_b: Var,
    stats: (Tensor, Tensor),
    bn: candle_nn::BatchNorm,
    ln_w: Var,
    ln_b: Var,
    eta: Var,
    /// The bare op's parameter pack (γ, β, γ̇, β̇, η, running mean, running var).
    pack: Tensor,
    op: IieuConvOp,
    pad: usize,
    opts: IieuOpts,
}

impl Block {
    fn new(dev: &Device, dt: DType, (n, c, hw, o, k): Layer) -> candle_core::Result<Self> {
        let up = |v: Vec<f32>, shape: &[usize]| -> candle_core::Result<Var> {
            Var::from_tensor(
                &Tensor::from_vec(v, shape, &Device::Cpu)?
                    .to_dtype(dt)?
                    .to_device(dev)?,
            )
        };
        let full = |v: f32| up(vec![v; o], &[o]);
        let x_pre = up(data(n * c * hw * hw, 1, -1.0, 1.0), &[n, c, hw, hw])?;
        // Kaiming-uniform scale: the conv output is O(1) like the input.
        let bound = (3.0 / (c * k * k) as f32).sqrt();
        let w = up(data(o * c * k * k, 2, -bound, bound), &[o, c, k, k])?;
        let (bn_w, bn_b) = (full(1.0)?, full(0.0)?);
        let stats = (
            full(0.0)?.as_tensor().clone(),
            full(1.0)?.as_tensor().clone(),
        );
        let bn = candle_nn::BatchNorm::new(
            o,
            stats.0.clone(),
            stats.1.clone(),
            bn_w.as_tensor().clone(),
            bn_b.as_tensor().clone(),
            1e-5,
        )?;
        let pad = k / 2;
        let opts = IieuOpts {
            padding: (pad, pad),
            patch_norm: PatchNorm::AllChannels,
            ..IieuOpts::default()
        };
        let mut pv = vec![1.0; o];
        for v in [0.0, 0.01, 0.0, 0.05, 0.0, 1.0] {
            pv.resize(pv.len() + o, v);
        }
        let pack = up(pv, &[7 * o])?.as_tensor().clone();
        let spec = IieuConvPsiSpec::BatchNorm {
            momentum: 0.1,
            eps: 1e-5,
            training: true,
        };
        Ok(Self {
            x_pre,
            w,
            bn_w,
            bn_b,
            stats,
            bn,
            ln_w: full(0.01)?,
            ln_b: full(0.0)?,
            eta: full(0.05)?,
            pack,
            op: IieuConvOp::new(opts, [o, c, k, k], spec),
            pad,
            opts,
        })
    }

    /// The fused op (conv → BatchNorm in training mode → IIEU-B).
    fn fused(&self) -> candle_core::Result<Tensor> {
        let psi = IieuConvPsi::BatchNorm {
            weight: &self.bn_w,
            bias: &self.bn_b,
            running_mean: &self.stats.0,
            running_var: &self.stats.1,
            momentum: 0.1,
            eps: 1e-5,
            training: true,
        };
        let out = cops::iieu_conv2d(
            &self.x_pre,
            &self.w,
            psi,
            &self.ln_w,
            &self.ln_b,
            &self.eta,
            self.opts,
        )?;
        Ok(out.y)
    }

    /// The bare op on the prepacked parameters (forward only).
    fn fused_op(&self) -> candle_core::Result<Tensor> {
        self.x_pre
            .as_tensor()
            .apply_op3_no_bwd(&self.w, &self.pack, &self.op)
    }

    /// candle's conv2d alone.
    fn conv(&self) -> candle_core::Result<Tensor> {
        self.x_pre.as_tensor().conv2d(&self.w, self.pad, 1, 1, 1)
    }

    /// conv2d → BatchNorm (training) → the unfused IIEU-B.
    fn unfused(&self) -> candle_core::Result<Tensor> {
        let x = self.bn.forward_train(&self.conv()?)?;
        cops::iieu_b(
            &x,
            self.x_pre.as_tensor(),
            self.w.as_tensor(),
            &self.ln_w,
            &self.ln_b,
            &self.eta,
            self.opts,
        )
    }
}

/// Runs `f` `iters` times, then synchronises the device: the wall time of the whole.
fn time<R>(dev: &Device, iters: u64, mut f: impl FnMut() -> candle_core::Result<R>) -> Duration {
    dev.synchronize().expect("synchronize");
    let t0 = Instant::now();
    for _ in 0..iters {
        black_box(f().expect("bench job"));
    }
    dev.synchronize().expect("synchronize");
    t0.elapsed()
}

fn layers(env: &Env) -> Vec<(Layer, DType)> {
    if env.emulated {
        return vec![((2, 5, 7, 6, 3), DType::F16)];
    }
    let mut v: Vec<(Layer, DType)> = [(64, 56), (128, 28), (256, 14), (512, 7)]
        .into_iter()
        .map(|(c, hw)| ((32, c, hw, c, 3), DType::F16))
        .collect();
    v.push(((32, 256, 14, 256, 3), DType::BF16));
    v.push(((32, 256, 14, 256, 3), DType::F32));
    v
}

fn bench(c: &mut Criterion) {
    let Some(env) = open() else { return };
    let dev = &env.dev;
    for (layer, dt) in layers(&env) {
        let (n, ci, hw, o, k) = layer;
        let flops = 2 * (n * o * hw * hw * ci * k * k) as u64;
        let block = Block::new(dev, dt, layer).expect("the layer's tensors");
        let name = format!("candle_conv_{n}x{ci}x{hw}x{hw}_to_{o}_k{k}_{}", dt.as_str());
        let mut g = c.benchmark_group(name);
        g.sample_size(10);
        g.throughput(Throughput::Elements(flops));
        g.bench_function("fused_op_fwd", |b| {
            b.iter_custom(|it| time(dev, it, || block.fused_op()))
        });
        if env.emulated {
            g.finish();
            continue;
        }
        g.bench_function("fused_fwd", |b| {
            b.iter_custom(|it| time(dev, it, || block.fused()))
        });
        g.bench_function("candle_conv2d", |b| {
            b.iter_custom(|it| time(dev, it, || block.conv()))
        });
        g.bench_function("candle_unfused_fwd", |b| {
            b.iter_custom(|it| time(dev, it, || block.unfused()))
        });
        g.throughput(Throughput::Elements(3 * flops));
        g.bench_function("fused_fwd_bwd", |b| {
            b.iter_custom(|it| time(dev, it, || block.fused()?.sum_all()?.backward()))
        });
        g.bench_function("candle_unfused_fwd_bwd", |b| {
            b.iter_custom(|it| time(dev, it, || block.unfused()?.sum_all()?.backward()))
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
