// iieu.cu — IIEU-B (SPEC §1.1–1.4): term-S (norm-decoupled similarity), term-B
// (adaptive shift) and the adjuster, forward and backward. Rust side:
// src/cuda/iieu.rs (which validates every length before launching these).
//
// Storage dtypes float / __half / __nv_bfloat16 for the big tensors (x, x_pre, W,
// y, dy, dx, dx_pre, dW); every intermediate (r_w, ‖W‖, q, r_x, ‖P‖, m, m̂, rstd, ν,
// partial sums, dm, dz, coef) is f32, and ALL arithmetic and accumulation is f32.
// Geometry: the IieuGeom struct of abi.h (P = H'·W', HW = H·W, G' = gp).
//
// Pipeline (one launch per line):
//   forward : filter_norm  -> r_w, ‖W‖           (one block per filter, block reduce)
//             patch_sq     -> q partials: Σ_{c∈chunk} x_pre² per channel chunk of a group
//             sum_chunks   -> q = Σ of the chunk partials (fixed order; splits > 1 only)
//             patch_window -> ‖P‖, r_x            (KH×KW strided/dilated window sum of q)
//             gap          -> m[n,o]              (one block per (n,o) plane)
//             ln_fwd       -> m̂, rstd, ν          (one block per sample)
//             fwd          -> y                   (elementwise adjuster)
//   backward: bwd_sums     -> per-(n,o) [Σg, Σg·x·r_x, Σ dη-term]   (stage 1)
//             ln_bwd       -> dz, dm              (one block per sample)
//             bwd_params   -> dγ̇, dβ̇, dη, dW      (one block per o: stage 2, fixed order)
//             bwd_dx       -> dx, dr_x partials  (per channel chunk of a group; with one
//                                                  chunk, coef = dr_x·(−r_x²/‖P‖) directly)
//             coef_reduce  -> coef = Σ partials·(−r_x²/‖P‖)  (fixed order; splits > 1 only)
//             bwd_dxpre    -> dx_pre              (gather over the windows containing a tap)
//
// Work decomposition (issue 15 item 3). The big tensors are (n, channel, pixel); the
// patch statistics r_x / ‖P‖ / q / coef are shared by the channels of a group. So:
// * fwd: a thread takes one pixel vector of FWD_CH output channels of one group, and
//   loads r_x once for them (not once per channel: 4 B per element of r_x re-reads
//   becomes 4/FWD_CH), while the grid keeps N·G'·⌈O/(G'·FWD_CH)⌉·(H'W'/V) threads —
//   ≥ 2 waves at every ResNet-50 stage shape.
// * bwd_sums: a block covers SUMS_CH planes o of one (n, group): r_x read once per
//   block pixel, per-plane fixed-order block reductions (block_sums).
// * patch_sq, bwd_dx, bwd_dxpre: channel-split grids — work items (n, group, channel
//   chunk, pixel vector), the chunk count `splits` chosen by the launcher from the
//   shape only (never the device: the bits must not depend on the GPU) so that a small
//   plane with many channels (N = 32, 7×7, C = 2048: 1 568 pixels) still gets ≥ 2 SMs'
//   worth of blocks. patch_sq and bwd_dx write per-chunk partials to a bounded
//   f32 scratch (splits ≤ 64 and splits·items ≤ 2·2^16 when splits > 1, see
//   src/cuda/iieu.rs) that the consumer sums in chunk order (sum_chunks, coef_reduce):
//   no atomics, bitwise reproducible. bwd_dxpre is parallel per channel chunk (each
//   chunk recomputes the ≤ KH·KW-tap coef gather of its pixels, from L1/L2).
// * Index math is 32-bit: the launchers prove every work-item count ≤ INT32_MAX, so a
//   flat item index is an `unsigned` (no wrap: + the stride ≤ 65 535·256 stays < 2^32)
//   and is split by 32-bit division (a short inline sequence; a 64-bit `/` or `%` is a
//   ~70-instruction call). Tensor offsets stay 64-bit (products only).
// * Launch bound 256 (IIEU_THREADS, below): the launchers use at most BLOCK = 256
//   threads per block (src/cuda/mod.rs).
// No float atomics anywhere; every reduction has a fixed order, so results are
// bitwise reproducible.
#include "common.cuh"

