#!/usr/bin/env bash
# Regenerates kernels/emu/stubs/*.txt: the C symbol names (and return kinds) of the CUDA
# libraries that cudarc 0.19.10 links with its `dynamic-linking` feature (turned on by
# candle-core's `cuda`). build.rs (features `emulate` + `candle-cuda`) turns each list
# into a stub shared library so that test binaries link and load on a machine with no
# CUDA libraries; see kernels/emu/stubs.cpp.
#
#   scripts/gen-emu-stubs.sh            # rewrite the lists
#   scripts/gen-emu-stubs.sh --check    # fail if they differ from cudarc's sources
#
# Each line: `<name> <kind>`, kind = status (returns the library's status enum),
# str (returns const char*), size (returns size_t), void. Union over every CUDA
# version cudarc knows (an extra symbol is harmless).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
src="$(ls -d "$cargo_home"/registry/src/*/cudarc-0.19.10 2>/dev/null | head -n1)"
if [ -z "$src" ]; then
  (cd "$root" && cargo fetch --quiet)
  src="$(ls -d "$cargo_home"/registry/src/*/cudarc-0.19.10 | head -n1)"
fi
out="$root/kernels/emu/stubs"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# cudarc module -> library
for pair in driver:cuda cublas:cublas cublaslt:cublasLt curand:curand nvrtc:nvrtc runtime:cudart; do
  mod="${pair%%:*}"; lib="${pair##*:}"
  grep -ho 'pub unsafe fn [A-Za-z_0-9]*(.*) \(-> [^{]*\)\?{' "$src/src/$mod/sys/mod.rs" |
    grep -v 'fn is_culib_present\|fn culib' |
    sed -E 's/^pub unsafe fn ([A-Za-z_0-9]+)\(.*\) (-> (.*) )?\{$/\1 \3/' |
    awk '{ r = $0; sub(/^[^ ]+ */, "", r); k = "status";
           if (r == "") k = "void";
           else if (r ~ /c_char/) k = "str";
           else if (r == "usize") k = "size";
           else if (r !~ /(CUresult|Status_t|nvrtcResult|cudaError_t)$/) k = "other";
           print $1, k }' | LC_ALL=C sort -u > "$tmp/lib$lib.txt"
done
if [ "${1:-}" = "--check" ]; then
  diff -r "$tmp" "$out" && echo "emu stubs: up to date"
else
  rm -f "$out"/*.txt
  cp "$tmp"/*.txt "$out"/
  wc -l "$out"/*.txt
fi
