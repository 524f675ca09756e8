"""Rollout throughput: our torch engine vs transformers' `generate`, same weights, same prompts, one process.

Both sample (temperature 1, top-p 0.95) exactly `new` tokens per row (EOS ignored), from left-padded
batches of random prompts, on the tiny V3 preset (MoE, q LoRA). transformers runs its own
DeepseekV3ForCausalLM holding our weights with its DynamicCache; we run V3ForCausalLM with the MLA latent
cache. Runs alternate (ours, theirs, ours, ...) and the median of each side is reported, plus the peak
resident-memory growth during a run (sampled from /proc every 2 ms) and a JSON line. The process CPU
time per run is reported too: on a machine shared with other jobs, wall time also counts the time the
threads wait to be scheduled (OpenMP regions wait for their slowest thread), CPU time much less so.

    python bench/generate.py [--batch 16 --prompt 64 --new 128 --repeats 5 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tests/_v3ref.py builds transformers' model from ours

from _v3ref import hf_copy, randomize  # noqa: E402

from r1.cpu import CPUTorchEngine, accelerate  # noqa: E402
from r1.model import PRESETS, V3ForCausalLM  # noqa: E402
from rollouts import SamplingParams  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn: Callable[[], object]) -> tuple[float, float, int]:
    """Wall seconds, process CPU seconds and peak RSS growth over the starting RSS while fn runs."""
    base, peak, running = rss_bytes(), [0], [True]

    def watch() -> None:
        while running[0]:
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    dt, cpu = time.perf_counter() - start, time.process_time() - cpu
    running[0] = False
    t.join()
    return dt, cpu, max(peak[0], rss_bytes()) - base


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    ours = randomize(V3ForCausalLM(PRESETS[args.preset])).eval()
    theirs = hf_copy(ours).eval()
    accelerate(ours)  # as r1's loaders build it: the CPU layer (r1/cpu)
    theirs.generation_config.pad_token_id = 0
    V = ours.config.vocab_size
    # left padding: prompt lengths between half and full length, as real rollout batches look
    lens = torch.randint(args.prompt // 2, args.prompt + 1, (args.batch,), generator=torch.Generator().manual_seed(1))
    lens[0] = args.prompt
    prompts = [torch.randint(3, V, (int(n),)).tolist() for n in lens]
    ids = torch.zeros(args.batch, args.prompt, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, args.prompt - len(p):], mask[i, args.prompt - len(p):] = torch.tensor(p), 1

    engine = CPUTorchEngine(ours)  # as r1.cpu.accelerate_engine builds it
    sp = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=args.new, ignore_eos=True, seed=0)

    def run_ours() -> None:
        out = engine.generate(prompts, sp)
        assert all(len(r.token_ids) == args.new for r in out)

    def run_theirs() -> None:
        torch.manual_seed(0)
        with torch.inference_mode():
            out = theirs.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=0.95, top_k=0,
                                  max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=0)
        assert out.shape == (args.batch, args.prompt + args.new)

    run_ours(), run_theirs()  # warm-up: first-call kernel selection, allocator
    times: dict[str, list[float]] = {"ours": [], "transformers": []}
    cpus: dict[str, list[float]] = {"ours": [], "transformers": []}
    mem: dict[str, int] = {"ours": 0, "transformers": 0}
    for _ in range(args.repeats):
        for name, fn in (("ours", run_ours), ("transformers", run_theirs)):
            dt, cpu, peak = timed(fn)
            times[name].append(dt)
            cpus[name].append(cpu)
            mem[name] = max(mem[name], peak)
    tokens = args.batch * args.new
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    ratio = tps["ours"] / tps["transformers"]
    cpu_s = {k: statistics.median(v) for k, v in cpus.items()}
    print(f"preset={args.preset} batch={args.batch} prompt<={args.prompt} new={args.new} threads={args.threads}")
    for k in times:
        print(f"{k:>13}: {tps[k]:8.1f} tokens/s (median of {args.repeats}: "
              f"{', '.join(f'{t:.2f}' for t in times[k])} s)  peak RSS growth {mem[k] / 2**20:.1f} MiB")
    print(f"speed-up: {ratio:.2f}x (process CPU s per run, median: ours {cpu_s['ours']:.2f}, "
          f"transformers {cpu_s['transformers']:.2f}, ratio {cpu_s['transformers'] / cpu_s['ours']:.2f}x)")
    print(json.dumps({"bench": "generate", "preset": args.preset, "batch": args.batch, "prompt": args.prompt,
                      "new": args.new, "threads": args.threads,
                      "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
                      "ratio": round(ratio, 2), "cpu_s": {k: round(v, 3) for k, v in cpu_s.items()},
                      "peak_rss_mib": {k: round(v / 2**20, 1) for k, v in mem.items()}}))


if __name__ == "__main__":
    main()
