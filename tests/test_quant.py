"""Quantized base layers (minilora.quant.layers) against bitsandbytes' own layers and transformers' bnb models."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minilora import quant
from minilora.quant import layers as quant_layers
from minilora.quant import format as quant_format
from minilora.models.base import PreTrainedModel
from minilora.quant.config import QuantConfig

bnb = pytest.importorskip("bitsandbytes")
bnbF = quant.import_bitsandbytes().functional

FOUR_BIT = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def weights(out_f=48, in_f=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out_f, in_f, generator=g) * 0.05).to(dtype), (torch.randn(out_f, generator=g) * 0.1).to(dtype)


def inputs(in_f=64, seed=1, dtype=torch.float32, shape=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, in_f, generator=g).to(dtype)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bnb_linear4bit(w, b, quant_type, double_quant, compute_dtype=torch.float32):
    """What `bnb.nn.Linear4bit(...).to(device)` makes of the same weight (bitsandbytes' documented recipe)."""
    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=b is not None, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=double_quant,
                                     quant_type=quant_type, module=layer)
    if b is not None:
        layer.bias = nn.Parameter(b.clone(), requires_grad=False)
    return layer.to("cpu").train()  # train(): eval + no-grad would switch bnb to its CPU inference repacking


def bnb_linear8bit(w, b):
    layer = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=b is not None, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    if b is not None:
        layer.bias = nn.Parameter(b.clone(), requires_grad=False)
    return layer.to("cpu").train()  # train(): bnb's CPU path dequantizes the weight, as minilora always does


# ---------------------------------------------------------------- 4-bit layer

@pytest.mark.parametrize("quant_type, double_quant", FOUR_BIT)
def test_4bit_output_is_linear_of_dequantized_weight_and_close_to_fp32(quant_type, double_quant):
    w, b = weights()
    layer = quant.quantize_linear(w, b, QuantConfig(quant_type, double_quant, compute_dtype=torch.float32))
    assert isinstance(layer, quant.NF4Linear) and layer.quant_type == quant_type
    assert (layer.in_features, layer.out_features) == (64, 48)
    x = inputs()
    dense = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(layer(x), F.linear(x, dense, b))
    err = rel_err(layer(x), F.linear(x, w, b))
    assert 0 < err < (0.12 if quant_type == "nf4" else 0.2), err


@pytest.mark.parametrize("quant_type, double_quant", FOUR_BIT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_4bit_packs_the_same_bytes_and_state_dict_as_bnb_linear4bit(quant_type, double_quant, dtype):
    w, b = weights(dtype=dtype)
    ours = quant.quantize_linear(w, b, QuantConfig(quant_type, double_quant, compute_dtype=dtype))
    ref = bnb_linear4bit(w, b, quant_type, double_quant, compute_dtype=dtype)
    assert torch.equal(ours.weight.data, ref.weight.data)
    assert ours.weight.quant_state == ref.weight.quant_state
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd)
    for key in ref_sd:
        assert ours_sd[key].dtype == ref_sd[key].dtype and torch.equal(ours_sd[key], ref_sd[key]), key
    x = inputs(dtype=dtype)
    assert torch.equal(ours(x), ref(x))


@pytest.mark.parametrize("quant_type, double_quant", FOUR_BIT)
@pytest.mark.parametrize("shape, blocksize", [((48, 64), 64), ((40, 72), 64), ((13, 9), 64), ((24, 96), 256)])
def test_quantizing_in_row_chunks_equals_one_bitsandbytes_call(monkeypatch, quant_type, double_quant, shape,
                                                               blocksize):
    """Chunks hold whole blocks (72 columns: 8 rows per 64-weight block step; 13 x 9: a partial last block)."""
    monkeypatch.setattr(quant_layers, "QUANTIZE_CHUNK_ELEMENTS", 100)  # several chunks per matrix
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).bfloat16()
    ours = quant.quantize_linear(w, None, QuantConfig(quant_type, double_quant, blocksize=blocksize))
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                       quant_type=quant_type, quant_storage=torch.uint8)
    assert torch.equal(ours.weight.data, packed) and ours.weight.quant_state == state
    assert ours.weight.quant_state.dtype == torch.bfloat16


