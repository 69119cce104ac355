"""minilora.train.loop: the loop against a hand-written reference and transformers' schedules, end-to-end runs on
tiny random checkpoints of every task shape (loss goes down), files written, and error paths."""
import json
import os

import pytest
import torch
from torch import nn
from train_helpers import (VOCAB_SIZE, TinyClassifier, classification_data, fixed_length_lm_data, tiny_llama,
                           tiny_lora_llama, tiny_tokenizer)

import minilora as ml
from minilora.data import (Collator, causal_lm_dataset, classification_dataset, postprocess_qa_predictions,
                           qa_dataset, seq2seq_dataset)
from minilora.metrics import accuracy, squad_metrics
from minilora.train.loop import evaluate, train
from minilora.train.optim import build_optimizer, lr_factor
from minilora.train.config import TrainConfig


def _config(tmp_path, **kw):
    return TrainConfig(output_dir=str(tmp_path / "out"), progress_bar=False, plot=False, **kw)


def _read_metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]


# --- pieces against oracles -----------------------------------------------------------------------------------

@pytest.mark.parametrize("ours, theirs", [("constant", "constant_with_warmup"), ("linear", "linear"),
                                          ("cosine", "cosine")])
@pytest.mark.parametrize("warmup", [0, 3])
def test_lr_schedules_match_transformers(ours, theirs, warmup):
    from transformers import get_scheduler
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(theirs, opt, num_warmup_steps=warmup, num_training_steps=10)
    for step in range(12):
        assert lr_factor(step, 10, warmup, ours) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        sched.step()


def test_optimizer_groups_hold_only_trainable_params_and_decay_only_matrices():
    model = TinyClassifier()  # embedding, LayerNorm, two Linear layers with biases
    model.embed.weight.requires_grad_(False)
    model.proj.bias.requires_grad_(False)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decayed["params"])
    assert decayed["params"] == [model.proj.weight, model.head.weight]
    assert plain["weight_decay"] == 0.0 and plain["params"] == [model.norm.weight, model.norm.bias, model.head.bias]
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, TrainConfig())


def test_train_matches_a_hand_written_loop(tmp_path):
    """Grad accumulation (incl. a short last group), clipping, weight decay groups and the schedule."""
    from transformers import get_scheduler
    data = classification_data(14)  # 7 batches of 2 -> 4 steps/epoch, the last with 1 micro-batch
    cfg = _config(tmp_path, batch_size=2, gradient_accumulation_steps=2, num_epochs=2, shuffle=False,
                  learning_rate=0.05, weight_decay=0.1, max_grad_norm=0.05, warmup_steps=2, lr_scheduler="linear",
                  logging_steps=1)
    torch.manual_seed(0)
    model = TinyClassifier()
    reference = TinyClassifier()
    reference.load_state_dict(model.state_dict())
    summary = train(model, data, cfg)
    assert summary["global_step"] == 8 and summary["epoch"] == 2.0

    params = list(reference.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=0.05,
                            foreach=False)
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=8)
    collate = Collator()
    batches = [data[i:i + 2] for i in range(0, 14, 2)]
    for _ in range(2):
        for group in [batches[0:2], batches[2:4], batches[4:6], batches[6:7]]:
            for micro in group:
                (reference(**collate(micro)).loss / len(group)).backward()
            torch.nn.utils.clip_grad_norm_(params, 0.05)
            opt.step()
            sched.step()
            opt.zero_grad()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5, msg=name)
    lrs = [r["lr"] for r in _read_metrics(tmp_path) if "lr" in r]
    assert lrs == pytest.approx([0.05 * lr_factor(k, 8, 2, "linear") for k in range(8)])


def test_grad_accumulation_equals_the_big_batch(tmp_path):
    data = classification_data(16)
    weights = []
    for batch_size, accumulation in [(4, 1), (2, 2), (1, 4)]:
        torch.manual_seed(0)
        model = TinyClassifier()
        train(model, data, _config(tmp_path / f"{batch_size}", batch_size=batch_size, num_epochs=2,
                                   gradient_accumulation_steps=accumulation, learning_rate=0.01))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[1], weights[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weights[2], weights[0], atol=1e-6, rtol=1e-5)


# --- end to end on tiny random checkpoints: transformers config -> save_pretrained -> ml.from_pretrained ---------

def _hf_checkpoint(tmp_path, kind):
    import transformers as tf
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB_SIZE, pad_token_id=0, initializer_range=0.3)
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, **common))
    elif kind == "t5":
        model = tf.T5ForConditionalGeneration(tf.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                          decoder_start_token_id=0, eos_token_id=3, **common))
    else:
        cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            num_labels=2, **common)
        model = (tf.BertForQuestionAnswering if kind == "bert-qa" else tf.BertForSequenceClassification)(cfg)
    model.save_pretrained(tmp_path / kind, safe_serialization=True)
    from minilora.io.load import from_pretrained
    return from_pretrained(tmp_path / kind)


def _first_and_last_loss(tmp_path):
    """Mean logged loss of the first two and of the last two log records."""
    losses = [r["loss"] for r in _read_metrics(tmp_path) if "loss" in r]
    return sum(losses[:2]) / 2, sum(losses[-2:]) / 2


SENTENCES = ["the cat sat on the mat", "a dog ran fast to the river", "paris is the capital of france",
             "the old tower is in london", "who sat on the mat", "what is the capital of france"]


def test_causal_lm_end_to_end(tmp_path):
    model = ml.apply_lora(_hf_checkpoint(tmp_path, "llama"), ml.LoraConfig(r=8, lora_alpha=16,
                                                                           target_modules="all-linear"))
    data = causal_lm_dataset([{"text": s} for s in SENTENCES * 4], tiny_tokenizer("gpt"), max_length=16)
    before = evaluate(model, data[:6], batch_size=6)["eval_loss"]
    summary = train(model, data, eval_data=data[:6], config=TrainConfig(
        output_dir=str(tmp_path / "out"), batch_size=4, num_epochs=3, learning_rate=3e-2, logging_steps=3,
        eval_steps=6, warmup_ratio=0.1, lr_scheduler="cosine", progress_bar=False))
    first, last = _first_and_last_loss(tmp_path)
    assert last < 0.7 * first and summary["eval_loss"] < 0.7 * before
    assert summary["global_step"] == 18 and summary["epoch"] == 3.0
    tokens = sum(len(x["input_ids"]) for x in data) * 3
    assert summary["total_flos"] == 6 * sum(p.numel() for p in model.parameters()) * tokens
    assert summary["train_runtime"] > 0 and summary["train_samples_per_second"] > 0
    records = _read_metrics(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == [3, 6, 9, 12, 15, 18]
    assert [r["step"] for r in records if "eval_loss" in r] == [6, 12, 18]
    assert {"epoch", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    if _has_matplotlib():
        assert (tmp_path / "out" / "loss.png").stat().st_size > 1000


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_seq2seq_end_to_end(tmp_path):
    model = ml.apply_lora(_hf_checkpoint(tmp_path, "t5"), ml.LoraConfig(r=8, lora_alpha=16,
                                                                        target_modules=["q", "v", "o"]))
    rows = [{"source": s, "target": " ".join(s.split()[::-1])} for s in SENTENCES] * 2
    data = seq2seq_dataset(rows, tiny_tokenizer("t5"), max_source_length=16, max_target_length=16)
    summary = train(model, data, eval_data=data[:6], config=_config(tmp_path, batch_size=4, num_epochs=5,
                                                                    learning_rate=3e-2, logging_steps=1))
    first, last = _first_and_last_loss(tmp_path)
    assert last < 0.8 * first and summary["eval_loss"] < first


def test_classification_end_to_end_with_compute_metrics(tmp_path):
    model = _hf_checkpoint(tmp_path, "bert-cls")
    ml.apply_lora(model, ml.LoraConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    rows = [{"text": s, "label": int("the" in s.split())} for s in SENTENCES] * 2
    data = classification_dataset(rows, tiny_tokenizer("bert"), num_labels=2)
    seen = {}

    def compute_metrics(predictions, eval_data):
        seen["shapes"] = {tuple(a.shape) for a in predictions["logits"]}
        return {"accuracy": accuracy([int(a.argmax()) for a in predictions["logits"]],
                                     [x["labels"] for x in eval_data])}
    summary = train(model, data, eval_data=data[:6], config=_config(tmp_path, batch_size=4, num_epochs=8,
                                                                    learning_rate=3e-2, logging_steps=1),
                    compute_metrics=compute_metrics)
    first, last = _first_and_last_loss(tmp_path)
    assert last < 0.5 * first and summary["eval_accuracy"] == 1.0
    assert seen["shapes"] == {(2,)}


def test_extractive_qa_end_to_end(tmp_path):
    model = _hf_checkpoint(tmp_path, "bert-qa")
    ml.apply_lora(model, ml.LoraConfig(r=8, target_modules=["query", "value"], modules_to_save=["qa_outputs"]))
    rows = []
    for i, s in enumerate(SENTENCES):
        answer = s.split()[-1]
        rows.append({"id": str(i), "question": "where", "context": s,
                     "answers": {"text": [answer], "answer_start": [s.rindex(answer)]}})
    tok = tiny_tokenizer("bert")
    data = qa_dataset(rows * 2, tok, max_length=32, doc_stride=8)
    eval_rows = rows
    eval_data = qa_dataset(eval_rows, tok, max_length=32, doc_stride=8)
    lengths = {}

    def compute_metrics(predictions, features):
        lengths["ok"] = all(len(a) == len(f["input_ids"]) for a, f in zip(predictions["start_logits"], features,
                                                                          strict=True))
        texts = postprocess_qa_predictions(eval_rows, features, predictions["start_logits"], predictions["end_logits"])
        return squad_metrics(texts, {r["id"]: r["answers"]["text"] for r in eval_rows})
    summary = train(model, data, eval_data=eval_data, compute_metrics=compute_metrics,
                    config=_config(tmp_path, batch_size=4, num_epochs=10, learning_rate=5e-2, logging_steps=1))
    first, last = _first_and_last_loss(tmp_path)
    assert last < 0.7 * first and summary["eval_loss"] < 0.5 * first  # eval: no dropout
    assert lengths["ok"] and summary["eval_f1"] > 50 and "eval_exact_match" in summary


# --- options --------------------------------------------------------------------------------------------------

class AutocastProbe(TinyClassifier):
    def forward(self, *args, **kwargs):
        self.autocast_seen.append(torch.is_autocast_enabled("cpu"))
        return super().forward(*args, **kwargs)


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_autocast(tmp_path, bf16):
    model = AutocastProbe()
    model.autocast_seen = []
    summary = train(model, classification_data(8), eval_data=classification_data(4), config=_config(
        tmp_path, batch_size=4, bf16=bf16))
    assert model.autocast_seen and set(model.autocast_seen) == {bf16}
    assert torch.isfinite(torch.tensor(summary["train_loss"]))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast only, weights stay fp32


def test_gradient_checkpointing_gives_the_same_result(tmp_path):
    data = fixed_length_lm_data(8)
    weights = []
    for flag in (False, True):
        model = tiny_lora_llama()
        train(model, data, _config(tmp_path / str(flag), batch_size=4, gradient_checkpointing=flag))
        weights.append(ml.adapter_state_dict(model))
    for name, t in weights[0].items():
        torch.testing.assert_close(weights[1][name], t, atol=1e-6, rtol=1e-5)


def test_checkpoints_are_complete_and_pruned(tmp_path):
    model = tiny_lora_llama()
    train(model, fixed_length_lm_data(8), _config(tmp_path, batch_size=2, save_steps=1, save_total_limit=2))
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["checkpoint-3", "checkpoint-4", "metrics.jsonl"]  # no .tmp leftovers
    files = sorted(os.listdir(out / "checkpoint-4"))
    assert files == ["adapter_config.json", "adapter_model.safetensors", "optimizer.json", "optimizer.safetensors",
                     "rng_state_0.json", "rng_state_0.safetensors", "train_config.json", "trainer_state.json"]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["epoch"] == 1 and state["step_in_epoch"] == 0
    assert TrainConfig.from_dict(json.loads((out / "checkpoint-4" / "train_config.json").read_text())).save_steps == 1
    # the adapter is a normal peft-format adapter
    fresh = ml.load_adapter(tiny_llama(), out / "checkpoint-4")
    for name, t in ml.adapter_state_dict(model).items():
        assert torch.equal(ml.adapter_state_dict(fresh)[name], t)


def test_model_without_lora_saves_its_trainable_params(tmp_path):
    from safetensors.torch import load_file
    model = TinyClassifier()
    model.embed.weight.requires_grad_(False)
    train(model, classification_data(4), _config(tmp_path, batch_size=2, save_steps=2))
    saved = load_file(tmp_path / "out" / "checkpoint-2" / "trainable_params.safetensors")
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(saved[n], p) for n, p in model.named_parameters() if n in saved)


class NanAfter(TinyClassifier):
    """Returns a NaN loss from the `bad_call`-th forward on."""

    def forward(self, *args, **kwargs):
        self.calls += 1
        out = super().forward(*args, **kwargs)
        if self.calls >= self.bad_call and self.training:
            out.loss = out.loss * float("nan")
        return out


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    model = NanAfter()
    model.calls, model.bad_call = 0, 5  # batch 2, accumulation 2: the 5th forward is in step 3
    message = r"diverged at step 3 .*loss=nan.*Last good checkpoint: .*checkpoint-2"
    with pytest.raises(FloatingPointError, match=message):
        train(model, classification_data(16), _config(tmp_path, batch_size=2, gradient_accumulation_steps=2,
                                                      save_steps=2))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "metrics.jsonl"]
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad update was never applied


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="TrainConfig.optim must be one of"):
        TrainConfig(optim="sgd")
    with pytest.raises(ValueError, match="TrainConfig.lr_scheduler"):
        TrainConfig(lr_scheduler="step")
    with pytest.raises(ValueError, match="TrainConfig.batch_size must be >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(KeyError, match="no fields"):
        TrainConfig.from_dict({"batchsize": 3})
    with pytest.raises(ValueError, match="train_data is empty"):
        train(TinyClassifier(), [], _config(tmp_path))
    with pytest.raises(ValueError, match="returned no loss .*needs labels"):
        train(TinyClassifier(), [{"input_ids": [4, 5]}], _config(tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint-N folders"):
        train(TinyClassifier(), classification_data(2), _config(tmp_path / "empty"), resume_from="latest")


def test_plot_metrics(tmp_path):
    from minilora.train.plot import plot_metrics
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 2, "eval_loss": 1.7}\n')
    if _has_matplotlib():
        png = plot_metrics(metrics, tmp_path / "sub" / "loss.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "empty.jsonl").write_text('{"step": 1, "lr": 0.1}\n')
    with pytest.raises((ValueError, ImportError), match="no 'loss'|matplotlib"):
        plot_metrics(tmp_path / "empty.jsonl", tmp_path / "x.png")


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    import sys

    from minilora.train.plot import plot_metrics
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'minilora\[plot\]'"):
        plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "loss.png")


def test_max_steps_overrides_num_epochs_and_crosses_epochs(tmp_path):
    # 8 rows, batch 2: 4 steps per epoch; max_steps=6 runs into the second epoch, num_epochs=1 notwithstanding
    summary = train(TinyClassifier(), classification_data(8), _config(tmp_path, batch_size=2, max_steps=6,
                                                                      logging_steps=1))
    assert summary["global_step"] == 6 and summary["epoch"] == 1.5
    assert [r["epoch"] for r in _read_metrics(tmp_path)] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]


# --- fp16: loss scaling ---------------------------------------------------------------------------------------

def _fp16_run(tmp_path, monkeypatch, init_scale: float, **kw):
    """fp16 training of TinyClassifier on the CPU, with GradScaler's starting scale set to `init_scale`."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: real(*a, **{**k, "init_scale": init_scale}))
    torch.manual_seed(0)
    model = TinyClassifier(hidden=16)
    train(model, classification_data(16), _config(tmp_path, batch_size=4, fp16=True, logging_steps=1,
                                                  learning_rate=1e-2, **kw))
    return model


def test_fp16_scales_the_loss_and_skips_the_steps_whose_gradients_overflow(tmp_path, monkeypatch):
    """A loss scale of 2^20 overflows fp16 gradients: those steps update nothing and halve the scale (no
    divergence error), until the scale fits and the steps that follow update the model."""
    from minilora.train.checkpoints import read_tree

    model = _fp16_run(tmp_path, monkeypatch, 2.0 ** 20, max_steps=8, save_steps=8)
    norms = [r["grad_norm"] for r in _read_metrics(tmp_path) if "grad_norm" in r]
    skipped = norms.count(None)
    assert len(norms) == 8 and 0 < skipped < 8 and norms[:skipped] == [None] * skipped
    checkpoint = tmp_path / "out" / "checkpoint-8"
    optimizer = read_tree(checkpoint / "optimizer")
    assert all(int(s["step"]) == 8 - skipped for s in optimizer["state"].values())  # skipped: no AdamW step
    scaler = json.loads((checkpoint / "trainer_state.json").read_text())["grad_scaler"]
    assert scaler["scale"] == 2.0 ** 20 * 0.5 ** skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # fp16 compute, fp32 weights


def test_fp16_resumes_bitwise_with_the_loss_scale_of_the_checkpoint(tmp_path, monkeypatch):
    full = _fp16_run(tmp_path / "full", monkeypatch, 2.0 ** 20, max_steps=8, save_steps=4)
    norms = [r["grad_norm"] for r in _read_metrics(tmp_path / "full") if "grad_norm" in r]
    assert 0 < norms[:4].count(None) < 4  # the checkpoint's scale differs from the starting one
    resumed = _fp16_run(tmp_path / "resumed", monkeypatch, 2.0 ** 20, max_steps=8, save_steps=4,
                        resume_from=str(tmp_path / "full" / "out" / "checkpoint-4"))
    for (name, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert TrainConfig(fp16=True).fp16
    with pytest.raises(ValueError, match="bf16 and fp16 are exclusive"):
        TrainConfig(bf16=True, fp16=True)
    half = TinyClassifier().half()
    with pytest.raises(ValueError, match="trainable parameters are float16"):
        train(half, classification_data(4), _config(tmp_path / "half", fp16=True))


def test_the_loop_puts_no_float64_tensor_on_the_training_device(tmp_path):
    """MPS has no float64: the loss, token and sample sums stay on the host."""
    from torch.overrides import TorchFunctionMode

    class Float64OnDevice(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if kwargs.get("dtype") == torch.float64 and kwargs.get("device") is not None:
                self.seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **kwargs)
    model = TinyClassifier()
    with Float64OnDevice() as mode:
        train(model, classification_data(8), _config(tmp_path, batch_size=4, gradient_accumulation_steps=2),
              eval_data=classification_data(4))
    assert mode.seen == []
