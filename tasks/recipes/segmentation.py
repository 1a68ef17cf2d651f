"""Downstream 3D (or 2D) segmentation fine-tuning recipe, run by every Ray Train worker.

A pre-trained MiT backbone (from a UniMiSS checkpoint's student, head discarded) or a
freshly initialised one (``init_checkpoint: None``, the from-scratch baseline) gets a
segmentation head and is fine-tuned with Dice + CE on random patches with nnU-Net-style
foreground oversampling (1/3 of patches centred on a labelled voxel). Optimiser as in the
UniMiSS downstream BCV setting (AdamW), with the learning rate from the profile because the
CPU budgets are orders of magnitude smaller than the paper's. The switchable patch embedding's
copies for the other dimensionality get no gradient on this task, so they are frozen (DDP
then needs no unused-parameter search).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from infra.checkpoint import latest_checkpoint
from infra.runtime import device_and_precision, report, seed_everything, set_threads, world_info
from models.mit import MiT, MiTConfig
from models.segmentation import MiTSegmenter, SegmentationLoss
from tasks.recipes.data import load_shard, random_crop

METHOD = "segmentation"


def build_segmenter(model_size: str, num_classes: int) -> MiTSegmenter:
    return MiTSegmenter(MiT(getattr(MiTConfig, model_size)()), num_classes)


def load_pretrained_backbone(model: MiTSegmenter, checkpoint_path: str) -> int:
    """Copy the UniMiSS student's backbone weights into ``model`` (strict: every tensor must fit)."""
    from tasks.recipes.unimiss import pretrained_backbone_state

    backbone = pretrained_backbone_state(checkpoint_path)
    model.backbone.load_state_dict(backbone, strict=True)
    return len(backbone)


def train_segmentation(config: dict[str, Any]) -> None:
    rank, world = world_info()
    set_threads(int(config.get("threads_per_worker", 1)))
    seed_everything(int(config["seed"]), rank)
    device, autocast = device_and_precision(bool(config.get("use_gpu", False)), config.get("precision", "auto"))
    model = build_segmenter(config["model_size"], int(config["num_classes"]))
    if config.get("init_checkpoint"):
        load_pretrained_backbone(model, config["init_checkpoint"])
    unused = "2D" if len(config["patch"]) == 3 else "3D"
    for name, param in model.named_parameters():
        if unused in name:
            param.requires_grad_(False)
    model.to(device)
    loss_fn = SegmentationLoss()
    cases = load_shard(config["store"], config["dataset"], config.get("version"), config["train_ids"], rank, world, with_labels=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=float(config["lr"]), weight_decay=float(config.get("weight_decay", 1e-4)))
    total = int(config["epochs"]) * int(config["steps_per_epoch"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 - min(it, total - 1) / total) ** 0.9)
    start_epoch, step = 0, 0
    state = latest_checkpoint(config, method=METHOD)
    if state is not None:
        model.load_state_dict(state["state"]["model"])
        optimizer.load_state_dict(state["state"]["optimizer"])
        scheduler.load_state_dict(state["state"]["scheduler"])
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
    wrapped = model
    if world > 1:
        from ray.train.torch import prepare_model

        wrapped = prepare_model(model, move_to_device=False)
    rng = np.random.default_rng([int(config["seed"]), rank, start_epoch])
    patch = tuple(config["patch"])
    for epoch in range(start_epoch, int(config["epochs"])):
        wrapped.train()
        losses, started = [], time.perf_counter()
        for _ in range(int(config["steps_per_epoch"])):
            images, labels = [], []
            for _ in range(int(config["batch_size"])):
                case = cases[int(rng.integers(len(cases)))]
                image, label = random_crop(case.image, patch, rng, case.label, foreground_p=0.33, foreground=case.foreground)
                images.append(np.ascontiguousarray(image, dtype=np.float32)[None])
                labels.append(np.ascontiguousarray(label, dtype=np.int64)[None])
            x = torch.from_numpy(np.stack(images)).to(device)
            y = torch.from_numpy(np.stack(labels)).to(device)
            with autocast():
                loss = loss_fn(wrapped(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(float(loss.detach()))
        report({"loss": float(np.mean(losses)), "steps_per_s": len(losses) / (time.perf_counter() - started)},
               {"model": model, "optimizer": optimizer, "scheduler": scheduler.state_dict()},
               step=step, epoch=epoch, method=METHOD, config=config)
