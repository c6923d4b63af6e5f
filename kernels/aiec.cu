// aiec.cu — AIEC (SPEC §3): TAU, global feature (GAP over space / tokens, or a
// class-token row), DMU logits + softmax + cross-entropy + correctness, ACU
// counter update (integer atomics), relative firing rate + consensus masks, gate
// loss, and the backward (feature gradient, two-stage dWd, fused TAU-masked dF).
//
// Storage dtypes of the activation tensors F, A, dF, d_out: f32 / f16 / bf16
// (kernels `<op>_{f32,f16,bf16}`). The small tensors — feature a (N×C), Wd (K×C),
// logits / probabilities (N×K), losses, dWd, v — are always f32 and their kernels
// exist once (`<op>_f32`). All arithmetic and accumulation is f32, except v, which
// is formed from the integer counters in f64 exactly as the CPU reference does.
// No float atomics; the only atomics are the integer counter increments, whose
// result does not depend on order.
#include "common.cuh"

namespace ak_aiec {

// TAU of one value: F if F > tau else 0 (NaN -> 0).
__device__ __forceinline__ float tau1(float v, float tau) { return v > tau ? v : 0.0f; }

// sign with sign(0) = 0 and sign(NaN) = NaN.
__device__ __forceinline__ float sign0(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (x == 0.0f ? 0.0f : x)); }

// ---------------------------------------------------------------------------
// TAU (element-wise). Reads 1 / writes 1 element (forward), reads 2 / writes 1
// (backward): the minimum.

template <class T>
__device__ void tau_fwd_impl(const T* __restrict__ x, T* __restrict__ y, long long n, float tau) {
  constexpr int V = ak::Vec16<T>::N;
  long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  long long stride = (long long)gridDim.x * blockDim.x;
  long long done = 0;
  if (ak::aligned16(x) && ak::aligned16(y)) {
    long long nv = n / V;
    for (long long i = tid; i < nv; i += stride) {
      float v[V];
      ak::Vec16<T>::load(x + i * V, v);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = tau1(v[j], tau);
      ak::Vec16<T>::store(y + i * V, v);
    }
    done = nv * V;
  }
  for (long long i = done + tid; i < n; i += stride) y[i] = ak::from_f32<T>(tau1(ak::to_f32(x[i]), tau));
}

template <class T>
__device__ void tau_bwd_impl(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, long long n,
                             float tau) {
  constexpr int V = ak::Vec16<T>::N;
  long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  long long stride = (long long)gridDim.x * blockDim.x;
  long long done = 0;
  if (ak::aligned16(dy) && ak::aligned16(x) && ak::aligned16(dx)) {
    long long nv = n / V;
    for (long long i = tid; i < nv; i += stride) {
      float g[V], v[V];
      ak::Vec16<T>::load(dy + i * V, g);
      ak::Vec16<T>::load(x + i * V, v);
#pragma unroll
      for (int j = 0; j < V; ++j) g[j] = v[j] > tau ? g[j] : 0.0f;
      ak::Vec16<T>::store(dx + i * V, g);
    }
    done = nv * V;
  }
  for (long long i = done + tid; i < n; i += stride)
    dx[i] = ak::to_f32(x[i]) > tau ? dy[i] : ak::from_f32<T>(0.0f);
}

// ---------------------------------------------------------------------------
// Fused TAU + pooling, NCHW: one block per (n, c) plane (grid-stride over planes).
// a[j] = (1/S)·Σ_s A[j, s] with A = TAU(F) when apply_tau, else A = F; A is
// written to y when y != nullptr. Per element: reads 1, writes 1 (0 without y);
// plus 4 bytes per plane for a. Minimum.

