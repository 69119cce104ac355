"""minilora's Llama against transformers' LlamaForCausalLM (the oracle) on tiny random checkpoints."""
from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from conftest import real_model_dir
from safetensors.torch import load_file

from minilora.models.gradient_checkpointing import enable_gradient_checkpointing
from minilora.models.llama import LlamaForCausalLM
from minilora.models.rope import LlamaRotaryEmbedding, rope_inv_freq
from minilora.models.llama_config import LlamaConfig

transformers.logging.set_verbosity_error()

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, rope_theta=500.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)

VARIANTS = {
    "gqa": dict(num_key_value_heads=2),
    "mha": dict(num_key_value_heads=4),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "bias_and_head_dim": dict(num_key_value_heads=1, head_dim=16, attention_bias=True, mlp_bias=True),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8}),
    "yarn_deepseek": dict(head_dim=16, rope_scaling={  # DeepSeek's attention factor, own betas, no truncation
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4, "beta_fast": 8, "beta_slow": 2,
        "mscale": 0.707, "mscale_all_dim": 1.0, "truncate": False}),
}


def load_minilora(folder) -> LlamaForCausalLM:
    """What the real loader does, minus its checks: config.json + model.safetensors, strict."""
    model = LlamaForCausalLM(LlamaConfig.from_dict(json.loads((folder / "config.json").read_text())))
    state = load_file(str(folder / "model.safetensors"))
    for key in model.tied_weight_keys():  # HF omits tied copies from the file
        state.setdefault(key, state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    return model.eval()


def tiny_pair(tmp_path, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides})).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf, load_minilora(tmp_path)


def padded_batch(seq: int = 24):
    """Row 0 full, row 1 left-padded by 5, row 2 right-padded by 4."""
    ids = torch.randint(3, TINY["vocab_size"], (3, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, -4:] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(tmp_path, variant):
    hf, model = tiny_pair(tmp_path, **VARIANTS[variant])
    ids, mask = padded_batch(seq=24)  # longer than max_position_embeddings: dynamic scaling kicks in
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
        got_unmasked = model(ids[:1]).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)  # padding positions too (the loss sees them)
    torch.testing.assert_close(got_unmasked, expected[:1], atol=1e-4, rtol=0)


def test_tied_head_shares_the_embedding(tmp_path):
    _, model = tiny_pair(tmp_path, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.tied_weight_keys() == ["lm_head.weight"]
    assert model.get_output_embeddings() is model.lm_head


def test_loss_matches_transformers(tmp_path):
    hf, model = tiny_pair(tmp_path, num_key_value_heads=2)
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :7] = -100  # e.g. a masked prompt
    expected = hf(ids, attention_mask=mask, labels=labels).loss
    got = model(ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_bf16_matches_transformers(tmp_path):
    hf, model = tiny_pair(tmp_path, num_key_value_heads=2)
    hf.to(torch.bfloat16)
    model.to(torch.bfloat16)
    ids, mask = padded_batch()
    with torch.no_grad():
        expected, got = hf(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
    assert got.dtype == torch.bfloat16
    real = mask.bool()
    torch.testing.assert_close(got[real].float(), expected[real].float(), atol=2e-2, rtol=0)


@pytest.mark.parametrize("with_mask", [False, True])
def test_kv_cache_continues_the_full_sequence(tmp_path, with_mask):
    _, model = tiny_pair(tmp_path, num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0})
    ids, mask = padded_batch(seq=16)
    ids, mask = ids[:2], mask[:2]  # full row and left-padded row
    mask = mask if with_mask else torch.ones_like(mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions).logits
        # prefill 9 tokens, then a 3-token chunk, then one token at a time
        pieces, cache = [], None
        for start, end in [(0, 9), (9, 12)] + [(i, i + 1) for i in range(12, 16)]:
            out = model(ids[:, start:end], attention_mask=mask[:, :end], position_ids=positions[:, start:end],
                        past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
            cache = out.past_key_values
    assert len(cache) == TINY["num_hidden_layers"] and cache[0][0].shape == (2, 2, 16, 8)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, dim=1)[real], full[real], atol=1e-5, rtol=0)


def test_kv_cache_without_position_ids_counts_from_cache_length(tmp_path):
    _, model = tiny_pair(tmp_path)
    ids = torch.randint(3, 96, (1, 10))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :6], use_cache=True)
        rest = model(ids[:, 6:], past_key_values=first.past_key_values, use_cache=True).logits
    torch.testing.assert_close(rest, full[:, 6:], atol=1e-5, rtol=0)


def test_reorder_cache_selects_rows(tmp_path):
    _, model = tiny_pair(tmp_path)
    with torch.no_grad():
        cache = model(torch.randint(3, 96, (3, 5)), use_cache=True).past_key_values
    reordered = model.reorder_cache(cache, torch.tensor([2, 2, 0]))
    assert torch.equal(reordered[1][0], cache[1][0][[2, 2, 0]])
    assert torch.equal(reordered[0][1], cache[0][1][[2, 2, 0]])


