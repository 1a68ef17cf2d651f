"""Typed run profiles: ``smoke`` (tests, seconds), ``demo`` (the main job, minutes on a CPU),
``full`` (the paper's settings, for GPUs). Validated at load; unknown keys are errors."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ProfileName = Literal["smoke", "demo", "full"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UniMiSSPretrainProfile(_Strict):
    model_size: Literal["cpu_small", "official_tiny", "official_small"] = "cpu_small"
    dataset_3d: str = "phantom-ct"
    datasets_2d: list[str] = Field(default_factory=lambda: ["synthetic-cxr", "chest-cr-rg1"])
    epochs: int = Field(8, ge=1)
    steps_per_epoch: int = Field(10, ge=1)
    batch_size: int = Field(4, ge=1)
    view_3d: tuple[int, int, int] = (16, 32, 32)
    view_2d: int = 64
    hyper: dict = Field(default_factory=dict, description="Overrides of models.unimiss.UniMiSSConfig.")


class SegmentationProfile(_Strict):
    dataset: str = "phantom-seg-liver"
    epochs: int = Field(6, ge=1)
    steps_per_epoch: int = Field(10, ge=1)
    batch_size: int = Field(2, ge=1)
    patch: tuple[int, int, int] = (32, 32, 32)
    lr: float = 1e-3
    seeds: list[int] = Field(default_factory=lambda: [0])


class ClassificationProfile(_Strict):
    dataset: str = "synthetic-cxr"
    image_size: int = 64
    probe_epochs: int = 200
    finetune_epochs: int = 3


class UniMiSSProfile(_Strict):
    pretrain: UniMiSSPretrainProfile
    segmentation: SegmentationProfile
    classification: ClassificationProfile


# Deviation (demo only): the spec's peak LR is base_lr 8e-4 x global batch / 256, which at the
# demo's global batch of 4 is 1.25e-5 -- 96 steps at that rate move the encoder by 0.4 % and
# the "pre-trained" weights are a random init. The demo sets base_lr so the peak is 5e-4 (the
# order of the official 6e-4 at batch 192); measured: the encoder moves 6.6 % and fine-tuning
# from it beats scratch (benchmarks/unimiss_learning.py). ``full`` keeps the spec's rule.
DEMO_BASE_LR = 5e-4 * 256 / 4

UNIMISS_PROFILES: dict[str, UniMiSSProfile] = {
    "smoke": UniMiSSProfile(
        pretrain=UniMiSSPretrainProfile(epochs=2, steps_per_epoch=2, batch_size=2, hyper={"interval": 1, "warmup_epochs": 0}),
        segmentation=SegmentationProfile(epochs=1, steps_per_epoch=2, batch_size=1),
        classification=ClassificationProfile(probe_epochs=20, finetune_epochs=1),
    ),
    "demo": UniMiSSProfile(
        pretrain=UniMiSSPretrainProfile(epochs=8, steps_per_epoch=12, batch_size=4,
                                        hyper={"interval": 2, "warmup_epochs": 1, "base_lr": DEMO_BASE_LR}),
        segmentation=SegmentationProfile(epochs=6, steps_per_epoch=10),
        classification=ClassificationProfile(),
    ),
    "full": UniMiSSProfile(
        pretrain=UniMiSSPretrainProfile(model_size="official_small", epochs=200, steps_per_epoch=500, batch_size=24,
                                        view_3d=(16, 96, 96), view_2d=224, hyper={"out_dim": 65536, "head_hidden_dim": 2048,
                                                                                  "head_bottleneck_dim": 256}),
        segmentation=SegmentationProfile(epochs=200, steps_per_epoch=250, batch_size=2, patch=(32, 96, 96), lr=1e-4, seeds=[0, 1, 2]),
        classification=ClassificationProfile(image_size=224, probe_epochs=500, finetune_epochs=50),
    ),
}


def unimiss_profile(name: str) -> UniMiSSProfile:
    if name not in UNIMISS_PROFILES:
        raise ValueError(f"unknown profile {name!r}; use one of {', '.join(UNIMISS_PROFILES)}")
    return UNIMISS_PROFILES[name]
