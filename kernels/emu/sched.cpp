// sched.cpp — the scheduler of the emulated device (feature `emulate`).
//
// Every thread of a block is a fiber on one host thread (a hand-written stack switch
// on x86-64, ucontext elsewhere: internal.h, EMU_FAST_SWITCH); __syncthreads and warp
// collectives yield to a scheduler that releases a barrier only when every live
// participant has arrived. The order in which ready fibers run is a `Schedule`:
//
//   0 identity, 1 reversed, 2 shuffled (a seeded permutation per block): each round
//     runs every ready fiber once, then releases the collectives that are complete;
//   3 warp-ahead: one warp per block (chosen by the seed) runs as far as it can — to
//     its next block barrier — before any other warp moves, as an SM may let it;
//   4 random interleaving: one seeded-random ready fiber at a time, and every warp
//     collective released the moment it is complete, so warps drift apart at every
//     collective.
//
// Blocks of one launch run in parallel on several host threads, or one after another
// when the detectors are on (the shadow memory then has one writer). Each block gets
// its shared memory from its runner's slot of the checked arena (shadow.cpp).
//
// Contract violations inside a kernel (deadlock at a barrier, a warp collective
// waiting for an exited or non-existent lane, a detector's report, the watchdog)
// make the launch fail with a message readable through emu_take_fault().
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <thread>

#include "internal.h"

#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
extern "C" void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
#else
#define EMU_ASAN 0
#endif

