"""The oneDNN GEMM path (r1/cpu/gemm.py, swapped in by r1.cpu.accelerate): each of its three GEMMs against an
fp64 reference, the grouped experts against a per-expert loop, the fallbacks, and a swapped V3 model against
transformers' DeepseekV3."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _v3ref import hf_copy, randomize

from r1.cpu import accelerate
from r1.cpu import gemm as cpu_gemm
from r1.cpu.gemm import MIN_ROWS, OneDNNLinear
from r1.cpu.moe import CPUGroupedExperts
from r1.logprobs import lm_loss
from r1.model.config import PRESETS
from r1.model.model import V3ForCausalLM

pytestmark = pytest.mark.skipif(cpu_gemm.LINEAR_OP is None, reason="this torch build has no oneDNN linear op")


@pytest.fixture(autouse=True)
def onednn_on():
    """The kernels are tested on every CPU, whether or not this one picks them by default (AVX-512 only)."""
    cpu_gemm.prefer(True)
    yield
    cpu_gemm.prefer(None)


def _leaves64(*ts):
    """fp64 copies to run the reference through (torch's autograd and matmul, in double)."""
    return [t.detach().double().requires_grad_() for t in ts]


@pytest.mark.parametrize("out_features", [112, 200])  # wgrad's two forms: N <= K and N > K
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_fp64_forward_and_all_grads(out_features, bias):
    torch.manual_seed(0)
    x = torch.randn(6, 100, 128, requires_grad=True)  # 600 rows: 9 buckets of 64 and an overlapping tail
    assert cpu_gemm._worth(600, 128, out_features)
    w = torch.randn(out_features, 128, requires_grad=True)
    b = torch.randn(out_features, requires_grad=True) if bias else None
    y = cpu_gemm.linear(x, w, b)
    assert "_Linear" in type(y.grad_fn.next_functions[0][0]).__name__  # the oneDNN Function ran (under a view)
    g = torch.randn_like(y)
    y.backward(g)
    ins = [x, w] + ([b] if bias else [])
    ins64 = _leaves64(*ins)
    y64 = F.linear(*ins64)
    y64.backward(g.double())
    assert (y.double() - y64).abs().max() < 1e-4
    for t, t64 in zip(ins, ins64, strict=True):
        assert t.grad.shape == t.shape
        assert (t.grad.double() - t64.grad).abs().max() < 1e-3 * t64.grad.abs().max()


def test_linear_reads_strided_inputs_and_small_batches_fall_back():
    torch.manual_seed(1)
    w = torch.randn(512, 32)
    x = torch.randn(600, 80)[:, 10:42]  # a column slice: rows 80 apart
    assert not x.is_contiguous() and cpu_gemm._worth(600, 32, 512)
    assert torch.allclose(cpu_gemm.linear(x, w), x @ w.T, atol=1e-4)
    small = torch.randn(MIN_ROWS - 1, 32)
    assert torch.equal(cpu_gemm.linear(small, w), F.linear(small, w))  # torch's own kernel, bit for bit
    bf = torch.randn(64, 32, dtype=torch.bfloat16)
    assert torch.equal(cpu_gemm.linear(bf, w.bfloat16()), F.linear(bf, w.bfloat16()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_gemm.linear(torch.randn(64, 32), w).dtype == torch.bfloat16  # autocast still applies


def test_grouped_mm_matches_a_loop_over_experts_including_empty_ones():
    torch.manual_seed(2)
    splits = [40, 0, 70, 33, 0, 57, 5]  # two experts get no token; one fewer rows than a bucket
    E, Y, X = len(splits), 24, 16
    x = torch.randn(sum(splits), X, requires_grad=True)
    w = torch.randn(E, Y, X, requires_grad=True)
    y = cpu_gemm._GroupedMM.apply(x, w, splits)
    g = torch.randn_like(y)
    y.backward(g)
    x64, w64 = _leaves64(x, w)
    y64 = torch.cat([xs @ w64[e].T for e, xs in enumerate(x64.split(splits))])
    y64.backward(g.double())
    assert (y.double() - y64).abs().max() < 1e-4
    assert (x.grad.double() - x64.grad).abs().max() < 1e-4
    assert (w.grad.double() - w64.grad).abs().max() < 1e-4
    assert torch.equal(w.grad[1], torch.zeros(Y, X)) and torch.equal(w.grad[4], torch.zeros(Y, X))


def test_swapped_v3_model_matches_transformers_and_the_unswapped_model():
    torch.manual_seed(3)
    c = PRESETS["tiny"].replace(num_nextn_predict_layers=0, seq_aux_loss_alpha=0.0)
    plain = randomize(V3ForCausalLM(c)).train()
    ref = hf_copy(plain).train()
    fast = accelerate(copy.deepcopy(plain))
    kinds = {type(m) for m in fast.modules()}
    assert OneDNNLinear in kinds and CPUGroupedExperts in kinds and torch.nn.Linear not in kinds
    assert list(fast.state_dict()) == list(plain.state_dict())  # same names: checkpoints unchanged
    ids = torch.randint(0, c.vocab_size, (8, 160))  # 1280 tokens x 2 / 8 experts: above EXPERT_MIN_ROWS each
    assert ids.numel() * c.num_experts_per_tok >= cpu_gemm.EXPERT_MIN_ROWS * c.n_routed_experts
    with torch.no_grad():
        assert (fast.logits(ids) - ref(ids).logits).abs().max() < 1e-4
    losses = []
    for m in (plain, fast):
        loss, _ = lm_loss(m(ids), m.lm_head.weight, ids)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-5
    for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
        if p.grad is not None:
            assert (p.grad - q.grad).abs().max() <= 1e-4 * p.grad.abs().max() + 1e-7, name


def test_accelerate_reuses_parameters_and_keeps_ties():
    lin = torch.nn.Linear(8, 4)
    emb = torch.nn.Embedding(4, 8)
    head = torch.nn.Linear(8, 4, bias=False)
    head.weight = emb.weight  # tied
    model = torch.nn.ModuleDict({"lin": lin, "emb": emb, "head": head})
    accelerate(model)
    assert isinstance(model["lin"], OneDNNLinear) and model["lin"].weight is lin.weight
    assert model["head"].weight is model["emb"].weight


def test_the_loaders_build_swapped_models(tmp_path):
    """r1's own loading path (r1.policy, then r1.cpu.accelerate as the trainer, eval and SFT apply it) runs the
    oneDNN kernels, for V3 and transformers models."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from r1.eval import load_model
    from r1.model.hf import save_hf
    from r1.policy import build_model

    save_hf(V3ForCausalLM(PRESETS["tiny"]), tmp_path / "v3")
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "llama")
    for model in (load_model(tmp_path / "v3"), load_model(tmp_path / "llama"), accelerate(build_model("tiny"))):
        kinds = {type(m) for m in model.modules()}
        assert OneDNNLinear in kinds and torch.nn.Linear not in kinds, type(model).__name__


def test_fp8_conversion_takes_swapped_modules():
    from r1.fp8 import Fp8GroupedExperts, Fp8Linear, convert_to_fp8

    model = convert_to_fp8(accelerate(V3ForCausalLM(PRESETS["tiny"])))
    kinds = {type(m) for m in model.modules()}
    assert Fp8Linear in kinds and Fp8GroupedExperts in kinds and CPUGroupedExperts not in kinds
    assert not any(isinstance(m, CPUGroupedExperts) for m in model.modules())
    assert isinstance(model.lm_head, OneDNNLinear)  # the head stays high precision (not an FP8 target)


def test_bucketing_keeps_rows_and_skips_huge_gemms(monkeypatch):
    """Row counts off the 64-grid run as a bucketed part plus an overlapping tail window (each row computed
    from its own input row); above BIG_MACS one call, so a big output is never held twice."""
    torch.manual_seed(4)
    a, b = torch.randn(200, 96), torch.randn(120, 96)
    ref = a.double() @ b.double().T
    calls = []
    op = cpu_gemm.LINEAR_OP
    monkeypatch.setattr(cpu_gemm, "LINEAR_OP", lambda x, *rest: calls.append(x.shape[0]) or op(x, *rest))
    split = cpu_gemm._mm_bucketed(a, b)
    assert calls == [192, 64]  # 3 buckets, then the window of rows 136-199
    monkeypatch.setattr(cpu_gemm, "BIG_MACS", 1)
    whole = cpu_gemm._mm_bucketed(a, b)
    assert calls == [192, 64, 200]
    for y in (split, whole):
        assert y.shape == (200, 120) and (y.double() - ref).abs().max() < 1e-4


def test_off_means_no_swap_and_torch_matmul(monkeypatch):
    """With the path off (the default on a CPU without AVX-512, where MKL measured faster), the loaders' swap
    leaves the linears as they are and the kernels' entry points run torch's matmul, not oneDNN."""
    cpu_gemm.prefer(False)
    model = accelerate(V3ForCausalLM(PRESETS["tiny"]))
    kinds = {type(m) for m in model.modules()}
    assert OneDNNLinear not in kinds and torch.nn.Linear in kinds
    monkeypatch.setattr(cpu_gemm, "LINEAR_OP", lambda *a: pytest.fail("oneDNN called while off"))
    a, b = torch.randn(256, 128), torch.randn(256, 128)
    assert torch.allclose(cpu_gemm.mm_nt(a, b), a @ b.T) and torch.allclose(cpu_gemm.wgrad(a, b), a.T @ b)
    cpu_gemm.prefer(None)
    assert cpu_gemm.ENABLED == cpu_gemm.AVX512


def test_accelerate_puts_the_output_head_on_onednn(monkeypatch):
    """r1.cpu.accelerate installs oneDNN's GEMMs as the fused head's (r1/logprobs.py): log-probs, entropy and both
    gradients equal autograd through torch's log_softmax, and oneDNN runs them."""
    from r1 import logprobs

    monkeypatch.setattr(logprobs, "mm_nt", logprobs.mm_nt)  # restored after the test
    monkeypatch.setattr(logprobs, "wgrad", logprobs.wgrad)
    accelerate(torch.nn.Linear(2, 2))
    assert logprobs.mm_nt is cpu_gemm.mm_nt and logprobs.wgrad is cpu_gemm.wgrad
    calls = []
    op = cpu_gemm.LINEAR_OP
    monkeypatch.setattr(cpu_gemm, "LINEAR_OP", lambda *a: calls.append(a[0].shape) or op(*a))
    torch.manual_seed(6)
    h = torch.randn(2, 40, 256, requires_grad=True)
    w = torch.randn(1024, 256, requires_grad=True) / 16
    t = torch.randint(0, 1024, (2, 40))
    lp, ent = logprobs.token_logprobs(h, w, t, chunk=64, with_entropy=True)
    g = torch.autograd.grad(lp.sum() + ent.sum(), (h, w))
    assert calls  # forward, dgrad and wgrad on oneDNN
    all_lp = torch.log_softmax(h @ w.T, -1)
    ref_lp = all_lp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    ref_ent = -(all_lp.exp() * all_lp).sum(-1)
    ref = torch.autograd.grad(ref_lp.sum() + ref_ent.sum(), (h, w))
    assert torch.allclose(lp, ref_lp, atol=1e-4) and torch.allclose(ent, ref_ent, atol=1e-4)
    for a, b in zip(g, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
