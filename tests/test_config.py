from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from r1.config import ConfigError, dump_config, load_config, save_config


@dataclass
class Cfg:
    model: str
    lr: float = 1e-5
    steps: int = 10
    use_vllm: bool = False
    aggregation: Literal["grpo", "dapo", "dr_grpo"] = "grpo"
    run_name: str = "run"
    ref_model: Optional[str] = "base"  # noqa: UP045 - the typing.Optional spelling must work too
    max_grad_norm: float | None = 1.0
    rewards: list[str] = field(default_factory=lambda: ["math"])
    reward_weights: list[float] = field(default_factory=lambda: [1.0])
    temperatures: dict[str, float] = field(default_factory=dict)


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_file_then_overrides_win(tmp_path):
    path = _yaml(tmp_path, "model: tiny\nsteps: 5\nlr: 1.0e-4\n")
    cfg = load_config(Cfg, path, ["steps=7"])
    assert (cfg.model, cfg.steps, cfg.lr) == ("tiny", 7, 1e-4)
    assert cfg.use_vllm is False  # untouched default


def test_float_without_dot_is_a_float(tmp_path):
    # PyYAML reads "3e-6" as a string; the loader must still give 3e-6
    cfg = load_config(Cfg, _yaml(tmp_path, "model: m\nlr: 3e-6\n"), [])
    assert cfg.lr == 3e-6 and isinstance(cfg.lr, float)
    assert load_config(Cfg, None, ["model=m", "lr=3e-6"]).lr == 3e-6
    # an int is a fine float
    cfg = load_config(Cfg, None, ["model=m", "lr=1"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)


def test_bool_list_dict_literal_and_none_overrides():
    cfg = load_config(
        Cfg,
        None,
        [
            "model=m",
            "use_vllm=true",
            "rewards=[math, format]",
            "reward_weights=[1, 0.5]",
            "temperatures={a: 0.6}",
            "aggregation=dapo",
            "ref_model=null",
            "max_grad_norm=null",
        ],
    )
    assert cfg.use_vllm is True
    assert cfg.rewards == ["math", "format"]
    assert cfg.reward_weights == [1.0, 0.5]
    assert cfg.temperatures == {"a": 0.6}
    assert cfg.aggregation == "dapo"
    assert cfg.ref_model is None and cfg.max_grad_norm is None


def test_str_override_keeps_the_text():
    # yaml would read 2024 as an int and "true" as a bool; for a str field the text is meant
    cfg = load_config(Cfg, None, ["model=true", "run_name=2024"])
    assert cfg.model == "true" and cfg.run_name == "2024"


def test_typo_key_names_the_key_and_suggests_the_field(tmp_path):
    path = _yaml(tmp_path, "model: m\nlearning_rat: 1.0\n")
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, path, ["stpes=3"])
    msg = str(err.value)
    # both typos in one error, each with its suggestion
    assert "'stpes'" in msg and "did you mean 'steps'" in msg
    assert "'learning_rat'" in msg


def test_unknown_key_suggestion_from_file(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'use_vlm' \(did you mean 'use_vllm'\?\)"):
        load_config(Cfg, _yaml(tmp_path, "model: m\nuse_vlm: true\n"), [])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("steps=1.5", r"steps: expected int, got 1\.5"),
        ("steps=true", r"steps: expected int, got True"),  # bool is not an int here
        ("lr=fast", r"lr: expected float, got 'fast'"),
        ("use_vllm=1", r"use_vllm: expected bool, got 1"),
        ("rewards=math", r"rewards: expected list\[str\], got 'math'"),
        ("reward_weights=[1, x]", r"reward_weights: expected list\[float\], got \[1, 'x'\]"),
        ("aggregation=ppo", r"aggregation: expected Literal\['grpo', 'dapo', 'dr_grpo'\], got 'ppo'"),
        ("max_grad_norm=big", r"max_grad_norm: expected float \| None, got 'big'"),
    ],
)
def test_wrong_type_names_key_type_and_value(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(Cfg, None, ["model=m", override])


def test_missing_required_field_and_malformed_override():
    with pytest.raises(ConfigError, match="missing required key 'model'"):
        load_config(Cfg, None, [])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(Cfg, None, ["model"])


def test_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(Cfg, _yaml(tmp_path, "- a\n- b\n"), [])


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(Cfg, None, ["model=m", "lr=3e-6", "temperatures={a: 1}", "ref_model=null"])
    assert dump_config(cfg)["lr"] == 3e-6
    path = str(tmp_path / "config.yaml")
    save_config(cfg, path)
    assert load_config(Cfg, path, []) == cfg


@pytest.mark.parametrize("text, where", [("model: m\nrewards: [math\nlr: 1\n", "line 3"),
                                         ("model: m\n  steps: 3\n", "line 2"),
                                         ("model: 'm\n", "end of stream")])
def test_invalid_yaml_is_one_line_naming_the_file(tmp_path, text, where):
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, path)
    msg = str(e.value)
    assert msg.startswith(f"{path} is not valid YAML: ") and where in msg and "\n" not in msg
