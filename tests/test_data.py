"""minilora.data: readers, the four task shapes and the collator.

Token-level results are checked by hand on in-test word-level tokenizers, and against transformers'
tokenizers (and the HF run_qa example's feature algorithm) on the real checkpoints' tokenizers and real data.
"""
import csv
import json
import sys

import numpy as np
import pytest
import torch
from conftest import real_model_dir, shared_data_dir
from train_helpers import tiny_tokenizer

from minilora.data import (Collator, causal_lm_dataset, classification_dataset, load_records,
                           postprocess_qa_predictions, qa_dataset, read_file, seq2seq_dataset)
from minilora.metrics import squad_metrics

ROWS = [{"text": "the cat sat", "label": 1}, {"text": "a dog ran fast", "label": 0}]


def _write(path, rows, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "json-columns":
        path.write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    elif kind == "csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


# --- readers --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, suffix", [("jsonl", "jsonl"), ("json", "json"), ("json-columns", "json")])
def test_read_json_formats(tmp_path, kind, suffix):
    rows = load_records(_write(tmp_path / f"d.{suffix}", ROWS, kind))
    assert rows == ROWS
    assert rows.source.endswith(f"d.{suffix}")


def test_read_csv_keeps_strings_and_classification_converts_digit_labels(tmp_path):
    rows = load_records(_write(tmp_path / "d.csv", ROWS, "csv"))
    assert rows == [{"text": "the cat sat", "label": "1"}, {"text": "a dog ran fast", "label": "0"}]
    features = classification_dataset(rows, tiny_tokenizer(), num_labels=2)
    assert [f["labels"] for f in features] == [1, 0]


def test_read_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    assert load_records(tmp_path / "d.parquet") == ROWS


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"d\.parquet needs pyarrow: pip install 'minilora\[parquet\]'"):
        load_records(tmp_path / "d.parquet")


def test_folder_split_reads_shards_in_order(tmp_path):
    _write(tmp_path / "train-00000-of-00002.jsonl", ROWS[:1], "jsonl")
    _write(tmp_path / "train-00001-of-00002.jsonl", ROWS[1:], "jsonl")
    _write(tmp_path / "test.jsonl", [{"text": "x", "label": 0}], "jsonl")
    assert load_records(tmp_path, split="train") == ROWS
    assert len(load_records(tmp_path, split="test")) == 1
    with pytest.raises(FileNotFoundError, match="no files for split 'validation'"):
        load_records(tmp_path, split="validation")
    with pytest.raises(ValueError, match="several data files"):
        load_records(tmp_path)


