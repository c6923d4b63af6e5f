//! The launch audit's models: the two GPUs, the occupancy calculator, the per-kernel
//! bytes model and the time model. Pure arithmetic on the launch log; no device.

use std::collections::HashMap;

/// One GPU as the audit models it.
pub struct Gpu {
    /// Short name for the tables.
    pub name: &'static str,
    /// The ptxas table's arch (registers and static shared memory per kernel).
    pub sm: u32,
    /// Streaming multiprocessors.
    pub sms: u64,
    /// DRAM bandwidth, bytes per second.
    pub bw: f64,
    /// FP32 CUDA-core peak, FLOP per second (the CUDA-core implicit-GEMM kernels).
    pub fp32: f64,
    /// Dense f16 / bf16 tensor-core peak with f32 accumulation, FLOP per second (the
    /// `*_tc` kernels: `mma.sync.m16n8k16`).
    pub tc16: f64,
    /// Resident threads per SM.
    pub threads_sm: u64,
    /// Resident blocks per SM.
    pub blocks_sm: u64,
    /// 32-bit registers per SM.
    pub regs_sm: u64,
    /// Shared memory per SM usable by blocks, bytes.
    pub smem_sm: u64,
}

/// RTX A6000 (GA102, sm_86): 84 SMs, 768 GB/s, 6 MB L2, 38.7 TFLOP/s FP32, 154.8
/// TFLOP/s dense f16 tensor with f32 accumulation (NVIDIA's RTX A6000 datasheet; the
/// professional GA102 runs f32 accumulation at the full rate).
pub const A6000: Gpu = Gpu {
    name: "A6000",
    sm: 86,
    sms: 84,
    bw: 768e9,
    fp32: 38.7e12,
    tc16: 154.8e12,
    threads_sm: 1536,
    blocks_sm: 16,
    regs_sm: 65536,
    smem_sm: 102_400,
};

/// H100 SXM (sm_90): 132 SMs, 3.35 TB/s, 50 MB L2, 66.9 TFLOP/s FP32, 989.4 TFLOP/s
/// dense f16 / bf16 tensor (NVIDIA's H100 datasheet; that figure is for `wgmma`, and
/// Ampere-style `mma.sync` on sm_90 reaches a fraction of it — so the bound is loose there).
pub const H100: Gpu = Gpu {
    name: "H100",
    sm: 90,
    sms: 132,
    bw: 3.35e12,
    fp32: 66.9e12,
    tc16: 989.4e12,
    threads_sm: 2048,
    blocks_sm: 32,
    regs_sm: 65536,
    smem_sm: 233_472,
};

/// The two modelled devices, in table order.
pub const GPUS: [&Gpu; 2] = [&A6000, &H100];

/// Registers per thread and static shared memory per block of every kernel, per arch
/// (`kernels/emu/ptxas-table.tsv`).
pub struct Ptxas(pub HashMap<(String, u32), (u64, u64)>);

impl Ptxas {
    /// Parses the table (lines `kernel<TAB>sm<TAB>registers<TAB>static smem`; `#` comments).
    pub fn parse(text: &str) -> Self {
        let mut m = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() < 4 {
                continue;
            }
            if let (Ok(sm), Ok(r), Ok(s)) = (f[1].parse(), f[2].parse(), f[3].parse()) {
                m.insert((f[0].to_string(), sm), (r, s));
            }
        }
        Ptxas(m)
    }

    /// (registers, static smem) of `kernel` on `sm`, if ptxas reported it.
    pub fn get(&self, kernel: &str, sm: u32) -> Option<(u64, u64)> {
        self.0.get(&(kernel.to_string(), sm)).copied()
    }
}

/// Occupancy of one launch on one GPU.
#[derive(Clone, Copy, Debug)]
pub struct Occupancy {
    /// Resident blocks per SM.
    pub blocks_per_sm: u64,
    /// What limits it: `threads`, `regs`, `smem` or `blocks`.
    pub limiter: &'static str,
    /// Resident warps / the SM's maximum warps.
    pub occupancy: f64,
    /// Grid blocks / (SMs × resident blocks per SM), fractional.
    pub waves: f64,
}

/// CUDA's occupancy calculation for sm_80+: warps per block rounded up; registers
/// allocated per warp in units of 256 (so `⌈regs·32/256⌉·256` per warp) from each of
/// the SM's 4 sub-partitions' 16 K (so `⌊16 K / per-warp⌋·4` warps fit, as
/// `cuda_occupancy.h` counts them); shared memory per block = static + dynamic + 1 KB the driver reserves per
/// block; resident blocks = the minimum over threads, registers, shared memory and the
/// block limit.
pub fn occupancy(g: &Gpu, threads: u64, regs: u64, smem: u64, blocks: u64) -> Occupancy {
    let warps = threads.div_ceil(32).max(1);
    let by_threads = g.threads_sm / (warps * 32);
    let by_regs = if regs == 0 {
        u64::MAX
    } else {
        let per_warp = (regs * 32).div_ceil(256) * 256;
        ((g.regs_sm / 4 / per_warp) * 4) / warps
    };
    let by_smem = g.smem_sm / (smem + 1024);
    let mut best = (g.blocks_sm, "blocks");
    for (v, what) in [
        (by_threads, "threads"),
        (by_regs, "regs"),
        (by_smem, "smem"),
    ] {
        if v < best.0 {
            best = (v, what);
        }
    }
    let r = best.0;
    Occupancy {
        blocks_per_sm: r,
        limiter: best.1,
        occupancy: (r * warps * 32) as f64 / g.threads_sm as f64,
        // No block fits (the launch would fail): 0 waves, so every fill check fails.
        waves: if r == 0 {
            0.0
        } else {
            blocks as f64 / (g.sms * r) as f64
        },
    }
}

