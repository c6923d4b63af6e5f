// iieu_conv.cu — IieuConv2d (SPEC §1.5): convolution, ψ and IIEU-B as one fused op.
// Rust side: src/cuda/iieu_conv.rs (validates every length, then launches these and
// the IIEU-B kernels of iieu.cu it shares: ln_fwd, fwd, bwd_sums, ln_bwd, bwd_params,
// bwd_dx, bwd_dxpre — those read x = ψ(c) through the per-channel `lin` vector, so x
// is never materialised).
//
// Storage dtypes float / __half / __nv_bfloat16 for x_pre, W, c, y, dy, dx, dc, dx_pre,
// dW; every intermediate is f32 and all arithmetic and accumulation is f32.
//
// Pipeline (one launch per line; GEMM shapes per group):
//   forward : fwd          implicit GEMM c = W·im2col(x_pre) (M = H'·W' pixels per
//                          sample, N = O/g, K = C/g·KH·KW), with in the same pass
//                          ‖P‖² partials from the A tiles (sq), and per-(n,o,tile)
//                          (mean, M2) of c (tile-local two-pass, half-warp shuffles)
//             rx           ‖P‖, r_x from sq (AllChannels: Σ over the groups, in order)
//             plane_stats  per-(n,o) (mean, M2) of c: Chan merge of the tiles, in order
//             psi          per o: BatchNorm batch stats (merge over n, in order), running
//                          stats, lin = (sub, k, scale, add), GAP(x)[n,o] = ψ(mean_c)
//             (iieu.cu)    ln_fwd → ν;  fwd (x = ψ(c) via lin) → y
//   backward: (iieu.cu)    bwd_sums, ln_bwd, bwd_params, bwd_dx, bwd_dxpre (x via lin):
//                          dx = ∂L/∂x, the r_x path of dx_pre, the r_w path of dW
//             psi_bwd_sums per-(n,o) [Σdx, Σdx·x̂]            (stage 1)
//             psi_bwd_params per o: dψ-scale, dψ-shift, dc coefficients (stage 2, in order)
//             dc           dc = A[o]·dx + B[o]·x̂ + C[o]
//             dgrad        implicit GEMM dx_pre = Wᵀ ⋆ dc  (+ the r_x path, in its epilogue)
//             wgrad        implicit GEMM per fixed reduction chunk: dW partials (f32)
//             wgrad_reduce dW = Σ_chunks (in order) + the r_w path
// No float atomics; every reduction has a fixed order: results are bitwise
// reproducible. The GEMMs use CUDA-core FMA on 64×64×16 shared-memory tiles, 256
// threads, 4×4 outputs per thread; the tile loaders, the MMA step (mma_tile) and the
// epilogues are separate functions so the MMA step can become mma.sync.
// The forward also has a tensor-core kernel (fwd_tc, f16 / bf16 on sm_80+:
// mma.sync.m16n8k16 from kernels/mma.cuh, see tc::conv_fwd_tc_impl), chosen by the
// launcher; so have the data gradient (dgrad_tc, see tc::dgrad_tc_impl) and the
// weight gradient (wgrad_tc, the same chunks and partials, see tc::wgrad_tc_impl).
// Each has a Turing form for f16 on sm_75 (fwd_tc75, dgrad_tc75, wgrad_tc75: the same
// body with SM75 = true, mma.sync.m16n8k8, no cp.async).
#include "common.cuh"
#include "mma.cuh"

static_assert(sizeof(ConvGeom) == 88, "ConvGeom layout drifted from src/cuda/abi.rs");
#ifndef __CUDACC_RTC__  // NVRTC has no offsetof; nvcc and the emulator check it
static_assert(offsetof(ConvGeom, splits) == 84, "ConvGeom layout drifted from src/cuda/abi.rs");
#endif

namespace ak_conv {

constexpr int BM = 64;  // tile rows
constexpr int BN = 64;  // tile columns
constexpr int BK = 16;  // tile depth
constexpr int TM = 4;   // rows per thread
constexpr int TN = 4;   // columns per thread
constexpr int THREADS = 256;
static_assert((BM / TM) * (BN / TN) == THREADS, "one 4×4 micro-tile per thread");
static_assert(BM * BK == 4 * THREADS && BN * BK == 4 * THREADS, "4 loads per thread per operand");

constexpr float EPS = 1e-8f;

__device__ __forceinline__ long long grid_tid() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long long grid_stride() { return (long long)gridDim.x * blockDim.x; }

// Input value under tap k = (cl, i, jj) of output pixel (ho, wo) of group grp, 0 in the
// padding. xs: sample base (C, H, W).
template <class T>
__device__ __forceinline__ float im2col_at(const T* __restrict__ xs, const ConvGeom& g, int grp, int ho, int wo,
                                           int k) {
  const int taps = g.kh * g.kw;
  const int cl = k / taps, r = k - cl * taps, i = r / g.kw, jj = r - i * g.kw;
  const int hi = ho * g.sh - g.ph + i * g.dh, wi = wo * g.sw - g.pw + jj * g.dw;
  if (hi < 0 || hi >= g.h || wi < 0 || wi >= g.w) return 0.0f;
  return ak::to_f32(xs[((long long)(grp * g.cg + cl) * g.h + hi) * g.w + wi]);
}

// The MMA step: acc[i][j] += Σ_k As[k][rm·TM + i]·Bs[k][cn·TN + j] over one BK slab.
// Both tiles are k-major (As[k·BM + m], Bs[k·BN + n]). CUDA-core FMA; the tensor-core
// version replaces this function only.
__device__ __forceinline__ void mma_tile(const float* As, const float* Bs, int rm, int cn, float (&acc)[TM][TN]) {
#pragma unroll
  for (int k = 0; k < BK; ++k) {
    float a[TM], b[TN];
#pragma unroll
    for (int i = 0; i < TM; ++i) a[i] = As[k * BM + rm * TM + i];
#pragma unroll
    for (int j = 0; j < TN; ++j) b[j] = Bs[k * BN + cn * TN + j];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
  }
}

// Sum over the 16 lanes of a half-warp (xor 8, 4, 2, 1: a fixed tree). Every lane of
// the warp must call it.
__device__ __forceinline__ float half_warp_sum(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Weight tile of the forward: Bs[kk][oo] = W[grp·og + o][k0 + kk] (0 outside). Thread →
// filter oo = tid/4, 4 consecutive k; one 128-bit load when the 4 are in range and
// aligned (f32, K % 4 == 0).
template <class T>
__device__ __forceinline__ void load_w_tile(const T* __restrict__ w, const ConvGeom& g, int grp, int nt, int k0,
                                            float* Bs) {
  const int tid = threadIdx.x;
  const int oo = tid >> 2, kk = (tid & 3) * 4;
  const int o = nt * BN + oo, k = k0 + kk;
  float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (o < g.og) {
    const T* row = w + (long long)(grp * g.og + o) * g.kdim;
    if (sizeof(T) == 4 && (g.kdim & 3) == 0 && k + 4 <= g.kdim && ak::aligned16(row + k)) {
      ak::Vec16<float>::load(reinterpret_cast<const float*>(row + k), v);
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q)
        if (k + q < g.kdim) v[q] = ak::to_f32(row[k + q]);
    }
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) Bs[(kk + q) * BN + oo] = v[q];
}

// ---------------------------------------------------------------------------------
// forward: c = conv(x_pre, W) + ‖P‖² partials + per-tile (mean, M2) of c.
// grid (N·mtiles, g·ntiles), 256 threads. Block (n, mt, grp, nt): pixels
// mt·64 .. +64 of sample n, filters nt·64 .. +64 of group grp. Thread (rm = tid%16:
// 4 consecutive pixels, cn = tid/16: 4 filters) — consecutive threads store
// consecutive pixels. sq (optional): written by the nt == 0 blocks,
// sq[(n·g + grp)·P + p] = Σ_k A[p][k]² (the zero padding adds nothing).
// Bytes: reads x_pre ~ntiles·KH·KW/(sh·sw) times through L1/L2 (the implicit im2col)
// and W once per pixel tile; writes c once, 8 B per (n, o, tile) and 4 B per (n,grp,p).
template <class T>
__device__ void conv_fwd_impl(const T* __restrict__ x_pre, const T* __restrict__ w, T* __restrict__ out,
                         float* __restrict__ sq, float* __restrict__ st_mean, float* __restrict__ st_m2, ConvGeom g) {
  SHARED_ARRAY(float, As, BK * BM);
  SHARED_ARRAY(float, Bs, BK * BN);
  const int tid = threadIdx.x, rm = tid & 15, cn = tid >> 4;
  const int P = g.oh * g.ow;
  const int ntiles = (g.og + BN - 1) / BN;
  const int n = (int)(blockIdx.x / g.mtiles), mt = (int)(blockIdx.x - (unsigned)n * g.mtiles);
  const int grp = (int)(blockIdx.y / ntiles), nt = (int)(blockIdx.y - (unsigned)grp * ntiles);
  const bool do_sq = sq != nullptr && nt == 0;
  const T* xs = x_pre + (long long)n * g.c * g.h * g.w;

  // This thread's A-load pixel (fixed over k) and its coordinates.
  const int am = tid & (BM - 1), ak0 = tid >> 6;
  const int ap = mt * BM + am;
  const int aho = ap / g.ow, awo = ap - aho * g.ow;

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;
  float sqacc = 0.0f;

  for (int k0 = 0; k0 < g.kdim; k0 += BK) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int kk = ak0 + 4 * r, k = k0 + kk;
      As[kk * BM + am] = (ap < P && k < g.kdim) ? im2col_at(xs, g, grp, aho, awo, k) : 0.0f;
    }
    load_w_tile(w, g, grp, nt, k0, Bs);
    __syncthreads();
    if (do_sq && tid < BM) {
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        const float v = As[kk * BM + tid];
        sqacc = fmaf(v, v, sqacc);
      }
    }
    mma_tile(As, Bs, rm, cn, acc);
    __syncthreads();
  }

  // Epilogue: store c (rounded to T), keep the rounded values for the statistics.
  const int p0 = mt * BM + rm * TM;
  const int cnt = P - mt * BM < BM ? P - mt * BM : BM;
#pragma unroll
  for (int j = 0; j < TN; ++j) {
    const int o = nt * BN + cn * TN + j;
    const bool col = o < g.og;
    T* dst = out + ((long long)n * g.o + grp * g.og + (col ? o : 0)) * P;
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int p = p0 + i;
      if (col && p < P) {
        const T v = ak::from_f32<T>(acc[i][j]);
        dst[p] = v;
        acc[i][j] = ak::to_f32(v);
        s += acc[i][j];
      }
    }
    const float mean = half_warp_sum(s) / (float)cnt;
    float d2 = 0.0f;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const float d = acc[i][j] - mean;
      if (col && p0 + i < P) d2 = fmaf(d, d, d2);
    }
    d2 = half_warp_sum(d2);
    if (col && rm == 0) {
      const long long idx = ((long long)n * g.o + grp * g.og + o) * g.mtiles + mt;
      st_mean[idx] = mean;
      st_m2[idx] = d2;
    }
  }
  if (do_sq && tid < BM && ap < P) sq[((long long)n * g.groups + grp) * P + ap] = sqacc;
}

