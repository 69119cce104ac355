"""The one output type every minilora model returns (attribute access, like HF's ModelOutput)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ModelOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None  # extractive QA
    end_logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None  # seq2seq
    past_key_values: Any = None


class LazyLogitsOutput(ModelOutput):
    """The output of a language model that computed its loss without holding the whole (tokens, vocab) logits
    (`minilora.ops.linear_cross_entropy`): `logits` are computed when first read, by `compute_logits`, in the
    grad and autocast modes of the forward pass (so they are what the forward pass would have returned). What
    reads every field (repr, DDP with find_unused_parameters=True) computes them too."""

    def __init__(self, compute_logits: Callable[[], torch.Tensor], device: torch.device, **fields: Any):
        grad, device_type = torch.is_grad_enabled(), device.type
        autocast = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)

        def compute() -> torch.Tensor:
            with torch.set_grad_enabled(grad), torch.autocast(device_type, dtype=autocast[1], enabled=autocast[0]):
                return compute_logits()

        self._compute_logits: Callable[[], torch.Tensor] | None = compute
        super().__init__(**fields)

    @property
    def logits(self) -> torch.Tensor | None:
        if self._logits is None and self._compute_logits is not None:
            self._logits, self._compute_logits = self._compute_logits(), None
        return self._logits

    @logits.setter
    def logits(self, value: torch.Tensor | None) -> None:
        self._logits = value
