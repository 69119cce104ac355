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
