import copy
import subprocess
import sys

import pytest
import torch
from lora_helpers import assert_same_training_signal, batch, peft_twin, tiny_bert_cls, tiny_llama
from torch import nn

import minilora as ml

# ---------------------------------------------------------------- config validation

@pytest.mark.parametrize("kwargs, word", [
    (dict(r=0), "r"), (dict(r=-2), "r"), (dict(r=2.5), "r"), (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(lora_dropout=-0.1), "lora_dropout"), (dict(bias="some"), "bias"), (dict(lora_alpha=0), "lora_alpha"),
    (dict(init_lora_weights="pissa"), "init_lora_weights"), (dict(target_modules=[]), "target_modules"),
])
def test_invalid_config_names_the_field(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ml.LoraConfig(**kwargs)


def test_scaling_plain_and_rslora():
    assert ml.LoraConfig(r=16, lora_alpha=32).scaling == 2.0
    assert ml.LoraConfig(r=16, lora_alpha=32, use_rslora=True).scaling == 8.0


# ---------------------------------------------------------------- injection

def test_state_dict_keys_keep_hf_names_and_base_is_frozen():
    model = ml.apply_lora(tiny_llama(), ml.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    keys = set(model.state_dict())
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert "model.layers.0.self_attn.q_proj.bias" in keys
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "model.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert not any("base_layer" in k for k in keys)
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.0.self_attn.q_proj.weight" in names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{m}_proj.lora_{ab}.weight"
                         for i in range(2) for m in "qv" for ab in "AB"}


def test_full_hf_state_dict_loads_into_lora_model():
    base = tiny_llama()
    sd = copy.deepcopy(base.state_dict())
    model = ml.apply_lora(tiny_llama(seed=5), ml.LoraConfig(r=4, target_modules=["q_proj"]))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert unexpected == [] and all("lora_" in k for k in missing)
    q_ours, q_base = model.model.layers[0].self_attn.q_proj, base.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q_ours.weight, q_base.weight)


def test_target_selection_modes():
    def targets(cfg, model=None):
        m = ml.apply_lora(model or tiny_llama(), cfg)
        return {p for p, mod in m.named_modules() if isinstance(mod, ml.LoraLinear)}

    assert targets(ml.LoraConfig(target_modules=r".*layers\.0\.self_attn\.(q|k)_proj")) == {
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"}
    all_linear = targets(ml.LoraConfig(target_modules="all-linear"))
    assert len(all_linear) == 14 and "lm_head" not in all_linear
    excluded = targets(ml.LoraConfig(target_modules="all-linear", exclude_modules=["down_proj", "up_proj"]))
    assert all_linear - excluded == {f"model.layers.{i}.mlp.{n}" for i in range(2) for n in ("down_proj", "up_proj")}
    # all-linear leaves a task head alone when it is trained in full
    bert = targets(ml.LoraConfig(target_modules="all-linear", modules_to_save=["classifier"]), tiny_bert_cls())
    assert "classifier" not in bert and "bert.encoder.layer.0.attention.self.query" in bert


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, repr(model))


