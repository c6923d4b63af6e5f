//! CUDA benchmarks of every op, forward and backward, in f32, f16 and bf16.
//!
//! Each criterion group is one tensor (layout, shape, dtype) and also times a
//! memory-bound floor on it: a device-to-device copy of the tensor
//! (`stream.memcpy_dtod`). Read each op as a ratio to that floor
//! (`scripts/gpu-bench.sh` prints the table). Throughput is `Throughput::Bytes` of
//! the op's compulsory traffic: every large tensor it must read once and every
//! output / gradient it must write once, plus its (small) parameter vectors and
//! parameter gradients — so criterion's GB/s is an effective bandwidth.
//!
//! Shapes: ResNet-50 stages at batch 32 (NCHW 256x56x56, 512x28x28, 1024x14x14,
//! 2048x7x7) for IIEU-B (3x3 pad 1 and 1x1, C_in = C_out = stage width), IIEU-DC
//! (r = 16) and ACON-C; ViT-Tiny tokens (NLC, batch 64, 197 tokens, 192 and 768
//! channels) for ACON-C and the AIEC training step (K = 100). IieuConv2d (the fused
//! conv → BatchNorm (training) → IIEU-B op, `PatchNorm::AllChannels`): ResNet-50's 3x3
//! layers (64@56, 128@28, 256@14, 512@7, C → C, pad 1) and the bottleneck 1x1 layers
//! that reduce (256→64@56, 512→128@28, 1024→256@14, 2048→512@7), batch 32, groups
//! `cuda_conv_*`: forward, backward, and — for reference — the unfused IIEU-B
//! (`cuda::iieu::forward`, six launches) on a tensor of the conv output's shape,
//! which is what the fused op saves on top of a bare convolution. Their throughput is
//! `Throughput::Elements` of the convolution's FLOPs (`2·N·O·H'·W'·C/g·KH·KW` forward,
//! twice that backward), so criterion's elements/s read as FLOP/s.
//!
//! Timing: `iter_custom`, the stream synchronised before the timed loop; on a real
//! GPU the loop is bracketed by CUDA events (`elapsed_ms`), so the time is the
//! stream's wall time for `iters` calls including the host-side launch, validation
//! and allocation cost of the safe API (outputs are allocated and freed on the
//! stream each call, as in real use).
//!
//! Devices: a real CUDA driver runs the benches (`cargo bench --features cuda
//! --bench cuda_ops`, or `scripts/gpu-bench.sh`). Without one, feature `emulate`
//! runs them on the emulated device ONLY in criterion's `--test` mode with tiny
//! shapes (`cargo bench --features emulate --bench cuda_ops -- --test`), which
//! proves the bench code runs end to end — emulation proves logic, never speed.
//! Otherwise the bench prints that it skipped and exits 0.

#[cfg(any(feature = "cuda", feature = "emulate"))]
mod gpu {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use activation_kernels::cpu::{acon as cacon, aiec as caiec, iieu as ciieu, iieu_dc as cdc};
    use activation_kernels::cuda::{
        acon, aiec, iieu, iieu_dc, CudaContext, CudaSlice, CudaStream, DType,
    };
    use activation_kernels::{ActShape, Conv2dGeometry};
    use criterion::measurement::WallTime;
    use criterion::{black_box, BenchmarkGroup, Criterion, Throughput};
    use cudarc::driver::sys::CUevent_flags;
    use half::{bf16, f16};
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    /// How the benches run: on a real GPU (CUDA-event timing, full shapes) or on the
    /// emulated device (wall time, tiny shapes, `--test` mode only).
    pub struct Env {
        stream: Arc<CudaStream>,
        emulated: bool,
        test_mode: bool,
    }

