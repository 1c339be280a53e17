#!/usr/bin/env bash
# Everything that needs a GPU, in one call (a lent GPU comes for minutes): the CUDA / AMP code paths as tests, then
# `daaa bench --device cuda` at the office31 preset's shapes (ResNet-50 224 px, CycleGAN 256 px) in fp32 and bf16,
# and the backbone throughputs of issue 16. Results go to $OUT (the device tool's folder) or ./gpu-results.
#
#   run (device tool):  bash benchmarks/gpu.sh            (about 6-8 minutes on an H100/H200-class GPU)
#
# Reading the output: bench-office31-bf16.json -> ratios.daaa_over_source_only is the DAAA step's cost per image
# over plain fine-tuning's (issue 18 asks <= 1/0.75 = 1.33); images_per_second.cyclegan / 2 = CycleGAN steps/s.
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
python3 -m pip install -q -e ".[test]" >"$out/install.log" 2>&1 || { echo "install failed"; tail -5 "$out/install.log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0))" \
    | tee -a "$out/gpu.txt"

# 1. the CUDA paths of the suite (tests that skip without CUDA run here), short
timeout 240 python3 -m pytest -q -x -m "not slow" -k "cuda or amp or bf16 or fp16 or precision" \
    >"$out/pytest-cuda.txt" 2>&1; echo "pytest cuda subset: rc $?"; tail -3 "$out/pytest-cuda.txt"

# 2. office31 shapes, random weights (no ImageNet download on the device)
common=(--preset office31 --device cuda --set model.pretrained=none --steps 10 --repeats 3 --warmup 3 --quiet)
for prec in fp32 bf16; do
    timeout 240 daaa bench "${common[@]}" --set runtime.precision=$prec --set runtime.channels_last=true \
        --json "$out/bench-office31-$prec.json" >"$out/bench-office31-$prec.txt" 2>&1
    echo "bench office31 $prec: rc $?"; cat "$out/bench-office31-$prec.txt"
done

# 3. backbones (issue 16): plain and DAAA steps at 224 px, bf16
for arch in resnet18 resnet50 resnet101; do
    timeout 120 daaa bench "${common[@]}" --set model.arch=$arch --set runtime.precision=bf16 \
        --stages source_only,daaa --json "$out/bench-$arch-bf16.json" >"$out/bench-$arch-bf16.txt" 2>&1
    echo "bench $arch bf16: rc $?"; tail -4 "$out/bench-$arch-bf16.txt"
done