namespace emu {

thread_local const ThreadCtx* cur = nullptr;
thread_local Runner* tl = nullptr;

std::atomic<int> g_mode{0};
std::atomic<unsigned long long> g_seed{0};
std::atomic<int> g_threads{0};  // 0: hardware concurrency

namespace {
std::mutex g_fault_mu;
std::string g_fault;

constexpr size_t kStack = 128 * 1024;
constexpr size_t kGuard = 4096;

std::map<std::string, Kernel>& registry() {
  static std::map<std::string, Kernel> r;
  return r;
}
}  // namespace

void register_kernel(const char* name, void* fn, Trampoline t, int max_threads) {
  registry()[name] = Kernel{fn, t, name, kDefaultDynamicSmem, -1, -1, max_threads};
}
Kernel* find_kernel(const char* name) {
  auto it = registry().find(name);
  return it == registry().end() ? nullptr : &it->second;
}
std::vector<Kernel*> all_kernels() {
  std::vector<Kernel*> v;
  for (auto& kv : registry()) v.push_back(&kv.second);
  return v;
}

void set_fault(const std::string& m) {
  std::lock_guard<std::mutex> g(g_fault_mu);
  if (g_fault.empty()) g_fault = m;
  if (getenv("AK_EMU_QUIET") == nullptr) fprintf(stderr, "[emulated device] %s\n", m.c_str());
}
size_t take_fault(char* buf, size_t len) {
  std::lock_guard<std::mutex> g(g_fault_mu);
  size_t n = g_fault.size();
  if (buf && len) {
    size_t c = std::min(n, len - 1);
    std::memcpy(buf, g_fault.data(), c);
    buf[c] = 0;
  }
  g_fault.clear();
  return n;
}

std::string block_name(const ThreadCtx& t) {
  char b[96];
  snprintf(b, sizeof b, "block (%u,%u,%u)", t.bid.x, t.bid.y, t.bid.z);
  return b;
}

std::string thread_name(const Launch& L, long long b, int tid) {
  char s[160];
  snprintf(s, sizeof s, "thread (%u,%u,%u) of block (%u,%u,%u)", (unsigned)(tid % L.block.x),
           (unsigned)((tid / L.block.x) % L.block.y), (unsigned)(tid / (L.block.x * L.block.y)),
           (unsigned)(b % L.grid.x), (unsigned)((b / L.grid.x) % L.grid.y),
           (unsigned)(b / ((long long)L.grid.x * L.grid.y)));
  return s;
}

Runner::~Runner() {
  for (auto& f : fibers)
    if (f.stack) munmap(f.stack - kGuard, kStack + kGuard);
}

namespace {

#if EMU_FAST_SWITCH
// emu_switch(save, to): pushes the callee-saved registers (System V x86-64: rbx, rbp,
// r12-r15), MXCSR and the x87 control word on the running stack, stores the stack
// pointer in *save, then loads `to` as the stack pointer and pops the same set: the
// other context resumes where it called emu_switch (or, the first time, at the entry
// its stack was prepared with, fiber_init). The signal mask is per host thread and
// never changed by a fiber, so, unlike swapcontext, nothing else needs saving.
extern "C" void emu_switch(void** save, void* to);
asm(R"(
  .pushsection .text
  .p2align 4
  .globl emu_switch
  .hidden emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  fldcw (%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
  .popsection
)");
#endif

void fiber_main();

// Switch from a fiber back to the scheduler.
void to_sched(Fiber& f) {
#if EMU_ASAN
  void* fs = nullptr;
  __sanitizer_start_switch_fiber(&fs, tl->sched_bottom, tl->sched_size);
#endif
#if EMU_FAST_SWITCH
  emu_switch(&f.sp, tl->sched_sp);
#else
  swapcontext(&f.uc, &tl->sched);
#endif
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(fs, nullptr, nullptr);
#endif
}

// Prepares fiber `f` of runner `r` to start at fiber_main on its own stack.
void fiber_init(Runner& r, Fiber& f) {
#if EMU_FAST_SWITCH
  (void)r;
#if EMU_ASAN
  // A reused stack keeps the poisoned redzones of the frames left on it (no fiber
  // returns from fiber_main, and a faulting one leaves its whole call chain); ASan's
  // swapcontext interceptor clears them the same way.
  __asan_unpoison_memory_region(f.stack, kStack);
#endif
  // The frame emu_switch pops: control words, six registers, then its `ret` lands on
  // fiber_main with the stack as a call leaves it (rsp + 8 a multiple of 16) above
  // a null return address (fiber_main never returns).
  uint64_t* s = reinterpret_cast<uint64_t*>(((uintptr_t)f.stack + kStack) & ~(uintptr_t)15);
  *--s = 0;
  *--s = reinterpret_cast<uint64_t>(&fiber_main);
  for (int i = 0; i < 6; ++i) *--s = 0;
  uint32_t mxcsr = 0;
  uint16_t fpcw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  *--s = mxcsr;  // 8(%rsp)
  *--s = fpcw;   // (%rsp)
  f.sp = s;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack;
  f.uc.uc_stack.ss_size = kStack;
  f.uc.uc_link = &r.sched;
  makecontext(&f.uc, fiber_main, 0);
#endif
}

// The last switch of a fiber (it finished, or faulted): to the scheduler, never
// resumed. Under ASan, a null fake-stack slot tells it to free this fiber's fake stack.
[[noreturn]] void leave_fiber(Runner* r, Fiber& f) {
#if EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, r->sched_bottom, r->sched_size);
#endif
#if EMU_FAST_SWITCH
  (void)f;
  void* dead = nullptr;
  emu_switch(&dead, r->sched_sp);
#else
  swapcontext(&f.uc, &r->sched);
#endif
  std::abort();
}

void fiber_main() {
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &tl->sched_bottom, &tl->sched_size);
#endif
  Runner* r = tl;
  r->L->k->tramp(r->L->k->fn, r->L->params);
  Fiber& f = r->fibers[r->current];
  f.state = DONE;
  leave_fiber(r, f);
}

void run_fiber(Runner& r, int i) {
  r.current = i;
  cur = &r.fibers[i].tc;
  r.progress.fetch_add(1, std::memory_order_relaxed);
#if EMU_ASAN
  __sanitizer_start_switch_fiber(&r.fake_stack, r.fibers[i].stack, kStack);
#endif
#if EMU_FAST_SWITCH
  emu_switch(&r.sched_sp, r.fibers[i].sp);
#else
  swapcontext(&r.sched, &r.fibers[i].uc);
#endif
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(r.fake_stack, nullptr, nullptr);
#endif
  r.current = -1;
}

// Shared memory of a new block: the previous block's is made unaddressable again;
// the dynamic part sits between redzones at the start of the slot.
void begin_block_smem(Runner& r, size_t dyn) {
  if (r.arena_used) shadow_make_unaddressable(r.arena, r.arena_used);
  r.statics.clear();
  r.static_total = 0;
  r.dyn = r.arena + kRedzone;
  r.dyn_bytes = dyn;
  shadow_make_addressable(r.dyn, dyn);
  r.arena_used = kRedzone + ((dyn + 15) & ~(size_t)15) + kRedzone;
}

// Releases the warp collectives that every lane of their mask has reached.
// Returns -1 on a contract violation, else the number of warps released.
int release_warps(Runner& r, int n, int only_warp) {
  int nwarps = (n + 31) / 32, released = 0;
  for (int w = 0; w < nwarps; ++w) {
    if (only_warp >= 0 && w != only_warp) continue;
    int base = w * 32, lanes = std::min(32, n - base);
    int first = -1;
    for (int l = 0; l < lanes; ++l)
      if (r.fibers[base + l].state == AT_WARP) {
        first = l;
        break;
      }
    if (first < 0) continue;
    unsigned m = r.fibers[base + first].mask;
    const Fiber& f0 = r.fibers[base + first];
    bool ready = true;
    int other_site = -1;  // a lane at the same mask but another `.aligned` site
    for (int l = 0; l < 32; ++l) {
      if (!((m >> l) & 1u)) continue;
      if (l >= lanes) {
        r.fault = block_name(r.fibers[base].tc) + ": warp collective mask names lane " + std::to_string(l) +
                  " of warp " + std::to_string(w) + ", which does not exist (block has " + std::to_string(n) +
                  " threads)";
        return -1;
      }
      State s = r.fibers[base + l].state;
      if (s == DONE) {
        r.fault = block_name(r.fibers[base].tc) + ": warp collective waits for exited lane " + std::to_string(l) +
                  " of warp " + std::to_string(w);
        return -1;
      }
      const Fiber& fl = r.fibers[base + l];
      if (s != AT_WARP || fl.mask != m) {
        ready = false;
      } else if ((fl.site_file || f0.site_file) &&
                 (!fl.site_file || !f0.site_file || fl.site_line != f0.site_line ||
                  (fl.site_file != f0.site_file && std::strcmp(fl.site_file, f0.site_file) != 0))) {
        other_site = l;
      }
    }
    if (ready && other_site >= 0) {
      auto site = [](const Fiber& f) {
        return f.site_file ? std::string(f.site_file) + ":" + std::to_string(f.site_line)
                           : std::string("a warp shuffle, vote or __syncwarp");
      };
      r.fault = block_name(r.fibers[base].tc) + ": lanes of warp " + std::to_string(w) +
                " reached different warp-collective instructions (lane " + std::to_string(first) + " at " +
                site(f0) + ", lane " + std::to_string(other_site) + " at " + site(r.fibers[base + other_site]) +
                "): mma.sync and ldmatrix are .aligned — every lane of the warp must execute the same one "
                "(a warp-divergent call)";
      return -1;
    }
    if (ready) {
      for (int l = 0; l < lanes; ++l)
        if ((m >> l) & 1u) r.fibers[base + l].state = READY;
      // Only a collective of every lane of the warp orders the warp's accesses for
      // racecheck; a partial mask orders nothing (a miss there is a false positive,
      // never a false negative).
      unsigned all = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
      if ((m & all) == all && !f0.site_file) ++r.wcnt[w];
      ++released;
    }
  }
  return released;
}

// Runs one block to completion. Returns false on a contract violation.
bool run_block(Runner& r, uint3 bid, long long lin) {
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
  r.wscratch.assign((size_t)nwarps * 32 * kWarpScratchWords, 0);
  r.wcnt.assign(nwarps, 0);
  r.block_lin = lin;
  begin_block_smem(r, L.smem);
  if (L.checked) {
    r.seg = r.block_seg_lo = next_segment();
    L.block_segs.emplace_back(r.seg, lin);
  }
  for (int i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    f.tc.tid = uint3{(unsigned)(i % L.block.x), (unsigned)((i / L.block.x) % L.block.y),
                     (unsigned)(i / (L.block.x * L.block.y))};
    f.tc.bid = bid;
    f.tc.bdim = L.block;
    f.tc.gdim = L.grid;
    f.state = READY;
    f.mask = 0;
    f.site_file = nullptr;
    f.site_line = 0;
    f.async.clear();
    f.async_commits = 0;
    fiber_init(r, f);
  }
  int mode = g_mode.load();
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  if (mode == 1) std::reverse(order.begin(), order.end());
  std::mt19937_64 rng(g_seed.load() * 0x9E3779B97F4A7C15ull + (unsigned long long)lin);
  if (mode == 2) std::shuffle(order.begin(), order.end(), rng);
  int lead = mode == 3 ? (int)((g_seed.load() + (unsigned long long)lin) % (unsigned long long)nwarps) : -1;
  std::vector<int> ready;
  for (;;) {
    bool ran = false;
    if (mode == 4) {
      ready.clear();
      for (int i = 0; i < n; ++i)
        if (r.fibers[i].state == READY) ready.push_back(i);
      if (!ready.empty()) {
        run_fiber(r, ready[rng() % ready.size()]);
        ran = true;
      }
    } else {
      bool lead_ready = false;
      if (lead >= 0)
        for (int l = lead * 32; l < std::min(n, lead * 32 + 32); ++l) lead_ready |= r.fibers[l].state == READY;
      for (int i : order) {
        if (lead_ready && i / 32 != lead) continue;
        if (r.fibers[i].state == READY) {
          run_fiber(r, i);
          ran = true;
          if (r.faulted) return false;
        }
      }
    }
    if (r.faulted) return false;
    int rel = release_warps(r, n, -1);
    if (rel < 0) return false;
    if (ran || rel > 0) continue;
    int live = 0, at_block = 0;
    for (int i = 0; i < n; ++i) {
      live += r.fibers[i].state != DONE;
      at_block += r.fibers[i].state == AT_BLOCK;
    }
    if (live == 0) return true;
    if (at_block == live) {
      for (int i = 0; i < n; ++i)
        if (r.fibers[i].state == AT_BLOCK) r.fibers[i].state = READY;
      if (L.checked) r.seg = next_segment();
      continue;
    }
    r.fault = block_name(r.fibers[0].tc) +
              ": deadlock — threads wait at __syncthreads while others wait at a warp collective (shuffle, "
              "vote, mma.sync, ldmatrix) or have exited, or warp collectives with mismatched masks";
    return false;
  }
}

// Runners (fiber stacks, per-block buffers, a shared-memory slot) are pooled across
// launches: re-mapping hundreds of fiber stacks per launch dominated run time.
std::mutex g_pool_mu;
std::vector<Runner*> g_pool;
std::vector<Runner*> g_all_runners;  // for the watchdog; never shrinks

Runner* take_runner() {
  std::lock_guard<std::mutex> g(g_pool_mu);
  if (g_pool.empty()) {
    Runner* r = new Runner;
    r->index = (int)g_all_runners.size();
    r->arena = smem_slot(r->index);
    g_all_runners.push_back(r);
    return r;
  }
  Runner* r = g_pool.back();
  g_pool.pop_back();
  return r;
}

void give_runner(Runner* r) {
  r->L = nullptr;
  r->current = -1;
  r->faulted = false;
  r->fault.clear();
  r->busy.store(false);
  std::lock_guard<std::mutex> g(g_pool_mu);
  g_pool.push_back(r);
}

void worker(Launch* L) {
  Runner& r = *take_runner();
  tl = &r;
  r.L = L;
  r.gen.fetch_add(1);
  r.busy.store(true);
  long long total = (long long)L->grid.x * L->grid.y * L->grid.z;
  for (;;) {
    long long b = L->next.fetch_add(1);
    if (b >= total || L->failed.load()) break;
    if (g_mode.load() == 1) b = total - 1 - b;
    uint3 bid{(unsigned)(b % L->grid.x), (unsigned)((b / L->grid.x) % L->grid.y),
              (unsigned)(b / ((long long)L->grid.x * L->grid.y))};
    r.progress.fetch_add(1, std::memory_order_relaxed);
    if (!run_block(r, bid, b)) {
      L->failed.store(true);
      set_fault(std::string("kernel `") + L->k->name + "`: " + r.fault);
      break;
    }
  }
  tl = nullptr;
  cur = nullptr;
  give_runner(&r);
}

}  // namespace

bool run_launch(Launch& L, int nthreads) {
  watchdog_start();
  std::vector<std::thread> ts;
  for (int i = 1; i < nthreads; ++i) ts.emplace_back(worker, &L);
  worker(&L);
  for (auto& t : ts) t.join();
  return !L.failed.load();
}

void syncthreads() {
  Fiber& f = tl->fibers[tl->current];
  f.state = AT_BLOCK;
  to_sched(f);
}

// The calling lane arrives at a warp collective of `mask`: `file` null for the
// shuffles, votes and __syncwarp (any two meet), else the site of an `.aligned`
// instruction (every lane must reach the same one; release_warps checks).
static void arrive_at_warp(unsigned mask, const char* file, int line) {
  Fiber& f = tl->fibers[tl->current];
  if (!((mask >> lane_id()) & 1u)) fault("warp collective called by a lane that is not in its mask");
  f.state = AT_WARP;
  f.mask = mask;
  f.site_file = file;
  f.site_line = line;
  to_sched(f);
  f.site_file = nullptr;
}

void warp_sync(unsigned mask) { arrive_at_warp(mask, nullptr, 0); }

void warp_converge(unsigned mask, const char* file, int line) { arrive_at_warp(mask, file ? file : "?", line); }

uint32_t* warp_scratch() { return tl->wscratch.data() + (size_t)(tl->current / 32) * 32 * kWarpScratchWords; }

// The block's shared-memory window (its runner's slot, redzones included: an access
// past a buffer is then memcheck's to report, with the buffer named).
bool in_block_smem(const void* p, size_t n) {
  const Runner& r = *tl;
  const unsigned char* c = static_cast<const unsigned char*>(p);
  return c >= r.arena && c + n <= r.arena + kSlotBytes;
}

uint64_t* warp_slots() { return tl->slots.data() + (size_t)(tl->current / 32) * 32; }
int lane_id() { return tl->current % 32; }
void* dynamic_smem() { return tl->dyn; }
size_t dynamic_smem_bytes() { return tl->dyn_bytes; }

void* static_smem(const void* key, const char* name, size_t bytes, size_t align) {
  Runner& r = *tl;
  for (auto& s : r.statics)
    if (s.key == key) return s.ptr;
  if (r.static_total + bytes > (size_t)kMaxStaticSmem)
    fault(("static shared memory above 48 KiB (`" + std::string(name) + "` brings it to " +
           std::to_string(r.static_total + bytes) + " bytes)")
              .c_str());
  if (r.static_total + bytes + r.dyn_bytes > (size_t)arch().smem_optin)
    fault(("static + dynamic shared memory (" + std::to_string(r.static_total + bytes + r.dyn_bytes) +
           " bytes) above the " + std::to_string(arch().smem_optin) + "-byte limit of " + arch().name)
              .c_str());
  size_t a = std::max<size_t>(align, 16);
  size_t off = (r.arena_used + a - 1) & ~(a - 1);
  if (off + bytes + kRedzone > kSlotBytes) fault("emulator: shared-memory slot exhausted");
  unsigned char* p = r.arena + off;
  shadow_make_addressable(p, bytes);
  r.arena_used = off + bytes + kRedzone;
  r.static_total += bytes;
  r.statics.push_back(StaticSmem{key, name, p, bytes});
  return p;
}

void fault(const char* what) {
  Runner* r = tl;
  r->fault = block_name(r->fibers[r->current].tc) + ": " + what;
  r->faulted = true;
  Fiber& f = r->fibers[r->current];
  f.state = DONE;
  leave_fiber(r, f);
}

// ---- watchdog ----
// A launch whose runner has not switched fibers (no barrier, no collective, no thread
// finished) for AK_EMU_WATCHDOG_MS (default 60000) is told to stop: its next memory
// access or atomic fails the launch. If it still makes no progress after three more
// periods (a loop that touches no memory), the process is ended with a message
// rather than hanging CI.
std::atomic<bool> g_abort_any{false};
std::atomic<long long> g_watchdog_ms{-1};

namespace {
long long watchdog_ms() {
  long long v = g_watchdog_ms.load();
  if (v < 0) {
    const char* e = getenv("AK_EMU_WATCHDOG_MS");
    v = e ? atoll(e) : 60000;
    if (v <= 0) v = 60000;
    g_watchdog_ms.store(v);
  }
  return v;
}

void watchdog_loop() {
  using clk = std::chrono::steady_clock;
  struct Seen {
    uint64_t progress, gen;
    clk::time_point since;
    bool told;
  };
  std::map<Runner*, Seen> seen;
  for (;;) {
    long long ms = watchdog_ms();
    std::this_thread::sleep_for(std::chrono::milliseconds(std::max(10LL, std::min(ms / 8, 500LL))));
    std::vector<Runner*> rs;
    {
      std::lock_guard<std::mutex> g(g_pool_mu);
      rs = g_all_runners;
    }
    auto now = clk::now();
    for (Runner* r : rs) {
      uint64_t p = r->progress.load(std::memory_order_relaxed), g = r->gen.load();
      auto it = seen.find(r);
      if (!r->busy.load() || it == seen.end() || it->second.progress != p || it->second.gen != g) {
        seen[r] = Seen{p, g, now, false};
        continue;
      }
      long long stuck = std::chrono::duration_cast<std::chrono::milliseconds>(now - it->second.since).count();
      if (!it->second.told && stuck >= ms) {
        it->second.told = true;
        stats().watchdog.fetch_add(1);
        r->abort_gen.store(g);
        g_abort_any.store(true);  // never cleared: after a stop, accesses check their runner
      } else if (it->second.told && stuck >= 4 * ms) {
        fprintf(stderr,
                "[emulated device] watchdog: a kernel made no progress for %lld ms and did not stop when told "
                "(a loop that touches no memory); ending the process\n",
                stuck);
        std::abort();
      }
    }
  }
}
}  // namespace

void watchdog_start() {
  static std::once_flag once;
  std::call_once(once, [] { std::thread(watchdog_loop).detach(); });
}

void watchdog_poll() {
  Runner* r = tl;
  if (!r || r->current < 0) return;
  uint64_t g = r->gen.load();
  if (r->abort_gen.load() != g) return;
  r->abort_gen.store(0);
  fault(("watchdog: no progress for " + std::to_string(watchdog_ms()) +
         " ms (no barrier, warp collective or thread exit): a hang, e.g. a spin-wait nothing releases")
            .c_str());
}

}  // namespace emu

#define EXPORT extern "C" __attribute__((visibility("default")))
EXPORT void emu_set_schedule(int mode, unsigned long long seed) {
  emu::g_mode.store(mode);
  emu::g_seed.store(seed);
}
EXPORT void emu_set_threads(int n) { emu::g_threads.store(n); }
EXPORT void emu_set_watchdog_ms(long long ms) { emu::g_watchdog_ms.store(ms > 0 ? ms : -1); }
EXPORT size_t emu_take_fault(char* buf, size_t len) { return emu::take_fault(buf, len); }
EXPORT int emu_kernel_count() { return (int)emu::all_kernels().size(); }
// Writes the registered kernel names, one per line, to `path` (coverage check).
EXPORT int emu_list_kernels(const char* path) {
  FILE* f = fopen(path, "w");
  if (!f) return -1;
  auto ks = emu::all_kernels();
  for (auto* k : ks) fprintf(f, "%s\n", k->name);
  fclose(f);
  return (int)ks.size();
}
