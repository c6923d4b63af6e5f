//! No host round trip in any GPU op (issue 16): forward and backward of every candle
//! op on CUDA tensors, and the `Aiec` module's training step (labels as a device
//! tensor, counters on the device), issue no host↔device copy and no stream, context
//! or event synchronisation in steady state. Proven by the emulated driver's call
//! counters ([`activation_kernels::emu::transfers`], counted per thread): the whole
//! set runs twice, and the second run must show 0 HtoD and 0 DtoH copies (synchronous
//! or asynchronous) and 0 synchronisations. The first run is warm-up (the kernel
//! image and handles are resolved once per context).
//!
//! Features `emulate` + `candle-cuda` (the candle ops' CUDA path on the emulated
//! device, as tests/candle_cuda.rs, which checks the values; here only the traffic
//! is checked, plus that the outputs come back with the expected dims). Setup copies
//! (the inputs) happen before the counters are reset; reading results back to the
//! host happens after they are read.
#![cfg(all(feature = "candle-cuda", feature = "emulate"))]

use std::collections::HashMap;

use activation_kernels::candle::nn::Aiec;
use activation_kernels::candle::ops::{
    AconAOp, AconBOp, AconCOp, AiecLossOp, IieuBOp, IieuConvOp, IieuConvPsiSpec, IieuDcOp,
    IieuOpts, MetaAconCGenOp, MetaAconCOp, MetaGenKind, TauOp,
};
use activation_kernels::candle::BetaShape;
use activation_kernels::cpu::aiec::{AiecConfig, Pool};
use activation_kernels::cpu::iieu::PatchNorm;
use activation_kernels::emu::{self, Transfers};
use activation_kernels::Layout;
use candle_core::{CustomOp1, CustomOp2, CustomOp3, DType, Device, Tensor};

fn dev() -> Device {
    emu::install().expect("emulated device");
    Device::new_cuda(0).expect("candle CudaDevice on the emulated driver")
}

/// Deterministic data in [lo, hi).
fn data(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            lo + ((s >> 40) as f32 / (1u64 << 24) as f32) * (hi - lo)
        })
        .collect()
}

/// An f32 tensor on `d` (a host-to-device copy: setup only).
fn t(d: &Device, dims: &[usize], seed: u64, lo: f32, hi: f32) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(data(n, seed, lo, hi), dims, d).expect("upload")
}

/// The inputs of every op, on the device.
struct Inputs {
    x: Tensor,
    g: Tensor,
    p3: Tensor,
    // ACON-C with β per (sample, channel): 1-D [p1; p2; β (N·C)]
    pnc: Tensor,
    p1: Tensor,
    p2: Tensor,
    // ACON-B: 1-D [p; β]
    pb: Tensor,
    gen: Tensor,
    // IIEU-B: x (N, O, H, W), x_pre (N, C, H, W), [W; γ̇; β̇; η], dy
    ix: Tensor,
    ixp: Tensor,
    iwp: Tensor,
    // IieuConv2d (BatchNorm, training): x_pre, W, pack
    cxp: Tensor,
    cw: Tensor,
    cp: Tensor,
    cg: Tensor,
    // IIEU-DC: res, pack
    res: Tensor,
    dcp: Tensor,
    // AIEC: F (N, C, H, W), Wd (K, C), labels (U32), masks (U8), dL
    f: Tensor,
    wd: Tensor,
    labels: Tensor,
    masks: Tensor,
    dl: Tensor,
}

const N: usize = 2;
const C: usize = 4;
const H: usize = 3;
const W: usize = 5;
const K: usize = 3;
const HD: usize = 2;
const WIDTH: usize = 2;

