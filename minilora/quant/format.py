"""How quantized layers are stored: the state-dict tensors bitsandbytes' Linear4bit / Linear8bitLt write
(read and checked here; `quant.layers.load_prequantized_linear` rebuilds layers from them with no
re-quantization), and transformers' `quantization_config`
(BitsAndBytesConfig) JSON in config.json.
"""
from __future__ import annotations

import json
from collections.abc import Iterable

import torch
from torch import nn

from minilora.quant.config import QuantConfig
from minilora.quant.bnb import import_bitsandbytes, check_blocksize

FOUR_BIT_STATE_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")  # under "weight."


def is_quantized_in_checkpoint(names: Iterable[str]) -> bool:
    """Whether a layer's checkpoint tensors (names relative to the layer) hold bnb-quantized weights."""
    return any(n == "SCB" or n.startswith("weight.quant_state.") for n in names)


def read_4bit(tensors: dict[str, torch.Tensor], in_features: int, out_features: int, quant_type: str,
               device: torch.device, prefix: str):
    """The `Params4bit` (packed weight + quant state) of a layer's Linear4bit tensors, checked."""
    blob_key = f"weight.quant_state.bitsandbytes__{quant_type}"
    required = ["weight", "weight.absmax", "weight.quant_map", blob_key]
    missing = [prefix + k for k in required if k not in tensors]
    if missing:
        found = sorted(k for k in tensors if k.startswith("weight.quant_state."))
        hint = f" (it has {found}: saved with another quant_type?)" if found else _dense_hint(tensors)
        raise KeyError(f"{quant_type} layer: missing {missing}{hint}; expected what bitsandbytes' Linear4bit saves")
    try:
        blob = json.loads(bytes(tensors[blob_key].cpu().numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{prefix}{blob_key} is not bitsandbytes' JSON quant state: {e}") from None
    if blob.get("quant_type") != quant_type or list(blob.get("shape") or ()) != [out_features, in_features]:
        raise ValueError(f"{prefix}{blob_key} describes a {blob.get('quant_type')} weight of shape "
                         f"{blob.get('shape')}, expected {quant_type} of shape [{out_features}, {in_features}]")
    nested = {"nested_offset", "nested_blocksize", "nested_dtype"} <= blob.keys()
    for key in ("weight.nested_absmax", "weight.nested_quant_map") if nested else ():
        if key not in tensors:
            raise KeyError(f"{prefix}{key} is missing: the quant state says the scales are double-quantized")
    packed, n_bytes = tensors["weight"], (out_features * in_features + 1) // 2
    if packed.numel() * packed.element_size() != n_bytes:
        raise ValueError(f"{prefix}weight has {packed.numel() * packed.element_size()} bytes, expected {n_bytes} "
                         f"(packed 4-bit ({out_features}, {in_features}))")
    if isinstance(blob.get("blocksize"), int):
        check_blocksize(blob["blocksize"], device)
    stats = {k: v for k, v in tensors.items() if k.startswith("weight.")}
    unknown = sorted(set(stats) - {f"weight.{k}" for k in FOUR_BIT_STATE_KEYS} - {blob_key})
    if unknown:
        raise ValueError(f"unknown 4-bit quant state tensors {[prefix + k for k in unknown]}")
    return import_bitsandbytes().nn.Params4bit.from_prequantized(packed.reshape(-1, 1), stats, requires_grad=False,
                                                                 device=device)


def _dense_hint(tensors: dict[str, torch.Tensor]) -> str:
    weight = tensors.get("weight")
    dense = weight is not None and weight.is_floating_point()
    return f" (its weight is a dense {weight.dtype} tensor: the checkpoint stores it unquantized)" if dense else ""


def read_int8(tensors: dict[str, torch.Tensor], in_features: int, out_features: int, device: torch.device,
              prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, SCB row scales) of a layer's Linear8bitLt tensors, checked."""
    missing = [prefix + k for k in ("weight", "SCB") if k not in tensors]
    if missing:
        raise KeyError(f"int8 layer: missing {missing}{_dense_hint(tensors)}; expected what bitsandbytes' Linear8bitLt "
                       "saves (weight, SCB, weight_format)")
    weight, scb = tensors["weight"], tensors["SCB"]
    if weight.dtype != torch.int8 or weight.shape != (out_features, in_features):
        raise ValueError(f"{prefix}weight is {weight.dtype} {tuple(weight.shape)}, expected int8 ({out_features}, "
                         f"{in_features})")
    if scb.shape != (out_features,):
        raise ValueError(f"{prefix}SCB has shape {tuple(scb.shape)}, expected ({out_features},)")
    if "weight_format" in tensors and int(tensors["weight_format"]) != 0:
        raise ValueError(f"{prefix}weight_format is {int(tensors['weight_format'])}: only bitsandbytes' row-major "
                         "layout (0) is supported")
    return weight.to(device), scb.to(device)


# --------------------------------------------------------------------------------------------------------
# config.json's quantization_config (transformers' BitsAndBytesConfig)


def quant_config_to_dict(qconfig: QuantConfig, model: nn.Module | None = None) -> dict:
    """transformers' BitsAndBytesConfig JSON for `qconfig`.

    Pass the quantized `model` to list its dense linear layers in `llm_int8_skip_modules`: transformers
    then keeps exactly those dense (its own default would differ e.g. for task heads).
    """
    four_bit = qconfig.quant_type != "int8"
    skip = _dense_linear_paths(model) if model is not None else qconfig.skip_modules
    d = {
        "quant_method": "bitsandbytes", "_load_in_4bit": four_bit, "_load_in_8bit": not four_bit,
        "load_in_4bit": four_bit, "load_in_8bit": not four_bit, "llm_int8_threshold": qconfig.int8_threshold,
        "llm_int8_skip_modules": list(skip) if skip is not None else None,
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
        "bnb_4bit_compute_dtype": str(qconfig.compute_dtype or torch.float32).removeprefix("torch."),
        "bnb_4bit_quant_type": qconfig.quant_type if four_bit else "fp4",
        "bnb_4bit_use_double_quant": qconfig.double_quant and four_bit, "bnb_4bit_quant_storage": "uint8",
    }
    if qconfig.blocksize != 64:  # not a transformers field; its loader reads the blocksize from each weight
        d["bnb_4bit_blocksize"] = qconfig.blocksize
    return d


def _dense_linear_paths(model: nn.Module) -> list[str]:
    lora_parts = {f"{path}.{name}" for path, m in model.named_modules() if hasattr(m, "base_layer")
                  for name, _ in m.named_children()}
    return [path for path, m in model.named_modules() if isinstance(m, nn.Linear) and path not in lora_parts]


def quant_config_from_dict(d: dict) -> QuantConfig:
    """Read config.json's `quantization_config` (bitsandbytes only) back into a QuantConfig."""
    if not isinstance(d, dict):
        raise ValueError(f"quantization_config must be a JSON object, got {type(d).__name__}")
    if (method := d.get("quant_method", "bitsandbytes")) != "bitsandbytes":
        raise ValueError(f"quantization_config.quant_method is {method!r}: minilora loads only bitsandbytes "
                         "(nf4 / fp4 / int8) checkpoints")
    in_4bit = bool(d.get("load_in_4bit", d.get("_load_in_4bit", False)))
    in_8bit = bool(d.get("load_in_8bit", d.get("_load_in_8bit", False)))
    if in_4bit == in_8bit:
        raise ValueError(f"quantization_config must set exactly one of load_in_4bit / load_in_8bit, got "
                         f"load_in_4bit={in_4bit}, load_in_8bit={in_8bit}")
    if d.get("llm_int8_has_fp16_weight"):
        raise ValueError("quantization_config.llm_int8_has_fp16_weight=True (int8 with fp16 master weights) is "
                         "not supported")
    return QuantConfig(
        quant_type="int8" if in_8bit else d.get("bnb_4bit_quant_type", "fp4"),  # transformers' default: fp4
        double_quant=bool(d.get("bnb_4bit_use_double_quant", False)), compute_dtype=d.get("bnb_4bit_compute_dtype"),
        blocksize=d.get("bnb_4bit_blocksize", 64), skip_modules=d.get("llm_int8_skip_modules"),
        int8_threshold=d.get("llm_int8_threshold", 6.0))
