//! CPU benchmarks of every op, forward and backward (f32), each group timing a
//! memory-bound ReLU floor on the same tensor in the same run, so an op's cost can
//! be read as a ratio to the floor.
//!
//! `cargo bench --bench cpu_ops` (threads: RAYON_NUM_THREADS; default all cores;
//! SIMD level: the CPU's best, or `AK_SIMD=avx2|scalar` to force a lower one for the
//! ops and the floor alike — printed on stderr at the start).
//! `scripts/perf-report.sh` runs them and writes the performance table of docs/performance.md.
//!
//! Throughput is reported as **bytes of compulsory traffic**: the f32 tensors an op
//! must read plus those it must write — activation-sized tensors, and for IIEU-B the
//! conv weight `W` (read) and `dW` (written), which outgrow the activations in late
//! ResNet stages (per-channel parameters, `r_x` and other small buffers are left out). The
//! element count of the activation tensor is in the group name (`layout_NxCxHxW`),
//! so elements/s follow from the same numbers.
//!
//! The floor, ACON-C, IIEU-B and IIEU-DC are also timed in `_into` form, writing into
//! caller-owned output buffers reused across iterations (`acon_c_forward_into`,
//! `iieu::forward_into`, `iieu_dc::backward_into`, ...), so the kernels can be
//! compared without the allocator's zero-filling and page faults.
//!
//! Groups:
//! * `nchw_32x64x56x56`: every op (the reference shape);
//! * `nlc_64x197x{192,768}`: ViT-Tiny tokens (and the MLP width), the ACON family
//!   and AIEC;
//! * `rn50_32x{256x56x56,512x28x28,1024x14x14,2048x7x7}`: ResNet-50 stages at batch
//!   32, IIEU-B after a 3x3 and after a 1x1 conv (C → C).
use activation_kernels::cpu::{acon, aiec, iieu, iieu_dc, relu};
use activation_kernels::fastmath::simd_level_report;
use activation_kernels::{ActShape, Conv2dGeometry};
use criterion::{
    black_box, criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;

type Group<'a> = BenchmarkGroup<'a, criterion::measurement::WallTime>;

fn randv(r: &mut SmallRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| r.gen_range(lo..hi)).collect()
}

/// The floor: the crate's ReLU (`cpu::relu`), written with the ops' own policies
/// (runtime SIMD dispatch at `fastmath::simd_level`, 16 KB software prefetch, rayon
/// tasks), allocating its output like the ops do.
fn relu_fwd(x: &[f32]) -> Vec<f32> {
    relu::forward(x).expect("relu forward")
}

fn relu_bwd(dy: &[f32], x: &[f32]) -> Vec<f32> {
    relu::backward(dy, x).expect("relu backward")
}

/// The floor writing into a caller-owned buffer (compared with the ops' `_into` forms).
fn relu_fwd_into(x: &[f32], y: &mut [f32]) {
    relu::forward_into(x, y).expect("relu forward_into")
}

fn relu_bwd_into(dy: &[f32], x: &[f32], dx: &mut [f32]) {
    relu::backward_into(dy, x, dx).expect("relu backward_into")
}

/// A group with the fixed settings the report relies on (10 samples; short
/// warm-up and measurement windows so the whole suite fits in a few minutes).
fn group<'a>(c: &'a mut Criterion, name: &str) -> Group<'a> {
    // Once per run, on stderr (scripts/perf-report.sh records it with the table).
    static LEVEL: std::sync::Once = std::sync::Once::new();
    LEVEL.call_once(|| eprintln!("SIMD level: {}", simd_level_report()));
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g
}

/// Sets the throughput to `tensors` activation-sized f32 tensors of `numel`.
fn traffic(g: &mut Group<'_>, numel: usize, tensors: usize) {
    traffic_plus(g, numel, tensors, 0);
}

