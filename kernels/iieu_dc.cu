// iieu_dc.cu — IIEU-DC, the Dynamic Coupler (SPEC §1.6): out = λ0·x + λ1·res with
// λ (N, 2, C) from a per-sample coupler MLP on the GAPs of x and res. The Rust side
// is src/cuda/iieu_dc.rs; the CPU reference is src/cpu/iieu_dc.rs (same formulas).
//
// Kernels (T ∈ {f32, f16, bf16} storage, all arithmetic and accumulation in f32):
//   iieu_dc_gap_<T>         per-(n,c) plane means of x and res        -> gap (N, 2C) f32
//   iieu_dc_w1_norms_f32    ‖W1[j]‖ and r_w[j], once per call          -> nrw (2·Hd)
//   iieu_dc_ln1_f32         LayerNorm-1 per sample                     -> â, a' (N, 2C), st
//   iieu_dc_hidden_f32      h = a'·W1ᵀ, warp per (n, j)                -> h (N, 2Hd)
//   iieu_dc_out_f32         h' = ς·h, c = h'·W2ᵀ per (n, channel chunk) -> c (N, 2C)
//   iieu_dc_ln2_f32         LayerNorm-2 and softmax per sample         -> λ (N, 2, C) f32
//   iieu_dc_mix_<T>         out = λ0·x + λ1·res (elementwise)
//   iieu_dc_dots_<T>        per-plane Σ dy·x, Σ dy·res                -> pd (N, 2C) f32
//   backward coupler (after w1_norms, ln1, hidden, out recompute the forward's values):
//   iieu_dc_ln2_bwd_f32     softmax + LayerNorm-2 backward per sample  -> dc (N, 2C), vrow
//   iieu_dc_dhp_f32         dh' = dc·W2, warp per (n, j)               -> dh' (N, 2Hd)
//   iieu_dc_adj_bwd_f32     adjuster / term-B / term-S / std backward  -> dh, h', vrow, dr_x
//   iieu_dc_da_f32          da' = dh·W1 + r_x path per (n, chunk)      -> da' (N, 2C)
//   iieu_dc_ln1_bwd_f32     LayerNorm-1 backward per sample            -> dgap (N, 2C), vrow
//   iieu_dc_param_part_f32  parameter gradients, stage 1: fixed-order sums over sample
//                           chunks (grid x: gradient elements, grid y: chunks)
//   iieu_dc_param_sum_f32   stage 2: fixed-order sum over the chunks (+ the r_w path)
//   iieu_dc_dx_<T>          dx = λ0·dy + dgap_x/S, dres = λ1·dy + dgap_r/S
// No atomics; every reduction has a fixed order for a given launch geometry.
#include "common.cuh"

