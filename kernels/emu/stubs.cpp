// Stand-ins for the CUDA libraries that candle-core's `cuda` feature links
// (cudarc `dynamic-linking`: -lcuda -lcublas -lcublasLt -lcurand -lnvrtc, and
// candle-kernels' -lcudart), for test binaries built with features `emulate` +
// `candle-cuda` on a machine with no CUDA libraries. build.rs builds one shared
// object per library from this file (with AK_STUB_<LIB> defined) plus a generated
// file of weak stubs for every other symbol of that library
// (kernels/emu/stubs/lib<name>.txt, scripts/gen-emu-stubs.sh), each returning the
// library's "not supported"/internal-error status (never success), a fixed string,
// or 0. Only what `candle_core::CudaDevice::new` and its drop call succeeds here:
// creating/destroying a cuBLAS handle and a cuRAND generator, binding them to a
// stream, seeding. Anything that would do work (a GEMM, random numbers, NVRTC) is an
// error, which candle returns as an `Err`. The driver (libcuda) is the emulator
// itself (kernels/emu/driver.cpp), whose missing entry points get the same weak stubs.
//
// These libraries are only ever built with feature `emulate`, and only ever found
// through the rpath of this crate's own test binaries.
#include <cstddef>
#include <cstdint>

#define EXPORT extern "C" __attribute__((visibility("default")))

namespace {
int g_handle_token;
}

#if defined(AK_STUB_CUBLAS)
EXPORT int cublasCreate_v2(void** handle) {
  if (!handle) return 7;  // CUBLAS_STATUS_INVALID_VALUE
  *handle = &g_handle_token;
  return 0;
}
EXPORT int cublasDestroy_v2(void*) { return 0; }
EXPORT int cublasSetStream_v2(void*, void*) { return 0; }
EXPORT int cublasSetWorkspace_v2(void*, void*, size_t) { return 0; }
EXPORT int cublasSetMathMode(void*, int) { return 0; }
EXPORT int cublasSetPointerMode_v2(void*, int) { return 0; }
#elif defined(AK_STUB_CUBLASLT)
EXPORT int cublasLtCreate(void** handle) {
  if (!handle) return 7;
  *handle = &g_handle_token;
  return 0;
}
EXPORT int cublasLtDestroy(void*) { return 0; }
#elif defined(AK_STUB_CURAND)
EXPORT int curandCreateGenerator(void** gen, int) {
  if (!gen) return 102;  // CURAND_STATUS_ALLOCATION_FAILED
  *gen = &g_handle_token;
  return 0;
}
EXPORT int curandDestroyGenerator(void*) { return 0; }
EXPORT int curandSetStream(void*, void*) { return 0; }
EXPORT int curandSetPseudoRandomGeneratorSeed(void*, unsigned long long) { return 0; }
EXPORT int curandSetGeneratorOffset(void*, unsigned long long) { return 0; }
#elif defined(AK_STUB_CUDART)
// Registration hooks run by the static initialisers of nvcc-compiled host objects
// (candle-kernels' libmoe.a): accept and ignore; nothing registered here can launch.
namespace {
void* g_fatbin_handle[4];
}
EXPORT void** __cudaRegisterFatBinary(void*) { return g_fatbin_handle; }
EXPORT void __cudaRegisterFatBinaryEnd(void**) {}
EXPORT void __cudaUnregisterFatBinary(void**) {}
EXPORT void __cudaRegisterFunction(void**, const char*, char*, const char*, int, void*, void*, void*, void*,
                                   int*) {}
EXPORT void __cudaRegisterVar(void**, char*, char*, const char*, int, size_t, int, int) {}
EXPORT void __cudaRegisterManagedVar(void**, void**, char*, const char*, int, size_t, int, int) {}
EXPORT char __cudaInitModule(void**) { return 0; }
EXPORT unsigned __cudaPushCallConfiguration(uint64_t, uint32_t, uint64_t, uint32_t, size_t, void*) { return 0; }
EXPORT int __cudaPopCallConfiguration(void*, void*, void*, void*) { return 801; }
// Launch paths of nvcc-generated host stubs (CUDA 13): an error (cudaErrorNotSupported).
EXPORT int __cudaLaunchKernel(const void*, uint64_t, uint32_t, uint64_t, uint32_t, void**, size_t, void*) {
  return 801;
}
EXPORT int __cudaLaunchKernel_ptsz(const void*, uint64_t, uint32_t, uint64_t, uint32_t, void**, size_t, void*) {
  return 801;
}
EXPORT int __cudaGetKernel(void**, const void*) { return 801; }
#elif defined(AK_STUB_CUDA) || defined(AK_STUB_NVRTC)
// libcuda: every entry point the emulator implements is in driver.cpp.
// nvrtc: nothing succeeds (no runtime compilation on the emulated device).
#else
#error "define AK_STUB_<LIB>"
#endif
