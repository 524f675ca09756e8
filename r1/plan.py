"""Per-GPU training memory of a V3 config, from arithmetic on its shapes (no model is built): `r1 model CONFIG --plan`.

What one GPU holds at the peak of an update micro-batch under FSDP2 over `gpus` ranks (every parameter sharded 1/N;
each decoder block and the root are FSDP units, as r1/parallel.py wraps them):
- fp32 master parameters, fp32 gradients and AdamW's two moments, each 1/N (the moments bf16 with optim=adamw_bf16);
- the unsharded compute copies FSDP2 all-gathers in param_dtype (bf16 for bf16/fp8, fp32 for fp32): the root (kept
  gathered from forward to the end of backward) and two blocks (the one computing and the next one's all-gather
  buffer), plus what one unit's unsharded gradient and its fp32 reduce-scatter input add beyond the activations
  freed by then; on one GPU there is no FSDP, and bf16 keeps a bf16 copy of every weight (autocast's cast cache);
- fp8: every fp8 linear's and expert's quantised weight, saved by r1/fp8.py for backward from its forward on, on
  every rank (1 byte per weight plus a scale per 128x128 block);
- the activations autograd saves for backward for `micro_batch_tokens` tokens (one packed causal batch, no padding
  mask), layer by layer as r1/model/model.py computes it, plus the output head's working set (r1/logprobs.py: one
  chunk of fp32 log-softmax rows and the head weight gradient's fp32 buffer).
The micro-batch is one after the first of an optimizer step (gradient accumulation): gradients exist while the
activations are built, so the components add up. The update is GRPO's (r1/trainer.py): the MTP modules hold
parameters but run no forward and get no gradient or optimizer state; mtp=true plans SFT with the MTP loss.
The GPU is taken as usable up to 90% of its memory: the allocator's fragmentation and the CUDA context (~0.5-1 GB)
take the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from r1.model.config import V3Config, count_params

GIB = 1 << 30
HEADROOM = 0.9  # usable fraction of a GPU's memory (allocator fragmentation, CUDA context, NCCL buffers)
GPUS: dict[str, int] = {"h100": 80 * 10**9, "h200": 141 * 10**9}  # marketed GB (H100 SXM 80 GB, H200 141 GB)
ACT_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp8": 2}  # activations and FSDP2's param_dtype
OPTIM_STATE_BYTES: dict[str, int] = {"adamw_torch_fused": 8, "adamw_bf16": 4}  # r1/optim.py: m and v per param
FP8_BLOCK = 128  # r1/fp8.py: weights per 128x128 block, activations per 1x128 tile, fp32 scales
LOGPROB_CHUNK = 4096  # r1/logprobs.py token_logprobs' default rows per chunk


@dataclass(frozen=True)
class PlanSpec:
    """The `--plan key=value` settings (checked by r1.config.load_config before anything is computed)."""
    gpus: int
    precision: Literal["fp32", "bf16", "fp8"]
    micro_batch_tokens: int
    gradient_checkpointing: Literal["none", "full", "moe"] = "none"
    gpu: Literal["h100", "h200"] = "h100"
    optim: Literal["adamw_torch_fused", "adamw_bf16"] = "adamw_torch_fused"
    mtp: bool = False  # the MTP loss in the step (SFT); GRPO's update runs no MTP forward
    # r1/expert_parallel.py: routed experts 1/expert_parallel per GPU (replicated over the gpus / expert_parallel
    # data-shard ranks, outside FSDP2: never gathered), the rest 1/gpus; the routed rows per GPU stay K per token
    # when the load is balanced
    expert_parallel: int = 1

    def __post_init__(self) -> None:
        for name in ("gpus", "micro_batch_tokens", "expert_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gpus % self.expert_parallel:
            raise ValueError(f"expert_parallel={self.expert_parallel} does not divide gpus={self.gpus}")


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU by component (see the module docstring), and the GPU it is held against."""
    spec: PlanSpec
    parameters: float
    gradients: float
    optimizer: float
    gathered_weights: float  # FSDP2's unsharded compute copies (or one GPU's bf16 weight copies)
    expert_copies: float  # expert parallelism, bf16/fp8: each MoE layer's local experts cast, kept for backward
    fp8_weights: float
    grad_reduce: float  # one unit's unsharded gradient + reduce-scatter input beyond the freed activations (FSDP2)
    act_attention: float  # MLA + the two RMSNorms per layer
    act_mlp: float  # dense MLPs, router, shared experts
    act_experts: float  # routed experts (the K-times expanded rows)
    act_head: float  # final norm, head input, log-softmax chunk, head gradient buffer, rope
    act_recompute: float  # what one block's (or its experts') rebuilt activations add during a checkpointed backward

    def components(self) -> list[tuple[str, float]]:
        s = self.spec
        n = f"1/{s.gpus}" + (f", experts 1/{s.expert_parallel}" if s.expert_parallel > 1 else "")
        moments = "bf16" if s.optim == "adamw_bf16" else "fp32"
        rows = [(f"parameters (fp32 master, {n})", self.parameters),
                (f"gradients (fp32, {n})", self.gradients),
                (f"optimizer (AdamW m, v in {moments}, {n})", self.optimizer),
                ("gathered weights (root + 2 blocks)" if s.gpus > 1 else "bf16 weight copies", self.gathered_weights),
                ("local experts' compute copies (bf16)", self.expert_copies),
                ("fp8 weight copies (saved for backward)", self.fp8_weights),
                ("gradient reduce-scatter (one unit)", self.grad_reduce),
                ("activations: attention + norms", self.act_attention),
                ("activations: MLP, router, shared experts", self.act_mlp),
                ("activations: routed experts", self.act_experts),
                ("activations: output head", self.act_head),
                ("activations: checkpoint recompute", self.act_recompute)]
        return [(k, v) for k, v in rows if v > 0]

    @property
    def activations(self) -> float:
        return self.act_attention + self.act_mlp + self.act_experts + self.act_head + self.act_recompute

    @property
    def total(self) -> float:
        return sum(v for _, v in self.components())

    @property
    def usable(self) -> float:
        return GPUS[self.spec.gpu] * HEADROOM

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    def table(self) -> str:
        w = max(44, *(len(name) + 1 for name, _ in self.components()))
        lines = [f"  {'component':<{w}}{'GiB/GPU':>10}"]
        lines += [f"  {name:<{w}}{v / GIB:>10.2f}" for name, v in self.components()]
        lines.append(f"  {'total':<{w}}{self.total / GIB:>10.2f}")
        return "\n".join(lines)

    def verdict(self) -> str:
        s = self.spec
        gpu = f"{s.gpu.upper()} ({GPUS[s.gpu] / 1e9:.0f} GB, {self.usable / GIB:.1f} GiB usable at {HEADROOM:.0%})"
        if self.fits:
            return f"fits: {self.total / GIB:.1f} GiB per GPU on {gpu}"
        big = max(self.components(), key=lambda kv: kv[1])
        return (f"does not fit: {self.total / GIB:.1f} GiB per GPU > {gpu}; the largest part is "
                f"{big[0]} at {big[1] / GIB:.1f} GiB")


