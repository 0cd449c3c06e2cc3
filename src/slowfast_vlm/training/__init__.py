"""Training slow-fast models: LLaVA-style data, stage presets, the Trainer setup and the `train` CLI."""

from .build import COMPONENTS, PRESETS, ModelConfig, build_model, learning_rates
from .data import Collator, ConversationDataset, DataConfig, ModalityGroupedSampler, read_records
from .runner import SlowFastTrainer, TrainConfig, build_trainer, last_complete_checkpoint, load_config, train

__all__ = [
    "COMPONENTS",
    "PRESETS",
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
    "load_config",
    "read_records",
    "train",
]
