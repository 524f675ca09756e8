"""The GRPO loop, one readable function: prompts -> G rollouts each -> rewards -> dynamic-sampling
filter -> advantages -> mu updates with gradient accumulation -> bias update -> weight sync.

Simplifications (named, as nanochat does): single process (accelerate launch is not wired yet);
the torch engine shares the policy object on CPU, so weight sync is a no-op there and a bucketed
`load_weights` for a separate engine; the reference model is a frozen copy, built only when beta > 0.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from r1 import checkpoint, grpo
from r1.config import save_config
from r1.data import load_rows, render, smoke_splits
from r1.logprobs import token_logprobs
from r1.model.hc import hc_metrics
from r1.model.model import V3ForCausalLM, expert_load_metrics, update_router_biases


@dataclass
class TrainConfig:
    model: str = "runs/smoke/sft"  # a model directory (native V3 or any transformers causal LM)
    tokenizer: str | None = None  # default: the model directory; "char" = the project's tokenizer
    dataset: str = "smoke"  # "smoke" (synthetic arithmetic) or a local file / hub dataset
    split: str = "train"
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    template: str = "smoke"
    rewards: list[str] = field(default_factory=lambda: ["math"])
    reward_weights: list[float] | None = None  # None = 1.0 each
    on_reward_error: str = "zero"
    engine: str = "torch"
    steps: int = 40
    prompts_per_step: int = 16
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 48
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    beta: float = 0.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    ratio: str = "token"  # token | sequence (GSPO)
    aggregation: str = "dapo"  # grpo | dapo | dr_grpo
    advantage_scale: str = "group"  # group | none (Dr. GRPO) | batch
    mu: int = 1  # inner updates per rollout batch
    micro_batch: int = 32
    dynamic_sampling: bool = True
    max_refills: int = 2
    ref_reset_every: int = 0  # 0 = never
    tis_cap: float = 2.0  # truncated importance sampling against the engine's log-probs (0 = off)
    bias_update: bool = True  # auxiliary-loss-free balancing during RL
    seed: int = 0
    output_dir: str = "runs/smoke/grpo"
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    resume: str = "none"  # none | auto | a checkpoint directory
    progress: bool = True


# ---------------------------------------------------------------------------------------------- helpers
def load_policy(path: str) -> nn.Module:
    p = Path(path)
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"model {path!r} not found (expected a directory with config.json)")
    if json.loads((p / "config.json").read_text()).get("model_type") == "deepseek_v3":
        from r1.model.hf import load_hf

        return load_hf(p)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(p, torch_dtype=torch.float32)


def hidden_and_head(model: nn.Module, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Final hidden states and the output-head weight, for chunked log-probs (native or transformers)."""
    if isinstance(model, V3ForCausalLM):
        return model(ids, attention_mask=mask, mtp=False).hidden, model.lm_head.weight
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1], model.get_output_embeddings().weight


def sequence_logprobs(model: nn.Module, ids: Tensor, mask: Tensor, prompt_len: int, temperature: float,
                      with_entropy: bool = False) -> tuple[Tensor, Tensor]:
    """log pi(completion token t) for the completion part of right-padded `ids` [B, P + C]."""
    h, w = hidden_and_head(model, ids, mask)
    return token_logprobs(h[:, prompt_len - 1:-1], w, ids[:, prompt_len:], temperature=temperature,
                          with_entropy=with_entropy)


def encode_prompts(tok: Any, texts: list[str]) -> list[list[int]]:
    out = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None:
            ids = [tok.bos_token_id] + ids
        out.append(ids)
    return out


