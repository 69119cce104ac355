"""Gemma 3's multimodal checkpoints (gemma-3-4b and larger: Gemma3ForConditionalGeneration) loaded text-only,
against transformers' class of that name and peft (the oracles) on tiny random checkpoints: logits and
generation on text in both stored layouts, the hub's sparse text_config, NF4, LoRA loss and gradients,
adapters both ways (peft's with LoRA on the vision tower too), save_pretrained, config errors."""
from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from lora_helpers import assert_bf16_close_grads, assert_same_training_signal, copy_trainable, grads, peft_qlora
from safetensors.torch import save_file

import minilora as ml
from minilora.io.load import Checkpoint, CheckpointError

transformers.logging.set_verbosity_error()

VOCAB, PAD = 96, 3
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1,
            eos_token_id=2, sliding_window=8, query_pre_attn_scalar=20,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                             "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}})
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28,
              patch_size=14)  # more layers than the text model: only the language model's are counted
TOKENS = dict(mm_tokens_per_image=4, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
              image_token_index=VOCAB - 1)
LANGUAGE = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def hf_model(text: dict = TEXT, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Gemma3Config(text_config=text, vision_config=VISION, **TOKENS)
    model = transformers.Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # Gemma's (1 + w) norms start at zero: make every tensor matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """As transformers saves it (and the hub stores it): `language_model.model.*`, `vision_tower.*`."""
    out = tmp_path_factory.mktemp("gemma3")
    hf_model().save_pretrained(out)
    return out


def load_hf(path, **kwargs):
    return transformers.Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def load_ours(path, **kwargs):
    with pytest.warns(UserWarning, match="language model only"):
        return ml.from_pretrained(path, **kwargs)


def nf4_config(compute_dtype: torch.dtype):
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)


def text_batch(batch: int = 3, seq: int = 24, seed: int = 1):
    ids = torch.randint(4, VOCAB - 3, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1:2, :5] = 0
    mask[2:, :11] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def test_loads_the_language_model_with_transformers_names(folder):
    with Checkpoint(folder) as checkpoint:
        assert any(k.startswith("language_model.model.") for k in checkpoint.keys())
    ours = load_ours(folder)
    assert type(ours).__name__ == "Gemma3ForConditionalGeneration"
    language = {k for k in load_hf(folder).state_dict() if k.startswith("model.language_model.")}
    assert set(ours.state_dict()) == language | {"lm_head.weight"}  # the head is tied to the embeddings
    assert ours.lm_head.weight is ours.model.language_model.embed_tokens.weight


@pytest.mark.parametrize("layout", ["stored", "module paths"])
def test_text_logits_match_transformers(folder, tmp_path, layout):
    if layout == "module paths":  # also a valid checkpoint: transformers v5's own names, unrenamed
        hf = load_hf(folder)
        save_file({k: t.contiguous() for k, t in hf.state_dict().items() if k != "lm_head.weight"},
                  tmp_path / "model.safetensors", metadata={"format": "pt"})
        (tmp_path / "config.json").write_text((folder / "config.json").read_text())
        folder = tmp_path
    hf, ours = load_hf(folder), load_ours(folder, dtype=torch.float32)
    ids, mask = text_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits,
                                   hf(input_ids=ids, attention_mask=mask).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours(ids[:1]).logits, hf(input_ids=ids[:1]).logits, atol=1e-4, rtol=0)


def test_greedy_and_beam_search_match_transformers(folder):
    hf, ours = load_hf(folder), load_ours(folder, dtype=torch.float32)
    ids, mask = text_batch(seq=12)
    for kwargs in (dict(), dict(num_beams=3)):
        expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **kwargs)
        got = ml.generate(ours, ids, attention_mask=mask, max_new_tokens=12, **kwargs)
        assert torch.equal(got, expected), kwargs


