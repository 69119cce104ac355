"""The LLM example scripts end to end on tiny random checkpoints and tiny data (2 optimizer steps each).

llama2_qlora (guanaco), llama2_medical_qlora (MedQuAD) and flan_t5_qlora (OpenOrca) run in-process through
their `main(argv)` on a 2-layer Llama / T5 saved by transformers, with tokenizer files copied from
$MINILORA_TEST_MODELS (SmolLM2, the flan-t5-shaped T5) when present, else built here with `tokenizers`.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))

import common  # noqa: E402
import flan_t5_qlora  # noqa: E402
import llama2_medical_qlora  # noqa: E402
import llama2_qlora  # noqa: E402

import minilora as ml  # noqa: E402
from minilora.data import Collator, causal_lm_dataset  # noqa: E402
from minilora.train.loop import evaluate  # noqa: E402

QA = [("What is the capital of France?", "Paris is the capital of France."),
      ("Name a red fruit.", "An apple is a red fruit."),
      ("What do cats drink?", "Cats drink milk and water."),
      ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
      ("What is two plus two?", "Two plus two is four."),
      ("Where is London?", "London is in England, on the river Thames."),
      ("What color is the sky?", "The sky is blue on a clear day."),
      ("How many legs does a dog have?", "A dog has four legs."),
      ("What is ice?", "Ice is frozen water."),
      ("Which animal barks?", "A dog barks.")]
SYSTEM = "You are a helpful assistant."
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
ALL_TEXT = " ".join(f"<s>[INST] {q} [/INST] {a} </s> {SYSTEM}" for q, a in QA)


def copy_real_tokenizer(name: str, folder: Path) -> dict | None:
    """Copy a real test checkpoint's tokenizer files into `folder`; its config.json, or None if absent."""
    real = Path(os.environ.get("MINILORA_TEST_MODELS", "/nonexistent")) / name
    if not (real / "tokenizer.json").is_file():
        return None
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (real / file).is_file():
            shutil.copy(real / file, folder / file)
    return json.loads((real / "config.json").read_text())


def build_tokenizer(folder: Path, specials: list[str], template: str, config: dict) -> int:
    """A word-level tokenizer over the test texts; returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted(set(re.findall(r"\w+|[^\w\s]+", ALL_TEXT.replace("<s>", "").replace("</s>", ""))))
    vocab = {token: i for i, token in enumerate(specials + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(specials)
    tk.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in specials if t in template])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return len(vocab)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer random Llama with tied embeddings (like SmolLM2) saved by transformers, plus a tokenizer."""
    import transformers

    folder = tmp_path_factory.mktemp("models") / "llama"
    folder.mkdir()
    real = copy_real_tokenizer("SmolLM2-135M-Instruct", folder)
    if real is not None:
        ids = {k: real[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    else:  # with a ChatML template, like SmolLM2's: the recipes render their rows with it
        size = build_tokenizer(folder, ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"], "<s> $A",
                               {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                "chat_template": CHATML})
        ids = {"vocab_size": size, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=True, **ids)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> Path:
    """A 2+2-layer random T5 (flan-t5's gated-gelu, untied head) saved by transformers, plus a tokenizer."""
    import transformers

    folder = tmp_path_factory.mktemp("models") / "t5"
    folder.mkdir()
    real = copy_real_tokenizer("t5-random-flan-small-shape", folder)
    specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    vocab_size = real["vocab_size"] if real else build_tokenizer(folder, list(specials.values()), "$A </s>",
                                                                 specials)
    config = transformers.T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, num_heads=4, d_ff=64,
                                   num_layers=2, num_decoder_layers=2, feed_forward_proj="gated-gelu",
                                   tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1)
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(folder, safe_serialization=True)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def check_run(out: Path, results: dict, steps: int = 2) -> dict:
    """results.json agrees with what main returned; training ran; adapter, metrics log and plot exist."""
    saved = json.loads((out / common.RESULTS_FILE).read_text())
    assert saved["train"]["global_step"] == results["train"]["global_step"] == steps
    for key in ("train_loss", "train_runtime", "train_steps_per_second", "train_samples_per_second",
                "total_flos"):
        assert math.isfinite(saved["train"][key]) and saved["train"][key] > 0, key
    for phase in ("before", "after"):
        assert math.isfinite(saved[phase]["eval_loss"]) and saved[phase]["eval_runtime"] > 0
    assert saved["after"]["eval_loss"] != saved["before"]["eval_loss"]  # the adapter changed the model
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r][-1] == steps
    if _has_matplotlib():
        assert (out / "loss.png").stat().st_size > 0
    assert saved["peak_memory_mb"] > 0
    return saved


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("script", [llama2_qlora, llama2_medical_qlora, flan_t5_qlora])
def test_every_option_is_documented(script):
    parser = script.build_parser()
    options = {s for a in parser._actions for s in a.option_strings}
    assert {"--model", "--data", "--device", "--max-steps", "--max-train-samples", "--output-dir",
            "--seed"} <= options
    undocumented = [a.option_strings for a in parser._actions
                    if a.dest != "help" and not (a.help or "").strip()]
    assert not undocumented


