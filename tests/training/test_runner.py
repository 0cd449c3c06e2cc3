"""The training run: presets train exactly their components and lower the loss, bad samples are counted
against the budget, checkpoints count only once complete, a killed run resumes to the same parameters."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from training_helpers import GOOD_RECORDS, conversation, make_config, write_jsonl
from transformers import AutoModelForCausalLM, TrainerCallback

from slowfast_vlm.training.build import component_of, component_parameters
from slowfast_vlm.training.runner import COMPLETE_MARKER, build_trainer, last_complete_checkpoint, train

# The model reads the encoder's last hidden states: SigLIP's final norm and pooling head take no part.
UNUSED_VISION = ("vision_tower.post_layernorm.", "vision_tower.head.")


def data_loss(trainer) -> float:
    """Mean loss of the model over every training sample, one sample at a time, in eval mode."""
    model, dataset = trainer.model, trainer.train_dataset
    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for index in range(len(dataset)):
            batch = trainer.data_collator([dataset[index]])
            batch.pop("skipped_samples")
            losses.append(model(**batch).loss.item())
    model.train(was_training)
    return sum(losses) / len(losses)


class Snapshot(TrainerCallback):
    """The parameters and the data loss when training starts."""

    def __init__(self, trainer_ref: list):
        self.trainer_ref = trainer_ref

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.loss = data_loss(self.trainer_ref[0])


def run_with_snapshot(config) -> tuple:
    holder: list = []
    snapshot = Snapshot(holder)
    trainer = build_trainer(config, callbacks=[snapshot])
    holder.append(trainer)
    trainer.train()
    return trainer, snapshot


@pytest.mark.parametrize(
    "stage, overrides, trained",
    [
        ("stage1", {}, {"projector", "cross_attention"}),
        ("stage2", {}, {"llm", "projector", "cross_attention"}),
        ("custom", {"vision": 1e-3}, {"vision"}),
    ],
)
def test_preset_trains_exactly_its_components_and_lowers_the_loss(
    stage, overrides, trained, base_models, media, tmp_path
):
    data = write_jsonl(tmp_path / "train.jsonl", GOOD_RECORDS)  # videos, an image and a text-only sample
    config = make_config(
        base_models, data, media, tmp_path / "out", stage=stage,
        training={"max_steps": 9, "activation_checkpointing": stage == "stage2"},
    )  # fmt: skip
    config.learning_rates = overrides
    trainer, snapshot = run_with_snapshot(config)

    cross = {n for n, _ in component_parameters(trainer.model)["cross_attention"]}
    for name, after in trainer.model.state_dict().items():
        changed = not torch.equal(after, snapshot.state[name])
        unused = any(part in name for part in UNUSED_VISION)
        assert changed == (component_of(name, cross) in trained and not unused), name
    assert data_loss(trainer) < snapshot.loss - 1e-3


def test_optimizer_groups_carry_the_preset_learning_rates(base_models, media, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", GOOD_RECORDS[:2])
    trainer = build_trainer(
        make_config(base_models, data, media, tmp_path / "out", training={"weight_decay": 0.1})
    )
    optimizer = trainer.create_optimizer()
    groups = {(g["component"], g["weight_decay"]): g for g in optimizer.param_groups}
    assert {k: g["lr"] for k, g in groups.items()} == {
        ("projector", 0.1): 1e-3,
        ("projector", 0.0): 1e-3,
        ("cross_attention", 0.1): 2e-4,
        ("cross_attention", 0.0): 2e-4,
    }
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert in_groups == trainable
    no_decay = {id(p) for p in groups[("projector", 0.0)]["params"]}
    assert no_decay == {
        id(p)
        for n, p in trainer.model.named_parameters()
        if n.startswith("model.multi_modal_projector") and n.endswith("bias")
    }


def test_config_errors_come_before_any_model_is_built(tmp_path):
    config = make_config(
        {"llm": "unused", "vision": "unused"}, tmp_path / "d.jsonl", tmp_path, tmp_path / "out"
    )
    config.model.lora = {"r": 4}
    with pytest.raises(ValueError, match="model.lora adapts the LLM, but stage 'stage1' does not train it"):
        build_trainer(config)
    config.training.pop("output_dir")
    with pytest.raises(ValueError, match="training.output_dir is required"):
        build_trainer(config)


# ----- bad samples -----------------------------------------------------------------------------------
CORRUPT = {"id": "corrupt", "video": "corrupt.mp4", "conversations": conversation("Q?", "A.")}
MISSING = {"id": "missing", "video": "nope.mp4", "conversations": conversation("Q?", "A.")}


def test_bad_samples_are_skipped_and_counted(base_models, media, tmp_path, caplog):
    records = [GOOD_RECORDS[0], GOOD_RECORDS[1], CORRUPT, MISSING, "{not json"]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    config = make_config(
        base_models, data, media, tmp_path / "out", max_bad_sample_fraction=0.6,
        training={"per_device_train_batch_size": 1, "max_steps": 3, "logging_steps": 1, "dataloader_num_workers": 2},
    )  # fmt: skip
    trainer = build_trainer(config)
    assert len(trainer.train_dataset) == 3 and trainer.skipped == 2  # missing file, malformed line
    with caplog.at_level("WARNING", logger="slowfast_vlm.training.runner"):
        trainer.train()
    # one epoch of 3 single-sample batches: the corrupt video is met exactly once, never replaced
    assert trainer.skipped == 3
    assert "skipped sample corrupt" in caplog.text and "corrupt.mp4" in caplog.text
    assert [h["skipped_samples"] for h in trainer.state.log_history if "loss" in h][-1] == 3


def test_too_many_bad_samples_stop_the_run(base_models, media, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [GOOD_RECORDS[0], MISSING, MISSING, "{not json"])
    config = make_config(base_models, data, media, tmp_path / "out", max_bad_sample_fraction=0.5)
    with pytest.raises(
        RuntimeError, match=r"3 of 4 records are unusable .*train\.jsonl:2: video file not found"
    ):
        build_trainer(config)

    data = write_jsonl(tmp_path / "train2.jsonl", [GOOD_RECORDS[0], CORRUPT, CORRUPT, GOOD_RECORDS[1]])
    config = make_config(
        base_models, data, media, tmp_path / "out2", max_bad_sample_fraction=0.25,
        training={"per_device_train_batch_size": 1, "max_steps": 4},
    )  # fmt: skip
    trainer = build_trainer(config)
    with pytest.raises(
        RuntimeError, match=r"2 of 4 training samples are unusable.*max_bad_sample_fraction=0.25"
    ):
        trainer.train()


def test_the_budget_counts_a_bad_record_once_however_often_it_is_drawn(base_models, media, tmp_path):
    # 7 good videos and 1 corrupt one, for 3 epochs: the corrupt record is met every epoch, yet it is
    # 1 unusable record of 8, within a budget of 1/8 (counting draws, it was 3 of 8 by the third epoch)
    good = [{**GOOD_RECORDS[i % 2], "id": f"good{i}"} for i in range(7)]
    data = write_jsonl(tmp_path / "train.jsonl", [*good, CORRUPT])
    config = make_config(
        base_models, data, media, tmp_path / "out", max_bad_sample_fraction=0.125,
        training={"per_device_train_batch_size": 4, "max_steps": 6},
    )  # fmt: skip
    trainer = build_trainer(config)
    trainer.train()
    assert trainer.state.epoch == 3 and trainer.skipped == 1
    assert trainer.skipped_where == {f"{data}:8"}


# ----- checkpoints and resume ------------------------------------------------------------------------
class Kill(TrainerCallback):
    """Simulate a crash: raise once `global_step` reaches `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed at step {self.step}")


def test_killed_run_resumes_from_the_last_complete_checkpoint(base_models, media, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", GOOD_RECORDS)  # 3 batches per epoch: resume mid-epoch 2
    checkpoints = {"max_steps": 6, "save_strategy": "steps", "save_steps": 2, "save_total_limit": 2}
    straight = train(make_config(base_models, data, media, tmp_path / "straight", training=checkpoints))

    run_dir = tmp_path / "killed"
    config = make_config(base_models, data, media, run_dir, training=checkpoints)
    with pytest.raises(KeyboardInterrupt):
        train(config, callbacks=[Kill(step=5)])
    assert sorted(os.listdir(run_dir)) == ["checkpoint-2", "checkpoint-4"]
    # a half-written checkpoint-6 (no completion marker) must never be picked up
    shutil.copytree(run_dir / "checkpoint-4", run_dir / "checkpoint-6")
    os.remove(run_dir / "checkpoint-6" / COMPLETE_MARKER)
    (run_dir / "checkpoint-6" / "model.safetensors").write_bytes(b"half a file")
    assert last_complete_checkpoint(str(run_dir)) == str(run_dir / "checkpoint-4")

    resumed = train(config)
    assert resumed.state.global_step == 6
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    straight_state, resumed_state = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    for key, slots in straight_state["state"].items():
        for slot, value in slots.items():
            assert torch.equal(resumed_state["state"][key][slot], value), (key, slot)
    # the same losses at steps 5 and 6 means the same batches in the same order
    losses = [h["loss"] for h in straight.state.log_history if "loss" in h]
    assert [h["loss"] for h in resumed.state.log_history if "loss" in h][-2:] == losses[-2:]
    # checkpoint-6 was rewritten completely, and rotation kept the two newest complete checkpoints
    assert sorted(os.listdir(run_dir)) == sorted(
        ["checkpoint-4", "checkpoint-6", *[f for f in os.listdir(run_dir) if not f.startswith("checkpoint")]]
    )
    with open(run_dir / "checkpoint-6" / COMPLETE_MARKER) as f:
        assert json.load(f)["global_step"] == 6


# ----- several processes -----------------------------------------------------------------------------
RANK_SCRIPT = """
import sys, torch
from slowfast_vlm.training.runner import load_train_config, train
trainer = train(load_train_config(sys.argv[1]))
state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
torch.save({"state": state, "skipped": trainer.skipped}, f"{sys.argv[2]}/rank{trainer.args.process_index}.pt")
"""


@pytest.mark.slow
def test_two_process_gloo_run_keeps_ranks_identical(base_models, media, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", GOOD_RECORDS + [CORRUPT])
    config = make_config(
        base_models, data, media, tmp_path / "out", stage="stage2", max_bad_sample_fraction=0.5
    )
    values = dataclasses.asdict(config)
    values["training"].update(per_device_train_batch_size=1, max_steps=4, ddp_backend="gloo")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(values))
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(tmp_path / "rank.py"), str(tmp_path / "run.yaml"), str(tmp_path)]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for name, value in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][name], value), name
    base = AutoModelForCausalLM.from_pretrained(base_models["llm"])
    assert not torch.equal(ranks[0]["state"]["lm_head.weight"][:300], base.lm_head.weight)  # it did train
    # 3 videos padded to a run of 2 x 2: the corrupt one is drawn once or twice; both ranks count every rank's
    assert ranks[0]["skipped"] == ranks[1]["skipped"] >= 1