namespace ak_iieu_dc {

constexpr float EPS_NORM = 1e-8f;  // r = 1/(‖v‖ + EPS_NORM)
constexpr float EPS_LN = 1e-6f;    // both LayerNorms
constexpr float EPS_STD = 1e-6f;   // unbiased std of h in term-B

// Accurate logistic (expf, not __expf): the coupler is tiny, accuracy matters more.
__device__ __forceinline__ float sigm(float z) { return 1.0f / (1.0f + expf(-z)); }

// ===========================================================================
// (1) Plane reductions. MODE 0 (GAP): sa = Σ x, sb = Σ res. MODE 1 (backward):
// sa = Σ dy·x, sb = Σ dy·res. Plane p = n·C + k of S elements; writes
// out[n·2C + k] = sa·scale, out[n·2C + C + k] = sb·scale.
// warp_mode = 1: one warp per plane (blockDim/32 planes per block, for S <= 1024);
// warp_mode = 0: one block per plane. Planes are grid-strided. 128-bit loads when
// every pointer is 16-byte aligned and S is a multiple of the vector width (then
// every plane starts aligned); scalar otherwise. Each thread accumulates its
// strided elements in order, then a fixed shuffle tree: deterministic.
// Bytes per element: reads 2 (MODE 0) or 3 (MODE 1) × sizeof(T), writes
// 8 bytes per plane — the minimum (each input read once).
// ===========================================================================
template <class T, int MODE>
__device__ __forceinline__ void plane_partial(const T* a, const T* b, const T* g, long long base, long long s,
                                              int first, int step, bool vec, float& sa, float& sb) {
  constexpr int W = ak::Vec16<T>::N;
  sa = 0.0f;
  sb = 0.0f;
  // Groups of W elements whenever the plane allows (the summation order: shape only),
  // 128-bit loads when `vec` (every pointer 16-byte aligned, ak::load_group).
  if (s % W == 0) {
    long long nv = s / W;
    for (long long v = first; v < nv; v += step) {
      long long o = base + v * W;
      float fa[W], fb[W], fg[W];
      ak::load_group(a + o, fa, vec);
      ak::load_group(b + o, fb, vec);
      if (MODE == 1) ak::load_group(g + o, fg, vec);
#pragma unroll
      for (int l = 0; l < W; ++l) {
        if (MODE == 0) {
          sa += fa[l];
          sb += fb[l];
        } else {
          sa += fg[l] * fa[l];
          sb += fg[l] * fb[l];
        }
      }
    }
  } else {
    for (long long i = first; i < s; i += step) {
      float va = ak::to_f32(a[base + i]), vb = ak::to_f32(b[base + i]);
      if (MODE == 0) {
        sa += va;
        sb += vb;
      } else {
        float vg = ak::to_f32(g[base + i]);
        sa += vg * va;
        sb += vg * vb;
      }
    }
  }
}

template <class T, int MODE>
__device__ void plane_reduce(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ g,
                             float* __restrict__ out, int planes, int c, long long s, int warp_mode,
                             float scale) {
  // Plane indices are 32-bit (the host checks N·2C <= i32::MAX, so p + stride < 2^32).
  SHARED_ARRAY(float, scratch, 32);
  constexpr int W = ak::Vec16<T>::N;
  bool vec = ak::aligned16(a) && ak::aligned16(b) && (MODE == 0 || ak::aligned16(g)) && (s % W == 0);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (warp_mode) {
    const unsigned wpb = blockDim.x >> 5;
    for (unsigned p = blockIdx.x * wpb + warp; p < (unsigned)planes; p += gridDim.x * wpb) {
      float sa, sb;
      plane_partial<T, MODE>(a, b, g, (long long)p * s, s, lane, 32, vec, sa, sb);
      sa = ak::warp_sum(sa);
      sb = ak::warp_sum(sb);
      if (lane == 0) {
        const unsigned n = p / (unsigned)c, k = p - n * (unsigned)c;
        out[(long long)n * 2 * c + k] = sa * scale;
        out[(long long)n * 2 * c + c + k] = sb * scale;
      }
    }
  } else {
    for (unsigned p = blockIdx.x; p < (unsigned)planes; p += gridDim.x) {
      float sa, sb;
      plane_partial<T, MODE>(a, b, g, (long long)p * s, s, threadIdx.x, blockDim.x, vec, sa, sb);
      sa = ak::block_sum(sa, scratch);
      sb = ak::block_sum(sb, scratch);
      if (threadIdx.x == 0) {
        const unsigned n = p / (unsigned)c, k = p - n * (unsigned)c;
        out[(long long)n * 2 * c + k] = sa * scale;
        out[(long long)n * 2 * c + c + k] = sb * scale;
      }
    }
  }
}

// ===========================================================================
// (2) The coupler, in GEMM-shaped stages (no kernel holds a whole sample's coupler):
// per-sample vector passes (one block per sample: the LayerNorms, the adjuster's
// backward) and the matrix passes over (sample, output) items, so that the grid
// grows with N·Hd or N·C rather than N. Per-sample intermediates live in global
// scratch (f32): â, a' (N, 2C); h, h', dh (N, 2Hd); c / dc / da (N, 2C); ST scalars
// per sample; the parameter-gradient contributions `vrow` (N, VL).
// Item loops over (sample, output) use 32-bit indices: the host checks that N·Hd,
// N·chunks and the partial-row length fit i32 (so i + stride < 2^32 never wraps).
// ===========================================================================
constexpr int ST = 8;  // per-sample scalars: rstd1, ‖a'[0]‖, ‖a'[1]‖, dr_x[0], dr_x[1] (5..7 unused)

// ‖W1[j]‖ and r_w[j] for every j: nrw[j], nrw[hd + j]. One warp per row, grid-stride.
__device__ void w1_norms_impl(const float* __restrict__ w1, float* __restrict__ nrw, int c, int hd) {
  const unsigned lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
  for (unsigned j = blockIdx.x * wpb + (threadIdx.x >> 5); j < (unsigned)hd; j += gridDim.x * wpb) {
    const float* wr = w1 + (long long)j * c;
    float q = 0.0f;
    for (int k = lane; k < c; k += 32) q += wr[k] * wr[k];
    q = ak::warp_sum(q);
    if (lane == 0) {
      float nv = sqrtf(q);
      nrw[j] = nv;
      nrw[hd + j] = 1.0f / (nv + EPS_NORM);
    }
  }
}

// LayerNorm-1 of one sample per block (grid-stride): â, a' = ln1_w·â + ln1_b (N, 2C),
// st[0..3) = rstd1, ‖a'[0]‖, ‖a'[1]‖. Reads gap twice (L1), writes 2 rows.
__device__ void ln1_impl(const float* __restrict__ gap, const float* __restrict__ ln1w,
                         const float* __restrict__ ln1b, float* __restrict__ ah, float* __restrict__ ap,
                         float* __restrict__ st, int n, int c) {
  SHARED_ARRAY(float, scratch, 32);
  const int tid = threadIdx.x, nt = blockDim.x, c2 = 2 * c;
  for (long long ni = blockIdx.x; ni < n; ni += gridDim.x) {
    const long long off = ni * c2;
    const float* a = gap + off;
    float s = 0.0f;
    for (int i = tid; i < c2; i += nt) s += a[i];
    const float mean = ak::block_sum(s, scratch) / (float)c2;
    float q = 0.0f;
    for (int i = tid; i < c2; i += nt) {
      float d = a[i] - mean;
      q += d * d;
    }
    const float rstd1 = 1.0f / sqrtf(ak::block_sum(q, scratch) / (float)c2 + EPS_LN);
    float q0 = 0.0f, q1 = 0.0f;
    for (int i = tid; i < c2; i += nt) {
      float hat = (a[i] - mean) * rstd1;
      float p = ln1w[i] * hat + ln1b[i];
      ah[off + i] = hat;
      ap[off + i] = p;
      if (i < c)
        q0 += p * p;
      else
        q1 += p * p;
    }
    const float nx0 = sqrtf(ak::block_sum(q0, scratch));
    const float nx1 = sqrtf(ak::block_sum(q1, scratch));
    if (tid == 0) {
      st[ni * ST] = rstd1;
      st[ni * ST + 1] = nx0;
      st[ni * ST + 2] = nx1;
    }
  }
}

// Row dots over (sample, j) items, one warp each, both rows t at once:
// MODE 0 (hidden):  out[n,t,j] = Σ_k in[n,t,k]·W[j·C + k]   (W = W1, rows contiguous)
// MODE 1 (dh'):     out[n,t,j] = Σ_k in[n,t,k]·W[k·Hd + j]  (W = W2, a column)
// in (N, 2C), out (N, 2Hd). Reads the W row/column once and in's two rows once per item.
template <int MODE>
__device__ void rowdot_impl(const float* __restrict__ in, const float* __restrict__ w, float* __restrict__ out,
                            int n, int c, int hd) {
  const unsigned lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
  const unsigned items = (unsigned)n * (unsigned)hd;
  for (unsigned i = blockIdx.x * wpb + (threadIdx.x >> 5); i < items; i += gridDim.x * wpb) {
    const unsigned ni = i / (unsigned)hd, j = i - ni * (unsigned)hd;
    const float* r0 = in + (long long)ni * 2 * c;
    const float* r1 = r0 + c;
    float s0 = 0.0f, s1 = 0.0f;
    for (int k = lane; k < c; k += 32) {
      float wv = MODE == 0 ? w[(long long)j * c + k] : w[(long long)k * hd + j];
      s0 += r0[k] * wv;
      s1 += r1[k] * wv;
    }
    s0 = ak::warp_sum(s0);
    s1 = ak::warp_sum(s1);
    if (lane == 0) {
      out[(long long)ni * 2 * hd + j] = s0;
      out[(long long)ni * 2 * hd + hd + j] = s1;
    }
  }
}

// Mean and unbiased std of h[t, :] over j (ms[t], ms[2 + t]): warps 0 and 1 of the block.
// The caller puts barriers around it.
__device__ __forceinline__ void h_stats(const float* hr, int hd, float* ms) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (warp < 2) {
    const int t = warp;
    float sh = 0.0f;
    for (int j = lane; j < hd; j += 32) sh += hr[t * hd + j];
    const float mu = ak::warp_sum(sh) / (float)hd;
    float sq = 0.0f;
    for (int j = lane; j < hd; j += 32) {
      float d = hr[t * hd + j] - mu;
      sq += d * d;
    }
    sq = ak::warp_sum(sq);
    if (lane == 0) {
      ms[t] = mu;
      ms[2 + t] = hd > 1 ? sqrtf(sq / (float)(hd - 1)) : 0.0f;
    }
  }
}

