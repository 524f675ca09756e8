"""How the policy computes (r1/compute.py): precision (fp32 / bf16 / fp8) and activation checkpointing, applied from
outside the model, on the CPU (bf16 GEMMs emulated as a GPU computes them)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _v3ref import randomize
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from r1.compute import (
    EmulatedBf16Gemm,
    apply_activation_checkpointing,
    apply_precision,
    check_precision,
    compute_context,
    mixed_precision_policy,
)
from r1.cpu import accelerate
from r1.grpo import policy_loss
from r1.model.config import PRESETS
from r1.model.model import GroupedExperts, V3ForCausalLM
from r1.trainer import sequence_logprobs

BF16_EPS = 2.0 ** -8  # bf16 keeps 8 significant bits: one rounding is at most this relative error


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _batch(B: int = 8, P: int = 6, C: int = 10, vocab: int = 128, seed: int = 0):
    """A GRPO micro-batch as the trainer packs it: left-padded prompts, right-padded completions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, P + C), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a shorter prompt (left padding)
    mask[2, P + 6:] = 0  # a completion that stopped early
    adv = torch.randn(B, generator=g)
    old = torch.randn(B, C, generator=g) * 0.01  # pi_old a little off pi_theta: the ratio is not 1
    return ids, mask, P, adv, old


def _smoke(precision: str = "fp32", fp8_block: int = 32, residual: str = "standard") -> V3ForCausalLM:
    torch.manual_seed(0)
    m = randomize(V3ForCausalLM(PRESETS["smoke"].replace(residual=residual))).train()
    return accelerate(apply_precision(m, precision, fp8_block), "cpu")  # as the trainer runs it on a CPU


def _grpo_step(model: V3ForCausalLM, precision: str, routes: dict | None = None):
    """One micro-batch's GRPO loss, log-probs and gradients, forward and backward inside compute_context, and the
    experts each MoE layer chose. `routes` (another run's choices) are replayed: the gate weights come from this
    run's scores on them (as routing replay does), so a near-tie that bf16 rounding flips, a discontinuity of
    top-k rather than an error, does not decide the comparison."""
    ids, mask, P, adv, old = _batch()
    chosen: dict[int, torch.Tensor] = {}

    def hook(i: int, gate: torch.nn.Module, _inp: tuple, out: tuple) -> tuple | None:
        if routes is None:
            chosen[i] = out[1]
            return None
        w_NK, idx_NK, scores_NE = out
        w_NK = scores_NE.gather(1, routes[i])
        w_NK = w_NK / (w_NK.sum(-1, keepdim=True) + 1e-20) * gate.c.routed_scaling_factor
        return w_NK, routes[i], scores_NE

    handles = [moe.gate.register_forward_hook(lambda g, a, o, i=i: hook(i, g, a, o))
               for i, moe in enumerate(model.moe_layers)]
    model.zero_grad()
    with compute_context(precision, torch.device("cpu"), sharded=False):
        lp, _ = sequence_logprobs(model, ids, mask, P, 1.0)
        loss, _ = policy_loss(lp, old + lp.detach(), adv, mask[:, P:].float())
        loss.backward()
    for h in handles:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), lp.detach(), grads, chosen


@pytest.fixture(scope="module")
def fp32_step():
    return _grpo_step(_smoke("fp32"), "fp32")


# ---------------------------------------------------------------------------------------------- precision
# measured (relative Frobenius errors vs fp32): bf16 log-probs 0.13%, gradients 1.4% in all, 0.9-2.0% per
# parameter; fp8 1.4%, 16%, 11-24% (3 E4M3 roundings per GEMM, and the GRPO gradient's advantage-signed sum
# over tokens cancels, which magnifies relative errors)
@pytest.mark.parametrize("precision, lp_tol, total_tol, param_tol", [("bf16", 0.005, 0.03, 0.05),
                                                                     ("fp8", 0.03, 0.25, 0.4)])
