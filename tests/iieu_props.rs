//! IIEU-B properties: norms against naive loops, forward against the naive reference on
//! random geometries, adjuster continuity and tie rule, scale invariance of term-S,
//! zero norms, f32 vs f64 agreement and determinism.

mod common;
#[path = "common/iieu_naive.rs"]
mod naive;

use activation_kernels::cpu::iieu::{
    backward, filter_inv_norm, forward, patch_inv_norm, IieuConfig, IieuGrads, IieuParams,
    PatchNorm, EPS,
};
use activation_kernels::Conv2dGeometry;
use approx::{abs_diff_eq, assert_abs_diff_eq};
use common::{assert_close, randn, rng, uniform};
use rand::rngs::SmallRng;
use rand::Rng;

const MODES: [PatchNorm; 2] = [PatchNorm::PerGroup, PatchNorm::AllChannels];

/// A random valid geometry (rejection sampling over small shapes).
fn random_geometry(r: &mut SmallRng) -> Conv2dGeometry {
    loop {
        let g = r.gen_range(1..=3);
        let geo = Conv2dGeometry::new(
            r.gen_range(1..=2),
            g * r.gen_range(1..=3),
            r.gen_range(1..=9),
            r.gen_range(1..=9),
            g * r.gen_range(1..=3),
            r.gen_range(1..=4),
            r.gen_range(1..=4),
        )
        .with_stride(r.gen_range(1..=3), r.gen_range(1..=3))
        .with_padding(r.gen_range(0..=2), r.gen_range(0..=2))
        .with_dilation(r.gen_range(1..=3), r.gen_range(1..=3))
        .with_groups(g);
        if geo.validate().is_ok() {
            return geo;
        }
    }
}

fn random_params(r: &mut SmallRng, c: usize) -> IieuParams<f64> {
    IieuParams {
        ln_weight: uniform(r, c, -2.0, 2.0),
        ln_bias: uniform(r, c, -0.5, 0.5),
        eta: uniform(r, c, -0.2, 1.0),
    }
}

#[test]
fn patch_and_filter_norms_match_naive_loops() {
    let mut r = rng(100);
    for _ in 0..60 {
        let geo = random_geometry(&mut r);
        let x_pre = randn(&mut r, geo.input_len());
        let w = randn(&mut r, geo.weight_len());
        for mode in MODES {
            let cfg = IieuConfig::new(geo).with_patch_norm(mode);
            let rx = patch_inv_norm(&cfg, &x_pre).unwrap();
            let want: Vec<f64> = naive::patch_norm(&cfg, &x_pre)
                .iter()
                .map(|n| 1.0 / (n + EPS))
                .collect();
            assert_close(&format!("r_x {mode:?} {geo:?}"), &rx, &want, 0.0, 1e-12);
        }
        let rw = filter_inv_norm(&IieuConfig::new(geo), &w).unwrap();
        let want: Vec<f64> = naive::filter_norm(&geo, &w)
            .iter()
            .map(|n| 1.0 / (n + EPS))
            .collect();
        assert_close("r_w", &rw, &want, 0.0, 1e-12);
    }
}