/// As [`traffic`], plus `extra` more f32 values (e.g. conv weights and their gradient).
fn traffic_plus(g: &mut Group<'_>, numel: usize, tensors: usize, extra: usize) {
    g.throughput(Throughput::Bytes(((numel * tensors + extra) * 4) as u64));
}

fn floor(g: &mut Group<'_>, x: &[f32], dy: &[f32]) {
    traffic(g, x.len(), 2);
    g.bench_function("relu_floor_fwd", |b| b.iter(|| relu_fwd(black_box(x))));
    let mut out = vec![0.0f32; x.len()];
    g.bench_function("relu_floor_fwd_into", |b| {
        b.iter(|| relu_fwd_into(black_box(x), &mut out))
    });
    traffic(g, x.len(), 3);
    g.bench_function("relu_floor_bwd", |b| {
        b.iter(|| relu_bwd(black_box(dy), black_box(x)))
    });
    g.bench_function("relu_floor_bwd_into", |b| {
        b.iter(|| relu_bwd_into(black_box(dy), black_box(x), &mut out))
    });
}

fn acon_c(g: &mut Group<'_>, shape: &ActShape, x: &[f32], dy: &[f32]) {
    let p = acon::AconCParams::<f32>::init_reference(shape.c, 7).expect("params");
    traffic(g, x.len(), 2);
    let beta = acon::Beta::PerChannel(&p.beta);
    g.bench_function("acon_c_fwd", |b| {
        b.iter(|| acon::acon_c_forward(shape, x, &p.p1, &p.p2, beta))
    });
    let mut y = vec![0.0f32; x.len()];
    g.bench_function("acon_c_fwd_into", |b| {
        b.iter(|| acon::acon_c_forward_into(shape, x, &p.p1, &p.p2, beta, &mut y))
    });
    traffic(g, x.len(), 3);
    g.bench_function("acon_c_bwd", |b| {
        b.iter(|| acon::acon_c_backward(shape, dy, x, &p.p1, &p.p2, beta))
    });
    let mut grads = acon::AconCGrads::default();
    g.bench_function("acon_c_bwd_into", |b| {
        b.iter(|| acon::acon_c_backward_into(shape, dy, x, &p.p1, &p.p2, beta, &mut grads))
    });
}

/// ACON-A, ACON-B (per-channel β, p) and meta-ACON-C with each β generator.
fn acon_others(g: &mut Group<'_>, shape: &ActShape, x: &[f32], dy: &[f32]) {
    let p = acon::AconCParams::<f32>::init_reference(shape.c, 11).expect("params");
    let beta = acon::Beta::PerChannel(&p.beta);
    traffic(g, x.len(), 2);
    g.bench_function("acon_a_fwd", |b| {
        b.iter(|| acon::acon_a_forward(shape, x, beta))
    });
    g.bench_function("acon_b_fwd", |b| {
        b.iter(|| acon::acon_b_forward(shape, x, &p.p2, beta))
    });
    traffic(g, x.len(), 3);
    g.bench_function("acon_a_bwd", |b| {
        b.iter(|| acon::acon_a_backward(shape, dy, x, beta))
    });
    g.bench_function("acon_b_bwd", |b| {
        b.iter(|| acon::acon_b_backward(shape, dy, x, &p.p2, beta))
    });
    let cg = acon::ChannelGen::<f32>::init(shape.c, 16, true, 5).expect("generator");
    for (name, gen) in [
        ("channel", acon::MetaGen::Channel(&cg)),
        ("layer", acon::MetaGen::Layer),
        ("pixel", acon::MetaGen::Pixel),
    ] {
        traffic(g, x.len(), 2);
        g.bench_function(format!("meta_acon_c_{name}_fwd"), |b| {
            b.iter(|| acon::meta_acon_c_forward(shape, x, &p.p1, &p.p2, gen))
        });
        let (_, saved) = acon::meta_acon_c_forward(shape, x, &p.p1, &p.p2, gen).expect("forward");
        traffic(g, x.len(), 3);
        g.bench_function(format!("meta_acon_c_{name}_bwd"), |b| {
            b.iter(|| acon::meta_acon_c_backward(shape, dy, x, &p.p1, &p.p2, gen, &saved))
        });
    }
}

