"""Checkpoint + resume: a run killed mid-epoch and resumed ends bitwise equal (fp32, CPU) to a run that never
stopped, with dropout, gradient accumulation and each optimizer family."""
import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import TinyClassifier, classification_data, fixed_length_lm_data, tiny_llama, tiny_lora_llama

import minilora as ml
from minilora.train.checkpoints import read_tree, write_tree
from minilora.train.loop import train
from minilora.train.config import TrainConfig


class Killed(Exception):
    pass


class DiesAfter(list):
    """A data set that raises after `reads` item reads: a process killed in the middle of a step."""

    def __init__(self, rows, reads):
        super().__init__(rows)
        self.reads = reads

    def __getitem__(self, i):
        self.reads -= 1
        if self.reads < 0:
            raise Killed
        return super().__getitem__(i)


def _config(out, **kw):
    base = dict(output_dir=str(out), batch_size=2, gradient_accumulation_steps=2, num_epochs=2, save_steps=2,
                learning_rate=1e-2, weight_decay=0.01, warmup_steps=2, logging_steps=1, progress_bar=False, plot=False)
    return TrainConfig(**{**base, **kw})


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _losses(out):
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"])
            for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


CASES = {
    # LoRA (dropout in LoRA and attention) + torch AdamW; resume with "latest"
    "lora-adamw": (lambda: tiny_lora_llama(lora_dropout=0.1, dropout=0.1), lambda: fixed_length_lm_data(20),
                   "adamw_torch", "latest"),
    # DoRA: its magnitudes are saved, restored and trained like the factors
    "dora-adamw": (lambda: ml.apply_lora(tiny_llama(dropout=0.1), ml.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "down_proj"], use_dora=True)),
        lambda: fixed_length_lm_data(20), "adamw_torch", "latest"),
    # full fine-tuning (no LoRA: trainable_params.safetensors) + bitsandbytes 8-bit AdamW (64x64 is quantized)
    "full-adamw8bit": (lambda: TinyClassifier(hidden=64, dropout=0.1), lambda: classification_data(20),
                       "adamw_8bit", "checkpoint-4"),
    "full-paged32": (lambda: TinyClassifier(hidden=64, dropout=0.1), lambda: classification_data(20),
                     "paged_adamw_32bit", "latest"),
}


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("case", list(CASES))
def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, case):
    make_model, make_data, optim, resume = CASES[case]
    # 20 rows, batch 2, accumulation 2: 10 micro-batches = 5 steps per epoch (the last with 2), 10 steps
    torch.manual_seed(0)
    full = make_model()
    train(full, make_data(), _config(tmp_path / "full", optim=optim))

    torch.manual_seed(0)
    killed = make_model()
    with pytest.raises(Killed):  # dies in the middle of step 5 (after 4 * 4 + 2 reads): last checkpoint-4
        train(killed, DiesAfter(make_data(), 18), _config(tmp_path / "resumed", optim=optim))
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    torch.manual_seed(123)  # a different fresh init: everything trainable must come from the checkpoint
    resumed = make_model()
    start = resume if resume == "latest" else str(tmp_path / "resumed" / resume)
    summary = train(resumed, make_data(), _config(tmp_path / "resumed", optim=optim, resume_from=start))

    assert summary["global_step"] == 10 and summary["epoch"] == 2.0
    expected, got = _trainable(full), _trainable(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), f"{name} differs after resume"
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "full")  # the log continues seamlessly
    for file in sorted((tmp_path / "full" / "checkpoint-10").glob("*.safetensors")):
        if not file.name.startswith("rng"):
            a, b = load_file(file), load_file(tmp_path / "resumed" / "checkpoint-10" / file.name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file.name


def test_resume_refuses_a_different_data_order(tmp_path):
    train(TinyClassifier(), classification_data(8), _config(tmp_path, num_epochs=1))
    with pytest.raises(ValueError, match=r"data order would change \(batch_size: 2 -> 4"):
        train(TinyClassifier(), classification_data(8), _config(tmp_path, batch_size=4, resume_from="latest"))
    with pytest.raises(ValueError, match="number of training examples: 8 -> 6"):
        train(TinyClassifier(), classification_data(6), _config(tmp_path, resume_from="latest"))
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        train(TinyClassifier(), classification_data(8), _config(tmp_path, resume_from=str(tmp_path)))


def test_resume_from_the_final_checkpoint_only_reports(tmp_path):
    model = TinyClassifier()
    first = train(model, classification_data(8), _config(tmp_path, num_epochs=1))
    again = train(TinyClassifier(), classification_data(8), eval_data=classification_data(4),
                  config=_config(tmp_path, num_epochs=1, resume_from="latest"))
    assert again["global_step"] == first["global_step"] == 2
    assert again["train_loss"] == pytest.approx(first["train_loss"]) and "eval_loss" in again


def test_state_tree_round_trip_without_pickle(tmp_path):
    shared = torch.arange(4.0)
    tree = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": shared, "q": {"absmax": shared.view(2, 2)}},
                      7: {"step": 5}},
            "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "params": [0, 7], "amsgrad": False,
                              "foreach": None, "name": "decay"}]}
    write_tree(tree, tmp_path / "opt")
    json.loads((tmp_path / "opt.json").read_text())  # plain JSON next to plain safetensors
    back = read_tree(tmp_path / "opt")
    assert back["param_groups"] == tree["param_groups"] and isinstance(back["param_groups"][0]["betas"], tuple)
    assert set(back["state"]) == {0, 7} and back["state"][7] == {"step": 5}
    assert torch.equal(back["state"][0]["step"], tree["state"][0]["step"])
    assert torch.equal(back["state"][0]["q"]["absmax"], shared.view(2, 2))
    with pytest.raises(TypeError, match="cannot store a object"):
        write_tree({"x": object()}, tmp_path / "bad")
