"""Hostile and careless inputs (issue 17): each gets a clear error naming the file, key, field or argument and
what was expected, and leaves the model folder, adapter, model or output folder as it was."""
import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from train_helpers import VOCAB_SIZE, tiny_llama

from minilora.loading import from_pretrained, save_pretrained
from minilora.safetensors_io import CheckpointError, load_safetensors, save_safetensors


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (names and contents), to prove a failed call changed nothing."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def llama_dir(tmp_path) -> Path:
    return save_pretrained(tiny_llama(), tmp_path / "llama")


def edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder / "config.json"


def fails_unchanged(folder: Path, error, *names: str, call=None):
    """`call()` (default: load `folder`) raises `error` whose message contains every one of `names`, and the
    folder is byte for byte as it was."""
    before = snapshot(folder)
    with pytest.raises(error) as info:
        (call or (lambda: from_pretrained(folder)))()
    for name in names:
        assert name in str(info.value), f"{name!r} not named in: {info.value}"
    assert snapshot(folder) == before
    return info.value


def write_raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


# --- checkpoints ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("offsets, word", [([[0, 16], [8, 24]], "overlaps"), ([[0, 16], [20, 36]], "gap")])
def test_overlapping_or_gapped_data_offsets_are_refused(tmp_path, offsets, word):
    file = tmp_path / "model.safetensors"
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": offsets[0]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": offsets[1]}}
    write_raw_safetensors(file, header, bytes(offsets[1][1]))
    error = fails_unchanged(tmp_path, CheckpointError, str(file), "'b'", word, call=lambda: load_safetensors(file))
    assert "data_offsets" in str(error)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.int32])
def test_bool_or_int_tensor_for_a_float_parameter_is_refused(llama_dir, dtype):
    tensors = load_safetensors(llama_dir / "model.safetensors")
    key = "model.norm.weight"
    tensors[key] = tensors[key].to(dtype)
    save_safetensors(tensors, llama_dir / "model.safetensors")
    fails_unchanged(llama_dir, CheckpointError, key, str(dtype), "floating-point")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors"])
def test_index_naming_a_file_outside_the_folder_is_refused(llama_dir, shard):
    keys = list(load_safetensors(llama_dir / "model.safetensors"))
    (llama_dir / "model.safetensors").rename(llama_dir / "model-00001-of-00001.safetensors")
    index = llama_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: shard if i == 0 else "model-00001-of-00001.safetensors"
                                                for i, k in enumerate(keys)}}))
    fails_unchanged(llama_dir, CheckpointError, str(index), repr(shard), "outside")


@pytest.mark.parametrize("weight_map", [["model.safetensors"], {"model.norm.weight": 3}, 5])
def test_index_with_a_list_or_int_where_a_map_or_file_name_belongs(llama_dir, weight_map):
    (llama_dir / "model.safetensors").rename(llama_dir / "shard.safetensors")
    index = llama_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    fails_unchanged(llama_dir, CheckpointError, str(index), "weight_map")


def test_layer_count_beyond_the_checkpoint_fails_before_building(llama_dir):
    source = edit_config(llama_dir, num_hidden_layers=1_000_000)
    fails_unchanged(llama_dir, CheckpointError, str(source), "num_hidden_layers is 1000000", "holds 2 layers")


def test_huge_num_labels_is_refused(tmp_path):
    from minilora.models.bert import BertConfig, BertModel
    folder = save_pretrained(BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=32)), tmp_path / "bert")
    fails_unchanged(folder, ValueError, "num_labels", "10000000000",
                    call=lambda: from_pretrained(folder, task="sequence-classification", num_labels=10**10))
    fails_unchanged(folder, ValueError, "num_labels", call=lambda: from_pretrained(folder, num_labels=True))
    source = edit_config(folder, num_labels=10**9, id2label=None, label2id=None)
    fails_unchanged(folder, CheckpointError, str(source), "num_labels=1000000000",
                    call=lambda: from_pretrained(folder, task="sequence-classification"))


@pytest.mark.parametrize("change, named", [
    ({"hidden_size": "64"}, "hidden_size: expected int, got '64'"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings: expected bool"),
    ({"rope_scaling": [1, 2]}, "rope_scaling: expected dict"),
    ({"num_attention_heads": 0}, "num_attention_heads must be >= 1"),
    ({"rms_norm_eps": None}, "rms_norm_eps: expected float"),
])
def test_config_values_of_the_wrong_type_or_size(llama_dir, change, named):
    source = edit_config(llama_dir, **change)
    fails_unchanged(llama_dir, CheckpointError, str(source), named)


def test_huge_head_dim_fails_before_any_rope_table(llama_dir, monkeypatch):
    import minilora.models.llama as llama
    monkeypatch.setattr(llama, "rope_inv_freq", lambda *a, **k: pytest.fail("RoPE table built"))
    source = edit_config(llama_dir, head_dim=2**40)
    fails_unchanged(llama_dir, CheckpointError, str(source), f"head_dim is {2**40}")


@pytest.mark.parametrize("content, named", [(b'{"model_type": "llama", "x": "\xff\xfe"}', "not UTF-8"),
                                            (b"[1, 2]", "must hold a JSON object, got list"),
                                            (b"7", "must hold a JSON object, got int")])
def test_config_that_is_not_utf8_or_not_an_object(llama_dir, content, named):
    (llama_dir / "config.json").write_bytes(content)
    fails_unchanged(llama_dir, ValueError, str(llama_dir / "config.json"), named)


def test_vocab_ids_out_of_range_at_the_model_input():
    model = tiny_llama()
    for bad in (VOCAB_SIZE, -1):
        ids = torch.tensor([[1, 2, bad]])
        with pytest.raises(ValueError, match=rf"input_ids holds token id {bad} .*{VOCAB_SIZE}"):
            model(ids)
