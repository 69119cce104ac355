"""Hostile and careless inputs (issue 17), part 2: data files, generation arguments, training configs and
output folders. Each gets a clear error naming the file, line, field or argument, or the right behaviour,
and leaves the output folder as it was."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_hardening import snapshot
from train_helpers import TinyClassifier, classification_data, tiny_llama, tiny_tokenizer

import minilora as ml
from minilora.data.causal_lm import causal_lm_dataset
from minilora.data.readers import load_records
from minilora.train.output_lock import LOCK_NAME, OutputDirLocked
from minilora.train.checkpoints import TrainState, save_checkpoint
from minilora.io.safetensors_file import CheckpointError
from minilora.train.loop import train
from minilora.train.optim import build_optimizer
from minilora.train.config import TrainConfig


def config(out: Path, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), batch_size=2, num_epochs=1, save_steps=2, learning_rate=1e-2, logging_steps=1,
                progress_bar=False, plot=False)
    return TrainConfig(**{**base, **kw})


# --- data files ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, content, line", [
    ("d.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "caf\xe9"}\n', 3),
    ("d.csv", b'text,label\ncaf\xe9,1\n', 2),
    ("d.json", b'[{"text": "a"},\n {"text": "\xff"}]', 2),
])
def test_non_utf8_data_names_the_file_and_line(tmp_path, name, content, line):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{path}:{line}: not UTF-8"):
        load_records(path)


def test_utf8_bom_is_dropped_in_jsonl_and_csv(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    (tmp_path / "d.csv").write_bytes(b"\xef\xbb\xbftext,label\nhello,1\n")
    assert load_records(tmp_path / "d.jsonl") == [{"text": "a"}, {"text": "b"}]
    assert load_records(tmp_path / "d.csv") == [{"text": "hello", "label": "1"}]


@pytest.mark.parametrize("value, error", [("64", TypeError), (64.0, TypeError), (True, TypeError), (0, ValueError)])
def test_max_length_of_the_wrong_type_names_the_argument(value, error):
    rows = [{"text": "the cat sat"}]
    with pytest.raises(error, match="max_length"):
        causal_lm_dataset(rows, tiny_tokenizer("gpt"), max_length=value)
    with pytest.raises(error, match="max_length"):
        tiny_tokenizer("bert")("the cat", max_length=value)


def test_token_ids_out_of_range_in_every_model():
    from minilora.models.bert import BertConfig, BertModel
    from minilora.models.t5 import T5Config, T5ForConditionalGeneration
    bert = BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=16))
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=20, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    good = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="input_ids holds token id 20 .* 20 entries"):
        bert(torch.tensor([[1, 20]]))
    with pytest.raises(ValueError, match="input_ids holds token id -3 "):
        t5(input_ids=torch.tensor([[1, -3]]), decoder_input_ids=good)
    with pytest.raises(ValueError, match="token id 25 "):
        t5(input_ids=good, decoder_input_ids=torch.tensor([[0, 25]]))


# --- generation ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=float("nan"), do_sample=True), "temperature"), (dict(temperature=0.0), "temperature"),
    (dict(temperature="1"), "temperature"), (dict(length_penalty=float("nan"), num_beams=2), "length_penalty"),
    (dict(top_p=float("nan"), do_sample=True), "top_p"), (dict(top_p=1.5, do_sample=True), "top_p"),
])
def test_generation_arguments_out_of_range(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        ml.generate(tiny_llama().eval(), torch.tensor([[4, 5]]), max_new_tokens=2, **kwargs)


def test_empty_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match=r"input_ids is empty \(shape \(1, 0\)\)"):
        ml.generate(tiny_llama().eval(), torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)


# --- training config -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error", [
    (dict(learning_rate=float("nan")), ValueError), (dict(learning_rate=-1e-3), ValueError),
    (dict(learning_rate=0.0), ValueError), (dict(learning_rate=float("inf")), ValueError),
    (dict(learning_rate="2e-4"), TypeError), (dict(adam_beta1=1.0), ValueError), (dict(adam_beta2=-0.1), ValueError),
    (dict(weight_decay=-0.01), ValueError), (dict(max_grad_norm=-1.0), ValueError),
    (dict(max_grad_norm=float("nan")), ValueError), (dict(bf16="false"), TypeError), (dict(shuffle=1), TypeError),
    (dict(batch_size="8"), TypeError), (dict(num_epochs=1.5), TypeError), (dict(seed=-1), ValueError),
    (dict(warmup_ratio=1.0), ValueError), (dict(save_steps=0), ValueError), (dict(device="gpu0"), ValueError),
])
def test_train_config_checks_every_field_before_anything_is_written(tmp_path, kwargs, error):
    out = tmp_path / "out"
    with pytest.raises(error, match=rf"TrainConfig\b.*{next(iter(kwargs))}"):
        config(out, **kwargs)
    assert not out.exists()


# --- output folder: lock, stale files, damaged checkpoints --------------------------------------------------

HOLD_LOCK = """
import importlib.util, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("output_lock", sys.argv[2])  # stdlib only: no torch to import
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)
with lock.output_dir_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_second_run_on_one_output_dir_fails_naming_the_holder_and_a_killed_holder_is_stale(tmp_path):
    out = tmp_path / "out"
    module = Path(__file__).resolve().parents[1] / "minilora" / "train" / "output_lock.py"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), str(module)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        before = snapshot(out)
        with pytest.raises(OutputDirLocked, match=rf"{out} is in use .*pid {holder.pid} on host"):
            train(TinyClassifier(), classification_data(8), config(out))
        assert snapshot(out) == before
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a run killed while holding the lock
        holder.wait()
    assert (out / LOCK_NAME).is_file()
    with pytest.warns(UserWarning, match=rf"pid {holder.pid} .*ended without releasing"):
        train(TinyClassifier(), classification_data(8), config(out))
    assert not (out / LOCK_NAME).exists() and (out / "checkpoint-4").is_dir()


