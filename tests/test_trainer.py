"""The GRPO trainer end to end on a tiny V3 model: bitwise resume, crash-safe checkpoints, data-parallel
launch, one-line errors before any compute, and the CLI's recipe loading."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _models import exported

from r1 import checkpoint
from r1.cli import main
from r1.model.model import V3ForCausalLM
from r1.trainer import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def digit_share(completions: list[str], **_: object) -> list[float]:
    """A plugin reward (loaded as `test_trainer:digit_share`) that varies within every group of a random model,
    so dynamic sampling keeps groups and every step updates the weights."""
    return [sum(c.isdigit() for c in text) / max(1, len(text)) for text in completions]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported(tmp_path_factory, "smoke")


def tiny(model_dir: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(model=str(model_dir), output_dir=str(out), rewards=["test_trainer:digit_share"], prompts_per_step=4,
                group_size=4, max_tokens=8, micro_batch=8, lr=1e-3, progress=False)
    return TrainConfig(**{**base, **kw})


def params(ckpt: Path) -> dict[str, torch.Tensor]:
    return checkpoint.read_state(ckpt)["model"]


def test_resume_is_bitwise(model_dir: Path, tmp_path: Path) -> None:
    """Stop at step 2 and resume to step 4 == 4 steps without stopping (model, optimizer, RNG, data position)."""
    train(tiny(model_dir, tmp_path / "straight", steps=4))
    train(tiny(model_dir, tmp_path / "resumed", steps=2))
    stopped = params(checkpoint.latest(tmp_path / "resumed" / "checkpoints"))
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:  # as if killed after logging step 3, before saving
        f.write(json.dumps({"step": 3, "reward": -1.0}) + "\n")
    train(tiny(model_dir, tmp_path / "resumed", steps=4, resume="auto"))
    a = params(checkpoint.latest(tmp_path / "straight" / "checkpoints"))
    b = params(checkpoint.latest(tmp_path / "resumed" / "checkpoints"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the run really trained in between: the weights moved from step 2 to step 4
    assert any(not torch.equal(stopped[k], b[k]) for k in b if b[k].is_floating_point())
    lines = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    straight = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [x["reward"] for x in lines] == [x["reward"] for x in straight]
    # the exported model directory is what transformers-format loading reads
    assert (tmp_path / "resumed" / "model" / "config.json").is_file()


# ------------------------------------------------------------------------------------------ bad input, one line
def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    rc = main(args)
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize("args, needle", [
    (["train", "lrr=1e-4"], "unknown key 'lrr' (did you mean 'lr'?)"),
    (["train", "steps=many"], "steps: expected int, got 'many'"),
    (["train", "model=/no/such/model"], "model '/no/such/model' not found"),
    (["train", "rewards=[math,maths_typo]"], "unknown reward 'maths_typo'"),
    (["train", "aggregation=dapoo"], "unknown aggregation 'dapoo'"),
    (["train", "optim=adamw_bf17"], "unknown optim 'adamw_bf17'; known: adamw_torch_fused, adamw_bf16"),
    (["sft", "optim=sgd"], "unknown optim 'sgd'"),
    (["train", "dual_clip=0.5"], "dual_clip must be > 1"),
    (["train", "no_such_recipe.yaml"], "recipe 'no_such_recipe.yaml' not found"),
    (["sft", "batch_sise=4"], "unknown key 'batch_sise' (did you mean 'batch_size'?)"),
    (["train", "routing_replay=engine"], "unknown routing_replay 'engine'; known: none, rollout"),
    (["train", "routing_replay=rollout", "engine=vllm"], "routing_replay=rollout needs an engine that returns"),
    (["train", "mismatch_mask=tokens"], "unknown mismatch_mask 'tokens'; known: none, sequence, token"),
    (["train", "mismatch_low=2"], "mismatch bounds must satisfy"),
])
def test_bad_input_is_one_line_before_compute(args: list[str], needle: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    rc, err = run_cli([*args, f"output_dir={out}"] if "=" in args[-1] else args, capsys)
    assert rc == 2
    assert needle in err and err.startswith(f"r1 {args[0]}: error:")
    assert "\n" not in err
    assert not out.exists()  # nothing was written: the error came before any compute


def test_missing_column_is_one_line(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n")
    rc, err = run_cli(["train", f"model={model_dir}", f"dataset={data}", f"output_dir={tmp_path / 'run'}"], capsys)
    assert rc == 2 and "\n" not in err
    assert "has no column 'prompt'; its columns: question, answer" in err
    assert not (tmp_path / "run").exists()


def test_recipes_load(tmp_path: Path) -> None:
    """Every shipped recipe is a valid typed config (a renamed field breaks this test, not a user's run)."""
    from r1.config import load_config as load_recipe
    from r1.smoke import SmokeConfig

    for path in (ROOT / "recipes").glob("*.yaml"):
        cfg = load_recipe(SmokeConfig if path.stem == "smoke" else TrainConfig, str(path))
        assert cfg.output_dir.startswith("runs/")


def test_train_from_recipe_with_overrides(model_dir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model_dir}\nrewards: [test_trainer:digit_share]\nsteps: 5\nprompts_per_step: 2\n"
                      f"group_size: 2\nmax_tokens: 4\nprogress: false\n")
    assert main(["train", str(recipe), "steps=1", f"output_dir={tmp_path / 'run'}"]) == 0
    assert main(["train", str(recipe), "steps=1", f"output_dir={tmp_path / 'run'}"]) == 0  # a fresh rerun, same dir
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "steps: 1\n" in saved and "group_size: 2\n" in saved  # override beat the file, the file the defaults
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    m = json.loads(lines[0])
    for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/test_trainer:digit_share/mean", "entropy",
                "clip_ratio/region_mean", "logprob_gap/engine_vs_trainer", "moe/max_over_mean", "time/rollout",
                "tokens_per_s/rollout", "completion_length/mean"):
        assert key in m, key


