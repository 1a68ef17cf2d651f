"""The flows the CLI can run by name (imported lazily: each pulls in Prefect and the engines)."""

from __future__ import annotations

from typing import Any, Callable


def _ingest(catalog_path: str, profile: str) -> Any:
    from pipelines.ingest import ingest_flow

    return ingest_flow(catalog_path=catalog_path, profile=profile)


def _unimiss(catalog_path: str, profile: str) -> Any:
    from pipelines.unimiss import unimiss_flow

    return unimiss_flow(catalog_path=catalog_path, profile=profile)


def _foundation(catalog_path: str, profile: str) -> Any:
    from pipelines.foundation import foundation_flow

    return foundation_flow(catalog_path=catalog_path, profile=profile)


FLOWS: dict[str, Callable[..., Any]] = {"ingest": _ingest, "unimiss": _unimiss, "foundation": _foundation}
