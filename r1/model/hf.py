"""HF checkpoint I/O for the native V3 model: DeepseekV3 directories in transformers' layout.

Loads config.json plus model.safetensors or sharded files with model.safetensors.index.json;
per-expert keys (`mlp.experts.{j}.{gate,up,down}_proj.weight`) or transformers 5's fused 3-D expert
tensors; FP8 weights with `weight_scale_inv` (one scale per 128x128 block) dequantised; MTP layers at
index num_hidden_layers + k. Saves a directory that transformers (and vLLM) load.
Name mapping is shared with the rollout engines' `load_weights` through `hf_to_native`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

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


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class _Stored:
    """A tensor in a safetensors file, read when indexed (`[:]`, or rows `[a:b]` of dim 0) with pread straight into
    its tensor: nothing is mapped, so a process's resident memory holds what it read, not the file's pages."""

    def __init__(self, fd: int, start: int, shape: list[int], dtype: str):
        self.fd, self.start, self.shape, self.dtype = fd, start, torch.Size(shape), _DTYPES[dtype]

    def __getitem__(self, rows: slice) -> Tensor:
        a, b, step = rows.indices(self.shape[0]) if self.shape else (0, 1, 1)
        if step != 1:
            raise IndexError("stored tensors are read by contiguous rows")
        out = torch.empty((max(b - a, 0), *self.shape[1:]) if self.shape else (), dtype=self.dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        row_bytes = math.prod(self.shape[1:]) * out.element_size()
        done, offset = 0, self.start + a * row_bytes
        while done < len(view):  # one pread may return less than asked (large reads)
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"safetensors file ends inside a tensor (offset {offset + done})")
            done += n
        return out


def _stored(path: Path, fd: int | None = None) -> dict[str, _Stored]:
    """The tensors of one safetensors file by name, from its header (8-byte length, JSON); nothing else is read."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: _Stored(-1 if fd is None else fd, 8 + n + v["data_offsets"][0], v["shape"], v["dtype"])
            for k, v in header.items()}


def _read_keys(directory: Path) -> list[str]:
    """The checkpoint's tensor names, from the shard headers (no tensor is read)."""
    return [k for fname in _shards(directory) for k in _stored(directory / fname)]


@contextlib.contextmanager
def _open_tensors(directory: Path) -> Iterator[Iterator[tuple[str, _Stored]]]:
    """The checkpoint's tensors as lazy handles: nothing is read until a caller indexes one, and then only the rows
    it asks for."""
    fds = [os.open(directory / f, os.O_RDONLY) for f in _shards(directory)]
    try:
        yield ((k, t) for fname, fd in zip(_shards(directory), fds, strict=True)
               for k, t in _stored(directory / fname, fd).items())
    finally:
        for fd in fds:
            os.close(fd)


def fp8_tensors(directory: str | Path) -> Iterator[tuple[str, Tensor]]:
    """An FP8 checkpoint's e4m3 weights and their `weight_scale_inv`, read one at a time (the rest is not read): what
    r1.fp8.load_fp8_weights adopts as the fp8 copies of a model converted for precision fp8."""
    with _open_tensors(Path(directory)) as tensors:
        stored = dict(tensors)
        for k, t in stored.items():
            if t.dtype == torch.float8_e4m3fn and k + "_scale_inv" in stored:
                yield k, t[:]
                yield k + "_scale_inv", stored[k + "_scale_inv"][:]


