//! CPU benchmarks of the fused `IieuConv2d` (`cpu::iieu_conv`) against its two
//! baselines, side by side in one criterion group per ResNet-50 shape (f32):
//!
//! * `bare_fwd`, `bare_fwd_bwd`: the crate's bare convolution on the same GEMM code
//!   (`iieu_conv::conv2d`, `conv2d_backward`: the same im2col tiles, `gemm` calls,
//!   per-sample rayon tasks and `dW` reduction, with no patch norms, statistics, ψ or
//!   IIEU-B) — the fused op's overhead is its ratio to these;
//! * `fused_fwd`, `fused_fwd_bwd`: `iieu_conv::forward` (+ `backward`) with
//!   ψ = BatchNorm in training mode and `PatchNorm::AllChannels` — the authors' block
//!   conv → BN → IIEU-B. (For these ungrouped convs `PerGroup` does the same work: one
//!   patch plane per sample, norms from the same im2col rows; set
//!   `IIEU_BENCH_PATCH_NORM=per_group` to time it instead.);
//! * `candle_unfused_fwd`, `candle_unfused_fwd_bwd`: what a candle user writes without
//!   the fused op: candle's `Tensor::conv2d`, `candle_nn::BatchNorm::forward_train`, then
//!   this crate's unfused IIEU-B op `candle::ops::iieu_b`; the backward is
//!   `y.sum_all()?.backward()` with every input and parameter a `Var` (`x_pre`, `W`, BN
//!   γ, β, and IIEU-B's γ̇, β̇, η) — the gradients the fused backward returns;
//! * `relu_out_fwd`, `relu_out_bwd`: one elementwise pass over the conv output (a
//!   parallel ReLU into a new `Vec`, and its backward), to read `bare + one pass`
//!   against the fused op (the 1×1 shapes, where the output pass is a larger share of
//!   a cheaper GEMM).
//!
//! Groups (batch N = 32): `rn50_3x3_{C}x{HW}` — the 3×3 C → C, padding 1 convs of the
//! four stages, C = 64, 128, 256, 512 at 56², 28², 14², 7²; and `rn50_1x1_{C}to{O}x{HW}`
//! — the bottlenecks' 1×1 reductions 256→64 at 56², 512→128 at 28², 1024→256 at 14²,
//! 2048→512 at 7².
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench --features candle --bench iieu_conv
//! cargo bench --features candle --bench iieu_conv -- --test     # one run of each, N = 2
//! ```
//!
//! Threads: RAYON_NUM_THREADS (candle's CPU GEMM reads the same variable). Each iteration
//! takes 0.05–2 s, so the groups use flat sampling with 10 samples of one iteration and
//! short warm-ups. `IIEU_BENCH_REVERSE=1` registers the benchmarks of each group in the
//! reverse order (repeat runs in both orders to see drift from other load).
//! `IIEU_BENCH_ONLY=<substring>` keeps only the groups whose name contains it. In
//! `--test` mode the batch is N = 2 so that the check stays quick.
//!
//! On a shared machine the load drifts between criterion's benchmarks (each runs for
//! seconds before the next starts), which distorts the ratios; so
//! `IIEU_BENCH_ROUNDS=R` skips criterion and runs `R` interleaved rounds per shape
//! (every job once per round, alternating the order), printing each job's min / median
//! / max and the per-round ratios, in wall time and in on-CPU time (which the other
//! processes' share of the cores does not inflate):
//!
//! ```text
//! RAYON_NUM_THREADS=2 IIEU_BENCH_ROUNDS=9 cargo bench --features candle --bench iieu_conv
//! ```
//! `docs/iieu-conv-cpu-bench.md` records a run and its ratios.
use activation_kernels::candle::ops::{self as cops, IieuOpts};
use activation_kernels::cpu::iieu::{IieuConfig, PatchNorm};
use activation_kernels::cpu::iieu_conv::{self, BatchNorm, IieuConvParams, Psi};
use activation_kernels::Conv2dGeometry;
use candle_core::{Device, Tensor, Var};
use criterion::{black_box, Criterion, SamplingMode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use std::time::{Duration, Instant};

fn randv(r: &mut SmallRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| r.gen_range(lo..hi)).collect()
}

/// One elementwise pass over the output: a parallel ReLU that allocates its result.
fn relu_fwd(x: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(1 << 16)
        .zip(x.par_chunks(1 << 16))
        .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(o, &v)| *o = v.max(0.0)));
    y
}

