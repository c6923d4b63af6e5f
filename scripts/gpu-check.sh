#!/usr/bin/env bash
# The one-command device check for a machine with a real NVIDIA GPU. Two modes:
#
# * gpu-pack/ present (made by scripts/gpu-pack.sh on a machine with cargo; the
#   device tool's GPU machines have no Rust toolchain and no network): runs the
#   prebuilt binaries, no cargo. The call (docs/gpu-runs.md): device `run` with
#   carry ["gpu-pack"], command "bash scripts/gpu-check.sh", timeout_s 480.
# * no gpu-pack/, cargo present (a normal GPU machine): builds that pack first for this
#   GPU's arch (scripts/gpu-pack.sh into target/gpu-pack-local), then the same.
#
# Steps: 1. nvidia-smi (device, driver, CUDA version); 2. every parity suite
# (tests/parity_*.rs built with feature `cuda` only: tests/common/device.rs picks the
# real driver; progress per test, a timeout per suite); 3. the 210 CUDA benches
# (benches/cuda_ops.rs) in criterion mode with short times, then the markdown table
# (scripts/gpu-bench.sh --no-run); 4. with --sanitize, a few small parity tests under
# compute-sanitizer memcheck and racecheck (real inter-warp races, which the emulator
# cannot see). Everything lands flat in ONE folder, ${OUT:-target/gpu-check}:
#   gpu-runs-section.md  the section to append to docs/gpu-runs.md (summary + tables)
#   tests.log  sanitizer.log  bench.log  bench-candle.log  bench-table.md  env.txt (nvidia-smi -q
#   excerpt, manifest, versions)  criterion.tgz (criterion's estimates)
#
# Time on one H100 (an estimate: no run yet; the machine's start, 1-2 min of device
# time, comes on top): unpack + nvidia-smi ~5 s; 65 parity tests ~1-1.5 min (the CPU
# f64 references dominate; 150 s timeout per suite); 210 benches x (0.25 s warm-up +
# 0.6 s measurement + ~0.1 s analysis) + ~20 s of data set-up = ~3.7 min; table 2 s.
# Total ~5.5 min. --sanitize adds up to ~2 min and runs only while budget is left.
# The budget (--budget, default 420 s) caps every step: the bench and sanitizer steps
# get what is left, and a bench step cut short still leaves a table of what finished
# (NCHW groups first, IieuConv2d last). Exit status: 0 only if everything ran and passed.
#
#   scripts/gpu-check.sh [--sanitize] [--no-bench] [--no-tests] [--dry-run] [--append]
#                        [--budget S] [--warm-up S] [--measure S] [-- <criterion filter>]
#
#   --dry-run  print what would run and the time budget; needs no GPU
#   --append   also append the section to docs/gpu-runs.md (a machine with the repo;
#              from the device tool, append the returned gpu-runs-section.md instead)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

sanitize=0; bench=1; tests=1; dry=0; append=0
budget=420; warm=0.25; measure=0.6
filter=()
while [ $# -gt 0 ]; do
  case "$1" in
    --sanitize) sanitize=1 ;;
    --no-bench) bench=0 ;;
    --no-tests) tests=0 ;;
    --dry-run) dry=1 ;;
    --append) append=1 ;;
    --budget) budget="$2"; shift ;;
    --warm-up) warm="$2"; shift ;;
    --measure) measure="$2"; shift ;;
    --) shift; filter=("$@"); break ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

t_start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - t_start) )); }
say() { echo "== [+$(( $(date +%s) - t_start ))s] $*"; }

out="${OUT:-$root/target/gpu-check}"
mkdir -p "$out"
files=(gpu-runs-section.md tests.log sanitizer.log bench.log bench-candle.log bench-table.md env.txt criterion.tgz)
for f in "${files[@]}"; do rm -f "${out:?}/$f"; done

# Small parity tests for compute-sanitizer: (suite test), most shared-memory-heavy first.
san_cases=(
  "parity_iieu_conv ragged_3x3_every_psi"
  "parity_iieu batch3_padding1"
  "parity_iieu_dc parity_f32"
  "parity_acon acon_all_ops_f32"
  "parity_aiec train_parity_f32"
)
n_benches=210  # benches/cuda_ops.rs: 12 NCHW groups x 9 + 6 NLC x 5 + 24 conv x 3

