// iieu_dc.cu — IIEU-DC, the Dynamic Coupler (SPEC §1.6): out = λ0·x + λ1·res with
// λ (N, 2, C) from a per-sample coupler MLP on the GAPs of x and res. The Rust side
// is src/cuda/iieu_dc.rs; the CPU reference is src/cpu/iieu_dc.rs (same formulas).
//
// Kernels (T ∈ {f32, f16, bf16} storage, all arithmetic and accumulation in f32):
//   iieu_dc_gap_<T>         per-(n,c) plane means of x and res        -> gap (N, 2C) f32
//   iieu_dc_coupler_fwd_f32 per-sample coupler, one block per sample  -> λ (N, 2, C) f32
//   iieu_dc_mix_<T>         out = λ0·x + λ1·res (elementwise)
//   iieu_dc_dots_<T>        per-plane Σ dy·x, Σ dy·res                -> pd (N, 2C) f32
//   iieu_dc_coupler_bwd_f32 per-sample coupler backward               -> dgap (N, 2C),
//                           per-block parameter-gradient partials (stage 1)
//   iieu_dc_param_sum_f32   fixed-order sum of the partials over blocks (stage 2)
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
  if (vec) {
    long long nv = s / W;
    for (long long v = first; v < nv; v += step) {
      long long o = base + v * W;
      float fa[W], fb[W], fg[W];
      ak::Vec16<T>::load(a + o, fa);
      ak::Vec16<T>::load(b + o, fb);
      if (MODE == 1) ak::Vec16<T>::load(g + o, fg);
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
                             float* __restrict__ out, long long planes, int c, long long s, int warp_mode,
                             float scale) {
  SHARED_ARRAY(float, scratch, 32);
  constexpr int W = ak::Vec16<T>::N;
  bool vec = ak::aligned16(a) && ak::aligned16(b) && (MODE == 0 || ak::aligned16(g)) && (s % W == 0);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (warp_mode) {
    long long wpb = blockDim.x >> 5;
    for (long long p = blockIdx.x * wpb + warp; p < planes; p += (long long)gridDim.x * wpb) {
      float sa, sb;
      plane_partial<T, MODE>(a, b, g, p * s, s, lane, 32, vec, sa, sb);
      sa = ak::warp_sum(sa);
      sb = ak::warp_sum(sb);
      if (lane == 0) {
        long long n = p / c, k = p - n * c;
        out[n * 2 * c + k] = sa * scale;
        out[n * 2 * c + c + k] = sb * scale;
      }
    }
  } else {
    for (long long p = blockIdx.x; p < planes; p += gridDim.x) {
      float sa, sb;
      plane_partial<T, MODE>(a, b, g, p * s, s, threadIdx.x, blockDim.x, vec, sa, sb);
      sa = ak::block_sum(sa, scratch);
      sb = ak::block_sum(sb, scratch);
      if (threadIdx.x == 0) {
        long long n = p / c, k = p - n * c;
        out[n * 2 * c + k] = sa * scale;
        out[n * 2 * c + c + k] = sb * scale;
      }
    }
  }
}

// ===========================================================================
// (2) The coupler. One block per sample (grid-strided over samples), blockDim a
// multiple of 32 and >= 64. Dynamic shared memory (floats), sized on the host as
// (4C + 13·Hd)·4 bytes:
//   A[2C]   a → â (LayerNorm-1 normalised GAP); a' = ln1_w·â + ln1_b on the fly
//   B[2C]   c → ĉ (forward); then dc, then dâ (backward)
//   nw[Hd], rw[Hd]  ‖W1[j]‖ and r_w[j] (once per block)
//   h[2Hd], hp[2Hd] h and h' = ς·h
//   backward only: dhp[2Hd] (dh', later g·h·r_w), dh[2Hd], dhhat[2Hd], drw[Hd]
// ===========================================================================
struct Params {
  const float* ln1w;
  const float* ln1b;
  const float* w1;
  const float* g2;
  const float* b2;
  const float* eta;
  const float* w2;
  const float* ln2w;
  const float* ln2b;
};

struct Smem {
  float* A;
  float* B;
  float* nw;
  float* rw;
  float* h;
  float* hp;
  float* dhp;
  float* dh;
  float* dhhat;
  float* drw;
};

__device__ __forceinline__ Smem carve(float* base, int c, int hd) {
  Smem m;
  m.A = base;
  m.B = m.A + 2 * c;
  m.nw = m.B + 2 * c;
  m.rw = m.nw + hd;
  m.h = m.rw + hd;
  m.hp = m.h + 2 * hd;
  m.dhp = m.hp + 2 * hd;
  m.dh = m.dhp + 2 * hd;
  m.dhhat = m.dh + 2 * hd;
  m.drw = m.dhhat + 2 * hd;
  return m;
}

// Per-sample scalars shared by the block.
struct Stats {
  float rstd1, rstd2;
  float nx[2], rx[2], mean[2], sd[2], drx[2];
};

// ‖W1[j]‖, r_w[j] for every j: one warp per row. Ends with a barrier.
__device__ void row_norms(const Params& P, int c, int hd, const Smem& m) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int j = warp; j < hd; j += nwarps) {
    float q = 0.0f;
    for (int k = lane; k < c; k += 32) {
      float w = P.w1[(long long)j * c + k];
      q += w * w;
    }
    q = ak::warp_sum(q);
    if (lane == 0) {
      float nv = sqrtf(q);
      m.nw[j] = nv;
      m.rw[j] = 1.0f / (nv + EPS_NORM);
    }
  }
  __syncthreads();
}

// Forward of one sample from its GAP vector a (2C, global). On return (after a
// barrier): A = â, B = ĉ, h, hp and st are set.
__device__ void coupler_forward(const float* __restrict__ a, const Params& P, int c, int hd, const Smem& m,
                                Stats& st, float* scratch) {
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5, nwarps = nt >> 5;
  const int c2 = 2 * c;
  // LayerNorm-1 over the 2C GAPs (biased variance, two passes; own elements only).
  float s = 0.0f;
  for (int i = tid; i < c2; i += nt) {
    float v = a[i];
    m.A[i] = v;
    s += v;
  }
  float mean = ak::block_sum(s, scratch) / (float)c2;
  float q = 0.0f;
  for (int i = tid; i < c2; i += nt) {
    float d = m.A[i] - mean;
    q += d * d;
  }
  float rstd1 = 1.0f / sqrtf(ak::block_sum(q, scratch) / (float)c2 + EPS_LN);
  float q0 = 0.0f, q1 = 0.0f;
  for (int i = tid; i < c2; i += nt) {
    float ah = (m.A[i] - mean) * rstd1;
    m.A[i] = ah;
    float ap = P.ln1w[i] * ah + P.ln1b[i];
    if (i < c)
      q0 += ap * ap;
    else
      q1 += ap * ap;
  }
  // ‖a'[t]‖ and r_x[t]; the block sums also publish A to the whole block.
  float nx0 = sqrtf(ak::block_sum(q0, scratch));
  float nx1 = sqrtf(ak::block_sum(q1, scratch));
  if (tid == 0) {
    st.rstd1 = rstd1;
    st.nx[0] = nx0;
    st.nx[1] = nx1;
    st.rx[0] = 1.0f / (nx0 + EPS_NORM);
    st.rx[1] = 1.0f / (nx1 + EPS_NORM);
  }
  // h[t,j] = Σ_k a'[t,k]·W1[j,k]: one warp per (t, j).
  for (int i = warp; i < 2 * hd; i += nwarps) {
    int t = i >= hd, j = i - t * hd;
    const float* w1r = P.w1 + (long long)j * c;
    float acc = 0.0f;
    for (int k = lane; k < c; k += 32) {
      int ix = t * c + k;
      acc += (P.ln1w[ix] * m.A[ix] + P.ln1b[ix]) * w1r[k];
    }
    acc = ak::warp_sum(acc);
    if (lane == 0) m.h[i] = acc;
  }
  __syncthreads();
  // Mean and unbiased std of h[t,:] over j: warp t.
  if (warp < 2) {
    int t = warp;
    float sh = 0.0f;
    for (int j = lane; j < hd; j += 32) sh += m.h[t * hd + j];
    float mu = ak::warp_sum(sh) / (float)hd;
    float sq = 0.0f;
    for (int j = lane; j < hd; j += 32) {
      float d = m.h[t * hd + j] - mu;
      sq += d * d;
    }
    sq = ak::warp_sum(sq);
    if (lane == 0) {
      st.mean[t] = mu;
      st.sd[t] = hd > 1 ? sqrtf(sq / (float)(hd - 1)) : 0.0f;
    }
  }
  __syncthreads();
  // term-S, term-B, adjuster: h' = ς(ρ̂, η)·h.
  for (int i = tid; i < 2 * hd; i += nt) {
    int t = i >= hd, j = i - t * hd;
    float hv = m.h[i];
    float hhat = (hv - st.mean[t]) / (st.sd[t] + EPS_STD);
    float nu = sigm(P.g2[i] * hhat + P.b2[i]);
    float rho = hv * m.rw[j] * st.rx[t] + nu;
    float e = P.eta[j];
    float vs = rho >= e ? rho : e * expf(rho - e);
    m.hp[i] = vs * hv;
  }
  __syncthreads();
  // c[t,k] = Σ_j h'[t,j]·W2[k,j], then LayerNorm-2 (own elements).
  s = 0.0f;
  for (int i = tid; i < c2; i += nt) {
    int t = i >= c, k = i - t * c;
    const float* w2r = P.w2 + (long long)k * hd;
    const float* hpt = m.hp + t * hd;
    float acc = 0.0f;
    for (int j = 0; j < hd; ++j) acc += hpt[j] * w2r[j];
    m.B[i] = acc;
    s += acc;
  }
  float mean2 = ak::block_sum(s, scratch) / (float)c2;
  q = 0.0f;
  for (int i = tid; i < c2; i += nt) {
    float d = m.B[i] - mean2;
    q += d * d;
  }
  float rstd2 = 1.0f / sqrtf(ak::block_sum(q, scratch) / (float)c2 + EPS_LN);
  for (int i = tid; i < c2; i += nt) m.B[i] = (m.B[i] - mean2) * rstd2;
  if (tid == 0) st.rstd2 = rstd2;
  __syncthreads();
}

// λ from ĉ for channel k.
__device__ __forceinline__ void lambdas(const Params& P, const Smem& m, int c, int k, float& ch0, float& ch1,
                                        float& l0, float& l1) {
  ch0 = m.B[k];
  ch1 = m.B[c + k];
  float c0 = P.ln2w[k] * ch0 + P.ln2b[k];
  float c1 = P.ln2w[c + k] * ch1 + P.ln2b[c + k];
  l0 = sigm(c0 - c1);
  l1 = sigm(c1 - c0);
}

// Coupler forward: λ (N, 2, C) from gap (N, 2C). Per sample: reads the 2C GAPs and
// writes the 2C λ (the minimum for those), but re-reads the parameters: W1 and W2
// twice each (L2), the LN-1 affine once per hidden unit (L1); W1 once more per block
// for the row norms. O(C·Hd) work per sample.
__device__ void coupler_fwd_impl(const float* __restrict__ gap, Params P, float* __restrict__ lam, int n, int c,
                                 int hd) {
  SHARED_ARRAY(float, scratch, 32);
  SHARED_VAR(Stats, st);
  DYNAMIC_SHARED(float, smem);
  Smem m = carve(smem, c, hd);
  row_norms(P, c, hd, m);
  for (int ni = blockIdx.x; ni < n; ni += gridDim.x) {
    long long off = (long long)ni * 2 * c;
    coupler_forward(gap + off, P, c, hd, m, st, scratch);
    for (int k = threadIdx.x; k < c; k += blockDim.x) {
      float ch0, ch1, l0, l1;
      lambdas(P, m, c, k, ch0, ch1, l0, l1);
      lam[off + k] = l0;
      lam[off + c + k] = l1;
    }
    __syncthreads();  // A/B are rewritten by the next sample
  }
}

// Per-block partial row: first sample of the block stores, later ones accumulate
// (same block, separated by barriers: no race, fixed order).
__device__ __forceinline__ void put(float* p, float v, bool first) { *p = first ? v : *p + v; }