template <class T>
__device__ void feat_nchw_impl(const T* __restrict__ x, T* __restrict__ y, float* __restrict__ feat, long long planes,
                               long long s, float tau, int apply_tau) {
  SHARED_ARRAY(float, scratch, 32);
  constexpr int V = ak::Vec16<T>::N;
  const bool vec = ak::aligned16(x) && (y == nullptr || ak::aligned16(y));
  const float inv_s = 1.0f / (float)s;
  for (long long j = blockIdx.x; j < planes; j += gridDim.x) {
    const long long p0 = j * s, p1 = p0 + s;
    // [p0, v0) scalar head, [v0, v1) whole vectors, [v1, p1) scalar tail.
    long long v0 = p1, v1 = p1;
    if (vec) {
      v0 = ((p0 + V - 1) / V) * V;
      if (v0 > p1) v0 = p1;
      v1 = v0 + ((p1 - v0) / V) * V;
    }
    float acc = 0.0f;
    for (long long i = p0 + threadIdx.x; i < v0; i += blockDim.x) {
      float v = ak::to_f32(x[i]);
      if (apply_tau) v = tau1(v, tau);
      if (y) y[i] = ak::from_f32<T>(v);
      acc += v;
    }
    for (long long i = v0 + (long long)threadIdx.x * V; i < v1; i += (long long)blockDim.x * V) {
      float v[V];
      ak::Vec16<T>::load(x + i, v);
#pragma unroll
      for (int q = 0; q < V; ++q) {
        if (apply_tau) v[q] = tau1(v[q], tau);
        acc += v[q];
      }
      if (y) ak::Vec16<T>::store(y + i, v);
    }
    for (long long i = v1 + threadIdx.x; i < p1; i += blockDim.x) {
      float v = ak::to_f32(x[i]);
      if (apply_tau) v = tau1(v, tau);
      if (y) y[i] = ak::from_f32<T>(v);
      acc += v;
    }
    float tot = ak::block_sum(acc, scratch);
    if (threadIdx.x == 0) feat[j] = tot * inv_s;
  }
}

// Fused TAU + pooling, (N, L, C): blockIdx.x = sample (grid-stride), blockIdx.y
// = chunk of blockDim.x channels; each thread owns one channel and loops over the
// L tokens (coalesced rows). token < 0: mean over tokens; token >= 0: a[n,c] =
// A[n, token, c] (class token) — without y only that row is read. Per element:
// reads 1, writes 1 (with y); minimum.

