"""AdamW (torch, or bitsandbytes' 8-bit / paged variants) and the learning-rate schedules."""
from __future__ import annotations

import math

import torch
from torch import nn

from minilora.train.config import TrainConfig


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Learning-rate multiplier for optimizer step `step` (0-based); the same curves as transformers'
    get_scheduler: linear warmup from 0, then constant, linear decay to 0, or half-cosine decay to 0."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; weight decay on matrices only (not biases, norms, 1-D params)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (requires_grad=True): "
                         "apply LoRA (ml.apply_lora) or unfreeze some parameters")
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    if config.optim == "adamw_torch":
        fusable = all(p.is_floating_point() and p.device.type in ("cuda", "cpu") for p in trainable)
        return torch.optim.AdamW(groups, **kwargs, fused=fusable, foreach=None if fusable else True)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[config.optim]
    return cls(groups, **kwargs)
