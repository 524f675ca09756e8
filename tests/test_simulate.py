"""r1/simulate.py against real runs and against the analytic plan and FLOP count.

- The simulated per-rank peak (fake tensors, a fake world of 2 ranks) against the same step run for real in two
  gloo processes with FSDP2 (torchrun), each measured by torch's FSDPMemTracker.
- The analytic plan (r1/plan.py) within 20% of the simulation on three shapes.
- `r1 model`'s FLOPs per token against FlopCounterMode on a fake training step."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from _launch import torchrun

from r1.model.config import PRESETS, V3Config, count_params
from r1.plan import PlanSpec, plan
from r1.simulate import count_train_flops, simulate

_BENCH = PRESETS["bench"]
# 3 layers (1 dense, 2 MoE of 16 routed experts top-4 + 1 shared), q LoRA, MTP depth 1 (parameters only in GRPO)
C = _BENCH.replace(vocab_size=2048, hidden_size=128, intermediate_size=512, moe_intermediate_size=128,
                   num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=16, n_group=4, topk_group=2,
                   num_experts_per_tok=4, num_nextn_predict_layers=1)
T = 512

GLOO_STEP = """
import json, sys
import torch
from r1.parallel import Dist
from r1.plan import PlanSpec
from r1.runs import prepare_model
from r1.model.model import V3ForCausalLM
from r1.simulate import tracked_update
from test_simulate import C, T

dist = Dist()
torch.manual_seed(0)
spec = PlanSpec(gpus=dist.world, precision="bf16", micro_batch_tokens=T)
model = prepare_model(V3ForCausalLM(C), dist, spec.precision, 128, spec.gradient_checkpointing)
peak, _ = tracked_update(model, C, spec, dist.fsdp, flops=False)
if dist.main:
    print("PEAK " + json.dumps(peak))
torch.distributed.destroy_process_group()
"""


def test_simulated_peak_matches_two_gloo_processes(tmp_path: Path) -> None:
    """The same GRPO micro-batch + AdamW step, FSDP2 over 2 ranks, bf16: fake tensors in one process against real
    ones in two gloo processes; rank 0's peak by kind, FSDPMemTracker in both."""
    t = time.perf_counter()
    sim = simulate(C, PlanSpec(gpus=2, precision="bf16", micro_batch_tokens=T), flops=False)
    t_sim = time.perf_counter() - t
    r = torchrun(GLOO_STEP, tmp_path, nproc=2, fsdp=True)
    real = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("PEAK "))[5:])
    report = (f"simulated {sim.total / 2**20:.2f} MiB in {t_sim:.1f} s, gloo run {real['Total'] / 2**20:.2f} MiB\n"
              f"sim  {sim.peak}\nreal {real}")
    print(report)
    assert sim.peak["Sharded Param"] == real["Sharded Param"], report
    assert abs(sim.total / real["Total"] - 1) <= 0.15, report


SHAPES: dict[str, V3Config] = {
    "moe": C,
    # dense layers only, one q projection, a wider vocabulary
    "dense": _BENCH.replace(vocab_size=4096, hidden_size=192, intermediate_size=768, num_hidden_layers=3,
                            first_k_dense_replace=3, q_lora_rank=None, num_nextn_predict_layers=0),
    # 8 heads, two shared experts, 8 routed top-2
    "mla": _BENCH.replace(vocab_size=3072, hidden_size=128, intermediate_size=384, moe_intermediate_size=96,
                          num_attention_heads=8, kv_lora_rank=64, q_lora_rank=96, qk_nope_head_dim=32,
                          qk_rope_head_dim=16, v_head_dim=32, num_hidden_layers=3, first_k_dense_replace=1,
                          n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, n_shared_experts=2),
}


@pytest.mark.parametrize(("shape", "gpus", "precision", "checkpointing"),
                         [("moe", 4, "bf16", "none"), ("dense", 2, "bf16", "full"), ("mla", 1, "bf16", "none")])
def test_plan_within_20_percent_of_simulation(shape: str, gpus: int, precision: str, checkpointing: str) -> None:
    spec = PlanSpec(gpus=gpus, precision=precision, micro_batch_tokens=T,  # type: ignore[arg-type]
                    gradient_checkpointing=checkpointing)  # type: ignore[arg-type]
    sim = simulate(SHAPES[shape], spec, flops=False)
    p = plan(SHAPES[shape], spec)
    report = f"{shape} {spec}: plan {p.total / 2**20:.2f} MiB, simulated {sim.total / 2**20:.2f} MiB\n{sim.table(p)}"
    print(report)
    assert abs(p.total / sim.total - 1) <= 0.2, report


def test_flops_per_token_match_r1_model() -> None:
    """FlopCounterMode on a fake training micro-batch (one packed causal sequence, no MTP, log-probs of every token,
    backward) against count_params' 6 x active matmul parameters + causal attention, per token. v_head_dim equals
    the query's head dim so SDPA runs unpadded, as the formula assumes."""
    c = _BENCH.replace(qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=48, num_hidden_layers=3)
    tokens = 1024
    counted = count_train_flops(c, tokens) / tokens
    analytic = count_params(c, seq_len=tokens).train_flops_per_token
    assert abs(counted / analytic - 1) <= 0.05, (counted, analytic)


def test_clip_grad_norm_equals_torch_on_whole_gradients() -> None:
    """r1.optim.clip_grad_norm_ (shard by shard under FSDP2) is torch's clip_grad_norm_, bit for bit, on plain
    gradients (one process, data parallel)."""
    import torch

    from r1.optim import clip_grad_norm_

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(s)) for s in ((7, 5), (11,), (3, 4, 2))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b, strict=True):
        p.grad = torch.randn_like(p) * 3
        q.grad = p.grad.clone()
    mine, theirs = clip_grad_norm_(a, 1.0), torch.nn.utils.clip_grad_norm_(b, 1.0)
    assert torch.equal(mine, theirs) and mine > 1
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a, b, strict=True))


def test_cli_simulate_prints_the_simulation_beside_the_plan(capsys: pytest.CaptureFixture) -> None:
    from r1.cli import main

    assert main(["model", "tiny", "--plan", "gpus=2", "precision=bf16", "micro_batch_tokens=64", "--simulate"]) == 0
    out = capsys.readouterr().out
    assert "simulated (fake tensors" in out and "host syncs 0" in out, out
    assert any(x.split()[:1] == ["total"] and len(x.split()) == 3 for x in out.splitlines()), out  # sim, plan
    assert main(["model", "tiny", "--simulate"]) == 2
    assert "--simulate needs --plan" in capsys.readouterr().err