// Threads per block of every IIEU-B launch: at most BLOCK = 256 (src/cuda/mod.rs;
// `elementwise` and `per_block` in src/cuda/iieu.rs, which IieuConv2d's launches of
// these kernels share). The emulated device, which compiles this file as its own
// translation unit, records it for every kernel here through AK_LAUNCH_BOUND at each
// EMU_REGISTER and refuses larger blocks, as a GPU would. (nvcc and NVRTC compile every
// family in one unit, but there EMU_REGISTER is empty and AK_LAUNCH_BOUND unused, so this
// file's value does not leak into another's.)
// nvcc gets it as __launch_bounds__ (IIEU_BOUNDS) on the kernels where ptxas then
// allocates no more registers than without it (nvcc 13, sm_80/86/90, 2026-12-07):
// filter_norm, gap, fwd, bwd_params, bwd_dx, coef_reduce, sum_chunks, ln_fwd, ln_bwd
// (equal or 1–11 fewer; filter_norm_f16 +1 on sm_80 only, the same per-warp
// allocation). Where a plain bound hurt (bwd_dxpre_f32 spilled on sm_80 under it,
// capped at 32 registers, 20 bytes of spill; bwd_sums_f32 spilled 24 bytes at 80
// registers when it reduced 8 planes per block; patch_window took 40 registers instead
// of 32 on sm_90), the kernel takes __launch_bounds__(IIEU_THREADS, m) instead: at
// least m resident blocks per SM, which caps ptxas at 65536 / (256·m) registers (in
// units of 8). m is the number of blocks
// the kernel holds per SM without a bound (by registers, and by threads: sm_75 holds 4
// blocks of 256, sm_86 / sm_89 6, sm_80 / sm_90 8), so the cap is the most registers
// that keep that occupancy; IIEU_MB(sm_75, sm_80, sm_86 and sm_89, sm_90) picks m per
// arch by __CUDA_ARCH__ (ptxas lowers an m above what the arch can hold). The values
// and the registers they gave are at each kernel's IIEU_*_MB below (nvcc 13; NVRTC +
// ptxas 12.4, scripts/compat-check.sh, spills nothing either). The emulated device
// records IIEU_THREADS for every kernel of this file (AK_LAUNCH_BOUND). patch_sq takes
// the plain bound with its channel loop unrolled twice (`#pragma unroll 2`): left to
// itself ptxas unrolled it further (unbounded f32 / f16 / bf16 on sm_75 61/50/46,
// sm_80 40/38/34, sm_86 40/44/44, sm_90 32/36/32 registers) and, under a bare
// __launch_bounds__(256), took more (44 on sm_90), while the occupancy-keeping m spilled
// at its cap (12–36 bytes); unrolled twice under the plain bound it takes 51/39/41,
// 32/32/32, 40/40/40, 32/32/32 (nvcc 13, 0 spills) — equal or fewer everywhere. Two
// 16-byte loads in flight per thread at up to 2048 threads per SM is 64 KB per SM,
// several times the ~15 KB that H100's bandwidth × latency asks of each SM.
#define IIEU_THREADS 256
#define IIEU_BOUNDS __launch_bounds__(IIEU_THREADS)
// The min-blocks argument per arch. __CUDA_ARCH__ is defined in nvcc's / NVRTC's device
// passes only; the host pass and the emulator do not use the value (the PTX of the
// newest arch, JIT-compiled for later GPUs, carries the sm_90 value).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define IIEU_MB(m75, m80, m86, m90) m90
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 860
#define IIEU_MB(m75, m80, m86, m90) m86
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define IIEU_MB(m75, m80, m86, m90) m80
#else
#define IIEU_MB(m75, m80, m86, m90) m75
#endif
// Blocks of 256 threads per SM with up to 32 / 40 / 48 / 64 / 80 registers: 8 / 6 / 5 /
// 4 / 3 (capped by threads). Registers on sm_75 / 80 / 86 / 89 / 90 (nvcc 13),
// unbounded → bound:
// patch_window: caps 64 / 32 / 48 / 48 / 32, 63/31/44/44/32 → 60/32/47/47/32.
#define IIEU_PATCH_WINDOW_MB IIEU_MB(4, 8, 5, 8)
// bwd_sums (launched with power-of-two blocks of 32..256 threads, so the register
// count sets the resident warps, not only the blocks of 256): f32 4 → cap 64, 71/72/72/
// 72/64 → 64/64/64/64/64, no spill in either toolchain (4 blocks of 256 on every arch
// instead of 3); f16 / bf16 3 / 3 / 3 / 4 → caps 80 / 80 / 80 / 80 / 64, f16
// 79/80/80/80/72 → 79/80/80/80/64, bf16 80/79/80/80/72 → 79/80/80/80/63 (at cap 64
// sm_75..sm_89 spill 84-116 bytes; on sm_90, m = 3 took 80 registers: 24 resident warps
// instead of 28 for blocks under 256 threads).
#define IIEU_BWD_SUMS_MB_f32 4
#define IIEU_BWD_SUMS_MB_f16 IIEU_MB(3, 3, 3, 4)
#define IIEU_BWD_SUMS_MB_bf16 IIEU_MB(3, 3, 3, 4)
// bwd_dxpre: 6 (sm_75: 4) → caps 64 / 40 / 40 / 40 / 40, f32 40/40/40/40/38 →
// 37/38/38/38/38, f16 39/36/40/40/38 → 42/40/40/40/40, bf16 38/34/38/38/38 →
// 39/40/40/40/40.
#define IIEU_BWD_DXPRE_MB 6
#ifndef __CUDACC__
#undef AK_LAUNCH_BOUND
#define AK_LAUNCH_BOUND IIEU_THREADS
#endif

// The Rust mirror (src/cuda/abi.rs) pins the same size and offsets.
static_assert(sizeof(IieuGeom) == 80, "IieuGeom layout drifted from src/cuda/abi.rs");
#ifndef __CUDACC_RTC__  // NVRTC has no offsetof; nvcc and the emulator check it
static_assert(offsetof(IieuGeom, mode) == 76, "IieuGeom layout drifted from src/cuda/abi.rs");
#endif

