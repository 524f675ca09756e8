"""A dry run of the GPU path on fake tensors (r1/simulate.py): the V3 model in bf16 and fp8 on device "cuda" in this
CPU-only torch. Forwards run on fake CUDA: an SFT step's loss, a GRPO update micro-batch's loss (shared prompts and
not), and the torch engine's prefill and decode step (its V3Stepper). A tensor created on the CPU inside them raises
FakeTensorDeviceMismatchError; CPU-only kernels fail. Backward and the optimizer step run on fake CPU tensors: torch's
autograd engine asks the CUDA runtime for a stream for every CUDA gradient, which a CPU-only build has not.

The host synchronisations of an update step (r1.trainer.update) are counted, each at its line of code, and held to
a budget: a new `.item()`, `.tolist()` or data-dependent shape in the update fails the test."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from r1 import trainer
from r1.compute import apply_precision
from r1.model.config import PRESETS
from r1.sft import batch_loss
from r1.simulate import (
    HostSyncs,
    _dist,
    even_expert_splits,
    fake_cuda,
    fake_model,
    grpo_micro_batch,
    optimizer_step,
    update_batch,
)
from rollouts.base import Rollout
from rollouts.torch_engine import V3Stepper

# the smoke model with 4 routed experts (fp8 loops over them on fake tensors): 3 layers (1 dense, 2 MoE, top-2 + 1
# shared), MLA, MTP depth 1
C = PRESETS["smoke"].replace(n_routed_experts=4)
BLOCK = 32  # the FP8 tile edge its contraction dims allow (kv_lora_rank 32)


def forwards_on_fake_cuda(precision: str) -> dict[str, list[str]]:
    """Each forward of the GPU path once, on fake CUDA; returns the host syncs of each, by site."""
    fake_cuda()
    syncs: dict[str, list[str]] = {}
    with FakeTensorMode(), HostSyncs() as hs, contextlib.ExitStack() as stack:
        model = fake_model(C, "cuda", torch.bfloat16).train()  # FSDP2's param_dtype (autocast needs a real GPU)
        apply_precision(model, precision, BLOCK)
        stack.enter_context(even_expert_splits(model, hs))
        ids = torch.randint(0, C.vocab_size, (2, 64), device="cuda")
        loss, _ = batch_loss(model, ids, torch.ones_like(ids), torch.ones_like(ids), 0.3)  # SFT, with the MTP loss
        assert loss.device.type == "cuda" and loss.dtype == torch.float32
        syncs["sft"], hs.sites = hs.sites, []
        cfg = trainer.TrainConfig(precision=precision, micro_batch=4, max_tokens=32)
        for share in (False, True):  # the whole sequences, and the G completions attending to their shared prompt
            loss, m = trainer.micro_batch_loss(model, cfg, update_batch(C, 4, 16, 32, "cuda"), None, share, 0)
            assert loss.device.type == "cuda" and all(v.device.type == "cuda" for v in m.values())
        syncs["grpo"], hs.sites = hs.sites, []
        model.eval()
        with torch.no_grad():  # the torch engine's model steps: prefill 2 prompts, 2 samples each, one decode step
            stepper = V3Stepper(model)
            mask = torch.ones(2, 8, dtype=torch.long, device="cuda")
            logits = stepper.prefill(torch.randint(3, C.vocab_size, (2, 8), device="cuda"), mask, capacity=12)
            rows = torch.arange(2, device="cuda").repeat_interleave(2)
            stepper.select(rows)
            tok = logits[rows].argmax(-1)
            logits = stepper.decode(tok, torch.cat([mask[rows], mask.new_ones(4, 1)], dim=1))
            assert logits.shape == (4, C.vocab_size) and logits.device.type == "cuda"
        syncs["decode"] = hs.sites
    return syncs


def backward_and_step_on_fake_cpu(precision: str) -> list[str]:
    """The GRPO micro-batch's backward and the optimizer step after it (fused AdamW), the model in bf16."""
    with FakeTensorMode(), HostSyncs() as hs:
        model = fake_model(C, "cpu", torch.bfloat16).train()
        apply_precision(model, precision, BLOCK)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        with even_expert_splits(model, hs):
            grpo_micro_batch(model, update_batch(C, 4, 16, 32, "cpu"), precision)
            optimizer_step(model, opt)
        assert all(p.grad is None or p.grad.dtype == p.dtype for p in model.parameters())
    return hs.sites


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_gpu_path_dry_run(precision: str) -> None:
    t = time.perf_counter()
    syncs = forwards_on_fake_cuda(precision)
    syncs["backward+step"] = backward_and_step_on_fake_cpu(precision)
    print(f"{precision}: {time.perf_counter() - t:.1f} s; host syncs {syncs}")
    # the shared-prefix pass needs the number of distinct prompts (its shape): torch.unique, once per micro-batch;
    # fp8's routed experts need each expert's row count (one .tolist() per MoE layer and forward; the MTP module's
    # in SFT); nothing else in the update's forward, backward and optimizer step reads data on the host
    fp8 = "r1/fp8.py in Fp8GroupedExperts.forward (tolist)"
    moe = C.num_hidden_layers - C.first_k_dense_replace
    other = {k: [s for s in v if s != fp8] for k, v in syncs.items()}
    assert [s.split(" in ")[1] for s in other["grpo"]] == ["sequence_logprobs (unique_dim)"], syncs["grpo"]
    assert other["backward+step"] == other["decode"] == [], syncs
    assert all(s.endswith("in lm_loss (_local_scalar_dense)") for s in other["sft"]), syncs["sft"]  # its metrics
    fp8_syncs = {k: v.count(fp8) for k, v in syncs.items()}
    per_forward = {"sft": moe + C.num_nextn_predict_layers, "grpo": 3 * moe, "decode": 2 * moe, "backward+step": moe}
    assert fp8_syncs == (per_forward if precision == "fp8" else dict.fromkeys(syncs, 0)), fp8_syncs


