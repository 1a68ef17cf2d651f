"""Tracking: flow/stage runs and their lineage, resumability, dataset inputs, metrics and plots.

Real MLflow on a per-module SQLite store in a temporary folder; no mocks.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from infra import tracking
from infra.settings import Settings, get_settings


@pytest.fixture(scope="module")
def experiment_id(tmp_path_factory: pytest.TempPathFactory):
    """A fresh SQLite tracking store and artifact root for this module; system metrics off."""
    home = tmp_path_factory.mktemp("mlflow-tracking")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDFOUNDRY_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        mp.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
        mp.delenv("PREFECT__FLOW_RUN_ID", raising=False)
        get_settings.cache_clear()
        yield tracking.setup_tracking(Settings())
        while mlflow.active_run():
            mlflow.end_run()
    get_settings.cache_clear()


@pytest.fixture
def client(experiment_id: str) -> MlflowClient:
    return MlflowClient()


def test_setup_is_idempotent_and_uses_artifact_root(experiment_id: str, client: MlflowClient) -> None:
    settings = Settings()
    assert tracking.setup_tracking(settings) == experiment_id
    experiment = client.get_experiment(experiment_id)
    assert experiment.name == settings.experiment
    assert experiment.artifact_location == settings.artifact_root


def test_deleted_experiment_is_restored(experiment_id: str, client: MlflowClient) -> None:
    settings = Settings(experiment="scratch")
    first = tracking.setup_tracking(settings)
    client.delete_experiment(first)
    assert tracking.setup_tracking(settings) == first
    assert client.get_experiment(first).lifecycle_stage == "active"
    tracking.setup_tracking(Settings())


def test_flow_and_stage_runs_are_linked_with_lineage(client: MlflowClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "prefect-run-123")
    with tracking.flow_run("foundation", params={"seed": 0, "model": {"depth": 4}, "api_token": "hunter2"}) as parent:
        parent_id = parent.info.run_id
        with tracking.stage_run("ingest", inputs=["brain_mri@abc123"]) as ingest:
            ingest_id = ingest.info.run_id
        with tracking.stage_run(
            "unimiss",
            parent_id,
            params={"lr": 1e-3},
            tags={"owner": "platform"},
            upstream_run_id=ingest_id,
            inputs=["brain_mri@abc123", "chest_ct@def456"],
        ) as unimiss:
            unimiss_id = unimiss.info.run_id
            assert mlflow.active_run().info.run_id == unimiss_id
        assert mlflow.active_run().info.run_id == parent_id

    flow = client.get_run(parent_id)
    assert flow.info.status == "FINISHED"
    assert flow.data.tags[tracking.TAG_FLOW] == "foundation"
    assert flow.data.tags[tracking.TAG_PREFECT_FLOW_RUN_ID] == "prefect-run-123"
    assert flow.data.params == {"seed": "0", "model.depth": "4", "api_token": "***"}

    child = client.get_run(unimiss_id)
    assert child.info.status == "FINISHED"
    assert child.info.experiment_id == flow.info.experiment_id
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.data.tags[tracking.TAG_STAGE] == "unimiss"
    assert child.data.tags[tracking.TAG_PARENT_STAGE_RUN_ID] == ingest_id
    assert json.loads(child.data.tags[tracking.TAG_INPUTS]) == ["brain_mri@abc123", "chest_ct@def456"]
    assert child.data.tags["owner"] == "platform"
    assert child.data.params == {"lr": "0.001"}
    assert client.get_run(ingest_id).data.tags["mlflow.parentRunId"] == parent_id


def test_stage_run_nests_without_an_active_parent_in_its_thread(client: MlflowClient) -> None:
    """A worker (here a thread: MLflow's active-run stack is per thread) nests by parent id alone."""
    result: dict[str, str] = {}
    with tracking.flow_run("pretrain") as parent:

        def worker() -> None:
            assert mlflow.active_run() is None
            with tracking.stage_run("rank0", parent.info.run_id) as run:
                mlflow.log_metric("loss", 1.0)
                result["run_id"] = run.info.run_id

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    child = client.get_run(result["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.metrics["loss"] == 1.0
    assert child.info.status == "FINISHED"


def test_find_run_returns_finished_stage_and_ignores_failed(client: MlflowClient) -> None:
    done_key = tracking.stage_key("medcoss", {"lr": 1e-3}, ["ds@v1"])
    failed_key = tracking.stage_key("medcoss", {"lr": 1e-2}, ["ds@v1"])
    assert done_key == tracking.stage_key("medcoss", {"lr": 1e-3}, ["ds@v1"])
    assert done_key != failed_key
    assert tracking.find_run({tracking.TAG_STAGE_KEY: done_key}) is None

    with tracking.flow_run("foundation"):
        with tracking.stage_run("medcoss", stage_key=done_key) as done:
            pass
        with pytest.raises(RuntimeError, match="boom"):
            with tracking.stage_run("medcoss", stage_key=failed_key) as failed:
                raise RuntimeError("boom")

    assert client.get_run(failed.info.run_id).info.status == "FAILED"
    assert tracking.find_run({tracking.TAG_STAGE_KEY: done_key}) == done.info.run_id
    assert tracking.find_run({tracking.TAG_STAGE_KEY: done_key, tracking.TAG_STAGE: "medcoss"}) == done.info.run_id
    assert tracking.find_run({tracking.TAG_STAGE_KEY: failed_key}) is None
    assert tracking.find_run({tracking.TAG_STAGE_KEY: failed_key}, statuses=("FAILED", "KILLED")) == failed.info.run_id


def test_resumed_flow_run_keeps_params(client: MlflowClient) -> None:
    with pytest.raises(KeyError):
        with tracking.flow_run("tpp", params={"epochs": 2}) as first:
            raise KeyError("crash")
    run_id = tracking.find_run({tracking.TAG_FLOW: "tpp"}, statuses=("FAILED",))
    assert run_id == first.info.run_id

    with tracking.flow_run("tpp", params={"epochs": 2, "resumed": True}, run_id=run_id) as resumed:
        assert resumed.info.run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"epochs": "2", "resumed": "True"}

    with pytest.raises(ValueError, match="epochs"):
        with tracking.flow_run("tpp", params={"epochs": 3}, run_id=run_id):
            pass


def test_log_dataset_input_records_name_digest_source_and_profile(client: MlflowClient, tmp_path: Path) -> None:
    version = "f" * 20 + "0123456789abcdef" * 3
    source = tmp_path / "store" / "brain_mri" / version
    schema = {"dtype": "float32", "dims": 3, "channels": 1}
    fingerprint = {"cases": 12, "spacing_median": [1.0, 1.0, 1.0], "intensity": {"mean": 0.1, "std": 1.2}}
    with tracking.flow_run("ingest"):
        with tracking.stage_run("ingest") as run:
            tracking.log_dataset_input("brain_mri", version, str(source), schema, fingerprint, context="training")
            tracking.log_dataset_input("scratch", "abc", "memory://store/scratch/abc", {}, {}, context="evaluation")

    inputs = {d.dataset.name: d for d in client.get_run(run.info.run_id).inputs.dataset_inputs}
    brain = inputs["brain_mri"]
    assert brain.dataset.digest == version[:36]
    assert brain.dataset.source_type == "local"
    assert str(source) in brain.dataset.source
    assert json.loads(brain.dataset.schema) == schema
    assert json.loads(brain.dataset.profile) == fingerprint
    tags = {t.key: t.value for t in brain.tags}
    assert tags["mlflow.data.context"] == "training"
    assert tags["medfoundry.version"] == version
    assert inputs["scratch"].dataset.source_type == "zarr"
    assert json.loads(inputs["scratch"].dataset.source) == {"uri": "memory://store/scratch/abc"}


def test_metric_series_plots_and_dict_artifacts(client: MlflowClient, tmp_path: Path) -> None:
    history = [{"step": s, "loss": 1.0 / (s + 1), "val_loss": 1.2 / (s + 1), "phase": "train"} for s in range(5)]
    with tracking.stage_run("tpp") as run:
        assert tracking.log_metrics_series(history, prefix="train/") == 10
        assert tracking.log_loss_curve(history, ["loss", "val_loss"], "plots/loss") == "plots/loss.png"
        summary_path = tracking.log_dict_artifact({"best_step": 4, "per_case": [0.1, 0.2]}, "eval/summary")
        assert summary_path == "eval/summary.json"
        with pytest.raises(KeyError, match="dice"):
            tracking.log_loss_curve(history, ["dice"])
    run_id = run.info.run_id

    series = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in series] == [0, 1, 2, 3, 4]
    assert series[-1].value == pytest.approx(0.2)
    png = Path(client.download_artifacts(run_id, "plots/loss.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = Path(client.download_artifacts(run_id, "eval/summary.json", str(tmp_path)))
    assert json.loads(summary.read_text()) == {"best_step": 4, "per_case": [0.1, 0.2]}


def test_system_metrics_are_logged_when_enabled(client: MlflowClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    with tracking.stage_run("sysmetrics", log_system_metrics=True) as run:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if any(k.startswith("system/") for k in client.get_run(run.info.run_id).data.metrics):
                break
            time.sleep(0.1)
    metrics = client.get_run(run.info.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics
