"""How the policy computes, applied from outside the model (as gpt-fast and torchtitan do): precision and
activation checkpointing. The trainer and SFT make these calls; the model file knows none of them.

Precision (DeepSeek-V3 report, section 3.3):
- fp32: everything in fp32.
- bf16: parameters stay fp32 (master weights, optimizer state and gradients fp32); the update's GEMMs run on
  bf16 operands with fp32 accumulation. Unsharded that is `torch.autocast(device, bf16)` (`compute_context`);
  under FSDP2 it is MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) (`mixed_precision_policy`), as
  torchtitan does. Router scores, the sigmoid gate and balancing bias, norms' statistics, log-softmax and the
  loss stay fp32 (the model and r1/logprobs.py cast explicitly: CPU autocast's fp32 lists differ from CUDA's).
- fp8: bf16 as above, plus every target linear and the routed experts on DeepSeek's blockwise E4M3 recipe
  (r1/fp8.py; emulated on a CPU, torch's scaled GEMMs on Hopper).

On a CPU, bf16 GEMMs are emulated (EmulatedBf16Gemm): bf16 operands, fp32 products and accumulation, the output
rounded to bf16, which is what a GPU's bf16 GEMM computes. Why: on a CPU without bf16 units torch's real bf16
GEMM runs ~130x slower than fp32, while products of bf16 values are exact in fp32.

Activation checkpointing: none | full (each decoder block recomputed in backward) | moe (only the routed
experts' activations).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from r1.model.config import V3Config
from r1.model.model import GroupedExperts

PRECISIONS = ("fp32", "bf16", "fp8")
CHECKPOINTING = ("none", "full", "moe")
# the dtype the update's GEMMs take per precision (fp8's non-FP8 GEMMs: head, attention core, in bf16)
COMPUTE_DTYPE: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp8": torch.bfloat16}
# FP8 tile lengths tried when suggesting one that divides every FP8 GEMM's contraction dim
_BLOCKS = (128, 64, 32, 16)


# ---------------------------------------------------------------------------------------------- checks
def fp8_contraction_dims(c: V3Config) -> dict[str, int]:
    """The contraction dim K (in_features) of each FP8 GEMM the V3 model runs, by the weight that owns it, and
    the routed experts' width (their gate and up blocks must tile the stacked [2I, D] weight)."""
    H = c.num_attention_heads
    dims = {"q_proj / q_a_proj / kv_a_proj_with_mqa / mlp.gate_proj / mlp.up_proj (hidden_size)": c.hidden_size,
            "kv_b_proj (kv_lora_rank)": c.kv_lora_rank,
            "o_proj (num_attention_heads * v_head_dim)": H * c.v_head_dim}
    if c.q_lora_rank is not None:
        dims["q_b_proj (q_lora_rank)"] = c.q_lora_rank
    if c.first_k_dense_replace:
        dims["mlp.down_proj (intermediate_size)"] = c.intermediate_size
    if c.n_shared_experts:
        dims["shared_experts.down_proj (moe_intermediate_size * n_shared_experts)"] = \
            c.moe_intermediate_size * c.n_shared_experts
    if c.first_k_dense_replace < c.num_hidden_layers or c.num_nextn_predict_layers:
        dims["experts (moe_intermediate_size)"] = c.moe_intermediate_size
    return dims