struct Adj {
  const float* g2;
  const float* b2;
  const float* eta;
  const float* nrw;  // ‖W1[j]‖ (hd), r_w (hd)
};

// term-S, term-B and the adjuster of entry i = t·Hd + j: ĥ, ν, ρ̂ and ς.
__device__ __forceinline__ void adj_entry(const Adj& A, const float* ms, float hv, float rx, int hd, int t, int j,
                                          float& hhat, float& nu, float& rho) {
  const int i = t * hd + j;
  hhat = (hv - ms[t]) / (ms[2 + t] + EPS_STD);
  nu = sigm(A.g2[i] * hhat + A.b2[i]);
  rho = hv * A.nrw[hd + j] * rx + nu;
}

// Linear 2 forward over (sample, channel chunk) items: one block per item recomputes
// the sample's h statistics and h' = ς·h (2Hd, shared memory), then thread k writes
// c[n,t,k] = Σ_j h'[t,j]·W2[k,j] for t = 0, 1 (W2 row k read once). Dynamic shared
// memory: 2Hd floats.
__device__ void out_impl(const float* __restrict__ h, const float* __restrict__ st, Adj A,
                         const float* __restrict__ w2, float* __restrict__ cpre, int n, int c, int hd) {
  SHARED_ARRAY(float, ms, 4);
  DYNAMIC_SHARED(float, hp);
  const int tid = threadIdx.x, nt = blockDim.x;
  const unsigned chunks = ((unsigned)c + nt - 1) / (unsigned)nt;
  const unsigned items = (unsigned)n * chunks;
  for (unsigned it = blockIdx.x; it < items; it += gridDim.x) {
    const unsigned ni = it / chunks, ch = it - ni * chunks;
    const float* hr = h + (long long)ni * 2 * hd;
    __syncthreads();  // ms, hp of the previous item are still read
    h_stats(hr, hd, ms);
    __syncthreads();
    for (int i = tid; i < 2 * hd; i += nt) {
      const int t = i >= hd, j = i - t * hd;
      const float hv = hr[i], rx = 1.0f / (st[(long long)ni * ST + 1 + t] + EPS_NORM);
      float hhat, nu, rho;
      adj_entry(A, ms, hv, rx, hd, t, j, hhat, nu, rho);
      const float e = A.eta[j];
      const float vs = rho >= e ? rho : e * expf(rho - e);
      hp[i] = vs * hv;
    }
    __syncthreads();
    const int k = (int)ch * nt + tid;
    if (k < c) {
      const float* wr = w2 + (long long)k * hd;
      float s0 = 0.0f, s1 = 0.0f;
      for (int j = 0; j < hd; ++j) {
        const float wv = wr[j];
        s0 += hp[j] * wv;
        s1 += hp[hd + j] * wv;
      }
      cpre[(long long)ni * 2 * c + k] = s0;
      cpre[(long long)ni * 2 * c + c + k] = s1;
    }
  }
}

// LayerNorm-2 statistics of one sample's c (2C): every thread gets them.
__device__ __forceinline__ void ln2_stats(const float* cr, int c2, float* scratch, float& mean2, float& rstd2) {
  const int tid = threadIdx.x, nt = blockDim.x;
  float s = 0.0f;
  for (int i = tid; i < c2; i += nt) s += cr[i];
  mean2 = ak::block_sum(s, scratch) / (float)c2;
  float q = 0.0f;
  for (int i = tid; i < c2; i += nt) {
    float d = cr[i] - mean2;
    q += d * d;
  }
  rstd2 = 1.0f / sqrtf(ak::block_sum(q, scratch) / (float)c2 + EPS_LN);
}

// LayerNorm-2 and the softmax over t of one sample per block: λ (N, 2, C) from c.
__device__ void ln2_fwd_impl(const float* __restrict__ cpre, const float* __restrict__ ln2w,
                             const float* __restrict__ ln2b, float* __restrict__ lam, int n, int c) {
  SHARED_ARRAY(float, scratch, 32);
  const int c2 = 2 * c;
  for (long long ni = blockIdx.x; ni < n; ni += gridDim.x) {
    const long long off = ni * c2;
    float mean2, rstd2;
    ln2_stats(cpre + off, c2, scratch, mean2, rstd2);
    for (int k = threadIdx.x; k < c; k += blockDim.x) {
      const float ch0 = (cpre[off + k] - mean2) * rstd2, ch1 = (cpre[off + c + k] - mean2) * rstd2;
      const float c0 = ln2w[k] * ch0 + ln2b[k], c1 = ln2w[c + k] * ch1 + ln2b[c + k];
      lam[off + k] = sigm(c0 - c1);
      lam[off + c + k] = sigm(c1 - c0);
    }
  }
}

