"""A tiny pretraining run with the standard residual, HC and mHC (r1/model/hc.py), same data, seed and steps.

Model: the "bench" preset (hidden 256, 4 layers, 16 routed experts top-4, no MTP) with vocab 512; n = 4 streams.
Data: a fixed random Markov chain over the vocab, 4 equally likely successors per token (the best
loss is ln 4 = 1.386; a model that has learnt nothing sits at ln 512 = 6.24). AdamW, lr 3e-3.
The three models step in turn, rotating the order each step, so that load on the machine hits all
alike; ms/step is the median over the steps after the first 3, and the overhead the median over those steps of
the paired ratio (a mode's step time over the standard model's in the same round: this VM's speed drifts by tens
of percent within a minute, which the ratio of two medians taken over different moments picks up).
Reports the final loss (mean of the last 5 steps), the largest composite forward / backward gain of H_res seen
over training (hc_metrics), and mhc's / hc's step-time overhead over standard.
Usage: python bench/mhc.py [--steps 40] [--batch 8] [--seq 128] [--threads N] [--hidden 256] [--gemm auto|onednn|torch]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GEMM_CHOICE, pick_gemm, report  # noqa: E402

from r1.cpu import accelerate  # noqa: E402
from r1.logprobs import lm_loss  # noqa: E402
from r1.model.config import PRESETS  # noqa: E402
from r1.model.hc import hc_metrics  # noqa: E402
from r1.model.model import V3ForCausalLM, update_router_biases  # noqa: E402

MODES = ("standard", "hc", "mhc")


def markov_batches(vocab: int, steps: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 4), generator=g)  # 4 successors per token
    out = []
    for _ in range(steps):
        ids = torch.empty(batch, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        pick = torch.randint(0, 4, (batch, seq), generator=g)
        for t in range(1, seq):
            ids[:, t] = succ[ids[:, t - 1], pick[:, t]]
        out.append(ids)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=256, help="hidden size (the other dims as in the preset)")
    ap.add_argument("--gemm", choices=GEMM_CHOICE, default="auto",
                    help="fp32 GEMMs as r1's loaders pick them (auto: oneDNN where the CPU has AVX-512, "
                         "r1/cpu/gemm.py), or forced onto oneDNN or torch's matmul (MKL)")
    args = ap.parse_args()
    gemm = pick_gemm(args.gemm)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = PRESETS["bench"].replace(vocab_size=512, num_nextn_predict_layers=0, hidden_size=args.hidden)
    data = markov_batches(base.vocab_size, args.steps, args.batch, args.seq, seed=0)
    models, opts = {}, {}
    for mode in MODES:
        torch.manual_seed(0)  # the same standard weights in all three (HC parameters come on top)
        models[mode] = V3ForCausalLM(base.replace(residual=mode)).train()
        accelerate(models[mode])  # as r1's loaders do: the CPU layer (r1/cpu)
        # fused, as r1's trainer and SFT use it (the per-parameter loop would charge HC's 48 small tensors)
        opts[mode] = torch.optim.AdamW(models[mode].parameters(), lr=args.lr, weight_decay=0.0, fused=True)
    losses: dict[str, list[float]] = {m: [] for m in MODES}
    times: dict[str, list[float]] = {m: [] for m in MODES}
    gains: dict[str, list[float]] = {m: [1.0, 1.0] for m in MODES}
    for step, ids in enumerate(data):
        for mode in MODES[step % 3:] + MODES[:step % 3]:
            model, opt = models[mode], opts[mode]
            t0 = time.perf_counter()
            loss, _ = lm_loss(model(ids), model.lm_head.weight, ids, mtp_weight=0.0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_router_biases(model)
            times[mode].append(time.perf_counter() - t0)
            losses[mode].append(loss.item())
            m = hc_metrics(model)  # H of this step's forward
            if m:
                gains[mode] = [max(gains[mode][0], m["hc/forward_gain"]), max(gains[mode][1], m["hc/backward_gain"])]
    ms = {m: statistics.median(times[m][3:]) * 1e3 for m in MODES}
    rows = {m: {"final_loss": statistics.mean(losses[m][-5:]), "first_loss": losses[m][0],
                "max_forward_gain": gains[m][0], "max_backward_gain": gains[m][1], "ms_per_step": ms[m],
                "overhead": statistics.median(t / s for t, s in zip(times[m][3:], times["standard"][3:], strict=True))
                - 1} for m in MODES}
    print(f"{args.steps} steps, batch {args.batch} x seq {args.seq}, hidden {base.hidden_size}, "
          f"{base.num_hidden_layers} layers, n = {base.hc_streams}, fp32, {torch.get_num_threads()} threads, "
          f"GEMMs: {gemm} ({args.gemm})")
    print(f"{'mode':10}{'final loss':>11}{'fwd gain':>10}{'bwd gain':>10}{'ms/step':>9}{'overhead':>10}")
    for m, r in rows.items():
        print(f"{m:10}{r['final_loss']:11.3f}{r['max_forward_gain']:10.3f}{r['max_backward_gain']:10.3f}"
              f"{r['ms_per_step']:9.1f}{r['overhead']:+10.1%}")
    report("mhc", rows, {"steps": args.steps, "batch": args.batch, "seq": args.seq,
                         "threads": torch.get_num_threads(), "hidden": base.hidden_size,
                         "gemm": gemm, "streams": base.hc_streams})


if __name__ == "__main__":
    main()
