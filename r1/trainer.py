"""The GRPO loop. `train` calls one function per stage, in order, every step: `collect` (draw prompts, roll out,
score, keep the groups with signal), `advantages`, `update` (mu optimizer steps with gradient accumulation),
`balance_and_sync` (router biases, weights to the engine), `log_step`, `save_checkpoint`. `setup` builds what they
share (`Run`) and where the run is (`Position`, what a checkpoint restores).

Simplifications (named, as nanochat does): data parallelism is a flat gradient all-reduce per optimizer step
(see Dist; `accelerate launch` starts the processes), or FSDP2 when launched so; the torch engine shares the policy
object (under FSDP2 the ranks decode in lockstep on the sharded model), so weight sync is a no-op there and a
bucketed `load_weights` for a separate engine; the reference model is a second frozen load, built only when
beta > 0 and sharded as the policy is.
For the native model the update runs each micro-batch's distinct prompts once and attends the G completions to
them (`shared_prefix`, `sequence_logprobs`): the same numbers as G whole sequences, fewer FLOPs.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from r1 import checkpoint, grpo
from r1.compute import compute_context
from r1.config import save_config
from r1.cpu import accelerate, accelerate_engine, micro_batches, update_workers
from r1.data import encode_prompts, load_rows, render, smoke_rl_rows
from r1.logprobs import token_logprobs
from r1.model.hc import hc_metrics
from r1.model.model import SharedPrefix, V3ForCausalLM, expert_load_metrics, update_router_biases
from r1.optim import OPTIMIZERS
from r1.parallel import Dist
from r1.policy import export, load_policy
from r1.routing import UNROUTED, RoutingReplay, moe_routers
from r1.runs import JsonlLogger, check_compute, prepare_model
from r1.weight_sync import sync_weights


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
    engine: str = "torch"  # torch | vllm (r1's own decoder, or vLLM colocated / as a server: vllm_mode)
    # vLLM (engine=vllm), checked before anything loads (rollouts.vllm_engine.check_options)
    vllm_mode: str = "colocate"  # colocate (in the training processes) | server (`r1 vllm-serve MODEL` elsewhere)
    vllm_gpu_memory_utilization: float = 0.3  # colocated: the engine's share of the GPU (weights + KV cache)
    vllm_tensor_parallel_size: int = 1  # colocated: ranks per engine (external_launcher: the engines join the job)
    vllm_max_model_len: int | None = None  # None: the model's own
    vllm_dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    vllm_enforce_eager: bool = False  # no CUDA graphs / torch.compile (faster start, slower decode)
    vllm_enable_sleep_mode: bool = True  # colocated: free weights and KV cache during the update (CUDA/ROCm/XPU only)
    vllm_enable_expert_parallel: bool = False  # colocated: vLLM's own expert parallelism over its tensor-parallel ranks
    vllm_server_url: str = "http://localhost:8000"
    vllm_transport: str = "auto"  # server weight sync: nccl | files | auto (nccl where the trainer has CUDA)
    vllm_sync_dir: str = "/dev/shm"  # files transport: safetensors shards the server reads (shared memory or disk)
    vllm_bucket_mb: int = 1024  # server weight sync: bytes per NCCL bucket / safetensors shard
    steps: int = 40
    prompts_per_step: int = 16
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 48
    lr: float = 1e-4
    optim: str = "adamw_torch_fused"  # adamw_torch_fused | adamw_bf16 (AdamW moments in bf16, r1/optim.py)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    beta: float = 0.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float = 0.0  # c > 1: a token's loss with A < 0 is at most c |A| (veRL's clip_ratio_c = 3); 0 = off
    k3_clamp: float = 0.0  # clamp each token's k3 to at most this (veRL: 10); 0 = off
    ratio: str = "token"  # token | sequence (GSPO)
    aggregation: str = "dapo"  # grpo | dapo | dr_grpo
    advantage_scale: str = "group"  # group | none (Dr. GRPO) | batch
    mu: int = 1  # inner updates per rollout batch
    micro_batch: int = 32
    update_workers: int = 0  # micro-batches run side by side on CPU (0 = auto: 2 with >= 2 threads; see r1.cpu)
    shared_prefix: bool = True  # native model: a micro-batch's distinct prompts run once each (not under FSDP)
    dynamic_sampling: bool = True
    max_refills: int = 2  # dynamic sampling's budget, drawn up front in one generate call (grpo.refill_prompts)
    ref_reset_every: int = 0  # 0 = never
    tis_cap: float = 2.0  # truncated importance sampling against the engine's log-probs (0 = off)
    routing_replay: str = "none"  # none | rollout: the training forward uses the engine's experts (R3, r1/routing.py)
    mismatch_mask: str = "none"  # none | sequence | token: drop what the engine sampled too differently (r1/grpo.py)
    mismatch_low: float = 0.5  # keep a token / sequence whose pi_old / pi_engine is in [low, high]
    mismatch_high: float = 2.0
    bias_update: bool = True  # auxiliary-loss-free balancing during RL
    precision: str = "fp32"  # fp32 | bf16 | fp8 (r1/compute.py)
    fp8_block: int = 128  # FP8 tile edge (DeepSeek-V3: 128; a small model needs one its shapes divide)
    gradient_checkpointing: str = "none"  # none | full | moe
    expert_parallel: int = 1  # routed experts split over this many ranks (all-to-all dispatch; r1/expert_parallel.py)
    seed: int = 0
    output_dir: str = "runs/smoke/grpo"
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    resume: str = "none"  # none | auto | a checkpoint directory
    progress: bool = True
    report_to: list[str] = field(default_factory=list)  # accelerate trackers: tensorboard, wandb, ...


# ---------------------------------------------------------------------------------------------- helpers
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
    with torch.no_grad():
        return None, sequence_logprobs(model, ids[sl], attn[sl], prompt_len, cfg.temperature, share_prompts=share)[0]


def micro_batch_loss(policy: nn.Module, cfg: TrainConfig, b: UpdateBatch, dist: Dist, share: bool,
                     i: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Micro-batch i's policy loss and metrics (run by r1.cpu.micro_batches, maybe on a worker thread)."""
    sl = slice(i * cfg.micro_batch, (i + 1) * cfg.micro_batch)
    lp, ent = sequence_logprobs(policy, b.ids[sl], b.attn[sl], b.prompt_len, cfg.temperature, with_entropy=True,
                                share_prompts=share)
    cmask = b.cmask[sl]
    loss, m = grpo.policy_loss(
        lp, lp.detach() if b.old is None else b.old[sl], b.adv[sl], cmask,
        ref_logp_BT=None if b.ref is None else b.ref[sl], beta=cfg.beta, eps_low=cfg.eps_low,
        eps_high=cfg.eps_high, dual_clip=cfg.dual_clip, k3_clamp=cfg.k3_clamp, ratio=cfg.ratio,
        aggregation=cfg.aggregation, engine_logp_BT=b.elogp[sl], tis_cap=cfg.tis_cap,
        mismatch_mask=cfg.mismatch_mask, mismatch_bounds=(cfg.mismatch_low, cfg.mismatch_high),
        max_completion_len=cfg.max_tokens, num_sequences=b.num_seq, num_tokens=b.num_tok)
    n = cmask.sum().clamp(min=1)
    m["entropy"] = (ent.detach() * cmask).sum() / n
    m["logprob_gap/engine_vs_trainer"] = ((lp.detach() - b.elogp[sl]).abs() * cmask).sum() / n
    return loss, m


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


