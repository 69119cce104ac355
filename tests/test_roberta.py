"""minilora's RoBERTa / XLM-RoBERTa (models/roberta.py) against transformers and peft on tiny random checkpoints."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import transformers
from lora_helpers import peft_twin, trained_like

import minilora as ml
from minilora.io.load import from_pretrained
from minilora.models.roberta import RobertaConfig, RobertaEmbeddings, XLMRobertaConfig

ATOL = 1e-4
PAD = 1
FAMILIES = {"roberta": ("Roberta", transformers.RobertaConfig),
            "xlm-roberta": ("XLMRoberta", transformers.XLMRobertaConfig)}
TASKS = {"base": "Model", "sequence-classification": "ForSequenceClassification",
         "question-answering": "ForQuestionAnswering"}
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=24, type_vocab_size=1, pad_token_id=PAD, bos_token_id=0, eos_token_id=2,
            initializer_range=0.2)  # large enough that activations leave the linear regime


def hf_model(family: str, suffix: str, seed: int = 0, **config):
    name, config_class = FAMILIES[family]
    torch.manual_seed(seed)
    return getattr(transformers, name + suffix)(config_class(**{**TINY, **config})).eval()


def save(model, folder):
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def load(folder, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = from_pretrained(folder, **kwargs)
    return model, [str(w.message) for w in caught]


def padded_batch(seed: int = 1, seq_len: int = 9):
    """Rows with right padding, left padding and none; `<s>` ... `</s>` like RoBERTa's tokenizer."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, TINY["vocab_size"], (4, seq_len), generator=g)
    input_ids[:, 0], input_ids[:, -1] = 0, 2
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    attention_mask[2, 3:] = 0
    attention_mask[3, :4] = 0  # left padding: positions still start at PAD + 1 on the first real token
    input_ids[attention_mask == 0] = PAD
    return dict(input_ids=input_ids, attention_mask=attention_mask)


def outputs(out, task):
    if task == "base":
        return [out.last_hidden_state, out.pooler_output]
    if task == "sequence-classification":
        return [out.logits]
    return [out.start_logits, out.end_logits]


def assert_all_close(got, want, atol=ATOL):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


# ---------------------------------------------------------------- config and positions

def test_config_defaults_and_errors():
    assert (RobertaConfig.from_dict({}).vocab_size, RobertaConfig.from_dict({}).pad_token_id) == (50265, 1)
    assert XLMRobertaConfig.from_dict({}).vocab_size == 30522
    c = RobertaConfig.from_dict({**TINY, "id2label": {"0": "a", "1": "b", "2": "c"}, "classifier_dropout": 0.2})
    assert (c.num_labels, c.classifier_dropout, c.type_vocab_size) == (3, 0.2, 1)
    with pytest.raises(ValueError, match="XLMRobertaConfig: is_decoder"):
        XLMRobertaConfig.from_dict({"is_decoder": True})
    with pytest.raises(ValueError, match="pad_token_id"):
        RobertaConfig.from_dict({"pad_token_id": None})
    with pytest.raises(ValueError, match="RobertaConfig: position_embedding_type"):
        RobertaConfig.from_dict({"position_embedding_type": "relative_key"})


def test_position_ids_follow_fairseq():
    embeddings = RobertaEmbeddings(RobertaConfig.from_dict(TINY))
    ids = padded_batch()["input_ids"]
    want = transformers.models.roberta.modeling_roberta.RobertaEmbeddings.create_position_ids_from_input_ids(
        ids, PAD)
    torch.testing.assert_close(embeddings.default_position_ids(ids), want, rtol=0, atol=0)
    assert embeddings.default_position_ids(ids)[3].tolist() == [1, 1, 1, 1, 2, 3, 4, 5, 6]
    assert embeddings.position_embeddings.padding_idx == PAD
    embeddings.default_position_ids(torch.full((1, 22), 5))  # positions 2..23 fit 24 embeddings
    with pytest.raises(ValueError, match="at most 22"):
        embeddings.default_position_ids(torch.full((1, 23), 5))