def test_bad_targets_leave_model_unchanged():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"matched no module.*model\.layers\.0\.self_attn\.q_proj"):
        ml.apply_lora(model, ml.LoraConfig(target_modules=["qkv"]))
    with pytest.raises(ValueError, match="not linear"):
        ml.apply_lora(model, ml.LoraConfig(target_modules=["self_attn"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        ml.apply_lora(model, ml.LoraConfig(target_modules=["q_proj"], modules_to_save=["score"]))
    after = snapshot(model)
    assert after[1] == before[1] and after[2] == before[2]
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k])


def test_applying_twice_is_an_error():
    model = ml.apply_lora(tiny_llama(), ml.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA"):
        ml.apply_lora(model, ml.LoraConfig(target_modules=["v_proj"]))


def test_dropout_module_only_when_positive():
    m0 = ml.apply_lora(tiny_llama(), ml.LoraConfig(target_modules=["q_proj"], lora_dropout=0.0))
    m1 = ml.apply_lora(tiny_llama(), ml.LoraConfig(target_modules=["q_proj"], lora_dropout=0.1))
    assert not any(isinstance(m, nn.Dropout) for m in m0.modules() if m is not None and "lora" in repr(type(m)))
    assert m0.model.layers[0].self_attn.q_proj.lora_dropout is None
    assert isinstance(m1.model.layers[0].self_attn.q_proj.lora_dropout, nn.Dropout)


def test_init_modes():
    zero_b = ml.apply_lora(tiny_llama(), ml.LoraConfig(target_modules=["q_proj"]))
    layer = zero_b.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) > 0
    gauss = ml.apply_lora(tiny_llama(), ml.LoraConfig(r=64, target_modules=["q_proj"], init_lora_weights="gaussian"))
    a = gauss.model.layers[0].self_attn.q_proj.lora_A.weight
    assert abs(a.std().item() - 1 / 64) < 0.004
    rand = ml.apply_lora(tiny_llama(), ml.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    assert torch.count_nonzero(rand.model.layers[0].self_attn.q_proj.lora_B.weight) > 0


def test_zero_init_keeps_outputs():
    base = tiny_llama()
    b = batch()
    ref = base(input_ids=b["input_ids"]).logits
    model = ml.apply_lora(copy.deepcopy(base), ml.LoraConfig(target_modules="all-linear"))
    torch.testing.assert_close(model(input_ids=b["input_ids"]).logits, ref)


# ---------------------------------------------------------------- parity with peft

@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_outputs_loss_and_grads_equal_peft(bias, use_rslora):
    base = tiny_llama()
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], bias=bias,
                  use_rslora=use_rslora, init_lora_weights=False)
    ours = ml.apply_lora(copy.deepcopy(base), ml.LoraConfig(**kwargs))
    theirs = peft_twin(ours, base, kwargs)
    assert_same_training_signal(ours, theirs, batch(), batch(), loss_atol=1e-6, grad_atol=1e-6, grad_rtol=1e-5,
                                logits_atol=1e-5)
    assert ml.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()


def test_modules_to_save_trains_the_head_like_peft():
    base = tiny_bert_cls()
    kwargs = dict(r=4, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"],
                  init_lora_weights=False)
    ours = ml.apply_lora(copy.deepcopy(base), ml.LoraConfig(**kwargs))
    assert ours.classifier.weight.requires_grad and not ours.bert.pooler.dense.weight.requires_grad
    theirs = peft_twin(ours, base, kwargs)
    ids = torch.randint(0, 99, (3, 6), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 1])
    lo, lt = ours(input_ids=ids, labels=labels).loss, theirs(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(lo, lt)
    lo.backward()
    lt.backward()
    torch.testing.assert_close(ours.classifier.weight.grad,
                               theirs.base_model.model.classifier.modules_to_save["default"].weight.grad)
    # peft's total also counts its second copy of the head; the trainable count is the comparable one
    assert ml.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


# ---------------------------------------------------------------- merging

def test_merge_unmerge_and_unload_keep_outputs():
    base = tiny_llama()
    model = ml.apply_lora(copy.deepcopy(base), ml.LoraConfig(target_modules="all-linear", init_lora_weights=False))
    ids = batch()["input_ids"]
    ref = model(input_ids=ids).logits
    assert not torch.allclose(ref, base(input_ids=ids).logits, atol=1e-3)
    w0 = model.model.layers[0].self_attn.q_proj.weight.clone()
    ml.merge_lora(model)
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, w0)
    ml.unmerge_lora(model)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)
    merged = ml.merge_and_unload(model)
    assert not any(isinstance(m, ml.LoraLinear) for m in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert set(merged.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(merged(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_merge_without_lora_is_an_error():
    with pytest.raises(ValueError, match="no LoRA"):
        ml.merge_lora(tiny_llama())


def test_to_dtype_and_deepcopy_move_base_and_lora_together():
    model = ml.apply_lora(tiny_llama(), ml.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    clone = copy.deepcopy(model)
    q = clone.model.layers[0].self_attn.q_proj
    assert q.weight is q.base_layer.weight and q.weight is not model.model.layers[0].self_attn.q_proj.weight
    model.to(torch.bfloat16)
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == q.base_layer.weight.dtype == q.lora_A.weight.dtype == torch.bfloat16
    assert model(input_ids=batch()["input_ids"]).logits.dtype == torch.bfloat16


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = ml.apply_lora(tiny_llama(), ml.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                      lora_dropout=0.1))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    b = batch()
    losses = []
    for _ in range(30):
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses


def test_public_names_are_functions_not_submodules():
    assert callable(ml.train) and callable(ml.generate) and callable(ml.from_pretrained)
    assert ml.TrainConfig.__name__ == "TrainConfig" and ml.QuantConfig.__name__ == "QuantConfig"


def test_import_is_light():
    code = ("import sys, minilora; bad = [m for m in ('transformers', 'peft', 'bitsandbytes') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