// Partial-row layout (floats): l1w 2C | l1b 2C | w1 Hd·C | g2 2Hd | b2 2Hd | eta Hd |
// w2 C·Hd | l2w 2C | l2b 2C. (The r_w path is folded into w1 per sample.)
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

// Coupler backward. Block b handles samples b, b+grid, ...; writes dgap (N, 2C) and
// its partial row part[b·len .. (b+1)·len). Bytes per sample: reads gap and pd (2C
// floats each), writes dgap (2C); recomputes the forward (W1, W2 twice each) and reads
// W1 three and W2 one more time (L2); writes its partial row (len floats) for the
// block's first sample and read-modify-writes it for every later one (8·len bytes).
__device__ void coupler_bwd_impl(const float* __restrict__ gap, const float* __restrict__ pd, Params P,
                                 float* __restrict__ dgap, float* __restrict__ part, int n, int c, int hd) {
  SHARED_ARRAY(float, scratch, 32);
  SHARED_VAR(Stats, st);
  DYNAMIC_SHARED(float, smem);
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5, nwarps = nt >> 5;
  const int c2 = 2 * c;
  Smem m = carve(smem, c, hd);
  Offs o = offsets(c, hd);
  float* row = part + (long long)blockIdx.x * o.len;
  row_norms(P, c, hd, m);
  for (int ni = blockIdx.x; ni < n; ni += gridDim.x) {
    const bool first = ni == (int)blockIdx.x;
    long long off = (long long)ni * 2 * c;
    coupler_forward(gap + off, P, c, hd, m, st, scratch);
    const float* px = pd + off;

    // Softmax over t and LayerNorm-2 affine: dĉ; then LayerNorm-2 backward → dc in B.
    float s1 = 0.0f, s2 = 0.0f;
    for (int k = tid; k < c; k += nt) {
      float ch0, ch1, l0, l1;
      lambdas(P, m, c, k, ch0, ch1, l0, l1);
      float du = (px[k] - px[c + k]) * l0 * l1;
      put(row + o.l2w + k, du * ch0, first);
      put(row + o.l2w + c + k, -du * ch1, first);
      put(row + o.l2b + k, du, first);
      put(row + o.l2b + c + k, -du, first);
      float d0 = du * P.ln2w[k], d1 = -du * P.ln2w[c + k];
      s1 += d0 + d1;
      s2 += d0 * ch0 + d1 * ch1;
    }
    float m1 = ak::block_sum(s1, scratch) / (float)c2;
    float m2 = ak::block_sum(s2, scratch) / (float)c2;
    for (int k = tid; k < c; k += nt) {  // same k as above: own elements only
      float ch0, ch1, l0, l1;
      lambdas(P, m, c, k, ch0, ch1, l0, l1);
      float du = (px[k] - px[c + k]) * l0 * l1;
      float d0 = du * P.ln2w[k], d1 = -du * P.ln2w[c + k];
      m.B[k] = st.rstd2 * (d0 - m1 - ch0 * m2);
      m.B[c + k] = st.rstd2 * (d1 - m1 - ch1 * m2);
    }
    __syncthreads();

    // Linear 2: dh'[t,j] = Σ_k dc[t,k]·W2[k,j] (warp per (t,j));
    // dW2[k,j] += Σ_t dc[t,k]·h'[t,j].
    for (int i = warp; i < 2 * hd; i += nwarps) {
      int t = i >= hd, j = i - t * hd;
      float acc = 0.0f;
      for (int k = lane; k < c; k += 32) acc += m.B[t * c + k] * P.w2[(long long)k * hd + j];
      acc = ak::warp_sum(acc);
      if (lane == 0) m.dhp[i] = acc;
    }
    for (int e = tid; e < c * hd; e += nt) {
      int k = e / hd, j = e - k * hd;
      put(row + o.w2 + e, m.B[k] * m.hp[j] + m.B[c + k] * m.hp[hd + j], first);
    }
    __syncthreads();

    // Adjuster, term-B (ν), term-S: per hidden unit j, both rows t.
    for (int j = tid; j < hd; j += nt) {
      float eta_acc = 0.0f, drw_acc = 0.0f;
      const float e = P.eta[j];
      for (int t = 0; t < 2; ++t) {
        int i = t * hd + j;
        float hv = m.h[i];
        float hhat = (hv - st.mean[t]) / (st.sd[t] + EPS_STD);
        float nu = sigm(P.g2[i] * hhat + P.b2[i]);
        float rho = hv * m.rw[j] * st.rx[t] + nu;
        float dyh = m.dhp[i] * hv;
        float vs, g;
        if (rho >= e) {
          vs = rho;
          g = dyh;
        } else {
          float ex = expf(rho - e);
          vs = e * ex;
          eta_acc += dyh * ex * (1.0f - e);
          g = dyh * e * ex;
        }
        float dz = g * nu * (1.0f - nu);
        put(row + o.g2 + i, dz * hhat, first);
        put(row + o.b2 + i, dz, first);
        m.dhhat[i] = dz * P.g2[i];
        float dhv = m.dhp[i] * vs;
        m.dh[i] = dhv + g * m.rw[j] * st.rx[t];
        drw_acc += g * hv * st.rx[t];
        m.dhp[i] = g * hv * m.rw[j];  // term of dr_x[t]
      }
      put(row + o.eta + j, eta_acc, first);
      m.drw[j] = drw_acc;
    }
    __syncthreads();

    // dr_x[t] and the unbiased-std normalisation backward: warp t.
    if (warp < 2) {
      int t = warp;
      const float mu = st.mean[t], sd = st.sd[t], denom = sd + EPS_STD;
      float sx = 0.0f, sdev = 0.0f;
      for (int j = lane; j < hd; j += 32) {
        int i = t * hd + j;
        sx += m.dhp[i];
        sdev += m.dhhat[i] * (m.h[i] - mu);
      }
      sx = ak::warp_sum(sx);
      sdev = ak::warp_sum(sdev);
      float coef = 0.0f;
      if (hd > 1 && sd > 0.0f) coef = (-sdev / (denom * denom)) / ((float)(hd - 1) * sd);
      float sdd = 0.0f;
      for (int j = lane; j < hd; j += 32) {
        int i = t * hd + j;
        sdd += m.dhhat[i] / denom + coef * (m.h[i] - mu);
      }
      float mdd = ak::warp_sum(sdd) / (float)hd;
      for (int j = lane; j < hd; j += 32) {
        int i = t * hd + j;
        m.dh[i] += (m.dhhat[i] / denom + coef * (m.h[i] - mu)) - mdd;
      }
      if (lane == 0) st.drx[t] = sx;
    }
    __syncthreads();

    // Linear 1 (+ r_w): dW1[j,k] += Σ_t dh[t,j]·a'[t,k] + dr_w[j]·(−r_w²/‖W1[j]‖)·W1[j,k].
    for (int e = tid; e < hd * c; e += nt) {
      int j = e / c, k = e - j * c;
      float ap0 = P.ln1w[k] * m.A[k] + P.ln1b[k];
      float ap1 = P.ln1w[c + k] * m.A[c + k] + P.ln1b[c + k];
      float v = m.dh[j] * ap0 + m.dh[hd + j] * ap1;
      float nwj = m.nw[j];
      if (nwj > 0.0f) v += (-m.drw[j] * m.rw[j] * m.rw[j] / nwj) * P.w1[e];
      put(row + o.w1 + e, v, first);
    }
    // da'[t,k] = Σ_j dh[t,j]·W1[j,k] + dr_x[t]·(−r_x²/‖a'[t]‖)·a'[t,k]; LayerNorm-1
    // affine; dâ into B (dc is dead), then LayerNorm-1 backward → dgap.
    s1 = 0.0f;
    s2 = 0.0f;
    for (int i = tid; i < c2; i += nt) {
      int t = i >= c, k = i - t * c;
      float ah = m.A[i];
      float ap = P.ln1w[i] * ah + P.ln1b[i];
      float acc = 0.0f;
      for (int j = 0; j < hd; ++j) acc += m.dh[t * hd + j] * P.w1[(long long)j * c + k];
      if (st.nx[t] > 0.0f) acc += (-st.drx[t] * st.rx[t] * st.rx[t] / st.nx[t]) * ap;
      put(row + o.l1w + i, acc * ah, first);
      put(row + o.l1b + i, acc, first);
      float da = acc * P.ln1w[i];
      m.B[i] = da;
      s1 += da;
      s2 += da * ah;
    }
    m1 = ak::block_sum(s1, scratch) / (float)c2;
    m2 = ak::block_sum(s2, scratch) / (float)c2;
    for (int i = tid; i < c2; i += nt) dgap[off + i] = st.rstd1 * (m.B[i] - m1 - m.A[i] * m2);
    __syncthreads();  // A/B/h/... are rewritten by the next sample
  }
}