namespace ak_iieu {

constexpr float EPS = 1e-8f;     // inverse norms
constexpr float EPS_LN = 1e-6f;  // term-B LayerNorm

// N (a multiple of 4) f32 values from a 16-byte aligned pointer.
template <int N>
__device__ __forceinline__ void load_f32(const float* p, float* v) {
#pragma unroll
  for (int k = 0; k < N; k += 4) ak::Vec16<float>::load(p + k, v + k);
}
template <int N>
__device__ __forceinline__ void store_f32(float* p, const float* v) {
#pragma unroll
  for (int k = 0; k < N; k += 4) ak::Vec16<float>::store(p + k, v + k);
}

// Output channels per fwd thread and planes per bwd_sums block (src/cuda/iieu.rs
// mirrors both to size the grids; a unit test there checks they agree). bwd_sums keeps
// 3 sums per plane in registers: with 8 planes it took 92–115 registers (33 % occupancy
// on sm_86, below the launch audit's fill target at N = 32); 4 planes re-read r_x 1 B per
// f32 element instead of 0.5 B.
constexpr int FWD_CH = 8;
constexpr int SUMS_CH = 4;

// 32-bit flat work-item index and stride of a grid-stride loop (see the file header:
// item counts ≤ INT32_MAX are proved on the host, the stride is ≤ 65 535·256).
__device__ __forceinline__ unsigned tid32() { return blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ unsigned stride32() { return gridDim.x * blockDim.x; }

// K block-wide sums at once (blockDim.x a multiple of 32): each warp reduces its K
// values by shuffles, warp 0 reduces the per-warp values. The totals are valid in warp
// 0 only (thread 0 writes them). `scratch` holds 32·K floats. Fixed reduction tree:
// bitwise reproducible for a given blockDim. Callable repeatedly (syncs first).
template <int K>
__device__ __forceinline__ void block_sums(float (&v)[K], float* scratch) {
  AK_EXPECT((blockDim.x & 31) == 0 && blockDim.y == 1 && blockDim.z == 1);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();  // scratch may still be read by the previous call
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float s = ak::warp_sum(v[k]);
    if (lane == 0) scratch[k * 32 + warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = ak::warp_sum(lane < nw ? scratch[k * 32 + lane] : 0.0f);
  }
}

// σ(z) with the accurate expf (not __expf): ν enters every ρ̂.
__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// ρ̂ = x·r_w·r_x + ν, one explicit rounding sequence (mul, then fused mul-add) so that
// forward and every backward kernel take bit-identical branches.
__device__ __forceinline__ float rho_of(float x, float rw, float rx, float nu) {
  return __fmaf_rn(x * rw, rx, nu);
}

// x = ψ(c) of IieuConv2d (kernels/iieu_conv.cu): lin = (sub, k, scale, add) per channel,
// x = ((c − sub)·k)·scale + add rounded to the storage dtype T — the one expression
// every kernel that reads x through lin uses, so forward and backward see the same x.
// lin == nullptr (plain IIEU-B): x = c.
template <class T>
__device__ __forceinline__ float psi_x(float c, const float* __restrict__ lin, int o) {
  if (lin == nullptr) return c;
  const float* l = lin + 4 * o;
  return ak::to_f32(ak::from_f32<T>(fmaf((c - l[0]) * l[1], l[2], l[3])));
}

// 1/(‖v‖+eps) slope factor −r²/‖v‖ (0 where ‖v‖ = 0).
__device__ __forceinline__ float inv_norm_slope(float norm, float r) {
  return norm > 0.0f ? -(r * r) / norm : 0.0f;
}

// Window-sum adjoint for one axis: calls f(out_index) for every output position
// whose window (stride s, pad p, dilation d, k taps, `out` positions) covers input
// index `i`, in increasing tap order.
template <class F>
__device__ __forceinline__ void for_windows(int i, int k, int s, int p, int d, int out, F f) {
  for (int a = 0; a < k; ++a) {
    const int t = i + p - a * d;
    if (t < 0) break;  // t decreases with a
    if (t % s != 0) continue;
    const int u = t / s;
    if (u < out) f(u);
  }
}

// =====================================================================================
// forward

// r_w[o] = 1/(‖W[o]‖ + eps), w_norm[o] = ‖W[o]‖. One block per filter (grid-stride
// over o), block reduction of the C/g·KH·KW squares.
// Bytes: reads W once (sizeof(T)/entry), writes 8 B per filter — the minimum.
template <class T>
__device__ void filter_norm_impl(const T* __restrict__ w, float* __restrict__ r_w,
                                 float* __restrict__ w_norm, IieuGeom g) {
  SHARED_ARRAY(float, scratch, 32);
  const long long per = g.w_per;
  for (int o = blockIdx.x; o < g.o; o += gridDim.x) {
    const T* f = w + (long long)o * per;
    float acc = 0.0f;
    for (long long i = threadIdx.x; i < per; i += blockDim.x) {
      const float v = ak::to_f32(f[i]);
      acc = fmaf(v, v, acc);
    }
    const float ss = ak::block_sum(acc, scratch);
    if (threadIdx.x == 0) {
      const float nm = sqrtf(ss);
      w_norm[o] = nm;
      r_w[o] = 1.0f / (nm + EPS);
    }
  }
}

// q partials: q_part[s][n,grp,h,w] = Σ_{c ∈ chunk s of grp} x_pre[n,c,h,w]² (grp over
// G' planes of C/G' channels; chunk s = channels [s·chunk, min((s+1)·chunk, C/G'))).
// Work item (n·G' + grp, s, pixel vector), pixel fastest (coalesced); 8/4 pixels with
// 128-bit loads when H·W allows, one pixel otherwise (the same item count per pixel, so
// the scalar grid is no smaller). sum_chunks sums the `splits` partials (if > 1).
// Bytes: reads x_pre once, writes 4 B per (n, grp, pixel) and chunk.
template <class T>
__device__ void patch_sq_impl(const T* __restrict__ x_pre, float* __restrict__ q_part, IieuGeom g,
                              int chunk, int splits) {
  constexpr int V = ak::Vec16<T>::N;
  const int hw = g.h * g.w;
  const long long q_len = (long long)g.n * g.gp * hw;
  const bool vec = (hw % V == 0) && ak::aligned16(x_pre);
  const unsigned pv = vec ? hw / V : hw;  // items per (plane, chunk)
  const unsigned spl = splits;
  const unsigned total = (unsigned)(g.n * g.gp) * spl * pv;
  for (unsigned i = tid32(); i < total; i += stride32()) {
    const unsigned r = i / pv, tq = r / spl;
    const int j = (int)(i - r * pv), s = (int)(r - tq * spl);
    const int c0 = s * chunk, cn = min(chunk, g.c_per - c0);
    const int pix = vec ? j * V : j;
    // n·C + grp·(C/G') + c0 = (n·G' + grp)·(C/G') + c0
    const T* src = x_pre + ((long long)tq * g.c_per + c0) * hw + pix;
    float* dst = q_part + s * q_len + (long long)tq * hw + pix;
    if (vec) {
      float acc[V];
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = 0.0f;
#pragma unroll 2  // registers: see IIEU_BOUNDS above
      for (int c = 0; c < cn; ++c) {
        float v[V];
        ak::Vec16<T>::load(src + (long long)c * hw, v);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] = fmaf(v[k], v[k], acc[k]);
      }
      store_f32<V>(dst, acc);
    } else {
      float acc = 0.0f;
      for (int c = 0; c < cn; ++c) {
        const float v = ak::to_f32(src[(long long)c * hw]);
        acc = fmaf(v, v, acc);
      }
      *dst = acc;
    }
  }
}

// m[n,o] = mean of the (n,o) plane of x. One block per plane (grid-stride).
// Bytes: reads x once, writes 4 B per plane — the minimum.
template <class T>
__device__ void gap_impl(const T* __restrict__ x, float* __restrict__ m, IieuGeom g) {
  SHARED_ARRAY(float, scratch, 32);
  constexpr int V = ak::Vec16<T>::N;
  const long long P = (long long)g.oh * g.ow;
  const long long planes = (long long)g.n * g.o;
  // Groups of V pixels whenever the plane allows (the summation order: shape only),
  // read by 128-bit loads when x is aligned (ak::load_group).
  const bool grouped = P % V == 0;
  const bool vec = grouped && ak::aligned16(x);
  for (long long pl = blockIdx.x; pl < planes; pl += gridDim.x) {
    const T* src = x + pl * P;
    float acc = 0.0f;
    if (grouped) {
      for (long long j = threadIdx.x; j < P / V; j += blockDim.x) {
        float v[V];
        ak::load_group(src + j * V, v, vec);
#pragma unroll
        for (int k = 0; k < V; ++k) acc += v[k];
      }
    } else {
      for (long long j = threadIdx.x; j < P; j += blockDim.x) acc += ak::to_f32(src[j]);
    }
    const float s = ak::block_sum(acc, scratch);
    if (threadIdx.x == 0) m[pl] = s / (float)P;
  }
}

// y = ς(ρ̂)·x, ρ̂ = x·r_w[o]·r_x[n,grp(o),h',w'] + ν[n,o]; ς(ρ̂) = ρ̂ if ρ̂ ≥ η[o]
// (tie: upper), else η·exp(ρ̂ − η). Work item (n·G' + grp, chunk of FWD_CH output
// channels of the group, pixel vector), pixel fastest: r_x is loaded once per item and
// applied to its ≤ FWD_CH channels. 128-bit when H'·W' allows, else one pixel per item
// (same items per pixel: the scalar grid is as large as the vector one).
// Bytes per element: reads x (sizeof T), writes y (sizeof T), + r_x 4 B per item pixel,
// i.e. 4/FWD_CH B per element (ν, r_w, η per (n, o): L1). Minimum: x + y + r_x once.
template <class T>
__device__ void fwd_impl(const T* __restrict__ x, const float* __restrict__ lin, const float* __restrict__ r_w,
                         const float* __restrict__ r_x, const float* __restrict__ nu,
                         const float* __restrict__ eta, T* __restrict__ y, IieuGeom g) {
  constexpr int V = ak::Vec16<T>::N;
  const int P = g.oh * g.ow;
  const bool vec = (P % V == 0) && ak::aligned16(x) && ak::aligned16(y);
  const unsigned pv = vec ? P / V : P;
  const unsigned nch = (g.o_per + FWD_CH - 1) / FWD_CH;
  const unsigned gp = g.gp;
  const unsigned total = (unsigned)(g.n * g.gp) * nch * pv;
  for (unsigned i = tid32(); i < total; i += stride32()) {
    const unsigned r = i / pv, tq = r / nch, nq = tq / gp;
    const int j = (int)(i - r * pv), ch = (int)(r - tq * nch), grp = (int)(tq - nq * gp), n = (int)nq;
    const int p = vec ? j * V : j;
    const int o0 = grp * g.o_per + ch * FWD_CH, on = min(FWD_CH, g.o_per - ch * FWD_CH);
    const float* rxp = r_x + (long long)tq * P + p;
    if (vec) {
      float rx[V];
      load_f32<V>(rxp, rx);
      for (int k = 0; k < on; ++k) {
        const int o = o0 + k;
        const long long no = (long long)n * g.o + o, e = no * P + p;
        float xv[V], out[V];
        ak::Vec16<T>::load(x + e, xv);
        if (lin != nullptr)
#pragma unroll
          for (int m = 0; m < V; ++m) xv[m] = psi_x<T>(xv[m], lin, o);
        const float rw = r_w[o], nv = nu[no], et = eta[o];
#pragma unroll
        for (int m = 0; m < V; ++m) {
          const float rh = rho_of(xv[m], rw, rx[m], nv);
          out[m] = rh >= et ? rh * xv[m] : et * expf(rh - et) * xv[m];
        }
        ak::Vec16<T>::store(y + e, out);
      }
    } else {
      const float rx = *rxp;
      for (int k = 0; k < on; ++k) {
        const int o = o0 + k;
        const long long no = (long long)n * g.o + o, e = no * P + p;
        const float xv = psi_x<T>(ak::to_f32(x[e]), lin, o);
        const float rh = rho_of(xv, r_w[o], rx, nu[no]);
        const float et = eta[o];
        y[e] = ak::from_f32<T>(rh >= et ? rh * xv : et * expf(rh - et) * xv);
      }
    }
  }
}

// =====================================================================================
// backward

// Per element: ς, and g = dy·∂y/∂ρ̂ and the dη term dy·x·exp(ρ̂−η)·(1−η) (lower branch).
struct Adj {
  float sc;    // ς(ρ̂)
  float g;     // dy·∂y/∂ρ̂
  float deta;  // contribution to dη (0 on the upper branch)
};
__device__ __forceinline__ Adj adj_bwd(float dy, float x, float rw, float rx, float nu, float et) {
  const float r = rho_of(x, rw, rx, nu);
  Adj a;
  if (r >= et) {
    a.sc = r;
    a.g = dy * x;
    a.deta = 0.0f;
  } else {
    const float ex = expf(r - et);
    const float e = et * ex;
    a.sc = e;
    a.g = dy * (e * x);
    a.deta = dy * x * ex * (1.0f - et);
  }
  return a;
}

// Stage 1 of every per-(n,o) reduction: part[no] = [Σg, Σ g·x·r_x, Σ dη-term] over
// the (n,o) plane. One block per (n, grp, chunk of SUMS_CH planes o of the group),
// grid-stride over those rows: each block pixel (vector) loads r_x once for its ≤
// SUMS_CH planes; the 3·SUMS_CH sums are reduced per plane in a fixed order
// (block_sums). Bytes: reads dy, x once, r_x once per block row (4/SUMS_CH B per
// element), writes 12 B per plane.
template <class T>
__device__ void bwd_sums_impl(const T* __restrict__ dy, const T* __restrict__ x,
                              const float* __restrict__ lin, const float* __restrict__ r_w, const float* __restrict__ r_x,
                              const float* __restrict__ nu, const float* __restrict__ eta,
                              float* __restrict__ part, IieuGeom g) {
  SHARED_ARRAY(float, scratch, 32 * 3 * SUMS_CH);
  constexpr int V = ak::Vec16<T>::N;
  const int P = g.oh * g.ow;
  // 128-bit groups when the plane allows and x, dy are 16-byte aligned. The launcher
  // hands this kernel aligned x and dy whenever the plane allows groups (it copies a
  // misaligned input first: src/cuda/iieu.rs), so the grouping — and the bits of the
  // sums — depend on the shape only. (A scalar path over the same groups in this body
  // spilled under the 64-register sm_90 bound.)
  const bool vec = (P % V == 0) && ak::aligned16(x) && ak::aligned16(dy);
  const int pv = vec ? P / V : P;
  const unsigned nch = (g.o_per + SUMS_CH - 1) / SUMS_CH;
  const unsigned gp = g.gp;
  const unsigned rows = (unsigned)(g.n * g.gp) * nch;
  for (unsigned r = blockIdx.x; r < rows; r += gridDim.x) {
    const unsigned tq = r / nch, nq = tq / gp;
    const int ch = (int)(r - tq * nch), grp = (int)(tq - nq * gp), n = (int)nq;
    const int o0 = grp * g.o_per + ch * SUMS_CH, on = min(SUMS_CH, g.o_per - ch * SUMS_CH);
    const long long no0 = (long long)n * g.o + o0;
    const float* rxp = r_x + (long long)tq * P;
    float acc[3 * SUMS_CH];
#pragma unroll
    for (int k = 0; k < 3 * SUMS_CH; ++k) acc[k] = 0.0f;
    for (int j = threadIdx.x; j < pv; j += blockDim.x) {
      if (vec) {
        float rx[V];
        load_f32<V>(rxp + j * V, rx);
#pragma unroll
        for (int k = 0; k < SUMS_CH; ++k) {
          if (k < on) {
            const int o = o0 + k;
            const long long base = (no0 + k) * P + j * V;
            const float rw = r_w[o], nv = nu[no0 + k], et = eta[o];
            float xv[V], dv[V];
            ak::Vec16<T>::load(x + base, xv);
            if (lin != nullptr)
#pragma unroll
              for (int m = 0; m < V; ++m) xv[m] = psi_x<T>(xv[m], lin, o);
            ak::Vec16<T>::load(dy + base, dv);
#pragma unroll
            for (int m = 0; m < V; ++m) {
              const Adj a = adj_bwd(dv[m], xv[m], rw, rx[m], nv, et);
              acc[3 * k] += a.g;
              acc[3 * k + 1] += a.g * xv[m] * rx[m];
              acc[3 * k + 2] += a.deta;
            }
          }
        }
      } else {
        const float rx = rxp[j];
#pragma unroll
        for (int k = 0; k < SUMS_CH; ++k) {
          if (k < on) {
            const int o = o0 + k;
            const long long idx = (no0 + k) * P + j;
            const float xv = psi_x<T>(ak::to_f32(x[idx]), lin, o);
            const Adj a = adj_bwd(ak::to_f32(dy[idx]), xv, r_w[o], rx, nu[no0 + k], eta[o]);
            acc[3 * k] += a.g;
            acc[3 * k + 1] += a.g * xv * rx;
            acc[3 * k + 2] += a.deta;
          }
        }
      }
    }
    block_sums<3 * SUMS_CH>(acc, scratch);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int k = 0; k < SUMS_CH; ++k)
        if (k < on) {
#pragma unroll
          for (int m = 0; m < 3; ++m) part[(no0 + k) * 3 + m] = acc[3 * k + m];
        }
    }
  }
}