// Per-sample parameter-gradient row (VL floats): l1w 2C | l1b 2C | g2 2Hd | b2 2Hd |
// eta Hd | wc Hd | l2w 2C | l2b 2C, with wc[j] = dr_w[j]·(−r_w²/‖W1[j]‖) (the r_w
// path's coefficient of W1[j,:]).
struct VOffs {
  long long l1w, g2, b2, eta, wc, l2w, len;
};
__device__ __forceinline__ VOffs voffs(int c, int hd) {
  VOffs o;
  long long C = c, H = hd;
  o.l1w = 0;
  o.g2 = 4 * C;
  o.b2 = o.g2 + 2 * H;
  o.eta = o.b2 + 2 * H;
  o.wc = o.eta + H;
  o.l2w = o.wc + H;
  o.len = o.l2w + 4 * C;
  return o;
}

// Backward of the softmax and LayerNorm-2, one sample per block: dc (N, 2C) and the
// sample's l2w | l2b contributions. c is read once (cached with the pre-normalisation
// gradient in dynamic shared memory: 4C floats), pd once.
__device__ void ln2_bwd_impl(const float* __restrict__ cpre, const float* __restrict__ pd,
                             const float* __restrict__ ln2w, const float* __restrict__ ln2b,
                             float* __restrict__ dc, float* __restrict__ vrow, int n, int c, int hd) {
  SHARED_ARRAY(float, scratch, 32);
  DYNAMIC_SHARED(float, sm);
  float* sc = sm;         // c, then ĉ
  float* sd = sm + 2 * c;  // dĉ·ln2_w (own elements)
  const int tid = threadIdx.x, nt = blockDim.x, c2 = 2 * c;
  const VOffs vo = voffs(c, hd);
  for (long long ni = blockIdx.x; ni < n; ni += gridDim.x) {
    const long long off = ni * c2;
    float* vr = vrow + ni * vo.len;
    float s = 0.0f;
    for (int i = tid; i < c2; i += nt) {  // published to the block by the block sums' barriers
      const float v = cpre[off + i];
      sc[i] = v;
      s += v;
    }
    const float mean2 = ak::block_sum(s, scratch) / (float)c2;
    float q = 0.0f;
    for (int i = tid; i < c2; i += nt) {
      float d = sc[i] - mean2;
      q += d * d;
    }
    const float rstd2 = 1.0f / sqrtf(ak::block_sum(q, scratch) / (float)c2 + EPS_LN);
    float s1 = 0.0f, s2 = 0.0f;
    for (int k = tid; k < c; k += nt) {  // thread of k owns k and C + k from here on
      const float ch0 = (sc[k] - mean2) * rstd2, ch1 = (sc[c + k] - mean2) * rstd2;
      const float w0 = ln2w[k], w1 = ln2w[c + k];
      const float c0 = w0 * ch0 + ln2b[k], c1 = w1 * ch1 + ln2b[c + k];
      const float l0 = sigm(c0 - c1), l1 = sigm(c1 - c0);
      const float du = (pd[off + k] - pd[off + c + k]) * l0 * l1;
      vr[vo.l2w + k] = du * ch0;
      vr[vo.l2w + c + k] = -du * ch1;
      vr[vo.l2w + c2 + k] = du;
      vr[vo.l2w + c2 + c + k] = -du;
      const float d0 = du * w0, d1 = -du * w1;
      s1 += d0 + d1;
      s2 += d0 * ch0 + d1 * ch1;
      sc[k] = ch0;
      sc[c + k] = ch1;
      sd[k] = d0;
      sd[c + k] = d1;
    }
    const float m1 = ak::block_sum(s1, scratch) / (float)c2;
    const float m2 = ak::block_sum(s2, scratch) / (float)c2;
    for (int k = tid; k < c; k += nt) {  // same k as above
      dc[off + k] = rstd2 * (sd[k] - m1 - sc[k] * m2);
      dc[off + c + k] = rstd2 * (sd[c + k] - m1 - sc[c + k] * m2);
    }
    __syncthreads();  // sc, sd are rewritten by the next sample
  }
}

// Backward of the adjuster, term-B, term-S and the unbiased-std normalisation, one
// sample per block: from h and dh' (dhd, overwritten with dh), writes dh, h' (hp),
// the sample's g2 | b2 | eta | wc contributions and st[3..5) = dr_x[t]. Dynamic shared
// memory: 10·Hd floats.
__device__ void adj_bwd_impl(const float* __restrict__ h, float* __restrict__ dhd, float* __restrict__ hp,
                             float* __restrict__ st, Adj A, float* __restrict__ vrow, int n, int hd, int c) {
  SHARED_ARRAY(float, ms, 4);
  DYNAMIC_SHARED(float, sm);
  float* sh = sm;             // h
  float* sdp = sh + 2 * hd;   // dh'
  float* sdh = sdp + 2 * hd;  // dh
  float* shh = sdh + 2 * hd;  // dĥ
  float* sx = shh + 2 * hd;   // g·h·r_w (terms of dr_x)
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5;
  const VOffs vo = voffs(c, hd);
  for (long long ni = blockIdx.x; ni < n; ni += gridDim.x) {
    const long long off = ni * 2 * hd;
    float* vr = vrow + ni * vo.len;
    __syncthreads();  // the previous sample's shared rows are still read
    for (int i = tid; i < 2 * hd; i += nt) {
      sh[i] = h[off + i];
      sdp[i] = dhd[off + i];
    }
    __syncthreads();
    h_stats(sh, hd, ms);
    __syncthreads();
    const float rx[2] = {1.0f / (st[ni * ST + 1] + EPS_NORM), 1.0f / (st[ni * ST + 2] + EPS_NORM)};
    for (int j = tid; j < hd; j += nt) {
      float eta_acc = 0.0f, drw_acc = 0.0f;
      const float e = A.eta[j], rw = A.nrw[hd + j], nw = A.nrw[j];
      for (int t = 0; t < 2; ++t) {
        const int i = t * hd + j;
        const float hv = sh[i];
        float hhat, nu, rho;
        adj_entry(A, ms, hv, rx[t], hd, t, j, hhat, nu, rho);
        const float dyh = sdp[i] * hv;
        float vs, g;
        if (rho >= e) {
          vs = rho;
          g = dyh;
        } else {
          const float ex = expf(rho - e);
          vs = e * ex;
          eta_acc += dyh * ex * (1.0f - e);
          g = dyh * e * ex;
        }
        const float dz = g * nu * (1.0f - nu);
        vr[vo.g2 + i] = dz * hhat;
        vr[vo.b2 + i] = dz;
        shh[i] = dz * A.g2[i];
        sdh[i] = sdp[i] * vs + g * rw * rx[t];
        drw_acc += g * hv * rx[t];
        sx[i] = g * hv * rw;
        hp[off + i] = vs * hv;
      }
      vr[vo.eta + j] = eta_acc;
      vr[vo.wc + j] = nw > 0.0f ? -drw_acc * rw * rw / nw : 0.0f;
    }
    __syncthreads();
    // dr_x[t] and the unbiased-std normalisation backward: warp t.
    if (warp < 2) {
      const int t = warp;
      const float mu = ms[t], sd = ms[2 + t], denom = sd + EPS_STD;
      float sxs = 0.0f, sdev = 0.0f;
      for (int j = lane; j < hd; j += 32) {
        const int i = t * hd + j;
        sxs += sx[i];
        sdev += shh[i] * (sh[i] - mu);
      }
      sxs = ak::warp_sum(sxs);
      sdev = ak::warp_sum(sdev);
      float coef = 0.0f;
      if (hd > 1 && sd > 0.0f) coef = (-sdev / (denom * denom)) / ((float)(hd - 1) * sd);
      float sdd = 0.0f;
      for (int j = lane; j < hd; j += 32) {
        const int i = t * hd + j;
        sdd += shh[i] / denom + coef * (sh[i] - mu);
      }
      const float mdd = ak::warp_sum(sdd) / (float)hd;
      for (int j = lane; j < hd; j += 32) {
        const int i = t * hd + j;
        const float dhv = sdh[i] + ((shh[i] / denom + coef * (sh[i] - mu)) - mdd);
        dhd[off + i] = dhv;
      }
      if (lane == 0) st[ni * ST + 3 + t] = sxs;
    }
  }
}