template <class T>
__device__ void feat_nlc_impl(const T* __restrict__ x, T* __restrict__ y, float* __restrict__ feat, int n, int l, int c,
                              int token, float tau, int apply_tau) {
  const float inv_l = 1.0f / (float)l;
  for (int nn = blockIdx.x; nn < n; nn += gridDim.x) {
    for (int cc = blockIdx.y * blockDim.x + threadIdx.x; cc < c; cc += gridDim.y * blockDim.x) {
      const long long base = (long long)nn * l * c + cc;
      if (token < 0) {
        float acc = 0.0f;
        for (int t = 0; t < l; ++t) {
          const long long i = base + (long long)t * c;
          float v = ak::to_f32(x[i]);
          if (apply_tau) v = tau1(v, tau);
          if (y) y[i] = ak::from_f32<T>(v);
          acc += v;
        }
        feat[(long long)nn * c + cc] = acc * inv_l;
      } else {
        if (y) {
          for (int t = 0; t < l; ++t) {
            const long long i = base + (long long)t * c;
            float v = ak::to_f32(x[i]);
            if (apply_tau) v = tau1(v, tau);
            y[i] = ak::from_f32<T>(v);
          }
        }
        float v = ak::to_f32(x[base + (long long)token * c]);
        if (apply_tau) v = tau1(v, tau);
        feat[(long long)nn * c + cc] = v;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Backward of TAU + pooling, fused and element-wise:
//   dF = [F > τ]·(d_out + ∂a/∂A ᵀ·da)
// (mask 1 when f == nullptr, d_out 0 when dout == nullptr: this is also
// global_feature_backward). NCHW: one block per plane (da[j]/S broadcast), 128-bit
// head/vector/tail. Per element: reads F and d_out once (when given), writes dF
// once; minimum.

template <class T>
__device__ void df_nchw_impl(const T* __restrict__ f, const T* __restrict__ dout, const float* __restrict__ da,
                             T* __restrict__ df, long long planes, long long s, float tau, float inv_s) {
  constexpr int V = ak::Vec16<T>::N;
  const bool vec = ak::aligned16(df) && (f == nullptr || ak::aligned16(f)) && (dout == nullptr || ak::aligned16(dout));
  for (long long j = blockIdx.x; j < planes; j += gridDim.x) {
    const float g = da[j] * inv_s;
    const long long p0 = j * s, p1 = p0 + s;
    long long v0 = p1, v1 = p1;
    if (vec) {
      v0 = ((p0 + V - 1) / V) * V;
      if (v0 > p1) v0 = p1;
      v1 = v0 + ((p1 - v0) / V) * V;
    }
    for (long long i = p0 + threadIdx.x; i < v0; i += blockDim.x) {
      float d = (dout ? ak::to_f32(dout[i]) : 0.0f) + g;
      if (f && !(ak::to_f32(f[i]) > tau)) d = 0.0f;
      df[i] = ak::from_f32<T>(d);
    }
    for (long long i = v0 + (long long)threadIdx.x * V; i < v1; i += (long long)blockDim.x * V) {
      float d[V], fv[V];
      if (dout) {
        ak::Vec16<T>::load(dout + i, d);
      } else {
#pragma unroll
        for (int q = 0; q < V; ++q) d[q] = 0.0f;
      }
      if (f) ak::Vec16<T>::load(f + i, fv);
#pragma unroll
      for (int q = 0; q < V; ++q) {
        d[q] += g;
        if (f && !(fv[q] > tau)) d[q] = 0.0f;
      }
      ak::Vec16<T>::store(df + i, d);
    }
    for (long long i = v1 + threadIdx.x; i < p1; i += blockDim.x) {
      float d = (dout ? ak::to_f32(dout[i]) : 0.0f) + g;
      if (f && !(ak::to_f32(f[i]) > tau)) d = 0.0f;
      df[i] = ak::from_f32<T>(d);
    }
  }
}

// (N, L, C): grid-stride over 16-byte vectors of the flat tensor (scalar when a
// pointer is unaligned), channel/token/sample tracked incrementally per element.
// token < 0: g = da[n,c]/L everywhere; token >= 0: g = da[n,c] at that token, 0
// elsewhere.
__device__ __forceinline__ float df_nlc_elem(const float* da, float fv, float dv, long long row, int cc, int l, int c,
                                             int token, float tau, float inv_l) {
  const long long nn = row / l;
  const int t = (int)(row - nn * l);
  float g;
  if (token < 0)
    g = da[nn * c + cc] * inv_l;
  else
    g = (t == token) ? da[nn * c + cc] : 0.0f;
  float d = dv + g;
  if (!(fv > tau)) d = 0.0f;
  return d;
}

template <class T>
__device__ void df_nlc_impl(const T* __restrict__ f, const T* __restrict__ dout, const float* __restrict__ da,
                            T* __restrict__ df, long long total, int l, int c, int token, float tau, float inv_l) {
  constexpr int V = ak::Vec16<T>::N;
  long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  long long stride = (long long)gridDim.x * blockDim.x;
  long long done = 0;
  const bool vec = ak::aligned16(df) && (f == nullptr || ak::aligned16(f)) && (dout == nullptr || ak::aligned16(dout));
  if (vec) {
    const long long nv = total / V;
    for (long long vi = tid; vi < nv; vi += stride) {
      const long long i0 = vi * V;
      float d[V], fv[V];
      if (dout) {
        ak::Vec16<T>::load(dout + i0, d);
      } else {
#pragma unroll
        for (int q = 0; q < V; ++q) d[q] = 0.0f;
      }
      if (f) {
        ak::Vec16<T>::load(f + i0, fv);
      } else {
#pragma unroll
        for (int q = 0; q < V; ++q) fv[q] = INFINITY;
      }
      long long row = i0 / c;
      int cc = (int)(i0 - row * c);
#pragma unroll
      for (int q = 0; q < V; ++q) {
        d[q] = df_nlc_elem(da, fv[q], d[q], row, cc, l, c, token, tau, inv_l);
        if (++cc == c) {
          cc = 0;
          ++row;
        }
      }
      ak::Vec16<T>::store(df + i0, d);
    }
    done = nv * V;
  }
  for (long long i = done + tid; i < total; i += stride) {
    const long long row = i / c;
    const int cc = (int)(i - row * c);
    const float fv = f ? ak::to_f32(f[i]) : INFINITY;
    const float dv = dout ? ak::to_f32(dout[i]) : 0.0f;
    df[i] = ak::from_f32<T>(df_nlc_elem(da, fv, dv, row, cc, l, c, token, tau, inv_l));
  }
}

// ---------------------------------------------------------------------------
// Block-wide first-argmax of (value, index) pairs; NaN-free inputs (NaN is
// counted separately). `empty` marks "no candidate". Every thread gets the result.

__device__ __forceinline__ bool better(float v2, int i2, float v1, int i1, int empty) {
  if (i2 == empty) return false;
  if (i1 == empty) return true;
  return v2 > v1 || (v2 == v1 && i2 < i1);
}

__device__ __forceinline__ void block_argmax(float& v, int& i, int empty, float* sv, int* si) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    float v2 = __shfl_xor_sync(0xffffffffu, v, o);
    int i2 = __shfl_xor_sync(0xffffffffu, i, o);
    if (better(v2, i2, v, i, empty)) {
      v = v2;
      i = i2;
    }
  }
  __syncthreads();
  if (lane == 0) {
    sv[warp] = v;
    si[warp] = i;
  }
  __syncthreads();
  v = lane < nw ? sv[lane] : 0.0f;
  i = lane < nw ? si[lane] : empty;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    float v2 = __shfl_xor_sync(0xffffffffu, v, o);
    int i2 = __shfl_xor_sync(0xffffffffu, i, o);
    if (better(v2, i2, v, i, empty)) {
      v = v2;
      i = i2;
    }
  }
}

// ---------------------------------------------------------------------------
// DMU forward: one block per sample (grid-stride). Logits: one warp per class
// (lane-strided dot over C, then a warp tree) written to `logits`; after a
// barrier the block reduces them: first argmax (ties -> lowest index, like the
// CPU), a NaN flag, the softmax with the max subtracted and the cross entropy
// L = log Σ e^{z−m} − (z_y − m). correct[n] = no NaN logit and argmax == y.
// Reads a row once per class (C·K, from cache) + Wd once per sample; writes
// 2K + 2 values per sample.

__device__ void dmu_fwd_impl(const float* __restrict__ a, const float* __restrict__ wd,
                             const unsigned* __restrict__ labels, float* __restrict__ logits,
                             float* __restrict__ probs, float* __restrict__ loss, unsigned char* __restrict__ correct,
                             int n, int c, int k) {
  SHARED_ARRAY(float, scratch, 32);
  SHARED_ARRAY(float, sv, 32);
  SHARED_ARRAY(int, si, 32);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int nn = blockIdx.x; nn < n; nn += gridDim.x) {
    const float* arow = a + (long long)nn * c;
    float* z = logits + (long long)nn * k;
    for (int kk = warp; kk < k; kk += nw) {
      const float* w = wd + (long long)kk * c;
      float acc = 0.0f;
      for (int cc = lane; cc < c; cc += 32) acc += arow[cc] * w[cc];
      acc = ak::warp_sum(acc);
      if (lane == 0) z[kk] = acc;
    }
    __syncthreads();  // logits of this sample visible to the whole block
    float best = 0.0f;
    int bi = k;  // k = empty
    float nan = 0.0f;
    for (int kk = threadIdx.x; kk < k; kk += blockDim.x) {
      float v = z[kk];
      if (v != v)
        nan = 1.0f;
      else if (bi == k || v > best) {
        best = v;
        bi = kk;
      }
    }
    block_argmax(best, bi, k, sv, si);
    const bool any_nan = ak::block_sum(nan, scratch) > 0.0f;
    const float m = any_nan ? NAN : best;
    float se = 0.0f;
    for (int kk = threadIdx.x; kk < k; kk += blockDim.x) se += expf(z[kk] - m);
    const float sum = ak::block_sum(se, scratch);
    float* p = probs + (long long)nn * k;
    for (int kk = threadIdx.x; kk < k; kk += blockDim.x) p[kk] = expf(z[kk] - m) / sum;
    if (threadIdx.x == 0) {
      // A label >= K (possible only for labels given on the device, which the host
      // cannot check) is flagged, never followed: NaN loss, never correct.
      const unsigned yu = labels[nn];
      if (yu < (unsigned)k) {
        const int y = (int)yu;
        loss[nn] = logf(sum) - (z[y] - m);
        correct[nn] = (!any_nan && bi == y) ? 1 : 0;
      } else {
        loss[nn] = NAN;
        correct[nn] = 0;
      }
    }
    __syncthreads();  // z reads done before the next sample's block iteration
  }
}