/// Its backward (reads `dy` and `x`, writes a new `dx`).
fn relu_bwd(dy: &[f32], x: &[f32]) -> Vec<f32> {
    let mut dx = vec![0.0f32; x.len()];
    dx.par_chunks_mut(1 << 16)
        .zip(x.par_chunks(1 << 16).zip(dy.par_chunks(1 << 16)))
        .for_each(|(o, (x, g))| {
            for ((o, &v), &g) in o.iter_mut().zip(x).zip(g) {
                *o = if v > 0.0 { g } else { 0.0 };
            }
        });
    dx
}

fn test_mode() -> bool {
    std::env::args().any(|a| a == "--test")
}

fn patch_norm() -> PatchNorm {
    match std::env::var("IIEU_BENCH_PATCH_NORM").as_deref() {
        Ok("per_group") => PatchNorm::PerGroup,
        _ => PatchNorm::AllChannels,
    }
}

/// The candle side: `x_pre`, `W`, BatchNorm (γ, β as `Var`s) and IIEU-B's parameters.
struct CandleBlock {
    x_pre: Var,
    w: Var,
    bn: candle_nn::BatchNorm,
    // Kept so that the BatchNorm's γ, β stay variables with gradients.
    _bn_params: (Var, Var),
    ln_weight: Var,
    ln_bias: Var,
    eta: Var,
    pad: usize,
    opts: IieuOpts,
}

impl CandleBlock {
    fn new(geo: &Conv2dGeometry, x_pre: &[f32], w: &[f32]) -> candle_core::Result<Self> {
        let dev = Device::Cpu;
        let o = geo.c_out;
        let x_pre = Var::from_slice(x_pre, (geo.n, geo.c_in, geo.h, geo.w), &dev)?;
        let w = Var::from_slice(w, (o, geo.c_in, geo.kh, geo.kw), &dev)?;
        let gamma = Var::ones(o, candle_core::DType::F32, &dev)?;
        let beta = Var::zeros(o, candle_core::DType::F32, &dev)?;
        let bn = candle_nn::BatchNorm::new(
            o,
            Tensor::zeros(o, candle_core::DType::F32, &dev)?,
            Tensor::ones(o, candle_core::DType::F32, &dev)?,
            gamma.as_tensor().clone(),
            beta.as_tensor().clone(),
            1e-5,
        )?;
        let full = |v: f32| Var::from_vec(vec![v; o], o, &dev);
        Ok(Self {
            x_pre,
            w,
            bn,
            _bn_params: (gamma, beta),
            ln_weight: full(0.01)?,
            ln_bias: full(0.0)?,
            eta: full(0.05)?,
            pad: geo.padding.0,
            opts: IieuOpts {
                padding: geo.padding,
                patch_norm: patch_norm(),
                ..IieuOpts::default()
            },
        })
    }

    /// conv → BatchNorm (training) → IIEU-B.
    fn forward(&self) -> candle_core::Result<Tensor> {
        let c = self.x_pre.as_tensor().conv2d(&self.w, self.pad, 1, 1, 1)?;
        let x = self.bn.forward_train(&c)?;
        cops::iieu_b(
            &x,
            self.x_pre.as_tensor(),
            self.w.as_tensor(),
            &self.ln_weight,
            &self.ln_bias,
            &self.eta,
            self.opts,
        )
    }

    fn forward_backward(&self) -> candle_core::Result<candle_core::backprop::GradStore> {
        self.forward()?.sum_all()?.backward()
    }
}

type Job<'a> = (&'static str, Box<dyn FnMut() + 'a>);

/// Everything one shape's jobs read: the inputs, the fused op's parameters (one copy
/// per job: BatchNorm's running statistics are updated by every training forward) and
/// the candle block.
struct Setup {
    geo: Conv2dGeometry,
    cfg: IieuConfig,
    x_pre: Vec<f32>,
    w: Vec<f32>,
    dy: Vec<f32>,
    /// The conv output (the elementwise pass's input).
    out: Vec<f32>,
    p_fwd: IieuConvParams<f32>,
    p_fb: IieuConvParams<f32>,
    block: CandleBlock,
}