def pack(prompts: list[list[int]], completions: list[list[int]], logps: list[list[float]],
         pad: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Left-pad prompts to P and right-pad completions to C: ids, attention mask, completion mask,
    engine log-probs. Left padding keeps every completion starting at column P."""
    P, C = max(map(len, prompts)), max(1, max(map(len, completions)))
    B = len(prompts)
    ids = torch.full((B, P + C), pad, dtype=torch.long)
    attn = torch.zeros(B, P + C, dtype=torch.long)
    cmask = torch.zeros(B, C)
    elogp = torch.zeros(B, C)
    for i, (p, c, lp) in enumerate(zip(prompts, completions, logps, strict=True)):
        ids[i, P - len(p):P] = torch.tensor(p)
        ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
        attn[i, P - len(p):P + len(c)] = 1
        cmask[i, :len(c)] = 1
        elogp[i, :len(lp)] = torch.tensor(lp)
    return ids, attn, cmask, elogp, P


class JsonlLogger:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a")  # noqa: SIM115 - kept open for the run

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()}
        self.f.write(json.dumps({"step": step, **clean}) + "\n")
        self.f.flush()


def check(cfg: TrainConfig) -> None:
    """Choices named in the recipe exist, before anything loads: one line naming the bad value."""
    from rollouts import ENGINES

    registries = {"ratio": grpo.RATIOS, "aggregation": grpo.AGGREGATIONS, "advantage_scale": grpo.ADVANTAGE_SCALES,
                  "engine": ENGINES}
    for name, known in registries.items():
        if getattr(cfg, name) not in known:
            raise ValueError(f"unknown {name} {getattr(cfg, name)!r}; known: {', '.join(known)}")
    render(cfg.template, "")
    if cfg.reward_weights is not None and len(cfg.rewards) != len(cfg.reward_weights):
        raise ValueError(f"{len(cfg.rewards)} rewards but {len(cfg.reward_weights)} reward_weights")
    if cfg.group_size < 2:
        raise ValueError("group_size must be at least 2 (advantages compare samples within a group)")
    if cfg.resume not in ("none", "auto") and not Path(cfg.resume).is_dir():
        raise FileNotFoundError(f"resume checkpoint {cfg.resume!r} not found")


# ---------------------------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig) -> dict[str, float]:
    from r1.tokenizer import load_tokenizer
    from rewards.combine import RewardSet
    from rollouts import SamplingParams, make_engine

    check(cfg)
    weights = cfg.reward_weights or [1.0] * len(cfg.rewards)
    reward_set = RewardSet(list(zip(cfg.rewards, weights, strict=True)), on_error=cfg.on_reward_error)
    rows = smoke_splits(seed=cfg.seed)[0] if cfg.dataset == "smoke" else \
        load_rows(cfg.dataset, cfg.split, (cfg.prompt_key, cfg.answer_key))
    policy = load_policy(cfg.model).train()
    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    # ---- everything above validates input; compute starts here
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, str(out_dir / "config.yaml"))
    engine = make_engine(cfg.engine, model=policy, tokenizer=tok)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    ref = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.beta > 0 else None
    sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens)
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    start, cursor = 0, 0
    ckpt_dir = out_dir / "checkpoints"
    resume_from = checkpoint.latest(ckpt_dir) if cfg.resume == "auto" else \
        None if cfg.resume == "none" else Path(cfg.resume)
    if resume_from is not None:
        state = checkpoint.load(resume_from)
        policy.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, cursor = state["step"], state["cursor"]
        if ref is not None:
            ref.load_state_dict(state["ref"])
    logger = JsonlLogger(out_dir / "metrics.jsonl")
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not cfg.progress, desc="grpo")
    G = cfg.group_size
    last: dict[str, float] = {}
    for step in bar:
        t0 = time.perf_counter()
        # ---- rollouts (+ dynamic sampling: drop groups whose rewards are all equal, refill)
        kept_rows: list[dict] = []
        kept: list[tuple[list[int], Any]] = []
        kept_rewards: list[float] = []
        n_gen = n_groups = 0
        t_roll = t_rew = 0.0
        all_rewards: list[float] = []
        for attempt in range(1 + (cfg.max_refills if cfg.dynamic_sampling else 0)):
            need = cfg.prompts_per_step - len(kept_rows)
            if need <= 0:
                break
            batch = [rows[order[(cursor + i) % len(order)]] for i in range(need)]
            cursor += need
            prompts = encode_prompts(tok, [render(cfg.template, r[cfg.prompt_key]) for r in batch])
            ta = time.perf_counter()
            rolls = engine.generate(prompts, sampling, n=G)
            tb = time.perf_counter()
            expanded = [batch[r.prompt_index] for r in rolls]
            cols = [{**r, "answer": r[cfg.answer_key]} for r in expanded]
            rewards, per_reward = reward_set([r.text for r in rolls], cols)
            t_roll += tb - ta
            t_rew += time.perf_counter() - tb
            all_rewards += rewards
            n_gen += len(rolls)
            r_NG = torch.tensor(rewards).view(-1, G)
            keep = grpo.groups_with_signal(r_NG.flatten(), G) if cfg.dynamic_sampling else torch.ones(len(batch), bool)
            n_groups += len(batch)
            for g in keep.nonzero().flatten().tolist():
                kept_rows.append(batch[g])
                for j in range(g * G, (g + 1) * G):
                    kept.append((prompts[g], rolls[j]))
                    kept_rewards.append(rewards[j])
            if attempt == 0:
                last_metrics = reward_set.metrics()
                correct = per_reward[cfg.rewards[0]]
        metrics: dict[str, float] = dict(last_metrics)
        metrics["accuracy"] = sum((c or 0.0) >= 1.0 for c in correct) / len(correct)
        metrics["frac_reward_zero_std"] = 1 - len(kept_rows) / max(1, n_groups)
        t1 = time.perf_counter()
        if kept:
            # ---- advantages and the update
            adv = grpo.group_advantages(torch.tensor(kept_rewards), G, scale=cfg.advantage_scale)
            ids, attn, cmask, elogp, P = pack([p for p, _ in kept], [r.token_ids for _, r in kept],
                                              [r.logprobs for _, r in kept], tok.pad_token_id or 0)
            B, n_tok = ids.shape[0], cmask.sum()
            with torch.no_grad():
                old = torch.cat([sequence_logprobs(policy, ids[s:s + cfg.micro_batch], attn[s:s + cfg.micro_batch],
                                                   P, cfg.temperature)[0] for s in range(0, B, cfg.micro_batch)]) \
                    if cfg.mu > 1 else None
                ref_lp = torch.cat([sequence_logprobs(ref, ids[s:s + cfg.micro_batch], attn[s:s + cfg.micro_batch],
                                                      P, cfg.temperature)[0] for s in range(0, B, cfg.micro_batch)]) \
                    if ref is not None else None
            sums: dict[str, float] = {}
            for _ in range(cfg.mu):
                opt.zero_grad(set_to_none=True)
                for s in range(0, B, cfg.micro_batch):
                    sl = slice(s, s + cfg.micro_batch)
                    lp, ent = sequence_logprobs(policy, ids[sl], attn[sl], P, cfg.temperature, with_entropy=True)
                    loss, m = grpo.policy_loss(
                        lp, lp.detach() if old is None else old[sl], adv[sl], cmask[sl],
                        ref_logp_BT=None if ref_lp is None else ref_lp[sl], beta=cfg.beta, eps_low=cfg.eps_low,
                        eps_high=cfg.eps_high, ratio=cfg.ratio, aggregation=cfg.aggregation,
                        engine_logp_BT=elogp[sl] if cfg.tis_cap > 0 else None, tis_cap=cfg.tis_cap,
                        max_completion_len=cfg.max_tokens, num_sequences=B, num_tokens=n_tok)
                    loss.backward()
                    w = cmask[sl].sum().item() / n_tok.item()
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + float(v) * w
                    sums["entropy"] = sums.get("entropy", 0.0) + (ent * cmask[sl]).sum().item() / n_tok.item()
                    gap = ((lp.detach() - elogp[sl]).abs() * cmask[sl]).sum().item() / n_tok.item()
                    sums["logprob_gap/engine_vs_trainer"] = sums.get("logprob_gap/engine_vs_trainer", 0.0) + gap
                metrics["grad_norm"] = float(nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm))
                opt.step()
                sched.step()
            metrics.update({k: v / cfg.mu for k, v in sums.items()})
            metrics.update(expert_load_metrics(policy))
            metrics.update(hc_metrics(policy))
            if cfg.bias_update:
                update_router_biases(policy)
            else:
                for m_ in policy.modules():
                    if hasattr(m_, "tokens_per_expert"):
                        m_.tokens_per_expert.zero_()
            engine.load_weights(policy_weights(policy, engine))  # no-op when the engine shares the policy
            if ref is not None and cfg.ref_reset_every and (step + 1) % cfg.ref_reset_every == 0:
                ref.load_state_dict(policy.state_dict())
        t2 = time.perf_counter()
        lengths = [len(r.token_ids) for _, r in kept] or [0]
        metrics.update({
            "completion_length/mean": sum(lengths) / len(lengths), "completion_length/max": max(lengths),
            "rollouts": n_gen, "time/rollout": t_roll, "time/reward": t_rew, "time/update": t2 - t1,
            "tokens_per_s/rollout": sum(lengths) / max(t_roll, 1e-9), "time/step": t2 - t0,
            "lr": sched.get_last_lr()[0],
        })
        logger.log(step + 1, metrics)
        last = metrics
        bar.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics['accuracy']:.2f}",
                        tok_s=f"{metrics['tokens_per_s/rollout']:.0f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            state = {"model": policy.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "cursor": cursor}
            if ref is not None:
                state["ref"] = ref.state_dict()
            checkpoint.save(ckpt_dir, step + 1, state, keep=cfg.keep_last)
    export(policy, tok, out_dir / "model")
    return last


def policy_weights(policy: nn.Module, engine: Any) -> list[tuple[str, Tensor]]:
    """HF-named tensors for a separate engine; nothing when the engine holds the policy itself."""
    if getattr(engine, "model", None) is policy:
        return []
    if isinstance(policy, V3ForCausalLM):
        from r1.model.hf import hf_state_dict

        return list(hf_state_dict(policy))
    return list(policy.state_dict().items())


def export(model: nn.Module, tok: Any, directory: Path) -> None:
    """A HF-format model directory (+ tokenizer) that transformers and vLLM load."""
    if isinstance(model, V3ForCausalLM):
        from r1.model.hf import save_hf

        save_hf(model, directory)
    else:
        model.save_pretrained(directory)
    tok.save_pretrained(str(directory))
