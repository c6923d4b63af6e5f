// runtime.cpp — host runtime of the emulated CUDA device (feature `emulate`).
//
// 1. Kernel registry: EMU_REGISTER(name) in the host-compiled kernels adds
//    name -> (entry point, argument trampoline).
// 2. Block execution: every thread of a block is a ucontext fiber on one host
//    thread; __syncthreads / warp collectives yield to a scheduler that releases a
//    barrier only when every live participant has arrived. The order in which the
//    scheduler runs ready fibers is configurable (identity, reversed, shuffled) so
//    tests can prove results do not depend on it. Blocks of one launch run in
//    parallel on several host threads.
// 3. A fake libcuda: the driver entry points cudarc 0.19 calls, with device memory
//    = host memory and every operation synchronous. Built as a shared object with
//    soname libcuda.so and loaded by absolute path, on request only (see
//    src/emu.rs): it never shadows a real driver.
//
// Contract violations inside a kernel (deadlock at a barrier, a warp collective
// waiting for an exited or non-existent lane) make the launch fail with
// CUDA_ERROR_LAUNCH_FAILED and a message readable through emu_last_fault().
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cuda_emu.h"

#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
#else
#define EMU_ASAN 0
#endif

namespace emu {

thread_local const ThreadCtx* cur = nullptr;

namespace {

struct Kernel {
  void* fn;
  Trampoline tramp;
  const char* name;
};
std::map<std::string, Kernel>& registry() {
  static std::map<std::string, Kernel> r;
  return r;
}

// ---- schedule configuration and diagnostics ----
std::atomic<int> g_mode{0};  // 0 identity, 1 reversed, 2 shuffled
std::atomic<unsigned long long> g_seed{0};
std::atomic<int> g_threads{0};  // 0: hardware concurrency
std::atomic<long long> g_live_allocs{0};
std::mutex g_fault_mu;
std::string g_fault;

enum State { READY, AT_BLOCK, AT_WARP, DONE };

#if EMU_ASAN
constexpr size_t kStack = 128 * 1024;  // ASan clears the shadow of the whole stack at every swapcontext: keep it small
#else
constexpr size_t kStack = 128 * 1024;
#endif
constexpr size_t kGuard = 4096;

struct Fiber {
  ucontext_t uc;
  ThreadCtx tc;
  State state;
  unsigned mask;
  char* stack;  // usable region (above the guard page)
};

struct Launch {
  Kernel k;
  void** params;
  dim3 grid, block;
  unsigned smem;
  std::atomic<long long> next{0};
  std::atomic<bool> failed{false};
};

struct Runner {
  std::vector<Fiber> fibers;
  std::vector<uint64_t> slots;  // 32 per warp
  std::vector<unsigned char> smem;
  ucontext_t sched;
  Launch* L = nullptr;
  int current = -1;
  bool faulted = false;
  std::string fault;
#if EMU_ASAN
  void* fake_stack = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
#endif
  ~Runner() {
    for (auto& f : fibers)
      if (f.stack) munmap(f.stack - kGuard, kStack + kGuard);
  }
};
thread_local Runner* tl = nullptr;

void set_fault(const std::string& m) {
  std::lock_guard<std::mutex> g(g_fault_mu);
  if (g_fault.empty()) g_fault = m;
}

// Switch from a fiber back to the scheduler.
void to_sched(Fiber& f) {
#if EMU_ASAN
  void* fs = nullptr;
  __sanitizer_start_switch_fiber(&fs, tl->sched_bottom, tl->sched_size);
  swapcontext(&f.uc, &tl->sched);
  __sanitizer_finish_switch_fiber(fs, nullptr, nullptr);
#else
  swapcontext(&f.uc, &tl->sched);
#endif
}

void fiber_main() {
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &tl->sched_bottom, &tl->sched_size);
#endif
  Runner* r = tl;
  r->L->k.tramp(r->L->k.fn, r->L->params);
  r->fibers[r->current].state = DONE;
#if EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, r->sched_bottom, r->sched_size);
#endif
  // uc_link returns to the scheduler.
}

void run_fiber(Runner& r, int i) {
  r.current = i;
  cur = &r.fibers[i].tc;
#if EMU_ASAN
  __sanitizer_start_switch_fiber(&r.fake_stack, r.fibers[i].stack, kStack);
  swapcontext(&r.sched, &r.fibers[i].uc);
  __sanitizer_finish_switch_fiber(r.fake_stack, nullptr, nullptr);
#else
  swapcontext(&r.sched, &r.fibers[i].uc);
#endif
}

std::string block_name(const ThreadCtx& t) {
  char b[96];
  snprintf(b, sizeof b, "block (%u,%u,%u)", t.bid.x, t.bid.y, t.bid.z);
  return b;
}

// Runs one block to completion. Returns false on a contract violation.
bool run_block(Runner& r, uint3 bid) {
  Launch& L = *r.L;
  int n = (int)(L.block.x * L.block.y * L.block.z);
  int nwarps = (n + 31) / 32;
  if ((int)r.fibers.size() < n) {
    size_t old = r.fibers.size();
    r.fibers.resize(n);
    for (size_t i = old; i < (size_t)n; ++i) {
      void* m = mmap(nullptr, kStack + kGuard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (m == MAP_FAILED) {
        r.fault = "emulator: cannot allocate fiber stacks";
        r.fibers.resize(i);
        return false;
      }
      mprotect(m, kGuard, PROT_NONE);  // stack overflow -> SIGSEGV, not corruption
      r.fibers[i].stack = static_cast<char*>(m) + kGuard;
    }
  }
  r.slots.assign((size_t)nwarps * 32, 0);
  r.smem.assign(L.smem, 0xA5);  // poison: uninitialised dynamic smem is not zero
  for (int i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    f.tc.tid = uint3{(unsigned)(i % L.block.x), (unsigned)((i / L.block.x) % L.block.y),
                     (unsigned)(i / (L.block.x * L.block.y))};
    f.tc.bid = bid;
    f.tc.bdim = L.block;
    f.tc.gdim = L.grid;
    f.state = READY;
    f.mask = 0;
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack;
    f.uc.uc_stack.ss_size = kStack;
    f.uc.uc_link = &r.sched;
    makecontext(&f.uc, fiber_main, 0);
  }
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  int mode = g_mode.load();
  if (mode == 1) std::reverse(order.begin(), order.end());
  if (mode == 2) {
    unsigned long long lin = bid.x + (unsigned long long)L.grid.x * (bid.y + (unsigned long long)L.grid.y * bid.z);
    std::mt19937_64 rng(g_seed.load() * 0x9E3779B97F4A7C15ull + lin);
    std::shuffle(order.begin(), order.end(), rng);
  }
  for (;;) {
    bool progressed = false;
    for (int i : order) {
      if (r.fibers[i].state == READY) {
        run_fiber(r, i);
        progressed = true;
        if (r.faulted) return false;
      }
    }
    int live = 0, at_block = 0;
    for (int i = 0; i < n; ++i) {
      live += r.fibers[i].state != DONE;
      at_block += r.fibers[i].state == AT_BLOCK;
    }
    if (live == 0) return true;
    if (at_block == live) {
      for (int i = 0; i < n; ++i)
        if (r.fibers[i].state == AT_BLOCK) r.fibers[i].state = READY;
      continue;
    }
    for (int w = 0; w < nwarps; ++w) {
      int base = w * 32, lanes = std::min(32, n - base);
      int first = -1;
      for (int l = 0; l < lanes; ++l)
        if (r.fibers[base + l].state == AT_WARP) {
          first = l;
          break;
        }
      if (first < 0) continue;
      unsigned m = r.fibers[base + first].mask;
      bool ready = true;
      for (int l = 0; l < 32; ++l) {
        if (!((m >> l) & 1u)) continue;
        if (l >= lanes) {
          r.fault = block_name(r.fibers[base].tc) + ": warp collective mask names lane " + std::to_string(l) +
                    " of warp " + std::to_string(w) + ", which does not exist (block has " + std::to_string(n) +
                    " threads)";
          return false;
        }
        State s = r.fibers[base + l].state;
        if (s == DONE) {
          r.fault = block_name(r.fibers[base].tc) + ": warp collective waits for exited lane " +
                    std::to_string(l) + " of warp " + std::to_string(w);
          return false;
        }
        if (s != AT_WARP || r.fibers[base + l].mask != m) ready = false;
      }
      if (ready) {
        for (int l = 0; l < lanes; ++l)
          if ((m >> l) & 1u) r.fibers[base + l].state = READY;
        progressed = true;
      }
    }
    if (!progressed) {
      r.fault = block_name(r.fibers[0].tc) +
                ": deadlock — threads wait at __syncthreads while others wait at a warp collective or have "
                "exited, or warp collectives with mismatched masks";
      return false;
    }
  }
}

// Runners (fiber stacks and per-block buffers) are pooled across launches: a
// launch's worker threads are new each time, but re-mapping hundreds of fiber
// stacks per launch dominated run time (most of all under AddressSanitizer).
std::mutex g_pool_mu;
std::vector<Runner*> g_pool;

Runner* take_runner() {
  std::lock_guard<std::mutex> g(g_pool_mu);
  if (g_pool.empty()) return new Runner;
  Runner* r = g_pool.back();
  g_pool.pop_back();
  return r;
}

void give_runner(Runner* r) {
  r->L = nullptr;
  r->current = -1;
  r->faulted = false;
  r->fault.clear();
  std::lock_guard<std::mutex> g(g_pool_mu);
  g_pool.push_back(r);
}

void worker(Launch* L) {
  Runner& r = *take_runner();
  tl = &r;
  r.L = L;
  long long total = (long long)L->grid.x * L->grid.y * L->grid.z;
  for (;;) {
    long long b = L->next.fetch_add(1);
    if (b >= total || L->failed.load()) break;
    if (g_mode.load() == 1) b = total - 1 - b;
    uint3 bid{(unsigned)(b % L->grid.x), (unsigned)((b / L->grid.x) % L->grid.y),
              (unsigned)(b / ((long long)L->grid.x * L->grid.y))};
    if (!run_block(r, bid)) {
      L->failed.store(true);
      set_fault(r.fault);
      break;
    }
  }
  tl = nullptr;
  cur = nullptr;
  give_runner(&r);
}

}  // namespace

void register_kernel(const char* name, void* fn, Trampoline t) { registry()[name] = Kernel{fn, t, name}; }

// AK_EMU_TRACE=<file>: append the name of every launched kernel (coverage check:
// which registered kernels the test suites actually run).
void trace_launch(const char* name) {
  static const char* path = getenv("AK_EMU_TRACE");
  if (!path) return;
  static std::mutex mu;
  std::lock_guard<std::mutex> g(mu);
  if (FILE* f = fopen(path, "a")) {
    fprintf(f, "%s\n", name);
    fclose(f);
  }
}

void syncthreads() {
  Fiber& f = tl->fibers[tl->current];
  f.state = AT_BLOCK;
  to_sched(f);
}

void warp_sync(unsigned mask) {
  Fiber& f = tl->fibers[tl->current];
  if (!((mask >> lane_id()) & 1u)) fault("warp collective called by a lane that is not in its mask");
  f.state = AT_WARP;
  f.mask = mask;
  to_sched(f);
}

uint64_t* warp_slots() { return tl->slots.data() + (size_t)(tl->current / 32) * 32; }
int lane_id() { return tl->current % 32; }
void* dynamic_smem() { return tl->smem.data(); }

void fault(const char* what) {
  Runner* r = tl;
  r->fault = block_name(r->fibers[r->current].tc) + ": " + what;
  r->faulted = true;
  Fiber& f = r->fibers[r->current];
  f.state = DONE;
  to_sched(f);  // never resumed
  std::abort();
}

}  // namespace emu