def test_int8_in_row_chunks_equals_one_bitsandbytes_call(monkeypatch):
    monkeypatch.setattr(quant_layers, "QUANTIZE_CHUNK_ELEMENTS", 100)
    w, _ = weights(out_f=37, in_f=40)
    layer = quant.quantize_linear(w, None, QuantConfig("int8"))
    int8, scb, _ = bnbF.int8_vectorwise_quant(w.half())
    assert torch.equal(layer.weight, int8) and torch.equal(layer.SCB, scb)


def test_quantize_linear_reads_rows_from_a_lazy_weight_and_casts_them(monkeypatch):
    """What loading passes: an object that reads row ranges on demand, quantized in the requested dtype."""
    monkeypatch.setattr(quant_layers, "QUANTIZE_CHUNK_ELEMENTS", 1000)
    w, b = weights(out_f=40, in_f=64)
    reads = []

    class Rows:
        shape, dtype = w.shape, w.dtype

        def __getitem__(self, rows):
            reads.append((rows.start, rows.stop))
            return w[rows]

    ours = quant.quantize_linear(Rows(), b, QuantConfig(compute_dtype=torch.bfloat16), dtype=torch.bfloat16)
    ref = quant.quantize_linear(w.bfloat16(), b.bfloat16(), QuantConfig(compute_dtype=torch.bfloat16))
    assert len(reads) > 1 and torch.equal(ours.weight.data, ref.weight.data)
    assert ours.weight.quant_state == ref.weight.quant_state
    assert ours.bias.dtype == torch.bfloat16 and torch.equal(ours.bias, ref.bias)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_only_the_input_gets_gradients(quant_type):
    w, b = weights()
    layer = quant.quantize_linear(w, b, QuantConfig(quant_type, compute_dtype=torch.float32))
    dense = layer.dequantize().clone()
    x = inputs().requires_grad_()
    grad_out = inputs(48, seed=2)
    layer(x).backward(grad_out)
    assert layer.weight.requires_grad is False and layer.weight.grad is None
    assert layer.bias.requires_grad is False and layer.bias.grad is None
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, dense, b).backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    # a bias set to train (LoRA bias="lora_only") gets its gradient too
    layer.bias.requires_grad_(True)
    layer(x.detach()).backward(grad_out)
    torch.testing.assert_close(layer.bias.grad, grad_out.sum((0, 1)))
    assert layer.weight.grad is None


def test_no_graph_and_no_saved_weight_when_input_needs_no_grad():
    layer = quant.quantize_linear(*weights(), QuantConfig(compute_dtype=torch.float32))
    assert not layer(inputs()).requires_grad
    with torch.no_grad():
        assert not layer(inputs().requires_grad_()).requires_grad


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_no_dense_weight_is_kept_for_backward(quant_type):
    w, _ = weights(256, 128)
    x = inputs(128).requires_grad_()
    layer = quant.quantize_linear(w, None, QuantConfig(quant_type, compute_dtype=torch.float32))
    dense = nn.Linear(128, 256, bias=False).requires_grad_(False)
    saved = []
    for module, expected in [(dense, 1), (layer, 0)]:  # plain autograd saves the weight; ours saves nothing
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = module(x)
        assert sum(t.numel() == 256 * 128 for t in saved) == expected
        y.sum().backward()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
