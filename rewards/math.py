"""Math answers: find the final answer in a completion and check it against the gold with math-verify.

Checks run in a long-lived pool of worker processes (rewards.pool) with a wall-clock timeout each:
math-verify's own timeout is SIGALRM-based (main thread only) and cannot stop C-level big-integer work,
so a pathological answer costs its timeout, scores 0, and its worker is replaced.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from rewards.pool import shared_pool
from rewards.registry import text_of

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (nested braces) or \\boxed x; None if there is none or it is unclosed."""
    for m in reversed(list(_BOXED.finditer(text))):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1:j].strip()
            continue  # unclosed: try an earlier one
        if m.group().endswith(" ") and (tok := re.match(r"[^\s$]+", text[i:])):
            return tok.group().rstrip(".,")
    return None


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+?)\s*(?:\.\s|\.?$|\n)", re.I | re.M)


def answer_tag(text: str) -> str | None:
    """The last <answer>...</answer>; a \\boxed{} or 'the answer is' inside it wins over the whole text."""
    tags = _ANSWER_TAG.findall(text)
    if not tags:
        return None
    inner = tags[-1]
    return last_boxed(inner) or answer_is(inner) or inner.strip()


def answer_is(text: str) -> str | None:
    """What follows the last '(final) answer is', up to the end of the sentence or line."""
    found = _ANSWER_IS.findall(text)
    return found[-1].strip().strip("$").strip() if found else None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "boxed": last_boxed, "answer_tag": answer_tag, "answer_is": answer_is,
}
DEFAULT_EXTRACT = ("boxed", "answer_tag", "answer_is")


def extract_answer(text: str, extract: Sequence[str] = DEFAULT_EXTRACT) -> str | None:
    """The final answer by the first extractor (in `extract` order) that finds one."""
    for name in extract:
        if (ans := EXTRACTORS[name](text)) is not None and ans != "":
            return ans
    return None


def gold_answer(gold: Any) -> str:
    """A gold answer as a bare string: GSM8K's '#### N' and a boxed reference are reduced to the answer."""
    s = str(gold).strip()
    if "####" in s:
        s = s.rsplit("####", 1)[1].strip()
    elif (b := last_boxed(s)) is not None:
        s = b
    return s


# Plain integers need no parser: math-verify's verdict on two of them is exactly int equality (leading
# zeros included; tests/test_rewards_math.py checks this against math-verify). Bounded so int() stays cheap.
_INT = re.compile(r"[+-]?\d{1,100}")


def _fast_verdict(gold: str, pred: str) -> float | None:
    if _INT.fullmatch(gold) and _INT.fullmatch(pred):
        return float(int(gold) == int(pred))
    return None


def check(item: tuple[str, str]) -> float:
    """Worker side: 1.0 if math-verify accepts `pred` for `gold` (both bare LaTeX answers), else 0.0."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    cfg = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold, pred = item
    # A bare answer can parse to nothing: math-verify wants a delimiter, and \boxed{} is the strongest.
    g = parse("\\boxed{" + gold + "}", extraction_config=cfg, parsing_timeout=None)
    p = parse("\\boxed{" + pred + "}", extraction_config=cfg, parsing_timeout=None)
    return float(bool(g and p and verify(g, p, timeout_seconds=None)))


def worker_init() -> None:
    """Run in each new pool worker before it reports ready: imports math-verify and sympy and parses once, so the
    first real item's timeout does not include that (a replacement worker's first item otherwise timed out)."""
    check(("\\frac{1}{2}", "0.5"))


# Verdicts already computed in this process, by (gold, pred). A GRPO group's samples often end in the same
# answer, and RL revisits its prompts, so on MATH-style golds most checks repeat; math-verify costs ~1-5 ms
# each, plus the trip to the pool. Only real verdicts are kept: an item that timed out or crashed is retried.
_VERDICTS: OrderedDict[tuple[str, str], float] = OrderedDict()
_VERDICTS_LOCK = threading.Lock()  # reward functions may run in threads
VERDICT_CACHE_SIZE = 1 << 16


def forget_verdicts() -> None:
    """Empty the memo (benchmarks that time the checks, tests)."""
    with _VERDICTS_LOCK:
        _VERDICTS.clear()


def verify_answers(golds: Sequence[Any], preds: Sequence[str | None], timeout: float = 3.0,
                   workers: int = 2) -> list[float]:
    """Score bare answers against golds: 1.0 / 0.0; a missing, unparsable or timed-out answer is 0. Integers are
    compared here; each other distinct (gold, pred) pair goes to math-verify in the pool once (then memoised)."""
    golds = [gold_answer(g) for g in golds]
    scores: list[float | None] = [None if p is None else _fast_verdict(g, p)
                                  for g, p in zip(golds, preds, strict=True)]
    slow: dict[tuple[str, str], float | None] = {
        (golds[i], p): None for i, (s, p) in enumerate(zip(scores, preds, strict=True)) if s is None and p is not None}
    with _VERDICTS_LOCK:
        for k in slow:
            if k in _VERDICTS:
                slow[k] = _VERDICTS[k]
                _VERDICTS.move_to_end(k)
    todo = [k for k, v in slow.items() if v is None]
    if todo:
        pool = shared_pool("rewards.math:check", workers, timeout)
        verdicts = pool.map(todo, default=None)  # None: timed out or crashed
        with _VERDICTS_LOCK:
            for k, r in zip(todo, verdicts, strict=True):
                slow[k] = r
                if r is not None:
                    _VERDICTS[k] = r
            while len(_VERDICTS) > VERDICT_CACHE_SIZE:
                _VERDICTS.popitem(last=False)
    return [(slow[(g, p)] if s is None and p is not None else s) or 0.0
            for g, p, s in zip(golds, preds, scores, strict=True)]


def math_reward(completions: list, answer: list, extract: Sequence[str] = DEFAULT_EXTRACT, timeout: float = 3.0,
                workers: int = 2, **_: Any) -> list[float]:
    """1.0 where the completion's final answer equals the gold `answer` column mathematically, else 0.0."""
    preds = [extract_answer(text_of(c), extract) for c in completions]
    return verify_answers(answer, preds, timeout, workers)
