#!/usr/bin/env bash
# A grey-to-grey digit pair through the folder layouts, with the digits-cpu preset unchanged (not tuned to the demo):
# MNIST digits (the demo's 2,000 source digits) -> scikit-learn's 1,797 8x8 handwritten digits (blocky, blurred when
# upscaled, as in MNIST -> USPS): 1,000 of them as the unlabelled target, the other 797 as the target test set.
# DIRECTION=reverse: all 1,797 sklearn digits (labelled) -> those MNIST digits (1,000 unlabelled, 1,000 test).
# Usage: [DIRECTION=reverse] bash benchmarks/sklearn_pair.sh [WORKDIR] [daaa run options, e.g. --set runtime.seed=1
#        --out WORKDIR/run1 (a later --out wins)]
set -euo pipefail
work=${1:-runs/sklearn-pair}
mkdir -p "$work"
python3 - "$work" "${DIRECTION:-forward}" <<'PY'
import sys
from pathlib import Path
import numpy as np
from daaa.config import DataConfig
from daaa.data.demo import demo_pair, export_domain, sklearn_digits

work, direction = Path(sys.argv[1]), sys.argv[2]
mnist, digits = demo_pair(DataConfig())["source"], sklearn_digits()
labelled, other = (mnist, digits) if direction == "forward" else (digits, mnist)
order = np.random.default_rng(0).permutation(len(other))  # a fixed split: the same folders on every machine
for role, domain in (("source", labelled), ("target", other.subset(order[:1000]).unlabelled()),
                     ("target_test", other.subset(order[1000:]))):
    if not (work / role).exists():
        export_domain(domain, work / role)
PY
daaa run --source "$work/source" --target "$work/target" --target-test "$work/target_test" \
    --preset digits-cpu --out "$work/run" "${@:2}"
