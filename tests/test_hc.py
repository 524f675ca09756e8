"""Hyper-connections (r1/model/hc.py): Sinkhorn, the equivalence with the standard residual, gradients,
the gain metrics and the HF round trip."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from r1.cpu import accelerate, cext
from r1.cpu.hc import CPUHyperConnection, _FusedRead
from r1.model.config import PRESETS
from r1.model.hc import HyperConnection, hc_metrics, sinkhorn
from r1.model.hf import load_hf, save_hf
from r1.model.model import V3ForCausalLM


def tiny(**kw):
    return PRESETS["tiny"].replace(num_hidden_layers=3, first_k_dense_replace=1, **kw)


def reference_sinkhorn(logits, iters, dims=(-2, -1)):
    """The same map in plain autograd (no custom backward), fp64."""
    i, j = dims
    m = logits.double()
    m = m - m.logsumexp(j, keepdim=True)
    k = (m - m.logsumexp(i, keepdim=True)).exp()
    for _ in range(iters - 1):
        k = k / k.sum(j, keepdim=True)
        k = k / k.sum(i, keepdim=True)
    x = k / k.sum(j, keepdim=True).clamp_min(1.0)
    y = x / x.sum(i, keepdim=True).clamp_min(1.0)
    r = (1 - y.sum(j, keepdim=True)).clamp_min(0.0)
    c = (1 - y.sum(i, keepdim=True)).clamp_min(0.0)
    return y + r * c / r.sum(i, keepdim=True).clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------- Sinkhorn
@pytest.mark.parametrize("scale", [0.0, 1.0, 5.0, 50.0, 1e4])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_sinkhorn_is_doubly_stochastic(scale, n):
    torch.manual_seed(n)
    logits = scale * torch.randn(2000, n, n)
    logits[0] = 80.0  # exp overflows fp32 without the log-domain first step
    logits[1] = -1e4 * torch.eye(n)  # all mass off the diagonal
    p = sinkhorn(logits)
    assert p.dtype == torch.float32 and torch.isfinite(p).all()
    assert (p >= 0).all()
    assert (p.sum(-1) - 1).abs().max() < 1e-5
    assert (p.sum(-2) - 1).abs().max() < 1e-5


def test_sinkhorn_matches_the_fixed_point_and_layouts():
    torch.manual_seed(0)
    logits = torch.randn(500, 4, 4)
    exact = reference_sinkhorn(logits, 2000)  # converged: rounding does nothing there
    assert (sinkhorn(logits, iters=200).double() - exact).abs().max() < 1e-5
    assert (sinkhorn(logits).double() - exact).abs().max() < 0.05  # 20 iterations: close, not converged
    tokens_last = sinkhorn(logits.permute(1, 2, 0).contiguous(), dims=(0, 1)).permute(2, 0, 1)
    assert (tokens_last - sinkhorn(logits)).abs().max() < 1e-6
    assert sinkhorn(logits.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize(("scale", "tol"), [(0.5, 1e-10), (1.0, 1e-5), (2.0, 1e-2)])
def test_sinkhorn_gradient_is_the_converged_projections(scale, tol):
    """The implicit backward against autograd through the plain iterations run to convergence (fp64):
    at the default 20 iterations both it and autograd through the same 20 are within tol of that."""
    torch.manual_seed(1)
    logits = (scale * torch.randn(64, 4, 4, dtype=torch.float64)).requires_grad_()
    w = torch.randn(64, 4, 4, dtype=torch.float64)
    (g,) = torch.autograd.grad((sinkhorn(logits) * w).sum(), logits)
    (g_20,) = torch.autograd.grad((reference_sinkhorn(logits, 20) * w).sum(), logits)
    (g_conv,) = torch.autograd.grad((reference_sinkhorn(logits, 3000) * w).sum(), logits)
    assert g.abs().max() > 1e-2
    assert (g - g_conv).abs().max() < tol
    assert (g_20 - g_conv).abs().max() < tol
    # P ignores a constant added along a row or a column of the logits, so the gradient sums to 0 both ways
    assert g.sum(-1).abs().max() < 1e-10 and g.sum(-2).abs().max() < 1e-10
    # tokens-last layout: the same gradient
    t = logits.detach().permute(1, 2, 0).contiguous().requires_grad_()
    (g_t,) = torch.autograd.grad((sinkhorn(t, dims=(0, 1)) * w.permute(1, 2, 0)).sum(), t)
    assert (g_t.permute(2, 0, 1) - g).abs().max() < 1e-12
    # and against finite differences, converged
    small = (0.5 * torch.randn(2, 3, 3, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: sinkhorn(t, iters=60), (small,))


def test_sinkhorn_gradient_is_finite_for_extreme_logits():
    """Near a permutation I - P^T P is singular; the ridge keeps the solve finite (fp32, as in training)."""
    torch.manual_seed(3)
    logits = torch.cat([1e4 * torch.randn(100, 4, 4), 80.0 * torch.eye(4).expand(10, 4, 4),
                        torch.full((10, 4, 4), 80.0)]).requires_grad_()
    (g,) = torch.autograd.grad((sinkhorn(logits) * torch.randn(120, 4, 4)).sum(), logits)
    assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().max() < 10


def test_norm_projection_matches_autograd_and_finite_differences():
    """RMSNorm(x) W through _NormProject's hand-written backward, against finite differences and against
    autograd through the plain expression (fp64)."""
    from r1.model.hc import _NormProject

    torch.manual_seed(2)
    x = (3 * torch.randn(30, 16, dtype=torch.float64)).requires_grad_()
    w = torch.randn(16, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _NormProject.apply(a, b, 1e-6), (x, w))
    g = torch.randn(6, 30, dtype=torch.float64)
    got = torch.autograd.grad(_NormProject.apply(x, w, 1e-6), (x, w), g)
    plain = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)) @ w
    ref = torch.autograd.grad(plain.T, (x, w), g)
    for a, b in zip(got, ref, strict=True):
        assert (a - b).abs().max() < 1e-10


def test_stream_read_mix_and_write_back_against_finite_differences():
    """_ReadAndMix (H_pre x, H_res x) and _WriteBack (xr + H_post^T y, in place) with their hand-written
    backwards, fp64, including a gradient that reaches x_BTnD through both of its consumers."""
    from r1.model.hc import _ReadAndMix, _WriteBack

    torch.manual_seed(4)
    n, D = 3, 5
    x = torch.randn(2, 3, n, D, dtype=torch.float64, requires_grad=True)
    pre = torch.randn(6, n, dtype=torch.float64, requires_grad=True)
    res = torch.randn(6, n, n, dtype=torch.float64, requires_grad=True)
    post = torch.randn(6, n, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_ReadAndMix.apply, (x, pre, res))
    xr = torch.randn(6, n, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: _WriteBack.apply(a.clone(), b, c), (xr, post, y))

    def block(x, pre, res, post):  # H_res x + H_post^T tanh(H_pre x), the HyperConnection's data flow
        h, xr = _ReadAndMix.apply(x, pre, res)
        return _WriteBack.apply(xr, post, h.tanh())

    assert torch.autograd.gradcheck(block, (x, pre, res, post))
    xf = x.reshape(6, n, D)
    plain = res @ xf + post.unsqueeze(-1) * (pre.unsqueeze(-2) @ xf).tanh()
    assert (block(x, pre, res, post).reshape(6, n, D) - plain).abs().max() < 1e-12


# ---------------------------------------------------------------------------------------------- the module
@pytest.mark.parametrize("mode", ["hc", "mhc"])
def test_init_meets_the_equivalence_condition(mode):
    c = tiny(residual=mode)
    for index in range(6):
        hc = HyperConnection(c, index)
        pre, post, res = hc.weights(torch.randn(2, 3, c.hc_streams, c.hidden_size))
        assert torch.allclose(pre.sum(-1), torch.ones(2, 3), atol=1e-6)
        assert torch.allclose(post, torch.ones_like(post), atol=1e-6)
        assert torch.allclose(res.sum(-1), torch.ones(2, 3, c.hc_streams), atol=1e-6)
        if mode == "hc":
            assert pre[0, 0].argmax().item() == index % c.hc_streams and torch.equal(res[0, 0], torch.eye(4))


def _pair(mode, seed=0, **kw):
    """A standard model with random weights and an hc/mhc model holding the same shared weights."""
    torch.manual_seed(seed)
    std = V3ForCausalLM(tiny(**kw)).eval()
    with torch.no_grad():
        for p in std.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hc = V3ForCausalLM(tiny(residual=mode, **kw)).eval()
    missing, unexpected = hc.load_state_dict(std.state_dict(), strict=False)
    assert not unexpected and missing and all("_hc." in k for k in missing)
    return std, hc


@pytest.mark.parametrize("mode", ["hc", "mhc"])
def test_same_function_as_standard_exactly_under_the_condition(mode):
    std, hc = _pair(mode)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        a, b = std(ids, mtp=True), hc(ids, mtp=True)
        assert (std.lm_head(a.hidden) - hc.lm_head(b.hidden)).abs().max() < 1e-5
        assert all((x - y).abs().max() < 1e-5 for x, y in zip(a.mtp_hidden, b.mtp_hidden, strict=True))
        # (b) with a different H_res that keeps rows summing to 1 (for HC), and alpha = 0 with any phi
        for m in hc.modules():
            if isinstance(m, HyperConnection):
                if mode == "hc":
                    m.b_res.copy_(torch.full((4, 4), 0.25))
                m.phi.normal_()
                m.alpha.zero_()
        assert (std.logits(ids) - hc.logits(ids)).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["hc", "mhc"])
@pytest.mark.parametrize("breaks", ["phi", "pre", "post", "res"])
def test_breaking_the_condition_changes_the_function(mode, breaks):
    std, hc = _pair(mode)
    ids = torch.randint(0, 256, (2, 24))
    m = hc.layers[1].attn_hc
    with torch.no_grad():
        if breaks == "phi":  # H depends on x (alpha = 0.01 from init)
            m.phi.normal_()
        elif breaks == "pre":  # sum H_pre = -1 for HC; 1.5 for mHC (sigmoid(b_pre) = 0.375 each)
            m.b_pre.copy_(-m.b_pre if mode == "hc" else torch.full((4,), -0.5108))
        elif breaks == "post":
            m.b_post.add_(0.5)
        elif mode == "hc":  # rows of H_res sum to 1.5
            m.b_res.mul_(1.5)
        else:  # an mHC H_res is always doubly stochastic: a non-uniform one keeps equal streams equal
            m.b_res.normal_()
        diff = (std.logits(ids) - hc.logits(ids)).abs().max().item()
    if mode == "mhc" and breaks == "res":
        assert diff < 1e-5  # any doubly stochastic H_res meets (b)
    elif mode == "mhc" and breaks == "pre":
        # the attention block starts with RMSNorm, blind to the input's scale but for its eps
        assert 0 < diff < 1e-3
    else:
        assert diff > 1e-3


def loss(model, ids):
    out = model(ids)  # in training mode: the MTP depths run too
    return sum(model.lm_head(h).logsumexp(-1).mean() for h in [out.hidden, *out.mtp_hidden])


@pytest.mark.parametrize("mode", ["hc", "mhc"])
def test_gradients_reach_every_hc_parameter(mode):
    torch.manual_seed(0)
    model = V3ForCausalLM(tiny(residual=mode)).train()
    ids = torch.randint(0, 256, (2, 16))
    loss(model, ids).backward()
    for name, p in model.named_parameters():
        if name.endswith(("phi", "b_pre", "b_post", "b_res")):  # phi reaches the loss through alpha = 0.01
            assert p.grad is not None and p.grad.abs().max() > 0, name
        elif "_hc." in name:  # alpha and RMSNorm's weight act only through phi x, zero at init
            assert p.grad.abs().max() == 0, name
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HyperConnection):
                m.phi.normal_()
    model.zero_grad()
    loss(model, ids).backward()
    assert all(p.grad.abs().max() > 0 for name, p in model.named_parameters() if "_hc." in name)


def test_hc_parameters_train_and_metrics_track_the_gain():
    torch.manual_seed(0)
    model = V3ForCausalLM(tiny(residual="hc"))
    ids = torch.randint(0, 256, (2, 16))
    model(ids)
    m = hc_metrics(model)
    assert m["hc/forward_gain"] == pytest.approx(1.0) and m["hc/backward_gain"] == pytest.approx(1.0)
    assert m["hc/pre_spread"] == pytest.approx(1.0) and m["hc/post_spread"] == pytest.approx(0.0)
    with torch.no_grad():  # R = [[2, 0], [1, 1]] on two streams in 6 sub-blocks: known gains
        for blk in model.layers:
            for hc in (blk.attn_hc, blk.mlp_hc):
                hc.b_res.copy_(torch.eye(4))
                hc.b_res[0, 0] = 2.0
                hc.b_res[1, 0] = 1.0
    model(ids)
    m = hc_metrics(model)
    # R^6 = [[64, 0], [63, 1], ...]: row sums 64 and 64, column sums 127 and 1
    assert m["hc/forward_gain"] == pytest.approx(64.0) and m["hc/backward_gain"] == pytest.approx(127.0)
    mhc = V3ForCausalLM(tiny(residual="mhc"))
    with torch.no_grad():
        for hc in mhc.modules():
            if isinstance(hc, HyperConnection):
                hc.b_res.normal_(std=3.0)
                hc.phi.normal_()
    mhc(ids)
    m = hc_metrics(mhc)
    assert m["hc/forward_gain"] < 1 + 1e-5 and m["hc/backward_gain"] < 1 + 1e-5


@pytest.mark.parametrize("mode", ["hc", "mhc"])
def test_hf_round_trip(tmp_path, mode):
    torch.manual_seed(0)
    model = V3ForCausalLM(tiny(residual=mode)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_hc." in name:
                p.add_(0.1 * torch.randn_like(p))
    save_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["residual"] == mode
    back = load_hf(tmp_path).eval()  # strict: every HC parameter is in the checkpoint
    assert back.config.residual == mode
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(model.logits(ids), back.logits(ids))
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert {"model.layers.0.attn_hc.phi", "model.layers.2.mlp_hc.b_res", "model.layers.1.attn_hc.alpha"} <= keys


def test_transformers_loads_an_mhc_checkpoint_as_the_standard_model(tmp_path):
    """transformers skips the HC keys (as unexpected) and, at init (phi = 0), computes the same logits."""
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging

    std, model = _pair("mhc")
    save_hf(model, tmp_path)
    logging.set_verbosity_error()
    ref = DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert (ref(ids).logits - model.logits(ids)).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["hc", "mhc"])
def test_bf16_with_gradient_checkpointing(mode):
    """A bf16 model (HC parameters too): H is computed in fp32, grads are finite and match fp32 roughly."""
    torch.manual_seed(0)
    model = V3ForCausalLM(tiny(residual=mode)).train()
    ids = torch.randint(0, 256, (2, 16))
    ref = loss(model, ids).item()
    model = model.to(torch.bfloat16)
    model.gradient_checkpointing = True
    out = loss(model, ids)
    out.backward()
    assert abs(out.item() - ref) < 0.05 * abs(ref)
    grads = [p.grad for name, p in model.named_parameters() if name.endswith("phi")]
    assert grads and all(torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)


# ---------------------------------------------------------------------------------------------- the C kernels
needs_cext = pytest.mark.skipif(cext.kernels() is None, reason="no C compiler: the torch path runs alone")


def _hc_step(m, x):
    """One HyperConnection forward + backward (a fixed nonlinear sub-block): output, dx, parameter gradients."""
    m.zero_grad()
    x = x.clone().requires_grad_()
    w = torch.linspace(-1, 1, x.shape[-1], dtype=x.dtype)
    out, _ = m(x, lambda h: ((h * w).tanh() * 1.5, None))
    (out * torch.linspace(0.5, 2, out.numel(), dtype=x.dtype).view(out.shape)).sum().backward()  # non-uniform
    return [out.detach(), x.grad, *(p.grad.clone() for p in m.parameters())]


@needs_cext
@pytest.mark.parametrize("mode", ["hc", "mhc"])
# the unrolled n = 4 (and 2, 8) and the generic loops (3); the projection's column tiles 24 (n = 4), 8 (2),
# 24 + 24 + 24 + 8 (8), 16 with a padded column (3: M = 15); dx's 8-wide tail panel (3 x 24 = 72 columns)
@pytest.mark.parametrize(("n", "hidden"), [(4, 64), (3, 64), (2, 24), (8, 40), (3, 24)])
def test_c_kernels_are_as_accurate_as_the_torch_path(mode, n, hidden):
    """The read side (norm-projection, maps H with Sinkhorn and its implicit backward, mixing) and the write-back in
    C, against the torch path in fp64: the output, the stream gradient and every HC parameter's gradient are as close
    as torch's own fp32 path gets (Sinkhorn's backward solves amplify fp32 rounding in both), with phi moved off
    zero, over 111 tokens (not a whole number of the kernels' 4-token tiles)."""
    torch.manual_seed(n)
    m = HyperConnection(tiny(residual=mode, hc_streams=n, hidden_size=hidden), index=1)
    with torch.no_grad():
        m.phi.normal_(0, 0.3)
        m.alpha.fill_(0.7)
    x = torch.randn(3, 37, n, m.phi.shape[0] // n)
    fast = accelerate(copy.deepcopy(m))
    assert type(fast) is CPUHyperConnection
    c32 = _hc_step(fast, x)  # fp32 CPU: the C kernels
    t32 = _hc_step(m, x)  # the model's torch path
    t64 = _hc_step(m.double(), x.double())
    names = ["out", "dx"] + [k for k, _ in m.named_parameters()]
    for name, c, t, ref in zip(names, c32, t32, t64, strict=True):
        scale = ref.abs().max()
        assert scale > 0, name  # every parameter gets a gradient here
        err_c, err_t = (c.double() - ref).abs().max() / scale, (t.double() - ref).abs().max() / scale
        assert err_c <= max(4 * err_t, 1e-5), (name, err_c.item(), err_t.item())


@needs_cext
@pytest.mark.parametrize("mode", ["hc", "mhc"])
def test_c_kernels_do_not_depend_on_the_thread_count(mode):
    """The C path's output, stream gradient and parameter gradients are bitwise the same on 1 and 3 threads: every
    sum over tokens (the biases', alphas', phi's and the norm weight's gradients) runs in token order on one thread."""
    torch.manual_seed(0)
    m = accelerate(HyperConnection(tiny(residual=mode), index=2))
    with torch.no_grad():
        m.phi.normal_(0, 0.3)
        m.alpha.fill_(0.7)
    x = torch.randn(2, 101, 4, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _hc_step(m, x)
        torch.set_num_threads(3)
        three = _hc_step(m, x)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, three, strict=True))


@needs_cext
@pytest.mark.parametrize("scale", [1.0, 50.0, 1e4])
def test_c_sinkhorn_is_doubly_stochastic_and_finite(scale):
    """H_res from the C read side for logits of every size (u = r x w grows with w; b sets them outright): doubly
    stochastic, non-negative, the torch path's Sinkhorn of the same logits, and a finite gradient."""
    from r1.model.hc import SINKHORN_ITERS

    n, D, N = 4, 16, 3000
    M = 2 * n + n * n
    torch.manual_seed(1)
    x = torch.randn(N, n, D)
    off_diagonal = torch.cat([torch.zeros(2 * n), -1e4 * torch.eye(n).flatten()])  # a permutation's complement
    for w, b in [(scale * torch.randn(n * D, M), torch.zeros(M)),  # large logits per token
                 (torch.zeros(n * D, M), torch.full((M,), 80.0)),  # all equal and large
                 (torch.zeros(n * D, M), off_diagonal)]:
        params = [torch.ones(n * D), w, b[:n], b[n:2 * n], b[2 * n:].view(n, n), torch.ones(3)]  # nw phi b alpha
        leaves = [t.clone().requires_grad_() for t in (x, *params)]
        h, xr, pre, post, res = _FusedRead.apply(*leaves, 1e-6, SINKHORN_ITERS)
        assert torch.isfinite(res).all() and (res >= 0).all()
        assert (res.sum(-1) - 1).abs().max() < 1e-5 and (res.sum(-2) - 1).abs().max() < 1e-5
        r = torch.linalg.vector_norm(x.view(N, -1), dim=-1).square().div(n * D).add(1e-6).rsqrt()
        z = b + r[:, None] * (x.view(N, -1) @ w)
        ref = sinkhorn(z[:, 2 * n:].view(N, n, n))
        assert torch.allclose(res, ref, atol=1e-5 if scale < 100 else 1e-3)  # rounding of z at 1e4 scale moves P
        # xr is the write-back's buffer (unwritten here); its gradient stands for that of H_res x
        torch.autograd.backward([h, xr, post], [torch.randn(h.shape), torch.randn(xr.shape), torch.randn(post.shape)])
        assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_a_failed_build_warns_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("R1_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(UserWarning, match="hc_kernels.c, moe_kernels.c failed"):
        assert cext.kernels.__wrapped__() is None


@needs_cext
def test_the_build_is_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("R1_CACHE", str(tmp_path))
    assert cext.kernels.__wrapped__() is not None
    assert len(list(tmp_path.glob("r1_kernels-*.so"))) == 1
    monkeypatch.setattr(cext.subprocess, "run", lambda *a, **k: pytest.fail("rebuilt although cached"))
    assert cext.kernels.__wrapped__() is not None


def test_an_unloadable_cache_file_warns_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("R1_CACHE", str(tmp_path))
    written = []

    def fake_compiler(cmd, **k):  # writes its "library" where it was told to: under tmp_path, never the repository
        out = Path(cmd[cmd.index("-o") + 1])
        written.append(out)
        out.write_bytes(b"not a library")

    monkeypatch.setattr(cext.subprocess, "run", fake_compiler)
    with pytest.warns(UserWarning, match="loading .* failed"):
        assert cext.kernels.__wrapped__() is None
    assert written and all(tmp_path in w.parents for w in written)
