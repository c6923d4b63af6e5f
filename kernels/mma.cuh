// mma.cuh — the tensor-core primitives the implicit-GEMM kernels use: warp-level
// mma.sync, ldmatrix, and cp.async global→shared copies with commit/wait groups.
//
// Under nvcc each is one inline PTX instruction, guarded by the arch that has it:
//
//   primitive                                   PTX                                                   arch
//   mma_m16n8k16_f16 / _bf16                    mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{..}.f32  sm_80+
//   mma_m16n8k8_f16                             mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32       sm_75+
//   mma_m16n8k8_tf32                            mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32     sm_80+
//   ldmatrix_x{1,2,4}[_trans]                   ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16 sm_75+
//   cp_async_ca<4|8|16>, cp_async_cg (16)       cp.async.{ca,cg}.shared.global [d], [s], cp-size[, src-size] sm_80+
//   cp_async_commit_group, cp_async_wait_group<N>  cp.async.commit_group, cp.async.wait_group N         sm_80+
//   to_tf32                                     cvt.rna.tf32.f32                                       sm_80+
//
// On an arch below the one an instruction needs the function traps; kernels select
// their path at compile time with AK_MMA_SM75 / AK_MMA_SM80 (1 where the arch has the
// instructions, and always 1 on the emulated device, where each emulated sm_80+
// instruction instead fails the launch at run time when the emulated GPU is sm_75 —
// AK_EMU_ARCH=75 — as the trap of a kernel built for sm_75 would).
//
// Under the emulated device (host C++, __CUDACC__ undefined) each calls an emulated
// implementation that is exact to the PTX ISA's fragment layouts, so a fragment-index
// mistake gives the same wrong result as on a GPU. mma.sync and ldmatrix are warp
// collectives (emu::warp_converge): every lane of the warp must call them at the same
// source line — an exited lane, a partial warp or a warp-divergent call fails the
// launch. They order no memory accesses for racecheck (the hardware gives none).
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k*"): g = lane >> 2
// (groupID), t = lane % 4 (threadID_in_group). A is row-major M×K, B is K×N ("col":
// stored per column), C/D are M×N f32. A .f16x2/.bf16x2 register holds the element
// of the lower column (A) or row (B) index in its low 16 bits.
//
//   m16n8k16 f16/bf16  a[0]: A[g][2t..2t+1]    a[1]: A[g+8][2t..2t+1]
//                      a[2]: A[g][2t+8..2t+9]  a[3]: A[g+8][2t+8..2t+9]
//                      b[0]: B[2t..2t+1][g]    b[1]: B[2t+8..2t+9][g]
//   m16n8k8 f16        a[0]: A[g][2t..2t+1]    a[1]: A[g+8][2t..2t+1]    b[0]: B[2t..2t+1][g]
//   m16n8k8 tf32       a[0]: A[g][t]  a[1]: A[g+8][t]  a[2]: A[g][t+4]  a[3]: A[g+8][t+4]
//                      b[0]: B[t][g]  b[1]: B[t+4][g]
//   C and D (all)      c[0]: C[g][2t]  c[1]: C[g][2t+1]  c[2]: C[g+8][2t]  c[3]: C[g+8][2t+1]
//
//   ldmatrix .xN: lane i (i < 8N) gives the address of row i%8 of matrix i/8 (8 b16
//   elements, 16 contiguous bytes, 16-byte aligned, shared memory); r[j] of lane l is
//   matrix j's (row l/4, cols 2(l%4)..+1) — exactly an A or B register above. .trans:
//   r[j] of lane l is (rows 2(l%4)..+1, col l/4) of matrix j, i.e. the same fragment
//   of the transposed matrix.
//
// Arithmetic of the emulated mma (the model the parity tolerances derive from): the
// f16/bf16 inputs convert to f32 exactly; tf32 inputs are the f32 register with its
// 13 low mantissa bits ignored (truncated, as the tensor core reads a .tf32 operand;
// round first with to_tf32 = cvt.rna, nearest with ties away from zero). Every product
// is exact (at most 11 + 11 significant bits); D = C + Σ_k A[m][k]·B[k][n] is summed
// in f64 in the order c, then k = 0, 1, …, K−1, and rounded once to f32 (nearest
// even). The emulated D is thus within ½ ulp(f32) + K·2⁻⁵³·Σ|a·b| of the exact value.
// Hardware tensor cores do not round once: they align the products to the largest
// exponent and truncate, with an error per mma of a few ulp of f32 relative to
// |C| + Σ|a·b| — a tolerance must allow that per k-step of 8 or 16, not the
// emulator's single rounding.
//
// cp.async model (emulated): at issue the source bytes are read and checked (bounds,
// initialised, races — as a read by the issuing thread), the destination is checked as
// a write, filled with 0xFF and marked in flight; commit_group closes the thread's
// open group; wait_group<N> retires all but the N most recent committed groups of the
// thread, writing their bytes then (as a write by the issuing thread at that point:
// other threads need a __syncthreads after the wait). Any access to an in-flight
// destination — by any thread, including the issuer before its wait — fails the
// launch (racecheck RAW/WAW, or initcheck when racecheck is off). src-size < cp-size
// (the *_zfill forms) reads src-size bytes and zero-fills the rest; src-size 0 reads
// nothing (the conv kernels' padding).
#pragma once

