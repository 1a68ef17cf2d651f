"""Tests of the seeded synthetic generators (tasks/ingest/synthetic.py).

They check what the rest of the pipeline relies on: bytes reproducible per case whatever
``n_cases`` is, digests that move with every parameter, label maps that follow ``structures``,
and signal a model can learn (organ contrast, a visible cardiomegaly, subtypes predictable
from each modality, survival differing across subtypes). Pure numpy/scipy, a few seconds.
"""

from __future__ import annotations

import pickle
import time
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from tasks.catalog import CatalogError, Entry
from tasks.ingest import synthetic
from tasks.ingest.synthetic import (
    CXR_FINDINGS,
    PHANTOM_STRUCTURES,
    check_report_pairing,
    list_synthetic_cases,
    pathology_gene_names,
    sample_cxr_findings,
)
from tasks.ingest.types import RawCase

_MODALITY = {"phantom3d": "ct", "radiograph2d": "xray", "reports": "report", "pathology_pairs": "pathology"}
_DIMS = {"phantom3d": 3, "radiograph2d": 2, "reports": 0, "pathology_pairs": 0}


def make_entry(generator: str, *, name: str = "synthetic-test", task: str = "ssl", labels: Any = None,
               dims: int | None = None, **source: Any) -> Entry:
    """A catalog entry with a synthetic source, validated by the real schema."""
    raw: dict[str, Any] = {
        "name": name, "modality": _MODALITY[generator], "dims": _DIMS[generator] if dims is None else dims, "task": task,
        "license": "CC0-1.0", "source": {"kind": "synthetic", "generator": generator, **source},
    }
    if labels is not None:
        raw["labels"] = labels
    return Entry.model_validate(raw)


def load_all(generator: str, **source: Any) -> list[RawCase]:
    return [ref.load() for ref in list_synthetic_cases(make_entry(generator, **source))]


@pytest.fixture(scope="module")
def phantoms() -> list[RawCase]:
    """Eight default phantoms (all structures labelled in canonical order)."""
    return load_all("phantom3d", seed=11, n_cases=8)


# --------------------------------------------------------------------------- listing and digests
def test_refs_are_lazy_with_ids_and_no_sources() -> None:
    refs = list_synthetic_cases(make_entry("phantom3d", n_cases=3))
    assert [r.case_id for r in refs] == ["phantom-0000", "phantom-0001", "phantom-0002"]
    assert all(r.sources == [] and len(r.source_digest or "") == 64 for r in refs)
    assert len({r.source_digest for r in refs}) == 3
    assert [r.case_id for r in list_synthetic_cases(make_entry("pathology_pairs", n_cases=1))] == ["path-0000"]
    assert [r.case_id for r in list_synthetic_cases(make_entry("radiograph2d", n_cases=1))] == ["cxr-0000"]
    assert [r.case_id for r in list_synthetic_cases(make_entry("reports", n_cases=1))] == ["cxr-0000"]
    custom = list_synthetic_cases(make_entry("reports", n_cases=1, options={"id_prefix": "iu_xray"}))
    assert custom[0].case_id == "iu_xray-0000"


@pytest.mark.parametrize("change", [
    {"seed": 1}, {"n_cases": 5}, {"shape": [32, 32, 32]}, {"structures": ["liver"]},
    {"options": {"noise_hu": 10.0}}, {"options": {"id_prefix": "ct"}},
])
def test_digest_changes_with_every_parameter(change: dict[str, Any]) -> None:
    base = list_synthetic_cases(make_entry("phantom3d", n_cases=4))[2].source_digest
    assert list_synthetic_cases(make_entry("phantom3d", n_cases=4))[2].source_digest == base
    changed = {"n_cases": 4, **change}
    assert list_synthetic_cases(make_entry("phantom3d", **changed))[2].source_digest != base


def test_digest_covers_generator_version_and_resolved_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    base = list_synthetic_cases(make_entry("phantom3d", n_cases=1))[0].source_digest
    explicit = make_entry("phantom3d", n_cases=1, shape=[64, 64, 64], structures=list(PHANTOM_STRUCTURES),
                          options={"noise_hu": 20.0, "tumor_probability": 0.6})
    assert list_synthetic_cases(explicit)[0].source_digest == base  # same bytes -> same version
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", "test-bump")
    assert list_synthetic_cases(make_entry("phantom3d", n_cases=1))[0].source_digest != base
    reports = list_synthetic_cases(make_entry("reports", n_cases=1))[0].source_digest
    radiographs = list_synthetic_cases(make_entry("radiograph2d", n_cases=1))[0].source_digest
    assert reports != radiographs


