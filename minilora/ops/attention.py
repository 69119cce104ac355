"""softmax(q k^T * scale + mask) v with grouped-query heads, for CPU training, where PyTorch's flash-attention
backward is slower than these six batched matmuls. The price is saving the attention probabilities
(batch * heads * q_len * kv_len values in the input dtype) for the backward pass. Tested against SDPA."""
from __future__ import annotations

import torch

from minilora.ops import gemm


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, the math of `F.scaled_dot_product_attention` (scale: 1 / sqrt(head_dim)
    when None).

    q (batch, heads, q_len, head_dim); k, v (batch, kv_heads, kv_len, head_dim) where heads is a multiple of
    kv_heads (query head h uses key/value head h // (heads // kv_heads), no repeat needed). mask: None for
    causal attention (q_len == kv_len), else a boolean (batch | 1, 1, q_len, kv_len) tensor, True = may
    attend. Every query must see at least one key. Probabilities are rounded to the input dtype before the
    matmul with v, as transformers' eager attention does.
    """
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if heads % kv_heads or v.shape != k.shape:
        raise ValueError(f"attention: q {tuple(q.shape)} needs k and v of one shape with a divisor of its "
                         f"{heads} heads, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if mask is None:
        if q_len != kv_len:
            raise ValueError(f"attention: causal attention without a mask needs q_len == kv_len, got {q_len} "
                             f"and {kv_len}")
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril()[None, None]
    dtype = q.dtype
    if torch.is_autocast_enabled(q.device.type):  # what autocast does to SDPA; no autocast inside
        q, k, v = (t.to(torch.get_autocast_dtype(q.device.type)) for t in (q, k, v))
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    with torch.autocast(q.device.type, enabled=False):
        # Back in the inputs' dtype: in an fp32 model under autocast, o_proj's LoRA update is then added to
        # an fp32 base output, not rounded away in a bf16 one.
        return _Attention.apply(q, k, v, bias, q.shape[-1] ** -0.5 if scale is None else scale).to(dtype)


class _Attention(torch.autograd.Function):
    """Query heads are grouped by the key/value head they share: q (batch, kv_heads, groups * q_len, d), so
    each product is one batched matmul and the backward sums the groups' key/value gradients for free."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                scale: float) -> torch.Tensor:
        batch, heads, q_len, head_dim = q.shape
        kv_heads, kv_len = k.shape[1], k.shape[2]
        groups = heads // kv_heads
        q = (q * scale).reshape(batch, kv_heads, groups * q_len, head_dim)
        scores = gemm.matmul(q, k.transpose(-1, -2)).view(batch, kv_heads, groups, q_len, kv_len)
        scores += bias.unsqueeze(1)  # (batch | 1, 1, 1, q_len, kv_len)
        probs = torch.softmax(scores, dim=-1).view(batch, kv_heads, groups * q_len, kv_len)
        out = gemm.matmul(probs, v).view(batch, heads, q_len, head_dim)
        ctx.save_for_backward(q, k, v, probs, out)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, probs, out = ctx.saved_tensors
        batch, kv_heads, rows, head_dim = q.shape
        grad_out = grad_out.reshape(batch, kv_heads, rows, head_dim)
        grad_v = gemm.matmul(probs.transpose(-1, -2), grad_out)
        grad_probs = gemm.matmul(grad_out, v.transpose(-1, -2))
        # Softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O).
        # In the input dtype: fp32 mixed-dtype elementwise ops cost 3x the whole pass on CPU.
        delta = (grad_out * out.view_as(grad_out)).sum(-1, keepdim=True, dtype=torch.float32)
        grad_scores = grad_probs.sub_(delta.to(q.dtype)).mul_(probs)
        grad_q = gemm.matmul(grad_scores, k) * ctx.scale
        grad_k = gemm.matmul(grad_scores.transpose(-1, -2), q)
        return grad_q.view(out.shape), grad_k, grad_v, None, None
