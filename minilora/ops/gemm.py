"""The dtype that bf16 matrix products run in.

PyTorch multiplies bf16 matrices on the CPU with fast kernels only where the CPU has AVX512-BF16 or AMX; on
other CPUs (AVX2: many AMD EPYC / Ryzen and laptop chips) it falls back to a reference GEMM far slower than
fp32's (README, "Benchmarks"). There minilora's training layers multiply
bf16 tensors in fp32 and round each product to bf16 once. A native bf16 GEMM accumulates in fp32 too, so the
numbers are the same up to the order of summation; only speed (and the fp32 temporaries) differ.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def cpu_has_fast_bf16_gemm() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX) for PyTorch's kernels."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(probe is None for probe in probes):  # a PyTorch without the probes: trust its kernels
        return True
    return any(probe() for probe in probes if probe is not None)


# Below this many rows (decoding a token at a time) bf16's slow kernel still beats converting the weight.
FP32_MIN_ROWS = 16


def gemm_dtype(dtype: torch.dtype, device: torch.device, rows: int) -> torch.dtype:
    """`dtype`, or float32 for a product of `rows` bf16 rows on a CPU without fast bf16 kernels."""
    if dtype == torch.bfloat16 and device.type == "cpu" and rows >= FP32_MIN_ROWS and not cpu_has_fast_bf16_gemm():
        return torch.float32
    return dtype


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` with the product computed in `gemm_dtype` and returned in x's dtype
    (differentiable)."""
    dtype = gemm_dtype(x.dtype, x.device, x.numel() // max(x.shape[-1], 1))
    if dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
        return F.linear(x, weight, bias)
    bias = None if bias is None else bias.to(dtype)
    return F.linear(x.to(dtype), weight.to(dtype), bias).to(x.dtype)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` with the product computed in `gemm_dtype` and returned in a's dtype (inside autograd Functions)."""
    rows = a.numel() // max(a.shape[-1], 1) if b.dim() == 2 else a.shape[-2]  # a batched b: rows per product
    dtype = gemm_dtype(a.dtype, a.device, rows)
    if dtype == a.dtype:
        return a @ b
    return (a.to(dtype) @ b.to(dtype)).to(a.dtype)


def is_plain_linear(layer: nn.Module) -> bool:
    """Whether `layer` is an nn.Linear without hooks (not LoRA, not quantized): its product may be computed
    from its weight and bias by other means than calling it."""
    hooks = (layer._forward_hooks, layer._forward_pre_hooks, layer._backward_hooks, layer._backward_pre_hooks)
    return type(layer) is nn.Linear and not any(hooks)


def apply_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`, where a plain nn.Linear (an output head) computes through `linear`."""
    return linear(x, layer.weight, layer.bias) if is_plain_linear(layer) else layer(x)