def odd_prompts_signal(completions: list[str], prompt: list[str], **_: object) -> list[float]:
    """A plugin reward with signal exactly in the groups of prompts that start with an odd digit: 0, 1, 0, 1."""
    return [float(i % 2) if int(p[0]) % 2 else 0.0 for i, p in enumerate(prompt)]


def test_dynamic_sampling_draws_in_one_call(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups without signal are dropped. The first step refills once, by grpo.refill_prompts' size at its own
    keep rate; later steps draw 1 + max_refills rounds' worth up front, in one generate call, at the last step's
    rate. Surplus groups are not trained on; the data position moves past every prompt drawn."""
    import random

    import rollouts
    from r1 import trainer
    from r1.data import smoke_rl_rows
    from r1.grpo import refill_prompts

    calls: list[int] = []
    packed: list[int] = []
    generate, pack = rollouts.TorchEngine.generate, trainer.pack
    monkeypatch.setattr(rollouts.TorchEngine, "generate",
                        lambda self, ids, sp, n=1: calls.append(len(ids)) or generate(self, ids, sp, n))
    monkeypatch.setattr(trainer, "pack", lambda prompts, *a: packed.append(len(prompts)) or pack(prompts, *a))
    train(tiny(model_dir, tmp_path / "run", rewards=["test_trainer:odd_prompts_signal"], steps=3,
               prompts_per_step=8, max_refills=2))
    rows = smoke_rl_rows(seed=0)
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    odd = [int(rows[i]["prompt"][0]) % 2 for i in order]
    expected_calls: list[list[int]] = []
    expected_kept, cursor, rate = [], 0, None
    for _ in range(3):
        draws = [8] if rate is None else [refill_prompts(8, rate, 3)]
        signal = sum(odd[cursor:cursor + draws[0]])
        kept, cursor = min(8, signal), cursor + draws[0]
        if rate is None and kept < 8:
            draws.append(refill_prompts(8 - kept, signal / 8, 2))
            assert draws[1] > 8 - kept  # oversampled for the groups it will drop
            signal += sum(odd[cursor:cursor + draws[1]])
            kept, cursor = min(8, signal), cursor + draws[1]
        expected_calls.append(draws)
        expected_kept.append(4 * kept)
        rate = signal / sum(draws)
    assert len(expected_calls[1]) == 1 and expected_calls[1][0] > 8  # one call, sized up front
    assert calls == [n for step in expected_calls for n in step]
    assert packed == expected_kept
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["rollouts"] for x in logged] == [4 * sum(step) for step in expected_calls]


# ------------------------------------------------------------------------------------------ data parallel
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not on PATH")
def test_two_process_ddp_and_fsdp2(model_dir: Path, tmp_path: Path) -> None:
    """`accelerate launch` with 2 CPU processes (gloo), data parallel and FSDP2: ranks sample different rollouts,
    end with identical parameters (the trainer checks this and fails otherwise), and the two strategies compute the
    same update (same seeds, so the same rollouts): their exported weights agree."""
    from r1.model.hf import load_hf

    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    args = [f"model={model_dir}", "rewards=[test_trainer:digit_share]", "steps=2", "prompts_per_step=4",
            "group_size=4", "max_tokens=8", "dynamic_sampling=false", "progress=false"]
    launch = {"ddp": ["--config_file", str(ROOT / "recipes/accelerate/cpu.yaml")],
              "fsdp": ["--config_file", str(ROOT / "recipes/accelerate/fsdp.yaml"), "--num_processes", "2",
                       "--mixed_precision", "no"]}
    for name, flags in launch.items():
        cmd = ["accelerate", "launch", *flags, "-m", "r1", "train", *args, f"output_dir={tmp_path / name}"]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == [1, 2]
        # each rank rolled out its own half of the prompts: 2 prompts x 4 samples (a mean over ranks)
        assert lines[0]["rollouts"] == 8
    ddp, fsdp = (load_hf(tmp_path / n / "model").state_dict() for n in launch)
    start = load_hf(model_dir).state_dict()
    assert any(not torch.equal(ddp[k], start[k]) for k in ddp)  # it trained
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-4, atol=1e-5)


RANK_CHECK = """
import torch
from r1.trainer import Dist
d = Dist()
assert d.world == 2
torch.manual_seed(0)
m = torch.nn.Linear(4, 4)
assert d.same_parameters(m)
if d.rank == 1:
    with torch.no_grad():
        m.weight[0, 0] += 1e-6
assert not d.same_parameters(m)  # both ranks see the difference
m.weight.grad = torch.full_like(m.weight, float(d.rank))
m.bias.grad = None
d.average_grads(m)
assert torch.allclose(m.weight.grad, torch.full_like(m.weight, 0.5)) and torch.equal(m.bias.grad, torch.zeros(4))
import sys
sys.stdout.write(f"ok {d.rank}\\n")  # one write: the two ranks share the pipe
sys.stdout.flush()
torch.distributed.destroy_process_group()  # gloo can abort at interpreter exit otherwise
"""


def test_rank_checks_detect_divergence(tmp_path: Path) -> None:
    script = tmp_path / "check.py"
    script.write_text(RANK_CHECK)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ok 0" in r.stdout and "ok 1" in r.stdout


def test_smoke_pipeline_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`r1 smoke` with a few steps: SFT, held-out eval, GRPO, eval, result.json and the plot."""
    rc = main(["smoke", f"output_dir={tmp_path}", "sft_steps=3", "grpo_steps=2", "grpo_prompts=4", "eval_problems=8",
               "progress=false"])
    assert rc == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert set(result) >= {"seed", "accuracy_sft", "accuracy_grpo"}
    assert 0.0 <= result["accuracy_sft"] <= 1.0 and 0.0 <= result["accuracy_grpo"] <= 1.0
    out = capsys.readouterr().out
    assert f"held-out accuracy after SFT:  {result['accuracy_sft']:.1%}" in out
    assert len((tmp_path / "grpo" / "heldout_generations.jsonl").read_text().splitlines()) == 8
    assert (tmp_path / "curves.png").stat().st_size > 1000
    heldout = [json.loads(x)["prompt"] for x in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    from r1.data import smoke_rl_rows, smoke_splits

    assert not set(heldout) & {r["prompt"] for r in smoke_splits(seed=0)[0]}  # held out means unseen: by SFT
    rl = smoke_rl_rows(seed=0)
    assert not set(heldout) & {r["prompt"] for r in rl}  # and by GRPO
    assert len({r["prompt"] for r in rl}) > 5000 and all(str(eval(r["prompt"])) == r["answer"] for r in rl[:500])


@pytest.mark.parametrize("kw", [dict(), dict(kv_lora_rank=8, residual="mhc"), dict(checkpointing=True)],
                         ids=["expanded-keys", "latent-keys-mhc", "checkpointed"])
def test_shared_prompts_give_the_same_logprobs_and_gradients(kw: dict) -> None:
    """A micro-batch of GRPO groups (left-padded prompts of different lengths, G rows each, a ragged completion):
    running each prompt once (SharedPrefix) gives the log-probs, entropies and parameter gradients of running
    every row whole, and the same MoE load counts (a shared prompt token weighs the G rows that share it).
    Covers both attention forms of the completion pass (keys expanded per head; latent, where a latent row is
    narrower) and checkpointed layers."""
    from _v3ref import randomize

    from r1.model.config import PRESETS
    from r1.trainer import sequence_logprobs

    checkpointing = kw.pop("checkpointing", False)
    torch.manual_seed(1)
    m = randomize(V3ForCausalLM(PRESETS["tiny"].replace(**kw))).train()
    m.gradient_checkpointing = checkpointing
    U, G, P, C = 3, 4, 9, 6
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (9, 6, 3)]
    rows = torch.arange(U).repeat_interleave(G)
    ids = torch.zeros(U * G, P + C, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows.tolist()):
        ids[i, P - len(prompts[r]):P], mask[i, P - len(prompts[r]):] = torch.tensor(prompts[r]), 1
    ids[:, P:] = torch.randint(3, 256, (U * G, C))
    mask[5, P + 2:] = 0  # a completion that stopped early (right padding)
    out = {}
    for share in (False, True):
        m.zero_grad()
        for moe in m.moe_layers:
            moe.tokens_per_expert.zero_()
        lp, ent = sequence_logprobs(m, ids, mask, P, 0.7, with_entropy=True, share_prompts=share)
        (lp * mask[:, P:]).sum().backward()
        out[share] = (lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                                                  if p.grad is not None},
                      torch.stack([moe.tokens_per_expert.clone() for moe in m.moe_layers]))
    (lp0, ent0, g0, loads0), (lp1, ent1, g1, loads1) = out[False], out[True]
    loads = {False: loads0, True: loads1}
    valid = mask[:, P:].bool()
    assert (lp0 - lp1)[valid].abs().max() < 1e-5 and (ent0 - ent1)[valid].abs().max() < 1e-5
    assert g0.keys() == g1.keys()
    floor = 1e-7 * max(g.abs().max() for g in g0.values())  # sums that nearly cancel (HC biases) differ by rounding
    for n in g0:
        assert (g0[n] - g1[n]).abs().max() <= 1e-5 * g0[n].abs().max() + floor, n
    K, layers = m.config.num_experts_per_tok, m.config.num_hidden_layers - m.config.first_k_dense_replace  # MTP off
    passes = 2 if checkpointing else 1  # a recompute counts again (uniformly: balancing reads sign(mean - load))
    assert torch.equal(loads[False], loads[True])  # shared prompt tokens weigh G rows each: the same balancing
    assert loads[True].sum() == passes * K * layers * mask.sum().item()


