"""chat_dataset: assistant-only masks derived from the template, checked against masks written out by hand for
the real SmolLM2 and Qwen2.5 templates and for Llama-3-, Llama-2-, Gemma- and Qwen3-style fixture templates,
and against transformers' `return_assistant_tokens_mask` for a template with `{% generation %}` blocks."""
import json
import os
from pathlib import Path

import pytest

from minilora.data import Collator, chat_dataset, show_masking
from minilora.data.chat import assistant_mask

MODELS = Path(os.environ.get("MINILORA_TEST_MODELS", "/root/.cache/minilora/test-models"))
CONVERSATION = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
                {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "It is 6."}]
SPECIALS = ["<s>", "</s>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>", "<pad>"]

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
          "{{ m.content | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
          "{% endfor %}")
GEMMA = ("{{ bos_token }}{% for message in messages %}"
         "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
         "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
QWEN3 = """{%- set ns = namespace(last_query_index=0) %}
{%- for message in messages %}{%- if message.role == "user" %}{%- set ns.last_query_index = loop.index0 %}
{%- endif %}{%- endfor %}
{%- for message in messages %}
{%- if message.role == "assistant" %}
{%- set content = message.content %}
{%- set reasoning_content = '' %}
{%- if message.reasoning_content is defined and message.reasoning_content is not none %}
{%- set reasoning_content = message.reasoning_content %}
{%- elif '</think>' in content %}
{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}
{{- content.lstrip('\\n') }}
{%- else %}
{{- '<|im_start|>assistant\\n' + content }}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""
GENERATION_TAGS = ("{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n"
                   "{% generation %}{{ m.content }}<|im_end|>\n{% endgeneration %}"
                   "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}")


def _backend():
    """Byte-level BPE without merges: one token per byte, plus the fixtures' special tokens."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Backend(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    return backend


def _tokenizer(template):
    from minilora.text.tokenizer import Tokenizer

    return Tokenizer(_backend(), {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
                     chat_template=template)


def _learned(tok, feature):
    """The decoded runs of learned tokens (label != -100)."""
    runs, run = [], []
    for token, label in zip(feature["input_ids"], feature["labels"], strict=True):
        if label != -100:
            run.append(token)
        elif run:
            runs, run = runs + [tok.decode(run)], []
    return runs + ([tok.decode(run)] if run else [])


# --- hand-written masks ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("template, expected_text, expected_learned", [
    (LLAMA3, "<s><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>"
             "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 6.<|eot_id|>",
     ["4.<|eot_id|>", "It is 6.<|eot_id|>"]),
    (LLAMA2, "<s>[INST] What is 2+2? [/INST] 4. </s><s>[INST] And 3+3? [/INST] It is 6. </s>",
     ["4. </s>", "It is 6. </s>"]),
    (GEMMA, "<s><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4.<end_of_turn>\n"
            "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n<start_of_turn>model\nIt is 6.<end_of_turn>\n",
     ["4.<end_of_turn>", "It is 6.<end_of_turn>"]),
    # the last answer gets an empty think block from the template: context, not learned
    (QWEN3, "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
            "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nIt is 6.<|im_end|>\n",
     ["4.<|im_end|>", "It is 6.<|im_end|>"]),
], ids=["llama3", "llama2", "gemma", "qwen3"])
def test_fixture_templates_learn_content_and_end_of_turn_only(template, expected_text, expected_learned):
    tok = _tokenizer(template)
    feature = chat_dataset([{"messages": CONVERSATION}], tok)[0]
    assert tok.decode(feature["input_ids"]) == expected_text
    assert _learned(tok, feature) == expected_learned


def test_llama2_system_prompt_and_leading_spaces():
    tok = _tokenizer(LLAMA2)
    conversation = [{"role": "system", "content": "Be brief."}, *CONVERSATION[:2]]
    feature = chat_dataset([{"messages": conversation}], tok)[0]
    assert tok.decode(feature["input_ids"]) == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4. </s>"
    assert _learned(tok, feature) == ["4. </s>"]


