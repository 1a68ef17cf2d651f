"""Prefect flows (wiring only) and the ``medfoundry`` CLI."""
