"""Shared test setup: an isolated MedFoundry home for the whole session, engines configured offline.

The environment is set at import time, before any test module imports prefect, ray or
mlflow, because those read their settings (PREFECT_HOME, tracking URI) when imported.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_HOME = Path(tempfile.mkdtemp(prefix="medfoundry-test-"))
os.environ["MEDFOUNDRY_HOME"] = str(TEST_HOME)
os.environ["MEDFOUNDRY_CATALOG"] = str(REPO / "catalog.yaml")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{TEST_HOME / 'mlflow.db'}"
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
os.environ["PREFECT_HOME"] = str(TEST_HOME / "prefect")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from infra.settings import configure_engines, get_settings  # noqa: E402

get_settings.cache_clear()
configure_engines(get_settings())


@pytest.fixture(scope="session")
def session_home() -> Path:
    """The MedFoundry home shared by the integration tests of this session."""
    return TEST_HOME


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