@dataclass(frozen=True)
class _Shapes:
    """Per-token saved bytes of one layer's pieces and the parameter counts of the FSDP units."""
    c: V3Config
    act: int  # bytes of a bf16/fp32 activation element
    fp8: bool

    @property
    def lin(self) -> float:
        """Bytes per element a linear keeps of its input: the fp8 copy and its 1x128 scales, or the input itself."""
        return 1 + 4 / FP8_BLOCK if self.fp8 else self.act

    @property
    def experts_per_gpu(self) -> int:  # expert parallelism would divide this
        return self.c.n_routed_experts

    def norm(self, width: int) -> float:
        """RMSNorm (model.RMSNorm): F.rms_norm keeps its fp32 input, the weight's multiply keeps the normed rows."""
        return 4 * width + self.act * width

    def shared_input(self, width: int, linears: int) -> float:
        """A tensor read by `linears` linears: kept once, or once per fp8 linear as its own fp8 copy."""
        return linears * self.lin * width if self.fp8 else self.act * width

    def swiglu(self, width: int) -> float:
        """gate and up outputs, silu's output (kept by the product), the product (down_proj's input)."""
        return 3 * self.act * width + self.lin * width

    def attention(self) -> float:
        c, a = self.c, self.act
        H, C, R, V, L = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        b = self.norm(c.hidden_size) + self.shared_input(c.hidden_size, 2)  # input norm; q(_a) and kv_a read it
        if c.q_lora_rank is not None:
            b += self.norm(c.q_lora_rank) + self.lin * c.q_lora_rank  # q_a_layernorm, q_b_proj's input
        b += 4 * R * (H + 1)  # rope: the fp32 complex copy of the H query heads' and the shared key's rope dims
        b += self.norm(L) + (4 * R if a == 4 else 0) + self.lin * L  # kv_a_layernorm (a view of kv_a's output)
        qk = C + R
        # SDPA keeps q, k, v, its output and the logsumexp; v is zero-padded to q's head dim when narrower,
        # else it is a view that keeps kv_b's whole output alive
        v, out = (qk, qk) if V < qk else (C + V, V)
        b += a * H * (2 * qk + v + out) + 4 * H
        return b + self.lin * H * V  # o_proj's input

    def dense_mlp(self) -> float:
        c = self.c
        return self.norm(c.hidden_size) + self.shared_input(c.hidden_size, 2) + self.swiglu(c.intermediate_size)

    def moe_dense_part(self) -> float:
        """Post-attention norm, router (fp32 scores; the balance loss keeps normalised scores), shared experts."""
        c, D, E, K = self.c, self.c.hidden_size, self.c.n_routed_experts, self.c.num_experts_per_tok
        b = self.norm(D)
        # the router reads x.float(): in fp32 that is the norm's output itself, shared with the shared experts
        b += 4 * D + (self.shared_input(D, 2) if self.act != 4 and c.n_shared_experts else 0)
        b += 4 * E * (2 if c.seq_aux_loss_alpha > 0 else 1) + 17 * c.n_group + 12 * K  # scores, top-k bookkeeping
        return b + (self.swiglu(c.moe_intermediate_size * c.n_shared_experts) if c.n_shared_experts else 0)

    def routed(self) -> float:
        """Per token, K routed rows: x_sorted, gate_up (kept whole by silu's view of gate), silu's output, the
        product (down's input), y_sorted and its gate weight (kept by the weighting multiply), int64 indices."""
        c, a, I, D = self.c, self.act, self.c.moe_intermediate_size, self.c.hidden_size
        return c.num_experts_per_tok * (self.lin * D + a * 2 * I + a * I + self.lin * I + a * D + a + 16)

    def block_params(self, moe: bool) -> int:
        c = self.c
        one = c.replace(num_hidden_layers=1, first_k_dense_replace=0 if moe else 1, num_nextn_predict_layers=0)
        embed_head = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
        return count_params(one).total - embed_head - c.hidden_size  # the final norm too

    def block_fp8_params(self, moe: bool) -> int:
        """Weights of a block that r1/fp8.py runs in FP8: all but the norms and the router."""
        c = self.c
        return self.block_params(moe) - 2 * c.hidden_size - (c.n_routed_experts * c.hidden_size if moe else 0) \
            - (c.q_lora_rank or 0) - c.kv_lora_rank


