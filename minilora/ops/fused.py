"""Training ops with hand-written backward passes, for memory and CPU speed; plain PyTorch, any device.

- `cross_entropy`: the mean cross-entropy of bf16/fp32 logits over a large vocabulary, and its gradient,
  in one chunked pass through a small fp32 buffer, instead of the several full fp32 copies of the logits
  that `F.cross_entropy(logits.float(), ...)` makes in forward and backward (~4x faster on a 49152-token
  vocabulary; at batch 4 x 256 it needs 0.1 GB beside the logits, not 0.6 GB).
- `rms_norm`, `rotary`: transformers' RMSNorm and rotary embeddings with hand-written backward passes
  (fewer passes over memory than autograd's chains of small ops, ~1.5x faster).
- `attention`: softmax(q k^T / sqrt(d) + mask) v with grouped-query heads, for CPU training: PyTorch's CPU
  flash-attention backward is ~2x slower than these six batched matmuls. The price is saving the attention
  probabilities (batch * heads * q_len * kv_len values in the input dtype) for the backward pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minilora.ops import gemm

# Logits per cross-entropy chunk. CPU: a 1 MB fp32 buffer that stays in L2 cache. Other devices (GPUs): few,
# large chunks (a 64 MB buffer), so a batch of logits takes a handful of kernel launches, not hundreds.
CHUNK_ELEMENTS = 1 << 18
DEVICE_CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------------------------
# Cross-entropy


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """`F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)` (mean over the non-ignored
    rows; NaN when every row is ignored) without the fp32 copies. logits (N, vocab), targets (N,)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy expects logits (N, vocab) and targets (N,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= logits.shape[1]))
    if bad.any():
        raise ValueError(f"labels hold token id {int(targets[bad][0])}, outside the vocabulary [0, "
                         f"{logits.shape[1]}) and not the ignore index {ignore_index}")
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    return _CrossEntropy.apply(logits, targets.where(valid, 0), valid, with_grad)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy as transformers computes it: position t predicts labels[t + 1], mean over
    the labels that are not `ignore_index`. logits (batch, seq, vocab), labels (batch, seq)."""
    # Shift the labels, not the logits: logits[:, :-1] would copy the whole tensor to flatten it.
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device), ignore_index)


class _CrossEntropy(torch.autograd.Function):
    """One pass over the logits, in row chunks through a reused fp32 buffer (CHUNK_ELEMENTS on the CPU,
    DEVICE_CHUNK_ELEMENTS elsewhere): each chunk's softmax gives its log-sum-exp and, when a backward will
    follow, its gradient right away."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                with_grad: bool) -> torch.Tensor:
        chunk = CHUNK_ELEMENTS if logits.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
        rows = max(1, chunk // logits.shape[1])
        buffer = torch.empty(min(rows, logits.shape[0]), logits.shape[1], dtype=torch.float32, device=logits.device)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        count = valid.sum()
        weight = valid / count  # d loss / d logits = weight * (softmax - onehot(target)), row by row
        grad = torch.empty_like(logits) if with_grad else None
        for start in range(0, logits.shape[0], rows):
            end = min(start + rows, logits.shape[0])
            probs = buffer[: end - start].copy_(logits[start:end])
            top = probs.amax(dim=-1, keepdim=True)
            total = probs.sub_(top).exp_().sum(dim=-1, keepdim=True)
            lse[start:end] = (total.log() + top).squeeze(1)
            if grad is not None:
                row_weight = weight[start:end, None]
                probs.mul_(row_weight / total).scatter_add_(1, targets[start:end, None], -row_weight)
                grad[start:end] = probs
        target_logits = logits.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(grad)
        return torch.where(valid, lse - target_logits, 0.0).sum() / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors  # not None: without grad mode there is no graph to call this
        # Scaled by grad_loss (e.g. loss / accumulation_steps): one more rounding in bf16. On the CPU a factor
        # of 1 skips that pass; elsewhere reading it back would stall the device, and x * 1 is exact anyway.
        if grad.device.type != "cpu" or grad_loss.item() != 1.0:
            grad = grad * grad_loss.to(grad.dtype)
        return grad, None, None, None


# --------------------------------------------------------------------------------------------------------
# RMSNorm


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) as transformers' Llama computes it: normalised in fp32, cast to
    x's dtype, then scaled by weight. Forward ops are transformers'; the backward is one function instead of
    autograd's ten nodes and saves x rather than its fp32 copy."""
    return _RMSNorm.apply(x, weight, eps)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            # y = x * r with r = (mean(x^2) + eps)^-1/2:  dy/dx . g = r * (g - x * r^2 * mean(g * x))
            g = (grad * weight).float()
            x32 = x.float()
            coef = rstd.pow(2) * (g * x32).mean(-1, keepdim=True)
            grad_x = g.addcmul_(x32, coef, value=-1).mul_(rstd).to(x.dtype)
        if ctx.needs_input_grad[1]:
            normed = (x.float() * rstd).to(x.dtype)
            grad_weight = (grad * normed).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_weight, None


# --------------------------------------------------------------------------------------------------------
# Rotary position embedding


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


# --------------------------------------------------------------------------------------------------------
# Attention


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