@pytest.mark.parametrize("source, field", [
    ({"generator": "phantom3d", "options": {"noize_hu": 1}}, "source.options.noize_hu"),
    ({"generator": "phantom3d", "options": {"noise_hu": "loud"}}, "source.options.noise_hu"),
    ({"generator": "phantom3d", "structures": ["liver", "pancreas"]}, "source.structures"),
    ({"generator": "phantom3d", "structures": ["liver", "liver"]}, "source.structures"),
    ({"generator": "phantom3d", "shape": [64, 64]}, "source.shape"),
    ({"generator": "reports", "shape": [64, 64]}, "source.shape"),
    ({"generator": "radiograph2d", "structures": ["heart"]}, "source.structures"),
    ({"generator": "radiograph2d", "options": {"finding_probabilities": {"edema": 0.1}}},
     "source.options.finding_probabilities"),
])
def test_bad_parameters_name_the_field(source: dict[str, Any], field: str) -> None:
    generator = source.pop("generator")
    with pytest.raises(CatalogError) as err:
        list_synthetic_cases(make_entry(generator, **source))
    assert err.value.field == field and err.value.entry == "synthetic-test"


def test_entry_dims_must_match_the_generator() -> None:
    with pytest.raises(CatalogError) as err:
        list_synthetic_cases(make_entry("phantom3d", dims=2))
    assert err.value.field == "dims" and "dims: 3" in str(err.value)


def test_loads_survive_pickling() -> None:
    """Workers (Ray, multiprocessing) receive the refs' load callables by pickle."""
    ref = list_synthetic_cases(make_entry("pathology_pairs", n_cases=2))[1]
    clone = pickle.loads(pickle.dumps(ref.load))
    assert clone().arrays["expression"].tobytes() == ref.load().arrays["expression"].tobytes()


def test_classification_labels_must_cover_the_findings() -> None:
    classes = ["normal", "cardiomegaly", "nodule", "pleural_effusion"]
    ok = make_entry("radiograph2d", task="classification", labels=classes)
    assert len(list_synthetic_cases(ok)) == 8
    with_pneumothorax = make_entry("radiograph2d", task="classification", labels=classes,
                                   options={"finding_probabilities": {"pneumothorax": 0.1}})
    with pytest.raises(CatalogError, match="pneumothorax: 0") as err:
        list_synthetic_cases(with_pneumothorax)
    assert err.value.field == "labels"


def test_segmentation_labels_must_match_structures() -> None:
    good = make_entry("phantom3d", task="segmentation", structures=["spleen", "liver"],
                      labels={"background": 0, "spleen": 1, "liver": 2})
    assert len(list_synthetic_cases(good)) == 8
    swapped = make_entry("phantom3d", task="segmentation", structures=["spleen", "liver"],
                         labels={"background": 0, "liver": 1, "spleen": 2})
    with pytest.raises(CatalogError, match="spleen: 1, liver: 2"):
        list_synthetic_cases(swapped)


# --------------------------------------------------------------------------- phantom3d
def test_phantom_same_seed_same_bytes_different_seed_different() -> None:
    first = list_synthetic_cases(make_entry("phantom3d", seed=3, n_cases=2))[1].load()
    again = list_synthetic_cases(make_entry("phantom3d", seed=3, n_cases=2))[1].load()
    other = list_synthetic_cases(make_entry("phantom3d", seed=4, n_cases=2))[1].load()
    for role in ("image", "label"):
        assert first.arrays[role].tobytes() == again.arrays[role].tobytes()
    assert first.arrays["image"].tobytes() != other.arrays["image"].tobytes()
    assert first.meta == again.meta


def test_phantom_case_does_not_depend_on_n_cases() -> None:
    small = list_synthetic_cases(make_entry("phantom3d", seed=3, n_cases=3))
    large = list_synthetic_cases(make_entry("phantom3d", seed=3, n_cases=7))
    a, b = small[2].load(), large[2].load()
    assert a.case_id == b.case_id == "phantom-0002"
    assert a.arrays["image"].tobytes() == b.arrays["image"].tobytes()
    assert a.arrays["label"].tobytes() == b.arrays["label"].tobytes()
    assert large[5].load().arrays["image"].tobytes() != b.arrays["image"].tobytes()