// Linear 1 backward over (sample, channel chunk) items: thread k writes
// da'[n,t,k] = Σ_j dh[t,j]·W1[j,k] + dr_x[t]·(−r_x²/‖a'[t]‖)·a'[t,k] for t = 0, 1 into
// acc (N, 2C). dh of the sample in shared memory (2Hd floats, dynamic).
__device__ void dc_da_impl(const float* __restrict__ dh, const float* __restrict__ w1, const float* __restrict__ ap,
                        const float* __restrict__ st, float* __restrict__ acc, int n, int c, int hd) {
  DYNAMIC_SHARED(float, sdh);
  const int tid = threadIdx.x, nt = blockDim.x;
  const unsigned chunks = ((unsigned)c + nt - 1) / (unsigned)nt;
  const unsigned items = (unsigned)n * chunks;
  for (unsigned it = blockIdx.x; it < items; it += gridDim.x) {
    const unsigned ni = it / chunks, ch = it - ni * chunks;
    __syncthreads();  // sdh of the previous item is still read
    for (int i = tid; i < 2 * hd; i += nt) sdh[i] = dh[(long long)ni * 2 * hd + i];
    __syncthreads();
    const int k = (int)ch * nt + tid;
    if (k < c) {
      float s0 = 0.0f, s1 = 0.0f;
      for (int j = 0; j < hd; ++j) {
        const float wv = w1[(long long)j * c + k];
        s0 += sdh[j] * wv;
        s1 += sdh[hd + j] * wv;
      }
      const long long off = (long long)ni * 2 * c;
      const float* sr = st + (long long)ni * ST;
      float s[2] = {s0, s1};
      for (int t = 0; t < 2; ++t) {
        const float nx = sr[1 + t], rx = 1.0f / (nx + EPS_NORM);
        const float kx = nx > 0.0f ? -sr[3 + t] * rx * rx / nx : 0.0f;  // the r_x path's coefficient
        if (nx > 0.0f) s[t] += kx * ap[off + t * c + k];
        acc[off + t * c + k] = s[t];
      }
    }
  }
}

// LayerNorm-1 backward, one sample per block: dgap (N, 2C) from da' (acc) and â, and
// the sample's l1w | l1b contributions. da = da'·ln1_w is cached in dynamic shared
// memory (2C floats, own elements), so acc and ln1_w are read once.
__device__ void ln1_bwd_impl(const float* __restrict__ acc, const float* __restrict__ ah,
                             const float* __restrict__ ln1w, const float* __restrict__ st,
                             float* __restrict__ dgap, float* __restrict__ vrow, int n, int c, int hd) {
  SHARED_ARRAY(float, scratch, 32);
  DYNAMIC_SHARED(float, sda);
  const int tid = threadIdx.x, nt = blockDim.x, c2 = 2 * c;
  const VOffs vo = voffs(c, hd);
  for (long long ni = blockIdx.x; ni < n; ni += gridDim.x) {
    const long long off = ni * c2;
    float* vr = vrow + ni * vo.len;
    float s1 = 0.0f, s2 = 0.0f;
    for (int i = tid; i < c2; i += nt) {
      const float a = acc[off + i], hat = ah[off + i];
      vr[vo.l1w + i] = a * hat;
      vr[vo.l1w + c2 + i] = a;
      const float da = a * ln1w[i];
      sda[i] = da;
      s1 += da;
      s2 += da * hat;
    }
    const float m1 = ak::block_sum(s1, scratch) / (float)c2;
    const float m2 = ak::block_sum(s2, scratch) / (float)c2;
    const float rstd1 = st[ni * ST];
    for (int i = tid; i < c2; i += nt) dgap[off + i] = rstd1 * (sda[i] - m1 - ah[off + i] * m2);
    __syncthreads();  // sda is rewritten by the next sample
  }
}

// Parameter-gradient layout (floats): l1w 2C | l1b 2C | w1 Hd·C | g2 2Hd | b2 2Hd |
// eta Hd | w2 C·Hd | l2w 2C | l2b 2C, then (partials only) wc Hd.
struct Offs {
  long long l1w, l1b, w1, g2, b2, eta, w2, l2w, l2b, len;
};
__device__ __forceinline__ Offs offsets(int c, int hd) {
  Offs o;
  long long C = c, H = hd;
  o.l1w = 0;
  o.l1b = o.l1w + 2 * C;
  o.w1 = o.l1b + 2 * C;
  o.g2 = o.w1 + H * C;
  o.b2 = o.g2 + 2 * H;
  o.eta = o.b2 + 2 * H;
  o.w2 = o.eta + H;
  o.l2w = o.w2 + C * H;
  o.l2b = o.l2w + 2 * C;
  o.len = o.l2b + 2 * C;
  return o;
}