def test_hub_sparse_text_config_takes_transformers_defaults(tmp_path):
    """The hub's config.json lists only what differs from Gemma3TextConfig's defaults (here the v4 spelling of
    gemma-3-4b's: rope_scaling without rope_theta; heads, head_dim, query_pre_attn_scalar, local RoPE base and
    the 5:1 sliding pattern left out)."""
    sparse = dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                  vocab_size=VOCAB, sliding_window=8, rope_scaling={"factor": 8.0, "rope_type": "linear"})
    hf = hf_model(sparse)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "text_config": sparse}))
    ours = load_ours(tmp_path, dtype=torch.float32)
    theirs = load_hf(tmp_path)
    assert ours.config.num_attention_heads == theirs.config.text_config.num_attention_heads == 8
    assert ours.config.layer_types == theirs.config.text_config.layer_types
    ids = text_batch(batch=1, seq=20)[0]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, atol=1e-4, rtol=0)
    empty = ml.models.families.Gemma3Config.from_dict({"model_type": "gemma3"})
    defaults = transformers.Gemma3Config().text_config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "query_pre_attn_scalar", "sliding_window",
                "layer_types", "max_position_embeddings", "tie_word_embeddings", "final_logit_softcapping",
                "attn_logit_softcapping", "pad_token_id", "eos_token_id", "bos_token_id"):
        assert getattr(empty, key) == getattr(defaults, key), key
    assert empty.rope_theta == defaults.rope_parameters["full_attention"]["rope_theta"]
    assert empty.rope_local_theta == defaults.rope_parameters["sliding_attention"]["rope_theta"]


def test_nf4_logits_match_transformers_bitsandbytes(folder):
    pytest.importorskip("bitsandbytes")
    ours = load_ours(folder, quantize="nf4", dtype=torch.float32)
    assert type(ours.model.language_model.layers[0].mlp.down_proj).__name__ == "NF4Linear"
    theirs = load_hf(folder, quantization_config=nf4_config(torch.float32)).train()  # train(): bnb's dequantize path
    ids = text_batch(batch=1, seq=20)[0]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_default_qlora_equals_peft_kbit_recipe(tmp_path):
    """quantize="nf4" without dtype on a bf16 checkpoint: the loss and LoRA gradients of transformers' NF4 +
    peft's prepare_model_for_kbit_training (fp32 residual, norms and head; bf16 products)."""
    pytest.importorskip("bitsandbytes")
    hf_model().to(torch.bfloat16).save_pretrained(tmp_path)
    ours, theirs = lora_pair(tmp_path, quantized=True, r=4, lora_alpha=8, lora_dropout=0.0)
    ids, mask = text_batch(batch=2)
    labels = ids.masked_fill(mask == 0, -100)
    got = ours(ids, attention_mask=mask, labels=labels).loss
    expected = theirs(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)
    got.backward()
    expected.backward()
    assert_bf16_close_grads(ours, theirs)


def lora_pair(folder, quantized: bool = False, **lora_kwargs):
    """minilora ("all-linear": the language model's projections) and peft on the language model's projections,
    with the same LoRA weights (B random, so every factor gets a gradient)."""
    import peft
    ours = load_ours(folder, quantize="nf4") if quantized else load_ours(folder, dtype=torch.float32)
    ours = ml.apply_lora(ours, ml.LoraConfig(target_modules="all-linear", **lora_kwargs)).train()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    peft_kwargs = dict(target_modules=LANGUAGE, **lora_kwargs)
    if quantized:
        theirs = peft_qlora(folder, peft_kwargs, "Gemma3ForConditionalGeneration")
    else:
        theirs = peft.get_peft_model(load_hf(folder), peft.LoraConfig(**peft_kwargs)).train()
    assert grads(theirs).keys() == grads(ours).keys()  # the same layers: the language model's
    copy_trainable(theirs, ours)
    return ours, theirs


def test_lora_loss_and_gradients_equal_peft(folder):
    ours, theirs = lora_pair(folder, r=4, lora_alpha=8)
    ids, mask = text_batch(batch=2)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    first = assert_same_training_signal(ours, theirs, inputs, inputs, loss_atol=1e-5, grad_atol=1e-5, grad_rtol=1e-4)
    assert len(first) == 2 * 7 * 2  # 2 layers, 7 projections, A and B
    first = {n: g.clone() for n, g in first.items()}
    ml.enable_gradient_checkpointing(ours)  # the decoder inside `model.language_model` recomputes too
    ours.zero_grad()
    ours(**inputs).loss.backward()
    assert ours.model.language_model.gradient_checkpointing
    for name, grad in grads(ours).items():
        torch.testing.assert_close(grad, first[name], atol=1e-6, rtol=1e-5)


