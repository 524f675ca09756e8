"""Expert parallelism (r1.expert_parallel) on gloo processes: the MoE layer and its gradients equal one process's,
a GRPO run equals one without it, each rank holds 1/N of the experts and their optimizer state, a checkpoint
reshards into one process, and bad degrees are one line before anything loads."""

import json
from pathlib import Path

import pytest
import torch
from _launch import torchrun
from _models import exported

from r1.expert_parallel import check_expert_parallel


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported(tmp_path_factory, "tiny")

LAYER = """
import os, sys, torch
from _ep_layer import layer_checks
torch.distributed.init_process_group("gloo")
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
sys.stdout.write(f"rank {rank} ok {' '.join(layer_checks(rank, world, [4, 2]))}\\n")
sys.stdout.flush()
torch.distributed.destroy_process_group()
"""


def test_moe_layer_equals_one_process_4(tmp_path: Path) -> None:
    """The MoE layer split over ep ranks (_ep_layer.layer_checks): outputs, input gradients, every parameter
    gradient and the load counts equal the single-process layer's on the whole batch (fp32, 1e-5), also with a router
    skewed so that every token goes to ep rank 0's experts (the other ranks receive no rows at all). 4 processes,
    ep 4 and ep 2 (dp 2: each shard's gradient summed over its two replicas); the 2-process run is in the GRPO
    test's launch."""
    r = torchrun(LAYER, tmp_path, nproc=4)
    assert r.stdout.count(" ok 4:random 4:skewed 2:random 2:skewed") == 4, r.stdout


def test_bad_degrees_are_one_line() -> None:
    for n, E, world, msg in [(3, 8, 4, "expert_parallel=3 does not divide n_routed_experts=8"),
                             (4, 8, 2, "expert_parallel=4 is larger than the 2 process"),
                             (2, 8, 3, "expert_parallel=2 does not divide the 3 processes"),
                             (0, 8, 1, "expert_parallel must be >= 1")]:
        with pytest.raises(ValueError, match=msg) as e:
            check_expert_parallel(n, E, world)
        assert "\n" not in str(e.value)
    check_expert_parallel(2, 8, 4)


def test_cli_bad_degrees(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Through the command line, before any model loads: a degree that does not divide the experts (train), one larger
    than the world (sft in this one process)."""
    from r1.cli import main

    for args, msg in [(["train", f"model={model_dir}", "expert_parallel=3"], "does not divide n_routed_experts=8"),
                      (["sft", "model=tiny", "expert_parallel=2"], "expert_parallel=2 is larger than the 1 process")]:
        assert main([*args, f"output_dir={tmp_path / args[0]}"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and msg in err, err
        assert not (tmp_path / args[0]).exists()


MODEL = """
import functools, json, sys, torch
from pathlib import Path
from r1 import checkpoint
from r1.compute import compute_context
from r1.expert_parallel import expert_parameters
from r1.model.hf import save_hf
from r1.optim import OPTIMIZERS
from r1.parallel import Dist
from r1.policy import load_policy
from r1.runs import prepare_model
from r1.trainer import TrainConfig, train
from _ep_layer import layer_checks

model_dir, out = sys.argv[1], Path(sys.argv[2])
d = Dist(2)
assert d.fsdp and d.world == 2  # expert parallelism shards the rest with FSDP2
sys.stdout.write(f"layer ok {' '.join(layer_checks(d.rank, d.world, [2]))}\\n")

# a whole GRPO run, 3 steps, with and without expert parallelism (the same seeds: the same rollouts)
for ep in (1, 2):
    train(TrainConfig(model=model_dir, output_dir=str(out / f"grpo{ep}"), rewards=["test_expert_parallel:digit_share"],
                      prompts_per_step=4, group_size=4, max_tokens=6, micro_batch=8, lr=1e-3, steps=3,
                      dynamic_sampling=False, progress=False, expert_parallel=ep, gradient_checkpointing="full"))

# bf16 and fp8 (FSDP2's bf16 parameters for the rest, the local experts cast alike): the loss and the global gradient
# norm of one micro-batch match the run without expert parallelism
ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(d.rank))
for precision in ("bf16", "fp8"):
    got = []
    for dd in (Dist(1), d):
        mm = load_policy(model_dir, shard=functools.partial(prepare_model, dist=dd, precision=precision, fp8_block=16,
                                                            gradient_checkpointing="none"))
        with compute_context(precision, "cpu", sharded=True):
            h = mm(ids, attention_mask=torch.ones_like(ids), mtp=False).hidden
            loss = (h.float() @ mm.lm_head.weight.float().T).logsumexp(-1).mean()
            loss.backward()
        dd.average_grads(mm)
        got.append((loss.item(), float(dd.clip_grad_norm(mm, 1e9))))
    (l1, n1), (l2, n2) = got
    assert abs(l1 - l2) <= 1e-5 * abs(l1) and abs(n1 - n2) <= 1e-5 * n1, (precision, got)
    sys.stdout.write(json.dumps({"rank": d.rank, precision: got}) + "\\n")

