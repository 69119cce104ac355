"""Rotary position embedding applied with a hand-written backward (a rotation's transpose rotates back): two
passes each way instead of autograd's five. Tested against transformers' rotate_half formula."""
from __future__ import annotations

import torch


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1) for the halves x1, x2 of the last dim.

    x (batch, heads, seq, head_dim); cos, sin (batch, seq, head_dim) with equal halves, as rotary
    embeddings build them. Two passes each way instead of autograd's five (neg, cat, mul, mul, add).
    """
    return _Rotary.apply(x, cos.unsqueeze(1), sin.unsqueeze(1))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """cat(x1 * cos - sign * x2 * sin, x2 * cos + sign * x1 * sin) over the halves; sign -1 inverts."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[..., :half], sin[..., :half]
    out = torch.empty_like(x)
    torch.mul(x1, cos, out=out[..., :half]).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=out[..., half:]).addcmul_(x1, sin, value=sign)
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None  # a rotation's transpose rotates back
