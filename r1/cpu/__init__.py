"""The CPU speed layer, applied from outside the model, the engine and the loop (as gpt-fast swaps in quantisation).

A CPU run makes these calls; a GPU run makes none and reads none of this package:
- `accelerate(model)`: swaps, in place and by class (same parameters, same state dict, ties kept), the model's
  modules for CPU versions that compute the same function faster on a CPU:
    nn.Linear -> OneDNNLinear (fp32 GEMMs on oneDNN; only where r1.cpu.gemm.ENABLED: AVX-512 CPUs)
    RMSNorm -> CPURMSNorm, MLA -> CPUMLA (folded decode weights)       r1/cpu/layers.py
    GroupedExperts -> CPUGroupedExperts, MoE -> CPUMoE (decode kernel)  r1/cpu/moe.py
    HyperConnection -> CPUHyperConnection (C read / write sides)        r1/cpu/hc.py
  and installs oneDNN's GEMMs for the output head's log-probs (r1/logprobs.py). Any transformers model gets the
  oneDNN linears. Only exact classes are swapped: FP8 modules (r1/fp8.py) keep their own forward.
- `accelerate_engine(engine)`: a TorchEngine on the CPU -> CPUTorchEngine (decode worker process, one-thread
  decode steps: r1/cpu/engine.py).
- `micro_batches(fn, n, params, update_workers(...))`: the update's micro-batches side by side on threads
  (r1/cpu/threads.py); with one worker, the plain loop.
"""

from __future__ import annotations

import torch
from torch import nn

from r1 import logprobs
from r1.cpu import gemm
from r1.cpu.engine import CPUTorchEngine
from r1.cpu.hc import CPUHyperConnection
from r1.cpu.layers import CPUMLA, CPURMSNorm
from r1.cpu.moe import CPUGroupedExperts, CPUMoE
from r1.cpu.threads import intra_op_threads, micro_batches, update_workers
from r1.model.hc import HyperConnection
from r1.model.model import MLA, GroupedExperts, MoE, RMSNorm
from rollouts.base import Engine
from rollouts.torch_engine import TorchEngine

# the model's class -> the CPU layer's subclass (no state of its own, so swapping the class is the whole swap)
SWAPS: dict[type[nn.Module], type[nn.Module]] = {RMSNorm: CPURMSNorm, MLA: CPUMLA, GroupedExperts: CPUGroupedExperts,
                                                 MoE: CPUMoE, HyperConnection: CPUHyperConnection}


def accelerate(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """The CPU layer on `model`, in place (see the module docstring); returns it. `device` is where the model will
    compute; by default the CPU unless CUDA is available (as r1.parallel.Dist decides). Elsewhere a no-op."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cpu":
        return model
    swaps = {**SWAPS, nn.Linear: gemm.OneDNNLinear} if gemm.ENABLED else SWAPS
    logprobs.mm_nt, logprobs.wgrad = gemm.mm_nt, gemm.wgrad  # each falls back to torch's per call where off
    for m in model.modules():
        if type(m) in swaps:
            m.__class__ = swaps[type(m)]
    return model


def accelerate_engine(engine: Engine) -> Engine:
    """A TorchEngine whose model is on the CPU -> a CPUTorchEngine of the same model; any other engine as it is, and
    a lockstep one (FSDP2: its decode worker would need an unsharded copy)."""
    if type(engine) is TorchEngine and engine.lockstep is None and next(engine.model.parameters()).device.type == "cpu":
        return CPUTorchEngine.from_engine(engine)
    return engine


__all__ = ["CPUTorchEngine", "accelerate", "accelerate_engine", "intra_op_threads", "micro_batches", "update_workers"]
