"""The torch rollout engine: batched prefill, then one decode step per token for the rows still running.

Two model families behind one small stepper interface:
- the native V3 model with MLA's `LatentCache` (only c_kv and k_pe per token per layer; W_kvb absorbed
  into the query and the output inside MLA), its MoE already grouped (no per-token Python loop);
- any transformers causal LM (Qwen, Llama, ...) with that model's own KV cache.

Each prompt is prefilled once and its cache rows are repeated n times. Finished rows leave the batch
(their cache rows are dropped), so no compute goes to sequences that are done. Per-sample generators
make samples reproducible and independent of how the batch shrinks (rollouts/sampling.py), and of which
rows one process decodes (r1.cpu's engine splits a call's prompts over two processes on a CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from r1.model import LatentCache, V3ForCausalLM
from r1.model.hf import hf_to_native, load_state
from r1.routing import UNROUTED, RoutingRecorder
from rollouts.base import Rollout, SamplingParams
from rollouts.sampling import NoiseStreams, make_generators, sample


class Stepper(Protocol):
    """One generation's model state: prefill the prompts, then feed one token per live row."""

    def prefill(self, ids_BT: Tensor, mask_BT: Tensor, capacity: int) -> Tensor: ...  # -> last logits [B, V]

    def decode(self, tok_B: Tensor, mask_BS: Tensor) -> Tensor: ...  # mask covers cached + new token

    def select(self, rows: Tensor) -> None: ...  # keep (or repeat) these cache rows


class V3Stepper:
    def __init__(self, model: V3ForCausalLM):
        self.model = model
        self.cache: LatentCache | None = None

    def prefill(self, ids_BT: Tensor, mask_BT: Tensor, capacity: int) -> Tensor:
        p = self.model.lm_head.weight
        self.cache = LatentCache(self.model.config, ids_BT.shape[0], capacity, p.dtype, p.device)  # never regrows
        return self._logits(ids_BT, mask_BT)

    def decode(self, tok_B: Tensor, mask_BS: Tensor) -> Tensor:
        return self._logits(tok_B[:, None], mask_BS)

    def _logits(self, ids_BT: Tensor, mask_BS: Tensor) -> Tensor:
        h_BTD = self.model(ids_BT, attention_mask=mask_BS, cache=self.cache, mtp=False).hidden
        return self.model.lm_head(h_BTD[:, -1]).float()

    def select(self, rows: Tensor) -> None:
        self.cache.select(rows)


