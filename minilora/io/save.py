"""save_pretrained: an HF-format weights folder (config.json + safetensors, sharded when large), written atomically,
that transformers and from_pretrained load."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from minilora.io.atomic import atomic_write
from minilora.io.config_checks import key_list
from minilora.io.load import set_num_labels
from minilora.io.safetensors_file import majority_float_dtype, save_safetensors
from minilora.models import FAMILIES
from minilora.models.base import PreTrainedModel
from minilora.quant import format as quant_format


def save_pretrained(model: nn.Module, out_dir: str | os.PathLike, max_shard_size: int | str = "2GB") -> Path:
    """Write `model` as a Hugging Face folder: config.json + model.safetensors (or shards + index).

    transformers' `AutoModelFor*.from_pretrained(out_dir)` loads the result. Tied tensors are stored once
    (e.g. no lm_head.weight when tied to the embeddings); a quantized model is written packed, with its
    `quantization_config`. Every file is written to a temp file and renamed, so readers never see half a
    file; weight files of an earlier save in the same folder are removed. Returns the folder.
    """
    lora = [name for name, _ in model.named_parameters() if "lora_A" in name]
    if lora:
        raise ValueError(f"the model still has LoRA layers ({key_list(lora, 3)}): call ml.merge_and_unload(model) "
                         "first to save a full model, or ml.save_adapter(model, dir) to save only the adapter")
    config, tensors = _config_to_save(model), _tensors_to_save(model)  # both raise before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = _split_into_shards(tensors, _parse_size(max_shard_size))
    n = len(shards)
    written = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for name, shard in zip(written, shards, strict=True):
        save_safetensors(shard, out / name)
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {key: name for name, shard in zip(written, shards, strict=True) for key in shard}
        _write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, out / "model.safetensors.index.json")
        written.append("model.safetensors.index.json")
    for stale in [*out.glob("model.safetensors*"), *out.glob("model-*-of-*.safetensors")]:
        if stale.name not in written:
            stale.unlink()
    _write_json(config, out / "config.json")
    return out


def _tensors_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    unset = [k for k, t in state.items() if t.is_meta]
    if unset:
        raise ValueError(f"cannot save tensors that were never materialised (meta): {key_list(unset)}")
    tied = set(model.tied_weight_keys()) if isinstance(model, PreTrainedModel) else set()
    kept = {t.untyped_storage().data_ptr() for k, t in state.items() if k not in tied}
    # A tied tensor is dropped only when it really shares memory with one that is written.
    return {k: t for k, t in state.items() if k not in tied or t.untyped_storage().data_ptr() not in kept}


def _split_into_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy, in state-dict order; a tensor larger than max_bytes gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def _parse_size(size: int | str) -> int:
    """Bytes in "2GB" / "500MB" / "200KB" (powers of 10) or "1GiB" / "10MiB" (powers of 2), or an int."""
    if isinstance(size, int) and size > 0:
        return size
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]I?B|B)\s*", str(size).upper())
    if not match or int(match[1]) <= 0:
        raise ValueError(f"max_shard_size must be a positive int or a size like '2GB' / '500MB', got {size!r}")
    return int(match[1]) * units[match[2]]


def _config_to_save(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    raw = dict(getattr(config, "raw", None) or {})
    if not raw and dataclasses.is_dataclass(config):  # built by hand, not loaded: its fields use HF's names
        raw = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "raw"}
    if not raw:
        raise ValueError(f"{type(model).__name__}.config is not a minilora config with a `raw` config.json dict")
    raw.setdefault("model_type", next((t for t, f in FAMILIES.items() if f.config_class == type(config).__name__),
                                      None))
    raw["architectures"] = [type(model).__name__]
    num_labels = getattr(config, "num_labels", None)
    if num_labels is not None and "id2label" in raw and len(raw["id2label"]) != num_labels:
        set_num_labels(raw, num_labels)
    dtype = majority_float_dtype((p.dtype, p.numel()) for p in model.parameters())
    if dtype is not None:  # both keys: transformers v5 reads `dtype`, v4 `torch_dtype`
        raw["dtype"] = raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    qconfig = getattr(model, "quant_config", None)
    raw.pop("quantization_config", None)
    if qconfig is not None:
        raw["quantization_config"] = quant_format.quant_config_to_dict(qconfig, model)
    return raw


def _write_json(data: dict, path: Path) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