def test_pack_pads_prompts_left_and_completions_right() -> None:
    from r1.trainer import pack

    ids, attn, cmask, elogp, P = pack([[5, 6, 7], [8]], [[9], [10, 11, 12]], [[-0.5], [-1.0, -2.0, -3.0]], 0)
    assert P == 3
    assert ids.tolist() == [[5, 6, 7, 9, 0, 0], [0, 0, 8, 10, 11, 12]] and ids.dtype == torch.long
    assert attn.tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert cmask.tolist() == [[1, 0, 0], [1, 1, 1]] and cmask.dtype == torch.float32
    assert elogp.tolist() == [[-0.5, 0, 0], [-1.0, -2.0, -3.0]]
    # an empty completion: one masked column
    ids, attn, cmask, elogp, P = pack([[4]], [[]], [[]], 0)
    assert ids.tolist() == [[4, 0]] and attn.tolist() == [[1, 0]] and cmask.tolist() == [[0]] and elogp.shape == (1, 1)


def test_reference_and_inner_updates_side_by_side(model_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """beta > 0 (a reference model) and mu = 2 (the log-probs before the update): their no-grad passes run two
    micro-batches at a time (update_workers=2) and give the log-probs of one at a time."""
    from r1 import trainer

    batches: dict[int, list] = {1: [], 2: []}
    real = trainer.UpdateBatch
    for w in (1, 2):
        monkeypatch.setattr(trainer, "UpdateBatch", lambda *a, _w=w: batches[_w].append(real(*a)) or batches[_w][-1])
        train(tiny(model_dir, tmp_path / f"w{w}", steps=1, beta=0.05, mu=2, update_workers=w, dynamic_sampling=False))
        logged = json.loads((tmp_path / f"w{w}" / "metrics.jsonl").read_text().splitlines()[0])
        assert logged["kl"] > 0  # the second inner update moved away from the reference
    (a,), (b,) = batches[1], batches[2]
    assert a.old is not None and a.ref is not None and a.old.shape == a.ids[:, a.prompt_len:].shape
    assert torch.equal(a.ids, b.ids)  # the same rollouts
    torch.testing.assert_close(b.old, a.old, rtol=0, atol=1e-5)
    torch.testing.assert_close(b.ref, a.ref, rtol=0, atol=1e-5)
    assert torch.equal(a.old, a.ref)  # before the first update the policy is the reference
    # and they are the starting model's log-probs of the whole batch, computed here in one pass without sharing
    from r1.policy import load_policy
    from r1.trainer import sequence_logprobs

    with torch.no_grad():
        direct = sequence_logprobs(load_policy(str(model_dir)).train(), a.ids, a.attn, a.prompt_len, 1.0)[0]
    torch.testing.assert_close(a.old, direct, rtol=0, atol=1e-5)


BATCH_ADVANTAGES = """
import sys, torch
from r1.trainer import Dist, TrainConfig, advantages
d = Dist()
rewards = [float(x) for x in sys.argv[1].split(",")]
n = len(rewards) // d.world  # rank r holds the r-th slice of whole groups
adv = advantages(rewards[d.rank * n:(d.rank + 1) * n], TrainConfig(group_size=4, advantage_scale="batch"), d)
torch.save(adv, f"{sys.argv[2]}/adv{d.rank}.pt")
torch.distributed.destroy_process_group()
"""


def test_batch_advantages_are_the_same_on_two_processes(tmp_path: Path) -> None:
    """advantage_scale=batch: 4 groups of 4 split over 2 processes (gloo) give the advantages of 1 process holding
    all 16, i.e. every rank scales by the std of the global batch, not of its own half."""
    from r1.grpo import group_advantages

    # rank 0's half is spread out (std ~4), rank 1's nearly flat (std ~0.6): per-rank scales differ by ~7x
    rewards = [0.0, 10.0, 2.0, 7.0, 1.0, 9.0, 4.0, 3.0, 0.0, 1.0, 0.5, 1.5, 1.0, 0.0, 1.0, 1.5]
    script = tmp_path / "adv.py"
    script.write_text(BATCH_ADVANTAGES)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                        ",".join(map(str, rewards)), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    two = torch.cat([torch.load(tmp_path / f"adv{i}.pt") for i in range(2)])
    one = group_advantages(torch.tensor(rewards), 4, scale="batch")
    torch.testing.assert_close(two, one, rtol=0, atol=1e-6)


def test_bf16_moment_adamw_resumes_bitwise() -> None:
    """optim=adamw_bf16: 3 steps, a state-dict round trip into a fresh optimizer, 2 more == 5 steps straight. The
    stochastic rounding's noise is a function of (seed, step, parameter), so the state dict is all it needs."""
    from r1.optim import OPTIMIZERS

    torch.manual_seed(0)
    grads = [[torch.randn(64, 32), torch.randn(32)] for _ in range(5)]
    start = [torch.randn(64, 32), torch.randn(32)]

    def run(split: int | None) -> list[torch.Tensor]:
        ps = [torch.nn.Parameter(t.clone()) for t in start]
        opt = OPTIMIZERS["adamw_bf16"](ps, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
        for i, g in enumerate(grads):
            if i == split:
                state = opt.state_dict()
                opt = OPTIMIZERS["adamw_bf16"](ps, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
                opt.load_state_dict(state)
            for p, gi in zip(ps, g, strict=True):
                p.grad = gi.clone()
            opt.step()
        assert opt.state[ps[0]]["exp_avg"].dtype == torch.bfloat16
        return [p.detach() for p in ps]

    straight, resumed = run(None), run(3)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True))


def test_optim_key_picks_the_optimizer(model_dir: Path, tmp_path: Path) -> None:
    train(tiny(model_dir, tmp_path / "run", steps=1, optim="adamw_bf16", dynamic_sampling=False))
    opt = checkpoint.read_state(checkpoint.latest(tmp_path / "run" / "checkpoints"))["optimizer"]
    moments = [s["exp_avg"] for s in opt["state"].values() if "exp_avg" in s]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)