// Stage 2: grads[e] = Σ_b part[b·len + e] in block order b = 0, 1, ... (fixed), scattered
// to the nine parameter-gradient buffers. Reads rows·len, writes len floats.
__device__ void param_sum_impl(const float* __restrict__ part, int rows, int c, int hd, float* l1w, float* l1b,
                               float* w1, float* g2, float* b2, float* eta, float* w2, float* l2w, float* l2b) {
  Offs o = offsets(c, hd);
  long long stride = (long long)gridDim.x * blockDim.x;
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < o.len; e += stride) {
    float s = 0.0f;
    for (int r = 0; r < rows; ++r) s += part[(long long)r * o.len + e];
    if (e < o.l1b)
      l1w[e - o.l1w] = s;
    else if (e < o.w1)
      l1b[e - o.l1b] = s;
    else if (e < o.g2)
      w1[e - o.w1] = s;
    else if (e < o.b2)
      g2[e - o.g2] = s;
    else if (e < o.eta)
      b2[e - o.b2] = s;
    else if (e < o.w2)
      eta[e - o.eta] = s;
    else if (e < o.l2w)
      w2[e - o.w2] = s;
    else if (e < o.l2b)
      l2w[e - o.l2w] = s;
    else
      l2b[e - o.l2b] = s;
  }
}

