"""Train a slow-fast model from a YAML config (stage 1, stage 2 or a custom recipe), on one CPU or many
GPUs (launch with torchrun or accelerate). A run resumes by itself from the newest complete checkpoint
in its output directory. Example: slowfast-vlm train configs/tiny_cpu.yaml --set training.max_steps=20
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, NoReturn

import accelerate
import torch
import yaml
from accelerate.state import PartialState
from accelerate.utils import DistributedType, gather_object
from accelerate.utils.constants import OPTIMIZER_NAME
from packaging.version import Version
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.integrations import is_tensorboard_available
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..modeling.fast_tokens import fast_token_count
from ..transformers_compat import allow_indexed_cpu_map_location, training_arguments_fields
from .build import (
    ModelConfig,
    build_model,
    learning_rates,
    merge_lora,
    parameter_groups,
    set_trainable,
)
from .data import (
    Collator,
    ConversationDataset,
    DataConfig,
    ModalityGroupedSampler,
    SkippedSample,
    TooManyBadSamples,
    read_records,
)

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "slowfast_checkpoint_complete.json"
FORCED_TRAINING_ARGS = {"remove_unused_columns": False}  # batches carry lists the Trainer must not filter
DEFAULT_TRAINING_ARGS = {
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,  # < 1: a fraction of the training steps
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 500,
    "report_to": ["tensorboard"] if is_tensorboard_available() else "none",
}


# accelerate before 1.13 reads a sharded FSDP2 optimizer checkpoint into `optimizer.state_dict()`, which holds
# no state before the first step: Adam's moments are silently not restored and a resumed run's updates
# differ from its first step on. 1.13 reads into torch's full template (`get_optimizer_state_dict`).
ACCELERATE_DROPS_SHARDED_FSDP2_OPTIMIZER_STATE = Version(accelerate.__version__) < Version("1.13")


class YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-5` as a string; learning rates are written that way: read it as a float."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+)$"),
    list("-+0123456789."),
)


@dataclass
class TrainConfig:
    """A training run: the YAML file's top-level sections.

    Args:
        model: `ModelConfig`. data: `DataConfig`.
        stage: "stage1", "stage2" or "custom" (which components train, and their learning rates).
        learning_rates: per-component learning rates that override the stage preset (`null` = frozen).
        training: `transformers.TrainingArguments` fields (`output_dir`, batch sizes, `bf16`, `deepspeed`, ...).
        resume: continue from the newest complete checkpoint in `training.output_dir`, if any.
    """

    model: ModelConfig
    data: DataConfig
    stage: str = "stage1"
    learning_rates: dict[str, float | None] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    resume: bool = True


def _section(cls, values: dict[str, Any] | None, name: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values or {}) - known
    if unknown:
        raise ValueError(f"config section {name!r}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    return cls(**(values or {}))


def apply_override(values: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` (value parsed as YAML) to a nested config dict, in place."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"--set expects key=value (e.g. training.max_steps=10), got {assignment!r}")
    *parents, leaf = key.split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {assignment}: {part!r} is not a section")
    try:
        node[leaf] = yaml.load(raw, Loader=YamlLoader)
    except yaml.YAMLError as e:
        raise ValueError(
            f"--set {assignment}: the value is not valid YAML ({' '.join(str(e).split())})"
        ) from e


def load_train_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML training config and apply `--set` overrides."""
    with open(path, encoding="utf-8") as f:
        try:
            values = yaml.load(f, Loader=YamlLoader) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from e
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a training config is a YAML mapping, got {type(values).__name__}")
    for assignment in overrides:
        apply_override(values, assignment)
    top = {f.name for f in dataclasses.fields(TrainConfig)}
    if set(values) - top:
        raise ValueError(
            f"{path}: unknown top-level key(s) {sorted(set(values) - top)}; known: {sorted(top)}"
        )
    values["model"] = _section(ModelConfig, values.get("model"), "model")
    values["data"] = _section(DataConfig, values.get("data"), "data")
    return TrainConfig(**values)


