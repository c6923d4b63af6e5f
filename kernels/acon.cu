// acon.cu — ACON-A/B/C forward and backward and the meta-ACON β generators
// (SPEC §2) on the device. Storage T in {float, __half, __nv_bfloat16}; all
// arithmetic and accumulation in f32. Parameters (p1, p2, p, β, generator
// weights) and their gradients are f32.
//
// Three engines, each a template driven by a small functor:
// * flat_map   — one elementwise pass over the flat tensor (forward, GAP-backward
//                add). 128-bit vectors (float4 / 8 halves) when the pointers are
//                16-byte aligned, grid-stride loop, scalar tail. The (n, channel)
//                of each element is tracked incrementally (no division per
//                element); for NCHW a vector inside one plane fetches the channel
//                parameters once.
// * nchw_tiles — reductions over (n, c) planes (backward, GAP): a block owns a
//                tile (one plane, or a chunk of a large plane), vector loads of the
//                16-byte-aligned interior, scalar head/tail, block_sum, one f32
//                partial per tile and sum.
// * nlc_tiles  — reductions per channel for (N, L, C): a block owns a chunk of
//                rows of one sample and a chunk of columns; each thread owns one
//                column (4 channels when C is a multiple of 4 and the pointers are
//                aligned) and walks rows; row groups are combined in fixed order
//                through shared memory; C-length partials per tile of rows.
// Stage 2 (acon_reduce_tiles, acon_reduce_params) sums partials in fixed order.
// No atomics: every result is bitwise reproducible for a given launch geometry
// (which the host derives from the shape only).
//
// Sigmoid: ak::sigmoidf = 1/(1 + __expf(-x)). __expf has a max error of
// 2 + floor(|1.16·x|) ulp, so σ and s(1 − s) carry a relative error of about
// 2^-22·(2 + 1.16|u|) (≈ 3e-6 at |u| = 10); the parity tests' f32 tolerances
// (1e-5 of the tensor's max magnitude) include it.
#include "common.cuh"

