#!/usr/bin/env bash
# The typeset-digits pair (benchmarks/typeset_pair.py: MNIST digits -> digits in matplotlib's fonts on coloured,
# cluttered backgrounds), written as image folders once and run with `daaa run` and the digits-cpu preset unchanged.
# Usage: bash benchmarks/typeset_pair.sh [WORKDIR] [daaa run options, e.g. --set cyclegan.lambda_semantic=1
#        --out WORKDIR/run-semantic (a later --out wins; each configuration needs its own run folder)]
set -euo pipefail
work=${1:-runs/typeset-pair}
if [ ! -f "$work/fonts.txt" ]; then  # written last by typeset_pair.py
    python3 "$(dirname "$0")/typeset_pair.py" "$work"
fi
daaa run --source "$work/source" --target "$work/target" --target-test "$work/target_test" \
    --preset digits-cpu --out "$work/run" "${@:2}"
