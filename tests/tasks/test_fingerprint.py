"""Fingerprints match numpy on small data, before and after commit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from infra.storage import DatasetStore
from tasks.fingerprint import compute_fingerprint, fingerprint_version, tokenize

SHAPES = [(10, 12, 14), (8, 16, 12), (12, 12, 12)]
SPACINGS = [[1.0, 1.0, 2.5], [0.8, 0.8, 3.0], [1.2, 1.0, 2.0]]


def cases() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for i, shape in enumerate(SHAPES):
        image = (rng.standard_normal(shape) * 50 + 100 * i).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        label[2:6, 2:6, 2:6] = 1
        if i != 1:
            label[7:9, 7:9, 7:9] = 3
        out.append((image, label))
    return out


@pytest.fixture
def writer(tmp_path: Path):
    store = DatasetStore(tmp_path / "store")
    w = store.writer("seg", "v1", {})
    for i, ((image, label), spacing) in enumerate(zip(cases(), SPACINGS)):
        w.write_case(f"c{i}", {"image": image, "label": label}, {"spacing": spacing})
    w.write_records("records", {"text": ["The heart is normal.", "heart: Normal; lungs clear", None],
                                "age": [30.0, None, 50.0], "expr": np.arange(6, dtype=np.float32).reshape(3, 2)})
    return w


def test_image_statistics_match_numpy(writer) -> None:
    fp = compute_fingerprint(writer)
    data = cases()
    voxels = np.concatenate([img.ravel() for img, _ in data]).astype(np.float64)
    fg = np.concatenate([img[lab > 0] for img, lab in data]).astype(np.float64)
    assert fp["n_cases"] == 3 and fp["n_image_cases"] == 3
    for got, ref in ((fp["intensity"], voxels), (fp["foreground_intensity"], fg)):
        assert got["n_voxels"] == ref.size and got["exact_percentiles"]
        assert got["mean"] == pytest.approx(ref.mean(), rel=1e-9)
        assert got["std"] == pytest.approx(ref.std(), rel=1e-9)
        assert (got["min"], got["max"]) == (ref.min(), ref.max())
        p = np.percentile(ref, [0.5, 50, 99.5])
        assert [got["percentile_000_5"], got["percentile_050_0"], got["percentile_099_5"]] == pytest.approx(p.tolist())
    shapes = np.array(SHAPES)
    assert fp["shape"] == {"ndim": 3, "min": shapes.min(0).tolist(), "median": np.median(shapes, 0).tolist(),
                           "max": shapes.max(0).tolist()}
    spacing = np.array(SPACINGS)
    assert fp["spacing"]["median"] == pytest.approx(np.median(spacing, 0).tolist())
    assert fp["spacing"]["min"] == spacing.min(0).tolist()
    labels = np.concatenate([lab.ravel() for _, lab in data])
    assert fp["labels"]["voxels"] == {str(v): int((labels == v).sum()) for v in (0, 1, 3)}
    assert fp["labels"]["case_fraction"] == {"0": 1.0, "1": 1.0, "3": pytest.approx(2 / 3)}


def test_records_statistics(writer) -> None:
    rec = compute_fingerprint(writer)["records"]["records"]
    assert rec["n_records"] == 3
    text = rec["columns"]["text"]
    tokens = tokenize("The heart is normal.") + tokenize("heart: Normal; lungs clear")
    assert tokens[:2] == ["the", "heart"]
    assert text == {"kind": "text", "vocab_size": len(set(tokens)), "n_tokens": len(tokens), "mean_tokens": len(tokens) / 2,
                    "n_null": 1}
    age = rec["columns"]["age"]
    assert (age["n_nan"], age["mean"], age["std"]) == (1, 40.0, 10.0)
    assert rec["columns"]["expr"]["mean"] == pytest.approx(2.5) and rec["columns"]["expr"]["shape"] == [3, 2]


def test_sampled_percentiles_and_committed_reader_agree(writer) -> None:
    before = compute_fingerprint(writer, sample_per_case=300, seed=1)
    assert not before["intensity"]["exact_percentiles"] and before["intensity"]["n_sampled"] == 900
    voxels = np.concatenate([img.ravel() for img, _ in cases()])
    assert before["intensity"]["percentile_050_0"] == pytest.approx(np.median(voxels), abs=20)
    writer.commit({"fingerprint": before})
    reader = writer.store.open("seg")
    assert compute_fingerprint(reader, sample_per_case=300, seed=1) == before
    assert reader.attrs["fingerprint"]["intensity"]["mean"] == pytest.approx(before["intensity"]["mean"])
    subset = compute_fingerprint(reader, ["c1"], tables=[])
    assert subset["n_cases"] == 1 and subset["labels"]["case_fraction"] == {"0": 1.0, "1": 1.0} and subset["records"] == {}


def test_fingerprint_version_annotates_from_the_catalog_entry(writer) -> None:
    class Entry:
        dims, modality, labels = 3, "ct", {"background": 0, "liver": 1, "tumour": 3}

    fp = fingerprint_version(writer, Entry())
    assert fp["label_names"] == {"0": "background", "1": "liver", "3": "tumour"} and fp["dims"] == 3