// Stage 2 per filter o (one block per o): dγ̇[o] = Σ_n dz·m̂, dβ̇[o] = Σ_n dz,
// dη[o] = Σ_n part.deta, dr_w[o] = Σ_n part.gxr (block reductions: fixed order), then
// dW[o,·] = dr_w·(−r_w²/‖W[o]‖)·W[o,·]. Bytes: reads W once, writes dW once.
template <class T>
__device__ void bwd_params_impl(const T* __restrict__ w, const float* __restrict__ part,
                                const float* __restrict__ dz, const float* __restrict__ m_hat,
                                const float* __restrict__ r_w, const float* __restrict__ w_norm,
                                float* __restrict__ d_gamma, float* __restrict__ d_beta,
                                float* __restrict__ d_eta, T* __restrict__ dw, IieuGeom g) {
  SHARED_ARRAY(float, scratch, 32);
  const long long per = g.w_per;
  for (int o = blockIdx.x; o < g.o; o += gridDim.x) {
    float ag = 0.0f, ab = 0.0f, ae = 0.0f, aw = 0.0f;
    for (int n = threadIdx.x; n < g.n; n += blockDim.x) {
      const long long no = (long long)n * g.o + o;
      const float d = dz[no];
      ag += d * m_hat[no];
      ab += d;
      aw += part[no * 3 + 1];
      ae += part[no * 3 + 2];
    }
    ag = ak::block_sum(ag, scratch);
    ab = ak::block_sum(ab, scratch);
    ae = ak::block_sum(ae, scratch);
    aw = ak::block_sum(aw, scratch);
    if (threadIdx.x == 0) {
      d_gamma[o] = ag;
      d_beta[o] = ab;
      d_eta[o] = ae;
    }
    const float k = aw * inv_norm_slope(w_norm[o], r_w[o]);
    const T* f = w + (long long)o * per;
    T* df = dw + (long long)o * per;
    for (long long i = threadIdx.x; i < per; i += blockDim.x) df[i] = ak::from_f32<T>(k * ak::to_f32(f[i]));
  }
}

