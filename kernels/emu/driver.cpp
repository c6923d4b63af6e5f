// driver.cpp — the fake libcuda of the emulated device (feature `emulate`): the
// driver entry points cudarc 0.19 calls, with device memory in the checked heap
// (shadow.cpp) and every operation synchronous. Built as a shared object with soname
// libcuda.so and loaded by absolute path, on request only (see src/emu.rs): it never
// shadows a real driver.
//
// Launches are refused as a GPU of the emulated arch (AK_EMU_ARCH=86, the default,
// 75 or 90) would refuse them: block and grid dimensions, dynamic shared memory above
// 48 KiB without CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (and above the
// arch's opt-in maximum with it), and registers x threads above the register file,
// with the registers ptxas reported for the kernel (kernels/emu/ptxas-table.tsv,
// written by scripts/kernel-report.sh from an nvcc build; a kernel not in the table
// is not register-checked).
#include <algorithm>
#include <map>
#include <atomic>
#include <memory>
#include <mutex>
#include <set>
#include <vector>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include <unistd.h>

#include "internal.h"
#include "ptxas_table.inc"

namespace emu {
namespace {
// sm_75: a T4 (40 SMs; 64 KB of shared memory per SM, all of it per block with the
// attribute, none reserved by the driver).
const Arch kSm75{75, 40, 1024, 16, 65536, 65536, 65536, 65536, "sm_75 (T4)"};
const Arch kSm86{86, 84, 1536, 16, 65536, 65536, 102400, 101376, "sm_86 (A6000)"};
const Arch kSm90{90, 132, 2048, 32, 65536, 65536, 233472, 232448, "sm_90 (H100)"};
}  // namespace

const Arch& arch() {
  static const Arch* a = [] {
    const char* e = getenv("AK_EMU_ARCH");
    if (e && (!strcmp(e, "90") || !strcmp(e, "sm_90"))) return &kSm90;
    if (e && (!strcmp(e, "75") || !strcmp(e, "sm_75"))) return &kSm75;
    if (e && *e && strcmp(e, "86") && strcmp(e, "sm_86"))
      fprintf(stderr, "[emulated device] AK_EMU_ARCH=%s: only 75, 86 and 90 are modelled; using 86\n", e);
    return &kSm86;
  }();
  return *a;
}

// The virtual arch the emulated kernels count as compiled for (their PTX version):
// the GPU's, or AK_EMU_PTX=75 on a newer one — a build for sm_75 only
// (AK_CUDA_ARCHS=75), whose compute_75 PTX the driver JIT-compiles for the GPU with
// __CUDA_ARCH__ = 750, so the sm_80 kernel bodies are traps there too.
int built_sm() {
  static const int v = [] {
    const char* e = getenv("AK_EMU_PTX");
    if (e && (!strcmp(e, "75") || !strcmp(e, "compute_75")) && arch().sm > 75) return 75;
    if (e && *e && strcmp(e, "75") && strcmp(e, "compute_75"))
      fprintf(stderr, "[emulated device] AK_EMU_PTX=%s: only 75 is modelled; ignored\n", e);
    return arch().sm;
  }();
  return v;
}

void need_sm(int sm, const char* what) {
  if (built_sm() >= sm) return;
  char msg[224];
  if (built_sm() < arch().sm)
    snprintf(msg, sizeof msg, "%s needs sm_%d; the kernels were built for compute_%d (AK_EMU_PTX) and trap here",
             what, sm, built_sm());
  else
    snprintf(msg, sizeof msg, "%s needs sm_%d; the emulated GPU is %s (a kernel built for it traps here)", what, sm,
             arch().name);
  fault(msg);
}

namespace {
// Registers and static shared memory of each kernel on the emulated arch, from the
// ptxas table (once).
void apply_ptxas_table() {
  static std::once_flag once;
  std::call_once(once, [] {
    for (const auto& e : kPtxasTable) {
      if (!e.kernel || e.sm != arch().sm) continue;
      if (Kernel* k = find_kernel(e.kernel)) {
        k->regs = e.regs;
        k->static_smem = e.smem;
      }
    }
  });
}

// Registers of a block, allocated per warp in units of 256 (sm_75..sm_90).
long long block_regs(int regs, long long threads) {
  long long per_warp = ((long long)regs * 32 + 255) / 256 * 256;
  return (threads + 31) / 32 * per_warp;
}

// AK_EMU_TRACE=<file>: append one line per launch — kernel name, grid, block,
// dynamic shared bytes (coverage check: which registered kernels the test suites
// actually run) — and at exit one `#emu-stats` line with the detectors' counts.
void trace_launch(const char* name, dim3 gd, dim3 bd, unsigned smem) {
  static const char* path = getenv("AK_EMU_TRACE");
  if (!path) return;
  static std::mutex mu;
  std::lock_guard<std::mutex> g(mu);
  if (FILE* f = fopen(path, "a")) {
    fprintf(f, "%s grid=%u,%u,%u block=%u,%u,%u smem=%u\n", name, gd.x, gd.y, gd.z, bd.x, bd.y, bd.z, smem);
    fclose(f);
  }
}

__attribute__((destructor)) void write_stats() {
  const char* path = getenv("AK_EMU_TRACE");
  Stats& s = stats();
  if (!path || s.launches.load() == 0) return;
  char exe[512] = {0};
  ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  const char* base = n > 0 ? strrchr(exe, '/') : nullptr;
  if (FILE* f = fopen(path, "a")) {
    fprintf(f,
            "#emu-stats exe=%s checks=%d launches=%lld checked=%lld limit_checked=%lld races=%lld uninit=%lld "
            "oob=%lld limit_faults=%lld watchdog=%lld\n",
            base ? base + 1 : "?", checks(), s.launches.load(), s.checked_launches.load(), s.limit_checks.load(),
            s.races.load(), s.uninit.load(), s.oob.load(), s.limit_faults.load(), s.watchdog.load());
    fclose(f);
  }
}
}  // namespace
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
  CUDA_ERROR_ILLEGAL_ADDRESS = 700,
  CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
  CUDA_ERROR_LAUNCH_FAILED = 719,
  CUDA_ERROR_NOT_SUPPORTED = 801,
};

