"""fp32 GEMMs on the CPU through oneDNN instead of MKL, for the linears and experts of any model.

Why: torch sends an fp32 CPU matmul to MKL's sgemm, and MKL on a non-Intel x86 processor runs its AVX2
kernels even where the CPU has AVX-512 (MKL_VERBOSE=1 shows the path). The oneDNN library in the same torch
build (torch uses it for bf16) runs AVX-512 kernels. On this 2-core AMD EPYC (AVX-512), fp32 forward and dgrad
GEMMs of the model's shapes measured 90-190 GFLOP/s with MKL and 200-430 with oneDNN (`bench/gemm.py`).
Results are fp32 with fp32 accumulation either way (not bf16/tf32). They are not bitwise equal to MKL's,
but they are deterministic across runs and thread counts.

The three GEMMs of y = x W^T, each one `mkldnn::_linear_pointwise` call (a [M, K] . b [N, K]^T, any strides):
  forward  y  [M, N] = x . W^T
  dgrad    dx [M, K] = dy . (W^T)^T           W^T is a strided view, no copy
  wgrad    dW [N, K] = dy^T . (x^T)^T          when N <= K, else (x^T . (dy^T)^T)^T: the product is formed
                                              with min(N, K) output rows, which oneDNN runs 1.5-3x faster
                                              for these reductions over many tokens
Small GEMMs (decoding: < MIN_ROWS rows or < MIN_MACS multiply-adds) stay on torch's matmul, and so do the
experts when they average < EXPERT_MIN_ROWS rows each: there oneDNN's per-call cost (~20 us) dominates.
Off the CPU, for other dtypes, under autocast, or in a torch without the op, everything falls back to
torch's own matmul, so a swapped model runs anywhere.

`use_onednn(model)` swaps, in place, every nn.Linear for a OneDNNLinear and the routed experts for
OneDNNGroupedExperts (parameters reused, not copied), like r1.fp8's conversion: the model file stays plain.
Shape legend: M rows (tokens), K contraction, N outputs, E experts, Y/X an expert weight's out/in dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from r1.model.model import GroupedExperts, swiglu

_LP = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
BUCKET = 64  # GEMMs run with row counts in multiples of this (see _rows_into)
MIN_ROWS = 32  # below this many rows MKL's GEMV-like path is as fast or faster (16 rows: equal; 1 row: 2x)
MIN_MACS = 1 << 21  # measured crossover here: ~2M multiply-adds (64 x 128 x 256 equal, 64 x 128 x 128 MKL)
EXPERT_MIN_ROWS = 4 * BUCKET  # per expert on average: the bucketed windows then waste <= 25%, calls amortise


def usable(x: Tensor, w: Tensor) -> bool:
    """True where the oneDNN path applies: fp32 CPU tensors, no autocast, the op present in this torch."""
    return (_LP is not None and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))


def _worth(M: int, K: int, N: int) -> bool:
    return M >= MIN_ROWS and K > 0 and M * K * N >= MIN_MACS


def mm_nt(a_MK: Tensor, b_NK: Tensor) -> Tensor:
    """a @ b^T -> [M, N] (fp32 CPU: oneDNN; otherwise torch)."""
    if usable(a_MK, b_NK) and _worth(a_MK.shape[0], a_MK.shape[-1], b_NK.shape[0]):
        return _LP(a_MK, b_NK, None, "none", [], "")
    return a_MK @ b_NK.transpose(-2, -1)


def wgrad(dy_MN: Tensor, x_MK: Tensor) -> Tensor:
    """dy^T @ x -> [N, K], the weight gradient (possibly a transposed view; see the module docstring)."""
    N, K = dy_MN.shape[1], x_MK.shape[1]
    if not usable(dy_MN, x_MK) or dy_MN.shape[0] == 0:
        return dy_MN.T @ x_MK
    if N <= K:
        return _LP(dy_MN.T, x_MK.T, None, "none", [], "")
    return _LP(x_MK.T, dy_MN.T, None, "none", [], "").T


def _mm_bucketed(a_MK: Tensor, b_NK: Tensor, bias_N: Tensor | None = None) -> Tensor:
    """a b^T (+ bias) as GEMMs whose row counts are multiples of BUCKET: the rows up to the last multiple, then
    a window of BUCKET rows ending at M (overlapping rows computed twice). See _rows_into for why."""
    M = a_MK.shape[0]
    if M % BUCKET == 0 or M < BUCKET:
        return _LP(a_MK, b_NK, bias_N, "none", [], "")
    mf = M - M % BUCKET
    y = a_MK.new_empty(M, b_NK.shape[0])
    y[:mf] = _LP(a_MK[:mf], b_NK, bias_N, "none", [], "")
    y[mf:] = _LP(a_MK[M - BUCKET:], b_NK, bias_N, "none", [], "")[BUCKET - (M - mf):]
    return y


class _Linear(torch.autograd.Function):
    """y = x W^T + b with all three GEMMs on oneDNN (x already 2-D)."""

    @staticmethod
    def forward(ctx: object, x_MK: Tensor, w_NK: Tensor, b_N: Tensor | None) -> Tensor:
        ctx.save_for_backward(x_MK, w_NK)
        ctx.has_bias = b_N is not None
        return _mm_bucketed(x_MK, w_NK, b_N)

    @staticmethod
    def backward(ctx: object, dy_MN: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x_MK, w_NK = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        dx = _mm_bucketed(dy_MN, w_NK.T) if need_x else None
        dw = wgrad(dy_MN, x_MK) if need_w else None
        db = dy_MN.sum(0) if need_b and ctx.has_bias else None
        return dx, dw, db


def linear(x: Tensor, w_NK: Tensor, b_N: Tensor | None = None) -> Tensor:
    """F.linear, with oneDNN GEMMs for fp32 CPU inputs of at least MIN_ROWS rows and MIN_MACS."""
    K = x.shape[-1]
    if not usable(x, w_NK) or not _worth(x.numel() // max(K, 1), K, w_NK.shape[0]):
        return F.linear(x, w_NK, b_N)
    x_MK = x.reshape(-1, K)
    if torch.is_grad_enabled() and (x.requires_grad or w_NK.requires_grad or (b_N is not None and b_N.requires_grad)):
        y = _Linear.apply(x_MK, w_NK, b_N)
    else:
        y = _mm_bucketed(x_MK, w_NK, b_N)
    return y.view(*x.shape[:-1], w_NK.shape[0])


def _rows_into(out_MN: Tensor, a_MK: Tensor, b_NK: Tensor, s: int, n: int) -> None:
    """out[s:s+n] = a[s:s+n] b^T, as one GEMM over a window of rows rounded up to a multiple of BUCKET (the
    window reaches into the neighbouring experts' rows, which are computed and dropped). Why: oneDNN
    creates a primitive per distinct shape (~0.5 ms on this CPU, more than the GEMM itself for a few
    hundred rows) and the experts' row counts change every call; bucketed, a handful of shapes recur."""
    M = a_MK.shape[0]
    nb = min(-(-n // BUCKET) * BUCKET, M)
    start = min(s, M - nb)
    out_MN[s:s + n] = _LP(a_MK[start:start + nb], b_NK, None, "none", [], "")[s - start:s - start + n]


class _GroupedMM(torch.autograd.Function):
    """y_e = x_e W_e^T on each expert's contiguous slice of rows (`splits` rows each), oneDNN GEMMs."""

    @staticmethod
    def forward(ctx: object, x_MX: Tensor, w_EYX: Tensor, splits: list[int]) -> Tensor:
        y_MY = x_MX.new_empty(x_MX.shape[0], w_EYX.shape[1])
        s = 0
        for e, n in enumerate(splits):
            if n:
                _rows_into(y_MY, x_MX, w_EYX[e], s, n)
            s += n
        ctx.save_for_backward(x_MX, w_EYX)
        ctx.splits = splits
        return y_MY

    @staticmethod
    def backward(ctx: object, dy_MY: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x_MX, w_EYX = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        dx = x_MX.new_empty(x_MX.shape) if need_x else None
        dw = torch.zeros_like(w_EYX) if need_w else None
        s = 0
        for e, n in enumerate(ctx.splits):
            if n:
                if need_x:
                    _rows_into(dx, dy_MY, w_EYX[e].T, s, n)
                if need_w:
                    # the contraction runs over the slice's rows: a bucketed part on oneDNN, the rest on MKL
                    nb = n - n % BUCKET
                    if nb:
                        dw[e] = wgrad(dy_MY[s:s + nb], x_MX[s:s + nb])
                    if nb < n:
                        dw[e].addmm_(dy_MY[s + nb:s + n].T, x_MX[s + nb:s + n])
            s += n
        return dx, dw, None


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
    """GroupedExperts whose per-expert GEMMs run on oneDNN for training/prefill-sized batches (decoding keeps
    the gathered and padded bmm paths, which do not go through grouped_mm)."""

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
    A no-op where this torch has no oneDNN; swapped modules still fall back per call (GPU, bf16, autocast)."""
    if _LP is None:
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
