"""Tiny transformers models and a peft twin, shared by the LoRA tests (minilora's LoRA works on any nn.Module
whose module paths are HF's, so the transformers model itself is the fairest base for a peft comparison)."""
import copy

import torch


def tiny_llama(seed: int = 0, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie, attention_bias=True)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert_cls(seed: int = 0, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, num_labels=num_labels, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def batch(vocab: int = 97, seed: int = 1, shape=(2, 7)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def peft_twin(ml_model, base, peft_kwargs):
    """peft on a copy of `base`, with the LoRA/trainable weights copied from minilora's model."""
    import peft
    twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**peft_kwargs))
    ours = dict(ml_model.named_parameters())
    with torch.no_grad():
        for name, p in twin.named_parameters():
            key = name.removeprefix("base_model.model.").replace(".default", "").replace(".base_layer", "")
            key = key.replace(".modules_to_save", "").replace(".original_module", "")
            p.copy_(ours[key])
    return twin


def trained_like(model):
    """Give every trainable tensor random values, as if trained, so a lost tensor changes the outputs."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def ours_name(peft_name: str) -> str:
    """minilora's parameter name for a peft one (the module paths are the same)."""
    return peft_name.removeprefix("base_model.model.").replace(".default", "").replace(".base_layer", "")


def grads(model) -> dict:
    """Gradients of the trainable tensors by minilora name (of a minilora or a peft model)."""
    return {ours_name(n): p.grad for n, p in model.named_parameters() if p.requires_grad}


def copy_trainable(theirs, ours) -> None:
    """peft's trainable tensors set to minilora's: the same LoRA init in both stacks."""
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(params[ours_name(name)])


def peft_qlora(folder, lora_kwargs: dict, model_class: str = "AutoModelForCausalLM"):
    """QLoRA as transformers + peft run it on a bf16 checkpoint: NF4 with double quantization and bf16 compute,
    prepare_model_for_kbit_training (fp32 residual, norms and head), then LoRA."""
    import peft
    import transformers
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    hf = getattr(transformers, model_class).from_pretrained(folder, dtype=torch.bfloat16, quantization_config=bnb)
    hf = peft.prepare_model_for_kbit_training(hf, use_gradient_checkpointing=False)
    return peft.get_peft_model(hf, peft.LoraConfig(**lora_kwargs)).train()


def assert_same_training_signal(ours, theirs, ours_inputs: dict, theirs_inputs: dict, loss_atol: float,
                                grad_atol: float, grad_rtol: float, logits_atol: float | None = None) -> dict:
    """Same loss (and logits, when `logits_atol` is given) and same gradient of every trainable tensor in the two
    stacks after one backward; returns minilora's gradients."""
    out_ours, out_theirs = ours(**ours_inputs), theirs(**theirs_inputs)
    if logits_atol is not None:
        torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=logits_atol, rtol=logits_atol)
    torch.testing.assert_close(out_ours.loss, out_theirs.loss, atol=loss_atol, rtol=loss_atol)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    g_ours, g_theirs = grads(ours), grads(theirs)
    assert g_ours.keys() == g_theirs.keys() and g_ours
    for name, grad in g_ours.items():
        torch.testing.assert_close(grad, g_theirs[name], atol=grad_atol, rtol=grad_rtol, msg=name)
    return g_ours


def assert_bf16_close_grads(ours, theirs, rel: float = 2e-2) -> None:
    """Gradients of products run in bf16 in both stacks: within `rel` of each tensor's largest gradient."""
    g_ours, g_theirs = grads(ours), grads(theirs)
    assert g_ours.keys() == g_theirs.keys() and g_ours
    for name, grad in g_ours.items():
        assert (grad - g_theirs[name]).abs().max() <= rel * g_theirs[name].abs().max(), name
