import json
from pathlib import Path

import pytest
import torch

from r1.eval import BENCHMARKS, evaluate, format_table, load_benchmark, score, summarize
from rewards.math import math_reward, verify_answers
from rollouts import TorchEngine
from rollouts.base import SamplingParams

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "math500.jsonl").exists(), reason=f"no benchmark files in {DATA}")


@pytest.fixture(scope="module")
def math500() -> list[dict]:
    return load_benchmark("math500", str(DATA / "math500.jsonl"), limit=8)[0]


@needs_data
def test_evaluate_tiny_model_on_gsm8k(tmp_path):
    from r1.model import V3ForCausalLM, load_config
    from r1.tokenizer import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer("char")
    engine = TorchEngine(V3ForCausalLM(load_config("smoke")), tok)
    rows, b = load_benchmark("gsm8k", str(DATA / "gsm8k_test.jsonl"), limit=3)
    out = tmp_path / "gen" / "gsm8k.jsonl"
    s = evaluate(engine, tok, rows, problem_key=b.problem, answer_key=b.answer, template="plain", k=2,
                 sampling=SamplingParams(temperature=0.6, top_p=0.95, max_tokens=8, seed=0), gold=b.gold,
                 out_path=out, batch_size=2, progress=False)
    assert {"n", "k", "pass@1", "pass@2", "maj@2", "mean_length", "breakdown"} <= s.keys()
    assert s["n"] == 3 and s["k"] == 2 and s["breakdown"] == {}
    assert 0 <= s["pass@1"] <= s["pass@2"] <= 1 and 0 <= s["maj@2"] <= 1 and 1 <= s["mean_length"] <= 8
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 3 * 2 and [x["index"] for x in lines] == [0, 0, 1, 1, 2, 2]
    assert lines[0]["gold"] == "18" and "####" not in lines[0]["gold"]  # GSM8K gold is the number after ####
    assert all(x["finish_reason"] in ("stop", "length") and 1 <= x["num_tokens"] <= 8 for x in lines)
    graded = math_reward([x["completion"] for x in lines], [x["gold"] for x in lines])
    assert [x["correct"] for x in lines] == [r == 1.0 for r in graded]
    assert "pass@1" in format_table(s)


@needs_data
def test_score_reference_solutions(math500):
    rows = math500[:5]
    sols, golds = [r["solution"] for r in rows], [r["answer"] for r in rows]
    correct, answers = score([[s] for s in sols], golds)
    assert correct == [[True]] * 5 and all(a[0] is not None for a in answers)
    swapped, _ = score([[s] for s in sols], golds[1:] + golds[:1])
    assert swapped == [[False]] * 5
    # per problem: right, a wrong boxed answer, right again -> pass@1 2/3, pass@3 1, majority right
    wrong = "so the answer is \\boxed{123456789}"
    correct, answers = score([[s, wrong, s] for s in sols], golds)
    s = summarize(correct, answers, k=3)
    assert s["pass@1"] == pytest.approx(2 / 3) and s["pass@3"] == 1.0 and s["maj@3"] == 1.0
    # two identical wrong answers outvote one right one
    correct, answers = score([[wrong, s, wrong] for s in sols], golds)
    s = summarize(correct, answers, k=3)
    assert s["pass@1"] == pytest.approx(1 / 3) and s["pass@3"] == 1.0 and s["maj@3"] == 0.0


def _maj(samples: list[str], gold: str) -> float:
    correct, answers = score([[f"\\boxed{{{s}}}" for s in samples]], [gold])
    return summarize(correct, answers, k=len(samples))[f"maj@{len(samples)}"]