def test_hub_defaults_are_the_recipes():
    guanaco = llama2_qlora.build_parser().parse_args([])
    assert (guanaco.model, guanaco.data) == ("NousResearch/Llama-2-7b-hf", "mlabonne/guanaco-llama2-1k")
    assert (guanaco.quantize, guanaco.lora_r, guanaco.lora_alpha, guanaco.batch_size) == ("nf4", 64, 16, 4)
    medical = llama2_medical_qlora.build_parser().parse_args([])
    assert medical.model == "abhishek/llama-2-7b-hf-small-shards"
    assert (medical.batch_size, medical.gradient_accumulation_steps) == (2, 4)
    assert (medical.lr, medical.epochs) == (2e-4, 1)
    assert (medical.save_steps, medical.logging_steps) == (75, 75)
    flan = flan_t5_qlora.build_parser().parse_args([])
    assert (flan.model, flan.data) == ("google/flan-t5-large", "Open-Orca/OpenOrca")
    assert (flan.quantize, flan.epochs) == ("int8", 3)
    assert flan.max_source_length == 512


@pytest.fixture(scope="module")
def guanaco_run(tiny_llama, tmp_path_factory) -> tuple[Path, Path, dict]:
    """(data folder, output folder, results) of llama2_qlora with a trained head on the tied tiny Llama."""
    tmp = tmp_path_factory.mktemp("guanaco")
    write_jsonl(tmp / "data" / "train.jsonl", [{"text": f"<s>[INST] {q} [/INST] {a} </s>"} for q, a in QA])
    argv = ["--model", str(tiny_llama), "--data", str(tmp / "data"), "--output-dir", str(tmp / "out"),
            "--device", "cpu", "--max-steps", "2", "--batch-size", "2", "--lr", "1e-2",
            "--max-eval-samples", "3", "--max-seq-length", "64", "--train-head", "--questions", QA[0][0],
            "--max-new-tokens", "4", "--logging-steps", "1"]
    return tmp / "data", tmp / "out", llama2_qlora.main(argv)


def test_llama2_qlora_end_to_end(guanaco_run):
    _, out, results = guanaco_run
    saved = check_run(out, results)
    assert (saved["train_rows"], saved["eval_rows"]) == (7, 3)  # guanaco has no test split: 3 rows held out
    assert math.isclose(saved["after"]["perplexity"], math.exp(saved["after"]["eval_loss"]), rel_tol=1e-9)
    assert saved["questions"] == [QA[0][0]]
    assert all(isinstance(a, str) for p in ("before", "after") for a in saved[p]["answers"])
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (64, 16, 0.1)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["modules_to_save"] == ["lm_head"]