namespace {
int g_ctx_token;

// ---- the driver's CUDA version, and the kernel images it accepts ----
// The emulated driver poses as CUDA 13.5 (the toolchain CI builds with), or as
// AK_EMU_DRIVER_VERSION / emu_set_driver_version (e.g. 12040 for an R550 driver), and
// refuses an image that driver would refuse:
// * the crate's emulated image ("... built with CUDA <v>"): needs a driver of <v>'s
//   major version (as an nvcc image of that toolkit does);
// * PTX: `.version` above the driver's PTX ISA (CUDA 12.0-12.5 -> 8.0-8.5, 12.6 ->
//   8.5, 12.8 -> 8.7, 12.9 -> 8.8, 13.x -> 9.x) -> CUDA_ERROR_UNSUPPORTED_PTX_VERSION;
//   `.target` above the emulated arch -> CUDA_ERROR_NO_BINARY_FOR_GPU;
// * a cubin (ELF, EM_CUDA): its SM (e_flags & 0xff) must have the device's major and
//   at most its minor -> else CUDA_ERROR_NO_BINARY_FOR_GPU;
// * an nvcc fatbin: accepted (its kernels are the linked ones).
// A PTX or cubin image holds only the kernels it defines (`.entry` / `.text.<name>`):
// cuModuleGetFunction of any other is CUDA_ERROR_NOT_FOUND, as on a GPU.
constexpr CUresult kErrInvalidImage = 200, kErrNoBinaryForGpu = 209, kErrUnsupportedPtx = 222;
std::atomic<int> g_driver_version{0};

int driver_version() {
  int v = g_driver_version.load();
  if (v > 0) return v;
  const char* e = getenv("AK_EMU_DRIVER_VERSION");
  int want = 13050;
  if (e && *e) {
    if (atoi(e) >= 1000) {
      want = atoi(e);
    } else {
      fprintf(stderr, "[emulated device] AK_EMU_DRIVER_VERSION=%s: want 1000*major + 10*minor "
                      "(e.g. 12040); using 13050\n", e);
    }
  }
  int expected = 0;
  g_driver_version.compare_exchange_strong(expected, want);
  return g_driver_version.load();
}

// The newest PTX ISA (10*major + minor) a driver of CUDA version `v` JIT-compiles.
int max_ptx_isa(int v) {
  const int major = v / 1000, minor = v % 1000 / 10;
  if (major >= 13) return 90 + minor;
  if (major < 12) return 0;
  static const int k12[] = {80, 81, 82, 83, 84, 85, 85, 86, 87, 88};
  return k12[std::min(minor, 9)];
}

struct Module {
  bool all = false;                 // every linked kernel (emulated image, fatbin)
  std::set<std::string> entries;    // else: the kernels the image defines
};
std::mutex g_modules_mu;
std::vector<std::unique_ptr<Module>> g_modules;

CUresult check_ptx(const char* p, Module& m) {
  // The directives at the start of a line (or of the text).
  auto directive = [p](const char* d) -> const char* {
    const size_t n = strlen(d);
    if (!strncmp(p, d, n)) return p;
    std::string nl = std::string("\n") + d;
    const char* q = strstr(p, nl.c_str());
    return q ? q + 1 : nullptr;
  };
  const char* ver = directive(".version ");
  const char* tgt = directive(".target ");
  if (!ver || !tgt) return kErrInvalidImage;
  int vmaj = 0, vmin = 0, sm = 0;
  if (sscanf(ver, ".version %d.%d", &vmaj, &vmin) != 2) return kErrInvalidImage;
  if (sscanf(tgt, ".target sm_%d", &sm) != 1) return kErrInvalidImage;
  if (vmaj * 10 + vmin > max_ptx_isa(driver_version())) return kErrUnsupportedPtx;
  if (sm > emu::arch().sm) return kErrNoBinaryForGpu;
  for (const char* q = strstr(p, ".entry "); q; q = strstr(q + 1, ".entry ")) {
    const char* b = q + 7;
    const char* e = b;
    while (*e && *e != '(' && *e != ' ' && *e != '\n') ++e;
    m.entries.emplace(b, e);
  }
  return CUDA_SUCCESS;
}

// `p` starts with the ELF magic (check_image); like a driver, this trusts the header
// for the image's extent (the crate checks a cached cubin is whole before loading it).
CUresult check_cubin(const unsigned char* p, Module& m) {
  if (p[4] != 2) return kErrInvalidImage;  // ELF64
  uint16_t machine;
  uint32_t flags;
  uint64_t shoff;
  uint16_t shentsize, shnum;
  memcpy(&machine, p + 18, 2);
  if (machine != 190) return kErrInvalidImage;  // EM_CUDA
  memcpy(&shoff, p + 40, 8);
  memcpy(&flags, p + 48, 4);
  memcpy(&shentsize, p + 58, 2);
  memcpy(&shnum, p + 60, 2);
  if (shentsize != 64 || shoff > (size_t(1) << 30)) return kErrInvalidImage;
  // The SM: e_flags bits 0-7 for ELF ABI version 7 (CUDA 12 and older), bits 8-15 for
  // version 8 (CUDA 13).
  const int sm = int(p[8] >= 8 ? (flags >> 8) & 0xff : flags & 0xff), dev = emu::arch().sm;
  if (sm / 10 != dev / 10 || sm > dev) return kErrNoBinaryForGpu;
  const size_t size = size_t(shoff) + size_t(shentsize) * shnum;
  const std::string blob(reinterpret_cast<const char*>(p), size);
  for (emu::Kernel* k : emu::all_kernels()) {
    const std::string sec = std::string(".text.") + k->name;
    if (blob.find(sec + '\0') != std::string::npos) m.entries.insert(k->name);
  }
  return CUDA_SUCCESS;
}

CUresult check_image(const char* p, Module& m) {
  static const char kMarker[] = "activation-kernels: emulated image; built with CUDA ";
  const unsigned char* u = reinterpret_cast<const unsigned char*>(p);
  if (!strncmp(p, kMarker, sizeof kMarker - 1)) {
    const int built = atoi(p + sizeof kMarker - 1);
    if (driver_version() / 1000 < built / 1000) return kErrUnsupportedPtx;
    m.all = true;
    return CUDA_SUCCESS;
  }
  if (!memcmp(p, "\x7f" "ELF", 4)) return check_cubin(u, m);
  if (u[0] == 0x50 && u[1] == 0xed && u[2] == 0x55 && u[3] == 0xba) {  // fatbin magic
    m.all = true;
    return CUDA_SUCCESS;
  }
  if (strstr(p, ".version ")) return check_ptx(p, m);
  return kErrInvalidImage;
}
thread_local CUcontext tl_ctx = nullptr;

const char* err_name(CUresult e) {
  switch (e) {
    case CUDA_SUCCESS: return "CUDA_SUCCESS";
    case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
    case CUDA_ERROR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
    case CUDA_ERROR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
    case CUDA_ERROR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
    case CUDA_ERROR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
    case CUDA_ERROR_ILLEGAL_ADDRESS: return "CUDA_ERROR_ILLEGAL_ADDRESS";
    case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
    case CUDA_ERROR_LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
    case CUDA_ERROR_NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
    case kErrInvalidImage: return "CUDA_ERROR_INVALID_IMAGE";
    case kErrNoBinaryForGpu: return "CUDA_ERROR_NO_BINARY_FOR_GPU";
    case kErrUnsupportedPtx: return "CUDA_ERROR_UNSUPPORTED_PTX_VERSION";
    default: return "CUDA_ERROR_UNKNOWN";
  }
}

bool dry_run_on();
bool dry_alloc(size_t bytes, uint64_t* out);
bool dry_free(uint64_t p);

CUresult alloc(CUdeviceptr* p, size_t bytes) {
  if (!p) return CUDA_ERROR_INVALID_VALUE;
  uint64_t a = 0;
  if (dry_run_on()) {
    if (!dry_alloc(bytes, &a)) return CUDA_ERROR_OUT_OF_MEMORY;
    *p = (CUdeviceptr)a;
    return CUDA_SUCCESS;
  }
  if (!emu::heap_alloc(bytes, &a)) return CUDA_ERROR_OUT_OF_MEMORY;
  *p = (CUdeviceptr)a;
  return CUDA_SUCCESS;
}
CUresult release(CUdeviceptr p) {
  if (!p) return CUDA_SUCCESS;
  if (dry_free(p)) return CUDA_SUCCESS;
  return emu::heap_free(p) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}
}  // namespace