// dx = dy·ς(ρ̂) + g·r_w·r_x + dm[n,o]/(H'W'), and the partials of the patch-norm
// adjoint dr_x = Σ_{o∈grp} g·x·r_w[o]: coef_part[s][n,grp,h',w'] = the sum over chunk s
// of the group's output channels (chunk s = [s·chunk, min((s+1)·chunk, O/G'))). Work
// item (n·G' + grp, s, pixel vector), pixel fastest; no atomics. With splits > 1,
// coef_reduce sums the partials in chunk order and applies −r_x²/‖P‖; with one chunk
// (splits = 1: large planes, or few channels per group, e.g. depthwise) this kernel
// applies it and writes coef itself (x_norm is read only then).
// Bytes per element of x: reads dy, x once, writes dx once (the minimum); plus r_x read
// and a partial written once per (n, grp, pixel) and chunk (and ‖P‖ read if splits = 1).
template <class T>
__device__ void bwd_dx_impl(const T* __restrict__ dy, const T* __restrict__ x,
                            const float* __restrict__ lin, const float* __restrict__ r_w, const float* __restrict__ r_x,
                            const float* __restrict__ x_norm, const float* __restrict__ nu,
                            const float* __restrict__ eta, const float* __restrict__ dm,
                            T* __restrict__ dx, float* __restrict__ coef_part, IieuGeom g,
                            int chunk, int splits) {
  constexpr int V = ak::Vec16<T>::N;
  const int P = g.oh * g.ow;
  const long long rx_len = (long long)g.n * g.gp * P;
  const float inv_p = 1.0f / (float)P;
  const bool vec = (P % V == 0) && ak::aligned16(x) && ak::aligned16(dy) && ak::aligned16(dx);
  const unsigned pv = vec ? P / V : P;
  const unsigned spl = splits, gp = g.gp;
  const unsigned total = (unsigned)(g.n * g.gp) * spl * pv;
  for (unsigned i = tid32(); i < total; i += stride32()) {
    const unsigned r = i / pv, tq = r / spl, nq = tq / gp;
    const int j = (int)(i - r * pv), s = (int)(r - tq * spl), grp = (int)(tq - nq * gp), n = (int)nq;
    const int p = vec ? j * V : j;
    const int o0 = grp * g.o_per + s * chunk, on = min(chunk, g.o_per - s * chunk);
    const long long e = (long long)tq * P + p;  // (n·G' + grp)·P + p
    float* cp = coef_part + s * rx_len + e;
    if (vec) {
      float rx[V], acc[V];
      load_f32<V>(r_x + e, rx);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = 0.0f;
      for (int ol = 0; ol < on; ++ol) {
        const int o = o0 + ol;
        const long long no = (long long)n * g.o + o, base = no * P + p;
        const float rw = r_w[o], nv = nu[no], et = eta[o], add = dm[no] * inv_p;
        float xv[V], dv[V], out[V];
        ak::Vec16<T>::load(x + base, xv);
        if (lin != nullptr)
#pragma unroll
          for (int k = 0; k < V; ++k) xv[k] = psi_x<T>(xv[k], lin, o);
        ak::Vec16<T>::load(dy + base, dv);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const Adj a = adj_bwd(dv[k], xv[k], rw, rx[k], nv, et);
          out[k] = dv[k] * a.sc + a.g * rw * rx[k] + add;
          acc[k] += a.g * xv[k] * rw;
        }
        ak::Vec16<T>::store(dx + base, out);
      }
      if (splits == 1) {
        float nm[V];
        load_f32<V>(x_norm + e, nm);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] *= inv_norm_slope(nm[k], rx[k]);
      }
      store_f32<V>(cp, acc);
    } else {
      const float rx = r_x[e];
      float acc = 0.0f;
      for (int ol = 0; ol < on; ++ol) {
        const int o = o0 + ol;
        const long long no = (long long)n * g.o + o, idx = no * P + p;
        const float rw = r_w[o];
        const float xv = psi_x<T>(ak::to_f32(x[idx]), lin, o), dv = ak::to_f32(dy[idx]);
        const Adj a = adj_bwd(dv, xv, rw, rx, nu[no], eta[o]);
        dx[idx] = ak::from_f32<T>(dv * a.sc + a.g * rw * rx + dm[no] * inv_p);
        acc += a.g * xv * rw;
      }
      *cp = splits == 1 ? acc * inv_norm_slope(x_norm[e], rx) : acc;
    }
  }
}

