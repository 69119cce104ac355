"""Evaluation metrics: accuracy, SQuAD exact match / F1 (official v1.1 normalisation), perplexity."""
from __future__ import annotations

import collections
import math
import re
import string
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F


def accuracy(predictions: Sequence, references: Sequence) -> float:
    """Fraction of positions where prediction == reference (class ids, strings, ...)."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"accuracy: {len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("accuracy: no references given")
    return sum(int(p == r) for p, r in zip(predictions, references, strict=True)) / len(references)


# --- SQuAD v1.1 (same rules as the official evaluate-v1.1.py) ---------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _as_list(gold: str | Iterable[str]) -> list[str]:
    gold = [gold] if isinstance(gold, str) else list(gold)
    if not gold:
        raise ValueError("SQuAD metric: at least one gold answer is needed")
    return gold


def exact_match(prediction: str, gold_answers: str | Iterable[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer, else 0.0."""
    return max(float(normalize_answer(prediction) == normalize_answer(g)) for g in _as_list(gold_answers))


def _f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, gold_answers: str | Iterable[str]) -> float:
    """Token-overlap F1 of the normalised strings, max over the gold answers."""
    return max(_f1(prediction, g) for g in _as_list(gold_answers))


def squad_metrics(predictions: Mapping[str, str], references: Mapping[str, Iterable[str]]) -> dict[str, float]:
    """Corpus SQuAD scores in percent: {"exact_match", "f1"} averaged over the questions of `references`.

    `predictions` maps question id -> predicted text; `references` maps question id -> gold answer texts.
    A question without a prediction scores 0 (as in the official script).
    """
    if not references:
        raise ValueError("squad_metrics: no references given")
    n = len(references)
    em = sum(exact_match(predictions.get(qid, ""), gold) for qid, gold in references.items())
    f1 = sum(f1_score(predictions.get(qid, ""), gold) for qid, gold in references.items())
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


# --- perplexity ---------------------------------------------------------------------------------------------

def token_nll(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = True,
              ignore_index: int = -100) -> tuple[float, int]:
    """(sum of token negative log-likelihoods, number of scored tokens) for one batch.

    `shift=True` is the causal-LM convention (token t predicts label t+1); use `shift=False` for
    seq2seq decoder logits, which are already aligned with their labels.
    """
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                          ignore_index=ignore_index, reduction="sum")
    return nll.item(), int((labels != ignore_index).sum())


def perplexity(total_nll: float, num_tokens: int) -> float:
    """exp(mean token NLL): `total_nll` summed over `num_tokens` scored tokens (see `token_nll`)."""
    if num_tokens <= 0:
        raise ValueError(f"perplexity: num_tokens must be positive, got {num_tokens}")
    return math.exp(total_nll / num_tokens)
