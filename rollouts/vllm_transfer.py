"""A weight-transfer backend for vLLM that runs anywhere: safetensors shards in a directory both sides see (/dev/shm on
one machine, a shared filesystem across machines). It plugs into vLLM's own weight-transfer framework
(vllm/distributed/weight_transfer/): the same HTTP control plane as its NCCL backend (/init_weight_transfer_engine,
/start_weight_update, /update_weights, /finish_weight_update), only the bytes travel through files. vLLM ships nccl,
ipc (CUDA IPC), sparse_nccl, nccl_m2n and sharded_rdt, all GPU-only; this one is what a CPU server uses, and the
tests run it.

- server side (`FilesWeightTransferEngine`): registered as backend "r1_files" in every vLLM process through the
  `vllm.general_plugins` entry point (pyproject.toml); start_weight_update opens vLLM's layerwise reload,
  each update_weights loads one shard's tensors with the model's own `load_weights`, finish_weight_update finalises
  (and on a CPU repacks the routed experts, see rollouts.vllm_engine.repack_cpu_experts).
- trainer side (`FilesTrainerWeightTransferEngine`): every rank iterates the source (a collective under FSDP2);
  rank 0 fills a shard up to `bucket_bytes`, writes it, has the server load it, deletes it.

Over NCCL, `BucketedNCCLSender` is vLLM's own NCCL trainer engine (its rendezvous, its worker side, its packed
broadcast) driven bucket by bucket inside one update session, because vLLM's `send_weights` needs the whole round's
metadata up front, which a stream gathered one parameter at a time (FSDP2) does not have without holding the whole
model; one session per sync also lets vLLM's layerwise reload see every layer once.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from safetensors.torch import load_file, save_file
from vllm.distributed.weight_transfer import WeightTransferEngineFactory, WeightTransferTrainerFactory
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine, NCCLWeightTransferUpdateInfo
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload
from vllm.platforms import current_platform

from rollouts.vllm_cpu import expert_layers_pushed, repack_cpu_experts

BACKEND = "r1_files"


def register() -> None:
    """The vllm.general_plugins entry point: vLLM calls it in each of its processes."""
    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, FilesWeightTransferEngine)
    if BACKEND not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(BACKEND, FilesTrainerWeightTransferEngine)


@dataclass
class FilesInitInfo(WeightTransferInitInfo):
    directory: str


@dataclass
class FilesUpdateInfo(WeightTransferUpdateInfo):
    files: list[str]


@dataclass
class FilesTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = BACKEND
    directory: str
    bucket_bytes: int = 1 << 30


class FilesWeightTransferEngine(WeightTransferEngine[FilesInitInfo, FilesUpdateInfo]):
    init_info_cls = FilesInitInfo
    update_info_cls = FilesUpdateInfo

    def init_transfer_engine(self, init_info: FilesInitInfo) -> None:
        if not os.path.isdir(init_info.directory):
            raise ValueError(f"weight-transfer directory {init_info.directory!r} is not a directory on the server")
        self.directory = os.path.realpath(init_info.directory)
        self.names: list[str] = []

    def start_weight_update(self) -> None:
        self.names = []
        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: FilesUpdateInfo) -> None:
        for path in update_info.files:
            if os.path.dirname(os.path.realpath(path)) != self.directory:  # read only where the trainer was told
                raise ValueError(f"weight file {path!r} is outside {self.directory!r}")
            tensors = load_file(path)  # CPU tensors; each weight loader copies into its (device) parameter
            self.names += list(tensors)
            self.model.load_weights(iter(tensors.items()))

    def finish_weight_update(self) -> None:
        finalize_layerwise_reload(self.model, self.model_config)
        if current_platform.is_cpu():
            repack_cpu_experts(self.model, expert_layers_pushed(self.names))

    def shutdown(self) -> None:
        pass


class FilesTrainerWeightTransferEngine(TrainerWeightTransferEngine[FilesTrainerInitInfo]):
    init_info_cls = FilesTrainerInitInfo

    @classmethod
    def trainer_init(cls, init_info: FilesTrainerInitInfo, *, client: Any, source: Any = None
                     ) -> FilesTrainerWeightTransferEngine:
        engine = cls(client=client, source=source, is_sender=init_info.is_sender)
        engine.directory, engine.bucket_bytes = init_info.directory, init_info.bucket_bytes
        if engine.is_sender:
            os.makedirs(init_info.directory, exist_ok=True)
            client.init_weight_transfer_engine({"directory": os.path.realpath(init_info.directory)})
        return engine

    def send_weights(self) -> None:
        if not self.is_sender:  # only the gather collective (FSDP2)
            for _ in self.source:
                pass
            return
        self.client.start_weight_update()
        shard: dict[str, Any] = {}
        size = 0
        for name, t in self.source:
            shard[name] = t.detach().to("cpu", copy=True).contiguous()  # own storage: safetensors refuses views
            size += t.numel() * t.element_size()
            if size >= self.bucket_bytes:
                self._send(shard)
                shard, size = {}, 0
        if shard:
            self._send(shard)
        self.client.finish_weight_update()

    def _send(self, shard: dict[str, Any]) -> None:
        path = os.path.join(os.path.realpath(self.directory), f"r1-sync-{uuid.uuid4().hex}.safetensors")
        try:
            save_file(shard, path)
            self.client.update_weights({"files": [path]})
        finally:
            if os.path.exists(path):
                os.remove(path)


class BucketedNCCLSender(NCCLTrainerWeightTransferEngine):
    def send_buckets(self, buckets: Iterable[list[tuple[str, Any]]]) -> None:
        """One update session; per bucket, the worker's update_weights (its metadata) alongside vLLM's packed
        broadcast of the bucket (both rendezvous in the same NCCL calls, so the RPC runs on a side thread)."""
        self.client.start_weight_update()
        for bucket in buckets:
            meta = _metadata(bucket)
            info = NCCLWeightTransferUpdateInfo(names=[m[0] for m in meta], dtype_names=[m[1] for m in meta],
                                                shapes=[m[2] for m in meta])
            exe = ThreadPoolExecutor(max_workers=1)
            try:
                future = exe.submit(self.client.update_weights, asdict(info))
                self._broadcast(Source(bucket), Source(bucket).metadata())
                future.result()
            finally:
                exe.shutdown(wait=False)  # as vLLM's send_weights: a failed broadcast must not turn into a hang
        self.client.finish_weight_update()
        self._post_send_sync()


def _metadata(bucket: list[tuple[str, Any]]) -> list[tuple[str, str, list[int]]]:
    return [(k, str(t.dtype).removeprefix("torch."), list(t.shape)) for k, t in bucket]


class Source:
    """A vLLM WeightSource over a list of named tensors (vLLM's senders read metadata(), then iterate)."""

    def __init__(self, tensors: Iterable[tuple[str, Any]]):
        self.tensors = tensors

    def metadata(self) -> list[Any]:
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(k, t.dtype, tuple(t.shape)) for k, t in self.tensors]

    def __iter__(self) -> Any:
        return iter(self.tensors)
