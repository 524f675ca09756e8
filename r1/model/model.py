"""DeepSeek-V3 in one file (arXiv 2412.19437), numerically equal to transformers' DeepseekV3ForCausalLM.

Architecture choices, top to bottom:
- MLA attention: q = W_qb RMSNorm(W_qa h) (one q_proj when q_lora_rank is None); W_kva h -> latent c_kv
  (kv_lora_rank) + one shared rope key k_pe; RMSNorm(c_kv) -> W_kvb -> per-head k_nope and v.
  RoPE (with YaRN) only on the rope dims; softmax scale qk_head_dim^-0.5 * mscale^2.
  Training/prefill expand K and V and call F.scaled_dot_product_attention. With a `LatentCache` the
  cache holds only c_kv and k_pe; decoding absorbs W_kvb into the query and the output, so attention
  runs over (kv_lora_rank + rope) features per cached token, shared by all heads (plain bmm calls).
  A `SharedPrefix` runs prompts shared by several sequences once (GRPO's groups) and attends the
  sequences to their prompt's latent rows.
- MoE: fp32 sigmoid router; experts chosen by score + e_score_correction_bias, group-limited
  (group score = sum of its top-2, masked groups filled with -inf as DeepSeek's own code does);
  gate weights from the unbiased scores, normalised over the chosen k, times routed_scaling_factor.
  Tokens are sorted by expert and each expert runs on its contiguous slice (torch._grouped_mm where
  available). No token dropping. Shared experts always on; the first first_k_dense_replace layers dense.
- Auxiliary-loss-free balancing: every MoE counts tokens per expert in the forward pass;
  `update_router_biases` (called once per optimizer step) moves b += gamma * sign(mean - load).
  Optional sequence-wise balance loss (alpha) is returned as `aux_loss`.
- MTP (depth D): h'_k = Block(W_proj [RMSNorm(emb(t_{i+k})); RMSNorm(h_{k-1})]) -> shared head; the
  modules sit at HF layer index num_hidden_layers + k with enorm / hnorm / eh_proj / shared_head.
- Residual: standard pre-norm; hc / mhc (hyper-connections) widen the stream to n copies (r1/model/hc.py).
Simplifications: no dropout, no KV-head grouping (MLA has num_key_value_heads == num_attention_heads).
This file holds one reference path per op. Speed layers swap modules from outside it: FP8 (r1/fp8.py),
parallelism (r1/parallel.py) and the CPU layer (r1/cpu: C kernels, oneDNN GEMMs, decode shortcuts).

Shape legend: B batch, T query length, S key length, D hidden, H heads, C qk_nope dim, R rope dim,
V v dim, L kv_lora_rank, N tokens (B*T), E routed experts, K experts per token, I expert width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from r1.model.config import V3Config, yarn_mscale
from r1.model.hc import HyperConnection, expand_streams, merge_streams


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # in fp32 for stability, cast back before the weight (as transformers and DeepSeek do)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


# ---------------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(c: V3Config) -> tuple[Tensor, float]:
    """Inverse frequencies of the rope dims (YaRN-corrected if configured) and the cos/sin factor."""
    dim, base = c.qk_rope_head_dim, c.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = c.rope_scaling or {}
    if rs.get("type", rs.get("rope_type", "default")) != "yarn":
        return inv_freq, 1.0
    factor = rs["factor"]
    low, high = c.yarn_correction_range()
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)  # interpolate low freqs, keep high ones
    mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
    cos_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all \
        else yarn_mscale(factor)
    return inv_freq, cos_factor


def softmax_scale(c: V3Config) -> float:
    scale = c.qk_head_dim ** -0.5
    rs = c.rope_scaling or {}
    if rs.get("type", rs.get("rope_type", "default")) != "default" and rs.get("mscale_all_dim"):
        scale *= yarn_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2
    return scale


def apply_rope(x: Tensor, freqs: Tensor, interleave: bool) -> Tensor:
    """Rotate x [..., R] by freqs [..., R/2] (complex, cos + i sin, broadcast against x's leading dims).
    DeepSeek stores the rope dims as interleaved (re, im) pairs: one complex multiply on a view, the
    output interleaved too. transformers de-interleaves first; that permutes q and k alike and so keeps
    q.k. Without interleave (rotate-half layout) the halves are the real and imaginary parts."""
    if interleave:
        xf = x.float()
        if xf.storage_offset() % 2 or any(st % 2 for st in xf.stride()[:-1]):  # odd head dims: no complex view
            xf = xf.contiguous()
        xc = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))
        return torch.view_as_real(xc * freqs).flatten(-2).to(x.dtype)
    cos, sin = freqs.real.to(x.dtype), freqs.imag.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ---------------------------------------------------------------------------------------------- MLA
class LatentCache:
    """MLA's decoding cache: per layer only c_kv [B, S, L] and k_pe [B, S, R], side by side in one buffer
    [B, S, L + R] (the keys of the absorbed attention, read in place; the values are its first L columns),
    preallocated and grown by doubling. All rows share one length (prompts are left-padded; pads are
    masked by the caller). It also keeps weights derived from the model's for decoding (`derived`), built
    on first use: a cache lives for one generation, during which the weights do not change."""

    def __init__(self, c: V3Config, batch: int, capacity: int, dtype: torch.dtype, device: torch.device | str):
        self.kv = [torch.zeros(batch, capacity, c.kv_lora_rank + c.qk_rope_head_dim, dtype=dtype, device=device)
                   for _ in range(c.num_hidden_layers)]
        self.rank = c.kv_lora_rank
        self.decoding = True
        self.length = 0  # tokens written, shared by all layers once a forward pass ends
        self._pending = 0
        self._derived: dict[int, object] = {}

    def derived(self, owner: nn.Module, build: Callable[[], object]) -> object:
        """build() once per owning module and builder for this cache's lifetime (the CPU layer's decode weights)."""
        key = (id(owner), build.__name__)
        if key not in self._derived:
            with torch.no_grad():
                self._derived[key] = build()
        return self._derived[key]

    @property
    def ckv(self) -> list[Tensor]:
        return [t[..., :self.rank] for t in self.kv]

    @property
    def kpe(self) -> list[Tensor]:
        return [t[..., self.rank:] for t in self.kv]

    def update(self, layer: int, ckv_BTL: Tensor, kpe_BTR: Tensor) -> Tensor:
        """Write T new tokens; returns the layer's whole [B, S, L + R] so far (a view)."""
        T, start = ckv_BTL.shape[1], self.length
        old = self.kv[layer]
        if start + T > old.shape[1]:
            grow = max(start + T, 2 * old.shape[1])
            self.kv[layer] = torch.cat([old, old.new_zeros(old.shape[0], grow - old.shape[1], old.shape[2])], 1)
        kv = self.kv[layer][:, :start + T]
        kv[:, start:] = torch.cat([ckv_BTL, kpe_BTR], dim=-1)
        self._pending = T
        return kv

    def advance(self) -> None:
        self.length += self._pending
        self._pending = 0

    def token_weights(self, valid_BT: Tensor) -> Tensor:
        return valid_BT

    def select(self, rows: Tensor) -> None:
        """Keep only `rows` (finished sequences leave the batch)."""
        self.kv = [t.index_select(0, rows) for t in self.kv]

    def nbytes(self, tokens: int | None = None) -> int:
        """Bytes per row held for `tokens` positions (default: the written length)."""
        t = self.length if tokens is None else tokens
        return sum(b[0, :t].numel() * b.element_size() for b in self.kv)


