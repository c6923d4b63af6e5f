#!/usr/bin/env bash
# Runs the CUDA benchmarks (benches/cuda_ops.rs) on this machine's GPU and prints a
# markdown table: op, shape, dtype, time, GB/s of compulsory traffic, ratio to the
# device-to-device copy floor of the same tensor, and the fraction of the device's
# peak memory bandwidth (for known devices). Writes target/gpu-bench.md (or --out FILE).
#
#   scripts/gpu-bench.sh [--docs] [--with-candle] [--no-run] [--criterion DIR] [--out FILE] [-- <criterion args, e.g. a filter>]
#
#   --docs     also replace the "GPU benchmarks" subsection of docs/performance.md between
#              the <!-- gpubench:begin --> / <!-- gpubench:end --> markers (appended at
#              the end of the file if absent); `--readme` is an alias (its old name)
#   --with-candle  also run benches/candle_cuda_conv.rs (feature candle-cuda: the fused
#              IieuConv2d against candle's CUDA conv2d; builds candle-kernels with nvcc)
#   --no-run   only rebuild the table from existing criterion results (needs no cargo;
#              scripts/gpu-check.sh uses it after running the prebuilt bench binary)
#   --criterion DIR  criterion's output folder (default: $CRITERION_HOME, else
#              $CARGO_TARGET_DIR/criterion, else target/criterion: where criterion writes)
#   --out FILE the table's file (default target/gpu-bench.md)
#
# Uses NVCC=.cuda-toolchain/nvidia/cu13/bin/nvcc when that exists and NVCC is unset,
# and CUDA_COMPUTE_CAP from nvidia-smi (so nvcc builds only this GPU's arch) when
# available and unset. AK_GPU_NAME=<name> overrides the device name (peak lookup).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

docs=0
candle=0
run=1
crit_dir="${CRITERION_HOME:-${CARGO_TARGET_DIR:-target}/criterion}"
table=target/gpu-bench.md
crit_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --docs|--readme) docs=1 ;;
    --with-candle) candle=1 ;;
    --no-run) run=0 ;;
    --) shift; crit_args=("$@"); break ;;
    --criterion) crit_dir="$2"; shift ;;
    --out) table="$2"; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# AK_GPU_NAME overrides the device name used for the peak-bandwidth lookup.
device="${AK_GPU_NAME:-}"
if command -v nvidia-smi >/dev/null 2>&1; then
  [ -n "$device" ] || device="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | sed 's/[[:space:]]*$//' || true)"
  if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
    cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .' || true)"
    if [[ "$cap" =~ ^[0-9]+$ ]]; then export CUDA_COMPUTE_CAP="$cap"; fi
  fi
fi
if [ -z "${NVCC:-}" ] && [ -x "$root/.cuda-toolchain/nvidia/cu13/bin/nvcc" ]; then
  export NVCC="$root/.cuda-toolchain/nvidia/cu13/bin/nvcc"
fi

if [ "$run" = 1 ]; then
  if [ -z "$device" ]; then
    echo "!!! nvidia-smi found no GPU: the bench will report whether a CUDA driver is present !!!" >&2
  fi
  # Stale results of a previous run must not mix into this table.
  rm -rf "$crit_dir"/cuda_* "$crit_dir"/candle_conv_*
  echo "device: ${device:-unknown}; NVCC=${NVCC:-<PATH>}; CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-<default archs>}" >&2
  cargo bench --features cuda --bench cuda_ops -- "${crit_args[@]}"
  if [ "$candle" = 1 ]; then
    cargo bench --features candle-cuda --bench candle_cuda_conv -- "${crit_args[@]}"
  fi
fi

mkdir -p "$(dirname "$table")"
python3 - "$device" "$(date -u +%Y-%m-%d)" "$crit_dir" > "$table" <<'PY'
import glob, json, os, re, sys

device, date, crit = sys.argv[1], sys.argv[2], sys.argv[3]

def peak_bw(name):
    """Peak memory bandwidth (B/s) of known devices, else None."""
    n = name.upper()
    if "H200" in n:
        return 4.8e12
    if "H100" in n:
        if "PCIE" in n:
            return 2.0e12
        if "SXM" in n or "HBM3" in n:
            return 3.35e12
        return None
    if "A100" in n:
        if "80GB" in n:
            return 2.04e12
        if "40GB" in n:
            return 1.56e12
        return None
    if "RTX A6000" in n:
        return 768e9
    if "L40S" in n:
        return 864e9
    if "4090" in n:
        return 1008e9
    return None

def peak_tc16(name):
    """Dense f16 tensor-core peak with f32 accumulation (FLOP/s) of known devices, else None."""
    n = name.upper()
    if "H200" in n:
        return 989.4e12
    if "H100" in n:
        if "PCIE" in n:
            return 756.5e12
        if "SXM" in n or "HBM3" in n:
            return 989.4e12
        return None
    if "A100" in n:
        return 312e12
    if "RTX A6000" in n:
        return 154.8e12
    return None