// ===========================================================================
// (3) Elementwise passes over the flat NCHW tensor, plane p = i / S, n = p / C,
// k = p % C; per-plane scalars at base = n·2C + k (λ0, dgap_x) and base + C (λ1,
// dgap_r). 128-bit vectors over the whole tensor when every pointer is 16-byte
// aligned (a vector may straddle planes: the plane is advanced per lane), scalar
// tail / scalar fallback otherwise.
// ===========================================================================
struct PlaneCursor {
  long long r, base;  // position in plane, n·2C + k
  int k;
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
  for (long long v = tid; v < nv; v += stride) {
    float fx[W], fr[W], fo[W];
    ak::Vec16<T>::load(x + v * W, fx);
    ak::Vec16<T>::load(res + v * W, fr);
    PlaneCursor pc;
    pc.init(v * W, s, c);
#pragma unroll
    for (int l = 0; l < W; ++l) {
      fo[l] = lam[pc.base] * fx[l] + lam[pc.base + c] * fr[l];
      if (l + 1 < W) pc.step(s, c);
    }
    ak::Vec16<T>::store(out + v * W, fo);
  }
  for (long long i = nv * W + tid; i < numel; i += stride) {
    PlaneCursor pc;
    pc.init(i, s, c);
    out[i] = ak::from_f32<T>(lam[pc.base] * ak::to_f32(x[i]) + lam[pc.base + c] * ak::to_f32(res[i]));
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
  for (long long v = tid; v < nv; v += stride) {
    float fg[W], fx[W], fr[W];
    ak::Vec16<T>::load(dy + v * W, fg);
    PlaneCursor pc;
    pc.init(v * W, s, c);
#pragma unroll
    for (int l = 0; l < W; ++l) {
      fx[l] = lam[pc.base] * fg[l] + dgap[pc.base] * inv_s;
      fr[l] = lam[pc.base + c] * fg[l] + dgap[pc.base + c] * inv_s;
      if (l + 1 < W) pc.step(s, c);
    }
    ak::Vec16<T>::store(dx + v * W, fx);
    ak::Vec16<T>::store(dres + v * W, fr);
  }
  for (long long i = nv * W + tid; i < numel; i += stride) {
    PlaneCursor pc;
    pc.init(i, s, c);
    float g = ak::to_f32(dy[i]);
    dx[i] = ak::from_f32<T>(lam[pc.base] * g + dgap[pc.base] * inv_s);
    dres[i] = ak::from_f32<T>(lam[pc.base + c] * g + dgap[pc.base + c] * inv_s);
  }
}

}  // namespace ak_iieu_dc