// ---------------------------------------------------------------------------------
// forward on tensor cores (f16 / bf16 storage, sm_80+): the same c, sq, st_mean and
// st_m2 as conv_fwd_impl, from mma.sync.m16n8k16 with f32 accumulation.
// grid (N·mtiles, g·ntiles) as conv_fwd_impl (the same 64-pixel × 64-filter block tile,
// so the per-(n, o, tile) statistics mean the same), 128 threads = 4 warps, each a
// 32-pixel × 32-filter warp tile (2 m16 × 4 n8 fragments, 32 f32 accumulators), BK = 32
// (two k16 steps per stage), 2 shared-memory stages.
//
// Shared layouts (16-byte chunks XOR-swizzled so that every ldmatrix phase — 8 rows of
// 16 bytes — touches 8 distinct 4-bank groups, and the stores below are conflict-free):
//   A stage: As[k][p], k-major (BK rows of 64 pixels, 128 B), chunk p/8 ^ (k % 8);
//            the A fragments come from ldmatrix .x4 .trans (A is pixels × k).
//   B stage: Bs[o][k], o-major (64 rows of BK = 32 k, 64 B), chunk k/8 ^ ((o/2) % 4);
//            the B fragments ("col": B stored per column o) from ldmatrix .x4.
// Pipeline: while the MMAs consume stage kt % 2, stage kt+1 is in flight: W (k
// contiguous per filter) by cp.async.cg 16 B with zero-fill past O/g and K when
// K % 8 == 0 and W is 16-byte aligned (else scalar loads staged in registers); the
// im2col of x_pre by cp.async.cg 16 B (zero-fill past P and K) for a 1×1, stride-1,
// unpadded layer with H·W % 8 == 0, else (NCHW: a tap's pixels are neither contiguous
// nor 4-byte aligned in general, so no cp.async size fits) by scalar loads issued
// before the MMAs into registers and stored to the other stage after them (zeros for
// the padding and the ragged edges). One __syncthreads per stage.
// ‖P‖² from the shared A stage (threads 0..63, pixel tid, k in order: the same fmaf
// chain as conv_fwd_impl, so sq is bitwise the CUDA-core path's). Epilogue: c rounded
// to T into a shared 64 × 68 f32 tile, then coalesced stores of c and the per-tile
// (mean, M2) by the same half-warp tree as conv_fwd_impl (each half-warp: one filter,
// 4 pixels per lane) — for equal c, equal statistics bits.
// The tf32 form (T = float, f32 storage, sm_80+, opt-in: src/cuda/iieu_conv.rs
// set_allow_tf32): the same tiles, pipeline and epilogue with the stages in raw f32
// (so sq, and r_x, are bitwise the CUDA-core path's, and cp.async moves 4-float chunks:
// W when K % 4 == 0, x_pre for a 1×1, stride-1, unpadded layer with H·W % 4 == 0);
// each operand is rounded to tf32 (cvt.rna) as its fragment is read from shared memory
// by plain 32-bit loads (a_off32 / b_off32 below: conflict-free), and each 16-deep
// k-step is two mma.sync.m16n8k8.tf32 (k 0..7, then 8..15) with f32 accumulation.
namespace tc {
constexpr int BM = 64, BN = 64, BK = 32;
constexpr int THREADS = 128;  // 4 warps, 2 × 2 warp tiles of 32 × 32
// __launch_bounds__(THREADS): 128 registers (nvcc 13, sm_80..90), 4 blocks = 16 warps
// per SM. A minimum of 5 blocks per SM (96 registers) spills 8 bytes; 6 (80) more.
constexpr int A_STAGE = BK * BM;  // elements (halves; floats in the tf32 forward)
constexpr int B_STAGE = BN * BK;  // elements
constexpr int PIPE_BYTES = 2 * (A_STAGE + B_STAGE) * 2;
constexpr int CS_LD = BM + 4;  // epilogue tile row (floats): conflict-free fragment stores
constexpr int EPI_BYTES = BN * CS_LD * 4;
constexpr int SMEM_BYTES = PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES;
static_assert(BM == ak_conv::BM && BN == ak_conv::BN, "the tile statistics assume 64-pixel tiles");
static_assert(A_STAGE == 16 * THREADS && B_STAGE == 16 * THREADS, "16 elements per thread per operand");
static_assert(SMEM_BYTES % 16 == 0, "uint4 storage");
// The tf32 forward (f32 storage): the same stages of raw f32 (twice the bytes; 32 KB of
// pipeline, 4 blocks per SM on sm_80 / sm_90, 3 on sm_86 / sm_89's 100 KB).
constexpr int PIPE_BYTES_F32 = 2 * (A_STAGE + B_STAGE) * 4;
constexpr int SMEM_BYTES_F32 = PIPE_BYTES_F32 > EPI_BYTES ? PIPE_BYTES_F32 : EPI_BYTES;
static_assert(SMEM_BYTES_F32 % 16 == 0, "uint4 storage");
template <class T>
struct Smem {
  static constexpr int bytes = SMEM_BYTES;
};
template <>
struct Smem<float> {
  static constexpr int bytes = SMEM_BYTES_F32;
};

__device__ __forceinline__ int a_off(int k, int p) { return k * BM + ((((p >> 3) ^ (k & 7))) << 3) + (p & 7); }
__device__ __forceinline__ int b_off(int o, int k) { return o * BK + ((((k >> 3) ^ ((o >> 1) & 3))) << 3) + (k & 7); }

// f32 stages (tf32 fragments are read by plain 32-bit shared loads: ldmatrix moves b16
// elements and cannot give a lane one 32-bit element of a column). Bank of word i:
// i % 32.
//   A (k-major, As[k][p], a row of BM = 64 floats = 2 × 32 banks): word k·64 + (p ^ 8·(k%4)).
//     A fragment load (m16n8k8 tf32: a[j] = A[m0 + g (+8)][k0 + t (+4)], k0 % 8 == 0,
//     m0 % 8 == 0): lane (g, t) reads pixel m0 + g (+8) of k row k0 + t (+4), bank
//     (m0 + g) ^ 8t (mod 32) = 8·((m0/8 ^ t) % 4) + g: 4 values of t × 8 of g, 32
//     distinct banks — conflict-free. The swizzle XORs by multiples of 8 below 32, so
//     a 4-pixel (16-byte, cp.async) chunk at p % 4 == 0 stays contiguous and aligned,
//     and a warp's 32 consecutive pixels of one k row (the scalar stores, the ‖P‖²
//     reads) stay 32 distinct banks.
//   B (filter-major, Bs[o][k], a row of BK = 32 floats = 32 banks): word o·32 + (k ^ 4·(o%8)).
//     B fragment load (b[j] = B[k0 + t (+4)][n0 + g], n0 % 8 == 0): lane (g, t) reads
//     k k0 + t (+4) of filter row n0 + g, bank (k0 + t (+4)) ^ 4g = (k0 (+4) ^ 4g) + t:
//     8 values of g give 8 distinct multiples of 4, × 4 of t — conflict-free. 4-float
//     chunks at k % 4 == 0 stay contiguous; a warp's 32 k of one filter row, 32 banks.
__device__ __forceinline__ int a_off32(int k, int p) { return k * BM + (p ^ ((k & 3) << 3)); }
__device__ __forceinline__ int b_off32(int o, int k) { return o * BK + (k ^ ((o & 7) << 2)); }
template <class T>
__device__ __forceinline__ int a_off_t(int k, int p) {
  return a_off(k, p);
}
template <>
__device__ __forceinline__ int a_off_t<float>(int k, int p) {
  return a_off32(k, p);
}
template <class T>
__device__ __forceinline__ int b_off_t(int o, int k) {
  return b_off(o, k);
}
template <>
__device__ __forceinline__ int b_off_t<float>(int o, int k) {
  return b_off32(o, k);
}
template <class T>
struct IsF32 {
  static constexpr bool value = false;
};
template <>
struct IsF32<float> {
  static constexpr bool value = true;
};

__device__ __forceinline__ void mma16816(__half, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ak::mma::mma_m16n8k16_f16(d, a, b, d);
}
__device__ __forceinline__ void mma16816(__nv_bfloat16, float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  ak::mma::mma_m16n8k16_bf16(d, a, b, d);
}

// The Turing form (SM75 = true, f16 only: sm_75 has m16n8k8 f16 and ldmatrix, no bf16
// mma and no cp.async): every operand staged through registers (the scalar paths
// below), each m16n8k16 step as two m16n8k8 over its k halves (the fragment of
// m16n8k16 is the two m16n8k8 fragments side by side: a0,a1 | a2,a3 and b0 | b1).
template <bool SM75>
__device__ __forceinline__ void mma_step(__half zero, float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  if constexpr (SM75) {
    const uint32_t lo[2] = {a[0], a[1]}, hi[2] = {a[2], a[3]};
    const uint32_t b0[1] = {b[0]}, b1[1] = {b[1]};
    ak::mma::mma_m16n8k8_f16(d, lo, b0, d);
    ak::mma::mma_m16n8k8_f16(d, hi, b1, d);
  } else {
    mma16816(zero, d, a, b);
  }
}
template <bool SM75>
__device__ __forceinline__ void mma_step(__nv_bfloat16 zero, float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  static_assert(!SM75, "bf16 mma needs sm_80");
  mma16816(zero, d, a, b);
}

// One BK-deep stage of tf32 mma for a warp's 32 × 32 tile (2 m16 × 4 n8 fragments of
// m16n8k8), in k-steps of 8: each fragment element by a 32-bit shared load of lane
// (gq, tq) = (lane / 4, lane % 4), rounded by cvt.rna. a_at(m, k) / b_at(n, k): the
// offsets of A[m][k] and B[n][k] in the stages (each GEMM's swizzle: see its caller).
template <int DEPTH, class AAt, class BAt>
__device__ __forceinline__ void tf32_stage(const float* as, const float* bs, int wm, int wn, int lane, AAt a_at,
                                           BAt b_at, float (&acc)[2][4][4]) {
  const int gq = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int ks = 0; ks < DEPTH; ks += 8) {
    uint32_t af[2][4], bf[4][2];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
      const int m0 = wm * 32 + mi * 16 + gq;
      af[mi][0] = ak::mma::to_tf32(as[a_at(m0, ks + tq)]);
      af[mi][1] = ak::mma::to_tf32(as[a_at(m0 + 8, ks + tq)]);
      af[mi][2] = ak::mma::to_tf32(as[a_at(m0, ks + tq + 4)]);
      af[mi][3] = ak::mma::to_tf32(as[a_at(m0 + 8, ks + tq + 4)]);
    }
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
      const int n0 = wn * 32 + ni * 8 + gq;
      bf[ni][0] = ak::mma::to_tf32(bs[b_at(n0, ks + tq)]);
      bf[ni][1] = ak::mma::to_tf32(bs[b_at(n0, ks + tq + 4)]);
    }
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) ak::mma::mma_m16n8k8_tf32(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
  }
}

