#!/usr/bin/env bash
# After `cargo build --features cuda`: prints the ptxas table (registers, spill
# bytes, shared memory per kernel and arch) from the build's ptxas -v output, fails
# on any spill, and checks in the SASS that the f32 elementwise kernels use 128-bit
# global loads (LDG.E.128) and that the tensor-core kernels have HMMA, LDSM and LDGSTS
# on sm_80/86/90 (with their occupancy per arch in the report). Writes target/kernel-report.md. Checks that
# kernels/emu/ptxas-table.tsv (registers the emulated driver checks launches
# against) matches this build; `--write-table` rewrites it.
#
#   scripts/kernel-report.sh [--write-table] [--docs]
#
#   --docs   also put the table into docs/kernels.md between the
#            <!-- ptxas:begin ... --> / <!-- ptxas:end --> markers
#            (`--readme`, its name from when the table was in README.md, is an alias)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
write_table=0
docs=0
for arg in "$@"; do
  case "$arg" in
    --write-table) write_table=1 ;;
    --docs|--readme) docs=1 ;;
    *) echo "unknown option: $arg (options: --write-table, --docs)" >&2; exit 2 ;;
  esac
done
profile_dir="target/debug"
# The newest report of a build for every arch (a candle-cuda build with CUDA_COMPUTE_CAP
# set compiles one arch only: its report is not the one to read).
report=""
for r in $(ls -t "$profile_dir"/build/activation-kernels-*/out/ptxas.txt 2>/dev/null); do
  if grep -q "for 'sm_75'" "$r" && grep -q "for 'sm_90'" "$r"; then report="$r"; break; fi
done
fatbin="$(dirname "$report")/kernels.fatbin"
[ -f "$report" ] || { echo "no ptxas report: run cargo build --features cuda first" >&2; exit 1; }
python3 - "$report" > target/kernel-report.md <<'PY'
import re, sys
rows, cur = [], None
for line in open(sys.argv[1]):
    m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
    if m:
        cur = {"k": m.group(1), "arch": m.group(2), "regs": "?", "spill": 0, "smem": 0}
        rows.append(cur); continue
    if cur is None: continue
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m: cur["spill"] = int(m.group(1)) + int(m.group(2))
    m = re.search(r"Used (\d+) registers", line)
    if m: cur["regs"] = m.group(1)
    m = re.search(r"(\d+) bytes smem", line)
    if m: cur["smem"] = int(m.group(1))
archs = sorted({r["arch"] for r in rows}, key=lambda a: int(a[3:]))
by = {}
for r in rows:
    by.setdefault(r["k"], {})[r["arch"]] = r
print("Registers per thread by target arch (ptxas -v), spill bytes (stores + loads, all archs) and static shared memory per block.\n")
print("| kernel | " + " | ".join(archs) + " | spill bytes | static smem (B) |")
print("|---|" + "---:|" * len(archs) + "---:|---:|")
for k in sorted(by):
    d = by[k]
    regs = " | ".join(str(d[a]["regs"]) if a in d else "-" for a in archs)
    spill = sum(x["spill"] for x in d.values())
    smem = max(x["smem"] for x in d.values())
    print(f"| {k} | {regs} | {spill} | {smem} |")
spills = [r for r in rows if r["spill"]]
print(f"\n{len(by)} kernels, {len(rows)} kernel/arch pairs, {len(spills)} with spills.")
# Tensor-core kernels: the resulting theoretical occupancy per arch (threads per block
# from their launchers; per SM: 64 K registers allocated per warp in units of 256,
# shared memory + 1 KiB reserved per block on sm_80+, the arch's warp and block limits).
TC_THREADS = {"iieu_conv_fwd_tc_f16": 128, "iieu_conv_fwd_tc_bf16": 128, "iieu_conv_fwd_tc75_f16": 128,
              "iieu_conv_dgrad_tc_f16": 128, "iieu_conv_dgrad_tc_bf16": 128,
              "iieu_conv_wgrad_tc_f16": 128, "iieu_conv_wgrad_tc_bf16": 128,
              "iieu_conv_dgrad_tc75_f16": 128, "iieu_conv_wgrad_tc75_f16": 128}
# Kernels that run on sm_75 too (the Turing forms); the others trap there, never launched.
TC_SM75 = {"iieu_conv_fwd_tc75_f16", "iieu_conv_dgrad_tc75_f16", "iieu_conv_wgrad_tc75_f16"}
LIMITS = {  # max warps, max blocks, shared memory per SM (B), reserved per block (B)
    "sm_75": (32, 16, 65536, 0), "sm_80": (64, 32, 167936, 1024), "sm_86": (48, 16, 102400, 1024),
    "sm_89": (48, 24, 102400, 1024), "sm_90": (64, 32, 233472, 1024)}
