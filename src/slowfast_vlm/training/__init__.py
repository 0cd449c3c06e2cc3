"""Training slow-fast models: LLaVA-style data, stage presets, the Trainer setup and the `train` CLI."""

from .build import COMPONENTS, STAGE_LEARNING_RATES, ModelConfig, build_model, learning_rates
from .data import Collator, ConversationDataset, DataConfig, ModalityGroupedSampler, read_records
from .runner import (
    SlowFastTrainer,
    TrainConfig,
    build_trainer,
    last_complete_checkpoint,
    load_train_config,
    train,
)

__all__ = [
    "COMPONENTS",
    "STAGE_LEARNING_RATES",
    "Collator",
    "ConversationDataset",
    "DataConfig",
    "ModalityGroupedSampler",
    "ModelConfig",
    "SlowFastTrainer",
    "TrainConfig",
    "build_model",
    "build_trainer",
    "last_complete_checkpoint",
    "learning_rates",
    "load_train_config",
    "read_records",
    "train",
]