fn inputs(d: &Device) -> Inputs {
    let dims = [N, C, H, W];
    let mut p3 = data(3 * C, 4, -1.0, 1.0);
    for b in &mut p3[2 * C..] {
        *b = b.abs() + 0.1;
    }
    let glen = 2 * WIDTH * C + WIDTH + C;
    let wl = C * C * 9;
    let mut iwp = data(wl, 20, -0.3, 0.3);
    iwp.extend(data(C, 21, 0.5, 1.5));
    iwp.extend(data(C, 22, -0.5, 0.5));
    iwp.extend(data(C, 23, 0.1, 0.6));
    // IieuConv2d BatchNorm pack: γ, β, γ̇, β̇, η, running mean, running var.
    let mut cp = data(C, 30, 0.5, 1.5);
    cp.extend(data(C, 31, -0.5, 0.5));
    cp.extend(data(C, 32, 0.5, 1.5));
    cp.extend(data(C, 33, -0.5, 0.5));
    cp.extend(data(C, 34, 0.1, 0.6));
    cp.extend(data(C, 35, -0.2, 0.2));
    cp.extend(data(C, 36, 0.5, 1.5));
    let dcl = 4 * C + HD * C + 4 * HD + HD + C * HD + 4 * C;
    let labels: Vec<u32> = (0..N as u32).map(|i| (2 * i + 1) % K as u32).collect();
    let masks: Vec<u8> = (0..K * C).map(|i| u8::from(i % 3 != 0)).collect();
    Inputs {
        x: t(d, &dims, 1, -3.0, 3.0),
        g: t(d, &dims, 2, -1.0, 1.0),
        p3: Tensor::from_vec(p3, 3 * C, d).expect("upload"),
        pnc: t(d, &[2 * C + N * C], 12, 0.5, 1.5),
        p1: t(d, &[C], 5, 0.5, 1.5),
        p2: t(d, &[2, C], 6, -1.0, 1.0),
        pb: t(d, &[2 * C], 6, -1.0, 1.0),
        gen: t(d, &[glen], 7, -0.5, 0.5),
        ix: t(d, &dims, 8, -2.0, 2.0),
        ixp: t(d, &dims, 9, -2.0, 2.0),
        iwp: Tensor::from_vec(iwp, wl + 3 * C, d).expect("upload"),
        cxp: t(d, &dims, 10, -2.0, 2.0),
        cw: t(d, &[C, C, 3, 3], 11, -0.3, 0.3),
        cp: Tensor::from_vec(cp, 7 * C, d).expect("upload"),
        cg: t(d, &dims, 12, -1.0, 1.0),
        res: t(d, &dims, 13, -2.0, 2.0),
        dcp: t(d, &[dcl], 14, 0.1, 0.9),
        f: t(d, &dims, 15, -2.0, 2.0),
        wd: t(d, &[K, C], 16, -0.5, 0.5),
        labels: Tensor::from_vec(labels, N, d).expect("upload"),
        masks: Tensor::from_vec(masks, (K, C), d).expect("upload"),
        dl: Tensor::from_vec(vec![0.75f32], (), d).expect("upload"),
    }
}

fn opts() -> IieuOpts {
    IieuOpts {
        stride: (1, 1),
        padding: (1, 1),
        dilation: (1, 1),
        groups: 1,
        patch_norm: PatchNorm::PerGroup,
    }
}

fn aiec_cfg() -> AiecConfig {
    AiecConfig {
        tau: 0.25,
        lambda_aux: 1.0,
        lambda_gate: 5.0,
        pool: Pool::Mean,
    }
}

