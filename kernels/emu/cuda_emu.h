// cuda_emu.h — the CUDA built-ins our kernels use, for compiling kernels/*.cu as
// host C++ (feature `emulate`). Included by common.cuh when __CUDACC__ is not
// defined; never by nvcc. The runtime behind it: sched.cpp (fibers, barriers, warp
// collectives), shadow.cpp (checked memory, detectors), driver.cpp (fake driver).
//
// Semantics kept real: every thread of a block is a fiber, so __syncthreads is a
// true barrier and warp collectives wait for every lane in their mask; shared
// memory (SHARED_ARRAY / SHARED_VAR / DYNAMIC_SHARED) is allocated per block, with
// exactly its size between redzones, from the emulator's checked arena; atomics
// are real atomics. A bare `__shared__` does not compile here: it would bypass the
// shared-memory checks.
#pragma once
#include <atomic>
#include <cmath>
#include <math.h>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }

namespace emu {
struct ThreadCtx {
  uint3 tid;
  uint3 bid;
  dim3 bdim;
  dim3 gdim;
};
// The running fiber's coordinates (set by the scheduler before each switch in).
extern thread_local const ThreadCtx* cur;
// Block-wide barrier.
void syncthreads();
// Waits until every live lane of this warp named in `mask` has arrived.
void warp_sync(unsigned mask);
// 32 exchange slots of the calling thread's warp.
uint64_t* warp_slots();
// ---- the tensor-core primitives' runtime (kernels/mma.cuh) ----
// Words of warp scratch per lane (warp_scratch()).
constexpr int kWarpScratchWords = 16;
// 32 × kWarpScratchWords words of the calling thread's warp (lane l at l·kWarpScratchWords).
uint32_t* warp_scratch();
// A warp collective of an `.aligned` instruction (mma.sync, ldmatrix) at source site
// file:line: waits until every lane in `mask` has arrived (an exited lane or a lane of
// a partial warp fails the launch, as for the shuffles), and fails the launch when the
// lanes arrived at different sites (a warp-divergent call). Unlike the shuffles it
// orders no memory accesses for racecheck: the hardware instructions give no ordering.
void warp_converge(unsigned mask, const char* file, int line);
// Whether [p, p+n) lies inside the running block's shared-memory window (its buffers
// and their redzones: an overrun is memcheck's to report).
bool in_block_smem(const void* p, size_t n);
// cp.async of `cp_size` (4, 8, 16) bytes from global `src` to shared `dst`; bytes past
// `src_size` (0..cp_size) are zeros. The source is read (and checked) now; the
// destination is checked as a write now, filled with 0xFF and marked in flight — any
// access before a cp_async_wait retires it is reported — and written at that wait.
void cp_async(void* dst, const void* src, int cp_size, int src_size);
// cp.async.commit_group: closes the thread's open group of cp.async.
void cp_async_commit();
// cp.async.wait_group n: retires (writes) every cp.async of the thread's committed
// groups except the n most recent ones; uncommitted cp.async stay in flight.
void cp_async_wait(int n);
// This thread's lane (0..31).
int lane_id();
// Dynamic shared memory of the current block (launch's sharedMemBytes).
void* dynamic_smem();
// Bytes of dynamic shared memory the running launch was given.
size_t dynamic_smem_bytes();
// Static shared memory of the current block: one allocation per declaration
// (`key`), made by the first thread that reaches it, shared by the whole block.
void* static_smem(const void* key, const char* name, size_t bytes, size_t align);
// Reports a kernel-side contract violation (launch then fails).
[[noreturn]] void fault(const char* what);
// Fails the launch (as fault) when the emulated GPU's arch is below sm_`sm`: an
// instruction `what` that the GPU does not have (a kernel built for it would trap).
void need_sm(int sm, const char* what);
// Watchdog: set when a launch stopped making progress; polled by atomics.
extern std::atomic<bool> g_abort_any;
void watchdog_poll();
inline void poll() {
  if (__builtin_expect(g_abort_any.load(std::memory_order_relaxed), 0)) watchdog_poll();
}

using Trampoline = void (*)(void* fn, void** params);
void register_kernel(const char* name, void* fn, Trampoline t, int max_threads);

template <class... A, size_t... I>
void call_impl(void (*f)(A...), void** p, std::index_sequence<I...>) {
  f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(p[I])...);
}
template <class... A>
void trampoline(void* fn, void** p) {
  call_impl(reinterpret_cast<void (*)(A...)>(fn), p, std::index_sequence_for<A...>{});
}
template <class... A>
Trampoline tramp_for(void (*)(A...)) {
  return &trampoline<A...>;
}
struct Registrar {
  Registrar(const char* n, void* f, Trampoline t, int max_threads) { register_kernel(n, f, t, max_threads); }
};

