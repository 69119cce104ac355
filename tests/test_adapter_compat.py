"""Adapters written by an earlier minilora (tests/fixtures/*_v0, saved before the package layout changed)
load into today's models: every tensor lands where it was saved from, and saving again writes the same file
contents and config."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minilora as ml
from minilora.models.bert import BertConfig, BertForSequenceClassification
from minilora.models.llama import LlamaForCausalLM
from minilora.models.llama_config import LlamaConfig

FIXTURES = Path(__file__).parent / "fixtures"


def llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1))


def bert():
    return BertForSequenceClassification(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32,
                                                    max_position_embeddings=16, num_labels=3))


@pytest.mark.parametrize("name, build, n_tensors", [("llama_adapter_v0", llama, 8),
                                                    ("bert_seqcls_adapter_v0", bert, 8)])
def test_old_adapter_loads_and_saves_back_unchanged(tmp_path, name, build, n_tensors):
    folder = FIXTURES / name
    saved = load_file(folder / "adapter_model.safetensors")
    assert len(saved) == n_tensors
    model = ml.load_adapter(build(), folder)
    state = model.state_dict()
    for key, tensor in saved.items():  # peft keys -> minilora's HF-named state-dict keys
        ours = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        torch.testing.assert_close(state[ours], tensor, rtol=0, atol=0, msg=key)
    ml.save_adapter(model, tmp_path)
    again = load_file(tmp_path / "adapter_model.safetensors")
    assert again.keys() == saved.keys()
    for key in saved:
        assert torch.equal(again[key], saved[key]), key
    old_config = json.loads((folder / "adapter_config.json").read_text())
    new_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: new_config.get(k) for k in old_config} == old_config
