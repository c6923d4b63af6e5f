// internal.h — what the three parts of the emulated device share:
//
//   sched.cpp   the scheduler: blocks of fibers, barriers, warp collectives, the
//               thread orders, per-block shared memory, the watchdog;
//   shadow.cpp  the checked heap and shadow memory: device allocations and shared
//               memory with redzones, and the race / init / bounds detectors fed by
//               the compiler's instrumentation of every kernel load and store;
//   driver.cpp  the fake libcuda: the driver entry points cudarc calls, launch
//               limits, function attributes, device properties.
//
// Never included by kernels (they see cuda_emu.h only).
#pragma once
#include <ucontext.h>

// Fibers switch through a few lines of assembly on x86-64 (sched.cpp: emu_switch);
// elsewhere — and under x32, or when built with CET shadow stacks, which a switch of
// stacks by `ret` would fault — through ucontext. glibc's swapcontext saves and
// restores the signal mask with an rt_sigprocmask system call per switch (two per
// fiber round trip), which took about 60 % of the emulator's run time (perf, a
// tensor-core parity test, 2026-12-07).
#ifndef EMU_FAST_SWITCH  // -DEMU_FAST_SWITCH=0 forces ucontext (a build check of that path)
#if defined(__x86_64__) && !defined(__ILP32__) && !(defined(__CET__) && (__CET__ & 2))
#define EMU_FAST_SWITCH 1
#else
#define EMU_FAST_SWITCH 0
#endif
#endif

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_emu.h"

