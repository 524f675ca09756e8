"""SFT on the machinery GRPO uses: bitwise resume, 2-process data parallel and FSDP2 with identical weights on every
rank, metrics.jsonl, and the compute keys' one-line errors."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from r1 import checkpoint
from r1.cli import main
from r1.model.hf import load_hf
from r1.sft import SftConfig, sft

ROOT = Path(__file__).resolve().parents[1]


def tiny(out: Path, **kw: object) -> SftConfig:
    base = dict(model="tiny", tokenizer="char", output_dir=str(out), batch_size=4, max_rows=64, lr=3e-3,
                warmup_steps=2, progress=False)
    return SftConfig(**{**base, **kw})


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return checkpoint.read_state(ckpt)["model"]


def test_resume_is_bitwise(tmp_path: Path) -> None:
    """A 6-step run killed after its step-3 checkpoint and resumed == the 6 steps without stopping: weights,
    optimizer, the learning-rate schedule (it decays over `steps`), the batch order."""
    sft(tiny(tmp_path / "straight", steps=6, save_every=3))
    killed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step_00000003", killed / "checkpoints" / "step_00000003")
    lines = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")  # logged step 4, killed before its save
    sft(tiny(killed, steps=6, resume="auto"))
    stopped = weights(killed / "checkpoints" / "step_00000003")
    a = weights(checkpoint.latest(tmp_path / "straight" / "checkpoints"))
    b = weights(checkpoint.latest(killed / "checkpoints"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(stopped[k], b[k]) for k in b)  # it trained between steps 3 and 6
    resumed = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in resumed] == [1, 2, 3, 4, 5, 6]
    assert [x["loss/ce"] for x in resumed] == [json.loads(x)["loss/ce"] for x in lines]


def test_two_process_ddp_and_fsdp2(tmp_path: Path) -> None:
    """`accelerate launch` with 2 CPU processes: each rank trains on its half of every batch; the run checks that
    every rank ends with bit-identical weights (and fails otherwise); data parallel and FSDP2 compute the same
    update."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["model=tiny", "tokenizer=char", "steps=3", "batch_size=4", "max_rows=64", "warmup_steps=1",
            "progress=false"]
    launch = {"ddp": ["--config_file", str(ROOT / "recipes/accelerate/cpu.yaml")],
              "fsdp": ["--config_file", str(ROOT / "recipes/accelerate/fsdp.yaml"), "--num_processes", "2"]}
    for name, flags in launch.items():
        cmd = ["accelerate", "launch", *flags, "-m", "r1", "sft", *args, f"output_dir={tmp_path / name}"]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert [json.loads(x)["step"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] \
            == [1, 2, 3]
    ddp, fsdp = (load_hf(tmp_path / n / "model").state_dict() for n in ("ddp", "fsdp"))
    steps = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["loss/ce"] < steps[0]["loss/ce"]  # it trained
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("args, needle", [
    (["sft", "precision=fp16"], "unknown precision 'fp16'"),
    (["train", "precision=fp16"], "unknown precision 'fp16'"),
    (["sft", "gradient_checkpointing=some"], "unknown gradient_checkpointing 'some'"),
    (["sft", "model=smoke", "precision=fp8", "fp8_block=128"], "fp8_block"),
])
def test_bad_compute_keys_are_one_line(args: list[str], needle: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    rc = main([*args, f"output_dir={out}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and "\n" not in err, err
    assert not out.exists()
