"""minilora's checkpoint loading/saving against transformers (the oracle) on tiny random HF checkpoints."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import real_model_dir
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from minilora.io import load as loading
from minilora.io.hub import resolve_files, resolve_model_dir
from minilora.io.load import CheckpointError, SafetensorsFile, from_pretrained
from minilora.io.save import save_pretrained
from minilora.models import model_classes, resolve_task

transformers.logging.set_verbosity_error()
ATOL = 1e-4

LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, pad_token_id=0)
T5 = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
          feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def save_hf(model: nn.Module, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def hf_llama(tie: bool = False) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, tie_word_embeddings=tie)).eval()


def hf_bert(cls=transformers.BertModel, **extra) -> nn.Module:
    torch.manual_seed(0)
    return cls(transformers.BertConfig(**BERT, **extra)).eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_hf(hf_llama(), tmp_path_factory.mktemp("llama"))


@pytest.fixture
def llama_copy(llama_dir, tmp_path) -> Path:
    """A private copy of the tiny Llama folder that a test may damage."""
    return Path(shutil.copytree(llama_dir, tmp_path / "llama"))


def ids(vocab: int, shape=(2, 7)) -> torch.Tensor:
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(1))


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert a.shape == b.shape
    assert (a.float() - b.float()).abs().max().item() <= atol


# ----------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("tie", [False, True])
def test_llama_logits_match_transformers(tmp_path, tie):
    hf = hf_llama(tie)
    model = from_pretrained(save_hf(hf, tmp_path))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.name_or_path == str(tmp_path)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    x = ids(LLAMA["vocab_size"])
    with torch.no_grad():
        assert_close(model(x).logits, hf(x).logits)


@pytest.mark.parametrize("hf_class, task, output", [
    (transformers.BertModel, None, "last_hidden_state"),
    (transformers.BertForSequenceClassification, None, "logits"),
    (transformers.BertForQuestionAnswering, None, "start_logits"),
    (transformers.BertForQuestionAnswering, "question-answering", "end_logits"),
])
def test_bert_outputs_match_transformers(tmp_path, hf_class, task, output):
    hf = hf_bert(hf_class, num_labels=3 if output == "logits" else 2)
    model = from_pretrained(save_hf(hf, tmp_path), task=task)
    assert type(model).__name__ == hf_class.__name__
    x = ids(BERT["vocab_size"])
    mask = torch.ones_like(x)
    mask[1, 5:] = 0
    with torch.no_grad():
        assert_close(getattr(model(x, attention_mask=mask), output), getattr(hf(x, attention_mask=mask), output))


@pytest.mark.parametrize("tie", [False, True])
def test_t5_logits_match_transformers(tmp_path, tie):
    pytest.importorskip("minilora.models.t5")
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**T5, tie_word_embeddings=tie)).eval()
    model = from_pretrained(save_hf(hf, tmp_path))
    assert model.encoder.embed_tokens.weight is model.shared.weight
    x, y = ids(T5["vocab_size"]), ids(T5["vocab_size"], (2, 5))
    out = save_pretrained(model, tmp_path / "saved")
    hf_reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert_close(model(input_ids=x, decoder_input_ids=y).logits, hf(input_ids=x, decoder_input_ids=y).logits)
        assert_close(hf_reloaded(input_ids=x, decoder_input_ids=y).logits, hf(input_ids=x, decoder_input_ids=y).logits)


def test_sharded_checkpoint(tmp_path):
    hf = hf_llama()
    folder = save_hf(hf, tmp_path, max_shard_size="200KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("model-*.safetensors"))) > 1
    model = from_pretrained(folder)
    x = ids(LLAMA["vocab_size"])
    with torch.no_grad():
        assert_close(model(x).logits, hf(x).logits)


def test_base_checkpoint_into_task_class_warns_and_inits_head(tmp_path):
    hf = hf_bert()
    folder = save_hf(hf, tmp_path)
    with pytest.warns(UserWarning, match=r"newly initialised.*classifier\.weight, classifier\.bias"):
        model = from_pretrained(folder, task="sequence-classification", num_labels=5)
    assert model.classifier.weight.shape == (5, BERT["hidden_size"])
    assert 0.01 < model.classifier.weight.std().item() < 0.03  # N(0, initializer_range=0.02), not zeros/garbage
    assert torch.all(model.classifier.bias == 0)
    x = ids(BERT["vocab_size"])
    with torch.no_grad():  # the encoder is the checkpoint's ("bert." prefix added to every key)
        assert_close(model.bert(x).last_hidden_state, hf(x).last_hidden_state)


def test_task_checkpoint_into_base_class(tmp_path):
    hf = hf_bert(transformers.BertForSequenceClassification)
    model = from_pretrained(save_hf(hf, tmp_path), task="base")  # "bert." stripped, classifier dropped
    assert type(model).__name__ == "BertModel"
    x = ids(BERT["vocab_size"])
    with torch.no_grad():
        assert_close(model(x).last_hidden_state, hf.bert(x).last_hidden_state)


def test_foreign_head_tensors_are_dropped_with_a_warning(tmp_path):
    hf = hf_bert(transformers.BertForPreTraining)  # bert.* + cls.* heads, like bert-base-uncased
    folder = save_hf(hf, tmp_path)
    state = load_file(folder / "model.safetensors")
    state["lm_extra.dense.weight"] = torch.zeros(2, 2)  # a head no minilora class has
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning) as record:
        model = from_pretrained(folder, task="sequence-classification")
    messages = [str(w.message) for w in record]
    assert any("ignored tensors of a head BertForSequenceClassification does not have: lm_extra.dense.weight" in m
               for m in messages)
    assert any("newly initialised" in m for m in messages)  # and the classifier is new
    assert type(model).__name__ == "BertForSequenceClassification"


def test_dtype_bfloat16_and_auto(llama_dir):
    model = from_pretrained(llama_dir, dtype=torch.bfloat16)
    reference = load_file(llama_dir / "model.safetensors")
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, reference[name].to(torch.bfloat16)), name
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # computed buffers keep their precision
    assert from_pretrained(llama_dir, dtype="auto").lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_loading_shows_progress_over_the_checkpoint_bytes(llama_dir, tmp_path, monkeypatch, quantize):
    if quantize:
        pytest.importorskip("bitsandbytes")
    import tqdm.auto

    bars = []

    class Recorder(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            self.kwargs, self.done = kwargs, 0
            bars.append(self)

        def update(self, n=1):
            self.done += n

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    model = from_pretrained(llama_dir, quantize=quantize)
    folders = [llama_dir] + ([save_pretrained(model, tmp_path / "nf4")] if quantize else [])  # and packed ones
    for folder in folders[1:]:
        from_pretrained(folder)
    for folder, bar in zip(folders, bars, strict=True):
        total = sum(t.numel() * t.element_size() for t in load_file(folder / "model.safetensors").values())
        assert bar.kwargs["total"] == bar.done == total and bar.kwargs["desc"] == f"load {folder.name}"
        assert bar.kwargs["disable"] is None  # tqdm's "on a terminal or in a notebook"
    monkeypatch.setenv("RANK", "1")  # torchrun: the first rank's bar only
    from_pretrained(llama_dir)
    assert bars[-1].kwargs["disable"] is True


def test_loading_reads_each_tensor_once_and_holds_no_copy(llama_dir, monkeypatch):
    """Streaming: every stored tensor is fetched once (mapped, as it is used as stored) and becomes the
    model's tensor itself (no second copy)."""
    fetched: dict[str, torch.Tensor] = {}
    originals = {name: getattr(SafetensorsFile, name) for name in ("read", "mapped")}

    def spy(name):
        def fetch(self, key, *rows):
            assert key not in fetched and not rows, f"{key} fetched twice or in parts"
            fetched[key] = originals[name](self, key)
            return fetched[key]
        return fetch

    for name in originals:
        monkeypatch.setattr(SafetensorsFile, name, spy(name))
    model = from_pretrained(llama_dir)
    state = model.state_dict()
    assert set(fetched) == set(load_file(llama_dir / "model.safetensors"))
    assert all(state[k].data_ptr() == t.data_ptr() for k, t in fetched.items())


