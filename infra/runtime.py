"""Per-worker runtime helpers that recipes call inside Ray Train workers (and in plain processes).

Everything here works in three places with the same code: a Ray Train worker (rank and
world size from ``ray.train.get_context()``), any ``torch.distributed`` process group, and a
plain Python process (rank 0 of 1, collectives are no-ops). Ray is imported only when the
process already uses it, so unit tests and the CLI do not pay for ``import ray``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import sys
import tempfile
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
import torch.distributed as dist

from infra.checkpoint import json_safe, save_checkpoint

Precision = Literal["auto", "fp32", "bf16"]


def _ray_train_context() -> Any:
    """The Ray Train context when this process is a Ray Train worker, else None."""
    if "ray.train" not in sys.modules:
        return None
    import ray.train

    try:
        context = ray.train.get_context()
        context.get_world_rank()
    except (RuntimeError, AttributeError):
        return None
    return context


def world_info() -> tuple[int, int]:
    """``(rank, world_size)``: Ray Train's, else the initialised process group's, else ``(0, 1)``."""
    context = _ray_train_context()
    if context is not None:
        return int(context.get_world_rank()), int(context.get_world_size())
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_rank_zero() -> bool:
    """True on the worker that logs to MLflow and writes checkpoints."""
    return world_info()[0] == 0


def _in_ray_train_worker() -> bool:
    return _ray_train_context() is not None


def device_and_precision(use_gpu: bool, precision: Precision = "auto") -> tuple[torch.device, Callable[[], AbstractContextManager[Any]]]:
    """This worker's device and a factory of autocast contexts for its forward passes.

    GPU: the worker's own GPU (``ray.train.torch.get_device()`` in a Ray Train worker, which
    honours ``CUDA_VISIBLE_DEVICES``; ``cuda:<LOCAL_RANK>`` elsewhere); ``auto`` and ``bf16``
    autocast to bfloat16, falling back to fp32 on GPUs without bf16 (no fp16 here: it would
    need a GradScaler in every recipe). CPU: ``auto``/``fp32`` give a no-op context; ``bf16``
    enables CPU bfloat16 autocast when asked for explicitly. Use as::

        device, autocast = device_and_precision(settings.use_gpu, settings.precision)
        with autocast():
            loss = model(batch.to(device))
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', not {precision!r}")
    if use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("use_gpu=True but CUDA is not available in this worker; set MEDFOUNDRY_USE_GPU=false")
        if _in_ray_train_worker():
            import ray.train.torch

            device = ray.train.torch.get_device()
        else:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        if precision != "fp32" and torch.cuda.is_bf16_supported():
            return device, functools.partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16)
        return device, contextlib.nullcontext
    device = torch.device("cpu")
    if precision == "bf16":
        return device, functools.partial(torch.autocast, device_type="cpu", dtype=torch.bfloat16)
    return device, contextlib.nullcontext


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed Python, numpy and torch (CPU and CUDA) with ``seed + rank`` and return it.

    Per-rank seeds make data sampling and augmentation differ across workers; the initial
    weights still agree because DDP (``prepare_model``) broadcasts rank 0's parameters.
    """
    effective = int(seed) + int(rank)
    random.seed(effective)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(effective % 2**32)
    torch.manual_seed(effective)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(effective)
    return effective


def set_threads(n: int) -> None:
    """Limit torch (and OpenMP/MKL children) to ``n`` intra-op threads in this process.

    Workers share the node's cores: without this every worker starts one thread per core
    and they thrash. Inter-op threads can only be set before the first parallel op, so a
    late call leaves them as they are.
    """
    n = max(1, int(n))
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(n)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over all ranks (a new tensor); ``tensor`` itself without a process group.

    With NCCL a CPU tensor is moved to this rank's GPU for the reduction and back, so
    callers can average CPU-side metrics the same way on every backend.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    work = tensor.detach().clone()
    if dist.get_backend() == "nccl" and not work.is_cuda:
        work = work.to(torch.device("cuda", torch.cuda.current_device()))
    if not work.is_floating_point():
        work = work.double()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    work /= dist.get_world_size()
    return work.to(tensor.device)


def report(
    metrics: Mapping[str, Any],
    state: Mapping[str, Any] | None = None,
    *,
    step: int,
    epoch: int,
    method: str,
    config: Mapping[str, Any],
) -> None:
    """Report metrics to Ray Train and, when ``state`` is given, a checkpoint in our format.

    Every rank must call this the same number of times (Ray Train V2's ``report`` is a
    barrier). Rank 0 writes :func:`infra.checkpoint.save_checkpoint` into a temporary
    directory and reports it; Ray uploads it synchronously to
    ``<storage_path>/<run name>/checkpoint_<timestamp>/`` before returning, then the
    temporary directory goes. Other ranks report metrics only (under DDP their state equals
    rank 0's). ``step`` and ``epoch`` are added to the metrics, so ``LaunchResult.metrics``
    always says how far the run got. ``state`` values are what ``save_checkpoint`` accepts
    (modules, optimizers, state dicts, tensors).
    """
    import ray.train

    clean = json_safe(dict(metrics), "metrics")
    clean.update(step=int(step), epoch=int(epoch))
    if state is None or not is_rank_zero():
        ray.train.report(clean)
        return
    with tempfile.TemporaryDirectory(prefix="medfoundry-ckpt-") as tmp:
        save_checkpoint(tmp, method=method, step=step, epoch=epoch, state=state, config=config, metrics=clean)
        ray.train.report(clean, checkpoint=ray.train.Checkpoint.from_directory(tmp))


__all__ = [
    "Precision",
    "all_reduce_mean",
    "device_and_precision",
    "is_rank_zero",
    "report",
    "seed_everything",
    "set_threads",
    "world_info",
]
