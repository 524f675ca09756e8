"""Math reward: extraction, a table of formats and traps, the benchmark files, fast path, pathological inputs."""

import json
import os
import random
import time
from pathlib import Path

import pytest

from rewards.format import format_reward, language_reward
from rewards.math import (
    answer_is,
    extract_answer,
    forget_verdicts,
    gold_answer,
    last_boxed,
    math_reward,
    memo_counts,
    verify_answers,
)
from rewards.pool import WorkerPool, shared_pool

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
B = lambda s: f"So the result follows. \\boxed{{{s}}}"  # noqa: E731 - a completion ending in a boxed answer

# (completion, gold, expected score)
CASES = [
    # integers: leading zeros, commas, signs, dollars
    (B("25"), "025", 1.0), (B("025"), "25", 1.0), (B("1,000"), "1000", 1.0), (B("1000"), "1,000", 1.0),
    (B("-7"), "-7", 1.0), (B("7"), "-7", 0.0), (B("\\$5"), "5", 1.0), (B("5"), "\\$5", 1.0),
    (B("1{,}234"), "1234", 1.0), (B("12"), "12.0", 1.0),
    # fractions, decimals, \dfrac, mixed numbers
    (B("\\frac{1}{2}"), "0.5", 1.0), (B("0.5"), "\\frac12", 1.0), (B("\\dfrac{3}{4}"), "\\frac{3}{4}", 1.0),
    (B("\\tfrac{3}{4}"), "0.75", 1.0), (B("2\\frac{1}{2}"), "\\frac52", 1.0), (B("2.5"), "2\\frac{1}{2}", 1.0),
    (B("3/4"), "\\frac{3}{4}", 1.0), (B("0.333"), "0.3333", 0.0), (B("\\frac{2}{4}"), "\\frac{1}{2}", 1.0),
    # percentages: "50\\%" is 0.5, a bare 50 is not (peers' percentage rule would accept it; we do not)
    (B("50\\%"), "0.5", 1.0), (B("0.5"), "50\\%", 1.0), (B("50"), "0.5", 0.0), (B("50\\%"), "50\\%", 1.0),
    # intervals
    (B("[1,2)"), "[1,2)", 1.0), (B("(1,2)"), "[1,2)", 0.0), (B("(-\\infty, 3]"), "(-\\infty,3]", 1.0),
    (B("(-\\infty, 3)"), "(-\\infty,3]", 0.0), (B("[2,5]"), "[2, 5]", 1.0),
    # sets (unordered) and tuples (ordered)
    (B("\\{1,2,3\\}"), "\\{3,2,1\\}", 1.0), (B("\\{1,2\\}"), "\\{1,2,3\\}", 0.0), (B("3, 1, 2"), "1,2,3", 1.0),
    (B("(1,2)"), "(1,2)", 1.0), (B("(2,1)"), "(1,2)", 0.0),
    (B("(3, \\frac{\\pi}{2})"), "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
    (B("(3,4,5)"), "(3,5,4)", 0.0),
    # matrices
    (B("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"), "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", 1.0),
    (B("\\begin{pmatrix}1&3\\\\2&4\\end{pmatrix}"), "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", 0.0),
    (B("\\begin{bmatrix}2\\\\-1\\end{bmatrix}"), "\\begin{pmatrix}2\\\\-1\\end{pmatrix}", 1.0),
    # equations against values
    (B("x = 3"), "3", 1.0), (B("3"), "x=3", 1.0), (B("x=4"), "3", 0.0), (B("y = 2x + 1"), "y=2x+1", 1.0),
    # units, degrees, text
    (B("10\\text{ cm}"), "10", 1.0), (B("30^\\circ"), "30", 1.0), (B("30^{\\circ}"), "30^\\circ", 1.0),
    (B("\\text{(C)}"), "\\text{(C)}", 1.0), (B("\\text{Evelyn}"), "\\text{Evelyn}", 1.0), (B("B"), "\\text{(C)}", 0.0),
    # symbolic
    (B("2\\sqrt{2}"), "\\sqrt{8}", 1.0), (B("\\frac{\\sqrt{3}}{2}"), "\\frac{\\sqrt3}{2}", 1.0),
    (B("\\pi"), "3.14", 0.0),
    (B("x^2+2x+1"), "(x+1)^2", 1.0), (B("p - q"), "p-q", 1.0), (B("4\\sqrt{2}"), "4", 0.0),
    # false-positive traps
    (B("1"), "11", 0.0), (B("11"), "1", 0.0), (B("\\frac{1}{2}"), "2", 0.0), (B("2"), "\\frac12", 0.0),
    (B("1, 2, 3"), "2", 0.0), (B("x^2-1=0"), "x+1=0", 0.0), ("The answer is 5, not \\boxed{6}.", "5", 0.0),
    ("\\boxed{5} ... wait, actually \\boxed{7}", "5", 0.0), ("no answer here", "5", 0.0), (B(""), "0", 0.0),
    # extraction: nested braces, answer tags, "the answer is", \boxed without braces, conversational form
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt2}", 1.0), ("<think>2+2</think><answer>4</answer>", "4", 1.0),
    ("<think>x</think><answer>The answer is $\\frac{1}{3}$.</answer>", "1/3", 1.0),
    ("So the final answer is 42.", "42", 1.0), ("Thus $\\boxed 7$.", "7", 1.0),
    ([{"role": "assistant", "content": B("9")}], "9", 1.0), (B("18"), "Janet makes 9*2 = 18\n#### 18", 1.0),
]