# ----- checkpoints ---------------------------------------------------------------------------------
def is_complete(checkpoint: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint, COMPLETE_MARKER))


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The `checkpoint-N` directory with the highest N whose completion marker was written, if any."""
    if not os.path.isdir(output_dir):
        return None
    steps = {}
    for name in os.listdir(output_dir):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        if match and is_complete(os.path.join(output_dir, name)):
            steps[int(match.group(1))] = os.path.join(output_dir, name)
    return steps[max(steps)] if steps else None


class SlowFastTrainer(Trainer):
    """`Trainer` with per-component learning rates, modality-grouped batches, bad-sample accounting and
    checkpoints that only count once complete.

    Args:
        rates: learning rate per trained component (`learning_rates`).
        num_records: records in the data files, bad ones included (the bad-sample budget's base).
        skipped: records left out by pre-validation. Records found unusable while training are added
            once each, however often the sampler draws them (`skipped_where`, kept across a resume).
        max_bad_sample_fraction: the run stops once more than this fraction of `num_records` is unusable.
    """

    def __init__(
        self,
        *args,
        rates: dict[str, float],
        num_records: int,
        skipped: int = 0,
        max_bad_sample_fraction: float = 0.01,
        group_by_length: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.rates, self.num_records, self.skipped = rates, num_records, skipped
        self.prevalidated, self.skipped_where = skipped, set()  # where = "file:line": one per record
        self.max_bad_sample_fraction, self.group_by_length = max_bad_sample_fraction, group_by_length

    # ----- engines -----
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        fsdp_requested = (
            self.args.fsdp_plugin_args is not None
            or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        )
        if fsdp_requested and state.distributed_type == DistributedType.MULTI_CPU:
            # accelerate enables FSDP only on GPU-like devices and drops the plugin on CPU without a word;
            # torch's FSDP2 runs on CPU with gloo, so make the state FSDP (the shared PartialState too, which
            # the checkpoint code reads).
            from accelerate.utils import FullyShardedDataParallelPlugin

            plugin = FullyShardedDataParallelPlugin(**(self.args.fsdp_plugin_args or {}))
            if state.mixed_precision != "no":
                plugin.set_mixed_precision(state.mixed_precision)
            state.fsdp_plugin, state.distributed_type = plugin, DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.is_fsdp_enabled = True
        if fsdp_requested and not self.is_fsdp_enabled:
            raise ValueError(
                f"FSDP was requested but is not active ({state.distributed_type.value}, "
                f"{state.num_processes} process(es)): launch 2 or more processes with torchrun"
            )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        plugin = self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None
        if (
            checkpoint is not None
            and ACCELERATE_DROPS_SHARDED_FSDP2_OPTIMIZER_STATE
            and plugin is not None
            and plugin.fsdp_version == 2
            and os.path.isdir(os.path.join(checkpoint, f"{OPTIMIZER_NAME}_0"))  # sharded (DCP) format
        ):
            load_sharded_fsdp2_optimizer(
                self.model, self.optimizer, os.path.join(checkpoint, f"{OPTIMIZER_NAME}_0")
            )

    def save_final_model(self) -> None:
        """The complete model, config and processor in `output_dir`, whatever the engine's checkpoint format."""
        if self.is_fsdp_enabled:
            # Trainer.save_model writes nothing under SHARDED_STATE_DICT: gather the full state dict once.
            self.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        self.save_model(self.args.output_dir)

    # ----- data and optimizer -----
    def _get_train_sampler(self, train_dataset=None) -> ModalityGroupedSampler:
        dataset = train_dataset or self.train_dataset
        self.train_sampler = ModalityGroupedSampler(
            dataset.modalities,
            dataset.lengths,
            batch_size=self._train_batch_size,
            world_size=self.args.world_size,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            group_by_length=self.group_by_length,
        )
        return self.train_sampler

    def _run_epoch(self, *args, epoch: int, **kwargs):
        # accelerate's `set_epoch` does not reach the sampler of a resumed multi-process epoch (wrapped in
        # SkipBatchSampler(BatchSamplerShard(...))): it would deal epoch 0's order. Set it here, always.
        self.train_sampler.set_epoch(epoch)
        return super()._run_epoch(*args, epoch=epoch, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            decay_names = set(self.get_decay_parameter_names(model))
            groups = parameter_groups(model, self.rates, self.args.weight_decay, decay_names)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)  # each group's own lr wins over kwargs
        return self.optimizer

    # ----- bad samples -----
    def account_skipped(self, skipped: list[SkippedSample]) -> None:
        """Log this rank's skipped samples, count every rank's distinct ones (a record drawn again, in a
        later epoch or as padding, counts once), stop once over budget (on all ranks)."""
        for sample in skipped:
            if sample.where not in self.skipped_where:
                logger.warning("skipped sample %s (%s): %s", sample.id, sample.where, sample.reason)
        self.skipped_where.update(gather_object([sample.where for sample in skipped]))
        self.skipped = self.prevalidated + len(self.skipped_where)
        budget = self.max_bad_sample_fraction * self.num_records
        if self.skipped > budget:
            raise TooManyBadSamples(
                f"{self.skipped} of {self.num_records} training samples are unusable, more than "
                f"max_bad_sample_fraction={self.max_bad_sample_fraction} ({budget:.1f}); see the 'skipped sample' "
                "warnings for which and why"
            )

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        self.account_skipped(inputs.pop("skipped_samples", []))
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Every rank must give every trained parameter a gradient at every step (DDP / ZeRO reduce them
        # together, and stage 1 trains nothing that a text-only batch reaches): a micro-batch without
        # visual input, or with no sample left, adds a zero-weighted forward through the visual path.
        if inputs["input_ids"].shape[0] == 0:
            loss, outputs = self.null_loss(model), None
        else:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            if "pixel_values_videos" not in inputs and "pixel_values" not in inputs:
                loss = loss + self.null_loss(model)
        return (loss, outputs) if return_outputs else loss

    def null_loss(self, model) -> torch.Tensor:
        """0 x the output of a real forward (one black image and one text token) that reaches every parameter."""
        base = self.accelerator.unwrap_model(self.model)
        config = base.config
        size = config.vision_config.image_size
        num_image_tokens = fast_token_count(1, base.model.visual_grid(1), config)
        input_ids = torch.full((1, num_image_tokens + 1), config.image_token_id, device=self.args.device)
        # (1, n + 1): the image's placeholders, then one text token that queries the slow tokens
        input_ids[0, -1] = self.processing_class.tokenizer.pad_token_id
        pixel_values = torch.zeros(1, 3, size, size, device=self.args.device)
        outputs = model(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values
        )
        return outputs.logits.sum() * 0.0

    def _get_learning_rate(self) -> float:
        # Called between the optimizer step and the scheduler step: these are the rates this step used.
        self.component_lrs = {
            g["component"]: g["lr"] for g in self.optimizer.param_groups if "component" in g
        }
        return super()._get_learning_rate()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update({f"lr/{name}": lr for name, lr in getattr(self, "component_lrs", {}).items()})
            logs["skipped_samples"] = self.skipped
        super().log(logs, start_time)

    # ----- checkpoints -----
    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        output_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save and os.path.isdir(output_dir):
            shutil.rmtree(output_dir)  # an earlier save of this step, e.g. half-written by an interrupted run
        self.accelerator.wait_for_everyone()
        # Older checkpoints may only be deleted once this one is complete: rotate here, not in super().
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank has written its part (ZeRO shards, RNG states)
        if self.args.should_save:
            if not os.path.isfile(os.path.join(output_dir, "config.json")):  # FSDP's sharded format has none
                self.accelerator.unwrap_model(model).config.save_pretrained(output_dir)
            marker = os.path.join(output_dir, COMPLETE_MARKER)
            with open(marker + ".tmp", "w") as f:
                marker_data = {"global_step": self.state.global_step, "skipped_samples": self.skipped}
                json.dump({**marker_data, "skipped_where": sorted(self.skipped_where)}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(marker + ".tmp", marker)
            self._rotate_complete_checkpoints(run_dir)
        self.accelerator.wait_for_everyone()

    def _rotate_complete_checkpoints(self, run_dir: str) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        complete = []
        for name in os.listdir(run_dir):
            match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
            if match and is_complete(os.path.join(run_dir, name)):
                complete.append((int(match.group(1)), os.path.join(run_dir, name)))
        complete.sort()
        keep = {path for _, path in complete[-limit:]} | {self.state.best_model_checkpoint}
        for _, path in complete:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)


def load_sharded_fsdp2_optimizer(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: str
) -> None:
    """Restore this rank's part of an FSDP2 optimizer state saved with torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # every moment, as this rank's shards
    dcp.load(state, checkpoint_id=folder)
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


# ----- putting it together -------------------------------------------------------------------------
def build_trainer(config: TrainConfig, callbacks: list[TrainerCallback] | None = None) -> SlowFastTrainer:
    """Model, data and `SlowFastTrainer` for `config` (nothing is trained yet)."""
    if "output_dir" not in config.training:
        raise ValueError("training.output_dir is required")
    rates = learning_rates(config.stage, config.learning_rates)
    if config.model.lora is not None and "llm" not in rates:
        raise ValueError(
            f"model.lora adapts the LLM, but stage {config.stage!r} does not train it (no llm rate)"
        )
    training = {**DEFAULT_TRAINING_ARGS, **config.training, **FORCED_TRAINING_ARGS}
    if "vision" in rates:
        # Encoders hold parameters the model never uses (SigLIP's pooling head): DDP must expect them.
        training.setdefault("ddp_find_unused_parameters", True)
    try:
        args = TrainingArguments(**training_arguments_fields(training))
    except TypeError as e:  # an unknown key
        raise ValueError(f"config section 'training' (TrainingArguments): {e}") from e
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != args.world_size:
        raise ValueError(
            f"launched as {launched} processes but the Trainer sees {args.world_size} (on CPU, set "
            "training.use_cpu: true): each process would train its own copy into the same output_dir"
        )

    # The seed makes the new parameters (projector, cross-attention, resized embedding rows) the same on every
    # rank and every run. Under ZeRO-3 (TrainingArguments made above) the model is built partitioned, inside
    # deepspeed.zero.Init, from a slow-fast checkpoint and from a base LLM + encoder alike (build_model).
    set_seed(args.seed)
    if is_deepspeed_zero3_enabled():  # zero.Init reads the world size from deepspeed.comm, which
        import deepspeed  # accelerate sets up only on accelerators (not under use_cpu)

        deepspeed.init_distributed()
    model, processor = build_model(config.model, seed=args.seed)
    set_trainable(model, rates)

    records, skipped = read_records(config.data, processor)
    num_records = len(records) + len(skipped)
    if args.should_log:
        for sample in skipped:
            logger.warning("left out sample %s (%s): %s", sample.id, sample.where, sample.reason)
        logger.info("%d of %d records are usable", len(records), num_records)
    if not records or len(skipped) > config.data.max_bad_sample_fraction * num_records:
        first = f"; first: {skipped[0].where}: {skipped[0].reason}" if skipped else ""
        raise TooManyBadSamples(
            f"{len(skipped)} of {num_records} records are unusable "
            f"(max_bad_sample_fraction={config.data.max_bad_sample_fraction}){first}"
        )
    return SlowFastTrainer(
        model=model,
        args=args,
        train_dataset=ConversationDataset(records, processor, config.data),
        data_collator=Collator(pad_token_id=processor.tokenizer.pad_token_id),
        processing_class=processor,
        callbacks=callbacks,
        rates=rates,
        num_records=num_records,
        skipped=len(skipped),
        max_bad_sample_fraction=config.data.max_bad_sample_fraction,
        group_by_length=config.data.group_by_length,
    )


def train(config: TrainConfig, callbacks: list[TrainerCallback] | None = None) -> SlowFastTrainer:
    """Train (resuming from the newest complete checkpoint when `config.resume`), then save the final model."""
    trainer = build_trainer(config, callbacks)
    checkpoint = last_complete_checkpoint(trainer.args.output_dir) if config.resume else None
    if checkpoint is not None:
        with open(os.path.join(checkpoint, COMPLETE_MARKER)) as f:
            trainer.skipped_where = set(json.load(f).get("skipped_where", ()))
        trainer.skipped = trainer.prevalidated + len(trainer.skipped_where)
        logger.info("resuming from %s", checkpoint)
        allow_indexed_cpu_map_location()
    trainer.train(resume_from_checkpoint=checkpoint)
    if config.model.lora is not None:
        merge_lora(trainer.model)
    trainer.save_final_model()
    return trainer


def leave_worker(code: int) -> NoReturn:
    """End a torchrun worker with `code`: destroy its process group, run the interpreter's exit handlers
    (logging, experiment trackers), flush, and exit without the C++ teardown.

    Why not a plain return: some C++ owner keeps gloo's groups, with their threads, alive after
    `destroy_process_group()` (BENCHMARKS.md, "Training: host memory per process"), and destroying them in
    the interpreter's teardown races with it: now and then a rank aborts there ("terminate called without
    an active exception", SIGABRT) after everything was saved. Seen under ZeRO-3 on gloo, in CI.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code = None
    try:
        train(load_train_config(args.config, args.overrides))
        code = 0
    except (OSError, ValueError, TooManyBadSamples) as error:  # a bad config or data, an engine refused
        print(f"slowfast-vlm train: {args.config}: {error}", file=sys.stderr)
        code = 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if code is None:  # an unexpected error, raised on with its traceback: leave no group behind
                torch.distributed.destroy_process_group()
            else:
                leave_worker(code)
    return code
