"""MLflow tracking for MedFoundry: one parent run per flow, one child run per stage, with lineage.

Every flow run is an MLflow *parent* run (:func:`flow_run`); every stage is a *child* run
(:func:`stage_run`) linked by the ``mlflow.parentRunId`` tag. The link is made from an explicit
parent run id, not from MLflow's in-process active-run stack, so a stage can run in another
process (a Ray Train rank-0 worker, a Prefect task on a remote worker) and still appear nested.

Lineage tags on each stage run:

* ``medfoundry.stage`` — the stage name (``unimiss``, ``medcoss``, ...);
* ``medfoundry.parent_stage_run_id`` — the run id of the upstream stage whose output it consumed;
* ``medfoundry.inputs`` — JSON list of ``dataset@version`` it read (also logged as MLflow dataset
  inputs by :func:`log_dataset_input`, which is what the MLflow UI shows);
* ``medfoundry.stage_key`` — a digest of the stage's config and inputs (:func:`stage_key`), so a
  re-run can find a FINISHED run with the same key (:func:`find_run`) and skip the stage.

This module imports MLflow (~4 s) at the top: only code that tracks imports it, never the CLI's
start-up path (``infra/__init__`` does not import it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient
from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source import DatasetSource
from mlflow.entities import Metric, Param, Run, RunStatus
from mlflow.exceptions import MlflowException

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from infra.settings import Settings

_log = logging.getLogger(__name__)

TAG_FLOW = "medfoundry.flow"
TAG_PREFECT_FLOW_RUN_ID = "medfoundry.prefect_flow_run_id"
TAG_STAGE = "medfoundry.stage"
TAG_PARENT_STAGE_RUN_ID = "medfoundry.parent_stage_run_id"
TAG_INPUTS = "medfoundry.inputs"
TAG_STAGE_KEY = "medfoundry.stage_key"
TAG_PARENT_RUN_ID = "mlflow.parentRunId"

# MLflow limits (mlflow.utils.validation): dataset digests are VARCHAR(36) in the SQL stores,
# param values 6,000 characters, 100 params/tags and 1,000 metrics per log_batch call.
_MAX_DIGEST = 36
_MAX_PARAM_VALUE = 6000
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_DATASET_PROFILE = 16_777_215
_MAX_DATASET_SCHEMA = 1_048_575

# Param names whose values are never sent to the tracking server.
_SECRET_NAME = re.compile(r"pass(word|wd)?|secret|token|credential|api_?key|access_?key|private_?key", re.I)
_REDACTED = "***"


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------


def setup_tracking(settings: Settings | None = None) -> str:
    """Point MLflow at the configured store and make the experiment active; return its id.

    Sets the tracking URI (also exported as ``MLFLOW_TRACKING_URI`` so processes started later,
    e.g. Ray workers, log to the same store), creates the experiment with
    ``artifact_location = settings.artifact_root`` if it does not exist, and turns on system
    metrics (CPU, memory, disk, network; GPU when ``nvidia-ml-py`` is installed and a GPU is
    visible) unless ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` is explicitly false. The sampling
    interval is MLflow's own ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` (seconds).

    Idempotent and race-safe: when two processes create the experiment at once, the loser finds
    the winner's experiment; a deleted experiment of the same name is restored rather than
    failing on the name clash.
    """
    if settings is None:
        from infra.settings import get_settings

        settings = get_settings()
    uri = settings.tracking_uri
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    experiment_id = _get_or_create_experiment(settings.experiment, settings.artifact_root)
    mlflow.set_experiment(experiment_id=experiment_id)
    if _env_flag("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", default=True):
        mlflow.enable_system_metrics_logging()
    else:
        mlflow.disable_system_metrics_logging()
    return experiment_id


def _get_or_create_experiment(name: str, artifact_location: str) -> str:
    """Return the id of experiment ``name``, creating (or restoring) it if needed."""
    client = MlflowClient()
    for _ in range(3):
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment.experiment_id)
            if experiment.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
                _log.warning(
                    "experiment %r keeps its artifact location %s (settings ask for %s)",
                    name,
                    experiment.artifact_location,
                    artifact_location,
                )
            return experiment.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            # Another process created it between our lookup and create: look it up again.
    raise RuntimeError(f"could not create or find MLflow experiment {name!r}")


def _env_flag(name: str, *, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


@contextmanager
def flow_run(
    flow_name: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    *,
    run_name: str | None = None,
    run_id: str | None = None,
    experiment_id: str | None = None,
    log_system_metrics: bool | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open the parent MLflow run of one Prefect flow run; yield it as the active run.

    Tags it with ``medfoundry.flow`` and, when running inside Prefect, the Prefect flow-run id
    (``medfoundry.prefect_flow_run_id``), so the two UIs can be cross-referenced. Pass ``run_id``
    to resume an earlier parent run (e.g. one found with :func:`find_run` after a crash): it is
    reopened, and only params it does not have yet are logged. The run ends FINISHED, or FAILED
    (KILLED on Ctrl-C) when the body raises; the exception propagates.
    """
    run_tags = {TAG_FLOW: flow_name, **dict(tags or {})}
    prefect_id = _prefect_flow_run_id()
    if prefect_id:
        run_tags[TAG_PREFECT_FLOW_RUN_ID] = prefect_id
    with _run(
        run_id=run_id,
        run_name=run_name or flow_name,
        experiment_id=experiment_id,
        parent_run_id=None,
        params=params,
        tags=run_tags,
        log_system_metrics=log_system_metrics,
    ) as run:
        yield run


