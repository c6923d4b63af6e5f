//! Launch audit (issue 15 items 1, 2, 5): how every kernel launch of the crate would
//! fill an RTX A6000 (sm_86) and an H100 (sm_90), without a GPU.
//!
//! The emulated device ([`activation_kernels::emu`]) runs in dry-run mode: every op
//! goes through its production `cuda::` API — validation, kernel handles, argument
//! packing, the launch geometry, the driver's launch checks — and the emulated driver
//! logs each launch (kernel, grid, block, dynamic shared memory) but executes no grid,
//! and its dry-run allocations are backed by no memory, so a ResNet-50 stage at
//! N = 256 costs nothing. Each launch is joined with the ptxas table
//! (`kernels/emu/ptxas-table.tsv`: registers and static shared memory per arch) and a
//! bytes model (`model.rs`, docs/kernels.md's per-kernel table multiplied out for the
//! shape), and gets, per GPU: resident blocks per SM, theoretical occupancy, waves,
//! bytes moved, the minimum bytes and a lower-bound time (`model::time_s`).
//!
//! Targets (issue 15 item 2), for every launch of the model-shape suite:
//! * `fill`: a launch moving ≥ 4 MB has ≥ 2 waves or ≥ 50 % theoretical occupancy
//!   on both GPUs (value: the worse device's `max(waves / 2, occupancy / 0.5)`, ≥ 1
//!   passes);
//! * `blocks`: a launch moving ≥ 4 MB has at least as many blocks as SMs (value:
//!   blocks / 132, the H100's SMs);
//! * `ratio`: bytes ≤ 1.25 × the minimum for ACON, AIEC's TAU and feature passes and
//!   IIEU-B's adjuster passes (value: bytes / minimum);
//! * `split`: a tensor-core IieuConv2d GEMM that misses `fill` is the faster choice —
//!   its split-K alternative (`model::split_alternative`: the reduction split into the
//!   fewest chunks that give ≥ 2 waves on both GPUs, f32 partials summed in order) is
//!   modelled slower on at least one GPU (value: the larger alternative / current time
//!   ratio; > 1 passes);
//! * `div64`: no 64-bit integer division or modulo by a run-time value in a kernel
//!   (value: flagged source lines, `lint.rs`);
//! * `bound`: every launched kernel declares its launch bound (`AK_KERNEL_BOUND`, so
//!   nvcc gets `__launch_bounds__` and the emulated driver enforces the same bound;
//!   value: the bound, 1024 = none declared; < 1024 passes).
//!
//! The current kernels miss some targets (issue 15 item 3 fixes them): the known
//! misses and their values are `docs/launch-audit-baseline.tsv`. The audit fails on a
//! miss not in that file, or one worse than its recorded value (a regression check);
//! it lists misses that now pass. Usage:
//!
//! ```text
//! cargo run --features emulate --example launch_audit             # check, print summary
//! cargo run --features emulate --example launch_audit -- --write  # also docs + README
//! cargo run --features emulate --example launch_audit -- --bless  # rewrite the baseline
//! ```
//! (`scripts/launch-audit.sh` wraps it.) These are predictions from a model, not
//! measurements; `scripts/gpu-bench.sh` measures on a real GPU.

mod lint;
mod model;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use activation_kernels::cpu::{acon as cacon, aiec as caiec, iieu as ciieu, iieu_dc as cdc};
use activation_kernels::cuda::{
    acon, aiec, iieu, iieu_conv, iieu_dc, CudaContext, CudaSlice, CudaStream, DType,
};
use activation_kernels::emu::{self, LaunchRecord};
use activation_kernels::{ActShape, Conv2dGeometry, Error, Result};
use half::{bf16, f16};
use model::{Carry, Dims, Traffic, GPUS};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BASELINE: &str = "docs/launch-audit-baseline.tsv";
const DOC: &str = "docs/launch-audit.md";
const README: &str = "README.md";
/// Launches moving at least this many bytes must fill the GPU.
const BIG: f64 = 4e6;

/// One op call of the suite: its launches and the shapes they are modelled on.
struct Case {
    /// Op family (`acon_c`, `iieu_b`, ...).
    op: &'static str,
    /// Op, layout, shape, dtype.
    label: String,
    /// `fwd` or `bwd`.
    phase: &'static str,
    dims: Dims,
    launches: Vec<LaunchRecord>,
}

struct Suite {
    stream: Arc<CudaStream>,
    cases: Vec<Case>,
}

impl Suite {
    /// Runs `f` (one op call) and records its launches as one case.
    fn run<R>(
        &mut self,
        op: &'static str,
        label: &str,
        phase: &'static str,
        dims: Dims,
        f: impl FnOnce(&Arc<CudaStream>) -> Result<R>,
    ) -> Result<R> {
        let _ = emu::take_launch_log();
        let r = f(&self.stream)?;
        self.cases.push(Case {
            op,
            label: label.to_string(),
            phase,
            dims,
            launches: emu::take_launch_log(),
        });
        Ok(r)
    }

    /// A device buffer of `n` elements that no kernel reads (dry run: no memory).
    fn buf<T: DType>(&self, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: in the dry run no kernel executes, so the contents are never read.
        Ok(unsafe { self.stream.alloc::<T>(n) }?)
    }
}

fn shape_label(shape: &ActShape) -> String {
    match shape.layout {
        activation_kernels::Layout::Nchw => {
            let hw = (shape.s as f64).sqrt() as usize;
            format!("nchw {}x{}x{hw}x{hw}", shape.n, shape.c)
        }
        activation_kernels::Layout::Nlc => format!("nlc {}x{}x{}", shape.n, shape.s, shape.c),
    }
}

fn act_dims<T: DType>(shape: &ActShape) -> Dims {
    Dims {
        b: std::mem::size_of::<T>() as f64,
        n: shape.n as f64,
        c: shape.c as f64,
        s: shape.s as f64,
        ..Dims::default()
    }
}

