//! CPU benchmarks of every op, forward and backward (f32), each group timing a
//! memory-bound ReLU floor on the same tensor in the same run, so an op's cost can
//! be read as a ratio to the floor.
//!
//! `cargo bench --bench cpu_ops` (threads: RAYON_NUM_THREADS; default all cores).
//! Throughput is reported in elements/s of the activation tensor.
use activation_kernels::cpu::{acon, aiec, iieu, iieu_dc};
use activation_kernels::{ActShape, Conv2dGeometry};
use criterion::{
    black_box, criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

fn randv(r: &mut SmallRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| r.gen_range(lo..hi)).collect()
}

/// The floor: a parallel ReLU that allocates its output like the ops do.
fn relu_fwd(x: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(1 << 16)
        .zip(x.par_chunks(1 << 16))
        .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(o, &v)| *o = v.max(0.0)));
    y
}

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

fn floor(g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>, x: &[f32], dy: &[f32]) {
    g.bench_function("relu_floor_fwd", |b| b.iter(|| relu_fwd(black_box(x))));
    g.bench_function("relu_floor_bwd", |b| {
        b.iter(|| relu_bwd(black_box(dy), black_box(x)))
    });
}

fn conv_ops(c: &mut Criterion) {
    let mut r = SmallRng::seed_from_u64(1);
    let (n, ch, h, w) = (32usize, 64usize, 56usize, 56usize);
    let numel = n * ch * h * w;
    let x = randv(&mut r, numel, -2.0, 2.0);
    let dy = randv(&mut r, numel, -1.0, 1.0);
    let shape = ActShape::nchw(n, ch, h, w);
    let mut g = c.benchmark_group("nchw_32x64x56x56");
    g.sample_size(10)
        .throughput(Throughput::Elements(numel as u64));
    floor(&mut g, &x, &dy);

    let p = acon::AconCParams::<f32>::init_reference(ch, 7).expect("params");
    g.bench_function("acon_c_fwd", |b| {
        b.iter(|| acon::acon_c_forward(&shape, &x, &p.p1, &p.p2, acon::Beta::PerChannel(&p.beta)))
    });
    g.bench_function("acon_c_bwd", |b| {
        b.iter(|| {
            acon::acon_c_backward(
                &shape,
                &dy,
                &x,
                &p.p1,
                &p.p2,
                acon::Beta::PerChannel(&p.beta),
            )
        })
    });

    for (label, k, pad) in [("3x3", 3usize, 1usize), ("1x1", 1, 0)] {
        let geo = Conv2dGeometry::new(n, ch, h, w, ch, k, k).with_padding(pad, pad);
        let cfg = iieu::IieuConfig::new(geo);
        let x_pre = randv(&mut r, numel, -1.0, 1.0);
        let wt = randv(&mut r, ch * ch * k * k, -0.1, 0.1);
        let ip = iieu::IieuParams::<f32>::init(ch);
        g.bench_function(format!("iieu_b_{label}_fwd"), |b| {
            b.iter(|| iieu::forward(&cfg, &x, &x_pre, &wt, &ip))
        });
        let (_, saved) = iieu::forward(&cfg, &x, &x_pre, &wt, &ip).expect("forward");
        g.bench_function(format!("iieu_b_{label}_bwd"), |b| {
            b.iter(|| iieu::backward(&cfg, &dy, &x, &x_pre, &wt, &ip, &saved))
        });
    }

    let dcfg = iieu_dc::DcConfig::new(n, ch, h, w, 16).expect("config");
    let dp = iieu_dc::DcParams::<f32>::init(&dcfg, 1).expect("params");
    let res = randv(&mut r, numel, -2.0, 2.0);
    g.bench_function("iieu_dc_fwd", |b| {
        b.iter(|| iieu_dc::forward(&dcfg, &x, &res, &dp))
    });
    let (_, ds) = iieu_dc::forward(&dcfg, &x, &res, &dp).expect("forward");
    g.bench_function("iieu_dc_bwd", |b| {
        b.iter(|| iieu_dc::backward(&dcfg, &dy, &x, &res, &dp, &ds))
    });
    aiec_step(&mut g, &mut r, &shape, &x, &dy);
    g.finish();
}

fn aiec_step(
    g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    r: &mut SmallRng,
    shape: &ActShape,
    f: &[f32],
    dy: &[f32],
) {
    let k = 100;
    let cfg = aiec::AiecConfig::default();
    let wd = randv(r, k * shape.c, -0.1, 0.1);
    let labels: Vec<usize> = (0..shape.n).map(|i| i % k).collect();
    let mut counters = aiec::Counters::new(k, shape.c).expect("counters");
    g.bench_function("aiec_train_step_fwd_bwd", |b| {
        b.iter(|| {
            let out =
                aiec::train_forward(&cfg, shape, f, &wd, &labels, &mut counters).expect("forward");
            aiec::train_backward(&cfg, shape, dy, 1.0, f, &wd, &out.saved).expect("backward")
        })
    });
    g.bench_function("tau_fwd", |b| b.iter(|| aiec::tau_forward(f, 0.0)));
}

fn token_ops(c: &mut Criterion) {
    let mut r = SmallRng::seed_from_u64(2);
    let (n, l, ch) = (64usize, 197usize, 192usize);
    let numel = n * l * ch;
    let x = randv(&mut r, numel, -2.0, 2.0);
    let dy = randv(&mut r, numel, -1.0, 1.0);
    let shape = ActShape::nlc(n, l, ch);
    let mut g = c.benchmark_group("nlc_64x197x192");
    g.sample_size(10)
        .throughput(Throughput::Elements(numel as u64));
    floor(&mut g, &x, &dy);
    let p = acon::AconCParams::<f32>::init_reference(ch, 7).expect("params");
    g.bench_function("acon_c_fwd", |b| {
        b.iter(|| acon::acon_c_forward(&shape, &x, &p.p1, &p.p2, acon::Beta::PerChannel(&p.beta)))
    });
    g.bench_function("acon_c_bwd", |b| {
        b.iter(|| {
            acon::acon_c_backward(
                &shape,
                &dy,
                &x,
                &p.p1,
                &p.p2,
                acon::Beta::PerChannel(&p.beta),
            )
        })
    });
    aiec_step(&mut g, &mut r, &shape, &x, &dy);
    g.finish();
}

criterion_group!(benches, conv_ops, token_ops);
criterion_main!(benches);
