"""DoRA (Liu et al., 2024): LoRA with the merged weight's rows rescaled to learned magnitudes.

    W' = m / ||W + s B A||_row * (W + s B A)        y = x W'^T + b

m (out,) trains with A and B and starts at ||W + s B A||_row, so W' = W + s B A at step 0. The row norm is
held constant in backward (the paper's section 4.3; peft does the same). With dropout on the LoRA input peft
applies the rescaling to the dropped input only, y = base(x) + (m/n - 1) drop(x) W^T + m/n s B A drop(x), and
so does `dora_forward`. The DoRA terms run in the factors' dtype (fp32), as peft runs them, whatever the
base's dtype; that costs a dense (dequantized) copy of W per call, the price of DoRA in peft too. (peft
dequantizes a 4-bit W to its stored dtype before the fp32 cast; minilora straight to fp32: the norms differ
by that rounding.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DoraMagnitude(nn.Module):
    """The magnitudes m of one layer, at `<layer>.lora_magnitude_vector.weight` (peft: in memory
    `lora_magnitude_vector.<adapter>.weight`, in adapter files `<layer>.lora_magnitude_vector`)."""

    def __init__(self, norms: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(norms.detach().clone())


@torch.no_grad()
def row_norms(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W + delta|| of each output row, in delta's dtype, without gradient."""
    return torch.linalg.vector_norm(weight.to(delta.dtype) + delta, dim=1)


def dora_forward(x: torch.Tensor, base_out: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor, scaling: float,
                 keep: torch.Tensor | None, dropout_scale: float) -> torch.Tensor:
    """y for the base output `base_out` = x W^T + bias of the frozen `weight` (out, in): DoRA's formula above,
    computed in the factors' dtype and returned in base_out's. keep: the 0/1 dropout mask of x (None: no
    dropout), dropout_scale its 1 / (1 - p)."""
    dtype = a.dtype
    x = x.to(dtype)
    scale = magnitude / row_norms(weight, scaling * (b @ a))  # (out,): m / ||W + s B A||, constant in backward
    if keep is None:
        plain = base_out.to(dtype) if bias is None else base_out.to(dtype) - bias.to(dtype)
        h = x
    else:
        h = x * keep.to(dtype) * dropout_scale
        plain = F.linear(h, weight.to(dtype))
    lora = (h @ a.t()) @ b.t()
    return (base_out.to(dtype) + (scale - 1) * plain + scale * lora * scaling).to(base_out.dtype)


@torch.no_grad()
def dora_scale(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor,
               scaling: float) -> torch.Tensor:
    """m / ||W + s B A||_row in fp32, (out,): the factor merging applies to the rows of W + s B A (the norm
    taken on the unmerged W, as in forward)."""
    return magnitude.float() / row_norms(weight, scaling * (b.float() @ a.float()))
