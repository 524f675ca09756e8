"""Real DeepSeek-V3-family configs through transformers' saver and r1's loader.

Each case reads a published config.json from ../shared/data/configs and shrinks only sizes (layers, hidden,
heads, experts, vocab, intermediate sizes); every other field (YaRN x40, MTP depth 1, group routing, FP8
block size, q LoRA or none, rope_theta, ...) stays as published. transformers builds and saves the model;
r1 loads the directory and must give transformers' logits. FP8 checkpoints are made here the way DeepSeek's
are stored (e4m3 weights, one fp32 `weight_scale_inv` per 128x128 block, partial edge blocks) by a block
loop independent of r1's quantiser, and transformers runs on the weights that loop dequantises.

DeepSeek-R1 is assumed to share V3's config.json field for field (SOURCES.md: R1 and R1-Zero publish the same
architecture fields; the files differ in names and metadata only), so the R1 case reads V3's file. What it
varies is the checkpoint layout DeepSeek releases: FP8, sharded with an index, the MTP layer present.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from r1.model.hf import CheckpointMismatch, load_hf

CONFIGS = SHARED_DATA / "configs"
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not CONFIGS.is_dir(), reason=f"published configs not found at {CONFIGS}")

# published file, and the sizes shrunk (kv_lora_rank 512 and the 128/64/128 head dims stay as published)
SHAPES = {
    "deepseek-v3": ("deepseek-v3.config.json",
                    dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=320, moe_intermediate_size=96, n_routed_experts=16, vocab_size=160)),
    "deepseek-r1": ("deepseek-v3.config.json",  # assumed equal to V3's, see the module docstring
                    dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=320, moe_intermediate_size=96, n_routed_experts=16, vocab_size=160)),
    "moonlight-16b-a3b": ("moonlight-16b-a3b.config.json",
                          dict(num_hidden_layers=3, hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
                               intermediate_size=192, moe_intermediate_size=48, n_routed_experts=8,
                               vocab_size=160)),
}
BLOCK = 128  # DeepSeek-V3's quantization_config.weight_block_size
# what DeepSeek's FP8 checkpoints store as e4m3: the attention and MLP/expert projections; embeddings, head,
# norms, the router and the MTP's eh_proj stay in high precision
FP8_KEYS = ("q_proj.weight", "q_a_proj.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight", "kv_b_proj.weight",
            "o_proj.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def published(name: str) -> dict:
    fname, sizes = SHAPES[name]
    d = json.loads((CONFIGS / fname).read_text())
    assert set(sizes) <= set(d), sorted(set(sizes) - set(d))
    return d | sizes


def hf_model(d: dict, seed: int = 0) -> DeepseekV3ForCausalLM:
    """transformers' model of config dict `d` with random weights at unit activation scale (so rope, routing and
    every norm matter to the logits) and a random expert-bias (it decides routing)."""
    d = {k: v for k, v in d.items() if k != "quantization_config"}  # weights are made full precision here
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**d)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name else p.shape[-1] ** -0.5))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's storage: e4m3 weight and fp32 weight_scale_inv [ceil(M/128), ceil(N/128)], w ~ q * s blockwise."""
    M, N = w.shape
    q = torch.empty(M, N, dtype=torch.float8_e4m3fn)
    s = torch.empty(math.ceil(M / BLOCK), math.ceil(N / BLOCK))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].float()
            s[i, j] = blk.abs().max() / 448.0  # 448 = e4m3's largest finite value
            q[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def from_fp8_blocks(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    w = torch.empty(q.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            sl = (slice(i * BLOCK, (i + 1) * BLOCK), slice(j * BLOCK, (j + 1) * BLOCK))
            w[sl] = q[sl].float() * s[i, j]
    return w


def logits_gap(ours: torch.nn.Module, ref: DeepseekV3ForCausalLM, vocab: int) -> float:
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours.logits(ids), ref(ids).logits
    assert b.abs().max() > 1.0  # logits large enough for 1e-4 to mean something
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory) -> tuple[Path, DeepseekV3ForCausalLM]:
    """DeepSeek-V3's config (YaRN, MTP depth 1), saved by transformers: no MTP weights on disk."""
    d = tmp_path_factory.mktemp("v3")
    ref = hf_model(published("deepseek-v3"))
    ref.save_pretrained(d)
    return d, ref


def load_quietly(d: Path):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model = load_hf(d)
    return model, [str(x.message) for x in w if "MTP" in str(x.message)]


# ------------------------------------------------------------------------------------ YaRN + MTP, transformers-saved
def test_v3_yarn_mtp_checkpoint_from_transformers(v3_dir):
    d, ref = v3_dir
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["num_nextn_predict_layers"] == 1
    assert not [k for k in load_file(d / "model.safetensors") if k.startswith("model.layers.4.")]  # no MTP saved
    ours, mtp_warnings = load_quietly(d)
    assert len(mtp_warnings) == 1 and "MTP initialised fresh" in mtp_warnings[0], mtp_warnings
    assert logits_gap(ours, ref, 160) < 1e-4
    # the MTP module is the model's own init (normal(0, initializer_range), unit norms), and it runs
    mtp = ours.mtp[0]
    assert torch.equal(mtp.enorm.weight, torch.ones(256)) and torch.equal(mtp.shared_head_norm.weight, torch.ones(256))
    assert abs(mtp.eh_proj.weight.std().item() - 0.02) < 2e-3
    with torch.no_grad():
        out = ours(torch.randint(0, 160, (1, 8)), mtp=True)
    assert out.mtp_hidden[0].shape == (1, 7, 256) and out.mtp_hidden[0].isfinite().all()


def test_missing_weights_outside_mtp_still_refused(v3_dir, tmp_path):
    d, _ = v3_dir
    sd = load_file(d / "model.safetensors")
    sd.pop("model.layers.3.mlp.experts.5.up_proj.weight")
    sd.pop("model.layers.1.self_attn.kv_b_proj.weight")
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(CheckpointMismatch) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_hf(tmp_path)
    msg = str(e.value)
    assert "missing (2): model.layers.1.self_attn.kv_b_proj.weight, model.layers.3.mlp.experts.5.up_proj.weight\n" \
        in msg + "\n", msg
    assert "layers.4" not in msg  # the absent MTP layer is not the complaint


def test_partial_mtp_layer_refused(v3_dir, tmp_path):
    """An MTP layer that is there but incomplete is a broken checkpoint, not a transformers one."""
    d, _ = v3_dir
    sd = load_file(d / "model.safetensors")
    sd["model.layers.4.enorm.weight"] = torch.ones(256)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(CheckpointMismatch, match=r"missing \(\d+\): model.layers.4.eh_proj.weight"):
        load_hf(tmp_path)


# ------------------------------------------------------------------------------------ other published shapes
def test_moonlight_checkpoint_from_transformers(tmp_path):
    d = published("moonlight-16b-a3b")
    assert d["q_lora_rank"] is None and d["n_group"] == 1 and d["num_nextn_predict_layers"] == 0
    ref = hf_model(d, seed=1)
    ref.save_pretrained(tmp_path)
    ours, mtp_warnings = load_quietly(tmp_path)
    assert not mtp_warnings and len(ours.mtp) == 0
    assert logits_gap(ours, ref, 160) < 1e-4


# ------------------------------------------------------------------------------------ FP8 block scales
def write_fp8(src: dict[str, torch.Tensor], directory: Path, config: dict, shards: int = 1) -> dict[str, torch.Tensor]:
    """Quantise the FP8_KEYS tensors of `src` blockwise into `directory` (with `config`); returns the
    dequantised full-precision tensors, what the checkpoint means."""
    directory.mkdir(parents=True, exist_ok=True)
    disk, meant = {}, {}
    for k, t in src.items():
        if k.endswith(FP8_KEYS) and t.dim() == 2:
            q, s = fp8_blocks(t)
            disk[k], disk[k + "_scale_inv"] = q, s
            meant[k] = from_fp8_blocks(q, s)
        else:
            disk[k] = meant[k] = t
    names = sorted(disk)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        part = names[i::shards]
        save_file({k: disk[k].contiguous() for k in part}, directory / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    if shards > 1:
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))
    return meant


def test_v3_fp8_checkpoint(v3_dir, tmp_path):
    """transformers' V3 weights stored as DeepSeek stores them (the published quantization_config kept)."""
    d, ref = v3_dir
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = published("deepseek-v3")["quantization_config"]
    meant = write_fp8(load_file(d / "model.safetensors"), tmp_path / "fp8", config)
    scales = load_file(tmp_path / "fp8" / "model.safetensors")
    # 576 x 256: a partial block row, as in V3's own checkpoint (576 x 7168 -> 5 x 56 scales)
    assert scales["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 2)
    (tmp_path / "dequantised").mkdir()
    save_file(meant, tmp_path / "dequantised" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "dequantised" / "config.json").write_text((d / "config.json").read_text())
    deq_ref = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "dequantised", dtype=torch.float32).eval()
    ours, _ = load_quietly(tmp_path / "fp8")
    assert torch.equal(ours.layers[0].self_attn.kv_a_proj_with_mqa.weight,
                       meant["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"])
    assert logits_gap(ours, deq_ref, 160) < 1e-4
    assert logits_gap(ours, ref, 160) > 1e-3  # the FP8 rounding is real: the dequantised weights were used


def test_r1_release_layout_fp8_sharded_with_mtp(tmp_path):
    """DeepSeek's own release layout: FP8 shards + index, and the MTP layer kept (index num_hidden_layers) with
    its copies of the embedding and head. transformers ignores that layer; r1 must load it."""
    d = published("deepseek-r1")
    L, H = d["num_hidden_layers"], d["hidden_size"]
    ref = hf_model(d, seed=2)
    ref.save_pretrained(tmp_path / "hf")
    src = load_file(tmp_path / "hf" / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    mtp = {f"model.layers.{L}.{k[len(f'model.layers.{L - 1}.'):]}": t + 0.01 * torch.randn(t.shape, generator=g)
           for k, t in src.items() if k.startswith(f"model.layers.{L - 1}.")}  # a MoE block of its own
    mtp |= {f"model.layers.{L}.enorm.weight": 1 + 0.1 * torch.randn(H, generator=g),
            f"model.layers.{L}.hnorm.weight": 1 + 0.1 * torch.randn(H, generator=g),
            f"model.layers.{L}.shared_head.norm.weight": 1 + 0.1 * torch.randn(H, generator=g),
            f"model.layers.{L}.eh_proj.weight": torch.randn(H, 2 * H, generator=g) / (2 * H) ** 0.5,
            f"model.layers.{L}.embed_tokens.weight": src["model.embed_tokens.weight"].clone(),
            f"model.layers.{L}.shared_head.head.weight": src["lm_head.weight"].clone()}
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["quantization_config"] = d["quantization_config"]
    meant = write_fp8(src | mtp, tmp_path / "r1", config, shards=3)
    assert len(list((tmp_path / "r1").glob("*.safetensors"))) == 3
    save_file({k: v for k, v in meant.items() if not k.startswith(f"model.layers.{L}.")},
              tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    deq_ref = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours, mtp_warnings = load_quietly(tmp_path / "r1")
    assert not mtp_warnings
    m = ours.mtp[0]
    assert torch.equal(m.eh_proj.weight, meant[f"model.layers.{L}.eh_proj.weight"])
    assert torch.equal(m.block.self_attn.kv_b_proj.weight, meant[f"model.layers.{L}.self_attn.kv_b_proj.weight"])
    assert torch.equal(m.block.mlp.experts.down_proj[7], meant[f"model.layers.{L}.mlp.experts.7.down_proj.weight"])
    assert torch.equal(m.block.mlp.gate.e_score_correction_bias,
                       meant[f"model.layers.{L}.mlp.gate.e_score_correction_bias"])
    assert logits_gap(ours, deq_ref, 160) < 1e-4


# ------------------------------------------------------------------------------------ r1 eval on that checkpoint
def test_r1_eval_runs_transformers_yarn_mtp_checkpoint(v3_dir, tmp_path, capsys):
    """`r1 eval` (the CLI's own entry point, in this process) loads the checkpoint through the trainer's policy
    loader and decodes greedily what transformers decodes greedily from the same weights."""
    from r1.cli import main
    from r1.data import render
    from r1.eval import _encode
    from r1.tokenizer import load_tokenizer

    math500 = SHARED_DATA / "math500.jsonl"
    if not math500.exists():
        pytest.skip(f"{math500} not found")
    d, ref = v3_dir
    rows = [json.loads(line) for line in math500.read_text().splitlines()[:3]]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    new, tokenizer = 5, str(REPO / "data" / "tokenizer")
    with pytest.warns(UserWarning, match="MTP initialised fresh"):
        # --batch-size 1: one prompt per call decodes in this process (no decode worker to start)
        rc = main(["eval", str(d), "--benchmark", "custom", "--data", str(tmp_path / "rows.jsonl"), "--template",
                   "plain", "--tokenizer", tokenizer, "--temperature", "0", "--max-tokens", str(new),
                   "--batch-size", "1", "--out", str(tmp_path / "out.jsonl")])
    assert rc == 0 and "problems 3" in capsys.readouterr().out
    got = [json.loads(line)["completion"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    tok = load_tokenizer(tokenizer)
    want = []
    for r in rows:
        ids = torch.tensor([_encode(tok, render("plain", r["problem"]))])
        with torch.no_grad():
            out = ref.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
        want.append(tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True))
    assert got == want and all(want)