template <class T, bool SM75 = false>
__device__ void conv_fwd_tc_impl(const T* __restrict__ x_pre, const T* __restrict__ w, T* __restrict__ out,
                                 float* __restrict__ sq, float* __restrict__ st_mean, float* __restrict__ st_m2,
                                 ConvGeom g) {
  // The sm_80 form on an sm_75 build: never launched there (the launcher checks the
  // compute capability); its cp.async / m16n8k16 would trap.
  if constexpr (!SM75) {
#if AK_MMA_EMULATED
    // The emulated sm_75 (or compute_75 build): the trap at entry, as on the GPU.
    emu::need_sm(80, "an sm_80 tensor-core kernel body");
#elif !AK_MMA_SM80
    __trap();
    return;
#endif
  }
  constexpr bool F32 = IsF32<T>::value;  // the tf32 form
  static_assert(!(F32 && SM75), "tf32 mma needs sm_80");
  constexpr int VEC = 16 / (int)sizeof(T);  // elements per 16-byte cp.async chunk
  constexpr int A_SH = F32 ? 4 : 3;         // log2(BM / VEC): chunks per A row
  constexpr int B_SH = F32 ? 3 : 2;         // log2(BK / VEC): chunks per B row
  static_assert((BM / VEC) == (1 << A_SH) && (BK / VEC) == (1 << B_SH), "chunk counts");
#if AK_MMA_SM75
  SHARED_ARRAY(uint4, smem, Smem<T>::bytes / 16);
  T* const As = reinterpret_cast<T*>(smem);          // 2 stages of A_STAGE
  T* const Bs = As + 2 * A_STAGE;                    // 2 stages of B_STAGE
  float* const Cs = reinterpret_cast<float*>(smem);  // epilogue (after the last stage)
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp & 1, wn = warp >> 1;  // warp tile: pixels wm·32.., filters wn·32..
  const int P = g.oh * g.ow;
  const int ntiles = (g.og + BN - 1) / BN;
  const int n = (int)(blockIdx.x / g.mtiles), mt = (int)(blockIdx.x - (unsigned)n * g.mtiles);
  const int grp = (int)(blockIdx.y / ntiles), nt = (int)(blockIdx.y - (unsigned)grp * ntiles);
  const bool do_sq = sq != nullptr && nt == 0;
  const T* xs = x_pre + (long long)n * g.c * g.h * g.w;
  const T zero = ak::from_f32<T>(0.0f);

  // A loads: pixel am (fixed), k = ak0 + 2r (r < 16): a warp reads 32 consecutive pixels.
  const int am = tid & (BM - 1), ak0 = tid >> 6;
  const int ap = mt * BM + am;
  const int aho = ap / g.ow, awo = ap - aho * g.ow;
  // B loads. Vector: chunk (row tid/4 + 32q, chunk tid%4), q < 2. Scalar: k = tid%32,
  // row tid/32 + 4r, r < 16.
  // The Turing form never takes a cp.async path: `g.kdim < 0` is a run-time false (K ≥ 1
  // always). A compile-time false let ptxas hoist all of the next stage's staged loads
  // and take 204 registers (2 blocks per SM); with it, 128 under (128, 4), no spill.
  const bool async_ok = SM75 ? g.kdim < 0 : true;
  const bool bvec = async_ok && (g.kdim & (VEC - 1)) == 0 && ak::aligned16(w);
  const T* wg = w + (long long)grp * g.og * g.kdim;
  const int KT = (g.kdim + BK - 1) / BK;

  // A by cp.async: a 1×1, stride-1, unpadded layer with H·W % VEC == 0 (then a tap's
  // pixels are the input plane itself, VEC of them one aligned 16-byte chunk, all in or
  // all out of the plane). Chunk (k row id/(BM/VEC), pixels VEC·(id%(BM/VEC)) ..),
  // id = tid + 128q.
  const bool avec = async_ok && g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 &&
                    (P & (VEC - 1)) == 0 && ak::aligned16(x_pre);

  T areg[16], breg[16];
  // This thread's taps k = k0 + ak0 + 2r: (cl, i, jj) decomposed once per stage and
  // stepped by 2 (no division per element).
  const int taps = g.kh * g.kw;
  const int hi0 = aho * g.sh - g.ph, wi0 = awo * g.sw - g.pw;
  const T* xg = xs + (long long)grp * g.cg * g.h * g.w;
  auto load_a = [&](int k0) {
    const int kf = k0 + ak0;
    int cl = kf / taps, rr = kf - cl * taps;
    int i = rr / g.kw, jj = rr - i * g.kw;
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int k = kf + 2 * r;
      const int hi = hi0 + i * g.dh, wi = wi0 + jj * g.dw;
      const bool in = ap < P && k < g.kdim && hi >= 0 && hi < g.h && wi >= 0 && wi < g.w;
      areg[r] = in ? xg[((long long)cl * g.h + hi) * g.w + wi] : zero;
#pragma unroll
      for (int step = 0; step < 2; ++step) {  // k += 1, twice (KW may be 1)
        if (++jj == g.kw) {
          jj = 0;
          if (++i == g.kh) {
            i = 0;
            ++cl;
          }
        }
      }
    }
  };
  auto issue_a = [&](int k0, int st) {
#pragma unroll
    for (int q = 0; q < A_STAGE / VEC / THREADS; ++q) {
      // chunk id = tid + THREADS·q (THREADS is a multiple of the chunks per row)
      const int kk = (tid >> A_SH) + (THREADS >> A_SH) * q, pp = (tid & ((1 << A_SH) - 1)) * VEC;
      const int k = k0 + kk, p = mt * BM + pp;
      const bool in = k < g.kdim && p < P;
      const T* src = in ? xg + (long long)k * P + p : x_pre;
      ak::mma::cp_async_cg_zfill(&As[st * A_STAGE + a_off_t<T>(kk, pp)], src, in ? 16 : 0);
    }
  };
  auto store_a = [&](int st) {
#pragma unroll
    for (int r = 0; r < 16; ++r) As[st * A_STAGE + a_off_t<T>(ak0 + 2 * r, am)] = areg[r];
  };
  auto load_b = [&](int k0) {
    const int kk = tid & 31, k = k0 + kk;
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int o = nt * BN + (tid >> 5) + 4 * r;
      breg[r] = (o < g.og && k < g.kdim) ? wg[(long long)o * g.kdim + k] : zero;
    }
  };
  auto store_b = [&](int st) {
#pragma unroll
    for (int r = 0; r < 16; ++r) Bs[st * B_STAGE + b_off_t<T>((tid >> 5) + 4 * r, tid & 31)] = breg[r];
  };
  auto issue_b = [&](int k0, int st) {
#pragma unroll
    for (int q = 0; q < B_STAGE / VEC / THREADS; ++q) {
      const int oo = (tid >> B_SH) + (THREADS >> B_SH) * q, kk = (tid & ((1 << B_SH) - 1)) * VEC;
      const int o = nt * BN + oo, k = k0 + kk;
      const bool in = o < g.og && k < g.kdim;  // K % VEC == 0: a chunk is all in or all out
      const T* src = in ? wg + (long long)o * g.kdim + k : w;
      ak::mma::cp_async_cg_zfill(&Bs[st * B_STAGE + b_off_t<T>(oo, kk)], src, in ? 16 : 0);
    }
  };

  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
  float sqacc = 0.0f;

  // Prologue: stage 0.
  if (avec) issue_a(0, 0);
  else load_a(0);
  if (bvec) {
    issue_b(0, 0);
  } else {
    load_b(0);
    store_b(0);
  }
  if constexpr (!SM75) ak::mma::cp_async_commit_group();
  if (!avec) store_a(0);
  if constexpr (!SM75) ak::mma::cp_async_wait_group<0>();
  __syncthreads();

  const int lr = lane & 7, lj = lane >> 3;  // ldmatrix: this lane's row of matrix lj
  for (int kt = 0; kt < KT; ++kt) {
    const int cur = kt & 1, nxt = cur ^ 1;
    const bool more = kt + 1 < KT;
    if (more) {
      if (bvec) issue_b((kt + 1) * BK, nxt);
      else load_b((kt + 1) * BK);
      if (avec) issue_a((kt + 1) * BK, nxt);
      else load_a((kt + 1) * BK);
    }
    if constexpr (!SM75) ak::mma::cp_async_commit_group();
    const T* as = As + cur * A_STAGE;
    const T* bs = Bs + cur * B_STAGE;
    if (do_sq && tid < BM) {
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        const float v = ak::to_f32(as[a_off_t<T>(kk, tid)]);
        sqacc = fmaf(v, v, sqacc);
      }
    }
    if constexpr (F32) {
      // tf32 (two k8 steps per 16): A k-major with a_off32, B row-major with b_off32
      // (conflict-free).
      tf32_stage<BK>(
          as, bs, wm, wn, lane, [](int m, int k) { return a_off32(k, m); },
          [](int o, int k) { return b_off32(o, k); }, acc);
    } else {
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      uint32_t af[2][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        // matrix lj: pixels m0 + (lj&1)·8 .., k ks + (lj>>1)·8 + lr (stored k-major).
        const int m0 = wm * 32 + mi * 16;
        ak::mma::ldmatrix_x4_trans(af[mi], &as[a_off(ks + (lj >> 1) * 8 + lr, m0 + (lj & 1) * 8)]);
      }
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        // matrix lj: filters n0 + (lj>>1)·8 + lr, k ks + (lj&1)·8 ..
        const int n0 = wn * 32 + nj * 16;
        uint32_t r[4];
        ak::mma::ldmatrix_x4(r, &bs[b_off(n0 + (lj >> 1) * 8 + lr, ks + (lj & 1) * 8)]);
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_step<SM75>(zero, acc[mi][ni], af[mi], bf[ni]);
    }
    }
    if (more) {
      if (!avec) store_a(nxt);
      if (!bvec) store_b(nxt);
    }
    if constexpr (!SM75) ak::mma::cp_async_wait_group<0>();
    __syncthreads();
  }

  // Epilogue 1: accumulators → rounded to T → Cs[o][p] (f32).
  {
    const int gq = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int m = wm * 32 + mi * 16 + gq + (e >= 2 ? 8 : 0);
          const int o = wn * 32 + ni * 8 + 2 * tq + (e & 1);
          Cs[o * CS_LD + m] = ak::to_f32(ak::from_f32<T>(acc[mi][ni][e]));
        }
  }
  __syncthreads();
  // Epilogue 2: c, coalesced (64 consecutive pixels per filter row).
  {
    const int p = mt * BM + (tid & 63);
#pragma unroll 4
    for (int r = 0; r < BN / 2; ++r) {
      const int ol = 2 * r + (tid >> 6), o = nt * BN + ol;
      if (o < g.og && p < P) out[((long long)n * g.o + grp * g.og + o) * P + p] = ak::from_f32<T>(Cs[ol * CS_LD + (tid & 63)]);
    }
  }
  // Epilogue 3: per-(n, o, tile) (mean, M2): half-warp hw = one filter, lane rm = 4
  // pixels rm·4 .. +3 (conv_fwd_impl's order and tree).
  {
    const int rm = tid & 15, hw = tid >> 4;
    const int p0 = mt * BM + rm * 4;
    const int cnt = P - mt * BM < BM ? P - mt * BM : BM;
#pragma unroll 1
    for (int r = 0; r < BN / 8; ++r) {
      const int ol = 8 * r + hw, o = nt * BN + ol;
      const bool col = o < g.og;
      float v[4], s = 0.0f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        v[i] = Cs[ol * CS_LD + rm * 4 + i];
        if (col && p0 + i < P) s += v[i];
      }
      const float mean = ak_conv::half_warp_sum(s) / (float)cnt;
      float d2 = 0.0f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float d = v[i] - mean;
        if (col && p0 + i < P) d2 = fmaf(d, d, d2);
      }
      d2 = ak_conv::half_warp_sum(d2);
      if (col && rm == 0) {
        const long long idx = ((long long)n * g.o + grp * g.og + o) * g.mtiles + mt;
        st_mean[idx] = mean;
        st_m2[idx] = d2;
      }
    }
  }
  if (do_sq && tid < BM && ap < P) sq[((long long)n * g.groups + grp) * P + ap] = sqacc;
#else
  // No tensor cores below sm_75 (no such arch is built).
  (void)x_pre, (void)w, (void)out, (void)sq, (void)st_mean, (void)st_m2, (void)g;
  __trap();
#endif
}

