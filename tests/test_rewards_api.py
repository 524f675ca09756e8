"""Reward plugin API (registry, RewardSet, error policy, metrics) and the format rewards."""

import math
import sys
import types

import pytest

from rewards.combine import RewardError, RewardSet
from rewards.format import format_reward, language_reward, length_reward, overlong_reward, tag_count_reward
from rewards.registry import BUILTINS, get_reward, register


def test_builtins_resolve():
    for name in BUILTINS:
        assert callable(get_reward(name))
    assert get_reward("rewards.format:format_reward") is format_reward
    with pytest.raises(ValueError, match="known: .*math"):
        get_reward("nope")
    with pytest.raises(ValueError, match="cannot load"):
        get_reward("no_such_pkg.mod:fn")


def test_module_path_and_register(monkeypatch):
    mod = types.ModuleType("my_rewards")
    mod.short = lambda completions, **kw: [1.0 if len(c) < 5 else 0.0 for c in completions]
    monkeypatch.setitem(sys.modules, "my_rewards", mod)
    assert get_reward("my_rewards:short")(["abc", "abcdef"]) == [1.0, 0.0]
    register("always_one", lambda completions, **kw: [1.0] * len(completions))
    assert get_reward("always_one")(["x"]) == [1.0]


def _boom(completions, **kw):
    raise RuntimeError("kaput")


def test_reward_set_weights_none_and_metrics():
    seen = {}

    def spy(completions, answer, level, **kw):
        seen.update(answer=answer, level=level)
        return [None, 1.0, 0.5]

    rs = RewardSet([("math", 1.0), ("spy", 0.5, spy)])
    rows = [{"answer": "2", "level": 1}, {"answer": "3", "level": 2}, {"answer": "4", "level": 3}]
    total, per = rs(["\\boxed{2}", "\\boxed{5}", "\\boxed{4}"], rows)
    assert seen == {"answer": ["2", "3", "4"], "level": [1, 2, 3]}  # TRL-style keyword columns
    assert per["math"] == [1.0, 0.0, 1.0] and per["spy"] == [None, 1.0, 0.5]
    assert total == [1.0, 0.5, 1.25]
    m = rs.metrics()
    assert m["rewards/spy/mean"] == 0.75 and m["rewards/spy/std"] == 0.25
    assert m["rewards/math/mean"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("bad, why", [
    (_boom, "RuntimeError: kaput"),
    (lambda completions, **kw: [1.0], "returned 1 values for 2"),
    (lambda completions, **kw: [1.0, "yes"], "row 1: non-number 'yes'"),
    (lambda completions, **kw: [1.0, math.inf], "row 1: non-number inf"),
])
def test_errors_name_reward_and_row(bad, why, caplog):
    rows = [{}, {}]
    with pytest.raises(RewardError, match=f"'bad'.*{why}"):
        RewardSet([("bad", 1.0, bad)], on_error="raise")(["a", "b"], rows)
    total, per = RewardSet([("bad", 1.0, bad), ("tag_count", 1.0)])(["a", "<think>"], rows)
    assert "'bad'" in caplog.text and why.split(":")[0] in caplog.text
    assert per["tag_count"] == [0.0, 0.25] and all(v in (0.0, 1.0) for v in per["bad"])
    with pytest.raises(ValueError):
        RewardSet([("bad", 1.0, bad)], on_error="ignore")


def test_nan_means_not_applicable():
    total, per = RewardSet([("nan", 2.0, lambda completions, **kw: [math.nan, 1.0])])(["a", "b"], [{}, {}])
    assert per["nan"] == [None, 1.0] and total == [0.0, 2.0]


def test_format_and_tag_count():
    good = "<think>\nsteps\n</think>\n<answer>\n42\n</answer>"
    cases = [good, "<think>a</think> the answer is 42", "<answer>42</answer><think>a</think>",
             "<think>a<think>b</think><answer>1</answer>", "x " + good]
    assert format_reward(cases) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert format_reward(["steps</think><answer>1</answer>"], think_in_prompt=True) == [1.0]
    assert tag_count_reward(cases) == [1.0, 0.5, 1.0, 0.75, 1.0]


def test_language():
    assert language_reward(["<think>Let us add the numbers $x^2 + \\frac{1}{2}$</think>"]) == [1.0]
    mixed = language_reward(["<think>我们 compute 这个</think>"], language="zh")[0]
    assert mixed == pytest.approx(4 / 5)  # four Chinese characters, one English word
    assert language_reward(["<think>$1+1$</think>", "Привет мир"], language=["en", "ru"]) == [None, 1.0]


def test_overlong_and_length():
    assert overlong_reward(["x"] * 4, max_length=10, cache_length=4,
                           completion_ids=[[0] * 5, [0] * 6, [0] * 8, [0] * 11]) == [0.0, 0.0, -0.5, -1.0]
    comps = ["\\boxed{1}", "so \\boxed{1}", "long long \\boxed{1}", "\\boxed{2}"]
    out = length_reward(comps, prompts=["p"] * 4, answer=["1"] * 4)
    assert out[0] == 0.5 and out[2] == -0.5 and out[3] == 0.0 and out[1] > out[2]
    assert length_reward(["a", "bb"], prompts=["p", "q"]) == [0.0, 0.0]
