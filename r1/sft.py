"""Supervised fine-tuning: the cold start before RL, and rejection-sampling SFT.

Prompt tokens are masked from the loss; the MTP loss (weight mtp_loss_weight) and the MoE balance
loss are added for the native model; the router biases move after every optimizer step.
Rejection sampling: `rejection_sample` keeps a model's correct rollouts as new SFT rows.
"""

from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from r1 import checkpoint
from r1.compute import compute_context
from r1.config import save_config
from r1.cpu import accelerate
from r1.data import encode_prompts, load_rows, render, smoke_splits
from r1.logprobs import lm_loss
from r1.model.model import V3ForCausalLM, update_router_biases
from r1.optim import OPTIMIZERS
from r1.parallel import Dist
from r1.policy import build_model, export
from r1.runs import JsonlLogger, check_compute, prepare_model


@dataclass
class SftConfig:
    model: str = "smoke"  # a preset name (fresh weights) or a model directory
    tokenizer: str | None = "char"
    dataset: str = "smoke"
    dataset_config: str | None = None
    split: str = "train"
    prompt_key: str = "prompt"
    completion_key: str = "solution"
    template: str = "smoke"
    steps: int = 300
    batch_size: int = 32  # rows per optimizer step over all processes, each process taking its share
    lr: float = 3e-3
    optim: str = "adamw_torch_fused"  # adamw_torch_fused | adamw_bf16 (AdamW moments in bf16, r1/optim.py)
    weight_decay: float = 0.0
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    max_rows: int = 0  # use only the first N rows (0 = all); a weak cold start leaves room for RL
    precision: str = "fp32"  # fp32 | bf16 | fp8 (r1/compute.py)
    fp8_block: int = 128  # FP8 tile edge (DeepSeek-V3: 128; a small model needs one its shapes divide)
    gradient_checkpointing: str = "none"  # none | full | moe
    expert_parallel: int = 1  # routed experts split over this many ranks (all-to-all dispatch; r1/expert_parallel.py)
    seed: int = 0
    output_dir: str = "runs/smoke/sft"
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    resume: str = "none"  # none | auto | a checkpoint directory
    progress: bool = True


