"""MedFoundry settings, read from the environment (prefix ``MEDFOUNDRY_``) and validated at load.

Defaults need no server: everything lives under one home folder (``./.medfoundry``) —
the zarr store, the MLflow SQLite database and artifacts, Ray checkpoints and Prefect's
own home. Each location can be overridden on its own, so the same code runs on a laptop,
in CI and on a multi-node cluster (object-store URIs, an MLflow server, a Ray cluster,
a Prefect server) with only settings changed.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Resolved configuration of one MedFoundry process."""

    model_config = SettingsConfigDict(env_prefix="MEDFOUNDRY_", extra="ignore")

    home: Path = Field(default=Path(".medfoundry"), description="Folder holding every default location.")
    catalog: Path = Field(default=Path("catalog.yaml"), description="The dataset catalog.")
    store_uri: str | None = Field(default=None, description="zarr store root: a directory or an fsspec URI (s3://...). Default: <home>/store.")
    mlflow_tracking_uri: str | None = Field(default=None, description="Default: $MLFLOW_TRACKING_URI, else sqlite:///<home>/mlflow.db.")
    mlflow_artifact_root: str | None = Field(default=None, description="Default: <home>/mlartifacts.")
    experiment: str = Field(default="medfoundry", description="MLflow experiment of flow runs.")
    ray_address: str | None = Field(default=None, description="Default: $RAY_ADDRESS, else a local Ray started in-process.")
    ray_storage_uri: str | None = Field(default=None, description="Ray Train checkpoints: a directory or fsspec URI. Default: <home>/ray.")
    prefect_api_url: str | None = Field(default=None, description="Default: $PREFECT_API_URL, else Prefect's ephemeral API.")

    num_workers: int = Field(default=2, ge=1, description="Ray Train workers.")
    cpus_per_worker: int = Field(default=1, ge=1)
    use_gpu: bool = Field(default=False, description="One GPU per worker, NCCL and bf16 autocast.")
    threads_per_worker: int = Field(default=1, ge=1, description="torch intra-op threads per worker.")
    precision: Literal["auto", "fp32", "bf16"] = Field(default="auto", description="auto = bf16 autocast on CUDA, fp32 on CPU.")
    ray_worker_niceness: int = Field(default=0, ge=-20, le=19,
                                     description="Niceness of the workers of a local Ray (Ray's own default, 15, makes "
                                                 "training yield to every other process on a shared machine).")

    ingest_threads: int = Field(default=2, ge=1, le=64, description="Cases decoded ahead of the writer during ingest.")
    max_case_voxels: int = Field(default=512 * 1024**2, ge=1, description="Refuse cases declaring more voxels than this (decompression-bomb guard).")
    seed: int = 0

    @field_validator("home", "catalog", mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def store(self) -> str:
        return self.store_uri or str(self.home / "store")

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        return self.mlflow_artifact_root or (self.home / "mlartifacts").as_uri()

    @property
    def ray_storage(self) -> str:
        return self.ray_storage_uri or str(self.home / "ray")

    @property
    def ray_cluster_address(self) -> str | None:
        return self.ray_address or os.environ.get("RAY_ADDRESS")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; call ``get_settings.cache_clear()`` after changing the env)."""
    return Settings()


def configure_engines(settings: Settings | None = None) -> Settings:
    """Set the engines' own environment for quiet, offline, robust runs (see ../shared/STACK.md).

    Only fills variables the user has not set, so an explicit ``PREFECT_API_URL`` or
    ``MLFLOW_TRACKING_URI`` always wins. Must run before prefect/ray/mlflow are imported.
    """
    settings = settings or get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    defaults = {
        "PREFECT_HOME": str(settings.home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "true",
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "5",
        "TOKENIZERS_PARALLELISM": "false",
        "GIT_PYTHON_REFRESH": "quiet",
    }
    if settings.prefect_api_url:
        defaults["PREFECT_API_URL"] = settings.prefect_api_url
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return settings
