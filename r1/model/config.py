"""The V3 model config: field names and defaults of transformers' DeepseekV3Config (DeepSeek-V3 671B).

A flat dataclass, readable from a HF `config.json` (DeepSeek's own files, or transformers 5's with
`rope_parameters`) and written back as one transformers and vLLM load. Fields after the marked line
are r1's training extensions; they are saved under the same names and ignored by other loaders.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class V3Config:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    # "mscale", "mscale_all_dim"} as in DeepSeek-V3's config.json; None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    num_nextn_predict_layers: int = 1  # MTP depth D (0 disables)
    # ---- r1 extensions (not read by transformers) ----
    mtp_loss_weight: float = 0.3  # lambda: 0.3 early in V3 pretraining, 0.1 later
    router_bias_update_speed: float = 1e-3  # gamma of auxiliary-loss-free balancing
    router_bias_recenter: bool = False  # subtract the mean bias after each update
    seq_aux_loss_alpha: float = 1e-4  # the tiny sequence-wise balance loss (0 disables)
    residual: str = "standard"  # standard | hc | mhc (hyper-connections)
    hc_streams: int = 4
    torch_dtype: str = "float32"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def yarn_correction_range(self) -> tuple[int, int]:
        """YaRN's ramp over the rope frequency pairs (DeepSeek's find_correction_range): pairs below `low`
        keep their frequency, pairs above `high` are interpolated by `factor`. Plain Python, so a model
        built on the meta device (as `load_hf` does) computes it too."""
        rs = self.rope_scaling or {}
        dim, base, orig = self.qk_rope_head_dim, self.rope_theta, rs["original_max_position_embeddings"]

        def correction_dim(rotations: float) -> float:
            return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = math.floor(correction_dim(rs.get("beta_fast") or 32))
        high = math.ceil(correction_dim(rs.get("beta_slow") or 1))
        return max(low, 0), min(high, dim - 1)

    def __post_init__(self) -> None:
        if self.n_routed_experts % max(self.n_group, 1):
            raise ValueError(f"n_routed_experts={self.n_routed_experts} not divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} > n_group={self.n_group}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError("num_experts_per_tok > n_routed_experts")
        if self.residual not in ("standard", "hc", "mhc"):
            raise ValueError(f"residual must be standard, hc or mhc, not {self.residual!r}")

    # ---------------------------------------------------------------- HF config.json
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> V3Config:
        d = dict(d)
        # transformers 5 keeps rope settings in `rope_parameters` ({"rope_type", "rope_theta", ...}).
        rp = d.pop("rope_parameters", None)
        if rp:
            d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            if rp.get("rope_type", "default") != "default" and not d.get("rope_scaling"):
                d["rope_scaling"] = {"type": rp["rope_type"], **{k: v for k, v in rp.items()
                                                                 if k not in ("rope_type", "rope_theta")}}
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d.pop("num_mtp_layers")
        if d.get("num_key_value_heads") is None:
            d["num_key_value_heads"] = d.get("num_attention_heads", cls.num_attention_heads)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str | Path) -> V3Config:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_dict(json.loads(path.read_text()))

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
                 # DeepSeek's own config keys, read by vLLM's DeepSeek-V3 loader
                 topk_method="noaux_tc", scoring_func="sigmoid", n_routed_experts=self.n_routed_experts,
                 moe_layer_freq=1, num_mtp_layers=self.num_nextn_predict_layers)
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rs = dict(self.rope_scaling)
            rope = {"rope_type": rs.pop("type", rs.pop("rope_type", "yarn")), "rope_theta": self.rope_theta, **rs}
        d["rope_parameters"] = rope
        return d

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text(json.dumps(self.to_hf_dict(), indent=2))

    def replace(self, **kw: Any) -> V3Config:
        return dataclasses.replace(self, **kw)


# ---------------------------------------------------------------- named presets
def _tiny(**kw: Any) -> V3Config:
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48,
                qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=4, topk_group=2,
                num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=512,
                num_nextn_predict_layers=1)
    base.update(kw)
    base["num_key_value_heads"] = base["num_attention_heads"]  # MLA: every head has its own k and v
    return V3Config(**base)


PRESETS: dict[str, V3Config] = {
    # unit tests: every feature on, a few thousand parameters a layer
    "tiny": _tiny(),
    # the CPU smoke recipe: small enough to train SFT + GRPO on 2 cores in minutes
    "smoke": _tiny(vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=128,
                   intermediate_size=256, moe_intermediate_size=64,
                   num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=32, q_lora_rank=None,
                   qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=8,
                   n_group=2, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1),
    # bench/model_step.py: hidden 256, 4 layers, 1 dense, 16 routed experts top-4, 1 shared
    "bench": _tiny(vocab_size=4096, hidden_size=256, intermediate_size=1024, moe_intermediate_size=256,
                   num_hidden_layers=4, num_attention_heads=8, kv_lora_rank=64, q_lora_rank=128,
                   qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=16,
                   n_group=4, topk_group=2, num_experts_per_tok=4, first_k_dense_replace=1,
                   num_nextn_predict_layers=0, max_position_embeddings=4096),
    # DeepSeek-V3 / R1 (671B total, 37B active), as in deepseek-ai/DeepSeek-V3's config.json
    "deepseek-v3": V3Config(rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                          "mscale_all_dim": 1.0}),
}


def load_config(name_or_path: str) -> V3Config:
    """A preset name, a config.json, or a checkpoint directory holding one."""
    if name_or_path in PRESETS:
        return dataclasses.replace(PRESETS[name_or_path])
    p = Path(name_or_path)
    if p.is_dir() and (p / "config.json").exists() or p.is_file():
        return V3Config.from_json(p)
    raise FileNotFoundError(f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json "
                            "or a directory holding one")


# ---------------------------------------------------------------- sizes and FLOPs
@dataclass
class ModelSize:
    total: int
    active: int  # parameters touched per token (top-k routed experts + shared + dense + attention + head)
    mtp: int  # of total, in the MTP modules
    train_flops_per_token: float  # 6 x active matmul params + attention scores at `seq_len`
    seq_len: int = field(default=4096)


def count_params(c: V3Config, seq_len: int = 4096) -> ModelSize:
    D, H = c.hidden_size, c.num_attention_heads
    if c.q_lora_rank is None:
        q = D * H * c.qk_head_dim
    else:
        q = D * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim
    kv = D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank \
        + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)
    attn = q + kv + H * c.v_head_dim * D
    dense_mlp = 3 * D * c.intermediate_size
    expert = 3 * D * c.moe_intermediate_size
    router = c.n_routed_experts * D
    moe_total = router + expert * (c.n_routed_experts + c.n_shared_experts)
    moe_active = router + expert * (c.num_experts_per_tok + c.n_shared_experts)
    norms = 2 * D
    n_dense = min(c.first_k_dense_replace, c.num_hidden_layers)
    n_moe = c.num_hidden_layers - n_dense
    layers_total = n_dense * (attn + dense_mlp + norms) + n_moe * (attn + moe_total + norms)
    layers_active = n_dense * (attn + dense_mlp + norms) + n_moe * (attn + moe_active + norms)
    emb = c.vocab_size * D
    head = 0 if c.tie_word_embeddings else c.vocab_size * D
    # MTP module: enorm + hnorm + eh_proj + one MoE block + its head norm (embedding and head shared)
    mtp_one = 2 * D + 2 * D * D + attn + moe_total + norms + D
    mtp = c.num_nextn_predict_layers * mtp_one
    total = emb + layers_total + D + head + mtp
    active = emb + layers_active + D + head
    # matmul params per token (no embedding lookup), x6 for forward + backward; causal attention
    # does qk^T and pv over seq_len/2 keys on average per head.
    matmul = layers_active - c.num_hidden_layers * norms + c.vocab_size * D
    attn_flops = 6 * c.num_hidden_layers * H * (c.qk_head_dim + c.v_head_dim) * seq_len / 2
    return ModelSize(total=total, active=active, mtp=mtp, train_flops_per_token=6 * matmul + attn_flops,
                     seq_len=seq_len)


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