def test_stale_tmp_checkpoints_are_removed_and_a_torn_metrics_line_is_tolerated(tmp_path):
    out = tmp_path / "out"
    train(TinyClassifier(), classification_data(8), config(out))
    (out / "checkpoint-6.tmp-x1y2").mkdir()
    (out / "checkpoint-6.tmp-x1y2" / "optimizer.json").write_text("{")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.')  # a kill in the middle of a log write
    summary = train(TinyClassifier(), classification_data(8), config(out, num_epochs=2, resume_from="latest"))
    assert summary["global_step"] == 8
    assert not list(out.glob("*.tmp-*"))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_corrupt_newest_checkpoint_is_named_with_the_intact_older_one(tmp_path):
    out = tmp_path / "out"
    train(TinyClassifier(), classification_data(8), config(out))
    damaged = out / "checkpoint-4" / "optimizer.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-7])
    before = snapshot(out)
    with pytest.raises(CheckpointError, match=rf"{damaged} is damaged.*checkpoint-2 is intact"):
        train(TinyClassifier(), classification_data(8), config(out, resume_from=str(out / "checkpoint-4")))
    assert snapshot(out) == before
    with pytest.warns(UserWarning, match=rf"{damaged} is damaged.*resuming from .*checkpoint-2"):
        summary = train(TinyClassifier(), classification_data(8), config(out, resume_from="latest"))
    assert summary["global_step"] == 4


def test_resuming_on_different_data_of_the_same_size_warns(tmp_path):
    out = tmp_path / "out"
    train(TinyClassifier(), classification_data(8), config(out))
    with pytest.warns(UserWarning, match="different training data"):
        train(TinyClassifier(), classification_data(8, seed=5), config(out, num_epochs=2, resume_from="latest"))


def test_non_finite_weights_are_never_saved_as_a_checkpoint(tmp_path):
    out = tmp_path / "out"
    model = TinyClassifier()
    train(model, classification_data(4), config(out))  # checkpoint-2
    cfg = config(out)
    with torch.no_grad():
        model.head.weight[0, 0] = float("inf")
    before = snapshot(out)
    with pytest.raises(FloatingPointError, match=r"not saving checkpoint-3 .*head\.weight.*Last good checkpoint: "
                                                 r"checkpoint-2"):
        save_checkpoint(model, build_optimizer(model, cfg), TrainState(global_step=3), cfg)
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "metrics.jsonl"]
    with torch.no_grad():
        model.head.weight[0, 0] = 0.0
    optimizer = build_optimizer(model, cfg)
    optimizer.state[model.head.weight] = {"exp_avg": torch.full_like(model.head.weight, float("nan"))}
    with pytest.raises(FloatingPointError, match=r"optimizer exp_avg of head\.weight"):
        save_checkpoint(model, optimizer, TrainState(global_step=3), cfg)
    assert snapshot(out) == before


def test_a_corrupt_metrics_line_before_the_last_is_named(tmp_path):
    out = tmp_path / "out"
    train(TinyClassifier(), classification_data(8), config(out))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    before = snapshot(out)
    with pytest.raises(ValueError, match=rf"{out / 'metrics.jsonl'}:2: not a JSON metrics record"):
        train(TinyClassifier(), classification_data(8), config(out, num_epochs=2, resume_from="latest"))
    assert snapshot(out) == before


def test_a_lock_file_naming_a_live_process_on_this_host_holds_without_flock(tmp_path):
    import socket
    out = tmp_path / "out"
    out.mkdir()
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01 00:00:00"}
    (out / LOCK_NAME).write_text(json.dumps(record))  # as a holder on a file system without flock leaves it
    before = snapshot(out)
    with pytest.raises(OutputDirLocked, match=rf"pid {os.getpid()} on host {socket.gethostname()}"):
        train(TinyClassifier(), classification_data(8), config(out))
    assert snapshot(out) == before