def test_table():
    got = math_reward([c for c, _, _ in CASES], [g for _, g, _ in CASES])
    wrong = [(c, g, e, s) for (c, g, e), s in zip(CASES, got, strict=True) if s != e]
    assert not wrong, wrong


def test_answer_is():
    assert answer_is("So the answer is .5. Done") == ".5"  # a leading dot is the answer's, a final one is not
    assert answer_is("The final answer is: $\\frac{3}{4}$.\nCheck: ok") == "\\frac{3}{4}"
    assert answer_is("the answer is\n\n42") == "42"
    assert answer_is("the answer is 5. Then again, the answer is 7.") == "7"
    assert answer_is("I would say the answer is that the answer is 12.") == "12"  # the last statement
    assert answer_is("the answer is 5.\nbut what is the answer is\n\n") == "5"  # the last one has no answer
    assert answer_is("the answer is x = 2.5 cm") == "x = 2.5 cm"
    assert answer_is("no final statement") is None


# Repetition loops, common early in RL, that made a regex backtrack or rescan (7 to 75 s for one call at these
# sizes): extraction and the format rewards run in the trainer's process, outside the pool's timeout.
REPETITIVE = {
    "unclosed boxed": "\\boxed{" * 20000,
    "unclosed boxed in an answer tag": "<answer>" + "\\boxed{" * 20000 + "</answer>",
    "unclosed answer tags": "<answer>" * 20000,
    "answer is, then spaces": "the answer is" + " " * 200000 + "x",
    "spaces inside the answer line": "the answer is 5" + " " * 30000 + "x",  # within the tail extraction reads
    "spaces inside a long answer line": "the answer is 5" + " " * 200000 + "x",
    "answer is, then newlines": "the answer is" + "\n" * 200000,
    "newlines inside the tail": "the answer is" + "\n" * 30000,
    "answer is, repeated": "the answer is " * 20000,
    "boxed without braces": "\\boxed $" * 60000,
}
REPETITIVE_FORMAT = {
    "closing tags repeated": "<think>" + "</think><answer>" * 20000,
    "closing tags repeated, think in prompt": "</think>" + " " * 20000 + "x</think><answer>" * 20000,
    "unclosed \\(": "\\(" * 20000,
    "unclosed \\[": "\\[" * 20000,
}


def _seconds(fn, *args, **kw) -> float:
    t = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t


@pytest.mark.parametrize("name", REPETITIVE)
def test_extraction_is_linear_and_bounded(name):
    text = REPETITIVE[name]
    for extract in [("boxed",), ("answer_tag",), ("answer_is",), ("boxed", "answer_tag", "answer_is")]:
        assert _seconds(extract_answer, text, extract) < 0.5, extract
    # an answer after the loop is still found
    assert extract_answer(text + " so \\boxed{7}") == "7"


@pytest.mark.parametrize("name", REPETITIVE_FORMAT)
def test_format_rewards_are_linear(name):
    text = REPETITIVE_FORMAT[name]
    assert _seconds(format_reward, [text]) < 0.5
    assert _seconds(format_reward, [text], think_in_prompt=True) < 0.5
    assert _seconds(language_reward, [text]) < 0.5


