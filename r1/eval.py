"""Benchmark evaluation: MATH-500, AIME 2024/2025, GSM8K, or any JSONL / hub dataset with a problem and an answer.

k samples per problem with R1's decoding (temperature 0.6, top-p 0.95), graded by the training reward
(rewards.math.math_reward, so eval and RL agree on what "correct" means), reported as
- pass@1 averaged over the k samples (DeepSeek-R1's headline number) and unbiased pass@k,
- maj@k (cons@k): the most frequent extracted answer, graded,
- a per-field breakdown (MATH-500 by level and subject).
Every completion can be written as one JSONL line for inspection.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

from r1.data import TEMPLATES, load_rows, render
from r1.metrics import group_means, mean_maj_at_k, mean_pass_at_k, pass_at_k
from rewards.math import extract_answer, gold_answer, math_reward, verify_answers
from rollouts.base import Engine, SamplingParams

R1_SAMPLING: dict[str, float] = dict(temperature=0.6, top_p=0.95)  # DeepSeek-R1's evaluation decoding


@dataclass(frozen=True)
class Benchmark:
    source: str | None  # hub dataset name; None = the user must pass --data
    split: str = "test"
    config: str | None = None  # hub dataset config (GSM8K has "main" and "socratic")
    problem: str = "problem"
    answer: str = "answer"
    gold: Callable[[Any], str] = gold_answer  # reduces GSM8K's "... #### 18" (and a \boxed{} reference) to the answer
    breakdown: tuple[str, ...] = ()


BENCHMARKS: dict[str, Benchmark] = {
    "math500": Benchmark("HuggingFaceH4/MATH-500", breakdown=("level", "subject")),
    "aime24": Benchmark("HuggingFaceH4/aime_2024", split="train"),  # the hub copy has only a train split
    "aime25": Benchmark("math-ai/aime25"),
    "gsm8k": Benchmark("openai/gsm8k", config="main", problem="question"),
    "custom": Benchmark(None),
}


def load_benchmark(name: str, data: str | None = None, problem_key: str | None = None, answer_key: str | None = None,
                   limit: int | None = None) -> tuple[list[dict[str, Any]], Benchmark]:
    """Rows of a benchmark (from `data`, a local file, if given, else its hub source) and its spec, with
    any column overrides applied; every needed column is checked up front so a typo fails before generation."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    b = BENCHMARKS[name]
    b = replace(b, problem=problem_key or b.problem, answer=answer_key or b.answer)
    source = data or b.source
    if source is None:
        raise ValueError(f"benchmark {name!r} needs --data PATH (a jsonl/json/parquet/csv file)")
    columns = (b.problem, b.answer, *b.breakdown)
    if data is None and b.config is not None:  # load_rows takes no hub config
        import datasets

        ds = datasets.load_dataset(source, b.config, split=b.split)
        if missing := [c for c in columns if c not in ds.column_names]:
            raise ValueError(f"dataset {source} has no column {', '.join(map(repr, missing))}; "
                             f"its columns: {', '.join(ds.column_names)}")
        rows = [dict(r) for r in ds]
    else:
        rows = load_rows(source, b.split, columns)
    return rows[:limit] if limit else rows, b


_NUMBER = re.compile(r"[+-]?(?:\d{1,100}(?:\.\d{0,100})?|\.\d{1,100})")
_FRACTION = re.compile(r"([+-]?)(?:\\[dt]?frac\{(\d{1,100})\}\{(\d{1,100})\}|(\d{1,100})/(\d{1,100}))")


def _canonical(answer: str | None) -> str | Fraction | None:
    """A vote key before math-verify merges keys: a plain number or fraction is its exact value ("0.5", ".5",
    "1/2" and "\\frac{1}{2}" are one key, 5 another), anything else the answer without whitespace or enclosing $."""
    if answer is None:
        return None
    s = "".join(answer.split()).strip("$")
    if _NUMBER.fullmatch(s):
        return Fraction(s)
    if (m := _FRACTION.fullmatch(s)) and int(den := m[3] or m[5]):
        return Fraction(int(m[2] or m[4]), int(den)) * (-1 if m[1] == "-" else 1)
    return s or None


# math-verify comparisons per problem at most when merging its wrong answers' keys: every pair among its 12 most
# voted ones (rarer answers keep their own key; two values that are both plain numbers are never compared).
VOTE_TOP = 12
_GRADED_CORRECT = object()  # the group of a problem's graded-correct samples

Answers = list[list[str | None]]  # per problem, per sample: its vote key (None: no answer found)