def plan(c: V3Config, spec: PlanSpec) -> MemoryPlan:
    """The per-GPU memory plan of training `c` under `spec` (arithmetic only)."""
    N, T = spec.gpus, spec.micro_batch_tokens
    a = ACT_BYTES[spec.precision]
    sh = _Shapes(c, a, spec.precision == "fp8")
    size = count_params(c)
    n_dense = min(c.first_k_dense_replace, c.num_hidden_layers)
    n_moe = c.num_hidden_layers - n_dense
    mtp_params = size.mtp
    trainable = size.total - (0 if spec.mtp else mtp_params)

    # FSDP2 units: each block, and the root (embedding, head, final norm, MTP modules)
    blocks = [sh.block_params(False)] * n_dense + [sh.block_params(True)] * n_moe
    root = size.total - sum(blocks)
    biggest_block = max(blocks, default=0)
    # the root stays gathered through backward; a block computes while the next one's all-gather buffer fills
    fp8_params = n_dense * sh.block_fp8_params(False) + n_moe * sh.block_fp8_params(True)
    if spec.mtp:
        fp8_params += c.num_nextn_predict_layers * sh.block_fp8_params(True)
    # expert parallelism: the routed experts' parameters (the MTP layers' too), held 1/EP and never gathered
    EP = spec.expert_parallel
    if c.n_routed_experts % EP:
        raise ValueError(f"expert_parallel={EP} does not divide n_routed_experts={c.n_routed_experts}")
    experts = c.n_routed_experts * 3 * c.hidden_size * c.moe_intermediate_size if EP > 1 else 0  # one layer's
    routed_params = (n_moe + c.num_nextn_predict_layers) * experts
    routed_run = (n_moe + (c.num_nextn_predict_layers if spec.mtp else 0)) * experts  # the layers that compute
    fp8_params -= (1 - 1 / EP) * routed_run  # FP8 copies of this rank's experts only
    fp8_weights = fp8_params * (1 + 4 / FP8_BLOCK**2) if sh.fp8 else 0
    # cast each forward and kept for backward (full checkpointing recomputes them: one layer at a time)
    layers_kept = 1 if spec.gradient_checkpointing == "full" else routed_run / max(experts, 1)
    expert_copies = 2 * experts / EP * layers_kept if a == 2 else 0
    blocks = [b - (experts if i >= n_dense else 0) for i, b in enumerate(blocks)]
    root -= c.num_nextn_predict_layers * experts
    biggest_block = max(blocks, default=0)
    # the root stays gathered through backward; a block computes while the next one's all-gather buffer fills.
    # One GPU: bf16 copies of the weights that do not run in fp8 (fp8 quantises the fp32 masters directly)
    gathered = a * (root + 2 * biggest_block) if N > 1 else \
        (2 * (size.total - (fp8_params if sh.fp8 else 0)) if a == 2 else 0)

    attn, dense, moe, routed = sh.attention(), sh.dense_mlp(), sh.moe_dense_part(), sh.routed()
    layer_attn = c.num_hidden_layers * attn
    layer_mlp = n_dense * dense + n_moe * moe
    layer_routed = n_moe * routed
    D, Vocab = c.hidden_size, c.vocab_size
    rows = min(T, LOGPROB_CHUNK)
    head = sh.norm(D) + a * D + 4 * c.qk_rope_head_dim  # final norm, the head's input, rope (complex, shared)
    head_T = rows * Vocab * 4 + (rows * Vocab * a if a != 4 else 0) + a * D * T  # log-softmax rows, grad of h
    # the head's weight gradient is accumulated in an fp32 buffer, then cast, reduce-scattered or (gradients held
    # from an earlier micro-batch) added into .grad: a second copy beside the gradient itself in every case
    head_grad_buffer = 4 * Vocab * D
    n_mtp = c.num_nextn_predict_layers if spec.mtp else 0
    mtp_per_token = n_mtp * (2 * sh.norm(D) + 2 * a * D + attn + moe + routed + sh.norm(D) + a * D)

    act_head = (head + mtp_per_token) * T + head_T * (1 + n_mtp) + head_grad_buffer
    recompute = 0.0
    if spec.gradient_checkpointing == "full":
        # only each block's input is kept; one block's activations are rebuilt at a time in backward, after the
        # head's buffers are gone: the peak holds the larger of the two (the row is the excess over the head's)
        block = max(attn + dense if n_dense else 0, attn + moe + routed if n_moe else 0) * T
        recompute = max(block - act_head, 0)
        layer_attn, layer_mlp, layer_routed = c.num_hidden_layers * a * D, 0, 0
    elif spec.gradient_checkpointing == "moe":
        recompute = routed * T if n_moe else 0
        layer_routed = 0

    grad_reduce = 0.0
    if N > 1:
        # a unit's unsharded gradient (param_dtype) and its fp32 reduce-scatter input exist after the unit's backward,
        # when the head's buffers and that block's activations (or, for the root, all of them) are gone already
        per_layer = (layer_attn + layer_mlp + layer_routed) * T / max(c.num_hidden_layers, 1)
        grad_reduce = max(0.0, (a + 4) * biggest_block - act_head - recompute - per_layer,
                          (a + 4) * root - act_head - recompute - (layer_attn + layer_mlp + layer_routed) * T)

    return MemoryPlan(
        spec=spec,
        parameters=4 * ((size.total - routed_params) / N + routed_params / EP),
        gradients=4 * ((trainable - routed_run) / N + routed_run / EP),
        optimizer=OPTIM_STATE_BYTES[spec.optim] * ((trainable - routed_run) / N + routed_run / EP),
        gathered_weights=gathered,
        expert_copies=expert_copies,
        fp8_weights=fp8_weights,
        grad_reduce=grad_reduce,
        act_attention=layer_attn * T,
        act_mlp=layer_mlp * T,
        act_experts=layer_routed * T,
        act_head=act_head,
        act_recompute=recompute,
    )

