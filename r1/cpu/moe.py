"""The CPU layer's MoE: oneDNN GEMMs for the experts in training, and three decode shortcuts.

r1.cpu.accelerate swaps GroupedExperts for CPUGroupedExperts and MoE for CPUMoE (by class: same parameters).
- CPUGroupedExperts: batches of at least EXPERT_MIN_ROWS rows per expert on average run their per-expert GEMMs on
  oneDNN (r1/cpu/gemm.py); a handful of rows per expert (decoding) runs as two padded bmm calls (`padded`).
- CPUMoE.experts_sum, in inference, first of these that applies:
  1. on one thread with a cache: the whole layer in one C call (`decode_kernel`, r1/cpu/moe_kernels.c);
  2. with a cache, while it costs at most DENSE_MAX_MACS: every expert on every token in two GEMMs (`_dense`);
  3. a handful of tokens: each (token, expert) pair's weights gathered, batched GEMVs (`gathered`);
  else the model's sorted path. FP8 experts (`full_precision` False) take none of them: rollouts keep the numerics
  training uses. Tests hold each equal to the sorted path (tests/test_model.py).
- CPUMoE.count_tokens holds a lock: micro-batches may run on two threads (r1.cpu.micro_batches).

`decode_kernel(moe)` is built once per generation (the cache's `derived`, like MLA's folded weights): it
transposes the experts' weights into the kernel's layout and returns a function of (x, router weights, router
choices) -> y, or None where the kernel does not apply (no C compiler, not fp32 on the CPU, FP8 experts, sizes
past the kernel's buffers). The router stays in torch, so the choice of experts is the same op for op; the experts'
sums run in another order than torch's GEMMs (fp32 rounding apart). CPUMoE calls it only while torch runs on
one thread: the kernel does not split work over threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from r1.cpu import cext
from r1.cpu.gemm import EXPERT_MIN_ROWS, _GroupedMM, usable
from r1.cpu.layers import swiglu
from r1.model.model import Cache, GroupedExperts, MoE


class CPUGroupedExperts(GroupedExperts):
    def forward(self, x_NsD: Tensor, counts_E: Tensor) -> Tensor:
        Ns, E = x_NsD.shape[0], counts_E.shape[0]
        if usable(x_NsD, self.gate_up_proj) and Ns >= EXPERT_MIN_ROWS * E:
            splits = counts_E.tolist()  # one host sync per layer
            h_NsI = swiglu(_GroupedMM.apply(x_NsD, self.gate_up_proj, splits))
            return _GroupedMM.apply(h_NsI, self.down_proj, splits)
        # few rows per expert (decoding) on CPU, where grouped_mm runs one small GEMM per expert
        if 0 < Ns <= 16 * E and x_NsD.device.type == "cpu":
            cap = int(counts_E.max())
            if E * cap <= 2 * Ns:
                return self.padded(x_NsD, counts_E, cap)
        offs_E = counts_E.cumsum(0).to(torch.int32)
        h_NsI = swiglu(self.grouped_mm(x_NsD, self.gate_up_proj, counts_E, offs_E))
        return self.grouped_mm(h_NsI, self.down_proj, counts_E, offs_E)

    def padded(self, x_NsD: Tensor, counts_E: Tensor, cap: int) -> Tensor:
        """The same SwiGLU with each expert's rows padded to `cap` and two batched matmuls [E, cap, .].
        With a handful of rows per expert grouped_mm's E small GEMMs are bound by per-call overhead
        (and, multi-threaded, by one parallel region each); two bmm calls are cheaper while the padding
        at most doubles the rows."""
        E, Ns = counts_E.shape[0], x_NsD.shape[0]
        expert_Ns = torch.repeat_interleave(torch.arange(E, device=x_NsD.device), counts_E, output_size=Ns)
        start_E = counts_E.cumsum(0) - counts_E
        row_Ns = expert_Ns * cap + torch.arange(Ns, device=x_NsD.device) - start_E[expert_Ns]
        x_ECD = x_NsD.new_zeros(E * cap, x_NsD.shape[1]).index_copy_(0, row_Ns, x_NsD).view(E, cap, -1)
        h_ECI = swiglu(torch.bmm(x_ECD, self.gate_up_proj.transpose(1, 2)))
        y_ECD = torch.bmm(h_ECI, self.down_proj.transpose(1, 2))
        return y_ECD.view(E * cap, -1).index_select(0, row_Ns)


# gathering each (token, expert) pair's weights pays off only while they stay cache-sized
GATHER_MAX_BYTES = 1 << 20


def gathered(experts: nn.Module, x_ND: Tensor, idx_NK: Tensor, w_NK: Tensor) -> Tensor | None:
    """sum_k w_nk SwiGLU_{idx_nk}(x_n) for a handful of tokens (decoding a small batch on CPU): each pair's
    expert weights are gathered and applied as batched matrix-vector products, with no sort, count or
    scatter (those ~10 ops cost more than the GEMVs here). None when the gathered weights would exceed
    GATHER_MAX_BYTES (then the sorted path is cheaper), off the CPU, or for FP8 experts."""
    N, K = idx_NK.shape
    E, Y, D = experts.gate_up_proj.shape
    if x_ND.device.type != "cpu" or not getattr(experts, "full_precision", True) or \
            N * K * 3 * (Y // 2) * D * x_ND.element_size() > GATHER_MAX_BYTES:
        return None
    flat = idx_NK.flatten()
    # row vectors times transposed weights: bmm's fast path (a [., D, 1] column form runs ~6x slower)
    x_P1D = x_ND.unsqueeze(1).expand(N, K, D).reshape(N * K, 1, D)
    h_P1I = swiglu(torch.bmm(x_P1D, experts.gate_up_proj.index_select(0, flat).transpose(1, 2)))
    y_NKD = torch.bmm(h_P1I, experts.down_proj.index_select(0, flat).transpose(1, 2)).view(N, K, D)
    return torch.bmm(w_NK.to(y_NKD.dtype).unsqueeze(1), y_NKD).squeeze(1)


_COUNT_LOCK = threading.Lock()


class CPUMoE(MoE):
    # decoding runs every expert on every token while that costs at most this many multiply-adds
    DENSE_MAX_MACS = 1 << 23

    def experts_sum(self, x_ND: Tensor, w_NK: Tensor, idx_NK: Tensor, cache: Cache | None) -> Tensor:
        if not self.training and not torch.is_autocast_enabled("cpu"):  # the shortcuts compute in fp32
            # decoding on one CPU thread: the experts in one C call, where it applies
            if cache is not None and torch.get_num_threads() == 1 and x_ND.device.type == "cpu" \
                    and (kernel := cache.derived(self, self._decode_kernel)) is not None:
                return kernel(x_ND, w_NK, idx_NK)
            if cache is not None and (dense := cache.derived(self, self._dense)) is not None \
                    and x_ND.shape[0] * dense[0].numel() * 3 // 2 <= self.DENSE_MAX_MACS:
                return self._decode_dense(x_ND, w_NK, idx_NK, *dense)
            if (y_ND := gathered(self.experts, x_ND, idx_NK, w_NK)) is not None:
                return y_ND if self.shared_experts is None else y_ND + self.shared_experts(x_ND)
        return super().experts_sum(x_ND, w_NK, idx_NK, cache)

    def count_tokens(self, idx_NK: Tensor, valid_BT: Tensor | None) -> None:
        with _COUNT_LOCK:
            super().count_tokens(idx_NK, valid_BT)

    def _decode_kernel(self) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
        return decode_kernel(self)

    def _dense(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """Every expert as one pair of matrices, for decoding a tiny model: gate|up of all E routed experts
        then of the shared ones (cut into expert-sized pieces: SwiGLU is a sum over its hidden units)
        [(E + n_s) 2I, D], the down projections side by side [D, (E + n_s) I], and the gate weights the
        shared pieces always get (1) [E + n_s]. Then a decode step is 2 GEMMs, a SwiGLU and a scatter of
        the router's weights: 6 ops for what the routed paths do in ~20. None for FP8 experts."""
        ex, sh = self.experts, self.shared_experts
        E, Y, D = ex.gate_up_proj.shape
        I = Y // 2
        mods = [ex] + ([] if sh is None else [sh.gate_proj, sh.up_proj, sh.down_proj])
        if not all(getattr(m, "full_precision", True) for m in mods):
            return None
        if sh is not None and sh.gate_proj.out_features % I:  # shared width not a whole number of experts
            return None
        gu, down = [ex.gate_up_proj.reshape(E * Y, D)], [ex.down_proj.transpose(0, 1).reshape(D, E * I)]
        n_s = 0
        if sh is not None:
            n_s = sh.gate_proj.out_features // I
            gate_up = torch.cat([sh.gate_proj.weight.view(n_s, I, D), sh.up_proj.weight.view(n_s, I, D)], dim=1)
            gu.append(gate_up.view(-1, D))
            down.append(sh.down_proj.weight)
        base = torch.cat([torch.zeros(E), torch.ones(n_s)]).to(device=gu[0].device, dtype=torch.float32)
        return torch.cat(gu), torch.cat(down, dim=1), base

    @staticmethod
    def _decode_dense(x_ND: Tensor, w_NK: Tensor, idx_NK: Tensor, gu_YD: Tensor, down_DZ: Tensor,
                      base_X: Tensor) -> Tensor:
        """sum_k w_nk SwiGLU_{idx_nk}(x_n) + shared(x_n) with the weights of `_dense` (X = E + n_s experts):
        the experts a token did not choose get gate weight 0."""
        N, X = x_ND.shape[0], base_X.shape[0]
        gu_NXY = F.linear(x_ND, gu_YD).view(N, X, -1)
        gate_NXI, up_NXI = gu_NXY.chunk(2, dim=-1)
        g_NX = base_X.expand(N, X).scatter(1, idx_NK, w_NK).to(x_ND.dtype)
        h_NXI = F.silu(gate_NXI).mul_(up_NXI).mul_(g_NX.unsqueeze(-1))
        return F.linear(h_NXI.view(N, -1), down_DZ)


MAX_OUT, MAX_EXPERTS = 2048, 256  # MAXO, MAXE in moe_kernels.c


def decode_kernel(moe: torch.nn.Module) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
    ex, sh = moe.experts, moe.shared_experts
    E, Y, D = ex.gate_up_proj.shape
    I = Y // 2
    mods = [ex] + ([] if sh is None else [sh.gate_proj, sh.up_proj, sh.down_proj])  # as CPUMoE._dense checks them
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