tcs = [k for k in sorted(by) if k in TC_THREADS]
if tcs:
    print("\nTensor-core kernels: registers / static smem per block / resident blocks and warps per SM "
          "(theoretical occupancy). On sm_75 only the Turing forms (`*_tc75_*`) have a body; the "
          "others trap there and are never launched.\n")
    print("| kernel | threads | " + " | ".join(archs) + " |")
    print("|---|---:|" + "---|" * len(archs))
    for k in tcs:
        cells = []
        for a in archs:
            if a not in by[k]:
                continue
            if a == "sm_75" and k not in TC_SM75:
                cells.append("—")
                continue
            r = by[k][a]
            w = TC_THREADS[k] // 32
            mw, mb, sm, res = LIMITS[a]
            rpw = -(-int(r["regs"]) * 32 // 256) * 256
            blocks = min(65536 // (rpw * w), mw // w, mb, sm // (r["smem"] + res) if r["smem"] + res else mb)
            cells.append(f'{r["regs"]} r / {r["smem"]} B / {blocks} blk, {blocks * w} warps ({100 * blocks * w // mw} %)')
        print(f"| {k} | {TC_THREADS[k]} | " + " | ".join(cells) + " |")
if spills:
    sys.exit(1)
PY
cat target/kernel-report.md
# The emulated driver checks registers x threads per launch against this build's
# ptxas figures (kernels/emu/ptxas-table.tsv): it must match.
if [ "$write_table" = 1 ]; then
  python3 scripts/ptxas-table.py "$report" --write
else
  python3 scripts/ptxas-table.py "$report" --check
fi
# cuobjdump: next to $NVCC, else this checkout's (or the main worktree's) .cuda-toolchain,
# else PATH. Without one the SASS checks cannot run: said loudly, and an error in CI.
cuobjdump=""
main_wt="$(dirname "$(git rev-parse --path-format=absolute --git-common-dir 2>/dev/null || echo "$root/.git")")"
for cand in ${NVCC:+"$(dirname "$NVCC")/cuobjdump"} "$root/.cuda-toolchain/nvidia/cu13/bin/cuobjdump" \
            "$main_wt/.cuda-toolchain/nvidia/cu13/bin/cuobjdump" "$(command -v cuobjdump || true)"; do
  if [ -n "$cand" ] && [ -x "$cand" ]; then cuobjdump="$cand"; break; fi
done
if [ -z "$cuobjdump" ]; then
  echo "!!! SASS checks SKIPPED: no cuobjdump next to NVCC=${NVCC:-<unset>}, in .cuda-toolchain or on PATH !!!" >&2
  [ "${CI:-}" != true ] || { echo "kernel-report: CI needs the SASS checks" >&2; exit 1; }
else
  echo "SASS checks with $cuobjdump"
  sass="$("$cuobjdump" -sass -arch sm_86 "$fatbin" 2>/dev/null || true)"
  missing=0
  for k in $(grep -oE '^\| (acon_[a-z_]*fwd_f32|aiec_tau_(fwd|bwd)_f32|iieu_fwd_f32|iieu_dc_mix_f32|iieu_dc_dx_f32|iieu_conv_fwd_f32) ' target/kernel-report.md | tr -d '| ' | sort -u); do
    body="$(printf '%s\n' "$sass" | awk -v k="$k" '$0 ~ "Function : "k"$" {p=1; next} /Function :/ {p=0} p')"
    # (grep -c, not -q: with pipefail an early exit of grep would fail the pipe)
    if [ "$(grep -c 'LDG.E.128' <<<"$body")" -gt 0 ]; then
      echo "SASS sm_86 $k: LDG.E.128 present"
    else
      echo "SASS sm_86 $k: no 128-bit global load"; missing=1
    fi
  done
  [ "$missing" = 0 ] || { echo "an f32 elementwise kernel (or the conv weight-tile loader) lacks 128-bit loads" >&2; exit 1; }
  # sass_has PAT: the SASS of kernel $k on sm_$arch ($body) has instruction PAT (a
  # whole mnemonic); else MISSING, and the script fails below.
  sass_has() {
    if [ "$(grep -cE "[[:space:]]${1//./\\.}[[:space:];]" <<<"$body")" -gt 0 ]; then
      echo "SASS sm_$arch $k: $1 present"
    else
      echo "SASS sm_$arch $k: $1 MISSING"; missing=1
    fi
  }
  # An instruction (any form with this prefix) that must not be there.
  sass_lacks() {
    if [ "$(grep -cF "$1" <<<"$body")" -eq 0 ]; then
      echo "SASS sm_$arch $k: no $1 (as it should be)"
    else
      echo "SASS sm_$arch $k: $1 PRESENT, must not be"; missing=1
    fi
  }
  # The tensor-core kernels (issue 17) on sm_80, sm_86, sm_90: mma.sync m16n8k16 (HMMA),
  # ldmatrix (LDSM: the forward plain for B and .trans for A, the data gradient .trans
  # for both, the weight gradient plain for both, its operands being pixel-contiguous),
  # cp.async (LDGSTS, zero-fill by predicate; forward: W, weight gradient: dc) with its
  # commit / wait (LDGDEPBAR / DEPBAR.LE).
  for arch in 80 86 90; do
    sass="$("$cuobjdump" -sass -arch "sm_$arch" "$fatbin" 2>/dev/null || true)"
    for k in iieu_conv_fwd_tc_f16 iieu_conv_fwd_tc_bf16 iieu_conv_dgrad_tc_f16 iieu_conv_dgrad_tc_bf16 \
             iieu_conv_wgrad_tc_f16 iieu_conv_wgrad_tc_bf16; do
      body="$(printf '%s\n' "$sass" | awk -v k="$k" '$0 ~ "Function : "k"$" {p=1; next} /Function :/ {p=0} p')"
      hmma=HMMA.16816.F32
      [ "${k%bf16}" != "$k" ] && hmma=HMMA.16816.F32.BF16
      ldsm="LDSM.16.M88.4 LDSM.16.MT88.4"
      [ "${k#iieu_conv_dgrad_tc}" != "$k" ] && ldsm=LDSM.16.MT88.4
      [ "${k#iieu_conv_wgrad_tc}" != "$k" ] && ldsm=LDSM.16.M88.4
      for pat in "$hmma" $ldsm LDGSTS.E.BYPASS.128 LDGDEPBAR DEPBAR.LE; do
        sass_has "$pat"
      done
    done
  done
  # The TF32 kernels (f32 storage, opt-in) on sm_80, sm_86, sm_90: mma.sync m16n8k8
  # .tf32 (HMMA.1688.F32.TF32), cp.async (LDGSTS; forward: W, and x_pre for 1×1 layers;
  # data gradient: W and dc of 1×1 layers; weight gradient: dc and x_pre) with its
  # commit / wait; no LDSM (their fragments are 32-bit LDS: ldmatrix moves b16 elements).
  for arch in 80 86 90; do
    sass="$("$cuobjdump" -sass -arch "sm_$arch" "$fatbin" 2>/dev/null || true)"
    for k in iieu_conv_fwd_tc_tf32 iieu_conv_dgrad_tc_tf32 iieu_conv_wgrad_tc_tf32; do
      body="$(printf '%s\n' "$sass" | awk -v k="$k" '$0 ~ "Function : "k"$" {p=1; next} /Function :/ {p=0} p')"
      for pat in HMMA.1688.F32.TF32 LDGSTS.E.BYPASS.128 LDGDEPBAR DEPBAR.LE; do
        sass_has "$pat"
      done
      # LDSM would load 16-bit pairs: a TF32 fragment read by ldmatrix is wrong.
      sass_lacks LDSM
    done
  done
  # The Turing forms on sm_75 and sm_86: m16n8k8 (HMMA.1688) and ldmatrix, as their
  # sm_80 forms (their cp.async branches are compiled on sm_80+ but never taken: a
  # run-time false).
  for arch in 75 86; do
    sass="$("$cuobjdump" -sass -arch "sm_$arch" "$fatbin" 2>/dev/null || true)"
    for k in iieu_conv_fwd_tc75_f16 iieu_conv_dgrad_tc75_f16 iieu_conv_wgrad_tc75_f16; do
      body="$(printf '%s\n' "$sass" | awk -v k="$k" '$0 ~ "Function : "k"$" {p=1; next} /Function :/ {p=0} p')"
      ldsm="LDSM.16.M88.4 LDSM.16.MT88.4"
      [ "$k" = iieu_conv_dgrad_tc75_f16 ] && ldsm=LDSM.16.MT88.4
      [ "$k" = iieu_conv_wgrad_tc75_f16 ] && ldsm=LDSM.16.M88.4
      for pat in HMMA.1688.F32 $ldsm; do
        sass_has "$pat"
      done
      # m16n8k16 there would mean mma_step fell back to the sm_80 instruction.
      sass_lacks HMMA.16816
    done
  done
  [ "$missing" = 0 ] || { echo "a tensor-core kernel lost its HMMA / LDSM / LDGSTS (or a Turing form has HMMA.16816)" >&2; exit 1; }
fi
# --docs: put the table into docs/kernels.md between the ptxas markers.
if [ "$docs" = 1 ]; then
  python3 - docs/kernels.md target/kernel-report.md <<'PY'
import sys, re, datetime, subprocess
doc, table = sys.argv[1], open(sys.argv[2]).read()
nvcc = subprocess.run(["bash", "-c", "${NVCC:-nvcc} --version | tail -n1"], capture_output=True, text=True).stdout.strip()
body = (f"Generated by `scripts/kernel-report.sh --docs` after `cargo build --features cuda` "
        f"({datetime.date.today()}, {nvcc}).\n\n<details><summary>ptxas table</summary>\n\n{table}\n</details>\n")
s = open(doc).read()
pat = re.compile(r"(<!-- ptxas:begin[^>]*-->\n).*?(<!-- ptxas:end -->)", re.S)
if not pat.search(s):
    sys.exit(f"{doc} has no ptxas markers (<!-- ptxas:begin ... --> / <!-- ptxas:end -->)")
s = pat.sub(lambda m: m.group(1) + body + m.group(2), s, count=1)
open(doc, "w").write(s)
print(f"{doc}: ptxas table updated")
PY
fi
