"""minilora.text.tokenizer against transformers' AutoTokenizer (the oracle) on real tokenizers and data, plus
tokenizers built in-test so the core checks run without the real checkpoints."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import real_model_dir, shared_data_dir
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from minilora.text.tokenizer import BatchEncoding, Tokenizer, load_tokenizer, render_builtin_chat

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "A stitch in time saves nine!",
    "Who wrote the novel about the whale? Herman Melville wrote Moby-Dick in 1851.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "LoRA adds low-rank adapters to frozen linear layers; QLoRA quantizes the base weights.",
    "Héllo wörld, naïve café résumé.", "Numbers like 3.14159 and 42 appear too.",
]
LLAMA2_CHAT_TEMPLATE = (  # meta-llama/Llama-2-7b-chat-hf's template
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
    "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")
CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Germany?"}]


def hf_tokenizer(folder: Path):
    """transformers' AutoTokenizer, or its generic class when AutoTokenizer's class rebuilds the pre-tokenizer
    instead of reading tokenizer.json (transformers 5's GPT2Tokenizer does: SmolLM2 loses its Digits step)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.backend_tokenizer.pre_tokenizer.__getstate__() != file_pre_tokenizer(folder).__getstate__():
        tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
    return tok


def file_pre_tokenizer(folder: Path):
    return RustTokenizer.from_file(str(folder / "tokenizer.json")).pre_tokenizer


def read_rows(relative: str, n: int) -> list[dict]:
    with open(shared_data_dir() / relative, encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, n)]


def assert_same(ours: BatchEncoding, theirs) -> None:
    assert set(ours) == set(theirs)
    for key, expected in theirs.items():
        if isinstance(expected, torch.Tensor):
            assert ours[key].dtype == expected.dtype and torch.equal(ours[key], expected), key
        else:
            assert ours[key] == expected, key


def save_folder(folder: Path, backend: RustTokenizer, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# ---- tokenizers built in-test ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = RustTokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, backend.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    config = {"tokenizer_class": "BertTokenizer", "model_max_length": 64, "do_lower_case": True,
              **{f"{name}_token": f"[{name.upper()}]" for name in ("pad", "unk", "cls", "sep", "mask")}}
    return save_folder(tmp_path_factory.mktemp("tiny_bert"), backend, config)


def tiny_llama2(folder: Path, **config) -> Path:
    """A Llama-2-style BPE tokenizer: Metaspace, a post-processor adding <s>, no pad token."""
    backend = RustTokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    backend.train_from_iterator(CORPUS + ["[INST] hi [/INST] hello"],
                                trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s>:1 $B:1",
                                                           special_tokens=[("<s>", 1)])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 4096,
              "chat_template": LLAMA2_CHAT_TEMPLATE, **config}
    return save_folder(folder, backend, config)


def test_bert_pairs_match_transformers_without_real_files(tiny_bert):
    ours, theirs = load_tokenizer(tiny_bert), hf_tokenizer(tiny_bert)
    questions = ["Who wrote Moby-Dick?", "What is the capital of France?"]
    contexts = [CORPUS[2] * 3, " ".join(CORPUS)]
    kwargs = dict(truncation="only_second", max_length=24, stride=6, return_overflowing_tokens=True,
                  return_offsets_mapping=True, padding="max_length")
    enc, ref = ours(questions, contexts, **kwargs), theirs(questions, contexts, **kwargs)
    assert_same(enc, ref)
    assert len(enc["input_ids"]) > 4  # contexts really overflowed into several windows
    for i in range(len(enc["input_ids"])):
        assert enc.sequence_ids(i) == ref.sequence_ids(i)
    assert set(enc.sequence_ids(0)) == {None, 0, 1}
    assert_same(ours(questions[0], contexts[1]), theirs(questions[0], contexts[1]))
    assert_same(ours(CORPUS, padding=True, return_tensors="pt"), theirs(CORPUS, padding=True, return_tensors="pt"))
    ids = ours(CORPUS)["input_ids"]
    assert ours.batch_decode(ids, skip_special_tokens=True) == theirs.batch_decode(ids, skip_special_tokens=True)
    assert (ours.cls_token_id, ours.sep_token_id, ours.pad_token_id) == (2, 3, 0)


