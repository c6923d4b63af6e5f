//! candle ops on candle's CUDA device (feature `candle-cuda`), run on the emulated
//! device (feature `emulate`: the test binary is linked against the emulated driver
//! and stub CUDA libraries, see build.rs) or, built without `emulate`, on the real
//! GPU (`scripts/gpu-pack.sh --with-candle`, then `scripts/gpu-check.sh`): forward (`cuda_fwd`) and backward (the
//! ops' `bwd`, which applies a CUDA backward op) of every op with a CUDA path,
//! f32 / f16 / bf16, ragged shapes, against the CPU ops in f64 on the same
//! dtype-rounded inputs; bad input is an `Err`.
//!
//! Only candle operations that run no candle kernel are used on the device:
//! host↔device copies (`Tensor::new`/`to_device`), views (`narrow`, `reshape`) and
//! our ops. A full `loss.backward()` also runs candle's own kernels (fill, add),
//! which the emulated device cannot run.
//!
//! Tolerance: an element passes if `|got − ref| ≤ u·|ref| + e·max|ref|` with `u`
//! the unit roundoff of the storage dtype (2^-24 f32, 2^-11 f16, 2^-8 bf16 — every
//! output and every packed gradient is rounded to storage once) and `e` the f32
//! arithmetic term: 1e-5 elementwise (f32 math and the `__expf` sigmoid, see
//! tests/parity_acon.rs; IIEU-B/IIEU-DC tensors: f32 norms, GAPs and LayerNorms, see
//! tests/parity_iieu.rs, tests/parity_iieu_dc.rs), 1e-4 for parameter gradients (f32
//! sums of up to N·S terms, through LayerNorm backwards for IIEU) and for meta-ACON-C
//! outputs whose β is σ of an f32 sum (layer-/channel-wise generators). Packed
//! parameter gradients are checked per parameter, each against its own scale.
//! meta-ACON-C `dx` in f16/bf16 is rounded twice (the generator's share is added to
//! the stored activation `dx`), the first time at the size of the whole tensor, hence
//! `u·max|ref|` on top.
//!
//! IIEU adjusters switch branch at `ρ̂ = η`; the data are fixed, and an element within
//! f32-vs-f64 distance (~1e-6) of η would show as a `dx` mismatch — none is, and both
//! branches are taken (the reference `dη` is non-zero).
#![cfg(feature = "candle-cuda")]

use activation_kernels::candle::cuda::{
    AconABwdOp, AconBBwdOp, AconCBwdOp, AiecLossBwdOp, IieuBBwdOp, IieuConvBwdOp, IieuDcBwdOp,
    MetaAconCBwdOp, MetaAconCGenBwdOp, TauBwdOp,
};
use activation_kernels::candle::ops::{
    AconAOp, AconBOp, AconCOp, AiecLossOp, IieuBOp, IieuDcOp, IieuOpts, MetaAconCGenOp,
    MetaAconCOp, MetaGenKind, TauOp,
};
use activation_kernels::candle::ops::{IieuConvOp, IieuConvPsiSpec};
use activation_kernels::candle::BetaShape;
use activation_kernels::cpu::aiec::{AiecConfig, Pool};
use activation_kernels::cpu::iieu::PatchNorm;
use activation_kernels::Layout;
use candle_core::{CustomOp1, CustomOp2, CustomOp3, DType, Device, Tensor};

const E_ELEM: f64 = 1e-5;
const E_RED: f64 = 1e-4;

fn dev() -> Device {
    #[cfg(feature = "emulate")]
    {
        activation_kernels::emu::install().expect("emulated device");
        assert!(
            !activation_kernels::cuda::real_driver_present(),
            "the emulator must not count as a real driver"
        );
    }
    Device::new_cuda(0)
        .expect("candle CudaDevice (emulated driver, or the real one without `emulate`)")
}

fn unit(dt: DType) -> f64 {
    match dt {
        DType::F32 => 2f64.powi(-24),
        DType::F16 => 2f64.powi(-11),
        _ => 2f64.powi(-8),
    }
}

/// Deterministic ragged test data in [-3, 3).
fn data(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 6.0 - 3.0
        })
        .collect()
}