/// IIEU-B after a C → C conv with `k`×`k` kernel ("same" padding).
#[allow(clippy::too_many_arguments)]
fn iieu_b(
    g: &mut Group<'_>,
    r: &mut SmallRng,
    dims: (usize, usize, usize, usize),
    label: &str,
    k: usize,
    x: &[f32],
    dy: &[f32],
) {
    let (n, ch, h, w) = dims;
    let numel = x.len();
    let geo = Conv2dGeometry::new(n, ch, h, w, ch, k, k).with_padding(k / 2, k / 2);
    let cfg = iieu::IieuConfig::new(geo);
    let x_pre = randv(r, numel, -1.0, 1.0);
    let wt = randv(r, ch * ch * k * k, -0.1, 0.1);
    let ip = iieu::IieuParams::<f32>::init(ch);
    // Reads x, x_pre, W; writes y.
    traffic_plus(g, numel, 3, wt.len());
    g.bench_function(format!("iieu_b_{label}_fwd"), |b| {
        b.iter(|| iieu::forward(&cfg, x, &x_pre, &wt, &ip))
    });
    let mut y = vec![0.0f32; numel];
    g.bench_function(format!("iieu_b_{label}_fwd_into"), |b| {
        b.iter(|| iieu::forward_into(&cfg, x, &x_pre, &wt, &ip, &mut y))
    });
    let (_, saved) = iieu::forward(&cfg, x, &x_pre, &wt, &ip).expect("forward");
    // Reads dy, x, x_pre, W; writes dx, dx_pre, dW.
    traffic_plus(g, numel, 5, 2 * wt.len());
    g.bench_function(format!("iieu_b_{label}_bwd"), |b| {
        b.iter(|| iieu::backward(&cfg, dy, x, &x_pre, &wt, &ip, &saved))
    });
    let mut grads = iieu::IieuGrads::default();
    g.bench_function(format!("iieu_b_{label}_bwd_into"), |b| {
        b.iter(|| iieu::backward_into(&cfg, dy, x, &x_pre, &wt, &ip, &saved, &mut grads))
    });
}

fn conv_ops(c: &mut Criterion) {
    let mut r = SmallRng::seed_from_u64(1);
    let (n, ch, h, w) = (32usize, 64usize, 56usize, 56usize);
    let numel = n * ch * h * w;
    let x = randv(&mut r, numel, -2.0, 2.0);
    let dy = randv(&mut r, numel, -1.0, 1.0);
    let shape = ActShape::nchw(n, ch, h, w);
    let mut g = group(c, "nchw_32x64x56x56");
    floor(&mut g, &x, &dy);
    acon_c(&mut g, &shape, &x, &dy);
    acon_others(&mut g, &shape, &x, &dy);
    for (label, k) in [("3x3", 3usize), ("1x1", 1)] {
        iieu_b(&mut g, &mut r, (n, ch, h, w), label, k, &x, &dy);
    }

    let dcfg = iieu_dc::DcConfig::new(n, ch, h, w, 16).expect("config");
    let dp = iieu_dc::DcParams::<f32>::init(&dcfg, 1).expect("params");
    let res = randv(&mut r, numel, -2.0, 2.0);
    // Reads x, res; writes y.
    traffic(&mut g, numel, 3);
    g.bench_function("iieu_dc_fwd", |b| {
        b.iter(|| iieu_dc::forward(&dcfg, &x, &res, &dp))
    });
    let mut out = vec![0.0f32; numel];
    g.bench_function("iieu_dc_fwd_into", |b| {
        b.iter(|| iieu_dc::forward_into(&dcfg, &x, &res, &dp, &mut out))
    });
    let (_, ds) = iieu_dc::forward(&dcfg, &x, &res, &dp).expect("forward");
    // Reads dy, x, res; writes dx, dres.
    traffic(&mut g, numel, 5);
    g.bench_function("iieu_dc_bwd", |b| {
        b.iter(|| iieu_dc::backward(&dcfg, &dy, &x, &res, &dp, &ds))
    });
    let mut dgrads = iieu_dc::DcGrads::default();
    g.bench_function("iieu_dc_bwd_into", |b| {
        b.iter(|| iieu_dc::backward_into(&dcfg, &dy, &x, &res, &dp, &ds, &mut dgrads))
    });
    aiec_step(&mut g, &mut r, &shape, &x, &dy);
    g.finish();
}

