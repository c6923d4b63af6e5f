#!/usr/bin/env bash
# Fails unless every kernel registered in the emulated device (every kernel of
# kernels/*.cu, all dtypes) was launched by the test run whose trace is $1
# (written by the emulator when AK_EMU_TRACE=<file> is set).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
trace="${1:?usage: kernel-coverage.sh TRACE_FILE}"
lib="$(ls -t "$root"/target/debug/build/activation-kernels-*/out/emu/libak_cuda_emu.so 2>/dev/null | head -n1)"
[ -f "$lib" ] || { echo "no emulated device built (cargo build --features emulate)" >&2; exit 1; }
python3 - "$lib" "$trace" <<'PY'
import ctypes, sys, tempfile, os
lib, trace = sys.argv[1], sys.argv[2]
out = tempfile.mktemp()
n = ctypes.CDLL(lib).emu_list_kernels(out.encode())
registered = {l.strip() for l in open(out) if l.strip() and not l.startswith("emu_selftest")}
os.unlink(out)
launched = {l.split()[0] for l in open(trace) if l.strip() and not l.startswith("#")}
missing = sorted(registered - launched)
print(f"kernel coverage: {len(registered) - len(missing)} of {len(registered)} kernels launched by the tests")
for k in missing:
    print(f"  never launched: {k}")
sys.exit(1 if missing else 0)
PY