@contextmanager
def stage_run(
    stage: str,
    parent_run_id: str | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    *,
    upstream_run_id: str | None = None,
    inputs: Sequence[str] = (),
    stage_key: str | None = None,
    run_name: str | None = None,
    run_id: str | None = None,
    log_system_metrics: bool | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open a stage's child run under ``parent_run_id``; yield it as the active run.

    Works in any process: nesting uses the ``mlflow.parentRunId`` tag and the parent's
    experiment, so a Ray rank-0 worker with no active run still logs a properly nested child.
    ``parent_run_id`` defaults to the run active in this thread (a :func:`flow_run` body).

    Lineage: ``upstream_run_id`` (the stage whose output this one consumes) becomes
    ``medfoundry.parent_stage_run_id``; ``inputs`` (``dataset@version`` strings) become the JSON
    tag ``medfoundry.inputs``; ``stage_key`` (see :func:`stage_key`) becomes
    ``medfoundry.stage_key`` so a later run can skip this stage when :func:`find_run` finds it
    FINISHED. Ends FINISHED, or FAILED/KILLED when the body raises.
    """
    if parent_run_id is None:
        active = mlflow.active_run()
        parent_run_id = active.info.run_id if active else None
    experiment_id = None
    if parent_run_id is not None:
        experiment_id = MlflowClient().get_run(parent_run_id).info.experiment_id
    run_tags: dict[str, str] = {TAG_STAGE: stage, **dict(tags or {})}
    if upstream_run_id:
        run_tags[TAG_PARENT_STAGE_RUN_ID] = upstream_run_id
    if inputs:
        run_tags[TAG_INPUTS] = json.dumps(list(inputs))
    if stage_key:
        run_tags[TAG_STAGE_KEY] = stage_key
    with _run(
        run_id=run_id,
        run_name=run_name or stage,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        params=params,
        tags=run_tags,
        log_system_metrics=log_system_metrics,
    ) as run:
        yield run


@contextmanager
def _run(
    *,
    run_id: str | None,
    run_name: str,
    experiment_id: str | None,
    parent_run_id: str | None,
    params: Mapping[str, Any] | None,
    tags: Mapping[str, str],
    log_system_metrics: bool | None,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume) a run, log its params, and end it with a status matching the outcome."""
    active = mlflow.active_run()
    if run_id is not None:
        run = mlflow.start_run(
            run_id=run_id, nested=active is not None, tags=dict(tags), log_system_metrics=log_system_metrics
        )
    else:
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name,
            nested=active is not None,
            parent_run_id=parent_run_id,
            tags=dict(tags),
            log_system_metrics=log_system_metrics,
        )
    try:
        if params:
            _log_params(run.info.run_id, params, resumed=run_id is not None)
        yield run
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


