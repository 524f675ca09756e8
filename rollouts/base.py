"""The rollout interface every engine implements: sampling parameters in, `Rollout`s out.

Conventions shared by all engines (they follow vLLM's, so the trainer sees one behaviour):
- Output order is prompt-major: prompt 0's n samples, then prompt 1's, ...
- `token_ids` holds the generated tokens only; it includes the token that ended the sample (EOS, a
  stop id, or the token that completed a stop string), so the trainer also learns to stop.
- `text` is the decoded completion without special tokens, cut before the first stop string.
- `logprobs[t]` is log p(token_t) under the temperature-scaled distribution softmax(logits / T) before
  top-k / top-p / min-p truncation (T = 1 for greedy). That is what the trainer recomputes with
  `r1.logprobs.token_logprobs(..., temperature=T)`, so the two agree up to numerics (see
  rollouts/vllm_engine.py for what vLLM can and cannot return).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from torch import Tensor

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens with this much probability
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off
    min_p: float = 0.0  # drop tokens with p < min_p * p_max
    max_tokens: int = 256
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before them
    stop_token_ids: tuple[int, ...] = ()  # besides EOS
    ignore_eos: bool = False  # keep going through EOS (benchmarks)
    seed: int | None = None  # None: drawn from torch's global RNG (so torch.manual_seed still pins it)

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_p <= 1 or self.max_tokens < 1:
            raise ValueError(f"invalid sampling parameters: {self}")
        # lists from YAML recipes become tuples so the params stay hashable and immutable
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))


@dataclass
class Rollout:
    prompt_index: int  # index into the prompt list given to `generate`
    token_ids: list[int]
    logprobs: list[float]  # one per token id, see the module docstring for the distribution
    text: str
    finish_reason: FinishReason
    # MoE engines asked for routing: [prompt + completion tokens, moe_layers, top_k] int16 (r1/routing.py)
    routed_experts: Tensor | None = None


class Engine(Protocol):
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams, n: int = 1) -> list[Rollout]:
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Copy weights given under HF names (as r1.model.hf.hf_state_dict yields them) into the engine."""
        ...

    def sleep(self) -> None:
        """Release accelerator memory so training can use it (weights may be dropped; load_weights refills)."""
        ...

    def wake(self) -> None:
        ...
