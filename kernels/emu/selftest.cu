// selftest.cu — kernels that exist only in the emulated device, to prove the
// emulator catches what it claims (missing barrier, out-of-bounds write) and
// implements warp collectives correctly for full and partial warps.
#include "../common.cuh"
#include "../mma.cuh"


// Sum of x[0..n) per block of blockDim.x threads using only warp shuffles; the
// active-lane mask of the last (partial) warp is computed with __ballot_sync, so
// blockDim.x need not be a multiple of 32. out[blockIdx.x*32 + warp] = warp sum.
extern "C" __global__ void emu_selftest_warp_sum(const float* x, float* out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int warp_lanes = min(32, (int)blockDim.x - warp * 32);
  unsigned mask = warp_lanes == 32 ? 0xffffffffu : ((1u << warp_lanes) - 1u);
  float v = i < n ? x[i] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) {
    float other = __shfl_down_sync(mask, v, o);
    if (lane + o < warp_lanes) v += other;
  }
  unsigned ball = __ballot_sync(mask, 1);
  if (lane == 0) out[blockIdx.x * 32 + warp] = (ball == mask) ? v : -1.0f;
}
EMU_REGISTER(emu_selftest_warp_sum)

// Reverses each block's chunk through shared memory. With `sync` = 0 the
// __syncthreads between the write and the read is skipped: a race whose outcome
// depends on thread order.
extern "C" __global__ void emu_selftest_reverse(const float* x, float* y, int sync) {
  SHARED_ARRAY(float, buf, 256);
  int t = threadIdx.x, base = blockIdx.x * blockDim.x;
  buf[t] = x[base + t];
  if (sync) __syncthreads();
  y[base + t] = buf[blockDim.x - 1 - t];
}
EMU_REGISTER(emu_selftest_reverse)

// Writes y[i] = i for i < n + extra: with extra > 0 an out-of-bounds write.
extern "C" __global__ void emu_selftest_fill(float* y, int n, int extra) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n + extra) y[i] = (float)i;
}
EMU_REGISTER(emu_selftest_fill)

// The odd lanes exit while the even lanes then call a full-mask warp shuffle: a
// collective waiting for exited lanes must be reported as a launch failure, not
// hang. (The __syncthreads reached only by the even lanes before it is legal on
// Volta and newer — exited threads count as arrived — and is accepted.)
extern "C" __global__ void emu_selftest_divergent_barrier(float* y) {
  y[threadIdx.x] = 1.0f;
  if (threadIdx.x & 1) return;
  __syncthreads();
  y[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 2.0f, 1);
}
EMU_REGISTER(emu_selftest_divergent_barrier)

// Block sum with ak::block_sum (the helper every family uses).
extern "C" __global__ void emu_selftest_block_sum(const float* x, float* out, int n) {
  SHARED_ARRAY(float, scratch, 32);
  float acc = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc += x[i];
  float s = ak::block_sum(acc, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}
EMU_REGISTER(emu_selftest_block_sum)

// f32 -> f16 / bf16 -> f32 conversions (the emulator implements them in
// software; the test compares with the `half` crate bit for bit).
extern "C" __global__ void emu_selftest_convert(const float* x, __half* h, __nv_bfloat16* b, float* hb, float* bb,
                                                int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  h[i] = __float2half(x[i]);
  b[i] = __float2bfloat16(x[i]);
  hb[i] = __half2float(h[i]);
  bb[i] = __bfloat162float(b[i]);
}
EMU_REGISTER(emu_selftest_convert)

// ---- seeded bugs: one kernel per detector class (tests/emu_selftest.rs) ----

// ak::block_sum called twice in a row, with (barrier = 1) or without (0) the leading
// __syncthreads that protects `scratch` from the previous call's readers: without it,
// warp 0's lane 0 writes scratch[0] while the other warps may still read it (WAR).
__device__ float block_sum_maybe_unsafe(float v, float* scratch, int barrier) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = ak::warp_sum(v);
  if (barrier) __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < nw ? scratch[lane] : 0.0f;
  return ak::warp_sum(t);
}
extern "C" __global__ void emu_selftest_block_sum_twice(const float* x, float* out, int n, int barrier) {
  SHARED_ARRAY(float, scratch, 32);
  float a = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) a += x[i];
  float s1 = block_sum_maybe_unsafe(a, scratch, barrier);
  float s2 = block_sum_maybe_unsafe(2.0f * a, scratch, barrier);
  if (threadIdx.x == 0) out[blockIdx.x] = s1 + s2;
}
EMU_REGISTER(emu_selftest_block_sum_twice)

