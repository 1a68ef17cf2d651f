"""The ``medfoundry`` command line.

Start-up stays fast: this module imports only typer, rich, pydantic and the catalog schema;
torch, ray, prefect and mlflow are imported inside the commands that need them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from pipelines.deploy import DEFAULT_WORK_POOL

app = typer.Typer(help="MedFoundry: catalog -> versioned zarr store -> foundation models in the MLflow registry.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
catalog_app = typer.Typer(help="Inspect and validate the dataset catalog.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect ingested dataset versions.", no_args_is_help=True)
models_app = typer.Typer(help="Registered models: list, show, promote.", no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")

console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)
PROFILES = ("smoke", "demo", "full")
CatalogOption = typer.Option(None, "--catalog", "-c", help="Catalog file (default: $MEDFOUNDRY_CATALOG or ./catalog.yaml).")


def _settings():
    from infra.settings import get_settings

    return get_settings()


def _load(catalog: Optional[Path]):
    from tasks.catalog import CatalogError, load_catalog

    try:
        return load_catalog(catalog or _settings().catalog)
    except CatalogError as exc:
        err.print(f"[red]invalid catalog[/red]: {exc}", highlight=False)
        raise typer.Exit(2) from None


@catalog_app.command("validate")
def catalog_validate(catalog: Optional[Path] = CatalogOption,
                     sources: bool = typer.Option(True, help="Also check that every source resolves to files inside its root.")) -> None:
    """Validate the catalog schema (and, by default, that sources exist)."""
    cat = _load(catalog)
    problems = 0
    if sources:
        from tasks.catalog import CatalogError
        from tasks.ingest.readers import SourceUnavailable, list_cases

        for entry in cat.entries:
            try:
                if not list_cases(entry, cat.base_dir, max_voxels=_settings().max_case_voxels):
                    raise CatalogError("the source lists no case", entry=entry.name, field="source", hint="check source.uri")
            except SourceUnavailable as exc:
                err.print(f"[yellow]optional source unavailable[/yellow] {entry.name}: {exc}", highlight=False)
            except (CatalogError, FileNotFoundError) as exc:
                problems += 1
                err.print(f"[red]error[/red] {exc}", highlight=False)
    if problems:
        raise typer.Exit(2)
    console.print(f"catalog OK: {len(cat.entries)} entries")


@catalog_app.command("list")
def catalog_list(catalog: Optional[Path] = CatalogOption) -> None:
    """One line per entry: name, modality, dims, task, source kind."""
    for entry in _load(catalog).entries:
        print(f"{entry.name}\t{entry.modality}\t{entry.dims}D\t{entry.task}\t{entry.source.kind}")


@catalog_app.command("show")
def catalog_show(name: str, catalog: Optional[Path] = CatalogOption) -> None:
    """Print one entry, with every default filled in."""
    from tasks.catalog import CatalogError

    cat = _load(catalog)
    try:
        entry = cat.get(name)
    except CatalogError as exc:
        err.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from None
    import yaml

    print(yaml.safe_dump(entry.model_dump(mode="json"), sort_keys=False))


@app.command("ingest")
def ingest(names: list[str] = typer.Argument(None, help="Entries to ingest (default: all)."),
           catalog: Optional[Path] = CatalogOption,
           profile: str = typer.Option("demo", help="smoke caps cases per entry for quick checks; demo and full ingest everything.")) -> None:
    """Ingest catalog entries into the versioned zarr store (a Prefect flow, traced in MLflow)."""
    cat = _load(catalog)
    for name in names or []:
        if name not in cat.names:
            err.print(f"[red]unknown entry[/red] '{name}'; known: {', '.join(cat.names)}")
            raise typer.Exit(2)
    _check_profile(profile)
    from pipelines.ingest import ingest_flow
    from pipelines.report import print_ingest_summary

    summaries = ingest_flow(names=list(names or []), catalog_path=str(catalog or _settings().catalog), profile=profile)
    print_ingest_summary(summaries, console)
    if any(s["status"] == "failed" for s in summaries):
        raise typer.Exit(1)


@data_app.command("versions")
def data_versions(name: str) -> None:
    """List the committed versions of a dataset, newest last, with quarantined cases."""
    from infra.storage import DatasetStore

    store = DatasetStore(_settings().store)
    versions = store.versions(name)
    if not versions:
        err.print(f"no committed version of '{name}' in {_settings().store} (run: medfoundry ingest {name})")
        raise typer.Exit(1)
    table = Table("version", "created", "cases", "quarantined")
    for info in versions:
        table.add_row(info.version[:16], info.created_at, str(info.n_cases), str(info.n_quarantined))
    console.print(table)
    latest = store.open(name)
    for item in latest.quarantine:
        console.print(f"quarantined {item['case_id']}: {item['reason']}", highlight=False)


@app.command("run")
def run(flow: str = typer.Argument(..., help="Flow to run: ingest, unimiss, foundation."),
        profile: str = typer.Option("demo", help="smoke (tests, seconds), demo (the main job, minutes), full (paper settings, GPUs)."),
        catalog: Optional[Path] = CatalogOption) -> None:
    """Run a flow end to end with a profile."""
    _check_profile(profile)
    from pipelines.registry import FLOWS

    if flow not in FLOWS:
        err.print(f"[red]unknown flow[/red] '{flow}'; known: {', '.join(sorted(FLOWS))}")
        raise typer.Exit(2)
    result = FLOWS[flow](catalog_path=str(catalog or _settings().catalog), profile=profile)
    from pipelines.report import print_run_summary

    print_run_summary(flow, result, console)


@models_app.command("list")
def models_list(name: Optional[str] = typer.Argument(None)) -> None:
    """One line per registered version: name, version, aliases, key metric."""
    from infra.registry import list_versions
    from infra.settings import configure_engines

    configure_engines()
    for row in list_versions(name):
        aliases = ",".join(row.get("aliases") or []) or "-"
        metric = f"{row.get('key_metric')}={row.get('key_metric_value')}" if row.get("key_metric") else "-"
        print(f"{row['name']}\tv{row['version']}\t{aliases}\t{metric}")


@models_app.command("show")
def models_show(name: str, version: str = typer.Argument("champion", help="Version number or alias.")) -> None:
    """Everything recorded on one model version."""
    from infra.registry import show
    from infra.settings import configure_engines

    configure_engines()
    print(json.dumps(show(name, version), indent=2, default=str))


@models_app.command("promote")
def models_promote(name: str, version: str, force: bool = typer.Option(False, help="Bypass the evaluation gate (recorded).")) -> None:
    """Move the champion alias to a version if its evaluation beats the champion's."""
    from infra.registry import promote
    from infra.settings import configure_engines

    configure_engines()
    decision = promote(name, version, force=force)
    print(json.dumps(decision.as_dict(), indent=2, default=str))


