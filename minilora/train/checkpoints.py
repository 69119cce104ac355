"""Resumable training checkpoints: `output_dir/checkpoint-{step}/`, written atomically, no pickle.

A checkpoint folder holds:
    adapter_config.json + adapter_model.safetensors   the LoRA adapter (peft format), when the model has LoRA
    trainable_params.safetensors                      trainable parameters outside the adapter (if any)
    optimizer.safetensors + optimizer.json            optimizer state: tensors + JSON structure
    rng_state_{rank}.safetensors + .json              python / numpy / torch (CPU and CUDA) RNG states
    trainer_state.json                                step, data position (epoch, step in epoch, seed), ...
    train_config.json                                 the TrainConfig
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from minilora.lora.adapter import adapter_state_dict, load_adapter, save_adapter
from minilora.lora.inject import lora_layers
from minilora.io.safetensors_file import CheckpointError, SafetensorsFile

if TYPE_CHECKING:
    from minilora.train.config import TrainConfig

# Changing these between a checkpoint and its resume would change which examples come next.
DATA_ORDER_KEYS = ("seed", "shuffle", "batch_size", "gradient_accumulation_steps")


@dataclass
class TrainState:
    """Where training is: saved in every checkpoint as trainer_state.json."""
    global_step: int = 0
    epoch: int = 0  # the epoch in progress
    step_in_epoch: int = 0  # optimizer steps done in that epoch
    loss_sum: float = 0.0  # sum of the per-step global mean losses (for the summary's train_loss)
    tokens_seen: int = 0
    samples_seen: int = 0
    num_examples: int = 0  # the permutation depends on it: resuming needs the same data
    data_fingerprint: str = ""  # `data_fingerprint(train_data)`: resuming on other data warns
    grad_scaler: dict | None = None  # fp16: torch.amp.GradScaler's state (loss scale, growth tracker)


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, config: TrainConfig,
                    rank: int = 0, world: int = 1) -> Path | None:
    """Write output_dir/checkpoint-{step} atomically (build a temp folder, then rename); rank 0 only.

    Every rank must call it (RNG states are gathered). Older checkpoints beyond save_total_limit are
    removed. Returns the folder on rank 0. Refuses (FloatingPointError) to save non-finite weights, so
    every checkpoint on disk is one to go back to.
    """
    _check_finite(model, optimizer, Path(config.output_dir), state.global_step)
    rng_states = [rng_state()]
    if world > 1:
        rng_states = [None] * world
        dist.all_gather_object(rng_states, rng_state())
    if rank != 0:
        return None
    out_dir = Path(config.output_dir)
    final = out_dir / f"checkpoint-{state.global_step}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=out_dir))
    try:
        save_trainable_weights(model, tmp)
        write_tree(optimizer.state_dict(), tmp / "optimizer")
        for r, rng in enumerate(rng_states):
            write_tree(rng, tmp / f"rng_state_{r}")
        trainer_state = {**asdict(state), "world_size": world, "total_train_batch_size":
                         config.batch_size * config.gradient_accumulation_steps * world}
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        (tmp / "train_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        if final.exists():  # a new run writing over an old run's checkpoint of the same step
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; what a failed save left otherwise
    if config.save_total_limit:
        for old in list_checkpoints(out_dir)[:-config.save_total_limit]:
            shutil.rmtree(old)
    return final


def _check_finite(model: nn.Module, optimizer: torch.optim.Optimizer, out_dir: Path, step: int) -> None:
    names = {p: n for n, p in model.named_parameters()}
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    bad += [f"optimizer {key} of {names.get(p, 'a parameter')}" for p, state in optimizer.state.items()
            for key, t in state.items() if isinstance(t, torch.Tensor) and t.is_floating_point()
            and not bool(torch.isfinite(t).all())]
    if bad:
        good = [p.name for p in list_checkpoints(out_dir)] if out_dir.is_dir() else []
        raise FloatingPointError(f"not saving checkpoint-{step} in {out_dir}: trainable weights hold NaN or inf "
                                 f"({', '.join(bad[:8])}). Last good checkpoint: {good[-1] if good else 'none'}. "
                                 "Try a lower learning_rate, warmup or max_grad_norm")


def remove_unfinished_checkpoints(out_dir: Path) -> None:
    """Delete the `checkpoint-N.tmp-*` folders of saves that were killed half-way (call it holding the lock)."""
    for tmp in out_dir.glob("checkpoint-*.tmp-*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


def data_fingerprint(data) -> str:
    """A hash of the training examples (up to 1024 of them, evenly spaced, plus the count): resuming on other
    data with the same number of examples is then noticed, at a bounded cost for large data sets."""
    n = len(data)
    row = functools.partial(list.__getitem__, data) if isinstance(data, list) else data.__getitem__  # as stored
    digest = hashlib.sha256(str(n).encode())
    for i in sorted({i * n // min(n, 1024) for i in range(min(n, 1024))}):
        digest.update(json.dumps(row(i), sort_keys=True, default=_jsonable).encode())
    return digest.hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    return value.tolist() if isinstance(value, (torch.Tensor, np.ndarray)) else repr(value)


def list_checkpoints(out_dir: Path) -> list[Path]:
    """checkpoint-N folders (never unfinished .tmp ones), oldest first."""
    found = [p for p in out_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def find_checkpoint(resume_from: str, out_dir: Path) -> Path:
    """The checkpoint to resume from. With "latest", a newest checkpoint that is damaged (a file missing,
    truncated or not parsing) is skipped with a warning for the newest intact one."""
    if resume_from == "latest":
        found = list_checkpoints(out_dir) if out_dir.is_dir() else []
        if not found:
            raise FileNotFoundError(f"resume_from='latest' but {out_dir} has no checkpoint-N folders")
        for i, folder in enumerate(reversed(found)):
            if checkpoint_problem(folder) is None:
                if i:
                    warnings.warn(f"resume_from='latest': {checkpoint_problem(found[-1])}; resuming from the newest "
                                  f"intact checkpoint, {folder}", stacklevel=3)
                return folder
        raise CheckpointError(f"resume_from='latest': no checkpoint in {out_dir} is intact; the newest: "
                              f"{checkpoint_problem(found[-1])}")
    path = Path(resume_from)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"resume_from={resume_from!r}: not a checkpoint folder (no trainer_state.json)")
    problem = checkpoint_problem(path)
    if problem:
        step = path.name.rpartition("-")[2]
        older = [p for p in list_checkpoints(path.parent) if step.isdigit() and int(p.name.split("-", 1)[1]) < int(step)
                 and checkpoint_problem(p) is None]
        raise CheckpointError(f"resume_from={resume_from!r}: {problem}; "
                              + (f"{older[-1]} is intact" if older else "no older intact checkpoint beside it"))
    return path


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder (a file missing, truncated or unreadable), or None."""
    for name in ("trainer_state.json", "train_config.json", "optimizer.json", "optimizer.safetensors",
                 "rng_state_0.json", "rng_state_0.safetensors"):
        if not (folder / name).is_file():
            return f"{folder / name} is missing"
    for file in sorted(folder.iterdir()):
        try:
            if file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
            elif file.suffix == ".safetensors":
                SafetensorsFile(file).close()
        except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError and CheckpointError included
            return f"{file} is damaged ({e})"
    return None


