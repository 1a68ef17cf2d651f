"""MedFoundry's checkpoint format: one directory, readable without Ray and without trusting pickles.

Layout of a checkpoint directory::

    model.pt    torch.save of {"schema_version": 1, "method": str, "step": int, "epoch": int,
                               "state": {name: state_dict or tensor, ...},
                               "config": JSON-safe resolved config, "metrics": JSON-safe dict}
    meta.json   {"schema_version", "method", "step", "epoch", "config_digest", "created_at"}

Why this shape:

- ``model.pt`` holds only tensors and plain Python containers/scalars, so it loads with
  ``torch.load(weights_only=True)``: loading a checkpoint can never execute code, which
  matters once checkpoints come back from shared object stores and the model registry.
- ``state`` keys are canonical (no ``module.`` / ``_orig_mod.`` wrapper prefixes), so a
  checkpoint written under DDP on 8 GPUs loads into a plain module on a laptop.
- ``meta.json`` is written last; a directory without it is an interrupted write and is
  never picked as "the latest checkpoint". It is small, so scanning a run for the newest
  checkpoint never downloads weights.
- Both files are written to a temporary name and moved into place with ``os.replace``.

Ray Train moves these directories to ``RunConfig.storage_path`` and hands them back on
restarts; :func:`latest_checkpoint` is what recipes call to resume (see infra/launcher.py).
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import os
import pickle
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

SCHEMA_VERSION = 1
MODEL_FILE = "model.pt"
META_FILE = "meta.json"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_REQUIRED_KEYS = ("schema_version", "method", "step", "epoch", "state", "config", "metrics")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, of another schema version, or unsafe to load."""