// ACU counter update: thread per (n, c), only for correctly predicted samples with a
// label < K:
// θ[y,c] += [a > 0], η[y,c] += [a == 0], φ[y] += 1 (by the c = 0 thread).
// Integer atomics: the result is independent of order. Wraps at 2^64 (the CPU
// saturates; unreachable in practice).
__device__ void count_impl(const float* __restrict__ a, const unsigned* __restrict__ labels,
                           const unsigned char* __restrict__ correct, unsigned long long* theta,
                           unsigned long long* eta, unsigned long long* phi, int n, int c, int k) {
  const long long total = (long long)n * c;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const int nn = (int)(i / c), cc = (int)(i - (long long)nn * c);
    if (!correct[nn]) continue;
    const unsigned yu = labels[nn];
    if (yu >= (unsigned)k) continue;  // out-of-range device label: not counted
    const long long y = yu;
    const float v = a[i];
    if (v > 0.0f)
      atomicAdd(&theta[y * c + cc], 1ull);
    else if (v == 0.0f)
      atomicAdd(&eta[y * c + cc], 1ull);
    if (cc == 0) atomicAdd(&phi[y], 1ull);
  }
}

// v[k,c] = (θ − η)/φ (0 where φ = 0), in f64 then rounded (bitwise the CPU's f32
// value); masks G = [v ≤ 0] ∧ [Wd ≤ 0] (NaN Wd -> 0). Thread per (k, c). v and /
// or masks may be null (wd must be given with masks).
__device__ void rate_masks_impl(const unsigned long long* __restrict__ theta, const unsigned long long* __restrict__ eta,
                                const unsigned long long* __restrict__ phi, const float* __restrict__ wd,
                                float* __restrict__ v, unsigned char* __restrict__ masks, int k, int c) {
  const long long total = (long long)k * c;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long kk = i / c;
    const unsigned long long ph = phi[kk];
    float vv = 0.0f;
    if (ph != 0) vv = (float)(((double)theta[i] - (double)eta[i]) / (double)ph);
    if (v) v[i] = vv;
    if (masks) masks[i] = (vv <= 0.0f && wd[i] <= 0.0f) ? 1 : 0;
  }
}