pack="$root/gpu-pack"
mode=pack
if [ ! -f "$pack/manifest.txt" ]; then
  if command -v cargo >/dev/null; then mode=cargo; else mode=none; fi
fi

if [ "$dry" = 1 ]; then
  per=$(python3 -c "print(round($warm + $measure + 0.1, 2))")
  echo "gpu-check --dry-run: mode=$mode, output folder $out, budget $budget s"
  case "$mode" in
    pack) echo "pack: $pack"; grep -E '^(commit|date|archs|nvcc|total_bytes)=' "$pack/manifest.txt" | sed 's/^/  /' ;;
    cargo) echo "would build the pack first: scripts/gpu-pack.sh --archs <GPU's compute cap> --out target/gpu-pack-local (cargo; minutes)" ;;
    none) echo "no gpu-pack/ and no cargo: nothing could run (build the pack with scripts/gpu-pack.sh)" ;;
  esac
  if [ "$tests" = 1 ]; then
    if [ "$mode" = pack ]; then
      total=0
      while IFS='=' read -r key val; do
        n=$(wc -w <<< "$val"); total=$((total + n))
        echo "  ${key#tests.}: $n tests (timeout 150 s)"
      done < <(grep '^tests\.' "$pack/manifest.txt")
      echo "parity: $total tests, estimate 60-90 s"
    else
      echo "parity: every tests/parity_*.rs (65 tests at this writing), estimate 60-90 s"
    fi
  fi
  if [ "$bench" = 1 ]; then
    echo "bench: cuda_ops --bench --warm-up-time $warm --measurement-time $measure --sample-size 10 ${filter[*]}"
    echo "  $n_benches benches x ~$per s + ~20 s set-up = ~$(python3 -c "print(round(($n_benches * $per + 20) / 60, 1))") min (capped by what is left of the budget)"
  fi
  if [ "$sanitize" = 1 ]; then
    for c in "${san_cases[@]}"; do echo "sanitize: compute-sanitizer --tool memcheck|racecheck ${c%% *} --exact ${c#* } (timeout 90 s each)"; done
  fi
  exit 0
fi

# --- the GPU ---------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null; then
  echo "gpu-check: no nvidia-smi: not a GPU machine (see --dry-run for the plan)" >&2
  exit 1
fi
if ! gpu="$(nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader 2>&1 | sed -n 1p)" \
   || ! [[ "$gpu" =~ ^[^,]+,\ *[0-9.]+,\ *[0-9]+\.[0-9]+, ]]; then
  echo "gpu-check: nvidia-smi found no usable GPU: $gpu" >&2
  exit 1
fi
IFS=',' read -r device driver cap mem <<< "$gpu"
device="$(echo "$device" | xargs)"; driver="$(echo "$driver" | xargs)"; mem="$(echo "$mem" | xargs)"
cap="$(echo "$cap" | tr -d ' .')"
cuda_ver="$(nvidia-smi -q 2>/dev/null | sed -n 's/^ *CUDA Version *: *//p' | sed -n 1p || true)"
stamp="$(date -u '+%Y-%m-%d %H:%M UTC')"
say "device: $device (sm_$cap, $mem), driver $driver, CUDA ${cuda_ver:-?}"

# --- the binaries -----------------------------------------------------------------
if [ "$mode" = cargo ]; then
  say "no gpu-pack/: building one for sm_$cap with cargo (scripts/gpu-pack.sh)"
  pack="$root/target/gpu-pack-local"
  bash scripts/gpu-pack.sh --archs "$cap" --out "$pack" --max-mib 100000
  t_start=$(date +%s)  # the budget covers the runs, not the build
elif [ "$mode" = none ]; then
  echo "gpu-check: no gpu-pack/ and no cargo: build the pack with scripts/gpu-pack.sh on a machine with cargo, carry it" >&2
  exit 1
