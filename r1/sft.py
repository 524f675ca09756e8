"""Supervised fine-tuning: the cold start before RL, and rejection-sampling SFT.

Prompt tokens are masked from the loss; the MTP loss (weight mtp_loss_weight) and the MoE balance
loss are added for the native model; the router biases move after every optimizer step.
Rejection sampling: `rejection_sample` keeps a model's correct rollouts as new SFT rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from r1.config import save_config
from r1.cpu import accelerate
from r1.data import encode_prompts, load_rows, render, smoke_splits
from r1.logprobs import lm_loss
from r1.model.model import V3ForCausalLM, update_router_biases
from r1.optim import OPTIMIZERS
from r1.policy import build_model, export


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
    batch_size: int = 32
    lr: float = 3e-3
    optim: str = "adamw_torch_fused"  # adamw_torch_fused | adamw_bf16 (AdamW moments in bf16, r1/optim.py)
    weight_decay: float = 0.0
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    max_rows: int = 0  # use only the first N rows (0 = all); a weak cold start leaves room for RL
    seed: int = 0
    output_dir: str = "runs/smoke/sft"
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


def sft(cfg: SftConfig) -> dict[str, float]:
    from r1.tokenizer import load_tokenizer

    if cfg.optim not in OPTIMIZERS:
        raise ValueError(f"unknown optim {cfg.optim!r}; known: {', '.join(OPTIMIZERS)}")
    render(cfg.template, "")  # an unknown template: one line now, not after the model has loaded
    rows = smoke_splits(seed=cfg.seed)[0] if cfg.dataset == "smoke" else \
        load_rows(cfg.dataset, cfg.split, (cfg.prompt_key, cfg.completion_key), cfg.dataset_config)
    if cfg.max_rows:
        rows = rows[:cfg.max_rows]
    tok = load_tokenizer(cfg.tokenizer if cfg.tokenizer else cfg.model)
    torch.manual_seed(cfg.seed)
    model = accelerate(build_model(cfg.model)).train()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, str(out_dir / "config.yaml"))
    opt = OPTIMIZERS[cfg.optim](model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / max(1, cfg.warmup_steps), max(0.1, 1 - s / cfg.steps)))
    rng = random.Random(cfg.seed)
    mtp_w = getattr(getattr(model, "config", None), "mtp_loss_weight", 0.0)
    metrics: dict[str, float] = {}
    bar = tqdm(range(cfg.steps), disable=not cfg.progress, desc="sft")
    for _ in bar:
        batch = rng.sample(rows, min(cfg.batch_size, len(rows)))
        ids, attn, lmask = encode_pairs(tok, [render(cfg.template, r[cfg.prompt_key]) for r in batch],
                                        [r[cfg.completion_key] for r in batch])
        if isinstance(model, V3ForCausalLM):
            loss, metrics = lm_loss(model(ids, attention_mask=attn), model.lm_head.weight, ids, lmask, mtp_weight=mtp_w)
        else:
            labels = ids.masked_fill(lmask == 0, -100)
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            metrics = {"loss/ce": loss.item()}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        update_router_biases(model)
        bar.set_postfix(loss=f"{metrics['loss/ce']:.3f}")
    export(model, tok, out_dir / "model")
    return metrics


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
