"""FP8 training with DeepSeek-V3's blockwise recipe (arXiv 2412.19437, section 3.3), on GPU and emulated.

All three GEMMs of a linear y = x W^T run on E4M3 operands with fp32 accumulation:
  forward  y  [M, N] = x  [M, K] . W [N, K]^T   x: 1x128 tiles along K,  W: 128x128 blocks
  dgrad    dx [M, K] = dy [M, N] . W^T[K, N]^T  dy: 1x128 tiles along N, W: the same 128x128 blocks (square
                                                blocks, so W's transpose reuses the forward's scales)
  wgrad    dW [N, K] = dy^T[N, M] . x^T[K, M]^T dy and x: 128x1 tiles along the tokens M (the contraction
                                                dim); x is re-quantised from the fp8 copy saved in the
                                                forward pass, as V3 does ("dequantised, transposed,
                                                re-quantised into 128x1 tiles"), dy from its bf16/fp32 value.
Scales come from the live amax of each tile: s = amax / 448 (optionally rounded up to a power of two),
q = cast_e4m3(x / s). Every GEMM is one "NT" product of a 1x128-scaled A and a B scaled per 1x128 row tile
or per 128x128 block, with the scales applied per K-block as DeepSeek's reference kernel does:
  y[m, n] = sum_k (A_q[m, k-block] . B_q[n, k-block]) * s_A[m, k] * s_B[n or n//128, k]
The backends differ only in who computes that sum: `emulated_exact` (any device; that loop over K-blocks,
bit for bit), `emulated` (any device; scales folded into the operands, one fp32 matmul: equal up to fp32
rounding, the CPU default) or `scaled_mm` (Hopper; torch's blockwise-scaled cuBLAS FP8 GEMM).
Quantisation is shared torch code.

Dimensions that are not multiples of 128 are zero-padded (zeros change neither amax nor products) and
the outputs sliced back. Master weights stay fp32 (`.weight` is still the nn.Parameter, so code that
reads it, like MLA's absorbed decode path, keeps working). A trainable master is re-quantised every
forward (fused optimizers update it without a version bump); a frozen one's fp8 copy is cached until it
changes (copy_, load_state_dict), so checkpoint fp8 weights serve frozen reference/rollout copies as they are.
Activations are saved for backward in fp8 (1 byte + one fp32 scale per 128) instead of bf16/fp32.

Shape legend: M tokens (rows), K contraction, N outputs, E experts, Kb = K/128 blocks, p suffix = padded.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from r1.model.hf import dequantize_fp8
from r1.model.model import GroupedExperts

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(float8_e4m3fn).max
# nn.Linear leaf names that run in FP8: MLA projections, dense / shared-expert MLPs (and Llama-style k/v).
# Everything else stays high precision: embed_tokens, lm_head, the router (mlp.gate), norms, eh_proj
# unless asked for (it mixes two normed streams once per MTP depth: cheap, and DeepSeek keeps it bf16).
LINEAR_TARGETS = frozenset({"q_proj", "q_a_proj", "q_b_proj", "k_proj", "v_proj", "kv_a_proj_with_mqa",
                            "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


@dataclass(frozen=True)
class Fp8Config:
    block: int = 128  # tile length (activations 1 x block, weights block x block)
    pow2_scales: bool = False  # round s up to a power of two: dequantisation becomes exact exponent arithmetic
    backend: str = "auto"  # "auto" or a key of BACKENDS
    experts: bool = True  # routed experts (GroupedExperts) in FP8
    eh_proj: bool = False  # MTP's projection too
    # keep each linear's input for backward as its fp8 forward copy (V3; 1 byte/element) or as given (wgrad
    # then quantises x once instead of twice: ~3.6% instead of ~4.4% relative error, at 2-4x the memory)
    fp8_activations: bool = True
    targets: frozenset[str] = LINEAR_TARGETS

    def __post_init__(self) -> None:
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(f"unknown FP8 backend {self.backend!r}; choose 'auto' or one of {sorted(BACKENDS)}")
        if self.block <= 0 or self.block % 16:
            raise ValueError(f"block must be a positive multiple of 16, got {self.block}")


# ---------------------------------------------------------------------------------------------- quantisation
def _ceil_pow2(s: Tensor) -> Tensor:
    """Smallest power of two >= s (exact: from frexp, never log2 rounding)."""
    mant, exp = torch.frexp(s)  # s = mant * 2^exp, mant in [0.5, 1)
    return torch.ldexp(torch.ones_like(s), exp - (mant == 0.5).to(exp.dtype))


def _tiles(x: Tensor, rows: int, block: int, pow2: bool) -> tuple[Tensor, Tensor]:
    """x [..., M, K] zero-padded to the tile grid, as fp32 tiles [..., Mt, rows, Kt, block], and the scale of each
    tile s [..., Mt, Kt] = amax / 448 (optionally rounded up to a power of two)."""
    *lead, M, K = x.shape
    pm, pk = -M % rows, -K % block
    xp = F.pad(x.float(), (0, pk, 0, pm)) if pm or pk else x.float()
    tiles = xp.reshape(*lead, (M + pm) // rows, rows, (K + pk) // block, block)
    # amax floor: an all-zero tile gets a tiny finite scale (q = 0) instead of 0/0.
    s = tiles.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / E4M3_MAX
    return tiles, _ceil_pow2(s) if pow2 else s


def quantize(x: Tensor, rows: int, block: int = 128, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """x [..., M, K] -> (q [..., Mp, Kp] e4m3, s [..., Mp/rows, Kp/block] fp32), one scale per rows x block tile
    (rows=1: activation tiles along K; rows=block: weight blocks). s = amax / 448, q = x / s; M and K are
    zero-padded to the tile grid. x ~= q * s (see `dequantize`)."""
    tiles, s = _tiles(x, rows, block, pow2)
    # clamp: x / s can land a rounding step above 448, which e4m3fn (no inf) would turn into NaN
    q = (tiles / s[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q.flatten(-4, -3).flatten(-2, -1), s


def round_e4m3(v: Tensor) -> Tensor:
    """In place: fp32 v rounded to the nearest E4M3 value, ties to even, as `v.clamp(-448, 448).to(e4m3fn).float()`
    gives for |v| < 464, in fp32 arithmetic. Each binade [2^e, 2^(e+1)) holds 8 E4M3 values, 2^(e-3) apart; below
    2^-6 (subnormals) they are 2^-9 apart. Why not the cast: a CPU converts e4m3 back to fp32 ~30x slower than it
    multiplies, and the emulation would spend most of its time there."""
    exp_bits = v.view(torch.int32) & 0x7F800000  # 2^e as fp32 bits (sign and mantissa dropped)
    quantum = exp_bits.clamp_(min=(127 - 6) << 23).sub_(3 << 23).view(torch.float32)  # 2^(max(e, -6) - 3)
    return v.div_(quantum).round_().mul_(quantum)  # exact: powers of two; round() is ties-to-even


def fake_quantize(x: Tensor, rows: int, block: int = 128, pow2: bool = False) -> Tensor:
    """`dequantize(*quantize(x, rows, block, pow2), rows, block)` bit for bit, without an fp8 tensor: x's values on
    its tiles' E4M3 grid, fp32, padded [..., Mp, Kp]. The emulated backend's GEMM operands."""
    tiles, s = _tiles(x, rows, block, pow2)
    s = s[..., :, None, :, None]
    v = round_e4m3(tiles / s) * s  # |x / s| <= 448 up to one rounding step, which rounds back to 448
    return v.flatten(-4, -3).flatten(-2, -1)


def dequantize(q: Tensor, s: Tensor, rows: int, block: int = 128) -> Tensor:
    """Inverse of `quantize` on the padded grid: q [..., Mp, Kp] * s broadcast over its tiles -> fp32."""
    *lead, M, K = q.shape
    tiles = q.float().view(*lead, M // rows, rows, K // block, block) * s[..., :, None, :, None]
    return tiles.view(*lead, M, K)


def quantize_fp8(w: Tensor, block: int = 128, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """DeepSeek's FP8 checkpoint format: w [M, N] -> (w_fp8 [M, N], weight_scale_inv [ceil(M/b), ceil(N/b)])."""
    q, s = quantize(w, block, block, pow2)
    return q[: w.shape[0], : w.shape[1]].contiguous(), s


