#!/usr/bin/env bash
# Early warning for maintainers: run the core tests against the newest release of every dependency
# the test set-up installs, past the upper bounds of pyproject.toml, so the next breaking release
# shows here before users meet it. torch stays the build installed here (PyPI's newest may be a
# multi-GB CUDA build). Nothing outside a scratch venv changes.
#
#   bash scripts/check_new_releases.sh            # exit 0: the newest releases pass the core tests
#   PYTHON=python3.11 bash scripts/check_new_releases.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
CORE_TESTS=(tests/modeling tests/processing tests/test_config.py tests/test_persistence.py
  tests/test_convert.py tests/test_transformers_compat.py tests/training)

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
"$PYTHON" -m venv --system-site-packages "$scratch"
echo "torch==$("$PYTHON" -c 'import torch; print(torch.__version__)')" >"$scratch/constraints.txt"
# shellcheck disable=SC2046  # one argument per package name
"$scratch/bin/python" -m pip install -q --upgrade --upgrade-strategy eager \
  --constraint "$scratch/constraints.txt" $("$PYTHON" scripts/dependency_bounds.py --newest)

echo "newest releases against the declared ranges:"
"$scratch/bin/python" - <<'PY'
import importlib.metadata as md
import sys

sys.path.insert(0, "scripts")
from dependency_bounds import requirements

for requirement in requirements(extras={"test"}):
    if requirement.name == "torch":
        continue
    version = md.version(requirement.name)
    allowed = requirement.specifier.contains(version, prereleases=True)
    print(f"  {requirement.name:14} {version:12} {'' if allowed else 'NEWER than ' + str(requirement.specifier)}")
PY
HF_HUB_OFFLINE=1 "$scratch/bin/python" -m pytest -q "${CORE_TESTS[@]}"
