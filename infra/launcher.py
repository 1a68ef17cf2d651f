"""Run a recipe on Ray Train workers: settings -> ScalingConfig / TorchConfig / RunConfig -> TorchTrainer.

A recipe is a plain function ``recipe(config: dict) -> Any`` that every worker runs (see
tasks/recipes/). :func:`launch` runs it with ``ray.train.torch.TorchTrainer`` (Ray Train V2,
the default controller since Ray 2.43; ``RAY_TRAIN_V2_ENABLED=0`` is not supported here)
and returns a :class:`LaunchResult` instead of raising, so a flow can record the failure.

Where things go
    Each run lives at ``<settings.ray_storage>/<name>/`` (a directory or an fsspec/pyarrow
    URI such as ``s3://bucket/ray``): Ray's run snapshot ``checkpoint_manager_snapshot.json``
    and one ``checkpoint_<timestamp>/`` directory per reported checkpoint, each in the
    format of infra/checkpoint.py (``model.pt`` + ``meta.json``). ``name`` identifies a
    training job: reusing it means "continue that job".

Checkpoints and retention
    Recipes report through :func:`infra.runtime.report` (all ranks call it; rank 0 attaches
    the checkpoint). ``CheckpointConfig(num_to_keep=keep_checkpoints)`` keeps the newest
    ``keep_checkpoints`` checkpoints and deletes older ones after the snapshot is updated.

Failure restarts (within one ``launch``)
    ``FailureConfig(max_failures)``: when any worker raises or dies, Ray Train V2 stops all
    workers, starts a new group and runs the recipe again from the top on every rank;
    ``ray.train.get_checkpoint()`` then returns the latest reported checkpoint, which
    :func:`infra.checkpoint.latest_checkpoint` loads. Work since that checkpoint is redone.
    After ``max_failures`` restarts the run fails and ``LaunchResult.error`` is set.

Resume across launches (a killed flow, a lost head node, a re-run stage)
    Verified in Ray 2.60 source (``ray/train/v2/_internal/execution/checkpoint/
    checkpoint_manager.py``: ``_maybe_load_state_from_storage``) and documented as "job driver
    fault tolerance" (docs.ray.io train/user-guides/fault-tolerance.html): a new TorchTrainer
    with the *same* ``RunConfig(storage_path, name)`` loads the run snapshot and hands its
    latest checkpoint to the workers through ``ray.train.get_checkpoint()``. There is no
    ``Trainer.restore`` in V2. So re-running ``launch`` with the same ``name`` resumes; the
    failure budget starts afresh, and driver interruptions do not count toward it.
    Two cases Ray refuses (``CheckpointManagerInitializationError``): a snapshot written by
    another Ray version, or one naming a checkpoint directory that was deleted. ``launch``
    detects both beforehand, moves the snapshot aside (``*.stale-<time>``) and passes the
    newest complete checkpoint found under the run directory as ``config["resume_from"]``,
    which ``latest_checkpoint`` uses when Ray has no checkpoint. ``resume_from`` set by the
    caller (a checkpoint of another run) is honoured the same way when Ray has none.

Workers and environment
    :func:`ensure_ray` starts (or connects to) Ray once per process and sets the job's
    ``runtime_env``: thread limits, ``MEDFOUNDRY_*`` settings, and ``PYTHONPATH`` with the
    project root so workers import ``tasks``, ``models`` and ``infra`` (installed editable
    here, so this only matters for non-installed checkouts). On a remote cluster
    (``RAY_ADDRESS``) the project must reach the workers another way: the worker image has
    it installed, or pass ``runtime_env={"working_dir": <project root>, "excludes": [".venv",
    ".medfoundry"]}`` to :func:`ensure_ray`, and use a ``storage`` URI every node can reach.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.checkpoint import find_latest_checkpoint
from infra.settings import Settings, configure_engines

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")


@dataclass(frozen=True)
class LaunchResult:
    """What a launch left behind.

    ``metrics``: metrics of the latest checkpointed report (Ray V2 keeps metrics with
    checkpoints; ``infra.runtime.report`` adds ``step`` and ``epoch``), empty if none.
    ``checkpoint``: the latest checkpoint directory, a local path or a URI, or None.
    ``error``: the ``TrainingFailedError`` (or startup error) if the run failed, else None.
    ``return_value``: what rank 0's recipe returned, when it finished.
    """

    name: str
    path: str
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    error: BaseException | None = None
    return_value: Any = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def raise_for_error(self) -> LaunchResult:
        """Raise the run's error, if any; return self so calls chain."""
        if self.error is not None:
            raise self.error
        return self


