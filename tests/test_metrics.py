"""Evaluation metrics against values computed by hand."""

from __future__ import annotations

from fractions import Fraction

import pytest

from r1lab.metrics import (
    answer_groups,
    cons_at_k,
    length_stats,
    majority_vote,
    mean_or_none,
    mean_pass_at_1,
    mean_pass_at_k,
    pass_at_1_stderr,
    pass_at_k,
    truncation_rate,
)

T, F = True, False


def same_number(a: str, b: str) -> bool:
    return Fraction(a) == Fraction(b)


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 2, 1, 0.4),  # c/n
        (10, 3, 4, 5 / 6),  # 1 - C(7,4)/C(10,4) = 1 - 35/210
        (4, 0, 2, 0.0),
        (4, 3, 2, 1.0),  # only one wrong sample: any two contain a correct one
        (4, 4, 4, 1.0),
        (200, 1, 100, 0.5),  # 1 - C(199,100)/C(200,100) = 1 - 100/200
        (1, 1, 1, 1.0),
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    # C(1000, 500) overflows a float; the product form does not: 1 - C(990,500)/C(1000,500).
    value = pass_at_k(1000, 10, 500)
    assert 0.999 < value <= 1.0


@pytest.mark.parametrize("n, c, k", [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_pass_at_1_and_k():
    correct = [[T, F, F, F], [T, T, T, F]]
    assert mean_pass_at_1(correct) == pytest.approx(0.5)  # (1/4 + 3/4) / 2
    rows = [[T, F, F, F], [F, F, F, F]]
    assert mean_pass_at_k(rows, 4) == pytest.approx(0.5)  # (1 + 0) / 2
    assert mean_pass_at_k(rows, 2) == pytest.approx(0.25)  # (1 - C(3,2)/C(4,2)) / 2 = 0.5 / 2
    assert mean_pass_at_k(rows, 1) == pytest.approx(mean_pass_at_1(rows))


def test_pass_at_1_stderr():
    assert pass_at_1_stderr([[T], [F]]) == pytest.approx(0.5)  # sqrt(0.5 / 2)
    assert pass_at_1_stderr([[T, F]]) == 0.0


def test_empty_inputs_are_errors():
    with pytest.raises(ValueError, match="no questions"):
        mean_pass_at_1([])
    with pytest.raises(ValueError, match="no samples"):
        mean_pass_at_1([[T], []])


def test_cons_groups_equivalent_answers():
    # "0.5" and "1/2" are the same number: two votes against one.
    answers = [["0.5", "1/2", "3", None]]
    assert cons_at_k(answers, [[T, T, F, F]], equivalent=same_number) == 1.0
    # Under plain string equality they are three groups of one: the earliest wins.
    assert cons_at_k(answers, [[F, T, T, F]]) == 0.0
    assert answer_groups(answers[0], same_number) == [[0, 1], [2]]


def test_cons_tie_goes_to_the_earliest_group():
    answers = [["3", "0.5", "3", "1/2"]]  # 3 x2 and 1/2 x2: "3" appeared first
    assert majority_vote(answers[0], same_number) == 0
    assert cons_at_k(answers, [[F, T, F, T]], equivalent=same_number) == 0.0


def test_cons_none_never_wins():
    assert majority_vote([None, None, None, "7"]) == 3
    assert cons_at_k([[None, None, None, "7"]], [[F, F, F, T]]) == 1.0
    assert majority_vote([None, None]) is None
    assert cons_at_k([[None, None]], [[F, F]]) == 0.0


def test_cons_over_several_questions():
    answers = [["1", "1", "2"], ["5", "6", "6"], [None, None, "9"]]
    correct = [[T, T, F], [T, F, F], [F, F, F]]
    assert cons_at_k(answers, correct) == pytest.approx(1 / 3)


def test_cons_identical_strings_skip_the_check():
    calls = []

    def equivalent(a, b):
        calls.append((a, b))
        return a == b

    answer_groups(["4", "4", "4", "5", "5"], equivalent)
    assert calls == [("4", "5")]


def test_cons_shape_mismatch():
    with pytest.raises(ValueError, match="2 questions"):
        cons_at_k([["1"], ["2"]], [[T]])
    with pytest.raises(ValueError, match="2 answers but 1"):
        cons_at_k([["1", "2"]], [[T]])


def test_aggregates():
    assert truncation_rate(["stop", "length", "stop", "stop"]) == 0.25
    assert mean_or_none([1.0, None, 0.0]) == 0.5
    assert mean_or_none([None]) is None
    assert length_stats([4, 1, 3, 2]) == {"mean": 2.5, "median": 2.5, "max": 4}
    assert length_stats([]) == {"mean": 0.0, "median": 0.0, "max": 0}
