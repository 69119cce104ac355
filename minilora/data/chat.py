"""Chat data: conversations rendered with the model's chat template, the loss on the assistant's tokens only.

Which tokens are the assistant's is derived from the template itself, so it works for any template: the
conversation is rendered and tokenized once as is and once with one assistant message emptied; the tokens
where the two differ are that message's content. The template's end-of-turn token that closes the
message (the first special token after the content, past whitespace) is trained too, so the model learns to
stop; role headers, system prompts (also one the template inserts by default), user and tool turns never
are. Whatever the template writes around an assistant message that is not its content, such as the
empty `<think>\\n\\n</think>` block Qwen3 puts before its last answer, is context, not trained. A template
with `{% generation %}` blocks says itself what the assistant wrote: those spans are trained, exactly as
transformers' `return_assistant_tokens_mask` marks them.
"""
from __future__ import annotations

import warnings
from typing import Sequence

from minilora.checks import check_number
from minilora.data.collate import IGNORE_INDEX, Features
from minilora.data.packing import to_features
from minilora.data.readers import get_field, require_rows, source_of
from minilora.text.chat_template import render_chat, render_chat_with_generation_spans

# ShareGPT's `from` values -> roles; rows holding {"from": ..., "value": ...} messages are read with it.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
                  "function_call": "assistant", "tool": "tool", "function": "tool", "observation": "tool"}


def chat_dataset(records: Sequence[dict], tokenizer, max_length: int = 2048, messages_field: str = "messages",
                 assistant_only_loss: bool = True, chat_template: str | None = None,
                 packing: bool = False) -> Features:
    """Tokenize conversations for supervised fine-tuning: features with input_ids, attention_mask and labels.

    Each row holds a list of messages under `messages_field`: `{"role": ..., "content": ...}` dicts
    (system / user / assistant / tool, any number of turns), or ShareGPT's `{"from": ..., "value": ...}`
    (mapped by `SHAREGPT_ROLES`: human -> user, gpt -> assistant, ...; a row with `conversations` instead
    of `messages` is read the same way). The template is `chat_template` or the tokenizer's.
    - `assistant_only_loss`: only the assistant's tokens are learned (see the module docstring); else all.
    - Conversations longer than `max_length` tokens are cut, and the cut row is shortened to end with its
      last learned token, so it never ends in a dangling role header or user turn. Conversations left with
      no learned token are dropped, counted in `num_dropped`, and reported in a warning.
    - `packing`: whole conversations share rows of up to `max_length` tokens (`minilora.data.packing`).
    `show_masking(features[i], tokenizer)` shows which tokens of an example are learned.
    """
    require_rows(records, "chat_dataset")
    check_number(max_length, "chat_dataset: max_length", low=1, integer=True)
    template = chat_template or tokenizer.chat_template
    if not template:
        raise ValueError(f"chat_dataset: {getattr(tokenizer, 'name', '') or 'the tokenizer'} has no chat template; "
                         "pass chat_template=")
    documents = []
    for index, row in enumerate(records):
        messages = read_messages(row, messages_field, records, index)
        try:
            ids, learned = assistant_mask(messages, tokenizer, template)
        except ValueError as e:
            raise ValueError(f"{source_of(records)}: row {index}: {e}") from e
        labels = [t if m or not assistant_only_loss else IGNORE_INDEX for t, m in zip(ids, learned, strict=True)]
        if len(ids) > max_length:  # end the cut row with its last learned token
            last = max((i for i, t in enumerate(labels[:max_length]) if t != IGNORE_INDEX), default=-1)
            ids, labels = ids[:last + 1], labels[:last + 1]
        if any(t != IGNORE_INDEX for t in labels[1:]):
            documents.append((ids, labels))
    dropped = len(records) - len(documents)
    if not documents:
        raise ValueError(f"chat_dataset: no conversation of {source_of(records)} has an assistant token to learn "
                         f"within max_length={max_length}")
    if dropped:
        warnings.warn(f"chat_dataset: {dropped} of {len(records)} conversations of {source_of(records)} have no "
                      f"assistant token to learn within max_length={max_length}; they are left out", stacklevel=2)
    return to_features(documents, max_length, packing, source_of(records), dropped)