// Lost update: every thread does `acc += 1` on one shared float without atomics.
extern "C" __global__ void emu_selftest_lost_update(float* out) {
  SHARED_VAR(float, acc);
  if (threadIdx.x == 0) acc = 0.0f;
  __syncthreads();
  acc += 1.0f;
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = acc;
}
EMU_REGISTER(emu_selftest_lost_update)

// Within one warp: lane i writes s[i], then reads s[i+1] — with (sync = 1) or
// without a __syncwarp between (RAW between lanes of a warp: independent thread
// scheduling gives no lockstep guarantee).
extern "C" __global__ void emu_selftest_warp_exchange(float* y, int sync) {
  SHARED_ARRAY(float, s, 32);
  int lane = threadIdx.x & 31;
  s[lane] = (float)lane;
  if (sync) __syncwarp();
  y[threadIdx.x] = s[(lane + 1) & 31];
}
EMU_REGISTER(emu_selftest_warp_exchange)

// Every block writes y[0]: a write-write race between blocks of one launch.
extern "C" __global__ void emu_selftest_global_race(float* y) {
  if (threadIdx.x == 0) y[0] = (float)blockIdx.x;
}
EMU_REGISTER(emu_selftest_global_race)

// y[i] = x[i] for i < n − skip: with skip = 1 the last output element is never
// written; with x never uploaded, the reads are of never-written device memory.
extern "C" __global__ void emu_selftest_copy(const float* x, float* y, int n, int skip) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n - skip) y[i] = x[i];
}
EMU_REGISTER(emu_selftest_copy)

// Shared-memory overruns by `k` elements: static (buf[32]) when dyn = 0, dynamic
// (blockDim.x floats launched) when dyn = 1.
extern "C" __global__ void emu_selftest_smem_overrun(float* y, int k, int dyn) {
  SHARED_ARRAY(float, buf, 32);
  DYNAMIC_SHARED(float, d);
  float* p = dyn ? d : buf;
  p[threadIdx.x + k] = 1.0f;
  __syncthreads();
  y[threadIdx.x] = p[threadIdx.x];
}
EMU_REGISTER(emu_selftest_smem_overrun)

// Touches every byte of its dynamic shared memory (launch-limit tests).
extern "C" __global__ void emu_selftest_dyn_smem(float* y, int n) {
  DYNAMIC_SHARED(float, d);
  for (int i = threadIdx.x; i < n; i += blockDim.x) d[i] = (float)i;
  __syncthreads();
  if (threadIdx.x == 0) y[blockIdx.x] = d[n - 1];
}
EMU_REGISTER(emu_selftest_dyn_smem)

// States the dynamic shared memory it needs (n floats) as the crate's kernels do
// (AK_EXPECT + ak::dynamic_smem_bytes, common.cuh), then touches it.
extern "C" __global__ void emu_selftest_dyn_smem_expect(float* y, int n) {
  AK_EXPECT(ak::dynamic_smem_bytes() >= (unsigned)n * sizeof(float));
  DYNAMIC_SHARED(float, d);
  for (int i = threadIdx.x; i < n; i += blockDim.x) d[i] = (float)i;
  __syncthreads();
  if (threadIdx.x == 0) y[blockIdx.x] = d[n - 1];
}
EMU_REGISTER(emu_selftest_dyn_smem_expect)

// Spin-waits on a flag nothing sets: a hang the watchdog must turn into a failure.
extern "C" __global__ void emu_selftest_spin(int* flag) {
  while (atomicAdd(flag, 0) == 0) {
  }
}
EMU_REGISTER(emu_selftest_spin)

// Order tickets: each thread takes a ticket from a global counter, meets its warp at
// a __syncwarp, takes a second ticket (out[2t], out[2t+1]). The tickets show the
// order the scheduler ran the threads in (tests of the thread orders).
extern "C" __global__ void emu_selftest_tickets(unsigned* counter, unsigned* out) {
  unsigned t = threadIdx.x;
  out[2 * t] = atomicAdd(counter, 1u);
  __syncwarp();
  out[2 * t + 1] = atomicAdd(counter, 1u);
}
EMU_REGISTER(emu_selftest_tickets)

