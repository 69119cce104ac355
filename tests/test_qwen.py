"""The real Qwen2.5-Coder-0.5B-Instruct checkpoint (bf16, untied head, q/k/v biases, chat template) built by
../shared/tools/make_qwen.sh: minilora against transformers, its tokenizer, a chat answer, a short QLoRA run."""
from __future__ import annotations

import json
import math
from itertools import islice

import pytest
import torch
from conftest import real_model_dir, shared_data_dir

import minilora as ml

QWEN = "Qwen2.5-Coder-0.5B-Instruct"
TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
        "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")


@pytest.fixture(scope="module")
def folder():
    return real_model_dir(QWEN)


@pytest.fixture(scope="module")
def model(folder):
    return ml.from_pretrained(folder)  # bf16, as stored


@pytest.fixture(scope="module")
def tokenizer(folder):
    return ml.load_tokenizer(folder)


def rows(relative: str, n: int) -> list[dict]:
    with open(shared_data_dir() / relative, encoding="utf-8") as f:
        return [json.loads(line) for line in islice(f, n)]


def test_loads_as_qwen2_in_bf16(model):
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.model_type == "qwen2"
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight is not model.model.embed_tokens.weight
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None
    assert set(model.config.layer_types) == {"full_attention"}  # use_sliding_window is false


def test_logits_match_transformers_on_real_text(folder, model, tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        expected, got = hf(ids).logits.float(), model(ids).logits.float()
    del hf
    # bf16 rounding apart (transformers multiplies in bf16, minilora in fp32 on CPUs without bf16 kernels)
    log_probs, expected_log_probs = torch.log_softmax(got, -1), torch.log_softmax(expected, -1)
    assert (log_probs - expected_log_probs).abs().max() < 0.75
    assert (log_probs - expected_log_probs).abs().mean() < 0.1  # bf16's step at |logit| ~16 is 0.0625
    torch.testing.assert_close(log_probs.exp(), expected_log_probs.exp(), atol=0.05, rtol=0)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.95


def test_tokenizer_gives_transformers_ids_on_real_rows(folder, tokenizer):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    texts = [r["text"] for r in rows("guanaco_llama2_1k/train.jsonl", 150)]
    texts += [r["question"] + "\n" + r["answer"] for r in rows("medical_qa/test.jsonl", 150)]
    assert len(texts) == 300
    assert tokenizer(texts)["input_ids"] == theirs(texts)["input_ids"]
    assert tokenizer.decode(tokenizer.encode(texts[0])) == theirs.decode(theirs(texts[0])["input_ids"])


def test_answers_paris_through_its_chat_template(folder, model, tokenizer):
    transformers = pytest.importorskip("transformers")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    assert prompt == transformers.AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        chat, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>assistant\n" in prompt
    ids = torch.tensor([tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)])
    out = ml.generate(model.eval(), ids, max_new_tokens=12)
    answer = tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    assert "Paris" in answer, answer


def perplexity(model, data) -> float:
    return math.exp(ml.evaluate(model, data, batch_size=4)["eval_loss"])


def test_short_qlora_run_lowers_held_out_perplexity(folder, tokenizer, tmp_path):
    from minilora.data.causal_lm import causal_lm_dataset

    records = rows("guanaco_llama2_1k/train.jsonl", 20)
    train_data = causal_lm_dataset(records[:16], tokenizer, max_length=48)
    held_out = causal_lm_dataset(records[16:], tokenizer, max_length=48)
    model = ml.from_pretrained(folder, quantize="nf4", dtype=torch.float32)
    model = ml.apply_lora(model, ml.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    before = perplexity(model, held_out)
    config = ml.TrainConfig(output_dir=str(tmp_path), max_steps=4, batch_size=4, learning_rate=1e-3,
                            lr_scheduler="constant", logging_steps=2, progress_bar=False, plot=False)
    ml.train(model, train_data, config)
    after = perplexity(model, held_out)
    assert after < 0.95 * before, (before, after)