fi
man="$pack/manifest.txt"
mget() { sed -n "s/^$1=//p" "$man" | sed -n 1p; }
work="$(mktemp -d "${TMPDIR:-/tmp}/ak-gpu-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin"
for gz in "$pack"/*.gz; do
  name="$(basename "$gz" .gz)"
  want="$(mget "file.$name.gz" | sed -n 's/.*sha256=//p')"
  got="$(sha256sum "$gz" | cut -c1-64)"
  if [ -n "$want" ] && [ "$want" != "$got" ]; then
    echo "gpu-check: $gz does not match its manifest checksum (stale or broken pack)" >&2
    exit 1
  fi
  gzip -dc "$gz" > "$work/bin/$name"
  chmod +x "$work/bin/$name"
done
p_commit="$(mget commit)"; p_archs="$(mget archs)"; p_nvcc="$(mget nvcc)"
tree_commit="$(git rev-parse HEAD 2>/dev/null || echo '')"
note=""
if [ -n "$tree_commit" ] && [ "${p_commit%+dirty}" != "$tree_commit" ]; then
  note="the pack was built from ${p_commit:0:12}, the tree here is ${tree_commit:0:12}"
fi
case ",$p_archs," in
  *",$cap,"*) ;;
  *) note="${note:+$note; }the pack has SASS for sm_${p_archs//,/, sm_} only, this GPU is sm_$cap (PTX JIT or NVRTC)" ;;
esac
[ -z "$note" ] || say "note: $note"
# A CUDA 13.x image on a driver of an older 13.x runs its SASS (minor-version
# compatibility); a run-time NVRTC compile (src/cuda/module.rs) would fill this cache.
export AK_CUDA_CACHE_DIR="$work/rtc-cache"
export RUST_BACKTRACE=1

{
  echo "# gpu-check.sh environment, $stamp"
  echo "device=$device"; echo "driver=$driver"; echo "cuda=$cuda_ver"; echo "compute_cap=$cap"; echo "memory=$mem"
  echo "kernel=$(uname -srm)"; echo "cpus=$(nproc)"
  echo "tree_commit=${tree_commit:-unknown (no git)}"
  echo "mode=$mode"; echo "budget_s=$budget"; echo "warm_up_s=$warm"; echo "measure_s=$measure"
  [ -z "$note" ] || echo "note=$note"
  echo; echo "## pack manifest"; cat "$man"
  echo; echo "## nvidia-smi"; nvidia-smi 2>&1 || true
  echo; echo "## nvidia-smi -q (excerpt)"
  nvidia-smi -q 2>&1 | grep -E '^(Driver Version|CUDA Version)|Product Name|Product Architecture|Product Brand|VBIOS|Bus Id|MIG Mode|Current *:|Pending *:|Persistence Mode|Compute Mode|Total *:|Used *:|Free *:|Max Clocks|Graphics *:|SM *:|Memory *:|Power Limit|Current Power|GPU Current Temp|Clocks Event Reasons Active|ECC' | sed -n 1,60p || true
  echo; echo "## tools"
  for t in nvcc compute-sanitizer python3; do
    if command -v "$t" >/dev/null; then
      echo "$t: $(command -v "$t") $("$t" --version 2>&1 | tail -1 || true)"
    else
      echo "$t: not found"
    fi
  done
} > "$out/env.txt"

# --- 1. parity suites ---------------------------------------------------------------
suites=()
for b in "$work"/bin/parity_*; do suites+=("$(basename "$b")"); done
if [ -x "$work/bin/candle_cuda" ]; then
  # From `gpu-pack.sh --with-candle`: candle-core links libcublas, libcublasLt, libcurand
  # and libnvrtc; look for them in the toolkit and in python3's NVIDIA wheels.
  suites+=(candle_cuda)
  libs="$(python3 - <<'PY' 2>/dev/null || true
import glob, os, site
dirs = set()
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for f in glob.glob(os.path.join(sp, "nvidia", "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)"
  export LD_LIBRARY_PATH="/usr/local/cuda/lib64${libs:+:$libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  { echo; echo "## ldd candle_cuda (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)"; ldd "$work/bin/candle_cuda" 2>&1 || true; } >> "$out/env.txt"
fi
if [ -x "$work/bin/burn_cuda" ]; then
  # From `gpu-pack.sh --with-burn`: burn's CUDA backend running this crate's kernels (every op family).
  suites+=(burn_cuda)
fi
rows=()
t_pass=0; t_fail=0; rc_all=0; skipped=0
if [ "$tests" = 1 ]; then
  i=0
  for s in "${suites[@]}"; do
    i=$((i + 1))
    n=$(mget "tests.$s" | wc -w)
    lim=$(( $(left) < 150 ? $(left) : 150 ))
    if [ "$lim" -lt 10 ]; then
      rows+=("| $s | $n | - | - | - | not run (budget) |"); rc_all=1; continue
    fi
    say "[$i/${#suites[@]}] $s: $n tests (timeout ${lim}s)"
    log="$work/$s.log"
    t0=$(date +%s)
    set +e
    timeout -k 5 "$lim" "$work/bin/$s" --nocapture 2>&1 | tee "$log" | grep --line-buffered -E '^test |panicked|SKIPPED|^error' | sed -u 's/^/    /'
    rc=${PIPESTATUS[0]}
    set -e
    dt=$(( $(date +%s) - t0 ))
    p=$(sed -n 's/^test result: .* \([0-9]*\) passed; \([0-9]*\) failed.*/\1/p' "$log" | sed -n 1p)
    f=$(sed -n 's/^test result: .* \([0-9]*\) passed; \([0-9]*\) failed.*/\2/p' "$log" | sed -n 1p)
    sk=$(grep -c 'SKIPPED' "$log" || true)
    skipped=$((skipped + sk))
    t_pass=$((t_pass + ${p:-0})); t_fail=$((t_fail + ${f:-0}))
    status="exit $rc"; [ "$rc" = 124 ] && status="TIMEOUT after ${lim}s"
    [ "$rc" = 0 ] || rc_all=1
    rows+=("| $s | $n | ${p:--} | ${f:--} | ${dt} s | $status |")
    { echo "===== $s: exit $rc, ${dt} s ====="; cat "$log"; echo; } >> "$out/tests.log"
  done
  say "parity: $t_pass passed, $t_fail failed, $skipped skip lines"
