"""LoRA layers whose frozen bases run inside the fused op (minilora.ops.lora_update) equal the path where the
base layer is called on its own and the op adds the update to its output, gradients summed by autograd."""
import copy

import pytest
import torch
from torch import nn

from minilora.lora import layer as lora
from minilora.ops import lora_update
from minilora.ops.linear_group import linear_group
from minilora.lora.layer import LoraLinear
from minilora.quant.layers import quantize_linear
from minilora.quant.config import QuantConfig


def frozen_linear(in_f, out_f, bias, dtype, quantized):
    layer = nn.Linear(in_f, out_f, bias=bias)
    if quantized:
        return quantize_linear(layer.weight, layer.bias, QuantConfig(compute_dtype=dtype))
    return layer.to(dtype).requires_grad_(False)


def group(dtype, quantized, p, shapes=((64, 4, False), (32, 2, False), (32, 4, True))):
    torch.manual_seed(0)
    return [LoraLinear(frozen_linear(64, out_f, bias, dtype, quantized), r=r, lora_alpha=8, lora_dropout=p,
                       init_lora_weights=False).train() for out_f, r, bias in shapes]


def run(layers, x, grads, fused, monkeypatch, grouped=True):
    """Outputs, x.grad and LoRA grads, the fused path on or off; counts the fused calls."""
    calls = []
    original = lora_update._LoraUpdate.forward

    def counting(ctx, *args):
        inside = sum(weight is not None for weight in args[2])  # bases computed inside the op
        if inside:
            calls.append(inside)
        return original(ctx, *args)

    with monkeypatch.context() as m:
        m.setattr(lora_update._LoraUpdate, "forward", staticmethod(counting))
        if not fused:
            m.setattr(lora, "runs_inside", lambda base, x: False)
        x = x.detach().clone().requires_grad_()
        torch.manual_seed(1)
        outs = linear_group(x, *layers) if grouped else [layer(x) for layer in layers]
        torch.autograd.backward(outs, grads)
    lora_grads = [getattr(layer, name).weight.grad for layer in layers for name in ("lora_A", "lora_B")]
    return outs, x.grad, lora_grads, calls


@pytest.mark.parametrize("quantized, dtype", [(False, torch.float32), (True, torch.bfloat16), (True, torch.float32)])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("grouped", [True, False])
def test_fused_bases_equal_the_plain_path(monkeypatch, quantized, dtype, p, grouped):
    layers = group(dtype, quantized, p)
    twins = copy.deepcopy(layers)
    x = torch.randn(3, 5, 64).to(dtype)
    grads = [torch.randn(3, 5, layer.out_features).to(dtype) for layer in layers]
    fused = run(layers, x, grads, True, monkeypatch, grouped)
    plain = run(twins, x, grads, False, monkeypatch, grouped)
    assert fused[3] == ([3] if grouped else [1, 1, 1]) and plain[3] == []
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    for a, b in zip([*fused[0], fused[1], *fused[2]], [*plain[0], plain[1], *plain[2]], strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


def test_frozen_input_gets_no_gradient_and_factors_still_do(monkeypatch):
    layers = group(torch.float32, False, 0.1)
    x = torch.randn(2, 64)  # e.g. the first layer's input: embeddings are frozen
    outs = linear_group(x, *layers)
    sum(o.sum() for o in outs).backward()
    assert x.grad is None and all(layer.lora_A.weight.grad is not None for layer in layers)


@pytest.mark.parametrize("why", ["trainable bias", "trainable weight", "hook", "autocast", "other dtype"])
def test_what_cannot_run_inside_takes_the_plain_path(monkeypatch, why):
    layers = group(torch.float32, False, 0.0)
    x = torch.randn(4, 64)
    if why == "trainable bias":
        layers[2].base_layer.bias.requires_grad_(True)
    elif why == "trainable weight":
        layers[0].base_layer.weight.requires_grad_(True)
    elif why == "hook":
        layers[1].base_layer.register_forward_hook(lambda *_: None)
    elif why == "other dtype":
        x = x.double()
    assert lora.runs_inside(layers[0].base_layer, x) == (why not in ("trainable weight", "other dtype"))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=why == "autocast"):
        runs_inside = [lora.runs_inside(layer.base_layer, x) for layer in layers]
        outs = linear_group(x, *layers) if why != "other dtype" else None
    assert not all(runs_inside)
    if outs is not None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=why == "autocast"):
            expected = [layer(x) for layer in layers]
        for out, ref in zip(outs, expected, strict=True):
            torch.testing.assert_close(out, ref)