// ------------------------------------------------------------------------------
// Fake driver API (the subset cudarc 0.19 uses). Types are ABI-compatible with
// cuda.h: handles are pointers, CUdevice is int, CUdeviceptr is 64-bit.
// ------------------------------------------------------------------------------
typedef int CUresult;
typedef int CUdevice;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUevent;
typedef void* CUmodule;
typedef void* CUfunction;
typedef unsigned long long CUdeviceptr;

enum : int {
  CUDA_SUCCESS = 0,
  CUDA_ERROR_INVALID_VALUE = 1,
  CUDA_ERROR_OUT_OF_MEMORY = 2,
  CUDA_ERROR_INVALID_DEVICE = 101,
  CUDA_ERROR_INVALID_HANDLE = 400,
  CUDA_ERROR_NOT_FOUND = 500,
  CUDA_ERROR_LAUNCH_FAILED = 719,
  CUDA_ERROR_NOT_SUPPORTED = 801,
};

namespace {
int g_ctx_token, g_module_token;
thread_local CUcontext tl_ctx = nullptr;

const char* err_name(CUresult e) {
  switch (e) {
    case CUDA_SUCCESS: return "CUDA_SUCCESS";
    case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
    case CUDA_ERROR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
    case CUDA_ERROR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
    case CUDA_ERROR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
    case CUDA_ERROR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
    case CUDA_ERROR_LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
    case CUDA_ERROR_NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
    default: return "CUDA_ERROR_UNKNOWN";
  }
}

CUresult alloc(CUdeviceptr* p, size_t bytes) {
  if (!p) return CUDA_ERROR_INVALID_VALUE;
  void* m = nullptr;
  // Exact size (no rounding up) so that AddressSanitizer's redzone starts right
  // after the last byte: an out-of-bounds kernel access is reported.
  if (posix_memalign(&m, 256, bytes ? bytes : 1) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
  emu::g_live_allocs.fetch_add(1);
  *p = (CUdeviceptr)(uintptr_t)m;
  return CUDA_SUCCESS;
}
CUresult release(CUdeviceptr p) {
  if (!p) return CUDA_SUCCESS;
  free((void*)(uintptr_t)p);
  emu::g_live_allocs.fetch_sub(1);
  return CUDA_SUCCESS;
}
}  // namespace

#define EXPORT extern "C" __attribute__((visibility("default")))

// ---- emulator controls (used by the crate's emulate module and tests) ----
EXPORT void emu_set_schedule(int mode, unsigned long long seed) {
  emu::g_mode.store(mode);
  emu::g_seed.store(seed);
}
EXPORT void emu_set_threads(int n) { emu::g_threads.store(n); }
EXPORT long long emu_live_allocations() { return emu::g_live_allocs.load(); }
EXPORT size_t emu_take_fault(char* buf, size_t len) {
  std::lock_guard<std::mutex> g(emu::g_fault_mu);
  size_t n = emu::g_fault.size();
  if (buf && len) {
    size_t c = std::min(n, len - 1);
    std::memcpy(buf, emu::g_fault.data(), c);
    buf[c] = 0;
  }
  emu::g_fault.clear();
  return n;
}
EXPORT int emu_kernel_count() { return (int)emu::registry().size(); }
// Writes the registered kernel names, one per line, to `path` (coverage check).
EXPORT int emu_list_kernels(const char* path) {
  FILE* f = fopen(path, "w");
  if (!f) return -1;
  for (auto& kv : emu::registry()) fprintf(f, "%s\n", kv.first.c_str());
  fclose(f);
  return (int)emu::registry().size();
}

// ---- device, context ----
EXPORT CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
EXPORT CUresult cuDriverGetVersion(int* v) {
  *v = 13000;
  return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGetCount(int* c) {
  *c = 1;
  return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGet(CUdevice* d, int ordinal) {
  if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
  *d = 0;
  return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGetName(char* name, int len, CUdevice) {
  snprintf(name, (size_t)len, "%s", "activation-kernels emulated device (host)");
  return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceTotalMem_v2(size_t* b, CUdevice) {
  *b = (size_t)16 << 30;
  return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGetAttribute(int* v, int attrib, CUdevice) {
  switch (attrib) {
    case 1: *v = 1024; break;                   // max threads per block
    case 2: case 3: *v = 1024; break;           // max block dim x, y
    case 4: *v = 64; break;                     // max block dim z
    case 5: *v = 2147483647; break;             // max grid dim x
    case 6: case 7: *v = 65535; break;          // max grid dim y, z
    case 8: *v = 49152; break;                  // shared memory per block
    case 10: *v = 32; break;                    // warp size
    case 12: *v = 65536; break;                 // registers per block
    case 16: *v = 84; break;                    // multiprocessors
    case 39: *v = 1536; break;                  // threads per multiprocessor
    case 75: *v = 8; break;                     // compute capability major
    case 76: *v = 6; break;                     // compute capability minor
    case 81: *v = 102400; break;                // shared memory per multiprocessor
    case 97: *v = 101376; break;                // shared memory per block (opt-in)
    case 115: *v = 1; break;                    // memory pools supported
    default: *v = 0; break;
  }
  return CUDA_SUCCESS;
}
EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice) {
  *c = &g_ctx_token;
  return CUDA_SUCCESS;
}
EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
EXPORT CUresult cuCtxSetCurrent(CUcontext c) {
  tl_ctx = c;
  return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxGetCurrent(CUcontext* c) {
  *c = tl_ctx;
  return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxGetDevice(CUdevice* d) {
  *d = 0;
  return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxSynchronize() { return CUDA_SUCCESS; }

// ---- streams and events: everything is synchronous ----
EXPORT CUresult cuStreamCreate(CUstream* s, unsigned) {
  *s = new int(0);
  return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamCreateWithPriority(CUstream* s, unsigned, int) {
  *s = new int(0);
  return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamDestroy_v2(CUstream s) {
  delete static_cast<int*>(s);
  return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamSynchronize(CUstream) { return CUDA_SUCCESS; }
EXPORT CUresult cuStreamQuery(CUstream) { return CUDA_SUCCESS; }
EXPORT CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return CUDA_SUCCESS; }
EXPORT CUresult cuEventCreate(CUevent* e, unsigned) {
  *e = new int(0);
  return CUDA_SUCCESS;
}
EXPORT CUresult cuEventDestroy_v2(CUevent e) {
  delete static_cast<int*>(e);
  return CUDA_SUCCESS;
}
EXPORT CUresult cuEventRecord(CUevent, CUstream) { return CUDA_SUCCESS; }
EXPORT CUresult cuEventSynchronize(CUevent) { return CUDA_SUCCESS; }
EXPORT CUresult cuEventQuery(CUevent) { return CUDA_SUCCESS; }
EXPORT CUresult cuEventElapsedTime(float* ms, CUevent, CUevent) {
  *ms = 0.f;
  return CUDA_SUCCESS;
}
EXPORT CUresult cuEventElapsedTime_v2(float* ms, CUevent, CUevent) {
  *ms = 0.f;
  return CUDA_SUCCESS;
}

// ---- memory ----
EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t b) { return alloc(p, b); }
EXPORT CUresult cuMemAllocAsync(CUdeviceptr* p, size_t b, CUstream) { return alloc(p, b); }
EXPORT CUresult cuMemFree_v2(CUdeviceptr p) { return release(p); }
EXPORT CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) { return release(p); }
EXPORT CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
  *free_b = (size_t)8 << 30;
  *total = (size_t)16 << 30;
  return CUDA_SUCCESS;
}
EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* s, size_t b) {
  if (b) std::memcpy((void*)(uintptr_t)d, s, b);
  return CUDA_SUCCESS;
}
EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* s, size_t b, CUstream) {
  return cuMemcpyHtoD_v2(d, s, b);
}
EXPORT CUresult cuMemcpyDtoH_v2(void* d, CUdeviceptr s, size_t b) {
  if (b) std::memcpy(d, (const void*)(uintptr_t)s, b);
  return CUDA_SUCCESS;
}
EXPORT CUresult cuMemcpyDtoHAsync_v2(void* d, CUdeviceptr s, size_t b, CUstream) { return cuMemcpyDtoH_v2(d, s, b); }
EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t b) {
  if (b) std::memmove((void*)(uintptr_t)d, (const void*)(uintptr_t)s, b);
  return CUDA_SUCCESS;
}
EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t b, CUstream) {
  return cuMemcpyDtoD_v2(d, s, b);
}
EXPORT CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
  if (n) std::memset((void*)(uintptr_t)d, v, n);
  return CUDA_SUCCESS;
}
EXPORT CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUstream) { return cuMemsetD8_v2(d, v, n); }
EXPORT CUresult cuMemsetD32_v2(CUdeviceptr d, unsigned v, size_t n) {
  unsigned* p = (unsigned*)(uintptr_t)d;
  for (size_t i = 0; i < n; ++i) p[i] = v;
  return CUDA_SUCCESS;
}
EXPORT CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, CUstream) { return cuMemsetD32_v2(d, v, n); }