def test_llama2_qlora_adapter_with_tied_head_reloads(tiny_llama, guanaco_run):
    """The saved adapter (LoRA + trained head) on a fresh NF4 base reproduces the "after" held-out loss."""
    data, out, results = guanaco_run
    tokenizer = ml.load_tokenizer(tiny_llama)
    _, held_out = llama2_qlora.split_rows(str(data), 3, seed=42)
    chat_template = common.uses_chat_template(tokenizer, "auto")
    assert chat_template and results["prompt_format"] == "chat-template"  # SmolLM2's or the ChatML fixture's
    features = causal_lm_dataset([{"text": llama2_qlora.training_text(r["text"], tokenizer, chat_template)}
                                  for r in held_out], tokenizer, max_length=64)
    base = ml.from_pretrained(tiny_llama, dtype=torch.float32, quantize=ml.QuantConfig(
        quant_type="nf4", double_quant=False, compute_dtype=torch.float32))
    ml.load_adapter(base, out / "adapter")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    reloaded = evaluate(base, features, batch_size=2, collate_fn=Collator(pad_token_id=pad))["eval_loss"]
    assert reloaded == pytest.approx(results["after"]["eval_loss"], rel=1e-5)


def test_llama2_medical_qlora_end_to_end(tiny_llama, tmp_path):
    # The hub's MedQuAD is one CSV with capitalised columns and no test split; one answer is empty.
    rows = [("information", q, a) for q, a in QA] + [("information", "What is nothing?", "")]
    csv = tmp_path / "medDataset_processed.csv"
    csv.write_text("qtype,Question,Answer\n" + "".join(f'{t},"{q}","{a}"\n' for t, q, a in rows))
    out = tmp_path / "out"
    results = llama2_medical_qlora.main(["--model", str(tiny_llama), "--data", str(csv), "--output-dir",
                                         str(out), "--device", "cpu", "--max-steps", "2", "--lr", "1e-2",
                                         "--max-eval-samples", "3", "--max-seq-length", "64",
                                         "--save-steps", "1", "--logging-steps", "1"])
    saved = check_run(out, results)
    assert saved["train_rows"] + saved["eval_rows"] == len(QA)  # the row without an answer is left out
    for phase in ("before", "after"):
        assert math.isclose(saved[phase]["perplexity"], math.exp(saved[phase]["eval_loss"]), rel_tol=1e-9)
    assert saved["peak_memory_kind"].startswith("peak RSS")
    assert all((out / f"checkpoint-{step}" / "adapter_model.safetensors").is_file() for step in (1, 2))
    trainer_state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert trainer_state["total_train_batch_size"] == 2 * 4  # batch 2 x gradient accumulation 4

    # The saved adapter on a fresh NF4 base reproduces the "after" held-out loss.
    tokenizer = ml.load_tokenizer(tiny_llama)
    _, held_out = llama2_medical_qlora.split_rows(str(csv), 3, seed=42)
    rows = llama2_medical_qlora.chat_rows(held_out, llama2_medical_qlora.build_parser().parse_args([]),
                                          tokenizer, "held out")
    base = ml.from_pretrained(tiny_llama, dtype=torch.float32,
                              quantize=ml.QuantConfig(quant_type="nf4", compute_dtype=torch.float32))
    ml.load_adapter(base, out / "adapter")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    reloaded = evaluate(base, causal_lm_dataset(rows, tokenizer, max_length=64), batch_size=2,
                        collate_fn=Collator(pad_token_id=pad))["eval_loss"]
    assert reloaded == pytest.approx(saved["after"]["eval_loss"], rel=1e-5)


def test_llama2_medical_qlora_chat_learns_only_the_answers(tiny_llama, tmp_path, capsys):
    rows = [{"question": q, "answer": a} for q, a in QA]
    data = tmp_path / "medical.jsonl"
    write_jsonl(data, rows)
    out = tmp_path / "out"
    results = llama2_medical_qlora.main(["--model", str(tiny_llama), "--data", str(data), "--output-dir", str(out),
                                         "--device", "cpu", "--max-steps", "1", "--max-eval-samples", "2",
                                         "--max-seq-length", "64", "--chat", "--logging-steps", "1"])
    assert results["train_rows"] + results["eval_rows"] == len(QA)
    shown = capsys.readouterr().out
    assert "learned tokens in ⟦ ⟧" in shown and "⟦" in shown.split("learned tokens in ⟦ ⟧", 1)[1]
    tokenizer = ml.load_tokenizer(tiny_llama)
    args = llama2_medical_qlora.build_parser().parse_args(["--chat"])
    features = llama2_medical_qlora.tokenize(rows[:1], args, tokenizer, "rows")
    learned = [t for t, label in zip(features[0]["input_ids"], features[0]["labels"], strict=True) if label != -100]
    answer = tokenizer.encode(QA[0][1], add_special_tokens=False)
    assert learned[:len(answer)] == answer and 0 < len(learned) - len(answer) <= 2  # + the end of turn


