"""DoRA (`use_dora=True`) against peft: init, outputs, loss and gradients (dense and NF4 bases), dropout,
merging, and adapters both ways."""
import copy

import pytest
import torch
from lora_helpers import (assert_bf16_close_grads, assert_same_training_signal, batch, copy_trainable, peft_qlora,
                          peft_twin, tiny_llama, trained_like)

import minilora as ml
from minilora.lora.dora import dora_forward

TARGETS = ["q_proj", "v_proj", "down_proj"]


def test_magnitudes_start_at_the_row_norms_and_the_model_at_its_base():
    base = tiny_llama()
    model = ml.apply_lora(copy.deepcopy(base), ml.LoraConfig(r=4, target_modules=TARGETS, use_dora=True))
    layer = model.model.layers[1].mlp.down_proj
    torch.testing.assert_close(layer.lora_magnitude_vector.weight, layer.weight.norm(dim=1))
    assert layer.lora_magnitude_vector.weight.requires_grad and not layer.weight.requires_grad
    ids = batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", ["none", "all"])
def test_outputs_loss_and_grads_equal_peft(bias):
    base = tiny_llama()  # q/k/v/o carry biases: DoRA rescales x W^T, not the bias
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, bias=bias, init_lora_weights=False, use_dora=True)
    ours = ml.apply_lora(copy.deepcopy(base), ml.LoraConfig(**kwargs))
    with torch.no_grad():  # magnitudes away from the norms, so the rescaling shows
        for layer in ours.modules():
            if isinstance(layer, ml.LoraLinear):
                layer.lora_magnitude_vector.weight.mul_(torch.linspace(0.5, 1.5, layer.out_features))
    theirs = peft_twin(ours, base, kwargs)
    g_ours = assert_same_training_signal(ours, theirs, batch(), batch(), loss_atol=1e-6, grad_atol=1e-6,
                                         grad_rtol=1e-5, logits_atol=1e-5)
    assert any("lora_magnitude_vector" in n for n in g_ours)
    assert ml.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()


def test_dropout_rescales_only_the_dropped_input_as_peft():
    """Under dropout peft's DoRA adds (m/n - 1) drop(x) W^T + m/n s B A drop(x) to base(x): its own layer,
    given the same dropped input, is the oracle for `dora_forward`."""
    from peft.tuners.lora.dora import DoraLinearLayer
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(12, 10)
    a, b = torch.randn(3, 12, generator=g), torch.randn(10, 3, generator=g)
    x = torch.randn(4, 12, generator=g)
    keep = (torch.rand(4, 12, generator=g) > 0.3).float()
    p, scaling = 0.3, 2.0
    dora = DoraLinearLayer(fan_in_fan_out=False)
    dora.update_layer(base_layer=base, lora_A=a, lora_B=b, scaling=scaling)
    magnitude = dora.weight.detach() * torch.linspace(0.5, 1.5, 10)
    dora.weight.data.copy_(magnitude)
    lora_a, lora_b = torch.nn.Linear(12, 3, bias=False), torch.nn.Linear(3, 10, bias=False)
    lora_a.weight.data.copy_(a)
    lora_b.weight.data.copy_(b)
    with torch.no_grad():
        expected = base(x) + dora(x * keep / (1 - p), lora_A=lora_a, lora_B=lora_b, scaling=scaling,
                                  base_layer=base, base_result=None)
        got = dora_forward(x, base(x), base.weight, base.bias, a, b, magnitude, scaling, keep, 1 / (1 - p))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        no_dropout = base(x) + dora(x, lora_A=lora_a, lora_B=lora_b, scaling=scaling, base_layer=base,
                                    base_result=base(x))
        torch.testing.assert_close(dora_forward(x, base(x), base.weight, base.bias, a, b, magnitude, scaling, None,
                                                1.0), no_dropout, atol=1e-5, rtol=1e-5)


def test_training_with_dropout_runs_and_is_seeded():
    model = ml.apply_lora(tiny_llama(), ml.LoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.2,
                                                      use_dora=True, init_lora_weights=False)).train()
    b = batch()
    losses = []
    for _ in range(2):
        torch.manual_seed(3)
        losses.append(model(**b).loss)
    assert losses[0].item() == losses[1].item()
    losses[0].backward()
    assert model.model.layers[0].self_attn.q_proj.lora_magnitude_vector.weight.grad.abs().sum() > 0


def test_merge_unmerge_and_unload_keep_outputs():
    base = tiny_llama()
    model = trained_like(ml.apply_lora(copy.deepcopy(base), ml.LoraConfig(target_modules="all-linear",
                                                                            use_dora=True)))
    ids = batch()["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        w0 = model.model.layers[0].self_attn.q_proj.weight.clone()
        ml.merge_lora(model)
        torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)
        ml.unmerge_lora(model)
        torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, w0, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)
        merged = ml.merge_and_unload(model)
        assert set(merged.state_dict()) == set(base.state_dict())
        torch.testing.assert_close(merged(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("direction", ["minilora->peft", "peft->minilora"])
def test_adapters_both_ways(tmp_path, direction):
    import peft
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    if direction == "minilora->peft":
        source = trained_like(ml.apply_lora(tiny_llama(), ml.LoraConfig(**kwargs)))
        ml.save_adapter(source, tmp_path)
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    else:
        source = trained_like(peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs))).eval()
        source.save_pretrained(tmp_path)
        loaded = ml.load_adapter(tiny_llama(), tmp_path)
        assert loaded.lora_config.use_dora
    ids = batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, source(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        assert (tiny_llama()(input_ids=ids).logits - source(input_ids=ids).logits).abs().max() > 1e-3


def test_adapter_without_magnitudes_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    source = trained_like(ml.apply_lora(tiny_llama(), ml.LoraConfig(r=4, target_modules=TARGETS, use_dora=True)))
    ml.save_adapter(source, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "magnitude" not in k}, weights)
    with pytest.raises(ValueError, match="missing LoRA tensors.*lora_magnitude_vector"):
        ml.load_adapter(tiny_llama(), tmp_path)


def test_qlora_dora_equals_peft_on_nf4(tmp_path):
    """DoRA on an NF4 base (quantize="nf4", QLoRA's fp32 residual) against transformers' NF4 + peft's
    prepare_model_for_kbit_training + DoRA: the same loss and gradients up to bf16 products."""
    pytest.importorskip("bitsandbytes")
    tiny_llama().to(torch.bfloat16).save_pretrained(tmp_path)
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, use_dora=True)
    ours = ml.apply_lora(ml.from_pretrained(tmp_path, quantize="nf4", device="cpu"), ml.LoraConfig(**kwargs))
    trained_like(ours).train()
    theirs = peft_qlora(tmp_path, kwargs)
    copy_trainable(theirs, ours)
    b = batch()
    got, expected = ours(**b).loss, theirs(**b).loss
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)
    got.backward()
    expected.backward()
    assert_bf16_close_grads(ours, theirs)
