"""Tiny tokenizers, models and data for the training/data tests; also the torchrun worker of test_ddp.py.

As a script (`python -m torch.distributed.run --nproc_per_node 2 tests/train_helpers.py OUT_DIR JSON_ARGS`)
it trains `tiny_lora_llama()` on `fixed_length_lm_data()` with `ml.train` and rank 0 writes the trained
trainable parameters to OUT_DIR/trained.safetensors.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a torchrun script

from minilora.models.outputs import ModelOutput  # noqa: E402

WORDS = ("the a cat dog sat on mat ran fast slow red blue big small what who where is was it "
         "paris france capital london river tower old new city of in and to").split()


def tiny_tokenizer(style: str = "bert"):
    """A word-level minilora Tokenizer built in-test with `tokenizers`.

    style="bert": [CLS] a [SEP] (b [SEP]) with token types; style="gpt": <s> a, EOS "</s>" (Llama-like);
    style="t5": a </s>. Ids: 0 [PAD], 1 [UNK], 2 [CLS]/<s>, 3 [SEP]/</s>, then WORDS.
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, processors

    from minilora.text.tokenizer import Tokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if style == "bert" else ["[PAD]", "[UNK]", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    backend = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    if style == "bert":
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        config = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    elif style == "gpt":
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", 2)])
        config = {"pad_token": "[PAD]", "unk_token": "[UNK]", "bos_token": "<s>", "eos_token": "</s>"}
    else:
        backend.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B:1 </s>:1", special_tokens=[("</s>", 3)])
        config = {"pad_token": "[PAD]", "unk_token": "[UNK]", "eos_token": "</s>"}
    return Tokenizer(backend, config)


VOCAB_SIZE = 4 + len(WORDS)


def tiny_llama(seed: int = 0, dropout: float = 0.0, vocab_size: int = VOCAB_SIZE):
    """A 2-layer minilora Llama built from a config dict (hidden 32)."""
    from minilora.models.llama import LlamaForCausalLM
    from minilora.models.llama_config import LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig.from_dict({"model_type": "llama", "vocab_size": vocab_size, "hidden_size": 32,
                                    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                    "num_key_value_heads": 2, "max_position_embeddings": 64,
                                    "attention_dropout": dropout, "pad_token_id": 0})
    model = LlamaForCausalLM(config)
    model.init_non_persistent_buffers(torch.device("cpu"))
    return model


def tiny_lora_llama(seed: int = 0, lora_dropout: float = 0.0, dropout: float = 0.0):
    import minilora as ml

    model = tiny_llama(seed, dropout)
    return ml.apply_lora(model, ml.LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout,
                                              target_modules=["q_proj", "v_proj", "down_proj"]))


def fixed_length_lm_data(n: int = 24, length: int = 10, seed: int = 0) -> list[dict]:
    """Random token sequences, all the same length (no padding, so token means add up across ranks)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(4, VOCAB_SIZE, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids})
    return rows


def variable_length_lm_data(n: int = 24, seed: int = 0) -> list[dict]:
    """Random token sequences of 3..16 tokens whose first 0..2 labels are -100 (a masked prompt): examples
    with very different numbers of label tokens, where a mean of per-batch means is not the token mean."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length, masked = int(torch.randint(3, 17, (1,), generator=g)), int(torch.randint(0, 3, (1,), generator=g))
        ids = torch.randint(4, VOCAB_SIZE, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * masked + ids[masked:]})
    return rows


class TinyClassifier(nn.Module):
    """Mean-pooled embeddings -> dropout -> linear; per-example-mean cross-entropy loss."""

    def __init__(self, vocab_size: int = VOCAB_SIZE, hidden: int = 16, num_labels: int = 3, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        pooled = (self.embed(input_ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        logits = self.head(torch.tanh(self.proj(self.dropout(self.norm(pooled)))))
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits)


def classification_data(n: int = 32, seed: int = 0, num_labels: int = 3) -> list[dict]:
    """Sequences whose label is (first token) mod num_labels: learnable, variable length."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 9, (1,), generator=g))
        ids = torch.randint(4, VOCAB_SIZE, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids[0] % num_labels})
    return rows


def main(out_dir: str, args_json: str) -> None:
    from safetensors.torch import save_file

    from minilora.train.loop import train
    from minilora.train.config import TrainConfig

    args = json.loads(args_json)
    model = tiny_lora_llama(seed=args.pop("model_seed", 0))
    n = args.pop("n", 24)
    data = variable_length_lm_data(n) if args.pop("variable_lengths", False) else fixed_length_lm_data(n)
    summary = train(model, data, TrainConfig(output_dir=out_dir, progress_bar=False, plot=False, **args))
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trained, str(Path(out_dir) / "trained.safetensors"))
        (Path(out_dir) / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
