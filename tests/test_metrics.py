"""minilora.metrics against hand-computed values (and the official SQuAD normalisation rules)."""
import math

import pytest
import torch

from minilora.metrics import (accuracy, exact_match, f1_score, normalize_answer, perplexity, squad_metrics,
                              token_nll)


def test_accuracy():
    assert accuracy([1, 0, 2, 2], [1, 1, 2, 0]) == 0.5
    assert accuracy(["pos"], ["pos"]) == 1.0
    with pytest.raises(ValueError, match="3 predictions but 2 references"):
        accuracy([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="no references"):
        accuracy([], [])


@pytest.mark.parametrize("text, expected", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an   apple,  a pear and THE plum. ", "apple pear and plum"),
    ("theater anthem", "theater anthem"),  # articles only as whole words
    ("Dr. O'Neil's 1,000-page (draft)", "dr oneils 1000page draft"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_takes_the_best_gold_answer():
    assert exact_match("the Eiffel Tower.", ["Tower", "Eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert exact_match("Paris", "paris") == 1.0


def test_f1_hand_computed():
    # pred tokens {big, red, dog}, gold {red, dog, barked}: overlap 2, P = R = 2/3
    assert f1_score("the big red dog", "red dog barked") == pytest.approx(2 / 3)
    # max over golds: second gold gives P = 1, R = 2/3 -> F1 = 0.8
    assert f1_score("red dog", ["cat", "red dog runs"]) == pytest.approx(0.8)
    # repeated tokens count by multiplicity: pred (dog, dog), gold (dog): overlap 1, P = 1/2, R = 1 -> 2/3
    assert f1_score("dog dog", "dog") == pytest.approx(2 / 3)
    assert f1_score("a the", "dog") == 0.0  # nothing left after normalisation
    with pytest.raises(ValueError, match="at least one gold answer"):
        f1_score("x", [])


def test_squad_metrics_percentages_and_missing_predictions():
    references = {"q1": ["Denver Broncos"], "q2": ["red dog barked", "a red dog"], "q3": ["1990"]}
    predictions = {"q1": "the Denver Broncos", "q2": "big red dog"}  # q3 missing: scores 0
    scores = squad_metrics(predictions, references)
    # q1: EM 1, F1 1; q2: EM 0, F1 max(2/3 vs {red,dog,barked}: P 2/3 R 2/3 -> 2/3; vs {red,dog}: P 2/3 R 1 -> 0.8)
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.8) / 3)


def test_token_nll_and_perplexity_hand_computed():
    # one sequence of 3 tokens, vocab 2; with shift, positions 0 and 1 predict labels 1 and 2.
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(3), 0.0], [5.0, -5.0]]])  # p = [.25,.75], [.75,.25]
    labels = torch.tensor([[-100, 1, 1]])
    nll, n = token_nll(logits, labels)
    assert n == 2
    assert nll == pytest.approx(-math.log(0.75) - math.log(0.25), rel=1e-6)
    assert perplexity(nll, n) == pytest.approx(1 / math.sqrt(0.75 * 0.25), rel=1e-6)

    # ignore_index is not counted; without shift logits and labels are aligned (seq2seq)
    nll, n = token_nll(logits, torch.tensor([[1, -100, 0]]), shift=False)
    assert n == 2
    assert nll == pytest.approx(-math.log(0.75) - math.log(1 / (1 + math.exp(-10))), rel=1e-5)


def test_uniform_model_has_perplexity_vocab_size():
    vocab = 7
    logits = torch.zeros(2, 5, vocab)
    labels = torch.randint(0, vocab, (2, 5))
    assert perplexity(*token_nll(logits, labels)) == pytest.approx(vocab, rel=1e-6)
    with pytest.raises(ValueError, match="num_tokens must be positive"):
        perplexity(0.0, 0)
