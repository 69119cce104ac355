"""Layers fed one input, computed together where their type knows how."""
from __future__ import annotations

import torch
from torch import nn

from minilora.ops import gemm


def linear_group(x: torch.Tensor, *layers: nn.Module) -> list[torch.Tensor]:
    """`[layer(x) for layer in layers]` for layers reading the same input, e.g. q/k/v or gate/up projections.

    A layer type can compute a whole group at once by defining a static `forward_group(x, layers) -> list`
    (LoRA layers stack their A factors into one matmul and share one dropout mask). Layers with hooks are
    called as usual, so their hooks run; plain linear layers go through `gemm.apply_linear`. Model code calls
    this where it has siblings and needs to know nothing else.
    """
    results: dict[int, torch.Tensor] = {}
    groups: dict[object, list[nn.Module]] = {}
    for layer in layers:
        forward_group = getattr(type(layer), "forward_group", None)
        if forward_group is not None and not (layer._forward_hooks or layer._forward_pre_hooks):
            groups.setdefault(forward_group, []).append(layer)
    for forward_group, members in groups.items():
        results.update(zip(map(id, members), forward_group(x, members), strict=True))
    return [results[id(layer)] if id(layer) in results else gemm.apply_linear(layer, x) for layer in layers]
