// aiec.cu — AIEC (SPEC §3): TAU, global feature (GAP over space / tokens, or a
// class-token row), DMU logits + softmax + cross-entropy + correctness, ACU
// counter update (integer atomics), relative firing rate + consensus masks, gate
// loss, and the backward (feature gradient, dWd, fused TAU-masked dF). The three
// matrix products (logits z = a·Wdᵀ, da = g·Wd, dWd = gᵀ·a) are tiled GEMMs with
// shared-memory tiles and in-order f32 sums; dWd is split over sample chunks (two
// fixed-order stages, partials ≤ 4 MB) only when its output tiles do not fill the GPU.
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
  // 128-bit loads and stores when x and y are 16-byte aligned; the walk (groups of V
  // elements at indices multiple of V) is the same either way, so the plane sums and
  // their bits depend on the shape only, not on where the tensors start.
  const bool vec = ak::aligned16(x) && (y == nullptr || ak::aligned16(y));
  const float inv_s = 1.0f / (float)s;
  for (long long j = blockIdx.x; j < planes; j += gridDim.x) {
    const long long p0 = j * s, p1 = p0 + s;
    // [p0, v0) scalar head, [v0, v1) groups of V, [v1, p1) scalar tail.
    long long v0 = ((p0 + V - 1) / V) * V;
    if (v0 > p1) v0 = p1;
    const long long v1 = v0 + ((p1 - v0) / V) * V;
    float acc = 0.0f;
    for (long long i = p0 + threadIdx.x; i < v0; i += blockDim.x) {
      float v = ak::to_f32(x[i]);
      if (apply_tau) v = tau1(v, tau);
      if (y) y[i] = ak::from_f32<T>(v);
      acc += v;
    }
    for (long long i = v0 + (long long)threadIdx.x * V; i < v1; i += (long long)blockDim.x * V) {
      float v[V];
      ak::load_group(x + i, v, vec);
#pragma unroll
      for (int q = 0; q < V; ++q) {
        if (apply_tau) v[q] = tau1(v[q], tau);
        acc += v[q];
      }
      if (y) {
        if (vec) {
          ak::Vec16<T>::store(y + i, v);
        } else {
#pragma unroll
          for (int q = 0; q < V; ++q) y[i + q] = ak::from_f32<T>(v[q]);
        }
      }
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

// Fused TAU + pooling, (N, L, C): block (FEAT_GX, FEAT_GY) = (8 channel groups, 32
// token lanes) covers 8·V channels (V = 16-byte vector of T) of one sample;
// blockIdx.x = channel chunk, blockIdx.y = sample (both grid-stride). Thread (gx, ty)
// owns channels [c0 + gx·V, +V) and walks tokens t = ty, ty + 32, … (in order),
// reading / writing 16-byte vectors when every row start is aligned (C % V == 0 and
// aligned pointers), else V scalars. The 32 lane partials of a channel are then summed
// in lane order from shared memory (fixed order: deterministic). token < 0: mean over
// tokens; token >= 0: a[n,c] = A[n, token, c] (class token) — without y only that
// row is read. Per element: reads 1, writes 1 (with y); plus 4 bytes per (n, c):
// minimum. 32-bit index math except the 64-bit element offset (no division).
constexpr int FEAT_GX = 8, FEAT_GY = 32;

template <class T>
__device__ void feat_nlc_impl(const T* __restrict__ x, T* __restrict__ y, float* __restrict__ feat, int n, int l, int c,
                              int token, float tau, int apply_tau) {
  constexpr int V = ak::Vec16<T>::N;
  constexpr int CW = FEAT_GX * V;  // channels per block
  SHARED_ARRAY(float, red, FEAT_GY * CW);
  AK_EXPECT(blockDim.x == FEAT_GX && blockDim.y == FEAT_GY && blockDim.z == 1);
  const bool vec = (c % V == 0) && ak::aligned16(x) && (y == nullptr || ak::aligned16(y));
  const float inv_l = 1.0f / (float)l;
  const int gx = threadIdx.x, ty = threadIdx.y, tid = ty * FEAT_GX + gx;
  const int chunks = (c + CW - 1) / CW;
  for (int nn = blockIdx.y; nn < n; nn += gridDim.y) {
    for (int ch = blockIdx.x; ch < chunks; ch += gridDim.x) {
      const int c0 = ch * CW + gx * V;  // first channel of this thread
      float acc[V];
#pragma unroll
      for (int q = 0; q < V; ++q) acc[q] = 0.0f;
      if (c0 < c) {
        for (int t = ty; t < l; t += FEAT_GY) {
          if (token >= 0 && y == nullptr && t != token) continue;
          const long long base = ((long long)nn * l + t) * c + c0;
          float v[V];
          if (vec) {
            ak::Vec16<T>::load(x + base, v);
          } else {
#pragma unroll
            for (int q = 0; q < V; ++q) v[q] = c0 + q < c ? ak::to_f32(x[base + q]) : 0.0f;
          }
#pragma unroll
          for (int q = 0; q < V; ++q)
            if (apply_tau) v[q] = tau1(v[q], tau);
          if (y) {
            if (vec) {
              ak::Vec16<T>::store(y + base, v);
            } else {
#pragma unroll
              for (int q = 0; q < V; ++q)
                if (c0 + q < c) y[base + q] = ak::from_f32<T>(v[q]);
            }
          }
          if (token < 0) {
#pragma unroll
            for (int q = 0; q < V; ++q) acc[q] += v[q];
          } else if (t == token) {
#pragma unroll
            for (int q = 0; q < V; ++q) acc[q] = v[q];
          }
        }
      }
#pragma unroll
      for (int q = 0; q < V; ++q) red[ty * CW + gx * V + q] = acc[q];
      __syncthreads();
      if (tid < CW) {
        const int cc = ch * CW + tid;
        if (cc < c) {
          float r;
          if (token < 0) {
            r = 0.0f;
            for (int lane = 0; lane < FEAT_GY; ++lane) r += red[lane * CW + tid];
            r *= inv_l;
          } else {
            r = red[(token % FEAT_GY) * CW + tid];
          }
          feat[(long long)nn * c + cc] = r;
        }
      }
      __syncthreads();  // red is reused by the next chunk
    }
  }
}

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

// (N, L, C): block (FEAT_GX, FEAT_GY) = (8 channel groups, 32 token lanes); blockIdx.x
// = channel chunk of 8·V channels, blockIdx.y = sample, blockIdx.z = chunk of
// DF_TOKENS tokens (all grid-stride). Thread (gx, ty) owns V channels, loads their
// da[n, c] once into registers and walks tokens ty, ty + 32, … of its chunk (at most
// DF_TOKENS / 32 = 8): da is read once per thread, not once per element. 16-byte
// vectors when C % V == 0 and the pointers are aligned, else V scalars. token < 0:
// g = da[n,c]/L everywhere; token >= 0: g = da[n,c] at that token, 0 elsewhere. No
// division in the loop; the element offset is 64-bit (multiply only).
constexpr int DF_TOKENS = 256;

template <class T>
__device__ void df_nlc_impl(const T* __restrict__ f, const T* __restrict__ dout, const float* __restrict__ da,
                            T* __restrict__ df, int n, int l, int c, int token, float tau, float inv_l) {
  constexpr int V = ak::Vec16<T>::N;
  constexpr int CW = FEAT_GX * V;
  AK_EXPECT(blockDim.x == FEAT_GX && blockDim.y == FEAT_GY && blockDim.z == 1);
  const bool vec =
      (c % V == 0) && ak::aligned16(df) && (f == nullptr || ak::aligned16(f)) && (dout == nullptr || ak::aligned16(dout));
  const int gx = threadIdx.x, ty = threadIdx.y;
  const int chunks = (c + CW - 1) / CW, tchunks = (l + DF_TOKENS - 1) / DF_TOKENS;
  for (int tc = blockIdx.z; tc < tchunks; tc += gridDim.z) {
    const int t1 = min(l, (tc + 1) * DF_TOKENS);
    for (int nn = blockIdx.y; nn < n; nn += gridDim.y) {
      for (int ch = blockIdx.x; ch < chunks; ch += gridDim.x) {
        const int c0 = ch * CW + gx * V;
        if (c0 >= c) continue;
        float g[V];
#pragma unroll
        for (int q = 0; q < V; ++q) g[q] = c0 + q < c ? da[(long long)nn * c + c0 + q] : 0.0f;
        if (token < 0) {
#pragma unroll
          for (int q = 0; q < V; ++q) g[q] *= inv_l;
        }
        for (int t = tc * DF_TOKENS + ty; t < t1; t += FEAT_GY) {
          const long long base = ((long long)nn * l + t) * c + c0;
          const bool on = token < 0 || t == token;
          float d[V], fv[V];
          if (vec) {
            if (dout) {
              ak::Vec16<T>::load(dout + base, d);
            } else {
#pragma unroll
              for (int q = 0; q < V; ++q) d[q] = 0.0f;
            }
            if (f) ak::Vec16<T>::load(f + base, fv);
          } else {
#pragma unroll
            for (int q = 0; q < V; ++q) {
              const bool in = c0 + q < c;
              d[q] = (dout && in) ? ak::to_f32(dout[base + q]) : 0.0f;
              fv[q] = (f && in) ? ak::to_f32(f[base + q]) : 0.0f;
            }
          }
#pragma unroll
          for (int q = 0; q < V; ++q) {
            d[q] += on ? g[q] : 0.0f;
            if (f && !(fv[q] > tau)) d[q] = 0.0f;
          }
          if (vec) {
            ak::Vec16<T>::store(df + base, d);
          } else {
#pragma unroll
            for (int q = 0; q < V; ++q)
              if (c0 + q < c) df[base + q] = ak::from_f32<T>(d[q]);
          }
        }
      }
    }
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
// DMU logits z = a·Wdᵀ as a tiled GEMM (z[n,k] = Σ_c a[n,c]·Wd[k,c]): block
// (LG_TX, LG_TY) = (16 classes, 8 sample rows) = 128 threads computes a tile of
// LG_TK = 16 classes × 8·J samples (J = `rows` ≤ LG_MAXJ samples per thread, chosen by
// the launcher so that the grid fills the device); blockIdx.x = class tile,
// blockIdx.y = sample tile (both grid-stride). C is walked in chunks of LG_TC through
// shared-memory tiles of a (8·J × LG_TC) and Wd (LG_TK × LG_TC), so a Wd tile is read
// once per sample tile (not once per sample) and an `a` tile once per class tile.
// Each logit is one f32 sum over c = 0..C−1 in order (deterministic).
constexpr int LG_TX = 16, LG_TY = 8, LG_TK = LG_TX, LG_TC = 32, LG_MAXJ = 4;

__device__ void logits_impl(const float* __restrict__ a, const float* __restrict__ wd, float* __restrict__ logits,
                            int n, int c, int k, int rows) {
  SHARED_ARRAY(float, as, LG_TY * LG_MAXJ * (LG_TC + 1));
  SHARED_ARRAY(float, ws, LG_TK * (LG_TC + 1));
  AK_EXPECT(blockDim.x == LG_TX && blockDim.y == LG_TY && blockDim.z == 1 && rows >= 1 && rows <= LG_MAXJ);
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * LG_TX + tx;
  constexpr int NT = LG_TX * LG_TY;
  const int tn = LG_TY * rows;
  const int ktiles = (k + LG_TK - 1) / LG_TK, ntiles = (n + tn - 1) / tn;
  for (int nt = blockIdx.y; nt < ntiles; nt += gridDim.y) {
    const int n0 = nt * tn;
    for (int kt = blockIdx.x; kt < ktiles; kt += gridDim.x) {
      const int k0 = kt * LG_TK;
      float acc[LG_MAXJ];
#pragma unroll
      for (int j = 0; j < LG_MAXJ; ++j) acc[j] = 0.0f;
      for (int cb = 0; cb < c; cb += LG_TC) {
        const int cw = min(LG_TC, c - cb);
        // Stage the a rows n0..n0+tn and Wd rows k0..k0+16 of columns [cb, cb + cw).
        for (int e = tid; e < tn * LG_TC; e += NT) {
          const int r = e / LG_TC, q = e - r * LG_TC;
          as[r * (LG_TC + 1) + q] = (n0 + r < n && q < cw) ? a[(long long)(n0 + r) * c + cb + q] : 0.0f;
        }
        for (int e = tid; e < LG_TK * LG_TC; e += NT) {
          const int r = e / LG_TC, q = e - r * LG_TC;
          ws[r * (LG_TC + 1) + q] = (k0 + r < k && q < cw) ? wd[(long long)(k0 + r) * c + cb + q] : 0.0f;
        }
        __syncthreads();
        for (int q = 0; q < cw; ++q) {
          const float w = ws[tx * (LG_TC + 1) + q];
#pragma unroll
          for (int j = 0; j < LG_MAXJ; ++j)
            if (j < rows) acc[j] += as[(ty + LG_TY * j) * (LG_TC + 1) + q] * w;
        }
        __syncthreads();  // tiles consumed before the next chunk overwrites them
      }
      const int kk = k0 + tx;
#pragma unroll
      for (int j = 0; j < LG_MAXJ; ++j) {
        const int nn = n0 + ty + LG_TY * j;
        if (j < rows && nn < n && kk < k) logits[(long long)nn * k + kk] = acc[j];
      }
    }
  }
}

// DMU softmax / loss / correctness from the logits of `logits_impl`: one block per
// sample (grid-stride). First argmax (ties -> lowest index, like the CPU), a NaN
// flag, the softmax with the max subtracted and the cross entropy
// L = log Σ e^{z−m} − (z_y − m). correct[n] = no NaN logit and argmax == y.
// Reads the logit row three times (L1) and writes K + 2 values per sample.
__device__ void dmu_fwd_impl(const float* __restrict__ logits, const unsigned* __restrict__ labels,
                             float* __restrict__ probs, float* __restrict__ loss, unsigned char* __restrict__ correct,
                             int n, int k) {
  SHARED_ARRAY(float, scratch, 32);
  SHARED_ARRAY(float, sv, 32);
  SHARED_ARRAY(int, si, 32);
  for (int nn = blockIdx.x; nn < n; nn += gridDim.x) {
    const float* z = logits + (long long)nn * k;
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
    __syncthreads();  // scratch reads done before the next sample's block iteration
  }
}

// ACU counter update: thread per (n, c) — blockIdx.y = sample, blockIdx.x·blockDim.x
// + threadIdx.x = channel (both grid-stride, no division) — only for correctly
// predicted samples with a label < K:
// θ[y,c] += [a > 0], η[y,c] += [a == 0], φ[y] += 1 (by the c = 0 thread).
// Integer atomics: the result is independent of order. Wraps at 2^64 (the CPU
// saturates; unreachable in practice).
__device__ void count_impl(const float* __restrict__ a, const unsigned* __restrict__ labels,
                           const unsigned char* __restrict__ correct, unsigned long long* theta,
                           unsigned long long* eta, unsigned long long* phi, int n, int c, int k) {
  for (int nn = blockIdx.y; nn < n; nn += gridDim.y) {
    if (!correct[nn]) continue;
    const unsigned yu = labels[nn];
    if (yu >= (unsigned)k) continue;  // out-of-range device label: not counted
    const long long y = yu;
    for (int cc = blockIdx.x * blockDim.x + threadIdx.x; cc < c; cc += gridDim.x * blockDim.x) {
      const float v = a[(long long)nn * c + cc];
      if (v > 0.0f)
        atomicAdd(&theta[y * c + cc], 1ull);
      else if (v == 0.0f)
        atomicAdd(&eta[y * c + cc], 1ull);
      if (cc == 0) atomicAdd(&phi[y], 1ull);
    }
  }
}

// v[k,c] = (θ − η)/φ (0 where φ = 0), in f64 then rounded (bitwise the CPU's f32
// value); masks G = [v ≤ 0] ∧ [Wd ≤ 0] (NaN Wd -> 0). Thread per (k, c):
// blockIdx.y = class, blockIdx.x·blockDim.x + threadIdx.x = channel (grid-stride, no
// index division). v and / or masks may be null (wd must be given with masks).
__device__ void rate_masks_impl(const unsigned long long* __restrict__ theta, const unsigned long long* __restrict__ eta,
                                const unsigned long long* __restrict__ phi, const float* __restrict__ wd,
                                float* __restrict__ v, unsigned char* __restrict__ masks, int k, int c) {
  for (int kk = blockIdx.y; kk < k; kk += gridDim.y) {
    const unsigned long long ph = phi[kk];
    for (int cc = blockIdx.x * blockDim.x + threadIdx.x; cc < c; cc += gridDim.x * blockDim.x) {
      const long long i = (long long)kk * c + cc;
      float vv = 0.0f;
      if (ph != 0) {
        const double num = (double)theta[i] - (double)eta[i], den = (double)ph;
        vv = (float)(num / den);
      }
      if (v) v[i] = vv;
      if (masks) masks[i] = (vv <= 0.0f && wd[i] <= 0.0f) ? 1 : 0;
    }
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

// Per-sample gate-mask count cnt[n] = Σ_c G[y_n, c] (0 for a label >= K): one block
// per sample (grid-stride), a block sum (exact: integer counts < 2^24). Used by
// `da_impl` for the gate term's 1/count. Reads the mask row of the label's class.
__device__ void mask_count_impl(const unsigned char* __restrict__ masks, const unsigned* __restrict__ labels,
                                float* __restrict__ cnt, int n, int c, int k) {
  SHARED_ARRAY(float, scratch, 32);
  for (int nn = blockIdx.x; nn < n; nn += gridDim.x) {
    const unsigned yu = labels[nn];
    if (yu >= (unsigned)k) {  // out-of-range device label (uniform per block)
      if (threadIdx.x == 0) cnt[nn] = 0.0f;
      continue;
    }
    const unsigned char* g = masks + (long long)yu * c;
    float s = 0.0f;
    for (int cc = threadIdx.x; cc < c; cc += blockDim.x) s += g[cc] ? 1.0f : 0.0f;
    s = ak::block_sum(s, scratch);
    if (threadIdx.x == 0) cnt[nn] = s;
  }
}

// Feature gradient as a tiled GEMM: block (DA_TX, DA_TY) = (32 channels, 4 sample
// rows) = 128 threads computes a tile of 32 channels × 4·J samples (J = `rows` ≤
// DA_MAXJ = 4 per thread — 8 took 76–103 registers, below 50 % occupancy — chosen by
// the launcher to fill the device); blockIdx.x = channel
// tile, blockIdx.y = sample tile (grid-stride):
//   da[n,c] = Σ_k g[n,k]·Wd[k,c]                      (probs given; terms with
//             g = 0 skipped like the CPU),  g[n,k] = sa·(p[n,k] − [k = y_n]),
//   + sg·G[y,c]·sign(a[n,c]) / cnt[n]                  (masks given, cnt[n] > 0),
// sa = aux_scale·(dl_aux ? dl_aux[n] : 1), sg = gate_scale·(dl_gate ? dl_gate[n] : 1),
// cnt from `mask_count_impl`. K is walked in chunks of DA_TK through shared-memory
// tiles of g (samples × DA_TK, formed from probs on load) and Wd (DA_TK × 32
// channels), so Wd is read once per sample tile, probs once per channel tile. Each
// da is one f32 sum over k = 0..K−1 in order (as before: deterministic). A sample
// with a label >= K gets a zero row.
constexpr int DA_TX = 32, DA_TY = 4, DA_TK = 32, DA_MAXJ = 4;

__device__ void da_impl(const float* __restrict__ a, const float* __restrict__ wd, const float* __restrict__ probs,
                        const unsigned* __restrict__ labels, const unsigned char* __restrict__ masks,
                        const float* __restrict__ cnt, const float* __restrict__ dl_aux,
                        const float* __restrict__ dl_gate, float aux_scale, float gate_scale, float* __restrict__ da,
                        int n, int c, int k, int rows) {
  SHARED_ARRAY(float, gs, DA_TY * DA_MAXJ * (DA_TK + 1));
  SHARED_ARRAY(float, ws, DA_TK * DA_TX);
  SHARED_ARRAY(float, sas, DA_TY * DA_MAXJ);  // per sample of the tile: sa
  SHARED_ARRAY(int, ys, DA_TY * DA_MAXJ);     // its label, −1 when out of range / past N
  AK_EXPECT(blockDim.x == DA_TX && blockDim.y == DA_TY && blockDim.z == 1 && rows >= 1 && rows <= DA_MAXJ);
  AK_EXPECT(masks == nullptr || cnt != nullptr);
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * DA_TX + tx;
  const int tn = DA_TY * rows;
  const int ctiles = (c + DA_TX - 1) / DA_TX, ntiles = (n + tn - 1) / tn;
  for (int nt = blockIdx.y; nt < ntiles; nt += gridDim.y) {
    const int n0 = nt * tn;
    for (int ct = blockIdx.x; ct < ctiles; ct += gridDim.x) {
      const int cc = ct * DA_TX + tx;
      if (tid < tn) {
        const int nn = n0 + tid;
        const unsigned yu = nn < n ? labels[nn] : 0xffffffffu;
        ys[tid] = yu < (unsigned)k ? (int)yu : -1;
        sas[tid] = nn < n ? aux_scale * (dl_aux ? dl_aux[nn] : 1.0f) : 0.0f;
      }
      __syncthreads();
      float acc[DA_MAXJ];
#pragma unroll
      for (int j = 0; j < DA_MAXJ; ++j) acc[j] = 0.0f;
      if (probs) {
        for (int kb = 0; kb < k; kb += DA_TK) {
          const int kw = min(DA_TK, k - kb), kk = kb + tx;
          // Stage g (rows ty, ty + 4, … of the tile, class kb + tx) and Wd rows
          // kb + ty, kb + ty + 4, … (channel cc).
          for (int r = ty; r < tn; r += DA_TY) {
            const int y = ys[r];
            float gk = 0.0f;
            if (y >= 0 && tx < kw) gk = sas[r] * (probs[(long long)(n0 + r) * k + kk] - (kk == y ? 1.0f : 0.0f));
            gs[r * (DA_TK + 1) + tx] = gk;
          }
          for (int r = ty; r < DA_TK; r += DA_TY)
            ws[r * DA_TX + tx] = (r < kw && cc < c) ? wd[(long long)(kb + r) * c + cc] : 0.0f;
          __syncthreads();
          for (int q = 0; q < kw; ++q) {
            const float w = ws[q * DA_TX + tx];
#pragma unroll
            for (int j = 0; j < DA_MAXJ; ++j) {
              if (j < rows) {
                const float gk = gs[(ty + DA_TY * j) * (DA_TK + 1) + q];
                if (gk != 0.0f) acc[j] += gk * w;
              }
            }
          }
          __syncthreads();  // tiles consumed before the next chunk overwrites them
        }
      }
      if (cc < c) {
#pragma unroll
        for (int j = 0; j < DA_MAXJ; ++j) {
          const int r = ty + DA_TY * j, nn = n0 + r;
          if (j >= rows || nn >= n) continue;
          const long long i = (long long)nn * c + cc;
          const int y = ys[r];
          if (y < 0) {  // out-of-range device label: no gradient
            da[i] = 0.0f;
            continue;
          }
          float v = acc[j];
          if (masks) {
            const float ct_ = cnt[nn];
            if (ct_ > 0.0f && masks[(long long)y * c + cc]) {
              const float sg = gate_scale * (dl_gate ? dl_gate[nn] : 1.0f) / ct_;
              v += sg * sign0(a[i]);
            }
          }
          da[i] = v;
        }
      }
      __syncthreads();  // ys / sas read before the next tile overwrites them
    }
  }
}

// dWd[k,c] = Σ_n g[n,k]·a[n,c] as a tiled GEMM over samples: block (DW_TX, DW_TY) =
// (32 channels, 8 class rows) = 256 threads computes a tile of DW_TK = 32 classes ×
// 32 channels (4 classes per thread); blockIdx.x = channel tile, blockIdx.y = class
// tile, blockIdx.z = chunk of `spb` samples (all grid-stride). Samples are staged
// DW_TS at a time in shared memory (g formed from probs on load, and the a rows), and
// summed in order n = n0, n0 + 1, …; a sample with a label >= K is skipped.
//   out[z·K·C + k·C + c] = Σ_{n in chunk z} g[n,k]·a[n,c]
// With one chunk `out` is dWd itself; with several it is the partials buffer that
// `dwd_reduce_impl` sums in chunk order (fixed order: deterministic).
constexpr int DW_TX = 32, DW_TY = 8, DW_TK = 32, DW_TS = 16;

__device__ void dwd_partial_impl(const float* __restrict__ a, const float* __restrict__ probs,
                                 const unsigned* __restrict__ labels, const float* __restrict__ dl_aux,
                                 float aux_scale, float* __restrict__ out, int n, int c, int k, int spb) {
  SHARED_ARRAY(float, gsh, DW_TS * (DW_TK + 1));
  SHARED_ARRAY(float, ash, DW_TS * DW_TX);
  SHARED_ARRAY(int, valid, DW_TS);
  AK_EXPECT(blockDim.x == DW_TX && blockDim.y == DW_TY && blockDim.z == 1 && spb >= 1);
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * DW_TX + tx;
  constexpr int NT = DW_TX * DW_TY, KR = DW_TK / DW_TY;
  const int ctiles = (c + DW_TX - 1) / DW_TX, ktiles = (k + DW_TK - 1) / DW_TK;
  const int chunks = (n + spb - 1) / spb;
  for (int z = blockIdx.z; z < chunks; z += gridDim.z) {
    const int n0 = z * spb, n1 = min(n, n0 + spb);
    for (int kt = blockIdx.y; kt < ktiles; kt += gridDim.y) {
      const int k0 = kt * DW_TK;
      for (int ct = blockIdx.x; ct < ctiles; ct += gridDim.x) {
        const int c0 = ct * DW_TX;
        float acc[KR];
#pragma unroll
        for (int j = 0; j < KR; ++j) acc[j] = 0.0f;
        for (int sb = n0; sb < n1; sb += DW_TS) {
          const int sw = min(DW_TS, n1 - sb);
          if (tid < DW_TS) valid[tid] = (tid < sw && labels[sb + tid] < (unsigned)k) ? 1 : 0;
          for (int e = tid; e < DW_TS * DW_TK; e += NT) {
            const int r = e / DW_TK, q = e - r * DW_TK, nn = sb + r, kk = k0 + q;
            float gk = 0.0f;
            if (r < sw && kk < k) {
              const unsigned yu = labels[nn];
              if (yu < (unsigned)k) {
                const float sa = aux_scale * (dl_aux ? dl_aux[nn] : 1.0f);
                gk = sa * (probs[(long long)nn * k + kk] - ((int)yu == kk ? 1.0f : 0.0f));
              }
            }
            gsh[r * (DW_TK + 1) + q] = gk;
          }
          for (int e = tid; e < DW_TS * DW_TX; e += NT) {
            const int r = e / DW_TX, q = e - r * DW_TX;
            ash[e] = (r < sw && c0 + q < c) ? a[(long long)(sb + r) * c + c0 + q] : 0.0f;
          }
          __syncthreads();
          for (int s = 0; s < sw; ++s) {
            if (!valid[s]) continue;  // out-of-range device label: skipped (uniform)
            const float av = ash[s * DW_TX + tx];
#pragma unroll
            for (int j = 0; j < KR; ++j) acc[j] += gsh[s * (DW_TK + 1) + ty + DW_TY * j] * av;
          }
          __syncthreads();  // tiles consumed before the next samples overwrite them
        }
        const int cc = c0 + tx;
        if (cc < c) {
          const long long zo = (long long)z * k * c;
#pragma unroll
          for (int j = 0; j < KR; ++j) {
            const int kk = k0 + ty + DW_TY * j;
            if (kk < k) out[zo + (long long)kk * c + cc] = acc[j];
          }
        }
      }
    }
  }
}

// dWd stage 2 (only with several chunks): dwd[k,c] = Σ_z partial[z, k, c], z =
// 0..chunks-1 in order; blockIdx.y = class, x over channels (grid-stride, no division).
__device__ void dwd_reduce_impl(const float* __restrict__ partial, float* __restrict__ dwd, int chunks, int k, int c) {
  const long long kc = (long long)k * c;
  for (int kk = blockIdx.y; kk < k; kk += gridDim.y) {
    for (int cc = blockIdx.x * blockDim.x + threadIdx.x; cc < c; cc += gridDim.x * blockDim.x) {
      const long long i = (long long)kk * c + cc;
      float acc = 0.0f;
      for (int b = 0; b < chunks; ++b) acc += partial[b * kc + i];
      dwd[i] = acc;
    }
  }
}

}  // namespace ak_aiec

// ---------------------------------------------------------------------------
// extern "C" entry points, with their launch bounds: AK_KERNEL_BOUND(...) +
// EMU_REGISTER_BOUND(name, B) (common.cuh), B = the largest block its launcher
// (src/cuda/aiec.rs) uses — AIEC_B256 for the BLOCK-sized element-wise / per-row
// kernels and the (8 × 32)-thread (N, L, C) / (32 × 8) dWd tiles, AIEC_B128 for the
// logits GEMM tile (LG_TX × LG_TY) and the (32 × 4) dA tile. The emulated device
// records and enforces B.
//
// A plain __launch_bounds__(B) lets ptxas use up to 255 registers, and for some
// kernels it then took more than without a bound (nvcc 13: aiec_feat_nlc_* +1 to +2
// on sm_86 / sm_90, aiec_df_nlc_* +2 on sm_90, aiec_dwd_partial_f32 48 instead of 40
// on sm_90, aiec_da_f32 +1 to +3 on sm_86 / sm_90 — 8 bytes of spill on sm_80 /
// sm_90 in an earlier version — aiec_count_f32 +1 on sm_75 / sm_80, ...). Those
// kernels take a second argument, AIEC_BOUNDS(B, m): at least m resident blocks per
// SM, which caps ptxas at 65536 / (B·m) registers (in units of 8). m is the number
// of blocks the kernel holds per SM without a bound (registers vs the SM's 64 K,
// threads vs its 1024 / 2048 / 1536 / 1536 / 2048 on sm_75 / 80 / 86 / 89 / 90), so
// the cap is the most registers that keep that occupancy: ptxas may not trade
// resident blocks for registers (it may use more registers within that cap: the
// resident blocks stay the same). m differs per arch where the register counts do
// (AIEC_MB(sm_75, sm_80, sm_86 and sm_89, sm_90) picks it by __CUDA_ARCH__); ptxas
// lowers an m above what the arch can hold (8 blocks of 256 on sm_75 is 4). The
// before → after registers per arch are at each kernel's AIEC_*_MB below (measured
// 2026-12-07: nvcc 13, the ptxas table; NVRTC + ptxas 12.4, scripts/compat-check.sh,
// spills nothing either and gives the same counts within a few registers).
#define AIEC_B256 256
#define AIEC_B128 128
static_assert(ak_aiec::LG_TX * ak_aiec::LG_TY == AIEC_B128, "the logits tile is AIEC_B128 threads");
// (threads, min blocks) as AK_KERNEL_BOUND's one argument (nvcc's and the emulator's
// __launch_bounds__ take variadic arguments).
#define AIEC_BOUNDS(B, m) B, m
// The min-blocks argument per arch. __CUDA_ARCH__ is defined in nvcc's / NVRTC's device
// passes only; the host pass and the emulator do not use the value (the PTX of the
// newest arch, JIT-compiled for later GPUs, carries the sm_90 value).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define AIEC_MB(m75, m80, m86, m90) m90
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 860
#define AIEC_MB(m75, m80, m86, m90) m86
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define AIEC_MB(m75, m80, m86, m90) m80
#else
#define AIEC_MB(m75, m80, m86, m90) m75
#endif
// Resident blocks of 256 threads per SM with up to 32 / 40 / 48 / 64 / 80 registers:
// 8 / 6 / 5 / 4 / 3 (sm_80 / sm_90 hold at most 8, sm_86 / sm_89 6, sm_75 4).
// Registers below: sm_75 / 80 / 86 / 89 / 90, nvcc 13, unbounded → bound.
// aiec_tau_{fwd,bwd}_bf16 (plain (256): +4 on sm_75): 8 → cap 64 / 32 / 40 / 40 / 32;
// fwd 26/18/18/18/22 → 30/18/18/18/22, bwd 26/25/25/25/27 → 30/25/25/25/29 (sm_75
// holds its 4 blocks of 256 up to 64 registers).
#define AIEC_TAU_BF16_MB 8
// aiec_feat_nchw_*: 8 → cap 64 / 32 / 40 / 40 / 32; f32 38/29/40/40/31 → 34/32/36/36/32,
// f16 31/23/30/30/29 → 30/29/28/28/29, bf16 37/24/30/30/29 → 35/27/27/27/29.
#define AIEC_FEAT_NCHW_MB 8
// aiec_feat_nlc_f32: 8, 36/32/35/35/29 → 36/28/34/34/31; aiec_feat_nlc_{f16,bf16}: 6
// → cap 64 / 40 / 40 / 40 / 40, f16 50/40/39/39/36 → 48/40/40/40/39, bf16 → 45/40/40/40/39.
#define AIEC_FEAT_NLC_F32_MB 8
#define AIEC_FEAT_NLC_F16_MB 6
// aiec_df_nlc_f32: 6, 42/39/35/35/36 → 31/32/31/31/32; aiec_df_nlc_{f16,bf16}: 4 / 5 /
// 4 / 4 → cap 64 / 48 / 64 / 64 / 64, f16 54/46/51/51/52 → 51/46/51/51/52, bf16
// 54/48/50/50/52 → 51/45/51/51/52.
#define AIEC_DF_NLC_F32_MB 6
#define AIEC_DF_NLC_F16_MB AIEC_MB(4, 5, 4, 4)
// aiec_count_f32: 8, 19/19/19/19/18 → 20/18/18/18/18.
#define AIEC_COUNT_MB 8
// aiec_dwd_partial_f32: 4 / 5 / 6 / 6 → cap 64 / 48 / 40 / 40 / 40, 59/48/40/40/40 →
// 64/48/40/40/40 (plain (256): 48 on sm_90).
#define AIEC_DWD_PARTIAL_MB AIEC_MB(4, 5, 6, 6)
// aiec_da_f32, blocks of 128 (sm_75 holds 8, sm_86 / 89 12, sm_80 / 90 16): 8 / 8 / 9 /
// 11 → cap 64 / 64 / 56 / 56 / 40, 60/59/49/49/47 → 46/56/54/54/39 (sm_86/89: 9 blocks
// either way). sm_90 at 10 blocks (cap 48) spills 8 bytes (ptxas 12.4: 20); at 11 (cap
// 40) neither spills and the SM holds 12 blocks instead of 10.
#define AIEC_DA_MB AIEC_MB(8, 8, 9, 11)
// One macro per bound variant: the launch audit's lint finds a kernel by its
// AK_KERNEL / AK_KERNEL_BOUND definition line.
#define AIEC_TAU_KERNELS_B256(T, DT)                                                                       \
  AK_KERNEL_BOUND(AIEC_B256) void aiec_tau_fwd_##DT(const T* x, T* y, long long n, float tau) {            \
    ak_aiec::tau_fwd_impl<T>(x, y, n, tau);                                                                \
  }                                                                                                        \
  EMU_REGISTER_BOUND(aiec_tau_fwd_##DT, AIEC_B256)                                                         \
  AK_KERNEL_BOUND(AIEC_B256) void aiec_tau_bwd_##DT(const T* dy, const T* x, T* dx, long long n, float tau) { \
    ak_aiec::tau_bwd_impl<T>(dy, x, dx, n, tau);                                                           \
  }                                                                                                        \
  EMU_REGISTER_BOUND(aiec_tau_bwd_##DT, AIEC_B256)

#define AIEC_TAU_KERNELS_MB(T, DT, MB)                                                                     \
  AK_KERNEL_BOUND(AIEC_BOUNDS(AIEC_B256, MB)) void aiec_tau_fwd_##DT(const T* x, T* y, long long n, float tau) { \
    ak_aiec::tau_fwd_impl<T>(x, y, n, tau);                                                                \
  }                                                                                                        \
  EMU_REGISTER_BOUND(aiec_tau_fwd_##DT, AIEC_B256)                                                         \
  AK_KERNEL_BOUND(AIEC_BOUNDS(AIEC_B256, MB)) void aiec_tau_bwd_##DT(const T* dy, const T* x, T* dx, long long n, \
                                                                    float tau) {                           \
    ak_aiec::tau_bwd_impl<T>(dy, x, dx, n, tau);                                                           \
  }                                                                                                        \
  EMU_REGISTER_BOUND(aiec_tau_bwd_##DT, AIEC_B256)

#define AIEC_FEAT_NCHW_KERNEL(T, DT)                                                                          \
  AK_KERNEL_BOUND(AIEC_BOUNDS(AIEC_B256, AIEC_FEAT_NCHW_MB)) void aiec_feat_nchw_##DT(                       \
      const T* x, T* y, float* feat, long long planes, long long s, float tau, int apply_tau) {             \
    ak_aiec::feat_nchw_impl<T>(x, y, feat, planes, s, tau, apply_tau);                                       \
  }                                                                                                          \
  EMU_REGISTER_BOUND(aiec_feat_nchw_##DT, AIEC_B256)

#define AIEC_DF_NCHW_KERNEL(T, DT)                                                                             \
  AK_KERNEL_BOUND(AIEC_B256) void aiec_df_nchw_##DT(const T* f, const T* dout, const float* da, T* df,         \
                                                    long long planes, long long s, float tau, float inv_s) {   \
    ak_aiec::df_nchw_impl<T>(f, dout, da, df, planes, s, tau, inv_s);                                          \
  }                                                                                                            \
  EMU_REGISTER_BOUND(aiec_df_nchw_##DT, AIEC_B256)

#define AIEC_NLC_KERNELS(T, DT, FEAT_MB, DF_MB)                                                                 \
  AK_KERNEL_BOUND(AIEC_BOUNDS(AIEC_B256, FEAT_MB)) void aiec_feat_nlc_##DT(                                    \
      const T* x, T* y, float* feat, int n, int l, int c, int token, float tau, int apply_tau) {              \
    ak_aiec::feat_nlc_impl<T>(x, y, feat, n, l, c, token, tau, apply_tau);                                     \
  }                                                                                                            \
  EMU_REGISTER_BOUND(aiec_feat_nlc_##DT, AIEC_B256)                                                            \
  AK_KERNEL_BOUND(AIEC_BOUNDS(AIEC_B256, DF_MB)) void aiec_df_nlc_##DT(                                        \
      const T* f, const T* dout, const float* da, T* df, int n, int l, int c, int token, float tau, float inv_l) { \
    ak_aiec::df_nlc_impl<T>(f, dout, da, df, n, l, c, token, tau, inv_l);                                      \
  }                                                                                                            \
  EMU_REGISTER_BOUND(aiec_df_nlc_##DT, AIEC_B256)

AIEC_TAU_KERNELS_B256(float, f32)
AIEC_TAU_KERNELS_B256(__half, f16)
AIEC_TAU_KERNELS_MB(__nv_bfloat16, bf16, AIEC_TAU_BF16_MB)
AIEC_DF_NCHW_KERNEL(float, f32)
AIEC_DF_NCHW_KERNEL(__half, f16)
AIEC_DF_NCHW_KERNEL(__nv_bfloat16, bf16)
AIEC_FEAT_NCHW_KERNEL(float, f32)
AIEC_FEAT_NCHW_KERNEL(__half, f16)
AIEC_FEAT_NCHW_KERNEL(__nv_bfloat16, bf16)
AIEC_NLC_KERNELS(float, f32, AIEC_FEAT_NLC_F32_MB, AIEC_DF_NLC_F32_MB)
AIEC_NLC_KERNELS(__half, f16, AIEC_FEAT_NLC_F16_MB, AIEC_DF_NLC_F16_MB)
AIEC_NLC_KERNELS(__nv_bfloat16, bf16, AIEC_FEAT_NLC_F16_MB, AIEC_DF_NLC_F16_MB)

// ---- bound AIEC_B256: BLOCK-sized element-wise / per-row kernels -------------------

AK_KERNEL_BOUND(AIEC_B256) void aiec_dmu_fwd_f32(const float* logits, const unsigned* labels, float* probs, float* loss,
                                  unsigned char* correct, int n, int k) {
  ak_aiec::dmu_fwd_impl(logits, labels, probs, loss, correct, n, k);
}
EMU_REGISTER_BOUND(aiec_dmu_fwd_f32, AIEC_B256)

AK_KERNEL_BOUND(AIEC_B256) void aiec_rate_masks_f32(const unsigned long long* theta, const unsigned long long* eta,
                                     const unsigned long long* phi, const float* wd, float* v, unsigned char* masks,
                                     int k, int c) {
  ak_aiec::rate_masks_impl(theta, eta, phi, wd, v, masks, k, c);
}
EMU_REGISTER_BOUND(aiec_rate_masks_f32, AIEC_B256)

AK_KERNEL_BOUND(AIEC_B256) void aiec_gate_masks_f32(const float* v, const float* wd, unsigned char* masks, long long total) {
  ak_aiec::gate_masks_impl(v, wd, masks, total);
}
EMU_REGISTER_BOUND(aiec_gate_masks_f32, AIEC_B256)

AK_KERNEL_BOUND(AIEC_B256) void aiec_gate_loss_f32(const float* a, const unsigned char* masks, const unsigned* labels, float* loss,
                                    int n, int c, int k) {
  ak_aiec::gate_loss_impl(a, masks, labels, loss, n, c, k);
}
EMU_REGISTER_BOUND(aiec_gate_loss_f32, AIEC_B256)

AK_KERNEL_BOUND(AIEC_B256) void aiec_loss_means_f32(const float* aux, const float* gate, const unsigned char* correct, float* out,
                                     int n, float lambda_aux, float lambda_gate) {
  ak_aiec::loss_means_impl(aux, gate, correct, out, n, lambda_aux, lambda_gate);
}
EMU_REGISTER_BOUND(aiec_loss_means_f32, AIEC_B256)

AK_KERNEL_BOUND(AIEC_B256) void aiec_loss_weights_f32(const float* s, float* w, int n, float c_aux, float c_gate) {
  ak_aiec::loss_weights_impl(s, w, n, c_aux, c_gate);
}
EMU_REGISTER_BOUND(aiec_loss_weights_f32, AIEC_B256)

AK_KERNEL_BOUND(AIEC_B256) void aiec_mask_count_f32(const unsigned char* masks, const unsigned* labels, float* cnt, int n, int c,
                                     int k) {
  ak_aiec::mask_count_impl(masks, labels, cnt, n, c, k);
}
EMU_REGISTER_BOUND(aiec_mask_count_f32, AIEC_B256)

AK_KERNEL_BOUND(AIEC_B256) void aiec_dwd_reduce_f32(const float* partial, float* dwd, int chunks, int k, int c) {
  ak_aiec::dwd_reduce_impl(partial, dwd, chunks, k, c);
}
EMU_REGISTER_BOUND(aiec_dwd_reduce_f32, AIEC_B256)

// ---- bound AIEC_B128: the logits GEMM tile (LG_TX × LG_TY) ---------------------------

AK_KERNEL_BOUND(AIEC_B128) void aiec_logits_f32(const float* a, const float* wd, float* logits, int n, int c, int k, int rows) {
  ak_aiec::logits_impl(a, wd, logits, n, c, k, rows);
}
EMU_REGISTER_BOUND(aiec_logits_f32, AIEC_B128)

AK_KERNEL_BOUND(AIEC_BOUNDS(AIEC_B256, AIEC_COUNT_MB)) void aiec_count_f32(
    const float* a, const unsigned* labels, const unsigned char* correct, unsigned long long* theta,
    unsigned long long* eta, unsigned long long* phi, int n, int c, int k) {
  ak_aiec::count_impl(a, labels, correct, theta, eta, phi, n, c, k);
}
EMU_REGISTER_BOUND(aiec_count_f32, AIEC_B256)

// ---- bound (AIEC_B128, min blocks): the dA GEMM tile (32 × 4) -----------------------

AK_KERNEL_BOUND(AIEC_BOUNDS(AIEC_B128, AIEC_DA_MB)) void aiec_da_f32(
    const float* a, const float* wd, const float* probs, const unsigned* labels, const unsigned char* masks,
    const float* cnt, const float* dl_aux, const float* dl_gate, float aux_scale, float gate_scale, float* da, int n,
    int c, int k, int rows) {
  ak_aiec::da_impl(a, wd, probs, labels, masks, cnt, dl_aux, dl_gate, aux_scale, gate_scale, da, n, c, k, rows);
}
EMU_REGISTER_BOUND(aiec_da_f32, AIEC_B128)

// ---- bound (AIEC_B256, min blocks): the dWd partial tile (32 × 8) -------------------

AK_KERNEL_BOUND(AIEC_BOUNDS(AIEC_B256, AIEC_DWD_PARTIAL_MB)) void aiec_dwd_partial_f32(
    const float* a, const float* probs, const unsigned* labels, const float* dl_aux, float aux_scale, float* out, int n,
    int c, int k, int spb) {
  ak_aiec::dwd_partial_impl(a, probs, labels, dl_aux, aux_scale, out, n, c, k, spb);
}
EMU_REGISTER_BOUND(aiec_dwd_partial_f32, AIEC_B256)