def test_phantom_arrays_meta_and_speed(phantoms: list[RawCase]) -> None:
    case = phantoms[0]
    image, label = case.arrays["image"], case.arrays["label"]
    assert image.shape == label.shape == (64, 64, 64)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert case.meta["spacing"] == [1.5, 1.5, 1.5] and case.meta["modality_hint"] == "ct"
    assert np.allclose(case.meta["affine"], np.diag([1.5, 1.5, 1.5, 1.0]))
    assert -1200 < image.min() < -800 and 500 < image.max() < 1200  # air and bone, in HU
    assert case.meta["labels"] == {"background": 0, **{s: i + 1 for i, s in enumerate(PHANTOM_STRUCTURES)}}
    entry = make_entry("phantom3d", seed=2, n_cases=1)
    timings = []
    for _ in range(3):
        ref = list_synthetic_cases(entry)[0]
        start = time.perf_counter()
        ref.load()
        timings.append(time.perf_counter() - start)
    assert min(timings) < 0.2


def test_phantom_labels_follow_structures_order_and_image_is_unchanged() -> None:
    full = load_all("phantom3d", seed=5, n_cases=3)
    subset = load_all("phantom3d", seed=5, n_cases=3, structures=["kidney_right", "liver", "tumor"])
    liver_only = load_all("phantom3d", seed=5, n_cases=3, structures=["liver"])
    index = {name: i + 1 for i, name in enumerate(PHANTOM_STRUCTURES)}
    for f, s, lo in zip(full, subset, liver_only):
        assert f.arrays["image"].tobytes() == s.arrays["image"].tobytes() == lo.arrays["image"].tobytes()
        canonical, lab = f.arrays["label"], s.arrays["label"]
        assert set(np.unique(lab)) <= {0, 1, 2, 3}
        assert np.array_equal(lab == 1, canonical == index["kidney_right"])
        assert np.array_equal(lab == 2, canonical == index["liver"])
        assert np.array_equal(lab == 3, canonical == index["tumor"])
        # without a tumour label the lesion is part of the liver
        assert np.array_equal(lo.arrays["label"] == 1, np.isin(canonical, [index["liver"], index["tumor"]]))
        assert s.meta["labels"] == {"background": 0, "kidney_right": 1, "liver": 2, "tumor": 3}


def test_phantom_structures_present_and_varied(phantoms: list[RawCase]) -> None:
    counts = np.array([[int((c.arrays["label"] == i + 1).sum()) for i in range(len(PHANTOM_STRUCTURES))]
                       for c in phantoms])
    organs = [i for i, s in enumerate(PHANTOM_STRUCTURES) if s != "tumor"]
    assert (counts[:, organs] > 20).all()
    tumour = counts[:, PHANTOM_STRUCTURES.index("tumor")]
    assert 2 <= (tumour > 0).sum() <= 7
    assert all(c.meta["tumor"] == bool(t) for c, t in zip(phantoms, tumour))
    # sizes vary between patients by more than a few voxels
    assert (counts[:, organs].std(axis=0) / counts[:, organs].mean(axis=0) > 0.03).all()
    no_tumour = load_all("phantom3d", seed=11, n_cases=3, options={"tumor_probability": 0.0})
    assert not any(c.meta["tumor"] for c in no_tumour)


def test_phantom_structures_contrast_with_their_surroundings(phantoms: list[RawCase]) -> None:
    for case in phantoms[:5]:
        image, label = case.arrays["image"], case.arrays["label"]
        for i, name in enumerate(PHANTOM_STRUCTURES):
            mask = label == i + 1
            if mask.sum() < 10:
                continue
            ring = ndimage.binary_dilation(mask, iterations=2) & ~mask
            if name == "tumor":
                ring &= label == PHANTOM_STRUCTURES.index("liver") + 1
            inside, around = float(image[mask].mean()), float(image[ring].mean())
            assert abs(inside - around) >= 20, (case.case_id, name, inside, around)


