"""All-to-all traffic of expert parallelism (r1/expert_parallel.py) per token per MoE layer, measured against the
formula: dispatch sends each token's K routed rows of the hidden width (top_k x hidden x bytes), combine returns as
much; of that, the rows whose expert lives on another rank leave the process ((ep - 1) / ep of it when the load is
uniform). The backward pass moves the same amounts again (the gradients of the two all-to-alls).

Runs `--nproc` gloo processes (torchrun) on a V3 preset with expert_parallel = nproc, one forward of `--tokens`
tokens per rank under FSDP2, in fp32 and bf16 (FSDP2's bf16 parameters: the rows travel in bf16). Every
all_to_all_single_autograd call is counted (bytes sent, and the part to other ranks). Printed per precision, and a
JSON line.
Usage: python bench/ep.py [--nproc 2] [--preset bench] [--tokens 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rank_main(preset: str, tokens: int) -> None:
    import torch
    import torch.distributed._functional_collectives as funcol

    from r1.compute import compute_context
    from r1.expert_parallel import all_to_all_bytes_per_token
    from r1.model.config import load_config
    from r1.model.model import V3ForCausalLM
    from r1.parallel import Dist

    world = int(os.environ["WORLD_SIZE"])
    d = Dist(world)
    sent = {"all": 0, "remote": 0, "calls": 0}
    real = funcol.all_to_all_single_autograd

    def counting(x, output_split_sizes, input_split_sizes, group):  # noqa: ANN001, ANN202 - funcol's signature
        row = x[0].numel() * x.element_size() if x.shape[0] else 0
        sent["all"] += sum(input_split_sizes) * row
        sent["remote"] += (sum(input_split_sizes) - input_split_sizes[d.rank % world]) * row
        sent["calls"] += 1
        return real(x, output_split_sizes, input_split_sizes, group)

    funcol.all_to_all_single_autograd = counting
    c = load_config(preset)
    rows = []
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = d.wrap(V3ForCausalLM(c).train(), precision)
        ids = torch.randint(3, c.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(d.rank))
        for k in sent:
            sent[k] = 0
        with compute_context(precision, "cpu", sharded=True):
            model(ids, mtp=False)
        moe_layers = c.num_hidden_layers - c.first_k_dense_replace
        per = {k: d.all_reduce(torch.tensor(float(v)))
               .item() / (world * tokens * moe_layers) for k, v in sent.items() if k != "calls"}
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        rows.append({"precision": precision, "dispatch_plus_combine": per["all"], "to_other_ranks": per["remote"],
                     "formula_one_way": all_to_all_bytes_per_token(c.hidden_size, c.num_experts_per_tok, dtype),
                     "calls_per_layer": sent["calls"] / moe_layers})
    if d.main:
        print(f"expert parallelism {world} on {world} gloo processes, preset {preset} (hidden {c.hidden_size}, "
              f"top_k {c.num_experts_per_tok}, {c.n_routed_experts} experts), {tokens} tokens per rank")
        print(f"  {'precision':<10}{'a2a B/token/layer':>19}{'formula x2':>12}{'ratio':>8}{'to other ranks':>16}")
        for r in rows:
            f2 = 2 * r["formula_one_way"]
            print(f"  {r['precision']:<10}{r['dispatch_plus_combine']:>19.1f}{f2:>12}"
                  f"{r['dispatch_plus_combine'] / f2:>8.3f}{r['to_other_ranks']:>16.1f}")
        print(json.dumps({"bench": "ep", "world": world, "preset": preset, "tokens": tokens, "rows": rows}))
    torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank_main:
        rank_main(a.preset, a.tokens)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc), __file__,
                        "--rank-main", "--preset", a.preset, "--tokens", str(a.tokens)], env=env, cwd=ROOT)
    sys.exit(r.returncode)


if __name__ == "__main__":
    main()