/// Forward and backward of every candle op with a CUDA path, and one `Aiec` module
/// training step with its loss's backward; returns every output (kept alive until the
/// caller drops them).
fn every_op(i: &Inputs, aiec: &Aiec) -> Vec<Tensor> {
    let mut out = Vec::new();
    let mut keep = |v: Option<Tensor>| out.push(v.expect("a gradient"));
    // TAU
    let op = TauOp { tau: 0.5 };
    let y = i.x.apply_op1_no_bwd(&op).expect("tau");
    keep(op.bwd(&i.x, &y, &i.g).expect("tau bwd"));
    keep(Some(y));
    // ACON-C (β per channel, and per (sample, channel) as a tensor), ACON-A, ACON-B
    for (beta, p) in [
        (BetaShape::PerChannel, &i.p3),
        (BetaShape::PerSampleChannel, &i.pnc),
    ] {
        let op = AconCOp {
            layout: Layout::Nchw,
            beta,
        };
        let y = i.x.apply_op2_no_bwd(p, &op).expect("acon_c");
        let (a, b) = op.bwd(&i.x, p, &y, &i.g).expect("acon_c bwd");
        keep(a);
        keep(b);
        keep(Some(y));
    }
    let op = AconAOp {
        layout: Layout::Nchw,
        beta: BetaShape::PerChannel,
    };
    let y = i.x.apply_op2_no_bwd(&i.p1, &op).expect("acon_a");
    let (a, b) = op.bwd(&i.x, &i.p1, &y, &i.g).expect("acon_a bwd");
    keep(a);
    keep(b);
    keep(Some(y));
    let op = AconBOp {
        layout: Layout::Nchw,
        beta: BetaShape::PerChannel,
    };
    let y = i.x.apply_op2_no_bwd(&i.pb, &op).expect("acon_b");
    let (a, b) = op.bwd(&i.x, &i.pb, &y, &i.g).expect("acon_b bwd");
    keep(a);
    keep(b);
    keep(Some(y));
    // meta-ACON-C: layer-wise, pixel-wise, channel-wise generators
    for gen in [MetaGenKind::Layer, MetaGenKind::Pixel] {
        let op = MetaAconCGenOp {
            layout: Layout::Nchw,
            gen,
        };
        let y = i.x.apply_op2_no_bwd(&i.p2, &op).expect("meta gen");
        let (a, b) = op.bwd(&i.x, &i.p2, &y, &i.g).expect("meta gen bwd");
        keep(a);
        keep(b);
        keep(Some(y));
    }
    let op = MetaAconCOp {
        layout: Layout::Nchw,
        width: WIDTH,
        b1: true,
        b2: true,
    };
    let y =
        i.x.apply_op3_no_bwd(&i.p2, &i.gen, &op)
            .expect("meta channel");
    let (a, b, c) = op.bwd(&i.x, &i.p2, &i.gen, &y, &i.g).expect("meta bwd");
    keep(a);
    keep(b);
    keep(c);
    keep(Some(y));
    // IIEU-B
    let op = IieuBOp {
        opts: opts(),
        w_dims: [C, C, 3, 3],
    };
    let y = i.ix.apply_op3_no_bwd(&i.ixp, &i.iwp, &op).expect("iieu_b");
    let (a, b, c) = op.bwd(&i.ix, &i.ixp, &i.iwp, &y, &i.g).expect("iieu bwd");
    keep(a);
    keep(b);
    keep(c);
    keep(Some(y));
    // IieuConv2d, BatchNorm in training mode (running statistics stay on the device)
    let spec = IieuConvPsiSpec::BatchNorm {
        momentum: 0.1,
        eps: 1e-5,
        training: true,
    };
    let op = IieuConvOp::new(opts(), [C, C, 3, 3], spec);
    let y = i
        .cxp
        .apply_op3_no_bwd(&i.cw, &i.cp, &op)
        .expect("iieu_conv");
    let run = op
        .take_running(DType::F32, i.cxp.device())
        .expect("running");
    let (m, v) = run.expect("running statistics");
    keep(Some(m));
    keep(Some(v));
    let (a, b, c) = op
        .bwd(&i.cxp, &i.cw, &i.cp, &y, &i.cg)
        .expect("iieu_conv bwd");
    keep(a);
    keep(b);
    keep(c);
    keep(Some(y));
    // IIEU-DC
    let op = IieuDcOp { hidden: HD };
    let y = i.x.apply_op3_no_bwd(&i.res, &i.dcp, &op).expect("iieu_dc");
    let (a, b, c) = op.bwd(&i.x, &i.res, &i.dcp, &y, &i.g).expect("dc bwd");
    keep(a);
    keep(b);
    keep(c);
    keep(Some(y));
    // AIEC loss with fixed masks, labels on the device
    let op = AiecLossOp {
        cfg: aiec_cfg(),
        layout: Layout::Nchw,
        labels: i.labels.clone(),
        masks: i.masks.clone(),
    };
    let l = i.f.apply_op2_no_bwd(&i.wd, &op).expect("aiec_loss");
    let (a, b) = op.bwd(&i.f, &i.wd, &l, &i.dl).expect("aiec_loss bwd");
    keep(a);
    keep(b);
    keep(Some(l));
    // The Aiec module: counters, masks and losses on the device, then the backward of
    // its two ops (TAU and the loss, with the step's masks).
    let (a, loss) = aiec
        .forward_train_labels(&i.f, &i.labels)
        .expect("aiec step");
    let tau = TauOp {
        tau: aiec_cfg().tau,
    };
    keep(tau.bwd(&i.f, &a, &i.g).expect("module tau bwd"));
    let op = AiecLossOp {
        cfg: aiec_cfg(),
        layout: Layout::Nchw,
        labels: i.labels.clone(),
        masks: loss.masks.clone(),
    };
    let (df, dwd) = op
        .bwd(&i.f, aiec.wd(), &loss.total, &i.dl)
        .expect("module loss bwd");
    keep(df);
    keep(dwd);
    keep(Some(a));
    keep(Some(loss.total));
    keep(Some(loss.stats));
    keep(Some(loss.masks));
    out
}

