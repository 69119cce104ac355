"""Put LoRA layers into a model by module name, and take them out again (merge / unload)."""
from __future__ import annotations

import re

from torch import nn

from .config import LoraConfig
from .lora import LoraLinear, dense_linear

# target_modules=None picks what peft picks for these model types.
DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"], "t5": ["q", "v"]}


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or a quantized stand-in (anything exposing in/out features and a dense weight)."""
    if isinstance(module, LoraLinear):
        return False
    return isinstance(module, nn.Linear) or (
        hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "dequantize"))


def name_matches(path: str, pattern: list[str] | str) -> bool:
    """peft's rule: a string is a regex fully matched on the path; a list matches by name suffix."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, path) is not None
    return any(path == p or path.endswith("." + p) for p in pattern)


def _output_heads(model: nn.Module) -> set[str]:
    """Paths of the modules "all-linear" leaves alone: the LM head and task heads (classifier, qa_outputs)."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for path, module in model.named_modules():
        if module is out and out is not None:
            heads.add(path)
        if any(path + "." == p or path == p for p in getattr(model, "new_head_prefixes", ())):
            heads.add(path)
    return heads


def find_lora_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Module paths that `config` puts LoRA on; raises naming real paths when nothing matches."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "raw", {}).get("model_type")
        if model_type not in DEFAULT_TARGETS:
            raise ValueError("LoraConfig.target_modules is None and there is no default for model type "
                             f"{model_type!r}: pass a list of module names, a regex or 'all-linear'")
        targets = DEFAULT_TARGETS[model_type]
    saved = set(_modules_to_save(model, config))
    if targets == "all-linear":
        skip = _output_heads(model) | saved
        found = [p for p, m in model.named_modules() if is_linear(m) and p not in skip]
    else:
        found = [p for p, m in model.named_modules() if p and name_matches(p, targets)]
    if config.exclude_modules:
        found = [p for p in found if not name_matches(p, config.exclude_modules)]
    found = [p for p in found if not any(p == s or p.startswith(s + ".") for s in saved)]
    if not found:
        examples = [p for p, m in model.named_modules() if is_linear(m)][:8]
        raise ValueError(f"target_modules={targets!r} matched no module of {type(model).__name__}; "
                         f"linear layers it has include: {examples}")
    model_modules = dict(model.named_modules())
    wrong = [f"{p} ({type(model_modules[p]).__name__})" for p in found if not is_linear(model_modules[p])]
    if wrong:
        raise ValueError(f"target_modules matched modules that are not linear layers: {wrong[:8]}")
    return found


def _modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
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
    saved = _modules_to_save(model, config)
    modules = dict(model.named_modules())
    wrapped = {p: LoraLinear(modules[p], config.r, config.lora_alpha, config.lora_dropout,
                             config.use_rslora, config.init_lora_weights) for p in targets}

    for p in model.parameters():
        p.requires_grad_(False)
    for path, layer in wrapped.items():
        _set_module(model, path, layer)
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)
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
    model.lora_config = config
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


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer with one dense nn.Linear holding base + update (quantized bases are
    dequantized, the update added in fp32), and dequantize the other quantized layers too: the result is a
    plain model (16-bit for a 16-bit QLoRA model) with no LoRA and no quantization left, never re-quantized.
    The merged layers take the quantized layers' compute dtype, and so do the other weights (a QLoRA model's
    fp32 norms, embeddings and head), so the result is one plain model in that dtype."""
    qconfig = getattr(model, "quant_config", None)
    for path, layer in _require_lora(model).items():
        _set_module(model, path, layer.merged_linear())
    for path, module in list(model.named_modules()):
        if is_linear(module) and not isinstance(module, nn.Linear):
            _set_module(model, path, dense_linear(module))
    if qconfig is not None and qconfig.compute_dtype is not None:
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != qconfig.compute_dtype:
                p.data = p.data.to(qconfig.compute_dtype)
    for attr in ("lora_config", "quant_config"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def _require_lora(model: nn.Module) -> dict[str, LoraLinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers: call ml.apply_lora or ml.load_adapter first")
    return layers