#include "common.cuh"

#if !defined(__CUDACC__)
#define AK_MMA_EMULATED 1
#define AK_MMA_SM75 1
#define AK_MMA_SM80 1
#else
#define AK_MMA_EMULATED 0
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
#define AK_MMA_SM75 1
#else
#define AK_MMA_SM75 0
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define AK_MMA_SM80 1
#else
#define AK_MMA_SM80 0
#endif
#endif

// The source site of an `.aligned` call (the emulator checks that every lane of the
// warp reaches the same one); nothing under nvcc.
#if AK_MMA_EMULATED
#define AK_MMA_SITE , const char *ak_site_file = __builtin_FILE(), int ak_site_line = __builtin_LINE()
#define AK_MMA_SITE_ARGS , ak_site_file, ak_site_line
#else
#define AK_MMA_SITE
#define AK_MMA_SITE_ARGS
#endif

namespace ak {
namespace mma {

// Two f16 / bf16 values in one register: `lo` in bits 0..15 (the lower index).
__device__ __forceinline__ uint32_t pack_half2(__half lo, __half hi) {
  return (uint32_t)__half_as_ushort(lo) | ((uint32_t)__half_as_ushort(hi) << 16);
}
__device__ __forceinline__ uint32_t pack_bf162(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}

#if AK_MMA_EMULATED
namespace emulated {
enum Op { M16N8K16_F16, M16N8K16_BF16, M16N8K8_F16, M16N8K8_TF32 };

inline double f16_bits(uint32_t h) { return (double)__half2float(__half{(uint16_t)h}); }
inline double bf16_bits(uint32_t h) { return (double)__bfloat162float(__nv_bfloat16{(uint16_t)h}); }
// A .tf32 operand: the f32 register with its 13 low mantissa bits ignored.
inline double tf32_bits(uint32_t u) {
  uint32_t v = u & 0xffffe000u;
  float f;
  std::memcpy(&f, &v, 4);
  return (double)f;
}

// One warp-wide mma.sync: every lane publishes its A and B registers, the warp meets,
// each lane rebuilds A (16×K) and B (K×8) from all 32 lanes' registers by the PTX
// layouts above and computes its own four D elements.
inline void mma(Op op, float* d, const uint32_t* a, int na, const uint32_t* b, int nb, const float* c,
                const char* file, int line) {
  if (op == M16N8K16_F16) emu::need_sm(80, "mma.sync.m16n8k16 (f16)");
  if (op == M16N8K16_BF16) emu::need_sm(80, "mma.sync.m16n8k16 (bf16)");
  if (op == M16N8K8_TF32) emu::need_sm(80, "mma.sync.m16n8k8 (tf32)");
  const int lane = emu::lane_id();
  uint32_t* s = emu::warp_scratch();
  uint32_t* mine = s + lane * emu::kWarpScratchWords;
  for (int i = 0; i < na; ++i) mine[i] = a[i];
  for (int i = 0; i < nb; ++i) mine[na + i] = b[i];
  emu::warp_converge(0xffffffffu, file, line);
  const int K = (op == M16N8K16_F16 || op == M16N8K16_BF16) ? 16 : 8;
  double A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const uint32_t* w = s + l * emu::kWarpScratchWords;
    const int g = l >> 2, t = l & 3;
    switch (op) {
      case M16N8K16_F16:
      case M16N8K16_BF16: {
        auto cv = op == M16N8K16_F16 ? f16_bits : bf16_bits;
        for (int j = 0; j < 2; ++j) {
          A[g][2 * t + j] = cv(w[0] >> (16 * j) & 0xffffu);
          A[g + 8][2 * t + j] = cv(w[1] >> (16 * j) & 0xffffu);
          A[g][2 * t + 8 + j] = cv(w[2] >> (16 * j) & 0xffffu);
          A[g + 8][2 * t + 8 + j] = cv(w[3] >> (16 * j) & 0xffffu);
          B[2 * t + j][g] = cv(w[4] >> (16 * j) & 0xffffu);
          B[2 * t + 8 + j][g] = cv(w[5] >> (16 * j) & 0xffffu);
        }
        break;
      }
      case M16N8K8_F16:
        for (int j = 0; j < 2; ++j) {
          A[g][2 * t + j] = f16_bits(w[0] >> (16 * j) & 0xffffu);
          A[g + 8][2 * t + j] = f16_bits(w[1] >> (16 * j) & 0xffffu);
          B[2 * t + j][g] = f16_bits(w[2] >> (16 * j) & 0xffffu);
        }
        break;
      case M16N8K8_TF32:
        A[g][t] = tf32_bits(w[0]);
        A[g + 8][t] = tf32_bits(w[1]);
        A[g][t + 4] = tf32_bits(w[2]);
        A[g + 8][t + 4] = tf32_bits(w[3]);
        B[t][g] = tf32_bits(w[4]);
        B[t + 4][g] = tf32_bits(w[5]);
        break;
    }
  }
  // Every lane has read the scratch before any lane's next collective overwrites it.
  emu::warp_converge(0xffffffffu, file, line);
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int m = g + (i >= 2 ? 8 : 0), n = 2 * t + (i & 1);
    double acc = (double)c[i];
    for (int k = 0; k < K; ++k) acc += A[m][k] * B[k][n];
    d[i] = (float)acc;
  }
}

// ldmatrix.sync.aligned.m8n8.xNUM[.trans].shared.b16: lanes 0..8·NUM−1 each read their
// row (16 bytes, through the checked shared memory: bounds, init and races are the
// reading lane's), the warp meets, each lane takes its elements.
template <int NUM, bool TRANS>
inline void ldmatrix(uint32_t* r, const void* row, const char* file, int line) {
  const int lane = emu::lane_id();
  uint32_t* s = emu::warp_scratch();
  if (lane < 8 * NUM) {
    if (!emu::in_block_smem(row, 16)) emu::fault("ldmatrix: a row address is not in the block's shared memory");
    if ((uintptr_t)row % 16) emu::fault("ldmatrix: a row address is not 16-byte aligned");
    const uint32_t* p = static_cast<const uint32_t*>(row);
    uint32_t* mine = s + lane * emu::kWarpScratchWords;
    for (int i = 0; i < 4; ++i) mine[i] = p[i];
  }
  emu::warp_converge(0xffffffffu, file, line);
  for (int j = 0; j < NUM; ++j) {
    if (!TRANS) {
      r[j] = s[(8 * j + lane / 4) * emu::kWarpScratchWords + lane % 4];
    } else {
      const int col = lane / 4, r0 = 2 * (lane % 4);
      uint32_t lo = s[(8 * j + r0) * emu::kWarpScratchWords + col / 2] >> (16 * (col & 1)) & 0xffffu;
      uint32_t hi = s[(8 * j + r0 + 1) * emu::kWarpScratchWords + col / 2] >> (16 * (col & 1)) & 0xffffu;
      r[j] = lo | hi << 16;
    }
  }
  emu::warp_converge(0xffffffffu, file, line);
}
}  // namespace emulated
#endif