fi

# --- 2. benches -----------------------------------------------------------------------
bench_note="not run (--no-bench)"
if [ "$bench" = 1 ]; then
  reserve=$(( sanitize == 1 ? 60 : 10 ))
  lim=$(( $(left) - reserve ))
  if [ "$lim" -lt 30 ]; then
    bench_note="not run: the budget (--budget $budget) was spent"
  else
    export CRITERION_HOME="$work/criterion"
    candle_note=""
    if [ -x "$work/bin/candle_cuda_conv" ]; then
      # The fused IieuConv2d against candle's CUDA conv2d (+ BatchNorm + unfused IIEU-B),
      # 6 layers x 6 jobs: first, so that the budget cannot leave it out; at most a third.
      clim=$(( lim / 3 ))
      say "candle benches: candle_cuda_conv, timeout ${clim}s"
      set +e
      timeout -k 5 "$clim" "$work/bin/candle_cuda_conv" --bench --warm-up-time "$warm" \
        --measurement-time "$measure" --noplot > "$out/bench-candle.log" 2>&1
      crc=$?
      set -e
      candle_note="; candle_cuda_conv exit $crc (bench-candle.log)"
      [ "$crc" = 0 ] || rc_all=1
      lim=$(( $(left) - reserve ))
    fi
    say "benches: $n_benches x (warm-up ${warm}s + ${measure}s), timeout ${lim}s"
    t0=$(date +%s)
    set +e
    timeout -k 5 "$lim" "$work/bin/cuda_ops" --bench --warm-up-time "$warm" --measurement-time "$measure" \
      --sample-size 10 --noplot "${filter[@]}" > "$out/bench.log" 2>&1
    brc=$?
    set -e
    dt=$(( $(date +%s) - t0 ))
    done_n=$( (find "$CRITERION_HOME" -path '*/cuda_*/new/estimates.json' 2>/dev/null || true) | wc -l)
    bench_note="$done_n of $n_benches benches in ${dt} s (exit $brc)"
    [ "$brc" != 124 ] || bench_note="$done_n of $n_benches benches in ${dt} s (stopped at the budget)"
    if grep -q 'CUDA benches skipped' "$out/bench.log"; then
      bench_note="skipped by the binary: $(grep -m1 'skipped' "$out/bench.log")"; brc=1
    fi
    bench_note="$bench_note$candle_note"
    say "benches: $bench_note"
    AK_GPU_NAME="$device" bash scripts/gpu-bench.sh --no-run --criterion "$CRITERION_HOME" \
      --out "$out/bench-table.md" > /dev/null || bench_note="$bench_note; the table script failed"
    [ "$done_n" = 0 ] || tar czf "$out/criterion.tgz" -C "$work" --exclude='*/base/*' --exclude='*/report/*' criterion
    [ "$brc" = 0 ] || rc_all=1
  fi
fi