// ---------------------------------------------------------------------------------
// data gradient on tensor cores (f16 / bf16 storage, sm_80+): the same dx_pre as
// dgrad_impl (below, outside this namespace), from mma.sync.m16n8k16 with f32
// accumulation. grid (N·itiles, g·ctiles) as dgrad_impl: rows = 64 input pixels q of
// sample n, columns = 64 input channels c' of group grp, K = O/g·KH·KW in dgrad_impl's
// order (k = ol·KH·KW + t). 128 threads = 4 warps of 32 × 32 (2 m16 × 4 n8 fragments),
// BK = 32, 2 shared-memory stages — conv_fwd_tc_impl's tiles, pipeline and shared
// budget; only the operands' sources differ:
//   A stage: As[k][q], k-major with a_off, the fragments by ldmatrix .x4 .trans (as the
//            forward's A): A[q][k] = dc[n, grp·O/g + ol, ho, wo] with ho·sh = h + ph −
//            i·dh, wo·sw = w + pw − jj·dw (0 in the stride / padding / dilation holes
//            and past the plane). Gathered by scalar loads staged in registers, except
//            for a 1×1, stride-1, unpadded layer with H·W % 8 == 0 (A = dc's planes
//            themselves): 16-byte cp.async.cg with zero-fill past H·W and K.
//   B stage: Bs[k][c'], k-major with a_off too (W is (O, C/g, KH, KW): along c' it is
//            contiguous only for a 1×1 kernel), the fragments ("col") by ldmatrix .x4
//            .trans. B[k][c'] = W[grp·O/g + ol][c'][t]: 16-byte cp.async.cg (zero-fill
//            past C/g and K) when KH·KW == 1, C/g % 8 == 0 and W is 16-byte aligned;
//            else scalar loads staged in registers (thread → c' = tid % 64, so the
//            shared stores of a warp are one 64-byte run of a row: conflict-free).
// Epilogue: the f32 accumulators into a shared 64 × 68 f32 tile Cs[c'][q], then
// coalesced stores dx_pre = T(acc + add) (64 consecutive pixels per channel row; the
// same f32 add and rounding as dgrad_impl).
// SM75 = true: the Turing form (f16 only), as conv_fwd_tc_impl's — both operands
// register-staged (no cp.async on sm_75), each k16 step two m16n8k8 (mma_step).
template <class T, bool SM75 = false>
__device__ void dgrad_tc_impl(const T* __restrict__ dc, const T* __restrict__ w, const T* __restrict__ add,
                              T* __restrict__ dx_pre, ConvGeom g) {
  constexpr bool F32 = IsF32<T>::value;  // the tf32 form
  constexpr int VEC = 16 / (int)sizeof(T);  // elements per 16-byte cp.async chunk
  constexpr int A_SH = F32 ? 4 : 3;         // log2(BM / VEC) = log2(BN / VEC): chunks per row
  static_assert(BM == BN && (BM / VEC) == (1 << A_SH), "chunk counts");
  static_assert(!(SM75 && F32), "tf32 mma needs sm_80");
  // The sm_80 form on an sm_75 build: never launched there (the launcher checks the
  // compute capability and the loaded code's PTX version); cp.async / m16n8k16 trap.
  if constexpr (!SM75) {
#if AK_MMA_EMULATED
    // The emulated sm_75 (or compute_75 build): the trap at entry, as on the GPU.
    emu::need_sm(80, "an sm_80 tensor-core kernel body");
#elif !AK_MMA_SM80
    __trap();
    return;
#endif
  }
#if AK_MMA_SM75
  SHARED_ARRAY(uint4, smem, Smem<T>::bytes / 16);
  T* const As = reinterpret_cast<T*>(smem);          // 2 stages of A_STAGE
  T* const Bs = As + 2 * A_STAGE;                    // 2 stages of B_STAGE
  float* const Cs = reinterpret_cast<float*>(smem);  // epilogue (after the last stage)
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp & 1, wn = warp >> 1;  // warp tile: pixels wm·32.., channels wn·32..
  const int HW = g.h * g.w, P = g.oh * g.ow, taps = g.kh * g.kw;
  const int itiles = (HW + BM - 1) / BM, ctiles = (g.cg + BN - 1) / BN;
  const int K2 = g.og * taps;
  const int n = (int)(blockIdx.x / itiles), it = (int)(blockIdx.x - (unsigned)n * itiles);
  const int grp = (int)(blockIdx.y / ctiles), ct = (int)(blockIdx.y - (unsigned)grp * ctiles);
  const T* dcs = dc + ((long long)n * g.o + grp * g.og) * P;
  const T* wg = w + (long long)grp * g.og * g.cg * taps;
  const T zero = ak::from_f32<T>(0.0f);

  // A loads: pixel am (fixed), k = ak0 + 2r (r < 16): a warp reads 32 consecutive pixels.
  const int am = tid & (BM - 1), ak0 = tid >> 6;
  const int aq = it * BM + am;
  const int ah = aq / g.w, aw = aq - ah * g.w;
  // The Turing form never takes a cp.async path: `g.kdim < 0` is a run-time false (as
  // in conv_fwd_tc_impl: a compile-time false lets ptxas hoist the staged loads).
  const bool async_ok = SM75 ? g.kdim < 0 : true;
  // A by cp.async: 1×1, stride 1, unpadded (then P = H·W and A[q][k] = dc[n, grp·O/g +
  // k, q]), H·W % VEC == 0 (VEC pixels: one aligned 16-byte chunk, all in or all out).
  const bool avec = async_ok && taps == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 &&
                    (HW & (VEC - 1)) == 0 && ak::aligned16(dc);
  // B by cp.async: W[grp·O/g + k][c'] contiguous in c' (KH·KW == 1), C/g % VEC == 0.
  const bool bvec = async_ok && taps == 1 && (g.cg & (VEC - 1)) == 0 && ak::aligned16(w);
  const int KT = (K2 + BK - 1) / BK;

  T areg[16], breg[16];
  // This thread's k = k0 + ak0 + 2r: (ol, i, jj) decomposed once per stage and stepped
  // by 2 (no division per element but the stride's).
  const int th0 = ah + g.ph, tw0 = aw + g.pw;
  auto load_a = [&](int k0) {
    const int kf = k0 + ak0;
    int ol = kf / taps, rr = kf - ol * taps;
    int i = rr / g.kw, jj = rr - i * g.kw;
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int k = kf + 2 * r;
      const int th = th0 - i * g.dh, tw = tw0 - jj * g.dw;
      T v = zero;
      if (aq < HW && k < K2 && th >= 0 && tw >= 0) {
        const int ho = th / g.sh, wo = tw / g.sw;
        if (ho * g.sh == th && wo * g.sw == tw && ho < g.oh && wo < g.ow) v = dcs[(long long)ol * P + ho * g.ow + wo];
      }
      areg[r] = v;
#pragma unroll
      for (int step = 0; step < 2; ++step) {  // k += 1, twice (KW may be 1)
        if (++jj == g.kw) {
          jj = 0;
          if (++i == g.kh) {
            i = 0;
            ++ol;
          }
        }
      }
    }
  };
  auto issue_a = [&](int k0, int st) {
#pragma unroll
    for (int q = 0; q < A_STAGE / VEC / THREADS; ++q) {
      // chunk id = tid + THREADS·q (THREADS is a multiple of the chunks per row)
      const int kk = (tid >> A_SH) + (THREADS >> A_SH) * q, pp = (tid & ((1 << A_SH) - 1)) * VEC;
      const int k = k0 + kk, p = it * BM + pp;
      const bool in = k < K2 && p < HW;
      const T* src = in ? dcs + (long long)k * P + p : dc;
      ak::mma::cp_async_cg_zfill(&As[st * A_STAGE + a_off_t<T>(kk, pp)], src, in ? 16 : 0);
    }
  };
  auto store_a = [&](int st) {
#pragma unroll
    for (int r = 0; r < 16; ++r) As[st * A_STAGE + a_off_t<T>(ak0 + 2 * r, am)] = areg[r];
  };
  // Scalar B: column c' = tid % 64 (fixed), k = ak0 + 2r.
  const int bc = ct * BN + am;
  auto load_b = [&](int k0) {
    const int kf = k0 + ak0;
    int ol = kf / taps, t = kf - ol * taps;
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int k = kf + 2 * r;
      breg[r] = (k < K2 && bc < g.cg) ? wg[((long long)ol * g.cg + bc) * taps + t] : zero;
#pragma unroll
      for (int step = 0; step < 2; ++step) {  // k += 1, twice (KH·KW may be 1)
        if (++t == taps) {
          t = 0;
          ++ol;
        }
      }
    }
  };
  auto store_b = [&](int st) {
#pragma unroll
    for (int r = 0; r < 16; ++r) Bs[st * B_STAGE + a_off_t<T>(ak0 + 2 * r, am)] = breg[r];
  };
  auto issue_b = [&](int k0, int st) {
#pragma unroll
    for (int q = 0; q < B_STAGE / VEC / THREADS; ++q) {
      const int kk = (tid >> A_SH) + (THREADS >> A_SH) * q, cc = (tid & ((1 << A_SH) - 1)) * VEC;
      const int k = k0 + kk, c = ct * BN + cc;
      const bool in = k < K2 && c < g.cg;  // C/g % VEC == 0: a chunk is all in or all out
      const T* src = in ? wg + (long long)k * g.cg + c : w;
      ak::mma::cp_async_cg_zfill(&Bs[st * B_STAGE + a_off_t<T>(kk, cc)], src, in ? 16 : 0);
    }
  };

  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  // Prologue: stage 0.
  if (avec) issue_a(0, 0);
  else load_a(0);
  if (bvec) issue_b(0, 0);
  else load_b(0);
  if constexpr (!SM75) ak::mma::cp_async_commit_group();
  if (!avec) store_a(0);
  if (!bvec) store_b(0);
  if constexpr (!SM75) ak::mma::cp_async_wait_group<0>();
  __syncthreads();

  const int lr = lane & 7, lj = lane >> 3;  // ldmatrix: this lane's row of matrix lj
  for (int kt = 0; kt < KT; ++kt) {
    const int cur = kt & 1, nxt = cur ^ 1;
    const bool more = kt + 1 < KT;
    if (more) {
      if (bvec) issue_b((kt + 1) * BK, nxt);
      else load_b((kt + 1) * BK);
      if (avec) issue_a((kt + 1) * BK, nxt);
      else load_a((kt + 1) * BK);
    }
    if constexpr (!SM75) ak::mma::cp_async_commit_group();
    const T* as = As + cur * A_STAGE;
    const T* bs = Bs + cur * B_STAGE;
    if constexpr (F32) {
      // tf32: both stages k-major with a_off32 (conflict-free: the forward's A
      // analysis; B[k][c'] is read as A[q][k] is, k row ks + tq (+4), column n0 + gq).
      tf32_stage<BK>(
          as, bs, wm, wn, lane, [](int q, int k) { return a_off32(k, q); },
          [](int c, int k) { return a_off32(k, c); }, acc);
    } else {
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      uint32_t af[2][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        // matrix lj: pixels m0 + (lj&1)·8 .., k ks + (lj>>1)·8 + lr (stored k-major).
        const int m0 = wm * 32 + mi * 16;
        ak::mma::ldmatrix_x4_trans(af[mi], &as[a_off(ks + (lj >> 1) * 8 + lr, m0 + (lj & 1) * 8)]);
      }
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        // matrix lj: k ks + (lj&1)·8 + lr, channels n0 + (lj>>1)·8 .. (stored k-major;
        // .trans gives lane l the k pair 2(l%4)..+1 of channel l/4: a "col" B register).
        const int n0 = wn * 32 + nj * 16;
        uint32_t r[4];
        ak::mma::ldmatrix_x4_trans(r, &bs[a_off(ks + (lj & 1) * 8 + lr, n0 + (lj >> 1) * 8)]);
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_step<SM75>(zero, acc[mi][ni], af[mi], bf[ni]);
    }
    }
    if (more) {
      if (!avec) store_a(nxt);
      if (!bvec) store_b(nxt);
    }
    if constexpr (!SM75) ak::mma::cp_async_wait_group<0>();
    __syncthreads();
  }

  // Epilogue 1: accumulators → Cs[c'][q] (f32, unrounded: the add comes first).
  {
    const int gq = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int m = wm * 32 + mi * 16 + gq + (e >= 2 ? 8 : 0);
          const int c = wn * 32 + ni * 8 + 2 * tq + (e & 1);
          Cs[c * CS_LD + m] = acc[mi][ni][e];
        }
  }
  __syncthreads();
  // Epilogue 2: dx_pre = T(acc + add), coalesced (64 consecutive pixels per channel row).
  {
    const int q = it * BM + am;
#pragma unroll 4
    for (int r = 0; r < BN / 2; ++r) {
      const int cl = 2 * r + (tid >> 6), c = ct * BN + cl;
      if (c < g.cg && q < HW) {
        const long long e = ((long long)n * g.c + grp * g.cg + c) * HW + q;
        const float extra = add != nullptr ? ak::to_f32(add[e]) : 0.0f;
        dx_pre[e] = ak::from_f32<T>(Cs[cl * CS_LD + am] + extra);
      }
    }
  }
