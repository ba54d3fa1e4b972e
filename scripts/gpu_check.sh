#!/usr/bin/env bash
# One-command GPU proof: the GPU-marked exactness tests, then the 7B-shape benchmark (scripts/bench_gpu.py),
# whose figures go to one JSON.  Exit status != 0 on any failure.
#
#   bash scripts/gpu_check.sh [--tiny] [--out FILE]     (default FILE: outputs/gpu_check.json;
#                                                        --tiny: every step on the CPU, small shapes; CI runs it)
set -euo pipefail
tiny=0
out=outputs/gpu_check.json
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) tiny=1 ;;
    --out) out="$2"; shift ;;
    *) echo "usage: bash scripts/gpu_check.sh [--tiny] [--out FILE]" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
if [ "$tiny" = 1 ]; then
  export EXPLAIN_PRUNE_TEST_DEVICE=cpu
  bench=(--tiny)
else
  python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device here (use --tiny for the CPU form)')"
  bench=()
fi
echo "== pytest -m gpu (device: ${EXPLAIN_PRUNE_TEST_DEVICE:-cuda})"
python -m pytest -m gpu -q -p no:cacheprovider
echo "== benchmark"
python scripts/bench_gpu.py "${bench[@]}" --out "$out"
echo "gpu_check: passed; figures in $out"