# ---------------------------------------------------------------------------------------------- GEMM backends
Gemm = Callable[[Tensor, Tensor, Tensor, Tensor, bool, torch.dtype], Tensor]


def gemm_emulated_exact(a_q: Tensor, a_s: Tensor, b_q: Tensor, b_s: Tensor, b_blocked: bool,
                        out_dtype: torch.dtype) -> Tensor:
    """y [M, N] = A [M, Kp] . B [N, Kp]^T with DeepSeek's per-K-block scaling, in fp32:
    acc += (A_k . B_k^T) * s_A[:, k] * s_B[:, k] for each 128-wide block k (as inference/kernel.py's
    fp8_gemm: products of e4m3 values are exact in fp32; the scales multiply each block's partial sum).
    a_s [M, Kb]; b_s [N, Kb] (1x128 rows) or [Nb, Kb] (128x128 blocks, b_blocked). One small matmul and
    three passes over [M, N] per K-block: the reference, too slow to train with on a CPU."""
    M, Kp = a_q.shape
    N, Kb = b_q.shape[0], a_s.shape[1]
    blk = Kp // Kb
    sb_NKb = b_s.repeat_interleave(blk, 0)[:N] if b_blocked else b_s
    a_MKb, b_NKb = a_q.float().view(M, Kb, blk), b_q.float().view(N, Kb, blk)
    acc_MN = a_q.new_zeros(M, N, dtype=torch.float32)
    for k in range(Kb):
        acc_MN += (a_MKb[:, k] @ b_NKb[:, k].T) * a_s[:, k, None] * sb_NKb[None, :, k]
    return acc_MN.to(out_dtype)


