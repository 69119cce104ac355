"""An output head and its cross-entropy in one pass over row chunks: loss = CE(hidden @ W^T + b, targets).

The whole (tokens, vocab) logits are never held, nor their gradient: each chunk's logits give its
log-sum-exp and, when a backward will follow, right away its share of the gradients of the hidden states (and
of W and b when they train), while its softmax is at hand. On a 49152-token vocabulary at batch 4 x 256 that
is 0.4 GB of fp32 logits and gradient not allocated, written and read back each step. Same products, in the
same dtypes, as `causal_lm_loss(F.linear(hidden, W, b), labels)` (decoders) or `F.cross_entropy` of those
logits (T5); tested against them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minilora.ops import gemm

# Logits per chunk (a 64 MB fp32 chunk on the CPU, 256 MB elsewhere), and at least MIN_CHUNK_ROWS rows: the
# products of fewer rows with a whole output head run well below the matmul rate (CPU, fp32: 80 GFLOP/s at 85
# rows vs 107 at 341).
CHUNK_ELEMENTS = 1 << 24
DEVICE_CHUNK_ELEMENTS = 1 << 26
MIN_CHUNK_ROWS = 256


def causal_lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        bias: torch.Tensor | None = None, softcap: float | None = None,
                        ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy of the logits `hidden @ weight.T + bias` (then `tanh(logits / softcap) *
    softcap` when softcap is set), as transformers computes it: position t predicts labels[t + 1], mean over
    the labels that are not `ignore_index`. hidden (batch, seq, hidden), labels (batch, seq)."""
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels must be (batch, seq) = {tuple(hidden.shape[:2])} as the hidden states "
                         f"{tuple(hidden.shape)}, got {tuple(labels.shape)}")
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), bias, softcap,
                                ignore_index)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, softcap: float | None = None,
                         ignore_index: int = -100) -> torch.Tensor:
    """`F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)` of the logits `hidden @ weight.T +
    bias` (soft-capped when softcap is set): the mean over the targets that are not `ignore_index`, NaN when
    all are. hidden (N, hidden), targets (N,)."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be (N,) = ({hidden.shape[0]},) for hidden states (N, hidden) = "
                         f"{tuple(hidden.shape)}, got {tuple(targets.shape)}")
    targets = targets.to(hidden.device)
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= weight.shape[0]))
    if bad.any():
        raise ValueError(f"labels hold token id {int(targets[bad][0])}, outside the vocabulary [0, "
                         f"{weight.shape[0]}) and not the ignore index {ignore_index}")
    with_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets.where(valid, 0), valid, softcap, with_grad)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                valid: torch.Tensor, softcap: float | None, with_grad: bool) -> torch.Tensor:
        rows, vocab, device = hidden.shape[0], weight.shape[0], hidden.device
        chunk = CHUNK_ELEMENTS if device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
        step = min(rows, max(MIN_CHUNK_ROWS, chunk // vocab))
        # The unfused path's dtypes: logits in the hidden states' dtype (autocast's under autocast), products
        # in gemm_dtype's (fp32 for bf16 on CPUs without fast bf16 kernels); the head converted once.
        autocast = torch.is_autocast_enabled(device.type)
        logits_dtype = torch.get_autocast_dtype(device.type) if autocast else hidden.dtype
        dtype = logits_dtype if autocast else gemm.gemm_dtype(hidden.dtype, device, step)
        w = weight.to(dtype).t()
        b = None if bias is None else bias.to(dtype)
        # Every chunk's product goes into one buffer: a fresh chunk-sized tensor each time costs page faults.
        products = torch.empty(step, vocab, dtype=dtype, device=device)
        fp32 = products if dtype == torch.float32 else torch.empty(step, vocab, dtype=torch.float32, device=device)
        count = valid.sum()
        row_weight = (valid / count)[:, None]  # d loss / d logits = row_weight * (softmax - onehot(target))
        losses = torch.empty(rows, dtype=torch.float32, device=device)
        grad_hidden = torch.empty_like(hidden) if with_grad and hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_grad and weight.requires_grad else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if with_grad and bias is not None \
            and bias.requires_grad else None
        with torch.autocast(device.type, enabled=False):
            for start in range(0, rows, step):
                end = min(start + step, rows)
                x = hidden[start:end].to(dtype)
                logits = products[:end - start]
                logits = torch.mm(x, w, out=logits) if b is None else torch.addmm(b, x, w, out=logits)
                logits = logits.to(logits_dtype)
                if softcap is not None:
                    capped = torch.tanh(logits / softcap)
                    logits = capped * softcap
                target = targets[start:end, None]
                target_logits = logits.gather(1, target).float()
                # softmax in fp32, in place: the chunk's logits are not needed again
                probs = logits if logits.dtype == torch.float32 else fp32[:end - start].copy_(logits)
                top = probs.amax(dim=-1, keepdim=True)
                total = probs.sub_(top).exp_().sum(dim=-1, keepdim=True)
                losses[start:end] = (total.log() + top - target_logits).squeeze(1)
                if not with_grad:
                    continue
                grad = probs.mul_(row_weight[start:end] / total).scatter_add_(1, target, -row_weight[start:end])
                grad = grad.to(logits_dtype)
                if softcap is not None:  # d (tanh(l / c) * c) / dl = 1 - tanh(l / c)^2
                    grad = grad * (1 - capped * capped)
                grad = grad.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[start:end] = grad @ w.t()
                if grad_weight is not None:
                    grad_weight.addmm_(grad.t().float(), x.float())
                if grad_bias is not None:
                    grad_bias += grad.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return torch.where(valid, losses, 0.0).sum() / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight, grad_bias = (None if g is None else g * grad_loss.to(g.dtype)
                                               for g in ctx.saved_tensors)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None
