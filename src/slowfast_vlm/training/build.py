"""Building a model to train: from a base LLM + vision encoder, or from a slow-fast checkpoint;
which components train, at which learning rate (stage presets); optional LoRA on the LLM.

Components (every parameter belongs to exactly one):

    vision           model.vision_tower.*
    projector        model.multi_modal_projector.*
    cross_attention  the parameters the hybrid layers add (`cross_attention_parameters`)
    llm              everything else: embeddings, decoder layers, final norm, lm_head
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AddedToken, AutoProcessor, AutoTokenizer

from ..modeling.hybrid import cross_attention_parameters
from ..modeling.model import SlowFastForConditionalGeneration
from ..processing.processor import SlowFastProcessor
from .base_models import build_from_base

COMPONENTS = ("llm", "vision", "projector", "cross_attention")
# Learning rate per trained component (architecture 1.6); a component not listed is frozen.
STAGE_LEARNING_RATES: dict[str, dict[str, float]] = {
    "stage1": {"projector": 1e-3, "cross_attention": 2e-4},
    "stage2": {"llm": 2e-5, "projector": 2e-5, "cross_attention": 2e-5},
    "custom": {},
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
# Prefixes that DDP / FSDP / activation checkpointing / torch.compile put into parameter names.
_WRAPPER_PREFIX = re.compile(r"(^|\.)(module|_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


@dataclass
class ModelConfig:
    """Where the model comes from.

    Args:
        init_from: a slow-fast checkpoint (directory or hub id) to continue from; else `llm` + `vision`.
        llm: base causal LM (hub id or path), loaded with `AutoModelForCausalLM`.
        vision: vision encoder (hub id or path) loaded with `AutoModel`; for a two-tower model
            (SigLIP, CLIP) its vision tower is used.
        tokenizer: tokenizer to use (default: the one of `init_from` / `llm`).
        dtype: dtype of the weights ("float32", or "bfloat16" under DeepSpeed, which keeps fp32 master weights).
        attn_implementation: "sdpa", "eager" or "flash_attention_2".
        slowfast: `SlowFastConfig` knobs for a new model (e.g. `hybrid_every_n_layers: 8`).
        lora: LoRA on the LLM's linear layers, e.g. `{r: 16, lora_alpha: 32, lora_dropout: 0.05}` (needs peft).
    """

    init_from: str | None = None
    llm: str | None = None
    vision: str | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    slowfast: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] | None = None


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"model.dtype must be a torch dtype name such as 'bfloat16', got {name!r}")
    return dtype


def build_model(
    config: ModelConfig, seed: int = 0
) -> tuple[SlowFastForConditionalGeneration, SlowFastProcessor]:
    """The model to train and its processor (tokenizer with ChatML and placeholder tokens, embeddings resized);
    a new model's new parameters are drawn from `seed`."""
    dtype = _torch_dtype(config.dtype)
    if config.init_from:
        model = SlowFastForConditionalGeneration.from_pretrained(
            config.init_from, dtype=dtype, attn_implementation=config.attn_implementation
        )
        processor = None
        if config.tokenizer is None:
            try:
                processor = AutoProcessor.from_pretrained(config.init_from)
            except (OSError, ValueError):  # a checkpoint saved without its processor
                pass
        if not isinstance(processor, SlowFastProcessor):
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.init_from)
            processor = SlowFastProcessor.from_model_config(model.config, _with_chatml(tokenizer))
    else:
        if not (config.llm and config.vision):
            raise ValueError("model: give init_from (a slow-fast checkpoint) or both llm and vision")
        # partitioned under ZeRO-3, memory-mapped otherwise; new parameters drawn from `seed` (base_models)
        model = build_from_base(
            config.llm, config.vision, config.slowfast, dtype, config.attn_implementation, seed
        )
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.llm)
        processor = SlowFastProcessor.from_model_config(model.config, _with_chatml(tokenizer))
    # transformers' ZeRO-3 loader keeps its load-time renamings for save_pretrained, which would reverse them
    # (model.language_model.* saved as model.language_model.model.*); the other loaders keep none
    if getattr(model, "_weight_conversions", None):
        model._weight_conversions = []
    processor.prepare_model(model)
    if config.lora is not None:
        add_lora(model, config.lora)
    return model, processor


