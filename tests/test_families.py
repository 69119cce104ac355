"""The Llama-like decoder families (Qwen2/3, Mistral, Gemma 1/2/3, Phi-3) against transformers and peft (the
oracles), on tiny random checkpoints written by transformers: logits with and without padding, generation
with the KV cache past the sliding window, NF4, LoRA loss and gradients, adapters both ways, config errors."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

import minilora as ml
from minilora.models import llama as llama_module
from minilora.models.llama import attention_mask_4d

transformers.logging.set_verbosity_error()

VOCAB, PAD, EOS = 96, 3, 2  # PAD != 0: transformers' beam search pads with EOS when the pad id is 0
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
WINDOW = 8  # sequences below are 20+ tokens: sliding layers really drop keys
# family -> (transformers config class, model class, what the tiny checkpoint exercises)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",  # q/k/v bias, sliding window on layers >= max_window_layers
              dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",  # q/k norms, head_dim, YaRN (Qwen3's long-context setting)
              dict(head_dim=24, attention_bias=True, rope_parameters={
                  "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 1000.0})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW, head_dim=8)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16, hidden_act="gelu")),  # gelu means tanh here
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",  # soft-capping, query_pre_attn_scalar, alternating windows
               dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=12, attn_logit_softcapping=3.0,
                    final_logit_softcapping=5.0)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",  # q/k norms, local rope base, scaled global rope
                    dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=20,
                         layer_types=["sliding_attention", "full_attention"],
                         rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                          "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                             "rope_theta": 5000.0}})),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",  # fused projections, partial rotary, longrope past 16 tokens
             dict(sliding_window=WINDOW * 2, original_max_position_embeddings=16,
                  rope_parameters={"rope_type": "longrope", "rope_theta": 1000.0, "partial_rotary_factor": 0.5,
                                   "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [2.0, 3.0, 4.0, 6.0]})),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM",  # no RoPE on layer 1 (NoPE), windowed there, tied head
                dict(no_rope_layer_interval=2, use_sliding_window=True, sliding_window=WINDOW)),
}


def hf_model(family: str, seed: int = 0):
    config_class, model_class, overrides = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**{**TINY, **overrides}))
    with torch.no_grad():  # biases and Gemma's (1 + w) norms start at zero: make every tensor matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf_model(request.param).save_pretrained(folder)
    return request.param, folder


def load_hf(folder, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


def left_padded(batch: int = 3, seq: int = 24, seed: int = 1):
    ids = torch.randint(4, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :5] = 0
    if batch > 2:
        mask[2, :11] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def test_loads_as_its_family_with_hf_names(family_dir):
    family, folder = family_dir
    model = ml.from_pretrained(folder)
    assert type(model).__name__ == FAMILIES[family][1]
    hf_keys = set(load_hf(folder).state_dict())
    assert set(model.state_dict()) == hf_keys | ({"lm_head.weight"} if model.config.tie_word_embeddings else set())


def test_saved_model_loads_in_transformers(family_dir, tmp_path):
    family, folder = family_dir
    ours = ml.from_pretrained(folder, dtype=torch.float32)
    ml.save_pretrained(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [FAMILIES[family][1]]
    theirs = load_hf(tmp_path)
    ids = left_padded(batch=1, seq=20)[0]
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)


def test_logits_match_transformers_with_and_without_padding(family_dir):
    family, folder = family_dir
    hf, ours = load_hf(folder), ml.from_pretrained(folder, dtype=torch.float32)
    ids, mask = left_padded()
    with torch.no_grad():
        expected, got = hf(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
        expected_full, got_full = hf(ids[:1]).logits, ours(ids[:1]).logits
        got_ones = ours(ids[:1], attention_mask=torch.ones_like(ids[:1])).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)  # padding positions too (the loss sees them)
    torch.testing.assert_close(got_full, expected_full, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_ones, got_full, atol=0, rtol=0)  # an all-ones mask is dropped: same path


def test_greedy_and_beam_search_match_transformers_past_the_window(family_dir):
    family, folder = family_dir
    hf, ours = load_hf(folder), ml.from_pretrained(folder, dtype=torch.float32)
    ids, mask = left_padded(seq=12)
    for kwargs in (dict(), dict(num_beams=4)):
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, **kwargs)
        got = ml.generate(ours, ids, attention_mask=mask, max_new_tokens=20, **kwargs)
        assert got.shape == expected.shape and torch.equal(got, expected), (family, kwargs)
    assert got.shape[1] > WINDOW * 2  # the cache outgrew every sliding window


def test_kv_cache_continues_the_full_sequence(family_dir):
    _, folder = family_dir
    model = ml.from_pretrained(folder, dtype=torch.float32)
    ids, mask = left_padded(batch=2, seq=26)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions).logits
        pieces, cache = [], None
        # past 16 tokens from the start: Phi-3's longrope rotates the whole sequence with its long factors then
        for start, end in [(0, 17), (17, 20)] + [(i, i + 1) for i in range(20, 26)]:
            out = model(ids[:, start:end], attention_mask=mask[:, :end], position_ids=positions[:, start:end],
                        past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
            cache = out.past_key_values
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, dim=1)[real], full[real], atol=1e-5, rtol=0)


def test_nf4_logits_match_transformers_bitsandbytes(family_dir):
    pytest.importorskip("bitsandbytes")
    family, folder = family_dir
    ours = ml.from_pretrained(folder, quantize="nf4", dtype=torch.float32)
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    theirs = load_hf(folder, quantization_config=bnb_config).train()  # train(): bnb's dequantize path, dropout 0
    first = ours.model.layers[0]
    assert type(first.self_attn.o_proj).__name__ == "NF4Linear" and type(first.mlp.down_proj).__name__ == "NF4Linear"
    ids = left_padded(batch=2, seq=20)[0][:1]
    with torch.no_grad():
        got, expected = ours(ids).logits, theirs(ids).logits
        dense = ml.from_pretrained(folder, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - dense).abs().max() > 1e-3  # really quantized


def lora_pair(folder, **lora_kwargs):
    """minilora and peft with the same LoRA weights (B random, so every factor gets a gradient)."""
    import peft
    from lora_helpers import copy_trainable  # here, not at the top: benchmarks import this module from elsewhere
    ours = ml.apply_lora(ml.from_pretrained(folder, dtype=torch.float32), ml.LoraConfig(**lora_kwargs)).train()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    theirs = peft.get_peft_model(load_hf(folder), peft.LoraConfig(**lora_kwargs)).train()
    copy_trainable(theirs, ours)
    return ours, theirs


def test_lora_loss_and_gradients_equal_peft(family_dir):
    from lora_helpers import assert_same_training_signal
    _, folder = family_dir
    ours, theirs = lora_pair(folder, r=4, lora_alpha=8, target_modules="all-linear")
    ids, mask = left_padded(batch=2)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    grads = assert_same_training_signal(ours, theirs, inputs, inputs, loss_atol=1e-5, grad_atol=1e-5, grad_rtol=1e-4)
    assert len(grads) >= 2 * 2 * 4  # 2 layers, >= 4 linears


def test_default_targets_are_peft_defaults(family_dir):
    import peft
    family, folder = family_dir
    if family in ("phi3", "smollm3"):  # peft has no default for these: both ask for target_modules
        with pytest.raises(ValueError, match="target_modules"):
            ml.apply_lora(ml.from_pretrained(folder), ml.LoraConfig(r=2))
        return
    ours = ml.apply_lora(ml.from_pretrained(folder), ml.LoraConfig(r=2))
    theirs = peft.get_peft_model(load_hf(folder), peft.LoraConfig(r=2))
    ours_layers = {n for n, m in ours.named_modules() if isinstance(m, ml.LoraLinear)}
    theirs_layers = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                     if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    assert ours_layers == theirs_layers and len(ours_layers) == 4


def test_adapters_load_in_peft_and_back(family_dir, tmp_path):
    import peft
    _, folder = family_dir
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear")
    ours = lora_pair(folder, **kwargs)[0].eval()
    ml.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(load_hf(folder), tmp_path / "ours").eval()
    ids = left_padded(batch=1, seq=20)[0]
    with torch.no_grad():
        reference = ours(ids).logits
        torch.testing.assert_close(theirs(ids).logits, reference, atol=1e-5, rtol=1e-5)
        assert (ml.from_pretrained(folder)(ids).logits - reference).abs().max() > 1e-3  # the adapter matters
    theirs.save_pretrained(tmp_path / "theirs")
    again = ml.load_adapter(ml.from_pretrained(folder, dtype=torch.float32), tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, reference, atol=1e-5, rtol=1e-5)


# --- attention details ----------------------------------------------------------------------------------

def test_sliding_window_mask():
    mask = attention_mask_4d(None, q_len=5, past_len=3, device=torch.device("cpu"), sliding_window=3)[0, 0]
    expected = torch.tensor([[j <= 3 + i and j > 3 + i - 3 for j in range(8)] for i in range(5)])
    assert torch.equal(mask, expected)
    assert attention_mask_4d(None, 6, 0, torch.device("cpu"), sliding_window=6) is None  # window not reached
    one_token = attention_mask_4d(None, 1, 9, torch.device("cpu"), sliding_window=4)
    assert one_token[0, 0, 0].tolist() == [False] * 6 + [True] * 4
    assert attention_mask_4d(torch.ones(2, 7), 7, 0, torch.device("cpu")) is None  # no padding: SDPA's is_causal


def test_sdpa_gets_is_causal_and_shares_kv_heads(monkeypatch, tmp_path):
    hf_model("qwen3").save_pretrained(tmp_path)
    model = ml.from_pretrained(tmp_path, dtype=torch.float32)
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        calls.append((k.shape[1], kwargs))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(llama_module.F, "scaled_dot_product_attention", recording)
    ids = left_padded(batch=2, seq=10)[0]
    with torch.no_grad():
        model(ids, attention_mask=torch.ones_like(ids))
    kv_heads, kwargs = calls[0]
    assert kwargs["attn_mask"] is None and kwargs["is_causal"]
    if llama_module.SDPA_HAS_GQA:
        assert kv_heads == 2 and kwargs["enable_gqa"]


# --- config errors --------------------------------------------------------------------------------------

def write_config(tmp_path, **config):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, **config}))
    return tmp_path


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported model_type 'falcon'.*qwen2.*gemma3_text.*phi3"):
        ml.from_pretrained(write_config(tmp_path, model_type="falcon"))


@pytest.mark.parametrize("config, error, match", [
    (dict(model_type="qwen2", rope_scaling={"rope_type": "proportional", "factor": 4.0}), ValueError,
     "rope type 'proportional'"),
    (dict(model_type="phi3", rope_scaling={"type": "longrope", "short_factor": [1.0] * 8}), KeyError, "long_factor"),
    (dict(model_type="phi3", partial_rotary_factor=0.5, rope_scaling={"type": "su", "short_factor": [1.0] * 8,
                                                                      "long_factor": [1.0] * 8}),
     ValueError, "short_factor has 8 entries, expected rotary_dim // 2 = 4"),
    (dict(model_type="gemma", use_bidirectional_attention=True), ValueError, "use_bidirectional_attention"),
    (dict(model_type="gemma2", hidden_activation="relu"), ValueError, "hidden_act"),
    (dict(model_type="mistral", sliding_window=None, num_hidden_layers=2), None, None),
    (dict(model_type="gemma2", sliding_window=None), ValueError, "sliding_window"),
    (dict(model_type="smollm3", no_rope_layers=[1]), ValueError, "no_rope_layers must list 1 .* for each of the 2"),
    (dict(model_type="smollm3", no_rope_layers=[1, 2]), ValueError, "no_rope_layers"),
])
def test_config_errors_name_the_field(tmp_path, config, error, match):
    from minilora.models import model_classes
    config_class, _ = model_classes({**TINY, **config})
    if error is None:
        assert config_class.from_dict({**TINY, **config}).layer_types == ["full_attention"] * 2
        return
    with pytest.raises(error, match=match):
        config_class.from_dict({**TINY, **config})


def test_family_defaults_follow_transformers():
    """Keys a config.json leaves out take the transformers config class's defaults."""
    from minilora.models import model_classes
    for family, (config_class, _, _) in FAMILIES.items():
        theirs = getattr(transformers, config_class)(**TINY)
        ours = model_classes({**TINY, "model_type": family})[0].from_dict({**TINY, "model_type": family})
        for key in ("head_dim", "sliding_window", "layer_types", "tie_word_embeddings", "rms_norm_eps",
                    "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "no_rope_layers"):
            if hasattr(theirs, key) and key in ours.family_keys | {"head_dim", "tie_word_embeddings", "rms_norm_eps"}:
                assert getattr(ours, key) == getattr(theirs, key), (family, key)


def test_default_qlora_equals_peft_kbit_recipe(family_dir, tmp_path):
    """quantize="nf4" without dtype on a bf16 checkpoint is QLoRA's recipe: the same loss and LoRA gradients as
    transformers' NF4 (bf16 compute) + peft's prepare_model_for_kbit_training (fp32 residual, norms, head)."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    from lora_helpers import assert_bf16_close_grads, copy_trainable, peft_qlora
    family, _ = family_dir
    hf_model(family).to(torch.bfloat16).save_pretrained(tmp_path)
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    ours = ml.apply_lora(ml.from_pretrained(tmp_path, quantize="nf4"), ml.LoraConfig(**kwargs)).train()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    theirs = peft_qlora(tmp_path, kwargs)
    copy_trainable(theirs, ours)
    ids, mask = left_padded(batch=2)
    labels = ids.masked_fill(mask == 0, -100)
    got = ours(ids, attention_mask=mask, labels=labels).loss
    expected = theirs(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)  # a bf16 residual is off by ~1e-3 or more
    got.backward()
    expected.backward()
    assert_bf16_close_grads(ours, theirs)