def test_mapped_weights_are_copy_on_write_and_outlive_the_file(tmp_path, llama_dir):
    """A model loaded as stored maps the file privately: training it never writes the checkpoint, and saving
    over the same folder (temp file, then rename) leaves the loaded model intact."""
    shutil.copytree(llama_dir, tmp_path / "m")
    stored = load_file(tmp_path / "m" / "model.safetensors")
    model = from_pretrained(tmp_path / "m")
    key = "model.layers.0.mlp.up_proj.weight"
    with torch.no_grad():
        model.get_parameter(key).add_(1.0)
    assert torch.equal(load_file(tmp_path / "m" / "model.safetensors")[key], stored[key])
    save_pretrained(model, tmp_path / "m")  # replaces the mapped file
    assert torch.equal(load_file(tmp_path / "m" / "model.safetensors")[key], stored[key] + 1.0)
    assert torch.equal(model.get_parameter(key), stored[key] + 1.0)
    other = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(model.get_parameter(other), stored[other])


# ----------------------------------------------------------------------------------------------- errors


def test_unsupported_model_type(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*llama, bert, t5"):
        from_pretrained(llama_copy)


def test_unknown_task_lists_the_choices(llama_dir):
    with pytest.raises(ValueError, match="task 'question-answering' is not available.*causal-lm"):
        from_pretrained(llama_dir, task="question-answering")


def test_truncated_safetensors(llama_copy):
    path = llama_copy / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt.*only holds"):
        from_pretrained(llama_copy)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:8] + b"{not json" + b[17:], "does not parse"),
    (lambda b: struct.pack("<Q", 10**12) + b[8:], "header claims"),
    (lambda b: b[:3], "fewer than the 8-byte"),
    (lambda b: b.replace(b'"F32"', b'"F99"', 1), "bad header entry"),
])
def test_corrupt_header(llama_copy, damage, message):
    path = llama_copy / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message) as error:
        from_pretrained(llama_copy)
    assert str(path) in str(error.value)


