"""Scale-out on PyTorch's own engine: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK, we only read them.

``torchrun --nproc_per_node 2 -m daaa run ...`` runs every training command with DistributedDataParallel; on CPU
the gloo backend is used, on CUDA nccl. Without torchrun everything runs as a single process.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .config import RuntimeConfig
from .errors import DaaaError


@dataclass
class Context:
    """Where this process runs: rank, world size, device, and the autocast dtype (None = fp32)."""

    rank: int
    world_size: int
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around ``model`` when distributed; the module itself otherwise."""
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
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
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[runtime.precision]
    if amp is torch.float16 and device.type != "cuda":
        raise DaaaError("option runtime.precision: fp16 autocast needs CUDA; use bf16 or fp32 on CPU")
    seed_everything(runtime.seed)
    _CONTEXT = Context(rank, world_size, device, amp, runtime.channels_last)
    return _CONTEXT


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first(ctx: Context) -> Iterator[None]:
    """Rank 0 does the work (e.g. writes a cache), then the others follow and read it."""
    if not ctx.is_main:
        ctx.barrier()
    yield
    if ctx.is_main:
        ctx.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
