"""minilora's T5 against transformers on tiny random checkpoints (v1.0 relu + tied, Flan-style gated-gelu +
untied), plus the cache, beam reordering and gradient checkpointing."""
from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from conftest import real_model_dir
from safetensors.torch import load_file, save_file

from minilora.models.gradient_checkpointing import enable_gradient_checkpointing
from minilora.models.t5 import T5Config, T5ForConditionalGeneration, relative_position_bucket

ATOL = 1e-4
# 8 buckets up to distance 16 so the 13-token inputs reach the log-spaced and the shared far buckets.
TINY = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.1,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def load_minilora(folder) -> T5ForConditionalGeneration:
    """Stand-in for the real loader: config.json -> config, safetensors -> load_state_dict + tie_weights."""
    model = T5ForConditionalGeneration(T5Config.from_dict(json.loads((folder / "config.json").read_text())))
    state = {k: v for k, v in load_file(folder / "model.safetensors").items()
             if not any(re.search(p, k) for p in model.ignore_unexpected_keys)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and set(missing) <= set(model.tied_weight_keys()), (missing, unexpected)
    model.tie_weights()
    return model.eval()


def save_v1_0(tmp_path):
    """T5 v1.0: relu feed-forward, lm_head tied to `shared`, decoder output scaled by d_model**-0.5."""
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(
        transformers.T5Config(**TINY, feed_forward_proj="relu", tie_word_embeddings=True)).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf


def save_flan(tmp_path):
    """Flan-T5 style: gated-gelu, untied lm_head, no output scaling. transformers 5 always builds T5 tied,
    so write a separate lm_head.weight and tie_word_embeddings=false like the real flan-t5 files."""
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**TINY, feed_forward_proj="gated-gelu"))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    state = load_file(tmp_path / "model.safetensors")
    state["lm_head.weight"] = torch.randn(TINY["vocab_size"], TINY["d_model"]) * TINY["d_model"] ** -0.5
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("scale_decoder_outputs", None)
    config["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert hf.lm_head.weight is not hf.shared.weight
    return hf


@pytest.fixture(params=["v1_0", "flan"])
def pair(request, tmp_path):
    hf = save_v1_0(tmp_path) if request.param == "v1_0" else save_flan(tmp_path)
    return hf, load_minilora(tmp_path)


def seq2seq_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, TINY["vocab_size"], (2, 13), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    input_ids[attention_mask == 0] = 0
    labels = torch.randint(2, TINY["vocab_size"], (2, 11), generator=g)
    labels[0, 8:] = -100
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def test_config_parsing():
    c = T5Config.from_dict({"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "num_layers": 3,
                            "unknown": 1})
    assert (c.dense_act_fn, c.is_gated_act, c.scale_decoder_outputs, c.num_decoder_layers) == (
        "gelu_new", True, False, 3)
    assert c.raw["unknown"] == 1
    c = T5Config.from_dict({})
    assert (c.dense_act_fn, c.is_gated_act, c.tie_word_embeddings, c.scale_decoder_outputs) == (
        "relu", False, True, True)
    assert c.decoder_start_token_id == c.pad_token_id == 0
    assert T5Config.from_dict({"feed_forward_proj": "gated-silu"}).dense_act_fn == "silu"
    # Like transformers, explicit dense_act_fn / is_gated_act / scale_decoder_outputs keys win.
    c = T5Config.from_dict({"feed_forward_proj": "relu", "dense_act_fn": "gelu_new", "is_gated_act": True,
                            "scale_decoder_outputs": False})
    assert (c.dense_act_fn, c.is_gated_act, c.tie_word_embeddings, c.scale_decoder_outputs) == (
        "gelu_new", True, True, False)
    for key in ("dense_act_fn", "is_gated_act", "scale_decoder_outputs", "num_decoder_layers"):
        hf = transformers.T5Config.from_dict({"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False})
        ours = T5Config.from_dict({"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False})
        assert getattr(ours, key) == getattr(hf, key), key
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config.from_dict({"feed_forward_proj": "gated-gelu-x"})
    with pytest.raises(ValueError, match="activation"):
        T5Config.from_dict({"feed_forward_proj": "gated-nope"})


def test_relative_position_bucket_matches_transformers():
    rel = torch.arange(-200, 200)[None, :] - torch.arange(0, 5)[:, None]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 16)):
            want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance)
            assert torch.equal(relative_position_bucket(rel, bidirectional, buckets, distance), want)


def test_logits_and_loss_match_transformers(pair):
    hf, ours = pair
    batch = seq2seq_batch()
    with torch.no_grad():
        want, got = hf(**batch), ours(**batch)
    torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.encoder_last_hidden_state, want.encoder_last_hidden_state, atol=ATOL, rtol=0)
    assert got.past_key_values is None


def test_decoder_inputs_mask_and_encoder_outputs_match_transformers(pair):
    hf, ours = pair
    batch = seq2seq_batch(seed=2)
    dec = ours.prepare_decoder_input_ids_from_labels(batch["labels"])
    assert torch.equal(dec, hf.prepare_decoder_input_ids_from_labels(batch["labels"]))
    dec_mask = (batch["labels"] != -100).long()
    with torch.no_grad():
        want = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec,
                  decoder_attention_mask=dec_mask)
        enc = ours.encode(batch["input_ids"], batch["attention_mask"])
        got = ours(attention_mask=batch["attention_mask"], decoder_input_ids=dec, decoder_attention_mask=dec_mask,
                   encoder_outputs=enc)
    valid = dec_mask.bool()  # HF and minilora may differ only in rows whose keys are all masked
    torch.testing.assert_close(got.logits[valid], want.logits[valid], atol=ATOL, rtol=0)