# ---------------------------------------------------------------- outputs equal transformers

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", TASKS)
def test_outputs_match_transformers(tmp_path, family, task):
    hf = hf_model(family, TASKS[task], num_labels=3 if task == "sequence-classification" else 2)
    ours, caught = load(save(hf, tmp_path))
    assert type(ours).__name__ == type(hf).__name__ and not caught
    batch = padded_batch()
    with torch.no_grad():
        for inputs in (batch, {"input_ids": batch["input_ids"][:1]}):  # padded, and one row with no mask
            assert_all_close(outputs(ours(**inputs), task), outputs(hf(**inputs), task))
        pos = torch.arange(3, 12)[None].expand(4, -1)  # explicit position ids are used as given
        assert_all_close(outputs(ours(**batch, position_ids=pos), task), outputs(hf(**batch, position_ids=pos), task))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_labels, labels", [
    (3, torch.tensor([0, 2, 1, 1])),                               # single-label -> cross-entropy
    (1, torch.tensor([0.5, -1.0, 2.0, 0.0])),                      # regression -> MSE
    (2, torch.tensor([[1.0, 0], [0, 1], [1, 1], [0, 0]])),         # float multi-label -> BCE with logits
])
def test_classification_loss_matches_transformers(tmp_path, family, num_labels, labels):
    hf = hf_model(family, "ForSequenceClassification", num_labels=num_labels)
    ours, _ = load(save(hf, tmp_path))
    with torch.no_grad():
        got, want = ours(**padded_batch(), labels=labels), hf(**padded_batch(), labels=labels)
    torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_question_answering_loss_matches_transformers(tmp_path, family):
    hf = hf_model(family, "ForQuestionAnswering")
    ours, _ = load(save(hf, tmp_path))
    start, end = torch.tensor([1, 4, 2, 100]), torch.tensor([[3], [5], [2], [100]])  # 100: clamped, ignored
    with torch.no_grad():
        got = ours(**padded_batch(), start_positions=start, end_positions=end)
        want = hf(**padded_batch(), start_positions=start, end_positions=end)
    torch.testing.assert_close(got.loss, want.loss, atol=ATOL, rtol=0)


def test_full_gradients_match_transformers(tmp_path):
    """Training mode (dropout 0): every parameter's gradient, including the untouched pad position row."""
    hf = hf_model("roberta", "ForSequenceClassification", num_labels=3, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0).train()
    ours, _ = load(save(hf, tmp_path))
    ours.train()
    labels = torch.tensor([0, 2, 1, 1])
    ours(**padded_batch(), labels=labels).loss.backward()
    hf(**padded_batch(), labels=labels).loss.backward()
    theirs = dict(hf.named_parameters())
    ours_params = dict(ours.named_parameters())
    assert set(ours_params) == set(theirs)
    for name, p in ours_params.items():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    assert torch.all(ours.roberta.embeddings.position_embeddings.weight.grad[PAD] == 0)


# ---------------------------------------------------------------- checkpoints of other classes

@pytest.mark.parametrize("family", FAMILIES)
def test_masked_lm_checkpoint_loads_as_the_base_model(tmp_path, family):
    """roberta-base & co. are *ForMaskedLM: the LM head is dropped silently, the missing pooler is initialised
    afresh with a warning (as transformers does), and the encoder is the checkpoint's."""
    hf = hf_model(family, "ForMaskedLM")
    ours, caught = load(save(hf, tmp_path))
    assert type(ours).__name__ == FAMILIES[family][0] + "Model"
    assert len(caught) == 1 and "pooler.dense.weight" in caught[0] and "lm_head" not in caught[0]
    batch = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).last_hidden_state, hf.roberta(**batch).last_hidden_state,
                                   atol=ATOL, rtol=0)
    assert ours.pooler.dense.weight.std() > 0 and torch.all(ours.pooler.dense.bias == 0)
    # and it fine-tunes from there: a classification head on the masked-LM checkpoint
    clf, caught = load(tmp_path, task="sequence-classification", num_labels=4)
    assert clf.classifier.out_proj.out_features == 4
    assert len(caught) == 1 and "classifier.dense.weight" in caught[0]


def test_base_checkpoint_into_task_models(tmp_path):
    hf = hf_model("roberta", "Model")
    batch = padded_batch()
    for task in ("sequence-classification", "question-answering"):
        ours, caught = load(save(hf, tmp_path), task=task)
        assert ours.roberta.pooler is None  # the checkpoint's pooler is dropped, like transformers
        assert len(caught) == 1 and "newly initialised" in caught[0]
        with torch.no_grad():
            torch.testing.assert_close(ours.roberta(**batch).last_hidden_state, hf(**batch).last_hidden_state,
                                       atol=ATOL, rtol=0)
    # and a task checkpoint into the base model: the head is dropped, the encoder kept
    clf = hf_model("roberta", "ForSequenceClassification")
    base, _ = load(save(clf, tmp_path / "clf"), task="base")
    with torch.no_grad():
        torch.testing.assert_close(base(**batch).last_hidden_state, clf.roberta(**batch).last_hidden_state,
                                   atol=ATOL, rtol=0)