// A warp reads its leader's shared value, meets at warp_sum (a full-warp
// collective), and then the leader overwrites the value: ordered by the shuffles,
// so no hazard (racecheck must not report it under any thread order).
extern "C" __global__ void emu_selftest_broadcast_then_leader_write(float* y) {
  SHARED_ARRAY(float, s, 32);
  int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  if (lane == 0) s[w] = (float)w;
  __syncthreads();
  float v = ak::warp_sum(s[w]);
  if (lane == 0) s[w] = v;
  __syncthreads();
  y[threadIdx.x] = s[w];
}
EMU_REGISTER(emu_selftest_broadcast_then_leader_write)

// Block 0 writes x[0]; block 1 reads it (mode 0: RAW between blocks), or every
// thread reads x[0] and thread 0 of the last block then adds to it with atomicAdd
// (mode 1: WAR between a plain read and an atomic).
extern "C" __global__ void emu_selftest_cross_block(float* x, float* y, int mode) {
  if (mode == 0) {
    if (blockIdx.x == 0 && threadIdx.x == 0) x[0] = 1.0f;
    if (blockIdx.x == 1 && threadIdx.x == 0) y[0] = x[0];
  } else {
    y[blockIdx.x * blockDim.x + threadIdx.x] = x[0];
    if (blockIdx.x == gridDim.x - 1 && threadIdx.x == 0) atomicAdd(&x[0], 1.0f);
  }
}
EMU_REGISTER(emu_selftest_cross_block)

// A kernel with a launch bound of 128 threads, declared as the crate's kernels declare
// theirs (AK_KERNEL_BOUND + EMU_REGISTER_BOUND, common.cuh): the driver must refuse a
// 256-thread block, as a GPU refuses a block above __launch_bounds__(128).
constexpr int EMU_SELFTEST_BOUND = 128;
AK_KERNEL_BOUND(EMU_SELFTEST_BOUND) void emu_selftest_bounded(float* y, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) y[i] = 1.0f;
}
EMU_REGISTER_BOUND(emu_selftest_bounded, EMU_SELFTEST_BOUND)

// ---- tensor-core primitives (kernels/mma.cuh) ----
// The same source compiles under nvcc (scripts/mma-check.sh checks its SASS).