def gemm_emulated(a_q: Tensor, a_s: Tensor, b_q: Tensor, b_s: Tensor, b_blocked: bool,
                  out_dtype: torch.dtype) -> Tensor:
    """The same sum as `gemm_emulated_exact` with the scales folded into the operands first:
    y = (q_A * s_A) . (q_B * s_B)^T, one fp32 matmul. Equal up to fp32 rounding of the scaled operands
    (~1e-7 relative; tests/test_fp8.py checks both), and many times faster on a CPU."""
    blk = a_q.shape[1] // a_s.shape[1]
    b = dequantize(b_q, b_s, blk if b_blocked else 1, blk)
    return (dequantize(a_q, a_s, 1, blk) @ b.T).to(out_dtype)


def gemm_scaled_mm(a_q: Tensor, a_s: Tensor, b_q: Tensor, b_s: Tensor, b_blocked: bool,
                   out_dtype: torch.dtype) -> Tensor:
    """The same product on Hopper with torch.nn.functional.scaled_mm (cuBLASLt blockwise FP8, CUDA >= 12.9).
    Layouts as torch's own checks require: mat_b column-major; 1x128 scales [rows, Kb] with stride (1, rows);
    128x128 scales [L4, Nb] with stride (1, L4), L4 = Kb rounded up to 4. Accumulation stays fp32
    (use_fast_accum=False: cuBLAS promotes partial sums, the fix V3 made for Hopper's narrow accumulator).
    UNTESTED here (no GPU in the CI); kept behind `pick_backend`'s probe, which falls back to emulation."""
    ST, SW = F.ScalingType, F.SwizzleType
    Kb = a_s.shape[1]
    sa = a_s.t().contiguous().t()
    if b_blocked:
        L4 = -(-Kb // 4) * 4
        sb, rb = F.pad(b_s, (0, L4 - Kb), value=1.0).contiguous().t(), ST.BlockWise128x128
    else:
        sb, rb = b_s.t().contiguous().t(), ST.BlockWise1x128
    return F.scaled_mm(a_q, b_q.t(), sa, ST.BlockWise1x128, sb, rb, swizzle_a=SW.NO_SWIZZLE,
                       swizzle_b=SW.NO_SWIZZLE, output_dtype=out_dtype, use_fast_accum=False)


BACKENDS: dict[str, Gemm] = {"emulated": gemm_emulated, "emulated_exact": gemm_emulated_exact,
                             "scaled_mm": gemm_scaled_mm}


@functools.cache
def _scaled_mm_works(device: torch.device) -> bool:
    """Hopper (sm90; cuBLASLt's blockwise path is sm90-only), a torch with F.scaled_mm, and one real call of
    each of the three recipes checked against the emulation (catches unsupported layouts or dtypes)."""
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(F, "scaled_mm") \
            or torch.cuda.get_device_capability(device)[0] != 9:  # (fake CUDA tensors in a CPU-only torch: no)
        return False
    try:
        g = torch.Generator(device=device).manual_seed(0)
        a, b = (torch.randn(256, 256, device=device, generator=g) for _ in range(2))
        aq, as_ = quantize(a, 1)
        for (bq, bs), blocked in ((quantize(b, 128), True), (quantize(b, 1), False)):
            for dt in (torch.bfloat16, torch.float32):
                y, ref = gemm_scaled_mm(aq, as_, bq, bs, blocked, dt), gemm_emulated(aq, as_, bq, bs, blocked, dt)
                if not torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=1e-2 * ref.abs().max().item()):
                    return False
        return True
    except (RuntimeError, TypeError, ValueError, AttributeError):
        return False


def pick_backend(device: torch.device | str, requested: str = "auto") -> str:
    """'scaled_mm' on a Hopper GPU where it works, else 'emulated' (CPU, older GPUs, older torch)."""
    if requested != "auto":
        return requested
    return "scaled_mm" if _scaled_mm_works(torch.device(device)) else "emulated"


