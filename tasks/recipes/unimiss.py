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
- the student's 3D and slice outputs are computed in one module call so that DDP sees one
  forward per backward (``models.unimiss.UniMiSSNetwork``).
"""

from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infra.checkpoint import latest_checkpoint, unwrap_module
from infra.runtime import device_and_precision, is_rank_zero, report, seed_everything, set_threads, world_info
from models.augment import image_view, volume_view
from models.mit import MiT, MiTConfig
from models.unimiss import (DINOHead, DINOLoss, UniMiSSConfig, UniMiSSNetwork, cancel_last_layer_grads, clip_gradients,
                            cosine_schedule, ema_update, param_groups, set_3d_trainable, unimiss_3d_loss)
from tasks.recipes.data import load_shard, random_crop

METHOD = "unimiss"


def build_network(model_size: str, out_dim: int, head_hidden: int, head_bottleneck: int) -> UniMiSSNetwork:
    """Backbone + DINO head for a named model size (``cpu_small``, ``official_tiny``, ``official_small``)."""
    backbone = MiT(getattr(MiTConfig, model_size)())
    head = DINOHead(backbone.out_dim, out_dim, hidden_dim=head_hidden, bottleneck_dim=head_bottleneck)
    return UniMiSSNetwork(backbone, head)


def train_unimiss(config: dict[str, Any]) -> None:
    """Self-distillation pre-training; every rank runs this with the same ``config``."""
    rank, world = world_info()
    set_threads(int(config.get("threads_per_worker", 1)))
    seed_everything(int(config["seed"]), rank)
    device, autocast = device_and_precision(bool(config.get("use_gpu", False)), config.get("precision", "auto"))
    hp = UniMiSSConfig(**config["hyper"])

    student = build_network(config["model_size"], hp.out_dim, hp.head_hidden_dim, hp.head_bottleneck_dim).to(device)
    teacher = copy.deepcopy(student).to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    loss_fn = DINOLoss(hp.out_dim, teacher_temp=hp.teacher_temp, warmup_teacher_temp=hp.warmup_teacher_temp,
                       warmup_teacher_temp_epochs=hp.warmup_teacher_temp_epochs, nepochs=config["epochs"],
                       student_temp=hp.student_temp, center_momentum=hp.center_momentum).to(device)

    volumes = [c.image for c in load_shard(config["store"], config["dataset_3d"], config.get("version_3d"), None, rank, world)]
    images = []
    for name, version in config["datasets_2d"]:
        images += [c.image for c in load_shard(config["store"], name, version, None, rank, world)]
    if not volumes or not images:
        raise RuntimeError(f"rank {rank}: no 3D volumes or 2D images in its shard")

    global_batch = config["batch_size"] * world
    base_lr = hp.base_lr * global_batch / 256.0
    steps_per_epoch, epochs = int(config["steps_per_epoch"]), int(config["epochs"])
    total = steps_per_epoch * epochs
    lr_schedule = cosine_schedule(base_lr, hp.min_lr, total, warmup_iters=min(hp.warmup_epochs, epochs - 1) * steps_per_epoch)
    wd_schedule = cosine_schedule(hp.weight_decay, hp.weight_decay_end, total)
    momentum_schedule = cosine_schedule(hp.momentum_teacher, 1.0, total)

    model = student
    if world > 1:
        from ray.train.torch import prepare_model

        model = prepare_model(student, parallel_strategy_kwargs={"find_unused_parameters": True})
    optimizer = torch.optim.AdamW(param_groups(student, hp.weight_decay))

    start_epoch, step = 0, 0
    state = latest_checkpoint(config, method=METHOD)
    if state is not None:
        student.load_state_dict(state["state"]["student"])
        teacher.load_state_dict(state["state"]["teacher"])
        optimizer.load_state_dict(state["state"]["optimizer"])
        loss_fn.center.copy_(state["state"]["loss_center"])
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])

    tracker = _RankZeroTracker(config.get("mlflow_run_id")) if is_rank_zero() else None
    gen = torch.Generator().manual_seed(int(config["seed"]) * 1000 + rank)
    rng = np.random.default_rng([int(config["seed"]), rank, start_epoch])
    view_3d = tuple(config["view_3d"])
    crop_3d = (view_3d[0], int(math.ceil(view_3d[1] * 1.25)), int(math.ceil(view_3d[2] * 1.25)))
    fail_at = config.get("fail_at_step")

    for epoch in range(start_epoch, epochs):
        is_3d = (epoch // hp.interval) % 2 == 1
        set_3d_trainable(student, is_3d)
        epoch_losses, started = [], time.perf_counter()
        student.train()
        for _ in range(steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = float(lr_schedule[step])
                if group.get("apply_weight_decay", group["weight_decay"] > 0):
                    group["weight_decay"] = float(wd_schedule[step])
            if is_3d:
                crops = [torch.from_numpy(np.ascontiguousarray(random_crop(volumes[rng.integers(len(volumes))], crop_3d, rng)[0]))[None]
                         for _ in range(config["batch_size"])]
                views = [torch.stack([volume_view(c.float(), view_3d, gen) for c in crops]) for _ in range(2)]
            else:
                picks = [images[rng.integers(len(images))] for _ in range(config["batch_size"])]
                tensors = [torch.from_numpy(_as_chw(p)) for p in picks]
                views = [torch.stack([image_view(t, config["view_2d"], gen, strong=(v == 0)) for t in tensors]) for v in range(2)]
            batch = torch.cat(views).to(device)
            with autocast():
                student_out = model(batch, slices=is_3d)
                with torch.no_grad():
                    teacher_out = teacher(batch, slices=is_3d)
                if is_3d:
                    loss = unimiss_3d_loss(loss_fn, student_out, teacher_out, epoch)
                else:
                    loss = loss_fn(student_out["volume"], teacher_out["volume"], epoch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(student, hp.clip_grad)
            cancel_last_layer_grads(student.head, epoch, hp.freeze_last_layer)
            optimizer.step()
            ema_update(teacher, student, float(momentum_schedule[step]))
            step += 1
            epoch_losses.append(float(loss.detach()))
            if tracker:
                tracker.log({"loss": epoch_losses[-1], f"loss_{'3d' if is_3d else '2d'}": epoch_losses[-1],
                             "lr": float(lr_schedule[step - 1]), "momentum": float(momentum_schedule[step - 1])}, step)
            if fail_at is not None and step == int(fail_at) and rank == world - 1:
                _inject_failure(config, step)
        metrics = {"loss": float(np.mean(epoch_losses)), "epoch_kind": 3 if is_3d else 2,
                   "steps_per_s": steps_per_epoch / (time.perf_counter() - started)}
        if tracker:
            tracker.log({"epoch_loss": metrics["loss"], "steps_per_s": metrics["steps_per_s"]}, step)
        report(metrics, {"student": unwrap_module(student), "teacher": teacher, "optimizer": optimizer,
                         "loss_center": loss_fn.center}, step=step, epoch=epoch, method=METHOD, config=config)
    if tracker:
        tracker.flush()


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
        self.pending: list[Any] = []
        if run_id:
            import mlflow

            self.client = mlflow.MlflowClient()

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.run_id:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), now, step) for key, value in metrics.items()]
        if len(self.pending) >= 200:
            self.flush()

    def flush(self) -> None:
        if self.run_id and self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []
