"""The loss of an optimizer step is the mean over every label token of the step (token-weighted), not a mean
of per-micro-batch means: accumulation k x batch 1 == accumulation 1 x batch k, 2 gloo processes == 1
process, and the logged losses equal transformers' Trainer (which normalises by `num_items_in_batch`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import VOCAB_SIZE, tiny_lora_llama, variable_length_lm_data
from train_helpers import main as train_main

from minilora.data import Collator
from minilora.train.loop import evaluate, loss_targets, train
from minilora.train.config import TrainConfig

# AdamW with beta1 = beta2 = 0 and a huge epsilon is SGD: update = lr * g / (|g| + eps) ~ (lr / eps) * g.
SGD_LIKE = dict(adam_beta1=0.0, adam_beta2=0.0, adam_epsilon=1e3, learning_rate=1e3, weight_decay=0.0,
                max_grad_norm=None, lr_scheduler="constant")


def _config(out, **kw):
    return TrainConfig(output_dir=str(out), progress_bar=False, plot=False, shuffle=False, logging_steps=1, **kw)


def _records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loss_targets_count_what_each_loss_averages():
    model = tiny_lora_llama()
    batch = Collator()([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}])
    assert loss_targets(model, batch) == 2  # shifted: the first label of a row is never predicted
    model.is_encoder_decoder = True
    assert loss_targets(model, batch) == 3  # a decoder's labels are all predicted
    assert loss_targets(torch.nn.Linear(1, 1), {"input_ids": torch.zeros(5, 3), "labels": torch.zeros(5)}) == 5


def test_accumulation_k_by_batch_1_equals_batch_k(tmp_path):
    data = variable_length_lm_data(8)
    k = 4
    runs = {}
    for name, batch_size, accumulation in [("k x 1", 1, k), ("1 x k", k, 1)]:
        model = tiny_lora_llama()
        before = _trainable(model)
        train(model, data, _config(tmp_path / name.replace(" ", ""), batch_size=batch_size,
                                   gradient_accumulation_steps=accumulation, max_steps=2, **SGD_LIKE))
        runs[name] = (_records(tmp_path / name.replace(" ", "")), _trainable(model))
    assert any((before[n] - runs["k x 1"][1][n]).abs().max() > 1e-3 for n in before)  # the steps moved
    (records_a, params_a), (records_b, params_b) = runs["k x 1"], runs["1 x k"]
    for a, b in zip(records_a, records_b, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                   abs=1e-6)
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], atol=1e-6, rtol=0, msg=name)

    # the first step's loss and gradient are those of one forward over the 4 examples (token mean) ...
    model = tiny_lora_llama()
    batch = Collator()(data[:k])
    loss = model(**batch).loss
    loss.backward()
    grad_norm = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]).norm().item()
    assert records_a[0]["loss"] == pytest.approx(loss.item(), abs=1e-6)
    assert records_a[0]["grad_norm"] == pytest.approx(grad_norm, abs=1e-6)
    # ... which here is far from the mean of the per-example means (the old rule), so the check can fail
    with torch.no_grad():
        mean_of_means = sum(model(**Collator()([row])).loss.item() for row in data[:k]) / k
    assert abs(mean_of_means - loss.item()) > 1e-2


def test_eval_loss_is_the_token_mean_of_the_whole_set():
    data = variable_length_lm_data(7)
    model = tiny_lora_llama()
    with torch.no_grad():
        token_mean = model(**Collator()(data)).loss.item()
    for batch_size in (1, 2, 3):
        assert evaluate(model, data, batch_size=batch_size)["eval_loss"] == pytest.approx(token_mean, abs=1e-6)


def test_seq2seq_counts_every_decoder_label(tmp_path):
    import transformers as tf

    from minilora.io.load import from_pretrained

    torch.manual_seed(0)
    tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                              num_heads=4, decoder_start_token_id=0, eos_token_id=3, pad_token_id=0,
                                              dropout_rate=0.0)).save_pretrained(tmp_path / "t5")
    data = [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"], "labels": r["input_ids"][:n]}
            for r, n in zip(variable_length_lm_data(4), (1, 5, 2, 9), strict=True)]
    grads = []
    for batch_size, accumulation in [(1, 4), (4, 1)]:
        model = from_pretrained(tmp_path / "t5")
        train(model, data, _config(tmp_path / f"{batch_size}", batch_size=batch_size, max_steps=1,
                                   gradient_accumulation_steps=accumulation, **SGD_LIKE))
        grads.append((_records(tmp_path / f"{batch_size}")[0], _trainable(model)))
    assert grads[0][0]["loss"] == pytest.approx(grads[1][0]["loss"], abs=1e-6)
    assert grads[0][0]["grad_norm"] == pytest.approx(grads[1][0]["grad_norm"], abs=1e-6)
    for name in grads[0][1]:
        torch.testing.assert_close(grads[0][1][name], grads[1][1][name], atol=1e-6, rtol=0, msg=name)
    with torch.no_grad():
        token_mean = from_pretrained(tmp_path / "t5")(**Collator()(data)).loss.item()
    assert grads[0][0]["loss"] == pytest.approx(token_mean, abs=1e-6)


def test_two_gloo_processes_match_one_process_on_variable_lengths(tmp_path):
    # 2 ranks x batch 1 x accumulation 2 = global batch 4 = 1 process x batch 2 x accumulation 2
    args = dict(gradient_accumulation_steps=2, max_steps=3, logging_steps=1, seed=3, n=12, variable_lengths=True,
                shuffle=False, **SGD_LIKE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONWARNINGS": "ignore"}
    helper = Path(__file__).with_name("train_helpers.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(helper),
           str(tmp_path / "ddp"), json.dumps({**args, "batch_size": 1})]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-4000:]
    train_main(str(tmp_path / "single"), json.dumps({**args, "batch_size": 2}))

    ddp = load_file(tmp_path / "ddp" / "trained.safetensors")
    single = load_file(tmp_path / "single" / "trained.safetensors")
    assert ddp.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], atol=1e-6, rtol=0, msg=name)
    ddp_records, single_records = _records(tmp_path / "ddp"), _records(tmp_path / "single")
    assert len(ddp_records) == len(single_records) == 3
    for a, b in zip(ddp_records, single_records, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                   abs=1e-6)


def test_logged_loss_equals_transformers_trainer(tmp_path):
    import transformers as tf

    from minilora.io.load import from_pretrained

    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            pad_token_id=0, initializer_range=0.3))
    hf.save_pretrained(tmp_path / "llama")
    data = variable_length_lm_data(12, seed=1)
    hyper = dict(learning_rate=1e-2, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                 max_grad_norm=1.0, lr_scheduler="constant")

    model = from_pretrained(tmp_path / "llama")
    for p in model.parameters():
        p.requires_grad_(True)
    train(model, data, _config(tmp_path / "ours", batch_size=2, gradient_accumulation_steps=2, max_steps=3,
                               optim="adamw_torch", **hyper))
    ours = [r["loss"] for r in _records(tmp_path / "ours")]

    def collate(rows):
        batch = Collator()(rows)
        return batch

    args = tf.TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=hyper["learning_rate"], weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_grad_norm=1.0, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, train_sampling_strategy="sequential", optim="adamw_torch", dataloader_num_workers=0,
        seed=0, disable_tqdm=True)
    hf = tf.LlamaForCausalLM.from_pretrained(tmp_path / "llama", attn_implementation="eager")
    trainer = tf.Trainer(model=hf, args=args, train_dataset=data, data_collator=collate)
    trainer.train()
    theirs = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(ours) == len(theirs) == 3
    assert ours == pytest.approx(theirs, abs=1e-5)


def test_a_micro_batch_without_targets_adds_nothing(tmp_path):
    data = variable_length_lm_data(3)
    data.insert(1, {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, -100, -100]})  # 0 targets
    runs = []
    for batch_size, accumulation in [(1, 4), (4, 1)]:
        model = tiny_lora_llama()
        train(model, data, _config(tmp_path / f"{batch_size}", batch_size=batch_size, max_steps=1,
                                   gradient_accumulation_steps=accumulation, **SGD_LIKE))
        runs.append((_records(tmp_path / f"{batch_size}")[0], _trainable(model)))
    assert runs[0][0]["loss"] == pytest.approx(runs[1][0]["loss"], abs=1e-6)
    for name in runs[0][1]:
        torch.testing.assert_close(runs[0][1][name], runs[1][1][name], atol=1e-6, rtol=0, msg=name)
    with pytest.raises(ValueError, match="no label token to learn"):
        train(tiny_lora_llama(), data[1:2], _config(tmp_path / "none", batch_size=1, max_steps=1))
