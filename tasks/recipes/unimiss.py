"""UniMiSS pre-training recipe (spec: shared/methods/unimiss.md), run by every Ray Train worker.

Read top to bottom: build student + EMA teacher, read this worker's shard of the 3D and 2D
store versions, then alternate blocks of ``interval`` epochs on 2D radiographs and 3D
volumes (3D-only parameters frozen during 2D epochs), with the DINO loss on two global views
(plus the four volume/slice cross-dimension terms in 3D epochs), cosine schedules for the
learning rate, weight decay and teacher momentum, a checkpoint every epoch and per-step
metrics to MLflow from rank 0.

Deviations from the official script (each for a stated reason):
- schedules are indexed by true iterations (the official code indexes them by
  ``len(dataset) * epoch + it`` with the 3D dataset length as epoch length; spec quirk);
- an "epoch" is ``steps_per_epoch`` iterations of random views rather than a pass over a
  fixed list of pre-cut sub-volumes, because our store holds whole volumes and views are
  cut on the fly (profiles set the budget);
- student, teacher and loss live in one module (``UniMiSSStudentTeacher``) whose forward
  returns the loss, so DDP sees exactly one forward per backward; DDP runs with
  ``find_unused_parameters`` (3D-only parameters are unused in 2D epochs) and without buffer
  broadcast (the loss centre is all-reduced by the loss itself).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from infra.checkpoint import latest_checkpoint, load_checkpoint
from infra.runtime import all_reduce_mean, device_and_precision, is_rank_zero, report, seed_everything, set_threads, world_info
from models.augment import image_view, volume_view
from models.mit import MiT, MiTConfig
from models.unimiss import (UniMiSSConfig, UniMiSSStudentTeacher, apply_schedule_values, cancel_last_layer_grads,
                            clip_gradients, param_groups, set_3d_trainable)
from tasks.recipes.data import load_shard, random_crop

METHOD = "unimiss"
STEP_DELAY_ENV = "MEDFOUNDRY_FAULT_STEP_DELAY"  # test hook: seconds to sleep after each step (kill tests)


def build_hyper(model_size: str, overrides: dict[str, Any], epochs: int) -> UniMiSSConfig:
    """The spec's hyper-parameters for a model size, with the profile's overrides and epoch count."""
    base = UniMiSSConfig.cpu_small() if model_size == "cpu_small" else UniMiSSConfig.official()
    return dataclasses.replace(base, **{**overrides, "epochs": epochs})


def pretrained_backbone_state(checkpoint_path: str) -> dict[str, torch.Tensor]:
    """The student's MiT backbone weights from a UniMiSS checkpoint (the head is discarded, spec (e)).

    Keys go through the same mapping as official checkpoints (``models.checkpoint_keys``), which
    for ours only strips ``student.backbone.``."""
    from models.checkpoint_keys import from_official_unimiss

    network = load_checkpoint(checkpoint_path)["state"]["network"]
    state = from_official_unimiss(network)
    if not state:
        raise ValueError(f"{checkpoint_path} holds no UniMiSS student backbone (keys start with {next(iter(network), None)!r})")
    return state


def train_unimiss(config: dict[str, Any]) -> None:
    """Self-distillation pre-training; every rank runs this with the same ``config``."""
    rank, world = world_info()
    set_threads(int(config.get("threads_per_worker", 1)))
    seed_everything(int(config["seed"]), 0)
    device, autocast = device_and_precision(bool(config.get("use_gpu", False)), config.get("precision", "auto"))
    hp = build_hyper(config["model_size"], config.get("hyper", {}), int(config["epochs"]))
    reduce_fn = all_reduce_mean if world > 1 else None
    net = UniMiSSStudentTeacher(MiT(getattr(MiTConfig, config["model_size"])()), hp, reduce_fn=reduce_fn).to(device)
    seed_everything(int(config["seed"]), rank)

    volumes = [c.image for c in load_shard(config["store"], config["dataset_3d"], config.get("version_3d"), None, rank, world)]
    images = []
    for name, version in config["datasets_2d"]:
        images += [c.image for c in load_shard(config["store"], name, version, None, rank, world)]
    if not volumes or not images:
        raise RuntimeError(f"rank {rank}: no 3D volumes or 2D images in its shard")

    steps_per_epoch, epochs = int(config["steps_per_epoch"]), hp.epochs
    global_batch = int(config["batch_size"]) * world
    lr_schedule = hp.lr_schedule(steps_per_epoch, global_batch)
    wd_schedule = hp.weight_decay_schedule(steps_per_epoch)
    momentum_schedule = hp.momentum_schedule(steps_per_epoch)
    optimizer = torch.optim.AdamW(param_groups(net.student, hp.weight_decay))

    start_epoch, step = 0, 0
    state = latest_checkpoint(config, method=METHOD)
    if state is not None:
        net.load_state_dict(state["state"]["network"])
        optimizer.load_state_dict(state["state"]["optimizer"])
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])

    model: torch.nn.Module = net
    if world > 1:
        from ray.train.torch import prepare_model

        model = prepare_model(net, move_to_device=False,
                              parallel_strategy_kwargs={"find_unused_parameters": True, "broadcast_buffers": False})
    tracker = _RankZeroTracker(config.get("mlflow_run_id")) if is_rank_zero() else None
    if tracker and state is not None:
        tracker.log({"resumed_from_step": float(step)}, step)
    step_delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    gen = torch.Generator().manual_seed(int(config["seed"]) * 1000 + rank * 100 + start_epoch)
    rng = np.random.default_rng([int(config["seed"]), rank, start_epoch])
    view_3d = tuple(config["view_3d"])
    fail_at = config.get("fail_at_step")

    for epoch in range(start_epoch, epochs):
        is_3d = not hp.is_2d_epoch(epoch)
        set_3d_trainable(net.student, is_3d)
        epoch_losses, started = [], time.perf_counter()
        model.train()
        for _ in range(steps_per_epoch):
            views = make_views(is_3d, volumes, images, int(config["batch_size"]), view_3d, int(config["view_2d"]), rng, gen, device)
            loss = optimisation_step(model, net, optimizer, views, epoch, step, hp, float(lr_schedule[step]),
                                     float(wd_schedule[step]), float(momentum_schedule[step]), autocast)
            step += 1
            epoch_losses.append(loss)
            if tracker:
                tracker.log({"loss": epoch_losses[-1], f"loss_{'3d' if is_3d else '2d'}": epoch_losses[-1],
                             "lr": float(lr_schedule[step - 1]), "teacher_momentum": float(momentum_schedule[step - 1])}, step)
            if fail_at is not None and step == int(fail_at) and rank == world - 1:
                _inject_failure(config, step)
            if step_delay:
                time.sleep(step_delay)
        metrics = {"loss": float(np.mean(epoch_losses)), "epoch_dims": 3 if is_3d else 2,
                   "steps_per_s": steps_per_epoch / (time.perf_counter() - started)}
        if tracker:
            tracker.log({"epoch_loss": metrics["loss"], "steps_per_s": metrics["steps_per_s"]}, step)
            tracker.flush()
        set_3d_trainable(net.student, True)
        report(metrics, {"network": net, "optimizer": optimizer}, step=step, epoch=epoch, method=METHOD, config=config)


def optimisation_step(model: torch.nn.Module, net: UniMiSSStudentTeacher, optimizer: torch.optim.Optimizer,
                      views: list[torch.Tensor], epoch: int, step: int, hp: UniMiSSConfig, lr: float, weight_decay: float,
                      momentum: float, autocast: Callable[[], Any]) -> float:
    """One UniMiSS optimiser step (spec (d)): scheduled LR/WD, loss, DINO clipping and last-layer
    freeze, AdamW step, then the teacher's EMA update. ``model`` is what runs the forward (``net``
    itself, or its DDP wrapper); returns the loss."""
    apply_schedule_values(optimizer, lr, weight_decay)
    with autocast():
        loss = model(views, epoch)
    value = float(loss.detach())  # the step's one host-device sync
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value} at step {step}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_gradients(net.student, hp.clip_grad)
    cancel_last_layer_grads(net.student, epoch, hp.freeze_last_layer)
    optimizer.step()
    net.update_teacher(momentum)
    return value


def make_views(is_3d: bool, volumes: list[np.ndarray], images: list[np.ndarray], batch_size: int,
               view_3d: tuple[int, int, int], view_2d: int, rng: np.random.Generator, gen: torch.Generator,
               device: torch.device) -> list[torch.Tensor]:
    """One step's two global views (strong first) of ``batch_size`` random samples, on ``device``.

    3D: random crops of ``volumes`` 1.25x the view in-plane (the views re-crop 0.8-1.2x of
    that); 2D: whole ``images``. Samples are drawn with ``rng``, augmentations with ``gen``.
    """
    if is_3d:
        crop_3d = (view_3d[0], int(math.ceil(view_3d[1] * 1.25)), int(math.ceil(view_3d[2] * 1.25)))
        crops = [torch.from_numpy(np.ascontiguousarray(random_crop(volumes[rng.integers(len(volumes))], crop_3d, rng)[0],
                                                       dtype=np.float32))[None] for _ in range(batch_size)]
        return [torch.stack([volume_view(c, view_3d, gen, strong=(v == 0)) for c in crops]).to(device) for v in range(2)]
    picks = [torch.from_numpy(_as_chw(images[rng.integers(len(images))])) for _ in range(batch_size)]
    return [torch.stack([image_view(t, view_2d, gen, strong=(v == 0)) for t in picks]).to(device) for v in range(2)]


def _as_chw(image: np.ndarray) -> np.ndarray:
    """Stored 2D images are (H,W) or (H,W,C) in [0,1] or uint8; views want float (C,H,W)."""
    array = image.astype(np.float32)
    if image.dtype == np.uint8:
        array /= 255.0
    return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


def _inject_failure(config: dict[str, Any], step: int) -> None:
    """Fault-tolerance test hook: fail once at a given step (a marker file makes it once only)."""
    marker = Path(config["fail_marker"])
    if not marker.exists():
        marker.write_text(str(step))
        raise RuntimeError(f"injected failure at step {step}")


class _RankZeroTracker:
    """Per-step metrics from rank 0 to the stage's MLflow run, batched to keep SQLite writes few."""

    def __init__(self, run_id: str | None):
        self.run_id = run_id
        self.pending: list[dict[str, float]] = []
        self.n_points = 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.run_id:
            return
        self.pending.append({"step": step, "timestamp": time.time(), **metrics})
        self.n_points += len(metrics)
        if self.n_points >= 200:
            self.flush()

    def flush(self) -> None:
        if self.run_id and self.pending:
            from infra.tracking import log_metrics_series

            log_metrics_series(self.pending, run_id=self.run_id)
            self.pending, self.n_points = [], 0