impl Setup {
    /// A C → O, `k`×`k` conv ("same" padding) over `(n, c, hw, hw)`, f32.
    fn new(n: usize, (c, o, hw, k): (usize, usize, usize, usize)) -> Self {
        let geo = Conv2dGeometry::new(n, c, hw, hw, o, k, k).with_padding(k / 2, k / 2);
        let (oh, ow) = geo.validate().expect("geometry");
        let cfg = IieuConfig::new(geo).with_patch_norm(patch_norm());
        let mut r = SmallRng::seed_from_u64((c * 1000 + k) as u64);
        let x_pre = randv(&mut r, geo.input_len(), -1.0, 1.0);
        // Kaiming-uniform scale, so the conv output is O(1) like the input.
        let bound = (3.0 / (c * k * k) as f32).sqrt();
        let w = randv(&mut r, geo.weight_len(), -bound, bound);
        let dy = randv(&mut r, n * o * oh * ow, -1.0, 1.0);
        let params = IieuConvParams::init(o, Psi::BatchNorm(BatchNorm::<f32>::init(o)));
        let out = iieu_conv::conv2d(&geo, &x_pre, &w).expect("conv2d");
        let block = CandleBlock::new(&geo, &x_pre, &w).expect("candle block");
        Self {
            geo,
            cfg,
            x_pre,
            w,
            dy,
            out,
            p_fwd: params.clone(),
            p_fb: params,
            block,
        }
    }

    /// The timed closures, in the order the groups report them.
    fn jobs(&mut self) -> Vec<Job<'_>> {
        let Setup {
            geo,
            cfg,
            x_pre,
            w,
            dy,
            out,
            p_fwd,
            p_fb,
            block,
        } = self;
        let (geo, cfg, x_pre, w, dy, out) = (&*geo, &*cfg, &*x_pre, &*w, &*dy, &*out);
        let block = &*block;
        vec![
            (
                "bare_fwd",
                Box::new(move || {
                    black_box(iieu_conv::conv2d(geo, x_pre, w).expect("conv2d"));
                }),
            ),
            (
                "bare_fwd_bwd",
                Box::new(move || {
                    let c = iieu_conv::conv2d(geo, x_pre, w).expect("conv2d");
                    black_box(&c);
                    black_box(iieu_conv::conv2d_backward(geo, dy, x_pre, w).expect("backward"));
                }),
            ),
            (
                "fused_fwd",
                Box::new(move || {
                    black_box(iieu_conv::forward(cfg, x_pre, w, p_fwd).expect("forward"));
                }),
            ),
            (
                "fused_fwd_bwd",
                Box::new(move || {
                    let (y, s) = iieu_conv::forward(cfg, x_pre, w, p_fb).expect("forward");
                    black_box(&y);
                    black_box(iieu_conv::backward(cfg, dy, x_pre, w, p_fb, &s).expect("backward"));
                }),
            ),
            (
                "candle_unfused_fwd",
                Box::new(move || {
                    black_box(block.forward().expect("candle forward"));
                }),
            ),
            (
                "candle_unfused_fwd_bwd",
                Box::new(move || {
                    black_box(block.forward_backward().expect("candle backward"));
                }),
            ),
            (
                "relu_out_fwd",
                Box::new(move || {
                    black_box(relu_fwd(black_box(out)));
                }),
            ),
            (
                "relu_out_bwd",
                Box::new(move || {
                    black_box(relu_bwd(black_box(dy), black_box(out)));
                }),
            ),
        ]
    }
}

/// The shapes: group name and `(C, O, HW, K)`.
fn shapes() -> Vec<(String, (usize, usize, usize, usize))> {
    let mut v = Vec::new();
    for (ch, hw) in [(64usize, 56usize), (128, 28), (256, 14), (512, 7)] {
        v.push((format!("rn50_3x3_{ch}x{hw}"), (ch, ch, hw, 3)));
    }
    for (ch, o, hw) in [
        (256usize, 64usize, 56usize),
        (512, 128, 28),
        (1024, 256, 14),
        (2048, 512, 7),
    ] {
        v.push((format!("rn50_1x1_{ch}to{o}x{hw}"), (ch, o, hw, 1)));
    }
    let only = std::env::var("IIEU_BENCH_ONLY").unwrap_or_default();
    v.retain(|(name, _)| name.contains(&only));
    v
}

/// One criterion group per shape, the jobs side by side.
fn criterion_groups(cr: &mut Criterion) {
    let n = if test_mode() { 2 } else { 32 };
    for (name, dims) in shapes() {
        let mut setup = Setup::new(n, dims);
        let mut jobs = setup.jobs();
        if std::env::var("IIEU_BENCH_REVERSE").as_deref() == Ok("1") {
            jobs.reverse();
        }
        let mut g = cr.benchmark_group(&name);
        g.sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
        for (id, f) in jobs.iter_mut() {
            g.bench_function(*id, |b| b.iter(&mut *f));
        }
        g.finish();
    }
}