// ---- mma.sync (D = A·B + C, f32 accumulators; d may alias c) ----

// m16n8k16, f16 inputs (sm_80+).
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4] AK_MMA_SITE) {
#if AK_MMA_EMULATED
  emulated::mma(emulated::M16N8K16_F16, d, a, 4, b, 2, c AK_MMA_SITE_ARGS);
#elif AK_MMA_SM80
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// m16n8k16, bf16 inputs (sm_80+).
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const float (&c)[4] AK_MMA_SITE) {
#if AK_MMA_EMULATED
  emulated::mma(emulated::M16N8K16_BF16, d, a, 4, b, 2, c AK_MMA_SITE_ARGS);
#elif AK_MMA_SM80
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// m16n8k8, f16 inputs (sm_75+: the Turing shape).
__device__ __forceinline__ void mma_m16n8k8_f16(float (&d)[4], const uint32_t (&a)[2], const uint32_t (&b)[1],
                                                const float (&c)[4] AK_MMA_SITE) {
#if AK_MMA_EMULATED
  emulated::mma(emulated::M16N8K8_F16, d, a, 2, b, 1, c AK_MMA_SITE_ARGS);
#elif AK_MMA_SM75
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%8,%9,%10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(b[0]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// m16n8k8, tf32 inputs (sm_80+): a and b are f32 bit patterns (to_tf32 to round them).
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4] AK_MMA_SITE) {
#if AK_MMA_EMULATED
  emulated::mma(emulated::M16N8K8_TF32, d, a, 4, b, 2, c AK_MMA_SITE_ARGS);
#elif AK_MMA_SM80
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// f32 → tf32 (cvt.rna.tf32.f32: nearest, ties away from zero; the result is an f32
// bit pattern with the 13 low mantissa bits zero). ±Inf pass through; a NaN becomes
// the canonical NaN 0x7fffffff (a NaN whose payload sat only in the 13 low bits would
// otherwise read as ±Inf once an mma ignores those bits).
__device__ __forceinline__ uint32_t to_tf32(float x) {
#if AK_MMA_EMULATED
  emu::need_sm(80, "cvt.rna.tf32.f32");
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffffffu;  // NaN: canonical
  if ((u & 0x7f800000u) == 0x7f800000u) return u;           // ±Inf
  return (u + 0x1000u) & 0xffffe000u;              // carries into the exponent as rounding does
#elif AK_MMA_SM80
  uint32_t u;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(u) : "f"(x));
  return u;
#elif defined(__CUDA_ARCH__)
  __trap();
  return 0u;
#else
  return 0u;
#endif
}

// ---- ldmatrix (sm_75+): `row` is this lane's row address (see the layout above) ----

#if AK_MMA_EMULATED
#define AK_LDMATRIX_EMU(NUM, TRANS) emulated::ldmatrix<NUM, TRANS>(r, row AK_MMA_SITE_ARGS);
#else
#define AK_LDMATRIX_EMU(NUM, TRANS)
#endif
#if !AK_MMA_EMULATED && AK_MMA_SM75
#define AK_LDMATRIX_ADDR const unsigned addr = (unsigned)__cvta_generic_to_shared(row);
#elif !AK_MMA_EMULATED && defined(__CUDA_ARCH__)
#define AK_LDMATRIX_ADDR \
  (void)r, (void)row;    \
  __trap();
#else
#define AK_LDMATRIX_ADDR
#endif
#if !AK_MMA_EMULATED && AK_MMA_SM75
#define AK_LDMATRIX_PTX(...) asm volatile(__VA_ARGS__);
#else
#define AK_LDMATRIX_PTX(...)
#endif

// .x1: lanes 0..7 give the rows of one matrix.
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* row AK_MMA_SITE) {
  AK_LDMATRIX_EMU(1, false)
  AK_LDMATRIX_ADDR
  AK_LDMATRIX_PTX("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr))
}
// .x2: lanes 0..15 give the rows of two matrices (lane i: matrix i/8).
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row AK_MMA_SITE) {
  AK_LDMATRIX_EMU(2, false)
  AK_LDMATRIX_ADDR
  AK_LDMATRIX_PTX("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr))
}
// .x4: every lane gives a row (lane i: row i%8 of matrix i/8).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row AK_MMA_SITE) {
  AK_LDMATRIX_EMU(4, false)
  AK_LDMATRIX_ADDR
  AK_LDMATRIX_PTX("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                  : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                  : "r"(addr))
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row AK_MMA_SITE) {
  AK_LDMATRIX_EMU(1, true)
  AK_LDMATRIX_ADDR
  AK_LDMATRIX_PTX("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr))
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row AK_MMA_SITE) {
  AK_LDMATRIX_EMU(2, true)
  AK_LDMATRIX_ADDR
  AK_LDMATRIX_PTX("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                  : "=r"(r[0]), "=r"(r[1])
                  : "r"(addr))
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row AK_MMA_SITE) {
  AK_LDMATRIX_EMU(4, true)
  AK_LDMATRIX_ADDR
  AK_LDMATRIX_PTX("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                  : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                  : "r"(addr))
}
#undef AK_LDMATRIX_EMU
#undef AK_LDMATRIX_ADDR
#undef AK_LDMATRIX_PTX

// ---- cp.async (sm_80+): per-thread asynchronous global → shared copies ----

// cp.async.ca (cached in L1) of BYTES = 4, 8 or 16; smem and gmem aligned to BYTES.
// The _zfill form copies src_bytes (0..BYTES) and zero-fills the rest; with
// src_bytes = 0 nothing is read (gmem must still be a valid address for the PTX).
template <int BYTES>
__device__ __forceinline__ void cp_async_ca_zfill(void* smem, const void* gmem, int src_bytes) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
#if AK_MMA_EMULATED
  emu::need_sm(80, "cp.async");
  emu::cp_async(smem, gmem, BYTES, src_bytes);
#elif AK_MMA_SM80
  unsigned addr = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(addr), "l"(gmem), "n"(BYTES),
               "r"(src_bytes)
               : "memory");
#elif defined(__CUDA_ARCH__)
  (void)smem, (void)gmem, (void)src_bytes;
  __trap();
#endif
}
template <int BYTES>
__device__ __forceinline__ void cp_async_ca(void* smem, const void* gmem) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
#if AK_MMA_EMULATED
  emu::need_sm(80, "cp.async");
  emu::cp_async(smem, gmem, BYTES, BYTES);
#elif AK_MMA_SM80
  unsigned addr = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(addr), "l"(gmem), "n"(BYTES) : "memory");