/// Lower-bound time of one launch on `g`, in seconds: the largest of
/// * `dram / bandwidth` — the bytes at the full DRAM bandwidth;
/// * the busiest SM's share: blocks are spread evenly, so one SM runs
///   `⌈blocks / SMs⌉` blocks of `bytes / blocks` bytes each, and an SM is granted at
///   most its share `bandwidth / SMs` — so a grid of fewer blocks than SMs, or a
///   ragged last wave, cannot use the whole device;
/// * the busiest SM's share of the arithmetic: `⌈blocks / SMs⌉` blocks of
///   `flops / blocks` each at `peak / SMs`, with `peak` the FP32 CUDA-core peak for
///   `flops` and the dense f16 tensor-core peak for `tc_flops` (implicit-GEMM kernels
///   only) — so a grid that leaves part of the last wave's SMs idle is charged for it.
///
/// Launch overhead, latency and occupancy below what hides latency are not modelled
/// (occupancy is reported, not timed). Caches are not either: the bytes a kernel
/// re-reads from L2 (e.g. AIEC's `Wd` read once per sample, which fits an H100's
/// 50 MB L2) are charged at DRAM bandwidth, and one SM is held to its `1/SMs` share of
/// the bandwidth although it can draw more. So it is a model time, a lower bound only
/// for kernels whose bytes all come from DRAM once — not a prediction of the measured
/// time.
pub fn time_s(g: &Gpu, tr: &Traffic, blocks: u64) -> f64 {
    let bw_time = tr.dram / g.bw;
    let per_sm = blocks.div_ceil(g.sms) as f64;
    let share = per_sm / blocks.max(1) as f64 * g.sms as f64;
    let sm_time = share * tr.dram / g.bw;
    let math = share * (tr.flops / g.fp32 + tr.tc_flops / g.tc16);
    bw_time.max(sm_time).max(math)
}

/// The shapes a case's kernels are modelled on. Element counts are in elements,
/// storage size `b` in bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Dims {
    /// Storage bytes per element of the activation dtype.
    pub b: f64,
    /// Batch N.
    pub n: f64,
    /// Channels of the activation tensor (IIEU: O, the conv's output channels).
    pub c: f64,
    /// Positions per (sample, channel): H·W, L tokens, or IIEU's H'·W'.
    pub s: f64,
    /// IIEU: input channels C, input plane H·W, kernel KH·KW, patch-norm planes G'.
    pub cin: f64,
    /// IIEU: input plane H·W.
    pub hw_in: f64,
    /// IIEU: KH·KW.
    pub taps: f64,
    /// IIEU: patch-norm planes per sample (1 for all-channels or one group).
    pub gp: f64,
    /// IIEU-DC hidden width; meta-ACON generator width.
    pub hd: f64,
    /// AIEC classes K.
    pub k: f64,
    /// AIEC: the step writes `A = TAU(F)` (train) — the feature and dF passes move it.
    pub aiec_train: bool,
}

impl Dims {
    /// Activation elements N·C·S.
    pub fn e(&self) -> f64 {
        self.n * self.c * self.s
    }
    /// IIEU: `x_pre` elements N·C·H·W.
    pub fn epre(&self) -> f64 {
        self.n * self.cin * self.hw_in
    }
    /// IIEU: weight elements O·C·KH·KW (groups = 1).
    pub fn wlen(&self) -> f64 {
        self.c * self.cin * self.taps
    }
}

/// What one launch moves: `bytes` (every global load and store the code issues, L1/L2
/// re-reads included — docs/kernels.md's "bytes moved"), `min` (each input read once,
/// each output written once — that table's "minimum"), `dram` (what the time model
/// charges at DRAM bandwidth: `bytes`, except the implicit-GEMM kernels, whose tile
/// re-reads are on-chip by design: their unique bytes) and `flops`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Traffic {
    /// Bytes the code loads and stores.
    pub bytes: f64,
    /// The kernel's minimum bytes.
    pub min: f64,
    /// Bytes charged at DRAM bandwidth.
    pub dram: f64,
    /// Floating-point operations on CUDA cores (GEMM kernels; 0 elsewhere).
    pub flops: f64,
    /// Floating-point operations on tensor cores (the `*_tc` GEMM kernels; 0 elsewhere).
    pub tc_flops: f64,
}

fn t(bytes: f64, min: f64) -> Traffic {
    Traffic {
        bytes,
        min,
        dram: bytes,
        flops: 0.0,
        tc_flops: 0.0,
    }
}

/// The kernel family: the name without its `_f32|_f16|_bf16` storage suffix (kernels
/// that exist in f32 only keep `_f32`).
pub fn family(kernel: &str) -> &str {
    // The Turing (`*_tc75_f16`) and TF32 (`*_tc_tf32`) forms of the tensor-core GEMMs
    // belong to the `*_tc` family: the same tiles, reads and writes. (The audit's suite
    // runs neither — sm_86 limits, TF32 off — but a run with AK_ALLOW_TF32=1 or a forced
    // Turing path must still find their bytes model.)
    if let Some(f) = kernel
        .strip_suffix("75_f16")
        .or_else(|| kernel.strip_suffix("_tf32"))
    {
        if f.ends_with("_tc") && FAMILIES_WITH_DTYPE.contains(&f) {
            return f;
        }
    }
    for sfx in ["_f16", "_bf16", "_f32"] {
        if let Some(f) = kernel.strip_suffix(sfx) {
            if FAMILIES_WITH_DTYPE.contains(&f) {
                return f;
            }
        }
    }
    kernel
}

