"""bf16 matrix products computed as fp32 products of the bf16 inputs, each output rounded to bf16 once.

A native bf16 GEMM accumulates in fp32 and rounds its output once, so this gives the same numbers up to the
order of summation (minilora/ops/gemm.py does the same inside minilora). The benchmarks use it to run peft's
bf16 recipe in the *fidelity* case on CPUs without fast bf16 kernels (AVX2), where PyTorch's reference bf16
GEMM makes one step of the hidden-4096 model take minutes. It changes which kernel runs, not the recipe, so it
is never used where speed is measured. tests/test_bf16_products.py checks it against the native kernels.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
PRODUCTS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}


def _is_bf16(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16


class Bf16ProductsInFp32(TorchDispatchMode):
    """Inside this context (forward and backward), every mm / addmm / bmm / baddbmm whose tensor arguments are
    all bf16 runs in fp32 and returns its result rounded to bf16."""

    calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if func in PRODUCTS and tensors and all(_is_bf16(t) for t in tensors):
            self.calls += 1
            upcast = [a.float() if _is_bf16(a) else a for a in args]
            return func(*upcast, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)
