"""The prepared GPU check: GRPO update steps of a ~1B-parameter V3 model on one GPU, in bf16 and in fp8.

Each precision runs the trainer's own update code (r1.trainer.micro_batch_loss: sequence log-probs, the clipped
DAPO loss, backward, grad-norm clip, fused AdamW) on the model as `r1 train` prepares it (r1.runs.prepare_model:
fp32 master weights, bf16 autocast compute, fp8 linears and grouped experts for precision=fp8), on a synthetic
batch of `--batch` sequences of `--prompt` + `--completion` tokens. It prints, per precision: step time, tokens/s,
MFU (FLOPs per token as `r1 model` counts them, over the GPU's dense bf16 peak) and peak memory, then the
fp8 / bf16 step-time ratio, and one JSON line. Sized to finish in under 8 minutes on one H100.

    python bench/gpu_check.py                          # ~1B V3, bf16 then fp8
    python bench/gpu_check.py --config smoke --batch 4 --prompt 16 --completion 32 --steps 2   # a CPU dry run
    python bench/gpu_check.py --vllm-steps 3       # then colocated GRPO steps with vLLM asleep during each update

--vllm-steps N runs N GRPO steps of the trainer's own stages (collect, update, balance_and_sync) with a colocated vLLM
engine on the same GPU (the ~1B config with the char tokenizer's 128-token vocabulary, bf16): per step the GPU memory
that vLLM's sleep frees (level 2: weights and KV cache), rollout / update / sync seconds and bytes synced.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from r1 import trainer
from r1.compute import fp8_contraction_dims
from r1.model.config import PRESETS, V3Config, count_params, human
from r1.model.model import V3ForCausalLM
from r1.parallel import Dist
from r1.runs import prepare_model

# ~1B total parameters (~0.3B active): MLA as V3 (kv_lora 512, rope 64, nope 128, v 128), 40 routed experts top-4
GPU_1B = V3Config(vocab_size=32000, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512,
                  num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=1,
                  n_routed_experts=40, num_experts_per_tok=4, n_group=4, topk_group=2, kv_lora_rank=512,
                  q_lora_rank=768, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                  first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=4096)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core FLOP/s (SXM)


def peak_flops() -> float:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))


def run(precision: str, c: V3Config, args: argparse.Namespace, dist: Dist) -> dict[str, float]:
    torch.manual_seed(0)
    with torch.device(dist.device):
        model = V3ForCausalLM(c)
    dims = fp8_contraction_dims(c).values()
    block = args.fp8_block or next(b for b in (128, 64, 32, 16) if all(k % b == 0 for k in dims))
    model = prepare_model(model, dist, precision, block, args.gradient_checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.99), fused=dist.device.type == "cuda")
    B, P, C = args.batch, args.prompt, args.completion
    cfg = trainer.TrainConfig(precision=precision, fp8_block=block, micro_batch=B, max_tokens=C, shared_prefix=False,
                              gradient_checkpointing=args.gradient_checkpointing)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, c.vocab_size, (B, P + C), generator=g)
    batch = trainer.UpdateBatch(ids=ids, attn=torch.ones_like(ids), cmask=torch.ones(B, C),
                                elogp=-torch.rand(B, C, generator=g), adv=torch.randn(B, generator=g), old=None,
                                ref=None, prompt_len=P, num_seq=float(B), num_tok=float(B * C))
    batch = trainer.UpdateBatch(**{k: v.to(dist.device) if isinstance(v, torch.Tensor) else v
                                   for k, v in vars(batch).items()})
    sync = torch.cuda.synchronize if dist.device.type == "cuda" else (lambda: None)
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t = time.perf_counter()
        loss, _ = trainer.micro_batch_loss(model, cfg, batch, dist, False, 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    step = sorted(times)[len(times) // 2]
    tokens = B * (P + C)
    flops = count_params(c, seq_len=P + C).train_flops_per_token * tokens
    peak = torch.cuda.max_memory_allocated() / 2**30 if dist.device.type == "cuda" else float("nan")
    out = {"step_s": step, "tokens_per_s": tokens / step, "mfu": flops / step / peak_flops(), "peak_gib": peak,
           "loss": float(loss.detach())}
    print(f"{precision:>5}: step {step * 1e3:8.1f} ms  {out['tokens_per_s']:10.0f} tok/s  MFU {out['mfu']:6.1%}  "
          f"peak {peak:6.2f} GiB  (loss {out['loss']:.4f})", flush=True)
    del model, opt
    if dist.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def vllm_colocated(c: V3Config, args: argparse.Namespace) -> dict[str, float]:
    """GRPO steps with a colocated vLLM that sleeps during each update; memory freed by sleep and the sync time."""
    import tempfile

    from r1.policy import export
    from r1.tokenizer import load_tokenizer

    directory = tempfile.mkdtemp(prefix="r1-gpu-check-")
    torch.manual_seed(0)
    export(V3ForCausalLM(c.replace(vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
           load_tokenizer("char"), directory)
    cfg = trainer.TrainConfig(model=directory, output_dir=directory + "/run", engine="vllm", precision="bf16",
                              vllm_dtype="bfloat16", vllm_gpu_memory_utilization=0.3, vllm_max_model_len=1024,
                              rewards=["format"], prompts_per_step=16, group_size=8, max_tokens=256,
                              micro_batch=16, dynamic_sampling=False, progress=False)
    run, pos = trainer.setup(cfg)
    free = lambda: torch.cuda.mem_get_info()[0] / 2**30  # noqa: E731
    out: dict[str, float] = {}
    for step in range(args.vllm_steps):
        t = time.perf_counter()
        col = trainer.collect(run, pos)
        t_roll = time.perf_counter() - t
        before = free()
        run.engine.sleep()
        freed = free() - before
        t = time.perf_counter()
        trainer.update(run, col, trainer.advantages(col.rewards, cfg, run.dist), trainer.global_sizes(run, col))
        t_update = time.perf_counter() - t
        run.engine.wake()
        m = trainer.balance_and_sync(run, step)
        out = {"vllm_sleep_freed_gib": freed, "vllm_rollout_s": t_roll, "vllm_update_s": t_update,
               "vllm_sync_s": m["sync/seconds"], "vllm_sync_gib": m["sync/bytes"] / 2**30}
        print(f"vllm step {step}: sleep freed {freed:6.2f} GiB, rollout {t_roll:6.2f} s, update {t_update:6.2f} s, "
              f"sync {m['sync/seconds']:5.2f} s ({m['sync/bytes'] / 2**30:.2f} GiB)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="gpu1b", help="gpu1b (~1B V3) or a preset name")
    ap.add_argument("--precisions", default="bf16,fp8")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--completion", type=int, default=1792)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--fp8-block", type=int, default=0, help="0 = the largest of 128/64/32/16 the shapes allow")
    ap.add_argument("--gradient-checkpointing", default="none")
    ap.add_argument("--vllm-steps", type=int, default=0, help="then N colocated GRPO steps with vLLM (GPU only)")
    args = ap.parse_args()
    c = GPU_1B if args.config == "gpu1b" else PRESETS[args.config]
    dist = Dist()
    size = count_params(c, seq_len=args.prompt + args.completion)
    print(f"{args.config}: {human(size.total)} parameters, {human(size.active)} active, "
          f"{human(size.train_flops_per_token)} training FLOPs/token; device {dist.device} "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else ''}", flush=True)
    results = {p: run(p, c, args, dist) for p in args.precisions.split(",")}
    if {"bf16", "fp8"} <= results.keys():
        print(f"fp8 / bf16 step time: {results['fp8']['step_s'] / results['bf16']['step_s']:.2f}x")
    colocated = vllm_colocated(c, args) if args.vllm_steps else {}
    print(json.dumps({"bench": "gpu_check", "config": args.config, **{f"{p}_{k}": round(v, 4)
                      for p, r in results.items() for k, v in r.items()},
                      **{k: round(v, 4) for k, v in colocated.items()}}))


if __name__ == "__main__":
    main()
