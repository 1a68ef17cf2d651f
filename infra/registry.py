"""MLflow model registry for MedFoundry: register, gate-keep promotion, list, show and load.

Every registered version gets the alias ``candidate``. The alias ``champion`` moves to a version
only when its key metric beats the current champion's on the *same* held-out split
(:func:`promote_if_better`); the first version of a model becomes champion by default. Both
numbers and the decision are written on the candidate version as tags, so the registry itself
says why each version was or was not promoted.

Version tags written here:

* ``metric.<name>`` — every evaluation metric (``repr`` of the float, exact round trip);
* ``key_metric``, ``higher_is_better``, ``eval_split`` — what the promotion gate compares;
* ``promotion.decision`` (``promoted``, ``kept_champion``, ``refused``, ``forced``,
  ``already_champion``), ``promotion.reason``, ``promotion.candidate_value``,
  ``promotion.champion_value``, ``promotion.champion_version_before``.

Models are saved in PyTorch's ``pt2`` format (``torch.export``): a traced graph plus weights,
loadable without the model's Python source and without unpickling (MLflow 3.17 checks the
archive is pickle-free before loading it and refuses pickled models unless
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true``).
"""

from __future__ import annotations

import copy
import datetime as dt
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

if TYPE_CHECKING:  # torch is imported where a model is handled: `medfoundry models list` needs none
    import torch

CANDIDATE = "candidate"
CHAMPION = "champion"

TAG_KEY_METRIC = "key_metric"
TAG_HIGHER_IS_BETTER = "higher_is_better"
TAG_EVAL_SPLIT = "eval_split"
METRIC_TAG_PREFIX = "metric."
TAG_DECISION = "promotion.decision"
TAG_REASON = "promotion.reason"
TAG_CANDIDATE_VALUE = "promotion.candidate_value"
TAG_CHAMPION_VALUE = "promotion.champion_value"
TAG_CHAMPION_BEFORE = "promotion.champion_version_before"

SerializationFormat = Literal["pt2", "pickle"]


@dataclass(frozen=True)
class ModelVersionInfo:
    """What :func:`register_model` created."""

    name: str
    version: str
    model_uri: str
    """``models:/NAME/VERSION`` — stable reference to this version."""
    logged_model_uri: str
    """``models:/m-...`` — MLflow 3's logged-model id the version was registered from."""
    run_id: str
    key_metric: str
    key_metric_value: float
    eval_split: str
    metrics: dict[str, float] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class PromotionDecision:
    """Outcome of a promotion attempt; also written on the candidate version's tags."""

    promoted: bool
    candidate_value: float | None
    champion_value: float | None
    champion_version_before: str | None
    reason: str
    decision: str = ""

    def as_dict(self) -> dict[str, Any]:
        """Plain dict, e.g. for the CLI's JSON output."""
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def register_model(
    model: torch.nn.Module,
    name: str,
    *,
    input_example: np.ndarray,
    metrics: Mapping[str, float],
    key_metric: str,
    eval_split: str,
    run_id: str | None = None,
    higher_is_better: bool = True,
    extra_tags: Mapping[str, str] | None = None,
    pip_requirements: list[str] | None = None,
    serialization_format: SerializationFormat = "pt2",
) -> ModelVersionInfo:
    """Log ``model`` to MLflow, register it as a new version of ``name`` and alias it ``candidate``.

    The model is exported in eval mode on CPU (a CUDA model is copied to CPU first; the caller's
    module keeps its device and train/eval mode). The signature is inferred from
    ``input_example`` and one forward pass. A batch dimension of 1 is exported as a fixed size by
    ``torch.export``, so a one-row example is repeated to two rows to keep the batch dynamic; the
    other dimensions are fixed to the example's shape in the exported graph, so keep the example
    small (it is also stored as JSON beside the model).

    ``run_id`` selects the run the model is logged under: the active run by default, else that
    run (reopened if finished), else a new run. ``metrics`` must contain ``key_metric``; all are
    written as ``metric.<name>`` version tags (and as metrics of the logged model).

    ``serialization_format="pickle"`` is the escape hatch for models ``torch.export`` cannot
    trace (data-dependent control flow); loading those needs the model's code importable and
    ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true``.
    """
    if key_metric not in metrics:
        raise KeyError(f"key metric {key_metric!r} is not among the metrics {sorted(metrics)}")
    values = {k: float(v) for k, v in metrics.items()}
    if not math.isfinite(values[key_metric]):
        raise ValueError(f"key metric {key_metric!r} is {values[key_metric]}; refusing to register")
    example = np.ascontiguousarray(input_example)
    if example.ndim >= 1 and example.shape[0] == 1:
        example = np.concatenate([example, example], axis=0)

    export_model = _cpu_eval_copy(model)
    was_training = export_model.training
    export_model.eval()
    try:
        import torch

        with torch.no_grad():
            output = export_model(torch.from_numpy(example))
        from mlflow.models import infer_signature

        signature = infer_signature(example, _to_numpy(output))
        with _logging_run(run_id) as active_run_id:
            info = mlflow.pytorch.log_model(
                export_model,
                name="model",
                input_example=example,
                signature=signature,
                pip_requirements=pip_requirements or default_pip_requirements(),
                serialization_format=serialization_format,
            )
            mlflow.log_metrics(values, model_id=info.model_id)
    finally:
        export_model.train(was_training)

    return register_logged_model(
        info.model_uri,
        name,
        metrics=values,
        key_metric=key_metric,
        eval_split=eval_split,
        higher_is_better=higher_is_better,
        extra_tags=extra_tags,
        run_id=active_run_id,
    )