def test_extraction():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"
    assert last_boxed("\\boxed{unclosed") is None
    assert extract_answer("<answer>7</answer>", ("answer_tag",)) == "7"
    assert extract_answer("\\boxed{3} <answer>7</answer>", ("answer_tag", "boxed")) == "7"
    assert extract_answer("the answer is 7", ("boxed",)) is None
    assert gold_answer("work\n#### 1,234") == "1,234"


def test_fast_path_matches_math_verify():
    """The integer fast path must give math-verify's verdict: compare on pairs that skip it (a trailing space
    defeats the fast path's regex but not math-verify's parser)."""
    rng = random.Random(0)
    nums = [str(rng.randint(-10**6, 10**6)) for _ in range(60)] + ["007", "7", "0", "-0", "+5", "5", "10" * 30]
    pairs = [(a, b) for a in nums[:40] for b in rng.sample(nums, 3)] + [(a, a) for a in nums]
    pairs += [(a, a.lstrip("+-0") or "0") for a in nums]
    fast = verify_answers([a for a, _ in pairs], [b for _, b in pairs])
    slow = verify_answers([a for a, _ in pairs], [b + " " for _, b in pairs])
    assert fast == slow


def _rows(name):
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} not found (benchmark data lives in ../shared/data)")
    return [json.loads(line) for line in path.open()]


def _other(golds, i):
    """The next problem whose answer has a different value (a bare string compare would not do: 5 vs x=5)."""
    norm = lambda s: s.replace(" ", "").split("=")[-1]  # noqa: E731
    j = (i + 1) % len(golds)
    while norm(golds[j]) == norm(golds[i]):
        j = (j + 1) % len(golds)
    return golds[j]


def test_math500():
    rows = _rows("math500.jsonl")
    golds = [r["answer"] for r in rows]
    accepted = sum(verify_answers(golds, [last_boxed(r["solution"]) for r in rows]))
    rejected = len(rows) - sum(verify_answers(golds, [_other(golds, i) for i in range(len(golds))]))
    assert accepted >= 498 and rejected >= 498, (accepted, rejected)


def test_math500_completions():
    """MATH-500's gold answers as a model would end its completion: every one scores against its own problem,
    none against another problem's answer; a long chain of thought before the answer changes nothing."""
    rows = _rows("math500.jsonl")
    golds = [r["answer"] for r in rows]
    others = [_other(golds, i) for i in range(len(golds))]
    forms = {
        "solution": [r["solution"] for r in rows],  # MATH's own text, ending in its boxed answer
        "answer is": [f"Thus the final answer is ${g}$." for g in golds],
        "answer tag": [f"<think>work</think><answer>{g}</answer>" for g in golds],
        "long thought": ["Let me check this again. " * 3000 + r["solution"] for r in rows],
    }
    for name, completions in forms.items():
        assert sum(math_reward(completions, golds)) == 500, name
        assert sum(math_reward(completions, others)) == 0, name


@pytest.mark.parametrize("name", ["aime24.jsonl", "aime25.jsonl"])
def test_aime(name):
    golds = [str(r["answer"]) for r in _rows(name)]
    assert sum(verify_answers(golds, golds)) == 30
    assert sum(verify_answers(golds, [_other(golds, i) for i in range(30)])) == 0
    # as a model would write them: boxed, without the leading zeros
    assert sum(math_reward([B(int(g)) for g in golds], golds)) == 30


def test_gsm8k():
    rows = _rows("gsm8k_test.jsonl")
    golds = [r["answer"] for r in rows]
    nums = [gold_answer(g) for g in golds]
    assert sum(verify_answers(golds, nums)) == len(rows) == 1319
    assert sum(verify_answers(golds, [_other(nums, i) for i in range(len(nums))])) == 0


PATHOLOGICAL = [
    "5^{5^{5^{5}}}", "9^{9^{9^{9}}}", "10^{10^{10^{10}}}", "(10^{100})!", "2^{2^{2^{2^{2^{2}}}}}",
    "{" * 300 + "1" + "}" * 300, "(" * 500 + "1" + ")" * 500, "\\sum_{k=1}^{10^{12}} k^{k}",
    "\\prod_{k=1}^{10^9} k", "\\frac{" * 200 + "1" + "}{2}" * 200, "(10^{10^{10}})!", "7^{7^{7^{7}}}",
    "\\begin{pmatrix}" + "\\\\".join("&".join(f"x_{{{i}{j}}}" for j in range(30)) for i in range(30))
    + "\\end{pmatrix}^{100}",
]