def test_qwen3_reasoning_of_the_last_answer_is_learned_and_earlier_reasoning_is_dropped():
    tok = _tokenizer(QWEN3)
    conversation = [CONVERSATION[0], {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\n4."},
                    CONVERSATION[2], {"role": "assistant", "content": "<think>\nAdd 3 and 3.\n</think>\n\nIt is 6."}]
    feature = chat_dataset([{"messages": conversation}], tok)[0]
    assert tok.decode(feature["input_ids"]) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"  # the template drops it
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n<think>\nAdd 3 and 3.\n</think>\n\nIt is 6."
        "<|im_end|>\n")
    assert _learned(tok, feature) == ["4.<|im_end|>", "Add 3 and 3.\n</think>\n\nIt is 6.<|im_end|>"]
    as_field = [*conversation[:3], {"role": "assistant", "content": "It is 6.", "reasoning_content": "Add 3 and 3."}]
    assert chat_dataset([{"messages": as_field}], tok)[0] == feature


def _real(name):
    if not (MODELS / name / "tokenizer.json").is_file():
        pytest.skip(f"{MODELS / name} is absent (set MINILORA_TEST_MODELS to the built test models)")
    import minilora as ml

    return ml.load_tokenizer(MODELS / name)


ASSISTANT = {"SmolLM2-135M-Instruct": ["ass", "istant"], "Qwen2.5-Coder-0.5B-Instruct": ["assistant"]}