// G = [v ≤ 0] ∧ [Wd ≤ 0] element-wise (NaN -> 0).
__device__ void gate_masks_impl(const float* __restrict__ v, const float* __restrict__ wd,
                                unsigned char* __restrict__ masks, long long total) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x)
    masks[i] = (v[i] <= 0.0f && wd[i] <= 0.0f) ? 1 : 0;
}

// L_gate[n] = Σ_c |a[n,c]|·G[y,c] / Σ_c G[y,c] (0 when the count is 0; NaN for a
// label >= K): one
// block per sample (grid-stride), two block sums. Reads the mask row G[y] and
// a[n,c] only where G[y,c] is set.
__device__ void gate_loss_impl(const float* __restrict__ a, const unsigned char* __restrict__ masks,
                               const unsigned* __restrict__ labels, float* __restrict__ loss, int n, int c, int k) {
  SHARED_ARRAY(float, scratch, 32);
  for (int nn = blockIdx.x; nn < n; nn += gridDim.x) {
    const unsigned yu = labels[nn];
    if (yu >= (unsigned)k) {  // out-of-range device label: flagged (uniform per block)
      if (threadIdx.x == 0) loss[nn] = NAN;
      continue;
    }
    const long long y = yu;
    const unsigned char* g = masks + y * c;
    const float* arow = a + (long long)nn * c;
    float cnt = 0.0f, s = 0.0f;
    for (int cc = threadIdx.x; cc < c; cc += blockDim.x) {
      if (g[cc]) {
        cnt += 1.0f;
        s += fabsf(arow[cc]);
      }
    }
    cnt = ak::block_sum(cnt, scratch);
    s = ak::block_sum(s, scratch);
    if (threadIdx.x == 0) loss[nn] = cnt > 0.0f ? s / cnt : 0.0f;
  }
}

