//! The main job: every op of the crate, forward and backward, on realistic shapes,
//! on the CPU backend (f32), printing the time per op.
//!
//! Shapes: conv activations 32×64×56×56 (a ResNet stage-1 tensor) for IIEU-B
//! (after a 3×3, padding-1 convolution), IIEU-DC, ACON and AIEC (NCHW); ViT-Tiny
//! tokens 64×197×192 for ACON and AIEC (channels-last).
//!
//! `cargo run --release --example tour` (threads: RAYON_NUM_THREADS, default all cores).
use std::time::Instant;

use activation_kernels::cpu::{acon, aiec, iieu, iieu_dc};
use activation_kernels::{ActShape, Conv2dGeometry, Result};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const REPS: usize = 5;

fn randv(r: &mut SmallRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| r.gen_range(lo..hi)).collect()
}

/// Median wall time of `REPS` runs after one warm-up, in milliseconds.
fn time<R>(mut f: impl FnMut() -> Result<R>) -> Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(REPS);
    for _ in 0..REPS {
        let s = Instant::now();
        std::hint::black_box(f()?);
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[REPS / 2])
}

fn row(op: &str, shape: &str, elems: usize, fwd: f64, bwd: f64) {
    let gel = |ms: f64| elems as f64 / (ms * 1e-3) / 1e9;
    println!(
        "| {op:<28} | {shape:<16} | {fwd:>8.2} | {:>6.2} | {bwd:>8.2} | {:>6.2} |",
        gel(fwd),
        gel(bwd)
    );
}

fn main() -> Result<()> {
    let mut r = SmallRng::seed_from_u64(2026);
    println!(
        "activation-kernels tour — CPU backend, f32, {} threads, median of {REPS} runs\n",
        rayon::current_num_threads()
    );
    println!("| op                           | shape            | fwd ms   | Gel/s  | bwd ms   | Gel/s  |");
    println!("|------------------------------|------------------|----------|--------|----------|--------|");

    // ---- conv-activation tensors: 32×64×56×56 ----
    let (n, c, h, w) = (32usize, 64usize, 56usize, 56usize);
    let numel = n * c * h * w;
    let x = randv(&mut r, numel, -2.0, 2.0);
    let dy = randv(&mut r, numel, -1.0, 1.0);
    let nchw = ActShape::nchw(n, c, h, w);

    // IIEU-B after a 3×3, padding-1 conv 64 -> 64.
    let geo = Conv2dGeometry::new(n, c, h, w, c, 3, 3).with_padding(1, 1);
    let cfg = iieu::IieuConfig::new(geo);
    let x_pre = randv(&mut r, numel, -1.0, 1.0);
    let wt = randv(&mut r, c * c * 9, -0.1, 0.1);
    let p = iieu::IieuParams::<f32>::init(c);
    let fwd = time(|| iieu::forward(&cfg, &x, &x_pre, &wt, &p))?;
    let (_, saved) = iieu::forward(&cfg, &x, &x_pre, &wt, &p)?;
    let bwd = time(|| iieu::backward(&cfg, &dy, &x, &x_pre, &wt, &p, &saved))?;
    row("IIEU-B 3x3 (all grads)", "32x64x56x56", numel, fwd, bwd);

    // IIEU-DC (r = 16).
    let dcfg = iieu_dc::DcConfig::new(n, c, h, w, 16)?;
    let dp = iieu_dc::DcParams::<f32>::init(&dcfg, 1)?;
    let res = randv(&mut r, numel, -2.0, 2.0);
    let fwd = time(|| iieu_dc::forward(&dcfg, &x, &res, &dp))?;
    let (_, dsaved) = iieu_dc::forward(&dcfg, &x, &res, &dp)?;
    let bwd = time(|| iieu_dc::backward(&dcfg, &dy, &x, &res, &dp, &dsaved))?;
    row("IIEU-DC (all grads)", "32x64x56x56", numel, fwd, bwd);

    acon_rows(&mut r, &nchw, &x, &dy, "32x64x56x56")?;
    aiec_rows(&mut r, &nchw, &x, &dy, "32x64x56x56")?;

    // ---- ViT-Tiny tokens: 64×197×192 ----
    let tok = ActShape::nlc(64, 197, 192);
    let tn = 64 * 197 * 192;
    let xt = randv(&mut r, tn, -2.0, 2.0);
    let dyt = randv(&mut r, tn, -1.0, 1.0);
    acon_rows(&mut r, &tok, &xt, &dyt, "64x197x192 NLC")?;
    aiec_rows(&mut r, &tok, &xt, &dyt, "64x197x192 NLC")?;
    Ok(())
}