namespace ak_acon {

// |β·d| above this: σ is exactly 0 or 1 in f32, so s(1 − s) terms are set to 0
// explicitly (u or d² may be ±∞ for finite inputs; ∞·0 would be NaN). Same
// rule as the CPU reference.
constexpr float SAT_LIM = 1e3f;
// β sources (the Rust `Beta` variants).
constexpr int BETA_CH = 0, BETA_NC = 1, BETA_N = 2, BETA_PIX = 3;
// ACON variants: A (p1 = 1, p2 = 0), B (p1 = 1, p2 = p), C (p1, p2).
constexpr int MODE_A = 0, MODE_B = 1, MODE_C = 2;

// W elements from p[i..i+W): a 128-bit access for the vector width, else scalar.
template <class T, int W>
__device__ __forceinline__ void load_n(const T* p, long long i, float* v) {
  if constexpr (W == 1) {
    v[0] = ak::to_f32(p[i]);
  } else {
    ak::Vec16<T>::load(p + i, v);
  }
}
template <class T, int W>
__device__ __forceinline__ void store_n(T* p, long long i, const float* v) {
  if constexpr (W == 1) {
    p[i] = ak::from_f32<T>(v[0]);
  } else {
    ak::Vec16<T>::store_v4(p + i, v);  // forced st.global.v4 (see common.cuh)
  }
}

// W = Vec16<T>::N elements at p[i..i+W): one 128-bit access when `vec` (p + i 16-byte
// aligned), else W scalar accesses of the same elements — so a walk that groups
// elements by W (and a reduction over it) is the same whatever the alignment.
template <class T, int W>
__device__ __forceinline__ void load_nv(const T* p, long long i, float* v, bool vec) {
  static_assert(W == ak::Vec16<T>::N, "a 128-bit group");
  ak::load_group(p + i, v, vec);
}
template <class T, int W>
__device__ __forceinline__ void store_nv(T* p, long long i, const float* v, bool vec) {
  static_assert(W == ak::Vec16<T>::N, "a 128-bit group");
  if (vec) {
    store_n<T, W>(p, i, v);
  } else {
#pragma unroll
    for (int j = 0; j < W; ++j) p[i + j] = ak::from_f32<T>(v[j]);
  }
}

// ---- ACON element math ----------------------------------------------------
struct Prm {
  float a, b, bt;  // p1, p2, β (β unused for pixel-wise)
};

// Fetches the parameters of element (sample n, channel ch).
template <int MODE>
struct AconPrm {
  const float* p1;
  const float* p2;
  const float* beta;
  int kind;
  long long c;
  __device__ __forceinline__ Prm get(long long n, long long ch) const {
    Prm r;
    r.a = MODE == MODE_C ? __ldg(p1 + ch) : 1.0f;
    r.b = MODE == MODE_A ? 0.0f : __ldg(p2 + ch);
    r.bt = kind == BETA_CH ? __ldg(beta + ch)
         : kind == BETA_NC ? __ldg(beta + n * c + ch)
         : kind == BETA_N  ? __ldg(beta + n)
                           : 0.0f;
    return r;
  }
};

// y = d·σ(β·d) + p2·x, d = (p1 − p2)·x.
__device__ __forceinline__ float fwd_elem(const Prm& p, bool pix, float x) {
  float bt = pix ? ak::sigmoidf(x) : p.bt;
  float d = (p.a - p.b) * x;
  return d * ak::sigmoidf(bt * d) + p.b * x;
}

// Backward of one element: dx and the three partial terms
// s[0] = dy·x·∂y/∂d (dp1), s[1] = dy·x·(1 − ∂y/∂d) (dp2), s[2] = dy·∂y/∂β.
__device__ __forceinline__ float bwd_elem(const Prm& p, bool pix, float g, float x, float* s) {
  float bt = pix ? ak::sigmoidf(x) : p.bt;
  float am = p.a - p.b;
  float d = am * x;
  float u = bt * d;
  float sg = ak::sigmoidf(u);
  bool sat = fabsf(u) > SAT_LIM;  // NaN u is not > SAT_LIM and propagates
  float t = sat ? 0.0f : sg * (1.0f - sg);
  float gd = sat ? sg : sg + u * t;        // ∂y/∂d
  float gb = sat ? 0.0f : g * d * d * t;  // dy·∂y/∂β
  float v = g * (am * gd + p.b);
  if (pix) v += gb * bt * (1.0f - bt);
  float gx = g * x;
  s[0] = gx * gd;
  s[1] = gx - s[0];
  s[2] = gb;
  return v;
}

// ---- flat elementwise engine ----------------------------------------------
// Flat index i = (n·D1 + a)·D2 + b; NCHW: (D1, D2) = (C, S), channel a;
// NLC: (D1, D2) = (L, C), channel b.
struct Idx {
  long long n, a, b;
};
struct Walk {
  long long d1, d2;
  Idx step;
  __device__ __forceinline__ Idx at(long long i) const {
    Idx r;
    long long q = i / d2;
    r.b = i - q * d2;
    r.n = q / d1;
    r.a = q - r.n * d1;
    return r;
  }
  // p += step (step.a < d1, step.b < d2)
  __device__ __forceinline__ void adv(Idx& p) const {
    p.b += step.b;
    long long carry = 0;
    if (p.b >= d2) {
      p.b -= d2;
      carry = 1;
    }
    p.a += step.a + carry;
    p.n += step.n;
    if (p.a >= d1) {
      p.a -= d1;
      p.n += 1;
    }
  }
  __device__ __forceinline__ void inc(Idx& p) const {
    if (++p.b == d2) {
      p.b = 0;
      if (++p.a == d1) {
        p.a = 0;
        ++p.n;
      }
    }
  }
};

// out[i] = f(prm(n, ch), in[i]) for every i < numel. `in` may equal `out`.
template <class T, int W, class F>
__device__ __forceinline__ void flat_map(const T* in, T* out, long long numel, long long d1, long long d2, bool nlc,
                                         const F& f) {
  const long long nthr = (long long)gridDim.x * blockDim.x;
  const long long gt = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  Walk w;
  w.d1 = d1;
  w.d2 = d2;
  w.step = w.at(nthr * W);
  const long long nv = numel / W;
  if (gt < nv) {
    Idx p = w.at(gt * W);
    for (long long v = gt; v < nv; v += nthr) {
      float x[W];
      load_n<T, W>(in, v * W, x);
      if (!nlc && p.b + W <= d2) {  // the whole vector lies in one (n, c) plane
        auto pr = f.prm(p.n, p.a);
#pragma unroll
        for (int j = 0; j < W; ++j) x[j] = f(pr, x[j]);
      } else {
        Idx q = p;
#pragma unroll
        for (int j = 0; j < W; ++j) {
          x[j] = f(f.prm(q.n, nlc ? q.b : q.a), x[j]);
          w.inc(q);
        }
      }
      store_n<T, W>(out, v * W, x);
      w.adv(p);
    }
  }
  const long long i = nv * W + gt;  // scalar tail (< W elements)
  if (i < numel) {
    Idx q = w.at(i);
    out[i] = ak::from_f32<T>(f(f.prm(q.n, nlc ? q.b : q.a), ak::to_f32(in[i])));
  }
}

template <class T, class F>
__device__ __forceinline__ void flat_map_any(const T* in, T* out, long long numel, long long d1, long long d2, bool nlc,
                                             const F& f) {
  if (ak::aligned16(in) && ak::aligned16(out)) {
    flat_map<T, ak::Vec16<T>::N>(in, out, numel, d1, d2, nlc, f);
  } else {
    flat_map<T, 1>(in, out, numel, d1, d2, nlc, f);
  }
}

template <int MODE>
struct FwdOp {
  AconPrm<MODE> src;
  bool pix;
  __device__ __forceinline__ Prm prm(long long n, long long ch) const { return src.get(n, ch); }
  __device__ __forceinline__ float operator()(const Prm& p, float x) const { return fwd_elem(p, pix, x); }
};

// dx += dg[n, c]·scale (or dg[n]·scale, per_sample): the backward of GAP.
struct GapAddOp {
  const float* dg;
  long long c;
  int per_sample;
  float scale;
  __device__ __forceinline__ float prm(long long n, long long ch) const {
    return __ldg(dg + (per_sample ? n : n * c + ch)) * scale;
  }
  __device__ __forceinline__ float operator()(float v, float x) const { return x + v; }
};

// ---- tile reduction engines -------------------------------------------------
// Functor interface: NS sums, HAS_DY, HAS_OUT; prm(n, ch) -> P;
// elem(P, g, x, s[NS]) -> output value, writes its NS terms to s.

// Threads per tile item: a tile is blockDim.x·TILE_UNROLL vectors (NCHW).
constexpr int TILE_UNROLL = 4;

// NCHW: tile t = (plane, k); a plane with S elements has tpp tiles of
// `tile_elems` elements (tile_elems = blockDim.x·TILE_UNROLL·W, from the host).
// part[t·NS + q] = Σ over the tile of term q. Tile, plane, sample and channel indices
// are 32-bit (the host checks that the N·C·tpp tiles fit in an int32,
// src/cuda/acon.rs check_nchw_tiles): a tile's (plane, k) and (n, c) cost two 32-bit
// divisions, no 64-bit one; element offsets stay 64-bit.
template <class T, class F>
__device__ __forceinline__ void nchw_tiles(const T* dy, const T* x, T* dx, long long n, long long c, long long s,
                                           long long tpp, long long tile_elems, const F& f, float* part) {
  constexpr int NS = F::NS;
  constexpr int W = ak::Vec16<T>::N;
  SHARED_ARRAY(float, scratch, 32);
  // 128-bit loads and stores when every tensor is 16-byte aligned; the walk below
  // (groups of W elements at indices multiple of W, head and tail scalar) is the same
  // either way, so the sums, and their bits, depend on the shape only.
  const bool vec = ak::aligned16(x) && (!F::HAS_DY || ak::aligned16(dy)) && (!F::HAS_OUT || ak::aligned16(dx));
  AK_EXPECT(n * c * tpp <= 0x7fffffffLL);
  const unsigned uc = (unsigned)c, utpp = (unsigned)tpp;
  const long long ntiles = n * c * tpp;
  const long long vpt = tile_elems / W;
  for (long long t = blockIdx.x; t < ntiles; t += gridDim.x) {
    const unsigned ut = (unsigned)t;
    const unsigned up = ut / utpp, un = up / uc;
    const long long plane = up, k = ut - up * utpp;
    const long long nn = un, ch = up - un * uc;
    const auto pr = f.prm(nn, ch);
    float acc[NS];
#pragma unroll
    for (int q = 0; q < NS; ++q) acc[q] = 0.0f;
    const long long base = plane * s, end = base + s;
    auto one = [&](long long i) {
      float g = F::HAS_DY ? ak::to_f32(dy[i]) : 0.0f;
      float sv[NS];
      float o = f.elem(pr, g, ak::to_f32(x[i]), sv);
      if (F::HAS_OUT) dx[i] = ak::from_f32<T>(o);
#pragma unroll
      for (int q = 0; q < NS; ++q) acc[q] += sv[q];
    };
    {
      // [base, vs) head, [vs, ve) groups of W, [ve, end) tail.
      long long vs = (base + W - 1) / W * W;
      if (vs > end) vs = end;
      long long ve = end / W * W;
      if (ve < vs) ve = vs;
      const long long nvp = (ve - vs) / W;
      const long long v0 = k * vpt;
      const long long v1 = v0 + vpt < nvp ? v0 + vpt : nvp;
      for (long long v = v0 + threadIdx.x; v < v1; v += blockDim.x) {
        const long long i = vs + v * W;
        float xv[W], g[W], o[W];
        load_nv<T, W>(x, i, xv, vec);
        if (F::HAS_DY) load_nv<T, W>(dy, i, g, vec);
#pragma unroll
        for (int j = 0; j < W; ++j) {
          float sv[NS];
          o[j] = f.elem(pr, F::HAS_DY ? g[j] : 0.0f, xv[j], sv);
#pragma unroll
          for (int q = 0; q < NS; ++q) acc[q] += sv[q];
        }
        if (F::HAS_OUT) store_nv<T, W>(dx, i, o, vec);
      }
      if (k == 0) {
        if ((long long)threadIdx.x < vs - base) one(base + threadIdx.x);
        if ((long long)threadIdx.x < end - ve) one(ve + threadIdx.x);
      }
    }
#pragma unroll
    for (int q = 0; q < NS; ++q) {
      float tot = ak::block_sum(acc[q], scratch);
      if (threadIdx.x == 0) part[t * NS + q] = tot;
    }
  }
}

// NLC column vectors: 4 elements per thread (16 bytes of f32, 8 bytes of f16 /
// bf16). Four, not a 128-bit vector of 8 halves: a thread keeps NS·4 sums and 4
// channels' parameters live over its rows (with 8 halves the backward needed
// 131-146 registers, one 256-thread block per SM). The store is an st.global.v2 /
// .v4 through inline PTX (a plain uint2 / float4 store is split into 32-bit STGs by
// nvcc 13 here) *without* a "memory" clobber, unlike ak::st16_v4: dx is written only,
// never read by the kernel and aliases neither x nor dy, so the next row's loads may
// be issued ahead of the store. Under the emulator: memcpy.
constexpr int NLC_W = 4;
template <class T>
struct Vec4 {  // __half / __nv_bfloat16: 8 bytes
  static __device__ __forceinline__ void load(const T* p, float* v) {
    uint2 u;
#ifdef __CUDACC__
    u = *reinterpret_cast<const uint2*>(p);
#else
    std::memcpy(&u, p, 8);
#endif
    v[0] = ak::Bits16<T>::to_f32(u.x & 0xffffu);
    v[1] = ak::Bits16<T>::to_f32(u.x >> 16);
    v[2] = ak::Bits16<T>::to_f32(u.y & 0xffffu);
    v[3] = ak::Bits16<T>::to_f32(u.y >> 16);
  }
  static __device__ __forceinline__ void store(T* p, const float* v) {
    uint2 u;
    u.x = ak::Bits16<T>::from_f32(v[0]) | (ak::Bits16<T>::from_f32(v[1]) << 16);
    u.y = ak::Bits16<T>::from_f32(v[2]) | (ak::Bits16<T>::from_f32(v[3]) << 16);
#ifdef __CUDACC__
    asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(u.x), "r"(u.y));
#else
    std::memcpy(p, &u, 8);
#endif
  }
};
template <>
struct Vec4<float> {  // 16 bytes
  static __device__ __forceinline__ void load(const float* p, float* v) { ak::Vec16<float>::load(p, v); }
  static __device__ __forceinline__ void store(float* p, const float* v) {
#ifdef __CUDACC__
    asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(v[0]), "f"(v[1]), "f"(v[2]), "f"(v[3]));
#else
    std::memcpy(p, v, 16);
#endif
  }
};
template <class T>
__device__ __forceinline__ bool aligned_nlc(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & (NLC_W * sizeof(T) - 1)) == 0;
}
template <class T, int W>
__device__ __forceinline__ void nlc_load(const T* p, long long i, float* v) {
  if constexpr (W == 1) {
    v[0] = ak::to_f32(p[i]);
  } else {
    Vec4<T>::load(p + i, v);
  }
}
template <class T, int W>
__device__ __forceinline__ void nlc_store(T* p, long long i, const float* v) {
  if constexpr (W == 1) {
    p[i] = ak::from_f32<T>(v[0]);
  } else {
    Vec4<T>::store(p + i, v);
  }
}

