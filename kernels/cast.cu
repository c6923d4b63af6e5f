// cast.cu — storage dtype <-> f32 on the device, so the candle ops can widen their
// parameter packs to the kernels' f32 and round f32 parameter gradients back to the
// activation's dtype without a host round trip. Rust side: src/cuda/cast.rs.
// Rounding: __float2half / __float2bfloat16 (round to nearest even), the same as the
// `half` crate's from_f32 on the host. Elementwise, grid-stride.
#include "common.cuh"

namespace ak_cast {
// Launch bound: src/cuda/cast.rs launches 256-thread blocks (src/cuda/mod.rs BLOCK);
// the emulated device refuses a larger block, so a drift fails the tests.
constexpr int BLOCK = 256;
__device__ __forceinline__ long long grid_tid() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long long grid_stride() { return (long long)gridDim.x * blockDim.x; }
}  // namespace ak_cast

#define CAST_KERNELS(SUF, T)                                                                         \
  AK_KERNEL_BOUND(ak_cast::BLOCK) void cast_to_f32_##SUF(const T* __restrict__ in, float* __restrict__ out, \
                                               long long n) {                                        \
    for (long long i = ak_cast::grid_tid(); i < n; i += ak_cast::grid_stride())                      \
      out[i] = ak::to_f32(in[i]);                                                                    \
  }                                                                                                  \
  EMU_REGISTER_BOUND(cast_to_f32_##SUF, ak_cast::BLOCK)                                              \
  AK_KERNEL_BOUND(ak_cast::BLOCK) void cast_from_f32_##SUF(const float* __restrict__ in, T* __restrict__ out, \
                                                 long long n) {                                      \
    for (long long i = ak_cast::grid_tid(); i < n; i += ak_cast::grid_stride())                      \
      out[i] = ak::from_f32<T>(in[i]);                                                               \
  }                                                                                                  \
  EMU_REGISTER_BOUND(cast_from_f32_##SUF, ak_cast::BLOCK)

CAST_KERNELS(f32, float)
CAST_KERNELS(f16, __half)
CAST_KERNELS(bf16, __nv_bfloat16)