/// ACON-C (per-channel β) forward and backward; with `all`, also ACON-A, ACON-B and
/// meta-ACON-C with the channel (r = 16), layer and pixel generators.
fn acon_cases<T: DType>(su: &mut Suite, shape: &ActShape, all: bool) -> Result<()> {
    let numel = shape.n * shape.c * shape.s;
    let x = su.buf::<T>(numel)?;
    let dy = su.buf::<T>(numel)?;
    let (p1, p2, beta) = (
        su.buf::<f32>(shape.c)?,
        su.buf::<f32>(shape.c)?,
        su.buf::<f32>(shape.c)?,
    );
    let lab = format!("{} {}", shape_label(shape), T::NAME);
    let d = act_dims::<T>(shape);
    su.run("acon_c", &format!("acon_c {lab}"), "fwd", d, |s| {
        acon::acon_c_forward(s, shape, &x, &p1, &p2, acon::Beta::PerChannel(&beta))
    })?;
    su.run("acon_c", &format!("acon_c {lab}"), "bwd", d, |s| {
        acon::acon_c_backward(s, shape, &dy, &x, &p1, &p2, acon::Beta::PerChannel(&beta))
    })?;
    if !all {
        return Ok(());
    }
    su.run("acon_a", &format!("acon_a {lab}"), "fwd", d, |s| {
        acon::acon_a_forward(s, shape, &x, acon::Beta::PerChannel(&beta))
    })?;
    su.run("acon_a", &format!("acon_a {lab}"), "bwd", d, |s| {
        acon::acon_a_backward(s, shape, &dy, &x, acon::Beta::PerChannel(&beta))
    })?;
    su.run("acon_b", &format!("acon_b {lab}"), "fwd", d, |s| {
        acon::acon_b_forward(s, shape, &x, &p2, acon::Beta::PerChannel(&beta))
    })?;
    su.run("acon_b", &format!("acon_b {lab}"), "bwd", d, |s| {
        acon::acon_b_backward(s, shape, &dy, &x, &p2, acon::Beta::PerChannel(&beta))
    })?;
    let host = cacon::ChannelGen::<f32>::init(shape.c, 16, true, 5)?;
    let gen = acon::ChannelGen::from_host(&su.stream, &host)?;
    let dg = Dims {
        hd: gen.width as f64,
        ..d
    };
    let gens: [(&'static str, acon::MetaGen<'_>); 3] = [
        ("meta_acon_c_channel", acon::MetaGen::Channel(&gen)),
        ("meta_acon_c_layer", acon::MetaGen::Layer),
        ("meta_acon_c_pixel", acon::MetaGen::Pixel),
    ];
    for (op, g) in gens {
        let label = format!("{op} {lab}");
        let (_, saved) = su.run(op, &label, "fwd", dg, |s| {
            acon::meta_acon_c_forward(s, shape, &x, &p1, &p2, g)
        })?;
        su.run(op, &label, "bwd", dg, |s| {
            acon::meta_acon_c_backward(s, shape, &dy, &x, &p1, &p2, g, &saved)
        })?;
    }
    Ok(())
}

/// TAU forward and backward.
fn tau_cases<T: DType>(su: &mut Suite, shape: &ActShape) -> Result<()> {
    let numel = shape.n * shape.c * shape.s;
    let x = su.buf::<T>(numel)?;
    let dy = su.buf::<T>(numel)?;
    let label = format!("tau {} {}", shape_label(shape), T::NAME);
    let d = act_dims::<T>(shape);
    su.run("tau", &label, "fwd", d, |s| aiec::tau_forward(s, &x, 0.1))?;
    su.run("tau", &label, "bwd", d, |s| {
        aiec::tau_backward(s, &dy, &x, 0.1)
    })?;
    Ok(())
}

/// The AIEC training step (mean pooling, K classes) forward and backward.
fn aiec_cases<T: DType>(su: &mut Suite, shape: &ActShape, k: usize) -> Result<()> {
    let numel = shape.n * shape.c * shape.s;
    let f = su.buf::<T>(numel)?;
    let dy = su.buf::<T>(numel)?;
    let wd = su.buf::<f32>(k * shape.c)?;
    let cfg = caiec::AiecConfig::default();
    let labels: Vec<usize> = (0..shape.n).map(|i| i % k).collect();
    let mut counters = aiec::DeviceCounters::new(&su.stream, k, shape.c)?;
    let label = format!("aiec_train {} k{k} {}", shape_label(shape), T::NAME);
    let d = Dims {
        k: k as f64,
        aiec_train: true,
        ..act_dims::<T>(shape)
    };
    let out = su.run("aiec_train", &label, "fwd", d, |s| {
        aiec::train_forward(s, &cfg, shape, &f, &wd, &labels[..], &mut counters)
    })?;
    su.run("aiec_train", &label, "bwd", d, |s| {
        aiec::train_backward(s, &cfg, shape, &dy, 1.0, &f, &wd, &out.saved)
    })?;
    Ok(())
}

/// IIEU-B after a `k`×`k` convolution (padding `k / 2`), C = O = `ch`, storage `T`.
fn iieu_cases<T: DType>(
    su: &mut Suite,
    (n, ch, hw): (usize, usize, usize),
    k: usize,
) -> Result<()> {
    let geo = Conv2dGeometry::new(n, ch, hw, hw, ch, k, k).with_padding(k / 2, k / 2);
    let cfg = ciieu::IieuConfig::new(geo);
    let numel = n * ch * hw * hw;
    let x = su.buf::<T>(numel)?;
    let dy = su.buf::<T>(numel)?;
    let x_pre = su.buf::<T>(numel)?;
    let wt = su.buf::<T>(ch * ch * k * k)?;
    let p = iieu::IieuDeviceParams::init(&su.stream, ch)?;
    let label = format!("iieu_b {k}x{k} nchw {n}x{ch}x{hw}x{hw} {}", T::NAME);
    let d = Dims {
        b: std::mem::size_of::<T>() as f64,
        n: n as f64,
        c: ch as f64,
        s: (hw * hw) as f64,
        cin: ch as f64,
        hw_in: (hw * hw) as f64,
        taps: (k * k) as f64,
        gp: 1.0,
        ..Dims::default()
    };
    let (_, saved) = su.run("iieu_b", &label, "fwd", d, |s| {
        iieu::forward(s, &cfg, &x, &x_pre, &wt, &p)
    })?;
    su.run("iieu_b", &label, "bwd", d, |s| {
        iieu::backward(s, &cfg, &dy, &x, &x_pre, &wt, &p, &saved)
    })?;
    Ok(())
}