def test_flan_t5_qlora_end_to_end_and_from_adapter(tiny_t5, tmp_path):
    rows = [{"id": str(i), "system_prompt": SYSTEM if i % 2 else "", "question": q, "response": a}
            for i, (q, a) in enumerate(QA)]
    rows.append({"id": "long", "system_prompt": SYSTEM, "question": " ".join(["water"] * 80),
                 "response": "ice"})
    write_jsonl(tmp_path / "orca" / "train.jsonl", rows)
    common_args = ["--model", str(tiny_t5), "--data", str(tmp_path / "orca"), "--device", "cpu",
                   "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--max-eval-samples", "3",
                   "--max-source-length", "48", "--max-target-length", "16", "--num-beams", "2",
                   "--early-stopping", "--max-new-tokens", "4", "--num-generations", "2"]
    out = tmp_path / "out"
    saved = check_run(out, flan_t5_qlora.main([*common_args, "--output-dir", str(out)]))
    # the 80-word question is over the 48-token limit: dropped and counted, wherever it landed
    assert saved["train_rows_dropped"] + saved["eval_rows_dropped"] == 1
    assert saved["train_rows"] + saved["eval_rows"] == len(QA)
    for phase in ("before", "after"):
        assert 1 <= len(saved[phase]["generations"]) <= 2
        assert all(isinstance(g["generated"], str) and g["reference"] for g in saved[phase]["generations"])
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (16, 32, ["q", "v"])

    # --adapter continues from the saved adapter: its "before" is the first run's "after".
    again = tmp_path / "again"
    continued = flan_t5_qlora.main([*common_args, "--output-dir", str(again),
                                    "--adapter", str(out / "adapter")])
    assert continued["before"]["eval_loss"] == pytest.approx(saved["after"]["eval_loss"], rel=1e-5)
    assert continued["start_adapter"] == str(out / "adapter")