peak = peak_bw(device) if device else None
peak16 = peak_tc16(device) if device else None
group_re = re.compile(r"^cuda_(nchw|nlc)_([0-9x]+)_(f32|f16|bf16)$")
rows = {}
for bj in glob.glob(os.path.join(crit, "cuda_*/*/new/benchmark.json")):
    d = os.path.dirname(bj)
    with open(bj) as fh:
        meta = json.load(fh)
    with open(os.path.join(d, "estimates.json")) as fh:
        est = json.load(fh)
    m = group_re.match(meta.get("group_id", ""))
    if not m:
        continue
    slope = est.get("slope")
    ns = (slope or est["mean"])["point_estimate"]
    tp = meta.get("throughput") or {}
    rows.setdefault(m.groups(), {})[meta["function_id"]] = (ns, tp.get("Bytes"))

if not rows and not glob.glob(os.path.join(crit, "cuda_conv_*/*/new/benchmark.json")) \
        and not glob.glob(os.path.join(crit, "candle_conv_*/*/new/benchmark.json")):
    print(f"No CUDA benchmark results under {crit}/cuda_* (no GPU run yet).")
    sys.exit(0)

def fmt_time(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.3f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.1f} µs"
    return f"{ns:.0f} ns"

op_order = ["copy_floor", "acon_c_fwd", "acon_c_bwd", "iieu_b_3x3_fwd", "iieu_b_3x3_bwd",
            "iieu_b_1x1_fwd", "iieu_b_1x1_bwd", "iieu_dc_fwd", "iieu_dc_bwd",
            "aiec_train_fwd", "aiec_train_bwd"]
def op_key(op):
    return (op_order.index(op) if op in op_order else len(op_order), op)
def shape_key(k):
    # NCHW stages first (by channels), then NLC (by channels); f32, f16, bf16.
    layout, shape, dtype = k
    dims = [int(v) for v in shape.split("x")]
    return (layout != "nchw", dims[1] if layout == "nchw" else dims[-1],
            ["f32", "f16", "bf16"].index(dtype))

print(f"CUDA benchmarks (`scripts/gpu-bench.sh`, `benches/cuda_ops.rs`) on **{device or 'unknown device'}**, {date}.")
print("Time per call of the safe Rust API (launches, host-side validation and output allocation included);")
print("GB/s of compulsory traffic (each large input read once, each output written once, plus the parameters);")
print("ratio = time / time of a device-to-device copy of the same tensor (`copy_floor`)" +
      (f"; % peak = GB/s / {peak / 1e9:.0f} GB/s." if peak else "."))
print()
cols = ["op", "shape", "dtype", "time", "GB/s", "× copy"] + (["% peak BW"] if peak else [])
print("| " + " | ".join(cols) + " |")
print("|---|---|---|---:|---:|---:|" + ("---:|" if peak else ""))
for key in sorted(rows, key=shape_key):
    layout, shape, dtype = key
    ops = rows[key]
    floor = ops.get("copy_floor", (None, None))[0]
    for op in sorted(ops, key=op_key):
        ns, nbytes = ops[op]
        gbs = nbytes / ns if nbytes else None  # bytes/ns == GB/s
        ratio = f"{ns / floor:.2f}" if floor else "-"
        cells = [op, f"{layout.upper()} {shape}", dtype, fmt_time(ns),
                 f"{gbs:.0f}" if gbs is not None else "-", ratio]
        if peak:
            cells.append(f"{100 * gbs * 1e9 / peak:.0f}%" if gbs is not None else "-")
        print("| " + " | ".join(cells) + " |")

# IieuConv2d groups: cuda_conv_<N>x<C>x<H>x<W>_to_<O>_k<K>_<dtype>, throughput = FLOPs.
conv_re = re.compile(r"^cuda_conv_([0-9x]+)_to_([0-9]+)_k([0-9]+)_(f32|f16|bf16)$")
conv = {}
for bj in glob.glob(os.path.join(crit, "cuda_conv_*/*/new/benchmark.json")):
    d = os.path.dirname(bj)
    with open(bj) as fh:
        meta = json.load(fh)
    with open(os.path.join(d, "estimates.json")) as fh:
        est = json.load(fh)
    m = conv_re.match(meta.get("group_id", ""))
    if not m:
        continue
    ns = (est.get("slope") or est["mean"])["point_estimate"]
    tp = meta.get("throughput") or {}
    conv.setdefault(m.groups(), {})[meta["function_id"]] = (ns, tp.get("Elements"))
