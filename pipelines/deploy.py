"""Prefect deployments of the MedFoundry flows: the Python twin of ``infra/deploy/prefect.yaml``.

Both describe the same three scheduled deployments on the Kubernetes work pool
``medfoundry-k8s`` (see ``infra/deploy/README.md``); ``tests/infra/test_deploy.py`` keeps them
in step. Use whichever fits the release process:

* ``prefect deploy --all --prefect-file infra/deploy/prefect.yaml`` (from the repository root), or
* ``medfoundry deploy --image REGISTRY/medfoundry:TAG`` / :func:`deploy`, which needs no YAML
  and can print the specs without a server (``--dry-run``).

Prefect API used (Prefect 3.x, checked against the installed 3.9 source and
https://docs.prefect.io/v3/how-to-guides/deployments/deploy-via-python and
https://docs.prefect.io/v3/api-ref/python/prefect-deployments-runner):
``Flow.to_deployment(...)`` builds a ``RunnerDeployment`` locally (no API call), and
``prefect.deploy(*deployments, work_pool_name=..., image=..., build=False, push=False)``
registers them; ``build=False`` means "use this already-built image as is" — the image is
built from ``infra/deploy/Dockerfile`` by CI, not by Prefect.

Only configuration that is not secret lives here. Object-store keys and database
credentials reach the pods as Kubernetes secret references (the work pool's base job
template and the manifests in ``infra/deploy``), never through deployment job variables,
which Prefect stores and shows in plain text.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

DEFAULT_WORK_POOL = "medfoundry-k8s"
IMAGE_ENV_VAR = "MEDFOUNDRY_IMAGE"
IMAGE_PLACEHOLDER = "registry.example.com/medfoundry:latest"
TIMEZONE = "UTC"

SHARED_ENV: dict[str, str] = {
    "MEDFOUNDRY_STORE_URI": "s3://medfoundry-data/store",
    "MEDFOUNDRY_RAY_STORAGE_URI": "s3://medfoundry-data/ray",
    "MLFLOW_TRACKING_URI": "http://mlflow:5000",
    "RAY_ADDRESS": "ray://medfoundry-ray-head:10001",
    "MEDFOUNDRY_NUM_WORKERS": "4",
    "MEDFOUNDRY_CPUS_PER_WORKER": "4",
    "MEDFOUNDRY_THREADS_PER_WORKER": "4",
    "MEDFOUNDRY_USE_GPU": "true",
}
"""Environment of every flow-run pod (values only; credentials come from secret refs)."""

SHARED_JOB_VARIABLES: dict[str, Any] = {
    "cpu_request": "4",
    "memory_request": "16Gi",
    "memory_limit": "16Gi",
}
"""Resources of the flow-run pod: it ingests on its own CPUs and drives Ray Train as a Ray Client."""


@dataclass(frozen=True)
class DeploymentDef:
    """One scheduled deployment: which flow, when, with which parameters."""

    name: str
    module: str
    function: str
    cron: str
    description: str
    parameters: dict[str, Any] = field(default_factory=lambda: {"profile": "full"})
    tags: tuple[str, ...] = ("medfoundry",)
    concurrency_limit: int = 1

    @property
    def entrypoint(self) -> str:
        """``path/to/file.py:function``, relative to the repository root (the image's WORKDIR)."""
        return f"{self.module.replace('.', '/')}.py:{self.function}"


DEPLOYMENTS: tuple[DeploymentDef, ...] = (
    DeploymentDef("ingest", "pipelines.ingest", "ingest_flow", "0 2 * * *",
                  "Nightly: ingest every catalog entry into the versioned zarr store.",
                  tags=("medfoundry", "ingest")),
    DeploymentDef("unimiss", "pipelines.unimiss", "unimiss_flow", "0 6 * * 6",
                  "Weekly (Saturday): UniMiSS pre-training and downstream evaluation on the GPU Ray cluster.",
                  tags=("medfoundry", "training", "gpu")),
    DeploymentDef("foundation", "pipelines.foundation", "foundation_flow", "0 6 * * 0",
                  "Weekly (Sunday): the full foundation-model pipeline, from ingestion to the registry.",
                  tags=("medfoundry", "training", "gpu")),
)


def resolve_image(image: str | None) -> str:
    """The image to run: the argument, else ``$MEDFOUNDRY_IMAGE``, else the placeholder."""
    return image or os.environ.get(IMAGE_ENV_VAR) or IMAGE_PLACEHOLDER


def job_variables(image: str) -> dict[str, Any]:
    """Kubernetes work-pool job variables of every deployment (fresh copies, safe to mutate)."""
    return {"image": image, "env": dict(SHARED_ENV), **SHARED_JOB_VARIABLES}


def select(names: list[str] | None) -> list[DeploymentDef]:
    """The definitions named (all when ``names`` is empty), in declaration order."""
    known = [d.name for d in DEPLOYMENTS]
    unknown = sorted(set(names or ()) - set(known))
    if unknown:
        raise ValueError(f"unknown deployment(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [d for d in DEPLOYMENTS if not names or d.name in names]


def build(definition: DeploymentDef, work_pool: str, image: str) -> RunnerDeployment:
    """Build one ``RunnerDeployment`` locally with ``Flow.to_deployment`` (no API call).

    Prefect derives the entrypoint from the flow's file relative to the current directory;
    it is pinned to the repository-relative path so the result does not depend on where the
    command runs (the image's WORKDIR is the repository root, see the Dockerfile).
    """
    from prefect.schedules import Cron

    flow = getattr(importlib.import_module(definition.module), definition.function)
    deployment = flow.to_deployment(
        name=definition.name,
        schedules=[Cron(definition.cron, timezone=TIMEZONE)],
        parameters=dict(definition.parameters),
        description=definition.description,
        tags=list(definition.tags),
        concurrency_limit=definition.concurrency_limit,
        work_pool_name=work_pool,
        job_variables=job_variables(image),
    )
    deployment.entrypoint = definition.entrypoint
    return deployment


def spec(deployment: RunnerDeployment) -> dict[str, Any]:
    """The reviewable summary of a built deployment (what ``--dry-run`` prints)."""
    schedules = [s.schedule for s in deployment.schedules or []]
    return {
        "name": deployment.name,
        "flow_name": deployment.flow_name,
        "entrypoint": deployment.entrypoint,
        "cron": schedules[0].cron if schedules else None,
        "timezone": schedules[0].timezone if schedules else None,
        "parameters": dict(deployment.parameters),
        "work_pool": deployment.work_pool_name,
        "job_variables": dict(deployment.job_variables),
        "tags": list(deployment.tags),
        "concurrency_limit": deployment.concurrency_limit,
        "description": deployment.description,
    }


def deploy(names: list[str] | None = None, work_pool: str = DEFAULT_WORK_POOL, image: str | None = None,
           dry_run: bool = False) -> list[dict]:
    """Build the deployments named (default: all) and, unless ``dry_run``, register them.

    ``dry_run=True`` only imports the flows and builds the specs — it contacts no Prefect
    server, so it runs in CI. Otherwise the deployments are created or updated on the
    server of ``PREFECT_API_URL`` with ``prefect.deploy(..., build=False, push=False)``;
    the work pool must exist (see ``infra/deploy/README.md``) and ``image`` (or
    ``$MEDFOUNDRY_IMAGE``) must name the image pushed by CI. Returns one spec per
    deployment, with the server's ``id`` when registered.
    """
    chosen = select(names)
    resolved = resolve_image(image)
    deployments = [build(d, work_pool, resolved) for d in chosen]
    specs = [spec(d) for d in deployments]
    if dry_run:
        return specs
    if resolved == IMAGE_PLACEHOLDER:
        raise ValueError(f"no image: pass --image REGISTRY/medfoundry:TAG or set ${IMAGE_ENV_VAR} "
                         "(the image built from infra/deploy/Dockerfile)")
    import prefect

    ids = prefect.deploy(*deployments, work_pool_name=work_pool, image=resolved, build=False, push=False,
                         print_next_steps_message=False)
    if len(ids) != len(deployments):
        raise RuntimeError(f"{len(deployments) - len(ids)} of {len(deployments)} deployments failed to register; "
                           "Prefect's table above names them and the error")
    return [{**s, "id": str(i)} for s, i in zip(specs, ids)]
