"""Checkpoints with torch.distributed.checkpoint: a save/load round trip restores model, optimizer, RNG and the
loop's state; a killed save never hides the last good checkpoint; one-line errors for a missing or corrupt one;
under FSDP2 (2 gloo processes) resume is bitwise, the export is written shard by shard, and a 2-process checkpoint
loads into 1 process with the same logits."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _launch import ROOT, torchrun
from _models import exported

from r1 import checkpoint
from r1.model.hf import load_hf
from r1.policy import load_policy
from r1.trainer import sequence_logprobs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported(tmp_path_factory, "tiny")


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    """n AdamW steps on token ids drawn from the torch RNG (so a resume must restore the RNG too)."""
    for _ in range(n):
        ids = torch.randint(3, 200, (2, 10))
        loss = -sequence_logprobs(model, ids, torch.ones_like(ids), 4, 1.0)[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_round_trip_one_process(model_dir: Path, tmp_path: Path) -> None:
    """Save after 2 steps, keep training 2 more; a fresh model and optimizer loaded from the checkpoint and trained
    2 steps give the same weights bit for bit (optimizer moments, RNG and extra state came back)."""
    torch.manual_seed(0)
    m = load_policy(str(model_dir)).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    train_steps(m, opt, 2)
    path = checkpoint.save(tmp_path, 2, m, opt, {"cursor": 7, "sched": {"last_epoch": 2}})
    py = random.random()
    train_steps(m, opt, 2)
    assert checkpoint.latest(tmp_path) == path and sorted(p.name for p in path.iterdir())[-1] == "extra.pt"
    torch.manual_seed(123)  # a different stream: the load must restore the saved one
    m2 = load_policy(str(model_dir)).train()
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    extra = checkpoint.load(path, m2, opt2)
    assert extra == {"cursor": 7, "sched": {"last_epoch": 2}, "step": 2}
    assert random.random() == py
    train_steps(m2, opt2, 2)
    for (n, a), b in zip(m.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    # the whole checkpoint readable in one process, as saved
    saved = checkpoint.read_state(path)
    assert saved["model"].keys() == m.state_dict().keys() and "state" in saved["optimizer"]


KILL_MID_SAVE = """
import os, signal, sys, torch
from r1 import checkpoint
m = torch.nn.Linear(4, 4)
checkpoint.save(sys.argv[1], 1, m)
real = torch.save
def half_then_die(obj, f, *a, **k):
    real(obj, f, *a, **k)
    if not str(f).endswith("extra.pt"):  # DCP's own files are written whole
        return
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)  # half the bytes are on disk ...
    os.kill(os.getpid(), signal.SIGKILL)  # ... when the process is killed
torch.save = half_then_die
with torch.no_grad():
    m.weight.zero_()
checkpoint.save(sys.argv[1], 2, m)
"""


def test_killed_save_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(tmp_path)], cwd=ROOT, capture_output=True)
    assert r.returncode == -9, r.stderr.decode()[-2000:]  # really killed mid-save
    assert (tmp_path / "step_00000002.tmp" / ".metadata").exists()  # the half-written save is there ...
    last = checkpoint.latest(tmp_path)
    assert last is not None and last.name == "step_00000001"  # ... and ignored
    m = torch.nn.Linear(4, 4)
    with torch.no_grad():
        m.weight.zero_()
    assert checkpoint.load(last, m)["step"] == 1 and m.weight.abs().sum() > 0
    checkpoint.save(tmp_path, 2, m)  # the next save of step 2 replaces the debris
    assert checkpoint.latest(tmp_path).name == "step_00000002"
    assert not (tmp_path / "step_00000002.tmp").exists()


def test_keep_last(tmp_path: Path) -> None:
    m = torch.nn.Linear(2, 2)
    for step in range(1, 5):
        checkpoint.save(tmp_path, step, m, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]


def test_bad_checkpoints_are_one_line(tmp_path: Path) -> None:
    m = torch.nn.Linear(2, 2)
    with pytest.raises(FileNotFoundError, match="is not a checkpoint directory") as e:
        checkpoint.read_extra(tmp_path / "nope")
    assert "\n" not in str(e.value)
    path = checkpoint.save(tmp_path, 1, m)
    (path / "extra.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="extra.pt is not a readable checkpoint") as e:
        checkpoint.load(path, m)
    assert "\n" not in str(e.value)
    path = checkpoint.save(tmp_path, 3, m)
    (path / ".metadata").write_bytes(b"\x80\x04 truncated")
    with pytest.raises(ValueError, match=r"\.metadata is not a readable checkpoint") as e:
        checkpoint.read_extra(path)
    assert "\n" not in str(e.value)
    path = checkpoint.save(tmp_path, 2, m)
    with pytest.raises(ValueError, match=r"does not match the model: 2 missing, e\.g\. 0\.bias") as e:
        checkpoint.load(path, torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert "\n" not in str(e.value)


FSDP_RUN = """
import sys, torch
from pathlib import Path
from r1 import checkpoint
from r1.model.hf import save_hf
from r1.parallel import Dist
from r1.policy import load_policy
from test_checkpoint import train_steps
d = Dist()
assert d.fsdp and d.world == 2
model_dir, out = sys.argv[1], Path(sys.argv[2])

