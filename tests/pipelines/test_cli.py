"""The CLI starts fast (no heavy engine imports) and its catalog commands work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "ray", "prefect", "mlflow", "monai", "zarr", "dask")


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from pipelines.cli import app; app()", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, **kwargs)


def test_help_imports_no_engine():
    code = ("import sys\nfrom pipelines.cli import app\ntry:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_catalog_list_prints_one_line_per_entry_starting_with_name():
    from tasks.catalog import load_catalog

    names = load_catalog(REPO / "catalog.yaml").names
    out = run_cli("catalog", "list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == names


def test_catalog_validate_bad_catalog_exits_2_with_entry_and_field(tmp_path):
    bad = tmp_path / "catalog.yaml"
    bad.write_text("version: 1\nentries:\n  - name: x\n    modality: ct\n    dims: 3\n    task: ssl\n    license: a\n"
                   "    source: {kind: synthetic, generator: phantom3d}\n    colour: red\n")
    out = run_cli("catalog", "validate", "--catalog", str(bad))
    assert out.returncode == 2
    assert "catalog entry 'x'" in out.stderr and "field 'colour'" in out.stderr


def test_catalog_show_unknown_name():
    out = run_cli("catalog", "show", "no-such-entry")
    assert out.returncode == 2 and "known entries" in out.stderr
