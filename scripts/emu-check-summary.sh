#!/usr/bin/env bash
# One line per detector of the emulated device, from the `#emu-stats` lines each
# test process appends to the AK_EMU_TRACE file at exit: launches checked and
# hazards found. Fails if the detectors were off (no checked launch), or if any
# process other than the tests that seed faults on purpose (the emulator's own
# self-tests, whose seeded bugs must be found, and tests/sync_check.rs, whose
# uninitialised read is what AK_CUDA_SYNC_CHECK must report) reported a hazard.
set -euo pipefail
trace="${1:?usage: emu-check-summary.sh TRACE_FILE}"
python3 - "$trace" <<'PY'
import sys
stats = []
for line in open(sys.argv[1]):
    if line.startswith("#emu-stats "):
        stats.append(dict(kv.split("=", 1) for kv in line.split()[1:]))
if not stats:
    sys.exit("no #emu-stats lines: did the tests run on the emulated device with AK_EMU_TRACE set?")
SEEDED = ("emu_selftest", "sync_check")
def is_seeded(s):
    return s["exe"].startswith(SEEDED)
def total(key, selftest):
    return sum(int(s[key]) for s in stats if is_seeded(s) == selftest)
checked = total("checked", False)
launches = total("launches", False)
rows = [
    ("racecheck", "checked", "races"),
    ("initcheck", "checked", "uninit"),
    ("memcheck", "checked", "oob"),
    ("launch limits", "limit_checked", "limit_faults"),
    ("watchdog", "launches", "watchdog"),
]
bad = 0
for name, n, h in rows:
    found, seeded = total(h, False), total(h, True)
    # (Bad input is refused before any launch, so a refused launch outside the
    # self-tests is a launcher bug, counted like a hazard.)
    bad += found
    print(f"emulator {name}: {total(n, False)} launches checked, hazards found = {found} "
          f"(self-tests: {seeded} seeded faults caught)")
print(f"emulator: {launches} launches in {sum(1 for s in stats if not is_seeded(s))} test processes")
if checked == 0:
    sys.exit("the detectors checked no launch (AK_EMU_CHECK off, or an uninstrumented build)")
if bad:
    sys.exit(f"{bad} hazards found outside the tests that seed faults on purpose")
PY