# ---------------------------------------------------------------------------------------------- autograd
# The three GEMMs of routed experts (row group e = expert e's contiguous token slice; a linear is one group), two
# ways:
# - `emulated` (_Fp8EmulatedMM): each operand fake-quantised (its fp8 copy's values, scales applied, in fp32), then
#   plain fp32 GEMMs: one torch._grouped_mm per GEMM, or the per-expert loop (`grouped=False`), equal bit for bit
#   (tests/test_fp8.py). Tiles never cross experts: 1x128 tiles run along K or N within a row, and wgrad's 128x1
#   token tiles start at each expert's first row (rows laid out padded per expert), so the scales are the
#   per-expert loop's. W's square blocks serve the dgrad as they are (its transpose has the same blocks).
# - any NT backend (_Fp8GroupedMM: `emulated_exact`, `scaled_mm`): a loop of `gemm` calls on fp8 operands per
#   expert. torch's grouped scaled GEMM (F.scaled_grouped_mm) takes row-wise or MX scales, not DeepSeek's 1x128 /
#   128x128 blocks, so `scaled_mm` loops too.
def _nt_loop(aq_MK: Tensor, sa_MK: Tensor, bq_ENK: Tensor, sb_ENK: Tensor, splits: list[int], N: int,
             out_dtype: torch.dtype, gemm: Gemm) -> Tensor:
    """Row group e of A (1x128 tiles) times B_e^T (128x128 blocks), one GEMM per group: the forward (x W^T) and
    the dgrad (dy W, B = W^T, whose square blocks reuse W's scales transposed)."""
    ys = [gemm(q, s, bq_ENK[e], sb_ENK[e], True, out_dtype)[:, :N]
          for e, (q, s) in enumerate(zip(aq_MK.split(splits), sa_MK.split(splits), strict=True)) if q.shape[0]]
    return torch.cat(ys) if ys else aq_MK.new_zeros(0, N, dtype=out_dtype)


def _wgrad_loop(dy_MN: Tensor, x_MK: Tensor, splits: list[int], cfg: Fp8Config, gemm: Gemm) -> Tensor:
    N, K = dy_MN.shape[1], x_MK.shape[1]
    dw = dy_MN.new_zeros(len(splits), N, K, dtype=torch.float32)
    for e, (x_e, dy_e) in enumerate(zip(x_MK.split(splits), dy_MN.split(splits), strict=True)):
        if not x_e.shape[0]:
            continue
        # 128x1 tiles along the tokens, the wgrad contraction dim (padded to 128 with zero tokens)
        dyq, sdy = quantize(dy_e.t(), 1, cfg.block, cfg.pow2_scales)
        xq, sx = quantize(x_e.t(), 1, cfg.block, cfg.pow2_scales)
        dw[e] = gemm(dyq, sdy, xq, sx, False, torch.float32)[:N, :K]
    return dw