def test_save_pretrained_round_trips_through_transformers(tmp_path):
    hf = hf_model("xlm-roberta", "ForSequenceClassification", num_labels=3)
    ours, _ = load(save(hf, tmp_path / "in"))
    ml.save_pretrained(ours, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("xlm-roberta", ["XLMRobertaForSequenceClassification"])
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**padded_batch()).logits, hf(**padded_batch()).logits, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- LoRA against peft

def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix("base_model.model.").replace(".default", "").replace(".base_layer", "")
            .replace(".modules_to_save", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}


def lora_targets(model) -> set[str]:
    return {n.removeprefix("base_model.model.").split(".lora_A")[0] for n, _ in model.named_parameters()
            if ".lora_A" in n}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_lora_loss_and_grads_match_peft(tmp_path, family, targets):
    """target_modules=None is peft's default for the family; "all-linear" leaves the classification head (in
    modules_to_save) alone, as peft's SEQ_CLS does."""
    hf = hf_model(family, "ForSequenceClassification", num_labels=3, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    base, _ = load(save(hf, tmp_path))
    kwargs = dict(r=4, lora_alpha=8, target_modules=targets, modules_to_save=["classifier"], init_lora_weights=False)
    ours = ml.apply_lora(base, ml.LoraConfig(**kwargs)).train()
    theirs = peft_twin(ours, hf, {**kwargs, "task_type": "SEQ_CLS"}).train()
    assert lora_targets(ours) == lora_targets(theirs)
    if targets is None:
        assert {t.rpartition(".")[2] for t in lora_targets(ours)} == {"query", "value"}
    else:
        assert not any(t.startswith("classifier") for t in lora_targets(ours)) and len(lora_targets(ours)) == 12
    labels = torch.tensor([0, 2, 1, 1])
    out_ours, out_theirs = ours(**padded_batch(), labels=labels), theirs(**padded_batch(), labels=labels)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_ours.loss, out_theirs.loss, atol=1e-6, rtol=1e-6)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    g_ours, g_theirs = lora_grads(ours), lora_grads(theirs)
    assert set(g_ours) == set(g_theirs) and "classifier.out_proj.weight" in g_ours
    for name in g_ours:
        torch.testing.assert_close(g_ours[name], g_theirs[name], atol=1e-6, rtol=1e-5, msg=name)
    assert ml.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


def test_all_linear_skips_the_head_even_when_it_is_frozen(tmp_path):
    base, _ = load(save(hf_model("roberta", "ForSequenceClassification"), tmp_path))
    ours = ml.apply_lora(base, ml.LoraConfig(target_modules="all-linear"))
    assert not any(t.startswith("classifier") for t in lora_targets(ours)) and len(lora_targets(ours)) == 12


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", ["sequence-classification", "question-answering"])
def test_adapters_load_in_peft_and_back(tmp_path, family, task):
    import peft
    head = "classifier" if task == "sequence-classification" else "qa_outputs"
    hf = hf_model(family, TASKS[task], num_labels=3 if head == "classifier" else 2)
    folder = save(hf, tmp_path / "model")
    kwargs = dict(r=4, lora_alpha=16, target_modules=["query", "value", "dense"], modules_to_save=[head])
    ours = trained_like(ml.apply_lora(load(folder)[0], ml.LoraConfig(**kwargs)))
    ml.save_adapter(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["task_type"] == ("SEQ_CLS" if head == "classifier" else "QUESTION_ANS")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    batch = padded_batch()
    with torch.no_grad():
        assert_all_close(outputs(theirs(**batch), task), outputs(ours(**batch), task), atol=1e-5)
        assert (outputs(hf(**batch), task)[0] - outputs(ours(**batch), task)[0]).abs().max() > 1e-3

    theirs = trained_like(peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**kwargs))).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    back = ml.load_adapter(load(folder)[0], tmp_path / "theirs")
    with torch.no_grad():
        assert_all_close(outputs(back(**batch), task), outputs(theirs(**batch), task), atol=1e-5)


