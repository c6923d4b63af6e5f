//! Naive, loop-by-loop f64 reference of IIEU-B written from SPEC §1.1–1.3 (direct
//! convolution, explicit patch taps, explicit LayerNorm), independent of the crate's
//! implementation. Included by `iieu_grad`, `iieu_props` and `parity_iieu` via `#[path]`
//! (it lives under `common/` so that cargo does not build it as a test target of its own).
#![allow(dead_code)]

use activation_kernels::cpu::iieu::{IieuConfig, PatchNorm, EPS, EPS_LN};
use activation_kernels::Conv2dGeometry;

/// Input index of tap `i` of output `o` along one axis, if inside the image.
pub fn tap(o: usize, i: usize, s: usize, p: usize, d: usize, len: usize) -> Option<usize> {
    let t = (o * s + i * d) as isize - p as isize;
    if t >= 0 && (t as usize) < len {
        Some(t as usize)
    } else {
        None
    }
}

/// Direct convolution `x = conv(x_pre, W)`, `(N, O, H', W')`.
pub fn conv(g: &Conv2dGeometry, x_pre: &[f64], w: &[f64]) -> Vec<f64> {
    let (oh, ow) = g.validate().unwrap();
    let (cg, og) = (g.c_in / g.groups, g.c_out / g.groups);
    let mut out = vec![0.0; g.n * g.c_out * oh * ow];
    for n in 0..g.n {
        for o in 0..g.c_out {
            let grp = o / og;
            for ho in 0..oh {
                for wo in 0..ow {
                    let mut acc = 0.0;
                    for cl in 0..cg {
                        let c = grp * cg + cl;
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                let hi = tap(ho, i, g.stride.0, g.padding.0, g.dilation.0, g.h);
                                let wi = tap(wo, j, g.stride.1, g.padding.1, g.dilation.1, g.w);
                                if let (Some(hi), Some(wi)) = (hi, wi) {
                                    acc += x_pre[((n * g.c_in + c) * g.h + hi) * g.w + wi]
                                        * w[((o * cg + cl) * g.kh + i) * g.kw + j];
                                }
                            }
                        }
                    }
                    out[((n * g.c_out + o) * oh + ho) * ow + wo] = acc;
                }
            }
        }
    }
    out
}

/// Number of patch planes per sample G'.
pub fn patch_groups(cfg: &IieuConfig) -> usize {
    match cfg.patch_norm {
        PatchNorm::PerGroup => cfg.geometry.groups,
        PatchNorm::AllChannels => 1,
    }
}

/// `‖P‖` by explicit loops over the patch taps, `(N, G', H', W')`.
pub fn patch_norm(cfg: &IieuConfig, x_pre: &[f64]) -> Vec<f64> {
    let g = &cfg.geometry;
    let (oh, ow) = g.validate().unwrap();
    let gp = patch_groups(cfg);
    let cper = g.c_in / gp;
    let (dh, dw) = match cfg.patch_norm {
        PatchNorm::PerGroup => g.dilation,
        PatchNorm::AllChannels => (1, 1),
    };
    let mut out = vec![0.0; g.n * gp * oh * ow];
    for n in 0..g.n {
        for grp in 0..gp {
            for ho in 0..oh {
                for wo in 0..ow {
                    let mut acc = 0.0;
                    for c in grp * cper..(grp + 1) * cper {
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                let hi = tap(ho, i, g.stride.0, g.padding.0, dh, g.h);
                                let wi = tap(wo, j, g.stride.1, g.padding.1, dw, g.w);
                                if let (Some(hi), Some(wi)) = (hi, wi) {
                                    let v = x_pre[((n * g.c_in + c) * g.h + hi) * g.w + wi];
                                    acc += v * v;
                                }
                            }
                        }
                    }
                    out[((n * gp + grp) * oh + ho) * ow + wo] = acc.sqrt();
                }
            }
        }
    }
    out
}