class HFStepper:
    """transformers' causal LMs: left-padded prompts, explicit positions, the model's own cache."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache = None

    def prefill(self, ids_BT: Tensor, mask_BT: Tensor, capacity: int) -> Tensor:
        pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=pos_BT, use_cache=True,
                         logits_to_keep=1)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()

    def decode(self, tok_B: Tensor, mask_BS: Tensor) -> Tensor:
        pos_B1 = mask_BS.sum(-1, keepdim=True) - 1
        out = self.model(input_ids=tok_B[:, None], attention_mask=mask_BS, position_ids=pos_B1,
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()

    def select(self, rows: Tensor) -> None:
        self.cache.batch_select_indices(rows)


# model class -> stepper; anything else is treated as a transformers causal LM
STEPPERS: dict[type[nn.Module], type] = {V3ForCausalLM: V3Stepper}

Result = tuple[Tensor, Tensor, list[int], list[bool]]  # TorchEngine._run's: tokens, log-probs, lengths, stopped


def _eos_ids(model: nn.Module, tokenizer: object | None) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


class TorchEngine:
    """Rollouts from a torch model on its own device. `model` may be the trainer's policy object itself
    (CPU colocation): generation switches it to eval + inference mode and restores train mode after.
    `lockstep` (a model sharded by FSDP2, whose every forward is a collective): called after each decode step with
    whether this process still decodes, it returns whether any process does; a process that is done keeps one
    finished row decoding (its tokens discarded) until every process is, so all run the same number of forwards.
    The caller makes every process call generate the same number of times.
    `return_routed_experts` (native MoE model): each Rollout carries the experts its router chose for every prompt
    and completion token (r1.routing's layout; the last token, never fed back, is UNROUTED)."""

    def __init__(self, model: nn.Module, tokenizer: object | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, lockstep: Callable[[bool], bool] | None = None,
                 return_routed_experts: bool = False):
        self.model, self.tokenizer, self.lockstep = model, tokenizer, lockstep
        self.return_routed_experts = return_routed_experts
        self._recorder: RoutingRecorder | None = None  # set while generate runs
        self.eos_ids = _eos_ids(model, tokenizer) if eos_token_id is None else \
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        pad = getattr(tokenizer, "pad_token_id", None) if pad_token_id is None else pad_token_id
        self.pad_id = 0 if pad is None else pad  # pads are masked out; any valid id will do
        self.stepper_cls = next((s for cls, s in STEPPERS.items() if isinstance(model, cls)), HFStepper)
        self.asleep = False

    # ------------------------------------------------------------------------------------------ generate
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams, n: int = 1) -> list[Rollout]:
        if self.asleep:
            raise RuntimeError("engine is asleep: call wake() before generate()")
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("generate needs at least one prompt, and no prompt may be empty")
        if sampling.seed is None:  # one seed for the whole call, whichever process decodes a sample
            sampling = dataclasses.replace(sampling, seed=int(torch.randint(2**62, ()).item()))
        was_training = self.model.training
        self.model.eval()
        try:
            # FSDP2 (lockstep) reuses its all-gather buffers in training, which inference tensors could not be
            with torch.no_grad() if self.lockstep is not None else torch.inference_mode(), \
                    RoutingRecorder(self.model) if self.return_routed_experts else contextlib.nullcontext() as rec:
                self._recorder = rec
                tokens_NM, logps_NM, lengths_N, stopped_N = self._run(prompt_ids, sampling, n)
        finally:
            self.model.train(was_training)
            self._recorder = None
        out = []
        for i in range(len(prompt_ids) * n):
            ids = tokens_NM[i, :lengths_N[i]].tolist()
            text, hit = self._text(ids, sampling.stop)
            routed = None
            if rec is not None:
                p = len(prompt_ids[i // n])
                routed = torch.cat([rec.prompts_PTLK[i // n, -p:], rec.completions_NMLK[i, :lengths_N[i]]])
            out.append(Rollout(prompt_index=i // n, token_ids=ids, logprobs=logps_NM[i, :lengths_N[i]].tolist(),
                               text=text, finish_reason="stop" if stopped_N[i] or hit else "length",
                               routed_experts=routed))
        return out

    def _run(self, prompts: Sequence[Sequence[int]], sp: SamplingParams, n: int, first: int = 0) -> Result:
        """Decode n samples of each prompt in this process; samples are numbered from `first` (their generators'
        seeds), so a call split across processes samples as the whole call would."""
        dev = next(self.model.parameters()).device
        P, M, Tp = len(prompts), sp.max_tokens, max(len(p) for p in prompts)
        N = P * n
        ids_PT = torch.full((P, Tp), self.pad_id, dtype=torch.long, device=dev)
        mask_PT = torch.zeros(P, Tp, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):  # left padding: every row's next token sits at the same column
            ids_PT[i, Tp - len(p):] = torch.as_tensor(p, dtype=torch.long)
            mask_PT[i, Tp - len(p):] = 1

        stepper = self.stepper_cls(self.model)
        logits_BV = stepper.prefill(ids_PT, mask_PT, capacity=Tp + M)
        rec = self._recorder
        if rec is not None:  # token t of a sample is routed in the forward that feeds it back (never the last)
            rec.prompts_PTLK = rec.take().cpu().view(P, Tp, -1, rec.top_k)
            rec.completions_NMLK = torch.full((N, M, *rec.prompts_PTLK.shape[2:]), UNROUTED, dtype=torch.int16)
        rows_N = torch.arange(P, device=dev).repeat_interleave(n)
        if n > 1:  # prefill each prompt once, then copy its cache rows for the n samples
            stepper.select(rows_N)
            logits_BV = logits_BV[rows_N]
        # the attention mask of every step, preallocated: step t reads the first Tp + t + 1 columns
        mask_BS = torch.cat([mask_PT[rows_N], mask_PT.new_ones(N, M)], dim=1)

        seed = sp.seed if sp.seed is not None else int(torch.randint(2**62, ()).item())
        gens = make_generators(seed, N, dev, first)
        noise = NoiseStreams(gens, logits_BV.shape[-1], dev) if sp.temperature > 0 else None
        stop_ids = torch.tensor(sorted(set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(self.eos_ids))),
                                dtype=torch.long, device=dev)
        can_stop = stop_ids.numel() > 0 or bool(sp.stop)
        tokens_NM = torch.full((N, M), self.pad_id, dtype=torch.long, device=dev)
        logps_NM = torch.zeros(N, M, dtype=torch.float32, device=dev)
        lengths_N, stopped_N = [M] * N, [False] * N
        live = list(range(N))  # sample index of each batch row
        live_B = torch.arange(N, device=dev)
        with self._decoding(N):
            for t in range(M):
                if live:
                    noise_BV = noise.next(live, live_B) if noise is not None else None
                    tok_B, lp_B = sample(logits_BV, sp, [gens[i] for i in live], noise_BV)
                    tokens_NM[live_B, t], logps_NM[live_B, t] = tok_B, lp_B
                else:  # lockstep: the kept finished row only keeps the forwards in step
                    tok_B = logits_BV.argmax(-1)
                if t == M - 1 or self.lockstep is not None and not self.lockstep(bool(live)):
                    break
                done = torch.isin(tok_B, stop_ids).tolist() if can_stop and live else []
                if sp.stop and live:  # stop strings need the text: only the tail that a new match could end in
                    done = [d or self._tail_has_stop(tokens_NM[i, :t + 1], sp.stop)
                            for d, i in zip(done, live, strict=True)]
                if any(done):
                    for b, i in enumerate(live):
                        if done[b]:
                            lengths_N[i], stopped_N[i] = t + 1, True
                    keep = [b for b, d in enumerate(done) if not d]
                    if not keep and self.lockstep is None:
                        break
                    keep_B = torch.as_tensor(keep or [0], device=dev)
                    stepper.select(keep_B)  # finished rows leave the batch and the cache
                    tok_B, mask_BS = tok_B[keep_B], mask_BS[keep_B]
                    live = [live[b] for b in keep]
                    live_B = torch.as_tensor(live, dtype=torch.long, device=dev)
                logits_BV = stepper.decode(tok_B, mask_BS[:, :Tp + t + 1])
                if rec is not None:
                    routed_BLK = rec.take().cpu()
                    if live:  # (lockstep's kept finished row is not a sample)
                        rec.completions_NMLK[live_B.cpu(), t] = routed_BLK
        if M and live and can_stop:  # rows alive at the last step may still have ended on a stop token / string
            last = tokens_NM[live_B, M - 1]
            hit = torch.isin(last, stop_ids).tolist()
            for b, i in enumerate(live):
                stopped_N[i] = stopped_N[i] or hit[b]
        return tokens_NM.cpu(), logps_NM.cpu(), lengths_N, stopped_N

    def _decoding(self, rows: int) -> contextlib.AbstractContextManager:
        """The context the decode steps of `rows` samples run in (after the prefill); a subclass may set threads."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------ text
    def _tail_has_stop(self, ids_T: Tensor, stops: tuple[str, ...]) -> bool:
        if self.tokenizer is None:
            return False
        # a stop string of c characters spans at most c tokens, so a match ending in the newest token is
        # visible in that many trailing tokens (+1 for tokenizers that merge a leading space)
        window = max(len(s) for s in stops) + 1
        tail = self.tokenizer.decode(ids_T[-window:].tolist(), skip_special_tokens=True)
        return any(s in tail for s in stops)

    def _text(self, ids: list[int], stops: tuple[str, ...]) -> tuple[str, bool]:
        """The decoded completion cut before the first stop string, and whether one was found."""
        if self.tokenizer is None:
            return "", False
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((j for j in (text.find(s) for s in stops) if j >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    # ------------------------------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Copy HF-named tensors into the engine's model; any subset may come (buckets), unknown names raise.
        Tensors that already are the model's own storage (engine sharing the trainer's model) are skipped."""
        named_tensors = list(named_tensors)
        if not named_tensors:  # (a sharded model's storages are not all readable between forwards)
            return
        own = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        fresh = [(k, t) for k, t in named_tensors if t.untyped_storage().data_ptr() not in own]
        if not fresh:
            return
        if isinstance(self.model, V3ForCausalLM):
            self._check_v3_names([k for k, _ in fresh])
            load_state(fresh, self.model, strict=False)
            return
        state = self.model.state_dict()
        unknown = [k for k, _ in fresh if k not in state]
        if unknown:
            raise KeyError(f"load_weights: {len(unknown)} names not in the model, e.g. {unknown[:5]}")
        for k, t in fresh:
            state[k].copy_(t)

    def _check_v3_names(self, names: list[str]) -> None:
        c = self.model.config
        known = {n for n, _ in self.model.named_parameters()} | {n for n, _ in self.model.named_buffers()}
        unknown = []
        for name in names:
            mapped = hf_to_native(name.removesuffix("_scale_inv"), c)
            if mapped is None:
                continue
            native, j, part = mapped
            target = native if j is None else native + (".down_proj" if part == "down_proj" else ".gate_up_proj")
            if target not in known:
                unknown.append(name)
        if unknown:
            raise KeyError(f"load_weights: {len(unknown)} HF names match no V3 parameter, e.g. {unknown[:5]}")

    # ------------------------------------------------------------------------------------------ memory
    def sleep(self) -> None:
        """Nothing persists between generate calls (caches are per call), so sleeping returns the allocator's
        cached blocks; the weights stay (the CPU engine usually shares the trainer's)."""
        self.asleep = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def wake(self) -> None:
        self.asleep = False