def vote_keys(extracted: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]]) -> Answers:
    """Per problem, per sample: a key that is equal exactly for samples giving the same answer, as the grader sees
    it. Graded-correct samples all equal the gold, so they share one key; wrong ones are grouped by `_canonical`,
    then merged where math-verify (the grader's timeout-safe pool) accepts one for the other; in a problem that
    no sample solved, where grouping cannot change a vote's verdict, only by `_canonical`. A key is the
    whitespace-free answer of the group's first sample."""
    keys = [[None if a is None or ok else _canonical(a) for a, ok in zip(ans, oks, strict=True)]
            for ans, oks in zip(extracted, correct, strict=True)]
    pairs: list[tuple[int, Any, Any]] = []  # (problem, key, key) for math-verify
    first: list[dict[Any, str]] = []  # per problem: key -> its first sample's answer
    for p, (ans, ks) in enumerate(zip(extracted, keys, strict=True)):
        first.append({})
        for a, k in zip(ans, ks, strict=True):
            if k is not None:
                first[p].setdefault(k, a)
        counts = Counter(k for k in ks if k is not None)
        # stable sort: ties in order of first vote; with no correct sample any majority is wrong: nothing to merge
        top = sorted(counts, key=lambda k: -counts[k])[:VOTE_TOP] if any(correct[p]) else []
        pairs += [(p, a, b) for i, a in enumerate(top) for b in top[i + 1:]
                  if not (isinstance(a, Fraction) and isinstance(b, Fraction))]
    same = verify_answers([first[p][a] for p, a, _ in pairs], [first[p][b] for p, _, b in pairs])
    root: list[dict[Any, Any]] = [{} for _ in keys]  # union-find over each problem's keys

    def find(p: int, k: Any) -> Any:
        while (r := root[p].get(k, k)) != k:
            k = r
        return k

    for (p, a, b), eq in zip(pairs, same, strict=True):
        if eq == 1.0:
            root[p][find(p, b)] = find(p, a)
    out: Answers = []
    for ans, oks, ks in zip(extracted, correct, keys, strict=True):
        p = len(out)
        group_first: dict[Any, str] = {}
        row: list[str | None] = []
        for a, ok, k in zip(ans, oks, ks, strict=True):
            g = None if a is None else _GRADED_CORRECT if ok else find(p, k)  # a group; its key: its first answer
            row.append(None if g is None else group_first.setdefault(g, "".join(a.split()).strip("$")))
        out.append(row)
    return out


def score(completions: Sequence[Sequence[str]], golds: Sequence[str]) -> tuple[list[list[bool]], Answers]:
    """Per problem, per sample: graded correct (rewards.math.math_reward) and its vote key (`vote_keys`)."""
    flat = [c for cs in completions for c in cs]
    rewards = math_reward(flat, [g for cs, g in zip(completions, golds, strict=True) for _ in cs])
    correct, i = [], 0
    for cs in completions:
        correct.append([r == 1.0 for r in rewards[i:i + len(cs)]])
        i += len(cs)
    return correct, vote_keys([[extract_answer(c) for c in cs] for cs in completions], correct)


def summarize(correct: list[list[bool]], answers: Answers, k: int,
              groups: dict[str, Sequence[Any]] | None = None) -> dict[str, Any]:
    """pass@1 (mean over samples), unbiased pass@k, maj@k, and per-group n / pass@1 / maj@k."""
    per_problem = {  # metric -> its value on each problem, for the group means
        "pass@1": [sum(c) / len(c) for c in correct],
        f"pass@{k}": [pass_at_k(len(c), sum(c), k) for c in correct],
        f"maj@{k}": [mean_maj_at_k([a], [c]) for a, c in zip(answers, correct, strict=True)],
    }
    breakdown = {}
    for field, keys in (groups or {}).items():
        keys = [str(x) for x in keys]  # hub levels may be ints or "Level 3"; one type keeps the table sortable
        means = {m: group_means(v, keys) for m, v in per_problem.items()}
        breakdown[field] = {g: {"n": n} | {m: means[m][g] for m in means} for g, n in sorted(Counter(keys).items())}
    return {"n": len(correct), "k": k, "pass@1": mean_pass_at_k(correct, 1), f"pass@{k}": mean_pass_at_k(correct, k),
            f"maj@{k}": mean_maj_at_k(answers, correct), "breakdown": breakdown}


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = list(tokenizer(text)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]  # some tokenizers add it themselves


def _batches(n: int, size: int) -> Iterable[range]:
    return (range(i, min(i + size, n)) for i in range(0, n, size))