// Stage 1 of the parameter gradients: part[chunk·PL + e] = Σ over the chunk's samples
// (in order) of sample n's contribution to element e (PL = len + Hd; grid x over e,
// grid y = chunk, `per` samples per chunk): a vrow entry, or for W1 / W2 the outer
// products Σ_t dh[n,t,j]·a'[n,t,k] / Σ_t dc[n,t,k]·h'[n,t,j]. Every (chunk, e) is
// written once (zero for an empty chunk).
__device__ void param_part_impl(const float* __restrict__ vrow, const float* __restrict__ dh,
                                const float* __restrict__ ap, const float* __restrict__ dc,
                                const float* __restrict__ hp, float* __restrict__ part, int n, int c, int hd,
                                int per) {
  const Offs o = offsets(c, hd);
  const VOffs vo = voffs(c, hd);
  const unsigned pl = (unsigned)(o.len + hd);
  const long long n0 = (long long)blockIdx.y * per;
  const long long n1 = n0 + per < n ? n0 + per : n;
  for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < pl; e += gridDim.x * blockDim.x) {
    // Sample n's value: a[n·sa] (vector entries) or a[n·sa]·b[n·sb] + a[n·sa + ta]·b[n·sb + tb].
    const float* a;
    const float* b = nullptr;
    long long sa, sb = 0, ta = 0, tb = 0;
    if (e < (unsigned)o.w1) {
      a = vrow + vo.l1w + e;
      sa = vo.len;
    } else if (e < (unsigned)o.g2) {
      const unsigned q = e - (unsigned)o.w1, j = q / (unsigned)c, k = q - j * (unsigned)c;
      a = dh + j;
      sa = 2 * hd;
      ta = hd;
      b = ap + k;
      sb = 2 * c;
      tb = c;
    } else if (e < (unsigned)o.w2) {
      a = vrow + vo.g2 + (e - (unsigned)o.g2);
      sa = vo.len;
    } else if (e < (unsigned)o.l2w) {
      const unsigned q = e - (unsigned)o.w2, k = q / (unsigned)hd, j = q - k * (unsigned)hd;
      a = dc + k;
      sa = 2 * c;
      ta = c;
      b = hp + j;
      sb = 2 * hd;
      tb = hd;
    } else if (e < (unsigned)o.len) {
      a = vrow + vo.l2w + (e - (unsigned)o.l2w);
      sa = vo.len;
    } else {
      a = vrow + vo.wc + (e - (unsigned)o.len);
      sa = vo.len;
    }
    float s = 0.0f;
    if (b != nullptr) {
      for (long long ni = n0; ni < n1; ++ni) s += a[ni * sa] * b[ni * sb] + a[ni * sa + ta] * b[ni * sb + tb];
    } else {
      for (long long ni = n0; ni < n1; ++ni) s += a[ni * sa];
    }
    part[(long long)blockIdx.y * pl + e] = s;
  }
}

// Stage 2: grads[e] = Σ_r part[r·PL + e] in chunk order r = 0, 1, ... (fixed), plus for
// W1 the r_w path W1[j,k]·Σ_r part[r·PL + len + j]; scattered to the nine buffers.
__device__ void param_sum_impl(const float* __restrict__ part, int rows, int c, int hd,
                               const float* __restrict__ w1in, float* l1w, float* l1b, float* w1, float* g2,
                               float* b2, float* eta, float* w2, float* l2w, float* l2b) {
  const Offs o = offsets(c, hd);
  const long long pl = o.len + hd;
  for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < (unsigned)o.len; e += gridDim.x * blockDim.x) {
    float s = 0.0f;
    for (int r = 0; r < rows; ++r) s += part[r * pl + e];
    if (e < (unsigned)o.l1b) {
      l1w[e] = s;
    } else if (e < (unsigned)o.w1) {
      l1b[e - o.l1b] = s;
    } else if (e < (unsigned)o.g2) {
      const unsigned q = e - (unsigned)o.w1, j = q / (unsigned)c;
      float sw = 0.0f;
      for (int r = 0; r < rows; ++r) sw += part[r * pl + o.len + j];
      w1[q] = s + sw * w1in[q];
    } else if (e < (unsigned)o.b2) {
      g2[e - o.g2] = s;
    } else if (e < (unsigned)o.eta) {
      b2[e - o.b2] = s;
    } else if (e < (unsigned)o.w2) {
      eta[e - o.eta] = s;
    } else if (e < (unsigned)o.l2w) {
      w2[e - o.w2] = s;
    } else if (e < (unsigned)o.l2b) {
      l2w[e - o.l2w] = s;
    } else {
      l2b[e - o.l2b] = s;
    }
  }
}

// ===========================================================================
// (3) Elementwise passes over the flat NCHW tensor, plane p = i / S, n = p / C,
// k = p % C; per-plane scalars at base = n·2C + k (λ0, dgap_x) and base + C (λ1,
// dgap_r). 128-bit vectors over the whole tensor when every pointer is 16-byte
// aligned (a vector may straddle planes: the plane is advanced per lane), scalar
// tail / scalar fallback otherwise. The cursor is set once per thread (the only
// 64-bit divisions) and advanced by the grid stride with adds and compares.
// ===========================================================================
struct PlaneCursor {
  long long r, base;  // position in plane, n·2C + k
  int k;
  // Cursor of flat element i (per-thread setup, before the loops).
  __device__ __forceinline__ void init(long long i, long long s, int c) {
    long long p = i / s;
    r = i - p * s;
    long long n = p / c;
    k = (int)(p - n * c);
    base = n * 2 * c + k;
  }
  // Advance by one element.
  __device__ __forceinline__ void step(long long s, int c) {
    if (++r == s) {
      r = 0;
      if (++k == c) {
        k = 0;
        base += c + 1;
      } else {
        base += 1;
      }
    }
  }
  // Advance by the stride d (a cursor made by init(stride): d.r < s, d.k < c, and
  // d.base = dn·2C + d.k for the dn whole samples of the stride).
  __device__ __forceinline__ void advance(const PlaneCursor& d, long long s, int c) {
    r += d.r;
    int carry = 0;
    if (r >= s) {
      r -= s;
      carry = 1;
    }
    k += d.k + carry;
    base += d.base + carry;
    if (k >= c) {
      k -= c;
      base += c;
    }
  }
};

