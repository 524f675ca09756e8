"""Code rewards: run model-written Python against tests in the sandbox; the fraction passed (or all-or-nothing).

Three test shapes (the `tests` column; a JSON string is decoded first):
- a list of assert statements (MBPP `test_list`), with optional `test_imports`;
- {"test": "def check(candidate): ...", "entry_point": "f"} (HumanEval);
- {"inputs": [...], "outputs": [...]}: stdin/stdout, whole outputs compared (trailing whitespace ignored).

For the first two the tests never enter the sandbox: they run here, in the trusted process, and every call
to a function of the program is a request to the sandbox, which answers with plain data (rewards/wire.py).
So the verdict is the harness's own evaluation of the assert; the program's exit code, prints, exit calls
or monkeypatching cannot reach it. The program's word is taken for nothing but the names of its functions:
the test code sees a fixed allow-list of modules (TEST_MODULES), and a builtin's name resolves to the program
only as the entry point. A stdin/stdout test passes when the output is right and the exit code 0.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import json
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rewards import wire
from rewards.registry import text_of
from rewards.sandbox import Limits, Run, isolation

__all__ = ["code_reward", "run_tests", "extract_code", "isolation", "Limits"]

_FENCE = re.compile(r"```(?:python|py|Python|python3)?[ \t]*\n(.*?)```", re.S)


def extract_code(text: str) -> str:
    """The last ```python fenced block (any fence if none is tagged), else the whole text."""
    tagged = re.findall(r"```(?:python|py|Python|python3)[ \t]*\n(.*?)```", text, re.S)
    blocks = tagged or _FENCE.findall(text)
    return blocks[-1] if blocks else text


class RemoteError(Exception):
    """The program's function raised (or the program died or timed out) while a test called it."""


# Exceptions a test may expect from the solution by name. Not StopIteration: raised into `list(map(f, xs))` it
# would end the iteration early instead of failing the test.
_RAISABLE = {e.__name__: e for e in (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError, AttributeError,
                                     ArithmeticError, OverflowError, LookupError, RuntimeError, RecursionError,
                                     NotImplementedError, AssertionError, NameError, UnicodeError, OSError,
                                     FileNotFoundError, MemoryError, Exception)}


class _Remote:
    """The sandboxed program as seen by the harness: its functions, callable under deadlines."""

    def __init__(self, run: Run, per_test: float, deadline: float) -> None:
        self.run, self.per_test, self.deadline = run, per_test, deadline
        self.dead = False

    def request(self, payload: bytes) -> dict:
        if self.dead:
            raise RemoteError("program is no longer running")
        line = self.run.exchange(payload, min(self.deadline, time.monotonic() + self.per_test), until_newline=True)
        if line is None:  # timeout, EOF or oversized reply: nothing more can be asked of this program
            self.dead = True
            raise RemoteError("no reply (timeout, exit, or output limit)")
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise RemoteError("malformed reply")
        return reply

    def proxy(self, name: str) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            payload = json.dumps({"f": name, "a": wire.enc(list(args)), "k": wire.enc(kwargs)}).encode() + b"\n"
            reply = self.request(payload)
            if "e" in reply:
                raise _RAISABLE.get(str(reply["e"][0]), RemoteError)(str(reply["e"][1]))
            return wire.dec(reply["r"])
        call.__name__ = name
        return call


def _exported(names: list, checks: list[str], entry_point: str | None) -> list[str]:
    """The program's functions the tests may call: the entry point and the tests' non-builtin names the program
    defines. A program's `abs` or `set` never replaces Python's in the test code; a builtin-named solution
    (MBPP 126 is `def sum`) needs `entry_point`, or tests that use that one builtin name and no other."""
    used = set()
    for c in checks:
        try:
            used |= {n.id for n in ast.walk(ast.parse(c)) if isinstance(n, ast.Name)}
        except SyntaxError:  # that test fails when it runs
            pass
    names = [n for n in names if isinstance(n, str)]
    own = [n for n in names if n in used and not hasattr(builtins, n)]
    if entry_point is not None:
        return [*own, entry_point] if entry_point in names else own
    used_builtins = [n for n in used if hasattr(builtins, n)]
    if not own and len(used_builtins) == 1 and used_builtins[0] in names:
        return used_builtins
    return own


# What the test code may see besides its own imports: stdlib modules whose import has no side effect, imported
# here once, whatever a program says (MBPP 596's tests use `sys` that its solution imported).
TEST_MODULES = {name: importlib.import_module(name) for name in (
    "bisect", "cmath", "collections", "copy", "datetime", "decimal", "fractions", "functools", "heapq",
    "itertools", "json", "math", "operator", "random", "re", "statistics", "string", "sys", "typing")}


def _run_calls(code: str, tests: Any, test_imports: list[str], per_test: float, total: float,
               limits: Limits, entry_point: str | None) -> list[bool]:
    """Assert or HumanEval tests, evaluated here against the sandboxed program's functions."""
    checks = [tests["test"]] if isinstance(tests, dict) else list(tests)
    if isinstance(tests, dict):
        entry_point = tests["entry_point"]
    deadline = time.monotonic() + total
    with Run(code, "rpc", limits) as run:
        remote = _Remote(run, per_test, deadline)
        try:
            hello = remote.request(b"")
        except (RemoteError, ValueError):
            return [False] * len(checks)
        if not isinstance(hello.get("names"), list):  # the program raised (or called exit) before any test
            return [False] * len(checks)
        env: dict[str, Any] = {"__builtins__": builtins, "__name__": "__test__", **TEST_MODULES}
        env.update({n: remote.proxy(n) for n in _exported(hello["names"], checks, entry_point)})
        try:
            for imp in test_imports:
                exec(imp, env)
        except Exception:  # noqa: BLE001 - a broken test import fails every test, not the trainer
            return [False] * len(checks)
        results = []
        for check in checks:
            try:
                exec(compile(check, "<test>", "exec"), env)
                if isinstance(tests, dict):
                    env["check"](remote.proxy(entry_point))
                results.append(True)
            except Exception:  # noqa: BLE001 - AssertionError, RemoteError, TypeError...: this test failed
                results.append(False)
        return results


def _normalise(out: str) -> str:
    return "\n".join(line.rstrip() for line in out.strip("\n").splitlines()).strip()


def _run_stdio(code: str, tests: dict, per_test: float, total: float, limits: Limits) -> list[bool]:
    """One fresh sandboxed process per case; the whole stdout must match (not just its first lines)."""
    deadline = time.monotonic() + total
    results = []
    for inp, expected in zip(tests["inputs"], tests["outputs"], strict=True):
        ok = False
        if time.monotonic() < deadline:
            with Run(code, "stdio", limits) as run:
                stop = min(deadline, time.monotonic() + per_test)
                out = run.exchange(str(inp).encode(), stop, until_newline=False, close_stdin=True)
                ok = out is not None and run.returncode(stop) == 0 and \
                    _normalise(out.decode(errors="replace")) == _normalise(str(expected))
        results.append(ok)
    return results


def _parse_tests(tests: Any) -> Any:
    if isinstance(tests, str):
        return json.loads(tests)
    return tests


# Test shape -> runner; the shape is the only thing that differs between the three kinds.
_SHAPES: dict[str, Callable[[Any], bool]] = {
    "stdio": lambda t: isinstance(t, dict) and "inputs" in t,
    "calls": lambda t: isinstance(t, (list, tuple)) or (isinstance(t, dict) and "test" in t),
}


def run_tests(code: str, tests: Any, test_imports: list[str] | None = None, per_test: float = 5.0,
              total: float = 20.0, limits: Limits | None = None, entry_point: str | None = None) -> list[bool]:
    """Pass/fail per test of `code` (already extracted) against `tests` in one of the three shapes.
    `entry_point` names the solution of a list of asserts when it is named like a builtin."""
    tests = _parse_tests(tests)
    limits = limits or Limits(cpu_s=int(total) + 1)
    runners = {
        "stdio": lambda: _run_stdio(code, tests, per_test, total, limits),
        "calls": lambda: _run_calls(code, tests, list(test_imports or []), per_test, total, limits, entry_point),
    }
    for shape, matches in _SHAPES.items():
        if matches(tests):
            return runners[shape]()
    raise ValueError(f"unrecognised tests: {type(tests).__name__} (want a list of asserts, "
                     "{'inputs','outputs'} or {'test','entry_point'})")


def code_reward(completions: list, tests: list | None = None, test_list: list | None = None,
                test_imports: list | None = None, entry_point: list | None = None, partial: bool = True,
                per_test: float = 5.0, total: float = 20.0, workers: int = 2, **_: Any) -> list[float | None]:
    """Fraction of tests passed (or 1/0 with partial=False); None for rows without tests.

    `tests` (or MBPP's `test_list`) is a column of test specs; completions may wrap the code in ```python.
    `entry_point` (optional column) names the solution function of assert tests (HumanEval dicts carry theirs).
    """
    specs = tests if tests is not None else test_list
    if specs is None:
        return [None] * len(completions)
    imports = test_imports or [None] * len(completions)
    entries = entry_point or [None] * len(completions)

    def score(i: int) -> float | None:
        if specs[i] is None:
            return None
        passed = run_tests(extract_code(text_of(completions[i])), specs[i], imports[i], per_test, total,
                           entry_point=entries[i])
        if not passed:
            return 0.0
        frac = sum(passed) / len(passed)
        return frac if partial else float(frac == 1.0)

    with ThreadPoolExecutor(max(1, workers)) as ex:  # each thread waits on its own sandboxed process
        return list(ex.map(score, range(len(completions))))