#[test]
fn patch_norm_hand_example() {
    // 3×3 image of ones, 2×2 kernel, padding 1, stride 2 → 2×2 windows with rows
    // {-1,0}/{1,2} and cols {-1,0}/{1,2}: in-image taps 1, 2, 2, 4 → ‖P‖ = 1, √2, √2, 2.
    let geo = Conv2dGeometry::new(1, 1, 3, 3, 1, 2, 2)
        .with_stride(2, 2)
        .with_padding(1, 1);
    let x_pre = vec![1.0f64; 9];
    let want: Vec<f64> = [1.0, 2f64.sqrt(), 2f64.sqrt(), 2.0]
        .iter()
        .map(|n| 1.0 / (n + EPS))
        .collect();
    let rx = patch_inv_norm(&IieuConfig::new(geo), &x_pre).unwrap();
    assert_close("2x2", &rx, &want, 0.0, 1e-15);
    // Dilation 2, padding 1, stride 2 on a 4×4 image → 2×2 output. Channel 0 is ones
    // except x[0,0,3,3] = 3, channel 1 is all twos. Dilated taps: rows/cols {-1,1} for
    // output 0 and {1,3} for output 1; undilated (AllChannels): {-1,0} and {1,2}.
    // So (1,1) sees (3,3) only when dilated.
    let geo = Conv2dGeometry::new(1, 2, 4, 4, 2, 2, 2)
        .with_stride(2, 2)
        .with_padding(1, 1)
        .with_dilation(2, 2);
    assert_eq!(geo.validate().unwrap(), (2, 2));
    let mut x_pre: Vec<f64> = (0..32).map(|i| if i < 16 { 1.0 } else { 2.0 }).collect();
    x_pre[15] = 3.0;
    let inv = |sq: &[f64]| -> Vec<f64> { sq.iter().map(|q| 1.0 / (q.sqrt() + EPS)).collect() };
    // PerGroup, one group of both channels: taps 1, 2, 2, 4 with 1 + 4 per tap, +8 at (3,3).
    let rx = patch_inv_norm(&IieuConfig::new(geo), &x_pre).unwrap();
    assert_close("dilated", &rx, &inv(&[5.0, 10.0, 10.0, 28.0]), 0.0, 1e-15);
    // PerGroup with 2 groups: one plane per channel.
    let geo_g = geo.with_groups(2);
    let rx = patch_inv_norm(&IieuConfig::new(geo_g), &x_pre).unwrap();
    let want = inv(&[1.0, 2.0, 2.0, 12.0, 4.0, 8.0, 8.0, 16.0]);
    assert_close("dilated groups", &rx, &want, 0.0, 1e-15);
    // AllChannels: both channels even with groups = 2, undilated taps, one plane.
    let cfg = IieuConfig::new(geo_g).with_patch_norm(PatchNorm::AllChannels);
    let rx = patch_inv_norm(&cfg, &x_pre).unwrap();
    assert_close(
        "all channels",
        &rx,
        &inv(&[5.0, 10.0, 10.0, 20.0]),
        0.0,
        1e-15,
    );
}

#[test]
fn forward_matches_naive_on_random_geometries() {
    let mut r = rng(200);
    for _ in 0..40 {
        let geo = random_geometry(&mut r);
        let (oh, ow) = geo.validate().unwrap();
        let x_pre = randn(&mut r, geo.input_len());
        let w = randn(&mut r, geo.weight_len());
        let x = randn(&mut r, geo.n * geo.c_out * oh * ow);
        let p = random_params(&mut r, geo.c_out);
        for mode in MODES {
            let cfg = IieuConfig::new(geo).with_patch_norm(mode);
            let (y, saved) = forward(&cfg, &x, &x_pre, &w, &p).unwrap();
            let rho = naive::rho(&cfg, &x, &x_pre, &w, &p.ln_weight, &p.ln_bias);
            let want = naive::adjust(&rho, &x, &p.eta, oh * ow);
            // y is continuous in ρ̂, so rounding-level ρ̂ differences at a branch are harmless.
            assert_close(&format!("y {mode:?} {geo:?}"), &y, &want, 1e-12, 1e-10);
            // Backward runs on every geometry and gives finite values.
            let dy = randn(&mut r, y.len());
            let g = backward(&cfg, &dy, &x, &x_pre, &w, &p, &saved).unwrap();
            for v in [
                &g.dx,
                &g.dx_pre,
                &g.dw,
                &g.d_ln_weight,
                &g.d_ln_bias,
                &g.d_eta,
            ] {
                assert!(v.iter().all(|a| a.is_finite()));
            }
        }
    }
}

