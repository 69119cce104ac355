"""Adapters on disk in peft's format: adapter_config.json + adapter_model.safetensors.

Keys are peft's: `base_model.model.<module path>.lora_A.weight`, `...lora_B.weight`, modules_to_save at
their plain path (`base_model.model.classifier.weight`), biases of LoRA-wrapped layers at
`<path>.base_layer.bias` (what peft writes for bias="all"/"lora_only"), and DoRA's magnitudes at
`<path>.lora_magnitude_vector`.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from minilora.io.atomic import atomic_write
from minilora.io.config_checks import key_list
from minilora.io.json_file import read_json_object
from minilora.lora.config import LoraConfig
from minilora.lora.inject import apply_lora, find_lora_targets, lora_layers, modules_to_save_paths
from minilora.models.base import in_unbuilt_part, stored_key_to_path

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"  # DoRA's m: `<path>.lora_magnitude_vector.weight` here, without `.weight` in files
# peft task types by the suffix of the model's class name (PeftModel.from_pretrained picks its wrapper by it),
# with the heads peft's wrapper then trains and expects in the file.
_TASK_TYPES = {"ForCausalLM": ("CAUSAL_LM", ()), "ForConditionalGeneration": ("SEQ_2_SEQ_LM", ()),
               "ForSequenceClassification": ("SEQ_CLS", ("classifier", "score")),
               "ForQuestionAnswering": ("QUESTION_ANS", ("qa_outputs",)),
               "ForTokenClassification": ("TOKEN_CLS", ("classifier", "score"))}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors by parameter name: LoRA factors, trained biases and modules_to_save."""
    config = _config_of(model)
    wanted = {}
    for path, layer in lora_layers(model).items():
        wanted[f"{path}.lora_A.weight"] = layer.lora_A.weight
        wanted[f"{path}.lora_B.weight"] = layer.lora_B.weight
        if layer.lora_magnitude_vector is not None:
            wanted[f"{path}.{MAGNITUDE}.weight"] = layer.lora_magnitude_vector.weight
        if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            wanted[f"{path}.bias"] = layer.base_layer.bias
    if config.bias == "all":
        wanted.update({n: p for n, p in model.named_parameters() if n.endswith("bias") and p.is_floating_point()})
    for path in modules_to_save_paths(model, config):
        wanted.update({f"{path}.{n}": p for n, p in model.get_submodule(path).named_parameters()})
    return {name: t.detach() for name, t in wanted.items()}


def _config_of(model: nn.Module) -> LoraConfig:
    config = getattr(model, "lora_config", None)
    if config is None or not lora_layers(model):
        raise ValueError(f"{type(model).__name__} has no LoRA adapter: call ml.apply_lora or ml.load_adapter")
    return config


def _to_peft_key(name: str, lora_paths: set[str]) -> str:
    if name.endswith(f".{MAGNITUDE}.weight"):
        return PREFIX + name.removesuffix(".weight")
    module, _, leaf = name.rpartition(".")
    if leaf == "bias" and module in lora_paths:
        name = f"{module}.base_layer.bias"
    return PREFIX + name


def _from_peft_key(key: str) -> str:
    name = key.removeprefix(PREFIX)
    if name.endswith(f".{MAGNITUDE}"):
        return name + ".weight"
    # peft's bias="all" also writes the modules_to_save copy and the untouched original: keep the copy.
    return name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")