#elif defined(__CUDA_ARCH__)
  (void)smem, (void)gmem;
  __trap();
#endif
}
// cp.async.cg (L2 only, bypasses L1): 16 bytes.
__device__ __forceinline__ void cp_async_cg(void* smem, const void* gmem) {
#if AK_MMA_EMULATED
  emu::need_sm(80, "cp.async");
  emu::cp_async(smem, gmem, 16, 16);
#elif AK_MMA_SM80
  unsigned addr = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(gmem) : "memory");
#elif defined(__CUDA_ARCH__)
  (void)smem, (void)gmem;
  __trap();
#endif
}
__device__ __forceinline__ void cp_async_cg_zfill(void* smem, const void* gmem, int src_bytes) {
#if AK_MMA_EMULATED
  emu::need_sm(80, "cp.async");
  emu::cp_async(smem, gmem, 16, src_bytes);
#elif AK_MMA_SM80
  unsigned addr = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(src_bytes)
               : "memory");
#elif defined(__CUDA_ARCH__)
  (void)smem, (void)gmem, (void)src_bytes;
  __trap();
#endif
}
// cp.async.commit_group: the thread's cp.async since its last commit form one group.
__device__ __forceinline__ void cp_async_commit_group() {
#if AK_MMA_EMULATED
  emu::need_sm(80, "cp.async.commit_group");
  emu::cp_async_commit();
#elif AK_MMA_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}
// cp.async.wait_group N: waits until at most the N most recent groups of this thread
// are pending. The bytes are then visible to this thread only: other threads read
// them after a __syncthreads (or __syncwarp) that follows the wait.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
  static_assert(N >= 0 && N < 8, "cp.async.wait_group N: 0 <= N < 8");
#if AK_MMA_EMULATED
  emu::need_sm(80, "cp.async.wait_group");
  emu::cp_async_wait(N);
#elif AK_MMA_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

}  // namespace mma
}  // namespace ak
