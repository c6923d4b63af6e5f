// shadow.cpp — the checked heap and the shadow memory of the emulated device: what
// compute-sanitizer's memcheck, racecheck and initcheck see on a GPU.
//
// Memory. Device allocations and every block's shared memory live in one reserved
// region: allocations are exact-size blocks between redzones (256 B), shared memory
// is allocated per block with exactly its static and dynamic sizes between 64-byte
// redzones (sched.cpp). New memory is filled with 0xFF bytes — NaN as f32, f16 and
// bf16 — and marked never written.
//
// Shadow. Each byte of the region has a 16-byte shadow cell:
//   w: the last write — barrier interval (34 bits), thread (10), warp-collective
//      count (16), atomic (1), ever written (1);
//   r: the last plain read — interval, thread, collective count, and two flags for
//      the readers it stands for: "another reader of the same warp since the same
//      collective" and "a reader in another warp of the interval, or in another
//      block of the launch" — plus addressable (1).
// A barrier interval is a process-wide number taken at each block start and each
// __syncthreads release; checked launches run their blocks one after another, so a
// block's intervals are contiguous and an interval older than the running block but
// not older than the launch belongs to another block of the same launch.
//
// Feeding it. The kernel sources are compiled with GCC's -fsanitize=thread
// instrumentation but without its runtime: every load, store and atomic of a kernel
// calls a __tsan_* hook defined here. Addresses outside the region (fiber stacks,
// the emulator's own state) return at once.
//
// Two accesses to a byte by different threads of a launch conflict when at least one
// writes, neither orders the other — same block and a __syncthreads between, or same
// warp and a warp collective between, or an earlier launch — and they are not both
// atomic. The first conflict, bounds violation or read of a never-written byte fails
// the launch with a message naming the kernel, both threads, the buffer and offset.
#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>

#include "internal.h"

#if defined(__SANITIZE_ADDRESS__)
extern "C" void __asan_poison_memory_region(void const volatile* addr, size_t size);
extern "C" void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
#define EMU_POISON(p, n) __asan_poison_memory_region((p), (n))
#define EMU_UNPOISON(p, n) __asan_unpoison_memory_region((p), (n))
#else
#define EMU_POISON(p, n) ((void)(p), (void)(n))
#define EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#ifndef EMU_INSTRUMENTED
#define EMU_INSTRUMENTED 0
#endif