def test_grpo_micro_batch_agrees_with_fp32(fp32_step, precision, lp_tol, total_tol, param_tol):
    """The log-probs, loss and every parameter's gradient in bf16 (fp8) agree with fp32 to bf16 (fp8) tolerance,
    and differ from it: the low precision really ran. Parameters, gradients, log-probs and the loss stay fp32."""
    loss0, lp0, g0, routes = fp32_step
    model = _smoke(precision)
    loss, lp, g, _ = _grpo_step(model, precision, routes)
    assert loss.dtype == lp.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert g.keys() == g0.keys() and all(t.dtype == torch.float32 for t in g.values())
    assert rel(lp, lp0) < lp_tol and torch.allclose(loss, loss0, rtol=lp_tol)
    errs = {n: rel(g[n], g0[n]) for n in g0}
    worst = max(errs, key=errs.get)
    assert errs[worst] < param_tol, (worst, errs[worst])
    total = rel(torch.cat([t.flatten() for t in g.values()]), torch.cat([t.flatten() for t in g0.values()]))
    assert total < total_tol, total
    assert not torch.equal(lp, lp0) and min(errs.values()) > 0, "the low precision did not run"


def test_bf16_gemm_emulation_is_a_real_bf16_gemm():
    """The emulated GEMMs equal torch's own CPU bf16 kernels (fp32 accumulation, one rounding) on the ops the
    update runs, forward and backward, and are counted in backward too."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(48, 80, generator=g).bfloat16() for _ in range(2))
    bias = torch.randn(48, generator=g).bfloat16()
    x3, y3 = torch.randn(3, 16, 24, generator=g).bfloat16(), torch.randn(3, 24, 8, generator=g).bfloat16()
    ref = [a @ b.T, torch.addmm(bias, a, b.T), torch.bmm(x3, y3), torch.baddbmm(x3 @ y3, x3, y3, alpha=0.5)]
    with EmulatedBf16Gemm() as mode:
        emu = [a @ b.T, torch.addmm(bias, a, b.T), torch.bmm(x3, y3), torch.baddbmm(x3 @ y3, x3, y3, alpha=0.5)]
    assert mode.calls == 5
    for r, e in zip(ref, emu, strict=True):
        assert e.dtype == torch.bfloat16
        # one rounding of the same fp32 sum: equal, or one bf16 ulp apart where the summation orders differ
        assert ((e.float() - r.float()).abs() <= BF16_EPS * r.float().abs() + 1e-6).all()
    w = torch.randn(80, 80, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16), EmulatedBf16Gemm() as mode:
        y = F.linear(torch.randn(32, 80), w).float().square().sum()
        forward_calls = mode.calls
        y.backward()
    assert forward_calls == 1 and mode.calls == 2  # the weight gradient's GEMM (the input needs none)
    assert w.grad.dtype == torch.float32


def test_fp32_islands_under_bf16():
    """Under bf16 the router's scores, the norms' statistics, the log-softmax and the loss are fp32 (CPU autocast's
    fp32 list lacks most of them), and the experts' GEMMs run in bf16 through torch._grouped_mm."""
    from r1.logprobs import token_logprobs

    m = _smoke("fp32")
    moe = m.moe_layers[0]
    x = torch.randn(20, m.config.hidden_size)
    with compute_context("bf16", "cpu"):
        w_NK, idx_NK, scores = moe.gate(x)
        assert scores.dtype == w_NK.dtype == torch.float32
        h = m.norm(torch.randn(2, 5, m.config.hidden_size))
        assert h.dtype == torch.float32
        lp, ent = token_logprobs(h, m.lm_head.weight, torch.randint(0, 128, (2, 5)), with_entropy=True)
        assert lp.dtype == ent.dtype == torch.float32
        counts = torch.bincount(idx_NK.flatten(), minlength=m.config.n_routed_experts)
        xs = x.index_select(0, idx_NK.flatten().argsort(stable=True) // 2)
        y = GroupedExperts.grouped_mm(xs, moe.experts.gate_up_proj, counts)
        assert y.dtype == torch.bfloat16
    assert torch.equal(scores, moe.gate(x)[2])


def test_fp8_gemms_accumulate_in_fp32_under_autocast():
    """Under bf16 autocast an FP8 linear and FP8 experts take bf16 activations and return bf16 (as V3 runs them),
    with their dequantised GEMMs still accumulated in fp32: the same as called on the bf16 input without autocast."""
    from r1.fp8 import Fp8Config, Fp8GroupedExperts, Fp8Linear

    torch.manual_seed(0)
    lin = Fp8Linear.from_linear(torch.nn.Linear(64, 48), Fp8Config(block=32))
    ex = Fp8GroupedExperts.from_experts(randomize_experts(GroupedExperts(4, 64, 32)), Fp8Config(block=32))
    x, counts = torch.randn(40, 64), torch.tensor([10, 0, 25, 5])
    with compute_context("fp8", "cpu"):
        y, ye = lin(x), ex(x, counts)
    assert y.dtype == ye.dtype == torch.bfloat16
    assert torch.equal(y, lin(x.bfloat16())) and torch.equal(ye, ex(x.bfloat16(), counts))


def randomize_experts(ex: GroupedExperts) -> GroupedExperts:
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(std=0.1)
    return ex


def test_cpu_layer_falls_back_under_autocast():
    """The CPU layer's fp32 paths give way to the reference under autocast (RMSNorm's custom backward, the MoE
    decode shortcuts): an accelerated model's bf16 micro-batch, and its no-grad eval forward, equal the plain
    model's bit for bit."""
    torch.manual_seed(0)
    plain = randomize(V3ForCausalLM(PRESETS["smoke"])).train()
    fast = accelerate(copy.deepcopy(plain), "cpu")
    (l0, lp0, g0, _), (l1, lp1, g1, _) = _grpo_step(plain, "bf16"), _grpo_step(fast, "bf16")
    assert torch.equal(lp0, lp1) and torch.equal(l0, l1)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)
    ids = _batch()[0][:2, :3]  # a handful of tokens: CPUMoE's gathered-weights shortcut would take them in fp32
    with torch.no_grad(), compute_context("bf16", "cpu"):
        assert torch.equal(plain.eval()(ids).hidden, fast.eval()(ids).hidden)