def test_majority_groups_the_same_answer_and_nothing_else():
    assert _maj([".5", "5", "5"], "0.5") == 0.0  # the majority answer, 5, is wrong (".5" is not "5")
    assert _maj([".5", ".5", "5"], "0.5") == 1.0
    assert _maj(["5", "5", ".5", "0.5", "1/2"], "0.5") == 1.0  # three ways to write one half outvote two 5s
    # wrong answers group too: four halves outvote three right 3s; sqrt(8) and 2 sqrt(2) by math-verify only
    assert _maj(["0.5", ".5", "1/2", "\\frac{1}{2}", "3", "3", "3"], "3") == 0.0
    assert _maj(["3", "\\sqrt{8}", "2\\sqrt{2}"], "3") == 0.0
    assert _maj(["\\sqrt{8}", "3", "2\\sqrt{3}", "3"], "3") == 1.0  # sqrt(8) and 2 sqrt(3) differ
    _, [keys] = score([[f"\\boxed{{{s}}}" for s in ["0.5", ".5", "1/2", "\\frac{1}{2}", "5", "0.50", "-0.5", "50"]]],
                      ["7"])
    assert keys[0] == keys[1] == keys[2] == keys[3] == keys[5] and len({keys[0], keys[4], keys[6], keys[7]}) == 4


def test_majority_vote_bounds_its_math_verify_checks(monkeypatch):
    import r1.eval as ev

    sent = []

    def counting(golds, preds, *a, **k):  # the real checker, recording how many pairs it is given
        sent.append(len(golds))
        return verify_answers(golds, preds, *a, **k)

    monkeypatch.setattr(ev, "verify_answers", counting)
    samples = ["\\boxed{1}"] + [f"\\boxed{{x + {i}}}" for i in range(30)]  # 30 distinct wrong symbolic answers
    correct, answers = score([samples], ["1"])
    assert sum(sent) == ev.VOTE_TOP * (ev.VOTE_TOP - 1) // 2  # every pair among the 12 most voted, no more
    assert len(set(answers[0])) == 31 and summarize(correct, answers, k=31)["maj@31"] == 1.0  # a 1-1 tie: first


@needs_data
def test_breakdown_by_level(math500):
    # solve only the level <= 2 problems: their groups score 1, the others 0
    easy = [int(r["level"]) <= 2 for r in math500]
    assert any(easy) and not all(easy)
    comps = [[r["solution"] if e else "\\boxed{123456789}"] * 2 for r, e in zip(math500, easy, strict=True)]
    correct, answers = score(comps, [r["answer"] for r in math500])
    s = summarize(correct, answers, k=2, groups={"level": [r["level"] for r in math500]})
    table = s["breakdown"]["level"]
    assert sum(m["n"] for m in table.values()) == len(math500)
    for level, m in table.items():
        assert m["pass@1"] == m["pass@2"] == m["maj@2"] == float(int(level) <= 2)
    assert s["pass@1"] == pytest.approx(sum(easy) / len(easy))
    assert "by level" in format_table(s | {"mean_length": 1.0})


@needs_data
def test_bad_inputs_are_one_clear_error():
    with pytest.raises(ValueError, match="'question'"):
        load_benchmark("math500", str(DATA / "math500.jsonl"), problem_key="question")
    with pytest.raises(ValueError, match="'subject'"):  # the breakdown columns are checked too
        load_benchmark("math500", str(DATA / "aime24.jsonl"))
    with pytest.raises(ValueError, match="unknown benchmark 'math5000'"):
        load_benchmark("math5000")
    with pytest.raises(ValueError, match="--data"):
        load_benchmark("custom")
    assert set(BENCHMARKS) >= {"math500", "aime24", "aime25", "gsm8k", "custom"}


def test_cli_missing_model(tmp_path, capsys):
    import argparse

    from r1.eval import add_eval_args, cmd_eval

    p = argparse.ArgumentParser()
    add_eval_args(p)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n")
    args = p.parse_args([str(tmp_path / "nope"), "--benchmark", "custom", "--data", str(data)])
    with pytest.raises(FileNotFoundError, match="nope"):
        cmd_eval(args)
