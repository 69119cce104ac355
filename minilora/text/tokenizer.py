"""Tokenizer: a `tokenizers.Tokenizer` (tokenizer.json) plus Hugging Face's special-token config.

`load_tokenizer(folder_or_hub_id)` reads tokenizer.json, tokenizer_config.json, special_tokens_map.json
and chat_template.jinja, and returns a `Tokenizer` whose call, encode, decode and apply_chat_template
follow transformers' API and give the same ids. The Rust `tokenizers` library does the real work; this
module only sets truncation/padding per call, knows the special tokens and renders chat templates.
One deliberate difference with transformers: text that already starts with the BOS string (Llama-2 chat
data, "<s>[INST] ...") does not get a second BOS.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minilora.checks import check_number
from minilora.io.json_file import read_json_object
from minilora.text.chat_template import render_builtin_chat, render_chat  # noqa: F401  (re-exported)
from minilora.text.special_tokens import (apply_bos_eos_flags, post_processor_without_leading,
                                          register_special_tokens, returns_token_type_ids)

if TYPE_CHECKING:
    import tokenizers
    import torch

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
NO_MAX_LENGTH = int(1e30)  # transformers' model_max_length when the config gives none
_UNLIMITED = int(1e20)  # a model_max_length above this means "no limit" (transformers' LARGE_INTEGER)
_TRUNCATION = {False: None, "do_not_truncate": None, True: "longest_first", "longest_first": "longest_first",
               "only_first": "only_first", "only_second": "only_second"}
_PADDING = {False: None, "do_not_pad": None, True: "longest", "longest": "longest", "max_length": "max_length"}


def load_tokenizer(path_or_hub_id: str | os.PathLike, revision: str | None = None) -> Tokenizer:
    """Load the tokenizer of a local folder or a hub repo id (only the tokenizer files are downloaded)."""
    from minilora.io.hub import as_local_dir, snapshot

    folder = as_local_dir(path_or_hub_id)
    if folder is None:
        folder = snapshot(str(path_or_hub_id), "model", revision, TOKENIZER_FILES)
    return Tokenizer.from_folder(folder)


class BatchEncoding(dict):
    """The dict a `Tokenizer` call returns, plus per-row access to the underlying encodings."""

    def __init__(self, data: dict[str, Any], encodings: list[tokenizers.Encoding]):
        super().__init__(data)
        self.encodings = encodings

    def sequence_ids(self, batch_index: int = 0) -> list[int | None]:
        """Per token: 0 for the first text, 1 for the pair text, None for special and padding tokens."""
        return self.encodings[batch_index].sequence_ids

    def tokens(self, batch_index: int = 0) -> list[str]:
        return self.encodings[batch_index].tokens

    def to(self, device: str | torch.device) -> BatchEncoding:
        """Move every tensor to `device` (in place; returns self)."""
        self.update({key: value.to(device) for key, value in self.items() if hasattr(value, "to")})
        return self


class Tokenizer:
    """A tokenizer with transformers' calling conventions; build it with `load_tokenizer`."""

    def __init__(self, backend: tokenizers.Tokenizer, config: dict[str, Any] | None = None,
                 chat_template: str | None = None, name: str = ""):
        config = dict(config or {})
        self._tk = backend
        # tokenizer.json may carry default truncation/padding; like transformers we set both on every call.
        self._tk.no_truncation()
        self._tk.no_padding()
        self._tk.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self.name = name
        self.model_max_length = int(config.get("model_max_length") or NO_MAX_LENGTH)
        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.chat_template = chat_template or _default_template(config.get("chat_template"))
        self._special = {key: _token_content(config.get(key)) for key in SPECIAL_TOKEN_NAMES}
        register_special_tokens(self._tk, config, list(self._special.values()))
        apply_bos_eos_flags(self._tk, config, (self.bos_token, self.bos_token_id), (self.eos_token, self.eos_token_id))
        self.returns_token_type_ids = returns_token_type_ids(self._tk, config)
        self._no_bos_processor = post_processor_without_leading(self._tk, self.bos_token_id)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> Tokenizer:
        """Read tokenizer.json and the optional tokenizer_config.json, special_tokens_map.json and
        chat_template.jinja of `folder`."""
        import tokenizers

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(_missing_tokenizer_json_message(folder))
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust parser raises a bare Exception
            raise ValueError(f"{path} is not a valid `tokenizers` file: {e}") from e
        config, special_map = (read_json_object(folder / name) if (folder / name).is_file() else {}
                               for name in ("tokenizer_config.json", "special_tokens_map.json"))
        config.update({k: v for k, v in special_map.items() if v is not None})
        template_file = folder / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
        return cls(backend, config, chat_template=template, name=str(folder))

    # ---- special tokens -------------------------------------------------------------------------------------
    bos_token = property(lambda self: self._special["bos_token"])
    eos_token = property(lambda self: self._special["eos_token"])
    unk_token = property(lambda self: self._special["unk_token"])
    sep_token = property(lambda self: self._special["sep_token"])
    cls_token = property(lambda self: self._special["cls_token"])
    mask_token = property(lambda self: self._special["mask_token"])
    bos_token_id = property(lambda self: self._id_of(self.bos_token))
    eos_token_id = property(lambda self: self._id_of(self.eos_token))
    unk_token_id = property(lambda self: self._id_of(self.unk_token))
    sep_token_id = property(lambda self: self._id_of(self.sep_token))
    cls_token_id = property(lambda self: self._id_of(self.cls_token))
    mask_token_id = property(lambda self: self._id_of(self.mask_token))

    @property
    def pad_token(self) -> str | None:
        return self._special["pad_token"]

    @pad_token.setter
    def pad_token(self, token: str | None) -> None:
        if token is not None and self._tk.token_to_id(token) is None:
            raise ValueError(f"pad_token {token!r} is not in the vocabulary of {self.name or 'this tokenizer'}; "
                             f"use an existing token, e.g. `tok.pad_token = tok.eos_token` ({self.eos_token!r})")
        self._special["pad_token"] = token

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of(self.pad_token)

    @pad_token_id.setter
    def pad_token_id(self, token_id: int | None) -> None:
        token = None if token_id is None else self._tk.id_to_token(int(token_id))
        if token_id is not None and token is None:
            raise ValueError(f"pad_token_id {token_id} is outside the vocabulary (size {len(self)})")
        self.pad_token = token

    @property
    def padding_side(self) -> str:
        return self._padding_side

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        if side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {side!r}")
        self._padding_side = side

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {key: value for key, value in self._special.items() if value is not None}

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of every token flagged special (the ones `skip_special_tokens` drops)."""
        return sorted(i for i, t in self._tk.get_added_tokens_decoder().items() if t.special)

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens (as transformers' `vocab_size`)."""
        return self._tk.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tk.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        return self._id_of(tokens) if isinstance(tokens, str) else [self._id_of(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | None | list[str | None]:
        return self._tk.id_to_token(ids) if isinstance(ids, int) else [self._tk.id_to_token(int(i)) for i in ids]

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab={len(self)}, special={self.special_tokens_map})"

    # ---- encoding ---------------------------------------------------------------------------------------------
    def __call__(self, text: str | list[str], text_pair: str | list[str] | None = None, *,
                 add_special_tokens: bool = True, max_length: int | None = None,
                 truncation: bool | str | None = None, padding: bool | str = False, stride: int = 0,
                 pad_to_multiple_of: int | None = None, return_overflowing_tokens: bool = False,
                 return_offsets_mapping: bool = False, return_token_type_ids: bool | None = None,
                 return_tensors: str | None = None) -> BatchEncoding:
        """Encode one text (flat lists) or a batch (lists of lists), optionally with pair texts.

        truncation: False | True (= "longest_first") | "longest_first" | "only_first" | "only_second";
        None (default) truncates only when max_length is given without padding, as in transformers.
        padding: False | True (= "longest") | "max_length" (max_length, else model_max_length).
        return_overflowing_tokens with stride: truncated-away tokens become extra rows, each overlapping
        the previous one by `stride` tokens; "overflow_to_sample_mapping" gives each row's input index.
        return_tensors: None for python lists, "pt" for torch tensors (always batched).
        """
        check_number(max_length, "max_length", low=1, integer=True, or_none=True)
        check_number(stride, "stride", low=0, integer=True)
        batched = not isinstance(text, str)
        texts, pairs = _check_texts(text, text_pair, batched)
        if truncation is None:
            truncation = max_length is not None and padding is False
        strategy, pad_mode = _option(truncation, _TRUNCATION, "truncation"), _option(padding, _PADDING, "padding")
        if strategy is not None and max_length is None:
            limited = self.model_max_length <= _UNLIMITED
            strategy, max_length = (strategy, self.model_max_length) if limited else (None, None)
        if pad_mode is not None and self.pad_token_id is None:
            raise ValueError(f"{self.name or 'this tokenizer'} has no pad token, so it cannot pad; set one first, "
                             f"e.g. `tok.pad_token = tok.eos_token` ({self.eos_token!r})")
        if strategy is not None:  # the backend is reset to no truncation after every call
            self._tk.enable_truncation(max_length, stride=stride, strategy=strategy, direction=self.truncation_side)
        try:
            encodings = self._encode_batch(texts, pairs, add_special_tokens)
        except Exception as e:  # tokenizers' truncation errors are bare Exceptions
            raise ValueError(f"could not encode with truncation={truncation!r}, max_length={max_length}, "
                             f"stride={stride}: {e}") from e
        finally:
            self._tk.no_truncation()
        self._pad(encodings, pad_mode, max_length, pad_to_multiple_of)

        groups = [[e, *e.overflowing] if return_overflowing_tokens else [e] for e in encodings]
        rows = [row for group in groups for row in group]
        data: dict[str, Any] = {"input_ids": [r.ids for r in rows], "attention_mask": [r.attention_mask for r in rows]}
        if self.returns_token_type_ids if return_token_type_ids is None else return_token_type_ids:
            data["token_type_ids"] = [r.type_ids for r in rows]
        if return_offsets_mapping:
            data["offset_mapping"] = [r.offsets for r in rows]
        if return_overflowing_tokens:
            data["overflow_to_sample_mapping"] = [i for i, group in enumerate(groups) for _ in group]
        if return_tensors is not None:
            data = _to_tensors(data, return_tensors)
        elif not batched and not return_overflowing_tokens:
            data = {key: value[0] for key, value in data.items()}
        return BatchEncoding(data, rows)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text."""
        return self(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids: int | list[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of token ids (a list or a 1-D tensor)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        text = self._tk.decode(ids, skip_special_tokens=skip_special_tokens)
        # As in transformers, this old WordPiece-era cleanup is never applied to BPE vocabularies.
        if self.clean_up_tokenization_spaces and type(self._tk.model).__name__ != "BPE":
            for before, after in _CLEAN_UP:
                text = text.replace(before, after)
        return text

    def batch_decode(self, batch: list[list[int]] | torch.Tensor, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str | list[int]:
        """Render a conversation ([{"role": ..., "content": ...}, ...]) with the model's chat template.

        Uses jinja2 (sandboxed, as transformers) when it is installed, else a built-in renderer for the
        ChatML and Llama-2 [INST] formats. tokenize=True returns ids; the template writes any special tokens.
        """
        if not self.chat_template:
            raise ValueError(f"{self.name or 'this tokenizer'} has no chat_template (neither chat_template.jinja "
                             "nor a 'chat_template' key in tokenizer_config.json)")
        text = render_chat(self.chat_template, messages, add_generation_prompt, self.special_tokens_map)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ---- internals ----------------------------------------------------------------------------------------------
    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tk.token_to_id(token)

    def _encode_batch(self, texts: list[str], pairs: list[str] | None,
                      add_special_tokens: bool) -> list[tokenizers.Encoding]:
        inputs = texts if pairs is None else list(zip(texts, pairs, strict=True))
        has_bos = [bool(self.bos_token) and t.startswith(self.bos_token) for t in texts]
        if not (add_special_tokens and self._no_bos_processor is not None and any(has_bos)):
            return self._tk.encode_batch(inputs, add_special_tokens=add_special_tokens)
        # Texts that already start with BOS are encoded with a post-processor that does not add one.
        usual_processor, encodings = self._tk.post_processor, {}
        try:
            for processor, bos_group in ((usual_processor, False), (self._no_bos_processor, True)):
                self._tk.post_processor = processor
                group = [i for i, b in enumerate(has_bos) if b == bos_group]
                encodings.update(zip(group, self._tk.encode_batch([inputs[i] for i in group]), strict=True))
        finally:
            self._tk.post_processor = usual_processor
        return [encodings[i] for i in range(len(inputs))]

    def _pad(self, encodings: list[tokenizers.Encoding], mode: str | None, max_length: int | None,
             multiple_of: int | None) -> None:
        if mode is None or not encodings:
            return
        if mode == "longest":
            length = max(len(e.ids) for e in encodings)
        else:
            length = max_length if max_length is not None else self.model_max_length
            if length > _UNLIMITED:
                raise ValueError("padding='max_length' needs max_length: this tokenizer has no model_max_length")
        if multiple_of:
            length = -(-length // multiple_of) * multiple_of
        for encoding in encodings:  # pads the overflowing rows too
            encoding.pad(length, direction=self.padding_side, pad_id=self.pad_token_id, pad_type_id=0,
                         pad_token=self.pad_token)


_CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


def _check_texts(text: Any, text_pair: Any, batched: bool) -> tuple[list[str], list[str] | None]:
    texts = list(text) if batched else [text]
    pairs = None if text_pair is None else (list(text_pair) if batched else [text_pair])
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("text must be a str or a list of str, got " + type(text).__name__)
    if pairs is not None:
        if (not batched and not isinstance(text_pair, str)) or not all(isinstance(t, str) for t in pairs):
            raise TypeError("text_pair must be a str for a str text, or a list of str for a list of texts")
        if len(pairs) != len(texts):
            raise ValueError(f"text has {len(texts)} items but text_pair has {len(pairs)}")
    return texts, pairs


def _option(value: Any, choices: dict, argument: str) -> str | None:
    if isinstance(value, (bool, str)) and value in choices:
        return choices[value]
    raise ValueError(f"{argument} must be one of {list(choices)}, got {value!r}")


def _to_tensors(data: dict[str, Any], return_tensors: str) -> dict[str, Any]:
    if return_tensors != "pt":
        raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
    import torch

    lengths = {len(row) for key, rows in data.items() if key != "overflow_to_sample_mapping" for row in rows}
    if len(lengths) > 1:
        raise ValueError(f"sequences have different lengths {sorted(lengths)}, so they cannot be stacked into a "
                         "tensor: pass padding=True (or padding='max_length')")
    return {key: torch.tensor(value, dtype=torch.long) for key, value in data.items()}


def _token_content(value: Any) -> str | None:
    """A special token from config: a string or an AddedToken dict ({"content": ...})."""
    return value.get("content") if isinstance(value, dict) else value


def _default_template(value: Any) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of {"name", "template"} with a "default"."""
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value}.get("default")
    return value if isinstance(value, str) else None


def _missing_tokenizer_json_message(folder: Path) -> str:
    if not folder.is_dir():
        return f"tokenizer folder {folder} does not exist"
    sentencepiece = sorted(p.name for p in folder.glob("*.model"))
    found = (f"only the sentencepiece model {sentencepiece}" if sentencepiece
             else f"no tokenizer files (it has {sorted(p.name for p in folder.iterdir())[:8]})")
    return (f"{folder} has no tokenizer.json, {found}; minilora reads the `tokenizers` format only. Convert it "
            "once where transformers is installed: `AutoTokenizer.from_pretrained(folder).save_pretrained(folder)` "
            "writes tokenizer.json")