#define EXPORT extern "C" __attribute__((visibility("default")))

// ---- host<->device traffic counters and the dry-run switch (src/emu.rs `transfers`,
// `set_dry_run`) ----
// Each counter counts the driver calls made by the calling thread (thread-local, so
// tests running in parallel in one process do not see each other's calls): copies
// between host and device (synchronous and asynchronous entry points alike) and
// host-blocking synchronisations (stream, context, event). A test proves "no host
// round trip in steady state" by reading them around a training step.
namespace {
enum Traffic : int { T_HTOD, T_DTOH, T_STREAM_SYNC, T_CTX_SYNC, T_EVENT_SYNC, T_COUNT };
thread_local long long tl_traffic[T_COUNT] = {0, 0, 0, 0, 0};
inline void count_traffic(Traffic t) { ++tl_traffic[t]; }
// Dry run: launches are checked (limits, trace, launch counter) but no kernel runs —
// for measuring the host-side cost per call of the safe API (benches/cuda_ops.rs
// `host_cost`). Outputs are left unwritten; never on in tests that read results.
std::atomic<bool> g_dry_run{false};

// Dry-run allocations: an address range no memory backs (bit 62 set: never a host
// address), so a dry run of a model-size op (a ResNet-50 stage at N = 256 moves
// gigabytes) touches no memory and no shadow. Copies and memsets that involve such an
// address, or happen while the dry run is on, do nothing (no kernel will read the
// data); outside a dry run they are refused.
constexpr uint64_t kDryBase = 1ull << 62, kDrySpan = 1ull << 52;
std::mutex g_dry_mu;
std::map<uint64_t, size_t> g_dry_live;
uint64_t g_dry_bump = 256;

// The launch log (emu_launch_log / emu_take_launch_log): one line per launch while on.
std::atomic<bool> g_log_on{false};
std::mutex g_log_mu;
std::string g_log;

// Asynchronous faults (emu_async_faults): while on, a launch whose kernel faults
// returns CUDA_SUCCESS, as a GPU's asynchronous launch does, and the error is returned
// by the next synchronisation or device-to-host copy (once).
std::atomic<bool> g_async_faults{false};
std::atomic<int> g_pending{0};
CUresult take_pending() { return g_pending.exchange(0); }
bool is_dry(uint64_t a) { return a >= kDryBase && a < kDryBase + kDrySpan; }
}  // namespace