// Σ of coef over the windows (h',w') whose (strided, dilated, padded) patch contains
// input pixel (h, w), in fixed (tap-row, tap-column) order.
__device__ __forceinline__ float window_gather(const float* __restrict__ cf, int h, int w, const IieuGeom& g) {
  float acc = 0.0f;
  for_windows(h, g.kh, g.sh, g.ph, g.dh, g.oh, [&](int ho) {
    const float* row = cf + ho * g.ow;
    for_windows(w, g.kw, g.sw, g.pw, g.dw, g.ow, [&](int wo) { acc += row[wo]; });
  });
  return acc;
}

// dx_pre[n,c,h,w] = x_pre[n,c,h,w]·Σ_{windows ∋ (h,w)} coef[n,grp(c),window]. Work item
// (n·G' + grp, chunk s of the group's input channels, pixel vector), pixel fastest: the
// window sum is gathered once per item (no atomics), then applied to the chunk's
// channels. Bytes: reads x_pre once, writes dx_pre once (minimum), plus ≤ KH·KW cached
// coef reads per (n, grp, pixel) and chunk.
template <class T>
__device__ void bwd_dxpre_impl(const T* __restrict__ x_pre, const float* __restrict__ coef,
                               T* __restrict__ dx_pre, IieuGeom g, int chunk, int splits) {
  constexpr int V = ak::Vec16<T>::N;
  const int hw = g.h * g.w;
  const int P = g.oh * g.ow;
  const bool vec = (hw % V == 0) && ak::aligned16(x_pre) && ak::aligned16(dx_pre);
  const unsigned pv = vec ? hw / V : hw;
  const unsigned spl = splits;
  const unsigned total = (unsigned)(g.n * g.gp) * spl * pv;
  for (unsigned i = tid32(); i < total; i += stride32()) {
    const unsigned r = i / pv, tq = r / spl;
    const int j = (int)(i - r * pv), s = (int)(r - tq * spl);
    const int c0 = s * chunk, cn = min(chunk, g.c_per - c0);
    const int pix = vec ? j * V : j;
    const float* cf = coef + (long long)tq * P;
    const long long base0 = ((long long)tq * g.c_per + c0) * hw + pix;
    if (vec) {
      float acc[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int px = pix + k, h = px / g.w, w = px - h * g.w;
        acc[k] = window_gather(cf, h, w, g);
      }
      for (int c = 0; c < cn; ++c) {
        const long long base = base0 + (long long)c * hw;
        float v[V];
        ak::Vec16<T>::load(x_pre + base, v);
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] *= acc[k];
        ak::Vec16<T>::store(dx_pre + base, v);
      }
    } else {
      const int h = pix / g.w, w = pix - h * g.w;
      const float acc = window_gather(cf, h, w, g);
      for (int c = 0; c < cn; ++c) {
        const long long idx = base0 + (long long)c * hw;
        dx_pre[idx] = ak::from_f32<T>(ak::to_f32(x_pre[idx]) * acc);
      }
    }
  }
}

}  // namespace ak_iieu

