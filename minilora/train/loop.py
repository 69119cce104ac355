"""The training loop: a plain PyTorch loop, readable top to bottom.

AdamW (torch or bitsandbytes 8-bit/paged), warmup + constant/linear/cosine schedule, gradient accumulation,
clipping, bf16 autocast (or fp16 with loss scaling), periodic eval, JSONL metrics, atomic resumable
checkpoints (minilora/train/checkpoints.py), and DDP under torchrun.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import random
import time
from contextlib import nullcontext, suppress
from functools import partial, wraps
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from minilora.data.collate import IGNORE_INDEX, Collator
from minilora.device import resolve_device
from minilora.models.gradient_checkpointing import enable_gradient_checkpointing
from minilora.train.checkpoints import (TrainState, data_fingerprint, find_checkpoint, load_trainable_weights,
                                        load_trainer_state, read_tree, remove_unfinished_checkpoints, save_checkpoint,
                                        set_rng_state)
from minilora.train.config import TrainConfig
from minilora.train.optim import build_optimizer, lr_factor
from minilora.train.output_lock import output_dir_lock
from minilora.train.plot import plot_metrics


def seed_everything(seed: int) -> None:
    """Seed python's `random`, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _holding_output_dir(train_fn: Callable) -> Callable:
    """Run `train_fn` holding config.output_dir's lock (rank 0; the other ranks write nothing), after removing
    checkpoint folders a killed save left half-written."""
    @wraps(train_fn)
    def wrapper(*args, **kwargs):
        config = inspect.signature(train_fn).bind(*args, **kwargs).arguments.get("config") or TrainConfig()
        if not isinstance(config, TrainConfig):
            raise TypeError(f"train: config must be a minilora.TrainConfig, got {type(config).__name__}")
        if int(os.environ.get("RANK", "0")) != 0:
            return train_fn(*args, **kwargs)
        with output_dir_lock(Path(config.output_dir)):
            remove_unfinished_checkpoints(Path(config.output_dir))
            return train_fn(*args, **kwargs)
    return wrapper