def save_adapter(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write the model's adapter to `out_dir` in peft's format, atomically; returns the folder."""
    config = _config_of(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = set(lora_layers(model))
    tensors = {_to_peft_key(n, paths): t.contiguous().cpu() for n, t in adapter_state_dict(model).items()}
    task_type = _peft_task_type(model, config)
    targets = config.target_modules
    # A regex or "all-linear": write what it matched, as peft does. So too for a model built without parts of
    # its checkpoint (a vision tower), where peft would match the names in those parts as well.
    if not isinstance(targets, list) or getattr(model, "unbuilt_parts", ()):
        targets = _compact_targets(sorted(paths), model)
    peft_config = config.to_peft_dict(
        target_modules=targets, task_type=task_type,
        base_model_name_or_path=getattr(model, "name_or_path", None) or config.extra.get("base_model_name_or_path"))
    with atomic_write(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    with atomic_write(out / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(peft_config, indent=2) + "\n")
    return out


def _peft_task_type(model: nn.Module, config: LoraConfig) -> str | None:
    """The peft task type, unless peft's wrapper would train a head this adapter left frozen (then None,
    which peft loads as a plain PeftModel with exactly our semantics)."""
    for suffix, (task_type, heads) in _TASK_TYPES.items():
        if type(model).__name__.endswith(suffix):
            if task_type == "SEQ_2_SEQ_LM" and not getattr(model, "is_encoder_decoder", False):
                task_type = "CAUSAL_LM"  # a decoder named ...ForConditionalGeneration (multimodal Gemma 3)
            saved = set(modules_to_save_paths(model, config))
            present = {p for p, _ in model.named_modules() if p in heads}
            return task_type if present <= saved else None
    return None


def _compact_targets(paths: list[str], model: nn.Module) -> list[str]:
    """Leaf names when they pick exactly `paths` (short and readable), else the full paths."""
    leaves = sorted({p.rpartition(".")[2] for p in paths})
    matched = {p for p, _ in model.named_modules() if p.rpartition(".")[2] in leaves}
    return leaves if matched == set(paths) and not getattr(model, "unbuilt_parts", ()) else sorted(paths)


def read_adapter(path_or_id: str | os.PathLike, revision: str | None = None
                 ) -> tuple[LoraConfig, dict[str, torch.Tensor], Path]:
    """Read (config, tensors by minilora parameter name, folder) from a folder or a hub repo id."""
    folder = _resolve(path_or_id, revision)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = LoraConfig.from_peft_dict(read_json_object(config_file), source=str(config_file))
    if not weights_file.is_file():
        hint = " (pickled adapter_model.bin files are never loaded)" if (folder / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{weights_file} not found{hint}")
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_file} is truncated or corrupt: {e}") from None
    named = {}
    for key, t in tensors.items():
        if ".original_module." in key:
            continue
        named[_from_peft_key(key)] = t
    return config, named, folder


def _resolve(path_or_id: str | os.PathLike, revision: str | None) -> Path:
    if Path(path_or_id).is_dir():
        return Path(path_or_id)
    from minilora.io.hub import resolve_files  # a hub repo id (the hub client is imported only when needed)
    return resolve_files(str(path_or_id), [CONFIG_NAME, WEIGHTS_NAME], revision=revision)[0].parent


def load_adapter(model: nn.Module, path_or_id: str | os.PathLike, revision: str | None = None) -> nn.Module:
    """Load a peft-format adapter (folder or hub repo id) onto `model`, in place; returns the model.

    A model without LoRA gets LoRA layers from the adapter's config; a model with LoRA must match it.
    Every tensor is checked against the model before anything changes: on error the model is untouched.
    """
    config, tensors, folder = read_adapter(path_or_id, revision)
    source = folder / WEIGHTS_NAME
    # Keys of an older layout of the model (Gemma 3 adapters trained with transformers 4.50-4.51) renamed as on
    # loading a checkpoint.
    tensors = {stored_key_to_path(model, k): t for k, t in tensors.items()}
    skipped = {k for k in tensors if in_unbuilt_part(model, k)}
    if skipped:  # e.g. LoRA on a vision tower the model was loaded without: it cannot change text outputs
        warnings.warn(f"{source}: {len(skipped)} tensors belong to parts {type(model).__name__} does not build "
                      f"and were not loaded: {key_list(sorted(skipped), 4)}",
                      stacklevel=2)
        tensors = {k: t for k, t in tensors.items() if k not in skipped}
    base_name = config.extra.get("base_model_name_or_path")
    own_name = getattr(model, "name_or_path", None)
    if base_name and own_name and Path(str(base_name)).name != Path(str(own_name)).name:
        warnings.warn(f"adapter {folder} was trained on {base_name!r}; loading it onto {own_name!r}", stacklevel=2)

    has_lora = bool(lora_layers(model))
    try:
        targets = set(lora_layers(model)) if has_lora else set(find_lora_targets(model, config))
    except ValueError as e:
        raise ValueError(f"adapter {folder} does not fit {type(model).__name__}: {e}") from None
    expected = _expected_shapes(model, config, targets, has_lora)
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{source} has tensors that do not fit {type(model).__name__}: {unexpected[:8]} "
                         f"(is it an adapter for a different base model?)")
    missing = sorted(k for k in expected if ".lora_" in k and k not in tensors)
    if missing:
        raise ValueError(f"{source} is missing LoRA tensors: {missing[:8]}")
    saved = tuple(p + "." for p in modules_to_save_paths(model, config))
    missing = sorted(k for k in expected if k.startswith(saved) and k not in tensors)
    if missing:
        raise ValueError(f"{source} is missing tensors of modules_to_save={config.modules_to_save}: {missing[:8]} "
                         "(without them those modules would keep the base model's weights)")
    for key, t in tensors.items():
        if tuple(t.shape) != expected[key]:
            raise ValueError(f"{source}: tensor {key} has shape {tuple(t.shape)} but the model expects "
                             f"{expected[key]} (is it an adapter for a different base model?)")
        if not t.is_floating_point():
            raise ValueError(f"{source}: tensor {key} is {t.dtype}; adapter weights are floating-point")

    if not has_lora:
        apply_lora(model, config)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, t in tensors.items():
            params[key].copy_(t.to(params[key].dtype))
    return model


def _expected_shapes(model: nn.Module, config: LoraConfig, targets: set[str],
                     has_lora: bool) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape for every tensor the adapter may hold, computed without changing the model."""
    params = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    modules = dict(model.named_modules())
    if has_lora:
        own = model.lora_config
        for field in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "use_dora"):
            if getattr(own, field) != getattr(config, field):
                raise ValueError(f"the adapter has {field}={getattr(config, field)!r} but the model's LoRA layers "
                                 f"have {field}={getattr(own, field)!r}; load it onto a model without LoRA")
    shapes = {}
    for path in targets:
        m = modules[path]
        r = config.rank_for(path)
        shapes[f"{path}.lora_A.weight"] = (r, m.in_features)
        shapes[f"{path}.lora_B.weight"] = (m.out_features, r)
        if config.use_dora:
            shapes[f"{path}.{MAGNITUDE}.weight"] = (m.out_features,)
        if f"{path}.bias" in params:
            shapes[f"{path}.bias"] = params[f"{path}.bias"]
    if config.bias == "all":
        shapes.update({n: s for n, s in params.items() if n.endswith("bias")})
    for path in modules_to_save_paths(model, config):
        shapes.update({f"{path}.{n}": tuple(p.shape) for n, p in modules[path].named_parameters()})
    return shapes
