#!/usr/bin/env bash
# The GPU figures of docs/methods.md in one short run (about 6-8 minutes on an H100/H200), for a
# session that is lent a device: the speed table in float32 and bfloat16 (one image, P prompts,
# against the plain pass and the reference loops), larger inputs, and images per second.
# Writes everything under ${OUT:-gpu-figures}/ and prints it as it goes.
#
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-figures}
mkdir -p "$out"
py=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
"$py" benchmarks/bench_speed.py --device cuda --prompts 1,8,32,128 --repeats 5 \
  --cases "chefer,chefer block,chefer no stop,chefer ref,chefer ref 77,chefer all,chefer all ref,chefer all rows,legrad,legrad block,legrad ref,legrad rows,gradcam,gradcam block,score forward" | tee "$out/speed-fp32.md"
"$py" benchmarks/bench_speed.py --device cuda --dtype bfloat16 --prompts 1,32,128 --cases "chefer,chefer ref,legrad,legrad ref" --repeats 5 | tee "$out/speed-bf16.md"
"$py" benchmarks/bench_speed.py --device cuda --prompts 1 --sizes 448,896 --repeats 3 \
  --cases "chefer,chefer eager,chefer ref,chefer all,chefer all probs,chefer all ref,legrad,legrad eager,legrad ref,score forward" | tee "$out/speed-large.md"
"$py" benchmarks/bench_throughput.py --device cuda --batch 64 | tee "$out/throughput.md"