# --------------------------------------------------------------------------- radiograph2d and reports
def test_radiograph_arrays_meta_and_determinism() -> None:
    refs = list_synthetic_cases(make_entry("radiograph2d", seed=2, n_cases=2))
    case = refs[1].load()
    image = case.arrays["image"]
    assert image.shape == (128, 128) and image.dtype == np.uint8
    assert image.min() < 40 and image.max() > 180
    assert len(case.meta["spacing"]) == 2 and case.meta["modality_hint"] == "xray"
    assert set(case.meta["findings"]) <= {"normal", *CXR_FINDINGS}
    assert case.meta["label"] == case.meta["findings"][0]
    assert sum(case.meta["multi_hot"].values()) == len(case.meta["findings"])
    again = list_synthetic_cases(make_entry("radiograph2d", seed=2, n_cases=9))[1].load()
    assert again.arrays["image"].tobytes() == image.tobytes()
    other = list_synthetic_cases(make_entry("radiograph2d", seed=3, n_cases=2))[1].load()
    assert other.arrays["image"].tobytes() != image.tobytes()


def test_reports_pair_with_radiographs_by_id_and_findings() -> None:
    options = {"finding_probabilities": {"pneumothorax": 0.15}}
    radiographs = list_synthetic_cases(make_entry("radiograph2d", seed=7, n_cases=24, shape=[32, 32], options=options))
    reports = load_all("reports", seed=7, n_cases=24, options=options)
    assert [r.case_id for r in radiographs] == [r.case_id for r in reports]
    seen: set[str] = set()
    for ref, report in zip(radiographs, reports):
        image = ref.load()
        assert report.meta["labels"] == image.meta["findings"]
        assert report.meta["finding_details"] == image.meta["finding_details"]
        assert "image" not in report.arrays and not report.arrays
        text = report.meta["text"]
        assert set(text) == {"findings", "impression"} and all(text.values())
        body = (text["findings"] + " " + text["impression"]).lower()
        details = report.meta["finding_details"]
        if report.meta["labels"] == ["normal"]:
            assert "no pleural effusion" in body and "pneumothorax." in body
        if "cardiomegaly" in details:
            assert "cardiomegaly" in body or "enlarged" in body
        for finding, word in (("pleural_effusion", "effusion"), ("nodule", "nodul"), ("pneumothorax", "pneumothorax")):
            if finding in details:
                assert word in body and details[finding]["side"] in body
        if "pleural_effusion" not in details and "pneumothorax" not in details:
            assert "effusion or pneumothorax" in body
        seen.update(report.meta["labels"])
    assert seen == {"normal", *CXR_FINDINGS}
    again = load_all("reports", seed=7, n_cases=3, options=options)
    assert [r.meta["text"] for r in again] == [r.meta["text"] for r in reports[:3]]


def test_report_pairing_check() -> None:
    radiographs = make_entry("radiograph2d", name="cxr-images", seed=3)
    check_report_pairing(make_entry("reports", name="cxr-reports", seed=3, n_cases=4), radiographs)
    with pytest.raises(CatalogError) as err:
        check_report_pairing(make_entry("reports", name="cxr-reports", seed=4), radiographs)
    assert err.value.field == "source.seed"
    with pytest.raises(CatalogError) as err:
        check_report_pairing(make_entry("reports", name="cxr-reports", seed=3,
                                        options={"finding_probabilities": {"nodule": 0.5}}), radiographs)
    assert err.value.field == "source.options.finding_probabilities"


def test_findings_stream_is_shared_and_independent_of_rendering() -> None:
    a = sample_cxr_findings(4, 10)
    assert a == sample_cxr_findings(4, 10)
    forced = sample_cxr_findings(4, 10, {"cardiomegaly": 1.0})
    assert "cardiomegaly" in forced.findings
    for name in ("nodule", "pleural_effusion", "pneumothorax"):
        assert (name in forced.findings) == (name in a.findings)
    rates = np.mean([[f in sample_cxr_findings(0, i).findings for f in CXR_FINDINGS] for i in range(400)], axis=0)
    assert np.allclose(rates, [0.25, 0.2, 0.2, 0.0], atol=0.06)


