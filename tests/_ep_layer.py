"""The MoE-layer check that tests/test_expert_parallel.py runs in gloo processes (kept apart from the test module so
that a launched process imports only torch and the model)."""

import copy

import torch


def layer_checks(rank: int, world: int, eps: list[int]) -> list[str]:
    """Run in every launched process (gloo, `world` ranks): per expert-parallel degree, a random MoE layer and one
    whose router sends every token to ep rank 0's experts, split over the ep ranks, against the same layer whole in
    this process on all ranks' tokens. Returns the cases checked."""
    from r1.expert_parallel import apply_expert_parallel, expert_mesh, reduce_expert_grads
    from r1.model.config import PRESETS
    from r1.model.model import MoE

    W, T = world, 6
    c = PRESETS["tiny"].replace(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1)
    E, D = c.n_routed_experts, c.hidden_size
    checked = []
    for ep in eps:
        mesh = expert_mesh(W, ep, "cpu")
        for case in ("random", "skewed"):
            torch.manual_seed(0)  # the same layer and the same global batch on every rank
            ref = MoE(c).train()
            with torch.no_grad():
                for p in ref.parameters():
                    p.normal_(0, 0.1)
                ref.gate.e_score_correction_bias.normal_(0, 0.1)
                if case == "skewed":  # every token on experts 0 and 1 (ep rank 0): the others' experts get no row
                    ref.gate.e_score_correction_bias[:2] = 10.0
            x_all, w_all = torch.randn(W, T, D), torch.randn(W, T, D)
            moe = copy.deepcopy(ref)
            apply_expert_parallel(moe, mesh)
            assert type(moe.experts).__name__.startswith("ExpertParallel")
            x_all.requires_grad_(True)
            y_ref, _ = ref(x_all.view(1, W * T, D))
            (y_ref.view(W, T, D) * w_all).sum().backward()
            x = x_all.detach()[rank].clone().requires_grad_(True)
            y, _ = moe(x.unsqueeze(0))
            (y[0] * w_all[rank]).sum().backward()
            assert torch.allclose(y[0], y_ref.view(W, T, D)[rank].detach(), rtol=0, atol=1e-5), (ep, case)
            assert torch.allclose(x.grad, x_all.grad[rank], rtol=0, atol=1e-5), (ep, case)
            reduce_expert_grads(moe, mesh, divide=1.0)  # the shard's replicas summed (there are W / ep)
            rows = E // ep
            lo = mesh["ep"].get_local_rank() * rows
            for (name, p), (_, q) in zip(moe.named_parameters(), ref.named_parameters(), strict=True):
                if name.startswith("experts."):
                    assert p.to_local().shape[0] == rows
                    assert torch.allclose(p.grad.to_local(), q.grad[lo:lo + rows], rtol=0, atol=1e-5), (ep, case, name)
                else:  # a dense parameter's gradient is this rank's tokens' part: summed over ranks
                    g = p.grad.clone()
                    torch.distributed.all_reduce(g)
                    assert torch.allclose(g, q.grad, rtol=0, atol=1e-5), (ep, case, name)
            counts = moe.tokens_per_expert.clone()
            torch.distributed.all_reduce(counts)
            assert torch.equal(counts, ref.tokens_per_expert)  # the balancing counts are global
            if case == "skewed":
                assert torch.equal(ref.tokens_per_expert[2:], torch.zeros(E - 2)), ref.tokens_per_expert
            checked.append(f"{ep}:{case}")
    return checked
