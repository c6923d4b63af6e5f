#!/usr/bin/env bash
# Regenerates src/cuda/abi_generated.rs from kernels/abi.h with bindgen (pinned
# version; needs libclang, installed here from Debian if missing). The generated
# file is checked in, so default builds need neither bindgen nor libclang; CI runs
# this script and fails if the checked-in file differs (`--check`).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
BINDGEN_VERSION=0.73.2
tools="$root/.tools"
bindgen="$tools/bin/bindgen"
# libclang itself (libclang.so*, libclang-NN.so*), not libclang-cpp, which bindgen
# cannot load and which some images ship alone.
if ! ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 \
  && ! ldconfig -p | grep -Eq 'libclang(-[0-9.]+)?\.so'; then
  echo "libclang not found; installing libclang-dev"
  apt-get update -qq && apt-get install -y -qq libclang-dev >/dev/null
fi
if [ ! -x "$bindgen" ] || ! "$bindgen" --version | grep -q "$BINDGEN_VERSION"; then
  cargo install --quiet --locked bindgen-cli --version "$BINDGEN_VERSION" --root "$tools"
fi
out="src/cuda/abi_generated.rs"
tmp="$(mktemp)"
"$bindgen" kernels/abi.h \
  --allowlist-file '.*abi\.h' \
  --with-derive-default \
  --no-doc-comments \
  --raw-line '//! Generated from kernels/abi.h by scripts/gen-abi.sh (bindgen '"$BINDGEN_VERSION"'). Do not edit.' \
  --raw-line '#![allow(non_camel_case_types, missing_docs)]' \
  -o "$tmp" -- -x c -std=c11 -Wno-pragma-once-outside-header
rustfmt --edition 2021 "$tmp"
if [ "${1:-}" = "--check" ]; then
  if ! diff -u "$out" "$tmp"; then
    echo "src/cuda/abi_generated.rs is out of date with kernels/abi.h: run scripts/gen-abi.sh" >&2
    exit 1
  fi
  echo "abi_generated.rs matches kernels/abi.h"
else
  mv "$tmp" "$out"
  echo "wrote $out"
fi