def _local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def storage_root(settings: Settings) -> str:
    """Ray Train's ``storage_path``: an absolute local path, or the URI unchanged."""
    storage = settings.ray_storage
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def run_dir(settings: Settings, name: str) -> str:
    """Where run ``name`` keeps its snapshot and checkpoints (local path or URI)."""
    return f"{storage_root(settings).rstrip('/')}/{name}"


def worker_env(settings: Settings) -> dict[str, str]:
    """Environment variables every Ray worker gets (thread limits, settings, import path).

    With more than one torch thread per worker, OpenMP threads wait passively at barriers
    (``OMP_WAIT_POLICY=PASSIVE``; an ``OMP_WAIT_POLICY`` in the driver's environment wins).
    torch's libgomp otherwise spins for milliseconds at every barrier, and when a team's other
    thread is descheduled (Ray's processes, the driver, other jobs on the node) the spinning
    burns the time slice: on the 2-core machine, 1 worker x 2 threads ran 5-60x slower
    under other load, and passive waiting kept it steady (benchmarks/train_overhead.py).
    OpenMP reads this only at process start, hence here and not in ``set_threads``.
    """
    threads = str(settings.threads_per_worker)
    env = {key: value for key, value in os.environ.items() if key.startswith("MEDFOUNDRY_")}
    env.update(
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p),
    )
    if settings.threads_per_worker > 1:
        env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    return env


def ensure_ray(settings: Settings, *, num_cpus: int | None = None, runtime_env: Mapping[str, Any] | None = None) -> bool:
    """Start or connect to Ray once per process; return True if this call initialised it.

    Local Ray (no ``ray_cluster_address``) gets ``num_cpus`` logical CPUs (default: the
    cores this process may use, at least ``num_workers * cpus_per_worker`` so a fit can
    always be scheduled) and workers at ``ray_worker_niceness`` (default 0: Ray's default of
    15 gives training workers 1/28 of the CPU share of any ordinary process, so on a shared
    machine a launched run fell to 0.64-0.79x of the same loop run bare,
    benchmarks/train_overhead.py); a cluster keeps its own configuration. ``runtime_env`` adds to the job's runtime env (e.g.
    ``working_dir`` on a cluster); its ``env_vars`` override :func:`worker_env`. Later calls
    reuse the running session: Ray cannot change a job's runtime env after ``ray.init``.
    """
    configure_engines(settings)
    import ray

    if ray.is_initialized():
        return False
    address = settings.ray_cluster_address or None
    env = dict(runtime_env or {})
    env["env_vars"] = {**worker_env(settings), **dict(env.get("env_vars") or {})}
    kwargs: dict[str, Any] = {
        "address": address,
        "include_dashboard": False,
        "log_to_driver": True,
        "runtime_env": env,
    }
    if address is None:
        kwargs["num_cpus"] = num_cpus or max(_local_cpus(), settings.num_workers * settings.cpus_per_worker)
        kwargs["_system_config"] = {"worker_niceness": settings.ray_worker_niceness}
    started = time.perf_counter()
    ray.init(**kwargs)
    logger.info("Ray ready in %.1f s (%s)", time.perf_counter() - started, address or "local")
    return True