// out = [mean(aux), mean(gate), λ_aux·mean(aux) + λ_gate·mean(gate)] and, when
// `correct` is given, out[3] = mean(correct) (the DMU's accuracy): one block.
__device__ void loss_means_impl(const float* __restrict__ aux, const float* __restrict__ gate,
                                const unsigned char* __restrict__ correct, float* __restrict__ out, int n,
                                float lambda_aux, float lambda_gate) {
  SHARED_ARRAY(float, scratch, 32);
  float sa = 0.0f, sg = 0.0f, sc = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    sa += aux[i];
    sg += gate[i];
    if (correct) sc += correct[i] ? 1.0f : 0.0f;
  }
  sa = ak::block_sum(sa, scratch) / (float)n;
  sg = ak::block_sum(sg, scratch) / (float)n;
  if (correct) sc = ak::block_sum(sc, scratch) / (float)n;
  if (threadIdx.x == 0) {
    out[0] = sa;
    out[1] = sg;
    out[2] = lambda_aux * sa + lambda_gate * sg;
    if (correct) out[3] = sc;
  }
}

// Per-sample loss weights from a device scalar (the upstream gradient of the loss):
// w[i] = s[0]·c_aux and w[n + i] = s[0]·c_gate for i < n (w holds 2n values).
__device__ void loss_weights_impl(const float* __restrict__ s, float* __restrict__ w, int n, float c_aux,
                                  float c_gate) {
  const float v = s[0];
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    w[i] = v * c_aux;
    w[(long long)n + i] = v * c_gate;
  }
}

// Feature gradient, one block per sample (grid-stride), thread per channel:
//   da[n,c] = Σ_k g[n,k]·Wd[k,c]                      (probs given; terms with
//             g = 0 skipped like the CPU),  g[n,k] = sa·(p[n,k] − [k = y_n]),
//   + sg·G[y,c]·sign(a[n,c]) / Σ_c G[y,c]               (masks given, count > 0),
// sa = aux_scale·(dl_aux ? dl_aux[n] : 1), sg = gate_scale·(dl_gate ? dl_gate[n] : 1).
// A sample with a label >= K gets a zero row.
// Reads Wd per sample (cache), writes da once.
__device__ void da_impl(const float* __restrict__ a, const float* __restrict__ wd, const float* __restrict__ probs,
                        const unsigned* __restrict__ labels, const unsigned char* __restrict__ masks,
                        const float* __restrict__ dl_aux, const float* __restrict__ dl_gate, float aux_scale,
                        float gate_scale, float* __restrict__ da, int n, int c, int k) {
  SHARED_ARRAY(float, scratch, 32);
  for (int nn = blockIdx.x; nn < n; nn += gridDim.x) {
    if (labels[nn] >= (unsigned)k) {  // out-of-range device label: no gradient
      for (int cc = threadIdx.x; cc < c; cc += blockDim.x) da[(long long)nn * c + cc] = 0.0f;
      continue;
    }
    const int y = (int)labels[nn];
    const unsigned char* g = masks ? masks + (long long)y * c : nullptr;
    float cnt = 0.0f;
    if (g) {
      for (int cc = threadIdx.x; cc < c; cc += blockDim.x) cnt += g[cc] ? 1.0f : 0.0f;
      cnt = ak::block_sum(cnt, scratch);
    }
    const float sa = aux_scale * (dl_aux ? dl_aux[nn] : 1.0f);
    const float gs = cnt > 0.0f ? gate_scale * (dl_gate ? dl_gate[nn] : 1.0f) / cnt : 0.0f;
    const float* p = probs ? probs + (long long)nn * k : nullptr;
    for (int cc = threadIdx.x; cc < c; cc += blockDim.x) {
      float acc = 0.0f;
      if (p) {
        for (int kk = 0; kk < k; ++kk) {
          const float gk = sa * (p[kk] - (kk == y ? 1.0f : 0.0f));
          if (gk != 0.0f) acc += gk * wd[(long long)kk * c + cc];
        }
      }
      const long long i = (long long)nn * c + cc;
      if (g && cnt > 0.0f && g[cc]) acc += gs * sign0(a[i]);
      da[i] = acc;
    }
  }
}

