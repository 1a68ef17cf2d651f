"""The ``ingest`` flow: every (or the named) catalog entry into the versioned zarr store."""

from __future__ import annotations

from infra.settings import configure_engines, get_settings

configure_engines()

from prefect import flow  # noqa: E402  (engines are configured before prefect is imported)

from infra import tracking  # noqa: E402
from tasks.ingest.tasks import entry_names, ingest_entry_task  # noqa: E402


@flow(name="ingest", log_prints=True)
def ingest_flow(names: list[str] | None = None, catalog_path: str | None = None, profile: str = "demo",
                parent_run_id: str | None = None) -> list[dict]:
    """Ingest entries one after another (each is already I/O- and CPU-bound on this machine)."""
    settings = get_settings()
    catalog_path = catalog_path or str(settings.catalog)
    selected = entry_names(catalog_path, names)
    tracking.setup_tracking(settings)
    params = {"profile": profile, "entries": ",".join(selected)}
    run = tracking.stage_run("ingest", parent_run_id, params) if parent_run_id else tracking.flow_run("ingest", params)
    with run as active:
        return [ingest_entry_task(catalog_path, name, profile, active.info.run_id) for name in selected]
