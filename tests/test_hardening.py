"""Hostile and careless inputs (issue 17): each gets a clear error naming the file, key, field or argument and
what was expected, and leaves the model folder, adapter, model or output folder as it was."""
import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from train_helpers import VOCAB_SIZE, tiny_llama

import minilora as ml
from minilora.io.load import from_pretrained
from minilora.io.save import save_pretrained
from minilora.io.safetensors_file import CheckpointError, load_safetensors, save_safetensors


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
    ({"quantization_config": ["nf4"]}, "quantization_config: expected a JSON object"),
])
def test_config_values_of_the_wrong_type_or_size(llama_dir, change, named):
    source = edit_config(llama_dir, **change)
    fails_unchanged(llama_dir, CheckpointError, str(source), named)


def test_config_class_errors_name_the_file(llama_dir):
    source = edit_config(llama_dir, hidden_act="gelu", num_key_value_heads=3)
    fails_unchanged(llama_dir, ValueError, str(source), "num_key_value_heads (3)")


def test_huge_head_dim_fails_before_any_rope_table(llama_dir, monkeypatch):
    import minilora.models.llama as llama
    import minilora.models.rope as rope
    for module in (llama, rope):
        monkeypatch.setattr(module, "rope_inv_freq", lambda *a, **k: pytest.fail("RoPE table built"))
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


# --- LoRA configs and adapters -------------------------------------------------------------------------------

def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("kwargs, field", [
    (dict(use_rslora="false"), "use_rslora"), (dict(use_rslora="no"), "use_rslora"), (dict(use_dora=1), "use_dora"),
    (dict(lora_alpha=True), "lora_alpha"), (dict(lora_dropout=True), "lora_dropout"), (dict(r=True), "r"),
    (dict(target_modules="q_proj("), "target_modules"), (dict(exclude_modules="[v"), "exclude_modules"),
    (dict(modules_to_save=5), "modules_to_save"), (dict(modules_to_save=[3]), "modules_to_save"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern"), (dict(rank_pattern={"q_proj": 2.5}), "rank_pattern"),
    (dict(rank_pattern=["q_proj"]), "rank_pattern"), (dict(alpha_pattern={"v_proj": "8"}), "alpha_pattern"),
    (dict(layers_to_transform=-1), "layers_to_transform"), (dict(layers_to_transform=[0, "1"]), "layers_to_transform"),
    (dict(layers_pattern=3, layers_to_transform=0), "layers_pattern"),
])
def test_lora_config_refuses_wrong_types_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field}\b") as info:
        ml.LoraConfig(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(target_modules="all-linear", layers_to_transform=[0]), "need a list of target_modules"),
    (dict(target_modules=".*q_proj", layers_pattern="layers", layers_to_transform=0), "need a list of target_modules"),
    (dict(target_modules=["q_proj"], layers_pattern="layers"), "layers_to_transform is not"),
    (dict(rank_pattern={"q_proj(": 2}), r"rank_pattern: 'q_proj\(' is not a valid regular expression"),
])
def test_lora_config_refuses_layer_and_pattern_options_that_cannot_work(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ml.LoraConfig(**kwargs)


def test_layers_to_transform_that_selects_nothing_names_the_layers():
    with pytest.raises(ValueError, match=r"in layers_to_transform=\[5\] \(layers_pattern=None\)"):
        ml.apply_lora(tiny_llama(), ml.LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]))


@pytest.mark.parametrize("field, value", [("use_rslora", "false"), ("lora_alpha", True)])
def test_adapter_config_with_a_string_bool_or_bool_number_is_refused(tmp_path, field, value):
    model = ml.apply_lora(tiny_llama(), ml.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    folder = ml.save_adapter(model, tmp_path / "adapter")
    config_file = folder / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), field: value}))
    fresh = tiny_llama()
    before = state_of(fresh)
    fails_unchanged(folder, ValueError, str(config_file), field, call=lambda: ml.load_adapter(fresh, folder))
    assert_same_state(fresh, before)


def test_modules_to_save_equal_to_the_target_says_so():
    model = tiny_llama()
    before = state_of(model)
    config = ml.LoraConfig(target_modules=["lm_head"], modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match=r"modules_to_save=\['lm_head'\] also names \(lm_head\)"):
        ml.apply_lora(model, config)
    assert_same_state(model, before)


def test_config_is_frozen_after_apply_lora_and_the_saved_values_are_the_layers(tmp_path):
    from dataclasses import FrozenInstanceError, replace
    config = ml.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    model = ml.apply_lora(tiny_llama(), config)
    with pytest.raises(FrozenInstanceError, match="LoraConfig.lora_alpha"):
        model.lora_config.lora_alpha = 32
    config.lora_alpha = 32  # the caller's own object stays theirs, and does not reach the layers' config
    saved = json.loads((ml.save_adapter(model, tmp_path / "a") / "adapter_config.json").read_text())
    assert saved["lora_alpha"] == 8 and saved["r"] == 4
    assert replace(model.lora_config, r=2).r == 2  # a new config from a frozen one is an ordinary config


def test_adapter_missing_its_modules_to_save_tensors_is_refused(tmp_path):
    config = ml.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    folder = ml.save_adapter(ml.apply_lora(tiny_llama(), config), tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    save_safetensors({k: v for k, v in load_safetensors(weights).items() if "lm_head" not in k}, weights)
    fresh = tiny_llama(seed=1)
    before = state_of(fresh)
    fails_unchanged(folder, ValueError, str(weights), "modules_to_save", "lm_head.weight",
                    call=lambda: ml.load_adapter(fresh, folder))
    assert_same_state(fresh, before)
    assert not any("lora_" in n for n, _ in fresh.named_parameters())


def test_backward_through_a_merged_model_says_it_is_merged():
    model = ml.apply_lora(tiny_llama(), ml.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    ml.merge_lora(model)
    ids = torch.tensor([[4, 5, 6, 7]])
    loss = model(ids, labels=ids).loss
    with pytest.raises(RuntimeError, match=r"merged LoRA layer.*unmerge_lora"):
        loss.backward()
    ml.unmerge_lora(model)
    model(ids, labels=ids).loss.backward()  # unmerged, it trains again
    assert model.model.layers[0].self_attn.q_proj.lora_B.weight.grad is not None


def test_adapter_with_an_integer_tensor_is_refused(tmp_path):
    folder = ml.save_adapter(ml.apply_lora(tiny_llama(), ml.LoraConfig(r=4, target_modules=["q_proj"])), tmp_path / "a")
    weights = folder / "adapter_model.safetensors"
    tensors = load_safetensors(weights)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key].to(torch.int32)
    save_safetensors(tensors, weights)
    fresh = tiny_llama()
    before = state_of(fresh)
    fails_unchanged(folder, ValueError, str(weights), key.removeprefix("base_model.model."), "torch.int32",
                    call=lambda: ml.load_adapter(fresh, folder))
    assert_same_state(fresh, before)


def test_save_pretrained_without_a_savable_config_writes_nothing(tmp_path):
    model = tiny_llama()
    model.config = object()  # neither a loaded config (no `raw`) nor a dataclass
    with pytest.raises(ValueError, match="config"):
        save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
