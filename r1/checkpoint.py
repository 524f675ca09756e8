"""Training checkpoints: model, optimizer, scheduler, RNG states, data position and step.

Each save goes to `step_XXXXXXXX.tmp` and is renamed only when complete, so a crash mid-save never
corrupts the last good checkpoint; the last `keep` are kept. `latest(dir)` finds the newest complete
one for `resume=auto`.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])


def save(directory: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:08d}"
    tmp = directory / f"step_{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / "state.pt")
    with open(tmp / "state.pt", "rb") as f:
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # atomic on one filesystem: readers see the old or the new, never half
    for old in sorted(p for p in directory.glob("step_*") if not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(directory: str | Path) -> Path | None:
    done = sorted(p for p in Path(directory).glob("step_*") if not p.name.endswith(".tmp")
                  and (p / "state.pt").exists())
    return done[-1] if done else None


def load(path: str | Path) -> dict[str, Any]:
    """A saved state; a missing or unreadable file (truncated, not a checkpoint) is one error naming it."""
    file = Path(path) / "state.pt"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found (a checkpoint directory holds state.pt)")
    try:
        state = torch.load(file, weights_only=False)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, a zip reader's RuntimeError, EOFError: one line each
        raise ValueError(f"{file} is not a readable checkpoint ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]})") from None
    if not isinstance(state, dict) or not {"step", "rng"} <= state.keys():
        raise ValueError(f"{file} is not an r1 checkpoint (no step and RNG state)")
    set_rng_state(state["rng"])
    return state