def test_gradient_checkpointing_gives_same_gradients(tmp_path):
    _, model = tiny_pair(tmp_path, num_key_value_heads=2)
    model.train()
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)

    def grads():
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    plain = grads()
    assert len(calls) == 1
    enable_gradient_checkpointing(model)
    assert model.model.gradient_checkpointing
    checkpointed = grads()
    assert len(calls) == 3  # forward + recomputation in backward: checkpointing really ran
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=0, msg=name)


def test_meta_build_then_materialise_like_the_loader(tmp_path):
    hf, reference = tiny_pair(tmp_path, tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0})
    config = LlamaConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    state = load_file(str(tmp_path / "model.safetensors"))
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    model.init_non_persistent_buffers("cpu")
    assert "model.rotary_emb.inv_freq" not in model.state_dict()
    ids = torch.randint(3, 96, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, reference(ids).logits, atol=0, rtol=0)


def test_init_weights_hf_style():
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "initializer_range": 0.5}))
    head = torch.nn.Linear(32, 1000)
    head.bias.data.fill_(3.0)
    model.init_weights(head)
    assert torch.all(head.bias == 0)
    assert 0.4 < head.weight.std().item() < 0.6


def test_config_reads_v4_and_v5_rope_formats():
    base = dict(TINY, some_unknown_key=1)
    v4 = LlamaConfig.from_dict({**base, "rope_theta": 500.0, "rope_scaling": {"type": "linear", "factor": 4.0}})
    v5 = LlamaConfig.from_dict({**base, "rope_parameters": {"rope_type": "linear", "rope_theta": 500.0,
                                                            "factor": 4.0}})
    for config in (v4, v5):
        assert config.rope_theta == 500.0 and config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
        assert config.head_dim == 8 and config.num_key_value_heads == 4
    assert v4.raw["some_unknown_key"] == 1
    torch.testing.assert_close(rope_inv_freq(v4), rope_inv_freq(LlamaConfig(**TINY)) / 4)
    plain = LlamaConfig.from_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 9.0}})
    assert plain.rope_scaling is None and plain.rope_theta == 9.0


def test_config_rejects_bad_input():
    with pytest.raises(ValueError, match="rope type 'proportional'"):
        LlamaConfig.from_dict({**TINY, "rope_scaling": {"rope_type": "proportional", "factor": 2.0}})
    for bad in ({"factor": "4"}, {"factor": 2.0, "original_max_position_embeddings": 0}, {"factor": True}):
        with pytest.raises(ValueError, match=f"{next(reversed(bad))} must be a positive number"):
            LlamaConfig.from_dict({**TINY, "rope_scaling": {"rope_type": "yarn", **bad}})
    with pytest.raises(KeyError, match="low_freq_factor"):
        LlamaConfig.from_dict({**TINY, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(KeyError, match="factor"):
        LlamaConfig(**{**TINY, "rope_scaling": {"type": "linear"}})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaConfig.from_dict({**TINY, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="hidden_act"):
        LlamaConfig.from_dict({**TINY, "hidden_act": "gelu"})


def test_bad_forward_input_is_rejected(tmp_path):
    _, model = tiny_pair(tmp_path)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_mask has 4 columns"):
        model(torch.ones(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 4))


def test_old_checkpoint_rotary_buffers_are_ignorable():
    patterns = LlamaForCausalLM.ignore_unexpected_keys
    assert any(re.fullmatch(p, "model.layers.0.self_attn.rotary_emb.inv_freq") for p in patterns)
    assert not any(re.fullmatch(p, "model.layers.0.self_attn.q_proj.weight") for p in patterns)


# --- real checkpoint ------------------------------------------------------------------------------------

def test_smollm2_logits_match_transformers():
    folder = real_model_dir("SmolLM2-135M-Instruct")
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = load_minilora(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        expected, got = hf(ids).logits, model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},  # Qwen2.5 / Qwen3's advice
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
     "mscale": 1.0, "mscale_all_dim": 1.0},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192, "attention_factor": 1.5},
    {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 32768},  # inferred from the lengths
])
def test_yarn_frequencies_and_attention_factor_match_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    shape = dict(TINY, hidden_size=1024, num_attention_heads=8, max_position_embeddings=131072)
    hf_config = transformers.Qwen2Config(**shape, rope_parameters={"rope_theta": 1e6, **rope})
    expected, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    config = LlamaConfig.from_dict({**shape, "rope_scaling": rope, "rope_theta": 1e6})
    torch.testing.assert_close(rope_inv_freq(config), expected, rtol=1e-6, atol=0)
    ids = torch.zeros(1, 1, dtype=torch.long)
    cos, _ = LlamaRotaryEmbedding(config)(torch.zeros(1), ids)
    assert cos[0, 0, 0].item() == pytest.approx(attention_factor, rel=1e-6)  # cos(0) scaled by the factor