def test_compute_dtype_bf16(quant_type):
    w, b = weights()
    layer = quant.quantize_linear(w, b, QuantConfig(quant_type, compute_dtype=torch.bfloat16))
    dense_bf16 = layer.dequantize()
    assert dense_bf16.dtype == torch.bfloat16
    x = inputs().requires_grad_()
    y = layer(x)
    assert y.dtype == torch.float32  # output in the input's dtype, like bnb
    assert torch.equal(y, F.linear(x.detach().bfloat16(), dense_bf16, b.bfloat16()).float())
    y.sum().backward()
    assert x.grad.dtype == torch.float32
    fp32 = quant.quantize_linear(w, b, QuantConfig(quant_type, compute_dtype=torch.float32))
    assert rel_err(y, fp32(x)) < 0.02
    assert layer(x.detach().bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("quant_type, double_quant", FOUR_BIT)
def test_4bit_dequantize_equals_bnb_dequantized_weight(quant_type, double_quant):
    w, _ = weights()
    layer = quant.quantize_linear(w, None, QuantConfig(quant_type, double_quant, compute_dtype=torch.bfloat16))
    expected = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert expected.dtype == torch.float32
    assert torch.equal(layer.dequantize(torch.float32), expected)
    assert torch.equal(layer.dequantize(), expected.bfloat16())


def test_double_quant_changes_only_the_scales_storage():
    w, _ = weights(128, 256)
    on = quant.quantize_linear(w, None, QuantConfig(double_quant=True, compute_dtype=torch.float32))
    off = quant.quantize_linear(w, None, QuantConfig(double_quant=False, compute_dtype=torch.float32))
    assert torch.equal(on.weight.data, off.weight.data)
    assert on.weight.quant_state.nested and not off.weight.quant_state.nested
    assert on.weight.quant_state.absmax.dtype == torch.uint8 and off.weight.quant_state.absmax.dtype == torch.float32
    assert rel_err(on.dequantize(), off.dequantize()) < 0.01


def test_blocksize_is_used():
    w, _ = weights(64, 256)
    layer = quant.quantize_linear(w, None, QuantConfig(blocksize=128, double_quant=False))
    assert layer.weight.quant_state.blocksize == 128 and layer.weight.quant_state.absmax.numel() == 64 * 256 // 128


# ---------------------------------------------------------------- int8 layer

def test_int8_matches_bnb_linear8bitlt_and_is_close_to_fp32():
    w, b = weights()
    ours = quant.quantize_linear(w, b, QuantConfig("int8", compute_dtype=torch.float32))
    ref = bnb_linear8bit(w, b)
    x = inputs()
    ref_out = ref(x)  # quantizes on first use: CB/SCB move into ref.state
    assert torch.equal(ours.weight, ref.state.CB) and torch.equal(ours.SCB, ref.state.SCB)
    assert torch.equal(ours(x), ref_out)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    assert 0 < rel_err(ours(x), F.linear(x, w, b)) < 0.02
    ref.eval()  # LLM.int8 proper (int8 activations): still close, with a larger error
    assert rel_err(ours(x), ref(x)) < 0.05


def test_int8_row_scales_stay_fp32_when_the_model_is_cast():
    layer = quant.quantize_linear(*weights(), QuantConfig("int8"))
    layer.to(torch.bfloat16)
    assert layer.SCB.dtype == torch.float32 and layer.weight.dtype == torch.int8
    assert layer.bias.dtype == torch.bfloat16


# ---------------------------------------------------------------- serialization

ROUND_TRIPS = [("nf4", True, 64), ("nf4", False, 64), ("fp4", True, 64), ("nf4", True, 128), ("int8", True, 64)]


@pytest.mark.parametrize("quant_type, double_quant, blocksize", ROUND_TRIPS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_state_dict_round_trip_through_safetensors_is_bitwise(tmp_path, quant_type, double_quant, blocksize,
                                                            with_bias):
    from safetensors.torch import load_file, save_file
    w, b = weights()
    qconfig = QuantConfig(quant_type, double_quant, compute_dtype=torch.float32, blocksize=blocksize)
    layer = quant.quantize_linear(w, b if with_bias else None, qconfig)
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, tmp_path / "layer.safetensors")
    tensors = load_file(tmp_path / "layer.safetensors")
    loaded = quant.load_prequantized_linear(tensors, 64, 48, qconfig, "cpu")
    assert type(loaded) is type(layer) and (loaded.bias is None) == (not with_bias)
    x = inputs()
    assert torch.equal(loaded(x), layer(x))
    fresh = quant.quantize_linear(weights(seed=5)[0], weights(seed=5)[1] if with_bias else None, qconfig)
    fresh.load_state_dict(tensors)  # nn.Module.load_state_dict (strict) works as well
    assert torch.equal(fresh(x), layer(x))


def test_state_dict_keeps_working_after_deepcopy():
    layer = quant.quantize_linear(*weights(), QuantConfig(compute_dtype=torch.float32))
    twin = copy.deepcopy(layer)
    x = inputs()
    assert torch.equal(twin(x), layer(x))
    assert twin.weight.quant_state is not layer.weight.quant_state


def test_load_prequantized_errors_name_the_key():
    load = quant.load_prequantized_linear
    w, b = weights()
    qconfig = QuantConfig(compute_dtype=torch.float32)
    tensors = dict(quant.quantize_linear(w, b, qconfig).state_dict())
    with pytest.raises(KeyError, match=r"q_proj\.weight\.absmax"):
        load({k: v for k, v in tensors.items() if k != "weight.absmax"}, 64, 48, qconfig, prefix="q_proj.")
    with pytest.raises(ValueError, match=r"shape \[48, 64\], expected nf4 of shape \[64, 48\]"):
        load(tensors, 48, 64, qconfig)
    with pytest.raises(KeyError, match="another quant_type"):
        load(tensors, 64, 48, QuantConfig("fp4"))
    with pytest.raises(ValueError, match="unknown 4-bit quant state"):
        load({**tensors, "weight.extra": torch.zeros(1)}, 64, 48, qconfig)
    with pytest.raises(KeyError, match="dense torch.float32 tensor: the checkpoint stores it unquantized"):
        load({"weight": w, "bias": b}, 64, 48, qconfig)  # a dense layer
    int8 = dict(quant.quantize_linear(w, b, QuantConfig("int8")).state_dict())
    with pytest.raises(KeyError, match=r"'fc\.SCB'"):
        load({k: v for k, v in int8.items() if k != "SCB"}, 64, 48, QuantConfig("int8"), prefix="fc.")
    with pytest.raises(ValueError, match="expected int8"):
        load({**int8, "weight": w}, 64, 48, QuantConfig("int8"))
    with pytest.raises(ValueError, match="weight_format"):
        load({**int8, "weight_format": torch.tensor(1)}, 64, 48, QuantConfig("int8"))
    assert quant_format.is_quantized_in_checkpoint(tensors) and quant_format.is_quantized_in_checkpoint(int8)
    assert not quant_format.is_quantized_in_checkpoint(["weight", "bias"])


# ---------------------------------------------------------------- configs

@pytest.mark.parametrize("kwargs, word", [
    (dict(quant_type="nf5"), "quant_type"), (dict(blocksize=100), "blocksize"),
    (dict(compute_dtype=torch.int8), "compute_dtype"), (dict(skip_modules=[""]), "skip_modules"),
    (dict(int8_threshold=-1), "int8_threshold"),
])
def test_invalid_quant_config_names_the_field(kwargs, word):
    with pytest.raises(ValueError, match=word):
        QuantConfig(**kwargs)


def test_resolve_quant_config():
    assert quant.resolve_quant_config(None, torch.float32) is None
    assert quant.resolve_quant_config("NF4", torch.bfloat16) == QuantConfig("nf4", compute_dtype=torch.bfloat16)
    assert quant.resolve_quant_config("int8", None).compute_dtype == torch.float32
    mine = QuantConfig("fp4", compute_dtype=torch.float16)
    resolved = quant.resolve_quant_config(mine, torch.bfloat16)
    assert resolved.compute_dtype == torch.float16 and resolved is not mine
    assert QuantConfig(compute_dtype="bfloat16").compute_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="quantize must be one of"):
        quant.resolve_quant_config("4bit", None)
    with pytest.raises(TypeError, match="quantize must be"):
        quant.resolve_quant_config(4, None)


