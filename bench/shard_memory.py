"""Peak resident memory per rank: one process holding the whole model vs two gloo processes under FSDP2, while
loading (r1.policy.load_policy: meta, then each rank reads only its shards) and while training (forward, backward,
AdamW).

A V3 config with >= 200 MB of fp32 weights is saved once (r1.model.hf.save_hf); each measured run is a fresh
torchrun launch of this script, so both sides pay the same imports. Each phase's peak is the kernel's VmHWM, reset
between phases (/proc/self/clear_refs). Printed: raw peaks, peaks above the RSS after imports (what the model
costs), the ratios, and a JSON line.
Usage: python bench/shard_memory.py [--hidden 512] [--experts 16] [--layers 16] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def rank_main(model_dir: str, out: str, steps: int) -> None:
    """One rank: load, then train `steps` steps, recording the peak of each phase."""
    import torch
    import torch.distributed.fsdp
    import torch.distributed.tensor._utils  # noqa: F401 - imports are not the model: before the base is read

    from r1.parallel import Dist
    from r1.policy import load_policy
    from r1.trainer import sequence_logprobs

    torch.manual_seed(0)
    d = Dist()
    base = status_kb("VmRSS")
    reset_peak()
    model = load_policy(model_dir, shard=d.wrap).train()
    load = status_kb("VmHWM")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    reset_peak()
    for _ in range(steps):
        ids = torch.randint(3, model.config.vocab_size, (2, 32))
        loss = -sequence_logprobs(model, ids, torch.ones_like(ids), 16, 1.0)[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    train = status_kb("VmHWM")
    Path(out, f"rank{d.rank}_of{d.world}.json").write_text(json.dumps({"base": base, "load": load, "train": train}))
    if d.world > 1:
        import torch.distributed

        torch.distributed.destroy_process_group()


def launch(model_dir: Path, out: Path, nproc: int, steps: int) -> list[dict[str, int]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_FSDP": "true" if nproc > 1 else "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), __file__,
                    "--rank-main", str(model_dir), str(out), "--steps", str(steps)], env=env, check=True, cwd=ROOT)
    return [json.loads((out / f"rank{r}_of{nproc}.json").read_text()) for r in range(nproc)]


def make_model(directory: Path, hidden: int, experts: int, layers: int) -> int:
    """Save a V3 config of this size with random weights; returns its fp32 weight bytes."""
    import torch

    from r1.model.config import PRESETS
    from r1.model.hf import save_hf
    from r1.model.model import V3ForCausalLM

    c = PRESETS["bench"].replace(hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
                                 n_routed_experts=experts, vocab_size=8192,
                                 num_hidden_layers=layers)
    torch.manual_seed(0)
    m = V3ForCausalLM(c)
    save_hf(m, directory, max_shard_bytes=100 << 20)
    return sum(p.numel() * 4 for p in m.parameters())


def measure(hidden: int = 512, experts: int = 16, layers: int = 16, steps: int = 2) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        weights = make_model(tmp_path / "model", hidden, experts, layers)
        one = launch(tmp_path / "model", tmp_path, 1, steps)[0]
        two = launch(tmp_path / "model", tmp_path, 2, steps)
    res: dict[str, float] = {"fp32_weights_mb": weights / 2**20}
    for phase in ("load", "train"):
        res[f"one_{phase}_mb"] = one[phase] / 1024
        res[f"fsdp2_{phase}_mb"] = max(r[phase] for r in two) / 1024
        res[f"ratio_{phase}"] = res[f"fsdp2_{phase}_mb"] / res[f"one_{phase}_mb"]
        res[f"ratio_{phase}_above_imports"] = max(r[phase] - r["base"] for r in two) / (one[phase] - one["base"])
    res["imports_mb"] = one["base"] / 1024
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rank-main", nargs=2, metavar=("MODEL_DIR", "OUT"))
    a = ap.parse_args()
    if a.rank_main:
        rank_main(*a.rank_main, steps=a.steps)
        return
    r = measure(a.hidden, a.experts, a.layers, a.steps)
    print(f"V3 config with {r['fp32_weights_mb']:.0f} MB of fp32 weights; RSS after imports {r['imports_mb']:.0f} MB")
    for phase in ("load", "train"):
        print(f"{phase:>5}: one process {r[f'one_{phase}_mb']:.0f} MB, FSDP2 rank (max of 2) "
              f"{r[f'fsdp2_{phase}_mb']:.0f} MB: {r[f'ratio_{phase}']:.2f}x "
              f"({r[f'ratio_{phase}_above_imports']:.2f}x above the imports)")
    print(json.dumps({"bench": "shard_memory", **{k: round(v, 3) for k, v in r.items()}}))


if __name__ == "__main__":
    main()