#else
  // No tensor cores below sm_75 (no such arch is built).
  (void)dc, (void)w, (void)add, (void)dx_pre, (void)g;
  __trap();
#endif
}
// ---------------------------------------------------------------------------------
// weight gradient on tensor cores (f16 / bf16 storage, sm_80+): the same f32 partials
// as wgrad_impl, part[s][grp·og + o][k] = Σ_{r ∈ chunk s} dc[n, grp·og + o, p]·
// im2col(x_pre)[n, p, k] (r = n·P + p), from mma.sync.m16n8k16 with f32 accumulation.
// grid (g·otiles, ktiles, splits) and the chunks of wgrad_impl (per = ⌈slabs/splits⌉
// 16-pixel slabs per chunk, the same r ranges), so wgrad_reduce and the split logic
// are unchanged; 128 threads = 4 warps, each a 32-filter × 32-weight-entry warp tile
// (2 m16 × 4 n8 fragments), 32 pixels of the reduction per stage (two k16 steps; a
// chunk of an odd number of slabs ends with a half stage of zeros), 2 shared stages.
// The MMA's K dimension is the pixel index r: A = dc (filters × pixels, row-major) and
// B = im2col (pixels × weight entries, "col": stored per weight entry) are both kept
// pixel-contiguous per row, As[o][r] and Bs[k][r] (64 rows of 32 pixels, 64 B, chunk
// r/8 ^ ((row/2) % 4): b_off), so both fragments come from plain ldmatrix .x4 (no
// .trans: each 8×8 matrix row is 8 consecutive pixels of one filter / weight entry).
// Pipeline as conv_fwd_tc_impl (while the MMAs consume stage cur, stage cur^1 is in
// flight; one __syncthreads per stage): dc (pixels contiguous per (n, o)) by cp.async.cg
// 16 B (zero-fill past O/g and the chunk's end) when P % 8 == 0 and dc is 16-byte
// aligned — chunk starts are multiples of 16 pixels, so an 8-pixel chunk is then one
// sample's, aligned, all in or all out; else scalar loads staged in registers (lane =
// pixel, a warp reads 32 consecutive pixels of one filter). The im2col of x_pre by
// cp.async 16 B for a 1×1, stride-1, unpadded layer with H·W % 8 == 0 (a weight entry is
// a channel, 8 pixels one aligned chunk of its plane), else register-staged (lane =
// pixel, the tap of each of the block's 64 weight entries from a shared table built
// once per block: no division per element). Deterministic: each part entry is one
// fixed sequence of mma k-steps.
constexpr int W_STAGE = BM * BK;  // halves per operand stage: 64 rows × 32 pixels
static_assert(W_STAGE == 16 * THREADS, "16 elements per thread per operand");
static_assert(ak_conv::BK * 2 == BK, "a stage is two 16-pixel slabs of the chunking");

// SM75 = true: the Turing form (f16 only), as conv_fwd_tc_impl's — both operands
// register-staged (no cp.async on sm_75), each 16-pixel k-step two m16n8k8 (mma_step):
// the same chunks, a different but fixed sequence of roundings (still reproducible).
template <class T, bool SM75 = false>
__device__ void wgrad_tc_impl(const T* __restrict__ dc, const T* __restrict__ x_pre, float* __restrict__ part,
                              ConvGeom g) {
  constexpr bool F32 = IsF32<T>::value;  // the tf32 form
  constexpr int VEC = 16 / (int)sizeof(T);  // elements (pixels) per 16-byte cp.async chunk
  constexpr int W_SH = F32 ? 3 : 2;         // log2(BK / VEC): chunks per 32-pixel row
  static_assert((BK / VEC) == (1 << W_SH), "chunk counts");
  static_assert(!(SM75 && F32), "tf32 mma needs sm_80");
  // The sm_80 form on an sm_75 build: never launched there (the launcher checks the
  // compute capability and the loaded code's PTX version); cp.async / m16n8k16 trap.
  if constexpr (!SM75) {
#if AK_MMA_EMULATED
    // The emulated sm_75 (or compute_75 build): the trap at entry, as on the GPU.
    emu::need_sm(80, "an sm_80 tensor-core kernel body");
#elif !AK_MMA_SM80
    __trap();
    return;
#endif
  }
#if AK_MMA_SM75
  SHARED_ARRAY(uint4, smem, 4 * W_STAGE * (int)sizeof(T) / 16);
  SHARED_ARRAY(int, tab, 4 * BN);  // per weight entry kk: (cl, i·dh − ph, jj·dw − pw, valid)
  T* const As = reinterpret_cast<T*>(smem);  // 2 stages of dc: As[o][r]
  T* const Bs = As + 2 * W_STAGE;            // 2 stages of im2col: Bs[kk][r]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp & 1, wn = warp >> 1;  // warp tile: filters wm·32.., weight entries wn·32..
  const int P = g.oh * g.ow;
  const int otiles = (g.og + BM - 1) / BM;
  const int grp = (int)(blockIdx.x / otiles), ot = (int)(blockIdx.x - (unsigned)grp * otiles);
  const int kt = (int)blockIdx.y, s = (int)blockIdx.z;
  // The chunk: wgrad_impl's (16-pixel slabs, the same split).
  const long long R = (long long)g.n * P;
  const long long slabs = (R + ak_conv::BK - 1) / ak_conv::BK;
  const long long per = (slabs + g.splits - 1) / g.splits;
  const long long r_begin = (long long)s * per * ak_conv::BK;
  const long long r_end0 = r_begin + per * ak_conv::BK;
  const long long r_end = r_end0 < R ? r_end0 : R;
  const long long nst = r_end > r_begin ? (r_end - r_begin + BK - 1) / BK : 0;
  const T zero = ak::from_f32<T>(0.0f);
  const long long chw = (long long)g.c * g.h * g.w;
  const T* xg = x_pre + (long long)grp * g.cg * g.h * g.w;
  const T* dcg = dc + (long long)(grp * g.og + ot * BM) * P;  // + n·O·P + o·P + p

  if (tid < BN) {
    const int k = kt * BN + tid;
    const int taps = g.kh * g.kw;
    const int cl = k / taps, rr = k - cl * taps, i = rr / g.kw, jj = rr - i * g.kw;
    tab[4 * tid] = cl;
    tab[4 * tid + 1] = i * g.dh - g.ph;
    tab[4 * tid + 2] = jj * g.dw - g.pw;
    tab[4 * tid + 3] = k < g.kdim;
  }

  // The Turing form never takes a cp.async path: `g.kdim < 0` is a run-time false (as
  // in conv_fwd_tc_impl: a compile-time false lets ptxas hoist the staged loads).
  const bool async_ok = SM75 ? g.kdim < 0 : true;
  const bool avec = async_ok && (P & (VEC - 1)) == 0 && ak::aligned16(dc);
  const bool bvec = async_ok && g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 &&
                    (P & (VEC - 1)) == 0 && ak::aligned16(x_pre);
  T areg[16], breg[16];
  // Register staging: this lane's pixel r0 + lane, rows warp + 4j (j < 16).
  auto load_a = [&](long long r0) {
    const long long r = r0 + lane;
    const bool in = r < r_end;
    const int n = in ? (int)(r / P) : 0;
    const int p = in ? (int)(r - (long long)n * P) : 0;
    const T* src = dcg + (long long)n * g.o * P + p;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int o = warp + 4 * j;
      areg[j] = (in && ot * BM + o < g.og) ? src[(long long)o * P] : zero;
    }
  };
  auto store_a = [&](int st) {
#pragma unroll
    for (int j = 0; j < 16; ++j) As[st * W_STAGE + b_off_t<T>(warp + 4 * j, lane)] = areg[j];
  };
  auto load_b = [&](long long r0) {
    const long long r = r0 + lane;
    const bool in = r < r_end;
    const int n = in ? (int)(r / P) : 0;
    const int p = in ? (int)(r - (long long)n * P) : 0;
    const int ho = p / g.ow, wo = p - ho * g.ow;
    const int hb = ho * g.sh, wb = wo * g.sw;
    const T* xs = xg + (long long)n * chw;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int* t = &tab[4 * (warp + 4 * j)];
      const int hi = hb + t[1], wi = wb + t[2];
      const bool ok = in && t[3] != 0 && hi >= 0 && hi < g.h && wi >= 0 && wi < g.w;
      breg[j] = ok ? xs[((long long)t[0] * g.h + hi) * g.w + wi] : zero;
    }
  };
  auto store_b = [&](int st) {
#pragma unroll
    for (int j = 0; j < 16; ++j) Bs[st * W_STAGE + b_off_t<T>(warp + 4 * j, lane)] = breg[j];
  };
  // cp.async: chunk (row id/(BK/VEC), pixels r0 + VEC·(id%(BK/VEC)) ..), id = tid + 128q
  // (f16 / bf16: 4 chunks of 8 pixels per row, q < 2; tf32: 8 of 4, q < 4).
  auto issue_a = [&](long long r0, int st) {
#pragma unroll
    for (int q = 0; q < W_STAGE / VEC / THREADS; ++q) {
      const int row = (tid >> W_SH) + (THREADS >> W_SH) * q, c = (tid & ((1 << W_SH) - 1)) * VEC;
      const long long r = r0 + c;
      const bool in = r < r_end && ot * BM + row < g.og;
      const int n = in ? (int)(r / P) : 0;
      const int p = in ? (int)(r - (long long)n * P) : 0;
      const T* src = in ? dcg + ((long long)n * g.o + row) * P + p : dc;
      ak::mma::cp_async_cg_zfill(&As[st * W_STAGE + b_off_t<T>(row, c)], src, in ? 16 : 0);
    }
  };
  auto issue_b = [&](long long r0, int st) {
#pragma unroll
    for (int q = 0; q < W_STAGE / VEC / THREADS; ++q) {
      const int row = (tid >> W_SH) + (THREADS >> W_SH) * q, c = (tid & ((1 << W_SH) - 1)) * VEC;
      const long long r = r0 + c;
      const int k = kt * BN + row;  // 1×1: the weight entry is the channel
      const bool in = r < r_end && k < g.kdim;
      const int n = in ? (int)(r / P) : 0;
      const int p = in ? (int)(r - (long long)n * P) : 0;
      const T* src = in ? xg + (long long)n * chw + (long long)k * P + p : x_pre;
      ak::mma::cp_async_cg_zfill(&Bs[st * W_STAGE + b_off_t<T>(row, c)], src, in ? 16 : 0);
    }
  };

  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
  __syncthreads();  // the tap table

  if (nst > 0) {
    // Prologue: stage 0.
    if (avec) issue_a(r_begin, 0);
    else load_a(r_begin);
    if (bvec) issue_b(r_begin, 0);
    else load_b(r_begin);
    if constexpr (!SM75) ak::mma::cp_async_commit_group();
    if (!avec) store_a(0);
    if (!bvec) store_b(0);
    if constexpr (!SM75) ak::mma::cp_async_wait_group<0>();
    __syncthreads();

    const int lr = lane & 7, lj = lane >> 3;  // ldmatrix: this lane's row of matrix lj
    for (long long it = 0; it < nst; ++it) {
      const int cur = (int)(it & 1), nxt = cur ^ 1;
      const bool more = it + 1 < nst;
      const long long rn = r_begin + (it + 1) * BK;
      if (more) {
        if (avec) issue_a(rn, nxt);
        else load_a(rn);
        if (bvec) issue_b(rn, nxt);
        else load_b(rn);
      }
      if constexpr (!SM75) ak::mma::cp_async_commit_group();
      const T* as = As + cur * W_STAGE;
      const T* bs = Bs + cur * W_STAGE;
      if constexpr (F32) {
        // tf32, k-steps of 8 pixels: both stages row-major with b_off32 (conflict-free:
        // the forward's B analysis; a[j] = As[m0 + gq (+8)][ks + tq (+4)],
        // b[j] = Bs[n0 + gq][ks + tq (+4)]).
        tf32_stage<BK>(
            as, bs, wm, wn, lane, [](int o, int r) { return b_off32(o, r); },
            [](int kk, int r) { return b_off32(kk, r); }, acc);
      } else {
#pragma unroll
      for (int ks = 0; ks < BK; ks += 16) {
        uint32_t af[2][4], bf[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          // matrix lj: filters m0 + (lj&1)·8 + lr, pixels ks + (lj>>1)·8 .. (a[0..3]).
          const int m0 = wm * 32 + mi * 16;
          ak::mma::ldmatrix_x4(af[mi], &as[b_off(m0 + (lj & 1) * 8 + lr, ks + (lj >> 1) * 8)]);
        }
#pragma unroll
        for (int nj = 0; nj < 2; ++nj) {
          // matrix lj: weight entries n0 + (lj>>1)·8 + lr, pixels ks + (lj&1)·8 ..
          const int n0 = wn * 32 + nj * 16;
          uint32_t r[4];
          ak::mma::ldmatrix_x4(r, &bs[b_off(n0 + (lj >> 1) * 8 + lr, ks + (lj & 1) * 8)]);
          bf[2 * nj][0] = r[0];
          bf[2 * nj][1] = r[1];
          bf[2 * nj + 1][0] = r[2];
          bf[2 * nj + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) mma_step<SM75>(zero, acc[mi][ni], af[mi], bf[ni]);
      }
      }
      if (more) {
        if (!avec) store_a(nxt);
        if (!bvec) store_b(nxt);
      }
      if constexpr (!SM75) ak::mma::cp_async_wait_group<0>();
      __syncthreads();
    }
  }

  // Epilogue: every (o < O/g, k < K) entry of this block's tile (zeros for an empty
  // chunk), straight from the fragments (a quad writes 8 consecutive floats of a row).
  float* dst = part + (long long)s * g.o * g.kdim + (long long)grp * g.og * g.kdim;
  const int gq = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int o = ot * BM + wm * 32 + mi * 16 + gq + (e >= 2 ? 8 : 0);
        const int k = kt * BN + wn * 32 + ni * 8 + 2 * tq + (e & 1);
        if (o < g.og && k < g.kdim) dst[(long long)o * g.kdim + k] = acc[mi][ni][e];
      }