/// IIEU-DC (r = 16) on `x` and a residual of the same shape, storage `T` (f32
/// parameters and coupler).
fn dc_cases<T: DType>(su: &mut Suite, (n, ch, hw): (usize, usize, usize)) -> Result<()> {
    let cfg = cdc::DcConfig::new(n, ch, hw, hw, 16)?;
    let hp = cdc::DcParams::<f32>::init(&cfg, 1)?;
    let p = iieu_dc::DcDeviceParams::upload(&su.stream, &cfg, &hp)?;
    let numel = n * ch * hw * hw;
    let x = su.buf::<T>(numel)?;
    let res = su.buf::<T>(numel)?;
    let dy = su.buf::<T>(numel)?;
    let label = format!("iieu_dc nchw {n}x{ch}x{hw}x{hw} {}", T::NAME);
    let d = Dims {
        b: std::mem::size_of::<T>() as f64,
        n: n as f64,
        c: ch as f64,
        s: (hw * hw) as f64,
        hd: cfg.hidden as f64,
        ..Dims::default()
    };
    let (_, saved) = su.run("iieu_dc", &label, "fwd", d, |s| {
        iieu_dc::forward(s, &cfg, &x, &res, &p)
    })?;
    su.run("iieu_dc", &label, "bwd", d, |s| {
        iieu_dc::backward(s, &cfg, &dy, &x, &res, &p, &saved)
    })?;
    Ok(())
}

/// IieuConv2d (conv → BatchNorm training → IIEU-B, all-channels patch norms), storage
/// `T` (f32 parameters).
fn conv_cases<T: DType>(su: &mut Suite, geo: Conv2dGeometry) -> Result<()> {
    use activation_kernels::cpu::iieu_conv::{BatchNorm, IieuConvParams, Psi};
    let cfg = ciieu::IieuConfig::new(geo).with_patch_norm(ciieu::PatchNorm::AllChannels);
    let (oh, ow) = geo.validate()?;
    let out = geo.n * geo.c_out * oh * ow;
    let x_pre = su.buf::<T>(geo.input_len())?;
    let wt = su.buf::<T>(geo.weight_len())?;
    let dy = su.buf::<T>(out)?;
    let host = IieuConvParams::init(geo.c_out, Psi::BatchNorm(BatchNorm::init(geo.c_out)));
    let mut p = iieu_conv::IieuConvDeviceParams::from_host(&su.stream, &host)?;
    let label = format!(
        "iieu_conv {}x{} nchw {}x{}x{}x{}->{} {}",
        geo.kh,
        geo.kw,
        geo.n,
        geo.c_in,
        geo.h,
        geo.w,
        geo.c_out,
        T::NAME
    );
    let d = Dims {
        b: std::mem::size_of::<T>() as f64,
        n: geo.n as f64,
        c: geo.c_out as f64,
        s: (oh * ow) as f64,
        cin: geo.c_in as f64,
        hw_in: (geo.h * geo.w) as f64,
        taps: (geo.kh * geo.kw) as f64,
        gp: 1.0,
        ..Dims::default()
    };
    let (_, saved) = su.run("iieu_conv", &label, "fwd", d, |s| {
        iieu_conv::forward(s, &cfg, &x_pre, &wt, &mut p)
    })?;
    su.run("iieu_conv", &label, "bwd", d, |s| {
        iieu_conv::backward(s, &cfg, &dy, &x_pre, &wt, &p, &saved)
    })?;
    Ok(())
}

/// ResNet-50's stage tensors (channels, spatial size).
const RESNET: [(usize, usize); 5] = [(64, 56), (256, 56), (512, 28), (1024, 14), (2048, 7)];

/// The model-shape suite (issue 15 item 1).
fn suite(su: &mut Suite) -> Result<()> {
    for n in [32, 256] {
        for (ch, hw) in RESNET {
            let shape = ActShape::nchw(n, ch, hw, hw);
            acon_cases::<f32>(su, &shape, n == 32 && ch == 64)?;
            if n == 32 {
                acon_cases::<f16>(su, &shape, false)?;
                tau_cases::<f32>(su, &shape)?;
            }
            // IIEU families in every storage type (f32 math; f16 / bf16 halve the
            // tensor bytes, not the f32 intermediates).
            iieu_cases::<f32>(su, (n, ch, hw), 3)?;
            iieu_cases::<f32>(su, (n, ch, hw), 1)?;
            dc_cases::<f32>(su, (n, ch, hw))?;
            iieu_cases::<f16>(su, (n, ch, hw), 3)?;
            iieu_cases::<f16>(su, (n, ch, hw), 1)?;
            dc_cases::<f16>(su, (n, ch, hw))?;
            iieu_cases::<bf16>(su, (n, ch, hw), 3)?;
            iieu_cases::<bf16>(su, (n, ch, hw), 1)?;
            dc_cases::<bf16>(su, (n, ch, hw))?;
        }
        aiec_cases::<f32>(su, &ActShape::nchw(n, 2048, 7, 7), 1000)?;
        let g3 = |c, hw| Conv2dGeometry::new(n, c, hw, hw, c, 3, 3).with_padding(1, 1);
        let g1 = |c, hw, o| Conv2dGeometry::new(n, c, hw, hw, o, 1, 1);
        for geo in [
            g3(64, 56),
            g3(128, 28),
            g3(256, 14),
            g3(512, 7),
            g1(256, 56, 64),
            g1(512, 28, 128),
            g1(1024, 14, 256),
            g1(2048, 7, 512),
        ] {
            conv_cases::<f32>(su, geo)?;
            conv_cases::<f16>(su, geo)?;
            conv_cases::<bf16>(su, geo)?;
        }
    }
    aiec_cases::<f16>(su, &ActShape::nchw(32, 2048, 7, 7), 1000)?;
    // (N, L, C) shapes whose preferred ACON tiling has few blocks (the tiling's block
    // floor: src/cuda/acon.rs nlc_tiling): 32 × 49 × 2048 (one 49-row tile per
    // sample, 2 chunks: 64 blocks without it), 8 × 197 × 768 (144 without it).
    for (n, l, c) in [(32, 49, 2048), (8, 197, 768)] {
        let shape = ActShape::nlc(n, l, c);
        acon_cases::<f32>(su, &shape, false)?;
        acon_cases::<f16>(su, &shape, false)?;
    }
    // ViT-B/16 tokens, and the benches' ViT-Tiny width.
    for (l, c) in [(197, 768), (197, 192)] {
        let shape = ActShape::nlc(64, l, c);
        acon_cases::<f32>(su, &shape, true)?;
        acon_cases::<f16>(su, &shape, true)?;
        tau_cases::<f32>(su, &shape)?;
        tau_cases::<f16>(su, &shape)?;
        let k = if c == 768 { 1000 } else { 100 };
        aiec_cases::<f32>(su, &shape, k)?;
        aiec_cases::<f16>(su, &shape, k)?;
    }
    Ok(())
}

