"""Scale-out on PyTorch's own engine: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK, we only read them.

``torchrun --nproc_per_node 2 -m daaa run ...`` runs every training command with DistributedDataParallel; on CPU
the gloo backend is used, on CUDA nccl. Without torchrun everything runs as a single process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .config import RuntimeConfig
from .errors import DaaaError, PeerError

LOG = logging.getLogger("daaa")


@dataclass
class Context:
    """Where this process runs: rank, world size, device, the autocast dtype (None = fp32), the memory format, and
    whether fixed-shape no-grad forwards may be replayed as CUDA graphs (``runtime.cuda_graphs``, CUDA only)."""

    rank: int
    world_size: int
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    cuda_graphs: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 autocast (bf16 and fp32 need none: the scaler is then a pass-through)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around ``model`` when distributed; the module itself otherwise.

        On CUDA, batch-norm layers become SyncBatchNorm (changed in place, parameters kept), so the statistics are
        those of the global batch, as in a one-process run (gloo on CPU has no SyncBatchNorm; the digit CNN has no
        batch norm).
        """
        if not self.distributed:
            return model
        ids = None
        if self.device.type == "cuda":
            ids = [self.device.index]
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            t = t.to(self.device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_object(self, obj: object) -> object:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


    def all_gather_object(self, obj: object) -> list[object]:
        """``obj`` of every rank, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


_CONTEXT: Context | None = None


def setup(runtime: RuntimeConfig) -> Context:
    """Initialise (once per process) the device, the process group under torchrun, threads, seeds, determinism."""
    global _CONTEXT
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = runtime.device == "cuda" or (runtime.device == "auto" and torch.cuda.is_available())
    if runtime.device == "cuda" and not torch.cuda.is_available():
        raise DaaaError("option runtime.device: cuda was asked for but no CUDA device is available")
    if want_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DaaaError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} CUDA device(s): "
                            "torchrun --nproc_per_node must not exceed the GPUs per node")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    if runtime.num_threads > 0:
        torch.set_num_threads(runtime.num_threads)
    if runtime.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif want_cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = amp_dtype(runtime.precision, device)
    if amp is torch.bfloat16 and device.type == "cpu" and not native_bf16_cpu():
        LOG.warning("runtime.precision=bf16: this CPU has no bf16 instructions (AVX-512-BF16 / AMX), so PyTorch "
                    "emulates them and bf16 runs several times slower than fp32 here (7.7x for the digits-cpu "
                    "CycleGAN, BENCHMARKS.md); fp32 is the fast setting on this machine")
    seed_everything(runtime.seed)
    _CONTEXT = Context(rank, world_size, device, amp, runtime.channels_last,
                       cuda_graphs=runtime.cuda_graphs and device.type == "cuda")
    return _CONTEXT


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``runtime.precision`` (None = fp32, no autocast)."""
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if amp is torch.float16 and device.type != "cuda":
        raise DaaaError("option runtime.precision: fp16 autocast needs CUDA; use bf16 or fp32 on CPU")
    return amp


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512-BF16 or AMX; ``lscpu`` flags avx512_bf16, amx_bf16):
    there ``runtime.precision=bf16`` can train faster than fp32 (a Xeon with AMX: demo pair 306 -> 230 s,
    BENCHMARKS.md); elsewhere PyTorch emulates it, several times slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private in torch.cpu: absent means unknown
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first(ctx: Context) -> Iterator[None]:
    """Rank 0 does the work (e.g. writes a cache), then the others follow and read it.

    If rank 0 fails, the others do not wait for a time-out: they raise :class:`PeerError` (rank 0 reports the
    error itself). One broadcast per use, on every rank.
    """
    if not ctx.distributed:
        yield
        return
    if ctx.is_main:
        try:
            yield
        except BaseException as e:
            with contextlib.suppress(Exception):
                ctx.broadcast_object(f"{type(e).__name__}: {e}")
            raise
        ctx.broadcast_object(None)
    else:
        failure = ctx.broadcast_object(None)
        if failure is not None:
            raise PeerError(f"rank 0 failed ({failure})")
        yield


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