#[test]
fn adjuster_is_continuous_at_eta() {
    // η just above ρ̂ (lower branch) and at/just below ρ̂ (upper branch) give the same y
    // up to O(δ)·|x|; a discontinuous adjuster would differ by |ρ̂ − 1|·|x|.
    let mut r = rng(300);
    for _ in 0..20 {
        let geo = random_geometry(&mut r);
        let (oh, ow) = geo.validate().unwrap();
        let x_pre = randn(&mut r, geo.input_len());
        let w = randn(&mut r, geo.weight_len());
        let x = randn(&mut r, geo.n * geo.c_out * oh * ow);
        let mut p = random_params(&mut r, geo.c_out);
        let cfg = IieuConfig::new(geo);
        let rho = naive::rho(&cfg, &x, &x_pre, &w, &p.ln_weight, &p.ln_bias);
        let e = r.gen_range(0..x.len());
        let o = (e / (oh * ow)) % geo.c_out;
        let delta = 1e-7;
        let mut ys = Vec::new();
        for eta in [rho[e] - delta, rho[e], rho[e] + delta] {
            p.eta[o] = eta;
            let (y, _) = forward(&cfg, &x, &x_pre, &w, &p).unwrap();
            ys.push(y[e]);
        }
        // dy/dη on the lower branch is x·exp(ρ̂−η)(1−η) ≈ (1−ρ̂)·x, so the two sides
        // differ by O(δ·(1+|ρ̂|)·|x|); a jump would be |ρ̂ − 1|·|x| ≫ that.
        let tol = 4.0 * delta * x[e].abs() * (1.0 + rho[e].abs()) + 1e-14 * (rho[e] * x[e]).abs();
        assert!(abs_diff_eq!(ys[0], ys[2], epsilon = tol), "{ys:?}");
        assert!(abs_diff_eq!(ys[1], rho[e] * x[e], epsilon = tol), "{ys:?}");
        assert!(abs_diff_eq!(ys[2], rho[e] * x[e], epsilon = tol), "{ys:?}");
    }
}

#[test]
fn tie_takes_the_upper_branch() {
    // One element (1×1 conv on a 1×1 image, O = 1): ρ̂ = x·r_w·r_x + ν with the saved
    // r_w, r_x, ν; set η = ρ̂ exactly. Upper branch ⇒ dη = 0 and dx = dy·(ρ̂ + x·r_w·r_x)
    // (dm = 0 since LayerNorm over one channel is constant). The lower branch would give
    // dη = dy·x·(1−η) ≠ 0.
    let geo = Conv2dGeometry::new(1, 2, 1, 1, 1, 1, 1);
    let cfg = IieuConfig::new(geo);
    let (x, x_pre, w) = (vec![0.7f64], vec![0.3, -1.1], vec![0.9, 0.4]);
    let mut p = IieuParams::<f64>::init(1);
    p.ln_bias[0] = 0.2;
    let (_, saved) = forward(&cfg, &x, &x_pre, &w, &p).unwrap();
    let s = x[0] * saved.r_w()[0] * saved.r_x()[0];
    let rho = s + saved.nu()[0];
    p.eta[0] = rho;
    let (y, saved) = forward(&cfg, &x, &x_pre, &w, &p).unwrap();
    assert_eq!(y[0], rho * x[0]);
    let dy = vec![1.3];
    let g = backward(&cfg, &dy, &x, &x_pre, &w, &p, &saved).unwrap();
    assert_eq!(g.d_eta[0], 0.0);
    assert_abs_diff_eq!(g.dx[0], dy[0] * (rho + s), epsilon = 1e-14);
}

/// s = x·r_w·r_x from the public norm functions, with x = conv(x_pre, W).
fn term_s(cfg: &IieuConfig, x_pre: &[f64], w: &[f64]) -> Vec<f64> {
    let geo = &cfg.geometry;
    let (oh, ow) = geo.validate().unwrap();
    let plane = oh * ow;
    let x = naive::conv(geo, x_pre, w);
    let rw = filter_inv_norm(cfg, w).unwrap();
    let rx = patch_inv_norm(cfg, x_pre).unwrap();
    let gp = naive::patch_groups(cfg);
    let oper = geo.c_out / gp;
    x.iter()
        .enumerate()
        .map(|(i, &xv)| {
            let (n, o, k) = (i / (geo.c_out * plane), (i / plane) % geo.c_out, i % plane);
            xv * rw[o] * rx[(n * gp + o / oper) * plane + k]
        })
        .collect()
}

