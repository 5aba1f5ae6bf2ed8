#!/usr/bin/env bash
# The GPU checks of the bake, prepared to run as they are on a machine with one GPU (at most ~10
# minutes): the bf16 bake of SmolLM2-135M-Instruct beside TRL's GKDTrainer and a hand-written loop
# (tokens/s, peak GPU memory, MFU, fixed cost, held-out KL), each row in bf16 on the GPU.
#
#     bash bench/gpu.sh            # from the repository root, after the README's install command
#
# Not run by this project's CI: its machines have no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -m pip install -q -e '.[peers]'
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 540 "$PYTHON" bench/peers.py --questions 96 --max-tokens 128 --steps 24 --micro-batch 8
