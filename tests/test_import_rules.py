"""The rules between parts (DESIGN.md, "Layout and the rules between parts"), checked by reading the imports of
r1/, rewards/ and rollouts/ with ast (nothing is executed). Every import counts, at module level or inside a
function: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("r1", "rewards", "rollouts")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def imported(path: Path) -> Iterator[str]:
    """The project modules a file imports: `from a import b` is `a.b` when b is a module, else `a`."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            names = [f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        yield from (n for n in names if n.split(".")[0] in PACKAGES)


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    return {module_name(p): set(imported(p)) - {module_name(p)} for p in files}


def within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


LOOPS_AND_TASKS = ("r1.trainer", "r1.sft", "r1.eval", "r1.smoke", "r1.cli", "r1.grpo", "r1.data", "rewards",
                   "rollouts")
CPU_ENTRY_POINTS = ("r1.trainer", "r1.sft", "r1.eval", "r1.cli", "r1.smoke", "r1.cpu")

# (rule, the modules it binds, what they must not import)
RULES: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    ("the model knows no loop and no task", ("r1.model",), LOOPS_AND_TASKS),
    ("rewards judge text only and import nothing of r1 or rollouts", ("rewards",), ("r1", "rollouts")),
    ("losses take tensors: grpo imports no r1 module", ("r1.grpo",), ("r1", "rewards", "rollouts")),
    ("engines serve any loop and do not score", ("rollouts",), ("rewards", "r1.trainer", "r1.sft", "r1.eval")),
    ("eval and sft never import the trainer", ("r1.eval", "r1.sft"), ("r1.trainer",)),
]


def violations(g: dict[str, set[str]]) -> list[str]:
    out = []
    for rule, who, banned in RULES:
        out += [f"{m} imports {d} ({rule})" for m in sorted(g) if within(m, *who)
                for d in sorted(g[m]) if within(d, *banned)]
    # the CPU speed layer is applied from outside, by the run entry points only (bench/ is not walked here)
    out += [f"{m} imports {d} (only the run entry points apply the CPU layer)" for m in sorted(g)
            if not within(m, *CPU_ENTRY_POINTS) for d in sorted(g[m]) if within(d, "r1.cpu")]
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each a list of its modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_parts_keep_their_import_rules() -> None:
    found = violations(graph())
    assert not found, "\n".join(found)


def test_no_import_cycle() -> None:
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("edge, broken", [
    (("r1.model.model", "r1.trainer"), "the model knows no loop"),
    (("rewards.math", "r1.data"), "rewards judge text only"),
    (("r1.grpo", "r1.logprobs"), "losses take tensors"),
    (("rollouts.torch_engine", "rewards.math"), "engines serve any loop"),
    (("r1.eval", "r1.trainer"), "eval and sft never import the trainer"),
    (("r1.policy", "r1.cpu.gemm"), "only the run entry points apply the CPU layer"),
])
def test_a_broken_rule_is_reported(edge: tuple[str, str], broken: str) -> None:
    """The checker itself: one added edge is reported under its rule (the rules are not vacuous)."""
    g = graph()
    g.setdefault(edge[0], set()).add(edge[1])
    assert any(broken in v for v in violations(g))


def test_a_cycle_is_reported() -> None:
    g = graph()
    g["r1.data"].add("r1.trainer")  # the trainer imports data; data importing the trainer closes a loop
    assert any({"r1.data", "r1.trainer"} <= set(c) for c in cycles(g))


def test_relative_and_from_imports_resolve() -> None:
    f = ROOT / "r1" / "model" / "model.py"
    assert "r1.model.config" in set(imported(f)) | set(imported(ROOT / "r1" / "model" / "__init__.py"))
