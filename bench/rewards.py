"""Reward throughput: math checks/s (simple and hard answers) and sandboxed executions/s, with 2 workers.

    python bench/rewards.py [--n 2000] [--runs 200]

Prints a table and one JSON line. "simple" answers are integers (the fast path never reaches math-verify);
"simple, math-verify" are the same checks made to go through the worker pool; "hard" are fractions,
intervals, matrices, sets and equations.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewards.code import code_reward, isolation  # noqa: E402
from rewards.math import verify_answers  # noqa: E402
from rewards.pool import shared_pool  # noqa: E402

HARD = [("\\frac{1}{2}", "0.5"), ("[1,2)", "[1, 2)"), ("\\{1,2,3\\}", "\\{3,2,1\\}"), ("x=3", "3"),
        ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
        ("2\\sqrt{2}", "\\sqrt{8}"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("10\\%", "0.1"), ("(x+1)^2", "x^2+2x+1"), ("\\dfrac{3}{4}", "0.75")]


def rate(fn, n: int) -> float:
    fn()  # warm: start the pools, fill caches for imports
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=200)
    args, workers = ap.parse_args(), 2
    shared_pool("rewards.math:check", workers, 3.0).map([("1", "1")])
    golds = [str(i * 7919 % 1000) for i in range(args.n)]
    preds = [str(int(g) + (i % 2)) for i, g in enumerate(golds)]
    hard = (HARD * (args.n // len(HARD) + 1))[:args.n]
    # distinct strings so math-verify's parse cache cannot serve repeats
    hard = [(g + " " * (i // len(HARD) % 50), p) for i, (g, p) in enumerate(hard)]
    results = {
        "math_simple_per_s": rate(lambda: verify_answers(golds, preds, workers=workers), args.n),
        "math_simple_mathverify_per_s": rate(lambda: verify_answers(golds, [p + " " for p in preds],
                                                                    workers=workers), args.n),
        "math_hard_per_s": rate(lambda: verify_answers([g for g, _ in hard], [p for _, p in hard],
                                                       workers=workers), args.n),
        "sandbox_exec_per_s": rate(lambda: code_reward(["def f(x):\n    return x\n"] * args.runs,
                                                       tests=[["assert f(1) == 1"]] * args.runs,
                                                       workers=workers), args.runs),
        "workers": workers, "isolation": isolation(),
    }
    print(f"{'measure':34} {'per second':>12}")
    for k, v in results.items():
        if k.endswith("_per_s"):
            print(f"{k:34} {v:12.1f}")
    print(f"workers={workers} isolation={results['isolation']}")
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