@_holding_output_dir
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
    out_dir = Path(config.output_dir)  # created by _holding_output_dir on rank 0
    seed_everything(config.seed)
    collate_fn = collate_fn or Collator(pad_token_id=getattr(getattr(model, "config", None), "pad_token_id", 0) or 0)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.to(device)

    state, checkpoint = TrainState(num_examples=len(train_data), data_fingerprint=data_fingerprint(train_data)), None
    if resume_from:
        checkpoint = find_checkpoint(resume_from, out_dir)
        state = load_trainer_state(checkpoint, config, world, len(train_data), state.data_fingerprint)
        load_trainable_weights(model, checkpoint)
    ddp_model = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=config.ddp_find_unused_parameters)
    optimizer = build_optimizer(model, config)
    scaler = _grad_scaler(model, config, device, state)
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

    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=state.global_step, desc="train", dynamic_ncols=True,
               disable=not config.progress_bar or rank != 0)
    start_time = last_log_time = time.perf_counter()
    start_step, start_samples = state.global_step, state.samples_seen
    log_loss, log_steps, log_tokens = 0.0, 0, 0
    last_eval_step, last_save_step = -1, state.global_step if checkpoint else -1
    eval_metrics: dict[str, float] = {}
    autocast = torch.autocast(device_type=device.type, dtype=torch.float16 if config.fp16 else torch.bfloat16,
                              enabled=config.bf16 or config.fp16)
    run_eval = partial(evaluate, model, eval_data, batch_size=config.eval_batch_size or config.batch_size,
                       collate_fn=collate_fn, compute_metrics=compute_metrics, bf16=config.bf16, fp16=config.fp16)

    ddp_model.train()
    while state.global_step < total_steps:
        groups = _epoch_groups(len(train_data), state.epoch, config, rank, world)
        for group in groups[state.step_in_epoch:]:
            micro_batches = [[train_data[j] for j in indices] for indices in group]
            totals = _forward_backward(ddp_model, model, micro_batches, collate_fn, device, autocast, world, scaler)
            loss_sum, targets, tokens, samples = totals.tolist()
            step_loss = loss_sum / targets  # the mean over every label token (or example) of the global batch
            scaler.unscale_(optimizer)  # fp16: the true gradients, before clipping
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       config.max_grad_norm or float("inf")).item()
            # fp16: inf/NaN gradients mean the loss scale was too high; GradScaler skips the update, lowers it
            if not math.isfinite(step_loss) or not (math.isfinite(grad_norm) or config.fp16):
                last = f"{out_dir}/checkpoint-{last_save_step}" if last_save_step > 0 else "none saved yet"
                raise FloatingPointError(
                    f"training diverged at step {state.global_step + 1} (epoch {state.epoch}): loss={step_loss}, "
                    f"grad_norm={grad_norm}; stopped before the optimizer update. Last good checkpoint: {last}. "
                    "Try a lower learning_rate, warmup, max_grad_norm, or bf16 instead of fp16 weights.")
            lr = config.learning_rate * lr_factor(state.global_step, total_steps, warmup, config.lr_scheduler)
            for g in optimizer.param_groups:
                g["lr"] = lr
            scaler.step(optimizer)  # optimizer.step(), unless fp16 gradients overflowed
            scaler.update()
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
                          "grad_norm": grad_norm if math.isfinite(grad_norm) else None,  # None: an fp16 skip
                          "tokens_per_s": log_tokens / max(now - last_log_time, 1e-9)}
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
                state.grad_scaler = scaler.state_dict() or None  # fp16: the resumed run scales alike
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
               "total_flos": 6 * sum(p.numel() for p in model.parameters()) * state.tokens_seen, **eval_metrics}
    if rank == 0 and config.plot and metrics_file.is_file():
        with suppress(ImportError):  # matplotlib is an optional extra
            plot_metrics(metrics_file, out_dir / "loss.png")
    if created_group:
        # Every rank done (rank 0 writes the files above) before any tears down: gloo aborts a process whose
        # peer closes the connection while its own threads still use it ("terminate called without an
        # active exception", ~1 run in 10 without this).
        dist.barrier()
        dist.destroy_process_group()
    return summary


@torch.no_grad()
def evaluate(model: nn.Module, data: Sequence[dict], *, batch_size: int = 8, collate_fn: Callable | None = None,
             compute_metrics: Callable | None = None, bf16: bool = False, fp16: bool = False) -> dict[str, float]:
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
        with torch.autocast(device_type=device.type, dtype=torch.float16 if fp16 else torch.bfloat16,
                            enabled=bf16 or fp16):
            out = model(**batch)
        loss, targets = _field(out, "loss"), loss_targets(model, batch)
        if loss is not None and targets:
            loss_sum, count = loss_sum + loss.float().item() * targets, count + targets
        for name in ("logits", "start_logits", "end_logits") if compute_metrics is not None else ():
            value = _field(out, name)
            if value is not None:
                outputs.setdefault(name, {}).update(
                    {i: _unpad(value[row].float().cpu().numpy(), data[i], batch) for row, i in enumerate(chunk)})
    model.train(was_training)

    totals = _all_reduce_sum(torch.tensor([loss_sum, count], dtype=torch.float64), device, world)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, outputs)
        outputs = {name: {i: a for part in gathered for i, a in part.get(name, {}).items()} for name in outputs}
    metrics = {"eval_loss": totals[0].item() / totals[1].item()} if totals[1] > 0 else {}
    if compute_metrics is not None:
        predictions = {name: [rows[i] for i in range(len(data))] for name, rows in outputs.items()}
        for key, value in compute_metrics(predictions, data).items():
            metrics[key if key.startswith("eval_") else f"eval_{key}"] = value
    return metrics