/// Per element of x: min(‖P‖, ‖W[o]‖) from the naive loops.
fn min_norms(cfg: &IieuConfig, x_pre: &[f64], w: &[f64]) -> Vec<f64> {
    let geo = &cfg.geometry;
    let (oh, ow) = geo.validate().unwrap();
    let plane = oh * ow;
    let pn = naive::patch_norm(cfg, x_pre);
    let wn = naive::filter_norm(geo, w);
    let gp = naive::patch_groups(cfg);
    let oper = geo.c_out / gp;
    (0..geo.n * geo.c_out * plane)
        .map(|i| {
            let (n, o, k) = (i / (geo.c_out * plane), (i / plane) % geo.c_out, i % plane);
            pn[(n * gp + o / oper) * plane + k].min(wn[o])
        })
        .collect()
}

/// `|s' − s| ≤ 10·EPS/min‖v‖·|s| + 1e-13` (windows with ‖P‖ = 0 have x = 0 = s = s').
fn check_invariant(name: &str, scaled: &[f64], s: &[f64], nmin: &[f64]) {
    for ((a, b), &nm) in scaled.iter().zip(s).zip(nmin) {
        if nm == 0.0 {
            assert!(
                *a == 0.0 && *b == 0.0,
                "{name}: {a} vs {b} on an empty window"
            );
        } else {
            let tol = 10.0 * EPS / nm * b.abs() + 1e-13;
            assert!(
                abs_diff_eq!(a, b, epsilon = tol),
                "{name}: {a} vs {b} (norm {nm})"
            );
        }
    }
}

#[test]
fn term_s_is_scale_invariant_and_a_cosine() {
    // Scaling W (or x_pre) by c > 0 scales x = conv(x_pre, W) by c and r_w (or r_x) by
    // 1/c up to the EPS terms, so s is unchanged up to a relative EPS·|1 − 1/c|/‖v‖
    // (≤ 10·EPS/‖v‖ for c ∈ [0.1, 10]; see `check_invariant`). With PerGroup, s is the cosine of W[o] and its own patch:
    // |s| ≤ 1 (Cauchy–Schwarz) — this also checks the patch matches the conv's taps.
    let mut r = rng(400);
    for _ in 0..30 {
        let geo = random_geometry(&mut r);
        let x_pre = randn(&mut r, geo.input_len());
        let w = randn(&mut r, geo.weight_len());
        let c: f64 = r.gen_range(0.1..10.0);
        for mode in MODES {
            let cfg = IieuConfig::new(geo).with_patch_norm(mode);
            let s = term_s(&cfg, &x_pre, &w);
            let wc: Vec<f64> = w.iter().map(|v| c * v).collect();
            let xc: Vec<f64> = x_pre.iter().map(|v| c * v).collect();
            let undilated = geo.dilation == (1, 1);
            if mode == PatchNorm::AllChannels && !undilated {
                // Documented AllChannels limitation: an undilated window can miss every
                // in-image tap of the dilated conv window (r_x = 1/EPS while x ≠ 0), so
                // neither invariance nor |s| ≤ 1 holds there.
                continue;
            }
            let nmin = min_norms(&cfg, &x_pre, &w);
            check_invariant("s(cW)", &term_s(&cfg, &x_pre, &wc), &s, &nmin);
            check_invariant("s(c·x_pre)", &term_s(&cfg, &xc, &w), &s, &nmin);
            // AllChannels ⊇ the group's patch when undilated, so |s| ≤ 1 there too.
            assert!(s.iter().all(|v| v.abs() <= 1.0 + 1e-12), "{mode:?} {geo:?}");
        }
    }
}

