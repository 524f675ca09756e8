"""Reward lookup: built-in names, the `r1.rewards` entry-point group, or 'package.module:function'.

A reward is TRL-compatible: `fn(completions: list[str], **columns) -> list[float | None]`, where each column
is a dataset field repeated per completion. None means "not applicable to this row".
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from rewards.pool import load

RewardFn = Callable[..., list[float | None]]

# Built-ins are import paths, so naming one reward does not import (and start pools for) the others.
BUILTINS: dict[str, str] = {
    "math": "rewards.math:math_reward",
    "code": "rewards.code:code_reward",
    "format": "rewards.format:format_reward",
    "tag_count": "rewards.format:tag_count_reward",
    "language": "rewards.format:language_reward",
    "overlong": "rewards.format:overlong_reward",
    "length": "rewards.format:length_reward",
}
_REGISTERED: dict[str, RewardFn] = {}
ENTRY_POINT_GROUP = "r1.rewards"


def register(name: str, fn: RewardFn | None = None) -> Any:
    """Register `fn` under `name`; usable as `@register("mine")`."""
    def deco(f: RewardFn) -> RewardFn:
        _REGISTERED[name] = f
        return f
    return deco(fn) if fn is not None else deco


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_rewards() -> list[str]:
    return sorted({*BUILTINS, *_REGISTERED, *_entry_points()})


def get_reward(name_or_path: str) -> RewardFn:
    """A reward function by registered name, entry-point name, or 'package.module:function'."""
    if name_or_path in _REGISTERED:
        return _REGISTERED[name_or_path]
    if name_or_path in BUILTINS:
        return load(BUILTINS[name_or_path])
    if (ep := _entry_points().get(name_or_path)) is not None:
        return ep.load()
    if ":" in name_or_path:
        try:
            fn = load(name_or_path)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot load reward {name_or_path!r}: {e}") from e
        if not callable(fn):
            raise ValueError(f"reward {name_or_path!r} is not callable")
        return fn
    raise ValueError(f"unknown reward {name_or_path!r}; known: {', '.join(known_rewards())} "
                     "(or give 'package.module:function')")


def text_of(completion: Any) -> str:
    """Plain text of a completion: a string, or TRL's conversational form (a list of messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)
