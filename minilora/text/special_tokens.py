"""What tokenizer_config.json says beyond tokenizer.json, applied to a `tokenizers` backend: which tokens are
special, whether BOS/EOS are added, whether token_type_ids are returned. `tokenizers` exposes a post-processor's
template only as JSON, so these functions read and edit that JSON."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tokenizers

# Tokenizer classes of models with segment embeddings, i.e. that take token_type_ids.
_SEGMENT_ID_CLASSES = {"BertTokenizer", "ElectraTokenizer", "MobileBertTokenizer", "ConvBertTokenizer",
                       "SqueezeBertTokenizer", "LayoutLMTokenizer", "FunnelTokenizer"}
_GENERIC_CLASSES = {"", "PreTrainedTokenizer", "TokenizersBackend"}
_FLAGS = ("single_word", "lstrip", "rstrip", "normalized")  # how an added token matches; kept when it exists


def register_special_tokens(backend: tokenizers.Tokenizer, config: dict[str, Any], named: list[str | None]) -> None:
    """Make the `named` bos/eos/... tokens and every token the config declares special (as transformers does),
    keeping tokenizer.json's flags."""
    from tokenizers import AddedToken

    declared = config.get("added_tokens_decoder")
    wanted = [t for t in declared.values() if isinstance(t, dict)] if isinstance(declared, dict) else []
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
    wanted += [{**t, "special": True} if isinstance(t, dict) else {"content": t, "special": True, "normalized": False}
               for t in [*named, *extra] if isinstance(t, (dict, str))]
    added = {t.content: t for t in backend.get_added_tokens_decoder().values()}
    for spec in wanted:
        have = added.get(spec["content"])
        if have is not None and (have.special or not spec.get("special")):
            continue
        flags = {k: getattr(have, k) for k in _FLAGS} if have is not None else {k: spec[k] for k in _FLAGS if k in spec}
        token = AddedToken(spec["content"], **flags, special=bool(spec.get("special")))
        backend.add_special_tokens([token]) if token.special else backend.add_tokens([token])
        added[token.content] = token


def apply_bos_eos_flags(backend: tokenizers.Tokenizer, config: dict[str, Any], bos: tuple[str | None, int | None],
                        eos: tuple[str | None, int | None]) -> None:
    """Honour add_bos_token / add_eos_token of `config` when tokenizer.json's post-processor disagrees.
    `bos` and `eos` are (token, id) pairs; a token without an id is never added."""
    if "add_bos_token" not in config and "add_eos_token" not in config:
        return
    (bos_token, bos_id), (eos_token, eos_id) = bos, eos
    ids = backend.encode("", add_special_tokens=True).ids
    adds_bos, adds_eos = bos_id is not None and ids[:1] == [bos_id], eos_id is not None and ids[-1:] == [eos_id]
    want_bos = bool(config.get("add_bos_token", adds_bos)) and bos_id is not None
    want_eos = bool(config.get("add_eos_token", adds_eos)) and eos_id is not None
    if (want_bos, want_eos) == (adds_bos, adds_eos):
        return
    from tokenizers import processors

    single = f"{bos_token + ':0 ' if want_bos else ''}$A:0{' ' + eos_token + ':0' if want_eos else ''}"
    pair = f"{single}{' ' + bos_token + ':1' if want_bos else ''} $B:1{' ' + eos_token + ':1' if want_eos else ''}"
    specials = [(bos_token, bos_id)] * want_bos + [(eos_token, eos_id)] * want_eos
    template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    current = backend.post_processor
    keep_current = current is not None and current.num_special_tokens_to_add(False) == 0  # e.g. ByteLevel's
    backend.post_processor = processors.Sequence([current, template]) if keep_current else template


def post_processor_without_leading(backend: tokenizers.Tokenizer, token_id: int | None) -> Any:
    """A copy of the backend's post-processor that does not put `token_id` first; None when it puts none there."""
    import tokenizers

    without = _drop_leading_token(_processor_config(backend), token_id)
    if without is None:
        return None
    # tokenizers only deserialises whole tokenizers, so the post-processor is read back from a minimal one
    shell = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
             "pre_tokenizer": None, "post_processor": without, "decoder": None,
             "model": {"type": "WordLevel", "vocab": {}, "unk_token": "<unk>"}}
    return tokenizers.Tokenizer.from_str(json.dumps(shell)).post_processor


def returns_token_type_ids(backend: tokenizers.Tokenizer, config: dict[str, Any]) -> bool:
    """Whether transformers returns token_type_ids: set per tokenizer class; for a generic class, guessed from
    whether the pair template gives the second text segment id 1 (BERT-style)."""
    if config.get("model_input_names") is not None:
        return "token_type_ids" in config["model_input_names"]
    name = (config.get("tokenizer_class") or "").removesuffix("Fast")
    if name not in _GENERIC_CLASSES:
        return name in _SEGMENT_ID_CLASSES
    return _pair_uses_segment_ids(_processor_config(backend))


def _processor_config(backend: tokenizers.Tokenizer) -> dict | None:
    processor = backend.post_processor
    return None if processor is None else json.loads(processor.__getstate__())


def _drop_leading_token(config: dict | None, token_id: int | None) -> dict | None:
    if config is None or token_id is None:
        return None
    if config["type"] == "Sequence":
        for i, inner in enumerate(config["processors"]):
            changed = _drop_leading_token(inner, token_id)
            if changed is not None:
                return {**config, "processors": [*config["processors"][:i], changed, *config["processors"][i + 1:]]}
        return None
    if config["type"] != "TemplateProcessing" or not config["single"]:
        return None
    first = config["single"][0].get("SpecialToken")
    if first is None or config["special_tokens"][first["id"]]["ids"] != [token_id]:
        return None
    pair = config["pair"]
    if pair and pair[0].get("SpecialToken", {}).get("id") == first["id"]:
        pair = pair[1:]
    return {**config, "single": config["single"][1:], "pair": pair}


def _pair_uses_segment_ids(config: dict | None) -> bool:
    if config is None:
        return False
    if config["type"] == "Sequence":
        return any(_pair_uses_segment_ids(inner) for inner in config["processors"])
    if config["type"] == "TemplateProcessing":
        return any(next(iter(piece.values()))["type_id"] != 0 for piece in config["pair"])
    return config["type"] == "BertProcessing"