def test_text_starting_with_bos_gets_no_second_bos(tmp_path):
    folder = tiny_llama2(tmp_path)
    ours, theirs = load_tokenizer(folder), hf_tokenizer(folder)
    text = "<s>[INST] hi [/INST]"
    ids = ours.encode(text)
    assert ids[0] == ours.bos_token_id == 1 and ids[1] != 1
    assert ids == ours.encode(text, add_special_tokens=False)
    assert theirs(text)["input_ids"] == [1] + ids  # transformers doubles it
    for plain in CORPUS:  # text without BOS: the usual single BOS, as transformers
        assert ours.encode(plain) == theirs(plain)["input_ids"] and ours.encode(plain)[0] == 1
    batch = ours([text, "hi there", text + " hello </s>"], return_offsets_mapping=True)
    assert [row[:2].count(1) for row in batch["input_ids"]] == [1, 1, 1]
    assert batch["offset_mapping"][0][0] == (0, 3)  # the text's own <s> keeps its offsets
    with_eos = load_tokenizer(tiny_llama2(tmp_path / "eos", add_eos_token=True))  # flag honoured
    assert with_eos.encode(text)[-1] == with_eos.eos_token_id and with_eos.encode(text).count(1) == 1


def test_guanaco_rows_encode_with_one_bos(tmp_path):
    tok = load_tokenizer(tiny_llama2(tmp_path))
    texts = [row["text"] for row in read_rows("guanaco_llama2_1k/train.jsonl", 200)]
    for text, ids in zip(texts, tok(texts)["input_ids"], strict=True):
        assert ids == tok.encode(text, add_special_tokens=False) and ids[:2].count(tok.bos_token_id) == 1


def test_missing_pad_token_error_and_setter(tmp_path):
    tok = load_tokenizer(tiny_llama2(tmp_path))
    assert tok.pad_token is None and tok.pad_token_id is None
    with pytest.raises(ValueError, match=r"tok\.pad_token = tok\.eos_token"):
        tok(["a", "a b c"], padding=True)
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    enc = tok(["a", "fox jumps"], padding=True, return_tensors="pt")
    assert enc["input_ids"].shape[0] == 2 and enc["input_ids"][0, 0].item() == tok.eos_token_id
    assert enc["attention_mask"][0, 0].item() == 0 and enc.sequence_ids(0)[0] is None
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.pad_token = "<no such token>"
    with pytest.raises(ValueError, match="padding_side"):
        tok.padding_side = "middle"


def test_llama2_chat_template_builtin_matches_jinja_and_transformers(tmp_path):
    folder = tiny_llama2(tmp_path)
    ours, theirs = load_tokenizer(folder), hf_tokenizer(folder)
    chat = [{"role": "system", "content": "Be brief."}, *CHAT]
    expected = theirs.apply_chat_template(chat, tokenize=False)
    assert expected.startswith("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is")
    assert ours.apply_chat_template(chat) == expected
    assert render_builtin_chat(LLAMA2_CHAT_TEMPLATE, chat, True, ours.special_tokens_map) == expected
    assert ours.apply_chat_template(chat, tokenize=True) == ours.encode(expected, add_special_tokens=False)
    with pytest.raises(ValueError, match="alternate"):
        ours.apply_chat_template(CHAT[1:])