namespace emu {

namespace {
struct Cell {
  uint64_t w, r;
};
constexpr uint64_t kSegMask = (1ull << 34) - 1;
constexpr int kTidShift = 34;
constexpr uint64_t kTidMask = 0x3ff;
constexpr int kWcShift = 44;
constexpr uint64_t kWcMask = (1ull << 16) - 1;
constexpr uint64_t kAtomic = 1ull << 62, kInit = 1ull << 63;                      // in w
// In w: the destination of a cp.async in flight (issued, not yet retired by a
// cp.async.wait_group of its thread); the record is the issuing thread's.
constexpr uint64_t kPending = 1ull << 61;
constexpr uint64_t kWarpReaders = 1ull << 61, kCrossReaders = 1ull << 62, kAddr = 1ull << 63;  // in r

constexpr size_t kHeapBytes = (size_t)16 << 30;
constexpr size_t kHeapRedzone = 256;
constexpr size_t kRegion = kHeapBytes + (size_t)kMaxRunners * kSlotBytes;

uintptr_t g_base = 0;
size_t g_span = 0;  // 0 until the region exists: every hook returns at once
Cell* g_cells = nullptr;
std::atomic<int> g_checks{0};
std::atomic<uint64_t> g_seg{0};

struct Block {
  size_t bytes, span;
  long long id;
};
std::mutex g_heap_mu;
std::map<uintptr_t, Block> g_live;                   // by data address
std::map<size_t, std::vector<uintptr_t>> g_free;     // span -> data addresses
size_t g_bump = kHeapRedzone;
long long g_next_id = 1;
std::mutex g_shadow_mu;

int parse_checks() {
  const char* e = getenv("AK_EMU_CHECK");
  if (!e || !*e || !strcmp(e, "all") || !strcmp(e, "1")) return CHECK_ALL;
  if (!strcmp(e, "none") || !strcmp(e, "0") || !strcmp(e, "off")) return 0;
  int m = 0;
  std::string s(e);
  size_t i = 0;
  while (i <= s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    std::string t = s.substr(i, j - i);
    if (t == "race") m |= CHECK_RACE;
    else if (t == "init") m |= CHECK_INIT;
    else if (t == "mem") m |= CHECK_MEM;
    else if (!t.empty()) fprintf(stderr, "[emulated device] AK_EMU_CHECK: unknown detector `%s` ignored\n", t.c_str());
    i = j + 1;
  }
  return m;
}

__attribute__((constructor)) void init_region() {
  void* m = mmap(nullptr, kRegion, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  void* s = mmap(nullptr, kRegion * sizeof(Cell), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (m == MAP_FAILED || s == MAP_FAILED) {
    fprintf(stderr, "[emulated device] cannot reserve the device memory region\n");
    std::abort();
  }
  g_base = (uintptr_t)m;
  g_cells = static_cast<Cell*>(s);
  g_checks.store(EMU_INSTRUMENTED ? parse_checks() : 0);
  g_span = kRegion;
}

inline Cell* cell(uintptr_t a) { return g_cells + (a - g_base); }
inline bool in_region(uintptr_t a, size_t n) { return a - g_base < g_span && a + n - g_base <= g_span; }

// Gives the whole pages inside [a, a+n) back to the kernel (they read as zero after).
void release_pages(uintptr_t a, size_t n) {
  uintptr_t lo = (a + 4095) & ~(uintptr_t)4095, hi = (a + n) & ~(uintptr_t)4095;
  if (hi > lo) madvise((void*)lo, hi - lo, MADV_DONTNEED);
}
// Zeroes [p, p+n): the partial pages by hand, the whole ones by release_pages.
void zero_range(void* p, size_t n) {
  uintptr_t a = (uintptr_t)p, lo = (a + 4095) & ~(uintptr_t)4095, hi = (a + n) & ~(uintptr_t)4095;
  if (hi <= lo || n < (64u << 10)) {
    std::memset(p, 0, n);
    return;
  }
  std::memset(p, 0, lo - a);
  std::memset((void*)hi, 0, a + n - hi);
  madvise((void*)lo, hi - lo, MADV_DONTNEED);
}
}  // namespace

int checks() { return g_checks.load(std::memory_order_relaxed); }
bool instrumented() { return EMU_INSTRUMENTED; }
std::mutex& shadow_mutex() { return g_shadow_mu; }
uint64_t next_segment() { return (g_seg.fetch_add(1) + 1) & kSegMask; }
Stats& stats() {
  static Stats s;
  return s;
}

unsigned char* smem_slot(int index) {
  if (index >= kMaxRunners) {
    fprintf(stderr, "[emulated device] more than %d concurrent block runners\n", kMaxRunners);
    std::abort();
  }
  unsigned char* p = (unsigned char*)(g_base + kHeapBytes + (size_t)index * kSlotBytes);
  EMU_POISON(p, kSlotBytes);
  return p;
}

void shadow_make_addressable(unsigned char* p, size_t n) {
  EMU_UNPOISON(p, n);  // before the fill: under ASan the memset itself is checked
  std::memset(p, 0xFF, n);
  Cell* c = cell((uintptr_t)p);
  for (size_t i = 0; i < n; ++i) c[i] = Cell{0, kAddr};
}
void shadow_make_unaddressable(unsigned char* p, size_t n) {
  std::memset(cell((uintptr_t)p), 0, n * sizeof(Cell));
  EMU_POISON(p, n);
}

// ---- device heap ----
bool heap_alloc(size_t bytes, uint64_t* out) {
  size_t span = ((std::max<size_t>(bytes, 1) + 255) & ~(size_t)255) + kHeapRedzone;
  uintptr_t p = 0;
  {
    std::lock_guard<std::mutex> g(g_heap_mu);
    auto it = g_free.find(span);
    if (it != g_free.end() && !it->second.empty()) {
      p = it->second.back();
      it->second.pop_back();
    } else {
      if (g_bump + span > kHeapBytes) return false;
      p = g_base + g_bump;
      g_bump += span;
    }
    g_live[p] = Block{bytes, span, g_next_id++};
  }
  std::lock_guard<std::mutex> g(g_shadow_mu);
  shadow_make_addressable((unsigned char*)p, bytes);
  EMU_POISON((unsigned char*)p + bytes, span - bytes);
  *out = p;
  return true;
}

bool heap_free(uint64_t p) {
  Block b;
  {
    std::lock_guard<std::mutex> g(g_heap_mu);
    auto it = g_live.find((uintptr_t)p);
    if (it == g_live.end()) return false;
    b = it->second;
    g_live.erase(it);
  }
  {
    std::lock_guard<std::mutex> g(g_shadow_mu);
    // Freed memory is not addressable: a later access is reported. Whole pages of
    // the shadow and the data go back to the kernel.
    zero_range(cell(p), b.bytes * sizeof(Cell));
    release_pages(p, b.bytes);
    EMU_POISON((unsigned char*)p, b.bytes);
  }
  std::lock_guard<std::mutex> g(g_heap_mu);
  g_free[b.span].push_back((uintptr_t)p);
  return true;
}

long long live_allocations() {
  std::lock_guard<std::mutex> g(g_heap_mu);
  return (long long)g_live.size();
}

namespace {
// "device allocation #3 (400 bytes), byte 12" and the like, for reports.
std::string where(uintptr_t a) {
  char b[256];
  if (a - g_base < kHeapBytes) {
    std::lock_guard<std::mutex> g(g_heap_mu);
    auto it = g_live.upper_bound(a);
    if (it != g_live.begin()) {
      --it;
      uintptr_t d = a - it->first;
      if (d < it->second.bytes)
        snprintf(b, sizeof b, "device allocation #%lld (%zu bytes), byte %zu", it->second.id, it->second.bytes,
                 (size_t)d);
      else
        snprintf(b, sizeof b, "device memory %zu bytes past the end of allocation #%lld (%zu bytes)",
                 (size_t)(d - it->second.bytes), it->second.id, it->second.bytes);
      return b;
    }
    return "device memory that is not allocated";
  }
  Runner* r = tl;
  if (r && r->dyn) {
    unsigned char* p = (unsigned char*)a;
    if (p >= r->dyn && p < r->dyn + r->dyn_bytes) {
      snprintf(b, sizeof b, "dynamic shared memory (%zu bytes), byte %zu", r->dyn_bytes, (size_t)(p - r->dyn));
      return b;
    }
    for (auto& s : r->statics)
      if (p >= s.ptr && p < s.ptr + s.bytes) {
        snprintf(b, sizeof b, "static shared `%s` (%zu bytes), byte %zu", s.name, s.bytes, (size_t)(p - s.ptr));
        return b;
      }
    // In a redzone: name the nearest shared buffer below it.
    const char* name = nullptr;
    size_t bytes = 0, past = 0;
    unsigned char* best = nullptr;
    if (p >= r->dyn + r->dyn_bytes) {
      best = r->dyn;
      name = "dynamic shared memory";
      bytes = r->dyn_bytes;
    }
    for (auto& s : r->statics)
      if (p >= s.ptr + s.bytes && s.ptr > best) {
        best = s.ptr;
        name = s.name;
        bytes = s.bytes;
      }
    if (best) {
      past = (size_t)(p - best) - bytes;
      snprintf(b, sizeof b, "shared memory %zu bytes past the end of %s%s%s (%zu bytes)", past,
               best == r->dyn ? "" : "static shared `", name, best == r->dyn ? "" : "`", bytes);
      return b;
    }
    return "shared memory before the block's first shared buffer";
  }
  return "shared memory outside the running block's allocation";
}

enum Kind { READ, WRITE, ATOMIC_RMW, ATOMIC_READ };
enum Rel { ORDERED, SAME, CONC, CONC_BLOCK };

struct Me {
  uint64_t S, B, Lo, wc, rec;
  int t;
};

inline Rel relation(const Me& m, uint64_t rec) {
  uint64_t s = rec & kSegMask;
  if (s == 0 || s < m.Lo) return ORDERED;
  if (s < m.B) return CONC_BLOCK;
  if (s != m.S) return ORDERED;
  int tid = (int)((rec >> kTidShift) & kTidMask);
  if (tid == m.t) return SAME;  // program order
  if ((tid >> 5) != (m.t >> 5)) return CONC;
  return ((rec >> kWcShift) & kWcMask) == m.wc ? CONC : ORDERED;
}

// Whether the other readers a read record stands for (its flags) may be unordered
// with the current thread. Cross readers (another warp of the interval, or another
// block): unordered with every later access of the interval. Same-warp readers:
// unordered until the warp's next collective.
inline bool other_readers_unordered(const Me& m, uint64_t r) {
  uint64_t s = r & kSegMask;
  if (s == 0 || s < m.Lo) return false;
  if (s < m.B) return (r & (kCrossReaders | kWarpReaders)) != 0;  // another block's readers
  if (s != m.S) return false;
  if (r & kCrossReaders) return true;
  int tid = (int)((r >> kTidShift) & kTidMask);
  return (r & kWarpReaders) && (tid >> 5) == (m.t >> 5) && ((r >> kWcShift) & kWcMask) == m.wc;
}

std::string other_thread(const Runner& r, uint64_t rec, Rel rel) {
  const Launch& L = *r.L;
  int tid = (int)((rec >> kTidShift) & kTidMask);
  long long blk = r.block_lin;
  if (rel == CONC_BLOCK) {
    uint64_t s = rec & kSegMask;
    auto it = std::upper_bound(L.block_segs.begin(), L.block_segs.end(), std::make_pair(s, (long long)1 << 62));
    if (it != L.block_segs.begin()) blk = std::prev(it)->second;
  }
  return thread_name(L, blk, tid);
}

const char* why(Rel rel) {
  switch (rel) {
    case CONC_BLOCK: return "in another block of the same launch (blocks are not ordered)";
    case CONC: return "with no __syncthreads (or, within a warp, no __syncwarp / warp collective) between";
    default: return "";
  }
}

[[noreturn]] void report(const std::string& msg, std::atomic<long long>& counter) {
  counter.fetch_add(1);
  fault(msg.c_str());
}

[[noreturn]] void hazard(const char* type, const Runner& r, uintptr_t a, const char* verb, uint64_t rec, Rel rel,
                         const char* other_verb) {
  std::string m = std::string("racecheck: ") + type + " hazard on " + where(a) + ": " +
                  thread_name(*r.L, r.block_lin, r.current) + " " + verb + " it, " + other_thread(r, rec, rel) + " " +
                  other_verb + " it " + why(rel);
  report(m, stats().races);
}

__attribute__((noinline)) void check_access(uintptr_t a, size_t n, Kind kind) {
  Runner* r = tl;
  // Only checked launches (blocks one at a time, intervals numbered) are checked:
  // detectors switched on while an unchecked launch runs see nothing of it.
  if (!r || r->current < 0 || !r->L || !r->L->checked) return;
  int ck = g_checks.load(std::memory_order_relaxed);
  Me me;
  me.S = r->seg;
  me.B = r->block_seg_lo;
  me.Lo = r->L->seg_lo;
  me.t = r->current;
  me.wc = r->wcnt[me.t >> 5] & kWcMask;
  me.rec = (me.S & kSegMask) | ((uint64_t)me.t << kTidShift) | (me.wc << kWcShift);
  const bool writes = kind == WRITE || kind == ATOMIC_RMW;
  const bool atomic = kind == ATOMIC_RMW || kind == ATOMIC_READ;
  Cell* c = cell(a);
  for (size_t i = 0; i < n; ++i) {
    Cell& x = c[i];
    if (!(x.r & kAddr)) {
      if (ck & CHECK_MEM)
        report(std::string("memcheck: ") + thread_name(*r->L, r->block_lin, r->current) + " " +
                   (writes ? "writes" : "reads") + " " + std::to_string(n) + " bytes at " + where(a + i) +
                   ": out of bounds",
               stats().oob);
      return;  // not addressable and not checked: nothing to record
    }
    if ((x.w & kPending) && (ck & (CHECK_RACE | CHECK_INIT))) {
      int issuer = (int)((x.w >> kTidShift) & kTidMask);
      std::string me_name = thread_name(*r->L, r->block_lin, r->current);
      std::string tail = std::string(", the destination of a cp.async by ") +
                         (issuer == r->current ? "the same thread" : thread_name(*r->L, r->block_lin, issuer)) +
                         " still in flight (no cp.async.wait_group of that thread has retired it)";
      if (ck & CHECK_RACE)
        report(std::string("racecheck: ") + (writes ? "WAW" : "RAW") + " hazard on " + where(a + i) + ": " + me_name +
                   " " + (writes ? "writes" : "reads") + " it" + tail,
               stats().races);
      report(std::string("initcheck: ") + me_name + " " + (writes ? "writes" : "reads") + " " + where(a + i) + tail,
             stats().uninit);
    }
    if (kind != WRITE && (ck & CHECK_INIT) && !(x.w & kInit))
      report(std::string("initcheck: ") + thread_name(*r->L, r->block_lin, r->current) + " reads " +
                 where(a + i) + ", which was never written",
             stats().uninit);
    if (ck & CHECK_RACE) {
      Rel rw = relation(me, x.w);
      if ((rw == CONC || rw == CONC_BLOCK) && !(atomic && (x.w & kAtomic)))
        hazard(writes ? "WAW" : "RAW", *r, a + i, writes ? "writes" : "reads", x.w, rw, "wrote");
      if (writes) {
        // Plain reads (atomic loads are not recorded) against a plain or atomic write.
        Rel rr = relation(me, x.r);
        if (rr == CONC || rr == CONC_BLOCK)
          hazard("WAR", *r, a + i, "writes", x.r, rr, "read");
        if (other_readers_unordered(me, x.r))
          hazard("WAR", *r, a + i, "writes", x.r, rr == SAME || rr == ORDERED ? CONC : rr,
                 rr == SAME ? "and another thread read" : "and another thread read");
      }
    }
    if (writes) {
      x.w = kInit | me.rec | (atomic ? kAtomic : 0);
      x.r = kAddr;
    } else if ((ck & CHECK_RACE) && kind == READ) {
      uint64_t old = x.r;
      Rel rr = relation(me, old);
      int otid = (int)((old >> kTidShift) & kTidMask);
      switch (rr) {
        case CONC_BLOCK: x.r = old | kCrossReaders; break;
        case CONC: x.r = old | ((otid >> 5) == (me.t >> 5) ? kWarpReaders : kCrossReaders); break;
        case SAME:
          // Refresh the collective count; same-warp readers of an older count are
          // ordered before this thread's next accesses by that collective.
          if (((old >> kWcShift) & kWcMask) != me.wc) old &= ~kWarpReaders;
          x.r = kAddr | (old & kCrossReaders) | (old & kWarpReaders) | me.rec;
          break;
        case ORDERED: {
          // Ordered by a warp collective only (same interval): readers in other warps
          // or blocks stay unordered with what follows.
          bool same_interval = (old & kSegMask) == (me.S & kSegMask);
          x.r = kAddr | (same_interval ? (old & kCrossReaders) : 0) | me.rec;
          break;
        }
      }
    }
  }
}

inline void access(const volatile void* p, size_t n, Kind kind) {
  poll();
  uintptr_t a = (uintptr_t)p;
  if (a - g_base >= g_span) return;
  if (!g_checks.load(std::memory_order_relaxed)) return;
  check_access(a, n, kind);
}

// Whether the running launch keeps shadow records (checked, detectors on).
bool shadowed(uintptr_t a, size_t n) {
  Runner* r = tl;
  return r && r->current >= 0 && r->L && r->L->checked && g_checks.load(std::memory_order_relaxed) &&
         in_region(a, n);
}
}  // namespace

// ---- cp.async (kernels/mma.cuh) ----
// Copies issued since the library was loaded (every launch and thread): tests read it
// around a call to tell a kernel's cp.async path from its staged loads.
std::atomic<unsigned long long> g_cp_async_issued{0};

// Issue: the source is read and checked now (bounds, init, races, as a read by this
// thread); the destination is checked as a write now (bounds; WAR/WAW against the
// accesses before it), filled with 0xFF (NaN in f32, f16, bf16: a read before the
// wait is visible even with the detectors off) and marked in flight, so any access
// to it before a wait retires it is reported. The bytes land at the wait.
void cp_async(void* dst, const void* src, int cp_size, int src_size) {
  poll();
  Runner* r = tl;
  Fiber& f = r->fibers[r->current];
  if (cp_size != 4 && cp_size != 8 && cp_size != 16) fault("cp.async: cp-size must be 4, 8 or 16 bytes");
  if (src_size < 0 || src_size > cp_size) fault("cp.async: src-size must be between 0 and cp-size");
  if (!in_block_smem(dst, (size_t)cp_size)) fault("cp.async: the destination is not the block's shared memory");
  if ((uintptr_t)dst % (uintptr_t)cp_size || (uintptr_t)src % (uintptr_t)cp_size)
    fault(("cp.async: source and destination must be aligned to cp-size (" + std::to_string(cp_size) +
           " bytes): misaligned address")
              .c_str());
  g_cp_async_issued.fetch_add(1, std::memory_order_relaxed);
  AsyncCopy c;
  c.dst = static_cast<unsigned char*>(dst);
  c.bytes = cp_size;
  c.group = f.async_commits;
  std::memset(c.data, 0, sizeof c.data);
  if (src_size > 0) {
    access(src, (size_t)src_size, READ);
    std::memcpy(c.data, src, (size_t)src_size);
  }
  access(dst, (size_t)cp_size, WRITE);
  std::memset(dst, 0xFF, (size_t)cp_size);
  uintptr_t a = (uintptr_t)dst;
  if (shadowed(a, (size_t)cp_size)) {
    Cell* x = cell(a);
    for (int i = 0; i < cp_size; ++i)
      if (x[i].r & kAddr) x[i].w = (x[i].w & ~kInit) | kPending;
  }
  f.async.push_back(c);
}

void cp_async_commit() {
  poll();
  ++tl->fibers[tl->current].async_commits;
}

void cp_async_wait(int n) {
  poll();
  Runner* r = tl;
  Fiber& f = r->fibers[r->current];
  if (n < 0) fault("cp.async.wait_group: negative group count");
  if (f.async_commits < (uint64_t)n) return;
  uint64_t limit = f.async_commits - (uint64_t)n;  // groups below it are retired
  size_t keep = 0;
  for (size_t i = 0; i < f.async.size(); ++i) {
    AsyncCopy& c = f.async[i];
    if (c.group >= limit) {
      f.async[keep++] = c;
      continue;
    }
    std::memcpy(c.dst, c.data, (size_t)c.bytes);
    uintptr_t a = (uintptr_t)c.dst;
    if (shadowed(a, (size_t)c.bytes)) {
      // Written now, by this thread, in the current barrier interval: other threads
      // need a __syncthreads (or, in the warp, a __syncwarp) after this wait to read it.
      uint64_t rec = (r->seg & kSegMask) | ((uint64_t)r->current << kTidShift) |
                     ((uint64_t)(r->wcnt[r->current >> 5] & kWcMask) << kWcShift);
      Cell* x = cell(a);
      for (int i = 0; i < c.bytes; ++i)
        if (x[i].r & kAddr) x[i] = Cell{kInit | rec, kAddr};
    }
  }
  f.async.resize(keep);
}

// ---- host-side copies ----
namespace {
bool host_check(uint64_t a, size_t n, const char* what, const char* dir) {
  if (!in_region(a, n)) {
    set_fault(std::string(what) + ": " + dir + " a pointer that is not device memory");
    return false;
  }
  Cell* c = cell(a);
  for (size_t i = 0; i < n; ++i)
    if (!(c[i].r & kAddr)) {
      stats().oob.fetch_add(1);
      set_fault(std::string("memcheck: ") + what + " " + dir + " " + std::to_string(n) + " bytes, out of bounds at " +
                where(a + i));
      return false;
    }
  return true;
}
}  // namespace

bool host_write(uint64_t dst, size_t n, const char* what) {
  if (!n) return true;
  std::lock_guard<std::mutex> g(g_shadow_mu);
  if (!host_check(dst, n, what, "writes")) return false;
  Cell* c = cell(dst);
  for (size_t i = 0; i < n; ++i) c[i] = Cell{kInit, kAddr};
  return true;
}

bool host_read(uint64_t src, size_t n, const char* what) {
  if (!n) return true;
  std::lock_guard<std::mutex> g(g_shadow_mu);
  if (!host_check(src, n, what, "reads")) return false;
  if (g_checks.load() & CHECK_INIT) {
    Cell* c = cell(src);
    size_t first = n, count = 0;
    for (size_t i = 0; i < n; ++i)
      if (!(c[i].w & kInit)) {
        if (first == n) first = i;
        ++count;
      }
    if (count) {
      stats().uninit.fetch_add(1);
      set_fault(std::string("initcheck: ") + what + " copies " + std::to_string(count) + " never-written bytes of " +
                std::to_string(n) + " (first: " + where(src + first) +
                ") — an output the kernels did not fully write");
      return false;
    }
  }
  return true;
}

bool device_copy(uint64_t dst, uint64_t src, size_t n) {
  if (!n) return true;
  std::lock_guard<std::mutex> g(g_shadow_mu);
  if (!host_check(src, n, "device-to-device copy", "reads") || !host_check(dst, n, "device-to-device copy", "writes"))
    return false;
  Cell *s = cell(src), *d = cell(dst);
  if (d < s || d >= s + n) {
    for (size_t i = 0; i < n; ++i) d[i] = Cell{s[i].w & kInit, kAddr};
  } else {
    for (size_t i = n; i-- > 0;) d[i] = Cell{s[i].w & kInit, kAddr};
  }
  return true;
}

}  // namespace emu

// ---- the instrumentation hooks (GCC -fsanitize=thread, without its runtime) ----
#define HOOK extern "C" __attribute__((visibility("hidden")))
using emu::ATOMIC_READ;
using emu::ATOMIC_RMW;
using emu::READ;
using emu::WRITE;
HOOK void __tsan_init() {}
HOOK void __tsan_func_entry(void*) {}
HOOK void __tsan_func_exit() {}
#define EMU_RW(N)                                                                        \
  HOOK void __tsan_read##N(void* p) { emu::access(p, N, READ); }                         \
  HOOK void __tsan_write##N(void* p) { emu::access(p, N, WRITE); }                       \
  HOOK void __tsan_unaligned_read##N(void* p) { emu::access(p, N, READ); }               \
  HOOK void __tsan_unaligned_write##N(void* p) { emu::access(p, N, WRITE); }             \
  HOOK void __tsan_volatile_read##N(void* p) { emu::access(p, N, READ); }                \
  HOOK void __tsan_volatile_write##N(void* p) { emu::access(p, N, WRITE); }              \
  HOOK void __tsan_unaligned_volatile_read##N(void* p) { emu::access(p, N, READ); }      \
  HOOK void __tsan_unaligned_volatile_write##N(void* p) { emu::access(p, N, WRITE); }
EMU_RW(1)
EMU_RW(2)
EMU_RW(4)
EMU_RW(8)
EMU_RW(16)
HOOK void __tsan_read_range(void* p, unsigned long n) { emu::access(p, n, READ); }
HOOK void __tsan_write_range(void* p, unsigned long n) { emu::access(p, n, WRITE); }

#define EMU_ATOMICS(N, T)                                                                                  \
  HOOK T __tsan_atomic##N##_load(const volatile T* a, int) {                                               \
    emu::access(a, sizeof(T), ATOMIC_READ);                                                                \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                           \
  }                                                                                                        \
  HOOK void __tsan_atomic##N##_store(volatile T* a, T v, int) {                                            \
    emu::access(a, sizeof(T), ATOMIC_RMW);                                                                 \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                              \
  }                                                                                                        \
  HOOK T __tsan_atomic##N##_exchange(volatile T* a, T v, int) {                                            \
    emu::access(a, sizeof(T), ATOMIC_RMW);                                                                 \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                    \
  }                                                                                                        \
  HOOK T __tsan_atomic##N##_fetch_add(volatile T* a, T v, int) {                                           \
    emu::access(a, sizeof(T), ATOMIC_RMW);                                                                 \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                                     \
  }                                                                                                        \
  HOOK T __tsan_atomic##N##_fetch_sub(volatile T* a, T v, int) {                                           \
    emu::access(a, sizeof(T), ATOMIC_RMW);                                                                 \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                                     \
  }                                                                                                        \
  HOOK T __tsan_atomic##N##_fetch_and(volatile T* a, T v, int) {                                           \
    emu::access(a, sizeof(T), ATOMIC_RMW);                                                                 \
    return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                                     \
  }                                                                                                        \
  HOOK T __tsan_atomic##N##_fetch_or(volatile T* a, T v, int) {                                            \
    emu::access(a, sizeof(T), ATOMIC_RMW);                                                                 \
    return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                                      \
  }                                                                                                        \
  HOOK T __tsan_atomic##N##_fetch_xor(volatile T* a, T v, int) {                                           \
    emu::access(a, sizeof(T), ATOMIC_RMW);                                                                 \
    return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                                     \
  }                                                                                                        \
  HOOK T __tsan_atomic##N##_fetch_nand(volatile T* a, T v, int) {                                          \
    emu::access(a, sizeof(T), ATOMIC_RMW);                                                                 \
    return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                                    \
  }                                                                                                        \
  HOOK int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                \
    emu::access(a, sizeof(T), ATOMIC_RMW);                                                                 \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                \
  }                                                                                                        \
  HOOK int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                  \
    emu::access(a, sizeof(T), ATOMIC_RMW);                                                                 \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                 \
  }                                                                                                        \
  HOOK T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                      \
    emu::access(a, sizeof(T), ATOMIC_RMW);                                                                 \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                      \
    return c;                                                                                              \
  }
EMU_ATOMICS(8, uint8_t)
EMU_ATOMICS(16, uint16_t)
EMU_ATOMICS(32, uint32_t)
EMU_ATOMICS(64, uint64_t)
HOOK void __tsan_atomic_thread_fence(int) {
  emu::poll();
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
HOOK void __tsan_atomic_signal_fence(int) {}

#define EXPORT extern "C" __attribute__((visibility("default")))
// Detectors in force (bit 1 race, 2 init, 4 mem); -1 leaves them as they are.
// Returns the mask in force after the call. Turning a detector on applies to
// memory allocated and written from then on.
EXPORT int emu_checks(int set) {
  if (set >= 0) emu::g_checks.store(emu::instrumented() ? (set & emu::CHECK_ALL) : 0);
  return emu::g_checks.load();
}
EXPORT long long emu_live_allocations() { return emu::live_allocations(); }
// cp.async copies issued so far (see g_cp_async_issued).
EXPORT unsigned long long emu_cp_async_issued() { return emu::g_cp_async_issued.load(); }
