// selftest.cu — kernels that exist only in the emulated device, to prove the
// emulator catches what it claims (missing barrier, out-of-bounds write) and
// implements warp collectives correctly for full and partial warps.
#include "../common.cuh"


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