def check(cfg: TrainConfig) -> None:
    """Choices named in the recipe exist, before anything loads: one line naming the bad value."""
    from rollouts import ENGINES

    engines = [e for e in ENGINES if e != "vllm_server"]  # a recipe says engine=vllm vllm_mode=server
    registries = {"ratio": grpo.RATIOS, "aggregation": grpo.AGGREGATIONS, "advantage_scale": grpo.ADVANTAGE_SCALES,
                  "engine": engines, "optim": OPTIMIZERS, "mismatch_mask": grpo.MISMATCH_MASKS}
    for name, known in registries.items():
        if getattr(cfg, name) not in known:
            raise ValueError(f"unknown {name} {getattr(cfg, name)!r}; known: {', '.join(known)}")
    render(cfg.template, "")
    check_compute(cfg.model, cfg.precision, cfg.fp8_block, cfg.gradient_checkpointing, cfg.expert_parallel)
    if cfg.reward_weights is not None and len(cfg.rewards) != len(cfg.reward_weights):
        raise ValueError(f"{len(cfg.rewards)} rewards but {len(cfg.reward_weights)} reward_weights")
    if cfg.group_size < 2:
        raise ValueError("group_size must be at least 2 (advantages compare samples within a group)")
    if cfg.dual_clip and cfg.dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (or 0 = off), got {cfg.dual_clip}")
    if cfg.routing_replay not in ROUTING_REPLAY:
        raise ValueError(f"unknown routing_replay {cfg.routing_replay!r}; known: {', '.join(ROUTING_REPLAY)}")
    if cfg.routing_replay == "rollout" and cfg.engine != "torch":
        raise ValueError(f"routing_replay=rollout needs an engine that returns its routing: engine=torch "
                         f"(the {cfg.engine} engine does not return routed experts yet)")
    if not 0 < cfg.mismatch_low <= 1 <= cfg.mismatch_high:
        raise ValueError(f"mismatch bounds must satisfy 0 < mismatch_low <= 1 <= mismatch_high, got "
                         f"[{cfg.mismatch_low}, {cfg.mismatch_high}]")
    from accelerate.utils import LoggerType

    if unknown := [t for t in cfg.report_to if t not in {x.value for x in LoggerType}]:
        raise ValueError(f"unknown tracker {unknown[0]!r}; known: {', '.join(x.value for x in LoggerType)}")
    if cfg.resume not in ("none", "auto") and not Path(cfg.resume).is_dir():
        raise FileNotFoundError(f"resume checkpoint {cfg.resume!r} not found")
    if cfg.engine == "vllm":
        from rollouts.vllm_engine import check_options

        check_options(cfg.model, **vllm_options(cfg))


