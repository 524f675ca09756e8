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

# Extraction runs in the trainer's process, outside the pool's timeout, on whatever the policy wrote (RL's
# repetition loops included): each extractor reads only the last TAIL_CHARS characters, where a final answer
# is, in one pass with no backtracking regex. An answer followed by more than this much text is not seen.
TAIL_CHARS = 1 << 15
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_BRACE = re.compile(r"[{}]")
_BARE_TOKEN = re.compile(r"[^\s$]+")


def _closing_braces(text: str) -> dict[int, int]:
    """Position of each '{' -> the '}' that closes it (braces that never close are absent), in one pass."""
    close: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            close[stack.pop()] = m.start()
    return close


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (nested braces) or \\boxed x; None if there is none or it is unclosed."""
    text = text[-TAIL_CHARS:]
    heads = list(_BOXED.finditer(text))
    close = _closing_braces(text) if heads else {}
    for m in reversed(heads):
        i = m.end()
        if i < len(text) and text[i] == "{":
            if (j := close.get(i)) is not None:
                return text[i + 1:j].strip()
            continue  # unclosed: try an earlier one
        if m.group().endswith(" ") and (tok := _BARE_TOKEN.match(text, i)):
            return tok.group().rstrip(".,")
    return None


def answer_tag(text: str) -> str | None:
    """The last <answer>...</answer>; a \\boxed{} or 'the answer is' inside it wins over the whole text."""
    text = text[-TAIL_CHARS:]
    start = text.rfind("<answer>", 0, max(text.rfind("</answer>"), 0))
    if start < 0:
        return None
    start += len("<answer>")
    inner = text[start:text.index("</answer>", start)]
    return last_boxed(inner) or answer_is(inner) or inner.strip()


_ANSWER_IS = re.compile(r"answer\s+is", re.I)
_SPACE = re.compile(r"\s*")
_SENTENCE_END = re.compile(r"\.(?:\s|$)")  # searched within one line


def answer_is(text: str) -> str | None:
    """What follows the last '(final) answer is' (and an optional colon), up to the end of the sentence or line."""
    text = text[-TAIL_CHARS:]
    content_end = len(text.rstrip("\n"))
    last = None
    for m in _ANSWER_IS.finditer(text):
        if m.end() < content_end:  # something other than newlines follows
            last = m
    if last is None:
        return None
    i = _SPACE.match(text, last.end()).end()
    if text.startswith(":", i):
        i = _SPACE.match(text, i + 1).end()
    line_end = text.find("\n", i)
    line = text[i:line_end if line_end >= 0 else len(text)]
    if stop := _SENTENCE_END.search(line, 1):  # the answer's own first character may be a '.', as in ".5"
        line = line[:stop.start()]
    return line.strip().strip("$").strip()


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
_MEMO_COUNTS = {"hits": 0, "misses": 0}  # distinct non-integer pairs looked up in the memo, since forget_verdicts


def forget_verdicts() -> None:
    """Empty the memo and its hit counts (benchmarks that time the checks, tests)."""
    with _VERDICTS_LOCK:
        _VERDICTS.clear()
        _MEMO_COUNTS.update(hits=0, misses=0)


def memo_counts() -> tuple[int, int]:
    """(hits, misses): distinct non-integer (gold, pred) pairs the memo answered / sent on, since `forget_verdicts`."""
    with _VERDICTS_LOCK:
        return _MEMO_COUNTS["hits"], _MEMO_COUNTS["misses"]


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
                _MEMO_COUNTS["hits"] += 1
            else:
                _MEMO_COUNTS["misses"] += 1
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