def test_missing_shard(tmp_path):
    folder = save_hf(hf_llama(), tmp_path, max_shard_size="200KB")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        from_pretrained(folder)


def test_wrong_shape_missing_and_unexpected_keys(llama_copy):
    path = llama_copy / "model.safetensors"
    state = load_file(path)
    state["model.norm.weight"] = torch.ones(63)
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.extra.weight"] = torch.ones(2)
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as error:
        from_pretrained(llama_copy)
    message = str(error.value)
    assert "missing from the checkpoint: model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected in the checkpoint (no such LlamaForCausalLM tensor): model.layers.0.self_attn.extra" in message
    assert "model.norm.weight is (63,) in the checkpoint, (64,) in the model" in message


def test_head_of_another_num_labels_is_an_error(tmp_path):
    folder = save_hf(hf_bert(transformers.BertForSequenceClassification, num_labels=2), tmp_path)
    shapes = r"classifier\.weight is \(2, 32\) in the checkpoint, \(3, 32\) in the model.*num_labels"
    with pytest.raises(CheckpointError, match=shapes):
        from_pretrained(folder, num_labels=3)


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **LLAMA}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match="pickled.*Convert them to safetensors"):
        from_pretrained(tmp_path)


def test_local_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no config.json"):
        resolve_model_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="'./no/such/folder' does not exist"):
        resolve_model_dir("./no/such/folder")


def test_hub_id_without_network_explains_how_to_use_a_local_folder(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConnectionError, match=r"could not reach the Hugging Face hub.*'someone/tiny-llama'"
                                              r".*HF_HUB_OFFLINE.*local folder path"):
        from_pretrained("someone/tiny-llama")