const FAMILIES_WITH_DTYPE: &[&str] = &[
    "acon_a_fwd",
    "acon_b_fwd",
    "acon_c_fwd",
    "acon_a_bwd_nchw",
    "acon_b_bwd_nchw",
    "acon_c_bwd_nchw",
    "acon_a_bwd_nlc",
    "acon_b_bwd_nlc",
    "acon_c_bwd_nlc",
    "acon_gap_nchw",
    "acon_gap_nlc",
    "acon_gap_add",
    "aiec_tau_fwd",
    "aiec_tau_bwd",
    "aiec_feat_nchw",
    "aiec_feat_nlc",
    "aiec_df_nchw",
    "aiec_df_nlc",
    "iieu_filter_norm",
    "iieu_patch_sq",
    "iieu_gap",
    "iieu_fwd",
    "iieu_bwd_sums",
    "iieu_bwd_params",
    "iieu_bwd_dx",
    "iieu_bwd_dxpre",
    "iieu_dc_gap",
    "iieu_dc_mix",
    "iieu_dc_dots",
    "iieu_dc_dx",
    "iieu_conv_fwd",
    "iieu_conv_fwd_tc",
    "iieu_conv_dgrad",
    "iieu_conv_dgrad_tc",
    "iieu_conv_wgrad",
    "iieu_conv_wgrad_tc",
    "iieu_conv_psi_bwd_sums",
    "iieu_conv_dc",
    "iieu_conv_wgrad_reduce",
    "cast_to_f32",
    "cast_from_f32",
];

/// Families held to the `bytes ≤ 1.25 × minimum` target (issue 15 item 2): ACON, AIEC's
/// TAU and feature passes, IIEU-B's adjuster passes.
pub fn ratio_target(fam: &str) -> bool {
    fam.starts_with("acon_a_")
        || fam.starts_with("acon_b_")
        || fam.starts_with("acon_c_")
        || fam.starts_with("acon_gap_")
        || matches!(
            fam,
            "aiec_tau_fwd"
                | "aiec_tau_bwd"
                | "aiec_feat_nchw"
                | "aiec_feat_nlc"
                | "aiec_df_nchw"
                | "aiec_df_nlc"
                | "iieu_gap"
                | "iieu_fwd"
                | "iieu_bwd_sums"
                | "iieu_bwd_dx"
        )
}

/// IIEU-B's channel split (mirrors `Split::new` and `plane_items` of src/cuda/iieu.rs):
/// the chunk count for `per` channels per group over `plane` pixels per (n, group),
/// vector width `16 / b`. A split kernel's grid has `splits · N·G' · plane / V` items.
pub fn iieu_splits(d: &Dims, per: f64, plane: f64) -> f64 {
    const TARGET: f64 = 65_536.0;
    const MAX: f64 = 64.0;
    const MIN_CHUNK: f64 = 8.0;
    let v = (16.0 / d.b).round();
    let items = if plane % v == 0.0 { plane / v } else { plane };
    let base = d.n * d.gp * items;
    let want = if base >= TARGET {
        1.0
    } else {
        (TARGET / base.max(1.0))
            .ceil()
            .min(MAX)
            .min((per / MIN_CHUNK).floor())
            .max(1.0)
    };
    let chunk = (per / want).ceil().max(1.0);
    (per / chunk).ceil().max(1.0)
}

/// Tiles of rows `N · tps` of an ACON `(N, L, C)` tile launch, from the launcher's own
/// tiling function (`activation_kernels::cuda::acon::nlc_tiling`): the grid's x is that
/// count capped at 65 535, so it cannot be read off the launch.
fn acon_nlc_row_tiles(d: &Dims) -> f64 {
    let g = activation_kernels::cuda::acon::nlc_tiling(d.n as usize, d.s as usize, d.c as usize);
    d.n * g.tps as f64
}

/// State a case carries from one launch to the next (a second-stage kernel reads what
/// the first stage wrote: its partials' size and count).
#[derive(Default)]
pub struct Carry {
    /// Bytes of tile partials the last ACON tile kernel wrote, and whether it was a
    /// backward (3 sums) or a GAP (1 sum).
    acon_partials: (f64, f64),
    /// Sample chunks of the last `iieu_dc_param_part` (its partial rows).
    dc_rows: f64,
    /// Chunks of the last `aiec_dwd_partial`.
    dwd_chunks: f64,
    /// Split-K slabs of the last `iieu_conv_wgrad`.
    wgrad_splits: f64,
}