def _local(p: Tensor) -> tuple[Tensor, int]:
    """What this rank holds of a parameter and its first row: an FSDP2 DTensor's dim-0 shard, or all of it."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        return p, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(pl != Shard(0) for pl in p.placements):
        raise NotImplementedError(f"loading into a DTensor placed {p.placements} (only Shard(0), as FSDP2 shards)")
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return p.to_local(), offset[0]


def load_state(tensors: Iterable[tuple[str, Any]], model: V3ForCausalLM, strict: bool = True,
               fresh: tuple[str, ...] = (), fp8_block: int = FP8_BLOCK) -> None:
    """Copy HF-named tensors into `model` (in place). A source is a tensor or a `_Stored` one (read when indexed);
    into an FSDP2-sharded parameter only this rank's rows are read and copied. FP8 weights are dequantised with their
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
    I = c.moe_intermediate_size
    with torch.no_grad():
        for hf_name, x in pending.items():
            shape = tuple(x.shape)
            if x.dtype == torch.float8_e4m3fn:
                if hf_name not in scales:
                    raise CheckpointMismatch(f"{hf_name} is fp8 but has no weight_scale_inv")
                grid = tuple(-(-n // fp8_block) for n in shape)
                if tuple(scales[hf_name].shape) != grid:
                    raise CheckpointMismatch(f"{hf_name}_scale_inv is {tuple(scales[hf_name].shape)}, not {grid} "
                                             f"({fp8_block}x{fp8_block} blocks of {shape})")
                x = dequantize_fp8(x[:], scales[hf_name][:], fp8_block)  # one whole tensor at a time
            mapped = hf_to_native(hf_name, c)
            if mapped is None:
                continue
            name, j, part = mapped
            if j is not None:
                target = params.get(name + (".down_proj" if part == "down_proj" else ".gate_up_proj"))
                if target is None:
                    unexpected.append(hf_name)
                    continue
                want = tuple(target.shape[1:]) if part == "down_proj" else (I, *target.shape[2:])
                if j >= target.shape[0] or want != shape:
                    bad_shape.append(f"{hf_name}: checkpoint {shape} vs model {want}")
                    continue
                local, first = _local(target)
                if first <= j < first + local.shape[0]:  # another rank's expert is read by that rank
                    row = local[j - first]
                    row = row if part == "down_proj" else row[:I] if part == "gate_proj" else row[I:]
                    row.copy_(x[:])
                experts_seen.setdefault(name, set()).add((j, part))
                continue
            if name not in params:
                unexpected.append(hf_name)
                continue
            if tuple(params[name].shape) != shape:
                bad_shape.append(f"{hf_name}: checkpoint {shape} vs model {tuple(params[name].shape)}")
                seen.add(name)  # reported as a shape mismatch, not as missing
                continue
            local, first = _local(params[name])
            if local.numel():
                local.copy_(x[first:first + local.shape[0]])
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
        hf_name = next(native_to_hf(n, torch.empty(params[n].shape, device="meta"), c))[0]
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


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Parameters to `dtype` (on meta: free); buffers stay fp32 (the balancing bias, RoPE frequencies, counts).
    Tied parameters stay one object."""
    done: dict[int, nn.Parameter] = {}
    for m in model.modules():
        for k, p in m._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                if id(p) not in done:
                    done[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
                m._parameters[k] = done[id(p)]


def load_hf(directory: str | Path, dtype: torch.dtype = torch.float32, strict: bool = True,
            device: str | torch.device = "cpu", shard: Callable[[nn.Module], nn.Module] | None = None
            ) -> V3ForCausalLM:
    """Build the native model from a transformers-format DeepseekV3 directory: on the meta device, materialised
    on `device` in `dtype` (parameters; buffers stay fp32), then filled tensor by tensor from the safetensors
    files. `shard` (Dist.wrap: FSDP2) runs before anything is allocated, so each rank allocates and reads only its
    own shards and no rank holds the whole model."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory} has no config.json (expected a transformers-format model directory)")
    c = V3Config.from_json(directory)
    fp8_block = _fp8_block(directory)
    with torch.device("meta"):
        model = V3ForCausalLM(c)
    _cast_parameters(model, dtype)
    if shard is not None:
        model = shard(model)
    model.to_empty(device=device)
    with torch.no_grad():
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
    with _open_tensors(directory) as tensors:
        load_state(tensors, model, strict=strict, fresh=fresh, fp8_block=fp8_block)
    return model


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


def _full(t: Tensor) -> Tensor:
    """A parameter whole: a DTensor (FSDP2 shard) is all-gathered, a collective every rank makes in the same order."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def hf_state_dict(model: V3ForCausalLM) -> Iterator[tuple[str, Tensor]]:
    """The model's tensors under HF names, MTP layers with copies of the shared embedding and head. Under FSDP2 one
    parameter is gathered at a time (every rank must iterate to the end)."""
    c = model.config
    for name, t in list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                                      if n.endswith("e_score_correction_bias")]:
        if c.tie_word_embeddings and name == "lm_head.weight":
            continue
        yield from native_to_hf(name, _full(t.detach()), c)
    for k in range(c.num_nextn_predict_layers):
        yield f"model.layers.{c.num_hidden_layers + k}.embed_tokens.weight", _full(model.embed_tokens.weight.detach())
        yield f"model.layers.{c.num_hidden_layers + k}.shared_head.head.weight", _full(model.lm_head.weight.detach())


def save_hf(model: V3ForCausalLM, directory: str | Path, max_shard_bytes: int = 4 << 30,
            dtype: torch.dtype | None = None, main: bool = True) -> None:
    """Write config.json and safetensors shards (+ index when more than one) that transformers loads. Shards are
    written as they fill, so at most one shard and one parameter are in memory; under FSDP2 every rank calls this
    (parameters are gathered one at a time) and only `main` writes."""
    from torch.distributed.tensor import DTensor

    if not main and not any(isinstance(p, DTensor) for p in model.parameters()):
        return  # nothing to gather: the main rank writes alone
    directory = Path(directory)
    if main:
        directory.mkdir(parents=True, exist_ok=True)
        cfg = model.config.to_hf_dict()
        cfg["torch_dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
        (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    shard: dict[str, Tensor] = {}
    size, total, files, weight_map = 0, 0, [], {}

    def flush() -> None:
        files.append(directory / f"model-{len(files) + 1:05d}.safetensors.part")  # numbered "of N" at the end
        save_file(shard, files[-1], metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, len(files) - 1))
        shard.clear()

    for name, t in hf_state_dict(model):
        if not main:
            continue
        t = t.to(dtype) if dtype is not None and t.is_floating_point() and "correction_bias" not in name else t
        nbytes = t.numel() * t.element_size()
        if size + nbytes > max_shard_bytes and shard:
            flush()
            size = 0
        shard[name] = t.contiguous().clone()
        size += nbytes
        total += nbytes
    if not main:
        return
    flush()
    if len(files) == 1:
        files[0].rename(directory / "model.safetensors")
        return
    names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    for f, n in zip(files, names, strict=True):
        f.rename(directory / n)
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in weight_map.items()}}, indent=2))