# one update by hand: what each rank holds, a checkpoint, the export
m = load_policy(model_dir, shard=functools.partial(prepare_model, dist=d, precision="fp32", fp8_block=128,
                                                   gradient_checkpointing="moe"))
opt = OPTIMIZERS["adamw_torch_fused"](m.parameters(), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.99))
g = torch.Generator().manual_seed(d.rank)
ids = torch.randint(3, 200, (2, 10), generator=g)
o = m(ids, attention_mask=torch.ones_like(ids))  # with MTP: every MoE layer's experts get a gradient
(torch.cat([o.hidden, o.mtp_hidden[0]], 1) @ m.lm_head.weight.T).logsumexp(-1).mean().backward()
d.average_grads(m)
d.clip_grad_norm(m, 1.0)
opt.step()
ex = expert_parameters(m)
held = sum(p.to_local().numel() for p in ex)
state = sum(opt.state[p][k].to_local().numel() for p in ex for k in ("exp_avg", "exp_avg_sq"))
whole = sum(p.numel() for p in ex)
checkpoint.save(out / "ckpt", 1, m, opt, {}, d)
m2 = load_policy(model_dir, shard=functools.partial(prepare_model, dist=d, precision="fp32", fp8_block=128,
                                                    gradient_checkpointing="moe"))
opt2 = OPTIMIZERS["adamw_torch_fused"](m2.parameters(), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.99))
checkpoint.load(out / "ckpt" / "step_00000001", m2, opt2, d)  # a resume at the same degree: this rank's shards
for (n, p), q in zip(m.named_parameters(), m2.parameters(), strict=True):
    assert torch.equal(p.to_local(), q.to_local()), n
for p, q in zip(ex, expert_parameters(m2), strict=True):
    assert torch.equal(opt.state[p]["exp_avg_sq"].to_local(), opt2.state[q]["exp_avg_sq"].to_local())
ids = torch.arange(3, 27).view(2, 12)
with torch.no_grad():
    m.eval()
    logits = m(ids, attention_mask=torch.ones_like(ids), mtp=False).hidden @ m.lm_head.weight.T
save_hf(m, out / "export", main=d.main)
full = d.full_state(m)
if d.main:
    torch.save({"logits": logits, "state": full}, out / "ref.pt")
