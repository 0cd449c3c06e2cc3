"""Multi-process training on the real engines, 2 CPU processes with gloo, through `slowfast-vlm train`:
DDP (the reference), DeepSpeed ZeRO-2, ZeRO-3 (bf16 + gradient checkpointing, the stage-2 recipe) and
FSDP2. Each ends with DDP's losses and weights (within the stated tolerance), writes a complete final
model, resumes exactly from a mid-epoch checkpoint, and exits with every rank's process group destroyed.
Set-ups that would silently do the wrong thing are refused with one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from training_helpers import free_port
from transformers import AutoProcessor, set_seed

from slowfast_vlm import SlowFastForConditionalGeneration
from slowfast_vlm.training.build import build_model
from slowfast_vlm.training.runner import COMPLETE_MARKER, load_train_config
from slowfast_vlm.training.tiny import write_tiny_setup

ROOT = Path(__file__).resolve().parents[2]
STEPS, RESUME_AT = 8, 4  # 3 steps per epoch: step 4 is mid-epoch 1, steps 7-8 are epoch 2
ENGINES = {
    "ddp": [],
    "zero2": ["training.deepspeed=configs/deepspeed/zero2.json"],
    "zero3": [
        "training.deepspeed=configs/deepspeed/zero3.json",
        "training.bf16=true",
        "training.activation_checkpointing=true",
    ],
    "fsdp2": ["training.fsdp=full_shard auto_wrap", "training.fsdp_config=configs/fsdp/fsdp2.json"],
}
# (losses, weights) against fp32 DDP: fp32 engines only reorder sums; ZeRO-3 computes in bf16 and saves
# bf16 weights (relative rounding up to 2^-9, plus bf16 arithmetic in the updates: Adam moves a weight by up
# to its learning rate, 1e-3 for stage 1's projector, per step whatever its gradient's size, so a gradient
# near zero that bf16 rounds to the other sign moves it by up to 2e-3 the other way).
TOLERANCE = {
    "zero2": (dict(rtol=0, atol=1e-5), dict(rtol=0, atol=1e-6)),
    "fsdp2": (dict(rtol=0, atol=1e-5), dict(rtol=0, atol=1e-6)),
    "zero3": (dict(rtol=0, atol=2e-3), dict(rtol=2**-8, atol=2e-3)),
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    return write_tiny_setup(tmp_path_factory.mktemp("tiny"))


def train_command(tiny: dict[str, str], output: Path, sets: list[str]) -> list[str]:
    """`slowfast-vlm train configs/tiny_cpu.yaml` on the tiny set-up, logging every step."""
    sets = [
        f"model.llm={tiny['llm']}", f"model.vision={tiny['vision']}", f"data.train=[{tiny['data']}]",
        f"data.media_root={tiny['media']}", f"training.output_dir={output}", f"training.max_steps={STEPS}",
        f"training.save_steps={RESUME_AT}", "training.save_total_limit=null", "training.logging_steps=1",
        "training.disable_tqdm=true", "training.seed=0", *sets,
    ]  # fmt: skip
    command = ["-m", "slowfast_vlm.cli", "train", "configs/tiny_cpu.yaml"]
    return command + [a for s in sets for a in ("--set", s)]


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def torchrun(tiny: dict[str, str], output: Path, sets: list[str]) -> subprocess.CompletedProcess:
    """2 processes on this machine; every rank exits 0 and none aborts at exit."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = run(launcher + train_command(tiny, output, sets))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate called" not in result.stderr
    return result


