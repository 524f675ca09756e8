"""The GRPO loop, one readable function: prompts -> G rollouts each -> rewards -> dynamic-sampling
filter -> advantages -> mu updates with gradient accumulation -> bias update -> weight sync.

Simplifications (named, as nanochat does): data parallelism is a flat gradient all-reduce per optimizer step
(see Dist; `accelerate launch` starts the processes), not DDP or FSDP sharding; the torch engine shares the policy
object, so weight sync is a no-op there and a bucketed `load_weights` for a separate engine; the reference model
is a frozen copy, built only when beta > 0; every rank keeps a full copy of the weights and optimizer state.
For the native model the update runs each micro-batch's distinct prompts once and attends the G completions to
them (`shared_prefix`, `sequence_logprobs`): the same numbers as G whole sequences, fewer FLOPs.
"""

from __future__ import annotations

import copy
import functools
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
from r1.cpu import accelerate, accelerate_engine, micro_batches, update_workers
from r1.data import load_rows, render, smoke_rl_rows
from r1.logprobs import token_logprobs
from r1.model.hc import hc_metrics
from r1.model.model import SharedPrefix, V3ForCausalLM, expert_load_metrics, update_router_biases
from r1.parallel import Dist


@dataclass
class TrainConfig:
    model: str = "runs/smoke/sft"  # a model directory (native V3 or any transformers causal LM)
    tokenizer: str | None = None  # default: the model directory; "char" = the project's tokenizer
    dataset: str = "smoke"  # "smoke" (synthetic arithmetic) or a local file / hub dataset
    dataset_config: str | None = None  # a hub dataset's config name (e.g. "sanitized" for mbpp)
    split: str = "train"
    prompt_key: str = "prompt"
    answer_key: str | None = "answer"  # passed to rewards as `answer`; None for rewards that read other columns
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
    update_workers: int = 0  # micro-batches run side by side on CPU (0 = auto: 2 with >= 2 threads; see r1.parallel)
    shared_prefix: bool = True  # native model: a micro-batch's distinct prompts run once each (not under FSDP)
    dynamic_sampling: bool = True
    max_refills: int = 2  # dynamic sampling's budget, drawn up front in one generate call (grpo.refill_prompts)
    ref_reset_every: int = 0  # 0 = never
    tis_cap: float = 2.0  # truncated importance sampling against the engine's log-probs (0 = off)
    bias_update: bool = True  # auxiliary-loss-free balancing during RL
    seed: int = 0
    output_dir: str = "runs/smoke/grpo"
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    resume: str = "none"  # none | auto | a checkpoint directory
    progress: bool = True
    report_to: list[str] = field(default_factory=list)  # accelerate trackers: tensorboard, wandb, ...