@pytest.mark.parametrize("name, system", [
    ("SmolLM2-135M-Instruct", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    ("Qwen2.5-Coder-0.5B-Instruct", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
])
def test_real_templates_with_their_default_system_prompts(name, system):
    tok = _real(name)
    feature = chat_dataset([{"messages": CONVERSATION}], tok)[0]
    text = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\n4.<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n"
            "<|im_start|>assistant\nIt is 6.<|im_end|>\n")
    assert feature["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    tokens = tok.convert_ids_to_tokens(feature["input_ids"])
    learned = [label != -100 for label in feature["labels"]]
    header = ["<|im_start|>", *ASSISTANT[name], "Ċ"]
    first = tokens.index("4")
    # from the first answer's header to the end, token by token (1 = learned); nothing before it is learned
    assert list(zip(tokens[first - len(header):], learned[first - len(header):], strict=True)) == [
        *[(t, False) for t in header], ("4", True), (".", True), ("<|im_end|>", True), ("Ċ", False),
        ("<|im_start|>", False), ("user", False), ("Ċ", False), ("And", False), ("Ġ", False), ("3", False),
        ("+", False), ("3", False), ("?", False), ("<|im_end|>", False), ("Ċ", False),
        *[(t, False) for t in header], ("It", True), ("Ġis", True), ("Ġ", True), ("6", True), (".", True),
        ("<|im_end|>", True), ("Ċ", False)]
    assert not any(learned[:first])
    assert all(label == t for t, label in zip(feature["input_ids"], feature["labels"], strict=True) if label != -100)


@pytest.mark.parametrize("name", list(ASSISTANT))
def test_real_template_renders_as_transformers(name):
    tok = _real(name)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(MODELS / name)
    ids = hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert chat_dataset([{"messages": CONVERSATION}], tok)[0]["input_ids"] == list(ids)


# --- {% generation %} blocks: transformers' assistant mask ---------------------------------------------------

@pytest.mark.parametrize("conversation", [CONVERSATION, [{"role": "system", "content": "Be brief."}, *CONVERSATION]])
def test_generation_blocks_match_transformers_assistant_mask(conversation):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=_backend(), bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = GENERATION_TAGS
    theirs = hf.apply_chat_template(conversation, tokenize=True, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = assistant_mask(conversation, _tokenizer(GENERATION_TAGS))
    assert ids == list(theirs["input_ids"]) and mask == list(theirs["assistant_masks"])
    assert sum(mask) > 0
    tok = _tokenizer(GENERATION_TAGS)
    learned = _learned(tok, chat_dataset([{"messages": conversation}], tok)[0])
    assert learned == ["4.<|im_end|>\n", "It is 6.<|im_end|>\n"]  # the block's "\n" too: the template says so


# --- rows, truncation, packing, display -------------------------------------------------------------------------

def test_sharegpt_rows_are_mapped():
    tok = _tokenizer(LLAMA3)
    sharegpt = [{"conversations": [{"from": "human", "value": m["content"]} if m["role"] == "user" else
                                   {"from": "gpt", "value": m["content"]} for m in CONVERSATION]}]
    assert chat_dataset(sharegpt, tok) == chat_dataset([{"messages": CONVERSATION}], tok)
    assert chat_dataset([{"chat": CONVERSATION}], tok, messages_field="chat") == chat_dataset(sharegpt, tok)


@pytest.mark.parametrize("row, message", [
    ({"text": "hi"}, r"row 0 has no column 'messages'"),
    ({"messages": "hi"}, r"row 0, field 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, r"row 0, field 'messages', message 0: expected"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, r"unknown ShareGPT role 'robot'"),
])
def test_bad_rows_name_source_row_and_field(tmp_path, row, message):
    from minilora.data import load_records

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises((KeyError, ValueError), match=message):
        chat_dataset(load_records(path), _tokenizer(LLAMA3))
    with pytest.raises(ValueError, match="has no chat template"):
        chat_dataset([{"messages": CONVERSATION}], _tokenizer(None))


def test_all_tokens_learned_without_assistant_only_loss():
    tok = _tokenizer(LLAMA3)
    feature = chat_dataset([{"messages": CONVERSATION}], tok, assistant_only_loss=False)[0]
    assert feature["labels"] == feature["input_ids"]


def test_truncation_keeps_no_dangling_header_and_drops_conversations_without_answers():
    tok = _tokenizer(LLAMA3)
    full = chat_dataset([{"messages": CONVERSATION}], tok)[0]
    text = tok.decode(full["input_ids"])
    # cut inside the second assistant header: the row ends with the first answer's <|eot_id|>
    cut = len(tok(text[:text.rindex("assistant<|end_header_id|>") + 3], add_special_tokens=False)["input_ids"])
    short = chat_dataset([{"messages": CONVERSATION}], tok, max_length=cut)[0]
    assert tok.decode(short["input_ids"]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>")
    assert _learned(tok, short) == ["4.<|eot_id|>"]
    # cut inside the second answer: the answer is learned as far as it goes
    inside = len(tok(text[:text.rindex("It is") + 4], add_special_tokens=False)["input_ids"])
    assert _learned(tok, chat_dataset([{"messages": CONVERSATION}], tok, max_length=inside)[0]) == ["4.<|eot_id|>",
                                                                                                   "It i"]
    # a row whose first answer starts past max_length is dropped, counted and reported
    rows = [{"messages": CONVERSATION}, {"messages": [{"role": "user", "content": "x" * 200}, CONVERSATION[1]]}]
    with pytest.warns(UserWarning, match="1 of 2 conversations .* no assistant token to learn within max_length=100"):
        features = chat_dataset(rows, tok, max_length=100)
    assert len(features) == 1 and features.num_dropped == 1
    with pytest.raises(ValueError, match="no conversation of records has an assistant token"):
        chat_dataset(rows[1:], tok, max_length=100)


def test_packed_chat_rows_and_show_masking():
    tok = _tokenizer(GEMMA)
    rows = [{"messages": CONVERSATION[:2]}, {"messages": CONVERSATION[2:]}]
    unpacked = chat_dataset(rows, tok)
    packed = chat_dataset(rows, tok, packing=True, max_length=200)
    assert len(packed) == 1 and len(packed[0]["input_ids"]) == sum(len(f["input_ids"]) for f in unpacked)
    assert _learned(tok, packed[0]) == ["It is 6.<end_of_turn>", "4.<end_of_turn>"]  # longest first
    assert Collator()(packed)["position_ids"].tolist()[0].count(0) == 2
    assert show_masking(unpacked[0], tok) == (
        "<s><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n⟦4.<end_of_turn>⟧\n")
    shown = show_masking(packed[0], tok)
    assert shown.startswith("--- document 1 ---\n<s><start_of_turn>user\nAnd 3+3?")
    assert "⟦It is 6.<end_of_turn>⟧\n\n--- document 2 ---\n<s><start_of_turn>user\nWhat is 2+2?" in shown
