"""softmax(q k^T * scale + mask) v with grouped-query heads, for CPU training, where PyTorch's flash-attention
backward is slower than these six batched matmuls. The price is saving the attention probabilities
(batch * heads * q_len * kv_len values in the input dtype; about half of them under a causal mask, whose blocks
of queries skip the keys after them) for the backward pass. Tested against SDPA."""
from __future__ import annotations

import torch

from minilora.ops import gemm

# Query positions per block of causal attention: blocks skip the keys after them, at the price of more, smaller
# products (seq 256: 2 blocks, 3/4 of the products; seq 1024: 8 blocks, 9/16).
BLOCK_QUERIES = 128


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
    # Causal: queries in block [start, end) see no key at or past `end`, so their products with those keys
    # (about half of all, -inf after the mask) are skipped. Any other mask: one block of every query and key.
    causal = q_len == kv_len and not mask.triu(1).any()
    block = BLOCK_QUERIES if causal else q_len
    with torch.autocast(q.device.type, enabled=False):
        # Back in the inputs' dtype: in an fp32 model under autocast, o_proj's LoRA update is then added to
        # an fp32 base output, not rounded away in a bf16 one.
        return _Attention.apply(q, k, v, bias, q.shape[-1] ** -0.5 if scale is None else scale, block).to(dtype)


class _Attention(torch.autograd.Function):
    """Query heads are grouped by the key/value head they share, rows ordered by position then group: q
    (batch, kv_heads, q_len * groups, d), so each product is one batched matmul, the backward sums the groups'
    key/value gradients for free, and a block of query positions is a block of rows."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                block: int) -> torch.Tensor:
        batch, heads, q_len, head_dim = q.shape
        kv_heads = k.shape[1]
        groups = heads // kv_heads
        q = (q.view(batch, kv_heads, groups, q_len, head_dim).transpose(2, 3) * scale) \
            .reshape(batch, kv_heads, q_len * groups, head_dim)
        out = torch.empty_like(q)
        probs = []
        for start, end, rows, keys in _blocks(q_len, k.shape[2], block, groups):
            scores = gemm.matmul(q[:, :, rows], k[:, :, keys].transpose(-1, -2))
            scores = scores.view(batch, kv_heads, end - start, groups, -1)
            scores += bias[..., start:end, keys].unsqueeze(-2)  # (batch | 1, 1, positions, 1, keys)
            p = torch.softmax(scores, dim=-1).view(batch, kv_heads, (end - start) * groups, -1)
            out[:, :, rows] = gemm.matmul(p, v[:, :, keys])
            probs.append(p)
        ctx.save_for_backward(q, k, v, out, *probs)
        ctx.scale, ctx.block = scale, block
        return out.view(batch, kv_heads, q_len, groups, head_dim).transpose(2, 3).reshape(batch, heads, q_len, head_dim)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, *probs = ctx.saved_tensors
        batch, kv_heads, rows_total, head_dim = q.shape
        heads, q_len = grad_out.shape[1], grad_out.shape[2]
        groups = heads // kv_heads
        grad_out = grad_out.view(batch, kv_heads, groups, q_len, head_dim).transpose(2, 3) \
            .reshape(batch, kv_heads, rows_total, head_dim)
        # Softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O).
        # In the input dtype: fp32 mixed-dtype elementwise ops cost 3x the whole pass on CPU.
        delta = (grad_out * out).sum(-1, keepdim=True, dtype=torch.float32).to(q.dtype)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for (_, _, rows, keys), p in zip(_blocks(q_len, k.shape[2], ctx.block, groups), probs, strict=True):
            grad_v[:, :, keys] += gemm.matmul(p.transpose(-1, -2), grad_out[:, :, rows])
            grad_probs = gemm.matmul(grad_out[:, :, rows], v[:, :, keys].transpose(-1, -2))
            grad_scores = grad_probs.sub_(delta[:, :, rows]).mul_(p)
            grad_q[:, :, rows] = gemm.matmul(grad_scores, k[:, :, keys])
            grad_k[:, :, keys] += gemm.matmul(grad_scores.transpose(-1, -2), q[:, :, rows])
        grad_q = (grad_q * ctx.scale).view(batch, kv_heads, q_len, groups, head_dim).transpose(2, 3) \
            .reshape(batch, heads, q_len, head_dim)
        return grad_q, grad_k, grad_v, None, None, None


def _blocks(q_len: int, kv_len: int, block: int, groups: int):
    """(start, end, query rows, keys) of each block of `block` query positions: causal blocks see the keys
    before their end, a block of all queries sees every key."""
    for start in range(0, q_len, block):
        end = min(start + block, q_len)
        yield start, end, slice(start * groups, end * groups), slice(0, end if block < q_len else kv_len)