def encode_pairs(tok: Any, prompts: list[str], completions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
    """bos + prompt + completion + eos, right-padded: ids, attention mask, loss mask (completion + eos)."""
    seqs, masks = [], []
    for p, c in zip(prompts, completions, strict=True):
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        pi = bos + tok(p, add_special_tokens=False)["input_ids"]
        ci = tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(pi + ci)
        masks.append([0] * len(pi) + [1] * len(ci))
    T = max(map(len, seqs))
    pad = tok.pad_token_id or 0
    ids = torch.tensor([s + [pad] * (T - len(s)) for s in seqs])
    attn = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    loss_mask = torch.tensor([m + [0] * (T - len(m)) for m in masks])
    return ids, attn, loss_mask


def check(cfg: SftConfig, world: int) -> None:
    """The recipe's choices, one line each, before anything loads."""
    if cfg.optim not in OPTIMIZERS:
        raise ValueError(f"unknown optim {cfg.optim!r}; known: {', '.join(OPTIMIZERS)}")
    render(cfg.template, "")  # an unknown template: one line now, not after the model has loaded
    check_compute(cfg.model, cfg.precision, cfg.fp8_block, cfg.gradient_checkpointing, cfg.expert_parallel)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    if cfg.resume not in ("none", "auto") and not Path(cfg.resume).is_dir():
        raise FileNotFoundError(f"resume checkpoint {cfg.resume!r} not found")


def batch_loss(model: nn.Module, ids: Tensor, attn: Tensor, lmask: Tensor, mtp_w: float) -> tuple[Tensor, dict]:
    """The masked next-token loss (+ MTP and balance losses for the native model) and its metrics."""
    if isinstance(model, V3ForCausalLM):
        return lm_loss(model(ids, attention_mask=attn), model.lm_head.weight, ids, lmask, mtp_weight=mtp_w)
    loss = model(input_ids=ids, attention_mask=attn, labels=ids.masked_fill(lmask == 0, -100)).loss
    return loss, {"loss/ce": loss.item()}


def sft(cfg: SftConfig) -> dict[str, float]:
    """SFT on the machinery GRPO uses (r1.runs): one process or `accelerate launch` (data parallel or FSDP2),
    precision and activation checkpointing, checkpoints that resume bit for bit, metrics.jsonl."""
    from r1.tokenizer import load_tokenizer

    dist = Dist(cfg.expert_parallel)
    check(cfg, dist.world)
    rows = smoke_splits(seed=cfg.seed)[0] if cfg.dataset == "smoke" else \
        load_rows(cfg.dataset, cfg.split, (cfg.prompt_key, cfg.completion_key), cfg.dataset_config)
    if cfg.max_rows:
        rows = rows[:cfg.max_rows]
    tok = load_tokenizer(cfg.tokenizer if cfg.tokenizer else cfg.model)
    out_dir = Path(cfg.output_dir)
    resume_from = checkpoint.latest(out_dir / "checkpoints") if cfg.resume == "auto" else \
        None if cfg.resume == "none" else Path(cfg.resume)
    state = checkpoint.read_extra(resume_from) if resume_from is not None else None  # a corrupt file fails here
    torch.manual_seed(cfg.seed)  # the same fresh weights on every rank
    model = build_model(cfg.model, dist.device, functools.partial(
        prepare_model, dist=dist, precision=cfg.precision, fp8_block=cfg.fp8_block,
        gradient_checkpointing=cfg.gradient_checkpointing, speed_layer=accelerate))
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, str(out_dir / "config.yaml"))
    opt = OPTIMIZERS[cfg.optim](model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / max(1, cfg.warmup_steps), max(0.1, 1 - s / cfg.steps)))
    rng = random.Random(cfg.seed)  # the global batch, drawn alike on every rank; each takes its slice
    start = 0
    if state is not None:
        state = checkpoint.load(resume_from, model, opt, dist)  # reshards: any world size loads
        sched.load_state_dict(state["scheduler"])
        rng.setstate(state["sampler"])
        start = state["step"]
    logger = JsonlLogger(out_dir / "metrics.jsonl", resume_step=start) if dist.main else None
    mtp_w = getattr(getattr(model, "config", None), "mtp_loss_weight", 0.0)
    per_rank = cfg.batch_size // dist.world
    metrics: dict[str, float] = {}
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not (cfg.progress and dist.main),
               desc="sft")
    for step in bar:
        t0 = time.perf_counter()
        batch = rng.sample(rows, min(cfg.batch_size, len(rows)))[dist.rank * per_rank:(dist.rank + 1) * per_rank]
        ids, attn, lmask = (t.to(dist.device) for t in encode_pairs(
            tok, [render(cfg.template, r[cfg.prompt_key]) for r in batch], [r[cfg.completion_key] for r in batch]))
        opt.zero_grad(set_to_none=True)
        with compute_context(cfg.precision, dist.device, dist.fsdp):  # thread-local: backward inside it too
            loss, metrics = batch_loss(model, ids, attn, lmask, mtp_w)
            loss.backward()
        dist.average_grads(model)
        metrics["grad_norm"] = float(dist.clip_grad_norm(model, cfg.max_grad_norm))  # (FSDP2: by shard)
        opt.step()
        sched.step()
        update_router_biases(model)  # counts all-reduced across ranks inside
        metrics = dist.mean_metrics({**metrics, "lr": sched.get_last_lr()[0], "time/step": time.perf_counter() - t0,
                                     "tokens": float(lmask.sum())})
        if logger is not None:
            logger.log(step + 1, metrics)
        bar.set_postfix(loss=f"{metrics['loss/ce']:.3f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save(model, opt, sched, rng, step + 1, dist, out_dir, cfg.keep_last)
    if dist.world > 1 and not dist.same_parameters(model):
        raise RuntimeError("parameters differ across ranks after SFT (a non-deterministic collective?)")
    export(model, tok, out_dir / "model", dist=dist)  # every rank: gathered parameter by parameter
    return metrics


def save(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, rng: random.Random, step: int, dist: Dist,
         out_dir: Path, keep: int) -> None:
    """Model and optimizer (each rank its own shards under FSDP2), scheduler, the batch sampler's state, every
    rank's RNG and the step: a collective."""
    checkpoint.save(out_dir / "checkpoints", step, model, opt, {"scheduler": sched.state_dict(),
                                                                 "sampler": rng.getstate()}, dist, keep=keep)


def rejection_sample(engine: Any, tok: Any, rows: list[dict], template: str, sampling: Any, n: int,
                     reward_fn: Any, prompt_key: str = "prompt", answer_key: str = "answer") -> list[dict]:
    """Rejection-sampling SFT data: n rollouts per row, keep those the reward scores 1 (one per row)."""
    prompts = encode_prompts(tok, [render(template, r[prompt_key]) for r in rows])
    rolls = engine.generate(prompts, sampling, n=n)
    scores = reward_fn([r.text for r in rolls], answer=[rows[r.prompt_index][answer_key] for r in rolls])
    best: dict[int, dict] = {}
    for r, s in zip(rolls, scores, strict=True):
        if s >= 1.0 and r.prompt_index not in best:
            best[r.prompt_index] = {**rows[r.prompt_index], "solution": r.text}
    return list(best.values())