// NLC: a tile is (sample nn, row chunk k of `rows` rows, column chunk of `cc`
// columns), a column being W channels. Tiles of rows are blockIdx.x (grid-stride
// over N·tps, tps = ⌈L / rows⌉ per sample), column chunks blockIdx.y (grid-stride
// over ⌈(C/W) / cc⌉). Thread tid owns column lane = tid mod cc of the chunk in row
// group grp = tid / cc (g = blockDim.x / cc groups; cc divides blockDim.x), walking
// rows r0 + grp, r0 + grp + g, ... The g groups' sums are combined in fixed order
// (group 0 first) through shared memory (blockDim.x·NS·W floats), and the tile
// writes its chunk of the C-length partials part[((nn·tps + k)·NS + q)·C + ch].
// Each (nn, k) row of partials is written by its chunks together, once.
template <class T, int W, class F>
__device__ __forceinline__ void nlc_tiles_w(const T* dy, const T* x, T* dx, long long n, long long l, long long c,
                                            int cc, long long rows, const F& f, float* part, float* sm) {
  constexpr int NS = F::NS;
  const long long cols = c / W;
  const unsigned ucc = (unsigned)cc, bd = blockDim.x, tid = threadIdx.x;
  const unsigned g = bd / ucc, lane = tid % ucc, grp = tid / ucc;
  const unsigned tps = (unsigned)((l + rows - 1) / rows);
  const unsigned ntr = (unsigned)n * tps;
  const unsigned chunks = (unsigned)((cols + cc - 1) / cc);
  const unsigned ccw = ucc * W;  // channels per chunk
  using P = decltype(f.prm(0, 0));
  for (unsigned chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
    const long long col = (long long)chunk * cc + lane;
    // Channels of this chunk that exist: [0, valid) of the ccw.
    const long long left = c - (long long)chunk * ccw;
    const unsigned valid = left < (long long)ccw ? (unsigned)left : ccw;
    for (unsigned t = blockIdx.x; t < ntr; t += gridDim.x) {
      const unsigned nn = t / tps, k = t - nn * tps;
      const long long r0 = (long long)k * rows;
      const long long r1 = r0 + rows < l ? r0 + rows : l;
      float acc[NS][W];
#pragma unroll
      for (int q = 0; q < NS; ++q)
#pragma unroll
        for (int j = 0; j < W; ++j) acc[q][j] = 0.0f;
      if (col < cols) {
        P pr[W];
#pragma unroll
        for (int j = 0; j < W; ++j) pr[j] = f.prm(nn, col * W + j);
        // This thread's rows r0 + grp + m·g, m < mine (32-bit trip count, one
        // 64-bit offset advanced by g·C).
        const long long first = r0 + grp;
        const unsigned span = first < r1 ? (unsigned)(r1 - first) : 0u;  // < rows of a tile
        const int mine = (int)((span + g - 1) / g);
        const long long step = (long long)g * c;
        long long i = ((long long)nn * l + first) * c + col * W;
#pragma unroll 1
        for (int m = 0; m < mine; ++m, i += step) {
          float xv[W], gv[W], o[W];
          nlc_load<T, W>(x, i, xv);
          if (F::HAS_DY) nlc_load<T, W>(dy, i, gv);
#pragma unroll
          for (int j = 0; j < W; ++j) {
            float sv[NS];
            o[j] = f.elem(pr[j], F::HAS_DY ? gv[j] : 0.0f, xv[j], sv);
#pragma unroll
            for (int q = 0; q < NS; ++q) acc[q][j] += sv[q];
          }
          if (F::HAS_OUT) nlc_store<T, W>(dx, i, o);
        }
      }
      float* pt = part + (long long)t * NS * c + (long long)chunk * ccw;
      if (g == 1) {
        if (col < cols) {
#pragma unroll
          for (int q = 0; q < NS; ++q)
#pragma unroll
            for (int j = 0; j < W; ++j) pt[q * c + lane * W + j] = acc[q][j];
        }
      } else {
        // sm[(grp·NS + q)·ccw + lane·W + j]; output m of sum q: Σ_grp in order.
#pragma unroll
        for (int q = 0; q < NS; ++q)
#pragma unroll
          for (int j = 0; j < W; ++j) sm[(grp * NS + q) * ccw + lane * W + j] = acc[q][j];
        __syncthreads();
#pragma unroll
        for (int q = 0; q < NS; ++q) {
          for (unsigned m = tid; m < valid; m += bd) {
            float v = 0.0f;
            for (unsigned gg = 0; gg < g; ++gg) v += sm[(gg * NS + q) * ccw + m];
            pt[q * c + m] = v;
          }
        }
        __syncthreads();  // sm is reused by the next tile
      }
    }
  }
}

