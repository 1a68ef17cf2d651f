"""``unimiss --profile smoke`` end to end on real Ray (2 workers), real MLflow and the real store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smoke_run(session_home, repo):
    from pipelines.unimiss import unimiss_flow

    return unimiss_flow(catalog_path=str(repo / "catalog.yaml"), profile="smoke")


def test_chain_completes_with_a_registered_champion(smoke_run):
    names = [row["stage"] for row in smoke_run["stages"]]
    assert names[:2] == ["ingest", "unimiss-pretrain"]
    seg = smoke_run["segmentation"]
    assert seg["model"].startswith("unimiss-mit-cpu-small-seg-phantom-seg-liver")
    assert seg["alias"] == "champion", "the first registered version becomes champion"
    assert 0.0 <= seg["dice"] <= 1.0
    assert smoke_run["encoder"]["model"] == "unimiss-mit-cpu-small"
    assert smoke_run["encoder"]["alias"] == "champion"


def test_champion_loads_by_alias_and_segments_a_store_case(smoke_run):
    """The registered model is the evaluated one: its Dice on a test case equals the recorded one."""
    import mlflow
    import torch
    from monai.inferers import sliding_window_inference

    from infra.registry import load_model
    from infra.settings import get_settings
    from infra.storage import DatasetStore
    from tasks.evaluate import evaluate_segmentation

    seg = smoke_run["segmentation"]
    model = load_model(f"models:/{seg['model']}@champion")
    reader = DatasetStore(get_settings().store).open("phantom-seg-liver")
    case = reader.attrs["splits"]["test"][0]
    image = torch.from_numpy(np.asarray(reader.read(case, "image"), dtype=np.float32))[None, None]
    with torch.no_grad():
        logits = sliding_window_inference(image, (32, 32, 32), 2, model)
    assert logits.shape == (1, 3, *image.shape[2:])
    artifact = mlflow.MlflowClient().download_artifacts(seg["run_id"], "evaluation/segmentation.json")
    recorded = json.loads(Path(artifact).read_text())
    recomputed = evaluate_segmentation(model, reader, [case], 3, (32, 32, 32), ["liver", "tumor"])
    expected = next(r for r in recorded["per_case"] if r["case_id"] == case)
    assert recomputed["per_case"][0]["dice_liver"] == pytest.approx(expected["dice_liver"], abs=1e-4)


def test_classifier_is_registered_and_its_champion_reproduces_the_recorded_auc(smoke_run):
    from infra.registry import load_model
    from infra.settings import get_settings
    from infra.storage import DatasetStore
    from tasks.evaluate import classification_classes, evaluate_classifier, load_classification_cases

    cls = smoke_run["classification"]
    assert cls["model"] == "unimiss-mit-cpu-small-cls-synthetic-cxr"
    assert cls["alias"] == "champion"
    model = load_model(f"models:/{cls['model']}@champion")
    reader = DatasetStore(get_settings().store).open("synthetic-cxr")
    test = load_classification_cases(reader, reader.attrs["splits"]["test"], 64)
    recomputed = evaluate_classifier(model, test, len(classification_classes(reader)))
    assert recomputed["auc"] == pytest.approx(cls["finetune_auc"], abs=1e-5)


def test_lineage_in_mlflow(smoke_run):
    import mlflow

    client = mlflow.MlflowClient()
    pre = client.get_run(smoke_run["pretrain"]["run_id"])
    seg = client.get_run(smoke_run["segmentation"]["run_id"])
    assert seg.data.tags["medfoundry.parent_stage_run_id"] == pre.info.run_id
    assert pre.data.tags["mlflow.parentRunId"] == seg.data.tags["mlflow.parentRunId"]
    inputs = {d.dataset.name for d in pre.inputs.dataset_inputs}
    assert inputs == {"phantom-ct", "synthetic-cxr", "chest-cr-rg1"}
    history = client.get_metric_history(pre.info.run_id, "loss")
    assert len(history) == 4, "per-step metrics from rank 0"
    artifacts = {a.path for a in client.list_artifacts(pre.info.run_id, "plots")}
    assert "plots/pretrain_loss.png" in artifacts
    assert any(a.path == "checkpoint/model.pt" for a in client.list_artifacts(pre.info.run_id, "checkpoint"))
    assert {a.path for a in client.list_artifacts(seg.info.run_id, "plots")} == {"plots/segmentation.png"}


def test_rerun_skips_finished_stages(smoke_run, repo):
    from pipelines.unimiss import unimiss_flow

    again = unimiss_flow(catalog_path=str(repo / "catalog.yaml"), profile="smoke")
    assert again["pretrain"]["skipped"] and again["segmentation"]["skipped"]
    assert again["pretrain"]["run_id"] == smoke_run["pretrain"]["run_id"]


def test_models_list_cli_prints_one_line_per_version(smoke_run, repo):
    out = subprocess.run([sys.executable, "-c", "from pipelines.cli import app; app()", "models", "list"], cwd=repo,
                         capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith(smoke_run["segmentation"]["model"])]
    assert len(lines) == 1 and "champion" in lines[0] and "dice_mean=" in lines[0]


def test_killed_flow_resumes_pretraining_from_its_checkpoint(tmp_path, repo):
    """SIGKILL the whole flow (driver, Ray, workers) after the first checkpoint; the re-run resumes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDFOUNDRY_", "MLFLOW_", "PREFECT_"))}
    env.update(MEDFOUNDRY_HOME=str(tmp_path / "home"), MEDFOUNDRY_CATALOG=str(repo / "catalog.yaml"),
               MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false")
    command = [sys.executable, "-c", "from pipelines.cli import app; app()", "run", "unimiss", "--profile", "smoke"]
    slow = dict(env, MEDFOUNDRY_FAULT_STEP_DELAY="3")
    proc = subprocess.Popen(command, cwd=repo, env=slow, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ray_dir = tmp_path / "home" / "ray"
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            if any((p / "meta.json").exists() for p in ray_dir.glob("unimiss-pretrain-*/checkpoint_*")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the flow ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint appeared"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    resumed = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    code = ("import mlflow; from infra.settings import configure_engines; configure_engines();"
            "from infra import tracking; tracking.setup_tracking();"
            "runs = mlflow.search_runs(filter_string=\"tags.`medfoundry.stage` = 'unimiss-pretrain' and attributes.status = 'FINISHED'\");"
            "c = mlflow.MlflowClient(); h = c.get_metric_history(runs.run_id[0], 'resumed_from_step'); print([m.value for m in h])")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[2.0]", "resumed after epoch 0 (step 2), not from step 0"