@pytest.mark.parametrize("script", [llama2_qlora, llama2_medical_qlora, flan_t5_qlora])
def test_no_network_says_how_to_run_offline(script, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as exit_info:
        common.run_script(script.main, script.OFFLINE, ["--model", "no-such-org/no-such-model",
                                                         "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no-such-org/no-such-model" in err and "--model DIR" in err and "--data PATH" in err


def test_script_runs_from_the_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    script = EXAMPLES / "llama2_medical_qlora.py"
    proc = subprocess.run([sys.executable, str(script), "--model", "no-such-org/x"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "HF_HUB_OFFLINE is set" in proc.stderr and llama2_medical_qlora.OFFLINE in proc.stderr


# ---------------------------------------------------------------- prompt formats (any decoder's chat template)

LLAMA2_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + "
                   "' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")


def word_tokenizer(folder: Path, chat_template: str | None):
    """The word-level test tokenizer (adds BOS itself), with an optional chat template."""
    folder.mkdir()
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    build_tokenizer(folder, ["<unk>", "<s>", "</s>"], "<s> $A",
                    {**config, "chat_template": chat_template} if chat_template else config)
    return ml.load_tokenizer(folder)


def test_prompt_format_auto_keeps_llama2_text_for_llama2_models(tmp_path):
    row = f"<s>[INST] {QA[0][0]} [/INST] {QA[0][1]} </s>"
    for name, template in [("none", None), ("llama2", LLAMA2_TEMPLATE)]:
        tokenizer = word_tokenizer(tmp_path / name, template)
        assert not common.uses_chat_template(tokenizer, "auto")
        assert llama2_qlora.training_text(row, tokenizer, False) == row
        assert common.conversation_text([QA[0]], tokenizer, False) == row
        assert common.question_prompt("Hi?", tokenizer, False) == "<s>[INST] Hi? [/INST]"
    with pytest.raises(ValueError, match="--prompt-format chat-template.*no chat template"):
        common.uses_chat_template(word_tokenizer(tmp_path / "plain", None), "chat-template")
    with pytest.raises(ValueError, match="--prompt-format"):
        common.uses_chat_template(tokenizer, "chatml")


def test_chat_template_renders_every_turn_once(tiny_llama, tmp_path):
    tokenizer = ml.load_tokenizer(tiny_llama)  # SmolLM2's ChatML template, or the fixture's
    assert common.uses_chat_template(tokenizer, "auto") and not common.uses_chat_template(tokenizer, "llama2")
    (q1, a1), (q2, a2) = QA[:2]
    text = llama2_qlora.training_text(f"<s>[INST] {q1} [/INST] {a1} </s><s>[INST] {q2} [/INST] {a2} </s>",
                                      tokenizer, True)
    turns = [f"<|im_start|>user\n{q1}<|im_end|>", f"<|im_start|>assistant\n{a1}<|im_end|>",
             f"<|im_start|>user\n{q2}<|im_end|>", f"<|im_start|>assistant\n{a2}<|im_end|>"]
    assert all(text.count(turn) == 1 for turn in turns)
    assert text.index(turns[0]) < text.index(turns[1]) < text.index(turns[2]) < text.index(turns[3])
    # the text stops after the last end-of-turn (nothing after it when that is the tokenizer's EOS, as SmolLM2's)
    assert text.rstrip().endswith(turns[3]) and (text.endswith(turns[3]) or tokenizer.eos_token != "<|im_end|>")
    assert "[INST]" not in text and "<s>" not in text
    assert common.question_prompt(q1, tokenizer, True).endswith(f"{turns[0]}\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="expected Llama-2 chat text.*--prompt-format llama2"):
        llama2_qlora.training_text("### Human: hi ### Assistant: hello", tokenizer, True)
    # A template that writes the BOS the tokenizer adds by itself (Llama-2/3 style): one BOS, not two.
    bos_adding = word_tokenizer(tmp_path / "bos", LLAMA2_TEMPLATE)
    text = common.conversation_text([QA[0]], bos_adding, chat_template=True)
    ids = bos_adding.encode(text)
    assert ids[0] == bos_adding.bos_token_id and ids[1] != bos_adding.bos_token_id
    assert ids[-1] == bos_adding.eos_token_id


def test_qwen_runs_the_guanaco_and_medical_recipes(tmp_path):
    """A real Qwen2.5 folder (its own chat template) through both recipes: one NF4 QLoRA step each on CPU
    (minutes: 0.6B parameters). Skips where the Qwen folder is absent or this minilora does not load qwen2."""
    from conftest import real_model_dir, shared_data_dir
    folder, data = real_model_dir("Qwen2.5-Coder-0.5B-Instruct"), shared_data_dir()
    small = ["--device", "cpu", "--max-steps", "1", "--batch-size", "1", "--max-train-samples", "2",
             "--max-eval-samples", "1", "--max-seq-length", "40", "--logging-steps", "1", "--lr", "1e-3",
             "--warmup-ratio", "0"]  # one step: no warmup, or its learning rate would be 0
    try:
        guanaco = llama2_qlora.main(["--model", str(folder), "--data", str(data / "guanaco_llama2_1k"),
                                     "--output-dir", str(tmp_path / "guanaco"), *small, "--questions",
                                     "What is the capital of France?", "--max-new-tokens", "8"])
    except ValueError as e:
        if "unsupported model_type" not in str(e):
            raise
        pytest.skip(f"this minilora does not load {folder.name} yet: {e}")
    saved = check_run(tmp_path / "guanaco", guanaco, steps=1)
    assert saved["prompt_format"] == "chat-template"
    assert "Paris" in saved["before"]["answers"][0]  # prompted through its own template, it answers
    medical = llama2_medical_qlora.main(["--model", str(folder), "--data", str(data / "medical_qa"),
                                         "--output-dir", str(tmp_path / "medical"), *small,
                                         "--gradient-accumulation-steps", "1", "--save-steps", "1"])
    assert check_run(tmp_path / "medical", medical, steps=1)["prompt_format"] == "chat-template"