def _read_text(uri_or_path: str) -> str | None:
    if "://" not in uri_or_path:
        path = Path(uri_or_path)
        return path.read_text() if path.is_file() else None
    import pyarrow.fs

    fs, fs_path = pyarrow.fs.FileSystem.from_uri(uri_or_path)
    if fs.get_file_info(fs_path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(fs_path) as stream:
        return stream.read().decode()


def _exists(uri_or_path: str) -> bool:
    if "://" not in uri_or_path:
        return Path(uri_or_path).exists()
    import pyarrow.fs

    fs, fs_path = pyarrow.fs.FileSystem.from_uri(uri_or_path)
    return fs.get_file_info(fs_path).type != pyarrow.fs.FileType.NotFound


def _move(src: str, dst: str) -> None:
    if "://" not in src:
        os.replace(src, dst)
        return
    import pyarrow.fs

    fs, src_path = pyarrow.fs.FileSystem.from_uri(src)
    fs.move(src_path, pyarrow.fs.FileSystem.from_uri(dst)[1])


def snapshot_problem(directory: str) -> str | None:
    """Why Ray would refuse the run snapshot under ``directory``, or None if it is usable or absent."""
    import ray

    text = _read_text(f"{directory}/{RAY_SNAPSHOT_FILE}")
    if text is None:
        return None
    try:
        snapshot = json.loads(text)
    except ValueError as exc:
        return f"unreadable snapshot ({exc})"
    version = snapshot.get("ray_version")
    if version != ray.__version__:
        return f"snapshot written by Ray {version}, running Ray {ray.__version__}"
    for result in snapshot.get("checkpoint_results") or []:
        name = result.get("checkpoint_dir_name")
        if name and not _exists(f"{directory}/{name}"):
            return f"snapshot names checkpoint {name!r}, which no longer exists"
    return None


def prepare_resume(settings: Settings, name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` ready for a (re)launch of run ``name``: unchanged unless Ray cannot resume it.

    When the run's snapshot is one Ray would refuse (:func:`snapshot_problem`), move it aside
    and, unless the caller set ``resume_from``, point ``resume_from`` at the newest complete
    checkpoint in the run directory, so the run continues instead of failing to start.
    """
    config = dict(config)
    directory = run_dir(settings, name)
    problem = snapshot_problem(directory)
    if problem is None:
        return config
    snapshot = f"{directory}/{RAY_SNAPSHOT_FILE}"
    stale = f"{snapshot}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
    _move(snapshot, stale)
    if not config.get("resume_from"):
        config["resume_from"] = find_latest_checkpoint(directory)
    logger.warning("run %s: %s; moved it to %s, resuming from %s", name, problem, stale, config["resume_from"])
    return config


def _checkpoint_location(checkpoint: Any) -> str | None:
    """A Ray ``Checkpoint`` as a local path or a URI (Ray strips the scheme from ``.path``)."""
    if checkpoint is None:
        return None
    import pyarrow.fs

    if checkpoint.filesystem is None or isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    return f"{checkpoint.filesystem.type_name}://{checkpoint.path}"


def _result_after_failure(directory: str) -> tuple[dict[str, Any], str | None]:
    """Latest checkpoint and its metrics of a failed run, read back from storage."""
    from ray.train import Result

    try:
        result = Result.from_path(directory)
    except Exception as exc:  # no snapshot yet, or unreadable: the run failed before any checkpoint
        logger.debug("no result under %s: %s", directory, exc)
        return {}, None
    return dict(result.metrics or {}), _checkpoint_location(result.checkpoint)


def launch(
    recipe: Callable[[dict[str, Any]], Any],
    config: Mapping[str, Any],
    *,
    name: str,
    settings: Settings,
    num_workers: int | None = None,
    max_failures: int = 2,
    keep_checkpoints: int = 2,
) -> LaunchResult:
    """Run ``recipe(config)`` on ``num_workers`` Ray Train workers (default ``settings.num_workers``).

    ``name`` is the run's identity (letters, digits, ``._=-``): relaunching with the same
    name and storage resumes from its latest checkpoint (see the module docstring).
    ``config`` must be picklable; it reaches every worker unchanged apart from a possible
    ``resume_from``. Never raises for a training failure: check ``LaunchResult.error``.
    """
    if not _NAME_RE.match(name):
        raise ValueError(f"run name {name!r} must be one path segment of letters, digits and . _ = -")
    if keep_checkpoints < 1:
        raise ValueError("keep_checkpoints must be at least 1, or resume has nothing to resume from")
    ensure_ray(settings)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    directory = run_dir(settings, name)
    try:
        train_config = prepare_resume(settings, name, config)
    except OSError as exc:
        return LaunchResult(name=name, path=directory, error=exc)
    trainer = TorchTrainer(
        train_loop_per_worker=recipe,
        train_loop_config=train_config,
        scaling_config=ScalingConfig(
            num_workers=settings.num_workers if num_workers is None else num_workers,
            use_gpu=settings.use_gpu,
            resources_per_worker={"CPU": settings.cpus_per_worker},  # use_gpu adds GPU: 1
        ),
        torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=storage_root(settings),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError, or a controller/startup error
        metrics, checkpoint = _result_after_failure(directory)
        logger.warning("run %s failed after %.1f s: %s", name, time.perf_counter() - started, exc)
        return LaunchResult(name=name, path=directory, metrics=metrics, checkpoint=checkpoint, error=exc)
    logger.info("run %s finished in %.1f s", name, time.perf_counter() - started)
    return LaunchResult(
        name=name,
        path=directory,
        metrics=dict(result.metrics or {}),
        checkpoint=_checkpoint_location(result.checkpoint),
        error=result.error,
        return_value=result.return_value,
    )


__all__ = ["LaunchResult", "ensure_ray", "launch", "prepare_resume", "run_dir", "snapshot_problem", "storage_root", "worker_env"]