/// One launch, joined with the models.
struct Row {
    case: usize,
    /// `kernel#i`: the i-th launch of this kernel in the case.
    key: String,
    rec: LaunchRecord,
    tr: Traffic,
    regs: [u64; 2],
    smem_static: [u64; 2],
    occ: [model::Occupancy; 2],
    time: [f64; 2],
    /// The split-K alternative (tensor-core IieuConv2d GEMMs only).
    split: Option<model::SplitAlt>,
}

/// A target check of one launch or kernel.
struct Check {
    /// Baseline key: `case label|phase|kernel#i`, or the kernel for `div64` and `bound`.
    key: String,
    target: &'static str,
    value: f64,
    pass: bool,
}

/// Whether `now` is worse than `base` for `target` (with a little float slack).
fn worse(target: &str, now: f64, base: f64) -> bool {
    match target {
        "ratio" | "div64" | "bound" => now > base * 1.0001 + 1e-9,
        _ => now < base * 0.9999 - 1e-12,
    }
}

fn op_min(c: &Case) -> f64 {
    let d = &c.dims;
    let (b, e) = (d.b, d.e());
    let bwd = c.phase == "bwd";
    match c.op {
        "iieu_b" | "iieu_conv" => {
            let (p, w) = (b * d.epre(), b * d.wlen());
            match (c.op, bwd) {
                ("iieu_b", false) => 2.0 * b * e + p + w,
                ("iieu_b", true) => 3.0 * b * e + 2.0 * p + 2.0 * w,
                // y written and c saved for the backward.
                (_, false) => 2.0 * b * e + p + w,
                // dy and c read; dx_pre, dW written; x_pre, W read.
                (_, true) => 2.0 * b * e + 2.0 * p + 2.0 * w,
            }
        }
        "iieu_dc" => (if bwd { 5.0 } else { 3.0 }) * b * e,
        "aiec_train" => {
            let nc = d.n * d.c;
            if bwd {
                3.0 * b * e + 4.0 * nc + 8.0 * d.k * d.c
            } else {
                2.0 * b * e + 4.0 * nc + 4.0 * d.k * d.c
            }
        }
        _ => (if bwd { 3.0 } else { 2.0 }) * b * e,
    }
}

fn us(s: f64) -> String {
    if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.1} µs", s * 1e6)
    }
}

