"""The LoRA layer: y = base(x) + (B @ A)(dropout(x)) * scaling, wrapping a frozen base linear layer.

The base may be an `nn.Linear` or a quantized layer (NF4/int8): anything with `in_features`,
`out_features`, a forward, and either a `weight` (dense) or a `dequantize()` method for merging.

Training speed (where minilora and peft differ; peft gives the same results up to rounding and dropout draws):
- The LoRA matmuls run in the activation dtype (bf16 in a bf16 model; fp32 in a QLoRA model's fp32 residual
  stream, whose quantized bases compute in bf16); the factors stay fp32 master weights, cast per call, so
  their gradients and updates are fp32.
- Dropout masks come from 16 random bits per element (p rounded to a multiple of 1/65536), several times
  cheaper than `bernoulli_` on CPU, and the 1/(1-p) rescaling is folded into the LoRA scaling.
- LoRA layers fed the very same input tensor (q/k/v, gate/up) share one dropout mask and one dropped
  input (`LoraLinear.share_dropout_mask`); peft draws one mask per layer. Each layer's dropout has the
  same distribution either way; only the masks' correlation across sibling layers differs. Model code
  that calls such siblings through `shared_input` also gets their A projections in one matmul.
- A frozen base layer (nn.Linear or quantized) runs inside the LoRA layer's autograd node
  (`_LoraLinearFn`), so the input gradient of the bases and of the LoRA branch lands in one buffer.
- On CPUs without fast bf16 kernels the bf16 products run in fp32, rounded once (`minilora.ops.gemm`).
"""
from __future__ import annotations

import math
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minilora.ops import gemm

DROPOUT_RESOLUTION = 1 << 16  # dropout probabilities are rounded to multiples of 1 / 65536


def random_words(n: int, device: torch.device) -> torch.Tensor:
    """n uniform random int64 words, decided by torch's default generator (`torch.manual_seed`, gradient
    checkpointing's RNG replay). On CPU they come from numpy's PCG64 seeded by one torch draw: 2.5x faster
    than torch.randint's serial mt19937, the cost that made per-layer dropout masks expensive."""
    if device.type != "cpu":
        return torch.randint(-(1 << 63), (1 << 63) - 1, (n,), dtype=torch.int64, device=device)
    seed = int(torch.randint(0, 1 << 62, ()))
    return torch.from_numpy(np.random.PCG64(seed).random_raw(n).view(np.int64))


