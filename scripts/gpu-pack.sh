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
#   scripts/gpu-pack.sh [--archs 90] [--out gpu-pack] [--max-mib 56] [--with-candle] [--with-burn]
#
#   --with-candle  also tests/candle_cuda.rs and benches/candle_cuda_conv.rs (the fused
#                  IieuConv2d against candle's CUDA conv2d) with `--features candle-cuda` (builds
#                  candle and candle-kernels with nvcc: long). candle-core links the CUDA
#                  libraries (cuda, nvrtc, curand, cublas, cublasLt, cudart). To link
#                  without them, stub libraries with the CUDA 13 sonames are generated
#                  from cudarc's bindings (libcudart is the toolchain's real one); set
#                  AK_CUDA_LINK_DIR to a folder with the real libraries to use those
#                  instead. gpu-check.sh finds the real ones on the GPU machine (toolkit
#                  lib64, python3's NVIDIA wheels).
#   --with-burn    also tests/burn_cuda.rs with `--features burn-cuda` (burn's CUDA backend
#                  running this crate's kernels). cubecl-cuda links a prebuilt LLVM that
#                  tracel-llvm-bundler's build script downloads from github.com (cached
#                  in ~/.local/share/tracel): needs that network access once. Never built
#                  here yet (no such access): see docs/burn.md#cuda.
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
burn=0
while [ $# -gt 0 ]; do
  case "$1" in
    --archs) archs="$2"; shift ;;
    --out) out="$2"; shift ;;
    --max-mib) max_mib="$2"; shift ;;
    --with-candle) candle=1 ;;
    --with-burn) burn=1 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
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
nvcc_version="$("$NVCC" --version | grep -o 'release [0-9.]*' | sed -n 1p | cut -d' ' -f2)"
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
  tk="$(dirname "$(dirname "$NVCC")")"
  link_root="$target_dir/cuda-link-stubs"
  if [ -n "${AK_CUDA_LINK_DIR:-}" ]; then
    rm -rf "$link_root"; mkdir -p "$link_root"; ln -s "$AK_CUDA_LINK_DIR" "$link_root/lib64"
  else
    # cudarc links by name (cargo:rustc-link-lib=dylib=cublas ...) and searches
    # $CUDA_PATH/lib64: give it stubs that define every function its bindings declare,
    # with the sonames of CUDA 13's libraries, which the GPU machine resolves at run time.
    ver="$(sed -n '/^name = "cudarc"$/{n;s/^version = "\(.*\)"$/\1/p}' Cargo.lock)"
    cudarc=""
    for d in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$ver"; do cudarc="$d"; done
    [ -d "$cudarc/src" ] || { echo "gpu-pack: cudarc's source not found ($cudarc)" >&2; exit 1; }
    rm -rf "$link_root"; mkdir -p "$link_root/lib64"
    for spec in cuda:driver:libcuda.so.1 nvrtc:nvrtc:libnvrtc.so.13 curand:curand:libcurand.so.10 \
                cublas:cublas:libcublas.so.13 cublasLt:cublaslt:libcublasLt.so.13; do
      IFS=: read -r lib dir soname <<< "$spec"
      grep -ohE '^ +fn [A-Za-z_][A-Za-z0-9_]*\(' "$cudarc/src/$dir/sys/"*.rs | sed -E 's/^ +fn ([^(]*)\(/void \1(void) {}/' | sort -u > "$link_root/$lib.c"
      cc -shared -fPIC -w -Wl,-soname,"$soname" -o "$link_root/lib64/lib$lib.so" "$link_root/$lib.c"
      ln -s "lib$lib.so" "$link_root/lib64/$soname"  # for `--list` below
    done
    ln -s "$tk/lib/libcudart.so.13" "$link_root/lib64/libcudart.so"
    ln -s "$tk/lib/libcudart.so.13" "$link_root/lib64/libcudart.so.13"
  fi
  CUDA_PATH="$link_root" CUDA_COMPUTE_CAP="${archs##*,}" \
    NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -I$tk/include/cccl" \
    cargo test --release --features candle-cuda --no-run --test candle_cuda \
    --message-format=json-render-diagnostics >> "$msgs"
  CUDA_PATH="$link_root" CUDA_COMPUTE_CAP="${archs##*,}" \
    NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -I$tk/include/cccl" \
    cargo bench --features candle-cuda --no-run --bench candle_cuda_conv \
    --message-format=json-render-diagnostics >> "$msgs"
  AK_CUDA_LINK_DIR="$link_root/lib64"
fi
if [ "$burn" = 1 ]; then
  # CUDARC_CUDA_VERSION=12020: cubecl-cuda's build script reads the CUDA version from its
  # own build-dependency cudarc, which without it takes the newest version it knows and
  # emits cfgs (cuda_12080) for driver APIs the crate's cudarc, pinned to 12.2, lacks
  # (a compile error in cubecl-cuda); .ci/run sets the same (docs/burn.md).
  CUDARC_CUDA_VERSION=12020 cargo test --release --features burn-cuda --no-run --test burn_cuda \
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
want=$(( ${#tests[@]} / 2 + 1 + 2 * candle + burn ))
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
  if [ "$name" != cuda_ops ] && [ "$name" != candle_cuda_conv ]; then
    list="$( (LD_LIBRARY_PATH="${AK_CUDA_LINK_DIR:-}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" AK_SKIP_GPU_TESTS=1 \
      "$exe" --list 2>/dev/null || echo "gpu-pack: warning: $exe --list failed" >&2) | sed -n 's/: test$//p' | tr '\n' ' ')"
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