# --- 3. compute-sanitizer -------------------------------------------------------------
san_rows=()
if [ "$sanitize" = 1 ]; then
  cs="$(command -v compute-sanitizer || true)"
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer; do
    if [ -z "$cs" ] && [ -x "$c" ]; then cs="$c"; fi
  done
  if [ -z "$cs" ]; then
    san_rows+=("| - | compute-sanitizer not found | - |")
  else
    for c in "${san_cases[@]}"; do
      s="${c%% *}"; t="${c#* }"
      cells=()
      for tool in memcheck racecheck; do
        lim=$(( $(left) - 5 < 90 ? $(left) - 5 : 90 ))
        if [ "$lim" -lt 15 ]; then cells+=("not run (budget)"); continue; fi
        say "sanitize: $tool $s::$t (timeout ${lim}s)"
        set +e
        timeout -k 5 "$lim" "$cs" --tool "$tool" --error-exitcode 86 --print-limit 20 \
          "$work/bin/$s" --exact "$t" --test-threads=1 > "$work/san.log" 2>&1
        rc=$?
        set -e
        summary="$(grep -E '========= (ERROR SUMMARY|RACECHECK SUMMARY)' "$work/san.log" | tail -1 | sed 's/^========= //')"
        { echo "===== $tool $s::$t: exit $rc ====="; cat "$work/san.log"; echo; } >> "$out/sanitizer.log"
        case "$rc" in
          0) cells+=("ok: ${summary:-no summary}") ;;
          124) cells+=("TIMEOUT after ${lim}s"); rc_all=1 ;;
          *) cells+=("**exit $rc**: ${summary:-see sanitizer.log}"); rc_all=1 ;;
        esac
      done
      san_rows+=("| $s::$t | ${cells[0]} | ${cells[1]:-not run} |")
    done
  fi
fi

# --- the section for docs/gpu-runs.md --------------------------------------------------
origin="the built image (nvcc $p_nvcc, SASS sm_${p_archs//,/, sm_})"
if [ -n "$(ls -A "$AK_CUDA_CACHE_DIR" 2>/dev/null)" ]; then
  origin="a run-time NVRTC compile (the driver refused the built image: nvcc $p_nvcc)"
fi
verdict="all passed"
[ "$rc_all" = 0 ] || verdict="FAILURES (see below)"
[ -z "${AK_SKIP_GPU_TESTS:-}" ] || skipped=$((skipped + 1))
[ "$skipped" = 0 ] || rc_all=1
[ "$skipped" = 0 ] || verdict="NOT A DEVICE RUN: $skipped skip lines (AK_SKIP_GPU_TESTS or no driver)"
{
  echo "## $stamp — $device (driver $driver, CUDA ${cuda_ver:-?}, sm_$cap), commit ${p_commit:0:12}"
  echo
  echo "\`scripts/gpu-check.sh$([ "$sanitize" = 1 ] && echo ' --sanitize')\` ($mode mode): pack built $(mget date) with nvcc $p_nvcc for sm_${p_archs//,/, sm_}, $(mget rustc | cut -d' ' -f1-2); kernels loaded from $origin. Result: **$verdict**; $(( $(date +%s) - t_start )) s.${note:+ Note: $note.}"
  if [ "$tests" = 1 ]; then
    echo
    echo "Parity suites on the device (feature \`cuda\`, no emulator): $t_pass passed, $t_fail failed."
    echo
    echo "| suite | tests | passed | failed | time | status |"
    echo "|---|---:|---:|---:|---:|---|"
    printf '%s\n' "${rows[@]}"
  fi
  if [ "$sanitize" = 1 ]; then
    echo
    echo "compute-sanitizer on small parity tests:"
    echo
    echo "| test | memcheck | racecheck |"
    echo "|---|---|---|"
    printf '%s\n' "${san_rows[@]}"
  fi
  echo
  echo "Benches (\`cuda_ops --bench --warm-up-time $warm --measurement-time $measure --sample-size 10\`): $bench_note."
  if [ "${done_n:-0}" != 0 ]; then
    echo
    cat "$out/bench-table.md"
  fi
} > "$out/gpu-runs-section.md"

if [ "$append" = 1 ]; then
  { echo; cat "$out/gpu-runs-section.md"; } >> docs/gpu-runs.md
  say "appended to docs/gpu-runs.md"
fi
echo
sed -n '1,/^Benches/p' "$out/gpu-runs-section.md"
echo
say "done: $verdict; files in $out: $(cd "$out" && echo *)"
exit "$rc_all"