def evaluate(engine: Engine, tokenizer: Any, rows: Sequence[dict[str, Any]], *, problem_key: str, answer_key: str,
             template: str, sampling: SamplingParams, k: int, breakdown: Sequence[str] = (),
             gold: Callable[[Any], str] = gold_answer, out_path: str | Path | None = None, batch_size: int = 32,
             progress: bool = True) -> dict[str, Any]:
    """Generate k completions per row, grade them, and summarise (see `summarize`); optionally write every
    completion to `out_path` as JSONL."""
    from tqdm import tqdm

    if not rows:
        raise ValueError("no problems to evaluate")
    if missing := [c for c in (problem_key, answer_key, *breakdown) if c not in rows[0]]:
        raise ValueError(f"rows have no column {', '.join(map(repr, missing))}; their columns: {', '.join(rows[0])}")
    golds = [gold(r[answer_key]) for r in rows]
    prompts = [_encode(tokenizer, render(template, r[problem_key])) for r in rows]
    samples: list[list[Any]] = [[] for _ in rows]
    with tqdm(total=len(rows), desc="eval", unit="problem", disable=not progress) as bar:
        for idx in _batches(len(rows), batch_size):
            # a seed fixes the streams of sample 0, 1, ... of a call: offset it so batches draw different ones
            sp = sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + idx.start)
            for ro in engine.generate([prompts[i] for i in idx], sp, n=k):
                samples[idx[ro.prompt_index]].append(ro)
            bar.update(len(idx))
    correct, answers = score([[ro.text for ro in s] for s in samples], golds)
    summary = summarize(correct, answers, k, {f: [r[f] for r in rows] for f in breakdown})
    lengths = [len(ro.token_ids) for s in samples for ro in s]
    summary["mean_length"] = sum(lengths) / len(lengths)
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "w") as f:
            for i, (row, s) in enumerate(zip(rows, samples, strict=True)):
                for ro, ok in zip(s, correct[i], strict=True):
                    f.write(json.dumps({"index": i, "problem": row[problem_key], "gold": golds[i],
                                        "completion": ro.text, "extracted": extract_answer(ro.text), "correct": ok,
                                        "finish_reason": ro.finish_reason, "num_tokens": len(ro.token_ids)}) + "\n")
    return summary


def format_table(summary: dict[str, Any]) -> str:
    k = summary["k"]
    cols = ["pass@1", f"pass@{k}", f"maj@{k}"]
    lines = [f"problems {summary['n']}  samples/problem {k}  mean length {summary.get('mean_length', math.nan):.1f}",
             f"{'':<32}{'n':>6}" + "".join(f"{c:>10}" for c in cols),
             f"{'all':<32}{summary['n']:>6}" + "".join(f"{100 * summary[c]:>10.1f}" for c in cols)]
    for field, table in summary["breakdown"].items():
        lines.append(f"by {field}")
        for g, m in table.items():
            lines.append(f"  {g[:30]:<30}{m['n']:>6}" + "".join(f"{100 * m[c]:>10.1f}" for c in cols))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- CLI
def load_model(path: str | Path) -> Any:
    """The policy (r1.policy), in bf16 on a GPU when there is one; on a CPU with the CPU layer (r1.cpu)."""
    import torch

    from r1.cpu import accelerate
    from r1.policy import load_policy

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return accelerate(load_policy(str(path), dtype=dtype)).to("cuda" if torch.cuda.is_available() else "cpu")


# engine name -> its constructor arguments from the model directory: vLLM loads the directory itself (and may take
# most of the GPU: nothing trains beside it here); the torch engine needs the module in memory
ENGINE_ARGS: dict[str, Callable[[str], dict[str, Any]]] = {
    "torch": lambda path: {"model": load_model(path)},
    "vllm": lambda path: {"model": path, "gpu_memory_utilization": 0.85},
}


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="transformers-format model directory (DeepSeek-V3 runs on the native model)")
    p.add_argument("--benchmark", default="math500", choices=list(BENCHMARKS))
    p.add_argument("--data", help="local jsonl/json/parquet/csv file instead of the benchmark's hub dataset")
    p.add_argument("--problem-key", help="problem column (default: the benchmark's)")
    p.add_argument("--answer-key", help="answer column (default: the benchmark's)")
    p.add_argument("--tokenizer", help="tokenizer name or directory (default: the model directory; 'char' = ours)")
    p.add_argument("--template", default="r1_zero", choices=list(TEMPLATES))
    p.add_argument("--k", type=int, default=1, help="samples per problem")
    p.add_argument("--temperature", type=float, default=R1_SAMPLING["temperature"])
    p.add_argument("--top-p", type=float, default=R1_SAMPLING["top_p"])
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--limit", type=int, help="evaluate the first N problems only")
    p.add_argument("--engine", default="torch", choices=list(ENGINE_ARGS))
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    p.add_argument("--out", help="write every completion to this JSONL file")
    p.add_argument("--seed", type=int, default=0)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from r1.cpu import accelerate_engine
    from r1.tokenizer import load_tokenizer
    from rollouts import make_engine

    rows, b = load_benchmark(args.benchmark, args.data, args.problem_key, args.answer_key, args.limit)
    if not Path(args.model).is_dir() and args.model.count("/") != 1:
        raise FileNotFoundError(f"model directory {args.model} does not exist")
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    engine = accelerate_engine(make_engine(args.engine, tokenizer=tokenizer, **ENGINE_ARGS[args.engine](args.model)))
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                              seed=args.seed)
    summary = evaluate(engine, tokenizer, rows, problem_key=b.problem, answer_key=b.answer, template=args.template,
                       sampling=sampling, k=args.k, breakdown=b.breakdown, gold=b.gold, out_path=args.out,
                       batch_size=args.batch_size)
    print(format_table(summary))
    return 0
