"""The checkpoint format: round trip, safe loading, canonical keys, schema checks, newest-checkpoint scan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from infra.checkpoint import (
    META_FILE,
    MODEL_FILE,
    SCHEMA_VERSION,
    CheckpointError,
    canonical_state_dict,
    config_digest,
    find_latest_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from infra.runtime import all_reduce_mean, device_and_precision, is_rank_zero, seed_everything, world_info


class Arbitrary:
    """A class weights_only loading must refuse to instantiate."""

    def __init__(self) -> None:
        self.payload = "not a tensor"


def _trained_pair() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


def _save(directory: Path, step: int = 7, epoch: int = 1, **overrides) -> Path:
    model, optimizer = _trained_pair()
    kwargs = dict(
        method="unimiss",
        step=step,
        epoch=epoch,
        state={"student": model, "optimizer": optimizer, "loss_center": torch.zeros(3)},
        config={"lr": 1e-2, "dims": (2, 3), "path": Path("/tmp/x"), "seed": np.int64(3)},
        metrics={"loss": torch.tensor(0.25), "acc": np.float32(0.5)},
    )
    kwargs.update(overrides)
    return save_checkpoint(directory, **kwargs)


def test_round_trip_is_identical(tmp_path: Path) -> None:
    model, optimizer = _trained_pair()
    _save(tmp_path / "ckpt")
    payload = load_checkpoint(tmp_path / "ckpt")

    assert payload["schema_version"] == SCHEMA_VERSION
    assert (payload["method"], payload["step"], payload["epoch"]) == ("unimiss", 7, 1)
    assert payload["config"] == {"lr": 1e-2, "dims": [2, 3], "path": "/tmp/x", "seed": 3}
    assert payload["metrics"] == {"loss": 0.25, "acc": 0.5}
    for key, value in model.state_dict().items():
        assert torch.equal(payload["state"]["student"][key], value)
    assert torch.equal(payload["state"]["loss_center"], torch.zeros(3))

    restored_model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    restored_model.load_state_dict(payload["state"]["student"])
    restored_opt = torch.optim.AdamW(restored_model.parameters(), lr=1.0)
    restored_opt.load_state_dict(payload["state"]["optimizer"])
    original, restored = optimizer.state_dict(), restored_opt.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    for index, slots in original["state"].items():
        for slot, value in slots.items():
            assert torch.equal(restored["state"][index][slot], value)

    meta = json.loads((tmp_path / "ckpt" / META_FILE).read_text())
    assert meta["step"] == 7 and meta["config_digest"] == config_digest(payload["config"])
    assert read_meta(tmp_path / "ckpt")["method"] == "unimiss"
    assert load_checkpoint(tmp_path / "ckpt" / MODEL_FILE)["step"] == 7
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")], "temp files left behind"


def test_weights_only_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    (tmp_path / "evil").mkdir()
    torch.save({"schema_version": 1, "state": Arbitrary()}, tmp_path / "evil" / MODEL_FILE)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(tmp_path / "evil")


def test_non_json_config_is_rejected_at_save(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"config\['model'\]"):
        _save(tmp_path / "ckpt", config={"model": Arbitrary()})


def test_schema_version_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    torch.save({"schema_version": 99, "state": {}}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="schema_version 99"):
        load_checkpoint(tmp_path / "future.pt")
    torch.save({"state": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a MedFoundry checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")


def test_wrapper_prefixes_are_stripped(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    compiled_like = nn.Module()
    compiled_like._orig_mod = model
    assert set(canonical_state_dict(compiled_like)) == {"weight", "bias"}
    wrapped = {f"_orig_mod.module.{k}": v for k, v in model.state_dict().items()}
    assert set(canonical_state_dict(wrapped)) == {"weight", "bias"}

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(3, 2)
            self.head = nn.Linear(2, 1)

    assert set(canonical_state_dict(Holder())) == {"module.weight", "module.bias", "head.weight", "head.bias"}
    _save(tmp_path / "ckpt", state={"student": compiled_like})
    assert set(load_checkpoint(tmp_path / "ckpt")["state"]["student"]) == {"weight", "bias"}


def test_find_latest_skips_incomplete_checkpoints(tmp_path: Path) -> None:
    assert find_latest_checkpoint(tmp_path / "none") is None
    _save(tmp_path / "run" / "checkpoint_a", step=10, epoch=1)
    _save(tmp_path / "run" / "checkpoint_b", step=20, epoch=2)
    _save(tmp_path / "run" / "checkpoint_c", step=30, epoch=3)
    (tmp_path / "run" / "checkpoint_c" / META_FILE).unlink()
    assert find_latest_checkpoint(tmp_path / "run") == str(tmp_path / "run" / "checkpoint_b")


def test_latest_checkpoint_outside_ray_uses_resume_from(tmp_path: Path) -> None:
    assert latest_checkpoint({}) is None
    _save(tmp_path / "ckpt", step=5)
    assert latest_checkpoint({"resume_from": str(tmp_path / "ckpt")})["step"] == 5
    with pytest.raises(CheckpointError, match="method 'unimiss'"):
        latest_checkpoint({"resume_from": str(tmp_path / "ckpt")}, method="medcoss")


def test_runtime_helpers_in_a_plain_process() -> None:
    assert world_info() == (0, 1) and is_rank_zero()
    values = torch.tensor([1.0, 3.0])
    assert all_reduce_mean(values) is values
    device, autocast = device_and_precision(use_gpu=False, precision="auto")
    assert device.type == "cpu"
    with autocast():
        assert torch.ones(2).dtype == torch.float32
    assert seed_everything(3, rank=1) == 4
    with pytest.raises(ValueError):
        device_and_precision(use_gpu=False, precision="fp16")  # type: ignore[arg-type]
