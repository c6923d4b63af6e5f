#!/usr/bin/env bash
# After `cargo build --features cuda`: prints the ptxas table (registers, spill
# bytes, shared memory per kernel and arch) from the build's ptxas -v output, fails
# on any spill, and checks in the SASS that the f32 elementwise kernels use 128-bit
# global loads (LDG.E.128). Writes target/kernel-report.md.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
profile_dir="${1:-target/debug}"
report="$(ls -t "$profile_dir"/build/activation-kernels-*/out/ptxas.txt 2>/dev/null | head -n1)"
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
print("| kernel | arch | registers | spill bytes | static smem (B) |")
print("|---|---|---:|---:|---:|")
for r in sorted(rows, key=lambda r: (r["k"], r["arch"])):
    print(f"| {r['k']} | {r['arch']} | {r['regs']} | {r['spill']} | {r['smem']} |")
spills = [r for r in rows if r["spill"]]
print(f"\n{len(rows)} kernel/arch pairs, {len(spills)} with spills.")
if spills:
    sys.exit(1)
PY
cat target/kernel-report.md
tc="$root/.cuda-toolchain/nvidia/cu13/bin"
if [ -x "$tc/cuobjdump" ]; then
  sass="$("$tc/cuobjdump" -sass -arch sm_86 "$fatbin" 2>/dev/null || true)"
  missing=0
  for k in $(grep -oE '^\| (acon_[a-z_]*fwd_f32|aiec_tau_(fwd|bwd)_f32|iieu_fwd_f32|iieu_dc_mix_f32|iieu_dc_dx_f32) ' target/kernel-report.md | tr -d '| ' | sort -u); do
    body="$(printf '%s\n' "$sass" | awk -v k="$k" '$0 ~ "Function : "k"$" {p=1; next} /Function :/ {p=0} p')"
    # (grep -c, not -q: with pipefail an early exit of grep would fail the pipe)
    if [ "$(grep -c 'LDG.E.128' <<<"$body")" -gt 0 ]; then
      echo "SASS sm_86 $k: LDG.E.128 present"
    else
      echo "SASS sm_86 $k: no 128-bit global load"; missing=1
    fi
  done
  [ "$missing" = 0 ] || { echo "an f32 elementwise kernel lacks 128-bit loads" >&2; exit 1; }
fi
