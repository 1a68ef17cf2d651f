"""The main job, ``foundation``: ingest every catalog entry, then each method's flow in order.

Today the chain is ingest -> UniMiSS (pre-training, downstream evaluation, registration);
later methods (MedCoSS, TPP, MedSeqFT, PairAug, MIRROR) append their flows here.
"""

from __future__ import annotations

import time
from typing import Any

from infra.settings import configure_engines, get_settings

configure_engines()

from prefect import flow  # noqa: E402

from infra import tracking  # noqa: E402
from pipelines.ingest import ingest_flow  # noqa: E402
from pipelines.unimiss import unimiss_flow  # noqa: E402


@flow(name="foundation", log_prints=True)
def foundation_flow(catalog_path: str | None = None, profile: str = "demo") -> dict[str, Any]:
    settings = get_settings()
    catalog_path = catalog_path or str(settings.catalog)
    tracking.setup_tracking(settings)
    with tracking.flow_run("foundation", {"profile": profile, "catalog": catalog_path}) as run:
        started = time.perf_counter()
        ingested = ingest_flow(catalog_path=catalog_path, profile=profile, parent_run_id=run.info.run_id)
        ingest_row = {"stage": "ingest (all entries)", "status": "ok", "seconds": time.perf_counter() - started,
                      "metric": "datasets", "value": float(sum(s["status"] in ("written", "unchanged") for s in ingested))}
        unimiss = unimiss_flow(catalog_path=catalog_path, profile=profile, parent_run_id=run.info.run_id, ingest=False)
    return {"ingest": ingested, "stages": [ingest_row, *unimiss["stages"][1:]], "unimiss": unimiss}