namespace {
bool dry_run_on() { return g_dry_run.load(std::memory_order_relaxed); }
bool dry_alloc(size_t bytes, uint64_t* out) {
  std::lock_guard<std::mutex> g(g_dry_mu);
  const uint64_t span = ((std::max<uint64_t>(bytes, 1) + 255) & ~255ull) + 256;
  if (g_dry_bump + span > kDrySpan) return false;
  *out = kDryBase + g_dry_bump;
  g_dry_bump += span;
  g_dry_live[*out] = bytes;
  return true;
}
bool dry_free(uint64_t p) {
  if (!is_dry(p)) return false;
  std::lock_guard<std::mutex> g(g_dry_mu);
  g_dry_live.erase(p);
  if (g_dry_live.empty()) g_dry_bump = 256;  // the address range is reused
  return true;
}
// A copy or memset that must not touch memory: true (and `*r` = the result) when the
// dry run is on or an address is a dry-run one.
bool skip_data(uint64_t a, uint64_t b, CUresult* r) {
  const bool dry = is_dry(a) || is_dry(b);
  if (!dry && !dry_run_on()) return false;
  *r = dry && !dry_run_on() ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS;
  return true;
}
}  // namespace

// Writes the calling thread's counters into out[0..n) in the order HtoD copies, DtoH
// copies, stream syncs, context syncs, event syncs; returns how many it wrote.
EXPORT int emu_traffic_counts(long long* out, int n) {
  int m = 0;
  for (; out && m < n && m < T_COUNT; ++m) out[m] = tl_traffic[m];
  return m;
}
// Clears the calling thread's counters.
EXPORT void emu_reset_traffic_counts() {
  for (long long& c : tl_traffic) c = 0;
}
// Sets (0/1) or, with -1, only reads the dry-run switch; returns the value in force.
EXPORT int emu_dry_run(int set) {
  if (set >= 0) g_dry_run.store(set != 0);
  return g_dry_run.load() ? 1 : 0;
}
// Number of dry-run allocations alive (see dry_alloc).
EXPORT long long emu_dry_live_allocations() {
  std::lock_guard<std::mutex> g(g_dry_mu);
  return (long long)g_dry_live.size();
}
// Sets (0/1) or, with -1, only reads whether launches are logged; returns the value in
// force. Turning it on clears the log.
EXPORT int emu_launch_log(int set) {
  if (set >= 0) {
    std::lock_guard<std::mutex> g(g_log_mu);
    if (set) g_log.clear();
    g_log_on.store(set != 0);
  }
  return g_log_on.load() ? 1 : 0;
}
// The launches logged since the last take, one line each: `kernel gx gy gz bx by bz
// smem bound` (bound: the kernel's launch bound, max threads per block). Returns the log's length plus one; when that fits in `len`, copies it with a
// NUL into `buf` and clears the log (else leaves it, so the caller can grow `buf`).
EXPORT size_t emu_take_launch_log(char* buf, size_t len) {
  std::lock_guard<std::mutex> g(g_log_mu);
  const size_t need = g_log.size() + 1;
  if (buf && len >= need) {
    memcpy(buf, g_log.c_str(), need);
    g_log.clear();
  }
  return need;
}
// Sets (0/1) or, with -1, only reads the asynchronous-fault mode; returns the value in
// force.
EXPORT int emu_async_faults(int set) {
  if (set >= 0) g_async_faults.store(set != 0);
  if (set == 0) g_pending.store(0);
  return g_async_faults.load() ? 1 : 0;
}

