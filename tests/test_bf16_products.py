"""benchmarks.bf16_products: bf16 products in fp32 give the native bf16 kernels' numbers (up to summation
order), in forward and backward, under autocast, including bitsandbytes' NF4 layer (peft's fidelity arm)."""
import contextlib

import pytest
import torch

from benchmarks.bf16_products import Bf16ProductsInFp32


def _step(layer, x, mode):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with mode, torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        scores = y @ y.transpose(-1, -2)
    with mode:
        scores.float().square().mean().backward()
    grads = [p.grad for p in layer.parameters() if p.grad is not None]
    return [scores, x.grad, *grads]


def _assert_same_up_to_summation_order(native, emulated):
    for a, b in zip(native, emulated, strict=True):
        assert a.dtype == b.dtype
        scale = a.float().abs().max()
        assert (a.float() - b.float()).abs().max() <= 2 ** -7 * scale  # one bf16 rounding step of the largest


def test_dense_products_match_native_bf16_in_forward_and_backward():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96).bfloat16()
    x = torch.randn(2, 24, 64)
    mode = Bf16ProductsInFp32()
    native, emulated = _step(layer, x, contextlib.nullcontext()), _step(layer, x, mode)
    assert mode.calls == 6  # addmm + bmm forward; 2 bmm + 2 mm backward
    _assert_same_up_to_summation_order(native, emulated)


def test_fp32_products_are_left_alone():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    mode = Bf16ProductsInFp32()
    with mode:
        out = a @ b
    assert mode.calls == 0 and torch.equal(out, a @ b)


def test_nf4_layer_products_are_caught():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 96, bias=False)
    layer = bnb.nn.Linear4bit(64, 96, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")
    x = torch.randn(2, 24, 64)
    mode = Bf16ProductsInFp32()
    emulated = _step(layer, x, mode)
    assert mode.calls >= 3
    _assert_same_up_to_summation_order(_step(layer, x, contextlib.nullcontext()), emulated)