template <class T, class F>
__device__ __forceinline__ void nlc_tiles(const T* dy, const T* x, T* dx, long long n, long long l, long long c, int cc,
                                          long long rows, const F& f, float* part) {
  AK_EXPECT(cc > 0 && blockDim.x % (unsigned)cc == 0 && blockDim.y == 1 && blockDim.z == 1);
  DYNAMIC_SHARED(float, sm);
  const bool vec = c % NLC_W == 0 && aligned_nlc<T>(x) && (!F::HAS_DY || aligned_nlc<T>(dy)) &&
                   (!F::HAS_OUT || aligned_nlc<T>(dx));
  // nlc_tiles_w indexes sm[0, g·NS·cc·W) = [0, blockDim.x·NS·W) when it has several
  // row groups (g = blockDim.x / cc > 1), none with one.
  AK_EXPECT(blockDim.x == (unsigned)cc ||
            ak::dynamic_smem_bytes() >= blockDim.x * (unsigned)F::NS * (vec ? NLC_W : 1u) * sizeof(float));
  if (vec) {
    nlc_tiles_w<T, NLC_W>(dy, x, dx, n, l, c, cc, rows, f, part, sm);
  } else {
    nlc_tiles_w<T, 1>(dy, x, dx, n, l, c, cc, rows, f, part, sm);
  }
}

template <int MODE>
struct BwdOp {
  static constexpr int NS = 3;
  static constexpr bool HAS_DY = true, HAS_OUT = true;
  AconPrm<MODE> src;
  bool pix;
  __device__ __forceinline__ Prm prm(long long n, long long ch) const { return src.get(n, ch); }
  __device__ __forceinline__ float elem(const Prm& p, float g, float x, float* s) const {
    return bwd_elem(p, pix, g, x, s);
  }
};

struct GapOp {
  static constexpr int NS = 1;
  static constexpr bool HAS_DY = false, HAS_OUT = false;
  __device__ __forceinline__ float prm(long long, long long) const { return 0.0f; }
  __device__ __forceinline__ float elem(float, float, float x, float* s) const {
    s[0] = x;
    return 0.0f;
  }
};

// ---- op bodies ----------------------------------------------------------------
template <class T, int MODE>
__device__ __forceinline__ void fwd(const T* x, T* y, const float* p1, const float* p2, const float* beta, int kind,
                                    long long n, long long c, long long s, int nlc) {
  FwdOp<MODE> f{{p1, p2, beta, kind, c}, kind == BETA_PIX};
  flat_map_any(x, y, n * c * s, nlc ? s : c, nlc ? c : s, nlc != 0, f);
}

template <class T, int MODE>
__device__ __forceinline__ void bwd_nchw(const T* dy, const T* x, T* dx, const float* p1, const float* p2,
                                         const float* beta, int kind, long long n, long long c, long long s,
                                         long long tpp, long long tile_elems, float* part) {
  BwdOp<MODE> f{{p1, p2, beta, kind, c}, kind == BETA_PIX};
  nchw_tiles(dy, x, dx, n, c, s, tpp, tile_elems, f, part);
}

template <class T, int MODE>
__device__ __forceinline__ void bwd_nlc(const T* dy, const T* x, T* dx, const float* p1, const float* p2,
                                        const float* beta, int kind, long long n, long long l, long long c,
                                        int cc, long long rows, float* part) {
  BwdOp<MODE> f{{p1, p2, beta, kind, c}, kind == BETA_PIX};
  nlc_tiles(dy, x, dx, n, l, c, cc, rows, f, part);
}

}  // namespace ak_acon

