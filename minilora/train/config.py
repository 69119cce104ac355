"""TrainConfig: every option of `train`, checked before anything runs."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch

from minilora.checks import check_fields, check_number

OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    """Everything `train` needs besides the model and data. Batch sizes are per process (per GPU)."""
    output_dir: str = "out"
    num_epochs: int = 1
    max_steps: int = -1  # > 0: stop after this many optimizer steps (overrides num_epochs)
    batch_size: int = 8
    eval_batch_size: int | None = None  # default: batch_size
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0  # applied to matrices only, never to biases / norms / other 1-D params
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    optim: str = "adamw_torch"  # one of OPTIMIZERS
    lr_scheduler: str = "linear"  # one of SCHEDULES, all with linear warmup from 0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps == 0: ceil(ratio * total steps)
    max_grad_norm: float | None = 1.0  # None or 0: no clipping (the norm is still logged)
    bf16: bool = False  # bfloat16 autocast for forward passes
    fp16: bool = False  # float16 autocast with loss scaling (torch.amp.GradScaler), for GPUs without bf16
    gradient_checkpointing: bool = False
    seed: int = 42  # python, numpy, torch and the data order
    shuffle: bool = True
    logging_steps: int = 10
    eval_steps: int | None = None  # None: evaluate at the end only
    save_steps: int | None = None  # None: no checkpoints
    save_total_limit: int | None = None  # keep only the newest N checkpoints
    resume_from: str | None = None  # a checkpoint folder or "latest" (newest in output_dir)
    progress_bar: bool = True
    plot: bool = True  # write output_dir/loss.png at the end when matplotlib is installed
    device: str | None = None  # None: cuda if available, else cpu; a bare cuda is cuda:LOCAL_RANK under torchrun
    ddp_find_unused_parameters: bool = False

    def __post_init__(self):
        validate_train_config(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise KeyError(f"TrainConfig has no fields {sorted(unknown)}")
        return cls(**d)


def validate_train_config(config: TrainConfig) -> None:
    """Every field's type and range, so a bad value fails here and not deep inside torch after output_dir was
    written. Paths are kept as strings (train_config.json is JSON)."""
    for name in ("output_dir", "resume_from"):
        if isinstance(getattr(config, name), os.PathLike):
            setattr(config, name, os.fspath(getattr(config, name)))
    if isinstance(config.device, torch.device):
        config.device = str(config.device)
    check_fields(config, "TrainConfig")
    if config.bf16 and config.fp16:
        raise ValueError("TrainConfig: bf16 and fp16 are exclusive (bf16 needs no loss scaling: prefer it)")
    if config.optim not in OPTIMIZERS:
        raise ValueError(f"TrainConfig.optim must be one of {OPTIMIZERS}, got {config.optim!r}")
    if config.lr_scheduler not in SCHEDULES:
        raise ValueError(f"TrainConfig.lr_scheduler must be one of {SCHEDULES}, got {config.lr_scheduler!r}")
    for name in ("num_epochs", "batch_size", "gradient_accumulation_steps", "logging_steps"):
        check_number(getattr(config, name), f"TrainConfig.{name}", low=1, integer=True)
    for name in ("eval_steps", "save_steps", "save_total_limit", "eval_batch_size"):
        check_number(getattr(config, name), f"TrainConfig.{name}", low=1, integer=True, or_none=True)
    check_number(config.learning_rate, "TrainConfig.learning_rate", low=0, low_open=True)
    check_number(config.weight_decay, "TrainConfig.weight_decay", low=0)
    for name in ("adam_beta1", "adam_beta2"):
        check_number(getattr(config, name), f"TrainConfig.{name}", low=0, high=1, high_open=True)
    check_number(config.adam_epsilon, "TrainConfig.adam_epsilon", low=0)
    check_number(config.warmup_steps, "TrainConfig.warmup_steps", low=0, integer=True)
    check_number(config.warmup_ratio, "TrainConfig.warmup_ratio", low=0, high=1, high_open=True)
    check_number(config.max_grad_norm, "TrainConfig.max_grad_norm", low=0, or_none=True)
    check_number(config.seed, "TrainConfig.seed", low=0, high=2**32 - 1, integer=True)  # numpy's seed range
    if config.device is not None:
        try:
            torch.device(config.device)
        except RuntimeError as e:
            raise ValueError(f"TrainConfig.device: {config.device!r} is not a torch device ({e})") from None
