"""What the training-speed work changed, checked against oracles: fast dropout masks (rate, seeding, sharing
between layers fed the same tensor, replay under gradient checkpointing), LoRA matmuls in the activation
dtype, and the hand-written backward passes of minilora.ops.fused (cross-entropy, RMSNorm, rotary, attention),
up to a QLoRA loss curve equal to peft + bitsandbytes'."""
import copy

import pytest
import torch
import torch.nn.functional as F
from lora_helpers import batch, peft_twin, tiny_llama
from torch import nn

import minilora as ml
from minilora.ops import attention, cross_entropy, rms_norm, rotary
from minilora.ops import dropout, lora_update
from minilora.models.gradient_checkpointing import enable_gradient_checkpointing
from minilora.lora.layer import LoraLinear
from minilora.ops.dropout import dropout_keep_mask
from minilora.ops.linear_group import linear_group

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------- dropout masks

@pytest.mark.parametrize("p", [0.05, 0.5, 0.001])
def test_keep_mask_rate_is_p_at_every_word_position(p):
    torch.manual_seed(0)
    x = torch.zeros(1024, 1024, dtype=torch.bfloat16)
    keep, p_eff = dropout_keep_mask(x, p)
    assert keep.dtype == x.dtype and keep.shape == x.shape
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    assert p_eff == round(p * 65536) / 65536 and abs(p_eff - p) <= 0.5 / 65536
    # Each 64-bit draw feeds 4 neighbours: all 4 positions must drop at rate p, independently.
    dropped = (keep == 0).double().view(-1, 4)
    sigma = (p_eff * (1 - p_eff) / dropped.shape[0]) ** 0.5
    for rate in dropped.mean(0).tolist():
        assert abs(rate - p_eff) < 5 * sigma, (rate, p_eff)
    both = (dropped[:, 0] * dropped[:, 1]).mean().item()
    assert abs(both - p_eff ** 2) < 5 * (p_eff ** 2 / dropped.shape[0]) ** 0.5 + 1e-6


def test_keep_mask_follows_the_torch_seed():
    x = torch.zeros(64, 48)
    torch.manual_seed(3)
    a, _ = dropout_keep_mask(x, 0.3)
    torch.manual_seed(3)
    b, _ = dropout_keep_mask(x, 0.3)
    c, _ = dropout_keep_mask(x, 0.3)
    assert torch.equal(a, b) and not torch.equal(b, c)


def lora_layer(seed=0, in_f=12, out_f=10, p=0.3, bias=True):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias)
    return LoraLinear(base, r=4, lora_alpha=8, lora_dropout=p, init_lora_weights=False).train()


@pytest.mark.parametrize("bias", [True, False])  # without bias the update goes into the base output in place
def test_dropout_output_and_grads_are_the_documented_formula(bias):
    layer = lora_layer(bias=bias)
    params = [layer.lora_A.weight, layer.lora_B.weight, layer.weight]
    x = torch.randn(5, 7, 12, requires_grad=True)
    torch.manual_seed(11)
    keep, p_eff = dropout_keep_mask(x, 0.3)
    scale = layer.scaling / (1 - p_eff)
    expected = layer.base_layer(x) + ((x * keep) @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * scale
    grad = torch.randn(expected.shape)
    grads_expected = torch.autograd.grad(expected, [x, *params], grad)
    torch.manual_seed(11)
    got = layer(x)
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, [x, *params], grad), grads_expected, strict=True):
        torch.testing.assert_close(a, b)
    layer.eval()
    x = x.detach()
    plain = layer.base_layer(x) + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * layer.scaling
    torch.testing.assert_close(layer(x), plain)


def test_dropout_is_unbiased():
    layer = lora_layer(p=0.5)
    x = torch.randn(4, 12)
    with torch.no_grad():
        mean = torch.stack([layer(x) for _ in range(4000)]).mean(0)
        expected = layer.eval()(x)
    assert rel_err(mean, expected) < 0.03