#else
  // No tensor cores below sm_75 (no such arch is built).
  (void)dc, (void)x_pre, (void)part, (void)g;
  __trap();
#endif
}

}  // namespace tc

// ---------------------------------------------------------------------------------
// data gradient: dx_pre[n, grp·cg + c', h, w] = Σ_{o∈grp, i, jj} dc[n,o,ho,wo]·W[o,c',i,jj]
// (ho·sh = h + ph − i·dh, wo·sw = w + pw − jj·dw, in range) + add (the r_x path).
// grid (N·itiles, g·ctiles): rows = 64 input pixels of sample n, columns = 64 input
// channels of group grp, K = O/g·KH·KW. Bytes: reads dc ~ctiles·KH·KW/(sh·sw) times
// through L1/L2, W once per pixel tile, add once; writes dx_pre once.
template <class T>
__device__ void dgrad_impl(const T* __restrict__ dc, const T* __restrict__ w, const T* __restrict__ add,
                           T* __restrict__ dx_pre, ConvGeom g) {
  SHARED_ARRAY(float, As, BK * BM);
  SHARED_ARRAY(float, Bs, BK * BN);
  const int tid = threadIdx.x, rm = tid & 15, cn = tid >> 4;
  const int HW = g.h * g.w, P = g.oh * g.ow, taps = g.kh * g.kw;
  const int itiles = (HW + BM - 1) / BM, ctiles = (g.cg + BN - 1) / BN;
  const int K2 = g.og * taps;
  const int n = (int)(blockIdx.x / itiles), it = (int)(blockIdx.x - (unsigned)n * itiles);
  const int grp = (int)(blockIdx.y / ctiles), ct = (int)(blockIdx.y - (unsigned)grp * ctiles);
  const T* dcs = dc + ((long long)n * g.o + grp * g.og) * P;

  const int am = tid & (BM - 1), ak0 = tid >> 6;
  const int aq = it * BM + am;
  const int ah = aq / g.w, aw = aq - ah * g.w;

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

  for (int k0 = 0; k0 < K2; k0 += BK) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int kk = ak0 + 4 * r, k = k0 + kk;
      float v = 0.0f;
      if (aq < HW && k < K2) {
        const int ol = k / taps, t = k - ol * taps, i = t / g.kw, jj = t - i * g.kw;
        const int th = ah + g.ph - i * g.dh, tw = aw + g.pw - jj * g.dw;
        if (th >= 0 && tw >= 0 && th % g.sh == 0 && tw % g.sw == 0) {
          const int ho = th / g.sh, wo = tw / g.sw;
          if (ho < g.oh && wo < g.ow) v = ak::to_f32(dcs[(long long)ol * P + ho * g.ow + wo]);
        }
      }
      As[kk * BM + am] = v;
    }
    // B[k][c'] = W[grp·og + ol][c'][i][jj]: thread → column c' = tid % 64, 4 k rows.
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int kk = ak0 + 4 * r, k = k0 + kk, cc = ct * BN + am;
      float v = 0.0f;
      if (k < K2 && cc < g.cg) {
        const int ol = k / taps, t = k - ol * taps;
        v = ak::to_f32(w[((long long)(grp * g.og + ol) * g.cg + cc) * taps + t]);
      }
      Bs[kk * BN + am] = v;
    }
    __syncthreads();
    mma_tile(As, Bs, rm, cn, acc);
    __syncthreads();
  }

#pragma unroll
  for (int j = 0; j < TN; ++j) {
    const int cc = ct * BN + cn * TN + j;
    if (cc >= g.cg) continue;
    const long long base = ((long long)n * g.c + grp * g.cg + cc) * HW;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int q = it * BM + rm * TM + i;
      if (q < HW) {
        const float extra = add != nullptr ? ak::to_f32(add[base + q]) : 0.0f;
        dx_pre[base + q] = ak::from_f32<T>(acc[i][j] + extra);
      }
    }
  }
}

// ---------------------------------------------------------------------------------
// weight gradient, per fixed reduction chunk s: part[s][grp·og + o][k] =
// Σ_{r ∈ chunk s} dc[n, grp·og + o, p]·im2col(x_pre)[n, p, k]   (r = n·P + p).
// grid (g·otiles, ktiles, splits): rows = 64 filters, columns = 64 weight entries,
// reduction over the chunk's pixels of all samples. Every part entry of every chunk is
// written (zeros for an empty chunk), so wgrad_reduce reads no uninitialised memory.
// Bytes: reads dc ~ktiles times and x_pre ~otiles·KH·KW/(sh·sw) times through L1/L2;
// writes splits·O·K f32.
template <class T>
__device__ void wgrad_impl(const T* __restrict__ dc, const T* __restrict__ x_pre, float* __restrict__ part,
                           ConvGeom g) {
  SHARED_ARRAY(float, As, BK * BM);
  SHARED_ARRAY(float, Bs, BK * BN);
  const int tid = threadIdx.x, rk = tid & 15, co = tid >> 4;  // rk: 4 k columns, co: 4 filters
  const int P = g.oh * g.ow;
  const int otiles = (g.og + BM - 1) / BM;
  const int grp = (int)(blockIdx.x / otiles), ot = (int)(blockIdx.x - (unsigned)grp * otiles);
  const int kt = (int)blockIdx.y, s = (int)blockIdx.z;
  const long long R = (long long)g.n * P;
  const long long slabs = (R + BK - 1) / BK;
  const long long per = (slabs + g.splits - 1) / g.splits;  // slabs per chunk
  const long long r_begin = (long long)s * per * BK;
  const long long r_end0 = r_begin + per * BK;
  const long long r_end = r_end0 < R ? r_end0 : R;

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

  for (long long r0 = r_begin; r0 < r_end; r0 += BK) {
    // A[rr][oo] = dc[n, grp·og + oo', p]: thread → rr = tid % 16 (consecutive pixels),
    // 4 filters (tid/16 + 16·q).
    {
      const int rr = tid & 15;
      const long long r = r0 + rr;
      const bool in = r < r_end;
      const int n = in ? (int)(r / P) : 0;
      const int p = in ? (int)(r - (long long)n * P) : 0;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int oo = (tid >> 4) + 16 * q, o = ot * BM + oo;
        As[rr * BM + oo] = (in && o < g.og) ? ak::to_f32(dc[((long long)n * g.o + grp * g.og + o) * P + p]) : 0.0f;
      }
    }
    // B[rr][kk] = im2col(x_pre)[r0 + rr][kt·64 + kk]: thread → kk = tid % 64, 4 rows.
    {
      const int kk = tid & 63, k = kt * BN + kk;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int rr = (tid >> 6) + 4 * q;
        const long long r = r0 + rr;
        float v = 0.0f;
        if (r < r_end && k < g.kdim) {
          const int n = (int)(r / P), p = (int)(r - (long long)n * P);
          const int ho = p / g.ow, wo = p - ho * g.ow;
          v = im2col_at(x_pre + (long long)n * g.c * g.h * g.w, g, grp, ho, wo, k);
        }
        Bs[rr * BN + kk] = v;
      }
    }
    __syncthreads();
    mma_tile(As, Bs, co, rk, acc);
    __syncthreads();
  }

  float* dst = part + (long long)s * g.o * g.kdim;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int o = ot * BM + co * TM + i;
    if (o >= g.og) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int k = kt * BN + rk * TN + j;
      if (k < g.kdim) dst[(long long)(grp * g.og + o) * g.kdim + k] = acc[i][j];
    }
  }
}

