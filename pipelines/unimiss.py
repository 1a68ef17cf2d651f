"""The ``unimiss`` flow: ingest what it needs, pre-train, fine-tune + evaluate downstream, register."""

from __future__ import annotations

import time
from typing import Any

from infra.settings import configure_engines, get_settings

configure_engines()

from prefect import flow  # noqa: E402

from infra import tracking  # noqa: E402
from pipelines.ingest import ingest_flow  # noqa: E402
from tasks.profiles import unimiss_profile  # noqa: E402
from tasks.train import evaluate_classification, finetune_segmentation, pretrain_unimiss, register_encoder  # noqa: E402


def needed_datasets(profile: str) -> list[str]:
    p = unimiss_profile(profile)
    names = [p.pretrain.dataset_3d, *p.pretrain.datasets_2d, p.segmentation.dataset, p.classification.dataset]
    return list(dict.fromkeys(names))


@flow(name="unimiss", log_prints=True)
def unimiss_flow(catalog_path: str | None = None, profile: str = "demo", parent_run_id: str | None = None,
                 ingest: bool = True) -> dict[str, Any]:
    settings = get_settings()
    catalog_path = catalog_path or str(settings.catalog)
    tracking.setup_tracking(settings)
    names = needed_datasets(profile)
    params = {"profile": profile, "catalog": catalog_path}
    run = tracking.stage_run("unimiss", parent_run_id, params) if parent_run_id else tracking.flow_run("unimiss", params)
    with run as active:
        run_id = active.info.run_id
        started = time.perf_counter()
        ingested = ingest_flow(names=names, catalog_path=catalog_path, profile=profile, parent_run_id=run_id) if ingest else []
        versions = _versions(names)
        stages = [{"stage": "ingest", "status": "ok", "seconds": time.perf_counter() - started}]
        p = unimiss_profile(profile)
        pre = pretrain_unimiss(profile, versions, run_id)
        stages.append({"stage": "unimiss-pretrain", "status": "skipped" if pre["skipped"] else "ok", "seconds": pre["seconds"],
                       "metric": "loss_last", "value": pre["loss_last"]})
        seg = finetune_segmentation(profile, p.segmentation.dataset, versions[p.segmentation.dataset], pre, run_id)
        encoder = register_encoder(pre, seg, p.segmentation.dataset, versions[p.segmentation.dataset]) \
            if not (pre["skipped"] and seg["skipped"]) else {"model": None, "alias": None}
        stages[-1].update(model=encoder["model"], alias=encoder["alias"])
        stages.append({"stage": f"segmentation:{p.segmentation.dataset}", "status": "skipped" if seg["skipped"] else "ok",
                       "seconds": seg["seconds"], "metric": "dice_mean", "value": seg["dice"], "model": seg.get("model"),
                       "alias": seg.get("alias")})
        cls = evaluate_classification(profile, p.classification.dataset, versions[p.classification.dataset], pre, run_id)
        stages.append({"stage": f"classification:{p.classification.dataset}", "status": "ok", "seconds": cls["seconds"],
                       "metric": "finetune_auc", "value": cls["finetune_auc"], "model": cls.get("model"),
                       "alias": cls.get("alias")})
    return {"ingest": ingested, "stages": stages, "pretrain": pre, "segmentation": seg, "encoder": encoder,
            "classification": cls}


def _versions(names: list[str]) -> dict[str, str]:
    from infra.storage import DatasetStore

    store = DatasetStore(get_settings().store)
    out = {}
    for name in names:
        latest = store.latest(name)
        if latest is None:
            raise RuntimeError(f"dataset '{name}' has no committed version; run `medfoundry ingest {name}`")
        out[name] = latest.version
    return out
