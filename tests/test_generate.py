"""minilora.generate against transformers' `generate` (the oracle): greedy, sampling, beam search, EOS handling,
for Llama (decoder-only, left-padded batches) and T5 (encoder-decoder)."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import real_model_dir
from safetensors.torch import load_file
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from minilora.generate import generate, warp_logits
from minilora.models.llama import LlamaForCausalLM
from minilora.models.llama_config import LlamaConfig

transformers.logging.set_verbosity_error()

EOS, PAD = 1, 3  # PAD != 0: HF's beam search fills with EOS instead of a pad id of 0 (`pad or eos` on a tensor)
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=2, eos_token_id=EOS, pad_token_id=PAD)
PROMPT_LEN = 7


def save_and_load(hf_model, folder, model_class, config_class):
    hf_model.save_pretrained(folder, safe_serialization=True)
    model = model_class(config_class.from_dict(json.loads((folder / "config.json").read_text())))
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= set(model.tied_weight_keys()), (missing, unexpected)
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama whose EOS logit is boosted so some sequences and beams finish early (seed and boost picked
    so that greedy ends some rows but not all, and the beam stopping rules disagree; guarded below)."""
    torch.manual_seed(5)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    with torch.no_grad():
        hf.lm_head.weight[EOS] *= 2.5
    return hf, save_and_load(hf, tmp_path_factory.mktemp("llama"), LlamaForCausalLM, LlamaConfig)


def prompts(padded: bool = True):
    ids = torch.randint(3, LLAMA["vocab_size"], (3, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
        mask[2, :1] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def finished_rows_are_padded(out: torch.Tensor, prompt_len: int) -> bool:
    """True if some row hit EOS and everything after its first EOS is PAD."""
    new = out[:, prompt_len:]
    hit = (new == EOS).any(dim=1)
    for row in new[hit]:
        first = int((row == EOS).nonzero()[0])
        if not torch.all(row[first + 1:] == PAD):
            return False
    return bool(hit.any())


@pytest.mark.parametrize("padded", [True, False])
def test_greedy_matches_transformers(llama, padded):
    hf, model = llama
    ids, mask = prompts(padded)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    got = generate(model, ids, attention_mask=mask if padded else None, max_new_tokens=20)
    assert got.shape == (3, PROMPT_LEN + 20)
    assert torch.equal(got, expected)
    assert finished_rows_are_padded(got, PROMPT_LEN)  # EOS handling was exercised


@pytest.mark.parametrize("early_stopping,length_penalty",
                         [(True, 1.0), (False, 1.0), (False, 0.0), (False, 2.0), ("never", 2.0)])
def test_beam_search_matches_transformers(llama, early_stopping, length_penalty):
    hf, model = llama
    ids, mask = prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, num_beams=4, early_stopping=early_stopping,
                  length_penalty=length_penalty)
    expected = hf.generate(ids, do_sample=False, **kwargs)
    got = generate(model, ids, **kwargs)
    assert got.shape == expected.shape and torch.equal(got, expected)


def test_beam_search_early_stopping_changes_the_result(llama):
    """Guards the parity test above: on this model the two stopping rules really produce different outputs."""
    _, model = llama
    ids, mask = prompts()
    eager = generate(model, ids, attention_mask=mask, max_new_tokens=12, num_beams=4, early_stopping=True)
    patient = generate(model, ids, attention_mask=mask, max_new_tokens=12, num_beams=4, early_stopping=False)
    assert eager.shape[1] < PROMPT_LEN + 12  # every hypothesis ended with EOS before max_new_tokens
    assert eager.shape != patient.shape or not torch.equal(eager, patient)
    assert (eager[:, PROMPT_LEN:] == EOS).any(dim=1).all()


def test_sampling_matches_transformers_with_the_same_seed(llama):
    hf, model = llama
    ids, mask = prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=True, temperature=0.7, top_k=10, top_p=0.9)
    torch.manual_seed(123)
    expected = hf.generate(ids, **kwargs)
    torch.manual_seed(123)
    got = generate(model, ids, **kwargs)
    assert torch.equal(got, expected)


