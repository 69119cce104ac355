"""The fused LoRA op: base outputs plus low-rank updates of layers fed one input, as one autograd node.

    y_i = base_i(x) + scaling_i * ((x * keep) @ A_i.T) @ B_i.T        for each layer i of the group

`minilora.lora.LoraLinear.reference_forward` is this formula in plain autograd; tests hold the two equal.
Written out by hand because autograd's version makes more passes over memory:
- the A factors of the group are stacked, so x meets them in one matmul forward and one backward;
- B's gradient is (A h)^T g without transposed copies, the scaling is folded into B^T once, the update is
  added with addmm (no separate product, scale and add passes);
- a frozen base given as `frozen[i]` (its weight as a function of the dtype: a dense weight or a
  dequantization) runs inside the node, so x's gradient is built in one buffer, g_1 W_1 + g_2 W_2 + ... +
  (grad of the A products) A * keep, where autograd would make and sum one tensor per term. A base may
  compute in a narrower dtype than x (`computes[i]`; QLoRA: bf16 products in an fp32 residual stream): its
  product takes x and W in that dtype and is rounded to it, as the base alone returns it, and the update is
  added in x's dtype, where a small update is not rounded away;
- a frozen weight is made again in backward (a dequantization stays transient), except inside a
  gradient-checkpointed block, where the recompute just made it: there it is saved (`ops.checkpointed`);
- a base that cannot run inside (trainable, hooked, under autocast) is computed by the caller and passed as
  `outs[i]`; the update is added into it in place where autograd allows, and its gradient flows back through
  autograd as usual.
The products run in the activation dtype (fp32 on CPUs without fast bf16 kernels, see `gemm`); the factors
keep their own dtype (fp32 master weights), and so do their gradients.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from minilora.ops import gemm
from minilora.ops.checkpointed import saves_are_recomputed

FrozenWeight = Callable[[torch.dtype], torch.Tensor]  # dtype -> the frozen (out, in) weight in that dtype


def lora_update(x: torch.Tensor, keep: torch.Tensor | None, scalings: Sequence[float],
                a_factors: Sequence[torch.Tensor], b_factors: Sequence[torch.Tensor],
                frozen: Sequence[FrozenWeight | None], biases: Sequence[torch.Tensor | None],
                outs: Sequence[torch.Tensor | None],
                computes: Sequence[torch.dtype | None] | None = None) -> list[torch.Tensor]:
    """y_i for each layer i: `frozen[i]` (with the frozen `biases[i]`) computes base_i here, or `outs[i]` is
    base_i(x) computed by the caller; `computes[i]` is the dtype a frozen base computes in (None: x's).
    keep: the 0/1 dropout mask of x (None: no dropout), its 1 / (1 - p) already in the scalings. All y_i
    share one dtype: x's when the bases run inside, else that of outs."""
    n = len(scalings)
    computes = tuple(computes or [None] * n)
    if not (len(a_factors) == len(b_factors) == len(frozen) == len(biases) == len(outs) == n):
        raise ValueError("lora_update: one scaling, A, B, frozen weight or None, bias and out per layer")
    if any((f is None) == (o is None) for f, o in zip(frozen, outs, strict=True)):
        raise ValueError("lora_update: each layer needs exactly one of a frozen weight and a computed output")
    frozen = tuple(None if f is None else (f, c) for f, c in zip(frozen, computes, strict=True))
    return list(_LoraUpdate.apply(x, keep, frozen, tuple(biases), tuple(scalings), *outs, *a_factors, *b_factors))


class _LoraUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, frozen, biases, scalings, *tensors):
        n = len(scalings)
        outs, a_factors, b_factors = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        dtype = next((out.dtype for out in outs if out is not None), x.dtype)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        mm = gemm.gemm_dtype(dtype, x.device, x2.shape[0])  # fp32 on CPUs without fast bf16 GEMMs
        keep2 = None if keep is None else keep.reshape(x2.shape).to(dtype)
        h2 = x2 if keep2 is None else x2 * keep2
        with torch.autocast(x.device.type, enabled=False):  # exactly `dtype`, even under autocast
            a_weight = torch.cat([a.to(dtype) for a in a_factors])  # (sum of ranks, in)
            # B.T scaled, (r, out): addmm's fast layout
            scaled_b_ts = [(b.t() * s).to(dtype).contiguous() for b, s in zip(b_factors, scalings, strict=True)]
            a_all = h2.to(mm) @ a_weight.to(mm).t()
            inputs = {}  # x in each compute dtype of the bases, converted once
            results, dirty, weights = [], [], []
            for base, bias, out, a, b_t in zip(frozen, biases, outs, a_all.split([a.shape[0] for a in a_factors], -1),
                                               scaled_b_ts, strict=True):
                if out is None:  # the frozen base runs here, in its compute dtype
                    weight, compute = base[0], base[1] or dtype
                    mm_base = gemm.gemm_dtype(compute, x.device, x2.shape[0])
                    if compute not in inputs:
                        inputs[compute] = x2.to(compute).to(mm_base)
                    bias = None if bias is None else bias.to(compute).to(mm_base)
                    weights.append(weight(compute))
                    y = F.linear(inputs[compute], weights[-1].to(mm_base), bias)
                    y = (y if compute == dtype else y.to(compute).to(mm)).addmm_(a, b_t.to(mm))
                    results.append(y.view(*x.shape[:-1], y.shape[-1]).to(dtype))
                    continue
                in_place = out.is_contiguous() and not out._is_view()  # fresh tensors frozen bases never save
                flat = out.view(-1, out.shape[-1]) if in_place else out.reshape(-1, out.shape[-1])
                if mm == dtype:
                    y = flat.addmm_(a, b_t) if in_place else torch.addmm(flat, a, b_t)
                else:  # the sum in fp32, rounded once, as a native bf16 addmm does
                    y = torch.addmm(flat.to(mm), a, b_t.to(mm)).to(dtype)
                    y = flat.copy_(y) if in_place else y
                results.append(out if in_place else y.view(out.shape))
                dirty += [out] if in_place else []
            ctx.mark_dirty(*dirty)
        ctx.weights_saved = saves_are_recomputed()
        ctx.save_for_backward(h2, keep2, a_all, a_weight, *scaled_b_ts, *(weights if ctx.weights_saved else ()))
        ctx.frozen, ctx.scalings, ctx.x_shape, ctx.x_dtype = frozen, scalings, x.shape, x.dtype
        ctx.factor_dtypes = ([a.dtype for a in a_factors], [b.dtype for b in b_factors])
        return tuple(results)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        h2, keep2, a_all, a_weight, *rest = ctx.saved_tensors
        n = len(grads)
        scaled_b_ts, saved_weights = rest[:n], iter(rest[n:])
        a_dtypes, b_dtypes = ctx.factor_dtypes
        dtype, mm = h2.dtype, a_all.dtype
        ranks = [b_t.shape[0] for b_t in scaled_b_ts]
        needs_out, needs_a, needs_b = (ctx.needs_input_grad[5 + i * n:5 + (i + 1) * n] for i in range(3))
        gs = [g.reshape(-1, g.shape[-1]).to(mm) for g in grads]
        grad_a = torch.cat([g @ b_t.to(mm).t() for g, b_t in zip(gs, scaled_b_ts, strict=True)], dim=-1)
        grad_x, grad_as, grad_bs = None, [None] * n, [None] * n
        if ctx.needs_input_grad[0]:
            for base, g in zip(ctx.frozen, gs, strict=True):  # the bases run inside: g_i @ W_i
                if base is None:
                    continue
                weight, compute = base[0], base[1] or dtype  # as the base's own backward: g and W in that dtype
                mm_base = gemm.gemm_dtype(compute, g.device, g.shape[0])
                w = (next(saved_weights) if ctx.weights_saved else weight(compute)).to(mm_base)
                g_in = g if compute == dtype else g.to(compute).to(mm_base)
                if mm_base == mm:
                    grad_x = g_in @ w if grad_x is None else grad_x.addmm_(g_in, w)
                else:
                    part = (g_in @ w).to(mm)
                    grad_x = part if grad_x is None else grad_x.add_(part)
            lora_grad = grad_a @ a_weight.to(mm)
            if keep2 is not None:
                grad_x = lora_grad.mul_(keep2) if grad_x is None else grad_x.addcmul_(lora_grad, keep2)
            else:
                grad_x = lora_grad if grad_x is None else grad_x.add_(lora_grad)
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        if any(needs_a):
            grad_as = [g.to(dt) for g, dt in zip((grad_a.t() @ h2.to(mm)).split(ranks), a_dtypes, strict=True)]
        if any(needs_b):
            grad_bs = [(a.t() @ g).t().to(dt) * s
                       for a, g, dt, s in zip(a_all.split(ranks, -1), gs, b_dtypes, ctx.scalings, strict=True)]
        grad_outs = [g if need else None for g, need in zip(grads, needs_out, strict=True)]
        return grad_x, None, None, None, None, *grad_outs, *grad_as, *grad_bs
