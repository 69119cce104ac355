"""Put LoRA layers into a model by module name, and take them out again (merge / unload)."""
from __future__ import annotations

import re

import torch
from torch import nn

from minilora.lora.config import LoraConfig
from minilora.lora.layer import LoraLinear, dense_linear
from minilora.models.base import model_type_of, output_head_paths
from minilora.quant.layers import is_quantized

# target_modules=None picks what peft picks for these model types (peft has no default for phi3, smollm3).
DEFAULT_TARGETS = {"bert": ["query", "value"], "t5": ["q", "v"], "roberta": ["query", "value"],
                   "xlm-roberta": ["query", "value"],
                   **{t: ["q_proj", "v_proj"] for t in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2",
                                                        "gemma3_text")}}


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or a quantized linear layer (not a LoRA layer: that one is already wrapped)."""
    return isinstance(module, nn.Linear) or is_quantized(module)


def name_matches(path: str, pattern: list[str] | str) -> bool:
    """peft's rule: a string is a regex fully matched on the path; a list matches by name suffix."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, path) is not None
    return any(path == p or path.endswith("." + p) for p in pattern)


def find_lora_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Module paths that `config` puts LoRA on; raises naming real paths when nothing matches."""
    targets = config.target_modules
    if targets is None:
        model_type = model_type_of(model)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError("LoraConfig.target_modules is None and there is no default for model type "
                             f"{model_type!r}: pass a list of module names, a regex or 'all-linear'")
        targets = DEFAULT_TARGETS[model_type]
    saved = set(modules_to_save_paths(model, config))
    if targets == "all-linear":
        skip = output_head_paths(model) | saved
        found = [p for p, m in model.named_modules() if is_linear(m) and p not in skip]
    else:
        found = [p for p, m in model.named_modules() if p and name_matches(p, targets)]
    if config.layers_to_transform is not None:  # peft: a path listed whole is taken whatever its layer
        wanted = config.layers_to_transform
        wanted = {wanted} if isinstance(wanted, int) else set(wanted)
        found = [p for p in found if p in targets or layer_index(p, config.layers_pattern) in wanted]
    if config.exclude_modules:
        found = [p for p in found if not name_matches(p, config.exclude_modules)]
    also_saved = [p for p in found if any(p == s or p.startswith(s + ".") for s in saved)]
    found = [p for p in found if p not in also_saved]
    if not found and also_saved:
        raise ValueError(f"target_modules={targets!r} matched only modules that modules_to_save="
                         f"{config.modules_to_save!r} also names ({', '.join(also_saved[:8])}): a module is either "
                         "LoRA-wrapped or trained in full; take it out of one of the two")
    if not found:
        examples = [p for p, m in model.named_modules() if is_linear(m)][:8]
        layers = "" if config.layers_to_transform is None else (
            f" in layers_to_transform={config.layers_to_transform!r} (layers_pattern={config.layers_pattern!r})")
        raise ValueError(f"target_modules={targets!r} matched no module of {type(model).__name__}{layers}; "
                         f"linear layers it has include: {examples}")
    model_modules = dict(model.named_modules())
    wrong = [f"{p} ({type(model_modules[p]).__name__})" for p in found if not is_linear(model_modules[p])]
    if wrong:
        raise ValueError(f"target_modules matched modules that are not linear layers: {wrong[:8]}")
    return found


def layer_index(path: str, layers_pattern: list[str] | str | None = None) -> int | None:
    """The index of the layer holding module `path`, as peft reads it: the number after `<layers_pattern>.`
    (`model.layers.3.mlp.up_proj` -> 3 for "layers"), or after the first module list when there is no pattern."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern or []
    regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    match = next((m for m in (re.match(r, path) for r in regexes) if m), None)
    return int(match["idx"]) if match else None


