#!/usr/bin/env bash
# On a CUDA machine with the dev environment already installed (installs nothing): the GPU-marked tests, the decode
# and train-step ratios against LoRA, and the 7B memory table, all written to one folder (~8 minutes on one GPU).
#   bash benchmarks/gpu.sh [OUT_DIR]        (default: gpu-results/<date-time>)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-results/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "benchmarks/gpu.sh needs CUDA")'
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
python -c 'import json, peft_mose; print(json.dumps(peft_mose.environment(), indent=2))' > "$out/environment.json"
status=0
python -m pytest -q -m gpu tests/ -p no:cacheprovider --junitxml="$out/gpu-tests.xml" 2>&1 | tee "$out/gpu-tests.txt" || status=1
timeout 180 python benchmarks/run.py --device cuda --repeats 5 --json "$out/train.json" 2>&1 | tee "$out/train.txt" || status=1
# decode latency at LLaMA-2-7B's layer width (4 layers), bf16 base, eager and compiled, against LoRA
timeout 200 python benchmarks/decode.py --shape 7b-layer --device cuda --dtype bfloat16 --threads 1 --rounds 5 \
    --compile --json "$out/decode.json" 2>&1 | tee "$out/decode.txt" || status=1
timeout 240 python benchmarks/memory.py --device cuda --json "$out/memory.json" 2>&1 | tee "$out/memory.txt" || status=1
echo "results in $out (exit $status)"
exit $status
