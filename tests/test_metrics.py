import math

import pytest

from r1.metrics import (
    cons_at_k,
    group_means,
    maj_at_k,
    majority_index,
    mean_maj_at_k,
    mean_pass_at_k,
    pass_at_k,
)


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 2, 1 - 3 / 10),  # C(3,2) / C(5,2) = 3 / 10
        (10, 3, 5, 1 - 21 / 252),  # C(7,5) / C(10,5) = 21 / 252
        (4, 1, 1, 0.25),  # pass@1 = c / n
        (5, 0, 3, 0.0),  # nothing correct
        (5, 4, 2, 1.0),  # n - c = 1 < k: every pair has a correct sample
        (5, 5, 5, 1.0),
    ],
)
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    # C(1000, 10) overflows a float; the product form must still match the exact rational
    exact = 1 - math.comb(500, 10) / math.comb(1000, 10)
    assert pass_at_k(1000, 500, 10) == pytest.approx(exact, rel=1e-12)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_mean_pass_at_k():
    correct = [[True, False, False, False], [True, True, False, False]]
    # pass@1: (1/4 + 2/4) / 2
    assert mean_pass_at_k(correct, 1) == pytest.approx(0.375)
    # pass@2: 1 - C(3,2)/C(4,2) = 1/2 and 1 - C(2,2)/C(4,2) = 5/6 -> mean 2/3
    assert mean_pass_at_k(correct, 2) == pytest.approx(2 / 3)


def test_majority_ties_go_to_the_first_answer_and_none_does_not_vote():
    assert majority_index(["b", "a", "a", "b"]) == 0  # 2-2 tie: "b" came first
    assert majority_index(["a", "b", "b", "a"]) == 0
    assert majority_index([None, None, "x", "y", "y"]) == 3  # two Nones do not beat "y"
    assert majority_index([None, None]) is None


def test_maj_at_k():
    answers = ["7", "5", "5", None, "7", "7"]
    correct = [True, False, False, False, True, True]
    assert maj_at_k(answers, correct) is True  # "7" x3 beats "5" x2
    assert maj_at_k(answers, correct, k=3) is False  # first 3: "5" x2 beats "7" x1
    assert maj_at_k(answers, correct, k=1) is True
    assert maj_at_k([None, None], [False, False]) is False
    assert cons_at_k(answers, correct, k=3) is False
    with pytest.raises(ValueError):
        maj_at_k(answers, correct, k=7)


def test_mean_maj_at_k():
    answers = [["1", "2", "2"], ["3", "3", "4"]]
    correct = [[True, False, False], [True, True, False]]
    # problem 1: majority "2" is wrong; problem 2: majority "3" is right
    assert mean_maj_at_k(answers, correct) == pytest.approx(0.5)


def test_group_means():
    means = group_means([1.0, 0.0, 1.0, 1.0, 0.5], ["L2", "L1", "L2", "L1", "L3"])
    assert means == {"L2": 1.0, "L1": 0.5, "L3": 0.5}
    assert list(means) == ["L2", "L1", "L3"]  # order of first appearance
    with pytest.raises(ValueError):
        group_means([1.0], ["a", "b"])