def modules_to_save_paths(model: nn.Module, config: LoraConfig) -> list[str]:
    """Module paths `config.modules_to_save` names (trained in full, saved with the adapter)."""
    if not config.modules_to_save:
        return []
    paths = [p for p, _ in model.named_modules() if p and name_matches(p, config.modules_to_save)]
    missing = [m for m in config.modules_to_save if not any(name_matches(p, [m]) for p in paths)]
    if missing:
        raise ValueError(f"modules_to_save={missing} matched no module of {type(model).__name__}")
    return paths


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, LoraLinear)}


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, new)


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap the targeted linear layers of `model` with LoRA, in place, and return it.

    Afterwards the base is frozen; LoRA factors, `modules_to_save` and (per `config.bias`) biases train.
    Everything is checked before anything changes, so a failed call leaves the model as it was.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a minilora.LoraConfig, got {type(config).__name__}")
    config.validate()
    if lora_layers(model):
        raise ValueError(f"{type(model).__name__} already has LoRA layers: apply_lora once per model "
                         "(ml.merge_and_unload first to stack a new adapter on a merged one)")
    targets = find_lora_targets(model, config)
    saved = modules_to_save_paths(model, config)
    modules = dict(model.named_modules())
    wrapped = {p: LoraLinear(modules[p], config.rank_for(p), config.alpha_for(p), config.lora_dropout,
                             config.use_rslora, config.init_lora_weights, use_dora=config.use_dora)
               for p in targets}

    for p in model.parameters():
        p.requires_grad_(False)
    for path, layer in wrapped.items():
        _set_module(model, path, layer)
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)
        if layer.lora_magnitude_vector is not None:
            layer.lora_magnitude_vector.weight.requires_grad_(True)
        if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            layer.base_layer.bias.requires_grad_(True)
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.is_floating_point():
                p.requires_grad_(True)
    for path in saved:
        for p in model.get_submodule(path).parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
    model.lora_config = config.frozen_copy()
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count two parameters per byte."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if getattr(p, "quant_state", None) is not None else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def merge_lora(model: nn.Module) -> nn.Module:
    """Add each LoRA update into its base weight (forward unchanged, LoRA path skipped)."""
    for layer in _require_lora(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora`: subtract each update from its base weight again."""
    for layer in _require_lora(model).values():
        layer.unmerge()
    return model


@torch.no_grad()
def merge_and_unload(model: nn.Module, *, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> nn.Module:
    """Replace every LoRA layer with one dense nn.Linear holding base + update (quantized bases dequantized,
    the update added in fp32, one rounding), dequantize the other quantized layers too, and return the model:
    a plain model with no LoRA and no quantization left (never re-quantized) that runs without autocast.

    dtype: of every floating-point parameter of the result. None: a quantized model's compute dtype (QLoRA's
        fp32 norms, embeddings and head join the merged layers: a plain bf16 model for a bf16 checkpoint),
        else the dtype most of the model's weights have (the `dtype=` it was loaded with).
    device: where the result lives (default: where the model is). device="cpu" merges a GPU model into host
        memory: each layer is dequantized and merged on the GPU and moved at once.
    Memory: layers are merged one at a time and each replaced layer is freed, so the device the merged model
        ends up on needs its dense size (parameters x dtype size: ~27 GB for a 7B model in fp32, ~13.5 GB in
        bf16), and the model's device additionally the not yet merged quantized layers and one layer's fp32
        weight and update (2 x out x in x 4 bytes, ~0.36 GB for a 7B MLP projection).
    """
    layers = _require_lora(model)
    qconfig = getattr(model, "quant_config", None)
    dtype = dtype or (qconfig.compute_dtype if qconfig is not None and qconfig.compute_dtype else None)
    dtype = dtype or _dense_dtype(model)
    for path in list(layers):
        _set_module(model, path, layers.pop(path).merged_linear(dtype, device))
    for path, module in list(model.named_modules()):
        if is_linear(module) and not isinstance(module, nn.Linear):
            _set_module(model, path, dense_linear(module, dtype=dtype, device=device))
    for p in model.parameters():  # embeddings, norms, heads; .data keeps tied parameters tied
        if p.is_floating_point() and (p.dtype != dtype or device is not None):
            p.data = p.data.to(device=device, dtype=dtype)
    if device is not None:
        model.to(device)  # buffers (rotary tables, ...)
    for attr in ("lora_config", "quant_config"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def _dense_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype holding most elements of the model's weights, LoRA factors aside (quantized weights
    are not floating); float32 when there are none."""
    counts: dict[torch.dtype, int] = {}
    skip = {id(p) for m in model.modules() if isinstance(m, LoraLinear) for p in (m.lora_A.weight, m.lora_B.weight)}
    for p in model.parameters():
        if p.is_floating_point() and id(p) not in skip:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _require_lora(model: nn.Module) -> dict[str, LoraLinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers: call ml.apply_lora or ml.load_adapter first")
    return layers