class SharedPrefix:
    """Prompts shared by several sequences, for training (GRPO: G completions per prompt). A first forward over
    the U distinct prompts keeps each layer's latent rows [c_kv, k_pe]; a second over the B completions (the
    attention mask covering prompt + completion) attends to its prompt's rows, `rows` [B] -> prompt index,
    and to its own. The same function as B whole sequences, with each prompt's tokens computed and
    back-propagated once instead of G times (index_select's backward sums the G rows' gradients).
    Differentiable: no in-place writes; recording is by layer, so a checkpointed recompute overwrites.
    (Only for U < B: the pass is told apart by its row count.)"""

    def __init__(self, rows: Tensor):
        self.rows = rows
        self.decoding = False
        self.kv: dict[int, Tensor] = {}
        self.length = 0  # prompt tokens, once the first forward has run

    def update(self, layer: int, ckv_BTL: Tensor, kpe_BTR: Tensor) -> Tensor:
        new = torch.cat([ckv_BTL, kpe_BTR], dim=-1)
        if new.shape[0] != self.rows.shape[0]:  # the prompts' forward (U < B rows), or its checkpointed recompute
            self.kv[layer] = new
            return new
        return torch.cat([self.kv[layer].index_select(0, self.rows), new], dim=1)

    def token_weights(self, valid_BT: Tensor) -> Tensor:
        """The prompts' forward: each prompt's tokens weigh as many rows as share it."""
        if valid_BT.shape[0] == self.rows.shape[0]:
            return valid_BT
        shares_U = valid_BT.new_zeros(valid_BT.shape[0]).index_add_(0, self.rows, valid_BT.new_ones(len(self.rows)))
        return valid_BT * shares_U[:, None]  # (counted by index_add_, not bincount: no host sync)

    def advance(self) -> None:
        if not self.length:
            self.length = next(iter(self.kv.values())).shape[1]

    def derived(self, owner: nn.Module, build: Callable[[], object]) -> None:
        return None  # decode-time folds are built without gradients: never in training


