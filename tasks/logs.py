"""One logger for task code: Prefect's run logger inside a flow or task, stdlib logging elsewhere."""

from __future__ import annotations

import logging
import sys


def get_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger when running inside Prefect; never imports Prefect just to log."""
    if "prefect" not in sys.modules:
        return logging.getLogger("medfoundry")
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("medfoundry")
