"""The fused LoRA op equals the formula: `LoraLinear.forward` (fused, alone or grouped by linear_group) gives
the outputs and every gradient of `LoraLinear.reference_forward` (plain autograd), for dense, NF4 and int8
bases, fp32 and bf16, with and without dropout, and inside a model under gradient checkpointing."""
import copy

import pytest
import torch
from torch import nn

import minilora as ml
from minilora.lora.layer import LoraLinear
from minilora.ops.linear_group import linear_group
from minilora.quant.layers import quantize_linear
from minilora.quant.config import QuantConfig

SHAPES = ((64, 4, False), (32, 2, False), (32, 4, True))  # (out_features, r, bias): siblings of one input


def siblings(kind: str, dtype: torch.dtype, p: float) -> list[LoraLinear]:
    torch.manual_seed(0)
    layers = []
    for out_f, r, bias in SHAPES:
        base = nn.Linear(64, out_f, bias=bias)
        if kind == "dense":
            base = base.to(dtype).requires_grad_(False)
        else:
            base = quantize_linear(base.weight, base.bias, QuantConfig(quant_type=kind, compute_dtype=dtype))
        layers.append(LoraLinear(base, r=r, lora_alpha=8, lora_dropout=p, init_lora_weights=False).train())
    return layers


def outputs_and_grads(layers, x, grads, fused, grouped):
    x = x.detach().clone().requires_grad_()
    for layer in layers:
        layer.fused = fused
    torch.manual_seed(1)  # the same dropout masks both ways
    outs = linear_group(x, *layers) if grouped else [layer(x) for layer in layers]
    torch.autograd.backward(outs, grads)
    factor_grads = [getattr(layer, name).weight.grad for layer in layers for name in ("lora_A", "lora_B")]
    return [*outs, x.grad, *factor_grads]


@pytest.mark.parametrize("kind, dtype", [("dense", torch.float32), ("dense", torch.bfloat16),
                                         ("nf4", torch.float32), ("nf4", torch.bfloat16), ("int8", torch.float32)])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("grouped", [False, True])
def test_fused_equals_reference(kind, dtype, p, grouped):
    layers = siblings(kind, dtype, p)
    twins = copy.deepcopy(layers)
    x = torch.randn(3, 5, 64).to(dtype)
    grads = [torch.randn(3, 5, out_f).to(dtype) for out_f, _, _ in SHAPES]
    fused = outputs_and_grads(layers, x, grads, fused=True, grouped=grouped)
    reference = outputs_and_grads(twins, x, grads, fused=False, grouped=grouped)
    assert len(fused) == len(reference) == 3 + 1 + 6
    for got, want in zip(fused, reference, strict=True):
        assert got is not None and got.dtype == want.dtype
        if dtype == torch.bfloat16:  # the reference rounds each product to bf16; the fused op sums in fp32
            assert ((got.double() - want.double()).norm() / want.double().norm()).item() < 1e-2
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_reference_is_the_formula():
    layer = siblings("dense", torch.float32, 0.0)[2].eval()
    x = torch.randn(4, 64)
    layer.fused = False
    expected = layer.base_layer(x) + layer.lora_B(layer.lora_A(x)) * layer.scaling
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_fused_equals_reference_in_a_model_with_gradient_checkpointing(tmp_path, p):
    import transformers

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ids = torch.randint(3, 96, (2, 9))
    results = []
    for fused in (True, False):
        torch.manual_seed(2)  # the same LoRA factors both ways
        model = ml.apply_lora(ml.from_pretrained(tmp_path), ml.LoraConfig(
            r=4, target_modules="all-linear", lora_dropout=p, init_lora_weights=False))
        ml.enable_gradient_checkpointing(model)
        model.train()
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.fused = fused
        torch.manual_seed(3)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: q.grad for n, q in model.named_parameters() if q.requires_grad}))
    (loss_fused, grads_fused), (loss_ref, grads_ref) = results
    torch.testing.assert_close(loss_fused, loss_ref)
    assert grads_fused.keys() == grads_ref.keys() and len(grads_fused) == 2 * 2 * 7
    for name, grad in grads_fused.items():
        torch.testing.assert_close(grad, grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)
