"""Ray Train end to end: a 2-worker DDP fit, a worker crash restarted from its checkpoint, and
resume of a killed run by relaunching it under the same name.

One Ray session serves the module (Ray start ~6 s, each 2-worker fit ~30 s on 2 cores), so
the tests share it and each launches as few fits as its claim needs.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from infra.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from infra.launcher import RAY_SNAPSHOT_FILE, LaunchResult, ensure_ray, launch, prepare_resume, run_dir, snapshot_problem
from infra.runtime import all_reduce_mean, report, seed_everything, set_threads, world_info
from infra.settings import Settings

pytestmark = pytest.mark.integration

STEPS_PER_EPOCH = 4
TRUE_WEIGHT = torch.tensor([[1.0, -2.0, 3.0]])


def _log(config: dict[str, Any], kind: str, **record: Any) -> None:
    with open(Path(config["log_dir"]) / f"{kind}.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _records(log_dir: Path, kind: str) -> list[dict[str, Any]]:
    path = log_dir / f"{kind}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def toy_recipe(config: dict[str, Any]) -> dict[str, Any]:
    """Linear regression under gloo DDP: one checkpoint per epoch, resumable, with injectable faults.

    ``epoch`` in a checkpoint counts finished epochs (1-based) and ``step`` finished
    optimizer steps, so a resumed attempt starts at ``epoch + 1`` and ``step + 1``.
    Faults: ``fail_at_step`` raises on rank 1 the first time that step runs (a marker file
    makes it one-off); ``crash_after_epoch`` raises on every rank after that epoch's report.
    """
    import ray.train.torch

    set_threads(1)
    rank, world_size = world_info()
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    epoch, step = 0, 0
    resumed = latest_checkpoint(config, method="toy")
    if resumed is not None:
        model.load_state_dict(resumed["state"]["model"])
        optimizer.load_state_dict(resumed["state"]["optimizer"])
        epoch, step = resumed["epoch"], resumed["step"]
    if rank == 0:
        _log(config, "starts", first_step=step + 1, first_epoch=epoch + 1, world_size=world_size, niceness=os.nice(0))
    ddp_model = ray.train.torch.prepare_model(model)
    for epoch in range(epoch + 1, config["epochs"] + 1):
        losses = []
        for _ in range(STEPS_PER_EPOCH):
            step += 1
            marker = Path(config["log_dir"]) / "failed-once"
            if rank == 1 and step == config.get("fail_at_step") and not marker.exists():
                marker.touch()
                raise RuntimeError(f"injected worker failure at step {step}")
            seed_everything(1000 * step, rank)
            x = torch.randn(32, 3)
            y = x @ TRUE_WEIGHT.T + 0.5
            loss = nn.functional.mse_loss(ddp_model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        mean_loss = float(all_reduce_mean(torch.stack(losses).mean()))
        report({"loss": mean_loss}, {"model": model, "optimizer": optimizer}, step=step, epoch=epoch, method="toy", config=config)
        if rank == 0:
            _log(config, "reports", step=step, epoch=epoch, loss=mean_loss)
        if epoch == config.get("crash_after_epoch"):
            raise RuntimeError(f"simulated kill after epoch {epoch}")
    return {"final_step": step}


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """One local Ray session (2 CPUs) for the module; env changes undone afterwards."""
    import ray.cloudpickle

    saved_env = dict(os.environ)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    home = tmp_path_factory.mktemp("medfoundry")
    settings = Settings(home=home, num_workers=2, cpus_per_worker=1, threads_per_worker=1, use_gpu=False)
    started = ensure_ray(settings, num_cpus=2)
    yield settings
    import ray

    if started:
        ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    os.environ.clear()
    os.environ.update(saved_env)


def _launch(settings: Settings, name: str, log_dir: Path, **config: Any) -> LaunchResult:
    log_dir.mkdir(exist_ok=True)
    max_failures = config.pop("max_failures", 2)
    return launch(toy_recipe, {"log_dir": str(log_dir), **config}, name=name, settings=settings, max_failures=max_failures)


def test_two_worker_fit_learns_and_checkpoints(settings: Settings, tmp_path: Path) -> None:
    result = _launch(settings, "fit", tmp_path, epochs=3)

    assert result.ok, result.error
    assert result.return_value == {"final_step": 3 * STEPS_PER_EPOCH}
    assert result.metrics["epoch"] == 3 and result.metrics["step"] == 3 * STEPS_PER_EPOCH
    losses = [r["loss"] for r in _records(tmp_path, "reports")]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0]
    assert _records(tmp_path, "starts") == [{"first_step": 1, "first_epoch": 1, "world_size": 2,
                                             "niceness": os.nice(0) + settings.ray_worker_niceness}], \
        "workers run at the configured niceness (Ray's default 15 starves them on a shared machine)"

    payload = load_checkpoint(result.checkpoint)
    assert (payload["method"], payload["epoch"], payload["step"]) == ("toy", 3, 3 * STEPS_PER_EPOCH)
    assert set(payload["state"]["model"]) == {"weight", "bias"}, "DDP prefix leaked into the checkpoint"
    assert payload["metrics"]["loss"] == pytest.approx(losses[-1])
    kept = [p for p in Path(result.path).iterdir() if p.name.startswith("checkpoint_") and p.is_dir()]
    assert len(kept) == 2, "CheckpointConfig(num_to_keep=2) should keep the two newest"


def test_worker_failure_restarts_from_last_checkpoint(settings: Settings, tmp_path: Path) -> None:
    fail_at = STEPS_PER_EPOCH + 2
    result = _launch(settings, "faulty", tmp_path, epochs=2, fail_at_step=fail_at)

    assert result.ok, result.error
    assert (tmp_path / "failed-once").exists(), "the fault was never injected"
    first_steps = [s["first_step"] for s in _records(tmp_path, "starts")]
    last_checkpointed = max(r["step"] for r in _records(tmp_path, "reports") if r["step"] < fail_at)
    assert first_steps == [1, last_checkpointed + 1], "the restarted attempt must continue after the last checkpoint"
    assert last_checkpointed == STEPS_PER_EPOCH
    assert result.metrics["step"] == 2 * STEPS_PER_EPOCH


def test_relaunch_with_same_name_resumes_killed_run(settings: Settings, tmp_path: Path) -> None:
    killed = _launch(settings, "resumable", tmp_path, epochs=4, crash_after_epoch=2, max_failures=0)

    assert not killed.ok and "simulated kill after epoch 2" in str(killed.error)
    assert killed.checkpoint is not None and load_checkpoint(killed.checkpoint)["epoch"] == 2

    resumed = _launch(settings, "resumable", tmp_path, epochs=4)

    assert resumed.ok, resumed.error
    starts = _records(tmp_path, "starts")
    assert [(s["first_epoch"], s["first_step"]) for s in starts] == [(1, 1), (3, 2 * STEPS_PER_EPOCH + 1)]
    assert [r["epoch"] for r in _records(tmp_path, "reports")] == [1, 2, 3, 4]
    assert load_checkpoint(resumed.checkpoint)["epoch"] == 4


@pytest.mark.parametrize("problem", ["other_ray_version", "deleted_checkpoint"])
def test_snapshot_ray_would_refuse_falls_back_to_resume_from(tmp_path: Path, problem: str) -> None:
    """No fit needed: a snapshot Ray rejects at start is moved aside and our newest checkpoint used."""
    import ray

    settings = Settings(home=tmp_path)
    run = Path(run_dir(settings, "old"))
    for step in (4, 8):
        save_checkpoint(run / f"checkpoint_{step}", method="toy", step=step, epoch=step // 4, state={}, config={})
    version = "2.0.0" if problem == "other_ray_version" else ray.__version__
    names = ["checkpoint_4", "checkpoint_8"] + (["checkpoint_gone"] if problem == "deleted_checkpoint" else [])
    snapshot = {"ray_version": version, "checkpoint_results": [{"checkpoint_dir_name": n, "metrics": {}} for n in names]}
    (run / RAY_SNAPSHOT_FILE).write_text(json.dumps(snapshot))

    assert snapshot_problem(str(run)) is not None
    config = prepare_resume(settings, "old", {"lr": 0.1})

    assert config == {"lr": 0.1, "resume_from": str(run / "checkpoint_8")}
    assert not (run / RAY_SNAPSHOT_FILE).exists()
    assert len(list(run.glob(f"{RAY_SNAPSHOT_FILE}.stale-*"))) == 1
    assert prepare_resume(settings, "old", {"resume_from": "elsewhere"}) == {"resume_from": "elsewhere"}
