"""Weight sync: after each update the policy's weights go to a rollout engine that holds its own copy (vLLM colocated
or a vLLM server), under HF names. The weights are streamed: under FSDP2 one parameter is gathered at a time (a
collective every rank makes, in the same order), so no rank ever holds a full copy; the engine takes the whole
stream in one call and packs it into large buckets on its side (vLLM's in-place reload, NCCL's packed broadcast,
safetensors shards), never one call per tensor. The same stream serves one process, DDP, FSDP2 and a resumed run, for
the native V3 model and for any transformers causal LM.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor, nn

from r1.model.hf import _full, hf_state_dict
from r1.model.model import V3ForCausalLM


def policy_weights(policy: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The policy's tensors under HF names, whole, one at a time (every rank must iterate to the end under FSDP2)."""
    if isinstance(policy, V3ForCausalLM):
        yield from hf_state_dict(policy)
        return
    for name, t in policy.state_dict().items():  # transformers: its own names are HF names
        yield name, _full(t.detach())


class Counted:
    """An iterable of named tensors that counts the bytes that went through it."""

    def __init__(self, named: Iterable[tuple[str, Tensor]]):
        self.named, self.bytes = named, 0

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        for name, t in self.named:
            self.bytes += t.numel() * t.element_size()
            yield name, t


def shares_policy(engine: Any, policy: nn.Module) -> bool:
    """The torch engine decodes with the policy object itself: nothing to sync."""
    return getattr(engine, "model", None) is policy


def sync_weights(engine: Any, policy: nn.Module) -> dict[str, float]:
    """Stream the policy into the engine; `sync/seconds` and `sync/bytes` (this rank's) for the step's log."""
    if shares_policy(engine, policy):
        return {}
    t = time.perf_counter()
    stream = Counted(policy_weights(policy))
    engine.load_weights(stream)
    return {"sync/seconds": time.perf_counter() - t, "sync/bytes": float(stream.bytes)}