def vllm_options(cfg: TrainConfig) -> dict[str, Any]:
    """The recipe's vllm_* keys as the engine's keyword arguments (rollouts.vllm_engine.engine_kwargs splits them)."""
    return {k.removeprefix("vllm_"): getattr(cfg, k) for k in cfg.__dataclass_fields__ if k.startswith("vllm_")}


def build_engine(cfg: TrainConfig, policy: nn.Module, tok: Any, dist: Dist) -> Any:
    """The rollout engine, built after a resumed checkpoint has loaded, so its first rollout samples those weights.
    vLLM starts from the model's config alone and gets the weights by the same streamed sync as every step after."""
    from rollouts import make_engine

    if cfg.engine != "vllm":
        # the torch engine decodes with the policy itself; under FSDP2 its ranks decode in lockstep (every forward is
        # a collective), so no rank ever holds an unsharded copy
        opts: dict[str, Any] = {"lockstep": dist.any} if dist.fsdp and cfg.engine == "torch" else {}
        if cfg.routing_replay == "rollout":
            opts["return_routed_experts"] = True
        return accelerate_engine(make_engine(cfg.engine, model=policy, tokenizer=tok, **opts))
    from rollouts.vllm_engine import engine_kwargs

    name, kw = engine_kwargs(vllm_options(cfg), model=policy, tokenizer=tok, rank=dist.rank, world=dist.world)
    with torch.random.fork_rng(devices=[dist.device] if dist.device.type == "cuda" else []):
        engine = make_engine(name, **kw)  # vLLM's dummy weights draw from torch's RNG: keep the run's stream
    if "model" not in kw:  # a server, started from the model's directory: the (maybe resumed) weights now
        sync_weights(engine, policy)
    return engine


ROUTING_REPLAY = ("none", "rollout")