// dW[e] = Σ_{s in order} part[s][e] + add[e] (the r_w path). Elementwise, grid-stride.
template <class T>
__device__ void wgrad_reduce_impl(const float* __restrict__ part, const T* __restrict__ add, T* __restrict__ dw,
                                  ConvGeom g) {
  const long long total = (long long)g.o * g.kdim;
  for (long long e = grid_tid(); e < total; e += grid_stride()) {
    float acc = 0.0f;
    for (int s = 0; s < g.splits; ++s) acc += part[(long long)s * total + e];
    if (add != nullptr) acc += ak::to_f32(add[e]);
    dw[e] = ak::from_f32<T>(acc);
  }
}

// x̂ = (c − sub[o])·k[o] (ψ's normalised input; lin = (sub, k, scale, add) per o).
__device__ __forceinline__ float xhat(float c, const float* __restrict__ lin, int o) {
  return (c - lin[4 * o]) * lin[4 * o + 1];
}

// Stage 1 of ψ's backward: part2[no] = [Σ dx, Σ dx·x̂] over the (n,o) plane. One block
// per plane (grid-stride). Bytes: reads dx, c once; writes 8 B per plane.
template <class T>
__device__ void psi_bwd_sums_impl(const T* __restrict__ dx, const T* __restrict__ c, const float* __restrict__ lin,
                                  float* __restrict__ part2, ConvGeom g) {
  SHARED_ARRAY(float, scratch, 32);
  const long long P = (long long)g.oh * g.ow;
  const long long planes = (long long)g.n * g.o;
  // o = no % O, advanced with the grid stride (no division per plane).
  const int ostep = (int)(gridDim.x % (unsigned)g.o);
  int o = (int)(blockIdx.x % (unsigned)g.o);
  for (long long no = blockIdx.x; no < planes; no += gridDim.x) {
    float s1 = 0.0f, s2 = 0.0f;
    for (long long j = threadIdx.x; j < P; j += blockDim.x) {
      const float d = ak::to_f32(dx[no * P + j]);
      s1 += d;
      s2 = fmaf(d, xhat(ak::to_f32(c[no * P + j]), lin, o), s2);
    }
    s1 = ak::block_sum(s1, scratch);
    s2 = ak::block_sum(s2, scratch);
    if (threadIdx.x == 0) {
      part2[2 * no] = s1;
      part2[2 * no + 1] = s2;
    }
    o += ostep;
    if (o >= g.o) o -= g.o;
  }
}

// dc = A[o]·dx + B[o]·x̂ + C[o] (coef = (A, B, C) per o). Elementwise, grid-stride.
template <class T>
__device__ void dc_impl(const T* __restrict__ dx, const T* __restrict__ c, const float* __restrict__ lin,
                        const float* __restrict__ coef, T* __restrict__ dc, ConvGeom g) {
  const long long P = (long long)g.oh * g.ow;
  const long long total = (long long)g.n * g.o * P;
  // Channel o = (e / P) % O and position r = e % P of this thread's element, set once
  // and advanced by the grid stride (dr = stride % P, dout = (stride / P) % O).
  const long long e0 = grid_tid(), stride = grid_stride();
  const long long pl0 = e0 / P, pls = stride / P;
  long long r = e0 - pl0 * P;
  const long long dr = stride - pls * P;
  int o = (int)(pl0 % g.o);
  const int dout = (int)(pls % g.o);
  for (long long e = e0; e < total; e += stride) {
    const float v = fmaf(coef[3 * o], ak::to_f32(dx[e]), fmaf(coef[3 * o + 1], xhat(ak::to_f32(c[e]), lin, o), coef[3 * o + 2]));
    dc[e] = ak::from_f32<T>(v);
    r += dr;
    int carry = 0;
    if (r >= P) {
      r -= P;
      carry = 1;
    }
    o += dout + carry;
    if (o >= g.o) o -= g.o;
  }
}

}  // namespace ak_conv

// Launch bounds (kernels/common.cuh): every kernel of this file is launched with at
// most 256 threads (the GEMMs' THREADS, BLOCK for the small passes), so
// __launch_bounds__(256) for nvcc (iieu_conv_plane_stats with a min-blocks argument, see
// there) and the same bound for the emulated device (which reads AK_LAUNCH_BOUND at each
// EMU_REGISTER); the default is restored at the end.
#pragma push_macro("AK_LAUNCH_BOUND")
#undef AK_LAUNCH_BOUND
#define AK_LAUNCH_BOUND 256

// =====================================================================================
// f32-only kernels

// ‖P‖ = sqrt(Σ sq) and r_x = 1/(‖P‖ + eps) per (n, grp', p): PerGroup (gp == groups)
// reads its own group's partial; AllChannels (gp == 1) sums the groups' partials in
// group order. NaN propagates (no fmaxf). Thread per output.
AK_KERNEL void __launch_bounds__(256) iieu_conv_rx(const float* __restrict__ sq, float* __restrict__ x_norm,
                                        float* __restrict__ r_x, ConvGeom g) {
  const long long P = (long long)g.oh * g.ow;
  const long long total = (long long)g.n * g.gp * P;
  for (long long e = ak_conv::grid_tid(); e < total; e += ak_conv::grid_stride()) {
    float acc;
    if (g.gp == g.groups) {
      acc = sq[e];
    } else {
      const long long n = e / P, p = e - n * P;
      acc = 0.0f;
      for (int grp = 0; grp < g.groups; ++grp) acc += sq[(n * g.groups + grp) * P + p];
    }
    const float nm = sqrtf(acc < 0.0f ? 0.0f : acc);
    x_norm[e] = nm;
    r_x[e] = 1.0f / (nm + ak_conv::EPS);
  }
}
EMU_REGISTER(iieu_conv_rx)

// iieu_conv_plane_stats: a plain __launch_bounds__(256) made ptxas 12.4 (the CUDA 12
// path, scripts/compat-check.sh) spill 52 bytes on sm_80..sm_90, where nvcc 13 does
// not. With a second argument, at least 5 resident blocks of 256 per SM (what the
// kernel holds unbounded: 44-46 registers on sm_80..sm_90 under nvcc 13; sm_75, 50,
// holds 4, and ptxas lowers the 5 to that), ptxas is capped at 48 registers (sm_75: 64)
// and neither toolchain spills. nvcc 13, sm_75 / 80 / 86 / 89 / 90: 50/44/44/44/46 →
// 48/46/46/46/47 (5 resident blocks either way; sm_75 4).
#define IIEU_CONV_PLANE_STATS_MB 5

// Per (n, o): Chan merge, in tile order, of the forward's per-tile (mean, M2) of c.
// Thread per plane.
AK_KERNEL void __launch_bounds__(256, IIEU_CONV_PLANE_STATS_MB)
    iieu_conv_plane_stats(const float* __restrict__ st_mean, const float* __restrict__ st_m2,
                          float* __restrict__ mean_c, float* __restrict__ m2_c, ConvGeom g) {
  const int P = g.oh * g.ow;
  const long long planes = (long long)g.n * g.o;
  for (long long no = ak_conv::grid_tid(); no < planes; no += ak_conv::grid_stride()) {
    // Counts in double: exact for any plane (a float count is not past 2^24).
    double cnt = 0.0;
    float mean = 0.0f, m2 = 0.0f;
    for (int mt = 0; mt < g.mtiles; ++mt) {
      const int left = P - mt * ak_conv::BM;
      const double nb = (double)(left < ak_conv::BM ? left : ak_conv::BM);
      const float mb = st_mean[no * g.mtiles + mt], qb = st_m2[no * g.mtiles + mt];
      const double tot = cnt + nb;
      const float delta = mb - mean;
      mean += delta * (float)(nb / tot);
      m2 += qb + delta * delta * (float)(cnt * nb / tot);
      cnt = tot;
    }
    mean_c[no] = mean;
    m2_c[no] = m2;
  }
}
EMU_REGISTER(iieu_conv_plane_stats)

// ψ per channel o (thread per o). mode: 0 none, 1 bias, 2 affine, 3 BatchNorm training,
// 4 BatchNorm eval. a/b: bias (mode 1: b), scale/shift (2), γ/β (3, 4). Training:
// batch mean/var of c over N·H'·W' (merge of the per-sample (mean, M2) in sample order),
// written to bmean/bvar, and running_mean/var updated in place (PyTorch rule, unbiased
// variance). Writes lin[o] = (sub, k, scale, add) and GAP(x)[n,o] = ψ(mean_c[n,o]).
AK_KERNEL void __launch_bounds__(256) iieu_conv_psi(const float* __restrict__ mean_c, const float* __restrict__ m2_c, int mode,
                                         const float* __restrict__ a, const float* __restrict__ b,
                                         float* __restrict__ run_mean, float* __restrict__ run_var, float momentum,
                                         float bn_eps, float* __restrict__ lin, float* __restrict__ bmean,
                                         float* __restrict__ bvar, float* __restrict__ m, ConvGeom g) {
  const double P = (double)g.oh * g.ow;  // counts in double (exact)
  for (long long ol = ak_conv::grid_tid(); ol < g.o; ol += ak_conv::grid_stride()) {
    const int o = (int)ol;
    float sub = 0.0f, k = 1.0f, scale = 1.0f, add = 0.0f;
    if (mode == 1) {
      add = b[o];
    } else if (mode == 2) {
      scale = a[o];
      add = b[o];
    } else if (mode == 3 || mode == 4) {
      float mu, var;
      if (mode == 3) {
        double cnt = 0.0;
        float mean = 0.0f, m2 = 0.0f;
        for (int n = 0; n < g.n; ++n) {
          const float mb = mean_c[(long long)n * g.o + o], qb = m2_c[(long long)n * g.o + o];
          const double tot = cnt + P;
          const float delta = mb - mean;
          mean += delta * (float)(P / tot);
          m2 += qb + delta * delta * (float)(cnt * P / tot);
          cnt = tot;
        }
        mu = mean;
        var = m2 * (float)(1.0 / cnt);
        bmean[o] = mu;
        bvar[o] = var;
        const float unbiased = var * (float)(cnt / (cnt - 1.0));
        run_mean[o] = (1.0f - momentum) * run_mean[o] + momentum * mu;
        run_var[o] = (1.0f - momentum) * run_var[o] + momentum * unbiased;
      } else {
        mu = run_mean[o];
        var = run_var[o];
      }
      sub = mu;
      k = 1.0f / sqrtf(var + bn_eps);
      scale = a[o];
      add = b[o];
    }
    lin[4 * o] = sub;
    lin[4 * o + 1] = k;
    lin[4 * o + 2] = scale;
    lin[4 * o + 3] = add;
    for (int n = 0; n < g.n; ++n) {
      const long long no = (long long)n * g.o + o;
      m[no] = fmaf((mean_c[no] - sub) * k, scale, add);
    }
  }
}
EMU_REGISTER(iieu_conv_psi)