// Launch bounds. Every launcher of this file uses at most ACON_BLOCK = 256 threads
// per block (src/cuda/acon.rs THREADS): every kernel is declared
// AK_KERNEL_BOUND(...) + EMU_REGISTER_BOUND(name, ACON_BLOCK) (kernels/common.cuh),
// so nvcc gets __launch_bounds__(256[, min blocks]) and the emulated device records
// and enforces 256. A second argument (ACON_BOUNDS(m): at least m resident blocks
// per SM) caps ptxas at 65536 / (256·m) registers, allocated in units of 8:
// * the (N, L, C) backward kernels, m = ACON_NLC_BWD_MIN_BLOCKS = 3 (85 → 80): 60-78
//   registers, no spill on sm_75..sm_90 (uncapped: 64-88; with 4 blocks, i.e. 64
//   registers, sm_75/sm_86 spill 8-28 bytes);
// * kernels where a plain (256) raised ptxas's count (it may then use up to 255),
//   with m chosen so the cap is at least their unbounded count on every arch. ptxas
//   lowers m to what the arch can hold (sm_75: 1024 threads per SM, 4 blocks of 256;
//   sm_86/89: 1536, 6; sm_80/90: 2048, 8), so one m gives a per-arch cap:
//   acon_a_fwd_* 5 (cap 64 / 48; unbounded 47-54 on sm_75..89, 40-48 on sm_90;
//   f32 on sm_90 6, cap 40: with 5 it took 48 instead of 40), acon_reduce_params 6
//   (64 / 40 / 40; unbounded 64 / 39-48 / 40), acon_gen_wgrad 8 (64 / 40 on sm_86/89
//   / 32 on sm_80/90; unbounded 64 / 40 / 32), acon_layer_gen_fwd 8 (unbounded
//   13-14), acon_reduce_tiles 8 (unbounded 48 / 30-32 / 24 on sm_90: no m pins
//   sm_86/89 below 40 or sm_90 below 32, and ptxas takes 32 on both with the 32-bit
//   indices, 38 / 29 before them; the resident blocks are unchanged, 6 and 8 per
//   SM, limited by threads, not registers).
// The others take ACON_BLOCK alone (acon_gap_add_f32 and acon_b_bwd_nchw_f32 gain
// one register on sm_86 with it, within the same 8-register allocation unit).
#define ACON_BLOCK 256
#define ACON_NLC_BWD_MIN_BLOCKS 3
// The pair (threads, min blocks) as AK_KERNEL_BOUND's one argument (nvcc's and the
// emulator's __launch_bounds__ take variadic arguments).
#define ACON_BOUNDS(min_blocks) ACON_BLOCK, min_blocks
// acon_a_fwd_f32: 40 registers on sm_90 unbounded (6 blocks of 256 fit), 48 elsewhere.
// (__CUDA_ARCH__ is defined in nvcc's / NVRTC's device passes only; the host pass and
// the emulator do not use the value.)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define ACON_A_FWD_F32_MIN_BLOCKS 6
#else
#define ACON_A_FWD_F32_MIN_BLOCKS 5
#endif

// =============================================================================
// Kernels. Bytes per element (storage size b = 4 / 2 / 2) vs the minimum:
// * acon_{a,b,c}_fwd_*      : read x (b), write y (b) = 2b — the minimum. Channel
//                             parameters come from L1/L2 (C or N×C floats).
// * acon_{a,b,c}_bwd_nchw_* : read x, dy (2b), write dx (b) = 3b — the minimum;
//   acon_{a,b,c}_bwd_nlc_*    plus f32 partials: 3 floats per NCHW tile (a
//                             tile is one plane, or a 1024·W-element chunk of a
//                             large plane), 3·C floats per NLC tile of R rows
//                             (R ≥ 32 when L ≥ 32; host nlc_tiling) —
//                             ≈ 3/R floats per element.
// * acon_gap_nchw_*, acon_gap_nlc_* : read x (b) = minimum; tiny partials.
// * acon_gap_add_*          : read dx (b) + write dx (b): the backward of GAP
//                             added in place (2b; the minimum for an in-place add).
// =============================================================================

