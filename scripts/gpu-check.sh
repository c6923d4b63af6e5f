#!/usr/bin/env bash
# The one-command device check for a machine with a real NVIDIA GPU:
#   1. installs the CUDA toolchain from PyPI if no nvcc is given (NVCC=...),
#   2. builds the kernels for this GPU's arch (CUDA_COMPUTE_CAP from nvidia-smi),
#   3. runs every GPU parity suite on the real device (tests/parity_*.rs, feature
#      `cuda`: the suites pick the real driver when one is present),
#   4. runs the CUDA benches (scripts/gpu-bench.sh) unless --no-bench,
#   5. appends date, device, driver, the test summary and the bench table to
#      docs/gpu-runs.md (commit it).
#
#   scripts/gpu-check.sh [--no-bench] [-- <criterion filter>]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bench=1
filter=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-bench) bench=0 ;;
    --) shift; filter=("$@"); break ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
command -v nvidia-smi >/dev/null || { echo "no nvidia-smi: not a GPU machine" >&2; exit 1; }
if [ -z "${NVCC:-}" ]; then
  if [ -x .cuda-toolchain/nvidia/cu13/bin/nvcc ]; then
    NVCC="$PWD/.cuda-toolchain/nvidia/cu13/bin/nvcc"
  else
    NVCC="$(scripts/install-cuda-toolchain.sh)"
  fi
fi
export NVCC
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$cap}"
device="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)"
stamp="$(date -u '+%Y-%m-%d %H:%M UTC')"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
mkdir -p target
parity=$(ls tests/parity_*.rs | xargs -n1 basename | sed 's/\.rs$//' | sed 's/^/--test /' | tr '\n' ' ')
log=target/gpu-check-tests.log
set +e
# shellcheck disable=SC2086
cargo test --release --features cuda $parity 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
summary="$(grep -E '^test result:' "$log" | awk '{p+=$4; f+=$6} END {print p" passed, "f" failed"}')"
table=""
if [ "$bench" = 1 ]; then
  scripts/gpu-bench.sh -- "${filter[@]}"
  table="$(cat target/gpu-bench.md)"
fi
{
  echo
  echo "## $stamp — $device (driver $driver, sm_$CUDA_COMPUTE_CAP), commit $commit"
  echo
  echo "Parity suites (\`cargo test --release --features cuda $parity\`): $summary (exit $rc)."
  if [ -n "$table" ]; then
    echo
    echo "$table"
  fi
} >> docs/gpu-runs.md
echo "appended to docs/gpu-runs.md"
exit "$rc"
