import copy
import json
import os

import pytest
import torch
from lora_helpers import batch, tiny_bert_cls, tiny_llama, trained_like
from safetensors.torch import load_file, save_file

import minilora as ml


def bert_inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 99, (3, 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


CASES = {
    "llama": (tiny_llama, lambda: {"input_ids": batch()["input_ids"]},
              dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "bert-head": (tiny_bert_cls, bert_inputs,
                  dict(r=4, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])),
    "bert-bias-all": (tiny_bert_cls, bert_inputs,
                      dict(r=2, lora_alpha=4, target_modules=["query", "key"], bias="all",
                           modules_to_save=["classifier"])),
    "bert-bias-lora-only": (tiny_bert_cls, bert_inputs,
                            dict(r=2, lora_alpha=4, target_modules=["value"], bias="lora_only")),
    "llama-rslora-all-linear": (tiny_llama, lambda: {"input_ids": batch()["input_ids"]},
                                dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True)),
    "llama-rank-and-alpha-patterns": (tiny_llama, lambda: {"input_ids": batch()["input_ids"]},
                                      dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                           rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                                           alpha_pattern={"down_proj": 3.0, "q_proj": 16})),
    "llama-layers-to-transform": (tiny_llama, lambda: {"input_ids": batch()["input_ids"]},
                                  dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"],
                                       layers_to_transform=[1])),
    "llama-layers-pattern": (tiny_llama, lambda: {"input_ids": batch()["input_ids"]},
                             dict(r=2, lora_alpha=4, target_modules=["k_proj", "gate_proj"], layers_to_transform=0,
                                  layers_pattern="layers", use_rslora=True, rank_pattern={"gate_proj": 3})),
}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("case", CASES)
def test_minilora_adapter_loads_in_peft(case, tmp_path):
    import peft
    make, inputs, kwargs = CASES[case]
    ours = trained_like(ml.apply_lora(make(), ml.LoraConfig(**kwargs)))
    ml.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    x = inputs()
    torch.testing.assert_close(logits(theirs, x), logits(ours, x), atol=1e-5, rtol=1e-5)
    assert (logits(make(), x) - logits(ours, x)).abs().max() > 1e-4  # the adapter matters


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_minilora(case, tmp_path):
    import peft
    make, inputs, kwargs = CASES[case]
    theirs = trained_like(peft.get_peft_model(make(), peft.LoraConfig(**kwargs))).eval()
    theirs.save_pretrained(tmp_path)
    ours = ml.load_adapter(make(), tmp_path)
    x = inputs()
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-5, rtol=1e-5)
    assert ml.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


def test_round_trip_in_minilora_and_file_layout(tmp_path):
    model = trained_like(ml.apply_lora(tiny_bert_cls(), ml.LoraConfig(r=4, target_modules=["query"],
                                                                       modules_to_save=["classifier"])))
    ml.save_adapter(model, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS" and cfg["r"] == 4
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.classifier.weight" in keys
    loaded = ml.load_adapter(tiny_bert_cls(), tmp_path / "a")
    x = bert_inputs()
    torch.testing.assert_close(logits(loaded, x), logits(model, x))
    # loading into a model that already has matching LoRA layers overwrites them
    again = ml.load_adapter(ml.apply_lora(tiny_bert_cls(), ml.LoraConfig(r=4, target_modules=["query"],
                                                                          modules_to_save=["classifier"])),
                            tmp_path / "a")
    torch.testing.assert_close(logits(again, x), logits(model, x))


def test_regex_targets_are_saved_as_names_peft_can_match(tmp_path):
    import peft
    model = trained_like(ml.apply_lora(tiny_llama(), ml.LoraConfig(target_modules=r".*\.0\.self_attn\.q_proj")))
    ml.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    x = {"input_ids": batch()["input_ids"]}
    torch.testing.assert_close(logits(theirs, x), logits(model, x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- bad input

@pytest.fixture
def saved(tmp_path):
    model = trained_like(ml.apply_lora(tiny_llama(), ml.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
    ml.save_adapter(model, tmp_path / "ad")
    return tmp_path / "ad"


def assert_untouched(model, before):
    assert not any(isinstance(m, ml.LoraLinear) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_adapter_for_a_different_base_is_refused_naming_key_and_shapes(saved):
    from transformers import LlamaConfig, LlamaForCausalLM
    other = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight has shape \(4, 32\).*\(4, 48\)"):
        ml.load_adapter(other, saved)
    assert_untouched(other, before)


def test_adapter_with_unknown_module_paths_is_refused(saved, tmp_path):
    tensors = load_file(saved / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, saved / "adapter_model.safetensors")
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"layers\.9\.self_attn\.q_proj\.lora_A\.weight"):
        ml.load_adapter(model, saved)
    assert_untouched(model, before)


def test_missing_lora_tensor_is_refused(saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, saved / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"missing.*layers\.1\.self_attn\.v_proj\.lora_B\.weight"):
        ml.load_adapter(tiny_llama(), saved)


def test_truncated_adapter_file_is_named(saved):
    path = saved / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is truncated or corrupt"):
        ml.load_adapter(model, saved)
    assert_untouched(model, before)


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"), ("[1, 2]", "JSON object"), ('{"peft_type": "LORA"}', "'r'"),
    ('{"peft_type": "IA3", "r": 4, "lora_alpha": 8}', "IA3"),
    ('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_bias": true, "target_modules": ["q_proj"]}', "lora_bias"),
    ('{"peft_type": "LORA", "r": 0, "lora_alpha": 8, "target_modules": ["q_proj"]}', "r must be"),
])
def test_malformed_config_is_named(saved, content, match):
    (saved / "adapter_config.json").write_text(content)
    with pytest.raises((ValueError, TypeError), match=match):
        ml.load_adapter(tiny_llama(), saved)


def test_missing_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        ml.load_adapter(tiny_llama(), tmp_path)
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        ml.load_adapter(tiny_llama(), saved)


def test_adapter_rank_must_match_existing_lora(saved):
    model = ml.apply_lora(tiny_llama(), ml.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="r=4"):
        ml.load_adapter(model, saved)


def test_save_is_atomic(saved, monkeypatch):
    before = (saved / "adapter_model.safetensors").read_bytes()
    model = trained_like(ml.apply_lora(tiny_llama(seed=3), ml.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr("minilora.lora.adapter.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        ml.save_adapter(model, saved)
    assert (saved / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(saved)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_save_without_lora_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no LoRA"):
        ml.save_adapter(tiny_llama(), tmp_path)


def test_hub_id_without_network_says_how_to_load_locally(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Exception, match="(?i)local"):
        ml.load_adapter(tiny_llama(), "someone/some-adapter")


def test_tied_head_in_modules_to_save_round_trips(tmp_path):
    model = trained_like(ml.apply_lora(tiny_llama(tie=True), ml.LoraConfig(r=4, target_modules=["q_proj"],
                                                                            modules_to_save=["lm_head"])))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ml.save_adapter(model, tmp_path)
    assert "base_model.model.lm_head.weight" in load_file(tmp_path / "adapter_model.safetensors")
    loaded = ml.load_adapter(tiny_llama(tie=True), tmp_path)
    x = {"input_ids": batch()["input_ids"]}
    torch.testing.assert_close(logits(loaded, x), logits(model, x))