template <class T>
inline uint64_t to_bits64(T v) {
  static_assert(sizeof(T) <= 8, "warp exchange of at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits64(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
// Generic exchange: every lane publishes v, then reads lane src(lane) (own value if
// src is out of the segment), with warp barriers before and after the read.
template <class T, class F>
inline T exchange(unsigned mask, T v, F src_of) {
  int lane = lane_id();
  uint64_t* s = warp_slots();
  s[lane] = to_bits64(v);
  warp_sync(mask);
  int src = src_of(lane);
  T r = (src >= 0 && src < 32 && ((mask >> src) & 1u)) ? from_bits64<T>(s[src]) : v;
  warp_sync(mask);
  return r;
}
}  // namespace emu

// A kernel declared AK_KERNEL (kernels/common.cuh: no __launch_bounds__ for nvcc) is
// registered with AK_LAUNCH_BOUND at this point (1024); the driver refuses larger blocks.
#define EMU_REGISTER(name)                                                                     \
  static emu::Registrar emu_registrar_##name(#name, reinterpret_cast<void*>(&name), emu::tramp_for(&name), \
                                             AK_LAUNCH_BOUND);
// A kernel declared AK_KERNEL_BOUND(bound) (common.cuh): registered with that bound.
#define EMU_REGISTER_BOUND(name, bound)                                                        \
  static emu::Registrar emu_registrar_##name(#name, reinterpret_cast<void*>(&name), emu::tramp_for(&name), \
                                             (bound));

#define threadIdx (emu::cur->tid)
#define blockIdx (emu::cur->bid)
#define blockDim (emu::cur->bdim)
#define gridDim (emu::cur->gdim)
#define warpSize 32
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ _Pragma("GCC error \"use SHARED_ARRAY / SHARED_VAR (common.cuh): the emulator checks shared memory\"")
#define SHARED_ARRAY(type, name, count)                                                          \
  static const char name##_emu_key = 0;                                                          \
  type* name = static_cast<type*>(emu::static_smem(&name##_emu_key, #name, sizeof(type) * (count), \
                                                   alignof(type)))
#define SHARED_VAR(type, name)          \
  static const char name##_emu_key = 0; \
  type& name = *static_cast<type*>(emu::static_smem(&name##_emu_key, #name, sizeof(type), alignof(type)))
#define __ldg(p) (*(p))

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_sync(mask); }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return emu::exchange(mask, v, [&](int lane) { return (lane & ~(width - 1)) + (src & (width - 1)); });
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lm, int width = 32) {
  return emu::exchange(mask, v, [&](int lane) {
    int s = lane ^ lm;
    return ((s & ~(width - 1)) == (lane & ~(width - 1))) ? s : lane;
  });
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return emu::exchange(mask, v, [&](int lane) {
    int s = lane + (int)d;
    return ((s & ~(width - 1)) == (lane & ~(width - 1))) ? s : lane;
  });
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return emu::exchange(mask, v, [&](int lane) {
    int s = lane - (int)d;
    return (s >= (lane & ~(width - 1))) ? s : lane;
  });
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  int lane = emu::lane_id();
  uint64_t* s = emu::warp_slots();
  s[lane] = pred ? 1u : 0u;
  emu::warp_sync(mask);
  unsigned r = 0;
  for (int i = 0; i < 32; ++i)
    if (((mask >> i) & 1u) && s[i]) r |= 1u << i;
  emu::warp_sync(mask);
  return r;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == __ballot_sync(mask, 1); }

