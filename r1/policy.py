"""One home for policies, shared by the RL loop, SFT and evaluation:

- `resolve_model`: a local model directory, or a hub repo id fetched to the local cache;
- `load_policy`: DeepSeek-V3 checkpoints as the native model (r1.model.hf), any other causal LM through transformers;
- `build_model`: a preset name (fresh weights, for a cold start) or `load_policy`;
- `export`: a HF-format directory (+ tokenizer) that transformers and vLLM load;
- `engine_weights`: the HF-named tensors a separate rollout engine loads after an update.

Speed layers (the CPU GEMMs, FP8, sharding) are not applied here: the run entry points wrap what this returns.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from r1.model.model import V3ForCausalLM

if TYPE_CHECKING:
    from r1.parallel import Dist


def resolve_model(name_or_path: str) -> Path:
    """A local model directory, or a hub repo id (owner/name) fetched to the local cache."""
    p = Path(name_or_path)
    if (p / "config.json").is_file():
        return p
    if p.exists() or name_or_path.count("/") != 1 or name_or_path.startswith((".", "/")):
        raise FileNotFoundError(f"model {name_or_path!r} not found (expected a directory with config.json)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # noqa: BLE001 - offline, no such repo, no access: one line either way
        raise FileNotFoundError(f"model {name_or_path!r} is not a local directory and the hub gave: "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def model_config(directory: Path) -> dict[str, Any]:
    """config.json of a model directory; a file that is not a JSON object is one error naming it."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object (got {type(config).__name__})")
    return config


def load_policy(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                shard: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
    """DeepSeek-V3 checkpoints load as the native model, built on meta and read straight into `device` and `dtype`;
    `shard` (Dist.wrap) shards it first, so each rank allocates and reads only its shards. Any other causal LM
    loads through transformers (then moved and sharded whole)."""
    p = resolve_model(name_or_path)
    if model_config(p).get("model_type") == "deepseek_v3":
        from r1.model.hf import load_hf

        return load_hf(p, dtype=dtype, device=device, shard=shard)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype).to(device)
    return model if shard is None else shard(model)


def build_model(name_or_dir: str, device: str | torch.device = "cpu",
                shard: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
    """A preset name (tiny, smoke, ...: the native model with fresh weights, then `shard`) or a model to load
    (load_policy: `shard` on the meta device, then each rank's shards read)."""
    from r1.model.config import PRESETS, load_config

    if name_or_dir in PRESETS:
        model = V3ForCausalLM(load_config(name_or_dir))
        return model if shard is None else shard(model)
    return load_policy(name_or_dir, device=device, shard=shard)


def export(model: nn.Module, tok: Any, directory: Path, state_dict: dict[str, Tensor] | None = None,
           dist: Dist | None = None) -> None:
    """A HF-format model directory (+ tokenizer) that transformers and vLLM load; `state_dict` replaces the module's
    own. Under FSDP2 every rank calls it: the native model is gathered one parameter at a time and written shard by
    shard by the main rank; a transformers model is gathered whole on the main rank."""
    main = dist is None or dist.main
    if isinstance(model, V3ForCausalLM):
        from r1.model.hf import save_hf

        if state_dict is not None:
            model = V3ForCausalLM(model.config)
            model.load_state_dict(state_dict)
        save_hf(model, directory, main=main)
    else:
        if state_dict is None and dist is not None and dist.fsdp:
            state_dict = dist.full_state(model)
        if main:
            model.save_pretrained(directory, state_dict=state_dict)
    if main:
        tok.save_pretrained(str(directory))


def engine_weights(policy: nn.Module, engine: Any) -> list[tuple[str, Tensor]]:
    """HF-named tensors for a separate engine's `load_weights`; nothing when the engine holds the policy itself. The
    trainer streams them instead (r1.weight_sync: no full copy under FSDP2)."""
    from r1.weight_sync import policy_weights, shares_policy

    return [] if shares_policy(engine, policy) else list(policy_weights(policy))