/// The bytes model of one launch: `docs/kernels.md`'s "Bytes moved per element" table,
/// multiplied out for the case's shape. `blocks` and `grid` are the launch's (the number
/// of tiles, chunks or partial rows a kernel writes is its grid). `None` for a kernel
/// the model does not know (the audit fails on it: every kernel must be modelled).
pub fn traffic(kernel: &str, d: &Dims, grid: [u32; 3], carry: &mut Carry) -> Option<Traffic> {
    let fam = family(kernel);
    let b = d.b;
    let (n, c, s, e) = (d.n, d.c, d.s, d.e());
    let nc = n * c;
    let blocks = f64::from(grid[0]) * f64::from(grid[1]) * f64::from(grid[2]);
    let out = match fam {
        // ACON: x -> y (parameters per channel from L1).
        "acon_a_fwd" | "acon_b_fwd" | "acon_c_fwd" => t(2.0 * b * e, 2.0 * b * e),
        // dy, x -> dx, plus 3 f32 partials per tile (one tile per block).
        "acon_a_bwd_nchw" | "acon_b_bwd_nchw" | "acon_c_bwd_nchw" => {
            carry.acon_partials = (12.0 * blocks, 3.0);
            t(3.0 * b * e + 12.0 * blocks, 3.0 * b * e)
        }
        // As above with 3·C partials per tile of rows (N·tps tiles: the launcher's
        // tiling, not the grid, which is capped at 65 535), the column chunks of a
        // tile writing its C-length rows together.
        "acon_a_bwd_nlc" | "acon_b_bwd_nlc" | "acon_c_bwd_nlc" => {
            let tiles = acon_nlc_row_tiles(d);
            carry.acon_partials = (12.0 * c * tiles, 3.0);
            t(3.0 * b * e + 12.0 * c * tiles, 3.0 * b * e)
        }
        "acon_gap_nchw" => {
            carry.acon_partials = (4.0 * blocks, 1.0);
            t(b * e + 4.0 * blocks, b * e)
        }
        "acon_gap_nlc" => {
            let tiles = acon_nlc_row_tiles(d);
            carry.acon_partials = (4.0 * c * tiles, 1.0);
            t(b * e + 4.0 * c * tiles, b * e)
        }
        "acon_gap_add" => t(2.0 * b * e, 2.0 * b * e),
        // Tile partials -> ns·N·C totals.
        "acon_reduce_tiles" => {
            let (p, ns) = carry.acon_partials;
            let v = p + 4.0 * ns * nc;
            t(v, v)
        }
        // 3·N·C totals (+ a re-read row for per-(n,c)/per-sample β) -> C-sized grads.
        "acon_reduce_params" => t(16.0 * nc + 12.0 * c, 12.0 * nc + 12.0 * c),
        // Channel-wise generator fc layers, a warp (h, β, dh) or a thread (dg) per
        // output: every lane load counted (rows of W1/W2 and the sample's row re-read
        // per output from L1/L2; the minimum reads each input once).
        // h[n, j]: W1 row and GAP row per (n, j) -> h.
        "acon_gen_fc_h" => t(
            n * (8.0 * c * d.hd + 4.0 * d.hd),
            4.0 * nc + 4.0 * c * d.hd + 4.0 * n * d.hd,
        ),
        // β[n, c]: W2 row and h row per (n, c) -> β.
        "acon_gen_fc_beta" => t(
            n * (8.0 * c * d.hd + 4.0 * c),
            4.0 * n * d.hd + 4.0 * c * d.hd + 4.0 * nc,
        ),
        // dz, dh[n, j]: a block per (n, group of 8 j) reads the dβ and β rows once
        // (dz once per channel, stored by group 0) and W2's columns of its group
        // (rows of 8 consecutive floats, 32-byte sectors) -> dz, dh.
        "acon_gen_fc_dh" => {
            let groups = (d.hd / 8.0).ceil();
            t(
                n * (8.0 * c * groups + 4.0 * c * d.hd + 4.0 * d.hd + 4.0 * c),
                12.0 * nc + 4.0 * c * d.hd + 4.0 * n * d.hd,
            )
        }
        // dg[n, c]: W1 column and dh row per (n, c) -> dg.
        "acon_gen_fc_dg" => t(
            n * (8.0 * c * d.hd + 4.0 * c),
            4.0 * nc + 4.0 * c * d.hd + 4.0 * n * d.hd,
        ),
        "acon_gen_wgrad" => {
            let w = 4.0 * (2.0 * c * d.hd + c + d.hd);
            t(
                16.0 * nc * d.hd + 4.0 * n * (c + d.hd) + w,
                8.0 * n * (c + d.hd) + w,
            )
        }
        "acon_layer_gen_fwd" => t(4.0 * nc + 4.0 * n, 4.0 * nc + 4.0 * n),
        "acon_layer_gen_bwd" => t(12.0 * n, 12.0 * n),
        // AIEC.
        "aiec_tau_fwd" => t(2.0 * b * e, 2.0 * b * e),
        "aiec_tau_bwd" => t(3.0 * b * e, 3.0 * b * e),
        "aiec_feat_nchw" | "aiec_feat_nlc" => {
            let v = if d.aiec_train { 2.0 * b * e } else { b * e } + 4.0 * nc;
            t(v, v)
        }
        "aiec_df_nchw" => {
            let v = if d.aiec_train { 3.0 * b * e } else { b * e } + 4.0 * nc;
            t(v, v)
        }
        // The NLC kernel loads `da[n, c]` once per thread: each of the min(32, L) token
        // lanes of each of the grid's token chunks (grid z) loads it (from L1/L2).
        "aiec_df_nlc" => {
            let act = if d.aiec_train { 3.0 * b * e } else { b * e };
            let lanes = s.min(32.0) * f64::from(grid[2]);
            t(act + 4.0 * nc * lanes, act + 4.0 * nc)
        }
        "aiec_logits_f32" => {
            // GEMM tiles: `a` read once per class tile (grid x), `Wd` once per sample
            // tile (grid y), both through shared memory; z written once.
            let v =
                4.0 * nc * f64::from(grid[0]) + 4.0 * d.k * c * f64::from(grid[1]) + 4.0 * n * d.k;
            Traffic {
                flops: 2.0 * nc * d.k,
                ..t(v, 4.0 * nc + 4.0 * d.k * c + 4.0 * n * d.k)
            }
        }
        // Softmax stage: the logit row three times (argmax, Σ e, p), p written once;
        // label, loss, flag per sample.
        "aiec_dmu_fwd_f32" => t(n * (16.0 * d.k + 9.0), n * (8.0 * d.k + 9.0)),
        "aiec_count_f32" => t(20.0 * nc, 20.0 * nc),
        "aiec_rate_masks_f32" => t(25.0 * d.k * c, 25.0 * d.k * c),
        "aiec_gate_masks_f32" => t(9.0 * d.k * c, 9.0 * d.k * c),
        // Mask row of the label's class + a where masked (at most every channel).
        "aiec_gate_loss_f32" => t(n * (5.0 * c + 4.0), n * (5.0 * c + 4.0)),
        "aiec_loss_means_f32" | "aiec_loss_weights_f32" => t(8.0 * n + 12.0, 8.0 * n + 12.0),
        "aiec_mask_count_f32" => t(n * (c + 8.0), n * (c + 8.0)),
        // GEMM tiles: probs (+ label, dl) once per channel tile (grid x), `Wd` once per
        // sample tile (grid y); the gate term reads a, the mask and the count once
        // (the audit's train step has masks); da written once.
        "aiec_da_f32" => {
            let v = (4.0 * n * d.k + 8.0 * n) * f64::from(grid[0])
                + 4.0 * d.k * c * f64::from(grid[1])
                + 9.0 * nc
                + 4.0 * n;
            Traffic {
                flops: 2.0 * nc * d.k,
                ..t(v, 4.0 * n * d.k + 4.0 * d.k * c + 9.0 * nc + 12.0 * n)
            }
        }
        // GEMM tiles (32 × 32, grid x = channel tiles, y = class tiles, z = sample
        // chunks): `a` read once per class tile, probs (+ label, dl) once per channel
        // tile; chunks·K·C outputs (dWd itself with one chunk, else partials).
        "aiec_dwd_partial_f32" => {
            let chunks = f64::from(grid[2]);
            carry.dwd_chunks = chunks;
            let v = 4.0 * nc * f64::from(grid[1])
                + (4.0 * n * d.k + 8.0 * n) * f64::from(grid[0])
                + 4.0 * chunks * d.k * c;
            Traffic {
                flops: 2.0 * nc * d.k,
                ..t(v, 4.0 * nc + 4.0 * n * d.k + 8.0 * n + 4.0 * d.k * c)
            }
        }
        // Only with several chunks: the partials once, dWd written once.
        "aiec_dwd_reduce_f32" => {
            let v = 4.0 * carry.dwd_chunks * d.k * c + 4.0 * d.k * c;
            t(v, v)
        }
        // IIEU-B (x: N·O·P elements with O = c, P = s; x_pre: N·C·H·W; G' planes).
        "iieu_filter_norm" => t(b * d.wlen() + 8.0 * c, b * d.wlen() + 8.0 * c),
        // One f32 partial of q per (n, grp, pixel) and channel chunk.
        "iieu_patch_sq" => {
            let q = 4.0 * n * d.gp * d.hw_in;
            let splits = iieu_splits(d, d.cin / d.gp, d.hw_in);
            t(b * d.epre() + splits * q, b * d.epre() + q)
        }
        // (splits > 1 only) q = Σ of patch_sq's chunk partials.
        "iieu_sum_chunks" => {
            let q = 4.0 * n * d.gp * d.hw_in;
            let splits = iieu_splits(d, d.cin / d.gp, d.hw_in);
            t((splits + 1.0) * q, (splits + 1.0) * q)
        }
        "iieu_patch_window" => {
            let outs = n * d.gp * s;
            t(
                4.0 * d.taps * outs + 8.0 * outs,
                4.0 * n * d.gp * d.hw_in + 8.0 * outs,
            )
        }
        "iieu_gap" => t(b * e + 4.0 * nc, b * e + 4.0 * nc),
        "iieu_ln_fwd" => t(28.0 * nc + 4.0 * n, 20.0 * nc + 4.0 * n),
        // r_x is loaded once per pixel and chunk of 8 (fwd: FWD_CH) or 4 (bwd_sums:
        // SUMS_CH) channels of a group (kernels/iieu.cu).
        "iieu_fwd" => {
            let rx = 4.0 * n * d.gp * (c / d.gp / 8.0).ceil() * s;
            t(2.0 * b * e + rx, 2.0 * b * e + 4.0 * n * d.gp * s)
        }
        "iieu_bwd_sums" => {
            let rx = 4.0 * n * d.gp * (c / d.gp / 4.0).ceil() * s;
            t(
                2.0 * b * e + rx + 12.0 * nc,
                2.0 * b * e + 4.0 * n * d.gp * s + 12.0 * nc,
            )
        }
        "iieu_ln_bwd" => t(40.0 * nc, 24.0 * nc),
        "iieu_bwd_params" => {
            let v = 16.0 * nc + 2.0 * b * d.wlen() + 20.0 * c;
            t(v, v)
        }
        // Per (n, grp, pixel) and output-channel chunk: r_x read, a dr_x partial
        // written; with one chunk: r_x, ‖P‖ read and coef written, the minimum.
        "iieu_bwd_dx" => {
            let rx = n * d.gp * s;
            let splits = iieu_splits(d, c / d.gp, s);
            let v = 3.0 * b * e + 12.0 * rx;
            if splits > 1.0 {
                t(3.0 * b * e + 8.0 * splits * rx, v)
            } else {
                t(v, v)
            }
        }
        // (splits > 1 only) The partials, r_x and ‖P‖ read, coef written.
        "iieu_coef_reduce" => {
            let rx = n * d.gp * s;
            let splits = iieu_splits(d, c / d.gp, s);
            t(4.0 * (splits + 3.0) * rx, 16.0 * rx)
        }
        // Per (n, grp, pixel) and input-channel chunk: the ≤ KH·KW-tap coef gather.
        "iieu_bwd_dxpre" => {
            let splits = iieu_splits(d, d.cin / d.gp, d.hw_in);
            t(
                2.0 * b * d.epre() + 4.0 * d.taps * splits * n * d.gp * d.hw_in,
                2.0 * b * d.epre() + 4.0 * n * d.gp * s,
            )
        }
        // IIEU-DC (x, res: N·C·S; hidden Hd; len floats per partial row).
        "iieu_dc_gap" => t(2.0 * b * e + 8.0 * nc, 2.0 * b * e + 8.0 * nc),
        "iieu_dc_mix" | "iieu_dc_dots" => t(3.0 * b * e + 8.0 * nc, 3.0 * b * e + 8.0 * nc),
        // The coupler's stages (hidden Hd; per-sample rows of 2C / 2Hd f32; parameter
        // re-reads per sample or item charged as issued, L1/L2 hits included).
        "iieu_dc_w1_norms_f32" => t(4.0 * c * d.hd + 8.0 * d.hd, 4.0 * c * d.hd + 8.0 * d.hd),
        // gap 3 passes, LN-1 affine, â and a' written, 3 scalars.
        "iieu_dc_ln1_f32" => t(n * (56.0 * c + 12.0), n * (24.0 * c + 12.0) + 16.0 * c),
        // Warp per (n, j): a W1 row (or W2 column) and the sample's two 2C rows' halves.
        "iieu_dc_hidden_f32" | "iieu_dc_dhp_f32" => t(
            n * d.hd * (12.0 * c + 8.0),
            n * (8.0 * c + 8.0 * d.hd) + 4.0 * c * d.hd,
        ),
        // Per (n, 128-channel chunk): h statistics and h' (~64·Hd bytes of h, st and the
        // term-B / adjuster parameters), then per channel a W2 row and 2 outputs.
        "iieu_dc_out_f32" => {
            let chunks = (c / 128.0).ceil();
            t(
                n * chunks * 64.0 * d.hd + n * (4.0 * c * d.hd + 8.0 * c),
                n * (8.0 * d.hd + 8.0 * c) + 4.0 * c * d.hd + 28.0 * d.hd,
            )
        }
        // c twice (statistics) and once more, LN-2 affine, λ written.
        "iieu_dc_ln2_f32" => t(n * 48.0 * c, n * 16.0 * c + 16.0 * c),
        // c and pd once (c cached in shared memory), LN-2 affine, dc and vrow's
        // l2w | l2b written.
        "iieu_dc_ln2_bwd_f32" => t(n * 56.0 * c, n * 40.0 * c + 16.0 * c),
        // h, dh' in; γ₂/β₂/η₂/norms per hidden unit; dh, h', vrow's g2|b2|η|wc, dr_x out.
        "iieu_dc_adj_bwd_f32" => t(
            n * (92.0 * d.hd + 16.0),
            n * (56.0 * d.hd + 16.0) + 28.0 * d.hd,
        ),
        // Per (n, chunk): dh into shared memory; per channel a W1 column, a', st, da' out.
        "iieu_dc_da_f32" => {
            let chunks = (c / 128.0).ceil();
            t(
                n * chunks * 8.0 * d.hd + n * c * (4.0 * d.hd + 32.0),
                n * (8.0 * d.hd + 16.0 * c) + 4.0 * c * d.hd,
            )
        }
        // da' and â read once (da cached), vrow's l1w | l1b and dgap written.
        "iieu_dc_ln1_bwd_f32" => t(n * (56.0 * c + 4.0), n * (40.0 * c + 4.0) + 8.0 * c),
        // Stage 1 (grid y = chunks): per sample, one f32 per vector entry (8C + 6Hd) and
        // four per outer-product entry (2·C·Hd); one partial row of PL floats per chunk.
        "iieu_dc_param_part_f32" => {
            let chunks = f64::from(grid[1]);
            let pl = 8.0 * c + 2.0 * c * d.hd + 6.0 * d.hd;
            carry.dc_rows = chunks;
            t(
                n * (4.0 * (8.0 * c + 6.0 * d.hd) + 32.0 * c * d.hd) + 4.0 * chunks * pl,
                n * (4.0 * (8.0 * c + 6.0 * d.hd) + 16.0 * (c + d.hd)) + 4.0 * pl,
            )
        }
        // Stage 2: the rows in order (+ the r_w coefficients and W1 for the W1 region).
        "iieu_dc_param_sum_f32" => {
            let glen = 8.0 * c + 2.0 * c * d.hd + 5.0 * d.hd;
            let rows = carry.dc_rows.max(1.0);
            let v = 4.0 * rows * glen + 4.0 * rows * c * d.hd + 4.0 * c * d.hd + 4.0 * glen;
            t(v, 4.0 * rows * (glen + d.hd) + 4.0 * c * d.hd + 4.0 * glen)
        }
        "iieu_dc_dx" => t(3.0 * b * e + 16.0 * nc, 3.0 * b * e + 16.0 * nc),
        // IieuConv2d: implicit GEMMs (64×64×16 tiles; tile re-reads are on-chip by
        // design, so the DRAM charge is the unique bytes) and the small passes.
        // The tensor-core forward (f16 / bf16, sm_80+) has the same 64×64 output tiles,
        // reads and writes (its 32-deep stages change the on-chip re-reads only).
        "iieu_conv_fwd" | "iieu_conv_fwd_tc" => {
            let mtiles = s / 64.0;
            let v = b * (d.epre() + d.wlen() + e) + 4.0 * n * d.gp * s + 8.0 * nc * mtiles.ceil();
            gemm(d, v)
        }
        // Data gradient: dc and W read, the r_x path `add` read and dx_pre written (both
        // N·C·H·W). The tensor-core data gradient (f16 / bf16, sm_80+) likewise: the same
        // 64×64 output tiles, reads and writes.
        "iieu_conv_dgrad" | "iieu_conv_dgrad_tc" => gemm(d, b * (e + d.wlen() + 2.0 * d.epre())),
        // The tensor-core weight gradient (f16 / bf16, sm_80+): the same grid, chunks,
        // reads and f32 partials (its 32-pixel stages change the on-chip re-reads only).
        "iieu_conv_wgrad" | "iieu_conv_wgrad_tc" => {
            let splits = f64::from(grid[2]);
            carry.wgrad_splits = splits;
            gemm(d, b * (d.epre() + e) + 4.0 * splits * d.wlen())
        }
        "iieu_conv_wgrad_reduce_f32" | "iieu_conv_wgrad_reduce" => {
            let v = 4.0 * carry.wgrad_splits.max(1.0) * d.wlen() + b * d.wlen();
            t(v, v)
        }
        "iieu_conv_rx_f32" | "iieu_conv_rx" => {
            let v = 12.0 * n * d.gp * s;
            t(v, v)
        }
        "iieu_conv_plane_stats_f32" | "iieu_conv_plane_stats" => {
            let v = 8.0 * nc * (s / 64.0).ceil() + 8.0 * nc;
            t(v, v)
        }
        "iieu_conv_psi_f32"
        | "iieu_conv_psi"
        | "iieu_conv_psi_bwd_params_f32"
        | "iieu_conv_psi_bwd_params" => {
            let v = 16.0 * nc + 32.0 * c;
            t(v, v)
        }
        "iieu_conv_psi_bwd_sums" => t(2.0 * b * e + 8.0 * nc, 2.0 * b * e + 8.0 * nc),
        "iieu_conv_dc" => t(3.0 * b * e, 3.0 * b * e),
        _ => return None,
    };
    // The tensor-core kernels' GEMM FLOPs run on tensor cores; TF32 at half the dense
    // f16 rate on both GPUs (A6000 77.4, H100 494.7 TFLOP/s), charged as twice the FLOPs.
    let tf32 = if kernel.ends_with("_tf32") { 2.0 } else { 1.0 };
    let out = if fam.ends_with("_tc") {
        Traffic {
            tc_flops: (out.tc_flops + out.flops) * tf32,
            flops: 0.0,
            ..out
        }
    } else {
        out
    };
    Some(out)
}