fn mb(b: f64) -> String {
    if b >= 1e8 {
        format!("{:.0}", b / 1e6)
    } else if b >= 1e6 {
        format!("{:.1}", b / 1e6)
    } else {
        format!("{:.3}", b / 1e6)
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("launch audit: {e}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<bool> {
    let t0 = Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let write = args.iter().any(|a| a == "--write");
    let bless = args.iter().any(|a| a == "--bless");
    emu::install().map_err(|e| Error::Driver(format!("emulated device: {e}")))?;
    // Dry run: launches are checked and logged, no grid runs; the detectors need
    // executed kernels, so they are off.
    emu::set_checks(emu::Checks {
        race: false,
        init: false,
        mem: false,
    });
    emu::set_dry_run(true);
    emu::set_launch_log(true);
    let ctx = CudaContext::new(0)?;
    let mut su = Suite {
        stream: ctx.default_stream(),
        cases: Vec::new(),
    };
    suite(&mut su)?;
    emu::set_launch_log(false);
    let cases = std::mem::take(&mut su.cases);
    drop(su);
    emu::set_dry_run(false);

    let ptxas = model::Ptxas::parse(&read(&format!("{ROOT}/kernels/emu/ptxas-table.tsv"))?);
    let mut rows = Vec::new();
    let mut unmodelled = BTreeSet::new();
    let mut no_ptxas = BTreeSet::new();
    for (ci, c) in cases.iter().enumerate() {
        let mut carry = Carry::default();
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for rec in &c.launches {
            let i = seen.entry(rec.kernel.as_str()).or_insert(0);
            let key = format!("{}#{i}", rec.kernel);
            *i += 1;
            let Some(tr) = model::traffic(&rec.kernel, &c.dims, rec.grid, &mut carry) else {
                unmodelled.insert(rec.kernel.clone());
                continue;
            };
            let mut regs = [0; 2];
            let mut st = [0; 2];
            let mut occ = [model::occupancy(GPUS[0], 32, 0, 0, 1); 2];
            let mut time = [0.0; 2];
            for (gi, g) in GPUS.iter().enumerate() {
                let Some((r, s)) = ptxas.get(&rec.kernel, g.sm) else {
                    // No registers to model with: a failure, not a 0-register pass.
                    no_ptxas.insert(format!("{} sm_{}", rec.kernel, g.sm));
                    continue;
                };
                regs[gi] = r;
                st[gi] = s;
                occ[gi] = model::occupancy(
                    g,
                    rec.threads(),
                    r,
                    s + u64::from(rec.dyn_smem),
                    rec.blocks(),
                );
                time[gi] = model::time_s(g, &tr, rec.blocks());
            }
            let split = model::split_alternative(
                &rec.kernel,
                &c.dims,
                rec.grid,
                &tr,
                [occ[0].blocks_per_sm, occ[1].blocks_per_sm],
            );
            rows.push(Row {
                case: ci,
                key,
                rec: rec.clone(),
                tr,
                split,
                regs,
                smem_static: st,
                occ,
                time,
            });
        }
    }

    // Targets.
    let mut checks = Vec::new();
    for r in &rows {
        let c = &cases[r.case];
        let key = format!("{}|{}|{}", c.label, c.phase, r.key);
        if r.tr.bytes >= BIG {
            let fill = (0..2)
                .map(|g| (r.occ[g].waves / 2.0).max(r.occ[g].occupancy / 0.5))
                .fold(f64::INFINITY, f64::min);
            checks.push(Check {
                key: key.clone(),
                target: "fill",
                value: fill,
                pass: fill >= 1.0,
            });
            // A tensor-core GEMM that misses `fill` must be the faster choice: its
            // split-K alternative (model::split_alternative, ≥ 2 waves on both GPUs) is
            // modelled slower on at least one GPU, else the split is what to launch.
            // A tensor-core GEMM whose reduction is too shallow for such a split
            // (`split_alternative` gives none) fails it too (value 0): a new one needs a
            // look and a baseline entry, never a silent pass.
            // (The `_tc` families are the tensor-core GEMMs, as everywhere in the audit.)
            if fill < 1.0 && model::family(&r.rec.kernel).ends_with("_tc") {
                let value = r.split.map_or(0.0, |alt| {
                    (0..2)
                        .map(|g| alt.time[g] / r.time[g])
                        .fold(f64::NEG_INFINITY, f64::max)
                });
                checks.push(Check {
                    key: key.clone(),
                    target: "split",
                    value,
                    pass: value > 1.0,
                });
            }
            let blocks = r.rec.blocks() as f64 / model::H100.sms as f64;
            checks.push(Check {
                key: key.clone(),
                target: "blocks",
                value: blocks,
                pass: blocks >= 1.0,
            });
        }
        if model::ratio_target(model::family(&r.rec.kernel)) && r.tr.min > 0.0 {
            let ratio = r.tr.bytes / r.tr.min;
            checks.push(Check {
                key,
                target: "ratio",
                value: ratio,
                pass: ratio <= 1.25,
            });
        }
    }
    // The same target per op call, for the ops whose every launch is held to it: the
    // bytes of all the call's launches (tile partials written by one kernel and read
    // back by the next included) against the op's minimum. A per-launch ratio cannot
    // see a partials round trip that one kernel writes and another reads.
    for (ci, c) in cases.iter().enumerate() {
        if !matches!(c.op, "acon_a" | "acon_b" | "acon_c" | "tau") {
            continue;
        }
        let bytes: f64 = rows
            .iter()
            .filter(|r| r.case == ci)
            .map(|r| r.tr.bytes)
            .sum();
        let ratio = bytes / op_min(c);
        checks.push(Check {
            key: format!("{}|{}|op", c.label, c.phase),
            target: "ratio",
            value: ratio,
            pass: ratio <= 1.25,
        });
    }
    // The 64-bit division lint over every kernel of the ptxas table's sm_86 rows.
    let mut sources = Vec::new();
    for f in [
        "acon.cu",
        "aiec.cu",
        "iieu.cu",
        "iieu_conv.cu",
        "iieu_dc.cu",
        "cast.cu",
        "common.cuh",
    ] {
        sources.push((
            format!("kernels/{f}"),
            read(&format!("{ROOT}/kernels/{f}"))?,
        ));
    }
    let kernels: BTreeSet<String> = ptxas
        .0
        .keys()
        .filter(|(_, sm)| *sm == 86)
        .map(|(k, _)| k.clone())
        .collect();
    let div = lint::div64(&sources, &kernels);
    if !div.missing.is_empty() {
        println!(
            "FAIL: the div64 lint found no definition of {} kernel(s) in kernels/*.cu: {:?}",
            div.missing.len(),
            div.missing
        );
    }
    for (k, lines) in &div.lines {
        checks.push(Check {
            key: k.clone(),
            target: "div64",
            value: lines.len() as f64,
            pass: lines.is_empty(),
        });
    }

    // Launch bounds (issue 15 item 4): each launched kernel's bound, as the emulated
    // driver registered it (the largest block it refuses to exceed).
    let mut bounds: BTreeMap<&str, u32> = BTreeMap::new();
    for r in &rows {
        bounds.insert(r.rec.kernel.as_str(), r.rec.bound);
    }
    for (k, &b) in &bounds {
        checks.push(Check {
            key: (*k).to_string(),
            target: "bound",
            value: f64::from(b),
            pass: b < 1024,
        });
    }

    // Baseline comparison.
    let base_path = format!("{ROOT}/{BASELINE}");
    let base_text = std::fs::read_to_string(&base_path).unwrap_or_default();
    let mut base: BTreeMap<(String, String), f64> = BTreeMap::new();
    for line in base_text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let f: Vec<&str> = line.split('\t').collect();
        if let [key, target, value, ..] = f[..] {
            if let Ok(v) = value.parse() {
                base.insert((key.to_string(), target.to_string()), v);
            }
        }
    }
    let mut new_misses = Vec::new();
    let mut regressions = Vec::new();
    let mut known = Vec::new();
    let mut fixed = Vec::new();
    let mut seen_keys = BTreeSet::new();
    for ch in &checks {
        let k = (ch.key.clone(), ch.target.to_string());
        seen_keys.insert(k.clone());
        match (ch.pass, base.get(&k)) {
            (false, None) => new_misses.push(ch),
            (false, Some(&b)) if worse(ch.target, ch.value, b) => regressions.push((ch, b)),
            (false, Some(_)) => known.push(ch),
            (true, Some(_)) => fixed.push(ch),
            (true, None) => {}
        }
    }
    let stale: Vec<_> = base.keys().filter(|k| !seen_keys.contains(*k)).collect();

    // Summary.
    let misses_by_target = |t: &str| checks.iter().filter(|c| c.target == t && !c.pass).count();
    let checked_by_target = |t: &str| checks.iter().filter(|c| c.target == t).count();
    let mut sum = String::new();
    let _ =
        writeln!(
        sum,
        "launch audit: {} op calls, {} launches ({} kernels) on the emulated device (dry run); \
         models for {} (sm_{}) and {} (sm_{})",
        cases.len(),
        rows.len(),
        rows.iter().map(|r| r.rec.kernel.as_str()).collect::<BTreeSet<_>>().len(),
        GPUS[0].name,
        GPUS[0].sm,
        GPUS[1].name,
        GPUS[1].sm
    );
    for (t, what) in [
        (
            "fill",
            "launches ≥ 4 MB with ≥ 2 waves or ≥ 50 % occupancy on both GPUs",
        ),
        ("blocks", "launches ≥ 4 MB with ≥ 132 blocks (H100 SMs)"),
        (
            "ratio",
            "ACON / AIEC TAU+feature / IIEU-B adjuster launches with bytes ≤ 1.25 × minimum",
        ),
        (
            "split",
            "tensor-core GEMMs missing fill whose split-K alternative is modelled slower on a GPU",
        ),
        (
            "div64",
            "kernels without 64-bit division by a run-time value (source lint)",
        ),
        (
            "bound",
            "launched kernels with a declared launch bound (__launch_bounds__)",
        ),
    ] {
        let n = checked_by_target(t);
        let _ = writeln!(
            sum,
            "  {t:<6} {:>4} / {n:<4} pass  — {what}",
            n - misses_by_target(t)
        );
    }
    print!("{sum}");
    println!(
        "  misses: {} known (in {BASELINE}), {} new, {} worse than the baseline; {} baseline entries now pass, {} no longer occur",
        known.len(),
        new_misses.len(),
        regressions.len(),
        fixed.len(),
        stale.len()
    );
    if !unmodelled.is_empty() {
        println!(
            "FAIL: kernels with no bytes model (examples/launch_audit/model.rs): {unmodelled:?}"
        );
    }
    // Known misses, grouped by kernel family and target.
    let mut groups: BTreeMap<(String, &str), (usize, f64, f64)> = BTreeMap::new();
    for ch in checks.iter().filter(|c| !c.pass) {
        let kern = ch.key.rsplit('|').next().unwrap_or(&ch.key);
        let kern = kern.split('#').next().unwrap_or(kern);
        let e = groups
            .entry((model::family(kern).to_string(), ch.target))
            .or_insert((0, f64::INFINITY, f64::NEG_INFINITY));
        e.0 += 1;
        e.1 = e.1.min(ch.value);
        e.2 = e.2.max(ch.value);
    }
    let _ = writeln!(
        sum,
        "misses by kernel family and target (count, value range; fill/blocks: ≥ 1 passes, split: > 1, ratio: ≤ 1.25, div64: 0, bound: < 1024):"
    );
    for ((fam, t), (n, lo, hi)) in &groups {
        let _ = writeln!(sum, "  {fam:<28} {t:<6} {n:>4}  {lo:.3} .. {hi:.3}");
    }
    print!(
        "{}",
        &sum[sum.find("misses by kernel family").unwrap_or(sum.len())..]
    );
    for ch in &new_misses {
        println!("NEW MISS {} {} = {:.4}", ch.key, ch.target, ch.value);
    }
    for (ch, b) in &regressions {
        println!(
            "WORSE    {} {} = {:.4} (baseline {b:.4})",
            ch.key, ch.target, ch.value
        );
    }
    for ch in &fixed {
        println!(
            "NOW PASSES (remove from the baseline with --bless): {} {} = {:.4}",
            ch.key, ch.target, ch.value
        );
    }
    for (k, t) in &stale {
        println!("NO LONGER CHECKED (a case or kernel key went away; --bless): {k} {t}");
    }
    if !no_ptxas.is_empty() {
        println!(
            "FAIL: launches of kernels missing from kernels/emu/ptxas-table.tsv: {no_ptxas:?}"
        );
    }

    if bless {
        let mut out = String::from(
            "# Known misses of the launch audit (examples/launch_audit, issue 15 item 2): key, target, value.\n\
             # The audit fails on a miss not listed here or worse than its value. Regenerate with\n\
             # `scripts/launch-audit.sh --bless` only when a change makes things no worse.\n",
        );
        for ch in checks.iter().filter(|c| !c.pass) {
            let _ = writeln!(out, "{}\t{}\t{:.6}", ch.key, ch.target, ch.value);
        }
        write_file(&base_path, &out)?;
        println!("wrote {BASELINE}");
    }
    if write {
        let (doc, readme) = tables(&cases, &rows, &checks, &div.lines);
        splice(
            &format!("{ROOT}/{DOC}"),
            "launch-audit",
            &format!("```text\n{sum}```\n{doc}"),
        )?;
        splice(&format!("{ROOT}/{README}"), "launch-audit", &readme)?;
        println!("wrote {DOC} and the README table");
    }
    // The baseline must list exactly today's misses: a miss that went away (fixed, or
    // its case dropped) fails too until `--bless` records it, so a shrinking suite or a
    // renamed kernel cannot hide misses, and a fixed launch cannot regress back to its
    // old value unnoticed.
    let ok = unmodelled.is_empty()
        && no_ptxas.is_empty()
        && div.missing.is_empty()
        && (bless
            || (new_misses.is_empty()
                && regressions.is_empty()
                && fixed.is_empty()
                && stale.is_empty()));
    println!(
        "launch audit: {} ({:.1} s)",
        if ok { "OK" } else { "FAILED" },
        t0.elapsed().as_secs_f64()
    );
    Ok(ok)
}

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::Driver(format!("{path}: {e}")))
}

