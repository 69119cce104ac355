"""Safetensors files read with plain file I/O or mapped copy-on-write, and written atomically; `Checkpoint`,
the weight files of a model folder (one file or shards listed in an index).

Tensors that are converted or quantized on the way are read a few rows at a time into fresh buffers, so no
mapped file pages sit in RSS beside the result; tensors used exactly as stored can be mapped instead (no
copy: the page cache is the tensor), the way safetensors and transformers load.

The format: 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the raw data.
"""
from __future__ import annotations

import collections
import json
import math
import mmap
import os
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from minilora.io.atomic import atomic_write
from minilora.io.hub import PICKLED_WEIGHT_PATTERNS, pickled_weights_message

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000

if sys.byteorder != "little":  # safetensors data is little-endian and read without byte swapping
    raise ImportError("minilora.io.load needs a little-endian machine")


class CheckpointError(ValueError):
    """A checkpoint file is truncated or corrupt, or does not match the model it is loaded into."""


class SafetensorsFile:
    """One .safetensors file: header parsed and validated on open, tensors read on demand with `read`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "rb", buffering=0)  # closed by close() or __exit__
        self._map: mmap.mmap | None = None
        try:
            self._parse_header(os.fstat(self._file.fileno()).st_size)
        except BaseException:
            self._file.close()
            raise

    def _parse_header(self, file_size: int) -> None:
        def corrupt(why: str) -> CheckpointError:
            return CheckpointError(f"{self.path} is truncated or corrupt: {why}")

        if file_size < 8:
            raise corrupt(f"the file has {file_size} bytes, fewer than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", self._file.read(8))
        if header_len > min(file_size - 8, MAX_HEADER_BYTES):
            raise corrupt(f"the header claims {header_len} bytes but the file has {file_size} bytes")
        try:
            header = json.loads(self._file.read(header_len))  # the file holds them: checked above
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise corrupt(f"the JSON header does not parse ({e})") from e
        if not isinstance(header, dict):
            raise corrupt("the JSON header is not an object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        data_len = file_size - self.data_start
        for key, info in header.items():
            try:
                dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
                if not all(isinstance(v, int) and v >= 0 for v in [*shape, begin, end]):
                    raise TypeError
            except (KeyError, TypeError, ValueError) as e:
                raise corrupt(f"bad header entry for tensor {key!r}: {info!r}") from e
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise corrupt(f"tensor {key!r} ({info['dtype']} {shape}) needs {math.prod(shape) * dtype.itemsize} "
                              f"bytes, but its data offsets are {[begin, end]}")
            if end > data_len:
                raise corrupt(f"tensor {key!r} ends at data byte {end} but the file only holds {data_len} "
                              "data bytes (an interrupted download or copy?)")
        _check_tiling(header, data_len, corrupt)
        self.entries: dict[str, dict] = header

    def keys(self) -> list[str]:
        return list(self.entries)

    def _entry(self, key: str) -> dict:
        if key not in self.entries:
            raise KeyError(f"{self.path} has no tensor {key!r}")
        return self.entries[key]

    def shape(self, key: str) -> torch.Size:
        return torch.Size(self._entry(key)["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self._entry(key)["dtype"]]

    def read(self, key: str, start: int | None = None, stop: int | None = None,
             pin_memory: bool = False) -> torch.Tensor:
        """The tensor `key` (or its rows [start, stop) along dim 0) as a new CPU tensor in its stored dtype,
        read with `readinto` (into page-locked memory with `pin_memory`, for asynchronous copies to a GPU)."""
        shape = self.shape(key)
        begin, end = self.entries[key]["data_offsets"]
        if start is not None or stop is not None:
            if not shape:
                raise ValueError(f"{self.path}: tensor {key!r} is a scalar; it has no rows to read")
            start, stop, _ = slice(start, stop).indices(shape[0])
            stop = max(start, stop)
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            begin, end = begin + start * row_bytes, begin + stop * row_bytes
            shape = torch.Size((stop - start, *shape[1:]))
        tensor = torch.empty(shape, dtype=self.dtype(key), pin_memory=pin_memory)
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        self._file.seek(self.data_start + begin)
        done = 0
        while done < end - begin:  # raw reads may return short counts
            n = self._file.readinto(buffer[done:])
            if not n:
                raise CheckpointError(f"{self.path} is truncated: tensor {key!r} stops after {done} of "
                                      f"{end - begin} bytes")
            done += n
        return tensor

    def mapped(self, key: str) -> torch.Tensor:
        """The tensor `key` as a copy-on-write view of the file (MAP_PRIVATE): no bytes are read until used,
        writes to it never reach the file, and it stays valid after `close()`. Falls back to `read` where the
        data is not aligned for its dtype."""
        dtype, (begin, end) = self.dtype(key), self.entries[key]["data_offsets"]
        if end == begin or (self.data_start + begin) % dtype.itemsize:
            return self.read(key)
        if self._map is None:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        data = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=self.data_start + begin)
        return data.view(dtype).reshape(self.shape(key))

    def lazy(self, key: str) -> LazyTensor:
        """`key` unread: its shape and dtype now, row ranges on demand."""
        return LazyTensor(self, key)

    def close(self) -> None:
        self._file.close()
        self._map = None  # mapped tensors keep the mapping alive; it is unmapped with the last of them

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_tiling(header: dict[str, dict], data_len: int, corrupt) -> None:
    """The tensors' byte ranges must tile the data exactly, as safetensors requires: overlapping ranges would
    alias one tensor's bytes into another, and gaps or trailing bytes mean the header does not describe the
    file."""
    position, previous = 0, None
    for key, info in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, end = info["data_offsets"]
        if begin != position:
            what = "overlaps" if begin < position else f"leaves a gap of {begin - position} bytes after"
            raise corrupt(f"tensor {key!r} (data_offsets {[begin, end]}) {what} "
                          f"{'the start of the data' if previous is None else repr(previous)}")
        position, previous = end, key
    if position != data_len:
        raise corrupt(f"the tensors cover {position} data bytes but the file holds {data_len}")


class LazyTensor:
    """A tensor of an open SafetensorsFile, not read yet: `.shape`, `.dtype`, and `t[a:b]` reads rows a to b
    (into page-locked memory when `pin_memory` is set: rows bound for a GPU then copy asynchronously)."""

    def __init__(self, file: SafetensorsFile, key: str, pin_memory: bool = False):
        self.file, self.key, self.pin_memory = file, key, pin_memory
        self.shape, self.dtype = file.shape(key), file.dtype(key)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"LazyTensor reads contiguous row ranges t[a:b], got {rows!r}")
        return self.file.read(self.key, rows.start, rows.stop, self.pin_memory)

    def mapped(self) -> torch.Tensor:
        return self.file.mapped(self.key)


class Checkpoint:
    """The weights of a model folder: `model.safetensors`, or shards listed in `model.safetensors.index.json`."""

    def __init__(self, model_dir: Path):
        self.folder = model_dir
        single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
        self.files: list[SafetensorsFile] = []
        self.where: dict[str, SafetensorsFile] = {}
        try:
            if single.is_file():
                self.files = [SafetensorsFile(single)]
                self.where = dict.fromkeys(self.files[0].keys(), self.files[0])
            elif index.is_file():
                self._open_shards(index)
            elif any(any(model_dir.glob(p)) for p in PICKLED_WEIGHT_PATTERNS):
                raise ValueError(pickled_weights_message(str(model_dir)))
            else:
                raise FileNotFoundError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json")
        except BaseException:
            self.close()
            raise

    def _open_shards(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid index: expected JSON with a 'weight_map' object") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names, got "
                                  f"{str(weight_map)[:200]}")
        names = sorted(set(weight_map.values()))
        outside = [n for n in names if Path(n).is_absolute() or ".." in Path(n).parts or not n.strip()]
        if outside:
            raise CheckpointError(f"{index}: 'weight_map' names shard files outside {index.parent}: "
                                  f"{', '.join(map(repr, outside))} (expected file names inside the model folder)")
        missing = [n for n in names if not (index.parent / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard file(s) missing from {index.parent}: {', '.join(missing)}")
        for name in names:
            self.files.append(SafetensorsFile(index.parent / name))  # appended one by one: closed on an error
        by_name = dict(zip(names, self.files, strict=True))
        for key, name in weight_map.items():
            if key not in by_name[name].entries:
                raise CheckpointError(f"{index} maps tensor {key!r} to {name}, which does not contain it")
            self.where[key] = by_name[name]

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, key: str) -> torch.Size:
        return self.where[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.where[key].dtype(key)

    def read(self, key: str) -> torch.Tensor:
        return self.where[key].read(key)

    def lazy(self, key: str) -> LazyTensor:
        return self.where[key].lazy(key)

    def majority_float_dtype(self) -> torch.dtype | None:
        return majority_float_dtype((self.dtype(key), self.shape(key).numel()) for key in self.where)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def majority_float_dtype(sizes: Iterable[tuple[torch.dtype, int]]) -> torch.dtype | None:
    """The floating-point dtype holding the most elements among (dtype, element count) pairs; None if none."""
    counts: collections.Counter[torch.dtype] = collections.Counter()
    for dtype, n in sizes:
        if dtype.is_floating_point:
            counts[dtype] += n
    return max(counts, key=counts.get) if counts else None


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file (small files: adapters), moved to `device`."""
    with SafetensorsFile(path) as f:
        return {key: f.read(key).to(device) for key in f.keys()}


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to `path` atomically (temp file in the same folder, then rename), one at a time."""
    header: dict[str, dict] = {}
    offset = 0
    for key, t in tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {key!r} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
