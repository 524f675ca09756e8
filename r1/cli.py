"""The `r1` command. Each subcommand is a function registered on its own argparse sub-parser."""

from __future__ import annotations

import argparse
import sys


def cmd_model(args: argparse.Namespace) -> int:
    from r1.model.config import count_params, human, load_config

    c = load_config(args.config)
    s = count_params(c, seq_len=args.seq_len)
    print(f"{args.config}: {c.num_hidden_layers} layers ({c.first_k_dense_replace} dense), hidden {c.hidden_size}, "
          f"{c.n_routed_experts} routed experts top-{c.num_experts_per_tok} + {c.n_shared_experts} shared, "
          f"MTP depth {c.num_nextn_predict_layers}, residual {c.residual}")
    main = s.total - s.mtp
    print(f"  total parameters      {human(main):>10}  ({main:,}; plus {human(s.mtp)} in MTP modules)")
    print(f"  active per token      {human(s.active):>10}  ({s.active:,}; without MTP)")
    print(f"  training FLOPs/token  {human(s.train_flops_per_token):>10}  (6 x active matmul params + "
          f"causal attention at seq {s.seq_len})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r1", description="Reasoning RL (GRPO) on a native DeepSeek-V3 stack")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("model", help="parameters, active parameters and FLOPs of a preset, config.json or checkpoint")
    m.add_argument("config", help="preset name (tiny, smoke, bench, deepseek-v3), config.json, or a model directory")
    m.add_argument("--seq-len", type=int, default=4096)
    m.set_defaults(func=cmd_model)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:  # bad input: one line, no traceback
        print(f"r1 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
