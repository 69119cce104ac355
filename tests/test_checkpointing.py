"""Gradient checkpointing: the same gradients as without it (LoRA, NF4 bases, dropout, eval mode), with the
blocks really recomputed, and no `enable_input_require_grads` workaround for frozen embeddings."""
import json
import weakref

import pytest
import torch
from conftest import real_model_dir, shared_data_dir
from torch import nn

import minilora as ml
from minilora import quant
from minilora.models.gradient_checkpointing import enable_gradient_checkpointing, run_block


def count_calls(module: nn.Module) -> list[int]:
    """Counts forward starts (a pre-hook: the recomputation stops early, once it has what backward needs)."""
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def grads_with_and_without_checkpointing(model: nn.Module, loss_fn, first_block: nn.Module):
    """Gradients of one backward pass each way (same RNG seed), and how often the first block ran."""
    results = []
    calls = count_calls(first_block)
    for enabled in (False, True):
        enable_gradient_checkpointing(model, enabled)
        model.zero_grad(set_to_none=True)
        calls[0] = 0
        torch.manual_seed(1234)
        loss_fn(model).backward()
        results.append((trainable_grads(model), calls[0]))
    enable_gradient_checkpointing(model, False)
    (plain, plain_calls), (ckpt, ckpt_calls) = results
    assert plain_calls == 1 and ckpt_calls == 2, "checkpointing must recompute the block in backward"
    assert plain and plain.keys() == ckpt.keys()
    assert all(g.abs().sum() > 0 for g in plain.values()), "every trainable tensor should get a gradient"
    return plain, ckpt


def assert_same_grads(plain: dict, ckpt: dict) -> None:
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------- a small stack of our own

class Block(nn.Module):
    def __init__(self, dim: int, quantized: bool):
        super().__init__()
        up, down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        if quantized:
            qconfig = quant.QuantConfig(compute_dtype=torch.float32)
            up, down = (quant.quantize_linear(m.weight, m.bias, qconfig) for m in (up, down))
        self.up, self.down = up, down
        self.scale = nn.Parameter(torch.ones(dim))  # the only trainable tensor (stands in for LoRA)
        self.dropout = nn.Dropout(0.2)

    def forward(self, x, gate):
        return x + self.dropout(self.down(torch.relu(self.up(x * self.scale)))) * gate


class Stack(nn.Module):
    def __init__(self, dim=32, depth=3, quantized=False):
        super().__init__()
        self.embed = nn.Embedding(50, dim)
        self.blocks = nn.ModuleList(Block(dim, quantized) for _ in range(depth))
        self.gradient_checkpointing = False
        for name, p in self.named_parameters():
            p.requires_grad_(name.endswith("scale"))  # frozen embeddings: block inputs need no grad

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = run_block(self, block, x, gate=0.5)  # keyword arguments pass through
        return x.pow(2).mean()


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_own_stack_same_grads(quantized, train):
    torch.manual_seed(0)
    model = Stack(quantized=quantized).train(train)
    ids = torch.randint(0, 50, (2, 9))
    plain, ckpt = grads_with_and_without_checkpointing(model, lambda m: m(ids), model.blocks[0])
    assert_same_grads(plain, ckpt)


def test_no_recompute_without_grad_and_clear_error_without_stacks():
    model = Stack()
    calls = count_calls(model.blocks[0])
    enable_gradient_checkpointing(model)
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 9)))
    assert calls[0] == 1
    with pytest.raises(ValueError, match="Linear has no block stack"):
        enable_gradient_checkpointing(nn.Linear(2, 2))


# ---------------------------------------------------------------- minilora's models, loaded from HF checkpoints

def _save_tiny_hf(tmp_path, family: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       attention_dropout=0.1)
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "bert":
        cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=48, num_labels=3)  # HF's default dropouts: 0.1
        model = transformers.BertForSequenceClassification(cfg)
    else:
        cfg = transformers.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                    feed_forward_proj="gated-gelu", dropout_rate=0.1, decoder_start_token_id=0)
        model = transformers.T5ForConditionalGeneration(cfg)
    model.save_pretrained(tmp_path / family, safe_serialization=True)
    return tmp_path / family


TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"],
           "t5": ["q", "v", "wi_0", "wo"]}


def _loss_fn(family: str):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding exercises the mask path too
    if family == "llama":
        return lambda m: m(input_ids=ids, attention_mask=mask, labels=ids).loss
    if family == "bert":
        return lambda m: m(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2])).loss
    labels = torch.randint(0, 97, (2, 5), generator=g)
    return lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss


def _blocks(model, family):
    return {"llama": lambda: model.model.layers, "bert": lambda: model.bert.encoder.layer,
            "t5": lambda: model.encoder.block}[family]()


