"""Rollout engines behind one interface (rollouts/base.py), chosen by name in a recipe."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rollouts.base import Engine, Rollout, SamplingParams
from rollouts.torch_engine import TorchEngine


def _vllm(**kw: Any) -> Engine:
    from rollouts.vllm_engine import VLLMEngine  # vllm is optional: imported only when asked for

    return VLLMEngine(**kw)


def _vllm_server(**kw: Any) -> Engine:
    from rollouts.vllm_engine import VLLMServerEngine

    return VLLMServerEngine(**kw)


ENGINES: dict[str, Callable[..., Engine]] = {"torch": TorchEngine, "vllm": _vllm, "vllm_server": _vllm_server}


def make_engine(name: str, **kw: Any) -> Engine:
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; choose one of: {', '.join(ENGINES)}")
    return ENGINES[name](**kw)


__all__ = ["ENGINES", "Engine", "Rollout", "SamplingParams", "TorchEngine", "make_engine"]
