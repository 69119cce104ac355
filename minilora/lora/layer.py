"""The LoRA layer: a frozen linear layer plus a trainable low-rank update (Hu et al., 2021).

    y = base(x) + scaling * B(A(dropout(x)))        scaling = lora_alpha / r  (rsLoRA: lora_alpha / sqrt(r))

With `use_dora`, the layer is DoRA's instead (`minilora.lora.dora`): the rows of W + scaling * B A rescaled to
learned magnitudes, computed in plain autograd.

`LoraLinear.reference_forward` is the LoRA formula in plain PyTorch. `forward` computes the same numbers through
one fused op (`minilora.ops.lora_update`), shared by sibling layers fed one input (`minilora.ops.linear_group`
calls `LoraLinear.forward_group`); tests hold the two equal in outputs and gradients. The base is an
nn.Linear or a quantized layer (NF4/int8, `minilora.quant`).

Where minilora and peft differ (the same results up to rounding and dropout draws):
- The LoRA products run in the activation dtype (bf16 in a bf16 model; fp32 in a QLoRA model's fp32 residual
  stream, whose quantized bases compute in bf16); the factors stay fp32 master weights, cast per call, so
  their gradients and updates are fp32.
- Dropout masks come from 16 random bits per element (p rounded to a multiple of 1/65536) and the
  1/(1-p) rescaling is folded into the scaling (`minilora.ops.dropout`).
- Layers fed the very same input tensor (q/k/v, gate/up) share one dropout mask (`share_dropout_mask`); peft
  draws one mask per layer. Each layer's dropout has the same distribution either way.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from minilora.lora.dora import DoraMagnitude, dora_forward, dora_scale, row_norms
from minilora.ops import gemm
from minilora.ops.dropout import shared_dropout_mask
from minilora.ops.lora_update import lora_update
from minilora.quant.layers import is_quantized


class LoraLinear(nn.Module):
    """A base linear layer plus a trainable low-rank update.

    The base layer is wrapped, not copied, and its tensors keep their Hugging Face names: this module shares
    the base's `_parameters` and `_buffers` dicts, so `q_proj.weight` stays `q_proj.weight` in state dicts
    and in `named_parameters()` (no `base_layer.` infix), while the LoRA factors live at
    `q_proj.lora_A.weight` and `q_proj.lora_B.weight`. `base_layer` is an attribute, not a child: as a child
    its tensors would be listed twice under two names.
    """

    share_dropout_mask: bool = True  # set False (on the class or one layer) for peft's one mask per layer
    fused: bool = True  # False: forward is reference_forward (tests compare the two)

    def __init__(self, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True,
                 dtype: torch.dtype = torch.float32, use_dora: bool = False):
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
        self.lora_magnitude_vector = None
        if use_dora:  # m starts at the rows' norms, so the layer starts as its LoRA would
            weight = frozen_weight(base, torch.float32)
            self.lora_magnitude_vector = DoraMagnitude(row_norms(weight, self.scaling * (
                self.lora_B.weight.float() @ self.lora_A.weight.float())).to(dtype))
        self._merged_scale: torch.Tensor | None = None  # DoRA's row factor while merged (unmerge divides by it)

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

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The formula in plain PyTorch (factors cast to the activation dtype, as the fused op does)."""
        keep, scaling = self.dropout_mask(x)
        h = x if keep is None else x * keep
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        return self.base_layer(x) + (h @ a.t() @ b.t()) * scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            out = gemm.apply_linear(self.base_layer, x)
            trainable = torch.is_grad_enabled() and self.lora_A.weight.requires_grad
            return _MergedGuard.apply(out, self.lora_A.weight) if trainable else out
        if self.lora_magnitude_vector is not None:
            return self.dora_forward(x)
        if not self.fused:
            return self.reference_forward(x)
        return LoraLinear.forward_group(x, [self])[0]

    def dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """DoRA's output (`minilora.lora.dora.dora_forward`) on this layer's base and factors."""
        keep, scaling = self.dropout_mask(x)
        base = self.base_layer
        weight = frozen_weight(base, self.lora_A.weight.dtype)
        return dora_forward(x, base(x), weight, base.bias, self.lora_A.weight, self.lora_B.weight,
                            self.lora_magnitude_vector.weight, self.scaling, keep, scaling / self.scaling)

    @staticmethod
    def forward_group(x: torch.Tensor, layers: list[LoraLinear]) -> list[torch.Tensor]:
        """`[layer(x) for layer in layers]` through the fused op, one call per dropout mask and dtype. The one
        place that decides how a LoRA layer runs: a frozen base inside the op (`runs_inside`), any other base
        called first and its output handed to the op."""
        results, calls = {}, {}
        for layer in layers:
            if layer.merged or not layer.fused or layer.lora_magnitude_vector is not None:
                results[id(layer)] = layer.forward(x)
                continue
            keep, scaling = layer.dropout_mask(x)
            base = layer.base_layer
            if runs_inside(base, x):
                compute = base.compute_dtype if is_quantized(base) else None
                call = (partial(frozen_weight, base), base.bias, None, compute)
            else:
                call = (None, None, gemm.apply_linear(base, x), None)
            dtype = x.dtype if call[2] is None else call[2].dtype
            calls.setdefault((id(keep), dtype), []).append((layer, keep, scaling, *call))
        for members in calls.values():
            group, keeps, scalings, frozen, biases, outs, computes = zip(*members, strict=True)
            ys = lora_update(x, keeps[0], scalings, [m.lora_A.weight for m in group],
                             [m.lora_B.weight for m in group], frozen, biases, outs, computes)
            results.update(zip(map(id, group), ys, strict=True))
        return [results[id(layer)] for layer in layers]

    def dropout_mask(self, x: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """The LoRA input's 0/1 dropout mask (None without dropout), and the scaling with dropout's
        1 / (1 - p) folded in."""
        dropout = self.lora_dropout
        if dropout is None or not dropout.training or dropout.p == 0:
            return None, self.scaling
        keep, p_eff = shared_dropout_mask(self, x, dropout.p, self.share_dropout_mask)
        return keep, self.scaling / (1 - p_eff)

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) fp32 update that merging adds to the (unmerged) base weight: scaling * B @ A, or with
        DoRA the rescaled merged weight minus the base weight."""
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        if self.lora_magnitude_vector is None:
            return delta
        weight = frozen_weight(self.base_layer, torch.float32).float()
        return (weight + delta) * self.dora_scale()[:, None] - weight

    def dora_scale(self) -> torch.Tensor:
        """DoRA's factor m / ||W + s B A||_row for the rows of the merged weight (`minilora.lora.dora`)."""
        return dora_scale(frozen_weight(self.base_layer, torch.float32), self.lora_A.weight, self.lora_B.weight,
                          self.lora_magnitude_vector.weight, self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        scale = None if self.lora_magnitude_vector is None else self.dora_scale()
        self._add_to_base(self.delta_weight())
        self._merged_scale = scale
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        if self._merged_scale is not None:  # W = W' / factor - s B A
            w = self.base_layer.weight.float()
            delta = w - (w / self._merged_scale[:, None] - delta)
            self._merged_scale = None
        self._add_to_base(-delta)
        self.merged = False

    def _add_to_base(self, delta: torch.Tensor) -> None:
        if not isinstance(self.base_layer, nn.Linear):
            raise TypeError(
                f"merging into a {type(self.base_layer).__name__} base would re-quantize it (lossy); "
                "use ml.merge_and_unload(model), which returns dense layers")
        w = self.base_layer.weight
        w.copy_((w.float() + delta.to(w.device)).to(w.dtype))

    def merged_linear(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> nn.Linear:
        """A plain nn.Linear equal to this layer (base dequantized, LoRA added in fp32), see `dense_linear`."""
        return dense_linear(self.base_layer, None if self.merged else self.delta_weight(), dtype, device)

    # nn.Module internals, overridden because the base is not a child (see the class docstring: as a child its
    # tensors would appear as `q_proj.base_layer.weight`): the base still owns how its tensors are saved,
    # loaded and moved (a quantized base keeps its quantization state beside the packed weight); the LoRA
    # children are handled as usual.
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
                f"out_features={self.out_features}, r={self.r}, scaling={self.scaling:g}, merged={self.merged}"
                + (", dora=True" if self.lora_magnitude_vector is not None else ""))


def runs_inside(base: nn.Module, x: torch.Tensor) -> bool:
    """Whether the fused op can compute `base` itself: a frozen nn.Linear in x's dtype or a quantized layer
    (any compute dtype) that dequantizes, with a frozen bias (or none) and no hooks, outside autocast."""
    if base._forward_hooks or base._forward_pre_hooks or torch.is_autocast_enabled(x.device.type):
        return False
    if base.bias is not None and base.bias.requires_grad:
        return False
    if type(base) is nn.Linear:
        return not base.weight.requires_grad and base.weight.dtype == x.dtype
    # bitsandbytes' own kernels (CUDA decoding, LLM.int8) run in the base's forward
    return is_quantized(base) and not base.uses_bnb_matmul(x, base.bias)


def frozen_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base's (out, in) weight, dequantized to `dtype` when quantized."""
    return base.dequantize(dtype) if is_quantized(base) else base.weight


@torch.no_grad()
def dense_linear(base: nn.Module, delta: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> nn.Linear:
    """A frozen plain nn.Linear holding `base`'s weight (dequantized when quantized) plus `delta` (out, in),
    added in fp32 on the base's device before the one rounding to `dtype` (default: the base's compute dtype
    when quantized, else its weight dtype), then moved to `device` (default: the base's)."""
    quantized = is_quantized(base)
    w = base.dequantize(torch.float32) if quantized else base.weight.detach().float()
    dtype = dtype or ((base.compute_dtype or torch.float32) if quantized else base.weight.dtype)
    merged = w if delta is None else w + delta.to(w.device)
    bias = base.bias
    linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")  # no wasted init
    linear.weight = nn.Parameter(merged.to(device or w.device, dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(device or w.device, dtype), requires_grad=False)
    return linear


class _MergedGuard(torch.autograd.Function):
    """Identity on a merged layer's output that ties it to the (unused) LoRA factor, so a backward pass through
    a merged model says so instead of autograd's "does not require grad"."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, lora_weight: torch.Tensor) -> torch.Tensor:
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise RuntimeError("backward through a merged LoRA layer: its trainable LoRA factors are folded into the "
                           "base weight and would get no gradient. Call ml.unmerge_lora(model) before training (or "
                           "freeze the factors with requires_grad_(False) to train only other parameters)")