def _prefect_flow_run_id() -> str | None:
    """The current Prefect flow-run id, or None outside Prefect.

    Prefect is only imported when the process already imported it (a flow is running): importing
    it just to learn there is no flow run costs seconds. Deployed flow runs also carry the id in
    ``PREFECT__FLOW_RUN_ID``.
    """
    if "prefect" in sys.modules:
        try:
            from prefect.runtime import flow_run as prefect_flow_run

            flow_run_id = prefect_flow_run.id
        except Exception:  # prefect absent or its runtime context unavailable
            flow_run_id = None
        if flow_run_id:
            return str(flow_run_id)
    return os.environ.get("PREFECT__FLOW_RUN_ID") or None


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings to dotted keys with string values, ready for MLflow params.

    Values of names that look like secrets (password, token, api_key, ...) are replaced by
    ``***``; values longer than MLflow's 6,000-character limit are cut (log the full object with
    :func:`log_dict_artifact` instead).
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        if _SECRET_NAME.search(str(key)):
            text = _REDACTED
        elif isinstance(value, (list, tuple)):
            text = json.dumps(value, default=str)
        else:
            text = str(value)
        flat[name] = text[:_MAX_PARAM_VALUE]
    return flat


def _log_params(run_id: str, params: Mapping[str, Any], *, resumed: bool) -> None:
    """Log params in batches; on a resumed run, log only new ones and refuse changed values."""
    flat = flatten_params(params)
    client = MlflowClient()
    if resumed:
        existing = client.get_run(run_id).data.params
        changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
        if changed:
            raise ValueError(
                f"run {run_id} was started with different values for params {changed}; "
                "a resumed run must keep its params (start a new run instead)"
            )
        flat = {k: v for k, v in flat.items() if k not in existing}
    items = [Param(k, v) for k, v in flat.items()]
    for start in range(0, len(items), _MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + _MAX_PARAMS_PER_BATCH], synchronous=True)


