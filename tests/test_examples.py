"""The BERT example scripts end to end on tiny random checkpoints and tiny data, plus examples/common.py.

Each script's `main(argv)` runs in-process for 2 optimizer steps on a 2-layer BERT saved by transformers,
with a tokenizer copied from $MINILORA_TEST_MODELS/all-MiniLM-L6-v2 when present, else built here.
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

import bert_sentiment_lora  # noqa: E402
import bert_squad_lora  # noqa: E402
import common  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CONTEXTS = [
    ("The Eiffel Tower was finished in 1889 in Paris.", "When was the Eiffel Tower finished?", "1889"),
    ("Marie Curie won the Nobel Prize in Physics in 1903.", "What prize did Marie Curie win?", "Nobel Prize"),
    ("The river Thames flows through London and Oxford.", "Which river flows through London?", "Thames"),
    ("Penguins live in the southern hemisphere and cannot fly.", "Where do penguins live?",
     "southern hemisphere"),
]
REVIEWS = [("a moving , funny and beautiful film", 1), ("tedious , dull and far too long", 0),
           ("the cast is wonderful and the story charming", 1), ("a boring mess with no ideas", 0),
           ("smart , warm and deeply felt", 1), ("clumsy writing and lifeless acting", 0)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def squad_rows(prefix: str) -> list[dict]:
    return [{"id": f"{prefix}{i}", "title": "t", "context": c, "question": q,
             "answers": {"text": [a], "answer_start": [c.index(a)]}} for i, (c, q, a) in enumerate(CONTEXTS)]


def make_tokenizer(folder: Path) -> int:
    """Tokenizer files in `folder`; returns the vocabulary size."""
    real = Path(os.environ.get("MINILORA_TEST_MODELS", "/nonexistent")) / "all-MiniLM-L6-v2"
    if (real / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (real / name).is_file():
                shutil.copy(real / name, folder / name)
        return json.loads((real / "config.json").read_text())["vocab_size"]
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    text = " ".join([c + " " + q for c, q, _ in CONTEXTS] + [r for r, _ in REVIEWS]).lower()
    words = sorted(set(re.findall(r"\w+|[^\w\s]", text)))
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tk.decoder = decoders.WordPiece()
    tk.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "BertTokenizer", "model_max_length": 128, "unk_token": "[UNK]",
              "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return len(vocab)


def tiny_bert(folder: Path, architecture: str) -> Path:
    """A 2-layer random BERT (BertModel or BertForQuestionAnswering) saved by transformers + a tokenizer."""
    import transformers

    folder.mkdir(parents=True)
    vocab_size = make_tokenizer(folder)
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    getattr(transformers, architecture)(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("models") / "bert", "BertModel")


def check_outputs(out: Path, results: dict) -> dict:
    """results.json, the adapter, the metrics log and (with matplotlib) the loss plot exist and agree."""
    saved = json.loads((out / common.RESULTS_FILE).read_text())
    assert saved["train"]["global_step"] == results["train"]["global_step"] == 2
    for key in ("train_loss", "train_runtime", "train_steps_per_second", "train_samples_per_second",
                "total_flos", "epoch"):
        assert isinstance(saved["train"][key], (int, float)) and saved["train"][key] >= 0, key
    assert math.isfinite(saved["train"]["train_loss"]) and saved["train"]["total_flos"] > 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps and steps[-1] == 2
    try:
        import matplotlib  # noqa: F401
        assert (out / "loss.png").stat().st_size > 0
    except ImportError:
        pass
    assert saved["peak_memory_mb"] > 0
    return saved


def test_sentiment_example_end_to_end(bert_base, tmp_path):
    rows = [{"text": t, "label": y} for t, y in REVIEWS]
    write_jsonl(tmp_path / "rt" / "train.jsonl", rows)
    write_jsonl(tmp_path / "rt" / "test.jsonl", rows[:4])
    out = tmp_path / "out"
    results = bert_sentiment_lora.main(["--model", str(bert_base), "--data", str(tmp_path / "rt"),
                                        "--output-dir", str(out), "--device", "cpu", "--max-steps", "2",
                                        "--batch-size", "2", "--max-train-samples", "4", "--lr", "1e-2"])
    saved = check_outputs(out, results)
    assert saved["num_train_examples"] == 4 and saved["num_eval_examples"] == 4
    for phase in ("before", "after", "after_reload"):
        assert 0.0 <= saved[phase]["eval_accuracy"] <= 1.0 and saved[phase]["eval_runtime"] > 0
        assert math.isfinite(saved[phase]["eval_loss"])
    # the adapter (LoRA + the fresh classifier) was trained, and reloading it reproduces the trained model
    assert saved["after"]["eval_loss"] != saved["before"]["eval_loss"]
    assert saved["reload_matches"] is True
    assert saved["after_reload"]["eval_loss"] == pytest.approx(saved["after"]["eval_loss"], rel=1e-5)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 32 and config["lora_alpha"] == 4 and config["modules_to_save"] == ["classifier"]
    assert sorted(config["target_modules"]) == ["key", "query", "value"]


def test_squad_example_end_to_end(tmp_path):
    model = tiny_bert(tmp_path / "bert-qa", "BertForQuestionAnswering")  # a span head in the checkpoint
    write_jsonl(tmp_path / "squad" / "train.jsonl", squad_rows("t"))
    write_jsonl(tmp_path / "squad" / "validation.jsonl", squad_rows("v")[:3])
    out = tmp_path / "out"
    results = bert_squad_lora.main(["--model", str(model), "--data", str(tmp_path / "squad"),
                                    "--output-dir", str(out), "--device", "cpu", "--max-steps", "2",
                                    "--batch-size", "2", "--max-length", "48", "--doc-stride", "16"])
    saved = check_outputs(out, results)
    assert saved["num_train_questions"] == 4 and saved["num_eval_questions"] == 3
    assert saved["num_train_windows"] >= 4
    for phase in ("before", "after"):
        assert 0.0 <= saved[phase]["eval_exact_match"] <= saved[phase]["eval_f1"] <= 100.0
        assert math.isfinite(saved[phase]["eval_loss"])
    assert saved["after"]["eval_loss"] != saved["before"]["eval_loss"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "QUESTION_ANS" and config["modules_to_save"] == ["qa_outputs"]


@pytest.mark.parametrize("script", [bert_sentiment_lora, bert_squad_lora])
def test_help_documents_every_option(script, capsys):
    parser = script.build_parser()
    undocumented = [a.option_strings for a in parser._actions if not (a.help or "").strip()]
    assert not undocumented
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for option in ("--model", "--data", "--device", "--max-steps", "--max-train-samples",
                   "--max-eval-samples", "--output-dir", "--seed", "--epochs", "--lr", "--batch-size"):
        assert option in shown


def test_hub_defaults_match_the_recipes():
    squad = bert_squad_lora.build_parser().parse_args([])
    assert (squad.model, squad.data, squad.epochs, squad.max_train_samples) == (
        "deepset/bert-base-cased-squad2", "rajpurkar/squad", 2, 1000)
    sentiment = bert_sentiment_lora.build_parser().parse_args([])
    assert sentiment.data == "cornell-movie-review-data/rotten_tomatoes" and sentiment.eval_split == "test"
    assert (sentiment.lora_r, sentiment.lora_alpha) == (32, 4)


def test_offline_run_explains_how_to_use_local_files(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "bert_sentiment_lora.py"), "--output-dir",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "google-bert/bert-base-uncased" in proc.stderr  # names what it could not fetch
    assert "--model DIR" in proc.stderr and "--data PATH" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_local_data_names_the_path(bert_base, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        bert_sentiment_lora.main(["--model", str(bert_base), "--data", str(tmp_path / "no-such-folder"),
                                  "--output-dir", str(tmp_path / "out"), "--device", "cpu"])


# --- examples/common.py -------------------------------------------------------------------------------------

def test_subsample_is_random_ordered_and_reproducible():
    from minilora.data import Records

    rows = Records([{"i": i} for i in range(100)], source="rows.jsonl")
    picked = common.subsample(rows, 10, seed=0)
    assert isinstance(picked, Records) and picked.source == "rows.jsonl" and len(picked) == 10
    indices = [r["i"] for r in picked]
    assert indices == sorted(indices) and indices != list(range(10))  # not just the head of a sorted file
    assert common.subsample(rows, 10, seed=0) == picked and common.subsample(rows, 10, seed=1) != picked
    assert common.subsample(rows, None, seed=0) is rows and common.subsample(rows, 500, seed=0) is rows


def test_write_results_and_peak_memory(tmp_path):
    path = common.write_results(tmp_path, {"loss": float("nan"), "path": tmp_path, "n": torch.tensor(3)})
    assert json.loads(path.read_text()) == {"loss": None, "path": str(tmp_path), "n": 3}
    common.reset_peak_memory("cpu")
    memory = common.peak_memory("cpu")
    assert memory["peak_memory_mb"] > 10 and "RSS" in memory["peak_memory_kind"]


def test_count_options_reject_bad_values(capsys):
    parser = common.common_parser("x", model="m", data="d", output_dir="o", max_train_samples=7)
    assert parser.parse_args([]).max_train_samples == 7
    assert parser.parse_args(["--max-train-samples", "all"]).max_train_samples is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-eval-samples", "0"])
    assert "positive number of rows or 'all'" in capsys.readouterr().err
