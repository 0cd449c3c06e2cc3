"""scripts/gpu_check.py: the dry-run (what CI runs) and its pieces. The dry-run's figures are checked
against closed forms (sequence lengths, FLOPs ratios) and the stated tolerances; the checks are shown to
fail on a model that computes something else; the budget is shown to stop the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # the script's own modules
sys.path.insert(0, str(ROOT))  # benchmarks/, which gpu_check_model imports

import gpu_check  # noqa: E402
import gpu_check_engines  # noqa: E402
import gpu_check_model  # noqa: E402
from gpu_check_report import markdown, table  # noqa: E402


def dry_run(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    command = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(tmp_path), "--dry-run"]
    result = subprocess.run([*command, *extra], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    return report, (tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow
def test_dry_run_reports_every_part_within_tolerance(tmp_path):
    report, text = dry_run(tmp_path, "--parts", "environment", "correctness", "geometry", "claim")
    parts = {part["name"]: part for part in report["parts"]}
    assert list(parts) == ["environment", "correctness", "geometry", "claim"]
    assert report["dry_run"] and report["elapsed_s"] <= report["budget_s"]
    assert report["estimates_s"] == {name: gpu_check.PARTS[name][1] for name in parts}

    # environment: found this machine's CPU torch, installed nothing, said what it would have run
    environment = parts["environment"]
    assert environment["status"] == "passed" and environment["torch"]["torch"] == torch.__version__
    assert all(action["result"] == "not run (dry-run)" for action in environment["actions"])

    # correctness: every CPU variant against the fp32 eager reference, within its dtype's tolerance
    checks = parts["correctness"]["checks"]
    ran = [row for row in checks if "skipped" not in row]
    assert {row["variant"] for row in ran} == {"sdpa float32 cpu", "eager bfloat16 cpu", "sdpa bfloat16 cpu"}
    assert len(ran) == 3 * 3  # logits, cached generation, mixed batch for each
    for row in ran:
        tolerance = 1e-4 if "float32" in row["variant"] else 5e-2
        assert row["tolerance"] == tolerance and 0 <= row["error"] <= tolerance and row["passed"], row
    fp32 = [row for row in ran if row["variant"] == "sdpa float32 cpu"]
    assert max(row["error"] for row in fp32) < 1e-5  # CPU fp32 kernels differ only in summation order
    flash = [row for row in checks if row["variant"].startswith("flash_attention_2")]
    assert flash and all("CUDA" in row["skipped"] for row in flash)

    # geometry: the quick model (64-token prompt, 16 slow tokens a frame, s2t4 fast tokens)
    geometry = parts["geometry"]
    assert geometry["status"] == "passed", geometry
    prefill = {(row["design"], row["frames"]): row for row in geometry["prefill"]}
    assert prefill["self-attention", 128]["sequence"] == 64 + 128 * 16
    assert prefill["slowfast", 128]["sequence"] == 64 + 128 // 2 // 4 * 16
    assert (
        prefill["slowfast", 128]["slow_tokens"] == 128 * 16
        and prefill["self-attention", 128]["slow_tokens"] == 0
    )
    assert all(row["ms"] > 0 and row["peak_mib"] is None for row in prefill.values())  # no CUDA allocator
    headline = geometry["headline"]
    expected = prefill["slowfast", 128]["gflops"] / prefill["self-attention", 16]["gflops"]
    assert headline["gflops_ratio"] == pytest.approx(expected)
    assert [(row["frames"], row["batch"]) for row in geometry["decoding"]] == [(16, 1), (16, 2)]
    assert all(row[v] > 0 for row in geometry["decoding"] for v in ("cached", "re-projected", "text-only"))

    # claim: skipped with its one-line reason on a clean clone (CI); where a developer has trained
    # experiments/synth's stage 1 it trains in the time left over, and running out of it is a skip
    claim = parts["claim"]
    needed = ("data", "stage1-plain-s0", "stage1-slow-s0")
    if not all((gpu_check_engines.SYNTH / name).exists() for name in needed):
        assert claim["status"] == "skipped" and "stage-1 checkpoints" in claim["reason"]
    elif claim["status"] == "skipped":
        assert "did not finish" in claim["reason"] or "s left" in claim["reason"]
    else:
        assert claim["status"] == "passed", claim["reason"]
    for heading in ("| environment |", "| correctness |", "| geometry |", "| claim |", "### correctness"):
        assert heading in text
    assert "| 128 | slowfast | 320 | 2,048 |" in text


@pytest.mark.slow
def test_budget_stops_the_run(tmp_path):
    """A budget smaller than the parts' estimates: the environment runs, the rest is skipped or stopped
    with a reason, and the whole run ends within the budget."""
    report, _ = dry_run(tmp_path, "--budget-s", "12", "--parts", "environment", "correctness", "geometry")
    parts = report["parts"]
    assert parts[0]["name"] == "environment" and parts[0]["status"] == "passed"
    for part in parts[1:]:
        assert part["status"] in ("skipped", "stopped") and part["reason"], part
    assert report["elapsed_s"] <= 12


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_only_the_dry_run_runs(tmp_path):
    """Not the 7B geometry on a CPU: the environment fails with the advice, the other parts say why."""
    command = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(tmp_path)]
    result = subprocess.run(
        [*command, "--parts", "environment", "geometry"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    environment, geometry = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert environment["status"] == "failed" and "run with --dry-run" in environment["reason"]
    assert geometry["status"] == "skipped" and geometry["reason"].startswith("the environment is not ready")


def test_bad_budget_and_wheels_are_refused(tmp_path):
    script = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(tmp_path)]
    for extra, message in (
        (["--budget-s", "3"], "--budget-s must be more than"),
        (["--wheels", "nope"], "not a folder"),
    ):
        result = subprocess.run([*script, *extra], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and message in result.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    "driver_cuda, index",
    [
        ("13.0", "cu130"),
        ("12.8", "cu128"),
        ("12.5", "cu124"),
        ("12.2", "cu121"),
        ("11.8", "cu118"),
        ("11.4", None),
    ],
)
def test_torch_index_is_the_newest_build_the_driver_runs(driver_cuda, index):
    expected = None if index is None else f"https://download.pytorch.org/whl/{index}"
    assert gpu_check.torch_index(driver_cuda) == expected


def test_install_plan():
    driver = {"gpu": "NVIDIA H200", "driver": "580.1", "memory_mib": 143771, "cuda": "12.6"}
    cpu_torch = {"torch": "2.13.0+cpu", "cuda": None, "cuda_available": False}
    plan = {step["what"]: step for step in gpu_check.install_plan(driver, cpu_torch, ["av>=18,<19"], None)}
    assert plan["torch"]["args"] == ["torch", "--index-url", "https://download.pytorch.org/whl/cu126"]
    assert plan["project"]["args"] == ["av>=18,<19"]
    assert plan["vllm"].get("venv") and ("flash-attn" in plan) == (gpu_check.installed("flash-attn") is None)
    # a torch that sees the GPU is kept; without a driver nothing CUDA-only is planned
    cuda_torch = {"torch": "2.11.0+cu130", "cuda": "13.0", "cuda_available": True}
    assert "torch" not in {step["what"] for step in gpu_check.install_plan(driver, cuda_torch, [], None)}
    assert {step["what"] for step in gpu_check.install_plan({}, cpu_torch, [], None)} <= {"deepspeed"}
    wheels = gpu_check.pip_command(plan["project"], "python", Path("/w"))
    assert wheels[-4:] == ["--no-index", "--find-links", "/w", "av>=18,<19"]


def test_an_install_that_cannot_be_done_says_why_in_one_line(tmp_path):
    """pip offline, from an empty wheel folder: a failed install, not a crash (its part is then skipped)."""
    step = {"what": "project", "args": ["slowfast-vlm-no-such-package"], "timeout_s": 60, "why": "test"}
    result = gpu_check.run_install(step, gpu_check.pip_command(step, sys.executable, tmp_path), 60)
    assert result.startswith("failed: ") and "\n" not in result and "slowfast-vlm-no-such-package" in result


def test_correctness_checks_fail_on_a_model_that_differs():
    """The comparisons see a difference: a model whose slow branch is closed is not the reference."""
    reference = gpu_check_model.tiny_reference("tiny")
    inputs = gpu_check_model.correctness_inputs(reference)
    other = gpu_check_model.tiny_reference("tiny")
    with torch.no_grad():
        for layer in other.hybrid_attentions:
            layer.cross_attn_warm_up_gate.fill_(0.0)
    cpu, fp32 = torch.device("cpu"), torch.float32
    visual = {"pixel_values_videos": inputs["video"]}
    same = gpu_check_model.logits_of(reference, inputs["ids"], visual, fp32, cpu)
    closed = gpu_check_model.logits_of(other, inputs["ids"], visual, fp32, cpu)
    assert gpu_check_model.relative_error(closed, same) > 100 * gpu_check_model.TOLERANCE[fp32]
    assert gpu_check_model.relative_error(same, same) == 0


def test_relative_error_is_max_abs_difference_over_max_abs_reference():
    reference = torch.tensor([[2.0, -4.0], [1.0, 0.5]])
    assert gpu_check_model.relative_error(reference + torch.tensor([[0.0, 0.1], [-0.2, 0.0]]), reference) == (
        pytest.approx(0.2 / 4.0)
    )


def test_markdown_summary_and_escaped_cells():
    part = {"name": "claim", "status": "skipped", "reason": "a | b", "seconds": 0.0}
    report = SimpleNamespace(
        dry_run=True, command="python scripts/gpu_check.py", started="now", host="h", budget_s=480,
        elapsed_s=1.0, load_average=[1.0, 2.0, 3.0], estimates_s={"claim": 0}, parts=[part],
    ).__dict__  # fmt: skip
    text = markdown(report)
    assert "| claim | 0 | 0.0 | skipped | a \\| b |" in text and "load average 1.0, 2.0, 3.0" in text
    assert table(["a"], [[1]]) == "| a |\n|---|\n| 1 |"


@pytest.mark.slow
def test_vllm_check_in_the_vllm_interpreter(tmp_path):
    """The engines part with `--vllm-python` where vllm imports (the vLLM venv's test run): greedy parity
    with `generate` on every request and a throughput figure."""
    pytest.importorskip("vllm", reason="vLLM is not installed here: the vLLM venv runs this test")
    report, text = dry_run(tmp_path, "--parts", "engines", "--vllm-python", sys.executable)
    checks = {check["check"]: check for check in report["parts"][0]["checks"]}
    row = checks["vLLM"]
    assert row["parity"] == "8/8 greedy answers equal generate's" and row["passed"], row
    assert row["requests"] == 32 and row["tokens_per_s"] > 0 and "| vLLM | pass |" in text
