"""Prompt datasets and templates.

- `load_rows(source, split)`: a local JSON/JSONL/Parquet/CSV file (read here) or a hub dataset name (through the
  `datasets` library); a missing column is one error naming it and the columns that exist.
- `encode_prompts`: rendered prompts to token ids (bos first).
- `TEMPLATES`: R1-Zero's conversation template and a plain one, by name.
- The smoke task: multi-step integer arithmetic ("7+5-3+8"), generated from a seed. Its SFT
  targets show the steps inside <think> and the value inside <answer>, so the math reward can check
  them. Held-out problems come from a disjoint seed range; GRPO's prompts from a third, minus the held-out ones.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

TEMPLATES: dict[str, str] = {
    "r1_zero": ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
                "The assistant first thinks about the reasoning process in the mind and then provides the user "
                "with the answer. The reasoning process and answer are enclosed within <think> </think> and "
                "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
                "<answer> answer here </answer>. User: {prompt}. Assistant:"),
    "plain": "{prompt}",
    "smoke": "{prompt}=",
}


def render(template: str, prompt: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[template].format(prompt=prompt)


def _json_rows(path: Path) -> list[Any]:
    """A .json file holding a list of objects, or JSON lines (.jsonl, or a .json written that way)."""
    text = path.read_text()
    if path.suffix == ".json":
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError:
            loaded = None  # JSON lines in a .json file: read below, line by line
        if isinstance(loaded, list):
            return loaded
        if isinstance(loaded, dict):
            return [loaded]
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return rows


def _table_rows(path: Path) -> list[Any]:
    import pyarrow.csv
    import pyarrow.parquet

    read = pyarrow.parquet.read_table if path.suffix == ".parquet" else pyarrow.csv.read_csv
    try:
        return read(path).to_pylist()
    except pyarrow.ArrowInvalid as e:  # an empty CSV, a file that is not Parquet
        raise ValueError(f"{path}: cannot be read as {path.suffix[1:]} ({str(e).splitlines()[0]})") from None


# a local file is read here, not through `datasets`: its loader builds a cache in the user's home (left behind
# even when the file turns out bad) and an empty JSONL file ends in a StopIteration traceback
LOCAL_READERS = {".jsonl": _json_rows, ".json": _json_rows, ".parquet": _table_rows, ".csv": _table_rows}


def load_rows(source: str, split: str = "train", columns: tuple[str, ...] = (),
              config: str | None = None) -> list[dict[str, Any]]:
    """Rows from a local file (json/jsonl/parquet/csv) or a hub dataset (with its `config` name), checked
    for `columns`. An empty file, a line that is not JSON or a row that is not an object is one error naming it."""
    path = Path(source)
    if path.exists():
        read = LOCAL_READERS.get(path.suffix)
        if read is None:
            raise ValueError(f"{source}: unsupported file type {path.suffix!r} (jsonl, json, parquet, csv)")
        rows = read(path)
        if not rows:
            raise ValueError(f"{source}: the dataset is empty (no rows)")
        if bad := next((i for i, r in enumerate(rows, 1) if not isinstance(r, dict)), None):
            raise ValueError(f"{source}: row {bad} is not an object of named columns")
        names = list(dict.fromkeys(k for r in rows for k in r))  # every row gets every column, None where absent
        rows = [{k: r.get(k) for k in names} for r in rows]
    elif "/" in source and not source.startswith((".", "/")):
        import datasets

        ds = datasets.load_dataset(source, config, split=split)
        names, rows = ds.column_names, [dict(r) for r in ds]
    else:
        raise FileNotFoundError(f"dataset {source!r} is neither a local file nor a hub name (owner/name)")
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"dataset {source} has no column {', '.join(map(repr, missing))}; "
                         f"its columns: {', '.join(names)}")
    return rows


def encode_prompts(tok: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of rendered prompts, each starting with the tokenizer's bos token when it has one."""
    out = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None:
            ids = [tok.bos_token_id] + ids
        out.append(ids)
    return out


# ---------------------------------------------------------------------------------------------- smoke task
def _expr(rng: random.Random, steps: int, ops: str, max_value: int) -> tuple[str, list[str], int]:
    """A left-to-right chain a op b op c ...; each step's partial value is recorded for the trace. Only operations
    that keep the running value within [0, max_value] are drawn, so every chain uses one small table of facts."""
    value = rng.randint(1, 9)
    text, trace = str(value), []
    apply = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for _ in range(steps):
        while True:
            op, b = rng.choice(ops), rng.randint(1, 9)
            new = apply[op](value, b)
            if 0 <= new <= max_value:
                break
        trace.append(f"{value}{op}{b}={new}")
        text = f"({text}){op}{b}" if op == "*" and len(trace) > 1 else f"{text}{op}{b}"
        value = new
    return text, trace, value


def arithmetic_rows(n: int, seed: int, min_steps: int = 2, max_steps: int = 3, ops: str = "+-",
                    max_value: int = 19) -> list[dict[str, Any]]:
    """Rows with `prompt`, `answer` (the value as a string) and `solution` (the SFT target)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        text, trace, value = _expr(rng, rng.randint(min_steps, max_steps), ops, max_value)
        solution = f"<think>{','.join(trace)}</think><answer>{value}</answer>"
        rows.append({"prompt": text, "answer": str(value), "solution": solution})
    return rows


def smoke_splits(n_train: int = 2000, n_test: int = 200, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train/test problems: the test set drops any prompt seen in training. Chains of 2-3 additions and
    subtractions of digits with every value in 0..19: tens of thousands of chains over a table of ~250 facts, so
    held-out chains are new compositions of facts that training exercises (the distribution stays the same)."""
    train = arithmetic_rows(n_train, 10_000 + seed)
    seen = {r["prompt"] for r in train}
    test = [r for r in arithmetic_rows(3 * n_test, 20_000 + seed) if r["prompt"] not in seen][:n_test]
    return train, test


def smoke_rl_rows(n: int = 20_000, seed: int = 0) -> list[dict[str, Any]]:
    """GRPO's prompts: n fresh draws from the same distribution (a third seed range), with every held-out prompt
    removed. Not the SFT rows: RL that cycles over a small set of problems (2000 rows: 4 passes in 250 steps) lets
    the policy memorise their answers; on these ~10,000 distinct chains it has to get better at the arithmetic
    (measured on seed 2 after a 2000-row cold start: 77.0% -> 80.0% held-out after the same 250 steps)."""
    held_out = {r["prompt"] for r in smoke_splits(seed=seed)[1]}
    return [r for r in arithmetic_rows(n, 30_000 + seed) if r["prompt"] not in held_out]