// ---- modules and launches ----
EXPORT CUresult cuModuleLoadData(CUmodule* m, const void*) {
  *m = &g_module_token;
  return CUDA_SUCCESS;
}
EXPORT CUresult cuModuleUnload(CUmodule) { return CUDA_SUCCESS; }
EXPORT CUresult cuModuleGetFunction(CUfunction* f, CUmodule, const char* name) {
  auto& r = emu::registry();
  auto it = r.find(name);
  if (it == r.end()) return CUDA_ERROR_NOT_FOUND;
  *f = &it->second;
  return CUDA_SUCCESS;
}
EXPORT CUresult cuFuncGetAttribute(int* v, int, CUfunction) {
  *v = 0;
  return CUDA_SUCCESS;
}
EXPORT CUresult cuFuncSetAttribute(CUfunction, int, int) { return CUDA_SUCCESS; }
EXPORT CUresult cuFuncSetCacheConfig(CUfunction, int) { return CUDA_SUCCESS; }
EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned smem, CUstream, void** params, void**) {
  if (!f) return CUDA_ERROR_INVALID_HANDLE;
  if (!gx || !gy || !gz || !bx || !by || !bz || bx * by * bz > 1024 || bz > 64) return CUDA_ERROR_INVALID_VALUE;
  emu::Launch L;
  L.k = *static_cast<emu::Kernel*>(f);
  emu::trace_launch(L.k.name);
  L.params = params;
  L.grid = dim3(gx, gy, gz);
  L.block = dim3(bx, by, bz);
  L.smem = smem;
  long long blocks = (long long)gx * gy * gz;
  int hw = emu::g_threads.load();
  if (hw <= 0) hw = (int)std::max(1u, std::thread::hardware_concurrency());
  int nt = (int)std::min<long long>(hw, blocks);
  std::vector<std::thread> ts;
  for (int i = 1; i < nt; ++i) ts.emplace_back(emu::worker, &L);
  emu::worker(&L);
  for (auto& t : ts) t.join();
  return L.failed.load() ? CUDA_ERROR_LAUNCH_FAILED : CUDA_SUCCESS;
}

EXPORT CUresult cuGetErrorString(CUresult e, const char** s) {
  *s = err_name(e);
  return CUDA_SUCCESS;
}
EXPORT CUresult cuGetErrorName(CUresult e, const char** s) {
  *s = err_name(e);
  return CUDA_SUCCESS;
}