@pytest.mark.parametrize("qconfig, hf_kwargs", [
    (QuantConfig("nf4", True, torch.bfloat16), dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                     bnb_4bit_use_double_quant=True,
                                                     bnb_4bit_compute_dtype=torch.bfloat16)),
    (QuantConfig("fp4", False, torch.float32), dict(load_in_4bit=True, bnb_4bit_quant_type="fp4")),
    (QuantConfig("int8", int8_threshold=5.0, skip_modules=["lm_head"]),
     dict(load_in_8bit=True, llm_int8_threshold=5.0, llm_int8_skip_modules=["lm_head"])),
])
def test_quant_config_dict_is_transformers_bitsandbytes_config(qconfig, hf_kwargs):
    transformers = pytest.importorskip("transformers")
    expected = transformers.BitsAndBytesConfig(**hf_kwargs).to_dict()
    assert quant_format.quant_config_to_dict(qconfig) == expected
    back = quant_format.quant_config_from_dict(expected)
    assert back.quant_type == qconfig.quant_type and back.skip_modules == qconfig.skip_modules
    assert back.int8_threshold == qconfig.int8_threshold
    if qconfig.quant_type != "int8":
        assert (back.double_quant, back.compute_dtype) == (qconfig.double_quant, qconfig.compute_dtype or torch.float32)