#[test]
fn zero_norms_give_finite_gradients() {
    // x_pre = 0 and a zero filter: r = 1/EPS, ∂r/∂v := 0 ⇒ dx_pre = 0, dW[zero filter] = 0.
    let geo = Conv2dGeometry::new(2, 2, 4, 5, 3, 3, 3).with_padding(1, 1);
    let (oh, ow) = geo.validate().unwrap();
    let mut r = rng(500);
    let x_pre = vec![0.0f64; geo.input_len()];
    let mut w = randn(&mut r, geo.weight_len());
    w[..geo.weight_len() / 3].fill(0.0);
    let x = uniform(&mut r, geo.n * geo.c_out * oh * ow, -1e-9, 1e-9);
    let p = random_params(&mut r, geo.c_out);
    for mode in MODES {
        let cfg = IieuConfig::new(geo).with_patch_norm(mode);
        let (y, saved) = forward(&cfg, &x, &x_pre, &w, &p).unwrap();
        assert!(y.iter().all(|v| v.is_finite()));
        assert!(saved.r_x().iter().all(|&v| v == 1.0 / EPS));
        let dy = randn(&mut r, y.len());
        let g = backward(&cfg, &dy, &x, &x_pre, &w, &p, &saved).unwrap();
        assert!(g.dx_pre.iter().all(|&v| v == 0.0));
        assert!(g.dw[..geo.weight_len() / 3].iter().all(|&v| v == 0.0));
        for v in [&g.dx, &g.dw, &g.d_ln_weight, &g.d_ln_bias, &g.d_eta] {
            assert!(v.iter().all(|a| a.is_finite()));
        }
    }
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&a| a as f32).collect()
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

/// `max|a − b| ≤ tol · max|b|` (errors relative to the tensor's scale); every value
/// must be finite (`f64::max` skips NaN, so the fold alone would let a NaN through).
fn assert_close_scaled(name: &str, a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{name}: length");
    if let Some(i) = (0..a.len()).find(|&i| !(a[i].is_finite() && b[i].is_finite())) {
        panic!("{name}[{i}]: non-finite: f32 {} vs f64 {}", a[i], b[i]);
    }
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    // Every element within tol·scale, i.e. approx's slice comparison with that epsilon.
    if !abs_diff_eq!(a, b, epsilon = tol * scale) {
        let err = a
            .iter()
            .zip(b)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
        panic!("{name}: max error {err} > {tol}·{scale}");
    }
}