fn write_file(path: &str, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::Driver(format!("{path}: {e}")))
}

/// Replaces the text between `<!-- {tag}:begin -->` and `<!-- {tag}:end -->` in `path`.
fn splice(path: &str, tag: &str, body: &str) -> Result<()> {
    let text = read(path)?;
    let (b, e) = (
        format!("<!-- {tag}:begin -->"),
        format!("<!-- {tag}:end -->"),
    );
    let (Some(i), Some(j)) = (text.find(&b), text.find(&e)) else {
        return Err(Error::Driver(format!("{path}: no {b} … {e} markers")));
    };
    let out = format!("{}{b}\n{}{}", &text[..i], body, &text[j..]);
    write_file(path, &out)
}

/// The docs page's tables and the README's summary.
fn tables(
    cases: &[Case],
    rows: &[Row],
    checks: &[Check],
    div: &BTreeMap<String, Vec<String>>,
) -> (String, String) {
    let mut doc = String::new();
    // Per op call.
    let per_case = |ci: usize| rows.iter().filter(move |r| r.case == ci);
    let _ = writeln!(
        doc,
        "\n### Per op call\n\nBytes: the model's bytes (every load and store, L1/L2 re-reads included) against \
         the op's minimum (inputs read once, outputs written once). Time: the sum of the launches' \
         lower bounds; \"at BW\" is the op minimum at full DRAM bandwidth.\n\n\
         | op call | phase | launches | MB | op min MB | A6000 | A6000 at BW | H100 | H100 at BW | misses |\n\
         |---|---|---|---|---|---|---|---|---|---|"
    );
    let mut summary: Vec<(usize, f64, f64, [f64; 2], usize)> = Vec::new();
    for (ci, c) in cases.iter().enumerate() {
        let bytes: f64 = per_case(ci).map(|r| r.tr.bytes).sum();
        let t = [0, 1].map(|g| per_case(ci).map(|r| r.time[g]).sum::<f64>());
        let prefix = format!("{}|{}|", c.label, c.phase);
        let misses = checks
            .iter()
            .filter(|k| !k.pass && k.key.starts_with(&prefix))
            .count();
        let min = op_min(c);
        summary.push((ci, bytes, min, t, misses));
        let _ = writeln!(
            doc,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.label,
            c.phase,
            per_case(ci).count(),
            mb(bytes),
            mb(min),
            us(t[0]),
            us(min / model::A6000.bw),
            us(t[1]),
            us(min / model::H100.bw),
            misses
        );
    }
    // Per launch.
    let _ = writeln!(
        doc,
        "\n### Per launch\n\nregs: per thread (ptxas, sm_86 / sm_90); smem: static + dynamic bytes; \
         blk/SM, occ, waves: A6000 / H100 (limiter of the resident blocks in brackets); \
         flags: the targets this launch misses.\n\n\
         | op call | phase | kernel | grid | block | regs | smem | blk/SM | occ % | waves | MB | min MB | A6000 | H100 | flags |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let c = &cases[r.case];
        let key = format!("{}|{}|{}", c.label, c.phase, r.key);
        let flags: Vec<&str> = checks
            .iter()
            .filter(|k| !k.pass && k.key == key)
            .map(|k| k.target)
            .collect();
        let g = r.rec.grid;
        let _ = writeln!(
            doc,
            "| {} | {} | `{}` | {}×{}×{} | {} | {}/{} | {}/{} | {} ({}) / {} ({}) | {:.0}/{:.0} | {:.2}/{:.2} | {} | {} | {} | {} | {} |",
            c.label,
            c.phase,
            r.rec.kernel,
            g[0],
            g[1],
            g[2],
            r.rec.threads(),
            r.regs[0],
            r.regs[1],
            r.smem_static[0] + u64::from(r.rec.dyn_smem),
            r.smem_static[1] + u64::from(r.rec.dyn_smem),
            r.occ[0].blocks_per_sm,
            r.occ[0].limiter,
            r.occ[1].blocks_per_sm,
            r.occ[1].limiter,
            r.occ[0].occupancy * 100.0,
            r.occ[1].occupancy * 100.0,
            r.occ[0].waves,
            r.occ[1].waves,
            mb(r.tr.bytes),
            mb(r.tr.min),
            us(r.time[0]),
            us(r.time[1]),
            flags.join(", ")
        );
    }
    let _ = writeln!(
        doc,
        "\n### 64-bit division (source lint)\n\n| kernel family | flagged lines |\n|---|---|"
    );
    let mut fams: BTreeMap<&str, &Vec<String>> = BTreeMap::new();
    for (k, v) in div.iter().filter(|(_, v)| !v.is_empty()) {
        fams.entry(model::family(k)).or_insert(v);
    }
    for (f, v) in fams {
        let _ = writeln!(doc, "| `{f}` | {} |", v.join(", "));
    }

    // Tensor-core fill misses against their split-K alternative.
    let _ = writeln!(
        doc,
        "\n### Tensor-core `fill` misses and their split-K alternative\n\n\
         Each tensor-core GEMM launch that misses `fill`, against the same tiles with the reduction split \
         into the fewest chunks that give ≥ 2 waves on both GPUs (`model::split_alternative`: f32 \
         partials written by the GEMM and summed in order by a second pass, all at DRAM bandwidth). \
         `split` = the larger of the two GPUs' alternative / current time; the `split` target \
         requires > 1 (the launch as built is the faster choice on at least one GPU).\n\n\
         | op call | phase | kernel | blocks | waves A6000/H100 | A6000 µs now → split | H100 µs now → split | chunks now → split | split |\n\
         |---|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let c = &cases[r.case];
        let key = format!("{}|{}|{}", c.label, c.phase, r.key);
        let Some(ch) = checks.iter().find(|k| k.target == "split" && k.key == key) else {
            continue;
        };
        // The alternative's cells, or dashes where the reduction is too shallow for it.
        let (a_alt, h_alt, chunks) = match r.split {
            Some(alt) => (
                format!("{:.1}", alt.time[0] * 1e6),
                format!("{:.1}", alt.time[1] * 1e6),
                alt.splits.to_string(),
            ),
            None => ("—".into(), "—".into(), "— (too shallow)".into()),
        };
        let _ = writeln!(
            doc,
            "| {} | {} | `{}` | {} | {:.2}/{:.2} | {:.1} → {a_alt} | {:.1} → {h_alt} | {} → {chunks} | {:.2} |",
            c.label,
            c.phase,
            r.rec.kernel,
            r.rec.blocks(),
            r.occ[0].waves,
            r.occ[1].waves,
            r.time[0] * 1e6,
            r.time[1] * 1e6,
            r.rec.grid[2],
            ch.value
        );
    }

    // Tensor-core launches against the dense f16 peak.
    let (tc_doc, tc_readme) = tensor_core_table(cases, rows);
    doc.push_str(&tc_doc);

    // README: one row per op call at reference shapes, forward and backward.
    let mut readme = String::from(
        "| op call (fwd / bwd) | MB moved (op min) | A6000 bound, µs (at BW) | H100 bound, µs (at BW) | misses |\n|---|---|---|---|---|\n",
    );
    let picks = [
        "acon_c nlc 64x197x768 f16",
        "aiec_train nchw 32x2048x7x7 k1000 f32",
        "iieu_b 3x3 nchw 32x1024x14x14 f32",
        "iieu_dc nchw 32x2048x7x7 f32",
        "iieu_conv 3x3 nchw 32x256x14x14->256 f32",
    ];
    let num = |v: f64| format!("{:.0}", v * 1e6);
    for pick in picks {
        let pair: Vec<_> = summary
            .iter()
            .filter(|x| cases[x.0].label == pick)
            .collect();
        let [f, b] = pair[..] else { continue };
        let _ = writeln!(
            readme,
            "| {pick} | {} / {} ({} / {}) | {} / {} ({} / {}) | {} / {} ({} / {}) | {} |",
            mb(f.1),
            mb(b.1),
            mb(f.2),
            mb(b.2),
            num(f.3[0]),
            num(b.3[0]),
            num(f.2 / model::A6000.bw),
            num(b.2 / model::A6000.bw),
            num(f.3[1]),
            num(b.3[1]),
            num(f.2 / model::H100.bw),
            num(b.2 / model::H100.bw),
            f.4 + b.4
        );
    }
    readme.push_str(&tc_readme);
    (doc, readme)
}

