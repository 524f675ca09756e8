"""What the two training entry points (GRPO in r1.trainer, SFT in r1.sft) share, so that both run on the same
machinery: the compute keys checked before anything loads, the model made ready to train in this process
(precision, activation checkpointing, device, sharding), and the metrics file."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from r1.compute import apply_activation_checkpointing, apply_precision, check_checkpointing, check_precision
from r1.expert_parallel import check_expert_parallel
from r1.parallel import Dist


def policy_config(name_or_dir: str) -> Any:
    """The native V3 config of a preset or a local V3 model directory (read from config.json, no weights); None
    for any other model (a transformers policy, or a hub id not fetched yet)."""
    from r1.model.config import PRESETS, V3Config, load_config

    if name_or_dir in PRESETS:
        return load_config(name_or_dir)
    p = Path(name_or_dir)
    if not (p / "config.json").is_file():
        return None
    from r1.policy import model_config

    return V3Config.from_json(p) if model_config(p).get("model_type") == "deepseek_v3" else None


def check_compute(model: str, precision: str, fp8_block: int, gradient_checkpointing: str,
                  expert_parallel: int = 1) -> None:
    """The compute keys of a recipe, one line each, before anything loads (the expert-parallel degree against the
    model's experts here, against the world size in Dist)."""
    config = policy_config(model)
    check_precision(precision, config, fp8_block)
    check_checkpointing(gradient_checkpointing)
    if expert_parallel != 1 and not hasattr(config, "n_routed_experts"):
        raise ValueError(f"expert_parallel={expert_parallel} needs the native V3 model's routed experts "
                         f"({model!r} is not one)")
    check_expert_parallel(expert_parallel, getattr(config, "n_routed_experts", None))


def prepare_model(model: nn.Module, dist: Dist, precision: str, fp8_block: int, gradient_checkpointing: str,
                  speed_layer: Callable[[nn.Module, torch.device], nn.Module] | None = None) -> nn.Module:
    """In order: the CPU speed layer (r1.cpu.accelerate, passed in by the entry points that may import it), the
    precision layer (fp8 linears and experts swapped in), activation checkpointing, the device, then FSDP2
    sharding when launched so (bf16 compute through its MixedPrecisionPolicy), the routed experts split over the
    expert-parallel ranks first when Dist has them (r1.expert_parallel, in Dist.wrap). Module swaps come before sharding
    (FSDP2 keeps the modules it was given), and before the optimizer sees the parameters. A model on the meta
    device stays there: a loader (r1.model.hf.load_hf's `shard`) materialises each rank's shards after."""
    if speed_layer is not None:
        model = speed_layer(model, dist.device)
    model = apply_precision(model, precision, fp8_block)
    apply_activation_checkpointing(model, gradient_checkpointing)
    # (a model already on the device is not moved: under FakeTensorMode, r1.simulate, a move swaps every tensor)
    params = list(model.parameters())
    if not any(p.is_meta for p in params) and any(p.device != dist.device for p in params):
        model = model.to(dist.device)
    return dist.wrap(model.train(), precision)


class JsonlLogger:
    """One JSON line per step. A fresh run starts a fresh file; a resumed one keeps the lines up to its step (a run
    killed after logging but before checkpointing would otherwise leave those steps in the file twice)."""

    def __init__(self, path: Path, resume_step: int = 0):
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step] \
            if resume_step and path.exists() else []
        self.f = open(path, "w")  # noqa: SIM115 - kept open for the run
        self.f.write("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()}
        self.f.write(json.dumps({"step": step, **clean}) + "\n")
        self.f.flush()