// Forward: y = d·σ(β·d) + p2·x (flat, both layouts; nlc = 1 for (N, L, C)).
#define ACON_FWD(dt, T)                                                                                                   \
  AK_KERNEL_BOUND(ACON_BLOCK) void acon_c_fwd_##dt(const T* x, T* y, const float* p1, const float* p2, const float* beta, \
                                             int kind, long long n, long long c, long long s, int nlc) {                  \
    ak_acon::fwd<T, ak_acon::MODE_C>(x, y, p1, p2, beta, kind, n, c, s, nlc);                                             \
  }                                                                                                                       \
  EMU_REGISTER_BOUND(acon_c_fwd_##dt, ACON_BLOCK)                                                                         \
  AK_KERNEL_BOUND(ACON_BLOCK) void acon_b_fwd_##dt(const T* x, T* y, const float* p, const float* beta, int kind,         \
                                             long long n, long long c, long long s, int nlc) {                            \
    ak_acon::fwd<T, ak_acon::MODE_B>(x, y, nullptr, p, beta, kind, n, c, s, nlc);                                         \
  }                                                                                                                       \
  EMU_REGISTER_BOUND(acon_b_fwd_##dt, ACON_BLOCK)
// ACON-A forward: (256, 5) (f32 on sm_90: 6), see "Launch bounds" above.
#define ACON_A_FWD(dt, T, mb)                                                                                         \
  AK_KERNEL_BOUND(ACON_BOUNDS(mb)) void acon_a_fwd_##dt(const T* x, T* y, const float* beta, int kind, long long n, \
                                             long long c, long long s, int nlc) {                                  \
    ak_acon::fwd<T, ak_acon::MODE_A>(x, y, nullptr, nullptr, beta, kind, n, c, s, nlc);                            \
  }                                                                                                                \
  EMU_REGISTER_BOUND(acon_a_fwd_##dt, ACON_BLOCK)

// Backward, NCHW: dx plus per-tile partials part[tile·3 + q] of
// (dy·x·∂y/∂d, dy·x·(1 − ∂y/∂d), dy·∂y/∂β).
#define ACON_BWD_NCHW(dt, T)                                                                                              \
  AK_KERNEL_BOUND(ACON_BLOCK) void acon_c_bwd_nchw_##dt(const T* dy, const T* x, T* dx, const float* p1, const float* p2, \
                                                  const float* beta, int kind, long long n, long long c,                  \
                                                  long long s, long long tpp, long long tile_elems, float* part) {        \
    ak_acon::bwd_nchw<T, ak_acon::MODE_C>(dy, x, dx, p1, p2, beta, kind, n, c, s, tpp, tile_elems, part);                 \
  }                                                                                                                       \
  EMU_REGISTER_BOUND(acon_c_bwd_nchw_##dt, ACON_BLOCK)                                                                    \
  AK_KERNEL_BOUND(ACON_BLOCK) void acon_b_bwd_nchw_##dt(const T* dy, const T* x, T* dx, const float* p,                   \
                                                  const float* beta, int kind, long long n, long long c,                  \
                                                  long long s, long long tpp, long long tile_elems, float* part) {        \
    ak_acon::bwd_nchw<T, ak_acon::MODE_B>(dy, x, dx, nullptr, p, beta, kind, n, c, s, tpp, tile_elems, part);             \
  }                                                                                                                       \
  EMU_REGISTER_BOUND(acon_b_bwd_nchw_##dt, ACON_BLOCK)                                                                    \
  AK_KERNEL_BOUND(ACON_BLOCK) void acon_a_bwd_nchw_##dt(const T* dy, const T* x, T* dx, const float* beta, int kind,      \
                                                  long long n, long long c, long long s, long long tpp,                   \
                                                  long long tile_elems, float* part) {                                    \
    ak_acon::bwd_nchw<T, ak_acon::MODE_A>(dy, x, dx, nullptr, nullptr, beta, kind, n, c, s, tpp, tile_elems, part);       \
  }                                                                                                                       \
  EMU_REGISTER_BOUND(acon_a_bwd_nchw_##dt, ACON_BLOCK)

// Backward, (N, L, C): dx plus per-tile C-length partials
// part[((n·tps + k)·3 + q)·C + ch]; dynamic shared memory blockDim.x·3·W floats.
#define ACON_BWD_NLC(dt, T)                                                                                                                        \
  AK_KERNEL_BOUND(ACON_BOUNDS(ACON_NLC_BWD_MIN_BLOCKS)) void acon_c_bwd_nlc_##dt(const T* dy, const T* x, T* dx, const float* p1, const float* p2, \
                                                 const float* beta, int kind, long long n, long long l,                                            \
                                                 long long c, int cc, long long rows, float* part) {                                               \
    ak_acon::bwd_nlc<T, ak_acon::MODE_C>(dy, x, dx, p1, p2, beta, kind, n, l, c, cc, rows, part);                                                  \
  }                                                                                                                                                \
  EMU_REGISTER_BOUND(acon_c_bwd_nlc_##dt, ACON_BLOCK)                                                                                              \
  AK_KERNEL_BOUND(ACON_BOUNDS(ACON_NLC_BWD_MIN_BLOCKS)) void acon_b_bwd_nlc_##dt(const T* dy, const T* x, T* dx, const float* p,                   \
                                                 const float* beta, int kind, long long n, long long l,                                            \
                                                 long long c, int cc, long long rows, float* part) {                                               \
    ak_acon::bwd_nlc<T, ak_acon::MODE_B>(dy, x, dx, nullptr, p, beta, kind, n, l, c, cc, rows, part);                                              \
  }                                                                                                                                                \
  EMU_REGISTER_BOUND(acon_b_bwd_nlc_##dt, ACON_BLOCK)                                                                                              \
  AK_KERNEL_BOUND(ACON_BOUNDS(ACON_NLC_BWD_MIN_BLOCKS)) void acon_a_bwd_nlc_##dt(const T* dy, const T* x, T* dx, const float* beta, int kind,      \
                                                 long long n, long long l, long long c, int cc, long long rows,                                    \
                                                 float* part) {                                                                                    \
    ak_acon::bwd_nlc<T, ak_acon::MODE_A>(dy, x, dx, nullptr, nullptr, beta, kind, n, l, c, cc, rows, part);                                        \
  }                                                                                                                                                \
  EMU_REGISTER_BOUND(acon_a_bwd_nlc_##dt, ACON_BLOCK)

// GAP partial sums (meta-ACON generators) and the in-place GAP backward.
#define ACON_GAP(dt, T)                                                                                                         \
  AK_KERNEL_BOUND(ACON_BLOCK) void acon_gap_nchw_##dt(const T* x, long long n, long long c, long long s, long long tpp,         \
                                                long long tile_elems, float* part) {                                            \
    ak_acon::nchw_tiles<T>(nullptr, x, nullptr, n, c, s, tpp, tile_elems, ak_acon::GapOp{}, part);                              \
  }                                                                                                                             \
  EMU_REGISTER_BOUND(acon_gap_nchw_##dt, ACON_BLOCK)                                                                            \
  AK_KERNEL_BOUND(ACON_BLOCK) void acon_gap_nlc_##dt(const T* x, long long n, long long l, long long c, int cc, long long rows, \
                                               float* part) {                                                                   \
    ak_acon::nlc_tiles<T>(nullptr, x, nullptr, n, l, c, cc, rows, ak_acon::GapOp{}, part);                                      \
  }                                                                                                                             \
  EMU_REGISTER_BOUND(acon_gap_nlc_##dt, ACON_BLOCK)                                                                             \
  AK_KERNEL_BOUND(ACON_BLOCK) void acon_gap_add_##dt(T* dx, const float* dg, int per_sample, float scale, long long n,          \
                                               long long c, long long s, int nlc) {                                             \
    ak_acon::GapAddOp f{dg, c, per_sample, scale};                                                                              \
    ak_acon::flat_map_any<T>(dx, dx, n * c * s, nlc ? s : c, nlc ? c : s, nlc != 0, f);                                         \
  }                                                                                                                             \
  EMU_REGISTER_BOUND(acon_gap_add_##dt, ACON_BLOCK)

#define ACON_ALL(dt, T) \
  ACON_FWD(dt, T)       \
  ACON_BWD_NCHW(dt, T)  \
  ACON_BWD_NLC(dt, T)   \
  ACON_GAP(dt, T)

ACON_ALL(f32, float)
ACON_ALL(f16, __half)
ACON_ALL(bf16, __nv_bfloat16)

ACON_A_FWD(f32, float, ACON_A_FWD_F32_MIN_BLOCKS)
ACON_A_FWD(f16, __half, 5)
ACON_A_FWD(bf16, __nv_bfloat16, 5)

// ---- stage 2 (f32 only) ------------------------------------------------------
// tot[(q·N + n)·C + c] = scale · Σ_k part(n, c, k, q), k in order. NCHW partials
// part[((n·C + c)·K + k)·NS + q], NLC part[((n·K + k)·NS + q)·C + c].
// Reads NS·N·C·K floats, writes NS·N·C. Bound (256, 8): see "Launch bounds" (with
// (256) alone ptxas gave it 26 registers on sm_90 instead of 24).
AK_KERNEL_BOUND(ACON_BOUNDS(8)) void acon_reduce_tiles(const float* part, float* tot, long long n, long long c, long long k,
                                             int ns, int nlc, float scale) {
  // 32-bit output indices: the host checks ns·N·C ≤ 2^31 − 1 (check_totals).
  AK_EXPECT(ns * n * c <= 0x7fffffffLL);
  const unsigned un = (unsigned)n, uc = (unsigned)c, unc = un * uc, total = (unsigned)ns * unc;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    const unsigned q = i / unc, j = i - q * unc;  // j = n·C + c
    const unsigned nn = j / uc, ch = j - nn * uc;
    // Partial kk of (n, c, q) at p[kk·step], in order.
    const float* p = nlc ? part + ((long long)nn * k * ns + q) * c + ch : part + (long long)j * k * ns + q;
    const long long step = nlc ? (long long)ns * c : ns;
    float acc = 0.0f;
    for (long long kk = 0; kk < k; ++kk) acc += p[kk * step];
    tot[i] = acc * scale;
  }
}
EMU_REGISTER_BOUND(acon_reduce_tiles, ACON_BLOCK)