// ---- device, context ----
EXPORT CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
EXPORT CUresult cuDriverGetVersion(int* v) {
  if (!v) return CUDA_ERROR_INVALID_VALUE;
  *v = driver_version();
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
  const emu::Arch& A = emu::arch();
  switch (attrib) {
    case 1: *v = 1024; break;                      // max threads per block
    case 2: case 3: *v = 1024; break;              // max block dim x, y
    case 4: *v = 64; break;                        // max block dim z
    case 5: *v = 2147483647; break;                // max grid dim x
    case 6: case 7: *v = 65535; break;             // max grid dim y, z
    case 8: *v = emu::kDefaultDynamicSmem; break;  // shared memory per block
    case 10: *v = 32; break;                       // warp size
    case 12: *v = A.regs_per_block; break;         // registers per block
    case 16: *v = A.sms; break;                    // multiprocessors
    case 39: *v = A.threads_per_sm; break;         // threads per multiprocessor
    case 75: *v = A.sm / 10; break;                // compute capability major
    case 76: *v = A.sm % 10; break;                // compute capability minor
    case 81: *v = A.smem_per_sm; break;            // shared memory per multiprocessor
    case 82: *v = A.regs_per_sm; break;            // registers per multiprocessor
    case 97: *v = A.smem_optin; break;             // shared memory per block (opt-in)
    case 106: *v = A.blocks_per_sm; break;         // blocks per multiprocessor
    case 115: *v = 1; break;                       // memory pools supported
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
EXPORT CUresult cuCtxSynchronize() {
  count_traffic(T_CTX_SYNC);
  return take_pending();
}

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
EXPORT CUresult cuStreamSynchronize(CUstream) {
  count_traffic(T_STREAM_SYNC);
  return take_pending();
}
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
EXPORT CUresult cuEventSynchronize(CUevent) {
  count_traffic(T_EVENT_SYNC);
  return take_pending();
}
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
  count_traffic(T_HTOD);  // also counts cuMemcpyHtoDAsync_v2, which calls this
  CUresult r;
  if (skip_data(d, 0, &r)) return r;
  if (!emu::host_write(d, b, "host-to-device copy")) return CUDA_ERROR_INVALID_VALUE;
  if (b) std::memcpy((void*)(uintptr_t)d, s, b);
  return CUDA_SUCCESS;
}
EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* s, size_t b, CUstream) {
  return cuMemcpyHtoD_v2(d, s, b);
}
// A copy to the host of bytes no kernel or copy ever wrote fails (initcheck): an
// output buffer the kernels were meant to fill, and did not fully.
EXPORT CUresult cuMemcpyDtoH_v2(void* d, CUdeviceptr s, size_t b) {
  count_traffic(T_DTOH);  // also counts cuMemcpyDtoHAsync_v2, which calls this
  if (CUresult p = take_pending()) return p;
  CUresult r;
  if (skip_data(s, 0, &r)) return r;
  if (!emu::host_read(s, b, "device-to-host copy")) return CUDA_ERROR_ILLEGAL_ADDRESS;
  if (b) std::memcpy(d, (const void*)(uintptr_t)s, b);
  return CUDA_SUCCESS;
}
EXPORT CUresult cuMemcpyDtoHAsync_v2(void* d, CUdeviceptr s, size_t b, CUstream) { return cuMemcpyDtoH_v2(d, s, b); }
EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t b) {
  CUresult r;
  if (skip_data(d, s, &r)) return r;
  if (!emu::device_copy(d, s, b)) return CUDA_ERROR_INVALID_VALUE;
  if (b) std::memmove((void*)(uintptr_t)d, (const void*)(uintptr_t)s, b);
  return CUDA_SUCCESS;
}
EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t b, CUstream) {
  return cuMemcpyDtoD_v2(d, s, b);
}
EXPORT CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
  CUresult r;
  if (skip_data(d, 0, &r)) return r;
  if (!emu::host_write(d, n, "memset")) return CUDA_ERROR_INVALID_VALUE;
  if (n) std::memset((void*)(uintptr_t)d, v, n);
  return CUDA_SUCCESS;
}
EXPORT CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUstream) { return cuMemsetD8_v2(d, v, n); }
EXPORT CUresult cuMemsetD32_v2(CUdeviceptr d, unsigned v, size_t n) {
  CUresult r;
  if (skip_data(d, 0, &r)) return r;
  if (!emu::host_write(d, n * 4, "memset")) return CUDA_ERROR_INVALID_VALUE;
  unsigned* p = (unsigned*)(uintptr_t)d;
  for (size_t i = 0; i < n; ++i) p[i] = v;
  return CUDA_SUCCESS;
}
EXPORT CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, CUstream) { return cuMemsetD32_v2(d, v, n); }