def test_quant_config_from_dict_rejects_what_it_cannot_load():
    with pytest.raises(ValueError, match="quant_method is 'gptq'"):
        quant_format.quant_config_from_dict({"quant_method": "gptq", "bits": 4})
    with pytest.raises(ValueError, match="exactly one of load_in_4bit / load_in_8bit"):
        quant_format.quant_config_from_dict({"quant_method": "bitsandbytes"})
    with pytest.raises(ValueError, match="llm_int8_has_fp16_weight"):
        quant_format.quant_config_from_dict({"load_in_8bit": True, "llm_int8_has_fp16_weight": True})
    assert quant_format.quant_config_from_dict({"load_in_4bit": True, "bnb_4bit_blocksize": 128}).blocksize == 128


class _Head(PreTrainedModel):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.classifier = nn.Linear(4, 2)
        self.lm_head = nn.Linear(4, 8)

    def get_output_embeddings(self):
        return self.lm_head


def test_should_quantize_keeps_heads_and_skip_modules_dense():
    model = _Head()
    model.new_head_prefixes = ("classifier.",)
    picked = lambda qc: [p for p, m in model.named_modules() if quant.should_quantize(p, m, qc, model)]  # noqa: E731
    assert picked(QuantConfig()) == ["proj"]
    # an explicit skip list replaces the default one (transformers' llm_int8_skip_modules rule)
    assert picked(QuantConfig(skip_modules=["proj", "lm_head"])) == []
    assert picked(QuantConfig(skip_modules=["proj"])) == ["lm_head"]
    assert picked(QuantConfig(skip_modules=[])) == ["proj", "lm_head"]
    assert not quant.should_quantize("proj", model.norm, QuantConfig(), model)  # not a linear layer
    # T5's `wo` stays dense, as transformers keeps it (its _keep_in_fp32_modules)
    model.config = type("Config", (), {"raw": {"model_type": "t5"}})()
    model.wo = nn.Linear(4, 4)
    assert picked(QuantConfig()) == ["proj"]
    model.config.raw["model_type"] = "llama"
    assert picked(QuantConfig()) == ["proj", "wo"]


# ---------------------------------------------------------------- whole models vs transformers + bitsandbytes

def _tiny_hf_llama(tmp_path, tie=False):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base", safe_serialization=True)
    return tmp_path / "base"