def losses(output: Path, step: int = STEPS) -> list[float]:
    state = json.loads((output / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def ddp(tiny, tmp_path_factory) -> Path:
    """The reference: an uninterrupted DDP run."""
    output = tmp_path_factory.mktemp("ddp") / "run"
    torchrun(tiny, output, ENGINES["ddp"])
    return output


def assert_complete_final_model(output: Path) -> dict[str, torch.Tensor]:
    """`from_pretrained` loads every weight of the saved model (none missing, none left over)."""
    model, info = SlowFastForConditionalGeneration.from_pretrained(output, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert AutoProcessor.from_pretrained(output).video_token == "<video>"
    saved, loaded = load_file(output / "model.safetensors"), model.state_dict()
    for name, value in saved.items():
        assert torch.equal(loaded[name], value.to(loaded[name].dtype)), name
    return saved


def resume_from_mid_epoch(tiny, output: Path, sets: list[str], tmp_path: Path) -> Path:
    """A run interrupted after checkpoint-RESUME_AT (only that checkpoint survives), started again."""
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(output / f"checkpoint-{RESUME_AT}", resumed / f"checkpoint-{RESUME_AT}")
    result = torchrun(tiny, resumed, sets)
    assert f"resuming from {resumed / f'checkpoint-{RESUME_AT}'}" in result.stderr
    return resumed


@pytest.mark.slow
@pytest.mark.engines
def test_ddp_resume_from_mid_epoch_is_exact(ddp, tiny, tmp_path):
    reference = load_file(ddp / "model.safetensors")
    assert_complete_final_model(ddp)
    resumed = resume_from_mid_epoch(tiny, ddp, ENGINES["ddp"], tmp_path)
    assert losses(resumed) == losses(ddp)  # steps 5-8: the same batches, in the same order, on both ranks
    for name, value in load_file(resumed / "model.safetensors").items():
        assert torch.equal(value, reference[name]), name


@pytest.mark.slow
@pytest.mark.engines
@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
def test_engine_equals_ddp_saves_a_complete_model_and_resumes_exactly(engine, ddp, tiny, tmp_path):
    output = tmp_path / "run"
    torchrun(tiny, output, ENGINES[engine])
    loss_tolerance, weight_tolerance = TOLERANCE[engine]
    torch.testing.assert_close(torch.tensor(losses(output)), torch.tensor(losses(ddp)), **loss_tolerance)
    saved, reference = assert_complete_final_model(output), load_file(ddp / "model.safetensors")
    assert set(saved) == set(reference)
    for name, value in saved.items():
        torch.testing.assert_close(value.float(), reference[name], **weight_tolerance, msg=name)
    if engine == "fsdp2":  # really sharded: each rank wrote its own part of the model, not a copy of it
        shards = sorted((output / f"checkpoint-{RESUME_AT}" / "pytorch_model_fsdp_0").glob("*.distcp"))
        assert len(shards) == 2
        assert all(s.stat().st_size < 0.75 * (output / "model.safetensors").stat().st_size for s in shards)
        assert (output / f"checkpoint-{RESUME_AT}" / "config.json").is_file()

    resumed = resume_from_mid_epoch(tiny, output, ENGINES[engine], tmp_path)
    assert losses(resumed) == losses(output)
    for name, value in load_file(resumed / "model.safetensors").items():
        assert torch.equal(value, saved[name]), name
    assert (resumed / f"checkpoint-{STEPS}" / COMPLETE_MARKER).is_file()


@pytest.mark.slow
@pytest.mark.engines
def test_two_nodes_on_one_machine_equal_one_node(ddp, tiny, tmp_path):
    """The multi-node form: two torchrun agents (one process each) meeting through c10d on 127.0.0.1."""
    output, port = tmp_path / "run", free_port()
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "engines-test"]  # fmt: skip
    command = train_command(tiny, output, ENGINES["zero2"])
    agents = [
        subprocess.Popen(
            agent + ["--node_rank", str(rank)] + command,
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    errors = [agent.communicate(timeout=600)[1] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    torch.testing.assert_close(torch.tensor(losses(output)), torch.tensor(losses(ddp)), rtol=0, atol=1e-5)


# ----- refused set-ups ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.engines
def test_processes_that_would_train_independent_copies_are_refused(tiny, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = run(launcher + train_command(tiny, tmp_path / "run", ["training.use_cpu=false"]))
    if result.returncode == 0 and (tmp_path / "run" / "model.safetensors").is_file():
        # transformers 5.16 gives each CPU process the whole world here: one training, nothing to refuse
        pytest.skip("this transformers release trains the processes together without use_cpu")
    assert result.returncode != 0
    message = "launched as 2 processes but the Trainer sees 1 (on CPU, set training.use_cpu: true)"
    assert result.stderr.count(message) == 2  # one line from each rank
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_fsdp_that_cannot_be_active_is_refused(tiny, tmp_path):
    result = run([sys.executable, *train_command(tiny, tmp_path / "run", ENGINES["fsdp2"])])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "slowfast-vlm train: configs/tiny_cpu.yaml: FSDP was requested but is not active (NO, 1 process(es)): "
        "launch 2 or more processes with torchrun"
    )


# ----- partitioned build ---------------------------------------------------------------------------------
PARTITION_SCRIPT = """
import json, pathlib, sys
import deepspeed, torch
from safetensors.torch import load_file, save_file
from slowfast_vlm.training.runner import build_trainer, leave_worker, load_train_config
trainer = build_trainer(load_train_config("configs/tiny_cpu.yaml", sys.argv[3:]))
expected = load_file(sys.argv[1])
# renamings save_pretrained would reverse (transformers' ZeRO-3 loader keeps its load-time ones)
conversions = len(getattr(trainer.model, "_weight_conversions", None) or [])
report = {"whole": [], "held": 0, "total": 0, "differs": [], "conversions": conversions}
for name, param in trainer.model.named_parameters():
    partitioned = hasattr(param, "ds_tensor") and param.numel() == 0
    if partitioned:
        report["held"] += param.ds_tensor.numel()
        report["total"] += param.ds_numel
    else:
        report["whole"].append(name)  # a rank holding the whole parameter
    with deepspeed.zero.GatheredParameters([param], enabled=partitioned):
        if not torch.equal(param.data, expected[name]):
            report["differs"].append(name)
# one file per rank: two ranks printing to one pipe may interleave their lines
report_file = pathlib.Path(sys.argv[2]) / f"partition-report-{torch.distributed.get_rank()}.json"
report_file.write_text(json.dumps(report))
leave_worker(0)  # what `slowfast-vlm train` does at its end
"""


def build_reports(reference: Path, tmp_path: Path, sets: list[str]) -> list[dict]:
    """Each of 2 ranks builds the trainer's model for `sets` and reports, for every parameter, whether it
    holds it whole and whether it (gathered) equals `reference` (a safetensors file)."""
    (tmp_path / "partition.py").write_text(PARTITION_SCRIPT)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = run(launcher + [str(tmp_path / "partition.py"), str(reference), str(tmp_path), *sets])
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"partition-report-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.engines
def test_zero3_builds_each_ranks_partition_of_a_checkpoint(ddp, tiny, tmp_path):
    """ZeRO-3 from a slow-fast checkpoint (`model.init_from`, how stage 2 starts): no rank ever holds a
    whole parameter, and the partitions gather back to the checkpoint's weights."""
    sets = [f"model.init_from={ddp}", "model.llm=null", "model.vision=null", *ENGINES["zero3"][:1]]
    sets += [f"training.output_dir={tmp_path / 'run'}", f"data.train=[{tiny['data']}]"]
    sets += [f"data.media_root={tiny['media']}"]
    for report in build_reports(ddp / "model.safetensors", tmp_path, sets):
        assert report["whole"] == [] and report["differs"] == [] and report["conversions"] == 0
        assert report["held"] <= 0.51 * report["total"]  # half of the model, each part rounded up


RESIZED = {"model.language_model.embed_tokens.weight", "lm_head.weight"}


@pytest.mark.slow
@pytest.mark.engines
@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_a_new_model_from_base_checkpoints_is_built_alike_on_every_rank(engine, tiny, tmp_path):
    """A new model from the base LLM + encoder (how stage 1 starts): under ZeRO-3 no rank holds a whole
    parameter; under FSDP2 every rank maps the checkpoints (sharded when training starts). On both ranks
    every weight, new ones (projector, cross-attention, gates, new embedding rows) included, equals a
    single-process build with the same seed."""
    engine_sets = (
        ENGINES[engine][:1] if engine == "zero3" else ENGINES[engine]
    )  # ZeRO-3 in fp32, as the reference
    sets = [f"model.llm={tiny['llm']}", f"model.vision={tiny['vision']}", *engine_sets]
    sets += [f"training.output_dir={tmp_path / 'run'}", f"data.train=[{tiny['data']}]", "training.seed=3"]
    sets += [f"data.media_root={tiny['media']}"]
    config = load_train_config(str(ROOT / "configs/tiny_cpu.yaml"), sets)
    set_seed(3)
    single, _ = build_model(config.model, seed=3)
    save_file({k: v.clone() for k, v in single.state_dict().items()}, tmp_path / "single.safetensors")
    reports = build_reports(tmp_path / "single.safetensors", tmp_path, sets)
    for report in reports:
        assert report["differs"] == [] and report["conversions"] == 0
        if engine == "zero3":  # transformers' resize of the embeddings (new tokens) leaves them whole until
            assert set(report["whole"]) == RESIZED  # DeepSpeed partitions the model when training starts
            assert report["held"] <= 0.51 * report["total"]
        else:
            assert sorted(report["whole"]) == sorted(name for name, _ in single.named_parameters())
