"""A small MoE layer's decode forward as one C call (r1/model/moe_kernels.c), for decode steps on one CPU thread.

`decode_kernel(moe)` is built once per generation (the cache's `derived`, like MLA's folded weights): it
transposes the experts' weights into the kernel's layout and returns a function of (x, router weights, router
choices) -> y, or None where the kernel does not apply (no C compiler, not fp32 on the CPU, FP8 experts, sizes
past the kernel's buffers). The router stays in torch, so the choice of experts is the same op for op; the experts'
sums run in another order than torch's GEMMs (fp32 rounding apart). MoE.forward calls it only while torch runs on
one thread: the kernel does not split work over threads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from r1.model import cext

MAX_OUT, MAX_EXPERTS = 2048, 256  # MAXO, MAXE in moe_kernels.c


def decode_kernel(moe: torch.nn.Module) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
    ex, sh = moe.experts, moe.shared_experts
    E, Y, D = ex.gate_up_proj.shape
    I = Y // 2
    mods = [ex] + ([] if sh is None else [sh.gate_proj, sh.up_proj, sh.down_proj])  # as MoE._dense checks them
    Is = 0 if sh is None else sh.gate_proj.out_features
    if cext.kernels() is None or not all(getattr(m, "full_precision", True) for m in mods) or \
            any(p.dtype != torch.float32 or p.device.type != "cpu" for m in mods for p in m.parameters()) or \
            E > MAX_EXPERTS or max(D, Y, 2 * Is) > MAX_OUT or D % 8 or I % 8 or Is % 8:
        return None
    with torch.no_grad():
        gu_T = ex.gate_up_proj.transpose(1, 2).contiguous()  # [E, D, 2I]
        dn_T = ex.down_proj.transpose(1, 2).contiguous()  # [E, I, D]
        if sh is None:
            sgu_T = sdn_T = gu_T.new_zeros(1)  # not read (Is = 0)
        else:
            sgu_T = torch.cat([sh.gate_proj.weight, sh.up_proj.weight]).t().contiguous()  # [D, 2 Is]
            sdn_T = sh.down_proj.weight.t().contiguous()  # [Is, D]

    def run(x_ND: Tensor, w_NK: Tensor, idx_NK: Tensor) -> Tensor:
        x_ND, w_NK, idx_NK = x_ND.contiguous(), w_NK.float().contiguous(), idx_NK.contiguous()
        y_ND = torch.empty_like(x_ND)
        order = torch.empty(idx_NK.numel(), dtype=torch.long)
        N, K = idx_NK.shape
        cext.call("moe_decode", [x_ND, idx_NK, w_NK, gu_T, dn_T, sgu_T, sdn_T, y_ND, order], N, K, E, D, I, Is)
        return y_ND

    return run
