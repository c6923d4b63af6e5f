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
//             patch_sq     -> q[n,grp,h,w] = Σ_{c∈grp} x_pre²
//             patch_window -> ‖P‖, r_x            (KH×KW strided/dilated window sum of q)
//             gap          -> m[n,o]              (one block per (n,o) plane)
//             ln_fwd       -> m̂, rstd, ν          (one block per sample)
//             fwd          -> y                   (elementwise adjuster)
//   backward: bwd_sums     -> per-(n,o) [Σg, Σg·x·r_x, Σ dη-term]   (stage 1)
//             ln_bwd       -> dz, dm              (one block per sample)
//             bwd_params   -> dγ̇, dβ̇, dη, dW      (one block per o: stage 2, fixed order)
//             bwd_dx       -> dx, coef = dr_x·(−r_x²/‖P‖)  (gather over the group's channels)
//             bwd_dxpre    -> dx_pre              (gather over the windows containing a tap)
// No float atomics anywhere; every reduction has a fixed order, so results are
// bitwise reproducible.
#include "common.cuh"

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

__device__ __forceinline__ long long grid_tid() {
  return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long grid_stride() { return (long long)gridDim.x * blockDim.x; }

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

// q[n,grp,h,w] = Σ_{c∈grp} x_pre[n,c,h,w]² (grp over G' planes of C/G' channels).
// Thread per pixel (8/4 pixels with 128-bit loads when H·W allows), loop over the
// plane's channels. Bytes: reads x_pre once, writes 4 B per (n,grp,pixel) — minimum.
template <class T>
__device__ void patch_sq_impl(const T* __restrict__ x_pre, float* __restrict__ q, IieuGeom g) {
  constexpr int V = ak::Vec16<T>::N;
  const long long hw = (long long)g.h * g.w;
  const long long total = (long long)g.n * g.gp * hw;
  const bool vec = (hw % V == 0) && ak::aligned16(x_pre);
  if (vec) {
    for (long long i = grid_tid(); i < total / V; i += grid_stride()) {
      const long long e = i * V, t = e / hw, pix = e - t * hw;
      // n·C + grp·(C/G') = (n·G' + grp)·(C/G') = t·c_per
      const T* src = x_pre + t * g.c_per * hw + pix;
      float acc[V];
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = 0.0f;
      for (int c = 0; c < g.c_per; ++c) {
        float v[V];
        ak::Vec16<T>::load(src + (long long)c * hw, v);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] = fmaf(v[k], v[k], acc[k]);
      }
      store_f32<V>(q + e, acc);
    }
  } else {
    for (long long e = grid_tid(); e < total; e += grid_stride()) {
      const long long t = e / hw, pix = e - t * hw;
      const T* src = x_pre + t * g.c_per * hw + pix;
      float acc = 0.0f;
      for (int c = 0; c < g.c_per; ++c) {
        const float v = ak::to_f32(src[(long long)c * hw]);
        acc = fmaf(v, v, acc);
      }
      q[e] = acc;
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
  const bool vec = (P % V == 0) && ak::aligned16(x);
  for (long long pl = blockIdx.x; pl < planes; pl += gridDim.x) {
    const T* src = x + pl * P;
    float acc = 0.0f;
    if (vec) {
      for (long long j = threadIdx.x; j < P / V; j += blockDim.x) {
        float v[V];
        ak::Vec16<T>::load(src + j * V, v);
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
// (tie: upper), else η·exp(ρ̂ − η). Elementwise, 128-bit when H'·W' allows.
// Bytes per element: reads x (sizeof T) + r_x (4 B, shared by the O/G' channels of a
// group: re-read from L2 per channel), writes y (sizeof T). Minimum is x + y; the r_x
// re-read is the price of not materialising s.
template <class T>
__device__ void fwd_impl(const T* __restrict__ x, const float* __restrict__ lin, const float* __restrict__ r_w,
                         const float* __restrict__ r_x, const float* __restrict__ nu,
                         const float* __restrict__ eta, T* __restrict__ y, IieuGeom g) {
  constexpr int V = ak::Vec16<T>::N;
  const long long P = (long long)g.oh * g.ow;
  const long long total = (long long)g.n * g.o * P;
  const bool vec = (P % V == 0) && ak::aligned16(x) && ak::aligned16(y);
  if (vec) {
    for (long long i = grid_tid(); i < total / V; i += grid_stride()) {
      const long long e = i * V, no = e / P, p = e - no * P;
      const int o = (int)(no % g.o), n = (int)(no / g.o);
      const long long t = (long long)n * g.gp + o / g.o_per;
      float xv[V], rx[V], out[V];
      ak::Vec16<T>::load(x + e, xv);
      if (lin != nullptr)
#pragma unroll
        for (int k = 0; k < V; ++k) xv[k] = psi_x<T>(xv[k], lin, o);
      load_f32<V>(r_x + t * P + p, rx);
      const float rw = r_w[o], nv = nu[no], et = eta[o];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float r = rho_of(xv[k], rw, rx[k], nv);
        out[k] = r >= et ? r * xv[k] : et * expf(r - et) * xv[k];
      }
      ak::Vec16<T>::store(y + e, out);
    }
  } else {
    for (long long e = grid_tid(); e < total; e += grid_stride()) {
      const long long no = e / P, p = e - no * P;
      const int o = (int)(no % g.o), n = (int)(no / g.o);
      const long long t = (long long)n * g.gp + o / g.o_per;
      const float xv = psi_x<T>(ak::to_f32(x[e]), lin, o);
      const float r = rho_of(xv, r_w[o], r_x[t * P + p], nu[no]);
      const float et = eta[o];
      y[e] = ak::from_f32<T>(r >= et ? r * xv : et * expf(r - et) * xv);
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
// the (n,o) plane. One block per plane. Bytes: reads dy, x once (+ r_x, 4 B/elem),
// writes 12 B per plane.
template <class T>
__device__ void bwd_sums_impl(const T* __restrict__ dy, const T* __restrict__ x,
                              const float* __restrict__ lin, const float* __restrict__ r_w, const float* __restrict__ r_x,
                              const float* __restrict__ nu, const float* __restrict__ eta,
                              float* __restrict__ part, IieuGeom g) {
  SHARED_ARRAY(float, scratch, 32);
  constexpr int V = ak::Vec16<T>::N;
  const long long P = (long long)g.oh * g.ow;
  const long long planes = (long long)g.n * g.o;
  const bool vec = (P % V == 0) && ak::aligned16(x) && ak::aligned16(dy);
  for (long long no = blockIdx.x; no < planes; no += gridDim.x) {
    const int o = (int)(no % g.o), n = (int)(no / g.o);
    const long long t = (long long)n * g.gp + o / g.o_per;
    const float* rxp = r_x + t * P;
    const T* xp = x + no * P;
    const T* dyp = dy + no * P;
    const float rw = r_w[o], nv = nu[no], et = eta[o];
    float sg = 0.0f, sgr = 0.0f, se = 0.0f;
    if (vec) {
      for (long long j = threadIdx.x; j < P / V; j += blockDim.x) {
        float xv[V], dv[V], rx[V];
        ak::Vec16<T>::load(xp + j * V, xv);
        if (lin != nullptr)
#pragma unroll
          for (int k = 0; k < V; ++k) xv[k] = psi_x<T>(xv[k], lin, o);
        ak::Vec16<T>::load(dyp + j * V, dv);
        load_f32<V>(rxp + j * V, rx);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const Adj a = adj_bwd(dv[k], xv[k], rw, rx[k], nv, et);
          sg += a.g;
          sgr += a.g * xv[k] * rx[k];
          se += a.deta;
        }
      }
    } else {
      for (long long j = threadIdx.x; j < P; j += blockDim.x) {
        const float xv = psi_x<T>(ak::to_f32(xp[j]), lin, o), rx = rxp[j];
        const Adj a = adj_bwd(ak::to_f32(dyp[j]), xv, rw, rx, nv, et);
        sg += a.g;
        sgr += a.g * xv * rx;
        se += a.deta;
      }
    }
    sg = ak::block_sum(sg, scratch);
    sgr = ak::block_sum(sgr, scratch);
    se = ak::block_sum(se, scratch);
    if (threadIdx.x == 0) {
      part[no * 3 + 0] = sg;
      part[no * 3 + 1] = sgr;
      part[no * 3 + 2] = se;
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

// dx = dy·ς(ρ̂) + g·r_w·r_x + dm[n,o]/(H'W'), and the patch-norm adjoint coefficient
// coef[n,grp,h',w'] = dr_x·(−r_x²/‖P‖) with dr_x = Σ_{o∈grp} g·x·r_w[o] — a gather over
// the group's O/G' channels (thread per (n,grp,pixel), no atomics). Bytes per element
// of x: reads dy, x once, writes dx once (the minimum); plus r_x, ‖P‖ read and coef
// written once per (n,grp,pixel).
template <class T>
__device__ void bwd_dx_impl(const T* __restrict__ dy, const T* __restrict__ x,
                            const float* __restrict__ lin, const float* __restrict__ r_w, const float* __restrict__ r_x,
                            const float* __restrict__ x_norm, const float* __restrict__ nu,
                            const float* __restrict__ eta, const float* __restrict__ dm,
                            T* __restrict__ dx, float* __restrict__ coef, IieuGeom g) {
  constexpr int V = ak::Vec16<T>::N;
  const long long P = (long long)g.oh * g.ow;
  const long long total = (long long)g.n * g.gp * P;
  const float inv_p = 1.0f / (float)P;
  const bool vec = (P % V == 0) && ak::aligned16(x) && ak::aligned16(dy) && ak::aligned16(dx);
  if (vec) {
    for (long long i = grid_tid(); i < total / V; i += grid_stride()) {
      const long long e = i * V, t = e / P, p = e - t * P;  // e = t·P + p
      const int n = (int)(t / g.gp), grp = (int)(t - (long long)n * g.gp);
      float rx[V], acc[V];
      load_f32<V>(r_x + e, rx);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = 0.0f;
      for (int ol = 0; ol < g.o_per; ++ol) {
        const int o = grp * g.o_per + ol;
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
      float nm[V];
      load_f32<V>(x_norm + e, nm);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] *= inv_norm_slope(nm[k], rx[k]);
      store_f32<V>(coef + e, acc);
    }
  } else {
    for (long long e = grid_tid(); e < total; e += grid_stride()) {
      const long long t = e / P, p = e - t * P;
      const int n = (int)(t / g.gp), grp = (int)(t - (long long)n * g.gp);
      const float rx = r_x[e];
      float acc = 0.0f;
      for (int ol = 0; ol < g.o_per; ++ol) {
        const int o = grp * g.o_per + ol;
        const long long no = (long long)n * g.o + o, idx = no * P + p;
        const float rw = r_w[o];
        const float xv = psi_x<T>(ak::to_f32(x[idx]), lin, o), dv = ak::to_f32(dy[idx]);
        const Adj a = adj_bwd(dv, xv, rw, rx, nu[no], eta[o]);
        dx[idx] = ak::from_f32<T>(dv * a.sc + a.g * rw * rx + dm[no] * inv_p);
        acc += a.g * xv * rw;
      }
      coef[e] = acc * inv_norm_slope(x_norm[e], rx);
    }
  }
}

// Σ of coef over the windows (h',w') whose (strided, dilated, padded) patch contains
// input pixel (h, w), in fixed (tap-row, tap-column) order.
__device__ __forceinline__ float window_gather(const float* __restrict__ cf, int h, int w, const IieuGeom& g) {
  float acc = 0.0f;
  for_windows(h, g.kh, g.sh, g.ph, g.dh, g.oh, [&](int ho) {
    const float* row = cf + (long long)ho * g.ow;
    for_windows(w, g.kw, g.sw, g.pw, g.dw, g.ow, [&](int wo) { acc += row[wo]; });
  });
  return acc;
}

// dx_pre[n,c,h,w] = x_pre[n,c,h,w]·Σ_{windows ∋ (h,w)} coef[n,grp(c),window]: the window
// sum computed once per (n,grp,pixel) as a gather (no atomics), then applied to the
// C/G' channels of the plane. Bytes: reads x_pre once, writes dx_pre once (minimum),
// plus ≤ KH·KW cached coef reads per (n,grp,pixel).
template <class T>
__device__ void bwd_dxpre_impl(const T* __restrict__ x_pre, const float* __restrict__ coef,
                               T* __restrict__ dx_pre, IieuGeom g) {
  constexpr int V = ak::Vec16<T>::N;
  const long long hw = (long long)g.h * g.w;
  const long long P = (long long)g.oh * g.ow;
  const long long total = (long long)g.n * g.gp * hw;
  const bool vec = (hw % V == 0) && ak::aligned16(x_pre) && ak::aligned16(dx_pre);
  if (vec) {
    for (long long i = grid_tid(); i < total / V; i += grid_stride()) {
      const long long e = i * V, t = e / hw, pix = e - t * hw;
      const float* cf = coef + t * P;
      float acc[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int px = (int)(pix + k), h = px / g.w, w = px - h * g.w;
        acc[k] = window_gather(cf, h, w, g);
      }
      for (int c = 0; c < g.c_per; ++c) {
        const long long base = (t * g.c_per + c) * hw + pix;
        float v[V];
        ak::Vec16<T>::load(x_pre + base, v);
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] *= acc[k];
        ak::Vec16<T>::store(dx_pre + base, v);
      }
    }
  } else {
    for (long long e = grid_tid(); e < total; e += grid_stride()) {
      const long long t = e / hw, pix = e - t * hw;
      const int h = (int)(pix / g.w), w = (int)(pix - (long long)h * g.w);
      const float acc = window_gather(coef + t * P, h, w, g);
      for (int c = 0; c < g.c_per; ++c) {
        const long long idx = (t * g.c_per + c) * hw + pix;
        dx_pre[idx] = ak::from_f32<T>(ak::to_f32(x_pre[idx]) * acc);
      }
    }
  }
}

}  // namespace ak_iieu

// =====================================================================================
// f32-only kernels (operate on f32 intermediates: one instance, no dtype suffix)

// ‖P‖ and r_x = 1/(‖P‖+eps) per (n,grp,h',w'): KH×KW window sum of q with the conv's
// stride/padding and the patch dilation (g.dh, g.dw), zero outside the image — never a
// convolution. Thread per output position. Bytes: ≤ KH·KW cached q reads, 8 B written.
AK_KERNEL void iieu_patch_window(const float* __restrict__ q, float* __restrict__ x_norm,
                                             float* __restrict__ r_x, IieuGeom g) {
  const long long hw = (long long)g.h * g.w;
  const long long P = (long long)g.oh * g.ow;
  const long long total = (long long)g.n * g.gp * P;
  for (long long e = ak_iieu::grid_tid(); e < total; e += ak_iieu::grid_stride()) {
    const long long t = e / P, p = e - t * P;
    const int ho = (int)(p / g.ow), wo = (int)(p - (long long)ho * g.ow);
    const float* qp = q + t * hw;
    const int h0 = ho * g.sh - g.ph, w0 = wo * g.sw - g.pw;
    float acc = 0.0f;
    for (int a = 0; a < g.kh; ++a) {
      const int hi = h0 + a * g.dh;
      if (hi < 0 || hi >= g.h) continue;
      const float* row = qp + (long long)hi * g.w;
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

// term-B LayerNorm over O per sample (biased variance, eps_ln), then
// ν = σ(γ̇·m̂ + β̇). One block per sample, two-pass statistics.
// Bytes per (n,o): reads m three times (mean, variance, normalisation; the re-reads
// hit L1/L2), γ̇ and β̇ once; writes m̂, ν (4 B each); plus rstd per sample.
AK_KERNEL void iieu_ln_fwd(const float* __restrict__ m, const float* __restrict__ gamma,
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
AK_KERNEL void iieu_ln_bwd(const float* __restrict__ part, const float* __restrict__ nu,
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

#define IIEU_KERNELS(SUF, T)                                                                              \
  AK_KERNEL void iieu_filter_norm_##SUF(const T* w, float* r_w, float* w_norm, IieuGeom g) { \
    ak_iieu::filter_norm_impl<T>(w, r_w, w_norm, g);                                                      \
  }                                                                                                       \
  EMU_REGISTER(iieu_filter_norm_##SUF)                                                                    \
  AK_KERNEL void iieu_patch_sq_##SUF(const T* x_pre, float* q, IieuGeom g) {                 \
    ak_iieu::patch_sq_impl<T>(x_pre, q, g);                                                               \
  }                                                                                                       \
  EMU_REGISTER(iieu_patch_sq_##SUF)                                                                       \
  AK_KERNEL void iieu_gap_##SUF(const T* x, float* m, IieuGeom g) {                          \
    ak_iieu::gap_impl<T>(x, m, g);                                                                        \
  }                                                                                                       \
  EMU_REGISTER(iieu_gap_##SUF)                                                                            \
  AK_KERNEL void iieu_fwd_##SUF(const T* x, const float* lin, const float* r_w,              \
                                            const float* r_x, const float* nu, const float* eta, T* y,   \
                                            IieuGeom g) {                                                \
    ak_iieu::fwd_impl<T>(x, lin, r_w, r_x, nu, eta, y, g);                                                \
  }                                                                                                       \
  EMU_REGISTER(iieu_fwd_##SUF)                                                                            \
  AK_KERNEL void iieu_bwd_sums_##SUF(const T* dy, const T* x, const float* lin,              \
                                                 const float* r_w, const float* r_x, const float* nu,    \
                                                 const float* eta, float* part, IieuGeom g) {            \
    ak_iieu::bwd_sums_impl<T>(dy, x, lin, r_w, r_x, nu, eta, part, g);                                    \
  }                                                                                                       \
  EMU_REGISTER(iieu_bwd_sums_##SUF)                                                                       \
  AK_KERNEL void iieu_bwd_params_##SUF(const T* w, const float* part, const float* dz,       \
                                                   const float* m_hat, const float* r_w,                 \
                                                   const float* w_norm, float* d_gamma, float* d_beta,   \
                                                   float* d_eta, T* dw, IieuGeom g) {                    \
    ak_iieu::bwd_params_impl<T>(w, part, dz, m_hat, r_w, w_norm, d_gamma, d_beta, d_eta, dw, g);          \
  }                                                                                                       \
  EMU_REGISTER(iieu_bwd_params_##SUF)                                                                     \
  AK_KERNEL void iieu_bwd_dx_##SUF(const T* dy, const T* x, const float* lin,                \
                                               const float* r_w, const float* r_x, const float* x_norm,  \
                                               const float* nu, const float* eta, const float* dm, T* dx,\
                                               float* coef, IieuGeom g) {                                \
    ak_iieu::bwd_dx_impl<T>(dy, x, lin, r_w, r_x, x_norm, nu, eta, dm, dx, coef, g);                      \
  }                                                                                                       \
  EMU_REGISTER(iieu_bwd_dx_##SUF)                                                                         \
  AK_KERNEL void iieu_bwd_dxpre_##SUF(const T* x_pre, const float* coef, T* dx_pre,          \
                                                  IieuGeom g) {                                          \
    ak_iieu::bwd_dxpre_impl<T>(x_pre, coef, dx_pre, g);                                                   \
  }                                                                                                       \
  EMU_REGISTER(iieu_bwd_dxpre_##SUF)

IIEU_KERNELS(f32, float)
IIEU_KERNELS(f16, __half)
IIEU_KERNELS(bf16, __nv_bfloat16)