// ---- extern "C" entry points ----------------------------------------------
#define AK_DC_PARAMS_DECL                                                                                      \
  const float *ln1w, const float *ln1b, const float *w1, const float *g2, const float *b2, const float *eta, \
      const float *w2, const float *ln2w, const float *ln2b
#define AK_DC_PARAMS ak_iieu_dc::Params{ln1w, ln1b, w1, g2, b2, eta, w2, ln2w, ln2b}

#define AK_DC_TYPED(SUF, T)                                                                                     \
  AK_KERNEL void iieu_dc_gap_##SUF(const T* x, const T* res, float* gap, long long planes, int c,   \
                                               long long s, int warp_mode, float inv_s) {                       \
    ak_iieu_dc::plane_reduce<T, 0>(x, res, x, gap, planes, c, s, warp_mode, inv_s);                             \
  }                                                                                                             \
  EMU_REGISTER(iieu_dc_gap_##SUF)                                                                               \
  AK_KERNEL void iieu_dc_dots_##SUF(const T* dy, const T* x, const T* res, float* pd,              \
                                                long long planes, int c, long long s, int warp_mode) {          \
    ak_iieu_dc::plane_reduce<T, 1>(x, res, dy, pd, planes, c, s, warp_mode, 1.0f);                              \
  }                                                                                                             \
  EMU_REGISTER(iieu_dc_dots_##SUF)                                                                              \
  AK_KERNEL void iieu_dc_mix_##SUF(const T* x, const T* res, const float* lam, T* out,             \
                                               long long numel, long long s, int c) {                           \
    ak_iieu_dc::mix_impl<T>(x, res, lam, out, numel, s, c);                                                     \
  }                                                                                                             \
  EMU_REGISTER(iieu_dc_mix_##SUF)                                                                               \
  AK_KERNEL void iieu_dc_dx_##SUF(const T* dy, const float* lam, const float* dgap, T* dx, T* dres, \
                                              long long numel, long long s, int c, float inv_s) {               \
    ak_iieu_dc::dx_impl<T>(dy, lam, dgap, dx, dres, numel, s, c, inv_s);                                        \
  }                                                                                                             \
  EMU_REGISTER(iieu_dc_dx_##SUF)

AK_DC_TYPED(f32, float)
AK_DC_TYPED(f16, __half)
AK_DC_TYPED(bf16, __nv_bfloat16)

AK_KERNEL void iieu_dc_coupler_fwd_f32(const float* gap, AK_DC_PARAMS_DECL, float* lam, int n, int c,
                                                   int hd) {
  ak_iieu_dc::coupler_fwd_impl(gap, AK_DC_PARAMS, lam, n, c, hd);
}
EMU_REGISTER(iieu_dc_coupler_fwd_f32)

AK_KERNEL void iieu_dc_coupler_bwd_f32(const float* gap, const float* pd, AK_DC_PARAMS_DECL,
                                                   float* dgap, float* part, int n, int c, int hd) {
  ak_iieu_dc::coupler_bwd_impl(gap, pd, AK_DC_PARAMS, dgap, part, n, c, hd);
}
EMU_REGISTER(iieu_dc_coupler_bwd_f32)

AK_KERNEL void iieu_dc_param_sum_f32(const float* part, int rows, int c, int hd, float* l1w,
                                                 float* l1b, float* w1, float* g2, float* b2, float* eta,
                                                 float* w2, float* l2w, float* l2b) {
  ak_iieu_dc::param_sum_impl(part, rows, c, hd, l1w, l1b, w1, g2, b2, eta, w2, l2w, l2b);
}
EMU_REGISTER(iieu_dc_param_sum_f32)