def stage_key(stage: str, config: Mapping[str, Any], inputs: Sequence[str] = ()) -> str:
    """A stable digest of a stage's name, config and ``dataset@version`` inputs (32 hex chars).

    Two runs with the same key would do the same work, so a FINISHED run with this key (see
    :func:`find_run`) lets a flow skip the stage.
    """
    payload = json.dumps({"stage": stage, "config": config, "inputs": sorted(inputs)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def find_run_record(
    tags: Mapping[str, str],
    *,
    statuses: Iterable[str] = ("FINISHED",),
    experiment_ids: Sequence[str] | None = None,
) -> Run | None:
    """The most recent run (with its data: tags, params, metrics) carrying all ``tags`` with one of ``statuses``.

    Default: the newest FINISHED run of the active experiment, e.g.
    ``find_run_record({"medfoundry.stage_key": key})`` to skip a stage already done; FAILED, KILLED and
    RUNNING runs with the same key are ignored, deleted runs are never returned. Pass
    ``statuses=("FAILED", "KILLED")`` to find a crashed flow run to resume.
    """
    wanted = {s.upper() for s in statuses}
    if experiment_ids is None:
        from mlflow.tracking.fluent import _get_experiment_id

        experiment_ids = [_get_experiment_id()]
    clauses = [f"tags.`{key}` = {_quote(str(value))}" for key, value in tags.items()]
    if len(wanted) == 1:
        clauses.append(f"attributes.status = {_quote(next(iter(wanted)))}")
    client = MlflowClient()
    page_token = None
    while True:
        page = client.search_runs(
            experiment_ids=list(experiment_ids),
            filter_string=" AND ".join(clauses),
            order_by=["attributes.start_time DESC"],
            max_results=200,
            page_token=page_token,
        )
        for run in page:
            if run.info.status in wanted:
                return run
        page_token = page.token
        if not page_token:
            return None


def find_run(
    tags: Mapping[str, str],
    *,
    statuses: Iterable[str] = ("FINISHED",),
    experiment_ids: Sequence[str] | None = None,
) -> str | None:
    """The id of :func:`find_run_record`'s run, e.g. ``find_run({"medfoundry.stage_key": key})``."""
    run = find_run_record(tags, statuses=statuses, experiment_ids=experiment_ids)
    return None if run is None else run.info.run_id


def _quote(value: str) -> str:
    """Quote a value for an MLflow search filter."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"cannot search for a value containing both quote characters: {value!r}")


# --------------------------------------------------------------------------------------------
# Dataset inputs
# --------------------------------------------------------------------------------------------


class ZarrStoreDatasetSource(DatasetSource):
    """Source of a dataset version held in a zarr store whose URI MLflow has no source type for.

    Local paths and object-store URIs (``s3://``, ``gs://``, ...) resolve to MLflow's own
    filesystem sources; this class covers the rest (e.g. ``memory://`` in tests, custom fsspec
    protocols) so lineage is never dropped.
    """

    def __init__(self, uri: str):
        self._uri = uri

    @property
    def uri(self) -> str:
        """The zarr version URI."""
        return self._uri

    @staticmethod
    def _get_source_type() -> str:
        return "zarr"

    def load(self, **kwargs: Any) -> str:
        """Return the URI: the store is opened with MedFoundry's storage layer, not copied."""
        return self._uri

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> ZarrStoreDatasetSource:
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self._uri}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> ZarrStoreDatasetSource:
        return cls(source_dict["uri"])


_source_registered = False


def _dataset_source(uri: str) -> DatasetSource:
    """Resolve ``uri`` to MLflow's filesystem source for its scheme, else a zarr source."""
    global _source_registered
    from mlflow.data.dataset_source_registry import register_dataset_source, resolve_dataset_source
    from mlflow.data.filesystem_dataset_source import FileSystemDatasetSource

    if not _source_registered:
        register_dataset_source(ZarrStoreDatasetSource)
        _source_registered = True
    try:
        with warnings.catch_warnings():
            # MLflow registers a local source for both "" and "file" schemes, then warns that a
            # local path "can be interpreted in multiple ways" — both are the same class.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            return resolve_dataset_source(uri, candidate_sources=[FileSystemDatasetSource])
    except MlflowException:
        return ZarrStoreDatasetSource(uri)


class StoreVersionDataset(Dataset):
    """A metadata-only MLflow dataset for one committed version of a zarr-store dataset.

    MLflow's built-in datasets wrap in-memory tables or arrays; a store version is many
    N-D arrays, so only its identity is logged: name, digest (the content-addressed version),
    source (the version URI), a schema (array layout) and a profile (the dask fingerprint).
    """

    def __init__(self, source: DatasetSource, name: str, digest: str, schema: dict, profile: dict):
        self._schema = schema
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest)

    def _compute_digest(self) -> str:
        payload = json.dumps({"name": self.name, "schema": self._schema}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:_MAX_DIGEST]

    @property
    def schema(self) -> dict:
        """Array layout of the version (dtype, dims, channels, chunking...)."""
        return self._schema

    @property
    def profile(self) -> dict:
        """The version's fingerprint (shape/spacing/intensity statistics, class frequencies)."""
        return self._profile

    def to_dict(self) -> dict[str, str]:
        config = super().to_dict()
        config["schema"] = json.dumps(self._schema, sort_keys=True, default=_json_default)
        config["profile"] = json.dumps(self._profile, sort_keys=True, default=_json_default)
        return config


def log_dataset_input(
    dataset: str,
    version: str,
    source: str,
    schema: Mapping[str, Any],
    fingerprint: Mapping[str, Any],
    context: str,
) -> StoreVersionDataset:
    """Record on the active run that it read ``dataset`` at ``version`` (``mlflow.log_input``).

    The digest is the version (its first 36 characters: the SQL stores' digest column limit);
    the full version is kept as the input tag ``medfoundry.version``. ``source`` is the version's
    store URI, ``schema`` its array layout, ``fingerprint`` its statistics (the dataset profile;
    one over MLflow's 16 MB limit is logged as an artifact and referenced instead). ``context``
    says how it was used: ``training``, ``validation``, ``evaluation``...
    """
    profile: dict[str, Any] = dict(fingerprint)
    schema_dict: dict[str, Any] = dict(schema)
    if len(json.dumps(schema_dict, default=_json_default)) > _MAX_DATASET_SCHEMA:
        raise ValueError(f"schema of {dataset}@{version} exceeds MLflow's {_MAX_DATASET_SCHEMA} characters")
    if len(json.dumps(profile, default=_json_default)) > _MAX_DATASET_PROFILE:
        artifact = f"datasets/{dataset}@{version}/fingerprint.json"
        log_dict_artifact(profile, artifact)
        profile = {"truncated": True, "artifact": artifact}
    ds = StoreVersionDataset(
        source=_dataset_source(source),
        name=dataset,
        digest=version[:_MAX_DIGEST],
        schema=schema_dict,
        profile=profile,
    )
    mlflow.log_input(ds, context=context, tags={"medfoundry.version": version})
    return ds


def _json_default(value: Any) -> Any:
    """JSON encoder fallback for numpy scalars/arrays and other objects."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


# --------------------------------------------------------------------------------------------
# Metrics and artifacts
# --------------------------------------------------------------------------------------------


def log_metrics_series(
    history: Sequence[Mapping[str, Any]],
    step_key: str = "step",
    *,
    prefix: str = "",
    run_id: str | None = None,
) -> int:
    """Log a training history (one dict per step) as metric series; return the number logged.

    Each entry's ``step_key`` value is the step (its index if absent); every other numeric value
    becomes a metric point (``prefix`` + key). A ``timestamp`` key (epoch seconds) is used as the
    point's time. Non-numeric values and booleans are skipped. Points go in batches of 1,000, so
    a long history is a handful of round trips rather than one per value.
    """
    run_id = run_id or _active_run_id()
    now_ms = int(time.time() * 1000)
    points: list[Metric] = []
    for index, entry in enumerate(history):
        step = int(entry.get(step_key, index))
        ts = entry.get("timestamp")
        timestamp = int(float(ts) * 1000) if isinstance(ts, (int, float)) else now_ms
        for key, value in entry.items():
            if key in (step_key, "timestamp") or isinstance(value, bool):
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            points.append(Metric(f"{prefix}{key}", number, timestamp, step))
    client = MlflowClient()
    for start in range(0, len(points), _MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=points[start : start + _MAX_METRICS_PER_BATCH], synchronous=True)
    return len(points)


def log_figure_png(
    fig_or_callable: Figure | Callable[[Axes], Any],
    artifact_path: str,
    *,
    run_id: str | None = None,
    figsize: tuple[float, float] = (6.4, 4.0),
    dpi: int = 100,
) -> str:
    """Log a matplotlib figure as a PNG artifact; return the artifact path.

    Accepts a ``Figure`` or a callable that draws on a fresh ``Axes``. Figures are built with the
    object-oriented API (``matplotlib.figure.Figure``, Agg canvas), never pyplot, so no GUI
    backend or global pyplot state is touched in headless workers.
    """
    from matplotlib.figure import Figure

    if not artifact_path.lower().endswith(".png"):
        artifact_path = f"{artifact_path}.png"
    if isinstance(fig_or_callable, Figure):
        fig = fig_or_callable
    else:
        fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
        fig_or_callable(fig.add_subplot())
    MlflowClient().log_figure(run_id or _active_run_id(), fig, artifact_path)
    return artifact_path


def log_loss_curve(
    history: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    artifact_path: str = "plots/loss_curve.png",
    *,
    step_key: str = "step",
    log_scale: bool = False,
    run_id: str | None = None,
) -> str:
    """Plot ``keys`` of a training history against its step and log the PNG; return its path."""
    missing = [k for k in keys if not any(k in entry for entry in history)]
    if missing:
        raise KeyError(f"no history entry has {missing}; keys present: {sorted({k for e in history for k in e})}")

    def draw(ax: Axes) -> None:
        for key in keys:
            xs, ys = [], []
            for index, entry in enumerate(history):
                value = entry.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    xs.append(entry.get(step_key, index))
                    ys.append(value)
            ax.plot(xs, ys, label=key)
        ax.set_xlabel(step_key)
        ax.set_ylabel("value")
        if log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()

    return log_figure_png(draw, artifact_path, run_id=run_id)


def log_dict_artifact(data: Mapping[str, Any] | Sequence[Any], artifact_file: str, *, run_id: str | None = None) -> str:
    """Log a JSON-serialisable object (numpy values allowed) as a JSON artifact; return its path."""
    if not artifact_file.lower().endswith((".json", ".yaml", ".yml")):
        artifact_file = f"{artifact_file}.json"
    plain = json.loads(json.dumps(data, default=_json_default))
    MlflowClient().log_dict(run_id or _active_run_id(), plain, artifact_file)
    return artifact_file


def _active_run_id() -> str:
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no active MLflow run: call inside flow_run()/stage_run() or pass run_id")
    return run.info.run_id
