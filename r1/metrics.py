"""Evaluation statistics as pure functions over plain Python lists.

One problem has n sampled answers; `correct[j]` says whether sample j was graded right and `answers[j]`
is its vote key (any hashable key; None when nothing could be extracted). The caller makes keys equal
exactly for the same answer (r1.eval.vote_keys puts "1/2" and "0.5" together, 5 apart); here equal keys
mean equal answers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, Codex paper):

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

    The product form avoids huge binomials. pass@1 = c / n, which is DeepSeek-R1's "pass@1 averaged
    over k samples".
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems; `correct[p][j]`: sample j of problem p is right."""
    return sum(pass_at_k(len(row), sum(map(bool, row)), k) for row in correct) / len(correct)


def majority_index(answers: Sequence[Hashable | None]) -> int | None:
    """Index of the first sample carrying the most frequent answer; None if no sample has an answer.

    Samples without an answer (None) do not vote. Ties go to the answer that occurs first, so the result
    is deterministic and does not depend on hash order.
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    first = {}
    for j, a in enumerate(answers):
        first.setdefault(a, j)
    best = max(counts, key=lambda a: (counts[a], -first[a]))
    return first[best]


def maj_at_k(answers: Sequence[Hashable | None], correct: Sequence[bool], k: int | None = None) -> bool:
    """maj@k (also called cons@k): is the majority answer of the first k samples correct?

    The majority answer's correctness is that of its first sample (samples with equal keys are graded
    alike). No extracted answer at all counts as wrong. k = None uses all samples.
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    k = len(answers) if k is None else k
    if not 1 <= k <= len(answers):
        raise ValueError(f"need 1 <= k <= {len(answers)}, got k={k}")
    j = majority_index(answers[:k])
    return j is not None and bool(correct[j])


cons_at_k = maj_at_k


def mean_maj_at_k(
    answers: Sequence[Sequence[Hashable | None]], correct: Sequence[Sequence[bool]], k: int | None = None
) -> float:
    """maj@k averaged over problems."""
    return sum(maj_at_k(a, c, k) for a, c in zip(answers, correct, strict=True)) / len(answers)


def group_means(values: Sequence[float], groups: Sequence[Hashable]) -> dict[Hashable, float]:
    """Mean of `values` per group key (a level, a subject), keys in order of first appearance.

    e.g. group_means(per-problem pass@1, per-problem level) for the MATH-500 breakdown table.
    """
    sums: dict[Hashable, float] = {}
    counts: dict[Hashable, int] = {}
    for v, g in zip(values, groups, strict=True):  # a length mismatch is a ValueError
        sums[g] = sums.get(g, 0.0) + float(v)
        counts[g] = counts.get(g, 0) + 1
    return {g: sums[g] / counts[g] for g in sums}