def check_precision(precision: str, config: Any, fp8_block: int = 128) -> None:
    """Raise a one-line ValueError for a precision this model cannot run, before anything loads: an unknown name;
    fp8 on a model that is not the native V3 (`config` not a V3Config), or whose FP8 GEMMs' contraction dims
    are not multiples of fp8_block (the error names the first such dim and a block that would fit)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "fp8":
        return
    if not isinstance(config, V3Config):
        raise ValueError(f"precision=fp8 needs the native V3 model (got a {type(config).__name__}); "
                         "use precision=bf16 for a transformers policy")
    if fp8_block <= 0 or fp8_block % 16:
        raise ValueError(f"fp8_block must be a positive multiple of 16, got {fp8_block}")
    dims = fp8_contraction_dims(config)
    for name, k in dims.items():
        if k % fp8_block:
            g = math.gcd(*dims.values())
            fits = [b for b in _BLOCKS if g % b == 0]
            hint = f"fp8_block={fits[0]} fits every one" if fits else "no block of 16 or more divides them all"
            raise ValueError(f"precision=fp8: {name} = {k} is not a multiple of fp8_block={fp8_block}; {hint}")


def check_checkpointing(mode: str, model: nn.Module | None = None) -> None:
    """One-line ValueError for an unknown mode, or moe on a model without routed GroupedExperts."""
    if mode not in CHECKPOINTING:
        raise ValueError(f"unknown gradient_checkpointing {mode!r}; choose one of {', '.join(CHECKPOINTING)}")
    if mode == "moe" and model is not None and not any(isinstance(m, GroupedExperts) for m in model.modules()):
        raise ValueError(f"gradient_checkpointing=moe needs the native V3 model's routed experts "
                         f"({type(model).__name__} has none); use full")


# ---------------------------------------------------------------------------------------------- precision
def _to_fp8(model: nn.Module, fp8_block: int) -> None:
    from r1.fp8 import Fp8Config, convert_to_fp8

    convert_to_fp8(model, Fp8Config(block=fp8_block))


# what each precision does to the model's modules (bf16 is a compute dtype only: parameters stay fp32)
CONVERT = {"fp32": lambda model, fp8_block: None, "bf16": lambda model, fp8_block: None, "fp8": _to_fp8}


def apply_precision(model: nn.Module, precision: str, fp8_block: int = 128) -> nn.Module:
    """In place, returns the model. fp32 and bf16 leave every parameter fp32 (bf16 is a compute dtype: see
    compute_context / mixed_precision_policy); fp8 swaps the target linears and routed experts for FP8 ones
    (r1.fp8.convert_to_fp8: same parameters, same names). Before apply_activation_checkpointing (the FP8 swap
    would replace checkpointed experts); before or after r1.cpu.accelerate alike."""
    check_precision(precision, getattr(model, "config", None), fp8_block)
    CONVERT[precision](model, fp8_block)
    return model


def mixed_precision_policy(precision: str) -> Any:
    """FSDP2's MixedPrecisionPolicy for the precision: bf16 parameters in compute, fp32 gradient reduction
    (None for fp32: FSDP2's default keeps everything fp32)."""
    dtype = COMPUTE_DTYPE[precision]
    if dtype is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


_aten = torch.ops.aten


class EmulatedBf16Gemm(TorchDispatchMode):
    """A GPU's bf16 GEMMs on a CPU: each matmul-family op whose floating operands are bf16 CPU tensors runs on their
    fp32 values (bf16 x bf16 products are exact in fp32; fp32 accumulation as cuBLAS does) and its outputs are
    rounded to bf16 once. SDPA's fused CPU kernel likewise (scores, softmax and P.V in fp32, the output rounded to
    bf16; a GPU flash kernel also rounds P to bf16 before P.V, the one step not reproduced). Every other op runs as
    it is. The mode sits below autograd, so the backward's GEMMs are emulated too while it is active (the backward
    must run inside it). `calls` counts emulated ops."""

    # op -> which outputs are rounded to bf16 (the rest, SDPA's fp32 logsumexp, stay as computed)
    OPS: dict[Any, tuple[int, ...]] = {
        _aten.mm.default: (0,), _aten.addmm.default: (0,), _aten.bmm.default: (0,), _aten.baddbmm.default: (0,),
        _aten._grouped_mm.default: (0,), _aten._scaled_dot_product_flash_attention_for_cpu.default: (0,),
        _aten._scaled_dot_product_flash_attention_for_cpu_backward.default: (0, 1, 2)}

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        rounded = self.OPS.get(func)
        if rounded is not None and _bf16_cpu(args):
            self.calls += 1
            out = func(*(a.float() if _is_bf16(a) else a for a in args),
                       **{k: v.float() if _is_bf16(v) else v for k, v in kwargs.items()})
            if isinstance(out, Tensor):
                return out.to(torch.bfloat16)
            return type(out)(o.to(torch.bfloat16) if i in rounded else o for i, o in enumerate(out))
        return func(*args, **kwargs)


def _is_bf16(a: Any) -> bool:
    return isinstance(a, Tensor) and a.dtype == torch.bfloat16


def _bf16_cpu(args: tuple) -> bool:
    """The op's operands (its first floating tensor arguments) are bf16 CPU tensors: the inputs a bf16 GEMM gets."""
    first = next((a for a in args if isinstance(a, Tensor) and a.is_floating_point()), None)
    return first is not None and first.dtype == torch.bfloat16 and first.device.type == "cpu"


@contextlib.contextmanager
def compute_context(precision: str, device: torch.device | str, sharded: bool = False) -> Iterator[None]:
    """The context for the update's forward AND backward (and for no-grad log-prob passes) at `precision`:
    bf16 / fp8 -> torch.autocast(device, bf16) unless FSDP2 shards the model (its MixedPrecisionPolicy casts the
    parameters instead); on a CPU, bf16 GEMMs emulated (EmulatedBf16Gemm). fp32: nothing. Thread-local, as
    autocast: a worker thread must enter it itself, around its forward and its backward."""
    dtype, device = COMPUTE_DTYPE[precision], torch.device(device)
    with contextlib.ExitStack() as stack:
        if dtype is not None and not sharded:
            stack.enter_context(torch.autocast(device.type, dtype))
        if dtype is not None and device.type == "cpu":
            stack.enter_context(EmulatedBf16Gemm())
        yield


# ---------------------------------------------------------------------------------------------- checkpointing
class CheckpointedExperts(GroupedExperts):
    """Routed experts whose activations (the [tokens*K, 2I] gate|up output and the SwiGLU) are recomputed in
    backward instead of kept: only the sorted input rows stay. Same parameters as the module it replaces."""

    def forward(self, x_NsD: Tensor, counts_E: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and self.training):
            return self._inner_forward(x_NsD, counts_E)
        return checkpoint(self._inner_forward, x_NsD, counts_E, use_reentrant=False)


def _checkpointed_class(cls: type[nn.Module]) -> type[nn.Module]:
    """cls with forward wrapped by CheckpointedExperts (one subclass per experts class: the CPU layer's, FP8's)."""
    if issubclass(cls, CheckpointedExperts):
        return cls
    if cls not in _CKPT_CLASSES:
        _CKPT_CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (CheckpointedExperts, cls),
                                  {"_inner_forward": cls.forward})
    return _CKPT_CLASSES[cls]


_CKPT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _full(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):  # older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing = True


def _moe(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            m.__class__ = _checkpointed_class(type(m))


CHECKPOINT_APPLY = {"none": lambda model: None, "full": _full, "moe": _moe}


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """In place, returns the model: `full` recomputes each decoder block in backward (the native model's
    gradient_checkpointing, or transformers' gradient_checkpointing_enable); `moe` only the routed experts'
    activations (their class swapped for a checkpointing subclass: parameter names unchanged). Apply it after
    apply_precision and the CPU layer (it wraps whichever experts class is there)."""
    check_checkpointing(mode, model)
    CHECKPOINT_APPLY[mode](model)
    return model