sys.stdout.write(json.dumps({"rank": d.rank, "held": held, "state": state, "whole": whole}) + "\\n")
sys.stdout.flush()
torch.distributed.destroy_process_group()
"""


def digit_share(completions: list[str], **_: object) -> list[float]:
    """A reward that varies within every group of a random model (loaded as `test_expert_parallel:digit_share`)."""
    return [sum(ch.isdigit() for ch in text) / max(1, len(text)) for text in completions]


def test_grpo_checkpoint_and_shares_at_ep2(model_dir: Path, tmp_path: Path) -> None:
    """2 gloo processes, expert parallelism 2: the MoE layer as layer_checks checks it; then (FSDP2 for the rest,
    full activation checkpointing: the all-to-alls run again in the recompute) 3 GRPO steps give the parameters
    (and router biases) and grad norms of the same run without it; bf16 and fp8 give its loss and grad norm; each
    rank holds half of the experts' parameters and of their AdamW state; the checkpoint resumes at ep 2 (each
    rank's shards and AdamW state) and loads into one process with the same logits, and the HF export (per-expert
    keys) holds the trained weights."""
    from safetensors import safe_open

    from r1 import checkpoint
    from r1.model.hf import load_hf
    from r1.policy import load_policy

    r = torchrun(MODEL, tmp_path, str(model_dir), str(tmp_path), nproc=2, fsdp=True)
    a, b = (load_hf(tmp_path / f"grpo{ep}" / "model").state_dict() for ep in (1, 2))
    start = load_hf(model_dir).state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a if "experts.gate_up" in k)  # the experts trained
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    # AdamW hides a gradient's scale, the logged norm (clipped at 1.0 by Dist.clip_grad_norm) does not
    logs = [[json.loads(x) for x in (tmp_path / f"grpo{ep}" / "metrics.jsonl").read_text().splitlines()]
            for ep in (1, 2)]
    for x, y in zip(*logs, strict=True):
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5) and y["reward"] == x["reward"]
    print(r.stdout)
    assert r.stdout.count("layer ok 2:random 2:skewed") == 2, r.stdout
    shares = [s for s in map(json.loads, (x for x in r.stdout.splitlines() if x.startswith("{"))) if "held" in s]
    assert len(shares) == 2
    for s in shares:
        assert s["held"] * 2 == s["whole"] and s["state"] == 2 * s["held"], s
    ref = torch.load(tmp_path / "ref.pt")
    one = load_policy(str(model_dir)).eval()
    assert checkpoint.load(checkpoint.latest(tmp_path / "ckpt"), one)["step"] == 1
    ids = torch.arange(3, 27).view(2, 12)
    with torch.no_grad():
        logits = one(ids, attention_mask=torch.ones_like(ids), mtp=False).hidden @ one.lm_head.weight.T
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-5)
    exported_sd = load_hf(tmp_path / "export").state_dict()
    for k, v in ref["state"].items():
        assert torch.equal(exported_sd[k], v), k
    with safe_open(str(next((tmp_path / "export").glob("*.safetensors"))), "pt") as f:
        keys = set(f.keys())
    assert {f"model.layers.1.mlp.experts.{j}.{p}.weight" for j in range(8)
            for p in ("gate_proj", "up_proj", "down_proj")} <= keys


def test_plan_accounts_for_expert_parallelism() -> None:
    """`r1 model --plan expert_parallel=N`: the routed experts' fp32 states are 1/N per GPU (the rest 1/gpus), FSDP2
    gathers no expert, and bf16 adds the local experts' compute copies."""
    from r1.model.config import load_config
    from r1.plan import PlanSpec, plan

    c = load_config("deepseek-v3")
    experts = (c.num_hidden_layers - c.first_k_dense_replace + c.num_nextn_predict_layers) * c.n_routed_experts \
        * 3 * c.hidden_size * c.moe_intermediate_size
    one, ep8, ep2 = (plan(c, PlanSpec(gpus=8, precision="bf16", micro_batch_tokens=4096, expert_parallel=n))
                     for n in (1, 8, 2))
    assert ep8.parameters == pytest.approx(one.parameters) and ep8.optimizer == pytest.approx(one.optimizer)
    assert ep2.parameters - one.parameters == pytest.approx(4 * experts * (1 / 2 - 1 / 8))
    assert ep8.gathered_weights < one.gathered_weights / 10  # a V3 block is almost all experts
    assert one.expert_copies == 0 and ep8.expert_copies > 0
    assert ep8.expert_copies == pytest.approx(ep2.expert_copies / 4)
    with pytest.raises(ValueError, match="expert_parallel=3 does not divide gpus=8"):
        PlanSpec(gpus=8, precision="bf16", micro_batch_tokens=1, expert_parallel=3)