def test_layers_fed_the_same_tensor_share_one_mask():
    q = lora_layer(seed=1)
    k = copy.deepcopy(q)  # same weights, another module: equal outputs iff equal masks
    x = torch.randn(6, 12)
    assert torch.equal(q(x), k(x))
    assert not torch.equal(q(x), q(x))  # one layer called again draws again, as nn.Dropout does
    before = q(x)
    x.mul_(1.0)  # changed in place: a new tensor value, a new mask
    assert not torch.equal(k(x), before)
    k.share_dropout_mask = False  # peft's behaviour: one mask per layer
    assert not torch.equal(q(x), k(x))
    with torch.inference_mode():  # no version counter to check there: no sharing, still dropout
        x = torch.randn(6, 12)
        assert not torch.equal(q(x), q.eval()(x))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_shared_input_equals_calling_each_layer(p):
    torch.manual_seed(0)
    layers = [LoraLinear(nn.Linear(12, out_f, bias=bias), r=r, lora_alpha=8, lora_dropout=p,
                         init_lora_weights=False).train()
              for out_f, r, bias in ((10, 4, False), (6, 2, False), (6, 4, True))]
    twins = copy.deepcopy(layers)
    x = torch.randn(3, 5, 12, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    torch.manual_seed(1)
    grouped = linear_group(x, *layers)
    torch.manual_seed(1)
    separate = [layer(x_twin) for layer in twins]  # the same mask: they share it too
    grads = [torch.randn(t.shape) for t in separate]
    torch.autograd.backward(grouped, grads)
    torch.autograd.backward(separate, grads)
    for a, b in zip(grouped, separate, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(x.grad, x_twin.grad)
    for layer, twin in zip(layers, twins, strict=True):
        for name in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer, name).weight.grad, getattr(twin, name).weight.grad)


def test_shared_input_calls_what_it_cannot_group(monkeypatch):
    layers = [LoraLinear(nn.Linear(8, 8), r=2, lora_alpha=4, init_lora_weights=False) for _ in range(4)]
    layers[0] = nn.Linear(8, 8)
    layers[1].merge()
    calls = []
    layers[2].register_forward_hook(lambda *_: calls.append("hook"))
    grouped_calls, update = [], lora_update._LoraUpdate

    class Counting(update):
        @staticmethod
        def forward(ctx, x, keep, frozen, biases, scalings, *tensors):
            grouped_calls.append(len(scalings))
            return update.forward(ctx, x, keep, frozen, biases, scalings, *tensors)

    monkeypatch.setattr(lora_update, "_LoraUpdate", Counting)
    layers.append(LoraLinear(nn.Linear(8, 8), r=2, lora_alpha=4, init_lora_weights=False))
    x = torch.randn(2, 8)
    outs = linear_group(x, *layers)
    assert calls == ["hook"] and grouped_calls == [2, 1]  # layers 3 and 4 as one; the hooked one alone
    for layer, out in zip(layers, outs, strict=True):
        torch.testing.assert_close(out, layer(x))


def test_llama_draws_one_mask_per_distinct_input(monkeypatch, tmp_path):
    calls = []

    def counting(x, p):
        calls.append(tuple(x.shape))
        return dropout_keep_mask(x, p)

    monkeypatch.setattr(dropout, "dropout_keep_mask", counting)
    _, model = tiny_pair(tmp_path)
    model = ml.apply_lora(model, ml.LoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.1)).train()
    ids = torch.randint(3, 96, (2, 7))
    model(ids, labels=ids)
    assert len(calls) == 2 * 4  # per layer: q/k/v input, o input, gate/up input, down input
    calls.clear()
    monkeypatch.setattr(LoraLinear, "share_dropout_mask", False)
    model(ids, labels=ids)
    assert len(calls) == 2 * 7