# ---------------------------------------------------------------------------------------------- the loop
@dataclass
class Run:
    """What the stages share, built once by `setup` (the data position lives in `Position`)."""
    cfg: TrainConfig
    dist: Dist
    policy: nn.Module
    ref: nn.Module | None  # frozen reference (beta > 0)
    engine: Any
    tok: Any
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    params: list[Tensor]
    workers: int
    reward_set: Any
    sampling: Any
    rows: list[dict[str, Any]]
    order: list[int]  # the shuffled row order, the same on every rank
    out_dir: Path
    logger: JsonlLogger | None = None
    tracker: Any = None
    colocated: bool = False  # a vLLM engine in the training processes: asleep during each update


@dataclass
class Position:
    """Where the run is, besides the weights and the optimizer: what a checkpoint stores to resume bit for bit."""
    step: int = 0
    cursor: int = 0  # rows drawn so far, by all ranks together
    keep_rate: float | None = None  # dynamic sampling: the fraction of groups with signal in the last step


@dataclass
class Collected:
    """One step's rollouts on this rank: the kept groups' sequences (G each) and rewards, and what is logged."""
    seqs: list[tuple[list[int], Any]] = field(default_factory=list)  # (prompt ids, rollout)
    rewards: list[float] = field(default_factory=list)
    spare: tuple[list[int], Any] | None = None  # padding when this rank kept fewer sequences than another
    metrics: dict[str, float] = field(default_factory=dict)
    generated: int = 0
    groups: int = 0
    with_signal: int = 0
    t_rollout: float = 0.0
    t_reward: float = 0.0


def setup(cfg: TrainConfig) -> tuple[Run, Position]:
    """Validate and load everything (one-line errors, nothing written yet), then build the run; on `resume`, restore
    the model, optimizer, scheduler, RNG and data position."""
    from r1.tokenizer import load_tokenizer
    from rewards.combine import RewardSet
    from rollouts import SamplingParams

    check(cfg)
    dist = Dist(cfg.expert_parallel)
    if cfg.prompts_per_step % dist.world:
        raise ValueError(f"prompts_per_step {cfg.prompts_per_step} is not divisible by {dist.world} processes")
    weights = cfg.reward_weights or [1.0] * len(cfg.rewards)
    reward_set = RewardSet(list(zip(cfg.rewards, weights, strict=True)), on_error=cfg.on_reward_error)
    rows = smoke_rl_rows(seed=cfg.seed) if cfg.dataset == "smoke" else \
        load_rows(cfg.dataset, cfg.split, (cfg.prompt_key, cfg.answer_key or cfg.prompt_key), cfg.dataset_config)
    # built on meta, made ready (CPU layer, precision, sharding) there, then read straight to the device: under
    # FSDP2 each rank reads only its shards, so no rank ever holds the whole model
    policy = load_policy(cfg.model, device=dist.device, shard=functools.partial(
        prepare_model, dist=dist, precision=cfg.precision, fp8_block=cfg.fp8_block,
        gradient_checkpointing=cfg.gradient_checkpointing, speed_layer=accelerate))
    if cfg.routing_replay == "rollout" and not moe_routers(policy):
        raise ValueError(f"routing_replay=rollout needs a policy with MoE layers; {cfg.model} has none")
    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    out_dir = Path(cfg.output_dir)
    resume_from = checkpoint.latest(out_dir / "checkpoints") if cfg.resume == "auto" else \
        None if cfg.resume == "none" else Path(cfg.resume)
    state = checkpoint.read_extra(resume_from) if resume_from is not None else None  # a corrupt file fails here
    # ---- everything above validates input; compute starts here
    torch.manual_seed(cfg.seed + dist.rank)  # ranks sample different rollouts from the same weights
    random.seed(cfg.seed + dist.rank)
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, str(out_dir / "config.yaml"))
    ref = load_policy(cfg.model, device=dist.device, shard=functools.partial(  # sharded as the policy is
        prepare_model, dist=dist, precision=cfg.precision, fp8_block=cfg.fp8_block, gradient_checkpointing="none",
        speed_layer=accelerate)).eval().requires_grad_(False) if cfg.beta > 0 else None
    opt = OPTIMIZERS[cfg.optim](policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)  # the same order on every rank; each reads its own slice
    run = Run(cfg, dist, policy, ref, None, tok, opt, sched,
              params=[p for p in policy.parameters() if p.requires_grad],
              # replay keeps one routing per model at a time: micro-batches one after another
              workers=1 if cfg.routing_replay != "none" else update_workers(cfg.update_workers, dist.device, dist.fsdp),
              reward_set=reward_set,
              sampling=SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens),
              rows=rows, order=order, out_dir=out_dir)
    pos = Position()
    if state is not None:  # DCP reshards: a checkpoint of any world size loads into this one
        state = checkpoint.load(resume_from, policy, opt, dist)  # and this rank's RNG
        sched.load_state_dict(state["scheduler"])
        pos = Position(state["step"], state["cursor"], state.get("keep_rate"))
        if ref is not None:
            dist.load_full_state(ref, state["ref"])
    run.engine = build_engine(cfg, policy, tok, dist)
    run.colocated = cfg.engine == "vllm" and cfg.vllm_mode == "colocate"
    run.logger = JsonlLogger(out_dir / "metrics.jsonl", resume_step=pos.step) if dist.main else None
    if cfg.report_to:  # TensorBoard / W&B through accelerate; the JSONL file is always written
        from accelerate import Accelerator

        run.tracker = Accelerator(cpu=not torch.cuda.is_available(), log_with=cfg.report_to, project_dir=str(out_dir))
        run.tracker.init_trackers("r1", config={k: str(v) for k, v in vars(cfg).items()})
    return run, pos