# ---------------------------------------------------------------------------------------------- helpers
def resolve_model(name_or_path: str) -> Path:
    """A local model directory, or a hub repo id (owner/name) fetched to the local cache."""
    p = Path(name_or_path)
    if (p / "config.json").is_file():
        return p
    if p.exists() or name_or_path.count("/") != 1 or name_or_path.startswith((".", "/")):
        raise FileNotFoundError(f"model {name_or_path!r} not found (expected a directory with config.json)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # noqa: BLE001 - offline, no such repo, no access: one line either way
        raise FileNotFoundError(f"model {name_or_path!r} is not a local directory and the hub gave: "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def load_policy(name_or_path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """DeepSeek-V3 checkpoints load as the native model; any other causal LM through transformers. Either
    way its linears run their fp32 CPU GEMMs on oneDNN (r1/cpu_gemm.py; a no-op elsewhere)."""
    p = resolve_model(name_or_path)
    if json.loads((p / "config.json").read_text()).get("model_type") == "deepseek_v3":
        from r1.model.hf import load_hf

        return accelerate(load_hf(p, dtype=dtype))
    from transformers import AutoModelForCausalLM

    return accelerate(AutoModelForCausalLM.from_pretrained(p, dtype=dtype))


def hidden_and_head(model: nn.Module, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Final hidden states and the output-head weight, for chunked log-probs (native or transformers)."""
    if isinstance(model, V3ForCausalLM):
        return model(ids, attention_mask=mask, mtp=False).hidden, model.lm_head.weight
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1], model.get_output_embeddings().weight


def sequence_logprobs(model: nn.Module, ids: Tensor, mask: Tensor, prompt_len: int, temperature: float,
                      with_entropy: bool = False, share_prompts: bool = False) -> tuple[Tensor, Tensor]:
    """log pi(completion token t) for the completion part of right-padded `ids` [B, P + C]. share_prompts (native
    model): rows with the same prompt (a GRPO group) run it once (SharedPrefix), then their completions attend
    to it: the same log-probs and gradients, for (G - 1) / G fewer prompt-token FLOPs."""
    P = prompt_len
    if share_prompts and isinstance(model, V3ForCausalLM):
        uniq, rows = torch.unique(torch.cat([ids[:, :P], mask[:, :P]], dim=1), dim=0, return_inverse=True)
        if uniq.shape[0] < ids.shape[0]:
            prefix = SharedPrefix(rows)
            h_prompt = model(uniq[:, :P], attention_mask=uniq[:, P:], cache=prefix, mtp=False).hidden
            h_completion = model(ids[:, P:], attention_mask=mask, cache=prefix, mtp=False).hidden
            # the first completion token is predicted from its prompt's last position
            h = torch.cat([h_prompt[rows, -1:], h_completion[:, :-1]], dim=1)
            return token_logprobs(h, model.lm_head.weight, ids[:, P:], temperature=temperature,
                                  with_entropy=with_entropy)
    h, w = hidden_and_head(model, ids, mask)
    return token_logprobs(h[:, P - 1:-1], w, ids[:, P:], temperature=temperature, with_entropy=with_entropy)


@dataclass
class UpdateBatch:
    """One update's tensors, [B, ...] each (see pack), and the loss's global normalisers."""
    ids: Tensor
    attn: Tensor
    cmask: Tensor
    elogp: Tensor
    adv: Tensor
    old: Tensor | None  # log-probs before the update (mu > 1); None = the current ones, detached
    ref: Tensor | None  # the reference model's (beta > 0)
    prompt_len: int
    num_seq: float
    num_tok: float


def micro_batch_logprobs(cfg: TrainConfig, ids: Tensor, attn: Tensor, prompt_len: int, dist: Dist, share: bool,
                         model: nn.Module, i: int) -> tuple[None, Tensor]:
    """Micro-batch i's completion log-probs without gradients (the policy before the update, the reference)."""
    sl = slice(i * cfg.micro_batch, (i + 1) * cfg.micro_batch)
    with torch.no_grad(), dist.autocast():
        return None, sequence_logprobs(model, ids[sl], attn[sl], prompt_len, cfg.temperature, share_prompts=share)[0]


def micro_batch_loss(policy: nn.Module, cfg: TrainConfig, b: UpdateBatch, dist: Dist, share: bool,
                     i: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Micro-batch i's policy loss and metrics (run by r1.parallel.micro_batches, maybe on a worker thread)."""
    sl = slice(i * cfg.micro_batch, (i + 1) * cfg.micro_batch)
    with dist.autocast():
        lp, ent = sequence_logprobs(policy, b.ids[sl], b.attn[sl], b.prompt_len, cfg.temperature, with_entropy=True,
                                    share_prompts=share)
    cmask = b.cmask[sl]
    loss, m = grpo.policy_loss(
        lp, lp.detach() if b.old is None else b.old[sl], b.adv[sl], cmask,
        ref_logp_BT=None if b.ref is None else b.ref[sl], beta=cfg.beta, eps_low=cfg.eps_low,
        eps_high=cfg.eps_high, ratio=cfg.ratio, aggregation=cfg.aggregation,
        engine_logp_BT=b.elogp[sl] if cfg.tis_cap > 0 else None, tis_cap=cfg.tis_cap,
        max_completion_len=cfg.max_tokens, num_sequences=b.num_seq, num_tokens=b.num_tok)
    n = cmask.sum().clamp(min=1)
    m["entropy"] = (ent.detach() * cmask).sum() / n
    m["logprob_gap/engine_vs_trainer"] = ((lp.detach() - b.elogp[sl]).abs() * cmask).sum() / n
    return loss, m


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
    engine log-probs. Left padding keeps every completion starting at column P. Rows are built as lists, one
    tensor each at the end (per-row slice assignments cost ~7 ms for 128 rows)."""
    P, C = max(map(len, prompts)), max(1, max(map(len, completions)))
    rows = list(zip(prompts, completions, logps, strict=True))
    ids = torch.tensor([[pad] * (P - len(p)) + list(p) + list(c) + [pad] * (C - len(c)) for p, c, _ in rows],
                       dtype=torch.long)
    attn = torch.tensor([[0] * (P - len(p)) + [1] * (len(p) + len(c)) + [0] * (C - len(c)) for p, c, _ in rows],
                        dtype=torch.long)
    cmask = torch.tensor([[1.0] * len(c) + [0.0] * (C - len(c)) for _, c, _ in rows]).view(len(rows), C)
    elogp = torch.tensor([list(lp) + [0.0] * (C - len(lp)) for _, _, lp in rows]).view(len(rows), C)
    return ids, attn, cmask, elogp, P


class JsonlLogger:
    """One JSON line per step. A fresh run starts a fresh file; a resumed one keeps the lines up to its step (a run
    killed after logging but before checkpointing would otherwise leave those steps in the file twice)."""

    def __init__(self, path: Path, resume_step: int = 0):
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step] \
            if resume_step and path.exists() else []
        self.f = open(path, "w")  # noqa: SIM115 - kept open for the run
        self.f.write("".join(line + "\n" for line in kept))

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
    from accelerate.utils import LoggerType

    if unknown := [t for t in cfg.report_to if t not in {x.value for x in LoggerType}]:
        raise ValueError(f"unknown tracker {unknown[0]!r}; known: {', '.join(x.value for x in LoggerType)}")
    if cfg.resume not in ("none", "auto") and not Path(cfg.resume).is_dir():
        raise FileNotFoundError(f"resume checkpoint {cfg.resume!r} not found")


# ---------------------------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig) -> dict[str, float]:
    from r1.tokenizer import load_tokenizer
    from rewards.combine import RewardSet
    from rollouts import SamplingParams, make_engine

    check(cfg)
    dist = Dist()
    if cfg.prompts_per_step % dist.world:
        raise ValueError(f"prompts_per_step {cfg.prompts_per_step} is not divisible by {dist.world} processes")
    weights = cfg.reward_weights or [1.0] * len(cfg.rewards)
    reward_set = RewardSet(list(zip(cfg.rewards, weights, strict=True)), on_error=cfg.on_reward_error)
    rows = smoke_rl_rows(seed=cfg.seed) if cfg.dataset == "smoke" else \
        load_rows(cfg.dataset, cfg.split, (cfg.prompt_key, cfg.answer_key or cfg.prompt_key), cfg.dataset_config)
    policy = load_policy(cfg.model).to(dist.device).train()
    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    # ---- everything above validates input; compute starts here
    torch.manual_seed(cfg.seed + dist.rank)  # ranks sample different rollouts from the same weights
    random.seed(cfg.seed + dist.rank)
    out_dir = Path(cfg.output_dir)
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, str(out_dir / "config.yaml"))
    ref = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.beta > 0 else None  # full copy, not sharded
    # under FSDP the torch engine decodes with its own unsharded replica: ranks stop decoding at different steps, and
    # a sharded model would need every rank in every forward; the replica is refreshed after each update
    replica = copy.deepcopy(policy).eval().requires_grad_(False) if dist.fsdp else None
    policy = dist.wrap(policy)  # FSDP2 shards in place when launched so; before the optimizer sees the parameters
    engine = accelerate_engine(make_engine(cfg.engine, model=policy if replica is None else replica, tokenizer=tok))
    # fused: one kernel for all parameters (on CPU 0.5 ms a step for the smoke model, against 2.4 ms for the loop)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99),
                            fused=True)
    params = [p for p in policy.parameters() if p.requires_grad]
    workers = update_workers(cfg.update_workers, dist.device, dist.fsdp)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens)
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)  # the same order on every rank; each reads its own slice
    start, cursor = 0, 0
    keep_rate: float | None = None  # dynamic sampling: the fraction of groups with signal in the last step
    ckpt_dir = out_dir / "checkpoints"
    resume_from = checkpoint.latest(ckpt_dir) if cfg.resume == "auto" else \
        None if cfg.resume == "none" else Path(cfg.resume)
    if resume_from is not None:
        state = checkpoint.load(resume_from)
        dist.load_state(policy, opt, state["model"], state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, cursor, keep_rate = state["step"], state["cursor"], state.get("keep_rate")
        checkpoint.set_rng_state(state["rng_ranks"][dist.rank])
        if ref is not None:
            ref.load_state_dict(state["ref"])
    logger = JsonlLogger(out_dir / "metrics.jsonl", resume_step=start) if dist.main else None
    tracker = None
    if cfg.report_to:  # TensorBoard / W&B through accelerate; the JSONL file is always written
        from accelerate import Accelerator

        tracker = Accelerator(cpu=not torch.cuda.is_available(), log_with=cfg.report_to, project_dir=str(out_dir))
        tracker.init_trackers("r1", config={k: str(v) for k, v in vars(cfg).items()})
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not (cfg.progress and dist.main),
               desc="grpo")
    G, per_rank = cfg.group_size, cfg.prompts_per_step // dist.world
    last: dict[str, float] = {}
    for step in bar:
        t0 = time.perf_counter()
        # ---- rollouts (+ dynamic sampling: drop groups whose rewards are all equal). Every rank takes `draw` rows
        # from its own slot (the largest draw) of the global cursor; all make the same number of attempts.
        kept: list[tuple[list[int], Any]] = []
        kept_rewards: list[float] = []
        spare: tuple[list[int], Any] | None = None  # padding when this rank kept fewer sequences than another
        n_gen = n_groups = n_signal = 0
        t_roll = t_rew = 0.0
        # Dynamic sampling draws in one generate call as many prompts as 1 + max_refills rounds of refilling
        # would in expectation (grpo.refill_prompts), at the keep rate of the last step; only the first step, with
        # no rate known yet, refills in a second call.
        rounds = 1 + cfg.max_refills if cfg.dynamic_sampling else 1
        rate = keep_rate
        for attempt in range(1 if rate is not None or rounds == 1 else 2):
            need = per_rank - len(kept) // G
            draw = need if rate is None else grpo.refill_prompts(need, rate, rounds - attempt)
            slot = int(dist.all_reduce(torch.tensor(draw, device=dist.device), "max").item())
            if slot <= 0:
                break
            batch = [rows[order[(cursor + dist.rank * slot + i) % len(order)]] for i in range(draw)]
            cursor += slot * dist.world
            if not batch:
                continue
            prompts = encode_prompts(tok, [render(cfg.template, r[cfg.prompt_key]) for r in batch])
            ta = time.perf_counter()
            rolls = engine.generate(prompts, sampling, n=G)
            tb = time.perf_counter()
            cols = [{**r, "answer": r[cfg.answer_key]} if cfg.answer_key else r
                    for r in (batch[ro.prompt_index] for ro in rolls)]
            rewards, per_reward = reward_set([ro.text for ro in rolls], cols)
            t_roll += tb - ta
            t_rew += time.perf_counter() - tb
            n_gen += len(rolls)
            keep = grpo.groups_with_signal(torch.tensor(rewards), G) if cfg.dynamic_sampling \
                else torch.ones(len(batch), dtype=torch.bool)
            n_groups += len(batch)
            rate = float(keep.float().mean())
            n_signal += int(keep.sum())
            spare = spare or (prompts[0], rolls[0])
            for g in keep.nonzero().flatten().tolist()[:need]:  # a refill's surplus groups are dropped
                kept += [(prompts[g], rolls[j]) for j in range(g * G, (g + 1) * G)]
                kept_rewards += rewards[g * G:(g + 1) * G]
            if attempt == 0:
                metrics: dict[str, float] = dict(reward_set.metrics())
                correct = per_reward[cfg.rewards[0]]
                metrics["accuracy"] = sum((c or 0.0) >= 1.0 for c in correct) / len(correct)
        metrics["frac_reward_zero_std"] = 1 - n_signal / max(1, n_groups)
        t1 = time.perf_counter()
        # ---- advantages and the update; every rank runs the same number of micro-batches
        n_seq = len(kept)
        n_tok_local = sum(len(ro.token_ids) for _, ro in kept)
        totals = dist.all_reduce(torch.tensor([n_seq, n_tok_local], device=dist.device))  # global sequences, tokens
        most = int(dist.all_reduce(torch.tensor(n_seq, device=dist.device), "max"))  # the busiest rank's sequences
        if totals[0] > 0:
            adv = grpo.group_advantages(torch.tensor(kept_rewards), G, scale=cfg.advantage_scale) if kept \
                else torch.zeros(0)
            pad = most - n_seq  # sequences with zero mask and zero advantage: no gradient, same collectives
            seqs = kept + [spare] * pad
            ids, attn, cmask, elogp, P = pack([p for p, _ in seqs], [ro.token_ids for _, ro in seqs],
                                              [ro.logprobs for _, ro in seqs], tok.pad_token_id or 0)
            cmask[n_seq:] = 0
            adv = torch.cat([adv, torch.zeros(pad)])
            ids, attn, cmask, elogp, adv = (t.to(dist.device) for t in (ids, attn, cmask, elogp, adv))
            # global normalisers divided by world: the averaged gradient is the exact global-batch loss's gradient
            num_seq, num_tok = totals[0].item() / dist.world, totals[1].item() / dist.world
            B, mb = ids.shape[0], cfg.micro_batch
            share = cfg.shared_prefix and not dist.fsdp  # two forwards per backward: not tried under FSDP2
            n_mb = -(-B // mb)
            # the log-probs before the update (mu > 1) and the reference's, micro-batches side by side as well
            logprobs_of = functools.partial(micro_batch_logprobs, cfg, ids, attn, P, dist, share)  # (model, i)
            old = torch.cat(micro_batches(functools.partial(logprobs_of, policy), n_mb, params, workers)) \
                if cfg.mu > 1 else None
            ref_lp = torch.cat(micro_batches(functools.partial(logprobs_of, ref), n_mb, params, workers)) \
                if ref is not None else None
            batch = UpdateBatch(ids, attn, cmask, elogp, adv, old, ref_lp, P, num_seq, num_tok)
            step_fn = functools.partial(micro_batch_loss, policy, cfg, batch, dist, share)
            sums: dict[str, float] = {}
            for _ in range(cfg.mu):
                opt.zero_grad(set_to_none=True)
                for i, m in enumerate(micro_batches(step_fn, n_mb, params, workers)):
                    w = cmask[i * mb:(i + 1) * mb].sum().item() / max(1, n_tok_local)
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + float(v) * w
                dist.average_grads(policy)
                metrics["grad_norm"] = float(nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm))
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)  # free the gradients before the next rollout, not after it
            metrics.update({k: v / cfg.mu for k, v in sums.items()})
            metrics.update(expert_load_metrics(policy))
            metrics.update(hc_metrics(policy))
            if cfg.bias_update:
                update_router_biases(policy)  # counts all-reduced across ranks inside
            else:
                for m_ in policy.modules():
                    if hasattr(m_, "tokens_per_expert"):
                        m_.tokens_per_expert.zero_()
            if replica is not None:
                replica.load_state_dict(dist.full_state(policy, everywhere=True)[0])
            else:
                engine.load_weights(policy_weights(policy, engine))  # no-op when the engine shares the policy
            if ref is not None and cfg.ref_reset_every and (step + 1) % cfg.ref_reset_every == 0:
                ref.load_state_dict(dist.full_state(policy, everywhere=True)[0])
        t2 = time.perf_counter()
        lengths = [len(ro.token_ids) for _, ro in kept] or [0]
        metrics.update({
            "completion_length/mean": sum(lengths) / len(lengths), "completion_length/max": max(lengths),
            "rollouts": n_gen, "time/rollout": t_roll, "time/reward": t_rew, "time/update": t2 - t1,
            "tokens_per_s/rollout": sum(lengths) / max(t_roll, 1e-9), "time/step": t2 - t0,
            "lr": sched.get_last_lr()[0],
        })
        metrics = dist.mean_metrics(metrics)
        keep_rate = 1 - metrics["frac_reward_zero_std"] if cfg.dynamic_sampling else None  # every rank's mean
        if logger is not None:
            logger.log(step + 1, metrics)
        if tracker is not None:
            tracker.log(metrics, step=step + 1)
        last = metrics
        bar.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics['accuracy']:.2f}",
                        tok_s=f"{metrics['tokens_per_s/rollout']:.0f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            rngs = dist.gather(checkpoint.rng_state())
            model_sd, opt_sd = dist.full_state(policy, opt)
            if dist.main:
                state = {"model": model_sd, "optimizer": opt_sd,
                         "scheduler": sched.state_dict(), "cursor": cursor, "rng_ranks": rngs,
                         "keep_rate": keep_rate}
                if ref is not None:
                    state["ref"] = ref.state_dict()
                checkpoint.save(ckpt_dir, step + 1, state, keep=cfg.keep_last)
    if dist.world > 1 and not dist.same_parameters(policy):
        raise RuntimeError("parameters differ across ranks after training (a non-deterministic collective?)")
    if tracker is not None:
        tracker.end_training()
    final_sd = dist.full_state(policy)[0] if dist.fsdp else None
    if dist.main:
        export(policy, tok, out_dir / "model", state_dict=final_sd)
    return last


def policy_weights(policy: nn.Module, engine: Any) -> list[tuple[str, Tensor]]:
    """HF-named tensors for a separate engine; nothing when the engine holds the policy itself."""
    if getattr(engine, "model", None) is policy:
        return []
    if isinstance(policy, V3ForCausalLM):
        from r1.model.hf import hf_state_dict

        return list(hf_state_dict(policy))
    return list(policy.state_dict().items())


def export(model: nn.Module, tok: Any, directory: Path, state_dict: dict[str, Tensor] | None = None) -> None:
    """A HF-format model directory (+ tokenizer) that transformers and vLLM load; `state_dict` replaces the module's
    own (a sharded model's gathered weights)."""
    if isinstance(model, V3ForCausalLM):
        from r1.model.hf import save_hf

        if state_dict is not None:
            model = V3ForCausalLM(model.config)
            model.load_state_dict(state_dict)
        save_hf(model, directory)
    else:
        model.save_pretrained(directory, state_dict=state_dict)
    tok.save_pretrained(str(directory))