def build():
    m = load_policy(model_dir, shard=d.wrap).train()  # each rank reads only its shards
    return m, torch.optim.AdamW(m.parameters(), lr=1e-3)

torch.manual_seed(d.rank)
a, opt_a = build()
loaded = d.full_state(a)
if d.main:
    torch.save(loaded, out / "loaded.pt")
train_steps(a, opt_a, 4)  # uninterrupted
torch.manual_seed(d.rank)
b, opt_b = build()
train_steps(b, opt_b, 2)
checkpoint.save(out / "ckpt", 2, b, opt_b, {"cursor": 5}, d)
del b, opt_b
torch.manual_seed(100 + d.rank)
c, opt_c = build()
assert checkpoint.load(out / "ckpt" / "step_00000002", c, opt_c, d) == {"cursor": 5, "step": 2}
train_steps(c, opt_c, 2)  # resumed
for (n, pa), pc in zip(a.named_parameters(), c.parameters(), strict=True):
    assert torch.equal(pa.to_local(), pc.to_local()), n  # this rank's shard, bit for bit
checkpoint.save(out / "ckpt", 4, c, opt_c, {}, d)
ids = torch.arange(3, 27).view(2, 12)
with torch.no_grad():
    c.eval()
    logits = c(ids, attention_mask=torch.ones_like(ids), mtp=False).hidden @ c.lm_head.weight.T  # root: unsharded
save_hf(c, out / "export", max_shard_bytes=20_000, main=d.main)  # gathered one parameter at a time
full = d.full_state(c)
if d.main:
    torch.save({"logits": logits, "state": full}, out / "ref.pt")
torch.distributed.destroy_process_group()
"""


def test_fsdp2_checkpoint_resume_export_reshard(model_dir: Path, tmp_path: Path) -> None:
    """2 gloo processes under FSDP2: each rank loads only its rows of the HF checkpoint (gathered: the checkpoint's
    weights); train 2 steps, save, resume in fresh models (another RNG seed) and train 2 more
    == 4 steps straight, each rank's shards bit for bit. Then, in this one process: the export (several shards)
    loads to the trained weights, and the 2-process checkpoint loads into a plain model with the same logits."""
    torchrun(FSDP_RUN, tmp_path, str(model_dir), str(tmp_path), fsdp=True)
    start = load_hf(model_dir).state_dict()
    loaded = torch.load(tmp_path / "loaded.pt")  # what the ranks read, each its own rows, gathered
    assert loaded.keys() == start.keys() and all(torch.equal(loaded[k], v) for k, v in start.items())
    ref = torch.load(tmp_path / "ref.pt")
    index = json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # written in several shards
    exported_sd = load_hf(tmp_path / "export").state_dict()
    assert exported_sd.keys() == ref["state"].keys()
    for k, v in ref["state"].items():
        assert torch.equal(exported_sd[k], v), k
    assert any(not torch.equal(start[k], v) for k, v in ref["state"].items())  # it trained
    one = load_policy(str(model_dir)).eval()
    assert checkpoint.load(checkpoint.latest(tmp_path / "ckpt"), one)["step"] == 4
    ids = torch.arange(3, 27).view(2, 12)
    with torch.no_grad():
        logits = one(ids, attention_mask=torch.ones_like(ids), mtp=False).hidden @ one.lm_head.weight.T
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-5)