def draw_prompts(run: Run, pos: Position, n: int) -> list[dict[str, Any]] | None:
    """This rank's next n rows. Each rank reads its own slot of the global cursor, the size of the largest n over
    the ranks (a collective: every rank makes the same calls); None when no rank needs any. A lockstep engine
    (FSDP2) has every rank generate in every call, so each takes its whole slot (keep_groups drops the surplus)."""
    dist = run.dist
    slot = int(dist.all_reduce(torch.tensor(n, device=dist.device), "max").item())
    if slot <= 0:
        return None
    if getattr(run.engine, "lockstep", None) is not None:
        n = slot
    batch = [run.rows[run.order[(pos.cursor + dist.rank * slot + i) % len(run.order)]] for i in range(n)]
    pos.cursor += slot * dist.world
    return batch


def roll_out(run: Run, batch: list[dict[str, Any]], c: Collected) -> tuple[list[list[int]], list[Any]]:
    """G completions of each row's rendered prompt: (prompt ids, rollouts, prompt-major)."""
    cfg = run.cfg
    prompts = encode_prompts(run.tok, [render(cfg.template, r[cfg.prompt_key]) for r in batch])
    t = time.perf_counter()
    rolls = run.engine.generate(prompts, run.sampling, n=cfg.group_size)
    c.t_rollout += time.perf_counter() - t
    c.generated += len(rolls)
    return prompts, rolls


def score(run: Run, batch: list[dict[str, Any]], rolls: list[Any], c: Collected) -> list[float]:
    """The weighted reward of every rollout; the first call of a step also records the reward metrics."""
    cfg = run.cfg
    t = time.perf_counter()
    cols = [{**r, "answer": r[cfg.answer_key]} if cfg.answer_key else r
            for r in (batch[ro.prompt_index] for ro in rolls)]
    rewards, per_reward = run.reward_set([ro.text for ro in rolls], cols)
    c.t_reward += time.perf_counter() - t
    if not c.metrics:
        correct = per_reward[cfg.rewards[0]]
        c.metrics = {**run.reward_set.metrics(),
                     "accuracy": sum((x or 0.0) >= 1.0 for x in correct) / len(correct)}
    return rewards


def keep_groups(run: Run, prompts: list[list[int]], rolls: list[Any], rewards: list[float], need: int,
                c: Collected) -> float:
    """Dynamic sampling (DAPO): keep up to `need` groups whose rewards are not all equal (all of them when it is
    off); a refill's surplus groups are dropped. The decision reads only the group's own rewards, so it is the
    same on any number of ranks. Returns this call's keep rate."""
    G = run.cfg.group_size
    keep = grpo.groups_with_signal(torch.tensor(rewards), G) if run.cfg.dynamic_sampling \
        else torch.ones(len(prompts), dtype=torch.bool)
    c.groups += len(prompts)
    c.with_signal += int(keep.sum())
    c.spare = c.spare or (prompts[0], rolls[0])
    for g in keep.nonzero().flatten().tolist()[:need]:
        c.seqs += [(prompts[g], rolls[j]) for j in range(g * G, (g + 1) * G)]
        c.rewards += rewards[g * G:(g + 1) * G]
    return float(keep.float().mean())