def dropout_keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A 0/1 mask shaped and typed like x keeping each element with probability 1 - p', and p' (p rounded to a
    multiple of 1/65536)."""
    drop = round(p * DROPOUT_RESOLUTION)
    n = x.numel()
    draws = random_words((n + 3) // 4, x.device).view(torch.int16)[:n].view(x.shape)  # 4 draws per word
    keep = torch.empty_like(x, memory_format=torch.contiguous_format)
    torch.ge(draws, drop - DROPOUT_RESOLUTION // 2, out=keep)  # comparisons into a float tensor: no bool pass
    return keep, drop / DROPOUT_RESOLUTION


class _LastDropout:
    """The last dropout mask drawn, so LoRA layers that get the very same tensor (unchanged since) reuse it.

    Holds the input weakly (an entry dies with its input) and the mask strongly: whether a sibling reuses it
    must not depend on autograd keeping it, or gradient checkpointing's replay would draw a different number
    of masks than the forward did. A layer never reuses an entry twice, so calling one layer again on the
    same tensor draws a new mask, as nn.Dropout would.
    """

    def __init__(self):
        self.entry = None  # (weakref to input, input._version, p, mask, effective p, user ids)

    def get(self, layer: nn.Module, x: torch.Tensor, p: float) -> tuple[torch.Tensor, float] | None:
        if self.entry is None:
            return None
        ref, version, entry_p, keep, p_eff, users = self.entry
        if ref() is not x or x._version != version or entry_p != p or id(layer) in users:
            return None
        users.add(id(layer))
        return keep, p_eff

    def put(self, layer: nn.Module, x: torch.Tensor, p: float, keep: torch.Tensor, p_eff: float) -> None:
        def forget(ref):
            if self.entry is not None and self.entry[0] is ref:
                self.entry = None

        self.entry = (weakref.ref(x, forget), x._version, p, keep, p_eff, {id(layer)})


_last_dropout = _LastDropout()


class _LoraUpdate(torch.autograd.Function):
    """outs[i] + scalings[i] * (h @ A_i.T) @ B_i.T for LoRA layers sharing the input h, in the outputs' dtype;
    the factors A_i, B_i get gradients in their own dtype. One layer, or several (`shared_input`): their A
    factors are stacked, so h meets them in one matmul forward and one backward.

    Written out because autograd's version costs ~2x on CPU: it computes B's gradient as the slow
    transposed product g.T @ a, multiplies by the scaling as an extra pass, and adds B's product separately.
    Updates are added into the base outputs in place (fresh tensors that frozen base layers never save)
    when autograd allows it: an out-of-place addmm would first copy them whole.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, scalings: tuple[float, ...], *tensors: torch.Tensor):
        n = len(scalings)
        outs, a_factors, b_factors = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        dtype = outs[0].dtype
        mm = gemm.gemm_dtype(dtype, h.device, h.numel() // h.shape[-1])  # fp32 on CPUs without fast bf16 GEMMs
        with torch.autocast(h.device.type, enabled=False):  # exactly the outputs' dtype, even under autocast
            h2 = h.reshape(-1, h.shape[-1]).to(dtype)
            a_weight = torch.cat([a.to(dtype) for a in a_factors])  # (sum of ranks, in)
            # B.T scaled, (r, out): addmm's fast layout
            scaled_b_ts = [(b.t() * s).to(dtype).contiguous() for b, s in zip(b_factors, scalings, strict=True)]
            a_all = h2.to(mm) @ a_weight.to(mm).t()
            results, dirty = [], []
            ranks = [a.shape[0] for a in a_factors]
            for out, a, b_t in zip(outs, a_all.split(ranks, -1), scaled_b_ts, strict=True):
                in_place = out.is_contiguous() and not out._is_view()
                flat = out.view(-1, out.shape[-1]) if in_place else out.reshape(-1, out.shape[-1])
                if mm == dtype:
                    result = flat.addmm_(a, b_t) if in_place else torch.addmm(flat, a, b_t)
                else:  # the sum in fp32, rounded once, as a native bf16 addmm does
                    result = torch.addmm(flat.to(mm), a, b_t.to(mm)).to(dtype)
                    result = flat.copy_(result) if in_place else result
                results.append(out if in_place else result.view(out.shape))
                dirty += [out] if in_place else []
            ctx.mark_dirty(*dirty)
        ctx.save_for_backward(h2, a_all, a_weight, *scaled_b_ts)
        ctx.scalings, ctx.h_shape = scalings, h.shape
        ctx.dtypes = (h.dtype, [a.dtype for a in a_factors], [b.dtype for b in b_factors])
        return tuple(results)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        h2, a_all, a_weight, *scaled_b_ts = ctx.saved_tensors
        h_dtype, a_dtypes, b_dtypes = ctx.dtypes
        n, ranks = len(grads), [b_t.shape[0] for b_t in scaled_b_ts]
        mm = a_all.dtype
        gs = [g.reshape(-1, g.shape[-1]).to(mm) for g in grads]
        grad_a = torch.cat([g @ b_t.to(mm).t() for g, b_t in zip(gs, scaled_b_ts, strict=True)], dim=-1)
        grad_h, grad_as, grad_bs = None, [None] * n, [None] * n
        if ctx.needs_input_grad[0]:
            grad_h = (grad_a @ a_weight.to(mm)).view(ctx.h_shape).to(h_dtype)
        if any(ctx.needs_input_grad[2 + n:2 + 2 * n]):
            grad_as = [g.to(dt) for g, dt in zip((grad_a.t() @ h2.to(mm)).split(ranks), a_dtypes, strict=True)]
        if any(ctx.needs_input_grad[2 + 2 * n:]):
            grad_bs = [(a.t() @ g).t().to(dt) * s
                       for a, g, dt, s in zip(a_all.split(ranks, -1), gs, b_dtypes, ctx.scalings, strict=True)]
        grad_outs = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[2:2 + n], strict=True)]
        return grad_h, None, *grad_outs, *grad_as, *grad_bs


