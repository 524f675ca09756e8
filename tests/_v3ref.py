"""Helpers shared by the model tests: build transformers' DeepseekV3ForCausalLM with our weights."""

from __future__ import annotations

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from r1.model.config import V3Config
from r1.model.model import V3ForCausalLM


def hf_config(c: V3Config, attn: str = "eager") -> DeepseekV3Config:
    d = c.to_hf_dict()
    keep = {k: v for k, v in d.items() if k in DeepseekV3Config.__dataclass_fields__ or k == "rope_parameters"}
    keep.pop("num_mtp_layers", None)
    hc = DeepseekV3Config(**keep)
    hc._attn_implementation = attn
    return hc


@torch.no_grad()
def hf_copy(ours: V3ForCausalLM, attn: str = "eager") -> DeepseekV3ForCausalLM:
    """transformers' model holding exactly our weights (in-memory names: fused 3-D experts as ours)."""
    ref = DeepseekV3ForCausalLM(hf_config(ours.config, attn)).eval()
    sd = {}
    for name, t in list(ours.named_parameters()) + list(ours.named_buffers()):
        if name.startswith("mtp.") or name in ("inv_freq",) or name.endswith("tokens_per_expert"):
            continue
        sd[name if name.startswith("lm_head") else "model." + name] = t
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    return ref


def randomize(model: V3ForCausalLM, seed: int = 0) -> V3ForCausalLM:
    """Random weights with non-trivial norms and a non-zero random correction bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "_hc." not in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        for m in model.moe_layers:
            m.gate.e_score_correction_bias.copy_(0.1 * torch.randn(m.gate.e_score_correction_bias.shape, generator=g))
    return model