class _Fp8GroupedMM(torch.autograd.Function):
    """y [M, N] = x [M, K] . W_e^T for row group e (`splits` rows each) on an NT `gemm` backend, one call per group.
    Takes the master W [E, N, K] (for its gradient) and its cached quantisation wq [E, Np, Kp], sw [E, Nb, Kb]."""

    @staticmethod
    def forward(ctx, x_MK: Tensor, w_ENK: Tensor, wq_ENK: Tensor, sw_ENK: Tensor, splits: list[int],
                cfg: Fp8Config, gemm: Gemm) -> Tensor:
        with torch.autocast(x_MK.device.type, enabled=False):  # fp32 accumulation, whatever autocast says
            xq_MK, sx_MK = quantize(x_MK, 1, cfg.block, cfg.pow2_scales)
            y = _nt_loop(xq_MK, sx_MK, wq_ENK, sw_ENK, splits, w_ENK.shape[1], x_MK.dtype, gemm)
        keep = (xq_MK, sx_MK, None) if cfg.fp8_activations else (None, None, x_MK)  # fp8: the memory saving
        ctx.save_for_backward(*keep, wq_ENK, sw_ENK)
        ctx.splits, ctx.cfg, ctx.gemm = splits, cfg, gemm
        ctx.meta = (x_MK.shape[1], x_MK.dtype, w_ENK.dtype)
        return y

    @staticmethod
    def backward(ctx, dy_MN: Tensor):
        xq_MK, sx_MK, x_MK, wq_ENK, sw_ENK = ctx.saved_tensors
        K, x_dtype, w_dtype = ctx.meta
        cfg, gemm, splits, b = ctx.cfg, ctx.gemm, ctx.splits, ctx.cfg.block
        dx = dw = None
        with torch.autocast(dy_MN.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dyq, sdy = quantize(dy_MN, 1, b, cfg.pow2_scales)  # 1x128 along N, the dgrad contraction dim
                dx = _nt_loop(dyq, sdy, wq_ENK.transpose(-2, -1).contiguous(), sw_ENK.transpose(-2, -1), splits, K,
                              x_dtype, gemm)
            if ctx.needs_input_grad[1]:
                x_MK = dequantize(xq_MK, sx_MK, 1, b)[:, :K] if x_MK is None else x_MK
                dw = _wgrad_loop(dy_MN, x_MK, splits, cfg, gemm).to(w_dtype)
        return dx, dw, None, None, None, None, None


def _gmm(a_MX: Tensor, b_EXY: Tensor, splits: list[int], grouped: bool) -> Tensor:
    """Row group e of a [M, X] times b[e] [X, Y] -> [M, Y] in fp32: one torch._grouped_mm, or a loop of mm."""
    if len(splits) == 1:
        return a_MX @ b_EXY[0]
    if grouped:
        return torch._grouped_mm(a_MX, b_EXY, offs=torch.tensor(splits, device=a_MX.device).cumsum(0).to(torch.int32))
    ys = [a @ b_EXY[e] for e, a in enumerate(a_MX.split(splits)) if a.shape[0]]
    return torch.cat(ys) if ys else a_MX.new_zeros(0, b_EXY.shape[-1])


def _first_cols(t: Tensor, n: int) -> Tensor:
    """t[:, :n] without the block padding, as a tensor of its own (autograd refuses a Function output that is a
    view the caller then modifies in place)."""
    return t if t.shape[-1] == n else t[:, :n].contiguous()


def _token_tiles(t_MX: Tensor, splits: list[int], b: int) -> tuple[Tensor, list[int]]:
    """wgrad's operand: t fake-quantised in b x 1 tiles along the tokens, each group's rows starting a tile
    (zero rows between groups: zeros change neither amax nor the sums) -> ([Mp, X], padded splits)."""
    padded = [-(-n // b) * b for n in splits]
    if len(splits) == 1:
        return t_MX, padded  # fake_quantize pads the end itself
    dev, M = t_MX.device, t_MX.shape[0]
    counts_E, padded_E = torch.tensor(splits, device=dev), torch.tensor(padded, device=dev)
    shift_E = (padded_E.cumsum(0) - padded_E) - (counts_E.cumsum(0) - counts_E)  # new group start - old
    row_M = torch.arange(M, device=dev) + torch.repeat_interleave(shift_E, counts_E, output_size=M)
    return t_MX.new_zeros(sum(padded), t_MX.shape[1]).index_copy_(0, row_M, t_MX), padded


class _Fp8EmulatedMM(torch.autograd.Function):
    """The `emulated` backend: y [M, N] = x [M, K] . W_e^T for row group e, on fake-quantised operands in fp32:
      forward  y  = fq(x; 1xb along K)  . Wq_e^T          Wq = W on its b x b block grid (`wv_ENK`, cached)
      dgrad    dx = fq(dy; 1xb along N) . Wq_e             the same blocks: W^T's are W's transposed
      wgrad    dW_e = fq(dy_e; bx1 along tokens)^T . fq(x_e; bx1 along tokens)
    with x in wgrad its forward fp8 copy re-quantised (fp8_activations, V3) or x as given. Saved activations are
    the fp8 copy's values in fp32 (4 bytes an element, where a GPU keeps 1): emulation buys numerics, not memory."""

    @staticmethod
    def forward(ctx, x_MK: Tensor, w_ENK: Tensor, wv_ENK: Tensor, splits: list[int], cfg: Fp8Config,
                grouped: bool) -> Tensor:
        with torch.autocast(x_MK.device.type, enabled=False):
            xv_MK = fake_quantize(x_MK, 1, cfg.block, cfg.pow2_scales)
            y = _first_cols(_gmm(xv_MK, wv_ENK.transpose(-2, -1), splits, grouped), w_ENK.shape[1]).to(x_MK.dtype)
        ctx.save_for_backward(xv_MK if cfg.fp8_activations else x_MK, wv_ENK)
        ctx.splits, ctx.cfg, ctx.grouped = splits, cfg, grouped
        ctx.meta = (x_MK.shape[1], x_MK.dtype, w_ENK.dtype)
        return y

    @staticmethod
    def backward(ctx, dy_MN: Tensor):
        x_MK, wv_ENK = ctx.saved_tensors
        K, x_dtype, w_dtype = ctx.meta
        cfg, splits, grouped, b = ctx.cfg, ctx.splits, ctx.grouped, ctx.cfg.block
        dx = dw = None
        with torch.autocast(dy_MN.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dyv_MN = fake_quantize(dy_MN, 1, b, cfg.pow2_scales)
                dx = _first_cols(_gmm(dyv_MN, wv_ENK, splits, grouped), K).to(x_dtype)
            if ctx.needs_input_grad[1]:
                dy_PN, padded = _token_tiles(dy_MN.float(), splits, b)
                x_PK, _ = _token_tiles(x_MK[:, :K].float(), splits, b)
                dyv_PN, xv_PK = (fake_quantize(t, b, 1, cfg.pow2_scales) for t in (dy_PN, x_PK))
                if len(splits) == 1:
                    dw = (dyv_PN.t() @ xv_PK)[None]
                elif grouped:  # 2-D x 2-D: offsets along the contraction (tokens) -> [E, N, K]
                    offs = torch.tensor(padded, device=dy_MN.device).cumsum(0).to(torch.int32)
                    dw = torch._grouped_mm(dyv_PN.t(), xv_PK, offs=offs)
                else:
                    dw = dy_MN.new_zeros(len(splits), dy_MN.shape[1], K, dtype=torch.float32)
                    for e, (d, x) in enumerate(zip(dyv_PN.split(padded), xv_PK.split(padded), strict=True)):
                        if d.shape[0]:
                            dw[e] = d.t() @ x
                dw = dw.to(w_dtype)
        return dx, dw, None, None, None, None


_optimizer_steps = 0  # optimizer steps taken in this process (any optimizer): part of every cached copy's key


def _count_step(*_: object) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# fused optimizers (AdamW(fused=True)) update in place without bumping the version counter: count their steps
register_optimizer_step_post_hook(_count_step)


def _cache_mode() -> contextlib.ExitStack:
    """No autograd, and never inference tensors: a copy made while rollouts decode (inference_mode) is reused by the
    next training forward, which saves it for backward."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(torch.inference_mode(False))
    return stack


class _WeightCache:
    """The fp8 copy of one master weight, kept until the master's (version, storage, trainable) or the process's
    optimizer step count changes: a forward, its backward and every decode step between two optimizer steps share
    one quantisation. Checkpoint fp8 bytes (`set`) serve while the master is frozen (reference / rollout copies);
    a trainable master re-quantises its own values."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.q: Tensor | None = None
        self.s: Tensor | None = None
        self.values_key: tuple | None = None
        self.v: Tensor | None = None

    @staticmethod
    def _key(w: Tensor, trainable: bool) -> tuple:
        return w._version, w.data_ptr(), trainable, _optimizer_steps

    def get(self, w: Tensor, cfg: Fp8Config) -> tuple[Tensor, Tensor]:
        key = self._key(w, w.requires_grad)
        if key != self.key:
            with _cache_mode():
                self.q, self.s = quantize(w.detach(), cfg.block, cfg.block, cfg.pow2_scales)
            self.key = key
        return self.q, self.s

    def values(self, w: Tensor, cfg: Fp8Config) -> Tensor:
        """The fp8 copy's values in fp32 (padded to the block grid): the emulated backend's operand, equal to
        dequantising `get`'s copy (trainable: fake-quantised in arithmetic, no fp8 round trip)."""
        key, b = self._key(w, w.requires_grad), cfg.block
        if key != self.values_key:
            with _cache_mode():
                self.v = fake_quantize(w.detach(), b, b, cfg.pow2_scales) if w.requires_grad \
                    else dequantize(*self.get(w, cfg), b, b)
            self.values_key = key
        return self.v

    def set(self, w: Tensor, q: Tensor, s: Tensor, block: int) -> None:
        """Adopt checkpoint fp8 bytes (q [..., N, K] unpadded, s = weight_scale_inv) as they are (while frozen)."""
        N, K = q.shape[-2:]
        self.q = F.pad(q.view(torch.uint8), (0, -K % block, 0, -N % block)).view(E4M3)
        self.s, self.key = s.float().to(q.device), self._key(w, trainable=False)
        self.values_key = None


def _autocast_input(x: Tensor) -> Tensor:
    """x in autocast's dtype where it is on (bf16 training: FP8 GEMMs take and give bf16 activations, as in V3)."""
    dev = x.device.type
    return x.to(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else x


def _groups(t: Tensor) -> Tensor:
    return t.view(-1, *t.shape[-2:])  # [N, K] -> one group [1, N, K]


def _fp8_mm(x_MK: Tensor, w: Tensor, cache: _WeightCache, splits: list[int], cfg: Fp8Config,
            grouped: bool) -> Tensor:
    """x's row group e times W_e^T (w [E, N, K], or [N, K]: one group) on the configured backend: the fast
    emulation, or a loop of NT GEMMs."""
    if BACKENDS[pick_backend(x_MK.device, cfg.backend)] is gemm_emulated:
        return _Fp8EmulatedMM.apply(x_MK, _groups(w), _groups(cache.values(w, cfg)), splits, cfg, grouped)
    wq, sw = cache.get(w, cfg)
    return _Fp8GroupedMM.apply(x_MK, _groups(w), _groups(wq), _groups(sw), splits, cfg,
                               BACKENDS[pick_backend(x_MK.device, cfg.backend)])


# ---------------------------------------------------------------------------------------------- modules
class Fp8Linear(nn.Linear):
    """nn.Linear whose forward, dgrad and wgrad GEMMs run in E4M3 (module docstring). `weight` stays the fp32
    master nn.Parameter (same name, same object as the converted layer's: optimizers and checkpoints see no
    difference)."""

    full_precision = False  # the CPU layer (r1/cpu) never folds or densifies these weights for decoding

    def __init__(self, in_features: int, out_features: int, bias: bool = True, cfg: Fp8Config | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.cfg = cfg or Fp8Config()
        self._cache = _WeightCache()

    @classmethod
    def from_linear(cls, lin: nn.Linear, cfg: Fp8Config) -> Fp8Linear:
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, cfg, device="meta")
        m.weight, m.bias = lin.weight, lin.bias
        return m

    def forward(self, x: Tensor) -> Tensor:
        x = _autocast_input(x)
        x_MK = x.reshape(-1, self.in_features)
        y = _fp8_mm(x_MK, self.weight, self._cache, [x_MK.shape[0]], self.cfg, grouped=False)
        y = y if self.bias is None else y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def load_fp8_(self, w_fp8: Tensor, scale_inv: Tensor) -> None:
        """A checkpoint's fp8 weight + weight_scale_inv: the master gets the dequantised value; while the
        weight is frozen (requires_grad False) the GEMMs use the checkpoint's bytes and scales unchanged."""
        _check_block(scale_inv, w_fp8.shape, self.cfg.block)
        self.weight.copy_(dequantize_fp8(w_fp8, scale_inv, self.cfg.block))
        self._cache.set(self.weight, w_fp8, scale_inv, self.cfg.block)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8 block={self.cfg.block}, pow2={self.cfg.pow2_scales}"


class Fp8GroupedExperts(GroupedExperts):
    """Routed experts in FP8: each GEMM one grouped blockwise GEMM over the experts' contiguous token slices
    (emulated backend; one GEMM per expert's slice on `scaled_mm`: see the note above _nt_loop), same
    parameters (gate_up_proj [E, 2I, D], down_proj [E, D, I]) as the GroupedExperts it replaces."""

    full_precision = False  # no full-precision decode shortcut: rollouts keep the numerics training uses
    # the emulated backend's GEMMs as one torch._grouped_mm each (False: the per-expert loop, equal bit for bit)
    grouped = True

    def __init__(self, n_experts: int, dim: int, hidden: int, cfg: Fp8Config | None = None):
        super().__init__(n_experts, dim, hidden)
        self.cfg = cfg or Fp8Config()
        self._caches = {"gate_up_proj": _WeightCache(), "down_proj": _WeightCache()}

    @classmethod
    def from_experts(cls, ex: GroupedExperts, cfg: Fp8Config) -> Fp8GroupedExperts:
        E, twoI, D = ex.gate_up_proj.shape
        with torch.device("meta"):
            m = cls(E, D, twoI // 2, cfg)
        m.gate_up_proj, m.down_proj = ex.gate_up_proj, ex.down_proj
        return m

    def _mm(self, x_NX: Tensor, name: str, splits: list[int]) -> Tensor:
        # a CPU's torch._grouped_mm takes the fp32 operands; CUDA's takes bf16 only (tests/test_dryrun.py): a loop there
        return _fp8_mm(x_NX, getattr(self, name), self._caches[name], splits, self.cfg,
                       self.grouped and hasattr(torch, "_grouped_mm") and x_NX.device.type == "cpu")

    def forward(self, x_NsD: Tensor, counts_E: Tensor) -> Tensor:
        splits = counts_E.tolist()  # one host sync per layer, as the non-grouped fallback
        x_NsD = _autocast_input(x_NsD)
        gate, up = self._mm(x_NsD, "gate_up_proj", splits).chunk(2, dim=-1)
        return self._mm(F.silu(gate) * up, "down_proj", splits)


def _check_block(scale_inv: Tensor, shape: torch.Size, block: int) -> None:
    want = tuple(-(-d // block) for d in shape[-2:])
    if tuple(scale_inv.shape[-2:]) != want:
        raise ValueError(f"weight_scale_inv {tuple(scale_inv.shape)} does not match {block}x{block} blocks of a "
                         f"{tuple(shape)} weight (expected {want}); the checkpoint uses another block size")


# ---------------------------------------------------------------------------------------------- conversion
def convert_to_fp8(model: nn.Module, config: Fp8Config | None = None) -> nn.Module:
    """In place: nn.Linear layers whose leaf name is in config.targets -> Fp8Linear, GroupedExperts ->
    Fp8GroupedExperts. Never touched: embeddings, lm_head, the router (mlp.gate), norms; eh_proj on request.
    Parameters are reused, not copied, so call it before or after building the optimizer alike."""
    cfg = config or Fp8Config()
    targets = cfg.targets | ({"eh_proj"} if cfg.eh_proj else set())
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            # any nn.Linear / GroupedExperts not yet in FP8 (also the CPU layer's, as loaders build them)
            if isinstance(child, nn.Linear) and not isinstance(child, Fp8Linear) and name in targets:
                swaps.append((parent, name, Fp8Linear.from_linear(child, cfg)))
            elif isinstance(child, GroupedExperts) and not isinstance(child, Fp8GroupedExperts) and cfg.experts:
                swaps.append((parent, name, Fp8GroupedExperts.from_experts(child, cfg)))
    for parent, name, new in swaps:
        setattr(parent, name, new)
    return model


def fp8_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, Fp8Linear | Fp8GroupedExperts)]


def fp8_hf_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The converted layers' FP8 weights as DeepSeek's checkpoints hold them, under HF names: `...weight` (e4m3,
    unpadded) and `...weight_scale_inv` (one fp32 scale per block x block tile); routed experts per expert.
    Adopted checkpoint bytes (`load_fp8_weights`, frozen layers) come back unchanged; a trainable layer gives
    its master's current quantisation. The rest of the model is not included (see r1.model.hf.hf_state_dict)."""
    from r1.model.hf import native_to_hf

    c = model.config
    for name, mod in model.named_modules():
        if isinstance(mod, Fp8Linear):
            params = (("weight", mod._cache, mod.weight),)
        elif isinstance(mod, Fp8GroupedExperts):
            if (mod.gate_up_proj.shape[1] // 2) % mod.cfg.block:
                raise ValueError(f"{name}: moe_intermediate_size {mod.gate_up_proj.shape[1] // 2} is not a multiple of "
                                 f"the FP8 block {mod.cfg.block}: gate and up blocks would share scales")
            params = tuple((p, mod._caches[p], getattr(mod, p)) for p in ("gate_up_proj", "down_proj"))
        else:
            continue
        for pname, cache, w in params:
            q, sc = cache.get(w, mod.cfg)
            N, K = w.shape[-2:]
            pairs = zip(native_to_hf(f"{name}.{pname}", q[..., :N, :K], c), native_to_hf(f"{name}.{pname}", sc, c),
                        strict=True)
            for (hf_name, q_hf), (_, s_hf) in pairs:
                yield hf_name, q_hf.contiguous()
                yield hf_name + "_scale_inv", s_hf.contiguous()


def load_fp8_weights(model: nn.Module, tensors: Iterable[tuple[str, Tensor]]) -> int:
    """After `r1.model.hf.load_state` has filled the fp32 masters: adopt the checkpoint's fp8 weights
    (HF names, with `weight_scale_inv`) as the converted layers' fp8 copies, bytes and scales unchanged, used
    as long as the layer is frozen (reference / rollout copies); trainable layers re-quantise their master.
    Routed experts are adopted when every expert's gate/up/down is fp8 and I is a multiple of the block.
    Returns the number of layers adopted (the rest re-quantise from the master as usual)."""
    from r1.model.hf import hf_to_native

    c = model.config
    pending = dict(tensors)
    scales = {k.removesuffix("_scale_inv"): v for k, v in pending.items() if k.endswith("weight_scale_inv")}
    mods = dict(model.named_modules())
    experts: dict[str, dict[tuple[int, str], tuple[Tensor, Tensor]]] = {}
    adopted = 0
    for hf_name, t in pending.items():
        if t.dtype != E4M3 or hf_name not in scales:
            continue
        mapped = hf_to_native(hf_name, c)
        if mapped is None:
            continue
        name, j, part = mapped
        if j is not None:
            experts.setdefault(name, {})[(j, part)] = (t, scales[hf_name])
            continue
        mod = mods.get(name.removesuffix(".weight"))
        if isinstance(mod, Fp8Linear):
            mod.load_fp8_(t, scales[hf_name])
            adopted += 1
    for name, parts in experts.items():
        mod = mods.get(name)
        if not isinstance(mod, Fp8GroupedExperts) or len(parts) != 3 * mod.gate_up_proj.shape[0]:
            continue
        b, E = mod.cfg.block, mod.gate_up_proj.shape[0]
        if (mod.gate_up_proj.shape[1] // 2) % b:
            continue  # gate and up blocks would not tile the stacked [2I, D] grid
        with torch.no_grad():
            for pname, keys in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
                q = torch.stack([torch.cat([parts[(j, k)][0] for k in keys]) for j in range(E)])
                s = torch.stack([torch.cat([parts[(j, k)][1] for k in keys]) for j in range(E)])
                _check_block(s, q.shape, b)
                w = getattr(mod, pname)
                w.copy_(torch.stack([dequantize_fp8(q[j], s[j], b) for j in range(E)]))
                mod._caches[pname].set(w, q, s, b)
        adopted += 1
    return adopted