def test_sampling_with_a_generator_is_reproducible(llama):
    _, model = llama
    ids, mask = prompts()

    def sample(seed):
        return generate(model, ids, attention_mask=mask, max_new_tokens=20, do_sample=True, temperature=1.5,
                        generator=torch.Generator().manual_seed(seed))

    rng_state = torch.get_rng_state()
    first, again, other = sample(0), sample(0), sample(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG was not touched


def test_top_k_1_sampling_is_greedy(llama):
    _, model = llama
    ids, mask = prompts()
    greedy = generate(model, ids, attention_mask=mask, max_new_tokens=20)
    sampled = generate(model, ids, attention_mask=mask, max_new_tokens=20, do_sample=True, top_k=1,
                       temperature=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, greedy)


@pytest.mark.parametrize("temperature,top_k,top_p,min_keep",
                         [(0.5, None, None, 1), (1.0, 5, None, 1), (1.0, None, 0.8, 1), (2.0, 7, 0.5, 1),
                          (1.0, 1, 0.01, 2)])
def test_warp_logits_matches_hf_warpers(temperature, top_k, top_p, min_keep):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    expected = logits.clone()
    if temperature != 1.0:
        expected = TemperatureLogitsWarper(temperature)(None, expected)
    if top_k:
        expected = TopKLogitsWarper(top_k, min_tokens_to_keep=min_keep)(None, expected)
    if top_p:
        expected = TopPLogitsWarper(top_p, min_tokens_to_keep=min_keep)(None, expected)
    got = warp_logits(logits, temperature, top_k, top_p, min_keep=min_keep)
    assert torch.equal(got.isinf(), expected.isinf())
    torch.testing.assert_close(got, expected)


def test_bad_arguments_are_rejected(llama):
    _, model = llama
    ids, mask = prompts()
    right_padded = torch.ones_like(mask)
    right_padded[0, -2:] = 0
    with pytest.raises(ValueError, match="left padding"):
        generate(model, ids, attention_mask=right_padded)
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, ids[0])
    with pytest.raises(ValueError, match="attention_mask shape"):
        generate(model, ids, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="beam sampling"):
        generate(model, ids, do_sample=True, num_beams=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ids, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="early_stopping"):
        generate(model, ids, num_beams=2, early_stopping="sometimes")


# --- T5 (encoder-decoder) ----------------------------------------------------------------------------------

T5 = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
          relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
          decoder_start_token_id=0, pad_token_id=0, eos_token_id=EOS)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    t5_module = pytest.importorskip("minilora.models.t5")
    torch.manual_seed(1)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**T5)).eval()
    with torch.no_grad():
        hf.lm_head.weight[EOS] *= 2.0
    folder = tmp_path_factory.mktemp("t5")
    return hf, save_and_load(hf, folder, t5_module.T5ForConditionalGeneration, t5_module.T5Config)


def t5_inputs():
    ids = torch.randint(2, T5["vocab_size"], (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # encoder inputs are right-padded
    return ids.masked_fill(mask == 0, 0), mask


def test_t5_greedy_matches_transformers(t5):
    hf, model = t5
    ids, mask = t5_inputs()
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=15)
    got = generate(model, ids, attention_mask=mask, max_new_tokens=15)
    assert torch.equal(got, expected)
    assert torch.all(got[:, 0] == T5["decoder_start_token_id"])
    assert (got == EOS).any(dim=1).sum() == 2  # two rows finished and were padded, one ran to the end


@pytest.mark.parametrize("early_stopping", [True, False])
def test_t5_beam_search_matches_transformers(t5, early_stopping):
    hf, model = t5
    ids, mask = t5_inputs()
    kwargs = dict(attention_mask=mask, max_new_tokens=10, num_beams=4, early_stopping=early_stopping,
                  pad_token_id=PAD)  # see PAD above
    expected = hf.generate(ids, **kwargs)
    got = generate(model, ids, **kwargs)
    assert got.shape == expected.shape and torch.equal(got, expected)
    assert (got == EOS).any() == early_stopping  # this model's stopping rules really disagree


# --- real checkpoint --------------------------------------------------------------------------------------

def test_smollm2_answers_the_capital_of_france():
    tokenizers = pytest.importorskip("tokenizers")
    folder = real_model_dir("SmolLM2-135M-Instruct")
    model = LlamaForCausalLM(LlamaConfig.from_dict(json.loads((folder / "config.json").read_text())))
    state = load_file(str(folder / "model.safetensors"))
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])  # tied: absent from the file
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    out = generate(model.eval(), ids, max_new_tokens=20)
    answer = tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    assert "Paris" in answer, answer
