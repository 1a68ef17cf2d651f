"""The UniMiSS recipe on real Ray Train workers: the loss falls, and a worker failure is
survived by restarting from the last checkpoint (the step counter continues)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

ENTRIES = ("phantom-ct", "synthetic-cxr", "chest-cr-rg1")


@pytest.fixture(scope="module")
def versions(session_home, repo):
    from infra.settings import get_settings
    from tasks.catalog import load_catalog
    from tasks.ingest.run import ingest_entry

    catalog = load_catalog(repo / "catalog.yaml")
    return {name: ingest_entry(catalog.get(name), catalog.base_dir, get_settings(), "smoke")["version"] for name in ENTRIES}


def recipe_config(versions, **overrides):
    from dataclasses import asdict

    from infra.settings import get_settings
    from tasks.recipes.unimiss import build_hyper

    settings = get_settings()
    config = {"store": settings.store, "dataset_3d": "phantom-ct", "version_3d": versions["phantom-ct"],
              "datasets_2d": [["synthetic-cxr", versions["synthetic-cxr"]], ["chest-cr-rg1", versions["chest-cr-rg1"]]],
              "model_size": "cpu_small", "epochs": 4, "steps_per_epoch": 3, "batch_size": 2, "view_3d": [16, 32, 32],
              "view_2d": 64, "seed": 0, "threads_per_worker": 1, "use_gpu": False, "precision": "auto"}
    config.update(overrides)
    config["hyper"] = asdict(build_hyper("cpu_small", {"interval": 1, "warmup_epochs": 0}, config["epochs"]))
    return config


def test_worker_failure_restarts_from_last_checkpoint(versions, tmp_path):
    import mlflow

    from infra import tracking
    from infra.checkpoint import load_checkpoint
    from infra.launcher import launch
    from infra.settings import get_settings
    from tasks.recipes.unimiss import train_unimiss

    tracking.setup_tracking(get_settings())
    with tracking.stage_run("fault-tolerance-test") as run:
        config = recipe_config(versions, fail_at_step=5, fail_marker=str(tmp_path / "failed-once"),
                               mlflow_run_id=run.info.run_id)
        result = launch(train_unimiss, config, name="unimiss-fault-test", settings=get_settings(), max_failures=2)
    assert result.ok, result.error
    assert (tmp_path / "failed-once").read_text() == "5", "the injected failure happened at step 5"
    final = load_checkpoint(result.checkpoint)
    assert final["step"] == 12 and final["epoch"] == 3
    client = mlflow.MlflowClient()
    resumed = [m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_step")]
    assert resumed == [3.0], "restarted from the checkpoint of epoch 0 (step 3), not from step 0"
    losses = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in losses if m.step > 5] == list(range(6, 13))
