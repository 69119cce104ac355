"""QLoRA end to end on a quantized model: gradients against peft + transformers + bitsandbytes, which tensors
get gradients, and merge_and_unload back to a plain dense model that transformers loads."""
import pytest
import torch
from torch import nn

import minilora as ml
from minilora import quant

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def llama_dir(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base", safe_serialization=True)
    return tmp_path / "base"


def bnb_config(quant_type: str, compute_dtype: torch.dtype):
    if quant_type == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)


def with_random_lora_b(model: nn.Module) -> nn.Module:
    """A non-zero LoRA update, so the LoRA path shows in outputs and in the gradients of A."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_qlora_loss_and_grads_equal_peft_and_only_lora_and_saved_modules_get_them(llama_dir, quant_type):
    peft = pytest.importorskip("peft")
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, modules_to_save=["lm_head"])
    ours = ml.from_pretrained(llama_dir, quantize=quant_type, dtype=torch.float32)
    ours = with_random_lora_b(ml.apply_lora(ours, ml.LoraConfig(**kwargs))).train()
    hf = transformers.LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32,
                                                       quantization_config=bnb_config(quant_type, torch.float32))
    theirs = peft.get_peft_model(hf, peft.LoraConfig(**kwargs)).train()
    ours_params = dict(ours.named_parameters())

    def our_name(peft_name: str) -> str:
        return (peft_name.removeprefix("base_model.model.").replace(".default", "").replace(".base_layer", "")
                .replace(".modules_to_save", "").replace(".original_module", ""))

    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(ours_params[our_name(name)])
    expected = theirs(input_ids=IDS, labels=IDS).loss
    got = ours(input_ids=IDS, labels=IDS).loss
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    expected.backward()
    got.backward()

    with_grad = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in ours.named_parameters() if "lora_" in n or n == "lm_head.weight"}
    assert all(m.weight.grad is None for m in ours.modules() if isinstance(m, quant.QuantizedLinear))
    assert not ours.model.embed_tokens.weight.requires_grad
    theirs_grads = {our_name(n): p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    assert theirs_grads.keys() == with_grad
    for name in with_grad:
        torch.testing.assert_close(ours_params[name].grad, theirs_grads[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_merge_and_unload_of_a_quantized_model_is_a_plain_dense_model(tmp_path, llama_dir, quant_type):
    model = ml.from_pretrained(llama_dir, quantize=quant_type, dtype=torch.bfloat16)
    model = with_random_lora_b(ml.apply_lora(model, ml.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj",
                                                                                                      "v_proj"])))
    q_proj = model.model.layers[0].self_attn.q_proj
    expected_q = (q_proj.base_layer.dequantize(torch.float32) + q_proj.delta_weight()).to(torch.bfloat16)
    expected_k = model.model.layers[0].self_attn.k_proj.dequantize(torch.bfloat16)  # not a LoRA target
    with torch.no_grad():
        before = model(IDS).logits.float()

    merged = ml.merge_and_unload(model)
    linears = [m for m in merged.modules() if hasattr(m, "in_features")]
    assert linears and all(type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 for m in linears)
    assert not any(p.requires_grad for p in merged.parameters())
    assert not hasattr(merged, "quant_config") and not hasattr(merged, "lora_config")
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, expected_q)
    assert torch.equal(merged.model.layers[0].self_attn.k_proj.weight, expected_k)
    with torch.no_grad():
        after = merged(IDS).logits.float()
    assert (after - before).abs().max() < 0.05 * before.abs().max()  # only the bf16 rounding of W + delta

    out = ml.save_pretrained(merged, tmp_path / "merged")
    assert "quantization_config" not in (out / "config.json").read_text()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf.model.layers[1].mlp.down_proj) is nn.Linear and hf.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits.float(), after, rtol=2e-2, atol=2e-2)


def test_an_explicit_skip_list_replaces_the_default_like_transformers(tmp_path, llama_dir):
    """skip_modules=[] quantizes the output head too, as llm_int8_skip_modules=[] does in transformers; a head
    tied to the embeddings stays dense whatever the list says."""
    model = ml.from_pretrained(llama_dir, quantize=ml.QuantConfig("nf4", compute_dtype=torch.float32,
                                                                  skip_modules=[]), dtype=torch.float32)
    assert isinstance(model.lm_head, quant.NF4Linear)
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
                                             llm_int8_skip_modules=[])
    hf = transformers.LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, quantization_config=config)
    assert torch.equal(model.lm_head.weight.data, hf.lm_head.weight.data)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, hf.train()(IDS).logits, rtol=1e-4, atol=1e-4)

    torch.manual_seed(0)
    tied = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(tied).save_pretrained(tmp_path / "tied", safe_serialization=True)
    model = ml.from_pretrained(tmp_path / "tied", quantize=ml.QuantConfig("nf4", skip_modules=[]))
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.model.layers[0].mlp.down_proj, quant.NF4Linear)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_merge_and_unload_of_the_examples_qlora_is_one_dtype_and_runs_without_autocast(llama_dir, quant_type):
    """The examples' QLoRA precision: fp32 load, bf16 compute. The merged model comes back in one dtype
    everywhere (by default the compute dtype, bf16; dtype= picks another), so forward and generate need no
    autocast."""
    def qlora():
        model = ml.from_pretrained(llama_dir, dtype=torch.float32,
                                   quantize=ml.QuantConfig(quant_type, compute_dtype=torch.bfloat16))
        torch.manual_seed(0)  # the same LoRA A both times
        return with_random_lora_b(ml.apply_lora(model, ml.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)))

    model = qlora()
    with torch.no_grad():
        before = model(IDS).logits.float()
    merged = ml.merge_and_unload(model, dtype=torch.float32)
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert all(type(m) is nn.Linear for m in merged.modules() if hasattr(m, "in_features"))
    with torch.no_grad():
        after = merged(IDS).logits
    assert after.dtype == torch.float32
    assert (after - before).abs().max() < 0.05 * before.abs().max()  # bf16 compute before, fp32 after
    out = ml.generate(merged, IDS[:1, :5], max_new_tokens=4, eos_token_id=[])
    assert out.shape == (1, 9)

    half = ml.merge_and_unload(qlora(), device="cpu")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert {t.device.type for t in [*half.parameters(), *half.buffers()]} == {"cpu"}
    assert ml.generate(half, IDS[:1, :5], max_new_tokens=4, eos_token_id=[]).shape == (1, 9)
    q = half.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(q.float(), merged.model.layers[0].self_attn.q_proj.weight, rtol=1e-2, atol=1e-3)