# --- helpers: devices, data order, loss weighting, metrics.jsonl -------------------------------------------------

def _setup_distributed(config: TrainConfig) -> tuple[torch.device, int, int, bool]:
    """(device, rank, world_size, whether we created the process group). torchrun sets WORLD_SIZE etc."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(config.device)
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
    order = (torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + epoch)).tolist()
             if config.shuffle else list(range(n)))
    if world > 1:
        order += order[:math.ceil(n / world) * world - n]
        order = order[rank::world]
    batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    k = config.gradient_accumulation_steps
    return [batches[i:i + k] for i in range(0, len(batches), k)]


def _grad_scaler(model: nn.Module, config: TrainConfig, device: torch.device, state: TrainState
                 ) -> torch.amp.GradScaler:
    """fp16's loss scaling (a no-op object otherwise), restored from a checkpoint's state."""
    half = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
    if config.fp16 and half:
        raise ValueError(f"TrainConfig.fp16 computes in fp16 but updates fp32 parameters; these trainable "
                         f"parameters are float16: {half[:5]}. Keep them in fp32 (LoRA factors are), or use bf16")
    scaler = torch.amp.GradScaler(device.type, enabled=config.fp16)
    if config.fp16 and state.grad_scaler:
        scaler.load_state_dict(state.grad_scaler)
    return scaler


def _forward_backward(ddp_model: nn.Module, model: nn.Module, micro_batches: list[list[dict]], collate_fn: Callable,
                      device: torch.device, autocast, world: int, scaler: torch.amp.GradScaler) -> torch.Tensor:
    """Accumulate the gradients of one optimizer step; returns [loss sum, targets, tokens, samples] over all ranks.

    The step's loss is the mean over every target (label token, or example: `loss_targets`) of every
    micro-batch on every rank, as one process with the global batch would compute it: each micro-batch's
    mean loss is weighted by its share of the step's targets, counted before any forward. DDP averages
    gradients over ranks, hence the factor `world`. Gradients are all-reduced on the last micro-batch only.
    """
    batches = [collate_fn(features) for features in micro_batches]
    counts = [loss_targets(model, batch) for batch in batches]  # on the CPU, before any forward
    total = _all_reduce_sum(torch.tensor([float(sum(counts))], dtype=torch.float64), device, world).item()
    if total == 0:
        raise ValueError("an optimizer step has no label token to learn (every label is -100): check the data")
    totals = torch.zeros(4, dtype=torch.float64)
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
                scaler.scale(loss * (count * world / total)).backward()  # scale: fp16 only
            else:  # a mean over no token is NaN; still touch every parameter so DDP's all-reduce runs
                sum(p.sum() for p in model.parameters() if p.requires_grad).mul(0.0).backward()
        totals += torch.tensor([loss.item() * count if count else 0.0, 0.0, _count_tokens(batch),
                                len(micro_batches[i])], dtype=torch.float64)
    totals = _all_reduce_sum(totals, device, world)
    totals[1] = total
    return totals


def _all_reduce_sum(values: torch.Tensor, device: torch.device, world: int) -> torch.Tensor:
    """The sum over all ranks of a small host tensor of counts and sums (float64: exact; on the host: MPS has no
    float64). NCCL reduces only tensors on the GPU, so there it travels through `device`."""
    if world == 1:
        return values
    on_backend = values.to(device) if dist.get_backend() == "nccl" else values
    dist.all_reduce(on_backend)
    return on_backend.cpu()


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
    """Start metrics.jsonl afresh, keeping (on resume) the records up to the resumed step. A last line torn by a
    kill in the middle of a write is dropped; a corrupt earlier line is an error naming it."""
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() and keep_up_to else ""
    lines = text.rstrip().splitlines()  # the last line is the one a kill may have torn
    kept = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON metrics record ({e})") from None
        if isinstance(record, dict) and record.get("step", 0) <= keep_up_to:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