// =====================================================================================
// f32-only kernels (operate on f32 intermediates: one instance, no dtype suffix)

// out[e] = Σ_s part[s·len + e] for e < len, s < splits, in chunk order: q from
// patch_sq's channel-chunk partials (launched only when splits > 1). Thread per element
// (32-bit index). Bytes: 4·splits read + 4 written per element.
AK_KERNEL IIEU_BOUNDS void iieu_sum_chunks(const float* __restrict__ part, float* __restrict__ out,
                                           int len, int splits) {
  const unsigned total = len;
  for (unsigned e = ak_iieu::tid32(); e < total; e += ak_iieu::stride32()) {
    float acc = part[e];
    for (int s = 1; s < splits; ++s) acc += part[(long long)s * len + e];
    out[e] = acc;
  }
}
EMU_REGISTER(iieu_sum_chunks)

// ‖P‖ and r_x = 1/(‖P‖+eps) per (n,grp,h',w'): KH×KW window sum of q with the conv's
// stride/padding and the patch dilation (g.dh, g.dw), zero outside the image — never a
// convolution. Thread per output position (32-bit item index).
// Bytes: ≤ KH·KW cached q reads, 8 B written.
AK_KERNEL __launch_bounds__(IIEU_THREADS, IIEU_PATCH_WINDOW_MB) void iieu_patch_window(
    const float* __restrict__ q, float* __restrict__ x_norm, float* __restrict__ r_x, IieuGeom g) {
  const int hw = g.h * g.w;
  const int P = g.oh * g.ow;
  const unsigned total = (unsigned)(g.n * g.gp) * (unsigned)P;
  for (unsigned e = ak_iieu::tid32(); e < total; e += ak_iieu::stride32()) {
    const unsigned tq = e / (unsigned)P;
    const int p = (int)(e - tq * P);
    const int ho = p / g.ow, wo = p - ho * g.ow;
    const float* qp = q + (long long)tq * hw;
    const int h0 = ho * g.sh - g.ph, w0 = wo * g.sw - g.pw;
    float acc = 0.0f;
    for (int a = 0; a < g.kh; ++a) {
      const int hi = h0 + a * g.dh;
      if (hi < 0 || hi >= g.h) continue;
      const float* row = qp + hi * g.w;
      for (int b = 0; b < g.kw; ++b) {
        const int wi = w0 + b * g.dw;
        if (wi >= 0 && wi < g.w) acc += row[wi];
      }
    }
    // Not fmaxf(acc, 0): that returns 0 for a NaN acc, turning a NaN in x_pre into a
    // zero norm (r_x = 1/EPS) instead of propagating it (SPEC §4).
    const float nm = sqrtf(acc < 0.0f ? 0.0f : acc);
    x_norm[e] = nm;
    r_x[e] = 1.0f / (nm + ak_iieu::EPS);
  }
}
EMU_REGISTER(iieu_patch_window)

// coef[n,grp,h',w'] = dr_x·(−r_x²/‖P‖) (0 where ‖P‖ = 0), dr_x = Σ_s coef_part[s] (the
// `splits` output-channel-chunk partials of bwd_dx, summed in chunk order). Thread per
// (n, grp, h', w') (32-bit item index). Bytes: reads 4·(splits + 2) B, writes 4 B per
// (n, grp, h', w').
AK_KERNEL IIEU_BOUNDS void iieu_coef_reduce(const float* __restrict__ coef_part, const float* __restrict__ r_x,
                                            const float* __restrict__ x_norm, float* __restrict__ coef,
                                            IieuGeom g, int splits) {
  const long long rx_len = (long long)g.n * g.gp * g.oh * g.ow;
  const unsigned total = (unsigned)rx_len;
  for (unsigned e = ak_iieu::tid32(); e < total; e += ak_iieu::stride32()) {
    float acc = coef_part[e];
    for (int s = 1; s < splits; ++s) acc += coef_part[s * rx_len + e];
    coef[e] = acc * ak_iieu::inv_norm_slope(x_norm[e], r_x[e]);
  }
}
EMU_REGISTER(iieu_coef_reduce)

// term-B LayerNorm over O per sample (biased variance, eps_ln), then
// ν = σ(γ̇·m̂ + β̇). One block per sample, two-pass statistics.
// Bytes per (n,o): reads m three times (mean, variance, normalisation; the re-reads
// hit L1/L2), γ̇ and β̇ once; writes m̂, ν (4 B each); plus rstd per sample.
AK_KERNEL IIEU_BOUNDS void iieu_ln_fwd(const float* __restrict__ m, const float* __restrict__ gamma,
                                       const float* __restrict__ beta, float* __restrict__ m_hat,
                                       float* __restrict__ rstd, float* __restrict__ nu, IieuGeom g) {
  SHARED_ARRAY(float, scratch, 32);
  for (int n = blockIdx.x; n < g.n; n += gridDim.x) {
    const float* mr = m + (long long)n * g.o;
    float acc = 0.0f;
    for (int o = threadIdx.x; o < g.o; o += blockDim.x) acc += mr[o];
    const float mean = ak::block_sum(acc, scratch) / (float)g.o;
    acc = 0.0f;
    for (int o = threadIdx.x; o < g.o; o += blockDim.x) {
      const float d = mr[o] - mean;
      acc = fmaf(d, d, acc);
    }
    const float var = ak::block_sum(acc, scratch) / (float)g.o;
    const float rs = 1.0f / sqrtf(var + ak_iieu::EPS_LN);
    for (int o = threadIdx.x; o < g.o; o += blockDim.x) {
      const long long no = (long long)n * g.o + o;
      const float mh = (mr[o] - mean) * rs;
      m_hat[no] = mh;
      nu[no] = ak_iieu::sigmoid(fmaf(gamma[o], mh, beta[o]));
    }
    if (threadIdx.x == 0) rstd[n] = rs;
  }
}
EMU_REGISTER(iieu_ln_fwd)

