"""HF checkpoint round trips through transformers' own DeepseekV3 loader and saver."""

from __future__ import annotations

import json

import pytest
import torch
from _v3ref import hf_config, hf_copy, randomize
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3ForCausalLM

from r1.model.config import PRESETS
from r1.model.hf import CheckpointMismatch, dequantize_fp8, fp8_tensors, load_hf, quantize_fp8, save_hf
from r1.model.model import V3ForCausalLM


def model(seed: int = 0, **kw) -> V3ForCausalLM:
    torch.manual_seed(seed)
    c = PRESETS["tiny"].replace(num_hidden_layers=3, first_k_dense_replace=1, **kw)
    return randomize(V3ForCausalLM(c), seed).eval()


def test_our_save_transformers_load(tmp_path):
    ours = model(q_lora_rank=None)
    save_hf(ours, tmp_path)
    ref = DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert (ours.logits(ids) - ref(ids).logits).abs().max() < 1e-4
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["num_nextn_predict_layers"] == 1


def test_transformers_save_our_load(tmp_path):
    ref = hf_copy(model(seed=1))
    ref.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert any(".mlp.experts.0.gate_proj.weight" in k for k in keys)  # per-expert layout on disk
    with pytest.warns(UserWarning, match="MTP initialised fresh"):  # transformers keeps no MTP layer
        ours = load_hf(tmp_path)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert (ours.logits(ids) - ref(ids).logits).abs().max() < 1e-4


