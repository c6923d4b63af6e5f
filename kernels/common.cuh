// common.cuh — shared device helpers for every kernel family: storage-type
// conversions (f32 / f16 / bf16 storage, f32 arithmetic), warp and block
// reductions, grid-stride helpers. Compiles under nvcc and, with
// emu/cuda_emu.h, as host C++ for the emulated device (feature `emulate`).
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifdef __CUDACC_RTC__
// NVRTC (the run-time compile of src/cuda/module.rs) has no C library headers: the
// few types and macros the kernels use, with the meaning <stdint.h>/<stddef.h>/
// <math.h> give them under nvcc (offsetof: the layout asserts are
// skipped under NVRTC; nvcc and the emulator build check them).
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long int64_t;  // LP64 Linux, as glibc's <stdint.h>
typedef unsigned long uint64_t;
typedef decltype(sizeof(0)) size_t;
typedef unsigned long uintptr_t;
#define INFINITY __int_as_float(0x7f800000)
#define NAN __int_as_float(0x7fc00000)
#else
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#endif
#define EMU_REGISTER(name)
#define EMU_REGISTER_BOUND(name, bound)
#define DYNAMIC_SHARED(type, name) extern __shared__ type name[]
// Static shared memory. Under the emulator each declaration is an exact-size,
// redzoned allocation per block (cuda_emu.h), so overruns and races are seen.
#define SHARED_ARRAY(type, name, count) __shared__ type name[count]
#define SHARED_VAR(type, name) __shared__ type name
#else
#include "emu/cuda_emu.h"
#define DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(emu::dynamic_smem())
#endif

#include "abi.h"

// Every kernel of the crate: C linkage (the Rust side loads it by name) and its
// launch bound (threads per block), which the emulated device records per kernel
// (EMU_REGISTER) and enforces like a GPU: a larger block fails the launch and
// cuFuncGetAttribute(MAX_THREADS_PER_BLOCK) reports it.
//  * AK_KERNEL + EMU_REGISTER(name): no __launch_bounds__ for nvcc; the emulated
//    device records AK_LAUNCH_BOUND (the hardware's 1024).
//  * AK_KERNEL_BOUND(B) + EMU_REGISTER_BOUND(name, B): nvcc gets __launch_bounds__(B)
//    (ptxas may then use up to 64 K / B registers per thread, and the driver refuses a
//    larger block), the emulated device records and enforces the same B. Use one named
//    constant for B in both places. B must be the largest block the launcher uses.
//  * Equivalently, a family may write `__launch_bounds__(B)` itself and set
//    AK_LAUNCH_BOUND to B around those kernels' EMU_REGISTERs (#pragma push_macro /
//    pop_macro, as iieu_dc.cu and iieu_conv.cu do). Either way the bound the emulated
//    device records must be the one nvcc compiled: the launch audit's `bound` target
//    reads it.
// History: a blanket __launch_bounds__(256) capped some kernels at 80 registers and
// 18 kernel/arch pairs spilled; (256, 1) raised registers on 159 of 280 sm_86/sm_90
// pairs. Bounds are therefore set per kernel, each checked in the ptxas table.
#ifndef AK_LAUNCH_BOUND
#define AK_LAUNCH_BOUND 1024
#endif
#define AK_KERNEL extern "C" __global__
#define AK_KERNEL_BOUND(B) extern "C" __global__ __launch_bounds__(B)

