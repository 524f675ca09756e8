"""r1.cpu.micro_batches: micro-batches side by side on worker threads give the gradients of running them one
at a time, bit for bit the same from run to run, on the threads and thread counts it says; an error leaves .grad
as it was."""

import threading

import pytest
import torch
from _v3ref import randomize

from r1.cpu import accelerate, intra_op_threads, micro_batches, update_workers
from r1.model.config import PRESETS
from r1.model.model import V3ForCausalLM
from r1.trainer import sequence_logprobs


def _setup(residual: str = "standard") -> tuple[V3ForCausalLM, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    # as a CPU run builds it: the CPU layer's MoE counts experts under a lock
    m = accelerate(randomize(V3ForCausalLM(PRESETS["tiny"].replace(residual=residual, hidden_size=64)))).train()
    ids = torch.randint(3, 256, (20, 12))  # 5 micro-batches of 4 rows (an odd count: thread 0 takes three)
    mask = torch.ones_like(ids)
    mask[3, 9:] = 0
    return m, ids, mask


def _run(m: V3ForCausalLM, ids: torch.Tensor, mask: torch.Tensor, workers: int,
         seen: list | None = None) -> tuple[list[float], dict[str, torch.Tensor], torch.Tensor]:
    m.zero_grad(set_to_none=True)
    for moe in m.moe_layers:
        moe.tokens_per_expert.zero_()
    params = [p for p in m.parameters() if p.requires_grad]

    def fn(i: int) -> tuple[torch.Tensor, float]:
        if seen is not None:
            seen.append((i, threading.get_ident(), torch.get_num_threads()))
        sl = slice(4 * i, 4 * i + 4)
        lp, ent = sequence_logprobs(m, ids[sl], mask[sl], 5, 1.0, with_entropy=True)
        loss = -(lp * mask[sl, 5:]).sum() / 100 - 0.01 * ent.mean()
        return loss, float(loss.detach())

    with intra_op_threads(2):
        outs = micro_batches(fn, 5, params, workers)
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return outs, grads, torch.stack([moe.tokens_per_expert.clone() for moe in m.moe_layers])


@pytest.mark.parametrize("residual", ["standard", "mhc"])  # mhc: HC's C kernels (OpenMP) on the worker threads
def test_side_by_side_equals_one_at_a_time(residual: str) -> None:
    m, ids, mask = _setup(residual)
    outs1, g1, counts1 = _run(m, ids, mask, workers=1)
    seen: list = []
    outs2, g2, counts2 = _run(m, ids, mask, workers=2, seen=seen)
    assert outs2 == pytest.approx(outs1, rel=1e-6)  # the outs come back in micro-batch order
    assert g1.keys() == g2.keys() and len(g1) > 10
    for n in g1:
        assert torch.allclose(g1[n], g2[n], rtol=1e-4, atol=1e-6), n
    assert torch.equal(counts1, counts2)  # every micro-batch's expert counts land (under the lock)
    # micro-batch i ran on thread i % 2 (two threads, neither this one), each with one intra-op thread
    threads = {i: t for i, t, _ in seen}
    assert len({threads[0], threads[2], threads[4]}) == 1 and len({threads[1], threads[3]}) == 1
    assert threads[0] != threads[1] and threading.get_ident() not in threads.values()
    assert {n for _, _, n in seen} == {1}
    # and timing does not enter: a second run is bit for bit the first
    _, g3, _ = _run(m, ids, mask, workers=2)
    assert all(torch.equal(g2[n], g3[n]) for n in g2)


def test_caller_thread_count_restored() -> None:
    m, ids, mask = _setup()
    with intra_op_threads(2):
        before = torch.get_num_threads()
        micro_batches(lambda i: (m(ids[:2], attention_mask=mask[:2], mtp=False).hidden.sum(), None), 2,
                      list(m.parameters()), workers=2)
        assert torch.get_num_threads() == before == 2


def test_an_error_leaves_grads_as_they_were() -> None:
    m, ids, mask = _setup()
    params = [p for p in m.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.full_like(p, 0.5)

    def fn(i: int) -> tuple[torch.Tensor, None]:
        if i == 3:
            raise ValueError("micro-batch 3 is bad")
        return m(ids[:2], attention_mask=mask[:2], mtp=False).hidden.sum(), None

    with pytest.raises(ValueError, match="micro-batch 3"):
        micro_batches(fn, 4, params, workers=2)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in params)


def test_update_workers() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    with intra_op_threads(2):
        assert update_workers(0, cpu, fsdp=False) == 2
        assert update_workers(0, cpu, fsdp=True) == 1  # FSDP2's collectives in forward and backward
        assert update_workers(0, gpu, fsdp=False) == 1
        assert update_workers(3, cpu, fsdp=False) == 3
    with intra_op_threads(1):
        assert update_workers(0, cpu, fsdp=False) == 1