def test_gradient_checkpointing_replays_the_same_masks(tmp_path):
    _, model = tiny_pair(tmp_path)
    model = ml.apply_lora(model, ml.LoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.2,
                                               init_lora_weights=False)).train()
    ids = torch.randint(3, 96, (2, 9))

    def grads():
        model.zero_grad()
        torch.manual_seed(5)
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    enable_gradient_checkpointing(model)
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    checkpointed = grads()
    assert len(calls) == 2  # forward + recomputation: checkpointing really ran
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=0, msg=name)


# ---------------------------------------------------------------- LoRA math in the activation dtype

def test_bf16_lora_matches_peft_up_to_bf16_rounding():
    base = tiny_llama().to(torch.bfloat16)
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    ours = ml.apply_lora(copy.deepcopy(base), ml.LoraConfig(**kwargs))
    theirs = peft_twin(ours, base, kwargs)  # peft keeps fp32 LoRA factors and computes them in fp32
    assert ours.model.layers[0].self_attn.q_proj.lora_A.weight.dtype == torch.float32
    b = batch()
    out_ours, out_theirs = ours(**b), theirs(**b)
    assert out_ours.logits.dtype == torch.bfloat16
    assert rel_err(out_ours.logits, out_theirs.logits) < 1e-2
    assert abs(out_ours.loss.item() - out_theirs.loss.item()) < 1e-2 * out_theirs.loss.item()
    out_ours.loss.backward()
    out_theirs.loss.backward()
    theirs_grads = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                    for n, p in theirs.named_parameters() if p.requires_grad}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert p.grad.dtype == torch.float32, name
            assert rel_err(p.grad, theirs_grads[name]) < 5e-2, name


def test_lora_under_autocast_runs_in_bf16_with_fp32_factor_grads():
    model = ml.apply_lora(tiny_llama(), ml.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    b = batch()
    reference = model(**b)
    reference.loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**b)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad.dtype == torch.float32 and rel_err(p.grad, expected[name]) < 5e-2, name


# ---------------------------------------------------------------- fused cross-entropy

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_equals_torch_over_chunk_boundaries(monkeypatch, dtype):
    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", 3 * 50)  # 3 rows per chunk: 17 rows leave a remainder
    torch.manual_seed(0)
    logits = (torch.randn(17, 50) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (17,))
    targets[[2, 9]] = -100
    expected = F.cross_entropy(logits.float(), targets, ignore_index=-100)
    (grad_expected,) = torch.autograd.grad(expected * 3, logits)
    got = cross_entropy.cross_entropy(logits, targets)
    (grad_got,) = torch.autograd.grad(got * 3, logits)
    assert got.dtype == torch.float32 and grad_got.dtype == dtype
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    tol = 1e-7 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad_got.float(), grad_expected.float(), atol=tol, rtol=tol)
    assert torch.all(grad_got[[2, 9]] == 0)


def test_causal_lm_loss_is_transformers_shifted_mean():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :3] = -100
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    (grad_expected,) = torch.autograd.grad(expected, logits)
    got = cross_entropy.causal_lm_loss(logits, labels)
    (grad_got,) = torch.autograd.grad(got, logits)  # d loss = 1: the gradient computed in forward as is
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad_got, grad_expected, atol=1e-7, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(cross_entropy.causal_lm_loss(logits, labels), expected, atol=1e-6, rtol=1e-6)


def test_cross_entropy_bad_input():
    all_ignored = cross_entropy.cross_entropy(torch.randn(3, 5), torch.full((3,), -100))
    assert torch.isnan(all_ignored)  # as F.cross_entropy
    with pytest.raises(ValueError, match="token id 7"):
        cross_entropy.cross_entropy(torch.randn(3, 5), torch.tensor([1, 7, 2]))
    with pytest.raises(ValueError, match="logits"):
        cross_entropy.cross_entropy(torch.randn(3, 5), torch.tensor([1, 2]))


