"""Checks of a checkpoint folder before a model is built from it or a tensor is read: config.json values have
their field's type and a sane size, agree with the checkpoint's layer count, and every stored tensor has a
dtype its parameter can take. A bad file fails naming the file, field or tensor, never deep inside torch
(or after building a million layers)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from minilora.checks import type_errors
from minilora.io.safetensors_file import Checkpoint, CheckpointError
from minilora.models.base import in_unbuilt_part

MAX_NUM_LABELS = 100_000  # far above any real classification head; a typo'd 10**9 would build a 10**9-row head

# Integer config fields that count or size something: they must be >= 1.
_SIZE_FIELD = re.compile(r"^num_|_size$|^d_(model|kv|ff)$|^head_dim$|^max_position_embeddings$|_buckets$|_distance$")

# Widths every checkpoint of the model stores a tensor dimension at least as large as.
WIDTH_FIELDS = ("hidden_size", "intermediate_size", "head_dim", "d_model", "d_kv", "d_ff")

# Layer-count fields and the checkpoint keys that hold one layer each (the captured group is the index).
LAYER_KEYS = {
    "num_hidden_layers": re.compile(r"(?:^|\.)layers?\.(\d+)\."),
    "num_layers": re.compile(r"(?:^|\.)encoder\.block\.(\d+)\."),
    "num_decoder_layers": re.compile(r"(?:^|\.)decoder\.block\.(\d+)\."),
}


def check_config_dict(config_class: type, config: dict, source: Path) -> None:
    """config.json's values against `config_class`'s fields: types, then sizes (before the config is built).
    A config class with a `nested_config` key (a multimodal config's "text_config") has its fields there."""
    nested = getattr(config_class, "nested_config", None)
    if nested and config.get(nested) is not None and not isinstance(config[nested], dict):
        raise CheckpointError(f"{source}: {nested}: expected a JSON object, got {type(config[nested]).__name__}")
    scopes = [("", config)] + ([(nested + ".", config.get(nested) or {})] if nested else [])
    problems = [scope + problem for scope, values in scopes for problem in type_errors(config_class, values)]
    for scope, values in scopes:
        for name in ("id2label", "label2id", "quantization_config", "rope_parameters"):
            if values.get(name) is not None and not isinstance(values[name], dict):
                problems.append(f"{scope}{name}: expected a JSON object, got {type(values[name]).__name__}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    fields = getattr(config_class, "__dataclass_fields__", {})
    for scope, values in scopes:
        for name, value in values.items():
            if name in fields and _SIZE_FIELD.search(name) and type(value) is int and value < 1:
                raise CheckpointError(f"{source}: {scope}{name} must be >= 1, got {value}")
    num_labels = config.get("num_labels")
    if isinstance(num_labels, int) and num_labels > MAX_NUM_LABELS:
        raise CheckpointError(f"{source}: num_labels={num_labels} is more than {MAX_NUM_LABELS}")


def check_against_checkpoint(config, checkpoint: Checkpoint, source: Path, model_class: type | None = None) -> None:
    """Before the model is built: the config's layer counts must equal the number of layers the checkpoint
    holds (a wrong count would build every layer first), and no width may exceed every stored tensor's
    dimensions (a huge head_dim would compute a huge RoPE table first). Keys of parts `model_class` does not
    build (a vision tower) are not counted."""
    keys = [k for k in checkpoint.keys() if not in_unbuilt_part(model_class, k)]
    largest = max((max(checkpoint.shape(k), default=1) for k in keys), default=1)
    for name in WIDTH_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > largest:
            raise CheckpointError(f"{source}: {name} is {value} but no tensor in {source.parent} has a "
                                  f"dimension that large (the largest is {largest})")
    for name, pattern in LAYER_KEYS.items():
        value = getattr(config, name, None)
        indices = {int(m[1]) for m in map(pattern.search, keys) if m}
        if isinstance(value, int) and indices and len(indices) != value:
            raise CheckpointError(f"{source}: {name} is {value} but the checkpoint in {source.parent} holds "
                                  f"{len(indices)} layers (indices {min(indices)}..{max(indices)})")


def check_dtypes(state: dict[str, torch.Tensor], mapping: dict[str, str], checkpoint: Checkpoint,
                 skip: tuple[str, ...] = ()) -> None:
    """A floating-point parameter takes only a floating-point tensor: a bool or integer one would load as 0/1 or
    as integers (a bool norm weight gives all-zero logits). Packed quantized layers (`skip`) have their own."""
    wrong = [f"{key} is {checkpoint.dtype(ckey)} in {checkpoint.where[ckey].path.name}"
             for key, ckey in mapping.items() if key in state and not key.startswith(skip)
             and state[key].is_floating_point() and not checkpoint.dtype(ckey).is_floating_point]
    if wrong:
        raise CheckpointError(f"{checkpoint.folder}: floating-point weights stored as bool or integer tensors: "
                              f"{key_list(wrong, 8, '; ')}")


def key_list(keys: list[str], limit: int = 12, sep: str = ", ") -> str:
    """The first `limit` of `keys` for an error message, and how many more there are."""
    shown = sep.join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")