def load_trainer_state(checkpoint: Path, config: TrainConfig, world: int, n_examples: int,
                       fingerprint: str = "") -> TrainState:
    """The TrainState saved in `checkpoint`; ValueError when resuming with this config, world size and number of
    examples would change the data order, a warning when the data's `fingerprint` differs."""
    saved = _read_json(checkpoint / "trainer_state.json")
    saved_config = _read_json(checkpoint / "train_config.json")
    before_after = {**{k: (saved_config.get(k), getattr(config, k)) for k in DATA_ORDER_KEYS},
                    "world_size": (saved.get("world_size"), world),
                    "number of training examples": (saved.get("num_examples"), n_examples)}
    changed = [f"{k}: {before} -> {after}" for k, (before, after) in before_after.items() if before != after]
    if changed:
        raise ValueError(f"cannot resume exactly from {checkpoint}: the data order would change ({'; '.join(changed)})")
    if fingerprint and saved.get("data_fingerprint") not in (None, "", fingerprint):
        warnings.warn(f"resuming from {checkpoint} on different training data (same number of examples, other "
                      "content): the rest of the run will not match an uninterrupted one", stacklevel=3)
    # grad_scaler is absent from checkpoints written before fp16 training existed
    restored = [k for k in asdict(TrainState()) if k != "data_fingerprint" and (k in saved or k != "grad_scaler")]
    return TrainState(**{k: saved[k] for k in restored}, data_fingerprint=fingerprint)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read: {e}") from None


def save_trainable_weights(model: nn.Module, folder: Path) -> None:
    """The adapter in peft format (if any) plus every other trainable parameter in safetensors."""
    in_adapter = set()
    if lora_layers(model):
        save_adapter(model, folder)
        in_adapter = set(adapter_state_dict(model))
    rest = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
            if p.requires_grad and n not in in_adapter}
    if rest:
        save_file(rest, folder / "trainable_params.safetensors")


def load_trainable_weights(model: nn.Module, folder: Path) -> None:
    """Load what `save_trainable_weights` wrote; KeyError naming parameters the model does not have."""
    if (folder / "adapter_config.json").is_file():
        load_adapter(model, folder)
    file = folder / "trainable_params.safetensors"
    if file.is_file():
        params = dict(model.named_parameters())
        tensors = load_file(file)
        unknown = sorted(set(tensors) - set(params))
        if unknown:
            raise KeyError(f"{file} has parameters the model does not: {unknown[:8]}")
        with torch.no_grad():
            for name, t in tensors.items():
                params[name].copy_(t)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": list(np.random.get_state()), "torch": torch.get_rng_state()}
    state["numpy"][1] = torch.from_numpy(state["numpy"][1].astype(np.int64))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_tree(tree: Any, base: Path) -> None:
    """A state dict as two files: BASE.safetensors (its tensors) and BASE.json (everything else, with tensors
    replaced by {"__tensor__": key}; tuples and non-string-keyed dicts tagged so they come back as they were)."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[path] = obj.detach().cpu().clone()  # clone: safetensors refuses shared storage
            return {"__tensor__": path}
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj):
                return {k: encode(v, f"{path}.{k}") for k, v in obj.items()}
            return {"__items__": [[k, encode(v, f"{path}.{k}")] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            items = [encode(v, f"{path}.{i}") for i, v in enumerate(obj)]
            return {"__tuple__": items} if isinstance(obj, tuple) else items
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot store a {type(obj).__name__} at {path} of {base.name} in a checkpoint")

    meta = encode(tree, "root")
    save_file(tensors, f"{base}.safetensors")
    Path(f"{base}.json").write_text(json.dumps(meta))


def read_tree(base: Path) -> Any:
    """The tree `write_tree` wrote; CheckpointError when a file cannot be read."""
    try:
        tensors = load_file(f"{base}.safetensors")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{base}.safetensors cannot be read: {e}") from None

    def decode(obj: Any) -> Any:
        if isinstance(obj, list):
            return [decode(v) for v in obj]
        if not isinstance(obj, dict):
            return obj
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: decode(v) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(decode(v) for v in obj["__tuple__"])
        return {k: decode(v) for k, v in obj.items()}

    return decode(_read_json(Path(f"{base}.json")))
