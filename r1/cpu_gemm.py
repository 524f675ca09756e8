"""Swap a model's fp32 CPU GEMMs onto oneDNN (kernels and why: r1/model/gemm.py), from outside the model file.

`use_onednn(model)` replaces, in place, every plain nn.Linear by a OneDNNLinear and the routed experts by
OneDNNGroupedExperts, reusing the parameters (same names, same objects), as r1.fp8's conversion does; only where
the path is on (by default where the CPU has AVX-512: see r1/model/gemm.py). r1's loaders
(`r1.trainer.load_policy`, SFT's presets) call it, for the native model and any transformers model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from r1.model import gemm
from r1.model.gemm import EXPERT_MIN_ROWS, _GroupedMM, linear, usable
from r1.model.model import GroupedExperts, swiglu


class OneDNNLinear(nn.Linear):
    """nn.Linear whose GEMMs run on oneDNN where `usable` (same parameters, same state dict)."""

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> OneDNNLinear:
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, device="meta")
        m.weight, m.bias = lin.weight, lin.bias
        return m

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class OneDNNGroupedExperts(GroupedExperts):
    """GroupedExperts whose per-expert GEMMs run on oneDNN for training/prefill-sized batches; below
    EXPERT_MIN_ROWS rows per expert on average (decoding) the base class's paths run unchanged."""

    @classmethod
    def from_experts(cls, ex: GroupedExperts) -> OneDNNGroupedExperts:
        E, twoI, D = ex.gate_up_proj.shape
        with torch.device("meta"):
            m = cls(E, D, twoI // 2)
        m.gate_up_proj, m.down_proj = ex.gate_up_proj, ex.down_proj
        return m

    def forward(self, x_NsD: Tensor, counts_E: Tensor) -> Tensor:
        if not usable(x_NsD, self.gate_up_proj) or x_NsD.shape[0] < EXPERT_MIN_ROWS * counts_E.shape[0]:
            return super().forward(x_NsD, counts_E)
        splits = counts_E.tolist()  # one host sync per layer
        h_NsI = swiglu(_GroupedMM.apply(x_NsD, self.gate_up_proj, splits))
        return _GroupedMM.apply(h_NsI, self.down_proj, splits)


def use_onednn(model: nn.Module) -> nn.Module:
    """In place: every plain nn.Linear -> OneDNNLinear, every plain GroupedExperts -> OneDNNGroupedExperts.
    Parameters are reused (tied weights stay tied), so it can run before or after building the optimizer.
    A no-op where the oneDNN path is off (`r1.model.gemm.ENABLED`: no AVX-512 on this CPU, where MKL is the faster
    one, or no oneDNN op in this torch); swapped modules still fall back per call (GPU, bf16, autocast)."""
    if not gemm.ENABLED:
        return model
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                swaps.append((parent, name, OneDNNLinear.from_linear(child)))
            elif type(child) is GroupedExperts:
                swaps.append((parent, name, OneDNNGroupedExperts.from_experts(child)))
    for parent, name, new in swaps:
        setattr(parent, name, new)
    return model
