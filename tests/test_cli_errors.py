"""Bad input through the real command line (`python -m r1 ...` in a fresh process): one line on stderr naming the
file and what is wrong, a non-zero exit, nothing written to the output directory, no cache left in the user's home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _models import exported

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported(tmp_path_factory, "tiny")


def r1(args: list[str], home: Path) -> subprocess.CompletedProcess:
    """The CLI in its own process, HOME a fresh directory and no cache location set elsewhere, so a cache written
    under the home would show."""
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_"))}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "r1", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def one_line_error(r: subprocess.CompletedProcess, command: str, *needles: str) -> None:
    err = r.stderr.strip()
    assert r.returncode != 0, r.stdout[-2000:]
    assert "\n" not in err and "Traceback" not in err, err[-3000:]
    assert err.startswith(f"r1 {command}: error:"), err
    for n in needles:
        assert n in err, err


def files_under(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


@pytest.fixture()
def empty(tmp_path: Path) -> Path:
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    return p


@pytest.mark.parametrize("command", ["train", "sft", "eval"])
def test_empty_dataset(command: str, empty: Path, model_dir: Path, tmp_path: Path) -> None:
    out, home = tmp_path / "out", tmp_path / "home"
    args = {"train": ["train", f"model={model_dir}", f"dataset={empty}", f"output_dir={out}"],
            "sft": ["sft", "model=tiny", f"dataset={empty}", f"output_dir={out}"],
            "eval": ["eval", str(model_dir), "--benchmark", "custom", "--data", str(empty), "--problem-key", "prompt",
                     "--out", str(out / "gen.jsonl")]}[command]
    r = r1(args, home)
    one_line_error(r, command, str(empty), "empty")
    assert not out.exists()
    assert files_under(home) == []  # no datasets cache (or anything else) left in the user's home


def test_recipe_not_yaml(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("steps: 3\nrewards: [math\nlr: 1e-4\n")
    out = tmp_path / "out"
    one_line_error(r1(["train", str(recipe), f"output_dir={out}"], tmp_path / "home"), "train", str(recipe),
                   "not valid YAML")
    assert not out.exists()


def test_corrupt_resume_checkpoint(model_dir: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "step_00000002"
    ckpt.mkdir()
    (ckpt / ".metadata").write_bytes(b"")
    (ckpt / "extra.pt").write_bytes(b"\x80\x04 not a checkpoint at all")
    out = tmp_path / "out"
    r = r1(["train", f"model={model_dir}", f"resume={ckpt}", f"output_dir={out}", "progress=false"], tmp_path / "home")
    one_line_error(r, "train", str(ckpt / "extra.pt"), "not a readable checkpoint")
    assert not out.exists()  # config.yaml is not written before the checkpoint is read


def test_config_json_not_json(model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "model"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text("{'model_type': deepseek_v3")
    out = tmp_path / "out"
    r = r1(["train", f"model={bad}", f"output_dir={out}"], tmp_path / "home")
    one_line_error(r, "train", str(bad / "config.json"), "not valid JSON")
    assert not out.exists()


@pytest.mark.parametrize(("plan", "needle"), [
    (["gpus=8", "precision=fp16", "micro_batch_tokens=4096"], "precision: expected Literal['fp32', 'bf16', 'fp8']"),
    (["gpus=0", "precision=bf16", "micro_batch_tokens=4096"], "gpus must be >= 1, got 0"),
    (["gpus=8", "precision=bf16", "micro_batch_tokens=4096", "nodes=2"], "unknown key 'nodes'"),
    (["gpus=8", "precision=bf16", "micro_batch_tokens=4k"], "micro_batch_tokens: expected int, got '4k'"),
    (["gpus=8", "precision=bf16"], "missing required key 'micro_batch_tokens'"),
])
def test_model_plan_bad_input(plan: list[str], needle: str, tmp_path: Path) -> None:
    """A bad --plan setting: one line and exit 2, before the model config is even read (the path does not exist)."""
    r = r1(["model", str(tmp_path / "no-such-config.json"), "--plan", *plan], tmp_path / "home")
    one_line_error(r, "model", needle)
    assert r.returncode == 2 and r.stdout == ""


def test_model_plan_does_not_fit(tmp_path: Path) -> None:
    """DeepSeek-V3 on one GPU: the table, then one line saying why it does not fit, exit 1."""
    config = ROOT.parent / "shared" / "data" / "configs" / "deepseek-v3.config.json"
    r = r1(["model", str(config), "--plan", "gpus=1", "precision=bf16", "micro_batch_tokens=4096"], tmp_path / "home")
    one_line_error(r, "model", "does not fit", "H100 (80 GB")
    assert r.returncode == 1 and "parameters (fp32 master, 1/1)" in r.stdout and "total" in r.stdout