// ---- modules and launches ----
EXPORT CUresult cuModuleLoadData(CUmodule* m, const void* image) {
  if (!m || !image) return CUDA_ERROR_INVALID_VALUE;
  auto mod = std::make_unique<Module>();
  CUresult r = check_image(static_cast<const char*>(image), *mod);
  if (r != CUDA_SUCCESS) return r;
  std::lock_guard<std::mutex> g(g_modules_mu);
  *m = mod.get();
  g_modules.push_back(std::move(mod));
  return CUDA_SUCCESS;
}
EXPORT CUresult cuModuleUnload(CUmodule m) {
  std::lock_guard<std::mutex> g(g_modules_mu);
  for (auto it = g_modules.begin(); it != g_modules.end(); ++it) {
    if (it->get() == m) {
      g_modules.erase(it);
      return CUDA_SUCCESS;
    }
  }
  return CUDA_ERROR_INVALID_HANDLE;
}
EXPORT CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
  if (!f || !name) return CUDA_ERROR_INVALID_VALUE;
  {
    std::lock_guard<std::mutex> g(g_modules_mu);
    const Module* mod = nullptr;
    for (const auto& x : g_modules)
      if (x.get() == m) mod = x.get();
    if (!mod) return CUDA_ERROR_INVALID_HANDLE;
    // A kernel the loaded image does not contain is not found, as on a GPU.
    if (!mod->all && !mod->entries.count(name)) return CUDA_ERROR_NOT_FOUND;
  }
  emu::Kernel* k = emu::find_kernel(name);
  if (!k) return CUDA_ERROR_NOT_FOUND;
  emu::apply_ptxas_table();
  *f = k;
  return CUDA_SUCCESS;
}
// The attributes the driver reports from the cubin: registers and static shared
// memory come from the ptxas table (0 for a kernel not in it).
EXPORT CUresult cuFuncGetAttribute(int* v, int attrib, CUfunction f) {
  if (!f || !v) return CUDA_ERROR_INVALID_VALUE;
  const emu::Kernel& k = *static_cast<emu::Kernel*>(f);
  int regs = std::max(k.regs, 0), st = std::max(k.static_smem, 0);
  switch (attrib) {
    case 0:  // CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK
      *v = std::min(1024, k.max_threads);
      if (regs > 0)
        while (*v > 32 && emu::block_regs(regs, *v) > emu::arch().regs_per_block) *v -= 32;
      break;
    case 1: *v = st; break;                     // SHARED_SIZE_BYTES
    case 2: case 3: *v = 0; break;              // CONST_SIZE_BYTES, LOCAL_SIZE_BYTES
    case 4: *v = regs; break;                   // NUM_REGS
    case 5: *v = emu::built_sm(); break;        // PTX_VERSION
    case 6: *v = emu::arch().sm; break;         // BINARY_VERSION
    case 8: *v = k.max_dynamic_smem; break;     // MAX_DYNAMIC_SHARED_SIZE_BYTES
    default: *v = 0; break;
  }
  return CUDA_SUCCESS;
}
EXPORT CUresult cuFuncSetAttribute(CUfunction f, int attrib, int value) {
  if (!f) return CUDA_ERROR_INVALID_HANDLE;
  emu::Kernel& k = *static_cast<emu::Kernel*>(f);
  if (attrib == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    int limit = emu::arch().smem_optin - std::max(k.static_smem, 0);
    if (value < 0 || value > limit) {
      emu::set_fault(std::string("cuFuncSetAttribute(`") + k.name + "`, MAX_DYNAMIC_SHARED_SIZE_BYTES, " +
                     std::to_string(value) + "): above the " + std::to_string(limit) + "-byte maximum of " +
                     emu::arch().name);
      return CUDA_ERROR_INVALID_VALUE;
    }
    k.max_dynamic_smem = value;
  }
  return CUDA_SUCCESS;
}
EXPORT CUresult cuFuncSetCacheConfig(CUfunction, int) { return CUDA_SUCCESS; }