// Stage 2 of ψ's backward, thread per o: S1 = Σ_n Σdx, S2 = Σ_n Σdx·x̂ (sample order);
// d_shift = S1, d_scale = S2 (each optional); coef = (A, B, C) of dc = A·dx + B·x̂ + C:
// A = scale·k; for BatchNorm training also B = −A·S2/M, C = −A·S1/M (M = N·H'·W').
AK_KERNEL void __launch_bounds__(256) iieu_conv_psi_bwd_params(const float* __restrict__ part2, const float* __restrict__ lin,
                                                    int mode, float* __restrict__ d_scale,
                                                    float* __restrict__ d_shift, float* __restrict__ coef,
                                                    ConvGeom g) {
  const float inv_m = (float)(1.0 / ((double)g.n * g.oh * g.ow));
  for (long long ol = ak_conv::grid_tid(); ol < g.o; ol += ak_conv::grid_stride()) {
    const int o = (int)ol;
    float s1 = 0.0f, s2 = 0.0f;
    for (int n = 0; n < g.n; ++n) {
      const long long no = (long long)n * g.o + o;
      s1 += part2[2 * no];
      s2 += part2[2 * no + 1];
    }
    if (d_shift != nullptr) d_shift[o] = s1;
    if (d_scale != nullptr) d_scale[o] = s2;
    const float A = lin[4 * o + 2] * lin[4 * o + 1];
    coef[3 * o] = A;
    coef[3 * o + 1] = mode == 3 ? -A * (s2 * inv_m) : 0.0f;
    coef[3 * o + 2] = mode == 3 ? -A * (s1 * inv_m) : 0.0f;
  }
}
EMU_REGISTER(iieu_conv_psi_bwd_params)

// =====================================================================================
// per-dtype entry points

#define IIEU_CONV_KERNELS(SUF, T)                                                                                \
  AK_KERNEL void __launch_bounds__(256) iieu_conv_fwd_##SUF(const T* x_pre, const T* w, T* out, float* sq, float* st_mean, \
                                                 float* st_m2, ConvGeom g) {                                    \
    ak_conv::conv_fwd_impl<T>(x_pre, w, out, sq, st_mean, st_m2, g);                                                  \
  }                                                                                                              \
  EMU_REGISTER(iieu_conv_fwd_##SUF)                                                                              \
  AK_KERNEL void __launch_bounds__(256) iieu_conv_dgrad_##SUF(const T* dc, const T* w, const T* add, T* dx_pre,            \
                                                   ConvGeom g) {                                                \
    ak_conv::dgrad_impl<T>(dc, w, add, dx_pre, g);                                                               \
  }                                                                                                              \
  EMU_REGISTER(iieu_conv_dgrad_##SUF)                                                                            \
  AK_KERNEL void __launch_bounds__(256) iieu_conv_wgrad_##SUF(const T* dc, const T* x_pre, float* part, ConvGeom g) {      \
    ak_conv::wgrad_impl<T>(dc, x_pre, part, g);                                                                  \
  }                                                                                                              \
  EMU_REGISTER(iieu_conv_wgrad_##SUF)                                                                            \
  AK_KERNEL void __launch_bounds__(256) iieu_conv_wgrad_reduce_##SUF(const float* part, const T* add, T* dw, ConvGeom g) { \
    ak_conv::wgrad_reduce_impl<T>(part, add, dw, g);                                                             \
  }                                                                                                              \
  EMU_REGISTER(iieu_conv_wgrad_reduce_##SUF)                                                                     \
  AK_KERNEL void __launch_bounds__(256) iieu_conv_psi_bwd_sums_##SUF(const T* dx, const T* c, const float* lin,            \
                                                          float* part2, ConvGeom g) {                           \
    ak_conv::psi_bwd_sums_impl<T>(dx, c, lin, part2, g);                                                         \
  }                                                                                                              \
  EMU_REGISTER(iieu_conv_psi_bwd_sums_##SUF)                                                                     \
  AK_KERNEL void __launch_bounds__(256) iieu_conv_dc_##SUF(const T* dx, const T* c, const float* lin, const float* coef,   \
                                                T* dc, ConvGeom g) {                                            \
    ak_conv::dc_impl<T>(dx, c, lin, coef, dc, g);                                                                \
  }                                                                                                              \
  EMU_REGISTER(iieu_conv_dc_##SUF)

IIEU_CONV_KERNELS(f32, float)
IIEU_CONV_KERNELS(f16, __half)
IIEU_CONV_KERNELS(bf16, __nv_bfloat16)

#pragma pop_macro("AK_LAUNCH_BOUND")

// Tensor-core forward (f16 / bf16, sm_80+; the sm_75 build traps, never launched there).
#define IIEU_CONV_TC_KERNELS(SUF, T)                                                                   \
  AK_KERNEL_BOUND(ak_conv::tc::THREADS) void                                                           \
  iieu_conv_fwd_tc_##SUF(const T* x_pre, const T* w, T* out, float* sq, float* st_mean, float* st_m2,     \
                         ConvGeom g) {                                                                 \
    ak_conv::tc::conv_fwd_tc_impl<T>(x_pre, w, out, sq, st_mean, st_m2, g);                            \
  }                                                                                                    \
  EMU_REGISTER_BOUND(iieu_conv_fwd_tc_##SUF, ak_conv::tc::THREADS)

IIEU_CONV_TC_KERNELS(f16, __half)
IIEU_CONV_TC_KERNELS(bf16, __nv_bfloat16)
// tf32 (f32 storage, sm_80+; chosen only under the opt-in, src/cuda/iieu_conv.rs
// set_allow_tf32; the sm_75 build traps, never launched there).
#define IIEU_CONV_TC_TF32_MIN_BLOCKS 4
AK_KERNEL void __launch_bounds__(ak_conv::tc::THREADS, IIEU_CONV_TC_TF32_MIN_BLOCKS)
    iieu_conv_fwd_tc_tf32(const float* x_pre, const float* w, float* out, float* sq, float* st_mean, float* st_m2,
                          ConvGeom g) {
  ak_conv::tc::conv_fwd_tc_impl<float>(x_pre, w, out, sq, st_mean, st_m2, g);
}
EMU_REGISTER_BOUND(iieu_conv_fwd_tc_tf32, ak_conv::tc::THREADS)
AK_KERNEL void __launch_bounds__(ak_conv::tc::THREADS, IIEU_CONV_TC_TF32_MIN_BLOCKS)
    iieu_conv_dgrad_tc_tf32(const float* dc, const float* w, const float* add, float* dx_pre, ConvGeom g) {
  ak_conv::tc::dgrad_tc_impl<float>(dc, w, add, dx_pre, g);
}
EMU_REGISTER_BOUND(iieu_conv_dgrad_tc_tf32, ak_conv::tc::THREADS)
// The weight gradient's f32 stages need twice the cp.async chunks (each with its 64-bit
// pixel → (n, p) division): under (128, 4) it spills (8 B on sm_80 / 86, 56 B on sm_90,
// nvcc 13), under (128, 3) more (84 / 136 B at 168 registers); (128, 2): ~200
// registers, no spill, 2 blocks = 8 warps per SM.
#define IIEU_CONV_TC_TF32_WGRAD_MB 2
AK_KERNEL void __launch_bounds__(ak_conv::tc::THREADS, IIEU_CONV_TC_TF32_WGRAD_MB)
    iieu_conv_wgrad_tc_tf32(const float* dc, const float* x_pre, float* part, ConvGeom g) {
  ak_conv::tc::wgrad_tc_impl<float>(dc, x_pre, part, g);
}
EMU_REGISTER_BOUND(iieu_conv_wgrad_tc_tf32, ak_conv::tc::THREADS)

// Tensor-core data gradient (f16 / bf16, sm_80+; the sm_75 build traps, never launched
// there).
#define IIEU_CONV_TC_DGRAD_KERNELS(SUF, T)                                                             \
  AK_KERNEL_BOUND(ak_conv::tc::THREADS) void                                                           \
  iieu_conv_dgrad_tc_##SUF(const T* dc, const T* w, const T* add, T* dx_pre, ConvGeom g) {             \
    ak_conv::tc::dgrad_tc_impl<T>(dc, w, add, dx_pre, g);                                              \
  }                                                                                                    \
  EMU_REGISTER_BOUND(iieu_conv_dgrad_tc_##SUF, ak_conv::tc::THREADS)

IIEU_CONV_TC_DGRAD_KERNELS(f16, __half)
IIEU_CONV_TC_DGRAD_KERNELS(bf16, __nv_bfloat16)

// The Turing form of the tensor-core data gradient (f16 only; launched where the forward
// runs iieu_conv_fwd_tc75_f16; valid on every arch built). The sm_80 form's bound: no
// spill; 143 registers on sm_75 (nvcc 13) — 3 blocks per SM, which its 64 KB of shared
// memory allows anyway ((128, 4) gives 128 and no spill, the same 3) — 114–123 on sm_80+.
AK_KERNEL_BOUND(ak_conv::tc::THREADS) void iieu_conv_dgrad_tc75_f16(const __half* dc, const __half* w,
                                                                    const __half* add, __half* dx_pre, ConvGeom g) {
  ak_conv::tc::dgrad_tc_impl<__half, true>(dc, w, add, dx_pre, g);
}
EMU_REGISTER_BOUND(iieu_conv_dgrad_tc75_f16, ak_conv::tc::THREADS)

// The Turing form of the tensor-core forward (f16 only; launched on sm_75, where
// iieu_conv_fwd_tc_* would trap; valid on every arch built).
// (128, 4): ≤ 128 registers, no spill (143 without the minimum on sm_75); 4 blocks =
// 16 warps per SM on sm_80+, 3 on sm_75 (its 64 KB of shared memory per SM).
AK_KERNEL void __launch_bounds__(128, 4) iieu_conv_fwd_tc75_f16(const __half* x_pre, const __half* w, __half* out,
                                                               float* sq, float* st_mean, float* st_m2, ConvGeom g) {
  static_assert(ak_conv::tc::THREADS == 128, "the launch bound above");
  ak_conv::tc::conv_fwd_tc_impl<__half, true>(x_pre, w, out, sq, st_mean, st_m2, g);
}
EMU_REGISTER_BOUND(iieu_conv_fwd_tc75_f16, ak_conv::tc::THREADS)

// Tensor-core weight gradient (f16 / bf16, sm_80+; the sm_75 build traps, never launched
// there). __launch_bounds__(THREADS, 4): at least 4 resident blocks (16 warps) per SM,
// i.e. at most 128 registers. nvcc 13 lands on 128 unbounded too; ptxas 12.4 (the CUDA 12
// path, scripts/compat-check.sh) took 146 on sm_80..89 (134 on sm_90), 3 blocks per SM.
#define IIEU_CONV_TC_WGRAD_MIN_BLOCKS 4
#define IIEU_CONV_TC_WGRAD_KERNELS(SUF, T)                                                        \
  AK_KERNEL void __launch_bounds__(ak_conv::tc::THREADS, IIEU_CONV_TC_WGRAD_MIN_BLOCKS)            \
  iieu_conv_wgrad_tc_##SUF(const T* dc, const T* x_pre, float* part, ConvGeom g) {                 \
    ak_conv::tc::wgrad_tc_impl<T>(dc, x_pre, part, g);                                           \
  }                                                                                              \
  EMU_REGISTER_BOUND(iieu_conv_wgrad_tc_##SUF, ak_conv::tc::THREADS)

IIEU_CONV_TC_WGRAD_KERNELS(f16, __half)
IIEU_CONV_TC_WGRAD_KERNELS(bf16, __nv_bfloat16)

// The Turing form of the tensor-core weight gradient (f16 only; launched where the
// forward runs iieu_conv_fwd_tc75_f16; valid on every arch built). The sm_80 form's bound
// (128 registers, no spill, sm_75..90).
AK_KERNEL void __launch_bounds__(ak_conv::tc::THREADS, IIEU_CONV_TC_WGRAD_MIN_BLOCKS)
    iieu_conv_wgrad_tc75_f16(const __half* dc, const __half* x_pre, float* part, ConvGeom g) {
  ak_conv::tc::wgrad_tc_impl<__half, true>(dc, x_pre, part, g);
}
EMU_REGISTER_BOUND(iieu_conv_wgrad_tc75_f16, ak_conv::tc::THREADS)
