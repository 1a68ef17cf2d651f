"""Registry: registration with aliases and tags, the promotion gate, listing and loading.

Real MLflow on a per-module SQLite store. ``log_model`` costs seconds, so the module logs two
real models once; the promotion tests register further versions of an already logged model
(:func:`register_logged_model`), which takes a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Iterator

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from infra import registry, tracking
from infra.settings import Settings, get_settings

Registered = tuple[registry.ModelVersionInfo, str]


class TinyEncoder(torch.nn.Module):
    """Enough structure to matter for export: dropout and batch norm behave differently in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Dropout(0.5)
        )
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("mlflow-registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDFOUNDRY_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        mp.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
        get_settings.cache_clear()
        yield tracking.setup_tracking(Settings())
        while mlflow.active_run():
            mlflow.end_run()
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def example() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def encoder(store: str) -> TinyEncoder:
    torch.manual_seed(0)
    model = TinyEncoder()
    with torch.no_grad():  # non-trivial running stats, so eval-mode batch norm is visible
        model.body[1].running_mean.uniform_(-0.5, 0.5)
        model.body[1].running_var.uniform_(0.5, 2.0)
    return model.train()


@pytest.fixture(scope="module")
def registered(encoder: TinyEncoder, example: np.ndarray) -> Registered:
    """Version 1 of "encoder", logged under a stage run of a flow run: (info, stage run id)."""
    with tracking.flow_run("foundation"):
        with tracking.stage_run("register") as run:
            info = registry.register_model(
                encoder,
                "encoder",
                input_example=example,
                metrics={"dice": 0.70, "loss": 0.5},
                key_metric="dice",
                eval_split="heldout-v1",
                extra_tags={"medfoundry.stage_run_id": "x"},
            )
    return info, run.info.run_id


@pytest.fixture(scope="module")
def survival(store: str) -> registry.ModelVersionInfo:
    """Version 1 of "survival", registered with no active run and a one-row input example."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    example = np.random.default_rng(1).standard_normal((1, 8)).astype(np.float32)
    return registry.register_model(
        model,
        "survival",
        input_example=example,
        metrics={"ibs": 0.2},
        key_metric="ibs",
        higher_is_better=False,
        eval_split="test",
    )


def _version(
    info: registry.ModelVersionInfo,
    name: str,
    value: float,
    *,
    key: str = "dice",
    split: str = "heldout-v1",
    higher: bool = True,
) -> str:
    """Register another version of ``name`` from an already logged model (fast)."""
    return registry.register_logged_model(
        info.logged_model_uri, name, metrics={key: value}, key_metric=key, eval_split=split, higher_is_better=higher
    ).version


def _aliases(name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in MlflowClient().get_registered_model(name).aliases.items()}


def test_register_sets_candidate_tags_and_run(registered: Registered, encoder: TinyEncoder) -> None:
    info, stage_run_id = registered
    assert info.version == "1"
    assert info.aliases == ("candidate",)
    assert info.run_id == stage_run_id
    assert info.key_metric_value == 0.70
    mv = MlflowClient().get_model_version("encoder", "1")
    assert mv.run_id == stage_run_id
    assert mv.tags["metric.dice"] == "0.7"
    assert mv.tags["metric.loss"] == "0.5"
    assert mv.tags["key_metric"] == "dice"
    assert mv.tags["higher_is_better"] == "true"
    assert mv.tags["eval_split"] == "heldout-v1"
    assert mv.tags["medfoundry.stage_run_id"] == "x"
    assert encoder.training, "registering must not change the caller's train/eval mode"


def test_register_requires_the_key_metric(encoder: TinyEncoder, example: np.ndarray) -> None:
    with pytest.raises(KeyError, match="auc"):
        registry.register_model(
            encoder, "encoder", input_example=example, metrics={"dice": 0.1}, key_metric="auc", eval_split="x"
        )


def test_first_candidate_becomes_champion_and_loads_equal(
    registered: Registered, encoder: TinyEncoder, example: np.ndarray
) -> None:
    decision = registry.promote_if_better("encoder", "1", "dice", True, "heldout-v1")
    assert decision.promoted and decision.decision == "promoted"
    assert decision.champion_version_before is None
    assert _aliases("encoder") == {"candidate": "1", "champion": "1"}

    loaded = registry.load_model("models:/encoder@champion")
    assert isinstance(loaded, torch.nn.Module)
    assert not loaded.training
    encoder.eval()
    try:
        for batch in (example, example[:3]):
            x = torch.from_numpy(batch)
            with torch.no_grad():
                torch.testing.assert_close(loaded(x), encoder(x))
    finally:
        encoder.train()


def test_worse_candidate_keeps_champion_and_records_both_values(registered: Registered) -> None:
    info, _ = registered
    first = _version(info, "gate-worse", 0.70)
    assert registry.promote_if_better("gate-worse", first).promoted
    worse = _version(info, "gate-worse", 0.65)

    decision = registry.promote_if_better("gate-worse", worse, "dice", True, "heldout-v1")
    assert not decision.promoted and decision.decision == "kept_champion"
    assert (decision.candidate_value, decision.champion_value, decision.champion_version_before) == (0.65, 0.70, first)
    assert _aliases("gate-worse") == {"candidate": worse, "champion": first}
    tags = MlflowClient().get_model_version("gate-worse", worse).tags
    assert tags["promotion.candidate_value"] == "0.65"
    assert tags["promotion.champion_value"] == "0.7"
    assert tags["promotion.decision"] == "kept_champion"
    assert tags["promotion.champion_version_before"] == first

    better = _version(info, "gate-worse", 0.71)
    decision = registry.promote_if_better("gate-worse", better, "dice", True, "heldout-v1")
    assert decision.promoted and decision.champion_version_before == first
    assert _aliases("gate-worse") == {"candidate": better, "champion": better}
    assert MlflowClient().get_model_version("gate-worse", better).tags["promotion.decision"] == "promoted"


def test_ties_keep_the_champion(registered: Registered) -> None:
    info, _ = registered
    first = _version(info, "gate-tie", 0.5)
    registry.promote_if_better("gate-tie", first)
    assert not registry.promote_if_better("gate-tie", _version(info, "gate-tie", 0.5)).promoted


def test_lower_is_better(registered: Registered) -> None:
    info, _ = registered
    kw = {"key": "loss", "higher": False}
    first = _version(info, "gate-lower", 0.5, **kw)
    assert registry.promote_if_better("gate-lower", first).promoted
    worse = _version(info, "gate-lower", 0.6, **kw)
    assert not registry.promote_if_better("gate-lower", worse, "loss", False, "heldout-v1").promoted
    lower = _version(info, "gate-lower", 0.4, **kw)
    decision = registry.promote_if_better("gate-lower", lower, "loss", False, "heldout-v1")
    assert decision.promoted and (decision.candidate_value, decision.champion_value) == (0.4, 0.5)
    assert _aliases("gate-lower")["champion"] == lower


def test_different_eval_split_is_refused(registered: Registered) -> None:
    info, _ = registered
    first = _version(info, "gate-split", 0.5)
    registry.promote_if_better("gate-split", first)
    other = _version(info, "gate-split", 0.99, split="heldout-v2")

    decision = registry.promote_if_better("gate-split", other, "dice", True, "heldout-v2")
    assert not decision.promoted and decision.decision == "refused"
    assert "eval splits differ" in decision.reason and "heldout-v1" in decision.reason
    assert _aliases("gate-split")["champion"] == first
    assert MlflowClient().get_model_version("gate-split", other).tags["promotion.decision"] == "refused"

    mismatch = registry.promote_if_better("gate-split", other, "dice", True, "heldout-v1")
    assert not mismatch.promoted and "evaluated on 'heldout-v2'" in mismatch.reason

    forced = registry.promote("gate-split", other, force=True)
    assert forced.promoted and forced.decision == "forced" and forced.champion_version_before == first
    assert _aliases("gate-split")["champion"] == other
    assert MlflowClient().get_model_version("gate-split", other).tags["promotion.decision"] == "forced"


def test_manual_promote_runs_the_gate(registered: Registered) -> None:
    info, _ = registered
    first = _version(info, "gate-manual", 0.5)
    assert registry.promote("gate-manual", first).promoted
    assert not registry.promote("gate-manual", _version(info, "gate-manual", 0.4)).promoted
    assert registry.promote("gate-manual", first).decision == "already_champion"


def test_register_under_a_finished_run_reopens_it(registered: Registered, encoder: TinyEncoder) -> None:
    _, stage_run_id = registered
    example = np.ones((2, 8), dtype=np.float32)
    info = registry.register_model(
        encoder,
        "reopened",
        input_example=example,
        metrics={"dice": 0.1},
        key_metric="dice",
        eval_split="x",
        run_id=stage_run_id,
    )
    assert info.run_id == stage_run_id
    assert MlflowClient().get_run(stage_run_id).info.status == "FINISHED"
    assert mlflow.active_run() is None


def test_one_row_example_keeps_a_dynamic_batch(survival: registry.ModelVersionInfo) -> None:
    assert survival.run_id and survival.aliases == ("candidate",)
    loaded = registry.load_model("models:/survival@candidate")
    with torch.no_grad():
        assert loaded(torch.zeros(3, 8)).shape == (3, 1)


def test_list_versions_and_show(registered: Registered, survival: registry.ModelVersionInfo) -> None:
    info, _ = registered
    registry.promote_if_better("gate-list", _version(info, "gate-list", 0.2))  # v1: champion
    second = _version(info, "gate-list", 0.3)
    rows = registry.list_versions("gate-list")
    assert [(r["version"], r["aliases"]) for r in rows] == [("1", ["champion"]), ("2", ["candidate"])]
    assert rows[1]["version"] == second
    assert rows[1]["key_metric"] == "dice" and rows[1]["key_metric_value"] == 0.3
    assert rows[1]["eval_split"] == "heldout-v1" and rows[1]["run_id"] == info.run_id
    assert rows[0]["decision"] == "promoted" and rows[1]["decision"] is None
    assert rows[0]["created"].endswith("+00:00")

    everything = registry.list_versions()
    listed = {(r["name"], r["version"]) for r in everything}
    assert listed >= {("encoder", "1"), ("survival", "1"), ("gate-list", "1"), ("gate-list", "2")}
    assert len(everything) == len(listed)

    shown = registry.show("gate-list", "champion")
    assert shown["version"] == "1" and shown["metrics"] == {"dice": 0.2}
    assert shown["model_uri"] == "models:/gate-list/1"
    assert registry.show("gate-list", 2)["aliases"] == ["candidate"]