fn aiec_rows(r: &mut SmallRng, shape: &ActShape, f: &[f32], dy: &[f32], label: &str) -> Result<()> {
    let k = 100;
    let cfg = aiec::AiecConfig::default();
    let wd = randv(r, k * shape.c, -0.1, 0.1);
    let labels: Vec<usize> = (0..shape.n).map(|i| i % k).collect();
    let mut counters = aiec::Counters::new(k, shape.c)?;
    let fwd = time(|| aiec::train_forward(&cfg, shape, f, &wd, &labels, &mut counters))?;
    let out = aiec::train_forward(&cfg, shape, f, &wd, &labels, &mut counters)?;
    let bwd = time(|| aiec::train_backward(&cfg, shape, dy, 1.0, f, &wd, &out.saved))?;
    row("AIEC train step (K=100)", label, f.len(), fwd, bwd);
    let inf = time(|| aiec::infer_forward(&cfg, f))?;
    let tb = time(|| aiec::tau_backward(dy, f, 0.0))?;
    row("TAU (inference)", label, f.len(), inf, tb);
    Ok(())
}

fn acon_rows(r: &mut SmallRng, shape: &ActShape, x: &[f32], dy: &[f32], label: &str) -> Result<()> {
    let c = shape.c;
    let p = acon::AconCParams::<f32>::init_reference(c, 7)?;
    let beta = || acon::Beta::PerChannel(&p.beta);
    let fwd = time(|| acon::acon_c_forward(shape, x, &p.p1, &p.p2, beta()))?;
    let bwd = time(|| acon::acon_c_backward(shape, dy, x, &p.p1, &p.p2, beta()))?;
    row("ACON-C (beta per channel)", label, x.len(), fwd, bwd);

    let fwd = time(|| acon::acon_a_forward(shape, x, beta()))?;
    let bwd = time(|| acon::acon_a_backward(shape, dy, x, beta()))?;
    row("ACON-A / Swish", label, x.len(), fwd, bwd);

    let pb = randv(r, c, -0.5, 0.5);
    let fwd = time(|| acon::acon_b_forward(shape, x, &pb, beta()))?;
    let bwd = time(|| acon::acon_b_backward(shape, dy, x, &pb, beta()))?;
    row("ACON-B", label, x.len(), fwd, bwd);

    let gen = acon::ChannelGen::<f32>::init(c, 16, true, 3)?;
    let mg = acon::MetaGen::Channel(&gen);
    let fwd = time(|| acon::meta_acon_c_forward(shape, x, &p.p1, &p.p2, mg))?;
    let (_, saved) = acon::meta_acon_c_forward(shape, x, &p.p1, &p.p2, mg)?;
    let bwd = time(|| acon::meta_acon_c_backward(shape, dy, x, &p.p1, &p.p2, mg, &saved))?;
    row("meta-ACON-C (channel-wise G)", label, x.len(), fwd, bwd);

    let fwd = time(|| acon::meta_acon_c_forward(shape, x, &p.p1, &p.p2, acon::MetaGen::Pixel))?;
    let (_, saved) = acon::meta_acon_c_forward(shape, x, &p.p1, &p.p2, acon::MetaGen::Pixel)?;
    let bwd = time(|| {
        acon::meta_acon_c_backward(shape, dy, x, &p.p1, &p.p2, acon::MetaGen::Pixel, &saved)
    })?;
    row("meta-ACON-C (pixel-wise)", label, x.len(), fwd, bwd);
    Ok(())
}