@pytest.mark.parametrize("residual", ["hc", "mhc"])
def test_hyper_connections_under_bf16(residual):
    """The reference hyper-connection path (what a GPU runs) under bf16 autocast: the streams and their mixing stay
    fp32 and only the block is cast, so forward and backward run and the gradients stay near fp32's."""
    torch.manual_seed(0)
    m = V3ForCausalLM(PRESETS["tiny"].replace(residual=residual)).train()
    ids = torch.randint(0, 256, (2, 12))
    grads = {}
    for precision in ("fp32", "bf16"):
        m.zero_grad(set_to_none=True)
        with compute_context(precision, "cpu"):
            out = m(ids)
            (out.hidden.float() ** 2).mean().backward()
        assert out.hidden.dtype == torch.float32  # the merged stream is the fp32 one
        grads[precision] = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
    err = (grads["bf16"] - grads["fp32"]).norm() / grads["fp32"].norm()
    assert 0 < err < 0.05


def test_precision_plumbing():
    assert mixed_precision_policy("fp32") is None
    mp = mixed_precision_policy("bf16")
    assert mp.param_dtype == torch.bfloat16 and mp.reduce_dtype == torch.float32
    with compute_context("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with compute_context("bf16", "cpu", sharded=True):  # FSDP2 casts the parameters: no autocast, GEMMs emulated
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2).bfloat16() @ torch.ones(2, 2).bfloat16()).dtype == torch.bfloat16
    from r1.fp8 import Fp8GroupedExperts, Fp8Linear

    m = _smoke("fp8")
    assert isinstance(m.layers[1].mlp.experts, Fp8GroupedExperts) and m.layers[1].mlp.experts.cfg.block == 32
    assert isinstance(m.layers[0].self_attn.o_proj, Fp8Linear) and not isinstance(m.lm_head, Fp8Linear)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("precision, config, block, message", [
    ("fp16", PRESETS["smoke"], 128, "unknown precision 'fp16'; choose one of fp32, bf16, fp8"),
    ("fp8", PRESETS["smoke"], 128, "kv_b_proj (kv_lora_rank) = 32 is not a multiple of fp8_block=128; "
                                   "fp8_block=32 fits every one"),
    ("fp8", PRESETS["tiny"], 32, "q_b_proj (q_lora_rank) = 48 is not a multiple of fp8_block=32; "
                                 "fp8_block=16 fits every one"),
    ("fp8", PRESETS["smoke"].replace(kv_lora_rank=24), 32, "no block of 16 or more divides them all"),
    ("fp8", None, 128, "precision=fp8 needs the native V3 model (got a NoneType)"),
    ("fp8", PRESETS["smoke"], 24, "fp8_block must be a positive multiple of 16, got 24"),
])
def test_bad_precision_one_line(precision, config, block, message):
    with pytest.raises(ValueError, match=None) as e:
        check_precision(precision, config, block)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_good_precisions_pass():
    for p in ("fp32", "bf16"):
        check_precision(p, None, 128)
    check_precision("fp8", PRESETS["smoke"], 32)
    check_precision("fp8", PRESETS["deepseek-v3"], 128)


