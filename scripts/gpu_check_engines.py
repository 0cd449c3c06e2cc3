"""The engine parts of `gpu_check.py`: vLLM, ZeRO-3 on one device, and the synthetic claim's stage 2.

- vLLM: `gpu_check_vllm.py` in the interpreter that has vllm and the project's plugin
  (`slowfast_vlm.serving.vllm`; `--vllm-python`, its own venv: vllm pins its own torch and
  transformers): greedy parity of 8 video requests with `generate`, tokens per second of 32
  concurrent requests. Skipped, with the reason, where vllm does not import.
- ZeRO-3: `slowfast-vlm train configs/tiny_cpu.yaml` on the tiny set-up (`training.tiny`) under
  `torchrun --nproc_per_node 1` with `configs/deepspeed/zero3.json`, bf16 (the stage-2 recipe): every
  step logs a finite loss and the run writes a complete final model.
- claim: models (b) and (c) of experiments/synth trained for a few hundred stage-2 steps from their
  stage-1 checkpoints (only where `run.py prepare`, `pretrain-vision` and `pretrain-llm` have left them
  under outputs/synth/), their test accuracies reported.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZERO3_STEPS = {False: 20, True: 3}  # GPU, dry-run
ZERO3_RESERVE_S = 35  # kept back from the vLLM check for the ZeRO-3 run that follows it
CLAIM_STEPS = 300
SYNTH = ROOT / "outputs" / "synth"


def skipped(check: str, reason: str) -> dict:
    return {"check": check, "skipped": reason}


def vllm(context) -> dict:
    """`gpu_check_vllm.py` in the vLLM interpreter (`--vllm-python`, else this one if vllm imports here)."""
    if not (ROOT / "src" / "slowfast_vlm" / "serving" / "vllm").exists():
        return skipped("vLLM", "the project's vLLM plugin (issue 16) is not in this checkout")
    python = context.vllm_python or sys.executable
    if context.vllm_python is None and importlib.util.find_spec("vllm") is None:
        return skipped("vLLM", "vllm is not importable here (pass --vllm-python, a venv that has it)")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1")
    command = [python, str(ROOT / "scripts" / "gpu_check_vllm.py")]
    try:
        result = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=max(1, context.time_left() - ZERO3_RESERVE_S),
        )
    except subprocess.TimeoutExpired:
        return {"check": "vLLM", "passed": False, "reason": "out of time"}
    lines = [line for line in result.stdout.splitlines() if line.startswith('{"check": "vLLM"')]
    if result.returncode != 0 or not lines:
        errors = [line for line in result.stderr.splitlines() if line.strip()]
        return {"check": "vLLM", "passed": False, "reason": errors[-1][:200] if errors else "no output"}
    return json.loads(lines[-1])


def zero3(context) -> dict:
    if importlib.util.find_spec("deepspeed") is None:
        return skipped("ZeRO-3", "deepspeed is not installed")
    from slowfast_vlm import SlowFastForConditionalGeneration
    from slowfast_vlm.training.runner import is_complete
    from slowfast_vlm.training.tiny import write_tiny_setup

    steps = ZERO3_STEPS[context.dry_run]
    with tempfile.TemporaryDirectory() as folder:
        tiny, output = write_tiny_setup(Path(folder) / "tiny"), Path(folder) / "run"
        sets = [
            f"model.llm={tiny['llm']}", f"model.vision={tiny['vision']}", f"data.train=[{tiny['data']}]",
            f"data.media_root={tiny['media']}", f"training.output_dir={output}", f"training.max_steps={steps}",
            "training.logging_steps=1", f"training.save_steps={steps}", "training.disable_tqdm=true",
            "training.deepspeed=configs/deepspeed/zero3.json", "training.bf16=true",
            f"training.use_cpu={str(context.device.type == 'cpu').lower()}",
        ]  # fmt: skip
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        command += [
            "-m",
            "slowfast_vlm.cli",
            "train",
            "configs/tiny_cpu.yaml",
            *(a for s in sets for a in ("--set", s)),
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1") if context.dry_run else None
        try:
            result = subprocess.run(
                command,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=max(1, context.time_left()),
                env=env,
            )
        except subprocess.TimeoutExpired:
            return {"check": "ZeRO-3", "passed": False, "reason": "out of time"}
        losses = [
            float(loss) for loss in re.findall(r"'loss': '([-\d.e+naif]+)'", result.stdout + result.stderr)
        ]
        complete = result.returncode == 0 and is_complete(str(output / f"checkpoint-{steps}"))
        if complete:  # the final model: every weight saved under its name, none missing, none left over
            _, info = SlowFastForConditionalGeneration.from_pretrained(output, output_loading_info=True)
            complete = not info["missing_keys"] and not info["unexpected_keys"]
    passed = result.returncode == 0 and len(losses) == steps and all(map(math.isfinite, losses)) and complete
    row = {
        "check": "ZeRO-3",
        "steps": steps,
        "losses": losses,
        "complete_final_model": complete,
        "passed": passed,
    }
    if not passed:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        row["reason"] = f"exit {result.returncode}: {lines[-1][:200] if lines else 'no output'}"
    return row


def engines(context) -> dict:
    checks = [vllm(context), zero3(context)]
    ran = [check for check in checks if "skipped" not in check]
    failed = [check["check"] for check in ran if not check["passed"]]
    reasons = [f"{check['check']}: {check['skipped']}" for check in checks if "skipped" in check]
    status = "failed" if failed else "passed" if ran else "skipped"
    reasons += [f"{name} failed" for name in failed]
    return {"status": status, "reason": "; ".join(reasons) or None, "checks": checks}


def claim(context) -> dict:
    needed = [SYNTH / "data", SYNTH / "stage1-plain-s0", SYNTH / "stage1-slow-s0"]
    absent = [str(path.relative_to(ROOT)) for path in needed if not path.exists()]
    if absent:
        reason = f"needs experiments/synth's data and stage-1 checkpoints ({', '.join(absent)} absent)"
        return {"status": "skipped", "reason": reason}
    results = {}
    for index, model in enumerate(("b", "c")):
        seconds = context.time_left() / (2 - index)
        if seconds < 60:
            return {"status": "skipped", "reason": f"{context.time_left():.0f} s left", "results": results}
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, "experiments/synth/run.py", "train", "--model", model, "--seed", "0"]
            command += ["--steps", str(CLAIM_STEPS), "--out", out]
            try:
                subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=seconds)
            except subprocess.TimeoutExpired:  # the time left over ran out: not a fault of the code
                reason = f"model ({model}) did not finish {CLAIM_STEPS} steps in the {seconds:.0f} s left"
                return {"status": "skipped", "reason": reason, "results": results}
            except subprocess.CalledProcessError as error:
                last = error.stderr.decode(errors="replace").strip().splitlines()[-1:] or [
                    f"exit {error.returncode}"
                ]
                return {"status": "failed", "reason": f"model ({model}): {last[0][:200]}", "results": results}
            result = json.loads((Path(out) / "result.json").read_text())
        results[model] = {
            key: value for key, value in result.items() if "accuracy" in key or key == "final_loss"
        }
    return {"status": "passed", "reason": None, "steps": CLAIM_STEPS, "results": results}