def saved_bytes(fn):
    """Bytes autograd keeps for backward while `fn()`'s result is alive (distinct storages)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def test_lm_loss_keeps_no_fp32_logits_for_backward():
    logits = torch.randn(4, 64, 1000, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1000, (4, 64))
    _, ours = saved_bytes(lambda: cross_entropy.causal_lm_loss(logits, labels))
    _, torch_way = saved_bytes(lambda: F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten()))
    logits_bytes = logits.numel() * logits.element_size()
    assert ours < logits_bytes * 1.05  # one bf16 logits-sized tensor: their gradient
    assert torch_way > 1.9 * logits_bytes  # what it replaces: an fp32 copy


# ---------------------------------------------------------------- fused attention

def sdpa(q, k, v, mask):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


def qkv(dtype, heads=6, kv_heads=2, seq=20, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, seq, dim, generator=g).to(dtype).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    return q, k, v, torch.randn(2, heads, seq, dim, generator=g).to(dtype)


def padding_mask(seq=20):
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    keep = torch.ones(2, seq, dtype=torch.bool)
    keep[1, :4] = False  # left padding: rows 0..3 of sequence 1 still see themselves via the causal diagonal
    mask = causal[None, None] & keep[:, None, None, :]
    return mask | ~mask.any(-1, keepdim=True)


@pytest.mark.parametrize("mask_kind", ["causal", "padding", "bidirectional"])
@pytest.mark.parametrize("block", [1, 6, 20])
def test_attention_equals_sdpa_fp32(monkeypatch, mask_kind, block):
    """Blocks of query positions skip the keys after them (causal masks only; 6 leaves a remainder of 2, 20 is
    one block)."""
    monkeypatch.setattr(attention, "BLOCK_QUERIES", block)
    q, k, v, g = qkv(torch.float32)
    mask = {"causal": None, "padding": padding_mask(), "bidirectional": torch.rand(2, 1, 20, 20) > 0.3}[mask_kind]
    if mask is not None:
        mask |= torch.eye(20, dtype=torch.bool)  # every query sees a key
    expected = sdpa(q, k, v, mask)
    grads_expected = torch.autograd.grad(expected, (q, k, v), g)
    got = attention.attention(q, k, v, mask)
    grads_got = torch.autograd.grad(got, (q, k, v), g)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_got, grads_expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attention_bf16_error_is_sdpa_bf16_error():
    q, k, v, g = qkv(torch.bfloat16, seq=64)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    exact = sdpa(q64, k64, v64, None)
    exact_grads = torch.autograd.grad(exact, (q64, k64, v64), g.double())

    def errors(fn):
        out = fn(q, k, v, None)
        grads = torch.autograd.grad(out, (q, k, v), g)
        return [rel_err(out, exact)] + [rel_err(a, b) for a, b in zip(grads, exact_grads, strict=True)]

    ours, theirs = errors(attention.attention), errors(sdpa)
    for mine, sdpas in zip(ours, theirs, strict=True):
        assert mine < 2 * sdpas + 2e-3, (ours, theirs)


def test_attention_rejects_bad_shapes():
    q, k, v, _ = qkv(torch.float32, heads=5, kv_heads=2)
    with pytest.raises(ValueError, match="heads"):
        attention.attention(q, k, v)
    q, k, v, _ = qkv(torch.float32)
    with pytest.raises(ValueError, match="q_len"):
        attention.attention(q[:, :, :3], k, v)


# ---------------------------------------------------------------- fused RMSNorm

def hf_rms_norm(x, weight, eps=1e-5):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.bfloat16, torch.float32)])
def test_rms_norm_equals_transformers_ops(x_dtype, w_dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 40, generator=g) * 3).to(x_dtype).requires_grad_()
    w = (1 + torch.randn(40, generator=g) * 0.1).to(w_dtype).requires_grad_()
    expected = hf_rms_norm(x, w)
    grad = torch.randn(expected.shape, generator=g).to(expected.dtype)
    grads_expected = torch.autograd.grad(expected, (x, w), grad)
    got = rms_norm.rms_norm(x, w, 1e-5)
    grads_got = torch.autograd.grad(got, (x, w), grad)
    assert got.dtype == expected.dtype  # fp32 weight on bf16 input promotes, as in transformers
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    tol = 1e-6 if x_dtype == torch.float32 else 1e-2
    for a, b in zip(grads_got, grads_expected, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# ---------------------------------------------------------------- fused rotary embedding

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_equals_transformers(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 4, 16, generator=g).to(dtype).transpose(1, 2).requires_grad_()  # as q_proj(x).view.T
    k = torch.randn(2, 2, 7, 16, generator=g).to(dtype).requires_grad_()
    freqs = torch.randn(2, 7, 8, generator=g)
    angles = torch.cat((freqs, freqs), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    expected = apply_rotary_pos_emb(q, k, cos, sin)
    got = (rotary.rotary(q, cos, sin), rotary.rotary(k, cos, sin))
    grads = [torch.randn(t.shape, generator=g).to(dtype) for t in expected]
    grads_expected = torch.autograd.grad(expected, (q, k), grads)
    grads_got = torch.autograd.grad(got, (q, k), grads)
    tol = 1e-6 if dtype == torch.float32 else 2e-2  # bf16: one rounding fewer than transformers' chain
    for a, b in zip((*got, *grads_got), (*expected, *grads_expected), strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# ---------------------------------------------------------------- the Llama training path

def tiny_pair(tmp_path, **overrides):
    import transformers

    torch.manual_seed(0)
    config = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, **overrides)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf, ml.from_pretrained(tmp_path)


def test_llama_training_loss_and_grads_equal_transformers(tmp_path):
    hf, model = tiny_pair(tmp_path)
    hf.train()
    model.train()
    ids = torch.randint(3, 96, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    labels = ids.masked_fill(mask == 0, -100)
    expected = hf(ids, attention_mask=mask, labels=labels).loss
    got = model(ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    expected.backward()
    got.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_llama_lora_trains_under_autocast(tmp_path, quantize):
    """bf16 autocast over an fp32 model (train.py's bf16 flag), also with fp32-compute NF4 bases whose outputs
    autocast leaves fp32 while other activations turn bf16: the hand-written backward passes must agree."""
    tiny_pair(tmp_path)
    qconfig = ml.QuantConfig("nf4", compute_dtype=torch.float32) if quantize else None
    model = ml.apply_lora(ml.from_pretrained(tmp_path, dtype=torch.float32, quantize=qconfig),
                          ml.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)).train()
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = model(ids, labels=ids).loss
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(ids, labels=ids).loss
    got.backward()
    assert abs(got.item() - expected.item()) < 1e-2 * expected.item()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad.dtype == torch.float32 and rel_err(p.grad, grads[name]) < 0.1, name


def test_qlora_loss_curve_equals_peft_bitsandbytes(tmp_path):
    """The headline semantics: NF4 base, bf16 compute, LoRA on all seven projections, dropout 0, AdamW."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    tiny_pair(tmp_path, tie_word_embeddings=True)
    kwargs = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    ours = ml.apply_lora(ml.from_pretrained(tmp_path, quantize="nf4", dtype=torch.bfloat16), ml.LoraConfig(**kwargs))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a non-zero update from step 0, so LoRA's math shows in the first loss
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, quantization_config=bnb_config)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(**kwargs))
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(ours_params[name.removeprefix("base_model.model.").replace(".default", "")])
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    curves = []
    for model in (ours, theirs):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(6):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0][-1] < curves[0][0] - 0.1, curves  # training moved the loss
    ours_curve, peft_curve = curves
    assert abs(ours_curve[0] - peft_curve[0]) < 2e-4 * peft_curve[0], curves  # same weights: rounding only
    for a, b in zip(ours_curve, peft_curve, strict=True):
        assert abs(a - b) < 5e-3 * b, curves  # Adam steps amplify rounding a little
