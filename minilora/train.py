"""The training loop: a plain PyTorch loop, readable top to bottom.

AdamW (torch or bitsandbytes 8-bit/paged), warmup + constant/linear/cosine schedule, gradient accumulation,
clipping, bf16 autocast, periodic eval, JSONL metrics, atomic resumable checkpoints, and DDP under torchrun.

Checkpoints (what they hold, how they are written) live in minilora/resume.py.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .checkpointing import enable_gradient_checkpointing
from .data.collate import IGNORE_INDEX, Collator
from .plot import plot_metrics
from .resume import (TrainState, find_checkpoint, load_trainable_weights, load_trainer_state, read_tree,
                     save_checkpoint, set_rng_state)

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
    device: str | None = None  # default: cuda if available (cuda:LOCAL_RANK under torchrun), else cpu
    ddp_find_unused_parameters: bool = False

    def __post_init__(self):
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optim must be one of {OPTIMIZERS}, got {self.optim!r}")
        if self.lr_scheduler not in SCHEDULES:
            raise ValueError(f"TrainConfig.lr_scheduler must be one of {SCHEDULES}, got {self.lr_scheduler!r}")
        for name in ("num_epochs", "batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_steps", "save_steps", "save_total_limit", "eval_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be None or >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0 or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig: warmup_steps must be >= 0 and warmup_ratio in [0, 1), got "
                             f"{self.warmup_steps} and {self.warmup_ratio}")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise KeyError(f"TrainConfig has no fields {sorted(unknown)}")
        return cls(**d)


def seed_everything(seed: int) -> None:
    """Seed python's `random`, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def train(model: nn.Module, train_data: Sequence[dict], config: TrainConfig | None = None,
          eval_data: Sequence[dict] | None = None, *, collate_fn: Callable | None = None,
          compute_metrics: Callable | None = None, resume_from: str | None = None) -> dict[str, Any]:
    """Train `model` on `train_data` (a list-like of feature dicts) and return a summary dict.

    Each batch (`collate_fn` of a list of features, default `Collator`) is passed as `model(**batch)`,
    which must return an object with `.loss`. Only parameters with requires_grad are trained. Under
    torchrun each process trains on its shard of every global batch (DDP); only rank 0 writes files.
    `compute_metrics(predictions, eval_data) -> dict` adds metrics to each eval (see `evaluate`).
    `resume_from` (or config.resume_from) is a checkpoint folder or "latest".

    The summary has global_step, epoch, train_loss (mean of the per-step losses), train_runtime (s),
    train_steps_per_second, train_samples_per_second, total_flos and the final eval metrics.
    total_flos is the usual estimate 6 * N_params * tokens trained on (forward + backward of a dense
    model), with tokens counted from attention masks (padding excluded).
    """
    config = config or TrainConfig()
    resume_from = resume_from or config.resume_from
    if len(train_data) == 0:
        raise ValueError("train: train_data is empty")
    device, rank, world, created_group = _setup_distributed(config)
    out_dir = Path(config.output_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    collate_fn = collate_fn or Collator(pad_token_id=getattr(getattr(model, "config", None), "pad_token_id", 0) or 0)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.to(device)

    state, checkpoint = TrainState(num_examples=len(train_data)), None
    if resume_from:
        checkpoint = find_checkpoint(resume_from, out_dir)
        state = load_trainer_state(checkpoint, config, world, len(train_data))
        load_trainable_weights(model, checkpoint)
    ddp_model = model
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=config.ddp_find_unused_parameters)
    optimizer = build_optimizer(model, config)
    if checkpoint:
        optimizer.load_state_dict(read_tree(checkpoint / "optimizer"))
        set_rng_state(read_tree(checkpoint / f"rng_state_{rank}"))

    batches_per_epoch = math.ceil(math.ceil(len(train_data) / world) / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    total_steps = config.max_steps if config.max_steps > 0 else config.num_epochs * steps_per_epoch
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    metrics_file = out_dir / "metrics.jsonl"
    if rank == 0:
        _trim_metrics(metrics_file, keep_up_to=state.global_step)
    n_params = sum(p.numel() for p in model.parameters())

    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=state.global_step, desc="train", dynamic_ncols=True,
               disable=not config.progress_bar or rank != 0)
    start_time = last_log_time = time.perf_counter()
    start_step, start_samples = state.global_step, state.samples_seen
    log_loss, log_steps, log_tokens = 0.0, 0, 0
    last_eval_step, last_save_step = -1, state.global_step if checkpoint else -1
    eval_metrics: dict[str, float] = {}
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=config.bf16)
    run_eval = partial(evaluate, model, eval_data, batch_size=config.eval_batch_size or config.batch_size,
                       collate_fn=collate_fn, compute_metrics=compute_metrics, bf16=config.bf16)

    ddp_model.train()
    while state.global_step < total_steps:
        groups = _epoch_groups(len(train_data), state.epoch, config, rank, world)
        for group in groups[state.step_in_epoch:]:
            micro_batches = [[train_data[j] for j in indices] for indices in group]
            totals = _forward_backward(ddp_model, model, micro_batches, collate_fn, device, autocast, world)
            loss_sum, targets, tokens, samples = totals.tolist()
            step_loss = loss_sum / targets  # the mean over every label token (or example) of the global batch
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       config.max_grad_norm or float("inf")).item()
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                last = f"{out_dir}/checkpoint-{last_save_step}" if last_save_step > 0 else "none saved yet"
                raise FloatingPointError(
                    f"training diverged at step {state.global_step + 1} (epoch {state.epoch}): loss={step_loss}, "
                    f"grad_norm={grad_norm}; stopped before the optimizer update. Last good checkpoint: {last}. "
                    "Try a lower learning_rate, warmup, max_grad_norm, or bf16 instead of fp16 weights.")
            lr = config.learning_rate * lr_factor(state.global_step, total_steps, warmup, config.lr_scheduler)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            state.global_step += 1
            state.step_in_epoch += 1
            if state.step_in_epoch == len(groups):
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            state.loss_sum += step_loss
            state.tokens_seen += int(tokens)
            state.samples_seen += int(samples)
            log_loss, log_steps, log_tokens = log_loss + step_loss, log_steps + 1, log_tokens + int(tokens)
            bar.update(1)
            epoch_float = round(state.global_step / steps_per_epoch, 4)
            done = state.global_step >= total_steps

            if state.global_step % config.logging_steps == 0 or done:
                now = time.perf_counter()
                record = {"step": state.global_step, "epoch": epoch_float, "loss": log_loss / log_steps, "lr": lr,
                          "grad_norm": grad_norm, "tokens_per_s": log_tokens / max(now - last_log_time, 1e-9)}
                if rank == 0:
                    _append_jsonl(metrics_file, record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                log_loss, log_steps, log_tokens, last_log_time = 0.0, 0, 0, now
            if eval_data is not None and (done or config.eval_steps and state.global_step % config.eval_steps == 0):
                eval_metrics = run_eval()
                last_eval_step = state.global_step
                if rank == 0:
                    _append_jsonl(metrics_file, {"step": state.global_step, "epoch": epoch_float, **eval_metrics})
                ddp_model.train()
            if config.save_steps and (done or state.global_step % config.save_steps == 0):
                save_checkpoint(model, optimizer, state, config, rank, world)
                last_save_step = state.global_step
            if done:
                break
    bar.close()

    if eval_data is not None and last_eval_step != state.global_step:  # resumed at the very end
        eval_metrics = run_eval()
    runtime = time.perf_counter() - start_time
    summary = {"global_step": state.global_step, "epoch": round(state.global_step / steps_per_epoch, 4),
               "train_loss": state.loss_sum / max(state.global_step, 1), "train_runtime": runtime,
               "train_steps_per_second": (state.global_step - start_step) / runtime,
               "train_samples_per_second": (state.samples_seen - start_samples) / runtime,
               "total_flos": 6 * n_params * state.tokens_seen, **eval_metrics}
    if rank == 0 and config.plot and metrics_file.is_file():
        try:
            plot_metrics(metrics_file, out_dir / "loss.png")
        except ImportError:
            pass  # matplotlib is an optional extra
    if created_group:
        dist.destroy_process_group()
    return summary


@torch.no_grad()
def evaluate(model: nn.Module, data: Sequence[dict], *, batch_size: int = 8, collate_fn: Callable | None = None,
             compute_metrics: Callable | None = None, bf16: bool = False) -> dict[str, float]:
    """{"eval_loss": ..., **eval_<metric>} of `model` on `data`.

    eval_loss is the mean over every target of `data` (label tokens for language models, examples for
    classification and QA; see `loss_targets`), so exp(eval_loss) is the perplexity of the whole set.

    `compute_metrics(predictions, data)` receives, for each output the model returns among logits /
    start_logits / end_logits, a list with one float32 numpy array per example of `data` (in order), with
    padding removed along the sequence axis when it matches input_ids. Its keys get an "eval_" prefix.
    Under DDP each process evaluates a shard; losses and predictions are combined across processes.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    collate_fn = collate_fn or Collator()
    was_training = model.training
    model.eval()
    indices = list(range(rank, len(data), world))
    loss_sum, count, outputs = 0.0, 0, {}
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_fn([data[i] for i in chunk]).items()}
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(**batch)
        loss, targets = _field(out, "loss"), loss_targets(model, batch)
        if loss is not None and targets:
            loss_sum, count = loss_sum + loss.float().item() * targets, count + targets
        if compute_metrics is not None:
            for name in ("logits", "start_logits", "end_logits"):
                value = _field(out, name)
                if value is not None:
                    rows = outputs.setdefault(name, {})
                    for row, i in enumerate(chunk):
                        rows[i] = _unpad(value[row].float().cpu().numpy(), data[i], batch)
    model.train(was_training)

    totals = torch.tensor([loss_sum, count], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(totals)
        gathered = [None] * world
        dist.all_gather_object(gathered, outputs)
        outputs = {name: {i: a for part in gathered for i, a in part.get(name, {}).items()} for name in outputs}
    metrics = {"eval_loss": totals[0].item() / totals[1].item()} if totals[1] > 0 else {}
    if compute_metrics is not None:
        predictions = {name: [rows[i] for i in range(len(data))] for name, rows in outputs.items()}
        for key, value in compute_metrics(predictions, data).items():
            metrics[key if key.startswith("eval_") else f"eval_{key}"] = value
    return metrics


# --- helpers: devices, data order, checkpoint files ----------------------------------------------------------

def _setup_distributed(config: TrainConfig) -> tuple[torch.device, int, int, bool]:
    """(device, rank, world_size, whether we created the process group). torchrun sets WORLD_SIZE etc."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1:
        return device, 0, 1, False
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size(), created


def _epoch_groups(n: int, epoch: int, config: TrainConfig, rank: int, world: int) -> list[list[list[int]]]:
    """This rank's micro-batches of `epoch`, grouped per optimizer step: [[indices, ...], ...].

    The order is a permutation seeded by (seed, epoch), so it can be rebuilt on resume. Under DDP the
    order is padded to a multiple of the world size and dealt out round-robin (DistributedSampler's rule),
    so the ranks' k-th micro-batches together form the k-th global batch.
    """
    order = list(range(n))
    if config.shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + epoch)).tolist()
    if world > 1:
        order += order[:math.ceil(n / world) * world - n]
        order = order[rank::world]
    batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    k = config.gradient_accumulation_steps
    return [batches[i:i + k] for i in range(0, len(batches), k)]


