#!/usr/bin/env bash
# Install lmms-eval (the optional evaluation harness for `--model slowfast_vlm`) without touching torch.
#
# `pip install lmms-eval` resolves its full requirement list, which pulls torchvision (and with it a
# CUDA torch build), pins av<16 (this project needs PyAV >= 18), and brings wandb, yt-dlp, timm,
# sentence-transformers, ... that the video benchmarks never import. So: install lmms-eval alone
# (--no-deps), then only the packages its evaluation loop and the video task files import, with
# torch, numpy, transformers and av held at their installed versions by a constraints file.
#
#   PYTHON=python3 LMMS_EVAL_VERSION=0.7.3 bash scripts/install_lmms_eval.sh
set -euo pipefail

PYTHON="${PYTHON:-python}"
LMMS_EVAL_VERSION="${LMMS_EVAL_VERSION:-0.7.3}"

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$PYTHON" - >"$constraints" <<'EOF'
import importlib.metadata as md

for name in ("torch", "numpy", "transformers", "av"):
    print(f"{name}=={md.version(name)}")
EOF
# lmms-eval 0.7.3 imports `filelock._api`, which filelock 4 removed
echo "filelock<4" >>"$constraints"
echo "holding: $(tr '\n' ' ' <"$constraints")"
torch_before="$("$PYTHON" -c 'import torch; print(torch.__version__)')"

pip_install() { "$PYTHON" -m pip install --constraint "$constraints" "$@"; }

pip_install --no-deps "lmms-eval==${LMMS_EVAL_VERSION}"
# imported by lmms_eval's CLI, evaluator, task loading and metrics (filelock: held below 4, see above)
pip_install filelock "datasets>=2.19" "evaluate>=0.4" loguru sacrebleu pytablewriter jsonlines "tenacity>=8.3" pytz
# imported by the video task files: videomme (cv2), longvideobench (decord), nextqa open-ended (nltk, pywsd)
pip_install opencv-python-headless nltk pywsd
pip_install decord || echo "warning: decord has no wheel here; the longvideobench tasks will not load" >&2

"$PYTHON" - "$torch_before" <<'EOF'
import importlib.util
import sys

import torch

assert torch.__version__ == sys.argv[1], f"torch changed: {sys.argv[1]} -> {torch.__version__}"
import lmms_eval.__main__  # noqa: F401  the CLI and everything it imports
from lmms_eval.models import list_available_models

from slowfast_vlm.evaluation.lmms_eval_plugin import SlowFastLMMS  # noqa: F401

print(f"lmms-eval ready; torch {torch.__version__}; torchvision installed: {importlib.util.find_spec('torchvision') is not None}")
if "slowfast_vlm" not in list_available_models():
    print("note: model 'slowfast_vlm' is not registered yet: reinstall slowfast-vlm (pip install -e .) so its "
          "lmms_eval.models entry point is installed")
EOF