// ---- atomics (blocks run on several host threads: real atomics) ----
// Each polls the watchdog, so a spin-wait on an atomic ends in a launch failure.
template <class T>
inline T emu_atomic_add(T* p, T v) {
  emu::poll();
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline int atomicAdd(int* p, int v) { return emu_atomic_add(p, v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return emu_atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return emu_atomic_add(p, v); }
inline float atomicAdd(float* p, float v) {
  emu::poll();
  uint32_t* q = reinterpret_cast<uint32_t*>(p);
  uint32_t ob = __atomic_load_n(q, __ATOMIC_RELAXED);
  for (;;) {
    float o, n;
    std::memcpy(&o, &ob, 4);
    n = o + v;
    uint32_t nb;
    std::memcpy(&nb, &n, 4);
    if (__atomic_compare_exchange_n(q, &ob, nb, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return o;
  }
}
inline int atomicMax(int* p, int v) {
  emu::poll();
  int old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
inline unsigned atomicInc(unsigned* p, unsigned lim) {
  emu::poll();
  unsigned old = __atomic_load_n(p, __ATOMIC_RELAXED), n;
  do {
    n = (old >= lim) ? 0 : old + 1;
  } while (!__atomic_compare_exchange_n(p, &old, n, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}
inline int atomicCAS(int* p, int cmp, int v) {
  emu::poll();
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return cmp;
}
inline void __threadfence() {
  emu::poll();
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

// ---- math intrinsics ----
// __expf is modelled as the hardware computes it (ex2.approx of x·log2e rounded
// to f32): its dominant error, the rounding of the product (relative error up to
// |x|·2^-24·ln2 in the result), is reproduced, so parity tolerances that hold here
// account for it. The other fast intrinsics are computed exactly.
inline float __expf(float x) { return std::exp2(x * 1.44269504088896341f); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline float __saturatef(float a) { return a < 0.f ? 0.f : (a > 1.f ? 1.f : a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }

// ---- f16 / bf16 storage types (round to nearest even, as the CUDA intrinsics) ----
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
inline float __half2float(__half h) {
  uint32_t s = (uint32_t)(h.x & 0x8000u) << 16, e = (h.x >> 10) & 0x1fu, m = h.x & 0x3ffu, b;
  if (e == 0) {
    if (m == 0) {
      b = s;
    } else {  // subnormal: normalise
      int sh = 0;
      while (!(m & 0x400u)) {
        m <<= 1;
        ++sh;
      }
      m &= 0x3ffu;
      b = s | ((uint32_t)(113 - sh) << 23) | (m << 13);
    }
  } else if (e == 31) {
    b = s | 0x7f800000u | (m << 13);
  } else {
    b = s | ((e + 112) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline __half __float2half(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  uint16_t s = (uint16_t)((b >> 16) & 0x8000u);
  uint32_t a = b & 0x7fffffffu;
  if (a > 0x7f800000u) return __half{(uint16_t)(s | 0x7e00u)};  // NaN
  if (a >= 0x477ff000u) return __half{(uint16_t)(s | 0x7c00u)};  // overflow -> inf (RNE)
  if (a < 0x38800000u) {  // subnormal half or zero
    if (a < 0x33000000u) return __half{s};  // < 2^-25 rounds to 0 (ties to even at 2^-25)
    uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    int shift = 126 - (int)e;  // 14 .. 24
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return __half{(uint16_t)(s | q)};
  }
  uint32_t r = a - 0x38000000u;  // rebias exponent 127 -> 15
  uint32_t q = r >> 13, rem = r & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ++q;
  return __half{(uint16_t)(s | q)};
}
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t b = (uint32_t)h.x << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
// Raw-bit reinterpretation (as cuda_fp16.h / cuda_bf16.h).
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16{b}; }
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((b >> 16) | 0x40u)};
  uint32_t lsb = (b >> 16) & 1u;
  b += 0x7fffu + lsb;
  return __nv_bfloat16{(uint16_t)(b >> 16)};
}