// From tot (3 × N × C): dp1[c] = Σ_n tot[0], dp2[c] = Σ_n tot[1] (either may be
// null), dβ by kind: per channel Σ_n tot[2]; per (n, c) tot[2]; per sample
// Σ_c tot[2]; none for pixel-wise. Fixed-order sequential sums.
// Bound (256, 6): with (256) alone ptxas gave it 42 registers on sm_86 instead of 39.
AK_KERNEL_BOUND(ACON_BOUNDS(6)) void acon_reduce_params(const float* tot, float* dp1, float* dp2, float* dbeta, int kind,
                                              long long n, long long c) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long t0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const float* e = tot + 2 * n * c;
  for (long long i = t0; i < c; i += stride) {
    float a = 0.0f, b = 0.0f, d = 0.0f;
    for (long long nn = 0; nn < n; ++nn) {
      a += tot[nn * c + i];
      b += tot[(n + nn) * c + i];
      d += e[nn * c + i];
    }
    if (dp1) dp1[i] = a;
    if (dp2) dp2[i] = b;
    if (kind == ak_acon::BETA_CH) dbeta[i] = d;
  }
  if (kind == ak_acon::BETA_NC) {
    for (long long i = t0; i < n * c; i += stride) dbeta[i] = e[i];
  } else if (kind == ak_acon::BETA_N) {
    for (long long i = t0; i < n; i += stride) {
      float d = 0.0f;
      for (long long ch = 0; ch < c; ++ch) d += e[i * c + ch];
      dbeta[i] = d;
    }
  }
}
EMU_REGISTER_BOUND(acon_reduce_params, ACON_BLOCK)

// ---- meta-ACON generators (f32) ----------------------------------------------
// Channel-wise fc layers, each a grid (samples, output slices) with grid-stride
// loops in both dimensions so that a batch of 64 fills the device (one block per
// sample, as before, gave 64 blocks). blockDim is a multiple of 32; every sum is a
// fixed-order lane loop plus warp_sum (or a sequential loop), as before.
// Stage 1 of the forward: h[n, j] = b1[j] + Σ_c W1[j, c]·g[n, c], a warp per
// (n, j), lanes over c (grid.y: slices of blockDim/32 values of j). b1 may be null.
AK_KERNEL_BOUND(ACON_BLOCK) void acon_gen_fc_h(const float* gap, const float* w1, const float* b1, long long n, long long c,
                               long long wd, float* h) {
  AK_EXPECT((blockDim.x & 31) == 0 && blockDim.y == 1);
  const int lane = threadIdx.x & 31;
  const long long nw = blockDim.x >> 5, warp = threadIdx.x >> 5;
  for (long long nn = blockIdx.x; nn < n; nn += gridDim.x) {
    const float* g = gap + nn * c;
    for (long long j = blockIdx.y * nw + warp; j < wd; j += (long long)gridDim.y * nw) {
      float acc = 0.0f;
      for (long long ch = lane; ch < c; ch += 32) acc += w1[j * c + ch] * g[ch];
      acc = ak::warp_sum(acc);
      if (lane == 0) h[nn * wd + j] = (b1 ? b1[j] : 0.0f) + acc;
    }
  }
}
EMU_REGISTER_BOUND(acon_gen_fc_h, ACON_BLOCK)

// Stage 2 of the forward: β[n, c] = σ(b2[c] + Σ_j W2[c, j]·h[n, j]), a warp per
// (n, c), lanes over j (grid.y: slices of blockDim/32 channels). b2 may be null.
AK_KERNEL_BOUND(ACON_BLOCK) void acon_gen_fc_beta(const float* h, const float* w2, const float* b2, long long n, long long c,
                                  long long wd, float* beta) {
  AK_EXPECT((blockDim.x & 31) == 0 && blockDim.y == 1);
  const int lane = threadIdx.x & 31;
  const long long nw = blockDim.x >> 5, warp = threadIdx.x >> 5;
  for (long long nn = blockIdx.x; nn < n; nn += gridDim.x) {
    const float* hn = h + nn * wd;
    for (long long ch = blockIdx.y * nw + warp; ch < c; ch += (long long)gridDim.y * nw) {
      float acc = 0.0f;
      for (long long j = lane; j < wd; j += 32) acc += w2[ch * wd + j] * hn[j];
      acc = ak::warp_sum(acc);
      if (lane == 0) beta[nn * c + ch] = ak::sigmoidf((b2 ? b2[ch] : 0.0f) + acc);
    }
  }
}
EMU_REGISTER_BOUND(acon_gen_fc_beta, ACON_BLOCK)

// dz = dβ·β(1 − β) for one element.
__device__ __forceinline__ float gen_dz(const float* dbeta, const float* beta, long long i) {
  const float b = beta[i];
  return dbeta[i] * b * (1.0f - b);
}