/// The tensor-core kernels' launches (`*_tc`): FLOPs, the model's lower-bound time on
/// each GPU, the fraction of the dense f16 tensor peak that time means, and what bounds
/// it. Returns the docs table (every such launch) and the README's rows (the f16 3×3
/// ResNet-50 layers at N = 32), each with an empty "measured" cell for
/// `scripts/gpu-bench.sh` to fill.
fn tensor_core_table(cases: &[Case], rows: &[Row]) -> (String, String) {
    let mut doc = String::from(
        "\n### Tensor-core launches against the dense f16 peak (prediction)\n\n\
         Lower-bound time of each tensor-core launch (`model::time_s`: DRAM bytes at full \
         bandwidth, the busiest SM's share of bytes and of the FLOPs at the dense f16 tensor \
         peak — 154.8 TFLOP/s A6000, 989.4 TFLOP/s H100 — with `⌈blocks / SMs⌉` blocks on \
         it), the fraction of that peak it means, and the bound that sets it (`bw`: \
         bandwidth, `waves`: the last wave's idle SMs, `mma`: the peak itself). The H100 \
         peak is `wgmma`'s; `mma.sync` reaches part of it, so the H100 column is looser \
         still. A model, not a measurement.\n\n\
         | op call | phase | kernel | GFLOP | blocks | A6000 µs | A6000 % peak | bound | H100 µs | H100 % peak | bound |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut readme = String::from(
        "\nIieuConv2d's tensor-core kernels (f16, N = 32, ResNet-50's 3×3 layers): the model's lower bound on the time and \
         the fraction of the dense f16 tensor peak that bound would mean. A measured time will \
         be longer (the bound ignores issue rates, the register-staged patch gather and the \
         epilogue; on an H100 the peak is `wgmma`'s, which `mma.sync` does not reach).\n\n\
         | IieuConv2d on tensor cores (phase: kernel) | GFLOP | A6000 lower bound, µs (% of dense f16 peak) | H100 lower bound, µs (% of peak) | measured |\n\
         |---|---|---|---|---|\n",
    );
    for r in rows
        .iter()
        .filter(|r| model::family(&r.rec.kernel).ends_with("_tc"))
    {
        let c = &cases[r.case];
        let mut cells = Vec::new();
        for (gi, g) in model::GPUS.iter().enumerate() {
            let t = r.time[gi];
            let pct = 100.0 * r.tr.tc_flops / t / g.tc16;
            let blocks = r.rec.blocks();
            // The busiest SM's blocks over the average: > 1 when the last wave is ragged.
            let share = blocks.div_ceil(g.sms) as f64 * g.sms as f64 / blocks.max(1) as f64;
            let bytes_bound = r.tr.dram / g.bw * share;
            let bound = if bytes_bound >= t * 0.999_999 {
                "bw"
            } else if share > 1.000_001 {
                "waves"
            } else {
                "mma"
            };
            cells.push((t, pct, bound));
        }
        let gflop = r.tr.tc_flops / 1e9;
        let _ = writeln!(
            doc,
            "| {} | {} | `{}` | {:.1} | {} | {} | {:.0} % | {} | {} | {:.0} % | {} |",
            c.label,
            c.phase,
            r.rec.kernel,
            gflop,
            r.rec.blocks(),
            us(cells[0].0),
            cells[0].1,
            cells[0].2,
            us(cells[1].0),
            cells[1].1,
            cells[1].2
        );
        if c.label.starts_with("iieu_conv 3x3")
            && c.label.starts_with("iieu_conv 3x3 nchw 32x")
            && c.label.ends_with(" f16")
        {
            let _ = writeln!(
                readme,
                "| {} ({}: `{}`) | {:.1} | {:.0} ({:.0} %) | {:.0} ({:.0} %) | — (no GPU yet) |",
                c.label,
                c.phase,
                model::family(&r.rec.kernel),
                gflop,
                cells[0].0 * 1e6,
                cells[0].1,
                cells[1].0 * 1e6,
                cells[1].1
            );
        }
    }
    (doc, readme)
}
