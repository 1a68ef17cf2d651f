"""The catalog schema: the demo catalog loads; every kind of mistake names entry, field and hint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tasks.catalog import CatalogError, load_catalog, resolve_paths

REPO = Path(__file__).resolve().parents[2]

BASE_ENTRY = {
    "name": "tiny", "modality": "ct", "dims": 3, "task": "ssl", "license": "CC0",
    "source": {"kind": "synthetic", "generator": "phantom3d", "seed": 0, "n_cases": 2},
}


def write_catalog(tmp_path: Path, entries: list, extra: dict | None = None) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "entries": entries, **(extra or {})}))
    return path


def entry(**changes) -> dict:
    data = yaml.safe_load(yaml.safe_dump(BASE_ENTRY))
    data.update(changes)
    return data


def test_demo_catalog_loads_and_covers_every_modality():
    catalog = load_catalog(REPO / "catalog.yaml")
    modalities = {e.modality for e in catalog.entries}
    assert {"ct", "mri", "xray", "report", "expression", "pathology"} <= modalities
    kinds = {e.source.kind for e in catalog.entries}
    assert {"nifti", "dicom", "text", "table", "h5ad", "slide", "synthetic"} <= kinds
    seg_tasks = [e for e in catalog.entries if e.task == "segmentation" and e.source.kind == "synthetic"]
    assert len(seg_tasks) >= 5, "a sequence of >= 4 segmentation tasks plus one held-out task"


def test_unknown_key_names_entry_field_and_hint(tmp_path):
    path = write_catalog(tmp_path, [entry(lables={"a": 1})])
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert info.value.entry == "tiny" and info.value.field == "lables"
    assert "unknown keys are errors" in str(info.value)


def test_unknown_key_inside_source(tmp_path):
    bad = entry(source={**BASE_ENTRY["source"], "sede": 3})
    with pytest.raises(CatalogError) as info:
        load_catalog(write_catalog(tmp_path, [bad]))
    assert info.value.field == "source.sede"


def test_unknown_source_kind(tmp_path):
    with pytest.raises(CatalogError) as info:
        load_catalog(write_catalog(tmp_path, [entry(source={"kind": "mp3", "uri": "x"})]))
    assert info.value.field == "source"
    assert "nifti" in info.value.hint


def test_bad_yaml_reports_line(tmp_path):
    path = tmp_path / "catalog.yaml"
    path.write_text("version: 1\nentries:\n  - name: a\n    modality: [ct\n")
    with pytest.raises(CatalogError, match="not valid YAML at line"):
        load_catalog(path)


def test_yaml_tags_are_not_executed(tmp_path):
    path = tmp_path / "catalog.yaml"
    path.write_text("version: 1\nentries: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(CatalogError):
        load_catalog(path)


def test_duplicate_names(tmp_path):
    with pytest.raises(CatalogError, match="used twice"):
        load_catalog(write_catalog(tmp_path, [entry(), entry()]))


def test_segmentation_needs_labels(tmp_path):
    with pytest.raises(CatalogError) as info:
        load_catalog(write_catalog(tmp_path, [entry(task="segmentation")]))
    assert "labels" in str(info.value)


def test_bad_name_and_literal(tmp_path):
    with pytest.raises(CatalogError) as info:
        load_catalog(write_catalog(tmp_path, [entry(name="Bad Name")]))
    assert info.value.field == "name"
    with pytest.raises(CatalogError) as info:
        load_catalog(write_catalog(tmp_path, [entry(modality="ultrasoundish")]))
    assert info.value.field == "modality" and "expected" in str(info.value)


def test_pairs_must_name_an_entry(tmp_path):
    with pytest.raises(CatalogError) as info:
        load_catalog(write_catalog(tmp_path, [entry(pairs={"entry": "nope"})]))
    assert info.value.field == "pairs.entry"


def test_split_ratios_must_sum_to_one(tmp_path):
    with pytest.raises(CatalogError) as info:
        load_catalog(write_catalog(tmp_path, [entry(splits={"ratios": {"train": 0.5, "test": 0.2}})]))
    assert info.value.field.startswith("splits")


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(CatalogError, match="unknown top-level"):
        load_catalog(write_catalog(tmp_path, [entry()], extra={"secrets": {"token": "x"}}))


def test_paths_cannot_escape_root(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "outside.nii.gz").write_bytes(b"x")
    (root / "inside.nii.gz").write_bytes(b"x")
    os.symlink(tmp_path / "outside.nii.gz", root / "link.nii.gz")
    with pytest.raises(CatalogError, match="outside the declared root"):
        resolve_paths("data/*.nii.gz", base_dir=tmp_path, entry="e")
    with pytest.raises(CatalogError, match="'..'"):
        resolve_paths("data/../outside.nii.gz", base_dir=tmp_path, entry="e")
    (root / "link.nii.gz").unlink()
    assert [p.name for p in resolve_paths("data/*.nii.gz", base_dir=tmp_path, entry="e")] == ["inside.nii.gz"]


def test_pkg_uri_resolves_inside_package():
    paths = resolve_paths("pkg://pydicom/data/test_files/CT_small.dcm", base_dir=Path("."), entry="e")
    assert paths and paths[0].name == "CT_small.dcm"
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_paths("pkg://no_such_package_xyz/a", base_dir=Path("."), entry="e")