/// `‖W[o]‖` per filter.
pub fn filter_norm(g: &Conv2dGeometry, w: &[f64]) -> Vec<f64> {
    let per = g.c_in / g.groups * g.kh * g.kw;
    w.chunks(per)
        .map(|f| f.iter().map(|v| v * v).sum::<f64>().sqrt())
        .collect()
}

/// `ρ̂ = x·r_w·r_x + ν`, `(N, O, H', W')`.
pub fn rho(
    cfg: &IieuConfig,
    x: &[f64],
    x_pre: &[f64],
    w: &[f64],
    gamma: &[f64],
    beta: &[f64],
) -> Vec<f64> {
    let g = &cfg.geometry;
    let (oh, ow) = g.validate().unwrap();
    let p = oh * ow;
    let (no, nc) = (g.n, g.c_out);
    let gp = patch_groups(cfg);
    let oper = nc / gp;
    let pn = patch_norm(cfg, x_pre);
    let fnm = filter_norm(g, w);
    let mut out = vec![0.0; x.len()];
    for n in 0..no {
        let m: Vec<f64> = (0..nc)
            .map(|o| {
                x[(n * nc + o) * p..(n * nc + o + 1) * p]
                    .iter()
                    .sum::<f64>()
                    / p as f64
            })
            .collect();
        let mu = m.iter().sum::<f64>() / nc as f64;
        let var = m.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / nc as f64;
        for o in 0..nc {
            let mh = (m[o] - mu) / (var + EPS_LN).sqrt();
            let nu = 1.0 / (1.0 + (-(gamma[o] * mh + beta[o])).exp());
            let grp = o / oper;
            for k in 0..p {
                let rx = 1.0 / (pn[(n * gp + grp) * p + k] + EPS);
                let rw = 1.0 / (fnm[o] + EPS);
                let i = (n * nc + o) * p + k;
                out[i] = x[i] * rw * rx + nu;
            }
        }
    }
    out
}

/// `y = ς(ρ̂)·x` from a precomputed `ρ̂`.
pub fn adjust(rho: &[f64], x: &[f64], eta: &[f64], plane: usize) -> Vec<f64> {
    let c = eta.len();
    rho.iter()
        .zip(x)
        .enumerate()
        .map(|(i, (&r, &xv))| {
            let e = eta[(i / plane) % c];
            if r >= e {
                r * xv
            } else {
                e * (r - e).exp() * xv
            }
        })
        .collect()
}

/// Per-channel threshold η[o] in a gap of the channel's ρ̂ values at least `2·margin`
/// wide, as close to the median as possible (so both adjuster branches are well
/// populated and every ρ̂ is at least `margin` away from η).
pub fn choose_eta(rho: &[f64], n: usize, c: usize, plane: usize, margin: f64) -> Vec<f64> {
    (0..c)
        .map(|o| {
            let mut v: Vec<f64> = (0..n)
                .flat_map(|s| rho[(s * c + o) * plane..(s * c + o + 1) * plane].to_vec())
                .collect();
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let mid = v.len() / 2;
            let mut best: Option<(usize, f64)> = None;
            for k in 1..v.len() {
                if v[k] - v[k - 1] > 2.0 * margin {
                    let dist = (k as isize - mid as isize).unsigned_abs();
                    if best.map_or(true, |(bd, _)| dist < bd) {
                        best = Some((dist, 0.5 * (v[k] + v[k - 1])));
                    }
                }
            }
            best.expect("no gap wide enough for η").1
        })
        .collect()
}

/// Fraction of elements on the lower branch and the smallest |ρ̂ − η|.
pub fn branch_stats(rho: &[f64], eta: &[f64], plane: usize) -> (f64, f64) {
    let c = eta.len();
    let mut lower = 0usize;
    let mut min_gap = f64::INFINITY;
    for (i, &r) in rho.iter().enumerate() {
        let e = eta[(i / plane) % c];
        if r < e {
            lower += 1;
        }
        min_gap = min_gap.min((r - e).abs());
    }
    (lower as f64 / rho.len() as f64, min_gap)
}