// out = λ0·x + λ1·res. Reads 2·sizeof(T), writes sizeof(T) per element (minimum),
// plus the (cached) per-plane λ.
template <class T>
__device__ void mix_impl(const T* __restrict__ x, const T* __restrict__ res, const float* __restrict__ lam,
                         T* __restrict__ out, long long numel, long long s, int c) {
  constexpr int W = ak::Vec16<T>::N;
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  const bool vec = ak::aligned16(x) && ak::aligned16(res) && ak::aligned16(out);
  const long long nv = vec ? numel / W : 0;
  PlaneCursor pv, dv;
  pv.init(tid * W, s, c);
  dv.init(stride * W, s, c);
  for (long long v = tid; v < nv; v += stride) {
    float fx[W], fr[W], fo[W];
    ak::Vec16<T>::load(x + v * W, fx);
    ak::Vec16<T>::load(res + v * W, fr);
    PlaneCursor pc = pv;
#pragma unroll
    for (int l = 0; l < W; ++l) {
      fo[l] = lam[pc.base] * fx[l] + lam[pc.base + c] * fr[l];
      if (l + 1 < W) pc.step(s, c);
    }
    ak::Vec16<T>::store(out + v * W, fo);
    pv.advance(dv, s, c);
  }
  PlaneCursor pc, d;
  pc.init(nv * W + tid, s, c);
  d.init(stride, s, c);
  for (long long i = nv * W + tid; i < numel; i += stride) {
    out[i] = ak::from_f32<T>(lam[pc.base] * ak::to_f32(x[i]) + lam[pc.base + c] * ak::to_f32(res[i]));
    pc.advance(d, s, c);
  }
}

// dx = λ0·dy + dgap_x·inv_s, dres = λ1·dy + dgap_r·inv_s. Reads sizeof(T), writes
// 2·sizeof(T) per element (minimum), plus the (cached) per-plane scalars.
template <class T>
__device__ void dx_impl(const T* __restrict__ dy, const float* __restrict__ lam, const float* __restrict__ dgap,
                        T* __restrict__ dx, T* __restrict__ dres, long long numel, long long s, int c,
                        float inv_s) {
  constexpr int W = ak::Vec16<T>::N;
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  const bool vec = ak::aligned16(dy) && ak::aligned16(dx) && ak::aligned16(dres);
  const long long nv = vec ? numel / W : 0;
  PlaneCursor pv, dv;
  pv.init(tid * W, s, c);
  dv.init(stride * W, s, c);
  for (long long v = tid; v < nv; v += stride) {
    float fg[W], fx[W], fr[W];
    ak::Vec16<T>::load(dy + v * W, fg);
    PlaneCursor pc = pv;
#pragma unroll
    for (int l = 0; l < W; ++l) {
      fx[l] = lam[pc.base] * fg[l] + dgap[pc.base] * inv_s;
      fr[l] = lam[pc.base + c] * fg[l] + dgap[pc.base + c] * inv_s;
      if (l + 1 < W) pc.step(s, c);
    }
    ak::Vec16<T>::store(dx + v * W, fx);
    ak::Vec16<T>::store(dres + v * W, fr);
    pv.advance(dv, s, c);
  }
  PlaneCursor pc, d;
  pc.init(nv * W + tid, s, c);
  d.init(stride, s, c);
  for (long long i = nv * W + tid; i < numel; i += stride) {
    float g = ak::to_f32(dy[i]);
    dx[i] = ak::from_f32<T>(lam[pc.base] * g + dgap[pc.base] * inv_s);
    dres[i] = ak::from_f32<T>(lam[pc.base + c] * g + dgap[pc.base + c] * inv_s);
    pc.advance(d, s, c);
  }
}

}  // namespace ak_iieu_dc

// ---- extern "C" entry points ----------------------------------------------
// Launch bounds (kernels/common.cuh): __launch_bounds__ for nvcc and the same bound
// for the emulated device, which reads AK_LAUNCH_BOUND at each EMU_REGISTER; the
// file-wide default is restored at the end. 256 = the most threads any launcher of
// this file uses (BLOCK, and the per-sample kernels' coupler_block), 128 = the
// (sample, output) item kernels' ITEM_BLOCK (src/cuda/iieu_dc.rs).
#pragma push_macro("AK_LAUNCH_BOUND")
#undef AK_LAUNCH_BOUND
#define AK_LAUNCH_BOUND 256
#define AK_DC_PARAMS_DECL                                                                                      \
  const float *ln1w, const float *ln1b, const float *w1, const float *g2, const float *b2, const float *eta, \
      const float *w2, const float *ln2w, const float *ln2b

