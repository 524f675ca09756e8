"""The `r1` command. Each subcommand is a function registered on its own argparse sub-parser."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cmd_model(args: argparse.Namespace) -> int:
    from r1.config import load_config as load_settings
    from r1.model.config import count_params, human, load_config
    from r1.plan import PlanSpec, plan

    spec = load_settings(PlanSpec, None, args.plan) if args.plan is not None else None  # bad keys: before any work
    if args.simulate and spec is None:
        raise ValueError("--simulate needs --plan (gpus=N precision=P ...)")
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
    if spec is None:
        return 0
    p = plan(c, spec)
    print(f"memory per GPU: FSDP2 over {spec.gpus} GPU(s), {spec.precision}, {spec.micro_batch_tokens} tokens per "
          f"micro-batch, gradient checkpointing {spec.gradient_checkpointing}, {spec.optim}")
    print(p.table())
    if args.simulate:
        from r1.simulate import simulate

        sim = simulate(c, spec)
        print(f"simulated (fake tensors, one GRPO update micro-batch + AdamW step, rank 0 of {spec.gpus}; "
              f"{sim.seconds:.0f} s): peak by kind beside the plan's, GiB per GPU")
        print(sim.table(p))
        print(f"  step FLOPs counted {sim.flops:.3g} ({sim.flops / sim.tokens:.3g} per token); host syncs "
              f"{len(sim.syncs)}")
    if not p.fits:
        print(f"r1 model: error: {p.verdict()}", file=sys.stderr)
        return 1
    print(p.verdict())
    return 0


def split_recipe(items: list[str]) -> tuple[str | None, list[str]]:
    """`[RECIPE.yaml] key=value ...` -> (recipe path or None, overrides)."""
    if items and "=" not in items[0]:
        if not Path(items[0]).is_file():
            raise FileNotFoundError(f"recipe {items[0]!r} not found")
        return items[0], items[1:]
    return None, items


def _run(config_cls: type, fn: Callable[[Any], Any]) -> Callable[[argparse.Namespace], int]:
    """A subcommand that loads a typed recipe (every error before any compute) and runs `fn` on it."""

    def cmd(args: argparse.Namespace) -> int:

        from r1.config import load_config

        recipe, overrides = split_recipe(args.recipe)
        try:
            fn(load_config(config_cls, recipe, overrides))
        except BaseException:
            _destroy_process_group()
            raise
        if _destroy_process_group():
            _exit_now()
        return 0

    return cmd


def _destroy_process_group() -> bool:
    """Destroy the process group of an `accelerate launch` run; False when there was none."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    torch.distributed.destroy_process_group()
    return True


def _exit_now() -> None:
    """End a finished multi-process run without the interpreter's teardown. Even with the process group destroyed,
    a rank has aborted there ("terminate called without an active exception": a C++ thread still joinable while
    static objects are destroyed) in 1 of many two-process test runs, turning a finished run into a failed one.
    Everything was written and flushed by then; the reward worker processes are closed here, as atexit would."""
    import logging

    import rewards

    rewards.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _train(cfg: Any) -> Any:
    from r1.trainer import train

    return train(cfg)


def _sft(cfg: Any) -> Any:
    from r1.sft import sft

    return sft(cfg)


def _smoke(cfg: Any) -> Any:
    from r1.smoke import run_smoke

    return run_smoke(cfg)


def cmd_vllm_serve(args: argparse.Namespace) -> int:
    """Replace this process with a vLLM server the trainer can drive (rollouts.vllm_engine.serve_argv)."""
    from rollouts.vllm_engine import serve_argv

    argv, env = serve_argv(args.model, args.vllm_args)
    sys.stdout.flush()
    os.execvpe(argv[0], argv, {**os.environ, **env})
    return 1  # not reached


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r1", description="Reasoning RL (GRPO) on a native DeepSeek-V3 stack")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("model", help="parameters, active parameters and FLOPs of a preset, config.json or checkpoint")
    m.add_argument("config", help="preset name (tiny, smoke, bench, deepseek-v3), config.json, or a model directory")
    m.add_argument("--seq-len", type=int, default=4096)
    m.add_argument("--plan", nargs="+", metavar="key=value",
                   help="per-GPU training memory under FSDP2: gpus=N precision=fp32|bf16|fp8 micro_batch_tokens=T "
                        "[gradient_checkpointing=none|full|moe] [gpu=h100|h200] [optim=adamw_torch_fused|adamw_bf16] "
                        "[mtp=false|true] [expert_parallel=N]; exits 1 when it does not fit")
    m.add_argument("--simulate", action="store_true",
                   help="with --plan: also run one GRPO update step of the real code on fake tensors (no weights) "
                        "over a fake world of N ranks under FSDP2, and print rank 0's measured peak beside the plan")
    m.set_defaults(func=cmd_model)

    from r1.eval import add_eval_args, cmd_eval
    from r1.sft import SftConfig
    from r1.smoke import SmokeConfig
    from r1.trainer import TrainConfig

    recipes = [("train", TrainConfig, _train, "GRPO: prompts -> G rollouts -> rewards -> policy update"),
               ("sft", SftConfig, _sft, "supervised fine-tuning (cold start / rejection-sampling data)"),
               ("smoke", SmokeConfig, _smoke, "the CPU smoke run: cold-start SFT, GRPO, held-out evaluation")]
    for name, cls, fn, doc in recipes:
        r = sub.add_parser(name, help=doc, description=f"{doc}. Fields: {', '.join(cls.__dataclass_fields__)}")
        r.add_argument("recipe", nargs="*", metavar="[RECIPE.yaml] key=value", help="a recipe file, then overrides")
        r.set_defaults(func=_run(cls, fn))
    v = sub.add_parser("vllm-serve", help="a vLLM server for `r1 train engine=vllm vllm_mode=server`",
                       description="Starts `vllm serve MODEL` with what the trainer needs: the sampler's log-probs "
                                   "after temperature, weight transfer over NCCL (CUDA) or safetensors shards in a "
                                   "shared directory (anywhere; --transport files), sleep mode where vLLM has it. "
                                   "Every other option goes to vLLM (--port 8001, --tensor-parallel-size 2, ...).")
    v.add_argument("model", help="a model directory or hub name (the trainer's starting weights)")
    v.add_argument("vllm_args", nargs=argparse.REMAINDER, metavar="[--transport auto|nccl|files] [vLLM options]")
    v.set_defaults(func=cmd_vllm_serve)
    e = sub.add_parser("eval", help="pass@1 / pass@k / maj@k on MATH-500, AIME, GSM8K or a JSONL file")
    add_eval_args(e)
    e.set_defaults(func=cmd_eval)
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
