"""One GRPO step on a CPU: r1's trainer vs TRL's GRPOTrainer, same model, prompts, G and lengths, one process.

The model is the smoke preset of our V3 (MTP off: GRPO never runs it and transformers has none), freshly
initialised, exported in HF format with our character tokenizer. r1 trains it with `r1.trainer.train` (the
native model, our torch engine); TRL loads the same directory as transformers' DeepseekV3ForCausalLM and runs
its own `generate`. Both sides:
- the smoke arithmetic prompts, in the same order (TRL's shuffling off, the rows fed in our order, BOS included);
- G samples per prompt, `--prompts` prompts per step, every completion exactly `--max-tokens` long
  (ours: SamplingParams.ignore_eos through a benchmark engine; TRL: generation_kwargs min_new_tokens);
- rewards.math.math_reward (TRL's reward protocol as is), temperature 1, top-p 1;
- beta 0 (no reference model), one update per batch (mu = num_iterations = 1), clip 0.2 / 0.28, token-level
  (DAPO) loss, group-std advantages, the same micro-batch, fp32, AdamW(lr, betas 0.9/0.99, no decay), constant
  lr, grad-norm clip 1; dynamic sampling off on our side. Ours also weights the loss by truncated importance
  sampling against the engine's log-probs (its default, one elementwise op); TRL does that only with vLLM.
The weights are random, so rewards are mostly 0: the compute of a step does not depend on them.
TRL runs fp32 (bf16=False; its default is bf16 autocast). Its default gradient checkpointing (on) trades time
for memory, so TRL runs both with and without it (`--trl-ckpt`). Ours runs its CPU defaults: the engine decodes
half of each step's prompts in a second process (r1/cpu/decode_worker.py) and the update runs two micro-batches
side by side on threads (r1.cpu.micro_batches), one core each; TRL uses the 2 cores as intra-op threads.

Timing: runs of (warm-up + timed) steps, ours and TRL's alternating, `--rounds` times; per-step seconds from
our metrics.jsonl (time/step) and from TRL callbacks (on_step_begin -> on_step_end); medians of the timed steps.
Peak memory: the most bytes of CPU tensors alive at once during a 2-step run of each side (model load,
optimizer state, rollouts, the update), from the allocation and free records of the torch profiler
(profile_memory); ours adds its decode worker process's replica and decoding peak (decode_worker_bytes).
Python objects and allocator slack are not counted. Neither side saves anything (our final checkpoint and export
are skipped: they are not part of a step, and TRL runs with save_strategy="no"). CPU seconds: each side's
process, ours with its decode worker's (common.cpu_seconds).
The machine has 2 cores and other processes may be running on it: compare ratios, not absolute times.

Usage: python bench/grpo_step.py [--steps 3] [--rounds 2] [--prompts 16] [--group-size 8] [--max-tokens 48]
                                 [--micro-batch 32] [--threads 2] [--trl-ckpt both]
(the sizes default to the smoke recipe's GRPO: 16 prompts x 8 samples, 48 tokens, micro-batch 32)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # bench/common.py (appended: bench/rewards.py is no package)

import torch  # noqa: E402
from common import cpu_seconds, peak_bytes  # noqa: E402

import rollouts  # noqa: E402
from r1 import trainer  # noqa: E402
from r1.cpu import CPUTorchEngine, accelerate  # noqa: E402
from r1.data import render, smoke_rl_rows  # noqa: E402
from r1.model.config import PRESETS  # noqa: E402
from r1.model.model import V3ForCausalLM  # noqa: E402
from r1.policy import export, load_policy  # noqa: E402
from r1.tokenizer import load_tokenizer  # noqa: E402
from r1.trainer import TrainConfig, sequence_logprobs, train  # noqa: E402
from rewards.math import forget_verdicts, math_reward  # noqa: E402

ENGINE = "torch_fixed_length"


class FixedLengthEngine(CPUTorchEngine):
    """Our torch engine with EOS ignored, so every completion is exactly max_tokens long (as TRL's with
    min_new_tokens = max_new_tokens). TrainConfig has no ignore_eos, so the benchmark registers this engine."""

    def generate(self, prompt_ids: Any, sampling: rollouts.SamplingParams, n: int = 1) -> list[rollouts.Rollout]:
        return super().generate(prompt_ids, dataclasses.replace(sampling, ignore_eos=True), n)


rollouts.ENGINES[ENGINE] = FixedLengthEngine


# ---------------------------------------------------------------------------------------------- measuring
def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------------------------------------- the two sides
def make_model(directory: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = V3ForCausalLM(PRESETS["smoke"].replace(num_nextn_predict_layers=0))
    export(model, load_tokenizer("char"), directory)


def check_same_model(model_dir: Path, prompts: list[list[int]]) -> float:
    """Max |log-prob difference| of the prompt tokens, r1's native model vs transformers', same files."""
    from transformers import AutoModelForCausalLM

    ours = load_policy(str(model_dir)).eval()
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = (torch.arange(P)[None] >= torch.tensor([P - len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        a = sequence_logprobs(ours, ids, mask, 1, 1.0)[0]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1].float()
        b = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return float(((a - b).abs() * mask[:, :-1] * mask[:, 1:]).max())  # real token predicted from a real one


def run_ours(args: argparse.Namespace, model_dir: Path, out_dir: Path, steps: int) -> list[dict]:
    forget_verdicts()  # each run starts with no memoised verdicts (both sides share the function)
    # CPU seconds of this process per step: between consecutive metrics lines (step 1 also holds the setup)
    cpu: list[float] = []
    log = trainer.JsonlLogger.log

    def timed_log(self: Any, step: int, metrics: dict[str, float]) -> None:
        cpu.append(cpu_seconds())  # with the decode worker's
        log(self, step, metrics)

    # The final checkpoint and HF export are not part of a step (TRL saves nothing here either): skipped.
    saves = trainer.checkpoint.save, trainer.export
    skip = lambda *a, **k: None  # noqa: E731
    trainer.JsonlLogger.log, trainer.checkpoint.save, trainer.export = timed_log, skip, skip
    try:
        train(TrainConfig(model=str(model_dir), dataset="smoke", template="smoke", rewards=["math"], engine=ENGINE,
                          steps=steps, prompts_per_step=args.prompts, group_size=args.group_size,
                          max_tokens=args.max_tokens, temperature=1.0, top_p=1.0, lr=args.lr, beta=0.0, mu=1,
                          micro_batch=args.micro_batch, dynamic_sampling=False, seed=args.seed,
                          output_dir=str(out_dir), progress=False))
    finally:
        trainer.JsonlLogger.log, (trainer.checkpoint.save, trainer.export) = log, saves
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    for row, a, b in zip(rows[1:], cpu[:-1], cpu[1:], strict=True):
        row["cpu/step"] = b - a
    return rows


def decode_worker_bytes(args: argparse.Namespace, model_dir: Path) -> int:
    """What the profiler in this process cannot see of ours: the decode worker's (r1/cpu/decode_worker.py) replica
    of the weights plus the peak of decoding its half of a step's prompts, measured here the same way. Added to the
    main process's peak, though the two peaks do not coincide (the worker idles during the update): an upper bound."""
    policy = accelerate(load_policy(str(model_dir)))
    engine = FixedLengthEngine(policy, load_tokenizer(str(model_dir)))
    if not engine._splits(args.prompts, args.group_size):
        return 0
    rows = smoke_rl_rows(seed=args.seed)[:args.prompts]
    prompts = trainer.encode_prompts(engine.tokenizer, [render("smoke", r["prompt"]) for r in rows])
    sp = rollouts.SamplingParams(temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True, seed=0)
    replica = sum(t.numel() * t.element_size() for t in policy.state_dict().values())
    with torch.inference_mode():
        half = prompts[(args.prompts + 1) // 2:]  # decoded in this process, unsplit (TorchEngine's loop)
        return replica + peak_bytes(lambda: rollouts.TorchEngine._run(engine, half, sp, args.group_size))


def trl_dataset(args: argparse.Namespace, steps: int) -> Any:
    """Our trainer's prompts in our trainer's order: the smoke RL prompts shuffled by Random(seed), BOS first."""
    import datasets

    rows = smoke_rl_rows(seed=args.seed)
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    order = order[:steps * args.prompts]
    bos = load_tokenizer("char").bos_token
    return datasets.Dataset.from_list([{"prompt": bos + render("smoke", rows[i]["prompt"]),
                                        "answer": rows[i]["answer"]} for i in order])


def run_trl(args: argparse.Namespace, model_dir: Path, out_dir: Path, steps: int, ckpt: bool) -> dict:
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    forget_verdicts()  # as run_ours
    times: list[float] = []
    cpu: list[float] = []
    phases: dict[str, list[float]] = {"generate": [], "reward": [], "rollout": []}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a: Any, **kw: Any) -> None:
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            times.append(time.perf_counter() - self.t0)
            cpu.append(time.process_time() - self.c0)

    B = args.prompts * args.group_size
    cfg = GRPOConfig(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=B // args.micro_batch, num_generations=args.group_size,
        max_completion_length=args.max_tokens, generation_kwargs={"min_new_tokens": args.max_tokens},
        temperature=1.0, top_p=1.0, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0, max_grad_norm=1.0,
        beta=0.0, num_iterations=1, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", scale_rewards="group",
        gradient_checkpointing=ckpt, bf16=False, use_cpu=True, shuffle_dataset=False, seed=args.seed,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=[math_reward], args=cfg, train_dataset=trl_dataset(args, steps),
                          processing_class=load_tokenizer(str(model_dir)), callbacks=[StepTimer()])
    for attr, key in (("_generate_single_turn", "generate"), ("_calculate_rewards", "reward"),
                      ("_generate_and_score_completions", "rollout")):
        setattr(trainer, attr, _timed(getattr(trainer, attr), phases[key]))
    trainer.remove_callback(PrinterCallback)  # its per-step log dicts
    trainer.train()
    return {"times": times, "cpu": cpu, **phases, "log": trainer.state.log_history}