// dWd stage 1: block (blockIdx.x = chunk of `spb` samples, blockIdx.y·blockDim.x +
// threadIdx.x = (k, c) pair, grid-stride) writes
//   partial[chunk, k, c] = Σ_{n in chunk} g[n,k]·a[n,c]   (samples in order).
__device__ void dwd_partial_impl(const float* __restrict__ a, const float* __restrict__ probs,
                                 const unsigned* __restrict__ labels, const float* __restrict__ dl_aux,
                                 float aux_scale, float* __restrict__ partial, int n, int c, int k, int spb) {
  const long long kc = (long long)k * c;
  const int n0 = blockIdx.x * spb;
  const int n1 = min(n, n0 + spb);
  for (long long i = (long long)blockIdx.y * blockDim.x + threadIdx.x; i < kc;
       i += (long long)gridDim.y * blockDim.x) {
    const int kk = (int)(i / c), cc = (int)(i - (long long)kk * c);
    float acc = 0.0f;
    for (int nn = n0; nn < n1; ++nn) {
      if (labels[nn] >= (unsigned)k) continue;  // out-of-range device label: skipped
      const float sa = aux_scale * (dl_aux ? dl_aux[nn] : 1.0f);
      const float gk = sa * (probs[(long long)nn * k + kk] - ((int)labels[nn] == kk ? 1.0f : 0.0f));
      acc += gk * a[(long long)nn * c + cc];
    }
    partial[(long long)blockIdx.x * kc + i] = acc;
  }
}

// dWd stage 2: dwd[i] = Σ_b partial[b, i], b = 0..chunks-1 in order.
__device__ void dwd_reduce_impl(const float* __restrict__ partial, float* __restrict__ dwd, int chunks, long long kc) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < kc;
       i += (long long)gridDim.x * blockDim.x) {
    float acc = 0.0f;
    for (int b = 0; b < chunks; ++b) acc += partial[(long long)b * kc + i];
    dwd[i] = acc;
  }
}

}  // namespace ak_aiec

// ---------------------------------------------------------------------------
// extern "C" entry points.

