"""HF checkpoint I/O for the native V3 model: DeepseekV3 directories in transformers' layout.

Loads config.json plus model.safetensors or sharded files with model.safetensors.index.json;
per-expert keys (`mlp.experts.{j}.{gate,up,down}_proj.weight`) or transformers 5's fused 3-D expert
tensors; FP8 weights with `weight_scale_inv` (one scale per 128x128 block) dequantised; MTP layers at
index num_hidden_layers + k. Saves a directory that transformers (and vLLM) load.
Name mapping is shared with the rollout engines' `load_weights` through `hf_to_native`.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from r1.model.config import V3Config
from r1.model.model import V3ForCausalLM, rope_inv_freq

FP8_BLOCK = 128
_MTP_RENAMES = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "shared_head.norm": "shared_head_norm"}
_MTP_TO_HF = {v: k for k, v in _MTP_RENAMES.items()}
_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointMismatch(ValueError):
    """Missing, unexpected or mis-shaped keys, all listed in one message."""


def native_to_hf(name: str, tensor: Tensor, c: V3Config) -> Iterator[tuple[str, Tensor]]:
    """One native parameter -> its HF name(s) (stacked experts fan out to per-expert keys)."""
    L = c.num_hidden_layers
    m = re.match(r"mtp\.(\d+)\.(.*)", name)
    if m:
        k, rest = int(m.group(1)), m.group(2)
        prefix = f"model.layers.{L + k}."
        head, _, tail = rest.removeprefix("block.").partition(".")
        name = f"{prefix}{_MTP_TO_HF.get(head, head)}.{tail}"
    elif name.startswith(("layers.", "embed_tokens.", "norm.")):
        name = "model." + name
    if name.endswith("mlp.experts.gate_up_proj"):
        gate, up = tensor.chunk(2, dim=1)
        base = name.removesuffix(".gate_up_proj")
        for j in range(tensor.shape[0]):
            yield f"{base}.{j}.gate_proj.weight", gate[j]
            yield f"{base}.{j}.up_proj.weight", up[j]
    elif name.endswith("mlp.experts.down_proj"):
        base = name.removesuffix(".down_proj")
        for j in range(tensor.shape[0]):
            yield f"{base}.{j}.down_proj.weight", tensor[j]
    else:
        yield name, tensor


def hf_to_native(name: str, c: V3Config) -> tuple[str, int | None, str | None] | None:
    """HF name -> (native name, expert index or None, expert part or None); None = not ours to load
    (an MTP layer's duplicated embed_tokens / shared_head.head, which share the main ones)."""
    L = c.num_hidden_layers
    name = name.removeprefix("model.") if not name.startswith("lm_head") else name
    m = re.match(r"layers\.(\d+)\.(.*)", name)
    if m and int(m.group(1)) >= L:
        k, rest = int(m.group(1)) - L, m.group(2)
        if rest.startswith(("embed_tokens.", "shared_head.head.")):
            return None
        for hf, ours in _MTP_RENAMES.items():
            if rest.startswith(hf + "."):
                return f"mtp.{k}.{ours}{rest[len(hf):]}", None, None
        name = f"mtp.{k}.block.{rest}"
    e = _EXPERT.match(name)
    if e:
        return e.group(1), int(e.group(2)), e.group(3)
    return name, None, None


def dequantize_fp8(w: Tensor, scale_inv: Tensor, block: int = FP8_BLOCK) -> Tensor:
    """w_fp8 [M, N] with one scale per block x block tile (the last tiles may be partial) -> fp32."""
    M, N = w.shape
    s = scale_inv.float().repeat_interleave(block, 0)[:M].repeat_interleave(block, 1)[:, :N]
    return w.float() * s


def quantize_fp8(w: Tensor, block: int = FP8_BLOCK) -> tuple[Tensor, Tensor]:
    """The inverse, as DeepSeek's FP8 checkpoints are made: per 128x128 block, s = amax / 448."""
    M, N = w.shape
    pm, pn = -M % block, -N % block
    wp = torch.nn.functional.pad(w.float(), (0, pn, 0, pm))
    tiles = wp.view((M + pm) // block, block, (N + pn) // block, block)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(M + pm, N + pn)[:M, :N]
    return q.contiguous(), scale


def _shards(directory: Path) -> list[str]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {directory}")
    return files


def _read_keys(directory: Path) -> list[str]:
    """The checkpoint's tensor names, from the shard headers (no tensor is read)."""
    keys = []
    for fname in _shards(directory):
        with safe_open(directory / fname, framework="pt") as f:
            keys.extend(f.keys())
    return keys


def _read_tensors(directory: Path) -> Iterator[tuple[str, Tensor]]:
    for fname in _shards(directory):
        with safe_open(directory / fname, framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def load_state(tensors: Iterable[tuple[str, Tensor]], model: V3ForCausalLM, strict: bool = True,
               fresh: tuple[str, ...] = (), fp8_block: int = FP8_BLOCK) -> None:
    """Copy HF-named tensors into `model` (in place). FP8 weights are dequantised with their
    `weight_scale_inv` (one scale per fp8_block x fp8_block tile). With strict, any missing, unexpected or
    mis-shaped key raises one error, except missing parameters whose native name starts with a prefix in
    `fresh` (the caller initialised them)."""
    c = model.config
    params = dict(model.named_parameters())
    params.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
    seen: set[str] = set()
    experts_seen: dict[str, set[tuple[int, str]]] = {}
    unexpected, bad_shape = [], []
    pending = dict(tensors)
    scales = {k.removesuffix("_scale_inv"): pending.pop(k) for k in list(pending) if k.endswith("weight_scale_inv")}
    with torch.no_grad():
        for hf_name, t in pending.items():
            if t.dtype == torch.float8_e4m3fn:
                if hf_name not in scales:
                    raise CheckpointMismatch(f"{hf_name} is fp8 but has no weight_scale_inv")
                grid = tuple(-(-n // fp8_block) for n in t.shape)
                if tuple(scales[hf_name].shape) != grid:
                    raise CheckpointMismatch(f"{hf_name}_scale_inv is {tuple(scales[hf_name].shape)}, not {grid} "
                                             f"({fp8_block}x{fp8_block} blocks of {tuple(t.shape)})")
                t = dequantize_fp8(t, scales[hf_name], fp8_block)
            mapped = hf_to_native(hf_name, c)
            if mapped is None:
                continue
            name, j, part = mapped
            if j is not None:
                target = params.get(name + (".down_proj" if part == "down_proj" else ".gate_up_proj"))
                if target is None:
                    unexpected.append(hf_name)
                    continue
                I = c.moe_intermediate_size
                dst = target[j] if part == "down_proj" else target[j, :I] if part == "gate_proj" else target[j, I:]
                if j >= target.shape[0] or dst.shape != t.shape:
                    bad_shape.append(f"{hf_name}: checkpoint {tuple(t.shape)} vs model {tuple(dst.shape)}")
                    continue
                dst.copy_(t)
                experts_seen.setdefault(name, set()).add((j, part))
                continue
            if name not in params:
                unexpected.append(hf_name)
                continue
            if params[name].shape != t.shape:
                bad_shape.append(f"{hf_name}: checkpoint {tuple(t.shape)} vs model {tuple(params[name].shape)}")
                seen.add(name)  # reported as a shape mismatch, not as missing
                continue
            params[name].copy_(t)
            seen.add(name)
    for name, parts in experts_seen.items():
        if len(parts) == 3 * c.n_routed_experts:
            seen.update({name + ".gate_up_proj", name + ".down_proj"})
    if c.tie_word_embeddings:
        seen.add("lm_head.weight")
    missing = []  # under HF names; stacked experts by the per-expert keys they lack
    for n in params:
        if n in seen or n.startswith(fresh) or n.endswith(".experts.gate_up_proj"):  # (with its down_proj)
            continue
        hf_name = next(native_to_hf(n, params[n], c))[0]
        if not n.endswith(".experts.down_proj"):
            missing.append(hf_name)
            continue
        got = experts_seen.get(n.removesuffix(".down_proj"), set())
        hf_base = hf_name.removesuffix(".0.down_proj.weight")
        missing += [f"{hf_base}.{j}.{part}.weight" for j in range(c.n_routed_experts)
                    for part in ("gate_proj", "up_proj", "down_proj") if (j, part) not in got]
    missing.sort()
    if strict and (missing or unexpected or bad_shape):
        lines = [f"checkpoint does not match the {c.num_hidden_layers}-layer V3 config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad_shape)):
            if items:
                more = " ..." if len(items) > 20 else ""
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + more)
        raise CheckpointMismatch("\n".join(lines))


def load_hf(directory: str | Path, dtype: torch.dtype = torch.float32, strict: bool = True) -> V3ForCausalLM:
    """Build the native model from a transformers-format DeepseekV3 directory."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory} has no config.json (expected a transformers-format model directory)")
    c = V3Config.from_json(directory)
    with torch.device("meta"):
        model = V3ForCausalLM(c)
    model = model.to_empty(device="cpu")
    model.inv_freq.copy_(rope_inv_freq(c)[0])  # non-persistent buffers are not in the checkpoint
    for m in model.moe_layers:
        m.tokens_per_expert.zero_()
    fresh: tuple[str, ...] = ()
    if c.num_nextn_predict_layers and not any(_is_mtp(k, c) for k in _read_keys(directory)):
        # transformers keeps no MTP layer, so its checkpoints of an MTP config have none: start MTP from the
        # model's own init (the checkpoint then overwrites everything else) rather than refuse the model
        model.reset_parameters()
        fresh = ("mtp.",)
        warnings.warn(f"r1: {directory} has no weights for the {c.num_nextn_predict_layers} MTP layer(s) its "
                      "config.json declares (transformers does not save them): MTP initialised fresh", stacklevel=2)
    load_state(_read_tensors(directory), model, strict=strict, fresh=fresh, fp8_block=_fp8_block(directory))
    return model.to(dtype)


def _fp8_block(directory: Path) -> int:
    """The block edge of config.json's quantization_config (DeepSeek's fp8: weight_block_size [128, 128])."""
    qc = json.loads((directory / "config.json").read_text()).get("quantization_config") or {}
    bm, bn = qc.get("weight_block_size") or (FP8_BLOCK, FP8_BLOCK)
    if bm != bn:
        raise ValueError(f"{directory / 'config.json'}: fp8 weight_block_size {[bm, bn]} is not square; "
                         "r1 reads square blocks only")
    return bm


def _is_mtp(hf_name: str, c: V3Config) -> bool:
    mapped = hf_to_native(hf_name, c)
    return mapped is None or mapped[0].startswith("mtp.")


def hf_state_dict(model: V3ForCausalLM) -> Iterator[tuple[str, Tensor]]:
    """The model's tensors under HF names, MTP layers with copies of the shared embedding and head."""
    c = model.config
    for name, t in list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                                      if n.endswith("e_score_correction_bias")]:
        if c.tie_word_embeddings and name == "lm_head.weight":
            continue
        yield from native_to_hf(name, t.detach(), c)
    for k in range(c.num_nextn_predict_layers):
        yield f"model.layers.{c.num_hidden_layers + k}.embed_tokens.weight", model.embed_tokens.weight.detach()
        yield f"model.layers.{c.num_hidden_layers + k}.shared_head.head.weight", model.lm_head.weight.detach()


def save_hf(model: V3ForCausalLM, directory: str | Path, max_shard_bytes: int = 4 << 30,
            dtype: torch.dtype | None = None) -> None:
    """Write config.json and safetensors shards (+ index when more than one) that transformers loads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_hf_dict()
    cfg["torch_dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in hf_state_dict(model):
        t = t.to(dtype) if dtype is not None and t.is_floating_point() and "correction_bias" not in name else t
        nbytes = t.numel() * t.element_size()
        if size + nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous().clone()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