// term-B backward per sample: dz = ν(1−ν)·Σg, dm̂ = γ̇·dz, LayerNorm backward
// dm = rstd·(dm̂ − mean(dm̂) − m̂·mean(dm̂·m̂)). One block per sample.
// Bytes: reads part[·,0] (Σg), ν, γ̇, m̂ in each of the two passes (the second from
// L1/L2); writes dz, dm.
AK_KERNEL IIEU_BOUNDS void iieu_ln_bwd(const float* __restrict__ part, const float* __restrict__ nu,
                                       const float* __restrict__ gamma, const float* __restrict__ m_hat,
                                       const float* __restrict__ rstd, float* __restrict__ dz,
                                       float* __restrict__ dm, IieuGeom g) {
  SHARED_ARRAY(float, scratch, 32);
  for (int n = blockIdx.x; n < g.n; n += gridDim.x) {
    float a1 = 0.0f, a2 = 0.0f;
    for (int o = threadIdx.x; o < g.o; o += blockDim.x) {
      const long long no = (long long)n * g.o + o;
      const float v = nu[no];
      const float dmh = gamma[o] * (v * (1.0f - v) * part[no * 3]);
      a1 += dmh;
      a2 += dmh * m_hat[no];
    }
    const float m1 = ak::block_sum(a1, scratch) / (float)g.o;
    const float m2 = ak::block_sum(a2, scratch) / (float)g.o;
    const float rs = rstd[n];
    for (int o = threadIdx.x; o < g.o; o += blockDim.x) {
      const long long no = (long long)n * g.o + o;
      const float v = nu[no];
      const float d = v * (1.0f - v) * part[no * 3];
      const float dmh = gamma[o] * d;
      dz[no] = d;
      dm[no] = rs * (dmh - m1 - m_hat[no] * m2);
    }
  }
}
EMU_REGISTER(iieu_ln_bwd)

// =====================================================================================
// per-dtype entry points

#define IIEU_KERNELS(SUF, T, SUMS_MB)                                                                     \
  AK_KERNEL IIEU_BOUNDS void iieu_filter_norm_##SUF(const T* w, float* r_w, float* w_norm, IieuGeom g) {     \
    ak_iieu::filter_norm_impl<T>(w, r_w, w_norm, g);                                               \
  }                                                                                                \
  EMU_REGISTER(iieu_filter_norm_##SUF)                                                             \
  AK_KERNEL IIEU_BOUNDS void iieu_patch_sq_##SUF(const T* x_pre, float* q_part, IieuGeom g, int chunk,         \
                                     int splits) {                                                 \
    ak_iieu::patch_sq_impl<T>(x_pre, q_part, g, chunk, splits);                                    \
  }                                                                                                \
  EMU_REGISTER(iieu_patch_sq_##SUF)                                                                \
  AK_KERNEL IIEU_BOUNDS void iieu_gap_##SUF(const T* x, float* m, IieuGeom g) { ak_iieu::gap_impl<T>(x, m, g); } \
  EMU_REGISTER(iieu_gap_##SUF)                                                                     \
  AK_KERNEL IIEU_BOUNDS void iieu_fwd_##SUF(const T* x, const float* lin, const float* r_w, const float* r_x, \
                                  const float* nu, const float* eta, T* y, IieuGeom g) {           \
    ak_iieu::fwd_impl<T>(x, lin, r_w, r_x, nu, eta, y, g);                                         \
  }                                                                                                \
  EMU_REGISTER(iieu_fwd_##SUF)                                                                     \
  AK_KERNEL __launch_bounds__(IIEU_THREADS, SUMS_MB) void iieu_bwd_sums_##SUF(                    \
                                       const T* dy, const T* x, const float* lin, const float* r_w, \
                                       const float* r_x, const float* nu, const float* eta,        \
                                       float* part, IieuGeom g) {                                  \
    ak_iieu::bwd_sums_impl<T>(dy, x, lin, r_w, r_x, nu, eta, part, g);                             \
  }                                                                                                \
  EMU_REGISTER(iieu_bwd_sums_##SUF)                                                                \
  AK_KERNEL IIEU_BOUNDS void iieu_bwd_params_##SUF(const T* w, const float* part, const float* dz,           \
                                         const float* m_hat, const float* r_w, const float* w_norm, \
                                         float* d_gamma, float* d_beta, float* d_eta, T* dw,       \
                                         IieuGeom g) {                                             \
    ak_iieu::bwd_params_impl<T>(w, part, dz, m_hat, r_w, w_norm, d_gamma, d_beta, d_eta, dw, g);   \
  }                                                                                                \
  EMU_REGISTER(iieu_bwd_params_##SUF)                                                              \
  AK_KERNEL IIEU_BOUNDS void iieu_bwd_dx_##SUF(const T* dy, const T* x, const float* lin, const float* r_w,  \
                                     const float* r_x, const float* x_norm, const float* nu,       \
                                     const float* eta, const float* dm, T* dx, float* coef_part,   \
                                     IieuGeom g, int chunk, int splits) {                          \
    ak_iieu::bwd_dx_impl<T>(dy, x, lin, r_w, r_x, x_norm, nu, eta, dm, dx, coef_part, g, chunk,    \
                            splits);                                                               \
  }                                                                                                \
  EMU_REGISTER(iieu_bwd_dx_##SUF)                                                                  \
  AK_KERNEL __launch_bounds__(IIEU_THREADS, IIEU_BWD_DXPRE_MB) void iieu_bwd_dxpre_##SUF(         \
                                        const T* x_pre, const float* coef, T* dx_pre, IieuGeom g,  \
                                        int chunk, int splits) {                                   \
    ak_iieu::bwd_dxpre_impl<T>(x_pre, coef, dx_pre, g, chunk, splits);                             \
  }                                                                                                \
  EMU_REGISTER(iieu_bwd_dxpre_##SUF)

IIEU_KERNELS(f32, float, IIEU_BWD_SUMS_MB_f32)
IIEU_KERNELS(f16, __half, IIEU_BWD_SUMS_MB_f16)
IIEU_KERNELS(bf16, __nv_bfloat16, IIEU_BWD_SUMS_MB_bf16)

#undef IIEU_KERNELS
#undef IIEU_BOUNDS
#undef IIEU_THREADS
#undef IIEU_MB
#undef IIEU_PATCH_WINDOW_MB
#undef IIEU_BWD_SUMS_MB_f32
#undef IIEU_BWD_SUMS_MB_f16
#undef IIEU_BWD_SUMS_MB_bf16
#undef IIEU_BWD_DXPRE_MB
