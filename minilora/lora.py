"""The LoRA layer: y = base(x) + (B @ A)(dropout(x)) * scaling, wrapping a frozen base linear layer.

The base may be an `nn.Linear` or a quantized layer (NF4/int8): anything with `in_features`,
`out_features`, a forward, and either a `weight` (dense) or a `dequantize()` method for merging.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a base linear layer as a dense tensor (dequantized when quantized)."""
    if hasattr(base, "dequantize"):
        return base.dequantize()
    return base.weight


class LoraLinear(nn.Module):
    """A base linear layer plus a trainable low-rank update.

    The base layer is wrapped, not copied, and it keeps its state-dict keys: this module shares the base's
    `_parameters` and `_buffers` dicts, so `q_proj.weight` stays `q_proj.weight` (no `base_layer.` infix)
    while the LoRA factors live at `q_proj.lora_A.weight` and `q_proj.lora_B.weight`.
    """

    def __init__(self, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        object.__setattr__(self, "base_layer", base)  # not a child: its tensors are ours already
        self._parameters = base._parameters
        self._buffers = base._buffers
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r = r
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        device = next(iter(base._parameters.values())).device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else None
        self.merged = False
        self.reset_lora_parameters(init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, init: bool | str = True) -> None:
        """peft's inits: True = Kaiming-uniform A and zero B (the update starts at 0); "gaussian" =
        N(0, 1/r) A and zero B; False = both random (nn.Linear's default), so tests see a non-zero update."""
        if init is False:
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        h = x.to(self.lora_A.weight.dtype)
        if self.lora_dropout is not None:
            h = self.lora_dropout(h)
        return out + (self.lora_B(self.lora_A(h)) * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, the (out, in) update that merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self._add_to_base(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self._add_to_base(-self.delta_weight())
        self.merged = False

    def _add_to_base(self, delta: torch.Tensor) -> None:
        if not isinstance(self.base_layer, nn.Linear):
            raise TypeError(
                f"merging into a {type(self.base_layer).__name__} base would re-quantize it (lossy); "
                "use ml.merge_and_unload(model), which returns dense layers")
        w = self.base_layer.weight
        w.copy_((w.float() + delta.to(w.device)).to(w.dtype))

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear equal to this layer (base dequantized, LoRA added in fp32)."""
        base = self.base_layer
        w = dense_weight(base)
        dtype = w.dtype if w.is_floating_point() else torch.float32
        dtype = getattr(base, "compute_dtype", None) or dtype
        merged = w.float() if self.merged else w.float() + self.delta_weight().to(w.device)
        bias = getattr(base, "bias", None)
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                           device=w.device, dtype=dtype)
        linear.weight.copy_(merged.to(dtype))
        if bias is not None:
            linear.bias.copy_(bias.to(dtype))
        linear.requires_grad_(False)
        return linear

    # The base owns how its tensors are saved, loaded and moved (a quantized base keeps its quantization
    # state beside the packed weight); the LoRA children are handled as usual.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.base_layer._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.base_layer._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        self.base_layer._apply(fn, recurse)
        for child in self.children():
            child._apply(fn)
        return self

    def extra_repr(self) -> str:
        return (f"base={type(self.base_layer).__name__}, in_features={self.in_features}, "
                f"out_features={self.out_features}, r={self.r}, scaling={self.scaling:g}, merged={self.merged}")
