#!/usr/bin/env bash
# Installs the CUDA compiler toolchain (nvcc, ptxas, fatbinary, cuobjdump, nvdisasm,
# headers) from NVIDIA's PyPI wheels into ./.cuda-toolchain (git-ignored). No GPU and
# no driver are needed to compile. Prints the NVCC path to export.
#
#   scripts/install-cuda-toolchain.sh          # installs (idempotent)
#   export NVCC=$PWD/.cuda-toolchain/nvidia/cu13/bin/nvcc
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${CUDA_TOOLCHAIN_DIR:-$root/.cuda-toolchain}"
nvcc="$dest/nvidia/cu13/bin/nvcc"
if [ ! -x "$nvcc" ]; then
  # Pinned to 13.5: the committed ptxas table (kernels/emu/ptxas-table.tsv) was made
  # with it, and the emulated driver poses as CUDA 13.5 by default, so candle-kernels'
  # PTX (ISA 9.5) loads there; a newer nvcc's PTX would need a newer (emulated) driver.
  python3 -m pip install --quiet --disable-pip-version-check --target "$dest" \
    "nvidia-cuda-nvcc==13.5.*" "nvidia-cuda-runtime==13.5.*" "nvidia-cuda-crt==13.5.*" \
    "nvidia-cuda-cccl==13.*" "nvidia-cuda-cuobjdump==13.5.*" "nvidia-cuda-nvdisasm==13.5.*"
fi
# Some wheels ship binaries without the executable bit.
chmod +x "$dest"/nvidia/cu13/bin/* 2>/dev/null || true
if [ -d "$dest/nvidia/cu13/nvvm/bin" ]; then chmod +x "$dest"/nvidia/cu13/nvvm/bin/* || true; fi
"$nvcc" --version | tail -n 2 >&2
echo "$nvcc"
