"""What the cases run on: checkpoints (real when available, else random weights of the real shapes, generated
once into a cache folder) and token batches built from the shared JSONL data sets.

Both stacks of a case get byte-identical checkpoints and batches: batches are built deterministically here,
not by either library's tokenizer wrapper.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MINILORA_BENCH_CACHE", Path.home() / ".cache" / "minilora" / "bench"))

# HF config.json fields of the shapes the benchmarks use (random weights; the real ones are not needed).
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.041666666666666664),
    "tinyllama-1.1b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=5632,
        num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2),
    "llama2-7b": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2),
    "bert-base": dict(
        model_type="bert", architectures=["BertModel"], vocab_size=30522, hidden_size=768,
        num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
        type_vocab_size=2),
    "flan-t5-base": dict(
        model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=32128, d_model=768, d_kv=64,
        d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
}
# name -> (shape, dtype stored, max shard size[, layers: a cut of the shape])
CHECKPOINTS = {
    "smollm2-135m-random": ("smollm2-135m", torch.float32, "2GB"),
    "smollm2-135m-8l-bf16": ("smollm2-135m", torch.bfloat16, "2GB", 8),  # the QLoRA issue's 8-layer cut
    "tinyllama-1.1b-bf16": ("tinyllama-1.1b", torch.bfloat16, "500MB"),
    "llama2-7b-width-2l-bf16": ("llama2-7b", torch.bfloat16, "2GB", 2),  # the fidelity case's wide model
    "llama2-7b-bf16": ("llama2-7b", torch.bfloat16, "7GB"),  # --benchmark-scale only (13.5 GB, 2 shards)
    "bert-base-random": ("bert-base", torch.float32, "2GB"),
    "flan-t5-base-random": ("flan-t5-base", torch.float32, "2GB"),
}
PREQUANTIZED = "tinyllama-1.1b-nf4-minilora"  # written by minilora's save_pretrained from the bf16 checkpoint
REAL_MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct", "bert-tokenizer": "all-MiniLM-L6-v2",
               "t5-tokenizer": "t5-random-flan-small-shape", "qwen2.5-0.5b": "Qwen2.5-Coder-0.5B-Instruct"}


def real_model_dir(name: str) -> Path | None:
    """A real checkpoint built by ../shared/tools/make_models.sh ($MINILORA_TEST_MODELS), or None."""
    roots = [os.environ.get("MINILORA_TEST_MODELS"), Path.home() / ".cache" / "minilora" / "test-models"]
    for root in filter(None, roots):
        path = Path(root) / REAL_MODELS[name]
        if (path / "config.json").is_file():
            return path
    return None


def smollm2_dir() -> tuple[str, Path]:
    """("real", dir) when the real SmolLM2-135M-Instruct is available, else ("random", generated dir)."""
    real = real_model_dir("smollm2-135m")
    return ("real", real) if real is not None else ("random", checkpoint_dir("smollm2-135m-random"))


def checkpoint_dir(name: str) -> Path:
    """Folder of a generated checkpoint; FileNotFoundError when `prepare(name)` has not run."""
    path = CACHE / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"benchmark checkpoint {path} is missing: run "
                                f"`python -m benchmarks.cases prepare '{{\"name\": \"{name}\"}}'`")
    return path


def prepare(name: str) -> Path:
    """Generate checkpoint `name` into the cache once (file-locked, built in a temp folder then renamed)."""
    if name == "smollm2-135m":  # the real checkpoint when available, else a random one of its shape
        return smollm2_dir()[1] if real_model_dir(name) else prepare("smollm2-135m-random")
    path = CACHE / name
    if (path / "config.json").is_file():
        return path
    if name not in CHECKPOINTS and name != PREQUANTIZED:
        raise KeyError(f"unknown benchmark checkpoint {name!r}; known: {[*CHECKPOINTS, PREQUANTIZED]}")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / "config.json").is_file():  # another process built it while we waited
            return path
        tmp = CACHE / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        if name == PREQUANTIZED:
            _write_prequantized(tmp)
        else:
            _write_random_checkpoint(tmp, *CHECKPOINTS[name])
        tmp.rename(path)
    return path


def _write_random_checkpoint(out: Path, shape: str, dtype: torch.dtype, max_shard_size: str,
                             layers: int | None = None) -> None:
    import transformers

    fields = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    model_type, architecture = fields.pop("model_type"), fields.pop("architectures")[0]
    config = transformers.AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(0)
    model = getattr(transformers, architecture)._from_config(config, dtype=dtype)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)


def _write_prequantized(out: Path) -> None:
    from benchmarks.stacks import minilora_api

    ml = minilora_api("from_pretrained", "save_pretrained")
    model = ml.from_pretrained(checkpoint_dir("tinyllama-1.1b-bf16"), dtype=torch.bfloat16, quantize="nf4")
    ml.save_pretrained(model, out)


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def warm_page_cache(path: Path) -> None:
    """Read every weight file once so each load is timed from the page cache, not from a cold disk."""
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


# --------------------------------------------------------------------------------------------------------
# Data: real text when the shared data and a tokenizer are present, else seeded random token ids


def shared_data_dir() -> Path | None:
    path = Path(os.environ.get("MINILORA_SHARED_DATA", REPO.parent / "shared" / "data"))
    return path if path.is_dir() else None


def _rows(dataset: str, split: str = "train") -> list[dict] | None:
    root = shared_data_dir()
    if root is None or not (root / dataset / f"{split}.jsonl").is_file():
        return None
    with open(root / dataset / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _tokenizer(name: str, vocab_size: int):
    """A `tokenizers.Tokenizer` from the real checkpoint folder when its ids fit the model's vocabulary."""
    folder = real_model_dir(name)
    if folder is None or not (folder / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok if tok.get_vocab_size() <= vocab_size else None


def lm_batches(vocab_size: int, batch_size: int, seq_len: int, n_batches: int, seed: int = 0,
               eos_id: int = 2, tokenizer: str = "smollm2-135m") -> tuple[str, list[dict]]:
    """Causal-LM batches of packed guanaco chat text (no padding): (data description, batches)."""
    rows, tok = _rows("guanaco_llama2_1k"), _tokenizer(tokenizer, vocab_size)
    need = batch_size * seq_len * n_batches
    ids, source = None, "random ids"
    if rows and tok:
        stream: list[int] = []
        for row in random.Random(seed).sample(rows, len(rows)):
            stream += tok.encode(row["text"]).ids + [eos_id]
            if len(stream) >= need:
                ids, source = torch.tensor(stream[:need]), "guanaco_llama2_1k, packed"
                break
    if ids is None:
        ids = torch.randint(0, vocab_size, (need,), generator=torch.Generator().manual_seed(seed))
    ids = ids.view(n_batches, batch_size, seq_len)
    return source, [{"input_ids": b, "labels": b.clone()} for b in ids]


def cls_batches(vocab_size: int, batch_size: int, seq_len: int, n_batches: int,
                seed: int = 0) -> tuple[str, list[dict]]:
    """Sentence classification batches (rotten_tomatoes, BERT uncased WordPiece), padded to `seq_len`."""
    rows, tok = _rows("rotten_tomatoes"), _tokenizer("bert-tokenizer", vocab_size)
    g = torch.Generator().manual_seed(seed)
    n = batch_size * n_batches
    if not (rows and tok):
        ids = torch.randint(1000, vocab_size, (n, seq_len), generator=g)
        labels = torch.randint(0, 2, (n,), generator=g)
        return "random ids", _split(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels),
                                    batch_size)
    rows = random.Random(seed).sample(rows, n)
    tok.enable_truncation(seq_len)
    tok.enable_padding(length=seq_len)
    enc = tok.encode_batch([r["text"] for r in rows])
    batch = dict(input_ids=torch.tensor([e.ids for e in enc]),
                 attention_mask=torch.tensor([e.attention_mask for e in enc]),
                 labels=torch.tensor([r["label"] for r in rows]))
    return "rotten_tomatoes", _split(batch, batch_size)