def test_sharded_round_trip_with_mtp(tmp_path):
    ours = model(seed=2)
    save_hf(ours, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    names = index["weight_map"]
    L = ours.config.num_hidden_layers
    for hf_name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                    "shared_head.head.weight", "embed_tokens.weight", "mlp.experts.3.down_proj.weight",
                    "self_attn.kv_b_proj.weight"):
        assert f"model.layers.{L}.{hf_name}" in names, hf_name
    back = load_hf(tmp_path)
    for (n, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        a, b = ours(ids, mtp=True), back(ids, mtp=True)
    assert torch.equal(a.mtp_hidden[0], b.mtp_hidden[0])


def test_fp8_checkpoint_loads_within_fp8_rounding(tmp_path):
    ours = model(seed=3, hidden_size=192, intermediate_size=320)  # 192, 320: partial 128-blocks too
    save_hf(ours, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    quantized = {}
    for k, t in sd.items():
        if t.dim() == 2 and "proj" in k and "eh_proj" not in k:
            q, s = quantize_fp8(t)
            quantized[k], quantized[k + "_scale_inv"] = q, s
        else:
            quantized[k] = t
    save_file(quantized, tmp_path / "model.safetensors")
    back = load_hf(tmp_path)
    # the fp8 weights and scales as stored, for precision fp8 (r1.fp8.load_fp8_weights); nothing else
    fp8 = dict(fp8_tensors(tmp_path))
    assert fp8.keys() == {k for k in quantized if k.endswith("_scale_inv") or k + "_scale_inv" in quantized}
    assert all(torch.equal(fp8[k].view(torch.uint8) if fp8[k].dtype == torch.float8_e4m3fn else fp8[k],
                           quantized[k].view(torch.uint8) if quantized[k].dtype == torch.float8_e4m3fn
                           else quantized[k]) for k in fp8)
    theirs = dict(back.named_parameters())
    for name, p in ours.named_parameters():
        q = theirs[name]
        if torch.equal(p, q):
            continue
        # e4m3 has a 3-bit mantissa: relative rounding error <= 2^-4 of the value, plus the block's
        # underflow floor for tiny values
        block_amax = p.abs().max()
        assert ((p - q).abs() <= p.abs() * 2 ** -4 + block_amax * 2 ** -9 + 1e-12).all(), name
    w = torch.randn(130, 260)
    q, s = quantize_fp8(w)
    assert s.shape == (2, 3) and q.dtype == torch.float8_e4m3fn
    assert torch.allclose(dequantize_fp8(q, s), w, rtol=2 ** -4, atol=1e-3)


def test_fp8_block_size_from_config_and_scale_grid_checked(tmp_path):
    ours = model(seed=5, hidden_size=96)
    save_hf(ours, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    k = "model.layers.0.self_attn.kv_b_proj.weight"  # [4 x (16 + 16), 32]: 2 x 1 blocks of 64
    sd[k], sd[k + "_scale_inv"] = quantize_fp8(sd[k], block=64)
    save_file(sd, tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [64, 64]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    back = load_hf(tmp_path)
    assert torch.equal(back.layers[0].self_attn.kv_b_proj.weight, dequantize_fp8(sd[k], sd[k + "_scale_inv"], 64))
    cfg["quantization_config"]["weight_block_size"] = [128, 128]  # the scales no longer match the blocks
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatch, match=r"kv_b_proj.weight_scale_inv is \(2, 1\), not \(1, 1\)"):
        load_hf(tmp_path)


def test_mismatch_is_one_error_listing_keys(tmp_path):
    save_hf(model(seed=4), tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd.pop("model.layers.0.self_attn.o_proj.weight")
    sd["model.layers.0.bogus.weight"] = torch.zeros(1)
    sd["model.norm.weight"] = torch.ones(7)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatch) as e:
        load_hf(tmp_path)
    msg = str(e.value)
    assert "missing (1): model.layers.0.self_attn.o_proj.weight" in msg
    assert "unexpected (1): model.layers.0.bogus.weight" in msg
    assert "model.norm.weight: checkpoint (7,) vs model (64,)" in msg


def test_hf_config_roundtrip():
    c = PRESETS["deepseek-v3"]
    ref = hf_config(c)
    assert ref.rope_parameters["rope_type"] == "yarn" and ref.rope_parameters["factor"] == 40.0
    from r1.model.config import V3Config
    back = V3Config.from_dict(ref.to_dict())
    assert back.rope_scaling["factor"] == 40.0 and back.n_routed_experts == 256 and back.q_lora_rank == 1536


def test_load_reads_straight_into_the_dtype(tmp_path):
    """bf16: parameters are materialised in bf16 and filled tensor by tensor (the values of the fp32 load, cast);
    the balancing bias and RoPE frequencies stay fp32; the torch allocations alive at once stay below the fp32
    model's size (the old path built the whole model in fp32, then cast: 1.5x)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from common import peak_bytes

    save_hf(model(seed=3, hidden_size=128, moe_intermediate_size=64, intermediate_size=256), tmp_path)
    full = load_hf(tmp_path)
    fp32_bytes = sum(p.numel() * 4 for p in full.parameters())
    out = []
    peak = peak_bytes(lambda: out.append(load_hf(tmp_path, dtype=torch.bfloat16)))
    half = out[0]
    assert peak < 0.7 * fp32_bytes, (peak, fp32_bytes)
    for (n, a), b in zip(full.named_parameters(), half.parameters(), strict=True):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), n
    assert half.inv_freq.dtype == torch.float32 and torch.equal(half.inv_freq, full.inv_freq)
    for m in half.moe_layers:
        assert m.gate.e_score_correction_bias.dtype == torch.float32


def test_fsdp2_ranks_load_only_their_shards(tmp_path):
    """Two gloo processes under FSDP2 load a V3 config of >= 200 MB of fp32 weights (bench/shard_memory.py): each
    rank's peak resident memory while loading, above what it held after its imports, stays under 0.7x the
    model's weight bytes (one process holding the model needs >= 1x; the old loader ~2x)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from shard_memory import launch, make_model

    weights = make_model(tmp_path / "model", hidden=512, experts=16, layers=8)
    assert weights >= 200 << 20
    ranks = launch(tmp_path / "model", tmp_path, 2, steps=0)
    for r in ranks:
        assert (r["load"] - r["base"]) * 1024 < 0.7 * weights, (r, weights)