#[test]
fn no_host_round_trip_in_steady_state() {
    let d = dev();
    let i = inputs(&d);
    let vb = candle_nn::VarBuilder::from_tensors(
        HashMap::from([("wd".to_string(), i.wd.clone())]),
        DType::F32,
        &d,
    );
    let aiec = Aiec::new(vb, C, K, aiec_cfg()).expect("Aiec on the device");
    // Warm-up: kernel image and handles, first use of every op.
    let first = every_op(&i, &aiec);
    drop(first);
    emu::reset_transfers();
    let second = every_op(&i, &aiec);
    let t = emu::transfers().expect("emulated driver counters");
    assert_eq!(
        t,
        Transfers::default(),
        "a training step copied between host and device or synchronised: {t:?}"
    );
    // The counters work (this test would pass vacuously otherwise): reading a result
    // back is a device-to-host copy, and a stream synchronisation is counted.
    let masks = second
        .last()
        .expect("outputs")
        .to_vec2::<u8>()
        .expect("masks");
    assert_eq!(masks.len(), K);
    d.as_cuda_device()
        .expect("cuda device")
        .cuda_stream()
        .synchronize()
        .expect("synchronize");
    let t = emu::transfers().expect("counters");
    assert!(t.dtoh >= 1 && t.stream_syncs >= 1, "{t:?}");
    // Labels given on the host are one upload per step (the device-tensor path above
    // has none).
    emu::reset_transfers();
    let host_labels: Vec<usize> = (0..N).map(|n| (2 * n + 1) % K).collect();
    aiec.forward_train(&i.f, &host_labels).expect("step");
    assert_eq!(emu::transfers().expect("counters").htod, 1);
    // The module's counters live on the device and were updated twice (φ counts the
    // correctly predicted samples of both steps).
    let cnt = aiec.counters().expect("counters to host");
    assert_eq!(cnt.classes(), K);
}