# ---------------------------------------------------------------------------------------------- checkpointing
class PeakBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated inside the block and still alive, counted at the dispatch level as
    torch's MemTracker counts them (storages, not views; a storage is freed when its last tensor goes), without
    MemTracker's per-module bookkeeping (several times slower; it also refuses modules called twice a step)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ref in [r for r in self.live if r.expired()]:
            self.now -= self.live.pop(ref)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (ref := StorageWeakRef(t.untyped_storage())) not in self.live:
                self.live[ref] = t.untyped_storage().nbytes()
                self.now += self.live[ref]
        self.peak = max(self.peak, self.now)
        return out


def _peak_and_grads(mode: str, precision: str = "fp32", tokens: tuple[int, int] = (8, 64)):
    """One forward + backward with gradient_checkpointing=mode: the peak bytes it allocates, the gradients and the
    MoE load counts. Experts wide enough (I 256, top-4) that theirs are a good part of the activations."""
    torch.manual_seed(0)
    c = PRESETS["smoke"].replace(moe_intermediate_size=256, num_experts_per_tok=4, n_group=1, topk_group=1)
    m = apply_activation_checkpointing(_accelerated(randomize(V3ForCausalLM(c)).train(), precision), mode)
    ids = torch.randint(3, 128, tokens, generator=torch.Generator().manual_seed(0))
    with PeakBytes() as mem, compute_context(precision, "cpu"):
        m.logits(ids).float().logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    return mem.peak, grads, [moe.tokens_per_expert.sum().item() for moe in m.moe_layers], m


def _accelerated(m: V3ForCausalLM, precision: str) -> V3ForCausalLM:
    return accelerate(apply_precision(m, precision, 32), "cpu")


# measured here (8 x 64 tokens, fp32): none 40.5 MB, full 25.3 MB (0.62x), moe 33.8 MB (0.83x)
def test_checkpointing_same_gradients_lower_peak():
    """full (each block recomputed in backward) and moe (only the routed experts' activations) give the gradients
    of no checkpointing bit for bit (the recompute runs the same ops on the same inputs) and lower the step's peak
    memory; moe keeps the parameter names (checkpoints, HF export)."""
    peak0, g0, loads0, m0 = _peak_and_grads("none")
    names = [n for n, _ in m0.named_parameters()]
    peaks = {}
    for mode in ("full", "moe"):
        peaks[mode], g, loads, m = _peak_and_grads(mode)
        assert g.keys() == g0.keys() and all(torch.equal(g[n], g0[n]) for n in g0), mode
        # a block's recompute counts its tokens' expert loads again, uniformly (balancing reads sign(mean - load));
        # the experts' recompute does not run the router
        assert loads == ([2 * n for n in loads0[:-1]] + loads0[-1:] if mode == "full" else loads0), mode
        assert [n for n, _ in m.named_parameters()] == names
    assert peaks["full"] < 0.75 * peak0 and peaks["moe"] < 0.92 * peak0, (peak0, peaks)


def test_moe_checkpointing_wraps_fp8_experts():
    """moe checkpointing after apply_precision(fp8) recomputes the FP8 experts: same gradients as without."""
    _, g0, _, _ = _peak_and_grads("none", "fp8", (2, 16))
    _, g1, _, m = _peak_and_grads("moe", "fp8", (2, 16))
    from r1.fp8 import Fp8GroupedExperts

    assert isinstance(m.layers[1].mlp.experts, Fp8GroupedExperts) and type(m.layers[1].mlp.experts).__name__ \
        == "CheckpointedFp8GroupedExperts"
    assert all(torch.equal(g1[n], g0[n]) for n in g0)


def test_bad_checkpointing_one_line():
    from transformers import LlamaConfig, LlamaForCausalLM

    with pytest.raises(ValueError) as e:
        apply_activation_checkpointing(V3ForCausalLM(PRESETS["tiny"]), "blocks")
    assert str(e.value) == "unknown gradient_checkpointing 'blocks'; choose one of none, full, moe"
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError) as e:
        apply_activation_checkpointing(llama, "moe")
    assert "gradient_checkpointing=moe needs the native V3 model's routed experts" in str(e.value)
    assert "\n" not in str(e.value)
    assert apply_activation_checkpointing(llama, "full").is_activation_checkpointing