def _with_chatml(tokenizer):
    """Training text is ChatML: add `<|im_start|>` / `<|im_end|>` to tokenizers that lack them."""
    missing = [t for t in CHATML_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or "<|im_end|>"
    return tokenizer


# ----- components, presets, parameter groups ---------------------------------------------------------
def component_of(name: str, cross_names: set[str]) -> str:
    """The component a parameter name belongs to (wrapper prefixes are ignored)."""
    name = _WRAPPER_PREFIX.sub(r"\1", name)
    if name in cross_names:
        return "cross_attention"
    if name.startswith("model.vision_tower."):
        return "vision"
    if name.startswith("model.multi_modal_projector."):
        return "projector"
    return "llm"


def component_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every `(name, parameter)` of `model`, by component."""
    cross = {_WRAPPER_PREFIX.sub(r"\1", name) for name, _ in cross_attention_parameters(model)}
    components: dict[str, list[tuple[str, nn.Parameter]]] = {c: [] for c in COMPONENTS}
    for name, param in model.named_parameters():
        components[component_of(name, cross)].append((name, param))
    return components


def learning_rates(stage: str, overrides: dict[str, float | None] | None = None) -> dict[str, float]:
    """Learning rate of each trained component: the preset of `stage`, updated by `overrides`
    (a component mapped to `None` is frozen)."""
    if stage not in STAGE_LEARNING_RATES:
        raise ValueError(f"stage must be one of {list(STAGE_LEARNING_RATES)}, got {stage!r}")
    rates: dict[str, float | None] = {**STAGE_LEARNING_RATES[stage], **(overrides or {})}
    unknown = set(rates) - set(COMPONENTS)
    if unknown:
        raise ValueError(
            f"learning_rates: unknown component(s) {sorted(unknown)}; components are {COMPONENTS}"
        )
    rates = {c: float(lr) for c, lr in rates.items() if lr is not None}
    if not rates:
        raise ValueError(
            f"stage {stage!r}: no component is trained; set learning_rates, e.g. {{projector: 1e-3}}"
        )
    return rates


def set_trainable(model: nn.Module, rates: dict[str, float]) -> None:
    """`requires_grad` on exactly the parameters of the components in `rates` (with LoRA: the LLM's adapters)."""
    has_lora = any("lora_" in name for name, _ in model.named_parameters())
    for component, params in component_parameters(model).items():
        for name, param in params:
            trains = component in rates
            if component == "llm" and has_lora:
                trains = trains and "lora_" in name
            param.requires_grad_(trains)


def parameter_groups(
    model: nn.Module, rates: dict[str, float], weight_decay: float, decay_names: set[str]
) -> list[dict[str, Any]]:
    """Optimizer groups: per trained component, one group with weight decay and one without."""
    groups = []
    for component, params in component_parameters(model).items():
        if component not in rates:
            continue
        trained = [(name, p) for name, p in params if p.requires_grad]
        for decay in (True, False):
            group = [p for name, p in trained if (name in decay_names) == decay]
            if group:
                groups.append(
                    {
                        "params": group,
                        "lr": rates[component],
                        "weight_decay": weight_decay if decay else 0.0,
                        "component": component,
                    }
                )
    return groups


# ----- LoRA ------------------------------------------------------------------------------------------
def add_lora(model: SlowFastForConditionalGeneration, lora: dict[str, Any]) -> None:
    """Inject LoRA adapters into the LLM's linear layers in place (the cross-attention branch is untouched)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ImportError("model.lora needs peft: pip install peft") from e
    options = {"target_modules": LORA_TARGETS, **lora}
    inject_adapter_in_model(LoraConfig(**options), model.model.language_model)


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold the LoRA adapters into their base weights and remove them: a plain slow-fast model again."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
