"""End-of-run summary tables printed by the CLI."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_ingest_summary(summaries: list[dict[str, Any]], console: Console) -> None:
    table = Table("dataset", "status", "version", "cases", "quarantined", "seconds", title="ingest")
    for s in summaries:
        table.add_row(s["name"], s["status"], (s.get("version") or "-")[:12], str(s.get("n_cases", "-")),
                      str(s.get("n_quarantined", "-")), f"{s['seconds']:.1f}" if "seconds" in s else "-")
    console.print(table)
    for s in summaries:
        if s["status"] in ("failed", "skipped"):
            console.print(f"{s['name']} {s['status']}: {s.get('reason')}", highlight=False)


def print_run_summary(flow: str, result: Any, console: Console) -> None:
    """Flows return a list of stage rows: stage, status, seconds, key metric, model, alias."""
    if flow == "ingest":
        print_ingest_summary(result, console)
        return
    ingest_rows = result.get("ingest", []) if isinstance(result, dict) else []
    if ingest_rows:
        print_ingest_summary(ingest_rows, console)
    stages = result.get("stages", []) if isinstance(result, dict) else result
    table = Table("stage", "status", "seconds", "key metric", "registered model", "alias", title=f"{flow} summary")
    for row in stages:
        metric = f"{row['metric']}={row['value']:.4f}" if row.get("metric") and row.get("value") is not None else "-"
        table.add_row(row["stage"], row.get("status", "-"), f"{row.get('seconds', 0):.1f}", metric,
                      row.get("model") or "-", row.get("alias") or "-")
    console.print(table)