/// `v` rounded to `dt` (via f32), as a tensor of `dt` on `device` and as exact f64
/// values on the CPU.
fn input(v: &[f64], dims: &[usize], dt: DType, device: &Device) -> (Tensor, Tensor) {
    let f: Vec<f32> = v.iter().map(|&a| a as f32).collect();
    let t = Tensor::from_vec(f, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap();
    let exact = t.to_dtype(DType::F64).unwrap();
    (t.to_device(device).unwrap(), exact)
}

fn host(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn check(name: &str, got: &[f64], want: &[f64], u: f64, e: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let m = want.iter().fold(0.0f64, |a, v| a.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = u * w.abs() + e * m + 1e-30;
        assert!(
            (g - w).abs() <= tol,
            "{name}[{i}]: got {g}, want {w} (|err| {} > tol {tol})",
            (g - w).abs()
        );
    }
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Ragged activation shapes in both layouts, with their channel count.
fn act_cases() -> Vec<(Vec<usize>, Layout, usize)> {
    vec![
        (vec![2, 3, 5, 7], Layout::Nchw, 3),
        (vec![3, 5], Layout::Nchw, 5),
        (vec![2, 9, 5], Layout::Nlc, 5),
        (vec![1, 33, 3], Layout::Nlc, 3),
    ]
}

/// Every β layout of the ACON ops (β as a tensor: per channel, per (sample,
/// channel), per sample).
const BETAS: [BetaShape; 3] = [
    BetaShape::PerChannel,
    BetaShape::PerSampleChannel,
    BetaShape::PerSample,
];

/// Elements of a β of layout `beta` for `n` samples and `c` channels.
fn beta_len(beta: BetaShape, n: usize, c: usize) -> usize {
    match beta {
        BetaShape::PerChannel => c,
        BetaShape::PerSampleChannel => n * c,
        BetaShape::PerSample => n,
    }
}

/// `n` test values made positive (β > 0): `|v| + 0.1`.
fn positive(n: usize, seed: u64) -> Vec<f64> {
    data(n, seed).iter().map(|b| b.abs() + 0.1).collect()
}

#[test]
fn device_opens_and_round_trips() {
    let d = dev();
    assert!(d.is_cuda());
    let t = Tensor::new(&[1f32, 2.0, 3.0], &d).unwrap();
    assert_eq!(
        t.to_device(&Device::Cpu).unwrap().to_vec1::<f32>().unwrap(),
        [1.0, 2.0, 3.0]
    );
}

#[test]
fn tau_forward_backward() {
    let d = dev();
    for dt in DTYPES {
        for dims in [vec![3usize, 5, 7], vec![1, 33], vec![2, 3, 1, 9]] {
            let n: usize = dims.iter().product();
            let (x, xc) = input(&data(n, 1), &dims, dt, &d);
            let (g, gc) = input(&data(n, 2), &dims, dt, &d);
            let op = TauOp { tau: 0.5 };
            let y = x.apply_op1_no_bwd(&op).unwrap();
            assert_eq!(y.dtype(), dt);
            let want = xc.apply_op1_no_bwd(&op).unwrap();
            // TAU is exact: every output is an input or 0.
            check("tau y", &host(&y), &host(&want), 0.0, 0.0);
            let dx = op.bwd(&x, &y, &g).unwrap().unwrap();
            let want = op.bwd(&xc, &want, &gc).unwrap().unwrap();
            assert_eq!(dx.dims(), &dims[..]);
            check("tau dx", &host(&dx), &host(&want), 0.0, 0.0);
            // The backward op directly too.
            let dx2 = x.apply_op2_no_bwd(&g, &TauBwdOp { tau: 0.5 }).unwrap();
            check("tau dx (op)", &host(&dx2), &host(&want), 0.0, 0.0);
        }
    }
}

#[test]
fn acon_c_forward_backward() {
    let d = dev();
    for dt in DTYPES {
        for (dims, layout) in [
            (vec![2usize, 3, 5, 7], Layout::Nchw),
            (vec![3, 5], Layout::Nchw),
            (vec![2, 9, 5], Layout::Nlc),
            (vec![1, 33, 3], Layout::Nlc),
        ] {
            let n: usize = dims.iter().product();
            let c = if layout == Layout::Nlc {
                dims[2]
            } else {
                dims[1]
            };
            let (x, xc) = input(&data(n, 3), &dims, dt, &d);
            let (g, gc) = input(&data(n, 5), &dims, dt, &d);
            for (bi, beta) in BETAS.into_iter().enumerate() {
                let blen = beta_len(beta, dims[0], c);
                let mut pv = data(2 * c + blen, 4 + bi as u64);
                for b in &mut pv[2 * c..] {
                    *b = b.abs() + 0.1; // β > 0
                }
                let plen = pv.len();
                let (p, pc) = input(&pv, &[plen], dt, &d);
                let op = AconCOp { layout, beta };
                let y = x.apply_op2_no_bwd(&p, &op).unwrap();
                assert_eq!((y.dtype(), y.dims()), (dt, &dims[..]));
                let yc = xc.apply_op2_no_bwd(&pc, &op).unwrap();
                let u = unit(dt);
                check(
                    &format!("acon_c y {dt:?} {dims:?}"),
                    &host(&y),
                    &host(&yc),
                    u,
                    E_ELEM,
                );
                let (dx, dp) = op.bwd(&x, &p, &y, &g).unwrap();
                let (dxc, dpc) = op.bwd(&xc, &pc, &yc, &gc).unwrap();
                let (dx, dp) = (dx.unwrap(), dp.unwrap());
                assert_eq!(dx.dims(), &dims[..]);
                assert_eq!(dp.dims(), &[plen]);
                check("acon_c dx", &host(&dx), &host(&dxc.unwrap()), u, E_ELEM);
                check("acon_c dp", &host(&dp), &host(&dpc.unwrap()), u, E_RED);
                let packed = x.apply_op3_no_bwd(&p, &g, &AconCBwdOp { fwd: op }).unwrap();
                assert_eq!(packed.dims(), &[n + plen]);
            }
        }
    }
}

#[test]
fn acon_a_forward_backward() {
    let d = dev();
    for dt in DTYPES {
        for (dims, layout, c) in act_cases() {
            let n: usize = dims.iter().product();
            let (x, xc) = input(&data(n, 6), &dims, dt, &d);
            let (g, gc) = input(&data(n, 8), &dims, dt, &d);
            for (bi, beta) in BETAS.into_iter().enumerate() {
                let blen = beta_len(beta, dims[0], c);
                let (b, bc) = input(&positive(blen, 7 + bi as u64), &[blen], dt, &d);
                let op = AconAOp { layout, beta };
                let y = x.apply_op2_no_bwd(&b, &op).unwrap();
                assert_eq!((y.dtype(), y.dims()), (dt, &dims[..]));
                let yc = xc.apply_op2_no_bwd(&bc, &op).unwrap();
                let u = unit(dt);
                let what = format!("acon_a {dt:?} {dims:?}");
                check(&format!("{what} y"), &host(&y), &host(&yc), u, E_ELEM);
                let (dx, db) = op.bwd(&x, &b, &y, &g).unwrap();
                let (dxc, dbc) = op.bwd(&xc, &bc, &yc, &gc).unwrap();
                let (dx, db) = (dx.unwrap(), db.unwrap());
                assert_eq!((dx.dims(), db.dims()), (&dims[..], &[blen][..]));
                check(
                    &format!("{what} dx"),
                    &host(&dx),
                    &host(&dxc.unwrap()),
                    u,
                    E_ELEM,
                );
                check(
                    &format!("{what} dbeta"),
                    &host(&db),
                    &host(&dbc.unwrap()),
                    u,
                    E_RED,
                );
                let packed = x.apply_op3_no_bwd(&b, &g, &AconABwdOp { fwd: op }).unwrap();
                assert_eq!(packed.dims(), &[n + blen]);
            }
        }
    }
}

#[test]
fn acon_b_forward_backward() {
    let d = dev();
    for dt in DTYPES {
        for (dims, layout, c) in act_cases() {
            let n: usize = dims.iter().product();
            let (x, xc) = input(&data(n, 9), &dims, dt, &d);
            let (g, gc) = input(&data(n, 12), &dims, dt, &d);
            for (bi, beta) in BETAS.into_iter().enumerate() {
                let blen = beta_len(beta, dims[0], c);
                let mut pv = data(c, 10);
                pv.extend(positive(blen, 11 + bi as u64));
                let plen = pv.len();
                let (p, pc) = input(&pv, &[plen], dt, &d);
                let op = AconBOp { layout, beta };
                let y = x.apply_op2_no_bwd(&p, &op).unwrap();
                assert_eq!((y.dtype(), y.dims()), (dt, &dims[..]));
                let yc = xc.apply_op2_no_bwd(&pc, &op).unwrap();
                let u = unit(dt);
                let what = format!("acon_b {dt:?} {dims:?}");
                check(&format!("{what} y"), &host(&y), &host(&yc), u, E_ELEM);
                let (dx, dp) = op.bwd(&x, &p, &y, &g).unwrap();
                let (dxc, dpc) = op.bwd(&xc, &pc, &yc, &gc).unwrap();
                let (dx, dp) = (dx.unwrap(), dp.unwrap());
                assert_eq!((dx.dims(), dp.dims()), (&dims[..], &[plen][..]));
                check(
                    &format!("{what} dx"),
                    &host(&dx),
                    &host(&dxc.unwrap()),
                    u,
                    E_ELEM,
                );
                check(
                    &format!("{what} dp"),
                    &host(&dp),
                    &host(&dpc.unwrap()),
                    u,
                    E_RED,
                );
                let packed = x.apply_op3_no_bwd(&p, &g, &AconBBwdOp { fwd: op }).unwrap();
                assert_eq!(packed.dims(), &[n + plen]);
            }
        }
    }
}

#[test]
fn meta_acon_c_layer_pixel_forward_backward() {
    let d = dev();
    for dt in DTYPES {
        for gen in [MetaGenKind::Layer, MetaGenKind::Pixel] {
            for (dims, layout, c) in act_cases() {
                let n: usize = dims.iter().product();
                let (x, xc) = input(&data(n, 13), &dims, dt, &d);
                let (p, pc) = input(&data(2 * c, 14), &[2, c], dt, &d);
                let (g, gc) = input(&data(n, 15), &dims, dt, &d);
                let op = MetaAconCGenOp { layout, gen };
                let y = x.apply_op2_no_bwd(&p, &op).unwrap();
                assert_eq!((y.dtype(), y.dims()), (dt, &dims[..]));
                let yc = xc.apply_op2_no_bwd(&pc, &op).unwrap();
                let u = unit(dt);
                let what = format!("meta_acon_c {gen:?} {dt:?} {dims:?}");
                // Layer-wise β is σ of an f32 sum over C·S elements: E_RED.
                check(&format!("{what} y"), &host(&y), &host(&yc), u, E_RED);
                let (dx, dp) = op.bwd(&x, &p, &y, &g).unwrap();
                let (dxc, dpc) = op.bwd(&xc, &pc, &yc, &gc).unwrap();
                let (dx, dp) = (dx.unwrap(), dp.unwrap());
                assert_eq!((dx.dims(), dp.dims()), (&dims[..], &[2, c][..]));
                // dx: the layer generator's share (an f32 sum) is added in place to
                // the stored dx, so f16/bf16 dx is rounded twice; the first rounding
                // is of the activation-only dx, whose size is that of the whole
                // tensor, not of the (possibly cancelled) element: u·max|ref| more.
                let dxc = host(&dxc.unwrap());
                check(&format!("{what} dx"), &host(&dx), &dxc, u, u + E_RED);
                check(
                    &format!("{what} dp"),
                    &host(&dp),
                    &host(&dpc.unwrap()),
                    u,
                    E_RED,
                );
                let bop = MetaAconCGenBwdOp { fwd: op };
                let packed = x.apply_op3_no_bwd(&p, &g, &bop).unwrap();
                assert_eq!(packed.dims(), &[n + 2 * c]);
            }
        }
    }
}

#[test]
fn meta_acon_c_channel_forward_backward() {
    let d = dev();
    for dt in DTYPES {
        for (b1, b2) in [(true, true), (false, true), (true, false)] {
            for (dims, layout, c) in act_cases() {
                let width = 2;
                let n: usize = dims.iter().product();
                let (x, xc) = input(&data(n, 16), &dims, dt, &d);
                let (p, pc) = input(&data(2 * c, 17), &[2, c], dt, &d);
                let op = MetaAconCOp {
                    layout,
                    width,
                    b1,
                    b2,
                };
                let glen = 2 * width * c + usize::from(b1) * width + usize::from(b2) * c;
                let gv: Vec<f64> = data(glen, 18).iter().map(|v| v * 0.5).collect();
                let (gp, gpc) = input(&gv, &[glen], dt, &d);
                let (g, gc) = input(&data(n, 19), &dims, dt, &d);
                let y = x.apply_op3_no_bwd(&p, &gp, &op).unwrap();
                assert_eq!((y.dtype(), y.dims()), (dt, &dims[..]));
                let yc = xc.apply_op3_no_bwd(&pc, &gpc, &op).unwrap();
                let u = unit(dt);
                let what = format!("meta_acon_c channel b1={b1} b2={b2} {dt:?} {dims:?}");
                // β is σ of f32 sums (GAP over S, two small matrix products): E_RED.
                check(&format!("{what} y"), &host(&y), &host(&yc), u, E_RED);
                let (dx, dp, dgp) = op.bwd(&x, &p, &gp, &y, &g).unwrap();
                let (dxc, dpc, dgpc) = op.bwd(&xc, &pc, &gpc, &yc, &gc).unwrap();
                let (dx, dp, dgp) = (dx.unwrap(), dp.unwrap(), dgp.unwrap());
                assert_eq!(dx.dims(), &dims[..]);
                assert_eq!((dp.dims(), dgp.dims()), (&[2, c][..], &[glen][..]));
                // dx: the generator's share is added in place (rounded twice, the
                // first time at the activation-only dx's size: see the layer test).
                let dxc = host(&dxc.unwrap());
                check(&format!("{what} dx"), &host(&dx), &dxc, u, u + E_RED);
                check(
                    &format!("{what} dp"),
                    &host(&dp),
                    &host(&dpc.unwrap()),
                    u,
                    E_RED,
                );
                let dgpc = host(&dgpc.unwrap());
                check(&format!("{what} dgen"), &host(&dgp), &dgpc, u, E_RED);
                let bop = MetaAconCBwdOp {
                    fwd: op,
                    dy: g.clone(),
                };
                let packed = x.apply_op3_no_bwd(&p, &gp, &bop).unwrap();
                assert_eq!(packed.dims(), &[n + 2 * c + glen]);
            }
        }
    }
}

/// `n` values in `[lo, hi)`.
fn range(n: usize, seed: u64, lo: f64, hi: f64) -> Vec<f64> {
    data(n, seed)
        .iter()
        .map(|v| lo + (v + 3.0) / 6.0 * (hi - lo))
        .collect()
}

#[test]
fn iieu_b_forward_backward() {
    let d = dev();
    // (groups, stride, padding, dilation, patch norm) on an (2, 4, 6, 5) input, 3×3.
    let cases = [
        (1, 1, 1, 1, PatchNorm::PerGroup),
        (2, 2, 1, 1, PatchNorm::PerGroup),
        (1, 1, 2, 2, PatchNorm::AllChannels),
    ];
    for dt in DTYPES {
        for (ci, &(groups, stride, pad, dil, patch_norm)) in cases.iter().enumerate() {
            let (n, c, h, w, o, k) = (2usize, 4usize, 6usize, 5usize, 4usize, 3usize);
            let oh = (h + 2 * pad - dil * (k - 1) - 1) / stride + 1;
            let ow = (w + 2 * pad - dil * (k - 1) - 1) / stride + 1;
            let xd = [n, o, oh, ow];
            let xpd = [n, c, h, w];
            let nx = xd.iter().product::<usize>();
            let wl = o * (c / groups) * k * k;
            let s = 40 + 10 * ci as u64;
            let (x, xc) = input(&data(nx, s), &xd, dt, &d);
            let (xp, xpc) = input(&data(n * c * h * w, s + 1), &xpd, dt, &d);
            let mut pv = data(wl, s + 2);
            pv.extend(range(o, s + 3, 0.5, 1.5)); // γ̇
            pv.extend(range(o, s + 4, -0.5, 0.5)); // β̇
            pv.extend(range(o, s + 5, 0.1, 0.6)); // η
            let (wp, wpc) = input(&pv, &[wl + 3 * o], dt, &d);
            let (g, gc) = input(&data(nx, s + 6), &xd, dt, &d);
            let op = IieuBOp {
                opts: IieuOpts {
                    stride: (stride, stride),
                    padding: (pad, pad),
                    dilation: (dil, dil),
                    groups,
                    patch_norm,
                },
                w_dims: [o, c / groups, k, k],
            };
            let y = x.apply_op3_no_bwd(&xp, &wp, &op).unwrap();
            assert_eq!((y.dtype(), y.dims()), (dt, &xd[..]));
            let yc = xc.apply_op3_no_bwd(&xpc, &wpc, &op).unwrap();
            let u = unit(dt);
            let what = format!("iieu_b case {ci} {dt:?}");
            check(&format!("{what} y"), &host(&y), &host(&yc), u, E_ELEM);
            let (dx, dxp, dwp) = op.bwd(&x, &xp, &wp, &y, &g).unwrap();
            let (dxc, dxpc, dwpc) = op.bwd(&xc, &xpc, &wpc, &yc, &gc).unwrap();
            let (dx, dxp, dwp) = (dx.unwrap(), dxp.unwrap(), dwp.unwrap());
            assert_eq!((dx.dims(), dxp.dims()), (&xd[..], &xpd[..]));
            assert_eq!(dwp.dims(), &[wl + 3 * o]);
            check(
                &format!("{what} dx"),
                &host(&dx),
                &host(&dxc.unwrap()),
                u,
                E_ELEM,
            );
            let dxpc = host(&dxpc.unwrap());
            check(&format!("{what} dx_pre"), &host(&dxp), &dxpc, u, E_ELEM);
            // dW (stored in T) and the f32 parameter gradients (dγ̇, dβ̇, dη: sums over
            // N·H'·W' through the LayerNorm backward, E_RED), each against its own scale.
            let (got, want) = (host(&dwp), host(&dwpc.unwrap()));
            check(&format!("{what} dW"), &got[..wl], &want[..wl], u, E_ELEM);
            // Both adjuster branches are exercised (else dη would be trivially 0).
            assert!(
                want[wl + 2 * o..].iter().any(|&v| v != 0.0),
                "{what}: no lower branch"
            );
            for (j, pname) in ["d_ln_weight", "d_ln_bias", "d_eta"].iter().enumerate() {
                let r = wl + j * o..wl + (j + 1) * o;
                check(
                    &format!("{what} {pname}"),
                    &got[r.clone()],
                    &want[r],
                    u,
                    E_RED,
                );
            }
            let bop = IieuBBwdOp { fwd: op, dy: g };
            let packed = x.apply_op3_no_bwd(&xp, &wp, &bop).unwrap();
            assert_eq!(packed.dims(), &[nx + n * c * h * w + wl + 3 * o]);
        }
    }
}

/// IieuConv2d (`IieuConvOp`: conv → ψ → IIEU-B in one op) on CUDA tensors against the
/// CPU op in f64: forward, backward (dx_pre, dW and every packed parameter gradient),
/// and BatchNorm's running statistics returned by `iieu_conv2d` as device tensors.
/// ψ = none and BatchNorm (training): with these data |term-S| < 0.3 and ν ∈ (0, 1),
/// so η = 2.5 (even channels: every element on the lower branch) and η = −1.5 (odd:
/// upper) keep every ρ̂ far (> 0.5) from η for every dtype's rounding of `c` and `x`.
/// Tolerances: `E_CONV` = 1e-4 relative to the largest entry for the f32 tensors (f32
/// GEMMs over K = 36 products and f32 BatchNorm/LayerNorm statistics vs f64), plus
/// 8·u·max|ref| for f16/bf16 (c, x, dx and dc are each stored in the dtype once; see
/// tests/parity_iieu_conv.rs, which measures these bounds on many more shapes).
#[test]
fn iieu_conv_forward_backward() {
    const E_CONV: f64 = 1e-4;
    let d = dev();
    let (n, c, h, w, o, k) = (2usize, 4usize, 6usize, 7usize, 5usize, 3usize);
    let xpd = [n, c, h, w];
    let wd = [o, c, k, k];
    let (oh, ow) = (h, w); // padding 1
    let yd = [n, o, oh, ow];
    let opts = IieuOpts {
        stride: (1, 1),
        padding: (1, 1),
        dilation: (1, 1),
        groups: 1,
        patch_norm: PatchNorm::AllChannels,
    };
    for dt in DTYPES {
        for bn in [false, true] {
            let s = if bn { 700 } else { 600 };
            let (xp, xpc) = input(&data(n * c * h * w, s), &xpd, dt, &d);
            let (wt, wc) = input(&data(o * c * k * k, s + 1), &wd, dt, &d);
            let mut pv = Vec::new();
            if bn {
                pv.extend(range(o, s + 2, 0.5, 1.5)); // γ
                pv.extend(range(o, s + 3, -0.5, 0.5)); // β
            }
            pv.extend(range(o, s + 4, 0.5, 1.5)); // γ̇
            pv.extend(range(o, s + 5, -0.5, 0.5)); // β̇
            pv.extend((0..o).map(|i| if i % 2 == 0 { 2.5 } else { -1.5 })); // η
            if bn {
                pv.extend(range(o, s + 6, -0.2, 0.2)); // running mean
                pv.extend(range(o, s + 7, 0.5, 1.5)); // running var
            }
            let np = pv.len();
            let (p, pc) = input(&pv, &[np], dt, &d);
            let (g, gc) = input(&data(n * o * oh * ow, s + 8), &yd, dt, &d);
            let spec = if bn {
                IieuConvPsiSpec::BatchNorm {
                    momentum: 0.1,
                    eps: 1e-5,
                    training: true,
                }
            } else {
                IieuConvPsiSpec::None
            };
            // One op per device: an op keeps the running statistics its last forward left.
            let op = IieuConvOp::new(opts, wd, spec);
            let opc = IieuConvOp::new(opts, wd, spec);
            let y = xp.apply_op3_no_bwd(&wt, &p, &op).unwrap();
            assert_eq!((y.dtype(), y.dims()), (dt, &yd[..]));
            let yc = xpc.apply_op3_no_bwd(&wc, &pc, &opc).unwrap();
            let u = unit(dt);
            let e = E_CONV + if dt == DType::F32 { 0.0 } else { 8.0 * u };
            let what = format!("iieu_conv bn={bn} {dt:?}");
            check(&format!("{what} y"), &host(&y), &host(&yc), u, e);
            let (dxp, dw, dp) = op.bwd(&xp, &wt, &p, &y, &g).unwrap();
            let (dxpc, dwc, dpc) = opc.bwd(&xpc, &wc, &pc, &yc, &gc).unwrap();
            let (dxp, dw, dp) = (dxp.unwrap(), dw.unwrap(), dp.unwrap());
            assert_eq!(
                (dxp.dims(), dw.dims(), dp.dims()),
                (&xpd[..], &wd[..], &[np][..])
            );
            check(
                &format!("{what} dx_pre"),
                &host(&dxp),
                &host(&dxpc.unwrap()),
                u,
                e,
            );
            check(
                &format!("{what} dW"),
                &host(&dw),
                &host(&dwc.unwrap()),
                u,
                e,
            );
            let (got, want) = (host(&dp), host(&dpc.unwrap()));
            let names: &[&str] = if bn {
                &[
                    "d_bn_weight",
                    "d_bn_bias",
                    "d_ln_weight",
                    "d_ln_bias",
                    "d_eta",
                ]
            } else {
                &["d_ln_weight", "d_ln_bias", "d_eta"]
            };
            for (j, pname) in names.iter().enumerate() {
                let r = j * o..(j + 1) * o;
                check(&format!("{what} {pname}"), &got[r.clone()], &want[r], u, e);
            }
            // The running statistics get a zero gradient.
            assert!(got[names.len() * o..].iter().all(|&v| v == 0.0));
            // Even channels all lower branch: dη non-zero there.
            assert!(want[(names.len() - 1) * o..names.len() * o]
                .iter()
                .step_by(2)
                .all(|&v| v != 0.0));
            // BatchNorm's updated running statistics stay on the device (the CPU op
            // leaves them on the host): the last forward of each op left them.
            let run = op.take_running(dt, &d).unwrap();
            let runc = opc.take_running(DType::F64, &Device::Cpu).unwrap();
            if bn {
                let ((m, v), (mc, vc)) = (run.expect("running"), runc.expect("running"));
                assert!(m.device().is_cuda() && m.dtype() == dt && m.dims() == [o]);
                check(&format!("{what} running_mean"), &host(&m), &host(&mc), u, e);
                check(&format!("{what} running_var"), &host(&v), &host(&vc), u, e);
            } else {
                assert!(run.is_none() && runc.is_none());
            }
            let bop = IieuConvBwdOp { fwd: op, dy: g };
            let packed = xp.apply_op3_no_bwd(&wt, &p, &bop).unwrap();
            assert_eq!(packed.dims(), &[n * c * h * w + o * c * k * k + np]);
        }
    }
}

#[test]
fn iieu_dc_forward_backward() {
    let d = dev();
    for dt in DTYPES {
        for (dims, hd) in [(vec![2usize, 6, 3, 5], 2usize), (vec![3, 4, 7], 3)] {
            let c = dims[1];
            let n: usize = dims.iter().product();
            let (x, xc) = input(&data(n, 60), &dims, dt, &d);
            let (r, rc) = input(&data(n, 61), &dims, dt, &d);
            let mut pv = range(2 * c, 62, 0.5, 1.5); // ln1 weight
            pv.extend(range(2 * c, 63, -0.5, 0.5)); // ln1 bias
            pv.extend(range(hd * c, 64, -1.0, 1.0)); // W1
            pv.extend(range(2 * hd, 65, -2.0, 2.0)); // γ₂
            pv.extend(range(2 * hd, 66, -1.0, 1.0)); // β₂
            pv.extend(range(hd, 67, 0.1, 0.5)); // η₂
            pv.extend(range(c * hd, 68, -1.0, 1.0)); // W2
            pv.extend(range(2 * c, 69, -2.0, 2.0)); // ln2 weight
            pv.extend(range(2 * c, 70, -0.5, 0.5)); // ln2 bias
            let plen = pv.len();
            let (p, pc) = input(&pv, &[plen], dt, &d);
            let (g, gc) = input(&data(n, 71), &dims, dt, &d);
            let op = IieuDcOp { hidden: hd };
            let y = x.apply_op3_no_bwd(&r, &p, &op).unwrap();
            assert_eq!((y.dtype(), y.dims()), (dt, &dims[..]));
            let yc = xc.apply_op3_no_bwd(&rc, &pc, &op).unwrap();
            let u = unit(dt);
            let what = format!("iieu_dc {dt:?} {dims:?}");
            check(&format!("{what} y"), &host(&y), &host(&yc), u, E_ELEM);
            let (dx, dr, dp) = op.bwd(&x, &r, &p, &y, &g).unwrap();
            let (dxc, drc, dpc) = op.bwd(&xc, &rc, &pc, &yc, &gc).unwrap();
            let (dx, dr, dp) = (dx.unwrap(), dr.unwrap(), dp.unwrap());
            assert_eq!(
                (dx.dims(), dr.dims(), dp.dims()),
                (&dims[..], &dims[..], &[plen][..])
            );
            check(
                &format!("{what} dx"),
                &host(&dx),
                &host(&dxc.unwrap()),
                u,
                E_ELEM,
            );
            check(
                &format!("{what} dres"),
                &host(&dr),
                &host(&drc.unwrap()),
                u,
                E_ELEM,
            );
            // The nine parameter gradients (f32, rounded once to T), each against its
            // own scale.
            let (got, want) = (host(&dp), host(&dpc.unwrap()));
            let eta_at = 4 * c + hd * c + 4 * hd;
            assert!(
                want[eta_at..eta_at + hd].iter().any(|&v| v != 0.0),
                "{what}: no lower adjuster branch"
            );
            let mut at = 0;
            for len in [
                2 * c,
                2 * c,
                hd * c,
                2 * hd,
                2 * hd,
                hd,
                c * hd,
                2 * c,
                2 * c,
            ] {
                let rg = at..at + len;
                check(
                    &format!("{what} dp[{at}..]"),
                    &got[rg.clone()],
                    &want[rg],
                    u,
                    E_RED,
                );
                at += len;
            }
            let bop = IieuDcBwdOp { fwd: op, dy: g };
            let packed = x.apply_op3_no_bwd(&r, &p, &bop).unwrap();
            assert_eq!(packed.dims(), &[2 * n + plen]);
        }
    }
}

/// An AIEC loss op for `n` samples, `k` classes, `c` channels: ragged labels and
/// masks with one all-false class row (its gate term is 0).
fn aiec_op(n: usize, k: usize, c: usize, layout: Layout, pool: Pool, d: &Device) -> AiecLossOp {
    AiecLossOp {
        cfg: AiecConfig {
            tau: 0.5,
            lambda_aux: 1.0,
            lambda_gate: 5.0,
            pool,
        },
        layout,
        labels: Tensor::from_vec(
            (0..n)
                .map(|i| ((i * 2 + 1) % k) as u32)
                .collect::<Vec<u32>>(),
            n,
            d,
        )
        .unwrap(),
        masks: Tensor::from_vec(
            (0..k * c)
                .map(|i| u8::from(i / c != 1 && (i * 7) % 3 != 0))
                .collect::<Vec<u8>>(),
            k * c,
            d,
        )
        .unwrap(),
    }
}

#[test]
fn aiec_loss_forward_backward() {
    let d = dev();
    let k = 3;
    for dt in DTYPES {
        for (dims, layout, c, pool) in [
            (vec![4usize, 5, 3, 3], Layout::Nchw, 5, Pool::Mean),
            (vec![3, 7], Layout::Nchw, 7, Pool::Mean),
            (vec![2, 9, 5], Layout::Nlc, 5, Pool::Mean),
            (vec![3, 6, 4], Layout::Nlc, 4, Pool::ClassToken(2)),
        ] {
            let n: usize = dims.iter().product();
            let op = aiec_op(dims[0], k, c, layout, pool, &d);
            let (f, fc) = input(&data(n, 80), &dims, dt, &d);
            let (wd, wdc) = input(&data(k * c, 81), &[k, c], dt, &d);
            let l = f.apply_op2_no_bwd(&wd, &op).unwrap();
            assert_eq!((l.dtype(), l.dims()), (dt, &[][..]));
            let lc = fc.apply_op2_no_bwd(&wdc, &op).unwrap();
            let u = unit(dt);
            let what = format!("aiec_loss {dt:?} {dims:?} {pool:?}");
            // The loss: means of f32 per-sample losses (GAP, logits, log-sum-exp: f32
            // sums), rounded once to T.
            check(&format!("{what} loss"), &host(&l), &host(&lc), u, E_RED);
            // The gate term is exercised (the loss changes without it).
            let mut no_gate = op.clone();
            no_gate.cfg.lambda_gate = 0.0;
            let l0 = fc.apply_op2_no_bwd(&wdc, &no_gate).unwrap();
            assert!(host(&l0)[0] < host(&lc)[0] - 1e-3, "{what}: no gate loss");
            // dL = 0.75 (exact in every dtype).
            let (g, gc) = input(&[0.75], &[], dt, &d);
            let (df, dwd) = op.bwd(&f, &wd, &l, &g).unwrap();
            let (dfc, dwdc) = op.bwd(&fc, &wdc, &lc, &gc).unwrap();
            let (df, dwd) = (df.unwrap(), dwd.unwrap());
            assert_eq!((df.dims(), dwd.dims()), (&dims[..], &[k, c][..]));
            // dF = [F > τ]·da/S (or da at the token): da comes out of f32 softmax and
            // GAP sums, hence E_RED; rounded once to T.
            let dfc = host(&dfc.unwrap());
            assert!(dfc.contains(&0.0) && dfc.iter().any(|&v| v != 0.0));
            check(&format!("{what} dF"), &host(&df), &dfc, u, E_RED);
            let dwdc = host(&dwdc.unwrap());
            check(&format!("{what} dWd"), &host(&dwd), &dwdc, u, E_RED);
            let bop = AiecLossBwdOp { fwd: op.clone() };
            let packed = f.apply_op3_no_bwd(&wd, &g, &bop).unwrap();
            assert_eq!(packed.dims(), &[n + k * c]);
        }
    }
}

#[test]
fn bad_input_is_an_error() {
    let d = dev();
    // f64 and u8 have no CUDA kernels.
    for dt in [DType::F64, DType::U8] {
        let x = Tensor::zeros((2, 3), dt, &d).unwrap();
        let err = x.apply_op1_no_bwd(&TauOp { tau: 0.5 }).unwrap_err();
        assert!(
            matches!(err, candle_core::Error::UnsupportedDTypeForOp(..)),
            "{err}"
        );
    }
    let (x, _) = input(&data(30, 1), &[2, 3, 5], DType::F32, &d);
    // Wrong parameter dims.
    let (p, _) = input(&data(8, 1), &[2, 4], DType::F32, &d);
    assert!(x
        .apply_op2_no_bwd(
            &p,
            &AconCOp {
                layout: Layout::Nchw,
                beta: BetaShape::PerChannel,
            }
        )
        .is_err());
    // Rank 1 activations.
    let (x1, _) = input(&data(6, 1), &[6], DType::F32, &d);
    let (p3, _) = input(&data(9, 1), &[3, 3], DType::F32, &d);
    assert!(x1
        .apply_op2_no_bwd(
            &p3,
            &AconCOp {
                layout: Layout::Nchw,
                beta: BetaShape::PerChannel,
            }
        )
        .is_err());
    // Mixed dtypes.
    let (p16, _) = input(&data(9, 1), &[9], DType::F16, &d);
    assert!(x
        .apply_op2_no_bwd(
            &p16,
            &AconCOp {
                layout: Layout::Nchw,
                beta: BetaShape::PerChannel,
            }
        )
        .is_err());
    // ACON-A / ACON-B: wrong parameter dims, mixed dtypes, f64, and dy of the wrong dims.
    let nchw = Layout::Nchw;
    let (b4, _) = input(&data(4, 1), &[4], DType::F32, &d);
    assert!(x
        .apply_op2_no_bwd(
            &b4,
            &AconAOp {
                layout: nchw,
                beta: BetaShape::PerChannel,
            }
        )
        .is_err());
    let (b3_16, _) = input(&data(3, 1), &[3], DType::F16, &d);
    assert!(x
        .apply_op2_no_bwd(
            &b3_16,
            &AconAOp {
                layout: nchw,
                beta: BetaShape::PerChannel,
            }
        )
        .is_err());
    let (pb, _) = input(&data(6, 1), &[6], DType::F32, &d);
    assert!(x
        .apply_op2_no_bwd(
            &p,
            &AconBOp {
                layout: nchw,
                beta: BetaShape::PerChannel,
            }
        )
        .is_err());
    assert!(x
        .apply_op2_no_bwd(
            &pb,
            &AconBOp {
                layout: Layout::Nlc,
                beta: BetaShape::PerChannel,
            }
        )
        .is_err());
    let x64 = Tensor::zeros((2, 3, 5), DType::F64, &d).unwrap();
    let pb64 = Tensor::zeros(6, DType::F64, &d).unwrap();
    let err = x64
        .apply_op2_no_bwd(
            &pb64,
            &AconBOp {
                layout: nchw,
                beta: BetaShape::PerChannel,
            },
        )
        .unwrap_err();
    assert!(
        matches!(err, candle_core::Error::UnsupportedDTypeForOp(..)),
        "{err}"
    );
    let (b3, _) = input(&data(3, 1), &[3], DType::F32, &d);
    let (g_bad, _) = input(&data(30, 1), &[2, 5, 3], DType::F32, &d);
    let fwd = AconAOp {
        layout: nchw,
        beta: BetaShape::PerChannel,
    };
    assert!(x
        .apply_op3_no_bwd(&b3, &g_bad, &AconABwdOp { fwd })
        .is_err());
    let fwd = AconBOp {
        layout: nchw,
        beta: BetaShape::PerChannel,
    };
    assert!(x
        .apply_op3_no_bwd(&pb, &g_bad, &AconBBwdOp { fwd })
        .is_err());
    // meta-ACON-C: generator pack of the wrong length, dy on the CPU or of the
    // wrong dims, f64.
    let (pm, _) = input(&data(6, 1), &[2, 3], DType::F32, &d);
    let meta = MetaAconCOp {
        layout: nchw,
        width: 2,
        b1: true,
        b2: true,
    };
    let (gp_bad, _) = input(&data(10, 1), &[10], DType::F32, &d);
    assert!(x.apply_op3_no_bwd(&pm, &gp_bad, &meta).is_err());
    let (gp, _) = input(&data(17, 1), &[17], DType::F32, &d);
    x.apply_op3_no_bwd(&pm, &gp, &meta).unwrap();
    let dy_cpu = Tensor::zeros((2, 3, 5), DType::F32, &Device::Cpu).unwrap();
    let bop = MetaAconCBwdOp {
        fwd: meta,
        dy: dy_cpu,
    };
    assert!(x.apply_op3_no_bwd(&pm, &gp, &bop).is_err());
    let bop = MetaAconCBwdOp {
        fwd: meta,
        dy: g_bad.clone(),
    };
    assert!(x.apply_op3_no_bwd(&pm, &gp, &bop).is_err());
    let gen = MetaAconCGenOp {
        layout: nchw,
        gen: MetaGenKind::Layer,
    };
    assert!(x.apply_op2_no_bwd(&b3, &gen).is_err());
    assert!(x
        .apply_op3_no_bwd(&pm, &g_bad, &MetaAconCGenBwdOp { fwd: gen })
        .is_err());
    let err = x64.apply_op2_no_bwd(&pb64, &gen).unwrap_err();
    assert!(
        matches!(err, candle_core::Error::UnsupportedDTypeForOp(..)),
        "{err}"
    );
    // IIEU-B: x of the wrong dims, a pack of the wrong length; IIEU-DC: res of the
    // wrong dims, a pack of the wrong length.
    let iop = IieuBOp {
        opts: IieuOpts::default(),
        w_dims: [2, 3, 1, 1],
    };
    let (xp, _) = input(&data(30, 2), &[1, 3, 2, 5], DType::F32, &d);
    let (xi, _) = input(&data(20, 3), &[1, 2, 2, 5], DType::F32, &d);
    let (wp, _) = input(&data(12, 4), &[12], DType::F32, &d);
    xi.apply_op3_no_bwd(&xp, &wp, &iop).unwrap();
    assert!(x.apply_op3_no_bwd(&xp, &wp, &iop).is_err());
    let (wp_bad, _) = input(&data(11, 4), &[11], DType::F32, &d);
    assert!(xi.apply_op3_no_bwd(&xp, &wp_bad, &iop).is_err());
    let bop = IieuBBwdOp {
        fwd: iop,
        dy: x.clone(),
    };
    assert!(xi.apply_op3_no_bwd(&xp, &wp, &bop).is_err());
    let dop = IieuDcOp { hidden: 1 };
    // 3 channels, hidden 1: 6 + 6 + 3 + 2 + 2 + 1 + 3 + 6 + 6 = 35 parameters.
    let (dp, _) = input(&data(35, 5), &[35], DType::F32, &d);
    x.apply_op3_no_bwd(&x, &dp, &dop).unwrap();
    assert!(x.apply_op3_no_bwd(&g_bad, &dp, &dop).is_err());
    let (dp_bad, _) = input(&data(34, 5), &[34], DType::F32, &d);
    assert!(x.apply_op3_no_bwd(&x, &dp_bad, &dop).is_err());
    let bop = IieuDcBwdOp {
        fwd: dop,
        dy: g_bad.clone(),
    };
    assert!(x.apply_op3_no_bwd(&x, &dp, &bop).is_err());
    // AIEC loss: masks of the wrong length, labels of the wrong count or dtype, a
    // non-scalar dL. A device label out of range cannot be seen by the host: the
    // kernels flag it (NaN loss) instead of following it.
    let (wd, _) = input(&data(9, 6), &[3, 3], DType::F32, &d);
    let aop = aiec_op(2, 3, 3, nchw, Pool::Mean, &d);
    x.apply_op2_no_bwd(&wd, &aop).unwrap();
    let mut bad = aop.clone();
    bad.labels = Tensor::from_vec(vec![1u32, 3], 2, &d).unwrap();
    assert!(host(&x.apply_op2_no_bwd(&wd, &bad).unwrap())[0].is_nan());
    let mut bad = aop.clone();
    bad.labels = Tensor::from_vec(vec![1u32, 0, 2], 3, &d).unwrap();
    assert!(x.apply_op2_no_bwd(&wd, &bad).is_err());
    let mut bad = aop.clone();
    bad.labels = Tensor::from_vec(vec![1i64, 0], 2, &d).unwrap();
    assert!(x.apply_op2_no_bwd(&wd, &bad).is_err());
    let mut bad = aop.clone();
    bad.masks = bad.masks.narrow(0, 0, 8).unwrap();
    assert!(x.apply_op2_no_bwd(&wd, &bad).is_err());
    let bop = AiecLossBwdOp { fwd: aop };
    assert!(x.apply_op3_no_bwd(&wd, &b3, &bop).is_err());
    // Negative τ.
    assert!(x.apply_op1_no_bwd(&TauOp { tau: -1.0 }).is_err());
    // A strided (transposed) input.
    let xt = x.transpose(1, 2).unwrap();
    assert!(xt.apply_op1_no_bwd(&TauOp { tau: 0.5 }).is_err());
    // IieuConv2d: a pack of the wrong length, a weight of the wrong dims, dy of the
    // wrong dims — each an error naming the op, before any kernel runs.
    let opts = IieuOpts {
        stride: (1, 1),
        padding: (1, 1),
        dilation: (1, 1),
        groups: 1,
        patch_norm: PatchNorm::PerGroup,
    };
    let op = IieuConvOp::new(opts, [3, 2, 3, 3], IieuConvPsiSpec::None);
    let (xp, _) = input(&data(2 * 2 * 5 * 4, 3), &[2, 2, 5, 4], DType::F32, &d);
    let (w, _) = input(&data(3 * 2 * 9, 4), &[3, 2, 3, 3], DType::F32, &d);
    let (pk, _) = input(&data(9, 5), &[9], DType::F32, &d);
    let (short, _) = input(&data(8, 5), &[8], DType::F32, &d);
    let err = xp.apply_op3_no_bwd(&w, &short, &op).unwrap_err();
    assert!(err.to_string().contains("packed parameters"), "{err}");
    let (w_bad, _) = input(&data(3 * 2 * 4, 4), &[3, 2, 2, 2], DType::F32, &d);
    assert!(xp.apply_op3_no_bwd(&w_bad, &pk, &op).is_err());
    let (dy_bad, _) = input(&data(2 * 3 * 5 * 3, 6), &[2, 3, 5, 3], DType::F32, &d);
    let bop = IieuConvBwdOp {
        fwd: op,
        dy: dy_bad,
    };
    let err = xp.apply_op3_no_bwd(&w, &pk, &bop).unwrap_err();
    assert!(err.to_string().contains("dy"), "{err}");
}

/// The `Aiec` module on CUDA tensors (counters on the device, labels as a device
/// tensor) against the same module on the CPU, over three training steps: counters
/// (exact), masks (exact), the loss value and the logged statistics (f32 sums:
/// `E_RED`), then `reset_counters`.
#[test]
fn aiec_module_matches_cpu() {
    use activation_kernels::candle::nn::Aiec;
    use std::collections::HashMap;
    let d = dev();
    let (n, c, h, w, k) = (6usize, 5usize, 3usize, 2usize, 3usize);
    let cfg = AiecConfig {
        tau: 0.2,
        lambda_aux: 1.0,
        lambda_gate: 5.0,
        pool: Pool::Mean,
    };
    let wdv: Vec<f32> = data(k * c, 90).iter().map(|&v| (v / 3.0) as f32).collect();
    let module = |dev: &Device| {
        let wd = Tensor::from_vec(wdv.clone(), (k, c), dev).unwrap();
        let vb = candle_nn::VarBuilder::from_tensors(
            HashMap::from([("wd".to_string(), wd)]),
            DType::F32,
            dev,
        );
        Aiec::new(vb, c, k, cfg).unwrap()
    };
    let (gpu, cpu) = (module(&d), module(&Device::Cpu));
    for step in 0..3u64 {
        let fv: Vec<f32> = data(n * c * h * w, 91 + step)
            .iter()
            .map(|&v| (v / 2.0) as f32)
            .collect();
        let labels: Vec<u32> = (0..n as u32)
            .map(|i| (i + step as u32) % k as u32)
            .collect();
        let f = Tensor::from_vec(fv.clone(), (n, c, h, w), &d).unwrap();
        let fc = Tensor::from_vec(fv, (n, c, h, w), &Device::Cpu).unwrap();
        let lab = Tensor::from_vec(labels.clone(), n, &d).unwrap();
        let labc = Tensor::from_vec(labels, n, &Device::Cpu).unwrap();
        let (a, loss) = gpu.forward_train_labels(&f, &lab).unwrap();
        let (ac, lossc) = cpu.forward_train_labels(&fc, &labc).unwrap();
        let what = format!("aiec module step {step}");
        check(&format!("{what} A"), &host(&a), &host(&ac), 0.0, 0.0);
        assert_eq!(
            gpu.counters().unwrap(),
            cpu.counters().unwrap(),
            "{what} counters"
        );
        assert_eq!(host(&loss.masks), host(&lossc.masks), "{what} masks");
        check(
            &format!("{what} total"),
            &host(&loss.total),
            &host(&lossc.total),
            0.0,
            E_RED,
        );
        check(
            &format!("{what} stats"),
            &host(&loss.stats),
            &host(&lossc.stats),
            0.0,
            E_RED,
        );
    }
    assert!(gpu.counters().unwrap().phi().iter().sum::<u64>() > 0);
    gpu.reset_counters().unwrap();
    assert!(gpu.counters().unwrap().phi().iter().all(|&p| p == 0));
}
