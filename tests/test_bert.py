"""minilora's BERT (encoder, sequence classification, QA) against transformers on tiny random checkpoints."""
from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from conftest import real_model_dir
from safetensors.torch import load_file

from minilora.models.gradient_checkpointing import enable_gradient_checkpointing
from minilora.models.bert import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
    BertModelOutput,
)

ATOL = 1e-4
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, type_vocab_size=2, pad_token_id=0,
            initializer_range=0.2)  # large enough that activations leave the linear regime


def load_minilora(cls, folder, **init_kwargs):
    """Stand-in for the real loader: config.json -> config, safetensors -> strict load_state_dict."""
    config = BertConfig.from_dict(json.loads((folder / "config.json").read_text()))
    model = cls(config, **init_kwargs)
    state = load_file(folder / "model.safetensors")
    # Checkpoints of BertModel carry no "bert." prefix; the head classes expect one.
    if hasattr(model, "bert") and not any(k.startswith("bert.") for k in state):
        state = {f"bert.{k}": v for k, v in state.items()}
    state = {k: v for k, v in state.items()
             if not any(re.search(p, k) for p in model.ignore_unexpected_keys)}
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_hf(hf_cls, tmp_path, **config_kwargs):
    torch.manual_seed(0)
    hf = hf_cls(transformers.BertConfig(**TINY, **config_kwargs)).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf


def padded_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, TINY["vocab_size"], (3, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    attention_mask[2, 3:] = 0
    input_ids[attention_mask == 0] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 4:] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


def test_config_from_dict():
    c = BertConfig.from_dict({**TINY, "id2label": {"0": "neg", "1": "neu", "2": "pos"}, "unknown_key": 1,
                              "problem_type": "single_label_classification", "classifier_dropout": 0.3})
    assert (c.num_labels, c.problem_type, c.classifier_dropout, c.hidden_size) == (
        3, "single_label_classification", 0.3, 32)
    assert c.raw["unknown_key"] == 1
    assert BertConfig.from_dict({}).num_labels == 2
    assert BertConfig.from_dict({"num_labels": 5}).num_labels == 5
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig.from_dict({"hidden_act": "nope"})
    with pytest.raises(ValueError, match="num_attention_heads"):
        BertConfig.from_dict({"hidden_size": 30, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="position_embedding_type"):
        BertConfig.from_dict({"position_embedding_type": "relative_key"})


def test_bert_model_matches_transformers(tmp_path):
    hf = save_hf(transformers.BertModel, tmp_path)
    ours = load_minilora(BertModel, tmp_path)
    batch = padded_batch()
    with torch.no_grad():
        want = hf(**batch)
        got = ours(**batch)
    assert isinstance(got, BertModelOutput)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=ATOL, rtol=0)
    # Defaults: no mask, no token types, explicit position ids.
    ids = batch["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).last_hidden_state, hf(ids).last_hidden_state, atol=ATOL, rtol=0)
        pos = torch.arange(2, 11)[None].expand(3, -1)
        torch.testing.assert_close(ours(ids, position_ids=pos).last_hidden_state,
                                   hf(ids, position_ids=pos).last_hidden_state, atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_labels, labels", [
    (3, torch.tensor([0, 2, 1])),                       # single-label -> cross-entropy
    (1, torch.tensor([0.5, -1.0, 2.0])),                # regression -> MSE
    (3, torch.tensor([[1.0, 0, 1], [0, 0, 1], [0, 1, 0]])),  # float multi-label -> BCE with logits
])
def test_sequence_classification_matches_transformers(tmp_path, num_labels, labels):
    hf = save_hf(transformers.BertForSequenceClassification, tmp_path, num_labels=num_labels)
    ours = load_minilora(BertForSequenceClassification, tmp_path)
    assert ours.config.num_labels == num_labels
    batch = padded_batch()
    with torch.no_grad():
        want = hf(**batch, labels=labels)
        got = ours(**batch, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=ATOL, rtol=0)
    assert ours.get_output_embeddings() is ours.classifier