def test_routing_replay_in_the_loop(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """routing_replay=rollout with dynamic-sampling refills, padded prompts and completions, micro-batches and full
    activation checkpointing (the routers recomputed in backward): the engine's recorded experts line up with the
    training forward token for token (the same weights route alike: agreement ~1; one token off would be ~0.1),
    and every replayed forward saw the rollout's routing."""
    from r1 import trainer

    made = []
    real = trainer.routing_replays
    monkeypatch.setattr(trainer, "routing_replays", lambda *a: made.append(real(*a)) or made[-1])
    train(tiny(model_dir, tmp_path / "r3", steps=2, routing_replay="rollout", gradient_checkpointing="full",
               micro_batch=4, mismatch_mask="token"))
    logged = [json.loads(x) for x in (tmp_path / "r3" / "metrics.jsonl").read_text().splitlines()]
    assert all(x["moe/routing_agreement"] > 0.97 for x in logged), [x["moe/routing_agreement"] for x in logged]
    assert all("mismatch/masked_fraction" in x for x in logged)
    assert len(made) == 2 and all(len(step) >= 2 for step in made)  # two micro-batches or more each step
    for step in made:
        for rp in step:
            same, total = rp.tally()
            assert total > 0  # every micro-batch's forward replayed recorded experts


def test_routing_replay_needs_a_moe_policy(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    from r1.model.config import PRESETS
    from r1.model.model import V3ForCausalLM
    from r1.policy import export
    from r1.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("dense")
    export(V3ForCausalLM(PRESETS["smoke"].replace(first_k_dense_replace=3, num_nextn_predict_layers=0)),
           load_tokenizer("char"), d)
    with pytest.raises(ValueError, match="routing_replay=rollout needs a policy with MoE layers"):
        train(tiny(d, tmp_path / "dense", steps=1, routing_replay="rollout"))
    assert not (tmp_path / "dense").exists()  # before anything is written