def test_hub_id_is_downloaded_with_safetensors_patterns(monkeypatch, llama_dir):
    import huggingface_hub

    calls = []

    def fake_snapshot(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(llama_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    model = from_pretrained("someone/tiny-llama", revision="v1")
    assert model.name_or_path == "someone/tiny-llama"  # what adapters record as base_model_name_or_path
    (repo_id, kwargs), = calls
    assert repo_id == "someone/tiny-llama" and kwargs["revision"] == "v1" and kwargs["repo_type"] == "model"
    assert "*.safetensors" in kwargs["allow_patterns"] and not any(".bin" in p for p in kwargs["allow_patterns"])


def test_hub_repo_with_only_pickled_weights(monkeypatch, tmp_path):
    import huggingface_hub

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kwargs: ["pytorch_model.bin"])
    with pytest.raises(ValueError, match="hub repo 'someone/old-model' only has pickled PyTorch weights"):
        resolve_model_dir("someone/old-model")


def test_resolve_files_in_a_local_folder(tmp_path):
    for name in ("adapter_config.json", "train-0.jsonl", "train-1.jsonl"):
        (tmp_path / name).write_text("{}")
    assert resolve_files(tmp_path, ["adapter_config.json", "train-*.jsonl"]) == [
        tmp_path.resolve() / n for n in ("adapter_config.json", "train-0.jsonl", "train-1.jsonl")]
    assert resolve_files(tmp_path / "train-1.jsonl", ["*.jsonl"], repo_type="dataset") == [tmp_path / "train-1.jsonl"]
    with pytest.raises(FileNotFoundError, match="no file matching 'adapter_model.safetensors'"):
        resolve_files(tmp_path, ["adapter_model.safetensors"])


def test_registry_picks_the_task():
    assert resolve_task({"model_type": "bert", "architectures": ["BertForQuestionAnswering"]}) == "question-answering"
    assert resolve_task({"model_type": "bert", "architectures": ["BertForMaskedLM"]}) == "base"
    assert resolve_task({"model_type": "bert"}, "SEQ_CLS") == "sequence-classification"  # peft's TaskType
    assert resolve_task({"model_type": "llama"}) == "causal-lm"
    assert model_classes({"model_type": "bert"}, "seq-cls")[1].__name__ == "BertForSequenceClassification"


# ----------------------------------------------------------------------------------------------- saving


@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_llama_loads_in_transformers(tmp_path, tie):
    hf = hf_llama(tie)
    model = from_pretrained(save_hf(hf, tmp_path / "in"))
    out = save_pretrained(model, tmp_path / "out")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tie)  # tied tensors are written once
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    reloaded_hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    reloaded = from_pretrained(out)
    x = ids(LLAMA["vocab_size"])
    with torch.no_grad():
        assert_close(reloaded_hf(x).logits, hf(x).logits)
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_save_pretrained_bert_with_new_head_loads_in_transformers(tmp_path):
    with pytest.warns(UserWarning, match="newly initialised"):
        model = from_pretrained(save_hf(hf_bert(), tmp_path / "in"), task="sequence-classification", num_labels=4)
    out = save_pretrained(model, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert hf.config.num_labels == 4
    x = ids(BERT["vocab_size"])
    with torch.no_grad():
        assert_close(model(x).logits, hf(x).logits)


def test_save_pretrained_shards_and_replaces_an_earlier_save(tmp_path, llama_dir):
    model = from_pretrained(llama_dir)
    out = save_pretrained(model, tmp_path, max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(s.stat().st_size < 100_000 + 70_000 for s in shards)  # one tensor may overflow a shard
    x = ids(LLAMA["vocab_size"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert_close(hf(x).logits, model(x).logits)
    save_pretrained(model, tmp_path)  # now a single file: the stale shards and index must go
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    with torch.no_grad():
        assert torch.equal(from_pretrained(out)(x).logits, model(x).logits)


def test_save_pretrained_of_a_model_built_by_hand(tmp_path):
    from minilora.models.llama import LlamaForCausalLM
    from minilora.models.llama_config import LlamaConfig

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=True)).eval()
    out = save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = ids(LLAMA["vocab_size"])
    with torch.no_grad():
        assert_close(hf(x).logits, model(x).logits)


def test_save_pretrained_refuses_lora_layers(tmp_path, llama_dir):
    model = from_pretrained(llama_dir)
    model.lm_head.register_parameter("lora_A", nn.Parameter(torch.zeros(2, 64)))
    with pytest.raises(ValueError, match=r"LoRA layers \(lm_head.lora_A\).*merge_and_unload.*save_adapter"):
        save_pretrained(model, tmp_path)
    assert not any(tmp_path.iterdir())


def test_bad_max_shard_size(tmp_path, llama_dir):
    with pytest.raises(ValueError, match="max_shard_size"):
        save_pretrained(from_pretrained(llama_dir), tmp_path, max_shard_size="lots")


# ------------------------------------------------------------------------------------ safetensors reader


def test_own_reader_and_writer_match_safetensors_on_every_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(), "i64": torch.randint(-9, 9, (4,), generator=g),
        "u8": torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8), "bool": torch.rand(5, generator=g) > 0.5,
        "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3), "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt", "note": "x"})
    with safe_open(tmp_path / "ref.safetensors", "pt") as reference, SafetensorsFile(tmp_path / "ref.safetensors") as f:
        assert sorted(f.keys()) == sorted(reference.keys()) and f.metadata == reference.metadata()
        for key in reference.keys():
            ours, theirs = f.read(key), reference.get_tensor(key)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and torch.equal(ours, theirs), key
    loading.save_safetensors(tensors, tmp_path / "ours.safetensors", metadata={"note": "y"})
    with safe_open(tmp_path / "ours.safetensors", "pt") as reference:
        assert reference.metadata() == {"format": "pt", "note": "y"}
        for key, t in tensors.items():
            assert torch.equal(reference.get_tensor(key), t), key


def test_reader_reads_row_ranges(tmp_path):
    t = torch.arange(24, dtype=torch.float32).reshape(6, 2, 2)
    loading.save_safetensors({"t": t, "s": torch.tensor(1.0)}, tmp_path / "x.safetensors")
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        assert torch.equal(f.read("t", 1, 4), t[1:4]) and torch.equal(f.read("t", 4), t[4:])
        assert torch.equal(f.read("t", -2, None), t[-2:]) and f.read("t", 5, 2).shape == (0, 2, 2)
        lazy = f.lazy("t")
        assert lazy.shape == t.shape and lazy.dtype == t.dtype and torch.equal(lazy[2:5], t[2:5])
        with pytest.raises(ValueError, match="scalar"):
            f.read("s", 0, 1)
        with pytest.raises(TypeError, match="row ranges"):
            lazy[::2]


# ------------------------------------------------------------------------------------ real checkpoints


@pytest.mark.parametrize("name, auto_class, inputs", [
    ("SmolLM2-135M-Instruct", "AutoModelForCausalLM", lambda x: dict(input_ids=x)),
    ("all-MiniLM-L6-v2", "AutoModel", lambda x: dict(input_ids=x, attention_mask=torch.ones_like(x))),
    ("t5-random-flan-small-shape", "AutoModelForSeq2SeqLM", lambda x: dict(input_ids=x, decoder_input_ids=x[:, :4])),
])
def test_real_checkpoints_match_transformers(name, auto_class, inputs):
    folder = real_model_dir(name)
    model = from_pretrained(folder)
    x = ids(1000, (1, 12))
    with torch.no_grad():
        ours = model(**inputs(x))
        hf = getattr(transformers, auto_class).from_pretrained(folder).eval()
        theirs = hf(**inputs(x))
        del hf
    field = "last_hidden_state" if auto_class == "AutoModel" else "logits"
    assert_close(getattr(ours, field), getattr(theirs, field), atol=2e-4)


def test_real_checkpoint_peak_memory_stays_near_model_size():
    """Load SmolLM2 (538 MB in fp32) in a fresh process: peak RSS grows by little more than the model."""
    folder = real_model_dir("SmolLM2-135M-Instruct")
    script = (
        "import re, torch, minilora.io.load as L\n"
        "def rss(field): return int(re.search(field + r':\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024\n"
        "with torch.device('meta'):\n"  # torch's one-time ~70 MB set-up for meta modules is not the loader's
        "    torch.nn.Embedding(2, 2)\n"
        "before = rss('VmRSS')\n"
        f"model = L.from_pretrained({str(folder)!r})\n"
        "unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}\n"
        "print(before, rss('VmHWM'), sum(unique.values()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    before, peak, size = map(int, result.stdout.split())
    growth = peak - before
    assert growth < 1.1 * size, f"peak RSS grew by {growth / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model"


def test_real_checkpoint_quantized_on_load_peaks_near_the_quantized_size():
    """SmolLM2 loaded with quantize="nf4" in a fresh process: weights are read and quantized a few rows at a
    time, so peak RSS grows by about the NF4 model, not by its 16-bit weights (issue: at most 1.25x)."""
    folder = real_model_dir("SmolLM2-135M-Instruct")
    script = (
        "import re, torch, bitsandbytes, minilora.io.load as L, minilora.quant.layers as Q\n"
        "from benchmarks.measure import tensor_bytes\n"
        "def rss(field): return int(re.search(field + r':\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024\n"
        "with torch.device('meta'):\n"
        "    torch.nn.Embedding(2, 2)\n"
        "Q.quantize_linear(torch.randn(64, 64), None, Q.QuantConfig())\n"  # bitsandbytes' one-time set-up
        "before = rss('VmRSS')\n"
        f"model = L.from_pretrained({str(folder)!r}, quantize='nf4', dtype=torch.bfloat16)\n"
        "print(before, rss('VmHWM'), tensor_bytes(model))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    before, peak, size = map(int, result.stdout.split()[-3:])
    assert peak - before < 1.25 * size, f"peak RSS grew by {(peak - before) / 2**20:.0f} MiB for a " \
                                        f"{size / 2**20:.0f} MiB NF4 model"


def test_quantize_on_load_matches_a_transformers_quantized_checkpoint(tmp_path, llama_dir):
    """nf4 on load == the packed bytes transformers + bitsandbytes write; our saved folder loads in both."""
    quant_format = pytest.importorskip("minilora.quant.format")
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, quantization_config=(
        transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.float32))).eval()
    hf.save_pretrained(tmp_path / "hf")
    model = from_pretrained(llama_dir, quantize="nf4")
    assert not isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert isinstance(model.lm_head, nn.Linear)  # the output head stays dense
    prequantized = from_pretrained(tmp_path / "hf")
    ours, theirs = model.state_dict(), prequantized.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = ids(LLAMA["vocab_size"])
    out = save_pretrained(model, tmp_path / "ours")
    assert json.loads((out / "config.json").read_text())["quantization_config"] == quant_format.quant_config_to_dict(
        model.quant_config, model)
    reloaded, hf_reloaded = from_pretrained(out), transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)
        assert torch.equal(prequantized(x).logits, model(x).logits)
        assert_close(hf_reloaded(x).logits, hf(x).logits, atol=1e-5)
        assert 0 < (model(x).logits - from_pretrained(llama_dir)(x).logits).abs().max() < 0.1  # quantized, close


def test_int8_round_trip(tmp_path, llama_dir):
    pytest.importorskip("minilora.quant.layers")
    model = from_pretrained(llama_dir, quantize="int8")
    assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.int8
    reloaded = from_pretrained(save_pretrained(model, tmp_path))
    x = ids(LLAMA["vocab_size"])
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)