/// The split-K alternative of a tensor-core IieuConv2d GEMM launch (`*_tc`): the same
/// 64 × 64 output tiles with the GEMM's reduction split into the fewest chunks that give
/// ≥ 2 waves on both GPUs at the launch's resident blocks per SM (issue 15's `fill`
/// through waves; the occupancy route is closed to a 128-register GEMM), each chunk
/// writing f32 partials that a fixed-order pass sums — as `iieu_conv_wgrad_tc` already
/// does, and as the forward (with its epilogue: stats, `‖P‖²`) and the data gradient
/// (with its `add`) would in a second pass.
#[derive(Clone, Copy, Debug)]
pub struct SplitAlt {
    /// Chunks of the reduction.
    pub splits: u64,
    /// Modelled time per GPU ([`GPUS`] order): the GEMM launch with the partials' writes
    /// (`time_s` at `tiles · splits` blocks) plus the extra bytes of the ordered sum at
    /// full DRAM bandwidth.
    pub time: [f64; 2],
}

/// [`SplitAlt`] of a launch of `kernel` with `grid`, traffic `tr` and `resident` blocks
/// per SM on each GPU; `None` when `kernel` is no tensor-core IieuConv2d GEMM, or when
/// the reduction has fewer 32-deep slabs (weight gradient: 16-pixel slabs, as
/// `wgrad_splits_tc` counts them) than the chunks two waves would take.
///
/// Bytes: forward / data gradient (one chunk today) — the GEMM writes `4·S` bytes per
/// output element instead of its `b`-byte result, and the second pass reads them and
/// writes the result; weight gradient (`S₀ = grid.z` chunks today) — `4·(S − S₀)` more
/// bytes per `dW` entry written, and read again by `iieu_conv_wgrad_reduce`. All at DRAM
/// bandwidth: an H100 keeps up to ~40 MB of partials in its L2, which the model does
/// not credit (nor any cache), so on an H100 the alternative's true cost is lower.
pub fn split_alternative(
    kernel: &str,
    d: &Dims,
    grid: [u32; 3],
    tr: &Traffic,
    resident: [u64; 2],
) -> Option<SplitAlt> {
    let (s0, slabs, elems, out_bytes) = match family(kernel) {
        "iieu_conv_fwd_tc" => (1, (d.cin * d.taps / 32.0).ceil(), d.e(), d.b * d.e()),
        "iieu_conv_dgrad_tc" => (1, (d.c * d.taps / 32.0).ceil(), d.epre(), d.b * d.epre()),
        "iieu_conv_wgrad_tc" => (u64::from(grid[2]), (d.n * d.s / 16.0).ceil(), d.wlen(), 0.0),
        _ => return None,
    };
    let tiles = (u64::from(grid[0]) * u64::from(grid[1])).max(1);
    let want = GPUS
        .iter()
        .zip(resident)
        .map(|(g, r)| (2 * g.sms * r).div_ceil(tiles))
        .max()?;
    let splits = want.max(s0 + 1);
    if splits as f64 > slabs {
        return None;
    }
    let sf = splits as f64;
    let (gemm_extra, pass_extra) = if out_bytes > 0.0 {
        (4.0 * sf * elems - out_bytes, 4.0 * sf * elems + out_bytes)
    } else {
        let more = 4.0 * (splits - s0) as f64 * elems;
        (more, more)
    };
    let alt = Traffic {
        bytes: tr.bytes + gemm_extra,
        dram: tr.dram + gemm_extra,
        ..*tr
    };
    let time = [0, 1].map(|i| time_s(GPUS[i], &alt, tiles * splits) + pass_extra / GPUS[i].bw);
    Some(SplitAlt { splits, time })
}

