#!/usr/bin/env bash
# One-shot GPU check (under 5 minutes on one GPU): build, run the GPU tests, then the merge benchmark
# with the shard tasks on the GPU, and print the figures to record.
#   bash bench/gpu_check.sh            # from the repository root, on a machine with CUDA
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MODELSTOCK_VENV:-.venv}"
./dev test --version >/dev/null  # installs the project into the venv if needed
"$VENV/bin/python" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: this check needs a GPU"
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
echo "== GPU tests"
"$VENV/bin/python" -m pytest -q tests/test_gpu.py
echo "== merge benchmark, shard tasks on the GPU (about 300M parameters, base + 2, bf16)"
MODELSTOCK_BENCH_DIR="${MODELSTOCK_BENCH_DIR:-/tmp/modelstock-bench}" \
  "$VENV/bin/python" bench/bench_merge.py --params 3e8 --shard-size 200MB --repeat 2 \
  --only floor,ray-overhead,modelstock,mergekit-bf16 --device gpu --json bench-output/gpu.json