# ---------------------------------------------------------------- NF4

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", TASKS)
def test_nf4_matches_transformers_bitsandbytes(tmp_path, family, task):
    """Same NF4 weights as transformers + bitsandbytes, told (as minilora's saved config tells it) to keep
    minilora's dense layers dense: the task heads, and nothing else."""
    pytest.importorskip("bitsandbytes")
    from minilora import quant
    from minilora.quant import format as quant_format
    hf = hf_model(family, TASKS[task], hidden_size=64, intermediate_size=128, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    folder = save(hf, tmp_path)
    ours, _ = load(folder, quantize="nf4", dtype=torch.float32)
    dense = quant_format.quant_config_to_dict(ours.quant_config, ours)["llm_int8_skip_modules"]
    assert dense == {"base": [], "sequence-classification": ["classifier.dense", "classifier.out_proj"],
                     "question-answering": ["qa_outputs"]}[task]
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=dense or None)
    theirs = type(hf).from_pretrained(folder, quantization_config=bnb_config, dtype=torch.float32)
    theirs.train()  # dropout is 0; train() keeps bnb on its dequantize path (eval would repack the weights)
    encoder = ours if task == "base" else ours.roberta
    assert isinstance(encoder.encoder.layer[0].attention.self.query, quant.NF4Linear)
    batch = padded_batch()
    with torch.no_grad():
        got, want, full = outputs(ours(**batch), task), outputs(theirs(**batch), task), outputs(hf(**batch), task)
    assert_all_close(got, want, atol=1e-4)
    assert (got[0] - full[0]).abs().max() > 1e-3  # really quantized


# ---------------------------------------------------------------- a RoBERTa-style tokenizer.json

def roberta_tokenizer_folder(folder):
    """A tiny byte-level BPE with RoBERTa's post-processor (`<s> A </s></s> B </s>`) and special tokens,
    trained offline, as tokenizer.json + tokenizer_config.json."""
    from tokenizers import ByteLevelBPETokenizer, processors
    texts = ["The quick brown fox jumps over the lazy dog.", "RoBERTa counts positions after the padding id!",
             "Hello world, hello tokenizer: ünïcödé too."] * 20
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True,
                                                      add_prefix_space=False)
    folder.mkdir()
    bpe.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "RobertaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
        "cls_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>",
        "model_max_length": 20, "add_prefix_space": False}))
    return folder


def test_roberta_tokenizer_matches_transformers_and_feeds_the_model(tmp_path):
    folder = roberta_tokenizer_folder(tmp_path / "tok")
    ours, theirs = ml.load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert (ours.pad_token_id, ours.bos_token_id, ours.eos_token_id, ours.mask_token_id) == (1, 0, 2, 4)
    texts, pairs = ["Hello world, the fox!", "short", "ünïcödé <mask> too"], ["RoBERTa positions.", "a pair", "x"]
    for args, kwargs in [((texts,), {}), ((texts,), {"padding": True, "return_offsets_mapping": True}),
                         ((texts, pairs), {"padding": True}),
                         ((texts, pairs), {"padding": "max_length", "truncation": True})]:
        got, want = ours(*args, **kwargs), theirs(*args, **kwargs)
        assert dict(got) == dict(want), (args, kwargs)
        assert "token_type_ids" not in got  # RoBERTa's tokenizer returns none; the model uses type 0
    assert ours.decode(ours("the lazy dog")["input_ids"], skip_special_tokens=True) == "the lazy dog"

    batch = ours(texts, pairs, padding=True, return_tensors="pt")
    assert batch["attention_mask"].min() == 0 and (batch["input_ids"] == PAD).any()
    hf = hf_model("roberta", "ForSequenceClassification", vocab_size=len(theirs), max_position_embeddings=40)
    model, _ = load(save(hf, tmp_path / "model"))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, hf(**batch).logits, atol=ATOL, rtol=0)


def test_bert_masked_lm_checkpoint_loads_too(tmp_path):
    """The pooler rule is BERT's (shared code): a BertForMaskedLM checkpoint (no pooler, `cls.*` head) loads as
    the base model and as a classifier, the encoder equal to the checkpoint's."""
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**{**TINY, "type_vocab_size": 2, "pad_token_id": 0}))
    save(hf.eval(), tmp_path)
    ids = torch.randint(1, 99, (2, 7))
    for task in ("base", "sequence-classification"):
        model, caught = load(tmp_path, task=task)
        assert len(caught) == 1 and "pooler.dense.weight" in caught[0]
        with torch.no_grad():
            torch.testing.assert_close(model.base_model(ids).last_hidden_state, hf.bert(ids).last_hidden_state,
                                       atol=ATOL, rtol=0)