def qa_batches(vocab_size: int, batch_size: int, seq_len: int, n_batches: int,
               seed: int = 0) -> tuple[str, list[dict]]:
    """Extractive QA batches (SQuAD question + context, truncated to `seq_len`), answer token spans as labels
    (0 = [CLS] when the answer was truncated away, as HF's examples do)."""
    rows, tok = _rows("squad"), _tokenizer("bert-tokenizer", vocab_size)
    g = torch.Generator().manual_seed(seed)
    n = batch_size * n_batches
    if not (rows and tok):
        ids = torch.randint(1000, vocab_size, (n, seq_len), generator=g)
        starts = torch.randint(1, seq_len // 2, (n,), generator=g)
        return "random ids", _split(dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         token_type_ids=torch.zeros_like(ids), start_positions=starts,
                                         end_positions=starts + 3), batch_size)
    rows = random.Random(seed).sample(rows, n)
    tok.enable_truncation(seq_len, strategy="only_second")
    tok.enable_padding(length=seq_len)
    enc = tok.encode_batch([(r["question"], r["context"]) for r in rows])
    starts, ends = [], []
    for e, r in zip(enc, rows, strict=True):
        a_start = r["answers"]["answer_start"][0]
        a_end = a_start + len(r["answers"]["text"][0])
        tokens = [i for i, (s, (lo, hi)) in enumerate(zip(e.sequence_ids, e.offsets, strict=True))
                  if s == 1 and lo < a_end and hi > a_start]
        starts.append(tokens[0] if tokens else 0)
        ends.append(tokens[-1] if tokens else 0)
    batch = dict(input_ids=torch.tensor([e.ids for e in enc]),
                 attention_mask=torch.tensor([e.attention_mask for e in enc]),
                 token_type_ids=torch.tensor([e.type_ids for e in enc]),
                 start_positions=torch.tensor(starts), end_positions=torch.tensor(ends))
    return "squad", _split(batch, batch_size)


def seq2seq_batches(vocab_size: int, batch_size: int, source_len: int, target_len: int, n_batches: int,
                    seed: int = 0) -> tuple[str, list[dict]]:
    """Seq2seq batches (OpenOrca question -> response, T5 SentencePiece), labels padded with -100."""
    rows, tok = _rows("openorca"), _tokenizer("t5-tokenizer", vocab_size)
    g = torch.Generator().manual_seed(seed)
    n = batch_size * n_batches
    if not (rows and tok):
        ids = torch.randint(2, vocab_size, (n, source_len), generator=g)
        labels = torch.randint(2, vocab_size, (n, target_len), generator=g)
        return "random ids", _split(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels),
                                    batch_size)
    rows = random.Random(seed).sample(rows, n)

    def encode(texts: list[str], length: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [tok.encode(t).ids[: length - 1] + [1] for t in texts]  # T5: </s> = 1 ends every sequence
        mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in ids])
        return torch.tensor([i + [pad] * (length - len(i)) for i in ids]), mask

    input_ids, attention_mask = encode([r["question"] for r in rows], source_len, 0)
    labels, _ = encode([r["response"] for r in rows], target_len, -100)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    return "openorca", _split(batch, batch_size)


def _split(batch: dict[str, torch.Tensor], batch_size: int) -> list[dict[str, torch.Tensor]]:
    n = next(iter(batch.values())).shape[0]
    return [{k: v[i:i + batch_size] for k, v in batch.items()} for i in range(0, n, batch_size)]
