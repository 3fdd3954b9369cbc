#!/usr/bin/env bash
# Prepare this checkout for a run of benchmarks/gpu_suite.py through the device tool (docs/gpu-suite.md):
# the Mixtral routing traces in ../shared do not travel with the checkout, so they are copied into
# .gpu-carry/traces (ignored by git through .git/info/exclude) for the run's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-../shared/data/traces/mixtral-8x7b-instruct}
if [ ! -f "$src/humaneval_2_routing.jsonl" ] || [ ! -f "$src/gsm8k_2_routing.jsonl" ]; then
  echo "no Mixtral routing traces in $src (give their folder as the first argument)" >&2
  exit 1
fi
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.gpu-carry/' "$exclude" 2>/dev/null || echo '/.gpu-carry/' >> "$exclude"
mkdir -p .gpu-carry/traces
cp -f "$src"/humaneval_2_routing.jsonl "$src"/gsm8k_2_routing.jsonl .gpu-carry/traces/
echo "ready: run with carry [\".gpu-carry\"] and --traces .gpu-carry/traces"