def unwrap_module(module: nn.Module) -> nn.Module:
    """The user's module inside DDP/FSDP-style (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module


def canonical_state_dict(obj: nn.Module | Mapping[str, Any]) -> dict[str, Any]:
    """A state dict whose keys carry no ``module.`` / ``_orig_mod.`` wrapper prefixes.

    A module is unwrapped first (exact, whatever its submodules are called); a mapping (a
    state dict saved elsewhere) loses a wrapper prefix only when *every* key has it, the
    rule ``torch.nn.modules.utils.consume_prefix_in_state_dict_if_present`` uses, so a
    model with a real top-level submodule named ``module`` keeps its keys.
    """
    state = unwrap_module(obj).state_dict() if isinstance(obj, nn.Module) else dict(obj)
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(isinstance(k, str) and k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def json_safe(value: Any, where: str = "value") -> Any:
    """``value`` as plain JSON types (dict with str keys, list, str, int, float, bool, None).

    Converts what configs and metrics usually carry (tuples, paths, enums, numpy and torch
    scalars/small arrays). Anything else raises ``TypeError`` naming the offending entry:
    an object in the config would make the checkpoint unloadable under ``weights_only``.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, enum.Enum):
        return json_safe(value.value, where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a non-string key {key!r}; configs and metrics need string keys")
            out[key] = json_safe(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, list | tuple):
        return [json_safe(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, torch.Tensor):
        return json_safe(value.detach().cpu().tolist(), where)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic | numpy.ndarray):
        return json_safe(value.tolist(), where)
    raise TypeError(
        f"{where} is a {type(value).__qualname__}, which is not JSON-safe; store plain values "
        "(str, int, float, bool, None, lists, dicts) in configs and metrics"
    )


def config_digest(config: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``config``: equal configs give equal digests."""
    text = json.dumps(json_safe(config, "config"), sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _state_entry(name: str, value: Any) -> Any:
    if isinstance(value, nn.Module):
        return canonical_state_dict(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, torch.Tensor):
        return value
    if callable(getattr(value, "state_dict", None)):
        return value.state_dict()
    raise TypeError(f"state[{name!r}] is a {type(value).__qualname__}; pass a module, an object with state_dict(), a mapping or a tensor")


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(
    directory: str | os.PathLike[str],
    *,
    method: str,
    step: int,
    epoch: int,
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint into ``directory`` (created if needed) and return the directory.

    ``state`` maps names (student, teacher, optimizer, loss_center, ...) to modules
    (stored via :func:`canonical_state_dict`), objects with ``state_dict()`` (optimizers,
    schedulers, grad scalers), state dicts or tensors. ``config`` and ``metrics`` are
    converted with :func:`json_safe`. An existing ``meta.json`` is removed first and the
    new one written last, so a crash mid-write never leaves a directory that looks complete.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    clean_config = json_safe(config, "config")
    payload = {
        "schema_version": SCHEMA_VERSION,
        "method": str(method),
        "step": int(step),
        "epoch": int(epoch),
        "state": {str(name): _state_entry(name, value) for name, value in state.items()},
        "config": clean_config,
        "metrics": json_safe(dict(metrics or {}), "metrics"),
    }
    meta = {
        "schema_version": SCHEMA_VERSION,
        "method": payload["method"],
        "step": payload["step"],
        "epoch": payload["epoch"],
        "config_digest": config_digest(clean_config),
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    (directory / META_FILE).unlink(missing_ok=True)
    _atomic_write(directory / MODEL_FILE, lambda handle: torch.save(payload, handle))
    _atomic_write(directory / META_FILE, lambda handle: handle.write(json.dumps(meta, indent=2).encode()))
    return directory


def _is_uri(path: str) -> bool:
    return "://" in path


def _read_bytes(path: str) -> bytes:
    """Bytes of a local file or of an object addressed by a URI that pyarrow understands (s3://, gs://, ...)."""
    if not _is_uri(path):
        return Path(path).read_bytes()
    import pyarrow.fs

    fs, fs_path = pyarrow.fs.FileSystem.from_uri(path)
    with fs.open_input_stream(fs_path) as stream:
        return stream.read()


def _check_schema(version: Any, source: str) -> None:
    if version != SCHEMA_VERSION:
        raise CheckpointError(
            f"{source} has checkpoint schema_version {version!r}; this MedFoundry reads schema_version "
            f"{SCHEMA_VERSION}. Load it with the MedFoundry release that wrote it, or convert it."
        )


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint directory (local path or URI), validated."""
    base = os.fspath(path).rstrip("/")
    source = f"{base}/{META_FILE}"
    try:
        meta = json.loads(_read_bytes(source))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{base} is not a complete checkpoint: {META_FILE} is missing") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {source}: {exc}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source} is not a JSON object")
    _check_schema(meta.get("schema_version"), source)
    return meta


def _unpickling_reason(exc: Exception) -> str:
    """The line of torch's long weights_only message that names the refused object."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "WeightsUnpickler error" in line:
            return line
    return lines[0] if lines else type(exc).__name__


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint (its directory or its ``model.pt``; local path or URI) onto the CPU.

    Uses ``torch.load(weights_only=True)``: a file holding arbitrary pickled objects is
    refused with :class:`CheckpointError` instead of being executed. The schema version is
    checked against :data:`SCHEMA_VERSION` (also in ``meta.json`` when present).
    """
    text = os.fspath(path).rstrip("/")
    is_file = text.endswith(".pt") or (not _is_uri(text) and Path(text).is_file())
    model_path = text if is_file else f"{text}/{MODEL_FILE}"
    missing_error = CheckpointError(f"no checkpoint at {text}: {model_path} does not exist")
    source: str | io.BytesIO = model_path
    if _is_uri(model_path):
        try:
            source = io.BytesIO(_read_bytes(model_path))
        except FileNotFoundError as exc:
            raise missing_error from exc
    elif not Path(model_path).is_file():
        raise missing_error
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{model_path} cannot be loaded safely (torch.load weights_only=True refused it): it holds "
            f"objects other than tensors and plain containers, so it is not a MedFoundry checkpoint "
            f"or was written by untrusted code. Detail: {_unpickling_reason(exc)}"
        ) from exc
    except (RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{model_path} is not a readable torch checkpoint (truncated or corrupt?): {exc}") from exc
    if not isinstance(payload, dict) or "schema_version" not in payload:
        raise CheckpointError(f"{model_path} is not a MedFoundry checkpoint: no schema_version in it")
    _check_schema(payload["schema_version"], model_path)
    missing = [key for key in _REQUIRED_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"{model_path} lacks required keys {missing}")
    if not is_file:
        meta_path = f"{text}/{META_FILE}"
        try:
            meta = json.loads(_read_bytes(meta_path))
        except FileNotFoundError:
            meta = None
        if meta is not None:
            _check_schema(meta.get("schema_version"), meta_path)
    return payload


def find_latest_checkpoint(run_dir: str | os.PathLike[str]) -> str | None:
    """The newest complete checkpoint directly under ``run_dir`` (local path or URI), or None.

    Only directories with a valid ``meta.json`` count. Newest means highest
    ``(step, epoch, created_at)``, not modification time, which object stores do not keep
    reliably. Returns a local path, or a URI with the same scheme as ``run_dir``.
    """
    text = os.fspath(run_dir).rstrip("/")
    if _is_uri(text):
        import pyarrow.fs

        fs, fs_root = pyarrow.fs.FileSystem.from_uri(text)
        scheme = text.split("://", 1)[0]
        infos = fs.get_file_info(pyarrow.fs.FileSelector(fs_root, allow_not_found=True))
        candidates = [f"{scheme}://{info.path}" for info in infos if info.type == pyarrow.fs.FileType.Directory]
    else:
        root = Path(text)
        candidates = [str(child) for child in root.iterdir() if child.is_dir()] if root.is_dir() else []
    best: tuple[tuple[int, int, str], str] | None = None
    for candidate in candidates:
        try:
            meta = read_meta(candidate)
        except CheckpointError:
            continue
        key = (int(meta.get("step", -1)), int(meta.get("epoch", -1)), str(meta.get("created_at", "")))
        if best is None or key > best[0]:
            best = (key, candidate)
    return best[1] if best else None


def _ray_train_checkpoint() -> Any:
    """``ray.train.get_checkpoint()`` inside a Ray Train worker; None elsewhere (no Ray import if unused)."""
    if "ray.train" not in sys.modules:
        return None
    import ray.train

    try:
        return ray.train.get_checkpoint()
    except RuntimeError:
        return None


def latest_checkpoint(config: Mapping[str, Any], *, method: str | None = None) -> dict[str, Any] | None:
    """The checkpoint a recipe should resume from, loaded on the CPU, or None to start fresh.

    Order: (1) Ray Train's latest reported checkpoint of this run (a worker restart after a
    failure, or a relaunch with the same run name and storage: job-level restoration);
    (2) ``config["resume_from"]`` (a checkpoint directory or URI, e.g. from another run);
    (3) None. Every rank calls this and loads the same state. ``method``, when given, must
    match the checkpoint's method, so a stage never silently resumes another stage's state.
    """
    payload: dict[str, Any] | None = None
    checkpoint = _ray_train_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            payload = load_checkpoint(directory)
    elif config.get("resume_from"):
        payload = load_checkpoint(str(config["resume_from"]))
    if payload is not None and method is not None and payload["method"] != method:
        raise CheckpointError(
            f"resume checkpoint was written by method {payload['method']!r}, not {method!r}; "
            "to initialise from another method's weights, load them explicitly instead of resuming"
        )
    return payload


__all__ = [
    "CheckpointError",
    "META_FILE",
    "MODEL_FILE",
    "SCHEMA_VERSION",
    "canonical_state_dict",
    "config_digest",
    "find_latest_checkpoint",
    "json_safe",
    "latest_checkpoint",
    "load_checkpoint",
    "read_meta",
    "save_checkpoint",
    "unwrap_module",
]