/// On-CPU time of every thread of this process so far, in ns (Linux: the first field
/// of `/proc/self/task/*/schedstat`); `None` where that is not readable.
fn cpu_ns() -> Option<u64> {
    let mut total = 0u64;
    for e in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(e.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// `IIEU_BENCH_ROUNDS=R`: instead of criterion, `R` interleaved rounds per shape, each
/// running every job once (forward order in even rounds, reverse in odd ones; one
/// untimed warm-up round first), so that load from other processes hits all jobs alike.
/// Two metrics per run: `wall` (elapsed time) and `cpu` (the on-CPU time of all this
/// process's threads, which does not count the time other processes hold the cores;
/// it does count rayon's brief spinning while a worker waits). Prints, per metric and
/// job, the min / median / max over the rounds in ms, then the per-round ratios
/// (fused / bare, fused / candle, fused / (bare + ReLU pass)) as min / median / max.
fn interleaved(rounds: usize) {
    let stats = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        (s[0], s[s.len() / 2], s[s.len() - 1])
    };
    println!(
        "# {rounds} interleaved rounds per shape, RAYON_NUM_THREADS={:?}",
        std::env::var("RAYON_NUM_THREADS").ok()
    );
    println!("# shape\tmetric\tjob or ratio\tmin\tmedian\tmax");
    for (name, dims) in shapes() {
        let mut setup = Setup::new(32, dims);
        let mut jobs = setup.jobs();
        // [metric][job][round], seconds.
        let mut t = vec![vec![Vec::with_capacity(rounds); jobs.len()]; 2];
        for (_, f) in jobs.iter_mut() {
            f();
        }
        for r in 0..rounds {
            let order: Vec<usize> = if r % 2 == 0 {
                (0..jobs.len()).collect()
            } else {
                (0..jobs.len()).rev().collect()
            };
            for i in order {
                let (c0, t0) = (cpu_ns(), Instant::now());
                (jobs[i].1)();
                let wall = t0.elapsed().as_secs_f64();
                let cpu = match (c0, cpu_ns()) {
                    (Some(a), Some(b)) => (b - a) as f64 * 1e-9,
                    _ => f64::NAN,
                };
                t[0][i].push(wall);
                t[1][i].push(cpu);
            }
        }
        for (metric, tm) in ["wall", "cpu"].into_iter().zip(&t) {
            if tm[0][0].is_nan() {
                continue;
            }
            for ((id, _), ts) in jobs.iter().zip(tm) {
                let (lo, med, hi) = stats(ts);
                println!(
                    "{name}\t{metric}\t{id}\t{:.2}\t{:.2}\t{:.2}",
                    lo * 1e3,
                    med * 1e3,
                    hi * 1e3
                );
            }
            let ratio = |what: &str, num: &dyn Fn(usize) -> f64, den: &dyn Fn(usize) -> f64| {
                let v: Vec<f64> = (0..rounds).map(|r| num(r) / den(r)).collect();
                let (lo, med, hi) = stats(&v);
                println!("{name}\t{metric}\t{what}\t{lo:.3}\t{med:.3}\t{hi:.3}");
            };
            // Job indices as in `Setup::jobs`.
            let (bf, bfb, ff, ffb, cf, cfb, rf, rb) = (0, 1, 2, 3, 4, 5, 6, 7);
            let at = |i: usize| move |r: usize| tm[i][r];
            ratio("fused/bare fwd", &at(ff), &at(bf));
            ratio("fused/bare fwd_bwd", &at(ffb), &at(bfb));
            ratio("fused/candle fwd", &at(ff), &at(cf));
            ratio("fused/candle fwd_bwd", &at(ffb), &at(cfb));
            ratio("fused/(bare+relu) fwd", &at(ff), &|r| tm[bf][r] + tm[rf][r]);
            ratio("fused/(bare+relu) fwd_bwd", &at(ffb), &|r| {
                tm[bfb][r] + tm[rf][r] + tm[rb][r]
            });
        }
    }
}

fn main() {
    if let Some(rounds) = std::env::var("IIEU_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&r| r > 0 && !test_mode())
    {
        interleaved(rounds);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    criterion_groups(&mut c);
    c.final_summary();
}