// Device-side contract checks (what a kernel assumes of its launch, e.g. whole warps
// for warp shuffles): always on for the emulated device, where a violation fails the
// launch with the condition in the report; in nvcc builds only with AK_DEVICE_CHECKS=1
// at build time (build.rs passes -DAK_DEVICE_CHECKS), where a violation prints it and
// traps (the launch fails; the next synchronising call reports it).
#if !defined(__CUDACC__)
#define AK_EXPECT(cond)                                                               \
  do {                                                                                \
    if (!(cond)) emu::fault("kernel contract violated: " #cond " (" __FILE__ ")");   \
  } while (0)
#elif defined(AK_DEVICE_CHECKS)
#define AK_EXPECT(cond)                                                                       \
  do {                                                                                        \
    if (!(cond)) {                                                                            \
      printf("activation-kernels: kernel contract violated: %s (%s:%d)\n", #cond, __FILE__, \
             __LINE__);                                                                       \
      __trap();                                                                               \
    }                                                                                         \
  } while (0)
#else
#define AK_EXPECT(cond) \
  do {                  \
  } while (0)
#endif

namespace ak {

// Bytes of dynamic shared memory this launch was given (for AK_EXPECT: a kernel states
// what it needs, so a launcher that passes too little fails under AK_DEVICE_CHECKS on a
// GPU, not only under the emulator's shared-memory bounds checks).
__device__ __forceinline__ unsigned dynamic_smem_bytes() {
#ifdef __CUDACC__
  unsigned r;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
  return r;
#else
  return (unsigned)emu::dynamic_smem_bytes();
#endif
}

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

// ---- 16-bit storage bits <-> f32 (bits in the low 16 bits of an unsigned) ----
template <class T>
struct Bits16;
template <>
struct Bits16<__half> {
  static __device__ __forceinline__ float to_f32(unsigned b) { return __half2float(__ushort_as_half((unsigned short)b)); }
  static __device__ __forceinline__ unsigned from_f32(float v) { return (unsigned)__half_as_ushort(__float2half(v)); }
};
template <>
struct Bits16<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f32(unsigned b) {
    return __bfloat162float(__ushort_as_bfloat16((unsigned short)b));
  }
  static __device__ __forceinline__ unsigned from_f32(float v) {
    return (unsigned)__bfloat16_as_ushort(__float2bfloat16(v));
  }
};

// ---- 128-bit vector I/O: Vec16<T>::N elements of T per 16 bytes <-> f32 ----
// The pointer must be 16-byte aligned (see aligned16). Under the emulator the
// accesses go through memcpy (no type punning in host C++).
__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

__device__ __forceinline__ uint4 ld16(const void* p) {
#ifdef __CUDACC__
  return *reinterpret_cast<const uint4*>(p);
#else
  uint4 u;
  std::memcpy(&u, p, 16);
  return u;
#endif
}
__device__ __forceinline__ float4 ld16f(const float* p) {
#ifdef __CUDACC__
  return *reinterpret_cast<const float4*>(p);
#else
  float4 v;
  std::memcpy(&v, p, 16);
  return v;
#endif
}
__device__ __forceinline__ void st16(void* p, uint4 u) {
#ifdef __CUDACC__
  *reinterpret_cast<uint4*>(p) = u;
#else
  std::memcpy(p, &u, 16);
#endif
}
__device__ __forceinline__ void st16(float* p, float4 v) {
#ifdef __CUDACC__
  *reinterpret_cast<float4*>(p) = v;
#else
  std::memcpy(p, &v, 16);
#endif
}
// Forced 128-bit global store: under nvcc a plain st.global.v4 through inline
// PTX (an aggregate float4/uint4 store can be split into 32/64-bit stores by the
// optimiser, e.g. in ACON's backward kernels; __stwb would give a .STRONG.SM
// store). The pointer must be global memory.
__device__ __forceinline__ void st16_v4(void* p, uint4 u) {
#ifdef __CUDACC__
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(u.x), "r"(u.y), "r"(u.z), "r"(u.w)
               : "memory");
#else
  std::memcpy(p, &u, 16);
#endif
}
__device__ __forceinline__ void st16_v4(float* p, float4 v) {
#ifdef __CUDACC__
  asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
               : "memory");
#else
  std::memcpy(p, &v, 16);
#endif
}

// load / store: 16 bytes at p <-> N floats. store_v4: same, with st16_v4.
template <class T>
struct Vec16 {  // __half / __nv_bfloat16: 8 elements
  static constexpr int N = 8;
  static __device__ __forceinline__ void load(const T* p, float* v) {
    const uint4 u = ld16(p);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[2 * k] = Bits16<T>::to_f32(w[k] & 0xffffu);
      v[2 * k + 1] = Bits16<T>::to_f32(w[k] >> 16);
    }
  }
  static __device__ __forceinline__ uint4 pack(const float* v) {
    uint4 u;
    u.x = Bits16<T>::from_f32(v[0]) | (Bits16<T>::from_f32(v[1]) << 16);
    u.y = Bits16<T>::from_f32(v[2]) | (Bits16<T>::from_f32(v[3]) << 16);
    u.z = Bits16<T>::from_f32(v[4]) | (Bits16<T>::from_f32(v[5]) << 16);
    u.w = Bits16<T>::from_f32(v[6]) | (Bits16<T>::from_f32(v[7]) << 16);
    return u;
  }
  static __device__ __forceinline__ void store(T* p, const float* v) { st16(p, pack(v)); }
  static __device__ __forceinline__ void store_v4(T* p, const float* v) { st16_v4(p, pack(v)); }
};
template <>
struct Vec16<float> {  // 4 elements
  static constexpr int N = 4;
  static __device__ __forceinline__ void load(const float* p, float* v) {
    const float4 q = ld16f(p);
    v[0] = q.x;
    v[1] = q.y;
    v[2] = q.z;
    v[3] = q.w;
  }
  static __device__ __forceinline__ void store(float* p, const float* v) {
    st16(p, make_float4(v[0], v[1], v[2], v[3]));
  }
  static __device__ __forceinline__ void store_v4(float* p, const float* v) {
    st16_v4(p, make_float4(v[0], v[1], v[2], v[3]));
  }
};

// Vec16<T>::N consecutive values from p as f32: one 128-bit load when `vec` (p 16-byte
// aligned), else N scalar loads of the same values. A reduction that groups its
// elements by N reads through this so that the grouping — and so its summation order
// and its bits — depends on the shape only, never on where the tensor starts in memory
// (a view at an odd offset gives the aligned tensor's bits).
template <class T>
__device__ __forceinline__ void load_group(const T* p, float* v, bool vec) {
  if (vec) {
    Vec16<T>::load(p, v);
  } else {
#pragma unroll
    for (int k = 0; k < Vec16<T>::N; ++k) v[k] = to_f32(p[k]);
  }
}

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
  AK_EXPECT((blockDim.x & 31) == 0 && blockDim.y == 1 && blockDim.z == 1);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < nw ? scratch[lane] : 0.0f;
  return warp_sum(t);
}

}  // namespace ak
