"""Prefect tasks of the ingest flow: they pass catalog names, paths and run ids, never tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from infra.settings import get_settings
from tasks.catalog import load_catalog


@task(name="ingest-entry", task_run_name="ingest-{name}", retries=0)
def ingest_entry_task(catalog_path: str, name: str, profile: str, parent_run_id: str | None) -> dict[str, Any]:
    """Ingest one entry and record it as an MLflow child run with its dataset input."""
    from tasks.ingest.run import ingest_entry
    from tasks.logs import get_logger

    settings = get_settings()
    catalog = load_catalog(catalog_path)
    entry = catalog.get(name)
    try:
        summary = ingest_entry(entry, catalog.base_dir, settings, profile)
    except Exception as exc:  # reported per entry; the flow goes on with the others
        get_logger().error("%s: ingest failed: %s", name, exc)
        return {"name": name, "status": "failed", "reason": str(exc)}
    if summary["status"] in ("written", "unchanged"):
        summary["mlflow_run_id"] = record_ingest_run(summary, entry.source.kind, parent_run_id)
    return summary


def record_ingest_run(summary: dict[str, Any], source_kind: str, parent_run_id: str | None) -> str:
    """One MLflow run per committed version (reused when the version was already recorded)."""
    from infra import tracking
    from infra.storage import DatasetStore

    key = f"ingest:{summary['name']}:{summary['version']}"
    existing = tracking.find_run({tracking.TAG_STAGE_KEY: key})
    if existing:
        return existing
    reader = DatasetStore(get_settings().store).open(summary["name"], summary["version"])
    fingerprint = reader.attrs.get("fingerprint", {})
    with tracking.stage_run(f"ingest:{summary['name']}", parent_run_id=parent_run_id, stage_key=key,
                            inputs=[f"{summary['name']}@{summary['version']}"],
                            params={"dataset": summary["name"], "version": summary["version"], "source_kind": source_kind,
                                    "n_listed": summary.get("n_listed")},
                            tags={"medfoundry.dataset": summary["name"],
                                  "medfoundry.dataset_version": summary["version"]}) as run:
        tracking.log_dataset_input(dataset=summary["name"], version=summary["version"], source=reader.uri,
                                   schema={"modality": reader.attrs.get("modality"), "dims": reader.attrs.get("dims"),
                                           "task": reader.attrs.get("task"), "labels": reader.attrs.get("labels")},
                                   fingerprint=fingerprint, context="ingest")
        import mlflow

        mlflow.log_metrics({"n_cases": float(len(reader.cases) or summary.get("n_cases", 0)),
                            "n_quarantined": float(len(reader.quarantine)),
                            "seconds": float(summary.get("seconds", 0.0)),
                            "mb_written": float(summary.get("mb_written", 0.0))})
        tracking.log_dict_artifact({"fingerprint": fingerprint, "quarantine": reader.quarantine}, "ingest/fingerprint.json")
    return run.info.run_id


def entry_names(catalog_path: str, names: list[str] | None) -> list[str]:
    catalog = load_catalog(Path(catalog_path))
    if not names:
        return catalog.names
    for name in names:
        catalog.get(name)
    return list(names)