def test_cached_decoding_equals_full_decoding(pair):
    hf, ours = pair
    batch = seq2seq_batch(seed=3)
    dec = ours.prepare_decoder_input_ids_from_labels(batch["labels"].clamp(min=0))
    with torch.no_grad():
        enc = ours.encode(batch["input_ids"], batch["attention_mask"])
        full = ours(attention_mask=batch["attention_mask"], decoder_input_ids=dec, encoder_outputs=enc).logits
        past, steps = None, []
        # a 3-token prefix first, then one token at a time
        for start, stop in [(0, 3)] + [(i, i + 1) for i in range(3, dec.shape[1])]:
            out = ours(attention_mask=batch["attention_mask"], decoder_input_ids=dec[:, start:stop],
                       encoder_outputs=enc, past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits)
        hf_step = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     decoder_input_ids=dec[:, :4], use_cache=True)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    torch.testing.assert_close(full[:, :4], hf_step.logits, atol=ATOL, rtol=0)
    assert len(past) == 3 and past[0][0].shape == (2, 4, dec.shape[1], 8)  # self k: (batch, heads, len, d_kv)
    assert past[0][2].shape == (2, 4, 13, 8)  # cross k: encoder length, computed once


def test_reorder_cache_follows_beams(pair):
    _, ours = pair
    batch = seq2seq_batch(seed=4)
    dec = ours.prepare_decoder_input_ids_from_labels(batch["labels"].clamp(min=0))[:, :6]
    beam_idx = torch.tensor([1, 1, 0])
    with torch.no_grad():
        enc = ours.encode(batch["input_ids"], batch["attention_mask"])
        out = ours(attention_mask=batch["attention_mask"], decoder_input_ids=dec[:, :5], encoder_outputs=enc,
                   use_cache=True)
        past = ours.reorder_cache(out.past_key_values, beam_idx)
        step = ours(attention_mask=batch["attention_mask"][beam_idx], decoder_input_ids=dec[beam_idx, 5:],
                    encoder_outputs=enc[beam_idx], past_key_values=past, use_cache=True).logits
        full = ours(attention_mask=batch["attention_mask"][beam_idx], decoder_input_ids=dec[beam_idx],
                    encoder_outputs=enc[beam_idx]).logits
    torch.testing.assert_close(step[:, 0], full[:, 5], atol=ATOL, rtol=0)