def _forward_backward(ddp_model: nn.Module, model: nn.Module, micro_batches: list[list[dict]], collate_fn: Callable,
                      device: torch.device, autocast, world: int) -> torch.Tensor:
    """Accumulate the gradients of one optimizer step; returns [loss sum, targets, tokens, samples] over all ranks.

    The step's loss is the mean over every target (label token, or example: `loss_targets`) of every
    micro-batch on every rank, as one process with the global batch would compute it: each micro-batch's
    mean loss is weighted by its share of the step's targets, counted before any forward. DDP averages
    gradients over ranks, hence the factor `world`. Gradients are all-reduced on the last micro-batch only.
    """
    batches = [collate_fn(features) for features in micro_batches]
    counts = [loss_targets(model, batch) for batch in batches]  # on the CPU, before any forward
    step_targets = torch.tensor(float(sum(counts)), dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(step_targets)
    total = step_targets.item()
    if total == 0:
        raise ValueError("an optimizer step has no label token to learn (every label is -100): check the data")
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for i, (batch, count) in enumerate(zip(batches, counts, strict=True)):
        batch = {k: v.to(device) for k, v in batch.items()}
        sync = world == 1 or i == len(batches) - 1
        with nullcontext() if sync else ddp_model.no_sync():
            with autocast:
                loss = _field(ddp_model(**batch), "loss")
            if loss is None:
                raise ValueError(f"the model returned no loss for a batch with keys {sorted(batch)}: "
                                 "training needs labels in the features")
            if count:
                (loss * (count * world / total)).backward()
            else:  # a mean over no token is NaN; still touch every parameter so DDP's all-reduce runs
                sum(p.sum() for p in model.parameters() if p.requires_grad).mul(0.0).backward()
        totals += torch.tensor([loss.item() * count if count else 0.0, 0.0, _count_tokens(batch),
                                len(micro_batches[i])], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(totals)
    totals[1] = total
    return totals


def loss_targets(model: nn.Module, batch: dict) -> int:
    """How many targets the model's mean loss over `batch` averages, known before the forward pass.

    Token losses, i.e. (batch, seq) integer `labels` of a model that says whether it is an encoder-decoder:
    the labels that are not -100, after the one-position shift of a decoder-only language model (the
    first label is never predicted) and without it for an encoder-decoder's decoder. Anything else
    (classification, regression, extractive QA, a model of your own): one target per example.
    """
    labels = batch.get("labels")
    is_encoder_decoder = getattr(model, "is_encoder_decoder", None)
    if labels is not None and labels.dim() == 2 and not labels.is_floating_point() and is_encoder_decoder is not None:
        return int((labels if is_encoder_decoder else labels[:, 1:]).ne(IGNORE_INDEX).sum())
    return len(next(iter(batch.values())))


def _count_tokens(batch: dict) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel() if "input_ids" in batch else 0


def _field(output: Any, name: str):
    return output.get(name) if isinstance(output, dict) else getattr(output, name, None)


def _unpad(array: np.ndarray, feature: dict, batch: dict) -> np.ndarray:
    ids = batch.get("input_ids")
    if ids is not None and array.ndim >= 1 and array.shape[0] == ids.shape[1] and "input_ids" in feature:
        return array[:len(feature["input_ids"])]
    return array


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _trim_metrics(path: Path, keep_up_to: int) -> None:
    """Start metrics.jsonl afresh, keeping (on resume) the records up to the resumed step."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() and keep_up_to else []
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= keep_up_to]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


