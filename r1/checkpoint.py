"""Training checkpoints with torch.distributed.checkpoint (DCP): model and optimizer state, every rank's RNG, step
and whatever small state the loop adds (scheduler, data position).

A checkpoint is a directory `step_XXXXXXXX/`: DCP's files (`.metadata`, one `__R_0.distcp` per rank; each rank
writes only its own shards under FSDP2, replicated tensors are written once) and `extra.pt` (step, RNG of every
rank, the loop's extra state), written by rank 0 last. Loading reshards: a checkpoint saved by N processes loads
into M (or into one plain model), because DCP stores tensors under their fully qualified names with global shapes.
Each save goes to `step_XXXXXXXX.tmp` and is renamed only when complete, so a crash mid-save never corrupts the
last good checkpoint; the last `keep` are kept. `latest(dir)` finds the newest complete one for `resume=auto`.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from r1.parallel import Dist

EXTRA = "extra.pt"  # written last: its presence marks a complete checkpoint


def rng_state() -> dict[str, Any]:
    """This process's RNG streams: torch CPU, python, and the current CUDA device's when there is one."""
    s: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def _state(model: nn.Module, opt: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Model (and optimizer) state dicts keyed by parameter names: DTensor shards under FSDP2, plain tensors
    otherwise; the names do not depend on the world size, which is what lets DCP reshard on load."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if opt is None:
        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optimizer": osd}


def _single() -> bool:
    """No process group: DCP reads and writes in this process alone."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without a process group DCP warns that it assumes one process: it is one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is", UserWarning)
        yield


def _barrier(dist: Dist | None) -> None:
    if dist is not None and dist.world > 1:
        torch.distributed.barrier()


def save(directory: str | Path, step: int, model: nn.Module, opt: torch.optim.Optimizer | None = None,
         extra: dict[str, Any] | None = None, dist: Dist | None = None, keep: int = 2) -> Path:
    """Save a checkpoint of `step` (a collective: every rank calls it). `extra` is small picklable state (scheduler,
    data position) kept from rank 0; every rank's RNG is saved beside it."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    final, tmp = directory / f"step_{step:08d}", directory / f"step_{step:08d}.tmp"
    main = dist is None or dist.main
    rngs = dist.gather(rng_state()) if dist is not None else [rng_state()]
    if main:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier(dist)
    with _quiet():  # each rank writes its own file; rank 0 the metadata
        dcp.save(_state(model, opt), checkpoint_id=tmp, no_dist=_single())
    _barrier(dist)
    if main:
        torch.save({**(extra or {}), "step": step, "rng_ranks": rngs}, tmp / EXTRA)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic on one filesystem: readers see the old or the new, never half
        for old in sorted(p for p in directory.glob("step_*") if not p.name.endswith(".tmp"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(dist)
    return final


def latest(directory: str | Path) -> Path | None:
    done = sorted(p for p in Path(directory).glob("step_*") if not p.name.endswith(".tmp")
                  and (p / EXTRA).exists())
    return done[-1] if done else None


def read_extra(path: str | Path) -> dict[str, Any]:
    """The checkpoint's step, per-rank RNG and extra state, without touching the model: a missing or unreadable
    checkpoint (truncated, not a checkpoint) is one error naming it, before anything is built."""
    path = Path(path)
    file = path / EXTRA
    if not file.is_file() or not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (it holds {EXTRA} and DCP's .metadata)")
    try:
        state = torch.load(file, weights_only=False)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, a zip reader's RuntimeError, EOFError: one line each
        raise ValueError(f"{file} is not a readable checkpoint ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]})") from None
    if not isinstance(state, dict) or not {"step", "rng_ranks"} <= state.keys():
        raise ValueError(f"{file} is not an r1 checkpoint (no step and RNG state)")
    import torch.distributed.checkpoint as dcp

    try:
        dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 - as above: one line whatever the reader raised
        raise ValueError(f"{path / '.metadata'} is not a readable checkpoint ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]})") from None
    return state


def load(path: str | Path, model: nn.Module, opt: torch.optim.Optimizer | None = None,
         dist: Dist | None = None) -> dict[str, Any]:
    """Restore `model` (and `opt`) in place from a checkpoint saved at any world size (a collective), set this
    rank's RNG (when the world size is the one saved), and return the extra state with `step`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = Path(path)
    extra = read_extra(path)
    state = _state(model, opt)
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    missing = sorted(k for k in state["model"] if f"model.{k}" not in saved)
    if missing:
        raise ValueError(f"{path} does not match the model: {len(missing)} missing, e.g. {missing[0]}")
    # optimizer state exists only for parameters that had a gradient (MTP under GRPO has none): not an error
    with _quiet():
        dcp.load(state, checkpoint_id=path, planner=dcp.DefaultLoadPlanner(allow_partial_load=True), no_dist=_single())
    if opt is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    rngs, rank = extra.pop("rng_ranks"), 0 if dist is None else dist.rank
    if len(rngs) == (1 if dist is None else dist.world):  # another world size: ranks keep their own seeds
        set_rng_state(rngs[rank])
    return extra


def read_state(path: str | Path) -> dict[str, Any]:
    """A whole checkpoint's tensors in this one process ({"model": {name: tensor}, "optimizer": {...}}), for tests
    and conversion; not for resuming a large model."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    read_extra(path)
    with _quiet():
        return _load_state_dict_from_keys(checkpoint_id=str(path))