def _runs_inside(base: nn.Module, x: torch.Tensor) -> bool:
    """Whether _LoraLinearFn can compute `base` itself: a frozen nn.Linear in x's dtype or a quantized linear
    layer (any compute dtype) that dequantizes, with a frozen bias (or none) and no hooks, outside autocast."""
    if base._forward_hooks or base._forward_pre_hooks or torch.is_autocast_enabled(x.device.type):
        return False
    bias = base.bias
    if bias is not None and bias.requires_grad:
        return False
    if type(base) is nn.Linear:
        return not base.weight.requires_grad and base.weight.dtype == x.dtype
    from minilora.quant.layers import QuantizedLinear

    return (isinstance(base, QuantizedLinear)
            and not base.uses_bnb_matmul(x, bias))  # bitsandbytes' kernels (CUDA) run in the base's forward


def _weight_in(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    return base.dequantize(dtype) if hasattr(base, "dequantize") else base.weight


def _compute_dtype(base: nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The dtype `base`'s product runs in for inputs of `dtype`: a quantized layer's compute dtype, else `dtype`."""
    return getattr(base, "compute_dtype", None) or dtype


class _LoraLinearFn(torch.autograd.Function):
    """base_i(x) + scaling_i * (dropout(x) @ A_i.T) @ B_i.T for frozen base layers (see `_runs_inside`) fed the
    same input x, as one autograd node: what `_LoraUpdate` adds to base outputs, with the bases inside.

    Owning the bases lets the backward build x's gradient in one buffer, g_1 @ W_1 + g_2 @ W_2 + ... +
    ((grad of the A products) @ A) * mask, with in-place addmm/addcmul, where autograd would make one tensor
    per contribution plus a dropout-mask pass and sum them. Quantized weights are dequantized again in
    backward, as `quant._FrozenLinearFn` does. `keep` is the dropout mask (None: no dropout).

    A quantized base may compute in a narrower dtype than x (QLoRA: bf16 products in an fp32 residual stream):
    its product then takes x and the weight in that dtype and is rounded to it, as the quantized layer alone
    returns it, before the LoRA update is added in x's dtype, where a small update is not rounded away.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor | None, bases: tuple[nn.Module, ...],
                scalings: tuple[float, ...], *factors: torch.Tensor):
        n, dtype = len(bases), x.dtype
        a_factors, b_factors = factors[:n], factors[n:]
        x2 = x.reshape(-1, x.shape[-1])
        mm = gemm.gemm_dtype(dtype, x.device, x2.shape[0])  # fp32 on CPUs without fast bf16 kernels (minilora.ops.gemm)
        keep2 = None if keep is None else keep.reshape(x2.shape)
        h2 = x2 if keep2 is None else x2 * keep2
        a_weight = torch.cat([a.to(dtype) for a in a_factors])  # (sum of ranks, in)
        scaled_b_ts = [(b.t() * s).to(dtype).contiguous() for b, s in zip(b_factors, scalings, strict=True)]
        a_all = h2.to(mm) @ a_weight.to(mm).t()
        inputs: dict[torch.dtype, torch.Tensor] = {}  # x in each compute dtype of the bases, converted once
        outs = []
        for base, a, b_t in zip(bases, a_all.split([a.shape[0] for a in a_factors], -1), scaled_b_ts, strict=True):
            compute = _compute_dtype(base, dtype)
            mm_base = gemm.gemm_dtype(compute, x.device, x2.shape[0])
            if compute not in inputs:
                inputs[compute] = x2.to(compute).to(mm_base)
            bias = None if base.bias is None else base.bias.to(compute).to(mm_base)
            out = F.linear(inputs[compute], _weight_in(base, compute).to(mm_base), bias)
            if compute != dtype:
                out = out.to(compute).to(mm)
            out = out.addmm_(a, b_t.to(mm))
            outs.append(out.view(*x.shape[:-1], out.shape[-1]).to(dtype))
        ctx.save_for_backward(h2, keep2, a_all, a_weight, *scaled_b_ts)
        ctx.bases, ctx.scalings, ctx.x_shape = bases, scalings, x.shape
        ctx.dtypes = ([a.dtype for a in a_factors], [b.dtype for b in b_factors])
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        h2, keep2, a_all, a_weight, *scaled_b_ts = ctx.saved_tensors
        a_dtypes, b_dtypes = ctx.dtypes
        dtype, mm = h2.dtype, a_all.dtype
        n, ranks = len(grads), [b_t.shape[0] for b_t in scaled_b_ts]
        gs = [g.reshape(-1, g.shape[-1]).to(mm) for g in grads]
        grad_a = torch.cat([g @ b_t.to(mm).t() for g, b_t in zip(gs, scaled_b_ts, strict=True)], dim=-1)
        grad_x, grad_as, grad_bs = None, [None] * n, [None] * n
        if ctx.needs_input_grad[0]:
            for base, g in zip(ctx.bases, gs, strict=True):
                compute = _compute_dtype(base, dtype)  # as the base's own backward: g and W in that dtype
                mm_base = gemm.gemm_dtype(compute, g.device, g.shape[0])
                weight = _weight_in(base, compute).to(mm_base)
                g_in = g if compute == dtype else g.to(compute).to(mm_base)
                if mm_base == mm:
                    grad_x = g_in @ weight if grad_x is None else grad_x.addmm_(g_in, weight)
                else:
                    part = (g_in @ weight).to(mm)
                    grad_x = part if grad_x is None else grad_x.add_(part)
            lora_grad = grad_a @ a_weight.to(mm)
            grad_x = grad_x.add_(lora_grad) if keep2 is None else grad_x.addcmul_(lora_grad, keep2)
            grad_x = grad_x.view(ctx.x_shape).to(dtype)
        if any(ctx.needs_input_grad[4:4 + n]):
            grad_as = [g.to(dt) for g, dt in zip((grad_a.t() @ h2.to(mm)).split(ranks), a_dtypes, strict=True)]
        if any(ctx.needs_input_grad[4 + n:]):
            grad_bs = [(a.t() @ g).t().to(dt) * s
                       for a, g, dt, s in zip(a_all.split(ranks, -1), gs, b_dtypes, ctx.scalings, strict=True)]
        return grad_x, None, None, None, *grad_as, *grad_bs


@torch.no_grad()
def dense_linear(base: nn.Module, delta: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> nn.Linear:
    """A frozen plain nn.Linear holding `base`'s weight (dequantized when quantized) plus `delta` (out, in),
    added in fp32 on the base's device before the one rounding to `dtype` (default: the base's compute dtype
    when quantized, else its weight dtype), then moved to `device` (default: the base's)."""
    quantized = hasattr(base, "dequantize")
    w = base.dequantize(torch.float32) if quantized else base.weight.detach().float()
    dtype = dtype or ((getattr(base, "compute_dtype", None) or torch.float32) if quantized else base.weight.dtype)
    merged = w if delta is None else w + delta.to(w.device)
    bias = getattr(base, "bias", None)
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


class LoraLinear(nn.Module):
    """A base linear layer plus a trainable low-rank update.

    The base layer is wrapped, not copied, and it keeps its state-dict keys: this module shares the base's
    `_parameters` and `_buffers` dicts, so `q_proj.weight` stays `q_proj.weight` (no `base_layer.` infix)
    while the LoRA factors live at `q_proj.lora_A.weight` and `q_proj.lora_B.weight`.
    """

    share_dropout_mask: bool = True  # set False (on the class or one layer) for peft's one mask per layer

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
        if self.merged:
            out = gemm.apply_linear(self.base_layer, x)
            trainable = torch.is_grad_enabled() and self.lora_A.weight.requires_grad
            return _MergedGuard.apply(out, self.lora_A.weight) if trainable else out
        keep, scaling = self._dropout_mask(x)
        if _runs_inside(self.base_layer, x):
            return _LoraLinearFn.apply(x, keep, (self.base_layer,), (scaling,), self.lora_A.weight,
                                       self.lora_B.weight)[0]
        out = gemm.apply_linear(self.base_layer, x)
        h = x if keep is None else x * keep
        return _LoraUpdate.apply(h, (scaling,), out, self.lora_A.weight, self.lora_B.weight)[0]

    def _dropout_mask(self, x: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """The LoRA input's 0/1 dropout mask (None without dropout), and the scaling with dropout's
        1 / (1 - p) folded in."""
        dropout = self.lora_dropout
        if dropout is None or not dropout.training or dropout.p == 0:
            return None, self.scaling
        share = self.share_dropout_mask and not x.is_inference()  # inference tensors have no version counter
        shared = _last_dropout.get(self, x, dropout.p) if share else None
        if shared is None:
            shared = dropout_keep_mask(x, dropout.p)
            if share:
                _last_dropout.put(self, x, dropout.p, *shared)
        keep, p_eff = shared
        return keep, self.scaling / (1 - p_eff)

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

    def merged_linear(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> nn.Linear:
        """A plain nn.Linear equal to this layer (base dequantized, LoRA added in fp32), see `dense_linear`."""
        return dense_linear(self.base_layer, None if self.merged else self.delta_weight(), dtype, device)

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


def shared_input(x: torch.Tensor, *layers: nn.Module) -> list[torch.Tensor]:
    """`[layer(x) for layer in layers]` for layers fed the same input, e.g. q/k/v or gate/up projections.

    Their LoRA branches run as one: one dropout mask (as `LoraLinear.share_dropout_mask` gives anyway), and
    the stacked A factors meet x in one matmul forward and one backward. Layers that are not LoraLinear, are
    merged or carry module hooks are simply called.
    """
    grouped = [layer for layer in layers if isinstance(layer, LoraLinear) and not layer.merged
               and not (layer._forward_hooks or layer._forward_pre_hooks)]
    if len(grouped) < 2:
        return [gemm.apply_linear(layer, x) for layer in layers]
    masks = [layer._dropout_mask(x) for layer in grouped]
    factors = [layer.lora_A.weight for layer in grouped] + [layer.lora_B.weight for layer in grouped]
    scalings = tuple(s for _, s in masks)
    if all(keep is masks[0][0] for keep, _ in masks) and all(_runs_inside(layer.base_layer, x) for layer in grouped):
        results = _LoraLinearFn.apply(x, masks[0][0], tuple(layer.base_layer for layer in grouped), scalings,
                                      *factors)
    else:
        outs = [gemm.apply_linear(layer.base_layer, x) for layer in grouped]
        products = {id(keep): x * keep for keep, _ in masks if keep is not None}  # one per distinct mask
        dropped = [x if keep is None else products[id(keep)] for keep, _ in masks]
        if all(keep is masks[0][0] for keep, _ in masks) and len({out.dtype for out in outs}) == 1:
            results = _LoraUpdate.apply(dropped[0], scalings, *outs, *factors)
        else:  # a layer opted out of the shared mask
            results = [_LoraUpdate.apply(h, (s,), out, layer.lora_A.weight, layer.lora_B.weight)[0]
                       for h, s, out, layer in zip(dropped, scalings, outs, grouped, strict=True)]
    by_layer = {id(layer): result for layer, result in zip(grouped, results, strict=True)}
    return [by_layer[id(layer)] if id(layer) in by_layer else gemm.apply_linear(layer, x) for layer in layers]