def test_question_answering_matches_transformers(tmp_path):
    hf = save_hf(transformers.BertForQuestionAnswering, tmp_path)
    ours = load_minilora(BertForQuestionAnswering, tmp_path)
    assert ours.bert.pooler is None
    batch = padded_batch()
    start, end = torch.tensor([1, 4, 100]), torch.tensor([[3], [5], [100]])  # 100: outside, clamped + ignored
    with torch.no_grad():
        want = hf(**batch, start_positions=start, end_positions=end)
        got = ours(**batch, start_positions=start, end_positions=end)
    torch.testing.assert_close(got.start_logits, want.start_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.end_logits, want.end_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=ATOL, rtol=0)
    assert got.start_logits.shape == (3, 9)


def test_base_checkpoint_into_heads_and_pooler_ignored(tmp_path):
    """A BertModel checkpoint (no prefix, with pooler) loads into the QA class, whose ignore list drops the
    pooler; the encoder then equals transformers' encoder."""
    hf = save_hf(transformers.BertModel, tmp_path)
    config = BertConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    ours = BertForQuestionAnswering(config)
    state = {f"bert.{k}": v for k, v in load_file(tmp_path / "model.safetensors").items()}
    dropped = [k for k in state if any(re.search(p, k) for p in ours.ignore_unexpected_keys)]
    assert sorted(dropped) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    missing, unexpected = ours.load_state_dict({k: v for k, v in state.items() if k not in dropped}, strict=False)
    assert sorted(missing) == ["qa_outputs.bias", "qa_outputs.weight"] and unexpected == []
    assert all(p.startswith(ours.new_head_prefixes) for p in missing)
    batch = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval().bert(**batch).last_hidden_state,
                                   hf(**batch).last_hidden_state, atol=ATOL, rtol=0)


def test_init_weights_matches_hf_recipe():
    config = BertConfig.from_dict({**TINY, "initializer_range": 0.5})
    model = BertForSequenceClassification(config)
    torch.manual_seed(0)
    model.classifier.bias.data.fill_(3.0)
    model.init_weights(model.classifier)
    assert torch.all(model.classifier.bias == 0)
    assert 0.35 < model.classifier.weight.std().item() < 0.65
    model.init_weights(model.bert.embeddings)
    assert torch.all(model.bert.embeddings.word_embeddings.weight[0] == 0)  # padding row
    assert torch.all(model.bert.embeddings.LayerNorm.weight == 1)


def test_gradient_checkpointing_same_grads(tmp_path):
    save_hf(transformers.BertForSequenceClassification, tmp_path, num_labels=2)
    batch, labels = padded_batch(), torch.tensor([0, 1, 1])

    def grads(checkpointing: bool):
        model = load_minilora(BertForSequenceClassification, tmp_path)
        enable_gradient_checkpointing(model, checkpointing)
        model(**batch, labels=labels).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 30
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=0)


def test_grads_match_transformers(tmp_path):
    hf = save_hf(transformers.BertForSequenceClassification, tmp_path, num_labels=2)
    ours = load_minilora(BertForSequenceClassification, tmp_path)
    batch, labels = padded_batch(), torch.tensor([0, 1, 1])
    hf(**batch, labels=labels).loss.backward()
    ours(**batch, labels=labels).loss.backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_bad_inputs_raise():
    model = BertModel(BertConfig.from_dict(TINY)).eval()
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 1, 5))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.ones(1, 65, dtype=torch.long))


def test_real_minilm_matches_transformers():
    folder = real_model_dir("all-MiniLM-L6-v2")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(["A man is playing a guitar.", "The stock market fell sharply today after news.",
                            "Sourdough needs time."])
    batch = dict(input_ids=torch.tensor([e.ids for e in enc]),
                 attention_mask=torch.tensor([e.attention_mask for e in enc]),
                 token_type_ids=torch.tensor([e.type_ids for e in enc]))
    assert batch["attention_mask"].min() == 0  # really padded
    ours = load_minilora(BertModel, folder)
    hf = transformers.BertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        got, want = ours(**batch), hf(**batch)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=ATOL, rtol=0)
