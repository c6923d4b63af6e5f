#!/usr/bin/env bash
# Static check of the tensor-core primitives (kernels/mma.cuh) on real archs: compiles
# the emulator's self-test kernels (kernels/emu/selftest.cu, which use every primitive
# and also run on the emulated device, tests/emu_selftest.rs) with nvcc for sm_80,
# sm_86 and sm_90 — and sm_75 for its subset, mma m16n8k8 f16 + ldmatrix — and checks
# with cuobjdump -sass that each instruction became the SASS it must:
#
#   mma.sync m16n8k16 f16 / bf16    HMMA.16816.F32 / HMMA.16816.F32.BF16   sm_80+
#   mma.sync m16n8k8 f16 / tf32     HMMA.1688.F32 / HMMA.1688.F32.TF32     sm_75+ / sm_80+
#   ldmatrix .x1/.x2/.x4 (.trans)   LDSM.16.M88{,.2,.4} / LDSM.16.MT88{,.2,.4}  sm_75+
#   cp.async .ca / .cg / zfill      LDGSTS.E / LDGSTS.E.BYPASS.128 / LDGSTS.E.128.ZFILL  sm_80+
#   commit_group / wait_group       LDGDEPBAR / DEPBAR.LE                  sm_80+
#
# Fails (exit 1) if any is missing. Needs only nvcc and cuobjdump (no GPU):
#   NVCC=/path/to/nvcc scripts/mma-check.sh
# (default: $NVCC, else .cuda-toolchain/nvidia/cu13/bin/nvcc, else nvcc on PATH).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
nvcc="${NVCC:-}"
if [ -z "$nvcc" ]; then
  if [ -x "$root/.cuda-toolchain/nvidia/cu13/bin/nvcc" ]; then
    nvcc="$root/.cuda-toolchain/nvidia/cu13/bin/nvcc"
  else
    nvcc="$(command -v nvcc || true)"
  fi
fi
[ -n "$nvcc" ] && [ -x "$nvcc" ] || { echo "mma-check: no nvcc (set NVCC)" >&2; exit 2; }
bin="$(dirname "$nvcc")"
cuobjdump="$bin/cuobjdump"
[ -x "$cuobjdump" ] || cuobjdump="$(command -v cuobjdump || true)"
[ -n "$cuobjdump" ] || { echo "mma-check: no cuobjdump next to $nvcc" >&2; exit 2; }
inc=(-I kernels)
# nvcc from the PyPI wheels keeps libcu++ headers under include/cccl.
[ -d "$bin/../include/cccl" ] && inc+=(-I "$bin/../include/cccl")
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# The SASS of one kernel (cuobjdump prints "Function : name" before each).
kernel_sass() {  # file kernel
  awk -v k="$2" '$0 ~ "Function : "k"$" {p=1; next} /Function :/ {p=0} p' "$1"
}
fail=0
need() {  # sass-file arch kernel pattern...
  local f="$1" arch="$2" k="$3"
  shift 3
  local body
  body="$(kernel_sass "$f" "$k")"
  for pat in "$@"; do
    # (grep -c, not -q: with pipefail an early exit of grep would fail the pipe)
    if [ "$(grep -cE "[[:space:]]${pat//./\\.}[[:space:];]" <<<"$body")" -gt 0 ]; then
      echo "SASS $arch $k: $pat present"
    else
      echo "SASS $arch $k: $pat MISSING" >&2
      fail=1
    fi
  done
}

for arch in 75 80 86 90; do
  cubin="$tmp/selftest_sm$arch.cubin"
  nice -n 5 "$nvcc" -cubin -O3 -std=c++17 "${inc[@]}" -arch="sm_$arch" kernels/emu/selftest.cu -o "$cubin"
  "$cuobjdump" -sass "$cubin" > "$tmp/sm$arch.sass"
  f="$tmp/sm$arch.sass"
  need "$f" "sm_$arch" emu_selftest_mma HMMA.1688.F32 LDSM.16.M88 LDSM.16.M88.2 LDSM.16.M88.4 \
    LDSM.16.MT88 LDSM.16.MT88.2 LDSM.16.MT88.4
  if [ "$arch" -ge 80 ]; then
    need "$f" "sm_$arch" emu_selftest_mma HMMA.16816.F32 HMMA.16816.F32.BF16 HMMA.1688.F32.TF32
    need "$f" "sm_$arch" emu_selftest_cp_async LDGSTS.E LDGSTS.E.BYPASS.128 LDGSTS.E.128.ZFILL LDGDEPBAR DEPBAR.LE
  fi
done
if [ "$fail" != 0 ]; then
  echo "mma-check: a tensor-core primitive did not compile to its instruction" >&2
  exit 1
fi
echo "mma-check: HMMA, LDSM and LDGSTS present on sm_75 (subset), sm_80, sm_86, sm_90"
