"""The fused output head + next-token cross-entropy (ops/linear_cross_entropy.py) against the unfused path:
`causal_lm_loss(F.linear(hidden, W, b))`, itself tested against F.cross_entropy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minilora.ops import gemm, linear_cross_entropy
from minilora.ops.cross_entropy import causal_lm_loss
from minilora.ops.linear_cross_entropy import causal_lm_head_loss


def unfused(hidden, weight, labels, bias=None, softcap=None):
    logits = F.linear(hidden, weight, bias)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return causal_lm_loss(logits, labels)


def inputs(dtype, bias: bool, vocab: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 9, 16, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(vocab, 16, generator=g).to(dtype).requires_grad_()
    b = torch.randn(vocab, generator=g).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (2, 9), generator=g)
    labels[0, 3] = labels[1, :4] = -100
    return hidden, weight, b, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "bf16-in-fp32"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_same_loss_and_gradients_as_the_unfused_head_over_chunk_boundaries(monkeypatch, dtype, bias, softcap):
    rows = 4  # per chunk: 18 rows leave 2
    if dtype == "bf16-in-fp32":  # bf16 products computed in fp32, as on CPUs without fast bf16 kernels (AVX2)
        monkeypatch.setattr(gemm, "cpu_has_fast_bf16_gemm", lambda: False)
        dtype, rows = torch.bfloat16, gemm.FP32_MIN_ROWS  # fewer rows keep the bf16 kernel
        assert gemm.gemm_dtype(dtype, torch.device("cpu"), rows) == torch.float32
    monkeypatch.setattr(linear_cross_entropy, "MIN_CHUNK_ROWS", rows)
    monkeypatch.setattr(linear_cross_entropy, "CHUNK_ELEMENTS", rows * 50)
    hidden, weight, b, labels = inputs(dtype, bias)
    params = [hidden, weight] + ([b] if bias else [])
    got = causal_lm_head_loss(hidden, weight, labels, b, softcap)
    got_grads = torch.autograd.grad(got * 0.5, params)  # a scaled loss (gradient accumulation) scales them
    want = unfused(hidden, weight, labels, b, softcap)
    want_grads = torch.autograd.grad(want * 0.5, params)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 1e-2}
    torch.testing.assert_close(got, want, **tol)
    for name, g, w in zip(["hidden", "weight", "bias"][:len(params)], got_grads, want_grads, strict=True):
        assert g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("bias", [False, True])
def test_same_loss_and_gradients_as_the_unfused_head_under_bf16_autocast(monkeypatch, bias):
    monkeypatch.setattr(linear_cross_entropy, "MIN_CHUNK_ROWS", 4)
    monkeypatch.setattr(linear_cross_entropy, "CHUNK_ELEMENTS", 4 * 50)
    hidden, weight, b, labels = inputs(torch.float32, bias)
    params = [hidden, weight] + ([b] if bias else [])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = causal_lm_head_loss(hidden, weight, labels, b)
        want = unfused(hidden, weight, labels, b)
    got_grads, want_grads = torch.autograd.grad(got, params), torch.autograd.grad(want, params)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - causal_lm_head_loss(hidden, weight, labels, b)).abs() > 1e-4  # autocast's bf16 logits differ
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-3, rtol=1e-2)


def test_frozen_head_gets_no_gradient_and_no_grad_mode_computes_only_the_loss():
    hidden, weight, _, labels = inputs(torch.float32, bias=False)
    weight.requires_grad_(False)
    loss = causal_lm_head_loss(hidden, weight, labels)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        again = causal_lm_head_loss(hidden, weight, labels)
    assert not again.requires_grad
    torch.testing.assert_close(again, loss.detach(), atol=0, rtol=0)


def test_every_label_ignored_gives_nan_like_the_unfused_loss():
    hidden, weight, _, labels = inputs(torch.float32, bias=False)
    labels = torch.full_like(labels, -100)
    assert causal_lm_head_loss(hidden, weight, labels).isnan()
    assert unfused(hidden, weight, labels).isnan()


def test_bad_labels_are_named():
    hidden, weight, _, labels = inputs(torch.float32, bias=False)
    with pytest.raises(ValueError, match=r"labels must be \(batch, seq\) = \(2, 9\).*got \(2, 8\)"):
        causal_lm_head_loss(hidden, weight, labels[:, 1:])
    labels[1, 6] = 50
    with pytest.raises(ValueError, match="token id 50, outside the vocabulary"):
        causal_lm_head_loss(hidden, weight, labels)


# The model: with labels its loss takes the fused path, and `logits` are still there, computed when read.

def tiny_llama(**overrides):
    from minilora.models.llama import LlamaForCausalLM
    from minilora.models.llama_config import LlamaConfig

    torch.manual_seed(0)
    config = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)
    return LlamaForCausalLM(LlamaConfig.from_dict({**config, **overrides}))


def batch(rows: int = 2, seq: int = 12):
    ids = torch.randint(3, 96, (rows, seq), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[1, :4] = -100
    return ids, labels


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest number of elements any op output has while the mode is on."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}, {"final_logit_softcapping": 3.0}],
                         ids=["untied", "tied", "softcap"])
def test_model_loss_and_gradients_equal_the_loss_of_its_logits(overrides):
    model = tiny_llama(**overrides).train()
    ids, labels = batch()
    out = model(ids, labels=labels)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    logits = model(ids).logits
    want = causal_lm_loss(logits, labels)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(out.loss, want, atol=1e-6, rtol=1e-6)
    for (name, _), g, w in zip(model.named_parameters(), grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(out.logits, logits, atol=0, rtol=0)  # read after the fact, the same logits


def test_logits_read_later_keep_the_forward_pass_grad_mode():
    model = tiny_llama().train()
    ids, labels = batch()
    with torch.no_grad():
        out = model(ids, labels=labels)
    assert not out.logits.requires_grad
    out = model(ids, labels=labels)
    out.logits.float().logsumexp(-1).mean().backward()  # an extra loss on the logits still trains the model
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None


def test_no_tensor_of_the_whole_logits_is_made_for_the_loss(monkeypatch):
    from minilora import LoraConfig, apply_lora

    monkeypatch.setattr(linear_cross_entropy, "MIN_CHUNK_ROWS", 4)
    monkeypatch.setattr(linear_cross_entropy, "CHUNK_ELEMENTS", 4 * 512)
    model = apply_lora(tiny_llama(vocab_size=512), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    ids, labels = batch(rows=4, seq=16)
    whole = ids.numel() * 512  # (tokens, vocab) logits; the largest other tensor is the (vocab, hidden) head
    with LargestTensor() as largest:
        model(ids, labels=labels).loss.backward()
    assert largest.numel <= 512 * 32 < whole, largest.numel
    with LargestTensor() as largest:
        model(ids).logits.sum().backward()
    assert largest.numel >= whole  # the check sees the logits when they are made


def test_a_lora_head_takes_the_unfused_path_and_trains():
    from minilora import LoraConfig, apply_lora

    model = apply_lora(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"]))
    ids, labels = batch()
    out = model(ids, labels=labels)
    torch.testing.assert_close(out.loss, causal_lm_loss(out.logits, labels), atol=0, rtol=0)
    out.loss.backward()
    assert model.lm_head.lora_A.weight.grad is not None


def test_evaluate_hands_compute_metrics_the_logits_of_a_causal_lm():
    from train_helpers import fixed_length_lm_data
    from train_helpers import tiny_llama as llama

    from minilora.train.loop import evaluate

    model, data, seen = llama(), fixed_length_lm_data(n=5), {}

    def compute_metrics(predictions, _):
        seen["logits"] = predictions["logits"]
        return {}

    metrics = evaluate(model, data, batch_size=2, compute_metrics=compute_metrics)
    ids = torch.tensor([row["input_ids"] for row in data])
    with torch.no_grad():
        expected = model(ids).logits
        expected_loss = causal_lm_loss(expected, ids)
    torch.testing.assert_close(torch.stack([torch.from_numpy(a) for a in seen["logits"]]), expected)
    assert metrics["eval_loss"] == pytest.approx(expected_loss.item(), rel=1e-5)


@pytest.mark.parametrize("tied", [True, False], ids=["tied-scaled", "untied"])
def test_t5_loss_and_gradients_equal_the_loss_of_its_logits(tied):
    from minilora.models.t5 import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config.from_dict(
        {"vocab_size": 100, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
         "feed_forward_proj": "gated-gelu", "tie_word_embeddings": tied, "dropout_rate": 0.0})).train()
    g = torch.Generator().manual_seed(1)
    input_ids, labels = torch.randint(2, 100, (2, 9), generator=g), torch.randint(2, 100, (2, 7), generator=g)
    labels[1, 5:] = -100
    out = model(input_ids, labels=labels)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    logits = model(input_ids, decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels)).logits
    want = F.cross_entropy(logits.reshape(-1, 100), labels.reshape(-1), ignore_index=-100)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(out.loss, want, atol=1e-6, rtol=1e-6)
    for (name, _), got, expected in zip(model.named_parameters(), grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(out.logits, logits, atol=0, rtol=0)
