"""Forward + backward of one V3 MoE layer at V3's expert shapes: FP8 (blockwise, r1/fp8.py) vs BF16.

Layer: hidden 7168, expert width 2048, router + 1 shared expert + E routed experts top-k (E scaled down to
fit one device; the per-expert GEMMs keep V3's shapes). BF16: parameters and activations bf16. FP8: fp32
master weights, bf16 activations, the three GEMMs of every expert and shared-expert linear in E4M3 with
V3's 1x128 / 128x128 scales. Reports tokens/s of forward+backward, the ratio, and the activation memory
saved for backward (bytes of the tensors autograd keeps, parameters and fp8 weight copies excluded).
On a CPU the FP8 GEMMs are the emulation (quantise, dequantise, matmul in fp32): its timings measure the
emulation's cost, not FP8 speed; the CPU run also times fp32, the emulation's own matmul precision, the routed
experts' per-expert FP8 loop (fp8_loop) beside the grouped GEMM the emulation runs, and bf16 with the GEMMs
emulated as on a GPU (r1.compute.EmulatedBf16Gemm: a CPU without bf16 units runs real bf16 GEMMs ~100x slower).
Usage: python bench/fp8.py [--experts 8] [--topk 2] [--tokens 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, report  # noqa: E402

from r1.compute import EmulatedBf16Gemm  # noqa: E402
from r1.fp8 import Fp8GroupedExperts, convert_to_fp8, fp8_modules, pick_backend  # noqa: E402
from r1.model.config import PRESETS  # noqa: E402
from r1.model.model import MoE  # noqa: E402


def saved_activation_bytes(module: torch.nn.Module, step: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward during `step`'s forward, except the
    parameters and the cached fp8 weights (those exist with or without autograd)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    # after the forward: the fp8 weight copies it made are the ones now cached
    skip = {p.untyped_storage().data_ptr() for p in module.parameters()}
    for m in fp8_modules(module):
        for c in getattr(m, "_caches", {}).values() or [m._cache]:
            skip |= {t.untyped_storage().data_ptr() for t in (c.q, c.s) if t is not None}
    for ptr in skip:
        seen.pop(ptr, None)
    out.float().sum().backward()
    return sum(seen.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    cuda = torch.cuda.is_available()
    ap.add_argument("--experts", type=int, default=8 if cuda else 4)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8192 if cuda else 256)
    ap.add_argument("--repeats", type=int, default=5 if cuda else 1)
    args = ap.parse_args()
    dev = torch.device("cuda" if cuda else "cpu")
    backend = pick_backend(dev)
    c = PRESETS["deepseek-v3"].replace(n_routed_experts=args.experts, num_experts_per_tok=args.topk, n_group=1,
                                       topk_group=1, seq_aux_loss_alpha=0.0)
    torch.manual_seed(0)
    with dev:
        base = MoE(c)
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.02)
    layers = {"bf16": copy.deepcopy(base).to(torch.bfloat16), "fp8": convert_to_fp8(copy.deepcopy(base))}
    if not cuda:
        layers["fp32"] = base
    if backend == "emulated":
        layers["fp8_loop"] = convert_to_fp8(copy.deepcopy(base))
        for m in layers["fp8_loop"].modules():
            if isinstance(m, Fp8GroupedExperts):
                m.grouped = False
    x = torch.randn(1, args.tokens, c.hidden_size, device=dev, dtype=torch.bfloat16)
    dtype_of = {"bf16": torch.bfloat16, "fp8": torch.bfloat16, "fp8_loop": torch.bfloat16, "fp32": torch.float32}

    def gemms() -> contextlib.AbstractContextManager:
        return EmulatedBf16Gemm() if not cuda else contextlib.nullcontext()

    def step_fn(name: str) -> Callable[[], None]:
        layer, xin = layers[name], x.to(dtype_of[name]).requires_grad_()

        def step() -> None:
            with gemms():
                y, _ = layer(xin)
                y.float().square().mean().backward()
            layer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
        return step

    secs = alternate({k: step_fn(k) for k in layers}, repeats=args.repeats)
    with gemms():
        act = {k: saved_activation_bytes(layers[k], lambda k=k: layers[k](x.to(dtype_of[k]).requires_grad_())[0])
               for k in layers}
    rows = {k: {"tokens_per_s": args.tokens / s, "seconds": s, "saved_activation_MiB": act[k] / 2**20}
            for k, s in secs.items()}
    ratio = secs["bf16"] / secs["fp8"]
    what = f"FP8 GEMMs: {backend}" + ("" if backend != "emulated" else " (CPU emulation: not FP8 hardware speed)")
    print(f"MoE layer fwd+bwd, hidden {c.hidden_size}, expert width {c.moe_intermediate_size}, "
          f"{args.experts} routed top-{args.topk} + 1 shared, {args.tokens} tokens on {dev.type}; {what}")
    for k, r in rows.items():
        print(f"  {k:5s} {r['tokens_per_s']:10.1f} tokens/s  {r['seconds'] * 1e3:9.1f} ms  "
              f"saved activations {r['saved_activation_MiB']:8.1f} MiB")
    saved = 1 - act["fp8"] / act["bf16"]
    print(f"  fp8 / bf16 speed: {ratio:.2f}x (target >= 1.4x on Hopper); activation memory saved vs bf16: "
          f"{saved:.1%}")
    if "fp32" in secs:
        print(f"  fp8 emulation / fp32 speed: {secs['fp32'] / secs['fp8']:.2f}x")
    if "fp8_loop" in secs:
        print(f"  routed experts as one grouped GEMM / per-expert loop speed: {secs['fp8_loop'] / secs['fp8']:.2f}x")
    report("fp8_moe_layer", rows, {"device": dev.type, "backend": backend, "emulated": backend == "emulated",
                                   "experts": args.experts, "topk": args.topk, "tokens": args.tokens,
                                   "hidden": c.hidden_size, "expert_width": c.moe_intermediate_size,
                                   "fp8_over_bf16": ratio, "activation_saved_frac": saved})


if __name__ == "__main__":
    main()
