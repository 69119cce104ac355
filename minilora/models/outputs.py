"""The one output type every minilora model returns (attribute access, like HF's ModelOutput)."""
from __future__ import annotations

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