def register_logged_model(
    model_uri: str,
    name: str,
    *,
    metrics: Mapping[str, float],
    key_metric: str,
    eval_split: str,
    higher_is_better: bool = True,
    extra_tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
) -> ModelVersionInfo:
    """Register an already logged model (``models:/m-...`` or ``runs:/...``) as a new version.

    The registry half of :func:`register_model`, for re-registering a logged model (e.g. under
    another name, or after evaluating it on a new split) without logging it again: writes the
    metric/gate tags (at creation, in one call) and moves ``candidate`` to the new version.
    ``run_id`` is only a fallback for the returned info when the URI carries no run.
    """
    if key_metric not in metrics:
        raise KeyError(f"key metric {key_metric!r} is not among the metrics {sorted(metrics)}")
    values = {k: float(v) for k, v in metrics.items()}
    tags = {f"{METRIC_TAG_PREFIX}{k}": repr(v) for k, v in values.items()}
    tags.update({
        TAG_KEY_METRIC: key_metric,
        TAG_HIGHER_IS_BETTER: str(bool(higher_is_better)).lower(),
        TAG_EVAL_SPLIT: eval_split,
    })
    tags.update({str(k): str(v) for k, v in (extra_tags or {}).items()})
    client = MlflowClient()
    version = mlflow.register_model(model_uri, name, tags=tags)
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return ModelVersionInfo(
        name=name,
        version=str(version.version),
        model_uri=f"models:/{name}/{version.version}",
        logged_model_uri=model_uri,
        run_id=version.run_id or run_id or "",
        key_metric=key_metric,
        key_metric_value=values[key_metric],
        eval_split=eval_split,
        metrics=values,
        aliases=tuple(_aliases_of(client, name).get(str(version.version), ())),
    )


def default_pip_requirements() -> list[str]:
    """Pinned requirements of a pt2 model: torch (public version, without ``+cpu``) and numpy.

    Given explicitly so ``log_model`` skips its requirement inference, which loads the model in
    a subprocess and costs seconds.
    """
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]


