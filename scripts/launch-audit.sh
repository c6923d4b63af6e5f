#!/usr/bin/env bash
# Launch audit (issue 15): every op's kernel launches at model shapes (ResNet-50 stages
# at N = 32 and 256, ViT tokens, AIEC at K = 1000), recorded on the emulated device in
# dry-run mode through the production `cuda::` API, joined with the ptxas table and a
# bytes model: resident blocks per SM, occupancy, waves, bytes vs minimum and a
# lower-bound time on an A6000 and an H100 — predictions from a model, not measurements
# (scripts/gpu-bench.sh measures on a GPU). Checks issue 15's targets against
# docs/launch-audit-baseline.tsv and fails on a new or worse miss. No GPU needed.
#
#   scripts/launch-audit.sh [--write] [--bless]
#
#   --write   regenerate docs/launch-audit.md's tables and the README's summary
#             (between the <!-- launch-audit:begin/end --> markers)
#   --bless   rewrite docs/launch-audit-baseline.tsv with the current misses (only when
#             a change makes nothing worse)
#
# AK_AUDIT_FEATURES (default `emulate,candle`: the features of CI's test step, so the
# build is reused) and AK_AUDIT_PROFILE (default `test`) pick the build.
set -euo pipefail
cd "$(dirname "$0")/.."
features="${AK_AUDIT_FEATURES:-emulate,candle}"
profile="${AK_AUDIT_PROFILE:-test}"
exec cargo run --quiet --profile "$profile" --features "$features" --example launch_audit -- "$@"
