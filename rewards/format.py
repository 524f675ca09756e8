"""Format and shape rewards: R1's <think>/<answer> format, tag counts, language consistency, length terms."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from rewards.registry import text_of

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.S)
_FORMAT_OPEN = re.compile(r".*?</think>\s*<answer>.*?</answer>\s*", re.S)  # <think> was in the prompt


def format_reward(completions: list, think_in_prompt: bool = False, **_: Any) -> list[float]:
    """1.0 for '<think>...</think><answer>...</answer>' and nothing else (each tag exactly once), else 0.0.

    With think_in_prompt the template already opened <think>, so the completion starts inside it.
    """
    pattern = _FORMAT_OPEN if think_in_prompt else _FORMAT
    need = {t: 1 for t in _TAGS} | ({"<think>": 0} if think_in_prompt else {})
    out = []
    for c in completions:
        t = text_of(c)
        # counts first: with each tag once the lazy pattern is linear; with repeated tags it is quadratic
        ok = all(t.count(tag) == n for tag, n in need.items()) and pattern.fullmatch(t) is not None
        out.append(float(ok))
    return out


def tag_count_reward(completions: list, **_: Any) -> list[float]:
    """0.25 for each of the four tags that appears exactly once (open-r1's partial credit, newline-agnostic)."""
    return [sum(0.25 for tag in _TAGS if text_of(c).count(tag) == 1) for c in completions]


# Scripts by language code; a word counts for a language when all of its letters are in the script.
_SCRIPTS: dict[str, str] = {
    "en": r"A-Za-z", "fr": r"A-Za-zÀ-ÿŒœ", "de": r"A-Za-zÄÖÜäöüß", "es": r"A-Za-zÁÉÍÓÚÑÜáéíóúñü",
    "ru": r"А-Яа-яЁё", "zh": r"\u4e00-\u9fff\u3400-\u4dbf", "ja": r"\u3040-\u30ff\u4e00-\u9fff",
    "ko": r"\uac00-\ud7af\u1100-\u11ff", "ar": r"\u0600-\u06ff", "hi": r"\u0900-\u097f",
}
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
_WORD = re.compile(r"[^\W\d_]+")
# \( and \[ span up to their closer and never over another opener, so that many unclosed openers do not each
# scan to the end of the text (quadratic); the other openers are their own closers.
_MATH = re.compile(r"\$\$.*?\$\$|\$[^$]*\$|\\\((?:(?!\\\().)*?\\\)|\\\[(?:(?!\\\[).)*?\\\]|\\[A-Za-z]+|```.*?```", re.S)
_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.S)


def language_share(text: str, language: str) -> float | None:
    """Share of words (CJK: characters) in `language`'s script, LaTeX and code ignored; None if no words."""
    if language not in _SCRIPTS:
        raise ValueError(f"unknown language {language!r}; known: {sorted(_SCRIPTS)}")
    target = re.compile(f"[{_SCRIPTS[language]}]+")
    words = []
    for w in _WORD.findall(_MATH.sub(" ", text)):
        # CJK has no spaces: each character is a word, so one Chinese run is not one "word" against many
        words += list(w) if _CJK.search(w) else [w]
    return sum(bool(target.fullmatch(w)) for w in words) / len(words) if words else None


def language_reward(completions: list, language: str | Sequence[str] = "en", **_: Any) -> list[float | None]:
    """R1's language-consistency reward: the share of the chain of thought (<think> body, else the whole
    completion) written in the target language. `language` is a code or a per-row column."""
    langs = [language] * len(completions) if isinstance(language, str) else list(language)
    out = []
    for c, lang in zip(completions, langs, strict=True):
        t = text_of(c)
        m = _THINK.search(t)
        out.append(language_share(m.group(1) if m else t, lang or "en"))
    return out


def _lengths(completions: list, completion_ids: list | None) -> list[int]:
    """Token counts when the trainer passes completion_ids (TRL does), else characters."""
    if completion_ids is not None:
        return [len(ids) for ids in completion_ids]
    return [len(text_of(c)) for c in completions]


def overlong_reward(completions: list, max_length: int = 20480, cache_length: int = 4096,
                    completion_ids: list | None = None, **_: Any) -> list[float]:
    """DAPO's soft overlong punishment: 0 up to max-cache, then linear down to -1 at max, -1 beyond."""
    out = []
    for n in _lengths(completions, completion_ids):
        free = max_length - cache_length
        out.append(0.0 if n <= free else (free - n) / cache_length if n <= max_length else -1.0)
    return out


def length_reward(completions: list, prompts: list | None = None, answer: list | None = None,
                  completion_ids: list | None = None, **kw: Any) -> list[float]:
    """Kimi k1.5's length reward within each prompt's group: lam = 0.5 - (len - min) / (max - min);
    a correct answer gets lam, a wrong one min(0, lam) (with no `answer` column every sample gets lam)."""
    lengths = _lengths(completions, completion_ids)
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts if prompts is not None else [None] * len(completions)):
        groups[str(p)].append(i)
    correct = [1.0] * len(completions)
    if answer is not None:
        from rewards.math import math_reward

        correct = math_reward(completions, answer, **kw)
    out = [0.0] * len(completions)
    for idx in groups.values():
        lo, hi = min(lengths[i] for i in idx), max(lengths[i] for i in idx)
        for i in idx:
            lam = 0.5 - (lengths[i] - lo) / (hi - lo) if hi > lo else 0.0
            out[i] = lam if correct[i] else min(0.0, lam)
    return out