@pytest.mark.parametrize("content, error, message", [
    ("", ValueError, "is empty"),
    ('{"a": 1}\n{oops\n', ValueError, r"d\.jsonl:2: invalid JSON line"),
    ("[1, 2]", ValueError, "row 0 is a list, expected a JSON object"),
])
def test_bad_files_name_the_file(tmp_path, content, error, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(error, match=message) as info:
        load_records(path)
    assert "d.jsonl" in str(info.value)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("hi")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        read_file(tmp_path / "d.txt")


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("offline and not in cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConnectionError, match="could not reach the Hugging Face hub.*dataset repo 'someone/data'"):
        load_records("someone/data", split="train")


def test_hub_dataset_is_read_like_a_folder(tmp_path, monkeypatch):
    import huggingface_hub
    (tmp_path / "data").mkdir()
    _write(tmp_path / "data" / "train-00000-of-00001.jsonl", ROWS, "jsonl")
    calls = []

    def fake_snapshot(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert load_records("someone/data", split="train", revision="v1") == ROWS
    assert calls[0][0] == "someone/data"
    assert calls[0][1]["repo_type"] == "dataset" and calls[0][1]["revision"] == "v1"


def test_real_shared_data_layouts():
    data = shared_data_dir()
    assert len(load_records(data / "medical_qa", split="train")) == 4500  # 3 shards
    guanaco = load_records(data / "guanaco_llama2_1k", split="train")  # jsonl preferred over the parquet
    assert len(guanaco) == 1000 and guanaco.source.endswith("train.jsonl")
    squad = load_records(data / "squad" / "xquad.en.json")  # nested SQuAD JSON, flattened
    validation = {r["id"]: r for r in load_records(data / "squad" / "validation.jsonl")}
    assert len(squad) == 1190
    for row in squad[:50]:
        assert row["context"] == validation[row["id"]]["context"]
        assert row["answers"]["text"][0] in validation[row["id"]]["answers"]["text"]


# --- causal LM ------------------------------------------------------------------------------------------------

def test_causal_lm_text_column():
    tok = tiny_tokenizer("gpt")
    f = causal_lm_dataset([{"text": "the cat sat"}, {"text": "a dog </s>"}], tok, max_length=16)
    cat, sat, dog, a = (tok.convert_tokens_to_ids(w) for w in ("cat", "sat", "dog", "a"))
    the = tok.convert_tokens_to_ids("the")
    assert f[0] == {"input_ids": [2, the, cat, sat, 3], "attention_mask": [1] * 5, "labels": [2, the, cat, sat, 3]}
    assert f[1]["input_ids"] == [2, a, dog, 3]  # EOS already there: not doubled
    assert causal_lm_dataset([{"text": "the cat sat"}], tok, add_eos=False)[0]["input_ids"] == [2, the, cat, sat]
    assert causal_lm_dataset([{"text": "the cat sat"}], tok, max_length=3)[0]["labels"] == [2, the, cat]


def test_causal_lm_prompt_tokens_are_masked():
    tok = tiny_tokenizer("gpt")
    rows = [{"q": "who sat", "a": "the cat"}, {"q": "the cat sat on the mat", "a": "dog"}]
    f = causal_lm_dataset(rows, tok, prompt_column="q", response_column="a", max_length=6)
    ids = tok(["who sat", "the cat"], add_special_tokens=False)["input_ids"]
    assert f[0]["input_ids"] == [2, *ids[0], *ids[1], 3]
    assert f[0]["labels"] == [-100, -100, -100, *ids[1], 3]
    # the second prompt fills max_length=6 ([<s>] + 6 words > 6): no response token left, so it is dropped
    assert len(f) == 1 and f.num_dropped == 1
    with pytest.raises(ValueError, match="both prompt_column and response_column"):
        causal_lm_dataset(rows, tok, prompt_column="q")


def test_causal_lm_packing_places_whole_documents_in_rows():
    tok = tiny_tokenizer("gpt")
    rows = [{"text": "the cat sat on the mat"}, {"text": "a dog ran"}, {"text": "it was red"}]
    docs = [tok(r["text"])["input_ids"] + [3] for r in rows]  # 8, 5 and 5 tokens
    f = causal_lm_dataset(rows, tok, max_length=10, packing=True)
    assert [x["input_ids"] for x in f] == [docs[0], docs[1] + docs[2]]  # first-fit, longest first
    assert f[1]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4] and f[1]["attention_mask"] == [1] * 10
    assert f[1]["labels"] == [-100, *docs[1][1:], -100, *docs[2][1:]]  # never predicted across documents
    cut = causal_lm_dataset(rows, tok, max_length=6, packing=True)  # the 8-token document is cut to 6
    assert sorted(x["input_ids"] for x in cut) == sorted([docs[0][:6], docs[1], docs[2]])


def test_causal_lm_errors_name_file_row_and_column(tmp_path):
    path = _write(tmp_path / "chat.jsonl", [{"text": "the cat"}, {"txt": "a dog"}], "jsonl")
    with pytest.raises(KeyError, match=r"chat\.jsonl: row 1 has no column 'text'"):
        causal_lm_dataset(load_records(path), tiny_tokenizer("gpt"))
    path = _write(tmp_path / "nums.jsonl", [{"text": 5}], "jsonl")
    with pytest.raises(ValueError, match=r"nums\.jsonl: row 0, column 'text' is a int"):
        causal_lm_dataset(load_records(path), tiny_tokenizer("gpt"))
    with pytest.raises(ValueError, match="empty"):
        causal_lm_dataset([], tiny_tokenizer("gpt"))


def test_causal_lm_real_tokenizer_matches_transformers():
    from transformers import AutoTokenizer

    import minilora as ml
    folder = real_model_dir("SmolLM2-135M-Instruct")
    rows = load_records(shared_data_dir() / "medical_qa" / "test.jsonl")[:20]
    ours, hf = ml.load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    f = causal_lm_dataset(rows, ours, prompt_column="question", response_column="answer", max_length=4096)
    for row, x in zip(rows, f, strict=True):
        prompt = hf(row["question"])["input_ids"]
        response = hf(row["answer"], add_special_tokens=False)["input_ids"] + [hf.eos_token_id]
        assert x["input_ids"] == prompt + response
        assert x["labels"] == [-100] * len(prompt) + response


# --- seq2seq --------------------------------------------------------------------------------------------------

def test_seq2seq_truncates_keeping_eos_or_drops_long_sources():
    tok = tiny_tokenizer("t5")
    rows = [{"source": "the cat sat", "target": "a dog ran fast"}, {"source": "the cat sat on the mat", "target": "it"}]
    f = seq2seq_dataset(rows, tok, max_source_length=4, max_target_length=3)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert f[0] == {"input_ids": ids("the cat sat") + [3], "attention_mask": [1] * 4, "labels": ids("a dog") + [3]}
    assert f[1]["input_ids"] == ids("the cat sat") + [3]  # cut to 4 tokens, </s> kept
    dropped = seq2seq_dataset(rows, tok, max_source_length=4, drop_long=True)
    assert len(dropped) == 1 and dropped.num_dropped == 1 and dropped[0]["input_ids"] == f[0]["input_ids"]
    with pytest.raises(ValueError, match="every source .* longer than max_source_length=2"):
        seq2seq_dataset(rows, tok, max_source_length=2, drop_long=True)


def test_seq2seq_real_t5_tokenizer_matches_transformers():
    from transformers import AutoTokenizer

    import minilora as ml
    folder = real_model_dir("t5-random-flan-small-shape")
    rows = load_records(shared_data_dir() / "openorca" / "train.jsonl")[:30]
    ours, hf = ml.load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    f = seq2seq_dataset(rows, ours, source_column="question", target_column="response",
                        max_source_length=64, max_target_length=32)
    for row, x in zip(rows, f, strict=True):
        assert x["input_ids"] == hf(row["question"], truncation=True, max_length=64)["input_ids"]
        assert x["labels"] == hf(row["response"], truncation=True, max_length=32)["input_ids"]
    kept = seq2seq_dataset(rows, ours, source_column="question", target_column="response",
                           max_source_length=64, drop_long=True)
    n_long = sum(len(hf(r["question"])["input_ids"]) > 64 for r in rows)
    assert n_long > 0 and kept.num_dropped == n_long and len(kept) == len(rows) - n_long


# --- classification -------------------------------------------------------------------------------------------

def test_classification_pairs_names_and_regression():
    tok = tiny_tokenizer("bert")
    rows = [{"a": "the cat", "b": "a dog", "y": "pos"}, {"a": "it ran", "b": "fast", "y": "neg"}]
    f = classification_dataset(rows, tok, text_column="a", text_pair_column="b", label_column="y",
                               label_names=["neg", "pos"])
    assert [x["labels"] for x in f] == [1, 0]
    assert f[0]["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    assert f[0]["input_ids"][0] == 2 and f[0]["input_ids"][3] == 3
    reg = classification_dataset([{"text": "the cat", "label": "0.5"}], tok, num_labels=1)
    assert reg[0]["labels"] == 0.5


@pytest.mark.parametrize("label, message", [(3, r"label 3 is out of range \[0, 3\)"), (-1, "out of range"),
                                            (True, "not a class id"), ("maybe", "not a class id")])
def test_classification_bad_labels_name_file_row_and_column(tmp_path, label, message):
    path = _write(tmp_path / "cls.jsonl", [{"text": "the cat", "label": 0}, {"text": "a dog", "label": label}], "jsonl")
    with pytest.raises(ValueError, match=message) as info:
        classification_dataset(load_records(path), tiny_tokenizer(), num_labels=3)
    assert "cls.jsonl: row 1, column 'label'" in str(info.value)


def test_classification_real_tokenizer_matches_transformers():
    from transformers import AutoTokenizer

    import minilora as ml
    folder = real_model_dir("all-MiniLM-L6-v2")
    rows = load_records(shared_data_dir() / "rotten_tomatoes" / "validation.jsonl")[::50]
    ours, hf = ml.load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    f = classification_dataset(rows, ours, num_labels=2, max_length=32)
    expected = hf([r["text"] for r in rows], truncation=True, max_length=32)
    assert [x["input_ids"] for x in f] == expected["input_ids"]
    assert [x["token_type_ids"] for x in f] == expected["token_type_ids"]
    assert [x["labels"] for x in f] == [r["label"] for r in rows]


# --- extractive QA --------------------------------------------------------------------------------------------

def _hf_run_qa_positions(tok, rows, max_length, stride):
    """The HF run_qa example's prepare_train_features (the reference algorithm), on a transformers tokenizer."""
    enc = tok([r["question"].lstrip() for r in rows], [r["context"] for r in rows], truncation="only_second",
              max_length=max_length, stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True)
    out = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        ids, seq = enc["input_ids"][i], enc.sequence_ids(i)
        cls = ids.index(tok.cls_token_id)
        answers = rows[enc["overflow_to_sample_mapping"][i]]["answers"]
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        ts = seq.index(1)
        te = len(ids) - 1 - seq[::-1].index(1)
        if not (offsets[ts][0] <= start_char and offsets[te][1] >= end_char):
            out.append((cls, cls))
            continue
        while ts < len(offsets) and offsets[ts][0] <= start_char:
            ts += 1
        while offsets[te][1] >= end_char:
            te -= 1
        out.append((ts - 1, te + 1))
    return enc["input_ids"], out


def test_qa_features_match_the_hf_example_on_real_squad():
    from transformers import AutoTokenizer

    import minilora as ml
    folder = real_model_dir("all-MiniLM-L6-v2")
    rows = load_records(shared_data_dir() / "squad" / "train.jsonl")[:150]
    f = qa_dataset(rows, ml.load_tokenizer(folder), max_length=128, doc_stride=32)
    ids, positions = _hf_run_qa_positions(AutoTokenizer.from_pretrained(folder), rows, 128, 32)
    assert len(f) == len(ids) > len(rows)  # long contexts were split into windows
    assert [x["input_ids"] for x in f] == ids
    assert [(x["start_positions"], x["end_positions"]) for x in f] == positions
    assert sum(p != (0, 0) for p in positions) >= len(rows)  # every answer is inside some window

    # one-hot logits at the target positions decode back to the gold answers (up to whole tokens:
    # "enrich" inside the token "enriched" comes back as "enriched")
    starts = [np.eye(len(x["input_ids"]))[x["start_positions"]] for x in f]
    ends = [np.eye(len(x["input_ids"]))[x["end_positions"]] for x in f]
    predictions = postprocess_qa_predictions(rows, f, starts, ends)
    assert all(r["answers"]["text"][0] in predictions[r["id"]] for r in rows)
    scores = squad_metrics(predictions, {r["id"]: r["answers"]["text"] for r in rows})
    assert scores["exact_match"] > 99.0


def test_qa_windows_and_unanswerable_rows_point_at_cls():
    tok = tiny_tokenizer("bert")
    context = "the cat sat on the mat and the dog ran fast to the river"
    rows = [{"id": "q1", "question": " where is the dog", "context": context,
             "answers": {"text": ["the river"], "answer_start": [context.index("the river")]}},
            {"id": "q2", "question": "who", "context": "it was red", "answers": {"text": [], "answer_start": []}}]
    f = qa_dataset(rows, tok, max_length=12, doc_stride=2)
    windows = [x for x in f if x["example_id"] == "q1"]
    assert len(windows) > 1 and f[-1]["example_id"] == "q2"
    assert (f[-1]["start_positions"], f[-1]["end_positions"]) == (0, 0)
    found = [x for x in windows if x["start_positions"] != 0]
    assert found and all((x["start_positions"], x["end_positions"]) == (0, 0) for x in windows if x not in found)
    for x in found:
        start, end = x["offset_mapping"][x["start_positions"]][0], x["offset_mapping"][x["end_positions"]][1]
        assert context[start:end] == "the river"
    assert all(o is None for o, t in zip(windows[0]["offset_mapping"], windows[0]["token_type_ids"], strict=True)
               if t == 0)  # question and special tokens carry no offsets
    with pytest.raises(ValueError, match="doc_stride must be in"):
        qa_dataset(rows, tok, max_length=12, doc_stride=12)


def test_postprocess_qa_hand_computed():
    examples = [{"id": "a", "context": "alpha beta gamma delta"}, {"id": "b", "context": "x y"}]
    offsets = [None, (0, 5), (6, 10), (11, 16), (17, 22), None]  # [CLS] alpha beta gamma delta [SEP]
    features = [{"example_id": "a", "offset_mapping": offsets}, {"example_id": "a", "offset_mapping": offsets},
                {"example_id": "b", "offset_mapping": [None, None]}]
    # feature 0: best valid pair (2, 3) = 3 + 2 = 5; the CLS token (index 0) scores highest but has no offsets
    s0 = [9, 1, 3, 0, 0, 0]
    e0 = [9, 0, 0, 2, 0, 0]
    # feature 1: (4, 2) = 9 is reversed, so the best is (1, 2) = 0.5 + 5 = 5.5, beating feature 0
    s1 = [0, 0.5, -1, 0, 4, 0]
    e1 = [0, 0, 5, 0, 1, 0]
    got = postprocess_qa_predictions(examples, features, [s0, s1, [1, 1]], [e0, e1, [1, 1]])
    assert got == {"a": "alpha beta", "b": ""}
    # max_answer_length=1 rules out both two-token spans: the best one-token span is (4, 4) = 4 + 1
    got = postprocess_qa_predictions(examples, features, [s0, s1, [1, 1]], [e0, e1, [1, 1]], max_answer_length=1)
    assert got["a"] == "delta"
    with pytest.raises(ValueError, match="3 features but 2 start"):
        postprocess_qa_predictions(examples, features, [s0, s1], [e0, e1, [1, 1]])


# --- collator -------------------------------------------------------------------------------------------------

def test_collator_pads_each_key_with_its_own_value():
    features = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7], "example_id": "x",
                 "offset_mapping": [None, (0, 1), None]},
                {"input_ids": [8], "attention_mask": [1], "labels": [-100], "example_id": "y",
                 "offset_mapping": [None]}]
    batch = Collator(pad_token_id=9)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # post-processing keys stay out
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [-100, -100, -100]]
    left = Collator(pad_token_id=9, padding_side="left", pad_to_multiple_of=4)(features)
    assert left["input_ids"].tolist() == [[9, 5, 6, 7], [9, 9, 9, 8]]
    scalars = Collator()([{"input_ids": [1], "labels": 2, "start_positions": 0}, {"input_ids": [1, 2], "labels": 0,
                                                                                 "start_positions": 1}])
    assert scalars["labels"].tolist() == [2, 0] and scalars["start_positions"].dtype == torch.long
    with pytest.raises(ValueError, match="padding_side"):
        Collator(padding_side="middle")