namespace emu {

// ---- kernels and their attributes ----
struct Kernel {
  void* fn;
  Trampoline tramp;
  const char* name;
  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (raised by cuFuncSetAttribute).
  int max_dynamic_smem;
  // From the ptxas table for the emulated arch (-1: not in the table).
  int regs;
  int static_smem;
  // __launch_bounds__ (max threads per block) the kernel was compiled with.
  int max_threads;
};
Kernel* find_kernel(const char* name);
// Every registered kernel, by name.
std::vector<Kernel*> all_kernels();

// ---- the emulated GPU (AK_EMU_ARCH=86 | 90 | 75) ----
struct Arch {
  int sm;                  // 75, 86 or 90
  int sms;                 // multiprocessors
  int threads_per_sm;
  int blocks_per_sm;
  int regs_per_sm;         // 65536
  int regs_per_block;      // 65536
  int smem_per_sm;         // bytes
  int smem_optin;          // dynamic + static per block, with the attribute
  const char* name;
};
const Arch& arch();
// The virtual arch the kernels count as compiled for (AK_EMU_PTX=75 on a newer GPU: an
// sm_75-only build JIT-compiled there); the GPU's arch otherwise.
int built_sm();
constexpr int kDefaultDynamicSmem = 48 * 1024;
constexpr int kMaxStaticSmem = 48 * 1024;

// ---- detectors (AK_EMU_CHECK) ----
enum Check : int { CHECK_RACE = 1, CHECK_INIT = 2, CHECK_MEM = 4, CHECK_ALL = 7 };
// Detectors in force (0 when the kernels were built without instrumentation).
int checks();
// Whether the kernels were compiled with access instrumentation.
bool instrumented();

// ---- a launch and the host thread that runs its blocks ----
enum State { READY, AT_BLOCK, AT_WARP, DONE };

// One cp.async in flight (issued, not yet retired by cp.async.wait_group): the
// source bytes were read at issue; the destination is written when a wait retires it.
struct AsyncCopy {
  unsigned char* dst;
  unsigned char data[16];
  int bytes;        // cp-size: 4, 8 or 16 (bytes past src-size are zeros)
  uint64_t group;   // the thread's commit count at issue: committed once commits > group
};

struct Fiber {
#if EMU_FAST_SWITCH
  void* sp = nullptr;  // saved stack pointer (sched.cpp's emu_switch)
#else
  ucontext_t uc;
#endif
  ThreadCtx tc;
  State state;
  unsigned mask;
  // The warp collective this fiber waits at: nullptr for the shuffles, votes and
  // __syncwarp (any two meet), else the source site of an `.aligned` instruction
  // (mma.sync, ldmatrix: kernels/mma.cuh), which every lane must reach at the same site.
  const char* site_file;
  int site_line;
  // cp.async of this thread not yet retired, in issue order, and its commit count.
  std::vector<AsyncCopy> async;
  uint64_t async_commits;
  char* stack;  // usable region (above the guard page)
};

struct Launch {
  Kernel* k;
  void** params;
  dim3 grid, block;
  unsigned smem;
  std::atomic<long long> next{0};
  std::atomic<bool> failed{false};
  // Shadow bookkeeping (checked launches run their blocks one after another).
  bool checked = false;
  uint64_t seg_lo = 0;                                   // first barrier interval of this launch
  std::vector<std::pair<uint64_t, long long>> block_segs;  // (first interval, linear block id)
};

// One static __shared__ variable of the running block.
struct StaticSmem {
  const void* key;
  const char* name;
  unsigned char* ptr;
  size_t bytes;
};

struct Runner {
  int index = 0;  // shared-memory slot
  std::vector<Fiber> fibers;
  std::vector<uint64_t> slots;  // 32 per warp
  std::vector<uint32_t> wscratch;  // kWarpScratchWords per lane (warp_scratch)
#if EMU_FAST_SWITCH
  void* sched_sp = nullptr;
#else
  ucontext_t sched;
#endif
  Launch* L = nullptr;
  int current = -1;
  bool faulted = false;
  std::string fault;
  // Shared memory of the running block (inside this runner's slot of the arena).
  unsigned char* arena = nullptr;
  size_t arena_used = 0;
  unsigned char* dyn = nullptr;
  size_t dyn_bytes = 0;
  std::vector<StaticSmem> statics;
  size_t static_total = 0;
  // Race-check context of the running block.
  long long block_lin = 0;
  uint64_t seg = 0;          // current barrier interval
  uint64_t block_seg_lo = 0;  // first interval of this block
  std::vector<uint32_t> wcnt;  // warp-collective releases, per warp
  // Watchdog: `gen` counts the launches this runner served; the watchdog stops
  // launch `abort_gen` of it (so a stop meant for a launch that ended in between
  // cannot hit the next one).
  std::atomic<uint64_t> progress{0};
  std::atomic<bool> busy{false};
  std::atomic<uint64_t> gen{0};
  std::atomic<uint64_t> abort_gen{0};
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
#endif
  ~Runner();
};
extern thread_local Runner* tl;

// Records the launch-failure message (first one wins) and prints it.
void set_fault(const std::string& m);
std::string block_name(const ThreadCtx& t);
std::string thread_name(const Launch& L, long long block_lin, int tid);

// Runs every block of a launch on `nthreads` host threads; false on a fault.
bool run_launch(Launch& L, int nthreads);

// ---- shadow memory (shadow.cpp) ----
// Device heap: exact-size blocks between redzones, filled with 0xFF (NaN in f32,
// f16 and bf16) and marked never-written.
bool heap_alloc(size_t bytes, uint64_t* out);
bool heap_free(uint64_t p);
long long live_allocations();
// Host-side copies: false (with the fault set) on a bounds or init violation.
bool host_write(uint64_t dst, size_t n, const char* what);            // HtoD, memset
bool host_read(uint64_t src, size_t n, const char* what);             // DtoH (initcheck)
bool device_copy(uint64_t dst, uint64_t src, size_t n);               // DtoD (init bits follow the data)
// Shared memory slot of runner `index` (kSlotBytes).
unsigned char* smem_slot(int index);
constexpr size_t kSlotBytes = 512 * 1024;
constexpr int kMaxRunners = 64;
constexpr size_t kRedzone = 64;
// Marks [p, p+n) addressable and never written (fills it with 0xFF), or not addressable.
void shadow_make_addressable(unsigned char* p, size_t n);
void shadow_make_unaddressable(unsigned char* p, size_t n);
// New barrier interval (block start, __syncthreads release): a fresh global number.
uint64_t next_segment();
// Serialises checked launches and host copies (the shadow has one writer at a time).
std::mutex& shadow_mutex();

// Host threads per launch when the detectors are off (0: hardware concurrency).
extern std::atomic<int> g_threads;
size_t take_fault(char* buf, size_t len);

// ---- statistics (one line per process to AK_EMU_TRACE) ----
struct Stats {
  std::atomic<long long> launches{0}, checked_launches{0}, limit_checks{0};
  std::atomic<long long> races{0}, uninit{0}, oob{0}, limit_faults{0}, watchdog{0};
};
Stats& stats();

// ---- watchdog (sched.cpp) ----
extern std::atomic<bool> g_abort_any;
void watchdog_poll();  // called from instrumented accesses and atomics
void watchdog_start();
extern std::atomic<long long> g_watchdog_ms;

}  // namespace emu