def test_bad_input_errors(tmp_path, tiny_bert, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json.*sentencepiece.*tokenizer\.model"):
        load_tokenizer(tmp_path / "spm")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text((tiny_bert / "tokenizer.json").read_text())
    (bad / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON"):
        load_tokenizer(bad)
    tok = load_tokenizer(tiny_bert)
    with pytest.raises(ValueError, match="truncation must be one of"):
        tok("a", truncation="sideways")
    with pytest.raises(ValueError, match="padding=True"):
        tok(["a", "a b c"], return_tensors="pt")
    with pytest.raises(ValueError, match="return_tensors"):
        tok("a", return_tensors="np")
    with pytest.raises(ValueError, match="max_length=4"):  # the question alone is longer than max_length
        tok(CORPUS[2], "x", truncation="only_second", max_length=4)
    with pytest.raises(ValueError, match="has no chat_template"):
        tok.apply_chat_template(CHAT)
    with pytest.raises(TypeError, match="text must be"):
        tok([1, 2])
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="local folder"):
        load_tokenizer("someone/not-cached-tokenizer-xyz")


# ---- real tokenizers and data -----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["all-MiniLM-L6-v2", "SmolLM2-135M-Instruct", "t5-random-flan-small-shape"])
def real_pair(request) -> tuple[Tokenizer, object]:
    folder = real_model_dir(request.param)
    return load_tokenizer(folder), hf_tokenizer(folder)


def test_real_tokenizers_match_transformers(real_pair):
    ours, theirs = real_pair
    rows = read_rows("rotten_tomatoes/validation.jsonl", 300)
    sentences = [row["text"] for row in rows]
    orca = read_rows("openorca/train.jsonl", 100)
    prompts = [row["question"] for row in orca]
    guanaco = [row["text"] for row in read_rows("guanaco_llama2_1k/train.jsonl", 100)]
    for texts in (sentences, prompts, guanaco):
        assert_same(ours(texts, return_offsets_mapping=True), theirs(texts, return_offsets_mapping=True))
    assert_same(ours(sentences[0]), theirs(sentences[0]))
    assert_same(ours(prompts[:8], [r["response"] for r in orca[:8]], truncation=True, max_length=96),
                theirs(prompts[:8], [r["response"] for r in orca[:8]], truncation=True, max_length=96))
    for kwargs in (dict(padding=True, return_tensors="pt"), dict(padding="max_length", max_length=48, truncation=True),
                   dict(padding=True, pad_to_multiple_of=8, return_tensors="pt")):
        assert_same(ours(sentences[:32], **kwargs), theirs(sentences[:32], **kwargs))
    ids = theirs(guanaco[:50])["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == theirs.batch_decode(ids, skip_special_tokens=skip)
    for name in ("pad", "bos", "eos", "unk", "cls", "sep"):
        assert getattr(ours, f"{name}_token_id") == getattr(theirs, f"{name}_token_id"), name
    assert (ours.vocab_size, len(ours), ours.model_max_length) == (theirs.vocab_size, len(theirs),
                                                                   theirs.model_max_length)


def test_squad_windows_match_transformers(real_pair):
    ours, theirs = real_pair
    rows = sorted(read_rows("squad/validation.jsonl", 2000), key=lambda r: -len(r["context"]))[:200]  # longest
    questions, contexts = [r["question"].lstrip() for r in rows], [r["context"] for r in rows]
    kwargs = dict(truncation="only_second", max_length=384, stride=128, return_overflowing_tokens=True,
                  return_offsets_mapping=True, padding="max_length")
    enc, ref = ours(questions, contexts, **kwargs), theirs(questions, contexts, **kwargs)
    assert_same(enc, ref)
    assert len(enc["input_ids"]) > len(rows)  # some contexts needed several windows
    assert all(enc.sequence_ids(i) == ref.sequence_ids(i) for i in range(len(enc["input_ids"])))


def test_smollm_follows_tokenizer_json_where_auto_tokenizer_does_not():
    folder = real_model_dir("SmolLM2-135M-Instruct")
    from transformers import AutoTokenizer

    auto, ours, raw = AutoTokenizer.from_pretrained(str(folder)), load_tokenizer(folder), RustTokenizer.from_file(
        str(folder / "tokenizer.json"))
    text = "Steps:\n\n1) Mix 250 g of flour."
    assert ours.encode(text) == raw.encode(text).ids  # Digits then ByteLevel: "\n\n" stays one token
    assert ours.convert_ids_to_tokens(ours.encode(text))[2] == "ĊĊ"
    assert auto(text)["input_ids"] != ours.encode(text)  # AutoTokenizer's GPT2Tokenizer drops the Digits step


def test_smollm_chat_template_matches_transformers():
    folder = real_model_dir("SmolLM2-135M-Instruct")
    ours, theirs = load_tokenizer(folder), hf_tokenizer(folder)
    two_turns = CHAT[:2]
    for prompt in (True, False):
        expected = theirs.apply_chat_template(two_turns, add_generation_prompt=prompt, tokenize=False)
        assert ours.apply_chat_template(two_turns, add_generation_prompt=prompt) == expected
        assert render_builtin_chat(ours.chat_template, two_turns, prompt, ours.special_tokens_map) == expected
        expected_ids = theirs.apply_chat_template(two_turns, add_generation_prompt=prompt, tokenize=True,
                                                  return_dict=False)
        assert ours.apply_chat_template(two_turns, add_generation_prompt=prompt, tokenize=True) == expected_ids
    assert "You are a helpful AI assistant named SmolLM" in expected
