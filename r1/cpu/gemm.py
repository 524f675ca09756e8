"""fp32 GEMMs on the CPU through oneDNN instead of MKL, and OneDNNLinear, the nn.Linear that runs on them.

Why: torch sends an fp32 CPU matmul to MKL's sgemm, and MKL on a non-Intel x86 processor runs its AVX2
kernels even where the CPU has AVX-512 (MKL_VERBOSE=1 shows the path). The oneDNN library in the same torch
build (torch uses it for bf16) runs AVX-512 kernels. On a 2-core AMD EPYC with AVX-512, fp32 forward and dgrad
GEMMs of the model's shapes measured 110-200 GFLOP/s with MKL and 210-450 with oneDNN (`bench/gemm.py`).
Where the CPU has no AVX-512 both libraries run AVX2, and MKL was the faster one (AMD EPYC Zen 3: forward and
dgrad even, wgrad 1.2-1.6x faster on MKL; the bench model's training step 379 vs 425 ms), so the path is on
only where torch reports AVX-512 (ENABLED; `prefer` overrides it).
Results are fp32 with fp32 accumulation either way (not bf16/tf32). They are not bitwise equal to MKL's,
but they are deterministic across runs and thread counts.

The three GEMMs of y = x W^T, each one `mkldnn::_linear_pointwise` call (a [M, K] . b [N, K]^T, any strides):
  forward  y  [M, N] = x . W^T
  dgrad    dx [M, K] = dy . (W^T)^T           W^T is a strided view, no copy
  wgrad    dW [N, K] = dy^T . (x^T)^T          when N <= K, else (x^T . (dy^T)^T)^T: the product is formed
                                              with min(N, K) output rows, which oneDNN runs 1.5-3x faster
                                              for these reductions over many tokens
oneDNN builds a primitive per distinct shape (~0.5 ms here, more than a GEMM of a few hundred rows), and the
row counts change every call (micro-batch lengths; the experts' slices), so GEMMs run over row counts that are
multiples of BUCKET: overlapping windows, the extra rows computed and dropped (_rows_into, _mm_bucketed).
Small GEMMs (decoding: < MIN_ROWS rows or < MIN_MACS multiply-adds) stay on torch's matmul, and so do the
experts when they average < EXPERT_MIN_ROWS rows each: there oneDNN's per-call cost (~20 us) dominates.
Off the CPU, for other dtypes, under autocast, or in a torch without the op, everything falls back to
torch's own matmul, so a swapped model runs anywhere.

r1.cpu.accelerate swaps a model's nn.Linear for OneDNNLinear and its experts for ones whose GEMMs run here
(r1/cpu/moe.py), and installs mm_nt / wgrad as the output head's GEMMs (r1/logprobs.py).
Shape legend: M rows (tokens), K contraction, N outputs, E experts, Y/X an expert weight's out/in dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LINEAR_OP = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
BUCKET = 64  # GEMMs run with row counts in multiples of this (see _rows_into)
MIN_ROWS = 16  # below this many rows MKL's GEMV-like path is faster (16 rows: equal; 1 row: 2x)
# In a tight loop oneDNN already wins from ~2M multiply-adds (64 x 128 x 256), but inside a decode loop (other
# ops between the calls) 128 x 128 x 192 GEMMs ran slower than MKL's (smoke rollouts: 137-206 vs 124-132 ms)
MIN_MACS = 1 << 23
BIG_MACS = 1 << 30  # ~5 ms of GEMM here: a new primitive's ~0.5 ms no longer matters
EXPERT_MIN_ROWS = 4 * BUCKET  # per expert on average: the bucketed windows then waste <= 25%, calls amortise


# the CPU-based choice above: torch reports "AVX512" only where the CPU has it (and ATEN_CPU_CAPABILITY allows it)
AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
ENABLED = LINEAR_OP is not None and AVX512


def prefer(onednn: bool | None) -> None:
    """Force the oneDNN path on (True) or off (False) for the process, or restore the CPU-based choice (None).
    `usable` follows at once; `r1.cpu.accelerate` swaps in OneDNNLinear only while it is on."""
    global ENABLED
    ENABLED = LINEAR_OP is not None and (AVX512 if onednn is None else onednn)


def usable(x: Tensor, w: Tensor) -> bool:
    """True where the oneDNN path applies: it is ENABLED, fp32 CPU tensors, no autocast, the op in this torch."""
    return (ENABLED and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))


def _worth(M: int, K: int, N: int) -> bool:
    return M >= MIN_ROWS and K > 0 and M * K * N >= MIN_MACS


def mm_nt(a_MK: Tensor, b_NK: Tensor) -> Tensor:
    """a @ b^T -> [M, N] (fp32 CPU: oneDNN; otherwise torch)."""
    if usable(a_MK, b_NK) and _worth(a_MK.shape[0], a_MK.shape[-1], b_NK.shape[0]):
        return _mm_bucketed(a_MK, b_NK)
    return a_MK @ b_NK.transpose(-2, -1)


def wgrad(dy_MN: Tensor, x_MK: Tensor) -> Tensor:
    """dy^T @ x -> [N, K], the weight gradient (possibly a transposed view; see the module docstring)."""
    M, N, K = dy_MN.shape[0], dy_MN.shape[1], x_MK.shape[1]
    if not usable(dy_MN, x_MK) or M * N * K < MIN_MACS:  # (M = 0 included)
        return dy_MN.T @ x_MK
    if N <= K:
        return LINEAR_OP(dy_MN.T, x_MK.T, None, "none", [], "")
    return LINEAR_OP(x_MK.T, dy_MN.T, None, "none", [], "").T


def _mm_bucketed(a_MK: Tensor, b_NK: Tensor, bias_N: Tensor | None = None) -> Tensor:
    """a b^T (+ bias) as GEMMs whose row counts are multiples of BUCKET: the rows up to the last multiple, then
    a window of BUCKET rows ending at M (overlapping rows computed twice). See _rows_into for why."""
    M = a_MK.shape[0]
    # one call where the GEMM dwarfs a primitive's set-up: the split would hold a second copy of the output
    # (an output head's [4096, 129k] logits chunk is 2 GiB)
    if M % BUCKET == 0 or M < BUCKET or M * a_MK.shape[1] * b_NK.shape[0] >= BIG_MACS:
        return LINEAR_OP(a_MK, b_NK, bias_N, "none", [], "")
    mf = M - M % BUCKET
    y = a_MK.new_empty(M, b_NK.shape[0])
    _rows_into(y, a_MK, b_NK, 0, mf, bias_N)
    _rows_into(y, a_MK, b_NK, mf, M - mf, bias_N)  # its window: the last BUCKET rows
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
    # the size test first: it is the cheaper one, and decoding's GEMMs fail it (per-call overhead counts there)
    if not _worth(x.numel() // max(K, 1), K, w_NK.shape[0]) or not usable(x, w_NK):
        return F.linear(x, w_NK, b_N)
    x_MK = x.reshape(-1, K)
    if torch.is_grad_enabled() and (x.requires_grad or w_NK.requires_grad or (b_N is not None and b_N.requires_grad)):
        y = _Linear.apply(x_MK, w_NK, b_N)
    else:
        y = _mm_bucketed(x_MK, w_NK, b_N)
    return y.view(*x.shape[:-1], w_NK.shape[0])


def _rows_into(out_MN: Tensor, a_MK: Tensor, b_NK: Tensor, s: int, n: int, bias_N: Tensor | None = None) -> None:
    """out[s:s+n] = a[s:s+n] b^T (+ bias), as one GEMM over a window of rows rounded up to a multiple of BUCKET (the
    window reaches into the neighbouring experts' rows, which are computed and dropped). Why: oneDNN
    creates a primitive per distinct shape (~0.5 ms on this CPU, more than the GEMM itself for a few
    hundred rows) and the experts' row counts change every call; bucketed, a handful of shapes recur."""
    M = a_MK.shape[0]
    nb = min(-(-n // BUCKET) * BUCKET, M)
    start = min(s, M - nb)
    out_MN[s:s + n] = LINEAR_OP(a_MK[start:start + nb], b_NK, bias_N, "none", [], "")[s - start:s - start + n]


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
        # not zeros_like: a pass over all experts' weights (and its page faults, on a fresh buffer) to zero what
        # the GEMMs overwrite; only experts without rows are zeroed
        dw = torch.empty_like(w_EYX) if need_w else None
        s = 0
        for e, n in enumerate(ctx.splits):
            if need_w and not n:
                dw[e].zero_()
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
                    else:
                        torch.mm(dy_MY[s:s + n].T, x_MX[s:s + n], out=dw[e])
            s += n
        return dx, dw, None


class OneDNNLinear(nn.Linear):
    """nn.Linear whose GEMMs run on oneDNN where `usable` (same parameters, same state dict; swapped in by class)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