fn aiec_step(g: &mut Group<'_>, r: &mut SmallRng, shape: &ActShape, f: &[f32], dy: &[f32]) {
    let k = 100;
    let cfg = aiec::AiecConfig::default();
    let wd = randv(r, k * shape.c, -0.1, 0.1);
    let labels: Vec<usize> = (0..shape.n).map(|i| i % k).collect();
    let mut counters = aiec::Counters::new(k, shape.c).expect("counters");
    // Forward reads F, writes A; backward reads dA, F, writes dF.
    traffic(g, f.len(), 5);
    g.bench_function("aiec_train_step_fwd_bwd", |b| {
        b.iter(|| {
            let out =
                aiec::train_forward(&cfg, shape, f, &wd, &labels, &mut counters).expect("forward");
            aiec::train_backward(&cfg, shape, dy, 1.0, f, &wd, &out.saved).expect("backward")
        })
    });
    // The two halves of the step on their own.
    traffic(g, f.len(), 2);
    g.bench_function("aiec_train_fwd", |b| {
        b.iter(|| aiec::train_forward(&cfg, shape, f, &wd, &labels, &mut counters))
    });
    let out = aiec::train_forward(&cfg, shape, f, &wd, &labels, &mut counters).expect("forward");
    traffic(g, f.len(), 3);
    g.bench_function("aiec_train_bwd", |b| {
        b.iter(|| aiec::train_backward(&cfg, shape, dy, 1.0, f, &wd, &out.saved))
    });
    traffic(g, f.len(), 2);
    g.bench_function("tau_fwd", |b| b.iter(|| aiec::tau_forward(f, 0.0)));
    traffic(g, f.len(), 3);
    g.bench_function("tau_bwd", |b| b.iter(|| aiec::tau_backward(dy, f, 0.0)));
}

fn token_ops(c: &mut Criterion) {
    let mut r = SmallRng::seed_from_u64(2);
    for ch in [192usize, 768] {
        let (n, l) = (64usize, 197usize);
        let numel = n * l * ch;
        let x = randv(&mut r, numel, -2.0, 2.0);
        let dy = randv(&mut r, numel, -1.0, 1.0);
        let shape = ActShape::nlc(n, l, ch);
        let mut g = group(c, &format!("nlc_64x197x{ch}"));
        floor(&mut g, &x, &dy);
        acon_c(&mut g, &shape, &x, &dy);
        acon_others(&mut g, &shape, &x, &dy);
        aiec_step(&mut g, &mut r, &shape, &x, &dy);
        g.finish();
    }
}

fn resnet_stages(c: &mut Criterion) {
    let mut r = SmallRng::seed_from_u64(3);
    for (ch, hw) in [(256usize, 56usize), (512, 28), (1024, 14), (2048, 7)] {
        let n = 32;
        let numel = n * ch * hw * hw;
        let x = randv(&mut r, numel, -2.0, 2.0);
        let dy = randv(&mut r, numel, -1.0, 1.0);
        let mut g = group(c, &format!("rn50_32x{ch}x{hw}x{hw}"));
        floor(&mut g, &x, &dy);
        for (label, k) in [("3x3", 3usize), ("1x1", 1)] {
            iieu_b(&mut g, &mut r, (n, ch, hw, hw), label, k, &x, &dy);
        }
        g.finish();
    }
}

criterion_group!(benches, conv_ops, token_ops, resnet_stages);
criterion_main!(benches);