def test_adapters_load_in_peft_and_back(folder, tmp_path):
    import peft
    ours = lora_pair(folder, r=4, lora_alpha=8)[0].eval()
    ml.save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"  # not SEQ_2_SEQ_LM, whatever the class name says
    theirs = peft.PeftModel.from_pretrained(load_hf(folder), tmp_path / "ours").eval()
    wrapped = [n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(wrapped) == 14 and not [n for n in wrapped if "vision" in n]  # full paths: no vision-tower LoRA
    ids = text_batch(batch=1, seq=20)[0]
    with torch.no_grad():
        reference = ours(ids).logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, reference, atol=1e-5, rtol=1e-5)

    # peft's list target matches the vision tower's q_proj / v_proj too; text-only, those tensors are dropped
    hf = load_hf(folder)
    trained = peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    trained.save_pretrained(tmp_path / "theirs")
    with pytest.warns(UserWarning, match=r"belong to parts .* does not build.*vision_tower"):
        again = ml.load_adapter(load_ours(folder, dtype=torch.float32), tmp_path / "theirs").eval()
    assert len([n for n, m in again.named_modules() if isinstance(m, ml.LoraLinear)]) == 4
    with torch.no_grad():
        expected = trained.eval()(input_ids=ids).logits
        torch.testing.assert_close(again(ids).logits, expected, atol=1e-5, rtol=1e-5)
        assert (load_ours(folder, dtype=torch.float32)(ids).logits - expected).abs().max() > 1e-3


def test_adapter_of_the_older_layout_loads(folder, tmp_path):
    """transformers 4.50-4.51 (Gemma 3's first releases) had the language model at `language_model.model`:
    peft adapters of then name it so, and load as the checkpoint does."""
    from safetensors.torch import load_file
    ours = lora_pair(folder, r=4, lora_alpha=8)[0].eval()
    ml.save_adapter(ours, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    old = {k.replace("base_model.model.model.language_model.", "base_model.model.language_model.model."): t
           for k, t in tensors.items()}
    assert old.keys() != tensors.keys()
    save_file(old, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    again = ml.load_adapter(load_ours(folder, dtype=torch.float32), tmp_path).eval()
    ids = text_batch(batch=1, seq=20)[0]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ours(ids).logits, atol=0, rtol=0)


def test_saved_model_loads_in_transformers_and_back(folder, tmp_path):
    ours = load_ours(folder, dtype=torch.float32)
    ml.save_pretrained(ours, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "gemma3" and saved["architectures"] == ["Gemma3ForConditionalGeneration"]
    ids = text_batch(batch=1, seq=20)[0]
    with torch.no_grad():
        reference = ours(ids).logits
        torch.testing.assert_close(load_hf(tmp_path)(input_ids=ids).logits, reference, atol=1e-5, rtol=0)
        again = ml.from_pretrained(tmp_path, dtype=torch.float32)  # nothing else in the folder: no warning
        torch.testing.assert_close(again(ids).logits, reference, atol=0, rtol=0)


@pytest.mark.parametrize("change, match", [
    (dict(text_config="gemma"), "text_config: expected a JSON object"),
    (dict(text_config={**TEXT, "hidden_size": "64"}), r"text_config\.hidden_size: expected int"),
    (dict(text_config={**TEXT, "num_hidden_layers": 0}), r"text_config\.num_hidden_layers must be >= 1"),
    (dict(text_config={**TEXT, "num_hidden_layers": 3, "layer_types": None}),
     r"num_hidden_layers is 3 but the checkpoint .* holds 2 layers"),
])
def test_config_errors_name_the_field(folder, tmp_path, change, match):
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=re.compile(match)):
        ml.from_pretrained(tmp_path)
