"""The training-side loader: splits, shards, nnU-Net-style patch sampling, case/record iteration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from infra.storage import DatasetStore, VersionReader
from tasks.catalog import Splits
from tasks.loader import PatchSampler, iter_cases, iter_records, open_dataset, paired, shard, split_cases, split_cases_by_id

RATIOS = {"train": 0.7, "val": 0.1, "test": 0.2}


def ids(n: int, prefix: str = "case") -> list[str]:
    return [f"{prefix}{i:04d}" for i in range(n)]


def test_split_is_deterministic_disjoint_covering_and_stable() -> None:
    cases = ids(1000)
    parts = {name: split_cases(cases, name, RATIOS, seed=3) for name in RATIOS}
    assert sorted(sum(parts.values(), [])) == cases
    assert all(set(parts[a]).isdisjoint(parts[b]) for a in parts for b in parts if a != b)
    assert parts == {name: split_cases(list(reversed(cases)), name, RATIOS, seed=3) for name in RATIOS}
    assert abs(len(parts["train"]) / 1000 - 0.7) < 0.05 and abs(len(parts["test"]) / 1000 - 0.2) < 0.05
    # adding cases never moves existing ones; another seed gives another split
    more = {name: split_cases(cases + ids(200, "new"), name, RATIOS, seed=3) for name in RATIOS}
    assert all(set(parts[name]) <= set(more[name]) for name in RATIOS)
    assert split_cases(cases, "train", RATIOS, seed=4) != parts["train"]


def test_explicit_lists_win_and_are_checked() -> None:
    cases = ids(50)
    explicit = {"test": ["case0001", "case0002", "gone"], "holdout": ["case0003"]}
    test = split_cases(cases, "test", RATIOS, 0, explicit)
    assert {"case0001", "case0002"} <= set(test) and "gone" not in test
    assert split_cases(cases, "holdout", RATIOS, 0, explicit) == ["case0003"]
    assert "case0003" not in split_cases(cases, "train", RATIOS, 0, explicit)
    with pytest.raises(ValueError, match="not in the version"):
        split_cases(cases, "test", RATIOS, 0, explicit, strict=True)
    with pytest.raises(ValueError, match="listed in splits"):
        split_cases(cases, "test", RATIOS, 0, {"test": ["case0001"], "val": ["case0001"]})
    with pytest.raises(ValueError, match="unknown split"):
        split_cases(cases, "nope", RATIOS, 0)
    by_id = split_cases_by_id(cases, Splits(seed=0, ratios={"train": 0.8, "test": 0.2}, explicit={"test": ["case0005"]}))
    assert sorted(sum(by_id.values(), [])) == cases and "case0005" in by_id["test"]
    assert by_id["train"] == split_cases(cases, "train", {"train": 0.8, "test": 0.2}, 0, {"test": ["case0005"]})


def test_shard_is_disjoint_covering_and_balanced() -> None:
    cases = ids(23)[::-1]
    parts = [shard(cases, rank, 4) for rank in range(4)]
    assert sorted(sum(parts, [])) == sorted(cases)
    assert {len(p) for p in parts} == {5, 6}
    assert parts[0][:2] == ["case0000", "case0004"]
    with pytest.raises(ValueError):
        shard(cases, 4, 4)


@pytest.fixture
def seg_reader(tmp_path: Path) -> VersionReader:
    """3D cases of 40^3 (one 20^3) with two small foreground blobs (labels 1 and 2)."""
    store = DatasetStore(tmp_path / "store")
    w = store.writer("seg", "v1", {})
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(40, 40, 40), (40, 40, 40), (20, 20, 20)]):
        image = rng.standard_normal(shape).astype(np.float32) + i
        label = np.zeros(shape, np.uint8)
        label[2:5, 3:6, 30 % shape[2]:30 % shape[2] + 3] = 1
        label[10:12, 10:12, 10:12] = 2
        w.write_case(f"c{i}", {"image": image, "label": label}, {"spacing": [1.0, 1.0, 2.0]})
    w.write_case("empty", {"image": np.ones((40, 40, 40), np.float32), "label": np.zeros((40, 40, 40), np.uint8)}, {})
    w.commit()
    return open_dataset(str(tmp_path / "store"), "seg")


def expected_patch(volume: np.ndarray, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    pad = max(size)
    padded = np.pad(volume, pad)
    return padded[tuple(slice(s + pad, s + pad + k) for s, k in zip(start, size))]


def test_patch_sampler_oversamples_foreground_and_pads(seg_reader: VersionReader) -> None:
    cases = ["c0", "c1", "c2"]
    full = {cid: (seg_reader.read(cid), seg_reader.read(cid, "label")) for cid in cases}
    always = PatchSampler(seg_reader, cases, (16, 16, 16), seed=1, foreground_fraction=1.0, num_samples=60)
    for s in always:
        assert s["foreground"] and (s["arrays"]["label"] > 0).any()
    never = list(PatchSampler(seg_reader, cases, (16, 16, 16), seed=1, foreground_fraction=0.0, num_samples=200))
    assert not any(s["foreground"] for s in never)
    assert np.mean([(s["arrays"]["label"] > 0).any() for s in never]) < 0.7
    third = list(PatchSampler(seg_reader, cases, (16, 16, 16), seed=2, num_samples=600))
    assert abs(np.mean([s["foreground"] for s in third]) - 0.33) < 0.06
    for s in third[:100]:
        image, label = full[s["case_id"]]
        assert s["arrays"]["image"].shape == (16, 16, 16) and s["arrays"]["label"].dtype == np.uint8
        np.testing.assert_array_equal(s["arrays"]["image"], expected_patch(image, s["start"], (16, 16, 16)))
        np.testing.assert_array_equal(s["arrays"]["label"], expected_patch(label, s["start"], (16, 16, 16)))
    # patches larger than the volume are padded symmetrically (nnU-Net's get_bbox)
    big = list(PatchSampler(seg_reader, ["c2"], (32, 24, 20), seed=0, num_samples=20, pad_values={"image": -5}))
    for s in big:
        assert s["start"] == (-6, -2, 0)
        image, _ = full["c2"]
        np.testing.assert_array_equal(s["arrays"]["image"][6:26, 2:22], image)
        assert (s["arrays"]["image"][:6] == -5).all() and (s["arrays"]["label"][:6] == 0).all()
    # a case without foreground still yields (random) patches
    assert not next(iter(PatchSampler(seg_reader, ["empty"], (8, 8, 8), foreground_fraction=1.0, num_samples=1)))["foreground"]


def test_patch_sampler_is_deterministic_per_seed_and_epoch(seg_reader: VersionReader) -> None:
    def starts(seed: int, epoch: int = 0) -> list:
        sampler = PatchSampler(seg_reader, ["c0", "c1"], (8, 8, 8), seed=seed, num_samples=20)
        sampler.set_epoch(epoch)
        return [(s["case_id"], s["start"]) for s in sampler]

    assert starts(5) == starts(5)
    assert starts(5) != starts(6) and starts(5) != starts(5, epoch=1)


def test_patch_sampler_channels_2d_and_3d(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path / "store")
    w = store.writer("mixed", "v1", {})
    rgb = np.random.default_rng(0).integers(0, 255, (50, 60, 3), dtype=np.uint8)
    mask = np.zeros((50, 60), np.uint8)
    mask[40:45, 50:55] = 1
    multi = np.random.default_rng(1).standard_normal((2, 12, 14, 16)).astype(np.float32)
    w.write_case("rgb", {"image": rgb, "label": mask}, {})
    w.write_case("mr", {"image": multi}, {})
    w.commit()
    r = store.open("mixed")
    for s in PatchSampler(r, ["rgb"], (32, 32), seed=0, foreground_fraction=1.0, num_samples=10):
        assert s["arrays"]["image"].shape == (32, 32, 3) and s["arrays"]["label"].shape == (32, 32)
        y, x = s["start"]
        np.testing.assert_array_equal(s["arrays"]["image"], rgb[y:y + 32, x:x + 32])
        assert s["arrays"]["label"].any()
    for s in PatchSampler(r, ["mr"], (8, 8, 8), seed=0, arrays=("image",), num_samples=10):
        z, y, x = s["start"]
        np.testing.assert_array_equal(s["arrays"]["image"], multi[:, z:z + 8, y:y + 8, x:x + 8])
    with pytest.raises(ValueError, match="axes"):
        next(iter(PatchSampler(r, ["mr"], (8, 8), arrays=("image",), num_samples=1)))


def test_iter_cases_records_and_pairs(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path / "store")
    w = store.writer("cxr", "v1", {})
    for cid in ("p1", "p2", "p3"):
        w.write_case(cid, {"image": np.full((4, 4), int(cid[1]), np.float32)}, {"view": "PA"})
    w.commit()
    w = store.writer("reports", "v1", {})
    w.write_records("records", {"case_id": ["p2", "p3", "p9"], "text": ["a b", "c", None], "n": np.array([1, 2, 3])})
    w.commit()
    images, reports = store.open("cxr"), store.open("reports")
    cases = list(iter_cases(images, ["p2", "p1"]))
    assert [c["case_id"] for c in cases] == ["p2", "p1"] and cases[0]["attrs"] == {"view": "PA"}
    assert (cases[0]["arrays"]["image"] == 2).all()
    rows = list(iter_records(reports))
    assert rows[0] == {"case_id": "p2", "text": "a b", "n": 1} and rows[2]["text"] is None
    assert isinstance(rows[0]["n"], int)
    assert paired(images, reports) == ["p2", "p3"]