def collect(run: Run, pos: Position) -> Collected:
    """Draw prompts, roll out, score and keep the groups with signal, until this rank has its share of groups or
    dynamic sampling's budget is spent. The budget of 1 + max_refills rounds is drawn in one generate call, sized
    by grpo.refill_prompts at the last step's keep rate; only the first step, with no rate known yet, refills in a
    second call (at the rate of its first)."""
    cfg = run.cfg
    c = Collected()
    per_rank = cfg.prompts_per_step // run.dist.world
    rounds = 1 + cfg.max_refills if cfg.dynamic_sampling else 1
    rate = pos.keep_rate
    for attempt in range(1 if rate is not None or rounds == 1 else 2):
        need = per_rank - len(c.seqs) // cfg.group_size
        batch = draw_prompts(run, pos, need if rate is None else grpo.refill_prompts(need, rate, rounds - attempt))
        if batch is None:
            break
        if not batch:  # another rank still draws: this one only took part in the collective
            continue
        prompts, rolls = roll_out(run, batch, c)
        rewards = score(run, batch, rolls, c)
        rate = keep_groups(run, prompts, rolls, rewards, need, c)
    c.metrics["frac_reward_zero_std"] = 1 - c.with_signal / max(1, c.groups)
    return c


@dataclass
class Sizes:
    """The step's batch over all ranks: the loss's global normalisers and the busiest rank's sequence count."""
    sequences: float
    tokens: float
    busiest: int


def global_sizes(run: Run, c: Collected) -> Sizes:
    dist = run.dist
    totals = dist.all_reduce(torch.tensor([len(c.seqs), sum(len(ro.token_ids) for _, ro in c.seqs)],
                                          device=dist.device))
    busiest = int(dist.all_reduce(torch.tensor(len(c.seqs), device=dist.device), "max"))
    return Sizes(totals[0].item(), totals[1].item(), busiest)


def advantages(rewards: list[float], cfg: TrainConfig, dist: Dist) -> Tensor:
    """This rank's advantages. "batch" scaling takes the std over the global batch: every rank's kept rewards,
    gathered, so N processes compute the advantages one process would from the same groups."""
    local = torch.tensor(rewards)
    batch = torch.tensor([r for rank in dist.gather(rewards) for r in rank]) if cfg.advantage_scale == "batch" \
        else None
    if not rewards:
        return torch.zeros(0)
    return grpo.group_advantages(local, cfg.group_size, scale=cfg.advantage_scale, batch_rewards=batch)