def _cpu_eval_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself when already on CPU, else a CPU copy (pt2 weights cannot move device)."""
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device.type == "cpu" for t in tensors):
        return model
    return copy.deepcopy(model).cpu()


def _to_numpy(output: Any) -> Any:
    """Model output as numpy for signature inference (tensor, tuple/list or dict of tensors)."""
    import torch

    if isinstance(output, torch.Tensor):
        tensor = output.detach().cpu()
        return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    if isinstance(output, Mapping):
        return {k: _to_numpy(v) for k, v in output.items()}
    if isinstance(output, (list, tuple)):
        if len(output) == 1:
            return _to_numpy(output[0])
        return {str(i): _to_numpy(v) for i, v in enumerate(output)}
    return np.asarray(output)


@contextmanager
def _logging_run(run_id: str | None) -> Iterator[str]:
    """Yield the run id to log the model under: the active run, else ``run_id`` reopened, else a new run."""
    active = mlflow.active_run()
    if active is not None and run_id in (None, active.info.run_id):
        yield active.info.run_id
        return
    if run_id is not None:
        run = mlflow.start_run(run_id=run_id, nested=active is not None)
    else:
        run = mlflow.start_run(run_name="register-model")
    try:
        yield run.info.run_id
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


# --------------------------------------------------------------------------------------------
# Promotion
# --------------------------------------------------------------------------------------------


def promote_if_better(
    name: str,
    version: str | int,
    key_metric: str | None = None,
    higher_is_better: bool | None = None,
    eval_split: str | None = None,
    *,
    min_delta: float = 0.0,
) -> PromotionDecision:
    """Move ``champion`` to ``version`` only if it beats the current champion on the same split.

    ``key_metric``, ``higher_is_better`` and ``eval_split`` default to what the version recorded
    at registration; when given they must agree with it. The candidate must beat the champion by
    more than ``min_delta`` (ties keep the champion). With no champion yet, the version becomes
    champion. A champion evaluated on another split, or without the key metric, is not compared:
    the promotion is refused with a reason (use ``promote(..., force=True)`` to override).
    Both values and the decision are written as ``promotion.*`` tags on the candidate version.
    """
    client = MlflowClient()
    version = str(version)
    candidate = client.get_model_version(name, version)
    ctags = candidate.tags
    key_metric = key_metric or ctags.get(TAG_KEY_METRIC)
    if not key_metric:
        raise ValueError(f"{name} v{version} records no key metric; pass key_metric")
    if higher_is_better is None:
        higher_is_better = ctags.get(TAG_HIGHER_IS_BETTER, "true") == "true"
    eval_split = eval_split or ctags.get(TAG_EVAL_SPLIT)
    cand_value = _metric_tag(ctags, key_metric)
    champion = _version_by_alias(client, name, CHAMPION)
    champ_version = str(champion.version) if champion else None
    champ_value = _metric_tag(champion.tags, key_metric) if champion else None

    def decide(promoted: bool, decision: str, reason: str) -> PromotionDecision:
        result = PromotionDecision(promoted, cand_value, champ_value, champ_version, reason, decision)
        _record(client, name, version, result)
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, version)
        return result

    recorded_split = ctags.get(TAG_EVAL_SPLIT)
    if recorded_split and eval_split and recorded_split != eval_split:
        return decide(False, "refused", f"candidate was evaluated on {recorded_split!r}, not {eval_split!r}")
    if cand_value is None or not math.isfinite(cand_value):
        return decide(False, "refused", f"candidate has no finite {key_metric!r} recorded")
    if champion is None:
        return decide(True, "promoted", "no champion yet: the first candidate becomes champion")
    if champ_version == version:
        return decide(False, "already_champion", f"v{version} is already the champion")
    champ_split = champion.tags.get(TAG_EVAL_SPLIT)
    if champ_split != eval_split:
        return decide(
            False,
            "refused",
            f"eval splits differ: candidate on {eval_split!r}, champion v{champ_version} on {champ_split!r}; "
            "re-evaluate both on the same held-out split or promote with force=True",
        )
    if champ_value is None or not math.isfinite(champ_value):
        reason = f"champion v{champ_version} has no {key_metric!r} recorded; promote with force=True"
        return decide(False, "refused", reason)
    margin = (cand_value - champ_value) if higher_is_better else (champ_value - cand_value)
    direction = "higher" if higher_is_better else "lower"
    if margin > min_delta:
        return decide(
            True,
            "promoted",
            f"{key_metric} {cand_value:.6g} beats champion v{champ_version} {champ_value:.6g} "
            f"({direction} is better) on {eval_split!r}",
        )
    return decide(
        False,
        "kept_champion",
        f"{key_metric} {cand_value:.6g} does not beat champion v{champ_version} {champ_value:.6g} "
        f"({direction} is better, min_delta {min_delta:g}) on {eval_split!r}",
    )


def promote(name: str, version: str | int, force: bool = False) -> PromotionDecision:
    """Manual promotion: run the gate with the version's recorded metric and split.

    ``force=True`` bypasses the gate and moves ``champion`` regardless; the decision ``forced``
    and both values are still recorded on the version, so the override is visible.
    """
    if not force:
        return promote_if_better(name, version)
    client = MlflowClient()
    version = str(version)
    candidate = client.get_model_version(name, version)
    key_metric = candidate.tags.get(TAG_KEY_METRIC, "")
    champion = _version_by_alias(client, name, CHAMPION)
    result = PromotionDecision(
        promoted=True,
        candidate_value=_metric_tag(candidate.tags, key_metric),
        champion_value=_metric_tag(champion.tags, key_metric) if champion else None,
        champion_version_before=str(champion.version) if champion else None,
        reason="forced by operator: promotion gate bypassed",
        decision="forced",
    )
    _record(client, name, version, result)
    client.set_registered_model_alias(name, CHAMPION, version)
    return result


def _record(client: MlflowClient, name: str, version: str, result: PromotionDecision) -> None:
    tags = {
        TAG_DECISION: result.decision,
        TAG_REASON: result.reason,
        TAG_CANDIDATE_VALUE: _fmt(result.candidate_value),
        TAG_CHAMPION_VALUE: _fmt(result.champion_value),
        TAG_CHAMPION_BEFORE: result.champion_version_before or "none",
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def _fmt(value: float | None) -> str:
    return "none" if value is None else repr(value)


def _metric_tag(tags: Mapping[str, str], metric: str) -> float | None:
    raw = tags.get(f"{METRIC_TAG_PREFIX}{metric}")
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def _version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


# --------------------------------------------------------------------------------------------
# Inspection and loading
# --------------------------------------------------------------------------------------------


def list_versions(name: str | None = None) -> list[dict[str, Any]]:
    """One row per registered version (of ``name``, or of every model), sorted by name, version.

    Row keys: ``name``, ``version``, ``aliases`` (list), ``key_metric``, ``key_metric_value``,
    ``eval_split``, ``run_id``, ``created`` (ISO-8601 UTC), ``decision`` (last promotion decision).
    Aliases come from the registered models, since MLflow's version search does not fill them.
    """
    client = MlflowClient()
    names = [name] if name else [m.name for m in _all_registered_models(client)]
    rows: list[dict[str, Any]] = []
    for model_name in names:
        aliases = _aliases_of(client, model_name)
        for mv in _all_versions(client, model_name):
            rows.append(_row(mv, aliases.get(str(mv.version), [])))
    rows.sort(key=lambda r: (r["name"], int(r["version"])))
    return rows


def show(name: str, version_or_alias: str | int) -> dict[str, Any]:
    """Everything the registry knows about one version, addressed by number or alias.

    Adds ``source``, ``status``, ``description``, ``model_uri``, ``metrics`` (from the
    ``metric.*`` tags) and all ``tags`` to the :func:`list_versions` row.
    """
    client = MlflowClient()
    ref = str(version_or_alias)
    mv = client.get_model_version(name, ref) if ref.isdigit() else client.get_model_version_by_alias(name, ref)
    row = _row(mv, _aliases_of(client, name).get(str(mv.version), []))
    row.update(
        model_uri=f"models:/{name}/{mv.version}",
        source=mv.source,
        status=mv.status,
        description=mv.description or "",
        metrics={
            key.removeprefix(METRIC_TAG_PREFIX): _metric_tag(mv.tags, key.removeprefix(METRIC_TAG_PREFIX))
            for key in mv.tags
            if key.startswith(METRIC_TAG_PREFIX)
        },
        tags=dict(mv.tags),
    )
    return row


def load_model(uri: str) -> torch.nn.Module:
    """Load a registered model (``models:/NAME@champion``, ``models:/NAME/3``...) on CPU.

    The returned module computes in eval mode. A pt2 model is a ``torch.export`` graph traced in
    eval mode, whose ``.eval()`` raises ("not supported yet" in torch 2.13); its ``training``
    flags are cleared instead, so ``module.training`` reports the truth.
    """
    module = mlflow.pytorch.load_model(uri, device="cpu", map_location="cpu")
    try:
        module.eval()
    except (NotImplementedError, RuntimeError):
        for submodule in module.modules():
            submodule.training = False
    return module


def _row(mv: ModelVersion, aliases: list[str]) -> dict[str, Any]:
    key = mv.tags.get(TAG_KEY_METRIC)
    return {
        "name": mv.name,
        "version": str(mv.version),
        "aliases": sorted(aliases),
        "key_metric": key,
        "key_metric_value": _metric_tag(mv.tags, key) if key else None,
        "eval_split": mv.tags.get(TAG_EVAL_SPLIT),
        "run_id": mv.run_id,
        "created": dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=dt.UTC).isoformat(timespec="seconds"),
        "decision": mv.tags.get(TAG_DECISION),
    }


def _aliases_of(client: MlflowClient, name: str) -> dict[str, list[str]]:
    """version -> aliases, read from the registered model (version search leaves aliases empty)."""
    by_version: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    return by_version


def _all_registered_models(client: MlflowClient) -> list[Any]:
    models, token = [], None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        models.extend(page)
        token = page.token
        if not token:
            return models


def _all_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    escaped = name.replace("'", "\\'")
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{escaped}'", max_results=10_000, page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return versions
