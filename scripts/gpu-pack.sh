#!/usr/bin/env bash
# Builds, on a machine with cargo (no GPU needed), everything scripts/gpu-check.sh runs on
# a GPU machine that has no Rust toolchain: the GPU parity test binaries
# (tests/parity_*.rs, feature `cuda`, no `emulate`) and the CUDA criterion bench
# (benches/cuda_ops.rs), release builds with the kernels compiled by nvcc for
# AK_CUDA_ARCHS (default 90: H100 / H200). Each binary is stripped of debug info and
# gzip-compressed into the git-ignored folder gpu-pack/, with gpu-pack/manifest.txt
# (commit, date, archs, nvcc and rustc versions, test names, sizes, sha256).
# Fails if the pack is larger than --max-mib (default 56: the device tool carries at
# most 64 MiB, working tree included).
#
#   scripts/gpu-pack.sh [--archs 90] [--out gpu-pack] [--max-mib 56] [--with-candle]
#
#   --with-candle  also tests/candle_cuda.rs with `--features candle-cuda` (builds
#                  candle-kernels with nvcc: long). It links candle's CUDA libraries
#                  (cuda, nvrtc, curand, cublas, cublasLt), so it needs AK_CUDA_LINK_DIR=
#                  a folder holding libcuda.so, libnvrtc.so, libcurand.so, libcublas.so,
#                  libcublasLt.so (the toolkit's lib64 + lib64/stubs, or symlinks to
#                  PyPI wheels' libraries); gpu-check.sh then finds the real ones on the
#                  GPU machine (see its header). Not run on the dev machine so far.
#
# NVCC: $NVCC, else .cuda-toolchain/ of this checkout or of the main worktree, else
# scripts/install-cuda-toolchain.sh. CARGO_TARGET_DIR is honoured.
# Then, on the GPU machine (device tool): `scripts/gpu-check.sh` with carry ["gpu-pack"]
# (docs/gpu-runs.md has the exact call).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

archs="${AK_CUDA_ARCHS:-90}"
out="gpu-pack"
max_mib=56
candle=0
while [ $# -gt 0 ]; do
  case "$1" in
    --archs) archs="$2"; shift ;;
    --out) out="$2"; shift ;;
    --max-mib) max_mib="$2"; shift ;;
    --with-candle) candle=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for tool in cargo python3 strip gzip sha256sum; do
  command -v "$tool" >/dev/null || { echo "gpu-pack: $tool not found" >&2; exit 1; }
done

if [ -z "${NVCC:-}" ]; then
  main_wt="$(dirname "$(git rev-parse --path-format=absolute --git-common-dir 2>/dev/null || echo "$root/.git")")"
  for cand in "$root/.cuda-toolchain/nvidia/cu13/bin/nvcc" "$main_wt/.cuda-toolchain/nvidia/cu13/bin/nvcc"; do
    if [ -x "$cand" ]; then NVCC="$cand"; break; fi
  done
  [ -n "${NVCC:-}" ] || NVCC="$(scripts/install-cuda-toolchain.sh)"
fi
export NVCC
export AK_CUDA_ARCHS="$archs"
unset CUDA_COMPUTE_CAP  # AK_CUDA_ARCHS decides; candle-kernels gets its own below
nvcc_version="$("$NVCC" --version | grep -o 'release [0-9.]*' | head -1 | cut -d' ' -f2)"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
echo "gpu-pack: archs sm_${archs//,/ sm_}, nvcc $nvcc_version ($NVCC), target dir $target_dir" >&2

t0=$(date +%s)
tests=()
for f in tests/parity_*.rs; do tests+=(--test "$(basename "$f" .rs)"); done
msgs="$(mktemp)"
trap 'rm -f "$msgs"' EXIT
# Executables from cargo's JSON messages (stdout); diagnostics and progress on stderr.
cargo test --release --features cuda --no-run "${tests[@]}" --message-format=json-render-diagnostics >> "$msgs"
cargo bench --features cuda --no-run --bench cuda_ops --message-format=json-render-diagnostics >> "$msgs"
if [ "$candle" = 1 ]; then
  [ -n "${AK_CUDA_LINK_DIR:-}" ] || {
    echo "gpu-pack --with-candle: set AK_CUDA_LINK_DIR (see --help)" >&2; exit 1; }
  tk="$(dirname "$(dirname "$NVCC")")"
  CUDA_COMPUTE_CAP="${archs##*,}" NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -I$tk/include/cccl" \
    RUSTFLAGS="${RUSTFLAGS:-} -L native=$AK_CUDA_LINK_DIR" \
    cargo test --release --features candle-cuda --no-run --test candle_cuda \
    --message-format=json-render-diagnostics >> "$msgs"
fi
t1=$(date +%s)

rm -rf "$out"
mkdir -p "$out"
python3 - "$msgs" > "$out/.list" <<'PY'
import json, sys
seen = {}
for line in open(sys.argv[1]):
    if not line.startswith("{"):
        continue
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        t = m["target"]
        if t["kind"][0] in ("test", "bench"):
            seen[t["name"]] = m["executable"]
for name, exe in sorted(seen.items()):
    print(name, exe)
PY
want=$(( ${#tests[@]} / 2 + 1 + candle ))
got=$(wc -l < "$out/.list")
[ "$got" = "$want" ] || { echo "gpu-pack: expected $want executables, cargo reported $got:" >&2; cat "$out/.list" >&2; exit 1; }

{
  echo "# gpu-pack manifest (scripts/gpu-pack.sh); scripts/gpu-check.sh reads it"
  echo "commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo '+dirty')"
  echo "commit_subject=$(git log -1 --format=%s 2>/dev/null | cut -c1-100 || true)"
  echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "archs=$archs"
  echo "nvcc=$nvcc_version"
  echo "rustc=$(rustc --version)"
  echo "host=$(uname -srm)"
  echo "build_s=$((t1 - t0))"
} > "$out/manifest.txt"
while read -r name exe; do
  strip --strip-debug -o "$out/$name" "$exe"
  raw=$(stat -c %s "$out/$name")
  # The test names, for gpu-check's progress lines (`--list` runs no test, needs no GPU).
  if [ "$name" != cuda_ops ]; then
    list="$(LD_LIBRARY_PATH="${AK_CUDA_LINK_DIR:-}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" AK_SKIP_GPU_TESTS=1 \
      "$exe" --list 2>/dev/null | sed -n 's/: test$//p' | tr '\n' ' ')"
    echo "tests.$name=${list% }" >> "$out/manifest.txt"
  fi
  gzip -9 -n "$out/$name"
  echo "file.$name.gz=$(stat -c %s "$out/$name.gz") raw=$raw sha256=$(sha256sum "$out/$name.gz" | cut -c1-64)" >> "$out/manifest.txt"
done < "$out/.list"
rm -f "$out/.list"

bytes=$(du -sb "$out" | cut -f1)
mib=$(python3 -c "print(f'{$bytes / 2**20:.1f}')")
echo "total_bytes=$bytes" >> "$out/manifest.txt"
cat "$out/manifest.txt" >&2
echo "gpu-pack: $out is $mib MiB ($got binaries), built in $((t1 - t0)) s" >&2
if [ "$bytes" -gt $((max_mib * 1024 * 1024)) ]; then
  echo "gpu-pack: $out is $mib MiB, over the ${max_mib} MiB limit (the device tool carries 64 MiB with the tree)" >&2
  exit 1
fi