// D = A·B + C for A [M][K], B [K][N] row-major (raw f16/bf16 bits for op 0..2, f32 for
// op 3), C and D [M][N] f32, any M, N, K (tiles past the edges are zero-padded): one
// warp per 16×8 tile of D, blockIdx = (n tile, m tile). op: 0 m16n8k16 f16, 1 m16n8k16
// bf16, 2 m16n8k8 f16, 3 m16n8k8 tf32. load: how the fragments are loaded —
//   0 by hand, from the PTX layouts' lane indices;
//   1 ldmatrix (x4/x2 A from a row-major tile, x2/x1 B from an n-major tile);
//   2 ldmatrix .trans (A from a k-major tile, B from a k-major tile);
//   3 by hand with the B fragment transposed (B[g][2t] instead of B[2t][g]): a seeded
//     fragment-index bug, whose result must differ;
//   4 A by ldmatrix, B by ldmatrix .trans; 5 A by ldmatrix .trans, B by ldmatrix — mixed,
//     so that a mistake in one form cannot cancel out (a swap of the k-pairs in both
//     A and B, as one ldmatrix bug used for both would make, leaves A·B unchanged).
extern "C" __global__ void emu_selftest_mma(int op, int load, const void* A, const void* B, const float* C, float* D,
                                            int M, int N, int K) {
  SHARED_ARRAY(uint16_t, sa, 16 * 24);
  SHARED_ARRAY(uint16_t, sb, 16 * 24);
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.y * 16, n0 = blockIdx.x * 8;
  const int KS = op <= 1 ? 16 : 8;
  const uint16_t* A16 = static_cast<const uint16_t*>(A);
  const uint16_t* B16 = static_cast<const uint16_t*>(B);
  const uint32_t* A32 = static_cast<const uint32_t*>(A);
  const uint32_t* B32 = static_cast<const uint32_t*>(B);
  auto a16 = [&](int m, int k) -> uint32_t { return (m0 + m < M && k < K) ? A16[(m0 + m) * K + k] : 0u; };
  auto b16 = [&](int k, int n) -> uint32_t { return (k < K && n0 + n < N) ? B16[k * N + n0 + n] : 0u; };
  auto a32 = [&](int m, int k) -> uint32_t { return (m0 + m < M && k < K) ? A32[(m0 + m) * K + k] : 0u; };
  auto b32 = [&](int k, int n) -> uint32_t { return (k < K && n0 + n < N) ? B32[k * N + n0 + n] : 0u; };
  float acc[4];
  for (int i = 0; i < 4; ++i) {
    int m = m0 + g + (i >= 2 ? 8 : 0), n = n0 + 2 * t + (i & 1);
    acc[i] = (m < M && n < N) ? C[m * N + n] : 0.0f;
  }
  for (int k0 = 0; k0 < K; k0 += KS) {
    if (op == 3) {
      uint32_t a[4] = {a32(g, k0 + t), a32(g + 8, k0 + t), a32(g, k0 + t + 4), a32(g + 8, k0 + t + 4)};
      uint32_t b[2];
      if (load == 3) {
        b[0] = b32(k0 + g, t);
        b[1] = b32(k0 + g, t + 4);
      } else {
        b[0] = b32(k0 + t, g);
        b[1] = b32(k0 + t + 4, g);
      }
      ak::mma::mma_m16n8k8_tf32(acc, a, b, acc);
      continue;
    }
    uint32_t a[4] = {0u, 0u, 0u, 0u}, b[2] = {0u, 0u};
    if (load == 0 || load == 3) {
      auto pa = [&](int m, int k) { return a16(m, k0 + k) | a16(m, k0 + k + 1) << 16; };
      a[0] = pa(g, 2 * t);
      a[1] = pa(g + 8, 2 * t);
      a[2] = pa(g, 2 * t + 8);
      a[3] = pa(g + 8, 2 * t + 8);
      if (load == 0) {
        b[0] = b16(k0 + 2 * t, g) | b16(k0 + 2 * t + 1, g) << 16;
        b[1] = b16(k0 + 2 * t + 8, g) | b16(k0 + 2 * t + 9, g) << 16;
      } else {
        b[0] = b16(k0 + g, 2 * t) | b16(k0 + g, 2 * t + 1) << 16;
        b[1] = b16(k0 + g + 8, 2 * t) | b16(k0 + g + 8, 2 * t + 1) << 16;
      }
    } else {
      // Stage the 16×16 A tile and the 16×8 B tile in shared memory (rows 16-byte
      // aligned), then load the fragments with ldmatrix.
      const bool a_trans = load == 2 || load == 5, b_trans = load == 2 || load == 4;
      for (int e = lane; e < 16 * 16; e += 32) {
        int r = e / 16, c = e % 16;
        if (!a_trans) sa[r * 24 + c] = (uint16_t)a16(r, k0 + c);  // [m][k]
        else sa[c * 24 + r] = (uint16_t)a16(r, k0 + c);           // [k][m]
      }
      for (int e = lane; e < 16 * 8; e += 32) {
        int k = e / 8, n = e % 8;
        if (!b_trans) sb[n * 24 + k] = (uint16_t)b16(k0 + k, n);  // [n][k]
        else sb[k * 8 + n] = (uint16_t)b16(k0 + k, n);            // [k][n]
      }
      __syncwarp();
      const int i = lane / 8, r8 = lane % 8;
      if (KS == 16) {
        if (!a_trans) ak::mma::ldmatrix_x4(a, &sa[((i & 1) * 8 + r8) * 24 + (i >> 1) * 8]);
        else ak::mma::ldmatrix_x4_trans(a, &sa[((i >> 1) * 8 + r8) * 24 + (i & 1) * 8]);
        if (!b_trans) ak::mma::ldmatrix_x2(b, &sb[r8 * 24 + (i & 1) * 8]);
        else ak::mma::ldmatrix_x2_trans(b, &sb[((i & 1) * 8 + r8) * 8]);
      } else {
        uint32_t a2[2], b1[1];
        if (!a_trans) ak::mma::ldmatrix_x2(a2, &sa[((i & 1) * 8 + r8) * 24]);
        else ak::mma::ldmatrix_x2_trans(a2, &sa[r8 * 24 + (i & 1) * 8]);
        if (!b_trans) ak::mma::ldmatrix_x1(b1, &sb[r8 * 24]);
        else ak::mma::ldmatrix_x1_trans(b1, &sb[r8 * 8]);
        a[0] = a2[0];
        a[1] = a2[1];
        b[0] = b1[0];
      }
      __syncwarp();  // the next k-step's staging overwrites what ldmatrix read
    }
    if (op == 0) {
      ak::mma::mma_m16n8k16_f16(acc, a, b, acc);
    } else if (op == 1) {
      ak::mma::mma_m16n8k16_bf16(acc, a, b, acc);
    } else {
      const uint32_t a2[2] = {a[0], a[1]}, b1[1] = {b[0]};
      ak::mma::mma_m16n8k8_f16(acc, a2, b1, acc);
    }
  }
  for (int i = 0; i < 4; ++i) {
    int m = m0 + g + (i >= 2 ? 8 : 0), n = n0 + 2 * t + (i & 1);
    if (m < M && n < N) D[m * N + n] = acc[i];
  }
}
EMU_REGISTER(emu_selftest_mma)

