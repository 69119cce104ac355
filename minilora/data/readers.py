"""Rows of a data set as a list of dicts, from JSONL, JSON, CSV, Parquet files, folders or hub datasets.

Every reader returns `Records`: a plain list of dict rows that remembers where it came from, so the task
functions can name the file (and row, and column) in their error messages.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class Records(list):
    """A list of dict rows plus `source`, the file or folder they were read from."""

    def __init__(self, rows: Iterable[dict] = (), source: str = "records"):
        super().__init__(rows)
        self.source = source


def source_of(records: Iterable) -> str:
    return getattr(records, "source", "records")


def get_field(row: dict, column: str, records: Iterable, index: int) -> Any:
    """row[column], or a KeyError naming the data source, the row and the columns that do exist."""
    if not isinstance(row, dict):
        raise TypeError(f"{source_of(records)}: row {index} is a {type(row).__name__}, expected a dict")
    if column not in row:
        raise KeyError(f"{source_of(records)}: row {index} has no column {column!r} (columns: {sorted(row)})")
    return row[column]


def get_text(row: dict, column: str, records: Iterable, index: int) -> str:
    """get_field for a text column: a ValueError naming the source when the value is not a string."""
    value = get_field(row, column, records, index)
    if not isinstance(value, str):
        raise ValueError(f"{source_of(records)}: row {index}, column {column!r} is a {type(value).__name__}, "
                         "expected a string")
    return value


def require_rows(records: Iterable, what: str) -> None:
    if len(records) == 0:  # type: ignore[arg-type]
        raise ValueError(f"{what}: {source_of(records)} is empty (no rows)")


def load_records(source: str | os.PathLike | Iterable[dict], split: str | None = None, *,
                 revision: str | None = None) -> Records:
    """Read a data set into `Records`.

    `source` is a file (.jsonl, .json, .csv, .parquet), a folder (the files of `split`: `train.jsonl`,
    `train-00000-of-00003.jsonl`, `data/train-*.parquet`, ...), a hub dataset id such as
    "mlabonne/guanaco-llama2-1k" (downloaded with huggingface_hub, then read like a folder), or rows
    already in memory (a list of dicts). CSV values stay strings. Parquet needs pyarrow
    (`pip install 'minilora[parquet]'`).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = _split_files(path, split)
        else:
            files = _split_files(_hub_snapshot(str(source), revision), split, where=f"hub dataset {str(source)!r}")
        rows = Records((row for f in files for row in read_file(f)),
                       source=str(files[0]) if len(files) == 1 else f"{path} [{split}]")
    else:
        rows = Records(source, source="records")
    require_rows(rows, "load_records")
    return rows


def read_file(path: str | os.PathLike) -> Records:
    """Rows of one .jsonl / .json / .csv / .parquet file."""
    path = Path(path)
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if path.suffix not in readers:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r} (expected one of {DATA_SUFFIXES})")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    rows = readers[path.suffix](path)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i} is a {type(row).__name__}, expected a JSON object")
    return Records(rows, source=str(path))


def _read_text(path: Path) -> str:
    """The file as text: UTF-8 (a leading BOM dropped); a ValueError naming the file and line otherwise."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:  # e.object: the bytes after any BOM, which e.start counts from
        line_no, bad = e.object[:e.start].count(b"\n") + 1, e.object[e.start:e.start + 1]
        raise ValueError(f"{path}:{line_no}: not UTF-8 text (byte {bad!r}); re-save the file as UTF-8") from None


def _read_jsonl(path: Path) -> list:
    rows = []
    for line_no, line in enumerate(_read_text(path).split("\n"), 1):  # not splitlines: JSON may hold U+2028
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON line: {e}") from None
    return rows


def _read_json(path: Path) -> list:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines saved with a .json name
            return _read_jsonl(path)
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        rows = data["data"]
        is_squad = rows and isinstance(rows[0], dict) and "paragraphs" in rows[0]
        return _flatten_squad(rows) if is_squad else rows
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):  # column-wise
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise ValueError(f"{path}: columns have different lengths {sorted(lengths)}")
        return [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
    if isinstance(data, list):
        return data
    raise ValueError(f"{path}: expected a list of objects, {{'data': [...]}} or a dict of columns")


def _flatten_squad(articles: list) -> list:
    """SQuAD's nested JSON (data -> paragraphs -> qas) as flat rows of the HF `squad` schema."""
    rows = []
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = qa.get("answers", [])
                rows.append({"id": qa["id"], "title": article.get("title", ""), "context": paragraph["context"],
                             "question": qa["question"],
                             "answers": {"text": [a["text"] for a in answers],
                                         "answer_start": [a["answer_start"] for a in answers]}})
    return rows


def _read_csv(path: Path) -> list:
    return list(csv.DictReader(io.StringIO(_read_text(path), newline="")))


def _read_parquet(path: Path) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install 'minilora[parquet]'") from None
    return pq.read_table(path).to_pylist()


def _split_files(folder: Path, split: str | None, where: str | None = None) -> list[Path]:
    """The data files of `split` in `folder` (searched recursively), or the only data file when split=None."""
    where = where or str(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise FileNotFoundError(f"{where} has no data files ({', '.join(DATA_SUFFIXES)})")
    listing = [str(p.relative_to(folder)) for p in files][:8]
    if split is None:
        if len(files) > 1:
            raise ValueError(f"{where} has several data files ({listing}): pass split='train' (or another split name)")
        return files
    chosen = [p for p in files if p.stem == split or p.stem.startswith((f"{split}-", f"{split}_", f"{split}."))]
    if not chosen:
        raise FileNotFoundError(f"{where} has no files for split {split!r} (files: {listing})")
    # one format per split, e.g. train.jsonl wins over the original train-*.parquet beside it
    best = min((p.suffix for p in chosen), key=DATA_SUFFIXES.index)
    return [p for p in chosen if p.suffix == best]


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    looks_local = repo_id.startswith(("/", ".", "~")) or repo_id.count("/") != 1 or repo_id.endswith(DATA_SUFFIXES)
    if looks_local:
        raise FileNotFoundError(f"data file or folder {repo_id!r} does not exist")
    from minilora.io.hub import snapshot  # lazy: huggingface_hub is only needed for hub datasets

    return snapshot(repo_id, "dataset", revision, [f"*{s}" for s in DATA_SUFFIXES])