def update_step_syncs(micro_batches: int = 2) -> list[str]:
    """r1.trainer.update on fake tensors, as `r1 train` runs it on one GPU: `micro_batches` micro-batches of two GRPO
    groups of 2 (shared prompts), mu = 1, AdamW; returns the host syncs."""
    with FakeTensorMode(), HostSyncs() as hs:
        model = fake_model(C, "cpu", torch.bfloat16).train()
        cfg = trainer.TrainConfig(micro_batch=4, group_size=2, max_tokens=8, update_workers=1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        run = trainer.Run(cfg, _dist(1), model, None, None, SimpleNamespace(pad_token_id=0), opt,
                          torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), params=list(model.parameters()),
                          workers=1, reward_set=None, sampling=None, rows=[], order=[], out_dir=Path("."))
        c = trainer.Collected()
        for g in range(2 * micro_batches):
            c.seqs += [([5 + g, 6, 7], Rollout(g, [9] * (3 + j), [-0.5] * (3 + j), "", "stop")) for j in range(2)]
        c.spare = c.seqs[0]
        n = len(c.seqs)
        metrics = trainer.update(run, c, torch.randn(n), trainer.Sizes(float(n), 4.0 * n, n))
        assert "grad_norm" in metrics and "entropy" in metrics
    return hs.sites


# host syncs of an update step: one torch.unique per micro-batch (the shared prompts' count), the metrics' one
# .tolist() and the gradient norm's float() after the last optimizer step
UPDATE_SYNCS_PER_MICRO_BATCH, UPDATE_SYNCS_PER_UPDATE = 1, 2


def test_update_step_host_syncs_do_not_grow() -> None:
    sites = update_step_syncs(micro_batches=2)
    print("\n".join(sites))
    assert len(sites) <= 2 * UPDATE_SYNCS_PER_MICRO_BATCH + UPDATE_SYNCS_PER_UPDATE, sites


# every FP8 GEMM's contraction dim a multiple of 128, as cuBLAS's blockwise FP8 (F.scaled_mm) requires
C128 = PRESETS["tiny"].replace(hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
                               num_attention_heads=2, kv_lora_rank=128, q_lora_rank=None, qk_nope_head_dim=64,
                               qk_rope_head_dim=64, v_head_dim=128, num_hidden_layers=2, n_routed_experts=4,
                               n_group=1, topk_group=1, num_nextn_predict_layers=0)


def test_fp8_scaled_mm_path_passes_torchs_checks() -> None:
    """The Hopper path (r1.fp8's `scaled_mm` backend: F.scaled_mm with 1x128 and 128x128 block scales, the routed
    experts' per-expert loop), which no CI machine runs: torch's checks of its operands' and scales' shapes, strides
    and dtypes pass in a GRPO micro-batch's forward on fake CUDA and its backward on fake CPU."""
    from r1.fp8 import Fp8Config, convert_to_fp8

    fake_cuda()
    for device in ("cuda", "cpu"):
        with FakeTensorMode(), HostSyncs() as hs:
            model = fake_model(C128, device, torch.bfloat16).train()
            convert_to_fp8(model, Fp8Config(block=128, backend="scaled_mm"))
            with even_expert_splits(model, hs):
                if device == "cuda":
                    cfg = trainer.TrainConfig(precision="fp8", micro_batch=2, max_tokens=64)
                    loss, _ = trainer.micro_batch_loss(model, cfg, update_batch(C128, 2, 64, 64, device), None,
                                                       False, 0)
                    assert loss.device.type == "cuda"
                else:
                    grpo_micro_batch(model, update_batch(C128, 2, 64, 64, device), "fp8")
                    assert all(p.grad is not None for n, p in model.named_parameters() if "experts." in n)