#define AK_DC_TYPED(SUF, T)                                                                                   \
  AK_KERNEL void __launch_bounds__(256)                                                                       \
      iieu_dc_gap_##SUF(const T* x, const T* res, float* gap, int planes, int c, long long s, int warp_mode,   \
                        float inv_s) {                                                                        \
    ak_iieu_dc::plane_reduce<T, 0>(x, res, x, gap, planes, c, s, warp_mode, inv_s);                           \
  }                                                                                                           \
  EMU_REGISTER(iieu_dc_gap_##SUF)                                                                             \
  AK_KERNEL void __launch_bounds__(256) iieu_dc_dots_##SUF(const T* dy, const T* x, const T* res, float* pd,  \
                                                           int planes, int c, long long s, int warp_mode) {   \
    ak_iieu_dc::plane_reduce<T, 1>(x, res, dy, pd, planes, c, s, warp_mode, 1.0f);                            \
  }                                                                                                           \
  EMU_REGISTER(iieu_dc_dots_##SUF)                                                                            \
  AK_KERNEL void __launch_bounds__(256) iieu_dc_mix_##SUF(const T* x, const T* res, const float* lam, T* out,  \
                                                          long long numel, long long s, int c) {              \
    ak_iieu_dc::mix_impl<T>(x, res, lam, out, numel, s, c);                                                   \
  }                                                                                                           \
  EMU_REGISTER(iieu_dc_mix_##SUF)                                                                             \
  AK_KERNEL void __launch_bounds__(256) iieu_dc_dx_##SUF(const T* dy, const float* lam, const float* dgap,     \
                                                         T* dx, T* dres, long long numel, long long s, int c,  \
                                                         float inv_s) {                                       \
    ak_iieu_dc::dx_impl<T>(dy, lam, dgap, dx, dres, numel, s, c, inv_s);                                      \
  }                                                                                                           \
  EMU_REGISTER(iieu_dc_dx_##SUF)

AK_DC_TYPED(f32, float)
AK_DC_TYPED(f16, __half)
AK_DC_TYPED(bf16, __nv_bfloat16)

AK_KERNEL void __launch_bounds__(256) iieu_dc_w1_norms_f32(const float* w1, float* nrw, int c, int hd) {
  ak_iieu_dc::w1_norms_impl(w1, nrw, c, hd);
}
EMU_REGISTER(iieu_dc_w1_norms_f32)

AK_KERNEL void __launch_bounds__(256) iieu_dc_ln1_f32(const float* gap, const float* ln1w, const float* ln1b,
                                                      float* ah, float* ap, float* st, int n, int c) {
  ak_iieu_dc::ln1_impl(gap, ln1w, ln1b, ah, ap, st, n, c);
}
EMU_REGISTER(iieu_dc_ln1_f32)

AK_KERNEL void __launch_bounds__(256) iieu_dc_ln2_f32(const float* cpre, const float* ln2w, const float* ln2b,
                                                      float* lam, int n, int c) {
  ak_iieu_dc::ln2_fwd_impl(cpre, ln2w, ln2b, lam, n, c);
}
EMU_REGISTER(iieu_dc_ln2_f32)

AK_KERNEL void __launch_bounds__(256) iieu_dc_ln2_bwd_f32(const float* cpre, const float* pd, const float* ln2w,
                                                          const float* ln2b, float* dc, float* vrow, int n, int c,
                                                          int hd) {
  ak_iieu_dc::ln2_bwd_impl(cpre, pd, ln2w, ln2b, dc, vrow, n, c, hd);
}
EMU_REGISTER(iieu_dc_ln2_bwd_f32)

AK_KERNEL void __launch_bounds__(256) iieu_dc_adj_bwd_f32(const float* h, float* dhd, float* hp, float* st,
                                                          const float* g2, const float* b2, const float* eta,
                                                          const float* nrw, float* vrow, int n, int hd, int c) {
  ak_iieu_dc::adj_bwd_impl(h, dhd, hp, st, ak_iieu_dc::Adj{g2, b2, eta, nrw}, vrow, n, hd, c);
}
EMU_REGISTER(iieu_dc_adj_bwd_f32)

AK_KERNEL void __launch_bounds__(256) iieu_dc_ln1_bwd_f32(const float* acc, const float* ah, const float* ln1w,
                                                          const float* st, float* dgap, float* vrow, int n, int c,
                                                          int hd) {
  ak_iieu_dc::ln1_bwd_impl(acc, ah, ln1w, st, dgap, vrow, n, c, hd);
}
EMU_REGISTER(iieu_dc_ln1_bwd_f32)

AK_KERNEL void __launch_bounds__(256) iieu_dc_param_part_f32(const float* vrow, const float* dh, const float* ap,
                                                             const float* dc, const float* hp, float* part, int n,
                                                             int c, int hd, int per) {
  ak_iieu_dc::param_part_impl(vrow, dh, ap, dc, hp, part, n, c, hd, per);
}
EMU_REGISTER(iieu_dc_param_part_f32)

AK_KERNEL void __launch_bounds__(256) iieu_dc_param_sum_f32(const float* part, int rows, int c, int hd,
                                                            const float* w1in, float* l1w, float* l1b, float* w1,
                                                            float* g2, float* b2, float* eta, float* w2,
                                                            float* l2w, float* l2b) {
  ak_iieu_dc::param_sum_impl(part, rows, c, hd, w1in, l1w, l1b, w1, g2, b2, eta, w2, l2w, l2b);
}
EMU_REGISTER(iieu_dc_param_sum_f32)

#undef AK_LAUNCH_BOUND
#define AK_LAUNCH_BOUND 128

AK_KERNEL void __launch_bounds__(128) iieu_dc_hidden_f32(const float* ap, const float* w1, float* h, int n, int c,
                                                         int hd) {
  ak_iieu_dc::rowdot_impl<0>(ap, w1, h, n, c, hd);
}
EMU_REGISTER(iieu_dc_hidden_f32)

AK_KERNEL void __launch_bounds__(128) iieu_dc_dhp_f32(const float* dc, const float* w2, float* dhp, int n, int c,
                                                      int hd) {
  ak_iieu_dc::rowdot_impl<1>(dc, w2, dhp, n, c, hd);
}
EMU_REGISTER(iieu_dc_dhp_f32)

AK_KERNEL void __launch_bounds__(128) iieu_dc_out_f32(const float* h, const float* st, const float* g2,
                                                      const float* b2, const float* eta, const float* nrw,
                                                      const float* w2, float* cpre, int n, int c, int hd) {
  ak_iieu_dc::out_impl(h, st, ak_iieu_dc::Adj{g2, b2, eta, nrw}, w2, cpre, n, c, hd);
}
EMU_REGISTER(iieu_dc_out_f32)

AK_KERNEL void __launch_bounds__(128) iieu_dc_da_f32(const float* dh, const float* w1, const float* ap,
                                                     const float* st, float* acc, int n, int c, int hd) {
  ak_iieu_dc::dc_da_impl(dh, w1, ap, st, acc, n, c, hd);
}
EMU_REGISTER(iieu_dc_da_f32)

#pragma pop_macro("AK_LAUNCH_BOUND")