#[test]
fn f32_agrees_with_f64() {
    // Same (f32-representable) inputs in both precisions. f32 rounds each elementwise op
    // at ~6e-8 relative and chains ~10 of them (~6e-7); reductions are in f64 in both.
    // We allow 1e-6 of each tensor's max magnitude (dx_pre/dW sum many terms of both
    // signs, so the error is measured against the tensor scale, not per element);
    // measured worst over both modes and all seven tensors: 8.4e-8 of the scale (y,
    // all-channels mode), a 12× margin. η is chosen with
    // every ρ̂ ≥ 1e-3 away, so no element changes adjuster branch between precisions
    // (the gradient jumps there).
    let geo = Conv2dGeometry::new(2, 16, 15, 13, 16, 3, 3).with_padding(1, 1);
    let (oh, ow) = geo.validate().unwrap();
    let plane = oh * ow;
    let mut r = rng(600);
    let x_pre = widen(&to_f32(&randn(&mut r, geo.input_len())));
    let w = widen(&to_f32(&randn(&mut r, geo.weight_len())));
    let noise = randn(&mut r, geo.n * geo.c_out * plane);
    let x: Vec<f64> = naive::conv(&geo, &x_pre, &w)
        .iter()
        .zip(&noise)
        .map(|(a, b)| (a + 0.5 * b) as f32 as f64)
        .collect();
    let dy = widen(&to_f32(&randn(&mut r, x.len())));
    for mode in MODES {
        let cfg = IieuConfig::new(geo).with_patch_norm(mode);
        let gamma = widen(&to_f32(&uniform(&mut r, geo.c_out, -2.0, 2.0)));
        let beta = widen(&to_f32(&uniform(&mut r, geo.c_out, -0.5, 0.5)));
        let rho = naive::rho(&cfg, &x, &x_pre, &w, &gamma, &beta);
        let eta = widen(&to_f32(&naive::choose_eta(
            &rho, geo.n, geo.c_out, plane, 2e-3,
        )));
        let (lower, gap) = naive::branch_stats(&rho, &eta, plane);
        assert!(gap > 1e-3 && (0.2..=0.8).contains(&lower));
        let p64 = IieuParams {
            ln_weight: gamma,
            ln_bias: beta,
            eta,
        };
        let p32 = IieuParams {
            ln_weight: to_f32(&p64.ln_weight),
            ln_bias: to_f32(&p64.ln_bias),
            eta: to_f32(&p64.eta),
        };
        let (y64, s64) = forward(&cfg, &x, &x_pre, &w, &p64).unwrap();
        let g64 = backward(&cfg, &dy, &x, &x_pre, &w, &p64, &s64).unwrap();
        let (x32, xp32, w32, dy32) = (to_f32(&x), to_f32(&x_pre), to_f32(&w), to_f32(&dy));
        let (y32, s32) = forward(&cfg, &x32, &xp32, &w32, &p32).unwrap();
        let g32 = backward(&cfg, &dy32, &x32, &xp32, &w32, &p32, &s32).unwrap();
        let tol = 1e-6;
        assert_close_scaled("y", &widen(&y32), &y64, tol);
        assert_close_scaled("dx", &widen(&g32.dx), &g64.dx, tol);
        assert_close_scaled("dx_pre", &widen(&g32.dx_pre), &g64.dx_pre, tol);
        assert_close_scaled("dw", &widen(&g32.dw), &g64.dw, tol);
        assert_close_scaled("dγ", &widen(&g32.d_ln_weight), &g64.d_ln_weight, tol);
        assert_close_scaled("dβ", &widen(&g32.d_ln_bias), &g64.d_ln_bias, tol);
        assert_close_scaled("dη", &widen(&g32.d_eta), &g64.d_eta, tol);
    }
}

fn bits(g: &IieuGrads<f32>, y: &[f32]) -> Vec<u32> {
    [
        y,
        &g.dx[..],
        &g.dx_pre[..],
        &g.dw[..],
        &g.d_ln_weight[..],
        &g.d_ln_bias[..],
        &g.d_eta[..],
    ]
    .iter()
    .flat_map(|v| v.iter().map(|a| a.to_bits()))
    .collect()
}

#[test]
fn deterministic_across_runs_and_thread_counts() {
    let geo = Conv2dGeometry::new(4, 32, 28, 28, 32, 3, 3).with_padding(1, 1);
    let (oh, ow) = geo.validate().unwrap();
    let mut r = rng(700);
    let x_pre = to_f32(&randn(&mut r, geo.input_len()));
    let w = to_f32(&randn(&mut r, geo.weight_len()));
    let x = to_f32(&uniform(&mut r, geo.n * geo.c_out * oh * ow, -3.0, 3.0));
    let dy = to_f32(&randn(&mut r, x.len()));
    let p = IieuParams {
        ln_weight: to_f32(&uniform(&mut r, geo.c_out, -2.0, 2.0)),
        ln_bias: to_f32(&uniform(&mut r, geo.c_out, -0.5, 0.5)),
        eta: to_f32(&uniform(&mut r, geo.c_out, 0.0, 0.5)),
    };
    for mode in MODES {
        let cfg = IieuConfig::new(geo).with_patch_norm(mode);
        let run = || {
            let (y, s) = forward(&cfg, &x, &x_pre, &w, &p).unwrap();
            let g = backward(&cfg, &dy, &x, &x_pre, &w, &p, &s).unwrap();
            bits(&g, &y)
        };
        let first = run();
        assert_eq!(first, run());
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            assert_eq!(first, pool.install(run), "{threads} threads");
        }
    }
}