@app.command("deploy")
def deploy(names: list[str] = typer.Argument(None, help="Deployments to build: ingest, unimiss, foundation (default: all)."),
           work_pool: str = typer.Option(DEFAULT_WORK_POOL, "--work-pool", help="Prefect work pool (Kubernetes) the deployments run on."),
           image: Optional[str] = typer.Option(None, "--image", help="Project image built from infra/deploy/Dockerfile (default: $MEDFOUNDRY_IMAGE)."),
           dry_run: bool = typer.Option(False, "--dry-run", help="Only build and print the deployments; contact no Prefect server.")) -> None:
    """Register the scheduled Prefect deployments (infra/deploy/prefect.yaml's twin); one line each: name, cron, entrypoint."""
    from pipelines.deploy import deploy as build_deployments

    try:
        specs = build_deployments(list(names or []), work_pool=work_pool, image=image, dry_run=dry_run)
    except ValueError as exc:
        err.print(f"[red]cannot deploy[/red]: {exc}", highlight=False)
        raise typer.Exit(2) from None
    for spec in specs:
        print("\t".join([spec["name"], spec["cron"], spec["entrypoint"], *([spec["id"]] if "id" in spec else [])]))


@app.command("settings")
def show_settings() -> None:
    """Print the resolved settings (no secrets are held here)."""
    print(_settings().model_dump_json(indent=2))


def _check_profile(profile: str) -> None:
    if profile not in PROFILES:
        err.print(f"[red]unknown profile[/red] '{profile}'; use one of {', '.join(PROFILES)}")
        raise typer.Exit(2)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