    /// Opens the device, or explains loudly why nothing runs (then `None`).
    pub fn open() -> Option<Env> {
        let test_mode = std::env::args().any(|a| a == "--test");
        let real = activation_kernels::cuda::real_driver_present();
        let emulated = if real {
            false
        } else {
            #[cfg(feature = "emulate")]
            {
                if !test_mode {
                    eprintln!(
                        "!!! cuda_ops: no CUDA device present; the emulated device runs only \
                         the `host_cost` group outside `--test` mode (the host-side cost per \
                         call of the safe API: emulation proves logic, never device speed); \
                         every other group runs only in `--test` mode: \
                         `cargo bench --features emulate --bench cuda_ops -- --test`. !!!"
                    );
                }
                if let Err(e) = activation_kernels::emu::install() {
                    eprintln!("!!! cuda_ops: could not install the emulated device: {e} !!!");
                    return None;
                }
                true
            }
            #[cfg(not(feature = "emulate"))]
            {
                let _ = test_mode;
                eprintln!("!!! no CUDA device present: CUDA benches skipped !!!");
                return None;
            }
        };
        let ctx = match CudaContext::new(0) {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "!!! cuda_ops: cannot open CUDA device 0 ({e}): CUDA benches skipped !!!"
                );
                return None;
            }
        };
        let name = ctx
            .name()
            .unwrap_or_else(|e| format!("<name unavailable: {e}>"));
        if emulated && !test_mode {
            eprintln!(
                "!!! cuda_ops on the EMULATED device ({name}): only the `host_cost` group \
                 (host-side cost per call, kernels not run). !!!"
            );
        } else if emulated {
            eprintln!(
                "!!! cuda_ops on the EMULATED device ({name}), tiny shapes, --test mode: this \
                 proves the bench code runs end to end. EMULATION PROVES LOGIC, NEVER SPEED — \
                 no timing from this run means anything. !!!"
            );
        } else {
            eprintln!("cuda_ops: device 0 = {name}");
        }
        Some(Env {
            stream: ctx.default_stream(),
            emulated,
            test_mode,
        })
    }

    impl Env {
        /// Runs `f` `iters` times on the synchronised stream and returns the elapsed
        /// stream time (CUDA events on a GPU, wall time on the emulator).
        fn time<R>(&self, iters: u64, mut f: impl FnMut() -> R) -> Duration {
            let s = &self.stream;
            s.synchronize().expect("synchronize");
            if self.emulated {
                let t0 = Instant::now();
                for _ in 0..iters {
                    black_box(f());
                }
                s.synchronize().expect("synchronize");
                return t0.elapsed();
            }
            let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
            let start = s.record_event(timing).expect("record start event");
            for _ in 0..iters {
                black_box(f());
            }
            let end = s.record_event(timing).expect("record end event");
            let ms = start.elapsed_ms(&end).expect("event elapsed time");
            s.synchronize().expect("synchronize");
            Duration::from_secs_f64(f64::from(ms) * 1e-3)
        }

        fn upload<T: DType>(&self, v: &[f32]) -> CudaSlice<T> {
            let h: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
            self.stream.clone_htod(&h).expect("upload")
        }

        fn upload_f32(&self, v: &[f32]) -> CudaSlice<f32> {
            self.stream.clone_htod(v).expect("upload")
        }
    }

    fn randv(r: &mut SmallRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| r.gen_range(lo..hi)).collect()
    }

    /// Bytes of `n` elements of `T`.
    fn b<T>(n: usize) -> u64 {
        (n * std::mem::size_of::<T>()) as u64
    }

    /// The memory-bound floor: one device-to-device copy of `x` (reads and writes
    /// the tensor once).
    fn copy_floor<T: DType>(g: &mut BenchmarkGroup<'_, WallTime>, env: &Env, x: &CudaSlice<T>) {
        let mut dst = env.stream.alloc_zeros::<T>(x.len()).expect("alloc");
        g.throughput(Throughput::Bytes(2 * b::<T>(x.len())));
        g.bench_function("copy_floor", |bch| {
            bch.iter_custom(|it| {
                env.time(it, || env.stream.memcpy_dtod(x, &mut dst).expect("copy"))
            })
        });
    }

    /// Tensor shapes of one run: full ones on a GPU, tiny ones on the emulator.
    struct Shapes {
        nchw: Vec<(usize, usize, usize, usize)>,
        nlc: Vec<(usize, usize, usize)>,
    }

    fn shapes(env: &Env) -> Shapes {
        if env.emulated {
            Shapes {
                nchw: vec![(2, 16, 6, 6), (2, 32, 3, 3)],
                nlc: vec![(2, 5, 16), (2, 3, 24)],
            }
        } else {
            Shapes {
                nchw: vec![
                    (32, 256, 56, 56),
                    (32, 512, 28, 28),
                    (32, 1024, 14, 14),
                    (32, 2048, 7, 7),
                ],
                nlc: vec![(64, 197, 192), (64, 197, 768)],
            }
        }
    }

    impl Env {
        /// Criterion for this run. On a GPU: 20 samples, 0.5 s warm-up and 2 s of
        /// measurement per bench, set as defaults *before* the command line is read,
        /// so `--sample-size`, `--warm-up-time` and `--measurement-time` override them
        /// (scripts/gpu-check.sh runs the 210 benches with shorter times). On the
        /// emulated device: criterion's defaults (`--test` mode runs each bench once).
        pub fn criterion(&self) -> Criterion {
            let c = Criterion::default();
            let c = if self.emulated {
                c
            } else {
                c.sample_size(20)
                    .warm_up_time(Duration::from_millis(500))
                    .measurement_time(Duration::from_secs(2))
            };
            c.configure_from_args()
        }
    }

    /// ACON-C forward and backward on `x` (per-channel β).
    fn acon_c<T: DType>(
        g: &mut BenchmarkGroup<'_, WallTime>,
        env: &Env,
        shape: &ActShape,
        x: &CudaSlice<T>,
        dy: &CudaSlice<T>,
    ) {
        let s = &env.stream;
        let hp = cacon::AconCParams::<f32>::init_reference(shape.c, 7).expect("params");
        let (p1, p2, beta) = (
            env.upload_f32(&hp.p1),
            env.upload_f32(&hp.p2),
            env.upload_f32(&hp.beta),
        );
        let params = 3 * b::<f32>(shape.c);
        let numel = x.len();
        // fwd: read x, write y (+ read p1, p2, β).
        g.throughput(Throughput::Bytes(2 * b::<T>(numel) + params));
        g.bench_function("acon_c_fwd", |bch| {
            bch.iter_custom(|it| {
                env.time(it, || {
                    acon::acon_c_forward(s, shape, x, &p1, &p2, acon::Beta::PerChannel(&beta))
                        .expect("acon_c_forward")
                })
            })
        });
        // bwd: read x, dy, write dx (+ read p1, p2, β, write dp1, dp2, dβ).
        g.throughput(Throughput::Bytes(3 * b::<T>(numel) + 2 * params));
        g.bench_function("acon_c_bwd", |bch| {
            bch.iter_custom(|it| {
                env.time(it, || {
                    acon::acon_c_backward(s, shape, dy, x, &p1, &p2, acon::Beta::PerChannel(&beta))
                        .expect("acon_c_backward")
                })
            })
        });
    }

    /// IIEU-B forward and backward, `C_in = C_out = ch`, stride 1, same spatial size.
    #[allow(clippy::too_many_arguments)]
    fn iieu_b<T: DType>(
        g: &mut BenchmarkGroup<'_, WallTime>,
        env: &Env,
        r: &mut SmallRng,
        (n, ch, h, w): (usize, usize, usize, usize),
        label: &str,
        k: usize,
        pad: usize,
        x: &CudaSlice<T>,
        dy: &CudaSlice<T>,
    ) {
        let s = &env.stream;
        let numel = n * ch * h * w;
        let geo = Conv2dGeometry::new(n, ch, h, w, ch, k, k).with_padding(pad, pad);
        let cfg = ciieu::IieuConfig::new(geo);
        let x_pre: CudaSlice<T> = env.upload(&randv(r, numel, -1.0, 1.0));
        let wlen = ch * ch * k * k;
        let wt: CudaSlice<T> = env.upload(&randv(r, wlen, -0.1, 0.1));
        let p = iieu::IieuDeviceParams::init(s, ch).expect("params");
        let params = 3 * b::<f32>(ch);
        // fwd: read x, x_pre, W, write y (+ read γ̇, β̇, η).
        g.throughput(Throughput::Bytes(3 * b::<T>(numel) + b::<T>(wlen) + params));
        g.bench_function(format!("iieu_b_{label}_fwd"), |bch| {
            bch.iter_custom(|it| {
                env.time(it, || {
                    iieu::forward(s, &cfg, x, &x_pre, &wt, &p).expect("iieu forward")
                })
            })
        });
        let (_, saved) = iieu::forward(s, &cfg, x, &x_pre, &wt, &p).expect("iieu forward");
        // bwd: read dy, x, x_pre, W, write dx, dx_pre, dW (+ params and their grads).
        g.throughput(Throughput::Bytes(
            5 * b::<T>(numel) + 2 * b::<T>(wlen) + 2 * params,
        ));
        g.bench_function(format!("iieu_b_{label}_bwd"), |bch| {
            bch.iter_custom(|it| {
                env.time(it, || {
                    iieu::backward(s, &cfg, dy, x, &x_pre, &wt, &p, &saved).expect("iieu backward")
                })
            })
        });
    }

    /// IIEU-DC (r = 16) forward and backward on `x` and a residual of the same shape.
    fn iieu_dc<T: DType>(
        g: &mut BenchmarkGroup<'_, WallTime>,
        env: &Env,
        r: &mut SmallRng,
        (n, ch, h, w): (usize, usize, usize, usize),
        x: &CudaSlice<T>,
        dy: &CudaSlice<T>,
    ) {
        let s = &env.stream;
        let numel = n * ch * h * w;
        let cfg = cdc::DcConfig::new(n, ch, h, w, 16).expect("dc config");
        let hp = cdc::DcParams::<f32>::init(&cfg, 1).expect("dc params");
        let p = iieu_dc::DcDeviceParams::upload(s, &cfg, &hp).expect("dc upload");
        let params = b::<f32>(
            [
                &p.ln1_weight,
                &p.ln1_bias,
                &p.w1,
                &p.gamma2,
                &p.beta2,
                &p.eta2,
                &p.w2,
                &p.ln2_weight,
                &p.ln2_bias,
            ]
            .iter()
            .map(|v| v.len())
            .sum(),
        );
        let res: CudaSlice<T> = env.upload(&randv(r, numel, -2.0, 2.0));
        // fwd: read x, res, write out (+ read the coupler's parameters).
        g.throughput(Throughput::Bytes(3 * b::<T>(numel) + params));
        g.bench_function("iieu_dc_fwd", |bch| {
            bch.iter_custom(|it| {
                env.time(it, || {
                    iieu_dc::forward(s, &cfg, x, &res, &p).expect("dc forward")
                })
            })
        });
        let (_, saved) = iieu_dc::forward(s, &cfg, x, &res, &p).expect("dc forward");
        // bwd: read dy, x, res, write dx, dres (+ parameters and their gradients).
        g.throughput(Throughput::Bytes(5 * b::<T>(numel) + 2 * params));
        g.bench_function("iieu_dc_bwd", |bch| {
            bch.iter_custom(|it| {
                env.time(it, || {
                    iieu_dc::backward(s, &cfg, dy, x, &res, &p, &saved).expect("dc backward")
                })
            })
        });
    }

    /// The AIEC training step (K = 100, default config), forward and backward.
    fn aiec_step<T: DType>(
        g: &mut BenchmarkGroup<'_, WallTime>,
        env: &Env,
        r: &mut SmallRng,
        shape: &ActShape,
        f: &CudaSlice<T>,
        dy: &CudaSlice<T>,
    ) {
        let s = &env.stream;
        let k = 100;
        let cfg = caiec::AiecConfig::default();
        let wd = env.upload_f32(&randv(r, k * shape.c, -0.1, 0.1));
        let labels: Vec<usize> = (0..shape.n).map(|i| i % k).collect();
        let mut counters = aiec::DeviceCounters::new(s, k, shape.c).expect("counters");
        let numel = f.len();
        let kc = k * shape.c;
        // fwd: read F, write A, read Wd and the two K×C u64 counter tables.
        g.throughput(Throughput::Bytes(
            2 * b::<T>(numel) + b::<f32>(kc) + 2 * b::<u64>(kc),
        ));
        g.bench_function("aiec_train_fwd", |bch| {
            bch.iter_custom(|it| {
                env.time(it, || {
                    aiec::train_forward(s, &cfg, shape, f, &wd, &labels, &mut counters)
                        .expect("aiec train_forward")
                })
            })
        });
        let out = aiec::train_forward(s, &cfg, shape, f, &wd, &labels, &mut counters)
            .expect("aiec train_forward");
        // bwd: read dA, F, write dF, read Wd, write dWd.
        g.throughput(Throughput::Bytes(3 * b::<T>(numel) + 2 * b::<f32>(kc)));
        g.bench_function("aiec_train_bwd", |bch| {
            bch.iter_custom(|it| {
                env.time(it, || {
                    aiec::train_backward(s, &cfg, shape, dy, 1.0, f, &wd, &out.saved)
                        .expect("aiec train_backward")
                })
            })
        });
    }

    fn nchw_group<T: DType>(c: &mut Criterion, env: &Env, dims: (usize, usize, usize, usize)) {
        let (n, ch, h, w) = dims;
        let numel = n * ch * h * w;
        let mut r = SmallRng::seed_from_u64(1);
        let x: CudaSlice<T> = env.upload(&randv(&mut r, numel, -2.0, 2.0));
        let dy: CudaSlice<T> = env.upload(&randv(&mut r, numel, -1.0, 1.0));
        let shape = ActShape::nchw(n, ch, h, w);
        let mut g = c.benchmark_group(format!("cuda_nchw_{n}x{ch}x{h}x{w}_{}", T::NAME));
        copy_floor(&mut g, env, &x);
        acon_c(&mut g, env, &shape, &x, &dy);
        iieu_b(&mut g, env, &mut r, dims, "3x3", 3, 1, &x, &dy);
        iieu_b(&mut g, env, &mut r, dims, "1x1", 1, 0, &x, &dy);
        iieu_dc(&mut g, env, &mut r, dims, &x, &dy);
        g.finish();
    }

    fn nlc_group<T: DType>(c: &mut Criterion, env: &Env, (n, l, ch): (usize, usize, usize)) {
        let numel = n * l * ch;
        let mut r = SmallRng::seed_from_u64(2);
        let x: CudaSlice<T> = env.upload(&randv(&mut r, numel, -2.0, 2.0));
        let dy: CudaSlice<T> = env.upload(&randv(&mut r, numel, -1.0, 1.0));
        let shape = ActShape::nlc(n, l, ch);
        let mut g = c.benchmark_group(format!("cuda_nlc_{n}x{l}x{ch}_{}", T::NAME));
        copy_floor(&mut g, env, &x);
        acon_c(&mut g, env, &shape, &x, &dy);
        aiec_step(&mut g, env, &mut r, &shape, &x, &dy);
        g.finish();
    }

    /// IieuConv2d (conv → BatchNorm training → IIEU-B) forward and backward, and the
    /// unfused IIEU-B on a tensor of the output's shape, for one conv geometry.
    fn conv_group<T: DType>(c: &mut Criterion, env: &Env, geo: Conv2dGeometry) {
        use activation_kernels::cpu::iieu_conv::{BatchNorm, IieuConvParams, Psi};
        use activation_kernels::cuda::iieu_conv as kconv;
        let s = &env.stream;
        let mut r = SmallRng::seed_from_u64(4);
        let cfg = ciieu::IieuConfig::new(geo).with_patch_norm(ciieu::PatchNorm::AllChannels);
        let (oh, ow) = geo.validate().expect("geometry");
        let out = geo.n * geo.c_out * oh * ow;
        let k = geo.cin_per_group() * geo.kh * geo.kw;
        let flops = 2 * (out * k) as u64;
        let x_pre: CudaSlice<T> = env.upload(&randv(&mut r, geo.input_len(), -1.0, 1.0));
        let wt: CudaSlice<T> = env.upload(&randv(&mut r, geo.weight_len(), -0.1, 0.1));
        let dy: CudaSlice<T> = env.upload(&randv(&mut r, out, -1.0, 1.0));
        let host = IieuConvParams::init(geo.c_out, Psi::BatchNorm(BatchNorm::init(geo.c_out)));
        let mut p = kconv::IieuConvDeviceParams::from_host(s, &host).expect("params");
        let name = format!(
            "cuda_conv_{}x{}x{}x{}_to_{}_k{}_{}",
            geo.n,
            geo.c_in,
            geo.h,
            geo.w,
            geo.c_out,
            geo.kh,
            T::NAME
        );
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Elements(flops));
        g.bench_function("iieu_conv_fwd", |bch| {
            bch.iter_custom(|it| {
                env.time(it, || {
                    kconv::forward(s, &cfg, &x_pre, &wt, &mut p).expect("iieu_conv forward")
                })
            })
        });
        let (_, saved) = kconv::forward(s, &cfg, &x_pre, &wt, &mut p).expect("forward");
        g.throughput(Throughput::Elements(2 * flops));
        g.bench_function("iieu_conv_bwd", |bch| {
            bch.iter_custom(|it| {
                env.time(it, || {
                    kconv::backward(s, &cfg, &dy, &x_pre, &wt, &p, &saved)
                        .expect("iieu_conv backward")
                })
            })
        });
        // The unfused IIEU-B after a conv: what fusion removes (plus BN's passes).
        let ip = iieu::IieuDeviceParams::init(s, geo.c_out).expect("params");
        g.throughput(Throughput::Elements(flops));
        g.bench_function("unfused_iieu_b_fwd", |bch| {
            bch.iter_custom(|it| {
                env.time(it, || {
                    iieu::forward(s, &cfg, &dy, &x_pre, &wt, &ip).expect("iieu forward")
                })
            })
        });
        g.finish();
    }

    /// The IieuConv2d geometries: ResNet-50's 3x3 and reducing 1x1 layers at batch 32
    /// (tiny ragged ones on the emulator).
    fn conv_shapes(env: &Env) -> Vec<Conv2dGeometry> {
        let g3 = |n, c, hw| Conv2dGeometry::new(n, c, hw, hw, c, 3, 3).with_padding(1, 1);
        let g1 = |n, c, hw, o| Conv2dGeometry::new(n, c, hw, hw, o, 1, 1);
        if env.emulated {
            vec![g3(2, 5, 7), g1(2, 9, 5, 3)]
        } else {
            vec![
                g3(32, 64, 56),
                g3(32, 128, 28),
                g3(32, 256, 14),
                g3(32, 512, 7),
                g1(32, 256, 56, 64),
                g1(32, 512, 28, 128),
                g1(32, 1024, 14, 256),
                g1(32, 2048, 7, 512),
            ]
        }
    }

    /// Host-side cost per call of small ops (group `host_cost`): tiny tensors, so the
    /// time is the safe API's own work per call — validation, kernel-handle lookup,
    /// argument packing, allocation and the launch call. Timed as wall time on the host
    /// (not CUDA events: the question is what the CPU spends per call; on a GPU the
    /// tiny kernels run asynchronously behind the calls). On the emulated device the
    /// group runs in dry-run mode ([`activation_kernels::emu::set_dry_run`]: every
    /// launch is checked and counted but no kernel runs, so the emulator's own kernel
    /// execution is not timed) with the detectors off, and it is the only group that
    /// runs outside `--test` mode:
    /// `cargo bench --features emulate --bench cuda_ops -- host_cost`
    /// (docs/performance.md records before/after numbers).
    fn host_cost_group(c: &mut Criterion, env: &Env) {
        #[cfg(feature = "emulate")]
        let saved_checks = if env.emulated {
            let off = activation_kernels::emu::Checks {
                race: false,
                init: false,
                mem: false,
            };
            let prev = activation_kernels::emu::checks();
            activation_kernels::emu::set_checks(off);
            activation_kernels::emu::set_dry_run(true);
            prev
        } else {
            None
        };
        let s = &env.stream;
        let wall = |iters: u64, f: &mut dyn FnMut()| {
            s.synchronize().expect("synchronize");
            let t0 = Instant::now();
            for _ in 0..iters {
                f();
            }
            s.synchronize().expect("synchronize");
            t0.elapsed()
        };
        let mut r = SmallRng::seed_from_u64(5);
        let mut g = c.benchmark_group("host_cost");
        if !env.test_mode {
            g.sample_size(30)
                .warm_up_time(Duration::from_millis(300))
                .measurement_time(Duration::from_secs(2));
        }
        // TAU on 32 f32 values: one launch, one allocation.
        let x32: CudaSlice<f32> = env.upload(&randv(&mut r, 32, -1.0, 1.0));
        g.bench_function("tau_fwd_f32_32", |bch| {
            bch.iter_custom(|it| {
                wall(it, &mut || {
                    black_box(aiec::tau_forward(s, &x32, 0.1).expect("tau"));
                })
            })
        });
        // ACON-C on (1, 8, 2, 2) f32: one launch.
        let shape = ActShape::nchw(1, 8, 2, 2);
        let x: CudaSlice<f32> = env.upload(&randv(&mut r, 32, -1.0, 1.0));
        let hp = cacon::AconCParams::<f32>::init_reference(8, 7).expect("params");
        let (p1, p2, beta) = (
            env.upload_f32(&hp.p1),
            env.upload_f32(&hp.p2),
            env.upload_f32(&hp.beta),
        );
        g.bench_function("acon_c_fwd_f32_1x8x2x2", |bch| {
            bch.iter_custom(|it| {
                wall(it, &mut || {
                    let b = acon::Beta::PerChannel(&beta);
                    black_box(acon::acon_c_forward(s, &shape, &x, &p1, &p2, b).expect("acon_c"));
                })
            })
        });
        // IIEU-B forward on (1, 8, 2, 2), 1x1 conv: six launches.
        let geo = Conv2dGeometry::new(1, 8, 2, 2, 8, 1, 1);
        let cfg = ciieu::IieuConfig::new(geo);
        let xp: CudaSlice<f32> = env.upload(&randv(&mut r, 32, -1.0, 1.0));
        let wt: CudaSlice<f32> = env.upload(&randv(&mut r, 64, -0.3, 0.3));
        let p = iieu::IieuDeviceParams::init(s, 8).expect("params");
        g.bench_function("iieu_b_fwd_f32_1x8x2x2", |bch| {
            bch.iter_custom(|it| {
                wall(it, &mut || {
                    black_box(iieu::forward(s, &cfg, &x, &xp, &wt, &p).expect("iieu"));
                })
            })
        });
        // One AIEC training-step forward on (2, 2, 8) tokens, K = 4, labels from the host.
        let ashape = ActShape::nlc(2, 2, 8);
        let acfg = caiec::AiecConfig::default();
        let wd = env.upload_f32(&randv(&mut r, 32, -0.1, 0.1));
        let labels = [1usize, 3];
        let mut counters = aiec::DeviceCounters::new(s, 4, 8).expect("counters");
        g.bench_function("aiec_train_fwd_f32_2x2x8_host_labels", |bch| {
            bch.iter_custom(|it| {
                wall(it, &mut || {
                    let o = aiec::train_forward(s, &acfg, &ashape, &x, &wd, &labels, &mut counters);
                    black_box(o.expect("aiec"));
                })
            })
        });
        // The same step with the labels already on the device (no upload per call).
        let dlabels = s.clone_htod(&[1u32, 3]).expect("labels");
        g.bench_function("aiec_train_fwd_f32_2x2x8_device_labels", |bch| {
            bch.iter_custom(|it| {
                wall(it, &mut || {
                    let o =
                        aiec::train_forward(s, &acfg, &ashape, &x, &wd, &dlabels, &mut counters);
                    black_box(o.expect("aiec"));
                })
            })
        });
        g.finish();
        #[cfg(feature = "emulate")]
        if let Some(prev) = saved_checks {
            activation_kernels::emu::set_dry_run(false);
            activation_kernels::emu::set_checks(prev);
        }
    }

    /// Every group: NCHW stages, then NLC token shapes, then IieuConv2d, each in f32,
    /// f16, bf16.
    pub fn run(c: &mut Criterion, env: &Env) {
        host_cost_group(c, env);
        if env.emulated && !env.test_mode {
            return;
        }
        let sh = shapes(env);
        for &d in &sh.nchw {
            nchw_group::<f32>(c, env, d);
            nchw_group::<f16>(c, env, d);
            nchw_group::<bf16>(c, env, d);
        }
        for &d in &sh.nlc {
            nlc_group::<f32>(c, env, d);
            nlc_group::<f16>(c, env, d);
            nlc_group::<bf16>(c, env, d);
        }
        for geo in conv_shapes(env) {
            conv_group::<f32>(c, env, geo);
            conv_group::<f16>(c, env, geo);
            conv_group::<bf16>(c, env, geo);
        }
    }
}

#[cfg(any(feature = "cuda", feature = "emulate"))]
fn main() {
    let Some(env) = gpu::open() else {
        return;
    };
    let mut c = env.criterion();
    gpu::run(&mut c, &env);
    c.final_summary();
}

#[cfg(not(any(feature = "cuda", feature = "emulate")))]
fn main() {
    println!("cuda_ops: built without `cuda`/`emulate` feature — nothing to bench");
}