def _timed(fn: Any, into: list[float]) -> Any:
    def wrapper(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        into.append(time.perf_counter() - t0)
        return out

    return wrapper


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of every run")
    ap.add_argument("--rounds", type=int, default=2, help="alternations ours -> TRL")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step")
    ap.add_argument("--group-size", type=int, default=8, help="G, samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=48, help="completion length (every completion)")
    ap.add_argument("--micro-batch", type=int, default=32, help="completions per forward/backward")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-ckpt", choices=("on", "off", "both"), default="both",
                    help="TRL's gradient checkpointing (its default is on)")
    ap.add_argument("--no-memory", action="store_true", help="skip the profiled peak-memory runs")
    args = ap.parse_args()
    B = args.prompts * args.group_size
    if args.warmup < 1:
        ap.error("--warmup must be at least 1 (the first step of a run also holds its setup)")
    if B % args.micro_batch:
        ap.error(f"prompts x group-size = {B} must be a multiple of --micro-batch {args.micro_batch}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import transformers
    import trl

    transformers.utils.logging.disable_progress_bar()

    trl_modes = {"on": [True], "off": [False], "both": [False, True]}[args.trl_ckpt]
    names = {False: "trl", True: "trl+ckpt"}
    with tempfile.TemporaryDirectory(prefix="grpo_step_") as tmp_:
        tmp = Path(tmp_)
        model_dir = tmp / "model"
        make_model(model_dir, args.seed)
        tok = load_tokenizer(str(model_dir))
        sample = [[tok.bos_token_id] + tok(render("smoke", r["prompt"]))["input_ids"]
                  for r in smoke_rl_rows(seed=args.seed)[:8]]
        gap = check_same_model(model_dir, sample)
        n_params = sum(p.numel() for p in load_policy(str(model_dir)).parameters())

        steps = args.warmup + args.steps
        ours_rows: list[dict] = []
        trl_runs: dict[bool, list[dict]] = {m: [] for m in trl_modes}
        for r in range(args.rounds):
            rows = run_ours(args, model_dir, tmp / f"ours{r}", steps)
            ours_rows += rows[args.warmup:]
            for m in trl_modes:
                out = run_trl(args, model_dir, tmp / f"trl{r}{int(m)}", steps, m)
                trl_runs[m].append({k: v[args.warmup:] if k != "log" else v for k, v in out.items()})
            pairs = {"ours": [(x["time/step"], x["cpu/step"]) for x in rows[args.warmup:]]}
            pairs |= {names[m]: list(zip(trl_runs[m][-1]["times"], trl_runs[m][-1]["cpu"], strict=True))
                      for m in trl_modes}
            print(f"round {r + 1}/{args.rounds}, timed steps (wall s, CPU s): " + "; ".join(
                f"{k} " + " ".join(f"{a:.2f},{b:.2f}" for a, b in v) for k, v in pairs.items()), flush=True)
        lengths = {round(x["completion_length/mean"], 2) for x in ours_rows}
        t = {"r1": median([x["time/step"] for x in ours_rows])}
        cpu = {"r1": median([x["cpu/step"] for x in ours_rows])}
        detail = {"r1": {"rollout": median([x["time/rollout"] for x in ours_rows]),
                         "reward": median([x["time/reward"] for x in ours_rows]),
                         "update": median([x["time/update"] for x in ours_rows])}}
        for m in trl_modes:
            runs, k = trl_runs[m], names[m]
            t[k] = median([x for run in runs for x in run["times"]])
            cpu[k] = median([x for run in runs for x in run["cpu"]])
            gen = median([x for run in runs for x in run["generate"]])
            rew = median([x for run in runs for x in run["reward"]])
            roll = median([x for run in runs for x in run["rollout"]])
            # update = step - (generation + rewards + TRL's other rollout-side work, ~1%)
            detail[k] = {"rollout": gen, "reward": rew, "update": t[k] - roll}
            key = "completions/mean_length"
            lengths |= {round(e[key], 2) for run in runs for e in run["log"] if key in e}

        mem: dict[str, int] = {}
        if not args.no_memory:
            mem["r1"] = peak_bytes(lambda: run_ours(args, model_dir, tmp / "ours_mem", 2)) + \
                decode_worker_bytes(args, model_dir)
            for m in trl_modes:
                mem[names[m]] = peak_bytes(lambda m=m: run_trl(args, model_dir, tmp / f"trl_mem{int(m)}", 2, m))

    print()
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    unreliable = load > cores and args.threads > 1
    if load > cores:
        print(f"warning: load average {load:.1f} on {cores} cores: other processes share the CPU"
              + (f"; with {args.threads} threads each op waits on descheduled OpenMP threads, so these times are"
                 " not meaningful: use --threads 1" if args.threads > 1 else ""))
    print(f"one GRPO step: smoke V3 ({n_params / 1e6:.2f}M params, fp32), {args.prompts} prompts x G={args.group_size}"
          f" = {B} completions of exactly {args.max_tokens} tokens (mean lengths seen: {sorted(lengths)}), "
          f"micro-batch {args.micro_batch}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl.__version__}")
    print(f"same model: max |log-prob r1 - transformers| on prompts = {gap:.2e}; medians of "
          f"{args.rounds} x {args.steps} timed steps per side (after {args.warmup} warm-up step per run)")
    print(f"{'':10}{'ms/step':>9}{'rollout':>9}{'reward':>8}{'update':>8}{'CPU ms':>8}{'peak MiB':>10}"
          f"{'r1/x time':>11}{'r1/x CPU':>10}{'r1/x mem':>10}")
    nan = float("nan")
    for k in t:
        d = detail[k]
        print(f"{k:10}{t[k] * 1e3:9.0f}{d['rollout'] * 1e3:9.0f}{d['reward'] * 1e3:8.0f}{d['update'] * 1e3:8.0f}"
              f"{cpu[k] * 1e3:8.0f}{mem.get(k, nan) / 2**20:10.1f}{t['r1'] / t[k]:11.2f}{cpu['r1'] / cpu[k]:10.2f}"
              f"{mem['r1'] / mem[k] if k in mem else nan:10.2f}")
    print("(ms/step and its parts: wall clock; CPU ms: CPU seconds per step of the process (ours: with its decode"
          " worker), which other processes do not inflate when --threads 1)")
    for m in trl_modes:
        k = names[m]
        mr = mem["r1"] / mem[k] if k in mem else nan
        verdict = lambda ok: "meets" if ok else "misses"  # noqa: E731
        print(f"r1 vs {k}: time ratio {t['r1'] / t[k]:.2f} wall, {cpu['r1'] / cpu[k]:.2f} CPU "
              f"({verdict(max(t['r1'] / t[k], cpu['r1'] / cpu[k]) <= 0.5)} <= 0.5); peak memory ratio {mr:.2f} "
              f"({verdict(mr <= 1)} <= 1)" + ("; times unreliable, see the warning" if unreliable else ""))
    print(json.dumps({"bench": "grpo_step", "prompts": args.prompts, "group_size": args.group_size,
                      "max_tokens": args.max_tokens, "micro_batch": args.micro_batch, "threads": args.threads,
                      "trl": trl.__version__, "logprob_gap": gap,
                      "results": {k: {"ms": t[k] * 1e3, "cpu_ms": cpu[k] * 1e3,
                                      **{f"{p}_ms": v * 1e3 for p, v in detail[k].items()},
                                      "peak_mib": mem[k] / 2**20 if k in mem else None} for k in t}}))


if __name__ == "__main__":
    main()