def _hf_bnb(path, quant_type):
    transformers = pytest.importorskip("transformers")
    if quant_type == "int8":
        bnb_config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                                     bnb_4bit_use_double_quant=True,
                                                     bnb_4bit_compute_dtype=torch.float32)
    model = transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=bnb_config, dtype=torch.float32)
    return model.train()  # dropout is 0; train() keeps bnb on its dequantize path (eval would repack or int8 the input)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_loaded_llama_matches_transformers_bnb_model(tmp_path, quant_type):
    from minilora.io.load import from_pretrained
    path = _tiny_hf_llama(tmp_path, tie=quant_type == "int8")
    ours = from_pretrained(path, quantize=quant_type, dtype=torch.float32)
    layer_type = quant.NF4Linear if quant_type == "nf4" else quant.Int8Linear
    assert isinstance(ours.model.layers[0].self_attn.q_proj, layer_type)
    assert isinstance(ours.model.layers[1].mlp.down_proj, layer_type)
    assert type(ours.lm_head) is nn.Linear and ours.lm_head.weight.dtype == torch.float32
    assert type(ours.model.embed_tokens) is nn.Embedding
    ref = _hf_bnb(path, quant_type)
    q_proj, ref_q_proj = ours.model.layers[0].self_attn.q_proj, ref.model.layers[0].self_attn.q_proj
    assert torch.equal(q_proj.weight.data, ref_q_proj.weight.data)
    torch.testing.assert_close(_logits(ours, IDS), _logits(ref, IDS), rtol=1e-4, atol=1e-4)
    dense = from_pretrained(path, dtype=torch.float32)
    assert 0 < rel_err(_logits(ours, IDS), _logits(dense, IDS)) < 0.25  # tiny random model: NF4 error ~0.11


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_saved_quantized_llama_loads_in_transformers_and_back(tmp_path, quant_type):
    from minilora.io.load import from_pretrained
    from minilora.io.save import save_pretrained
    transformers = pytest.importorskip("transformers")
    path = _tiny_hf_llama(tmp_path)
    ours = from_pretrained(path, quantize=quant_type, dtype=torch.float32)
    save_pretrained(ours, tmp_path / "ours")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").train()
    layer = theirs.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit if quant_type == "nf4" else bnb.nn.Linear8bitLt)
    torch.testing.assert_close(_logits(theirs, IDS), _logits(ours, IDS), rtol=1e-4, atol=1e-4)
    # and a transformers-saved bnb checkpoint loads into minilora without re-quantizing
    _hf_bnb(path, quant_type).save_pretrained(tmp_path / "hf_bnb", safe_serialization=True)
    again = from_pretrained(tmp_path / "hf_bnb")
    assert isinstance(again.model.layers[0].self_attn.q_proj, (quant.NF4Linear, quant.Int8Linear))
    torch.testing.assert_close(_logits(again, IDS), _logits(ours, IDS), rtol=1e-4, atol=1e-4)


def _save_tiny_hf_task(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    else:
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=97, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
            dropout_rate=0.0, decoder_start_token_id=0))
    model.save_pretrained(tmp_path / family, safe_serialization=True)
    return tmp_path / family, type(model)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_skip_list_written_from_the_model_makes_transformers_load_heads_and_t5_wo_dense(tmp_path, family):
    """transformers' default skip rule differs from minilora's for classifier heads (it would quantize them);
    quant_config_to_dict(qconfig, model) names minilora's dense layers so the checkpoint loads as saved."""
    from minilora.io.load import from_pretrained
    from minilora.io.save import save_pretrained
    path, hf_class = _save_tiny_hf_task(tmp_path, family)
    ours = from_pretrained(path, quantize="nf4", dtype=torch.float32).train()
    dense = quant_format.quant_config_to_dict(ours.quant_config, ours)["llm_int8_skip_modules"]
    if family == "bert":
        assert dense == ["classifier"]
        assert isinstance(ours.bert.pooler.dense, quant.NF4Linear)
    else:
        assert sorted(dense) == sorted(["lm_head"] + [f"{stack}.block.{i}.layer.{j}.DenseReluDense.wo"
                                                      for stack, j in [("encoder", 1), ("decoder", 2)] for i in (0, 1)])
    save_pretrained(ours, tmp_path / "ours")
    config_file = tmp_path / "ours" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = quant_format.quant_config_to_dict(ours.quant_config, ours)
    config_file.write_text(json.dumps(config))
    theirs = hf_class.from_pretrained(tmp_path / "ours").train()
    ids = IDS[:, :7]
    with torch.no_grad():
        if family == "bert":
            a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        else:
            a = ours(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
            b = theirs(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