// mma.sync called by part of a warp: mode 0 — lanes 16..31 exit first; mode 1 — the
// two half-warps call it at two different sites; mode 2 — every lane at one site
// (the control, which must pass). y[32] receives d[0] of each lane.
extern "C" __global__ void emu_selftest_mma_divergent(float* y, int mode) {
  const int lane = threadIdx.x & 31;
  const uint32_t a[4] = {0x3c003c00u, 0x3c003c00u, 0x3c003c00u, 0x3c003c00u};  // f16 1.0 pairs
  const uint32_t b[2] = {0x3c003c00u, 0x3c003c00u};
  float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (mode == 0 && lane >= 16) return;
  if (mode == 1 && lane < 16) {
    ak::mma::mma_m16n8k16_f16(d, a, b, d);
  } else {
    ak::mma::mma_m16n8k16_f16(d, a, b, d);
  }
  y[threadIdx.x] = d[0];
}
EMU_REGISTER(emu_selftest_mma_divergent)

// cp.async through two groups, 64 threads, x[0..n) (n ≥ 128 except mode 4): group 0 —
// thread t copies x[t] (4 bytes, .ca) to s0[t]; group 1 — threads 0..15 copy x[64+4t..]
// (16 bytes, .cg) to s1[4t..]. Then y[t] = s0[63−t] and y[64+t] = s1[63−t]:
//   mode 0: wait_group<1> (retires group 0), __syncthreads, read s0; wait_group<0>,
//           __syncthreads, read s1 — correct;
//   mode 1: reads s0 without any wait (a read of an in-flight cp.async);
//   mode 2: after wait_group<1>, reads s1 (group 1 is still in flight);
//   mode 3: group 0 copies from x[t + n] (out of bounds of x);
//   mode 4: zero-fill — thread t copies min(16, 4·(n − 4t)) bytes of x[4t..4t+4) into
//           s0[4t..] (16-byte cp.async, the rest zero) for 4t < 64; y[t] = s0[t];
//   mode 5: as mode 0 with a __syncwarp in place of the first __syncthreads: thread t
//           reads s0[63−t], copied by a thread of the other warp, after that thread's
//           wait but unordered with it (racecheck RAW).
extern "C" __global__ void emu_selftest_cp_async(const float* x, float* y, int n, int mode) {
  SHARED_ARRAY(float, s0, 64);
  SHARED_ARRAY(float, s1, 64);
  const int t = threadIdx.x;
  if (mode == 4) {
    if (t < 16) {
      int left = n - 4 * t, bytes = left <= 0 ? 0 : (left >= 4 ? 16 : 4 * left);
      ak::mma::cp_async_ca_zfill<16>(&s0[4 * t], bytes > 0 ? &x[4 * t] : x, bytes);
    }
    ak::mma::cp_async_commit_group();
    ak::mma::cp_async_wait_group<0>();
    __syncthreads();
    y[t] = s0[t];
    return;
  }
  ak::mma::cp_async_ca<4>(&s0[t], &x[mode == 3 ? t + n : t]);
  ak::mma::cp_async_commit_group();
  if (t < 16) ak::mma::cp_async_cg(&s1[4 * t], &x[64 + 4 * t]);
  ak::mma::cp_async_commit_group();
  if (mode != 1) ak::mma::cp_async_wait_group<1>();
  if (mode == 5) __syncwarp();
  else __syncthreads();
  y[t] = mode == 2 ? s1[63 - t] : s0[63 - t];
  ak::mma::cp_async_wait_group<0>();
  __syncthreads();
  y[64 + t] = s1[63 - t];
}
EMU_REGISTER(emu_selftest_cp_async)
