// common.cuh — shared device helpers for every kernel family: storage-type
// conversions (f32 / f16 / bf16 storage, f32 arithmetic), warp and block
// reductions, grid-stride helpers. Compiles under nvcc and, with
// emu/cuda_emu.h, as host C++ for the emulated device (feature `emulate`).
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#define EMU_REGISTER(name)
#define DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#else
#include "emu/cuda_emu.h"
#define DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(emu::dynamic_smem())
#endif

#include "abi.h"

namespace ak {

// ---- storage <-> f32 ----
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + __expf(-x)); }

// ---- reductions (all lanes of the warp must call) ----
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide sum; blockDim.x must be a multiple of 32 (<= 1024). Every thread
// gets the total. `scratch` holds >= 32 floats of shared memory. Fixed reduction
// tree: the result is bitwise reproducible for a given blockDim.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < nw ? scratch[lane] : 0.0f;
  return warp_sum(t);
}

}  // namespace ak