def read_messages(row: dict, field: str, records: Sequence[dict], index: int) -> list[dict]:
    """The row's messages as [{"role", "content"}, ...]; ShareGPT's from/value are mapped, other keys kept."""
    if field == "messages" and isinstance(row, dict) and field not in row and "conversations" in row:
        field = "conversations"
    messages = get_field(row, field, records, index)
    where = f"{source_of(records)}: row {index}, field {field!r}"
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where} must be a non-empty list of messages, got {type(messages).__name__}")
    out = []
    for k, message in enumerate(messages):
        if isinstance(message, dict) and "from" in message and "value" in message and "role" not in message:
            if message["from"] not in SHAREGPT_ROLES:
                raise ValueError(f"{where}, message {k}: unknown ShareGPT role {message['from']!r} (known: "
                                 f"{sorted(SHAREGPT_ROLES)})")
            rest = {key: v for key, v in message.items() if key not in ("from", "value")}
            message = {"role": SHAREGPT_ROLES[message["from"]], "content": message["value"], **rest}
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError(f"{where}, message {k}: expected {{'role': str, 'content': str}} or "
                             f"{{'from': str, 'value': str}}, got {message!r:.200}")
        out.append(message)
    return out


def assistant_mask(messages: list[dict], tokenizer, chat_template: str | None = None) -> tuple[list[int], list[int]]:
    """(token ids of the rendered conversation, 1 for each token the assistant wrote, else 0)."""
    template = chat_template or tokenizer.chat_template
    special = tokenizer.special_tokens_map
    text, spans = render_chat_with_generation_spans(template, messages, False, special)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(spans))
    ids = encoded["input_ids"]
    if spans:  # transformers' rule: the tokens from the one holding a block's first character to its last
        offsets = encoded["offset_mapping"]
        return ids, [int(any(s < b and e > a for a, b in spans)) for s, e in offsets]
    mask = [0] * len(ids)
    stops = set(tokenizer.all_special_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # everything the assistant wrote (content, and reasoning where a template takes it) left out
        blank = {key: "" if isinstance(value, str) and key not in ("role", "name") else value
                 for key, value in message.items()}
        emptied = [*messages[:i], blank, *messages[i + 1:]]
        other = tokenizer(render_chat(template, emptied, False, special), add_special_tokens=False)["input_ids"]
        start = _common_prefix(ids, other)
        end = len(ids) - _common_prefix(ids[start:][::-1], other[start:][::-1])
        for t in range(end, len(ids)):  # the end-of-turn token: the first special one, past whitespace
            if ids[t] in stops:
                end = t + 1
                break
            if tokenizer.decode([ids[t]]).strip():
                break
        mask[start:end] = [1] * (end - start)
    return ids, mask


def show_masking(example: dict, tokenizer) -> str:
    """The example's text with each learned span (label != -100) between ⟦ and ⟧; packed documents are
    separated by a line `--- document k ---`. Print it to check what a run will learn."""
    ids, positions = list(example["input_ids"]), example.get("position_ids")
    learned = [label != IGNORE_INDEX for label in example["labels"]]
    # runs of tokens that are all learned or all not, within one document
    starts = [t for t in range(len(ids))
              if t == 0 or learned[t] != learned[t - 1] or (positions is not None and positions[t] == 0)]
    pieces, decoded, documents = [], "", 0
    for start, end in zip(starts, [*starts[1:], len(ids)], strict=False):  # unequal only for no tokens
        text = tokenizer.decode(ids[:end])  # decoded as a prefix, so a run does not lose its leading space
        piece = text[len(decoded):] if text.startswith(decoded) else tokenizer.decode(ids[start:end])
        decoded = text
        if positions is not None and positions[start] == 0:
            documents += 1
            pieces.append(f"{chr(10) if pieces else ''}--- document {documents} ---\n")
        pieces.append(f"⟦{piece}⟧" if learned[start] else piece)
    return "".join(pieces)


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