namespace {
// The checks the driver makes before a launch. "" when the launch may go ahead.
std::string launch_limits(const emu::Kernel& k, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                          unsigned bz, unsigned smem, CUresult* code) {
  const emu::Arch& A = emu::arch();
  std::string at = std::string("launch of `") + k.name + "` with grid (" + std::to_string(gx) + "," +
                   std::to_string(gy) + "," + std::to_string(gz) + "), block (" + std::to_string(bx) + "," +
                   std::to_string(by) + "," + std::to_string(bz) + "), " + std::to_string(smem) +
                   " bytes of dynamic shared memory: ";
  *code = CUDA_ERROR_INVALID_VALUE;
  unsigned long long threads = (unsigned long long)bx * by * bz;
  if (!gx || !gy || !gz || !bx || !by || !bz) return at + "a zero dimension";
  if (bx > 1024 || by > 1024 || bz > 64 || threads > 1024)
    return at + "more than 1024 threads per block, or a block dimension above (1024, 1024, 64)";
  if (threads > (unsigned long long)k.max_threads)
    return at + std::to_string(threads) + " threads per block, above the kernel's __launch_bounds__(" +
           std::to_string(k.max_threads) + ")";
  if (gx > 2147483647u || gy > 65535 || gz > 65535) return at + "grid y or z above 65535 (x above 2^31-1)";
  if ((long long)smem > k.max_dynamic_smem)
    return at + "dynamic shared memory above the function's limit of " + std::to_string(k.max_dynamic_smem) +
           " bytes (above 48 KiB needs cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES))";
  if (k.static_smem >= 0 && (long long)smem + k.static_smem > A.smem_optin)
    return at + "static + dynamic shared memory above the " + std::to_string(A.smem_optin) + "-byte maximum of " +
           A.name;
  if (k.regs > 0 && emu::block_regs(k.regs, (long long)threads) > A.regs_per_block) {
    *code = CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
    return at + std::to_string(k.regs) + " registers per thread (ptxas) x " + std::to_string(threads) +
           " threads need " + std::to_string(emu::block_regs(k.regs, (long long)threads)) + " registers, above the " +
           std::to_string(A.regs_per_block) + " of " + A.name;
  }
  return "";
}
}  // namespace

EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned smem, CUstream, void** params, void**) {
  if (!f) return CUDA_ERROR_INVALID_HANDLE;
  emu::Kernel* k = static_cast<emu::Kernel*>(f);
  emu::Stats& st = emu::stats();
  st.launches.fetch_add(1);
  st.limit_checks.fetch_add(1);
  CUresult code = CUDA_SUCCESS;
  std::string bad = launch_limits(*k, gx, gy, gz, bx, by, bz, smem, &code);
  if (!bad.empty()) {
    st.limit_faults.fetch_add(1);
    emu::set_fault(bad);
    return code;
  }
  emu::Launch L;
  L.k = k;
  emu::trace_launch(k->name, dim3(gx, gy, gz), dim3(bx, by, bz), smem);
  if (g_log_on.load(std::memory_order_relaxed)) {
    char line[320];
    snprintf(line, sizeof line, "%s %u %u %u %u %u %u %u %d\n", k->name, gx, gy, gz, bx, by, bz, smem,
             k->max_threads);
    std::lock_guard<std::mutex> g(g_log_mu);
    g_log += line;
  }
  if (g_dry_run.load(std::memory_order_relaxed)) return CUDA_SUCCESS;  // see emu_dry_run
  L.params = params;
  L.grid = dim3(gx, gy, gz);
  L.block = dim3(bx, by, bz);
  L.smem = smem;
  long long blocks = (long long)gx * gy * gz;
  bool ok;
  if (emu::checks()) {
    // One block after another: the shadow memory has a single writer, and a block's
    // barrier intervals are contiguous (see shadow.cpp).
    std::lock_guard<std::mutex> g(emu::shadow_mutex());
    st.checked_launches.fetch_add(1);
    L.checked = true;
    L.seg_lo = emu::next_segment();
    ok = emu::run_launch(L, 1);
  } else {
    int hw = emu::g_threads.load();
    if (hw <= 0) hw = (int)std::max(1u, std::thread::hardware_concurrency());
    int nt = (int)std::min<long long>(std::min(hw, emu::kMaxRunners), blocks);
    ok = emu::run_launch(L, nt);
  }
  if (!ok && g_async_faults.load()) {
    g_pending.store(CUDA_ERROR_LAUNCH_FAILED);
    return CUDA_SUCCESS;
  }
  return ok ? CUDA_SUCCESS : CUDA_ERROR_LAUNCH_FAILED;
}

EXPORT CUresult cuGetErrorString(CUresult e, const char** s) {
  *s = err_name(e);
  return CUDA_SUCCESS;
}
EXPORT CUresult cuGetErrorName(CUresult e, const char** s) {
  *s = err_name(e);
  return CUDA_SUCCESS;
}

// Test hook: pose as ptxas having reported `regs` registers for `name`.
EXPORT int emu_set_kernel_regs(const char* name, int regs) {
  emu::apply_ptxas_table();
  emu::Kernel* k = emu::find_kernel(name);
  if (!k) return 0;
  k->regs = regs;
  return 1;
}

// Poses as a driver of CUDA version `v` (1000*major + 10*minor) for subsequent
// cuDriverGetVersion calls and image loads; 0 restores AK_EMU_DRIVER_VERSION or 13.5.
EXPORT void emu_set_driver_version(int v) { g_driver_version.store(v > 0 ? v : 0); }
