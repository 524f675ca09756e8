"""Reward throughput: math checks/s (simple and hard answers) and sandboxed executions/s, with 2 workers.

    python bench/rewards.py [--n 2000] [--runs 200]

Prints a table and one JSON line. "simple" answers are integers (the fast path never reaches math-verify);
"simple, math-verify" are the same checks made to go through the worker pool; "hard" are fractions,
intervals, matrices, sets and equations. Every math-verify rate is timed on distinct pairs the verdict memo has
not seen (its hit rate in those runs is printed: 0); "hard, memoised" scores the same hard pairs again, as RL
revisiting its prompts does, with the memo's hit rate.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewards.code import code_reward, isolation  # noqa: E402
from rewards.math import forget_verdicts, memo_counts, verify_answers  # noqa: E402

HARD = [("\\frac{1}{2}", "0.5"), ("[1,2)", "[1, 2)"), ("\\{1,2,3\\}", "\\{3,2,1\\}"), ("x=3", "3"),
        ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
        ("2\\sqrt{2}", "\\sqrt{8}"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("10\\%", "0.1"), ("(x+1)^2", "x^2+2x+1"), ("\\dfrac{3}{4}", "0.75")]


def rate(fn, n: int) -> float:
    fn()  # warm: start the pools, fill caches for imports
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def math_rate(golds: list[str], preds: list[str], workers: int) -> tuple[float, float]:
    """Checks/s of one call, and the share of its distinct math-verify pairs that the verdict memo answered."""
    hits, misses = memo_counts()
    t = time.perf_counter()
    verify_answers(golds, preds, workers=workers)
    elapsed = time.perf_counter() - t
    hits, misses = (now - before for now, before in zip(memo_counts(), (hits, misses), strict=True))
    return len(golds) / elapsed, hits / max(hits + misses, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=200)
    args, workers = ap.parse_args(), 2
    verify_answers([g for g, _ in HARD], [p for _, p in HARD], workers=workers)  # warm: pool, imports, first parses
    golds = [str(i * 7919 % 1000 + 1000 * (i // 1000)) for i in range(args.n)]  # distinct
    preds = [str(int(g) + (i % 2)) for i, g in enumerate(golds)]
    hard = (HARD * (args.n // len(HARD) + 1))[:args.n]
    # distinct pairs, none of them the warm-up's, so that the verdict memo cannot serve repeats
    hard_golds = [g + " " * (1 + i // len(HARD)) for i, (g, _) in enumerate(hard)]
    hard_preds = [p + " " * (1 + i // len(HARD)) for i, (_, p) in enumerate(hard)]
    forget_verdicts()  # the timed pairs are new to the memo
    simple_mv, simple_mv_hits = math_rate(golds, [p + " " * (1 + i % 2) for i, p in enumerate(preds)], workers)
    hard_rate, hard_hits = math_rate(hard_golds, hard_preds, workers)
    memo_rate, memo_hits = math_rate(hard_golds, hard_preds, workers)  # the same hard pairs again
    results = {
        "math_simple_per_s": rate(lambda: verify_answers(golds, preds, workers=workers), args.n),
        "math_simple_mathverify_per_s": simple_mv, "math_simple_mathverify_memo_hit_rate": simple_mv_hits,
        "math_hard_per_s": hard_rate, "math_hard_memo_hit_rate": hard_hits,
        "math_hard_memoised_per_s": memo_rate, "math_hard_memoised_memo_hit_rate": memo_hits,
        "sandbox_exec_per_s": rate(lambda: code_reward(["def f(x):\n    return x\n"] * args.runs,
                                                       tests=[["assert f(1) == 1"]] * args.runs,
                                                       workers=workers), args.runs),
        "workers": workers, "isolation": isolation(),
    }
    print(f"{'measure':34} {'per second':>12}")
    for k, v in results.items():
        if k.endswith("_per_s"):
            print(f"{k:34} {v:12.1f}   memo hit rate {results[k[:-6] + '_memo_hit_rate']:.2f}"
                  if k[:-6] + "_memo_hit_rate" in results else f"{k:34} {v:12.1f}")
    print(f"workers={workers} isolation={results['isolation']}")
    print(json.dumps({k: round(v, 3 if k.endswith("_rate") else 1) if isinstance(v, float) else v
                      for k, v in results.items()}))


if __name__ == "__main__":
    main()