if conv:
    print()
    print("IieuConv2d (conv → BatchNorm training → IIEU-B, one op; CUDA-core FMA GEMMs): TFLOP/s of")
    print("the convolution's FLOPs (2·N·O·H'·W'·C·KH·KW forward, twice that backward), and the time of")
    print("the unfused IIEU-B (six launches) on a tensor of the output's shape for comparison.")
    print()
    print("| shape | k | dtype | fwd | fwd TFLOP/s | bwd | bwd TFLOP/s | unfused IIEU-B fwd |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    def ckey(k):
        shape, o, kk, dt = k
        return (int(kk) != 3, [int(v) for v in shape.split("x")][1], ["f32", "f16", "bf16"].index(dt))
    for key in sorted(conv, key=ckey):
        shape, o, kk, dt = key
        ops = conv[key]
        def cell(op):
            if op not in ops:
                return "-", "-"
            ns, fl = ops[op]
            return fmt_time(ns), (f"{fl / ns / 1e3:.2f}" if fl else "-")
        f_t, f_r = cell("iieu_conv_fwd")
        b_t, b_r = cell("iieu_conv_bwd")
        u_t, _ = cell("unfused_iieu_b_fwd")
        print(f"| {shape}→{o} | {kk}×{kk} | {dt} | {f_t} | {f_r} | {b_t} | {b_r} | {u_t} |")

# The fused op against candle's CUDA conv2d (benches/candle_cuda_conv.rs):
# candle_conv_<N>x<C>x<H>x<W>_to_<O>_k<K>_<dtype>, throughput = FLOPs.
cc_re = re.compile(r"^candle_conv_([0-9x]+)_to_([0-9]+)_k([0-9]+)_(f32|f16|bf16)$")
cc = {}
for bj in glob.glob(os.path.join(crit, "candle_conv_*/*/new/benchmark.json")):
    d = os.path.dirname(bj)
    with open(bj) as fh:
        meta = json.load(fh)
    with open(os.path.join(d, "estimates.json")) as fh:
        est = json.load(fh)
    m = cc_re.match(meta.get("group_id", ""))
    if not m:
        continue
    ns = (est.get("slope") or est["mean"])["point_estimate"]
    tp = meta.get("throughput") or {}
    cc.setdefault(m.groups(), {})[meta["function_id"]] = (ns, tp.get("Elements"))
if cc:
    print()
    print("IieuConv2d through candle (`iieu_conv2d`: conv → BatchNorm training → IIEU-B, one op)")
    print("against candle's own CUDA `conv2d` alone and conv2d → `BatchNorm::forward_train` →")
    print("the unfused IIEU-B, on candle's CUDA device (benches/candle_cuda_conv.rs; host wall")
    print("time per call, synchronised). TFLOP/s of the convolution's FLOPs; % peak: of the")
    print("device's dense f16 tensor peak (f32 accumulation)" + (f", {peak16 / 1e12:.1f} TFLOP/s" if peak16 else ", unknown for this device") + ".")
    print("fused / conv2d: the fused forward's time over the bare convolution's (goal ≤ 1.3 in f16).")
    print()
    print("| layer | dtype | fused fwd | TFLOP/s | % peak | candle conv2d | TFLOP/s | fused / conv2d | candle unfused fwd | fused fwd+bwd | candle unfused fwd+bwd |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    def cckey(k):
        shape, o, kk, dt = k
        return (["f16", "bf16", "f32"].index(dt), [int(v) for v in shape.split("x")][1])
    for key in sorted(cc, key=cckey):
        shape, o, kk, dt = key
        ops = cc[key]
        def t(op):
            return fmt_time(ops[op][0]) if op in ops else "-"
        def rate(op):
            if op not in ops or not ops[op][1]:
                return None
            return ops[op][1] / ops[op][0] * 1e9  # FLOP/s
        fr, cr = rate("fused_fwd"), rate("candle_conv2d")
        pct = f"{100 * fr / peak16:.1f}%" if fr and peak16 and dt != "f32" else "-"
        ratio = f"{ops['fused_fwd'][0] / ops['candle_conv2d'][0]:.2f}" if "fused_fwd" in ops and "candle_conv2d" in ops else "-"
        print(f"| {shape}→{o} {kk}×{kk} | {dt} | {t('fused_fwd')} | {fr / 1e12:.1f} | {pct} | {t('candle_conv2d')} | "
              f"{(cr / 1e12) if cr else float('nan'):.1f} | {ratio} | {t('candle_unfused_fwd')} | {t('fused_fwd_bwd')} | {t('candle_unfused_fwd_bwd')} |"
              if fr else f"| {shape}→{o} {kk}×{kk} | {dt} | - | - | - | {t('candle_conv2d')} | - | - | {t('candle_unfused_fwd')} | {t('fused_fwd_bwd')} | {t('candle_unfused_fwd_bwd')} |")
PY
cat "$table"

if [ "$docs" = 1 ]; then
  python3 - docs/performance.md "$table" <<'PY'
import sys
doc = sys.argv[1]
begin, end = "<!-- gpubench:begin -->", "<!-- gpubench:end -->"
text = open(doc).read()
body = open(sys.argv[2]).read().rstrip("\n")
block = (f"{begin}\n### GPU benchmarks\n\n"
         "Generated by `scripts/gpu-bench.sh --docs` (do not edit by hand).\n\n"
         f"{body}\n{end}")
if begin in text and end in text:
    a = text.index(begin)
    b = text.index(end) + len(end)
    text = text[:a] + block + text[b:]
else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
open(doc, "w").write(text)
print(f"{doc}: GPU benchmarks section updated")
PY
fi