/// The crate's own CUDA API in a training step (no candle): the AIEC layer with its
/// labels as a device buffer and its counters on the device, forward and backward,
/// and an ACON-C forward/backward — no copy and no synchronisation in steady state.
#[test]
fn cuda_api_training_step_has_no_host_round_trip() {
    use activation_kernels::cpu::acon::AconCParams;
    use activation_kernels::cuda::{acon, aiec};
    use activation_kernels::ActShape;
    let d = dev();
    let st = d.as_cuda_device().expect("cuda device").cuda_stream();
    let shape = ActShape::nchw(N, C, H, W);
    let numel = N * C * H * W;
    let f = st.clone_htod(&data(numel, 40, -2.0, 2.0)).expect("f");
    let dy = st.clone_htod(&data(numel, 41, -1.0, 1.0)).expect("dy");
    let wd = st.clone_htod(&data(K * C, 42, -0.5, 0.5)).expect("wd");
    let labels = st.clone_htod(&[1u32, 2]).expect("labels");
    let hp = AconCParams::<f32>::init_reference(C, 3).expect("params");
    let (p1, p2, beta) = (
        st.clone_htod(&hp.p1).expect("p1"),
        st.clone_htod(&hp.p2).expect("p2"),
        st.clone_htod(&hp.beta).expect("beta"),
    );
    let mut counters = aiec::DeviceCounters::new(&st, K, C).expect("counters");
    let cfg = aiec_cfg();
    let mut step = || {
        let o = aiec::train_forward(&st, &cfg, &shape, &f, &wd, &labels, &mut counters)
            .expect("aiec forward");
        let g = aiec::train_backward(&st, &cfg, &shape, &dy, 1.0, &f, &wd, &o.saved)
            .expect("aiec backward");
        let b = acon::Beta::PerChannel(&beta);
        let y = acon::acon_c_forward(&st, &shape, &o.out, &p1, &p2, b).expect("acon_c");
        let b = acon::Beta::PerChannel(&beta);
        let ga = acon::acon_c_backward(&st, &shape, &dy, &o.out, &p1, &p2, b).expect("bwd");
        (o, g, y, ga)
    };
    drop(step());
    emu::reset_transfers();
    let kept = step();
    let t = emu::transfers().expect("counters");
    assert_eq!(t, Transfers::default(), "{t:?}");
    drop(kept);
}

/// Out-of-range labels on the device are flagged, never followed: the loss is NaN,
/// nothing is counted, and the gradients stay finite.
#[test]
fn device_labels_out_of_range_are_flagged() {
    let d = dev();
    let i = inputs(&d);
    let bad = Tensor::from_vec(vec![1u32, 7], N, &d).expect("labels");
    let op = AiecLossOp {
        cfg: aiec_cfg(),
        layout: Layout::Nchw,
        labels: bad.clone(),
        masks: i.masks.clone(),
    };
    let l = i.f.apply_op2_no_bwd(&i.wd, &op).expect("aiec_loss");
    assert!(l.to_scalar::<f32>().expect("loss").is_nan());
    let (df, dwd) = op.bwd(&i.f, &i.wd, &l, &i.dl).expect("bwd");
    for g in [df.expect("df"), dwd.expect("dwd")] {
        let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{v:?}");
    }
    let vb = candle_nn::VarBuilder::from_tensors(
        HashMap::from([("wd".to_string(), i.wd.clone())]),
        DType::F32,
        &d,
    );
    let aiec = Aiec::new(vb, C, K, aiec_cfg()).expect("Aiec");
    let all_bad = Tensor::from_vec(vec![3u32, u32::MAX], N, &d).expect("labels");
    let (_, loss) = aiec.forward_train_labels(&i.f, &all_bad).expect("step");
    assert!(loss.aux_mean().expect("aux").is_nan());
    let cnt = aiec.counters().expect("counters");
    assert!((0..K).all(|k| cnt.phi()[k] == 0), "nothing is counted");
}

/// Bad input is an error before anything runs: labels of the wrong dtype or count.
#[test]
fn bad_label_tensors_are_errors() {
    let d = dev();
    let i = inputs(&d);
    for labels in [
        Tensor::from_vec(vec![0i64, 1], N, &d).expect("i64 labels"),
        Tensor::from_vec(vec![0u32, 1, 2], 3, &d).expect("3 labels"),
    ] {
        let op = AiecLossOp {
            cfg: aiec_cfg(),
            layout: Layout::Nchw,
            labels,
            masks: i.masks.clone(),
        };
        assert!(i.f.apply_op2_no_bwd(&i.wd, &op).is_err());
    }
}
