"""`slowfast-vlm train`: the shipped configs (the published recipe's numbers, valid DeepSpeed JSON), YAML
loading with `--set`, and the tiny CPU config run end to end through the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from training_helpers import free_port
from transformers import AutoProcessor, TrainingArguments
from transformers.integrations import is_tensorboard_available

from slowfast_vlm import SlowFastForConditionalGeneration, cli
from slowfast_vlm.processing.video import load_video
from slowfast_vlm.training.runner import COMPLETE_MARKER, load_train_config
from slowfast_vlm.training.tiny import write_tiny_setup
from slowfast_vlm.transformers_compat import training_arguments_fields

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
TRAINING_ARGUMENTS = {f.name for f in dataclasses.fields(TrainingArguments)}


@pytest.mark.parametrize("name", ["stage1_7b.yaml", "stage2_7b.yaml", "tiny_cpu.yaml"])
def test_shipped_configs_load_and_name_only_real_training_arguments(name):
    config = load_train_config(str(CONFIGS / name))
    assert set(training_arguments_fields(config.training)) <= TRAINING_ARGUMENTS
    if "deepspeed" in config.training:
        ds = json.loads((ROOT / config.training["deepspeed"]).read_text())
        # no optimizer / scheduler section: the Trainer's per-component parameter groups and schedule are used
        assert "optimizer" not in ds and "scheduler" not in ds
        assert ds["bf16"]["enabled"] == "auto" and ds["train_micro_batch_size_per_gpu"] == "auto"


def test_published_recipe_numbers():
    stage1, stage2 = (
        load_train_config(str(CONFIGS / "stage1_7b.yaml")),
        load_train_config(str(CONFIGS / "stage2_7b.yaml")),
    )
    for config in (stage1, stage2):
        assert (config.data.num_frames, config.data.fps, config.training["bf16"]) == (64, 4.0, True)
        assert (config.training["lr_scheduler_type"], config.training["warmup_steps"]) == ("cosine", 0.03)
    assert stage1.stage == "stage1" and stage1.data.max_length == 3072
    assert json.loads((ROOT / stage1.training["deepspeed"]).read_text())["zero_optimization"]["stage"] == 2
    assert stage1.model.slowfast["hybrid_every_n_layers"] == 8
    assert stage2.stage == "stage2" and stage2.data.max_length == 4096
    assert stage2.training["activation_checkpointing"] and stage2.training["num_train_epochs"] == 1
    zero3 = json.loads((ROOT / stage2.training["deepspeed"]).read_text())["zero_optimization"]
    assert zero3["stage"] == 3 and zero3["stage3_gather_16bit_weights_on_model_save"] is True
    assert stage2.model.init_from == stage1.training["output_dir"]


def test_accelerate_configs_parse():
    for path in (CONFIGS / "accelerate").glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        assert config["distributed_type"] in ("MULTI_GPU", "FSDP") and config["num_processes"] == 8


def test_load_config_with_overrides_and_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {llm: a, vision: b}\ndata: {train: [x.jsonl]}\ntraining: {output_dir: out}\n")
    config = load_train_config(str(path), ["training.max_steps=10", "data.num_frames=8", "learning_rates.vision=1e-5",
                                     "data.train=[a.jsonl, b.jsonl]", "model.slowfast.min_fast_frames=4"])  # fmt: skip
    assert config.training == {"output_dir": "out", "max_steps": 10}
    assert config.data.num_frames == 8 and config.data.train == ["a.jsonl", "b.jsonl"]
    assert config.learning_rates == {"vision": 1e-5} and config.model.slowfast == {"min_fast_frames": 4}
    with pytest.raises(ValueError, match=r"section 'data': unknown key\(s\) \['frames'\]"):
        load_train_config(str(path), ["data.frames=8"])
    with pytest.raises(ValueError, match=r"unknown top-level key\(s\) \['optimizer'\]"):
        load_train_config(str(path), ["optimizer.lr=1"])
    with pytest.raises(ValueError, match="--set expects key=value"):
        load_train_config(str(path), ["training.max_steps"])
    with pytest.raises(ValueError, match="'output_dir' is not a section"):
        load_train_config(str(path), ["training.output_dir.x=1"])


def test_tiny_cpu_config_trains_through_the_cli(tmp_path):
    tiny = write_tiny_setup(tmp_path / "tiny")
    output = tmp_path / "run"
    report_to = "[tensorboard]" if is_tensorboard_available() else "none"
    overrides = [
        f"model.llm={tiny['llm']}", f"model.vision={tiny['vision']}", f"data.train=[{tiny['data']}]",
        f"data.media_root={tiny['media']}", f"training.output_dir={output}", "training.max_steps=4",
        "training.save_steps=2", "training.disable_tqdm=true", f"training.report_to={report_to}",
    ]  # fmt: skip
    assert (
        cli.main(["train", str(CONFIGS / "tiny_cpu.yaml"), *[a for o in overrides for a in ("--set", o)]])
        == 0
    )
    for step in (2, 4):
        assert (output / f"checkpoint-{step}" / COMPLETE_MARKER).is_file()
    if is_tensorboard_available():
        assert list(output.glob("runs/*/events.out.tfevents.*"))

    model = SlowFastForConditionalGeneration.from_pretrained(output)
    processor = AutoProcessor.from_pretrained(output)
    frames, _ = load_video(Path(tiny["media"]) / "red_right.mp4", num_frames=8, fps=4.0)
    messages = [
        {"role": "user", "content": "<video>\nWhat moves?"},
        {"role": "assistant", "content": "A red square."},
    ]
    inputs = processor(text=processor.apply_chat_template(messages), videos=frames, return_tensors="pt")
    with torch.no_grad():
        loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert torch.isfinite(loss)


LEAVING_WORKER = """
import atexit, pathlib, sys
import torch
import torch.distributed as dist
from slowfast_vlm.training.runner import leave_worker
dist.init_process_group("gloo")
rank = dist.get_rank()
tensor = torch.tensor([rank + 1.0])
dist.all_reduce(tensor)  # the group works
atexit.register(lambda: pathlib.Path(sys.argv[1], f"atexit-{rank}").write_text(str(float(tensor))))
print(f"rank {rank} buffered", end="")  # no newline: flushed by leave_worker or lost
leave_worker(3 + rank)
raise SystemExit("not reached")
"""


def test_a_worker_leaves_with_its_code_after_the_exit_handlers_ran(tmp_path):
    """`leave_worker` (the end of `slowfast-vlm train` under torchrun): each rank's own exit code, the
    interpreter's exit handlers run (trackers flush there), buffered output flushed, nothing after it runs."""
    script = tmp_path / "worker.py"
    script.write_text(LEAVING_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2"}  # fmt: skip
    ranks = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path)], env={**env, "RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]  # fmt: skip
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [3, 4], outputs
    assert [out for out, _ in outputs] == ["rank 0 buffered", "rank 1 buffered"]
    assert not any("not reached" in err or "terminate called" in err for _, err in outputs)
    assert [(tmp_path / f"atexit-{r}").read_text() for r in (0, 1)] == ["3.0", "3.0"]  # 1 + 2, summed
