"""The model interface, written down once, and what the architectures share.

Loading, quantization, LoRA injection and generation talk to a model only through `PreTrainedModel`'s
attributes and methods below; every model class minilora builds implements them.
"""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class PreTrainedModel(nn.Module):
    """Base class of every model `from_pretrained` builds (a task model: `LlamaForCausalLM`, `BertModel`, ...).

    Class attributes:
        base_model_prefix: the attribute holding the backbone in task models ("model", "bert", "transformer"),
            which is also the key prefix of its tensors: a bare backbone checkpoint loads into a task class
            and back.
        is_encoder_decoder: generation encodes once (`encode`) and decodes with `decoder_input_ids`.
        new_head_prefixes: key prefixes of task heads a checkpoint may lack (the loader initialises them with
            `init_weights` and a warning); quantization and `target_modules="all-linear"` leave them dense.
        ignore_unexpected_keys: regexes of checkpoint keys dropped silently (buffers old checkpoints saved,
            heads of other task classes).
        init_if_missing: regexes of keys a checkpoint may lack that are initialised afresh with a warning but,
            unlike task heads, stay ordinary layers (BERT's pooler, absent from masked-LM checkpoints).
        checkpoint_renames: (regex, replacement) pairs turning stored keys into module paths, for a stored layout
            that transformers renames when loading too (Gemma 3's multimodal checkpoints store the module
            `model.language_model` as `language_model.model`).
        unbuilt_parts: regexes of checkpoint keys of parts the class does not build (a multimodal checkpoint's
            vision tower): not read, named in one warning.
    Instance attribute `config`: the family's config dataclass; `config.raw` is the config.json dict.
    """

    base_model_prefix: str = ""
    is_encoder_decoder: bool = False
    new_head_prefixes: tuple[str, ...] = ()
    ignore_unexpected_keys: tuple[str, ...] = ()
    init_if_missing: tuple[str, ...] = ()
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    unbuilt_parts: tuple[str, ...] = ()
    config: Any = None

    @property
    def model_type(self) -> str | None:
        """config.json's `model_type` ("llama", "bert", ...)."""
        return None if self.config is None else self.config.raw.get("model_type")

    def tied_weight_keys(self) -> list[str]:
        """State-dict keys that share another key's tensor (a tied output head): saved once, loaded once."""
        return []

    def tie_weights(self) -> None:
        """Make tied parameters one tensor again (after loading replaced one of them)."""

    def get_output_embeddings(self) -> nn.Module | None:
        """The output head (LM head, classifier): kept out of "all-linear" and, by default, out of quantization."""
        return None

    @torch.no_grad()
    def init_weights(self, module: nn.Module) -> None:
        """Initialise a freshly created module (a task head the checkpoint lacks) and its children as
        transformers does by default: linear and embedding weights N(0, config.initializer_range), biases and
        padding rows zero, anything else (norms) by its own `reset_parameters`. T5 has its own rules."""
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, self.config.initializer_range)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.zero_()
                if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def init_non_persistent_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute buffers that checkpoints do not hold, e.g. rotary frequencies, after loading from meta."""

    @property
    def stale_cache_length(self) -> int | None:
        """A sequence length past which keys cached before are stale (Phi-3's longrope switches its rotary
        factors there): generation recomputes the cache once when it grows past it. None: never."""
        return None

    def reorder_cache(self, past_key_values: Any, beam_idx: torch.Tensor) -> Any:
        """Select batch rows of the KV cache: beam search keeps the cache of the beams it continues."""
        raise NotImplementedError(f"{type(self).__name__} does not generate")

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder-decoder models: the encoder's output, computed once per generation."""
        raise NotImplementedError(f"{type(self).__name__} is not an encoder-decoder model")


def output_head_paths(model: nn.Module) -> set[str]:
    """Module paths of the output head and of new task heads (with the layers inside them). A model from
    elsewhere (transformers) counts its `get_output_embeddings()` when it has one."""
    if isinstance(model, PreTrainedModel):
        head, prefixes = model.get_output_embeddings(), tuple(p.rstrip(".") for p in model.new_head_prefixes)
    else:
        get_head = getattr(model, "get_output_embeddings", None)
        head, prefixes = (get_head() if callable(get_head) else None), ()
    return {path for path, module in model.named_modules()
            if path and ((head is not None and module is head) or path in prefixes
                         or path.startswith(tuple(p + "." for p in prefixes)))}


def stored_key_to_path(model: nn.Module, key: str) -> str:
    """A checkpoint or adapter key as `model`'s parameter name: its `checkpoint_renames` applied."""
    for pattern, replacement in getattr(model, "checkpoint_renames", ()):
        key = re.sub(pattern, replacement, key)
    return key


def in_unbuilt_part(model: nn.Module, key: str) -> bool:
    """Whether a checkpoint or adapter key belongs to a part `model` does not build (its `unbuilt_parts`)."""
    return any(re.search(pattern, key) for pattern in getattr(model, "unbuilt_parts", ()))


def model_type_of(model: nn.Module) -> str | None:
    """config.json's `model_type` of a model (a transformers model's `config.model_type` too); None if unknown."""
    if isinstance(model, PreTrainedModel):
        return model.model_type
    return getattr(getattr(model, "config", None), "model_type", None)


# Activation functions by config.json name (`hidden_act`, `dense_act_fn`).
ACTIVATIONS = {
    "gelu": F.gelu,  # the exact erf form
    "relu": F.relu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


def padding_mask_to_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(batch, len) 1 = keep / 0 = pad  ->  additive (batch, 1, 1, len) bias (0 or dtype's min)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must have shape (batch, seq_len), got {tuple(attention_mask.shape)}")
    keep = attention_mask[:, None, None, :].to(torch.bool)
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
