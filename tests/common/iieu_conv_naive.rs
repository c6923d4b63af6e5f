//! Naive f64 pieces for the IieuConv2d tests: ψ (none, bias, affine, BatchNorm train /
//! eval) forward and backward by plain loops, and the direct convolution's backward.
//! Included by `iieu_conv_grad` and `iieu_conv_misc` via `#[path]`.
#![allow(dead_code)]

use activation_kernels::cpu::iieu_conv::{BatchNorm, Psi};
use activation_kernels::Conv2dGeometry;
use rand::rngs::SmallRng;
use rand::Rng;

use super::naive::tap;

/// Which ψ a case uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    None,
    Bias,
    Affine,
    BnTrain,
    BnEval,
}

pub const KINDS: [Kind; 5] = [
    Kind::None,
    Kind::Bias,
    Kind::Affine,
    Kind::BnTrain,
    Kind::BnEval,
];

fn signed(r: &mut SmallRng, o: usize) -> Vec<f64> {
    (0..o)
        .map(|_| {
            let m: f64 = r.gen_range(0.5..2.0);
            if r.gen_bool(0.5) {
                m
            } else {
                -m
            }
        })
        .collect()
}

fn unif(r: &mut SmallRng, o: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..o).map(|_| r.gen_range(lo..hi)).collect()
}

/// Random ψ parameters (non-init values, so every gradient is exercised).
pub fn make_psi(kind: Kind, o: usize, r: &mut SmallRng) -> Psi<f64> {
    match kind {
        Kind::None => Psi::None,
        Kind::Bias => Psi::Bias(unif(r, o, -0.5, 0.5)),
        Kind::Affine => Psi::Affine {
            scale: signed(r, o),
            shift: unif(r, o, -0.5, 0.5),
        },
        Kind::BnTrain | Kind::BnEval => Psi::BatchNorm(BatchNorm {
            weight: signed(r, o),
            bias: unif(r, o, -0.5, 0.5),
            running_mean: unif(r, o, -0.5, 0.5),
            running_var: unif(r, o, 0.5, 2.0),
            momentum: 0.1,
            eps: 1e-5,
            training: kind == Kind::BnTrain,
        }),
    }
}

/// Per-channel `(mean, biased var)` over `N·plane` values of `c` `(N, O, plane)`.
pub fn batch_stats(c: &[f64], n: usize, o: usize, plane: usize) -> (Vec<f64>, Vec<f64>) {
    let m = (n * plane) as f64;
    let vals =
        |ch: usize| (0..n).flat_map(move |s| (0..plane).map(move |k| (s * o + ch) * plane + k));
    let mean: Vec<f64> = (0..o)
        .map(|ch| vals(ch).map(|i| c[i]).sum::<f64>() / m)
        .collect();
    let var = (0..o)
        .map(|ch| vals(ch).map(|i| (c[i] - mean[ch]).powi(2)).sum::<f64>() / m)
        .collect();
    (mean, var)
}

/// `x = ψ(c)` by the textbook formulas.
pub fn psi_fwd(psi: &Psi<f64>, c: &[f64], n: usize, o: usize, plane: usize) -> Vec<f64> {
    let ch = |i: usize| (i / plane) % o;
    match psi {
        Psi::None => c.to_vec(),
        Psi::Bias(b) => c.iter().enumerate().map(|(i, v)| v + b[ch(i)]).collect(),
        Psi::Affine { scale, shift } => c
            .iter()
            .enumerate()
            .map(|(i, v)| scale[ch(i)] * v + shift[ch(i)])
            .collect(),
        Psi::BatchNorm(bn) => {
            let (mean, var) = if bn.training {
                batch_stats(c, n, o, plane)
            } else {
                (bn.running_mean.clone(), bn.running_var.clone())
            };
            c.iter()
                .enumerate()
                .map(|(i, v)| {
                    let k = ch(i);
                    bn.weight[k] * (v - mean[k]) / (var[k] + bn.eps).sqrt() + bn.bias[k]
                })
                .collect()
        }
    }
}

/// ψ backward: `(dc, d_scale, d_shift)` from `dx`.
pub fn psi_bwd(
    psi: &Psi<f64>,
    c: &[f64],
    dx: &[f64],
    n: usize,
    o: usize,
    plane: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let ch = |i: usize| (i / plane) % o;
    let mut dsh = vec![0.0; o];
    for (i, g) in dx.iter().enumerate() {
        dsh[ch(i)] += g;
    }
    match psi {
        Psi::None => (dx.to_vec(), vec![], vec![]),
        Psi::Bias(_) => (dx.to_vec(), vec![], dsh),
        Psi::Affine { scale, .. } => {
            let mut dsc = vec![0.0; o];
            for (i, g) in dx.iter().enumerate() {
                dsc[ch(i)] += g * c[i];
            }
            let dc = dx
                .iter()
                .enumerate()
                .map(|(i, g)| g * scale[ch(i)])
                .collect();
            (dc, dsc, dsh)
        }
        Psi::BatchNorm(bn) => {
            let (mean, var) = if bn.training {
                batch_stats(c, n, o, plane)
            } else {
                (bn.running_mean.clone(), bn.running_var.clone())
            };
            let rstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + bn.eps).sqrt()).collect();
            let xh: Vec<f64> = c
                .iter()
                .enumerate()
                .map(|(i, v)| (v - mean[ch(i)]) * rstd[ch(i)])
                .collect();
            let mut dsc = vec![0.0; o];
            for (i, g) in dx.iter().enumerate() {
                dsc[ch(i)] += g * xh[i];
            }
            let m = (n * plane) as f64;
            let dc = dx
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    let k = ch(i);
                    let f = bn.weight[k] * rstd[k];
                    if bn.training {
                        f * (g - dsh[k] / m - xh[i] * dsc[k] / m)
                    } else {
                        f * g
                    }
                })
                .collect();
            (dc, dsc, dsh)
        }
    }
}

/// Backward of the direct convolution: `(dx_pre, dW)` from `dc` `(N, O, H', W')`.
pub fn conv_bwd(g: &Conv2dGeometry, x_pre: &[f64], w: &[f64], dc: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (oh, ow) = g.validate().unwrap();
    let (cg, og) = (g.c_in / g.groups, g.c_out / g.groups);
    let mut dx = vec![0.0; x_pre.len()];
    let mut dw = vec![0.0; w.len()];
    for n in 0..g.n {
        for o in 0..g.c_out {
            let grp = o / og;
            for ho in 0..oh {
                for wo in 0..ow {
                    let gy = dc[((n * g.c_out + o) * oh + ho) * ow + wo];
                    for cl in 0..cg {
                        let c = grp * cg + cl;
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                let hi = tap(ho, i, g.stride.0, g.padding.0, g.dilation.0, g.h);
                                let wi = tap(wo, j, g.stride.1, g.padding.1, g.dilation.1, g.w);
                                if let (Some(hi), Some(wi)) = (hi, wi) {
                                    let xi = ((n * g.c_in + c) * g.h + hi) * g.w + wi;
                                    let wk = ((o * cg + cl) * g.kh + i) * g.kw + j;
                                    dx[xi] += gy * w[wk];
                                    dw[wk] += gy * x_pre[xi];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    (dx, dw)
}