#define AIEC_STORAGE_KERNELS(T, DT)                                                                                  \
  AK_KERNEL void aiec_tau_fwd_##DT(const T* x, T* y, long long n, float tau) {                           \
    ak_aiec::tau_fwd_impl<T>(x, y, n, tau);                                                                          \
  }                                                                                                                  \
  EMU_REGISTER(aiec_tau_fwd_##DT)                                                                                    \
  AK_KERNEL void aiec_tau_bwd_##DT(const T* dy, const T* x, T* dx, long long n, float tau) {             \
    ak_aiec::tau_bwd_impl<T>(dy, x, dx, n, tau);                                                                     \
  }                                                                                                                  \
  EMU_REGISTER(aiec_tau_bwd_##DT)                                                                                    \
  AK_KERNEL void aiec_feat_nchw_##DT(const T* x, T* y, float* feat, long long planes, long long s,       \
                                                 float tau, int apply_tau) {                                         \
    ak_aiec::feat_nchw_impl<T>(x, y, feat, planes, s, tau, apply_tau);                                               \
  }                                                                                                                  \
  EMU_REGISTER(aiec_feat_nchw_##DT)                                                                                  \
  AK_KERNEL void aiec_feat_nlc_##DT(const T* x, T* y, float* feat, int n, int l, int c, int token,       \
                                                float tau, int apply_tau) {                                          \
    ak_aiec::feat_nlc_impl<T>(x, y, feat, n, l, c, token, tau, apply_tau);                                           \
  }                                                                                                                  \
  EMU_REGISTER(aiec_feat_nlc_##DT)                                                                                   \
  AK_KERNEL void aiec_df_nchw_##DT(const T* f, const T* dout, const float* da, T* df, long long planes,  \
                                               long long s, float tau, float inv_s) {                                \
    ak_aiec::df_nchw_impl<T>(f, dout, da, df, planes, s, tau, inv_s);                                                \
  }                                                                                                                  \
  EMU_REGISTER(aiec_df_nchw_##DT)                                                                                    \
  AK_KERNEL void aiec_df_nlc_##DT(const T* f, const T* dout, const float* da, T* df, long long total,    \
                                              int l, int c, int token, float tau, float inv_l) {                     \
    ak_aiec::df_nlc_impl<T>(f, dout, da, df, total, l, c, token, tau, inv_l);                                        \
  }                                                                                                                  \
  EMU_REGISTER(aiec_df_nlc_##DT)

AIEC_STORAGE_KERNELS(float, f32)
AIEC_STORAGE_KERNELS(__half, f16)
AIEC_STORAGE_KERNELS(__nv_bfloat16, bf16)

AK_KERNEL void aiec_dmu_fwd_f32(const float* a, const float* wd, const unsigned* labels, float* logits,
                                            float* probs, float* loss, unsigned char* correct, int n, int c, int k) {
  ak_aiec::dmu_fwd_impl(a, wd, labels, logits, probs, loss, correct, n, c, k);
}
EMU_REGISTER(aiec_dmu_fwd_f32)

AK_KERNEL void aiec_count_f32(const float* a, const unsigned* labels, const unsigned char* correct,
                                          unsigned long long* theta, unsigned long long* eta, unsigned long long* phi,
                                          int n, int c, int k) {
  ak_aiec::count_impl(a, labels, correct, theta, eta, phi, n, c, k);
}
EMU_REGISTER(aiec_count_f32)

AK_KERNEL void aiec_rate_masks_f32(const unsigned long long* theta, const unsigned long long* eta,
                                               const unsigned long long* phi, const float* wd, float* v,
                                               unsigned char* masks, int k, int c) {
  ak_aiec::rate_masks_impl(theta, eta, phi, wd, v, masks, k, c);
}
EMU_REGISTER(aiec_rate_masks_f32)

AK_KERNEL void aiec_gate_masks_f32(const float* v, const float* wd, unsigned char* masks,
                                               long long total) {
  ak_aiec::gate_masks_impl(v, wd, masks, total);
}
EMU_REGISTER(aiec_gate_masks_f32)

AK_KERNEL void aiec_gate_loss_f32(const float* a, const unsigned char* masks, const unsigned* labels,
                                              float* loss, int n, int c, int k) {
  ak_aiec::gate_loss_impl(a, masks, labels, loss, n, c, k);
}
EMU_REGISTER(aiec_gate_loss_f32)

AK_KERNEL void aiec_loss_means_f32(const float* aux, const float* gate, const unsigned char* correct,
                                               float* out, int n, float lambda_aux, float lambda_gate) {
  ak_aiec::loss_means_impl(aux, gate, correct, out, n, lambda_aux, lambda_gate);
}
EMU_REGISTER(aiec_loss_means_f32)

AK_KERNEL void aiec_loss_weights_f32(const float* s, float* w, int n, float c_aux, float c_gate) {
  ak_aiec::loss_weights_impl(s, w, n, c_aux, c_gate);
}
EMU_REGISTER(aiec_loss_weights_f32)

AK_KERNEL void aiec_da_f32(const float* a, const float* wd, const float* probs, const unsigned* labels,
                                       const unsigned char* masks, const float* dl_aux, const float* dl_gate,
                                       float aux_scale, float gate_scale, float* da, int n, int c, int k) {
  ak_aiec::da_impl(a, wd, probs, labels, masks, dl_aux, dl_gate, aux_scale, gate_scale, da, n, c, k);
}
EMU_REGISTER(aiec_da_f32)

AK_KERNEL void aiec_dwd_partial_f32(const float* a, const float* probs, const unsigned* labels,
                                                const float* dl_aux, float aux_scale, float* partial, int n, int c,
                                                int k, int spb) {
  ak_aiec::dwd_partial_impl(a, probs, labels, dl_aux, aux_scale, partial, n, c, k, spb);
}
EMU_REGISTER(aiec_dwd_partial_f32)

AK_KERNEL void aiec_dwd_reduce_f32(const float* partial, float* dwd, int chunks, long long kc) {
  ak_aiec::dwd_reduce_impl(partial, dwd, chunks, kc);
}
EMU_REGISTER(aiec_dwd_reduce_f32)