/// An implicit-GEMM launch: `unique` bytes, 2·M·N·K FLOPs (M·N = the output elements
/// N·O·H'·W', K = C·KH·KW).
fn gemm(d: &Dims, unique: f64) -> Traffic {
    Traffic {
        bytes: unique,
        min: unique,
        dram: unique,
        flops: 2.0 * d.e() * d.cin * d.taps,
        tc_flops: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::{family, split_alternative, time_s, Dims, Traffic, GPUS};

    #[test]
    fn tensor_core_forms_share_their_family() {
        for k in [
            "iieu_conv_fwd_tc_f16",
            "iieu_conv_fwd_tc_bf16",
            "iieu_conv_fwd_tc_tf32",
            "iieu_conv_fwd_tc75_f16",
        ] {
            assert_eq!(family(k), "iieu_conv_fwd_tc", "{k}");
        }
        assert_eq!(family("iieu_conv_wgrad_tc_tf32"), "iieu_conv_wgrad_tc");
        assert_eq!(family("iieu_conv_dgrad_tc75_f16"), "iieu_conv_dgrad_tc");
        assert_eq!(family("iieu_conv_fwd_f32"), "iieu_conv_fwd");
        // Not a family with a dtype suffix: unchanged.
        assert_eq!(family("iieu_conv_rx_f32"), "iieu_conv_rx_f32");
    }

    /// ResNet-50's 3×3 512 → 512 layer at 7×7, N = 32, f16 (the audit suite's shape).
    fn stage4() -> Dims {
        Dims {
            b: 2.0,
            n: 32.0,
            c: 512.0,
            s: 49.0,
            cin: 512.0,
            hw_in: 49.0,
            taps: 9.0,
            gp: 1.0,
            ..Dims::default()
        }
    }

    #[test]
    fn split_alternative_reaches_two_waves_and_pays_for_its_partials() {
        let d = stage4();
        let tr = Traffic {
            bytes: 8e6,
            min: 8e6,
            dram: 8e6,
            flops: 0.0,
            tc_flops: 2.0 * d.e() * d.cin * d.taps,
        };
        // Forward: 32 × 8 tiles at 4 blocks/SM: the H100 needs ⌈1056 / 256⌉ = 5 chunks,
        // the A6000 ⌈672 / 256⌉ = 3.
        let alt = split_alternative("iieu_conv_fwd_tc_f16", &d, [32, 8, 1], &tr, [4, 4]).unwrap();
        assert_eq!(alt.splits, 5);
        let e = d.e();
        for (i, g) in GPUS.iter().enumerate() {
            // The GEMM writes 5 f32 partials per output instead of its f16 result; the
            // second pass reads them and writes the result.
            let gemm = Traffic {
                bytes: 8e6 + 20.0 * e - 2.0 * e,
                dram: 8e6 + 20.0 * e - 2.0 * e,
                ..tr
            };
            let want = time_s(g, &gemm, 256 * 5) + (20.0 * e + 2.0 * e) / g.bw;
            assert!((alt.time[i] - want).abs() <= 1e-12 * want, "{}", g.name);
        }
        // Weight gradient already in 50 chunks (of 98 16-pixel slabs): one more at least, and only the extra
        // chunks' partials are charged.
        let alt =
            split_alternative("iieu_conv_wgrad_tc_f16", &d, [8, 72, 50], &tr, [4, 4]).unwrap();
        assert_eq!(alt.splits, 51);
        let more = 4.0 * d.wlen();
        let gemm = Traffic {
            bytes: 8e6 + more,
            dram: 8e6 + more,
            ..tr
        };
        let want = time_s(GPUS[1], &gemm, 576 * 51) + more / GPUS[1].bw;
        assert!((alt.time[1] - want).abs() <= 1e-12 * want);
        // Pinned by hand on the H100 (132 SMs, 3.35 TB/s, 989.4 TFLOP/s): the GEMM at
        // 1280 blocks (⌈1280 / 132⌉ = 10 per SM: share 1.03125) is math-bound,
        // 7.398 GFLOP → 7.478 µs · 1.03125 = 7.711 µs, plus the second pass's
        // 22 · 802 816 bytes at DRAM bandwidth (5.272 µs): 12.98 µs.
        let alt = split_alternative("iieu_conv_fwd_tc_f16", &d, [32, 8, 1], &tr, [4, 4]).unwrap();
        assert!(
            (alt.time[1] - 12.984e-6).abs() < 0.001e-6,
            "{:e}",
            alt.time[1]
        );
        // The data gradient's partials are x_pre-sized (N·C·H·W), its depth O·KH·KW.
        let dg = split_alternative("iieu_conv_dgrad_tc_bf16", &d, [32, 8, 1], &tr, [4, 4]).unwrap();
        assert_eq!(dg.splits, 5);
        let ep = d.epre();
        let gemm = Traffic {
            bytes: 8e6 + 18.0 * ep,
            dram: 8e6 + 18.0 * ep,
            ..tr
        };
        let want = time_s(GPUS[0], &gemm, 256 * 5) + 22.0 * ep / GPUS[0].bw;
        assert!((dg.time[0] - want).abs() <= 1e-12 * want);
        // Weight gradient: 98 16-pixel slabs cannot hold the 99 chunks past 98.
        assert!(
            split_alternative("iieu_conv_wgrad_tc_f16", &d, [8, 72, 98], &tr, [4, 4]).is_none()
        );
        // Not a tensor-core GEMM, or too shallow a reduction for the chunks: none.
        assert!(split_alternative("iieu_conv_fwd_f32", &d, [32, 8, 1], &tr, [4, 4]).is_none());
        let shallow = Dims {
            cin: 4.0,
            taps: 1.0,
            ..d
        };
        assert!(
            split_alternative("iieu_conv_fwd_tc_f16", &shallow, [32, 8, 1], &tr, [4, 4]).is_none()
        );
    }
}