// Stage 1 of the backward: dz[n, c] = dβ·β(1 − β) (kept for the weight gradients)
// and dh[n, j] = Σ_c W2[c, j]·dz[n, c]. A block per (sample n, group of 8 outputs
// j0..j0+8; grid.y: the groups, so that ViT-B's 64 samples with width 48 make 384
// blocks). Warp w takes the 32-channel slabs c0 = 32·w, 32·(w + nw), ...: each lane
// computes dz of one channel of the slab once (coalesced dβ, β; the block of group 0
// stores it), then lane (sub = lane / 8, jl = lane mod 8) accumulates channels c0 + 4i
// + sub of the slab, dz broadcast by a shuffle, reading W2[c, j0 + jl]: 4 rows × 8
// consecutive floats (32-byte sectors) per step. The 4 sub-lanes are added in order,
// then the warps in order (warp 0 first) through shared memory.
AK_KERNEL_BOUND(ACON_BLOCK) void acon_gen_fc_dh(const float* dbeta, const float* beta, const float* w2, long long n,
                                                long long c, long long wd, float* dz, float* dh) {
  AK_EXPECT((blockDim.x & 31) == 0 && blockDim.x <= ACON_BLOCK && blockDim.y == 1 && blockDim.z == 1);
  SHARED_ARRAY(float, red, ACON_BLOCK / 4);
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const unsigned jl = lane & 7, sub = lane >> 3;
  const long long groups = (wd + 7) / 8;
  for (long long nn = blockIdx.x; nn < n; nn += gridDim.x) {
    for (long long jg = blockIdx.y; jg < groups; jg += gridDim.y) {
      const long long j = jg * 8 + jl;
      float acc = 0.0f;
      for (long long c0 = (long long)warp * 32; c0 < c; c0 += (long long)nw * 32) {
        const long long ch = c0 + lane;
        float z = 0.0f;
        if (ch < c) {
          z = gen_dz(dbeta, beta, nn * c + ch);
          if (jg == 0) dz[nn * c + ch] = z;
        }
        const int m = c - c0 < 32 ? (int)(c - c0) : 32;  // warp-uniform
        for (int k0 = 0; k0 < m; k0 += 4) {
          const int k = k0 + (int)sub;  // < 32
          const float zk = __shfl_sync(0xffffffffu, z, k);
          if (k < m && j < wd) acc += w2[(c0 + k) * wd + j] * zk;
        }
      }
      const float a1 = __shfl_sync(0xffffffffu, acc, (int)jl + 8);
      const float a2 = __shfl_sync(0xffffffffu, acc, (int)jl + 16);
      const float a3 = __shfl_sync(0xffffffffu, acc, (int)jl + 24);
      if (sub == 0) red[warp * 8 + jl] = ((acc + a1) + a2) + a3;
      __syncthreads();
      if (warp == 0 && sub == 0) {
        float v = 0.0f;
        for (unsigned w = 0; w < nw; ++w) v += red[w * 8 + jl];
        if (j < wd) dh[nn * wd + j] = v;
      }
      __syncthreads();  // red is reused by the next (n, group)
    }
  }
}
EMU_REGISTER_BOUND(acon_gen_fc_dh, ACON_BLOCK)

// Stage 2 of the backward, a thread per (n, c) (grid.y: slices of blockDim
// channels): dg[n, c] = scale·Σ_j W1[j, c]·dh[n, j] (scale = 1/S folds in the GAP
// backward; W1 rows coalesced across c).
AK_KERNEL_BOUND(ACON_BLOCK) void acon_gen_fc_dg(const float* w1, const float* dh, long long n, long long c, long long wd,
                                                float scale, float* dg) {
  AK_EXPECT(blockDim.y == 1 && blockDim.z == 1);
  for (long long nn = blockIdx.x; nn < n; nn += gridDim.x) {
    const float* hh = dh + nn * wd;
    for (long long ch = (long long)blockIdx.y * blockDim.x + threadIdx.x; ch < c;
         ch += (long long)gridDim.y * blockDim.x) {
      float acc = 0.0f;
      for (long long j = 0; j < wd; ++j) acc += w1[j * c + ch] * hh[j];
      dg[nn * c + ch] = acc * scale;
    }
  }
}
EMU_REGISTER_BOUND(acon_gen_fc_dg, ACON_BLOCK)

// Weight gradients, summed over samples in order (stage 2 of the per-sample
// dz, dh): dW2[c, j] = Σ_n dz[n, c]·h[n, j], db2[c] = Σ_n dz[n, c],
// dW1[j, c] = Σ_n dh[n, j]·g[n, c], db1[j] = Σ_n dh[n, j] (db1, db2 may be null).
// One output per thread; output indices are 32-bit (the host checks that the
// 2·C·width + C + width outputs fit in an int32): (c, j) of an output costs one 32-bit
// division, no 64-bit one.
// Bound (256, 8): with (256) alone ptxas gave it 40 registers on sm_90 instead of
// 32 (6 resident 256-thread blocks per SM instead of 8); (256, 6) gave 40 on sm_80
// and sm_90.
AK_KERNEL_BOUND(ACON_BOUNDS(8)) void acon_gen_wgrad(const float* dz, const float* dh, const float* h, const float* gap,
                                          long long n, long long c, long long wd, float* dw1, float* db1, float* dw2,
                                          float* db2) {
  AK_EXPECT(2 * c * wd + c + wd <= 0x7fffffffLL);
  const unsigned uc = (unsigned)c, uwd = (unsigned)wd, cw = uc * uwd, total = 2 * cw + uc + uwd;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    float acc = 0.0f;
    if (i < cw) {  // dW2[c, j]
      const unsigned ch = i / uwd, j = i - ch * uwd;
      for (long long nn = 0; nn < n; ++nn) acc += dz[nn * c + ch] * h[nn * wd + j];
      dw2[i] = acc;
    } else if (i < 2 * cw) {  // dW1[j, c]
      const unsigned r = i - cw, j = r / uc, ch = r - j * uc;
      for (long long nn = 0; nn < n; ++nn) acc += dh[nn * wd + j] * gap[nn * c + ch];
      dw1[r] = acc;
    } else if (i < 2 * cw + c) {
      const unsigned ch = i - 2 * cw;
      for (long long nn = 0; nn < n; ++nn) acc += dz[nn * c + ch];
      if (db2) db2[ch] = acc;
    } else {
      const unsigned j = i - 2 * cw - uc;
      for (long long nn = 0; nn < n; ++nn) acc += dh[nn * wd + j];
      if (db1) db1[j] = acc;
    }
  }
}
EMU_REGISTER_BOUND(acon_gen_wgrad, ACON_BLOCK)

// Layer-wise forward, one block per sample: β[n] = σ(Σ_c gap[n, c]).
// Bound (256, 8): with (256) alone ptxas gave it 14 registers on sm_86 instead of 13.
AK_KERNEL_BOUND(ACON_BOUNDS(8)) void acon_layer_gen_fwd(const float* gap, long long c, float* beta) {
  SHARED_ARRAY(float, scratch, 32);
  const long long nn = blockIdx.x;
  float acc = 0.0f;
  for (long long ch = threadIdx.x; ch < c; ch += blockDim.x) acc += gap[nn * c + ch];
  acc = ak::block_sum(acc, scratch);
  if (threadIdx.x == 0) beta[nn] = ak::sigmoidf(acc);
}
EMU_REGISTER_BOUND(acon_layer_gen_fwd, ACON_BLOCK)

// Layer-wise backward: dg[n] = dβ[n]·β[n](1 − β[n]) (then acon_gap_add_* with
// per_sample = 1 and scale 1/S).
AK_KERNEL_BOUND(ACON_BLOCK) void acon_layer_gen_bwd(const float* dbeta, const float* beta, long long n, float* dg) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    const float b = beta[i];
    dg[i] = dbeta[i] * b * (1.0f - b);
  }
}
EMU_REGISTER_BOUND(acon_layer_gen_bwd, ACON_BLOCK)

#undef ACON_BOUNDS
#undef ACON_A_FWD_F32_MIN_BLOCKS
#undef ACON_NLC_BWD_MIN_BLOCKS
#undef ACON_BLOCK