Cache = LatentCache | SharedPrefix


class MLA(nn.Module):
    def __init__(self, c: V3Config, layer_idx: int):
        super().__init__()
        self.c, self.layer_idx = c, layer_idx
        H, D = c.num_attention_heads, c.hidden_size
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * c.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = nn.Linear(c.q_lora_rank, H * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * c.v_head_dim, D, bias=c.attention_bias)
        self.scale = softmax_scale(c)

    def forward(self, x_BTD: Tensor, rope: Tensor, mask: Tensor | None,
                cache: Cache | None = None) -> Tensor:
        """rope: complex [B, T, 1, R/2]. mask: boolean [B, 1, T, S] (True = attend) or None (causal); with a
        cache, an additive float [B, 1, T, S] (0 or -inf), S = cached + T."""
        c = self.c
        B, T, _ = x_BTD.shape
        H, R, L = c.num_attention_heads, c.qk_rope_head_dim, c.kv_lora_rank
        q_in = x_BTD if c.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(x_BTD))
        q = self.query(q_in, cache)
        # per head: [q_nope (C), q_pe (R)] (the CPU layer's folded weights give [q_lat (L), q_pe (R)])
        q_first_BTHY, q_pe_BTHR = q.view(B, T, H, -1).split([q.shape[-1] // H - R, R], dim=-1)
        ckv_BTL, k_pe_BTR = self.kv_a_proj_with_mqa(x_BTD).split([L, R], dim=-1)
        ckv_BTL = self.kv_a_layernorm(ckv_BTL)
        # the shared rope key rides along as head H: one rotation call for q and k (decoding counts ops)
        pe_BTXR = apply_rope(torch.cat([q_pe_BTHR, k_pe_BTR.unsqueeze(2)], dim=2), rope, c.rope_interleave)
        q_pe_BTHR, k_pe_BTR = pe_BTXR[:, :, :H], pe_BTXR[:, :, H]

        if cache is not None:
            kv_BSX = cache.update(self.layer_idx, ckv_BTL, k_pe_BTR)
            # tokens cached by earlier calls: attention in latent space, always when decoding (it reads only the
            # small cache), for a shared prefix where a latent row is no wider than a head's key and value
            C, V = c.qk_nope_head_dim, c.v_head_dim
            if kv_BSX.shape[1] > T and (cache.decoding or 2 * L + R <= C + R + V):
                return self._absorbed(q_first_BTHY, q_pe_BTHR, kv_BSX, mask, cache)
            ckv_BTL, k_pe_BTR = kv_BSX.split([L, R], dim=-1)  # (a shared prefix's rows, then the T new ones)
        # training, or a prefill into an empty cache (T queries x T keys: expanding is cheaper there)
        return self.o_proj(self._expanded(q_first_BTHY, q_pe_BTHR, ckv_BTL, k_pe_BTR, mask))

    def query(self, q_in: Tensor, cache: Cache | None) -> Tensor:
        """The last query projection (the cache lets a subclass use weights derived for decoding)."""
        return (self.q_proj if self.c.q_lora_rank is None else self.q_b_proj)(q_in)

    def _expanded(self, q_nope_BTHC: Tensor, q_pe_BTHR: Tensor, ckv_BSL: Tensor, k_pe_BSR: Tensor,
                  mask: Tensor | None) -> Tensor:
        """Per-head K and V of the S keys from W_kvb and one SDPA call -> [B, T, H*V]."""
        B, T, H, C = q_nope_BTHC.shape
        R, V, S = q_pe_BTHR.shape[-1], self.c.v_head_dim, ckv_BSL.shape[1]
        kv = self.kv_b_proj(ckv_BSL).view(B, S, H, C + V)
        k_nope_BSHC, v_BSHV = kv.split([C, V], dim=-1)
        # [B, T, H, X] memory seen as [B, H, T, X]: the layout SDPA's CPU kernels read without a copy
        q_BHTX = torch.cat([q_nope_BTHC, q_pe_BTHR], dim=-1).transpose(1, 2)
        k_BHSX = torch.cat([k_nope_BSHC, k_pe_BSR.unsqueeze(2).expand(B, S, H, R)], dim=-1).transpose(1, 2)
        if V < C + R:  # SDPA's fused (flash) CPU/GPU kernels need v's head dim == q's: pad v with zeros
            v_BSHV = F.pad(v_BSHV, (0, C + R - V))
        o_BHTV = F.scaled_dot_product_attention(q_BHTX, k_BHSX, v_BSHV.transpose(1, 2), attn_mask=mask,
                                                is_causal=mask is None, scale=self.scale)[..., :V]
        return o_BHTV.transpose(1, 2).reshape(B, T, H * V)

    def _absorbed(self, q_nope_BTHC: Tensor, q_pe_BTHR: Tensor, kv_BSX: Tensor, mask: Tensor,
                  cache: Cache) -> Tensor:
        """Attention in latent space over the cached [c_kv, k_pe] rows -> [B, T, D]: W_kvb's key half is absorbed
        into the query (W_uk) and its value half into the output (W_uv)."""
        B, T, H, C = q_nope_BTHC.shape
        V, L, N = self.c.v_head_dim, self.c.kv_lora_rank, B * T
        w_HXL = self.kv_b_proj.weight.view(H, C + V, L)
        q_lat_NHL = torch.bmm(q_nope_BTHC.reshape(N, H, C).transpose(0, 1), w_HXL[:, :C]).transpose(0, 1)
        o_lat_BTHL = self.latent_attention(q_lat_NHL, q_pe_BTHR, kv_BSX, mask, self.scale)
        o_HNV = torch.bmm(o_lat_BTHL.view(N, H, L).transpose(0, 1), w_HXL[:, C:].transpose(1, 2))
        return self.o_proj(o_HNV.transpose(0, 1).reshape(B, T, H * V))

    @staticmethod
    def latent_attention(q_lat_NHL: Tensor, q_pe_BTHR: Tensor, kv_BSX: Tensor, mask: Tensor, scale: float) -> Tensor:
        """softmax(scale [q_lat, q_pe] [c_kv, k_pe]^T + mask) c_kv -> [B, T, H L]. Every head reads the same cached
        rows, so the H heads (times T queries) are rows of one [B, T*H, L+R] x [B, L+R, S] product: plain batched
        matmuls, no per-head copy of the cache."""
        B, T, H, R = q_pe_BTHR.shape
        S, L = kv_BSX.shape[1], q_lat_NHL.shape[-1]
        q_BMX = torch.cat([q_lat_NHL, q_pe_BTHR.reshape(B * T, H, R)], dim=-1).view(B, T * H, L + R)
        # the additive mask [B, 1, T, S] -> [B, T*H, S] (a broadcast view when T == 1)
        bias_BMS = mask.transpose(1, 2).expand(B, T, H, S).reshape(B, T * H, S)
        p_BMS = torch.baddbmm(bias_BMS, q_BMX, kv_BSX.transpose(1, 2), alpha=scale)
        p_BMS = p_BMS.softmax(-1, dtype=torch.float32).to(q_BMX.dtype)
        return torch.bmm(p_BMS, kv_BSX[..., :L]).view(B, T, H * L)


# ---------------------------------------------------------------------------------------------- MLP / MoE
class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def swiglu(gu_NY: Tensor) -> Tensor:
    """silu(gate) * up for gate|up stored side by side (the experts' fused gate_up projection)."""
    gate, up = gu_NY.chunk(2, dim=-1)
    return F.silu(gate) * up


class Router(nn.Module):
    """Sigmoid scores in fp32; choice on score + bias within the top groups; weights from raw scores."""

    def __init__(self, c: V3Config):
        super().__init__()
        self.c = c
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts, dtype=torch.float32))

    def forward(self, x_ND: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self.c
        with torch.autocast(x_ND.device.type, enabled=False):  # scores in fp32 under bf16 training too (V3)
            scores_NE = F.linear(x_ND.float(), self.weight.float()).sigmoid()
        choice_NE = scores_NE + self.e_score_correction_bias
        if c.n_group > 1 and c.topk_group < c.n_group:
            N, G = choice_NE.shape[0], c.n_group
            choice_NGe = choice_NE.view(N, G, -1)
            group_NG = choice_NGe.topk(2, dim=-1).values.sum(-1)
            drop_NG = torch.ones_like(group_NG, dtype=torch.bool).scatter_(
                1, group_NG.topk(c.topk_group, dim=-1).indices, False)
            # -inf as in DeepSeek's reference code: with a negative bias a masked expert can score below 0,
            # so transformers' old fill value 0.0 could pick it (tests/test_model.py shows the case).
            choice_NE = choice_NGe.masked_fill(drop_NG.unsqueeze(-1), float("-inf")).view(N, -1)
        idx_NK = choice_NE.topk(c.num_experts_per_tok, dim=-1).indices
        w_NK = scores_NE.gather(1, idx_NK)
        if c.norm_topk_prob:
            w_NK = w_NK / (w_NK.sum(-1, keepdim=True) + 1e-20)
        return w_NK * c.routed_scaling_factor, idx_NK, scores_NE


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored stacked; input rows are pre-sorted by expert (`counts_E` rows each).
    Checkpoint I/O maps these to HF's per-expert `experts.{j}.{gate,up,down}_proj.weight`."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))

    @staticmethod
    def grouped_mm(x_NX: Tensor, w_EYX: Tensor, counts_E: Tensor, offs_E: Tensor | None = None) -> Tensor:
        """x_NX @ w_e^T on each expert's slice; offs_E (int32 cumsum of counts_E) if already computed.
        Under autocast the operands take its dtype, as a matmul would (torch._grouped_mm has no autocast rule)."""
        if torch.is_autocast_enabled(x_NX.device.type):
            dt = torch.get_autocast_dtype(x_NX.device.type)
            x_NX, w_EYX = x_NX.to(dt), w_EYX.to(dt)
        # (fp32 only on a CPU: CUDA's grouped GEMM takes bf16, as the fake-CUDA dry run shows, tests/test_dryrun.py)
        if hasattr(torch, "_grouped_mm") and x_NX.shape[0] and \
                (x_NX.dtype == torch.bfloat16 or x_NX.dtype == torch.float32 and x_NX.device.type == "cpu"):
            offs = counts_E.cumsum(0).to(torch.int32) if offs_E is None else offs_E
            return torch._grouped_mm(x_NX, w_EYX.transpose(-2, -1), offs=offs)
        # Fallback: one matmul per expert on its contiguous slice (never per token).
        splits = counts_E.tolist()
        outs = [xs @ w.T for xs, w in zip(x_NX.split(splits), w_EYX, strict=True)]
        return torch.cat(outs) if outs else x_NX.new_zeros(0, w_EYX.shape[1])

    def forward(self, x_NsD: Tensor, counts_E: Tensor) -> Tensor:
        offs_E = counts_E.cumsum(0).to(torch.int32)
        h_NsI = swiglu(self.grouped_mm(x_NsD, self.gate_up_proj, counts_E, offs_E))
        return self.grouped_mm(h_NsI, self.down_proj, counts_E, offs_E)


class MoE(nn.Module):
    def __init__(self, c: V3Config):
        super().__init__()
        self.c = c
        self.gate = Router(c)
        self.experts = GroupedExperts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size)
        self.shared_experts = MLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts) \
            if c.n_shared_experts else None
        # tokens routed to each expert since the last bias update (auxiliary-loss-free balancing)
        self.register_buffer("tokens_per_expert", torch.zeros(c.n_routed_experts), persistent=False)

    def forward(self, x_BTD: Tensor, valid_BT: Tensor | None = None,
                cache: Cache | None = None) -> tuple[Tensor, Tensor | None]:
        """-> (y, sequence-wise balance loss; None when it is off or in eval)."""
        B, T, D = x_BTD.shape
        K, E = self.c.num_experts_per_tok, self.c.n_routed_experts
        x_ND = x_BTD.reshape(-1, D)
        w_NK, idx_NK, scores_NE = self.gate(x_ND)
        y_ND = self.experts_sum(x_ND, w_NK, idx_NK, cache)
        aux = None
        if self.training:
            self.count_tokens(idx_NK, valid_BT)
            if self.c.seq_aux_loss_alpha > 0:
                aux = self.seq_aux_loss(scores_NE.view(B, T, E), idx_NK.view(B, T, K), valid_BT)
        return y_ND.view(B, T, D), aux

    def experts_sum(self, x_ND: Tensor, w_NK: Tensor, idx_NK: Tensor, cache: Cache | None) -> Tensor:
        """shared(x_n) + sum_k w_nk expert_{idx_nk}(x_n): the N*K (token, expert) pairs sorted by expert, so that
        each expert sees one contiguous slice. (The cache lets a subclass use weights derived for decoding.)"""
        K, E = idx_NK.shape[1], self.c.n_routed_experts
        flat_idx = idx_NK.flatten()
        order = flat_idx.argsort(stable=True)
        token_of = order // K
        # counted by a scatter, not torch.bincount: its output length depends on the data (a host sync on a GPU)
        counts_E = flat_idx.new_zeros(E).scatter_add_(0, flat_idx, torch.ones_like(flat_idx))
        y_sorted = self.experts(x_ND.index_select(0, token_of), counts_E)
        y_sorted = y_sorted * w_NK.flatten().index_select(0, order).unsqueeze(-1).to(y_sorted.dtype)
        # the routed outputs are summed into the shared experts' output (no zero tensor, no extra add)
        y_ND = self.shared_experts(x_ND) if self.shared_experts is not None else torch.zeros_like(x_ND)
        return y_ND.index_add_(0, token_of, y_sorted.to(y_ND.dtype))

    @torch.no_grad()
    def count_tokens(self, idx_NK: Tensor, valid_BT: Tensor | None) -> None:
        """Add this batch's tokens per expert to tokens_per_expert; padding does not count (`valid`: see forward)."""
        K = idx_NK.shape[1]
        v = valid_BT.reshape(-1, 1).expand(-1, K).flatten().float() if valid_BT is not None else \
            self.tokens_per_expert.new_ones(idx_NK.numel())
        self.tokens_per_expert.index_add_(0, idx_NK.flatten(), v)  # (no bincount: no host sync)

    def seq_aux_loss(self, scores_BTE: Tensor, idx_BTK: Tensor, valid_BT: Tensor | None) -> Tensor:
        """V3's sequence-wise balance loss: alpha * sum_i f_i P_i per sequence, averaged over sequences,
        f_i = E / (K T) * #tokens choosing i, P_i = mean_t of the normalised scores s_i / sum_j s_j."""
        B, T, E = scores_BTE.shape
        K = idx_BTK.shape[-1]
        v_BT = torch.ones(B, T, device=scores_BTE.device) if valid_BT is None else (valid_BT > 0).float()
        n_B = v_BT.sum(1).clamp(min=1)
        chosen_BTE = torch.zeros_like(scores_BTE).scatter_(2, idx_BTK, 1.0) * v_BT.unsqueeze(-1)
        f_BE = chosen_BTE.sum(1) * E / (K * n_B.unsqueeze(-1))
        p_BE = (scores_BTE / scores_BTE.sum(-1, keepdim=True) * v_BT.unsqueeze(-1)).sum(1) / n_B.unsqueeze(-1)
        return self.c.seq_aux_loss_alpha * (f_BE * p_BE).sum(-1).mean()