def test_cardiomegaly_widens_the_heart_shadow() -> None:
    probabilities = {"cardiomegaly": 0.5, "pleural_effusion": 0.0, "nodule": 0.0, "pneumothorax": 0.0}
    cases = load_all("radiograph2d", seed=5, n_cases=40, shape=[64, 64],
                     options={"finding_probabilities": probabilities})

    def heart_width(image: np.ndarray) -> float:
        """Mean count of pixels per row, in the rows above the diaphragm, brighter than halfway
        between the lung fields and the mediastinum."""
        img = image.astype(np.float64)
        h, w = img.shape
        band = img[int(0.48 * h):int(0.62 * h), int(0.15 * w):int(0.85 * w)]
        lung = np.percentile(band, 10)
        mediastinum = np.median(img[int(0.48 * h):int(0.62 * h), int(0.45 * w):int(0.55 * w)])
        return float((band > (lung + mediastinum) / 2).sum(axis=1).mean())

    big = [heart_width(c.arrays["image"]) for c in cases if c.meta["findings"] == ["cardiomegaly"]]
    normal = [heart_width(c.arrays["image"]) for c in cases if c.meta["findings"] == ["normal"]]
    assert len(big) >= 8 and len(normal) >= 8
    pooled = np.sqrt((np.var(big) + np.var(normal)) / 2)
    assert np.mean(big) - np.mean(normal) > pooled


# --------------------------------------------------------------------------- pathology_pairs
@pytest.fixture(scope="module")
def patients() -> list[RawCase]:
    return load_all("pathology_pairs", seed=1, n_cases=200)


def _nearest_centroid_accuracy(x: np.ndarray, y: np.ndarray, n_train: int) -> float:
    mean, std = x[:n_train].mean(axis=0), x[:n_train].std(axis=0) + 1e-6
    x = (x - mean) / std
    classes = np.unique(y[:n_train])
    centroids = np.stack([x[:n_train][y[:n_train] == k].mean(axis=0) for k in classes])
    predicted = classes[((x[n_train:, None, :] - centroids[None]) ** 2).sum(axis=-1).argmin(axis=1)]
    return float((predicted == y[n_train:]).mean())


def test_pathology_arrays_and_meta(patients: list[RawCase]) -> None:
    case = patients[0]
    assert case.arrays["features"].shape == (32, 64) and case.arrays["features"].dtype == np.float32
    assert case.arrays["expression"].shape == (200,) and case.arrays["expression"].dtype == np.float32
    assert case.meta["subtype"] in {"subtype_A", "subtype_B", "subtype_C", "subtype_D"}
    assert isinstance(case.meta["survival_time"], float) and case.meta["survival_time"] > 0
    assert isinstance(case.meta["event"], bool)
    names = pathology_gene_names(200)
    assert len(names) == len(set(names)) == 200
    sized = load_all("pathology_pairs", n_cases=1, options={"n_patches": 8, "feature_dim": 16, "n_genes": 50})[0]
    assert sized.arrays["features"].shape == (8, 16) and sized.arrays["expression"].shape == (50,)
    again = list_synthetic_cases(make_entry("pathology_pairs", seed=1, n_cases=3))[2].load()
    assert again.arrays["features"].tobytes() == patients[2].arrays["features"].tobytes()
    assert again.meta == patients[2].meta


def test_subtype_is_predictable_from_each_modality(patients: list[RawCase]) -> None:
    y = np.array([c.meta["subtype"] for c in patients])
    assert len(set(y)) == 4
    expression = np.stack([c.arrays["expression"] for c in patients])
    slide = np.stack([c.arrays["features"].mean(axis=0) for c in patients])
    assert _nearest_centroid_accuracy(expression, y, 150) > 0.7
    assert _nearest_centroid_accuracy(slide, y, 150) > 0.7


def test_survival_depends_on_subtype_and_is_censored(patients: list[RawCase]) -> None:
    y = np.array([c.meta["subtype"] for c in patients])
    time_ = np.array([c.meta["survival_time"] for c in patients])
    event = np.array([c.meta["event"] for c in patients])
    assert 0.15 < 1 - event.mean() < 0.45
    medians = [np.median(time_[y == k]) for k in np.unique(y)]
    assert max(medians) / min(medians) > 2.0
    # the latent risk shared by both modalities: a ridge readout of expression predicts log time
    x = np.stack([c.arrays["expression"] for c in patients])
    x = (x - x[:150].mean(axis=0)) / (x[:150].std(axis=0) + 1e-6)
    target = np.log(time_)
    onehot = (y[:, None] == np.unique(y)[None, :]).astype(float)
    design = np.concatenate([x, onehot], axis=1)
    coef = np.linalg.solve(design[:150].T @ design[:150] + 50.0 * np.eye(design.shape[1]),
                           design[:150].T @ (target[:150] - target[:150].mean()))
    predicted = design[150:] @ coef
    assert np.corrcoef(predicted, target[150:])[0, 1] > 0.2
