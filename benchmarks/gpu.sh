#!/usr/bin/env bash
# On a CUDA machine with the dev environment already installed (installs nothing): the GPU-marked tests, the decode
# and train-step ratios against LoRA, and the 7B memory table, all written to one folder (aimed at under 8 minutes
# on one GPU; what has run where: docs/performance.md).
#   bash benchmarks/gpu.sh [OUT_DIR]        (default: gpu-results/<date-time>)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-results/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "benchmarks/gpu.sh needs CUDA")'
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
python -c 'import json, peft_mose; print(json.dumps(peft_mose.environment(), indent=2))' > "$out/environment.json"
status=0
# The memory table times nothing and its peaks are per process, so it runs beside the tests; the timed benchmarks
# run alone after both.
timeout 400 python benchmarks/memory.py --device cuda --optim adamw_torch adamw_bnb_8bit --json "$out/memory.json" \
    > "$out/memory.txt" 2>&1 &
memory=$!
# the GPU-marked tests live in these two files (collecting every file would need the media and DPO extras too)
timeout 300 python -m pytest -q -m gpu tests/test_gpu.py tests/test_benchmarks.py -p no:cacheprovider \
    --junitxml="$out/gpu-tests.xml" > "$out/gpu-tests.txt" 2>&1 || status=1
wait "$memory" || status=1
tail -n 3 "$out/gpu-tests.txt"
cat "$out/memory.txt"
timeout 150 python benchmarks/run.py --device cuda --repeats 5 --json "$out/train.json" 2>&1 \
    | tee "$out/train.txt" || status=1
# decode latency at LLaMA-2-7B's layer width (4 layers), bf16 base, eager and compiled, against LoRA
timeout 180 python benchmarks/decode.py --shape 7b-layer --device cuda --dtype bfloat16 --threads 1 --rounds 5 \
    --compile --json "$out/decode.json" 2>&1 | tee "$out/decode.txt" || status=1
echo "results in $out (exit $status)"
exit $status