@pytest.mark.parametrize("family", ["llama", "bert", "t5"])
@pytest.mark.parametrize("quantize", [None, "nf4", "int8"])
@pytest.mark.parametrize("train", [True, False])
def test_models_same_lora_grads_with_checkpointing(tmp_path, family, quantize, train):
    path = _save_tiny_hf(tmp_path, family)
    model = ml.from_pretrained(path, quantize=quantize, dtype=torch.float32)
    if quantize:
        assert any(quant.is_quantized(m) for m in model.modules())
    ml.apply_lora(model, ml.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS[family],
                                       init_lora_weights=False))  # non-zero B so every factor gets a gradient
    model.train(train)
    # nothing before the first block trains (frozen embeddings), and no input-grad hook is installed
    assert not any(p.requires_grad for n, p in model.named_parameters() if "embed" in n or "shared" in n)
    plain, ckpt = grads_with_and_without_checkpointing(model, _loss_fn(family), _blocks(model, family)[0])
    assert any("layers.0." in n or "layer.0." in n or "block.0." in n for n in plain)
    assert_same_grads(plain, ckpt)


def test_every_stack_of_t5_checkpoints(tmp_path):
    model = ml.from_pretrained(_save_tiny_hf(tmp_path, "t5"), dtype=torch.float32)
    enable_gradient_checkpointing(model)
    assert model.encoder.gradient_checkpointing and model.decoder.gradient_checkpointing
    enable_gradient_checkpointing(model, False)
    assert not model.encoder.gradient_checkpointing and not model.decoder.gradient_checkpointing


# ---------------------------------------------------------------- QLoRA on a real checkpoint

@pytest.fixture
def one_thread():
    """Measured: on a 2-core machine shared with other jobs, 2 OpenMP threads make this test ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_qlora_steps_with_checkpointing_lower_the_loss_on_smollm2(one_thread):
    from tokenizers import Tokenizer
    path = real_model_dir("SmolLM2-135M-Instruct")
    lines = (shared_data_dir() / "guanaco_llama2_1k" / "train.jsonl").read_text().splitlines()[:2]
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    ids = torch.tensor([tokenizer.encode(json.loads(line)["text"]).ids[:32] for line in lines])
    assert ids.shape == (2, 32)

    model = ml.from_pretrained(path, quantize="nf4", dtype=torch.bfloat16)  # bf16 compute, as QLoRA runs
    assert isinstance(model.model.layers[0].mlp.down_proj, quant.NF4Linear)
    ml.apply_lora(model, ml.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                           "gate_proj", "up_proj", "down_proj"]))
    enable_gradient_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[2] < losses[1] < losses[0], losses
    assert all(m.weight.grad is None for m in model.modules() if isinstance(m, quant.NF4Linear))


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_checkpointing_reuses_the_recomputed_dense_weight_and_plain_training_keeps_none(tmp_path, family,
                                                                                       monkeypatch):
    """Under checkpointing the backward pass dequantizes each NF4 weight once (the recompute), not twice (the
    recompute and the input gradient): the backward reuses what the recompute made. Without checkpointing no
    dense weight is saved between forward and backward."""
    path = _save_tiny_hf(tmp_path, family)
    model = ml.from_pretrained(path, quantize="nf4", dtype=torch.float32)
    ml.apply_lora(model, ml.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], init_lora_weights=False))
    model.train()
    dense, alive, most_alive = [], [], [0]  # (layer, shape) of every dequantization; weak refs to the results
    dequantize = quant.NF4Linear.dequantize

    def counting(self, dtype=None):
        weight = dequantize(self, dtype)
        dense.append((id(self), tuple(weight.shape)))
        alive.append(weakref.ref(weight))
        most_alive[0] = max(most_alive[0], sum(ref() is not None for ref in alive))
        return weight

    monkeypatch.setattr(quant.NF4Linear, "dequantize", counting)
    loss_fn, grads, saved = _loss_fn(family), [], []
    for enabled in (False, True):
        enable_gradient_checkpointing(model, enabled)
        model.zero_grad(set_to_none=True)
        dense.clear()
        saved.clear()
        most_alive[0] = 0
        torch.manual_seed(1234)  # the same dropout masks both ways
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            loss = loss_fn(model)
        in_forward, dense[:] = list(dense), []
        loss.backward()
        assert len({layer for layer, _ in in_forward}) == len(in_forward) >= 8  # each quantized layer once
        if enabled:
            assert sorted(dense) == sorted(in_forward)
            if family == "llama":  # one block's dense weights at a time (T5's blocks differ in size)
                assert most_alive[0] == len(in_forward) // len(model.model.layers)
        else:
            dense_shapes = {shape for _, shape in in_forward}
            assert saved and not dense_shapes & set(saved), dense_shapes & set(saved)
        grads.append(trainable_grads(model))
    assert_same_grads(*grads)