def update(run: Run, c: Collected, adv: Tensor, sizes: Sizes) -> dict[str, float]:
    """mu optimizer steps on the kept sequences, padded to the busiest rank's count so every rank runs the same
    micro-batches (pads have zero mask and zero advantage: no gradient, same collectives)."""
    cfg, dist, policy = run.cfg, run.dist, run.policy
    n_seq = len(c.seqs)
    n_tok_local = sum(len(ro.token_ids) for _, ro in c.seqs)
    pad = sizes.busiest - n_seq
    seqs = c.seqs + [c.spare] * pad
    ids, attn, cmask, elogp, P = pack([p for p, _ in seqs], [ro.token_ids for _, ro in seqs],
                                      [ro.logprobs for _, ro in seqs], run.tok.pad_token_id or 0)
    cmask[n_seq:] = 0
    adv = torch.cat([adv, torch.zeros(pad)])
    ids, attn, cmask, elogp, adv = (t.to(dist.device) for t in (ids, attn, cmask, elogp, adv))
    # global normalisers divided by world: the averaged gradient is the exact global-batch loss's gradient
    num_seq, num_tok = sizes.sequences / dist.world, sizes.tokens / dist.world
    mb = cfg.micro_batch
    replays = routing_replays(policy, seqs, P, ids.shape[1] - P, mb) if cfg.routing_replay == "rollout" else []
    # two forwards per backward: not tried under FSDP2; replay routes one [B, T] forward at a time
    share = cfg.shared_prefix and not dist.fsdp and not replays
    n_mb = -(-ids.shape[0] // mb)
    # the log-probs before the update (mu > 1) and the reference's, micro-batches side by side as well
    logprobs_of = functools.partial(micro_batch_logprobs, cfg, ids, attn, P, dist, share)  # (model, i)

    def ctx(i: int, replay: bool = True) -> contextlib.ExitStack:
        """Around micro-batch i's forward and backward, on its thread: the precision context (r1.compute) and the
        rollout's routing (r1.routing; the policy's forwards only)."""
        stack = contextlib.ExitStack()
        stack.enter_context(compute_context(cfg.precision, dist.device, dist.fsdp))
        if replays and replay:
            stack.enter_context(replays[i])
        return stack

    old = torch.cat(micro_batches(functools.partial(logprobs_of, policy), n_mb, run.params, run.workers, ctx)) \
        if cfg.mu > 1 else None
    ref_lp = torch.cat(micro_batches(functools.partial(logprobs_of, run.ref), n_mb, run.params, run.workers,
                                     functools.partial(ctx, replay=False))) if run.ref is not None else None
    batch = UpdateBatch(ids, attn, cmask, elogp, adv, old, ref_lp, P, num_seq, num_tok)
    step_fn = functools.partial(micro_batch_loss, policy, cfg, batch, dist, share)
    # the metrics stay on the device until the update ends: each .item() / float() in the loop would be a host sync
    sums: dict[str, Tensor] = {}
    for _ in range(cfg.mu):
        run.opt.zero_grad(set_to_none=True)
        for i, m in enumerate(micro_batches(step_fn, n_mb, run.params, run.workers, ctx)):
            w = cmask[i * mb:(i + 1) * mb].sum() / max(1, n_tok_local)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() * w
        dist.average_grads(policy)
        grad_norm = dist.clip_grad_norm(policy, cfg.max_grad_norm)  # (FSDP2: shard by shard)
        run.opt.step()
        run.sched.step()
        run.opt.zero_grad(set_to_none=True)  # free the gradients before the next rollout, not after it
    means = (torch.stack(list(sums.values())) / cfg.mu).tolist() if sums else []
    out = {"grad_norm": float(grad_norm), **dict(zip(sums, means, strict=True))}
    if replays:
        same_total = dist.all_reduce(torch.tensor([sum(t) for t in zip(*(r.tally() for r in replays), strict=True)],
                                                  device=dist.device))
        out["moe/routing_agreement"] = float(same_total[0] / same_total[1].clamp(min=1))
    return out


def routing_replays(policy: nn.Module, seqs: list[tuple[list[int], Any]], P: int, C: int,
                    mb: int) -> list[RoutingReplay]:
    """One RoutingReplay per micro-batch: each sequence's recorded experts laid out as `pack` lays out its ids
    (prompt left-padded to P, completion right-padded to C); pads UNROUTED."""
    L, K = seqs[0][1].routed_experts.shape[1:]
    routed = torch.full((len(seqs), P + C, L, K), UNROUTED, dtype=torch.int16)
    for b, (prompt, ro) in enumerate(seqs):
        routed[b, P - len(prompt):P + len(ro.token_ids)] = ro.routed_experts
    return [RoutingReplay(policy, routed[i:i + mb]) for i in range(0, len(seqs), mb)]


def balance_and_sync(run: Run, step: int) -> dict[str, float]:
    """Expert-load metrics, then auxiliary-loss-free balancing (router biases); the new weights to the engine (and
    the reference, every ref_reset_every steps). Returns the load metrics, read before the biases move."""
    cfg, policy = run.cfg, run.policy
    metrics = {**expert_load_metrics(policy), **hc_metrics(policy)}
    if cfg.bias_update:
        update_router_biases(policy)  # counts all-reduced across ranks inside
    else:
        for m in policy.modules():
            if hasattr(m, "tokens_per_expert"):
                m.tokens_per_expert.zero_()
    metrics |= sync_weights(run.engine, policy)  # nothing to do when the engine decodes with the policy itself
    if run.ref is not None and cfg.ref_reset_every and (step + 1) % cfg.ref_reset_every == 0:
        run.dist.copy_weights(run.ref, policy)
    return metrics


def log_step(run: Run, step: int, c: Collected, metrics: dict[str, float], t_collect: float,
             t_update: float) -> dict[str, float]:
    """The step's metrics, averaged over ranks, to the JSONL file and the trackers."""
    lengths = [len(ro.token_ids) for _, ro in c.seqs] or [0]
    metrics = run.dist.mean_metrics({
        **metrics, "completion_length/mean": sum(lengths) / len(lengths), "completion_length/max": max(lengths),
        "rollouts": c.generated, "time/rollout": c.t_rollout, "time/reward": c.t_reward, "time/update": t_update,
        "tokens_per_s/rollout": sum(lengths) / max(c.t_rollout, 1e-9), "time/step": t_collect + t_update,
        "lr": run.sched.get_last_lr()[0],
    })
    if run.logger is not None:
        run.logger.log(step + 1, metrics)
    if run.tracker is not None:
        run.tracker.log(metrics, step=step + 1)
    return metrics


def save_checkpoint(run: Run, pos: Position) -> None:
    """Model and optimizer (each rank its own shards under FSDP2), scheduler, every rank's RNG and the data
    position: a collective."""
    extra = {"scheduler": run.sched.state_dict(), "cursor": pos.cursor, "keep_rate": pos.keep_rate}
    if run.ref is not None:
        extra["ref"] = run.dist.full_state(run.ref)  # (gathered on rank 0 under FSDP2)
    checkpoint.save(run.out_dir / "checkpoints", pos.step, run.policy, run.opt, extra, run.dist,
                    keep=run.cfg.keep_last)


def finish(run: Run) -> None:
    """Check the ranks agree, close the trackers, export the final model in HF format."""
    dist = run.dist
    if dist.world > 1 and not dist.same_parameters(run.policy):
        raise RuntimeError("parameters differ across ranks after training (a non-deterministic collective?)")
    if run.tracker is not None:
        run.tracker.end_training()
    export(run.policy, run.tok, run.out_dir / "model", dist=dist)  # every rank: gathered parameter by parameter


def train(cfg: TrainConfig) -> dict[str, float]:
    """GRPO: each step draws prompts, rolls out, scores, keeps the groups with signal and computes advantages,
    updates the policy, balances the experts and syncs the engine, then logs and checkpoints."""
    run, pos = setup(cfg)
    bar = tqdm(range(pos.step, cfg.steps), initial=pos.step, total=cfg.steps,
               disable=not (cfg.progress and run.dist.main), desc="grpo")
    metrics: dict[str, float] = {}
    for step in bar:
        t0 = time.perf_counter()
        c = collect(run, pos)
        t1 = time.perf_counter()
        metrics = dict(c.metrics)
        sizes = global_sizes(run, c)
        if sizes.sequences > 0:  # some rank kept a group
            if run.colocated:
                run.engine.sleep()  # a colocated vLLM frees its weights and KV cache for the update
            metrics |= update(run, c, advantages(c.rewards, cfg, run.dist), sizes)
            if run.colocated:
                run.engine.wake()  # and takes the memory back; the sync below refills the weights
            metrics |= balance_and_sync(run, step)
        metrics = log_step(run, step, c, metrics, t1 - t0, time.perf_counter() - t1)
        pos.step = step + 1
        pos.keep_rate = 1 - metrics["frac_reward_zero_std"] if cfg.dynamic_sampling else None  # every rank's mean
        bar.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics['accuracy']:.2f}",
                        tok_s=f"{metrics['tokens_per_s/rollout']:.0f}")
        if cfg.save_every and pos.step % cfg.save_every == 0 or pos.step == cfg.steps:
            save_checkpoint(run, pos)
    finish(run)
    return metrics
