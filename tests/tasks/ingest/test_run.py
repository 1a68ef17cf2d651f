"""Ingest semantics without Prefect: versions, idempotence, quarantine, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from infra.settings import Settings
from tasks.catalog import load_catalog
from tasks.ingest.run import FAULT_ENV, IngestError, ingest_entry, plan_ingest

REPO = Path(__file__).resolve().parents[3]

PHANTOMS = {
    "name": "phantoms", "modality": "ct", "dims": 3, "task": "segmentation", "license": "CC0",
    "source": {"kind": "synthetic", "generator": "phantom3d", "seed": 3, "n_cases": 5, "shape": [32, 32, 32],
               "structures": ["liver", "spleen"]},
    "labels": {"background": 0, "liver": 1, "spleen": 2},
    "splits": {"seed": 0, "ratios": {"train": 0.6, "test": 0.4}},
    "preprocess": {"intensity": {"mode": "ct_window", "window": [-1000, 1000]}},
}


def make_catalog(tmp_path: Path, entries: list[dict]) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "entries": entries}))
    return path


def settings_for(home: Path) -> Settings:
    return Settings(home=home)


def store_snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_ingest_writes_a_version_with_fingerprint_and_splits(tmp_path):
    catalog = load_catalog(make_catalog(tmp_path, [PHANTOMS]))
    settings = settings_for(tmp_path / "home")
    summary = ingest_entry(catalog.get("phantoms"), catalog.base_dir, settings)
    assert summary["status"] == "written" and summary["n_cases"] == 5
    from infra.storage import DatasetStore

    reader = DatasetStore(settings.store).open("phantoms")
    assert reader.version == summary["version"]
    image = reader.read(reader.cases[0], "image")
    label = reader.read(reader.cases[0], "label")
    assert image.shape == label.shape == (32, 32, 32)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert set(np.unique(label)) <= {0, 1, 2}
    splits = reader.attrs["splits"]
    assert sorted(sum(splits.values(), [])) == reader.cases
    assert reader.attrs["fingerprint"], "fingerprint stored in the version's attributes"


def test_rerun_unchanged_writes_nothing_and_change_makes_new_version(tmp_path):
    path = make_catalog(tmp_path, [PHANTOMS])
    settings = settings_for(tmp_path / "home")
    catalog = load_catalog(path)
    first = ingest_entry(catalog.get("phantoms"), catalog.base_dir, settings)
    before = store_snapshot(Path(settings.store))
    again = ingest_entry(catalog.get("phantoms"), catalog.base_dir, settings)
    assert again["status"] == "unchanged" and again["version"] == first["version"]
    assert store_snapshot(Path(settings.store)) == before
    changed = json.loads(json.dumps(PHANTOMS))
    changed["preprocess"]["intensity"]["window"] = [-500, 500]
    catalog2 = load_catalog(make_catalog(tmp_path, [changed]))
    second = ingest_entry(catalog2.get("phantoms"), catalog2.base_dir, settings)
    assert second["status"] == "written" and second["version"] != first["version"]
    from infra.storage import DatasetStore

    assert [v.version for v in DatasetStore(settings.store).versions("phantoms")] == [first["version"], second["version"]]


def test_bad_cases_are_quarantined_and_the_rest_proceeds(tmp_path):
    import nibabel as nib

    data = tmp_path / "vols"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        nib.save(nib.Nifti1Image(rng.random((8, 8, 8)).astype(np.float32), np.eye(4)), data / f"good{i}.nii.gz")
    nan = rng.random((8, 8, 8)).astype(np.float32)
    nan[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), data / "nan.nii.gz")
    whole = (data / "good0.nii.gz").read_bytes()
    (data / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    entry = {"name": "vols", "modality": "mri", "dims": 3, "task": "ssl", "license": "CC0",
             "source": {"kind": "nifti", "uri": "vols/*.nii.gz"}, "preprocess": {"intensity": {"mode": "zscore"}}}
    catalog = load_catalog(make_catalog(tmp_path, [entry]))
    settings = settings_for(tmp_path / "home")
    summary = ingest_entry(catalog.get("vols"), catalog.base_dir, settings)
    assert summary["n_cases"] == 3 and summary["n_quarantined"] == 2
    from infra.storage import DatasetStore

    reader = DatasetStore(settings.store).open("vols")
    reasons = {q["case_id"]: q["reason"] for q in reader.quarantine}
    assert set(reasons) == {"nan", "truncated"}
    assert "NaN" in reasons["nan"]
    assert reader.cases == ["good0", "good1", "good2"]


def test_zero_good_cases_fails_clearly(tmp_path):
    data = tmp_path / "vols"
    data.mkdir()
    (data / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    entry = {"name": "vols", "modality": "mri", "dims": 3, "task": "ssl", "license": "CC0",
             "source": {"kind": "nifti", "uri": "vols/*.nii.gz"}}
    catalog = load_catalog(make_catalog(tmp_path, [entry]))
    with pytest.raises(IngestError, match="zero good cases"):
        ingest_entry(catalog.get("vols"), catalog.base_dir, settings_for(tmp_path / "home"))


def test_optional_missing_source_is_skipped(tmp_path):
    entry = {"name": "opt", "modality": "mri", "dims": 3, "task": "ssl", "license": "x",
             "source": {"kind": "nifti", "uri": "nowhere/*.nii.gz", "optional": True}}
    catalog = load_catalog(make_catalog(tmp_path, [entry]))
    summary = ingest_entry(catalog.get("opt"), catalog.base_dir, settings_for(tmp_path / "home"))
    assert summary["status"] == "skipped"


def test_records_entries_store_columns(tmp_path):
    entry = {"name": "reports", "modality": "report", "dims": 0, "task": "paired", "license": "CC0",
             "source": {"kind": "synthetic", "generator": "reports", "seed": 1, "n_cases": 7}}
    catalog = load_catalog(make_catalog(tmp_path, [entry]))
    settings = settings_for(tmp_path / "home")
    summary = ingest_entry(catalog.get("reports"), catalog.base_dir, settings)
    assert summary["n_cases"] == 7
    from infra.storage import DatasetStore

    records = DatasetStore(settings.store).open("reports").records("records")
    assert len(records["case_id"]) == 7
    assert all(isinstance(t, str) and t for t in records["text_findings"])


def test_table_rows_with_missing_values_are_kept(tmp_path):
    (tmp_path / "t.csv").write_text("pid,age,score\np1,50,1.5\np2,61,\n")
    entry = {"name": "table", "modality": "expression", "dims": 0, "task": "survival", "license": "CC0",
             "source": {"kind": "table", "format": "csv", "uri": "t.csv", "id_column": "pid"}}
    catalog = load_catalog(make_catalog(tmp_path, [entry]))
    summary = ingest_entry(catalog.get("table"), catalog.base_dir, settings_for(tmp_path / "home"))
    assert (summary["n_cases"], summary["n_quarantined"]) == (2, 0), "a missing value is not a bad case"


KILL_SCRIPT = """
import sys
from pathlib import Path
from infra.settings import Settings
from tasks.catalog import load_catalog
from tasks.ingest.run import ingest_entry
catalog = load_catalog(sys.argv[1])
print(ingest_entry(catalog.get('phantoms'), catalog.base_dir, Settings(home=Path(sys.argv[2])))['version'])
"""


def run_ingest_process(catalog: Path, home: Path, fault: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(catalog), str(home)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def case_digests(home: Path) -> dict[str, str]:
    from infra.storage import DatasetStore

    reader = DatasetStore(str(home / "store")).open("phantoms")
    out = {}
    for case in reader.cases:
        arrays = [reader.read(case, name).tobytes() for name in sorted(reader.array_names(case))]
        out[case] = str(hash(tuple(arrays)))
    return out


@pytest.mark.parametrize("fault", ["after_case:1", "after_case:3", "before_commit"])
def test_sigkill_then_rerun_gives_the_uninterrupted_result(tmp_path, fault):
    catalog = make_catalog(tmp_path, [PHANTOMS])
    reference = run_ingest_process(catalog, tmp_path / "ref", None)
    assert reference.returncode == 0, reference.stderr
    killed = run_ingest_process(catalog, tmp_path / "home", fault)
    assert killed.returncode == -9, killed.stderr
    from infra.storage import DatasetStore

    assert DatasetStore(str(tmp_path / "home" / "store")).versions("phantoms") == [], "no half-version is visible"
    resumed = run_ingest_process(catalog, tmp_path / "home", None)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == reference.stdout.strip()
    assert case_digests(tmp_path / "home") == case_digests(tmp_path / "ref")
