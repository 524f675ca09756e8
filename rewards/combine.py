"""Several rewards with weights, validated outputs, an error policy, and TRL-named metrics."""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import signal
import statistics
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from rewards.registry import RewardFn, get_reward

log = logging.getLogger("r1.rewards")
ON_ERROR = ("zero", "raise")


class RewardError(RuntimeError):
    """A reward raised, returned the wrong length, or returned a non-number."""


def _columns(rows: Sequence[dict]) -> dict[str, list]:
    keys = dict.fromkeys(k for r in rows for k in r)  # ordered union: rows may differ in optional fields
    return {k: [r.get(k) for r in rows] for k in keys}


@contextlib.contextmanager
def _watch_sigint() -> Iterator[list]:
    """Notes a SIGINT that reaches this process while the block runs: a KeyboardInterrupt then is a real Ctrl-C
    of the trainer, to honour; without one it was raised by a reward's code, and is that reward's error.
    Python delivers SIGINT to the main thread only, so elsewhere no KeyboardInterrupt is a real one."""
    seen: list = []
    prev = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(prev):
        yield seen  # SIG_IGN: no Ctrl-C at all; SIG_DFL: a Ctrl-C ends the process without an exception
        return

    def note(signum: int, frame: Any) -> Any:
        seen.append(signum)
        return prev(signum, frame)

    signal.signal(signal.SIGINT, note)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, prev)


class RewardSet:
    """`RewardSet([("math", 1.0), ("format", 0.2)])(completions, rows) -> (total, per_reward)`.

    Columns are passed TRL-style as keyword lists. None from a reward means "not applicable": it is left
    out of that reward's mean and counts 0 in the weighted total (TRL does the same with nan). With
    on_error="zero" a failing reward scores 0 for the affected rows and logs a line naming it and the row;
    "raise" stops with RewardError. Any BaseException a reward raises (SystemExit, GeneratorExit, a
    KeyboardInterrupt of its own) is such a failure; a real Ctrl-C (SIGINT) of the trainer still stops it.
    """

    def __init__(self, rewards: Sequence[tuple[str, float]] | Sequence[tuple[str, float, RewardFn]],
                 on_error: str = "zero") -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
        self.names: list[str] = []
        self.weights: list[float] = []
        self.fns: list[RewardFn] = []
        for spec in rewards:
            name, weight, *fn = spec
            self.names.append(name)
            self.weights.append(float(weight))
            self.fns.append(fn[0] if fn else get_reward(name))
        self.last_metrics: dict[str, float] = {}

    def _fail(self, name: str, row: int | None, why: str, n: int) -> list[float | None]:
        where = "all rows" if row is None else f"row {row}"
        msg = f"reward {name!r} failed on {where}: {why}"
        if self.on_error == "raise":
            raise RewardError(msg)
        log.error("%s; scoring 0", msg)
        return [0.0] * n

    def _run(self, name: str, fn: RewardFn, completions: list, cols: dict[str, list]) -> list[float | None]:
        n = len(completions)
        with _watch_sigint() as sigint:
            try:  # the checks too: a returned value's __iter__ or __float__ is the reward's code as well
                return self._checked(name, fn(completions, **cols), n)
            except BaseException as e:  # noqa: BLE001 - a reward must not end the trainer; the policy decides
                if (isinstance(e, KeyboardInterrupt) and sigint) or \
                        (isinstance(e, RewardError) and self.on_error == "raise"):
                    raise
                return self._fail(name, None, f"{type(e).__name__}: {e}", n)

    def _checked(self, name: str, out: Any, n: int) -> list[float | None]:
        try:
            out = list(out)
        except TypeError:
            return self._fail(name, None, f"returned {type(out).__name__}, not a list", n)
        if len(out) != n:
            return self._fail(name, None, f"returned {len(out)} values for {n} completions", n)
        clean: list[float | None] = []
        for i, v in enumerate(out):
            if v is None:
                clean.append(None)
            elif isinstance(v, numbers.Real) and math.isfinite(float(v)):
                clean.append(float(v))
            elif isinstance(v, float) and math.isnan(v):  # TRL's spelling of "not applicable"
                clean.append(None)
            else:
                clean.append(self._fail(name, i, f"non-number {v!r}", 1)[0])
        return clean

    def __call__(self, completions: list, rows: Sequence[dict]) -> tuple[list[float], dict[str, list[float | None]]]:
        if len(rows) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(rows)} rows")
        cols = _columns(rows)
        total = [0.0] * len(completions)
        per_reward: dict[str, list[float | None]] = {}
        metrics: dict[str, float] = {}
        for name, weight, fn in zip(self.names, self.weights, self.fns, strict=True):
            vals = self._run(name, fn, completions, cols)
            per_reward[name] = vals
            total = [t + weight * (v or 0.0) for t, v in zip(total, vals, strict=True)]
            live = [v for v in vals if v is not None]
            metrics[f"rewards/{name}/mean"] = statistics.fmean(live) if live else math.nan
            metrics[f"rewards/{name}/std"] = statistics.pstdev(live) if len(live) > 1 else 0.0
        metrics["reward"] = statistics.fmean(total) if total else math.nan
        metrics["reward_std"] = statistics.pstdev(total) if len(total) > 1 else 0.0
        self.last_metrics = metrics
        return total, per_reward

    def metrics(self) -> dict[str, Any]:
        """Metrics of the last call, TRL names: rewards/<name>/mean, rewards/<name>/std, reward, reward_std."""
        return dict(self.last_metrics)