def test_pathological_batch():
    timeout, workers = 0.5, 2
    answers = (PATHOLOGICAL * 4)[:50]
    pid = os.getpid()
    t = time.monotonic()
    scores = verify_answers(["1"] * 50, answers, timeout=timeout, workers=workers)
    elapsed = time.monotonic() - t
    assert scores == [0.0] * 50
    # each item costs at most its timeout plus, when it was killed, a worker restart (a fresh interpreter that
    # imports and warms math-verify before taking work: ~0.3-0.6 s here)
    assert elapsed < (timeout + 1.0) * 50 / workers, elapsed
    # the replacement workers answer at once: a legitimate item right after the kills scores (before workers
    # warmed up, its timeout also had to cover math-verify's import, and under load it scored 0)
    assert os.getpid() == pid and verify_answers(["\\frac12"], ["0.5"], timeout=timeout) == [1.0]


def test_repeated_pairs_go_to_the_pool_once_and_timeouts_are_retried(monkeypatch):
    import rewards.math as rm

    monkeypatch.setattr(rm, "_VERDICTS", rm.OrderedDict())
    sent = []

    class Counting:  # the real pool, recording what is sent to it
        def __init__(self, *a, **k):
            self.pool = shared_pool(*a, **k)

        def map(self, items, default=None):
            sent.append(list(items))
            return self.pool.map(items, default)

    monkeypatch.setattr(rm, "shared_pool", Counting)
    golds = ["\\frac12"] * 8 + ["\\frac13"] * 8 + ["4"]
    preds = ["0.5"] * 5 + ["1/3"] * 3 + ["1/3"] * 8 + ["4"]
    want = [1.0] * 5 + [0.0] * 3 + [1.0] * 8 + [1.0]
    assert verify_answers(golds, preds) == want
    assert sent == [[("\\frac12", "0.5"), ("\\frac12", "1/3"), ("\\frac13", "1/3")]]  # distinct, not integers
    assert verify_answers(golds, preds) == want and len(sent) == 1  # memoised: no second trip
    # a timed-out item has no verdict to keep: it scores 0 and is tried again next time
    slow = "(10^{10^{10}})!"
    assert verify_answers(["1", "1"], [slow, slow], timeout=0.5) == [0.0, 0.0]
    assert verify_answers(["1"], [slow], timeout=0.5) == [0.0]
    assert sent[1:] == [[("1", slow)], [("1", slow)]]
    assert ("1", slow) not in rm._VERDICTS


def test_memo_counts_its_hits():
    forget_verdicts()
    golds, preds = ["\\frac12", "\\frac12", "\\frac12", "3"], ["0.5", "1/3", "0.5", "3"]  # 2 distinct pairs, 1 integer
    assert verify_answers(golds, preds) == [1.0, 0.0, 1.0, 1.0] and memo_counts() == (0, 2)
    assert verify_answers(golds, preds) == [1.0, 0.0, 1.0, 1.0] and memo_counts() == (2, 2)
    forget_verdicts()
    assert memo_counts() == (0, 0)


def test_dead_worker_is_replaced():
    pool = WorkerPool("os:_exit", workers=1, timeout=5)  # every item kills its worker
    try:
        assert pool.map([0, 0, 0], default=-1) == [-1, -1, -1] and pool.crashes == 3
    finally:
        pool.close()
    assert shared_pool("rewards.math:check", 2, 3.0).map([("2", "2")]) == [1.0]


def test_worker_init_does_not_count_against_the_first_item(monkeypatch):
    """A target module's worker_init (math-verify's import and first parse, here a 1 s sleep) runs before the worker
    takes work: the first item of a fresh worker gets its whole timeout."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", tests_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
    pool = WorkerPool("_slowinit:one", workers=1, timeout=0.5)
    try:
        assert pool.map([0, 0], default=0.0) == [1.0, 1.0] and pool.timeouts == 0
    finally:
        pool.close()


def test_interrupted_item_never_scores_even_if_the_target_swallows_the_timeout(monkeypatch):
    """A target that catches the soft-timeout exception and returns 1.0 (math-verify falls back to another
    extraction when interrupted mid-parse) still scores the default."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", tests_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
    pool = WorkerPool("_swallow:swallow", workers=1, timeout=2.0)  # soft alarm at 0.8 x 2 s = 1.6 s
    try:
        assert pool.map([0.0, 1.9, 0.0], default=0.0) == [0.5, None, 0.5]  # None, as for a raising item
    finally:
        pool.close()