def test_gradient_checkpointing_same_grads_as_transformers(pair):
    hf, ours = pair
    batch = seq2seq_batch(seed=5)
    hf(**batch).loss.backward()
    want = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    grads = []
    for checkpointing in (False, True):
        ours.zero_grad(set_to_none=True)
        enable_gradient_checkpointing(ours, checkpointing)
        ours(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None})
    enable_gradient_checkpointing(ours, False)
    plain, ckpt = grads
    assert plain.keys() == ckpt.keys() == want.keys()
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in plain
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(plain[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_tied_keys_and_weights(tmp_path):
    hf = save_v1_0(tmp_path)
    ours = load_minilora(tmp_path)
    assert ours.tied_weight_keys() == ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                                       "lm_head.weight"]
    assert ours.lm_head.weight is ours.shared.weight is ours.encoder.embed_tokens.weight
    assert ours.get_output_embeddings() is ours.lm_head
    # Older checkpoints also store the stacks' embeddings: equal copies are accepted, different ones are not.
    state = load_file(tmp_path / "model.safetensors")
    state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()
    state["decoder.embed_tokens.weight"] = state["shared.weight"].clone()
    state["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.zeros(8, 4)
    save_file(state, tmp_path / "model.safetensors")
    ours = load_minilora(tmp_path)
    batch = seq2seq_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, hf(**batch).logits, atol=ATOL, rtol=0)
    ours.encoder.embed_tokens.weight = torch.nn.Parameter(ours.shared.weight + 1)
    with pytest.raises(ValueError, match="encoder.embed_tokens.weight"):
        ours.tie_weights()


def test_transformers5_untied_config_means_tied_without_scaling(tmp_path):
    """transformers 5 saves T5Config(tie_word_embeddings=False) as tie=true + scale_decoder_outputs=false and
    writes no lm_head: the head is `shared`, unscaled."""
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(
        transformers.T5Config(**TINY, feed_forward_proj="gated-gelu", tie_word_embeddings=False)).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_minilora(tmp_path)
    assert ours.config.tie_word_embeddings and not ours.config.scale_decoder_outputs
    batch = seq2seq_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, hf(**batch).logits, atol=ATOL, rtol=0)


def test_bfloat16_as_accurate_as_transformers(tmp_path):
    """bf16 drifts from fp32 in both implementations; minilora's drift must be no worse than transformers'."""
    hf = save_flan(tmp_path)
    ours = load_minilora(tmp_path)
    batch = seq2seq_batch()
    with torch.no_grad():
        reference = hf(**batch)
        want, got = hf.to(torch.bfloat16)(**batch), ours.to(torch.bfloat16)(**batch)
    assert got.logits.dtype == torch.bfloat16 and torch.isfinite(got.logits).all()
    hf_err = (want.logits.float() - reference.logits).abs().max().item()
    our_err = (got.logits.float() - reference.logits).abs().max().item()
    assert 0 < our_err <= 1.5 * hf_err + 1e-3, (our_err, hf_err)
    assert abs(got.loss.item() - reference.loss.item()) <= max(abs(want.loss.item() - reference.loss.item()), 2e-2)


def test_bad_inputs_raise(tmp_path):
    ours = T5ForConditionalGeneration(T5Config.from_dict(TINY)).eval()
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="input_ids or encoder_outputs"):
        ours(decoder_input_ids=ids)
    with pytest.raises(ValueError, match="decoder_input_ids or labels"):
        ours(input_ids=ids)
    with pytest.raises(ValueError, match="decoder_attention_mask"):
        ours(input_ids=ids, decoder_input_ids=ids, decoder_attention_mask=torch.ones(2, 3))


def test_init_weights_follows_t5_recipe():
    ours = T5ForConditionalGeneration(T5Config.from_dict({**TINY, "d_model": 64, "d_kv": 16, "d_ff": 256}))
    torch.manual_seed(0)
    ours.init_weights(ours.encoder.block[0])
    attn = ours.encoder.block[0].layer[0].SelfAttention
    assert abs(attn.q.weight.std().item() - (64 * 16) ** -0.5) < 0.2 * (64 * 16) ** -0.5
    assert abs(attn.k.weight.std().item() - 64 ** -0.5) < 0.2 * 64 ** -0.5
    assert abs(ours.encoder.block[0].layer[1].DenseReluDense.wo.weight.std().item() - 256 ** -0.5) < 0.02


def test_real_flan_shape_checkpoint_matches_transformers():
    folder = real_model_dir("t5-random-flan-small-shape")
    ours = load_minilora(folder)
    assert ours.lm_head.weight is not ours.shared.weight and ours.config.is_gated_act
    hf = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, 2000, (2, 20), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 14:] = 0
    labels = torch.randint(2, 2000, (2, 9), generator=g)
    with torch.no_grad():
        want = hf(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        got = ours(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=ATOL, rtol=0)