# ---------------------------------------------------------------------------------------------- blocks
class Block(nn.Module):
    def __init__(self, c: V3Config, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(c, layer_idx)
        self.mlp = MoE(c) if layer_idx >= c.first_k_dense_replace else MLP(c.hidden_size, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if c.residual != "standard":
            self.attn_hc = HyperConnection(c, 2 * layer_idx)
            self.mlp_hc = HyperConnection(c, 2 * layer_idx + 1)

    def _attn(self, x: Tensor, rope: Tensor, mask: Tensor | None,
              cache: Cache | None) -> tuple[Tensor, None]:
        return self.self_attn(self.input_layernorm(x), rope, mask, cache), None

    def _mlp(self, x: Tensor, valid: Tensor | None, cache: Cache | None) -> tuple[Tensor, Tensor | None]:
        if isinstance(self.mlp, MoE):
            return self.mlp(self.post_attention_layernorm(x), valid, cache)
        return self.mlp(self.post_attention_layernorm(x)), None

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None,
                cache: Cache | None = None, valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x is x_BTD, or x_BTnD (n residual streams) with hyper-connections. Returns (x, aux loss or None)."""
        if not hasattr(self, "attn_hc"):
            x = x + self._attn(x, rope, mask, cache)[0]
            y, aux = self._mlp(x, valid, cache)
            return x + y, aux
        x, _ = self.attn_hc(x, lambda h: self._attn(h, rope, mask, cache))
        return self.mlp_hc(x, lambda h: self._mlp(h, valid, cache))


class MTPModule(nn.Module):
    """One multi-token-prediction depth: HF names enorm, hnorm, eh_proj, the block, shared_head.norm."""

    def __init__(self, c: V3Config, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hnorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * c.hidden_size, c.hidden_size, bias=False)
        self.block = Block(c, layer_idx)  # with HC, on its own n streams (expanded from eh_proj's output)
        self.shared_head_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


@dataclass
class V3Output:
    hidden: Tensor  # [B, T, D], after the final norm; logits = model.lm_head(hidden)
    aux_loss: Tensor  # sequence-wise balance loss summed over MoE layers (0 when off or in eval)
    mtp_hidden: list[Tensor]  # per MTP depth k: [B, T-k, D] normed states predicting t_{i+k+1}


# ---------------------------------------------------------------------------------------------- the model
class V3ForCausalLM(nn.Module):
    def __init__(self, c: V3Config):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([Block(c, i) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList([MTPModule(c, c.num_hidden_layers + k) for k in range(c.num_nextn_predict_layers)])
        inv_freq, self.rope_factor = rope_inv_freq(c)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.gradient_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=std)
            elif name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)
        for m in self.modules():
            if isinstance(m, HyperConnection):
                m.reset_parameters()

    @property
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def rope(self, position_ids_BT: Tensor) -> Tensor:
        """(cos + i sin) * rope_factor per position and frequency: complex [B, T, 1, R/2] (1: heads)."""
        angles = position_ids_BT.float().unsqueeze(-1) * self.inv_freq  # [B, T, R/2]
        return torch.polar(torch.full_like(angles, self.rope_factor), angles).unsqueeze(2)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: Cache | None = None, mtp: bool | None = None) -> V3Output:
        """input_ids [B, T]. attention_mask [B, S] marks real tokens (S = cached + T; left padding ok).
        position_ids [B, T]: defaults to the count of real tokens before each one; in a packed batch,
        positions that restart at 0 start a new document that does not see the previous ones."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        # documents restart only where given positions do: default ones need no look at the data (a host sync)
        packed = attention_mask is None and position_ids is not None
        if position_ids is None:
            if attention_mask is not None and T == 1:  # decoding: the last column of the cumsum below
                position_ids = (attention_mask.long().sum(-1, keepdim=True) - 1).clamp(min=0)
            elif attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        if cache is None:
            mask = build_mask(attention_mask, position_ids, T, past, packed=packed)
        else:  # the latent attention adds its mask to the scores, built once for all layers
            mask = additive_mask(attention_mask, position_ids, T, past, x.dtype)
        rope = self.rope(position_ids)
        # real tokens of this call: the MoE load counts skip padding (training only)
        # training: each token's weight in the MoE load counts, 0 for padding; a shared prompt's tokens count
        # once per row that shares it, as if each had run them (so sharing leaves the balancing unchanged)
        valid = None
        if attention_mask is not None and self.training:
            valid = attention_mask[:, -T:].float()
            valid = cache.token_weights(valid) if cache is not None else valid
        if self.config.residual != "standard":
            x = expand_streams(x, self.config.hc_streams)
        aux = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x, a = checkpoint(layer, x, rope, mask, cache, valid, use_reentrant=False)
            else:
                x, a = layer(x, rope, mask, cache, valid)
            if a is not None:
                aux = aux + a
        if cache is not None:
            cache.advance()
        if self.config.residual != "standard":
            x = merge_streams(x)
        h = self.norm(x)
        mtp_hidden: list[Tensor] = []
        if (self.training if mtp is None else mtp) and len(self.mtp) and cache is None:
            prev = h
            for k, m in enumerate(self.mtp, start=1):
                # depth k combines h_i (from depth k-1) with the embedding of token i+k
                emb = self.embed_tokens(input_ids[:, k:])
                hk = m.eh_proj(torch.cat([m.enorm(emb), m.hnorm(prev[:, :-1])], dim=-1))
                sub_mask = None if mask is None else mask[..., k:, k:]
                if self.config.residual != "standard":
                    hk = expand_streams(hk, self.config.hc_streams)
                hk, a = m.block(hk, rope[:, k:], sub_mask, None, None if valid is None else valid[:, k:])
                if self.config.residual != "standard":
                    hk = merge_streams(hk)
                if a is not None:
                    aux = aux + a
                prev = hk
                mtp_hidden.append(m.shared_head_norm(hk))
        return V3Output(hidden=h, aux_loss=aux, mtp_hidden=mtp_hidden)

    def logits(self, input_ids: Tensor, **kw: object) -> Tensor:
        return self.lm_head(self.forward(input_ids, **kw).hidden)


def build_mask(attention_mask: Tensor | None, position_ids: Tensor, T: int, past: int, packed: bool) -> Tensor | None:
    """A boolean [B, 1, T, S] mask (True = attend), or None for the plain causal case (SDPA's fast path)."""
    q_pos = torch.arange(past, past + T, device=position_ids.device)
    if attention_mask is None:
        if not packed or not bool((position_ids[:, 1:] == 0).any()):
            return None if past == 0 else torch.ones(1, 1, T, past + T, dtype=torch.bool, device=q_pos.device)
        doc_BT = (position_ids == 0).long().cumsum(-1)  # packed documents: block-diagonal causal
        causal = q_pos[:, None] >= torch.arange(T, device=q_pos.device)[None, :]
        return (causal & (doc_BT[:, :, None] == doc_BT[:, None, :])).unsqueeze(1)
    S = attention_mask.shape[1]
    k_pos = torch.arange(S, device=q_pos.device)
    mask = (k_pos[None, :] <= q_pos[:, None]) & attention_mask.bool()[:, None, :]  # [B, T, S]
    # A padding query sees no key at all; letting it see itself avoids NaN rows (its output is unused).
    mask |= (k_pos[None, :] == q_pos[:, None]).unsqueeze(0)
    return mask.unsqueeze(1)


def additive_mask(attention_mask: Tensor | None, position_ids: Tensor, T: int, past: int,
                  dtype: torch.dtype) -> Tensor:
    """build_mask's rule as scores to add, [B, 1, T, S]: 0 where a query attends, -inf elsewhere."""
    B, S, dev = position_ids.shape[0], past + T, position_ids.device
    if T == 1:  # decoding: the query (the last position) sees every real key and itself, a few ops
        bias = torch.zeros(B, 1, 1, S, dtype=dtype, device=dev)
        if attention_mask is not None:
            bias[..., :-1].masked_fill_((attention_mask[:, :-1] == 0).view(B, 1, 1, S - 1), float("-inf"))
        return bias
    keep = build_mask(attention_mask if attention_mask is not None else torch.ones(B, S, device=dev),
                      position_ids, T, past, packed=False)
    return torch.zeros(keep.shape, dtype=dtype, device=dev).masked_fill_(~keep, float("-inf"))


# ---------------------------------------------------------------------------------------------- balancing
@torch.no_grad()
def update_router_biases(model: nn.Module, gamma: float | None = None, recenter: bool | None = None) -> None:
    """Auxiliary-loss-free balancing, once per optimizer step: b_i += gamma * sign(mean_load - load_i)
    over the global batch (counts all-reduced across ranks), then the counts restart from zero."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        return
    counts = torch.stack([m.tokens_per_expert for m in moes])  # [layers, E]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    for m, load in zip(moes, counts, strict=True):
        g = m.c.router_bias_update_speed if gamma is None else gamma
        b = m.gate.e_score_correction_bias
        b += g * torch.sign(load.mean() - load)
        if m.c.router_bias_recenter if recenter is None else recenter:
            b -= b.mean()
        m.tokens_per_expert.zero_()


@torch.no_grad()
def expert_load_metrics(model: nn.Module) -> dict[str, float]:
    """Per MoE layer: max/mean load and the fraction of experts that received no token (dead)."""
    out: dict[str, float] = {}
    for i, m in enumerate(m for m in model.modules() if isinstance(m, MoE)):
        load = m.tokens_per_expert
        if load.sum() > 0:
            out[f"moe/{i}/max_over_mean"] = (load.max() / load.mean()).item()
            out[f"moe/{i}/dead_frac"] = (load == 0).float().mean().item()
    if out:
        vals = [v for k, v in out.items() if k.endswith("max_over_mean")]
        out["moe/max_over_mean"] = max(vals)
    return out
