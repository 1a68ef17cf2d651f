"""The versioned store: round trips, atomic commit, resume after a kill, quarantine, patch reads."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from infra.storage import DatasetStore, StoreError, VersionNotFoundError, check_name

REPO = Path(__file__).resolve().parents[2]
PLAN = {"preprocess": {"spacing": [1.0, 1.0, 1.0]}, "n": np.int64(3)}


@pytest.fixture
def store(tmp_path: Path) -> DatasetStore:
    return DatasetStore(tmp_path / "store")


def volume(seed: int, shape: tuple[int, ...] = (30, 27, 19)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 100).astype(np.float32)


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


def test_round_trip_arrays_attrs_and_zarr_compatibility(store: DatasetStore) -> None:
    image, label = volume(0), (volume(1) > 50).astype(np.uint8)
    others = {
        "mask": np.random.default_rng(2).random((9, 10)) > 0.5,
        "counts": np.arange(-50, 50, dtype=np.int16),
        "big_endian": np.arange(24, dtype=">f8").reshape(2, 3, 4),
        "multi": np.random.default_rng(3).standard_normal((2, 12, 11, 10)).astype(np.float32),
        "zeros": np.zeros((20, 20, 20), np.float32),
    }
    w = store.writer("ds", "v1", PLAN)
    rec = w.write_case("c2", {"image": image, "label": label}, {"spacing": np.array([1.5, 1.0, 1.0]), "n": np.int32(4)})
    w.write_case("c1", others, {})
    info = w.commit({"fingerprint": {"x": 1}})
    assert (info.dataset, info.version, info.n_cases, info.n_quarantined) == ("ds", "v1", 2, 0)

    r = store.open("ds")
    assert r.cases == ["c1", "c2"]
    assert r.case_attrs("c2") == {"spacing": [1.5, 1.0, 1.0], "n": 4}
    assert r.attrs["fingerprint"] == {"x": 1} and r.attrs["plan"]["n"] == 3
    assert r.array_names("c2") == ["image", "label"]
    assert r.shape("c2", "image") == image.shape
    assert rec["arrays"]["image"]["sha256"] == hashlib.sha256(image.tobytes()).hexdigest()
    assert r.record("c2") == rec
    np.testing.assert_array_equal(r.read("c2"), image)
    np.testing.assert_array_equal(r.read("c2", "label"), label)
    for name, arr in others.items():
        got = r.read("c1", name)
        assert got.dtype == arr.dtype.newbyteorder("=") and got.shape == arr.shape
        np.testing.assert_array_equal(got, arr)
        np.testing.assert_array_equal(r.zarr_array("c1", name)[...], arr)  # standard zarr v3
    np.testing.assert_array_equal(r.zarr_array("c2", "image")[...], image)
    assert r.verify() == []


def test_reads_arrays_written_by_zarr_python(store: DatasetStore) -> None:
    """The fast reader decodes zarr-python's sharded blosc arrays; other layouts fall back."""
    image = volume(4, (40, 33, 20))
    w = store.writer("ds", "v1", {})
    w.write_case("a", {"image": image, "plain": image}, {})
    w.commit()
    base = Path(store.root) / "ds" / "v1" / "cases" / "a"
    z = zarr.create_array(store=str(base / "image"), shape=image.shape, dtype="float32", chunks=(16, 16, 16),
                          shards=(32, 32, 32), compressors=zarr.codecs.BloscCodec(cname="zstd", shuffle="shuffle"),
                          overwrite=True)
    z[...] = image
    z = zarr.create_array(store=str(base / "plain"), shape=image.shape, dtype="float32", chunks=(8, 8, 8), overwrite=True)
    z[...] = image
    r = store.open("ds")
    for name in ("image", "plain"):
        np.testing.assert_array_equal(r.read("a", name), image)
        np.testing.assert_array_equal(r.read_patch("a", name, (5, 30, 3), (30, 10, 17)), image[5:35, 30:40, 3:20])
    assert type(r._array("a", "image")).__name__ == "_FastArray"
    assert type(r._array("a", "plain")).__name__ == "_ZarrArray"


@pytest.mark.parametrize("cache_bytes", [0, 1 << 20])
def test_read_patch_equals_numpy_slicing(tmp_path: Path, cache_bytes: int) -> None:
    # small shards force a multi-shard layout; inner chunks 8^3 with partial edge chunks
    store = DatasetStore(tmp_path / "s", max_shard_bytes=16 * 16 * 16 * 4)
    image = volume(5, (37, 29, 23))
    image[:16, :16, :16] = 0  # whole zero chunks are not stored
    label = (image > 120).astype(np.uint8)
    w = store.writer("ds", "v1", {})
    rec = w.write_case("a", {"image": image, "label": label}, {}, chunks={"image": (8, 8, 8)})
    assert rec["arrays"]["image"]["shards"] == [16, 16, 16]
    w.commit()
    r = store.open("ds", cache_bytes=cache_bytes)
    rng = np.random.default_rng(0)
    for _ in range(60):
        size = tuple(int(rng.integers(0, 24)) for _ in range(3))
        start = tuple(int(rng.integers(0, n + 3)) for n in image.shape)
        expect = image[tuple(slice(s, s + k) for s, k in zip(start, size))]
        np.testing.assert_array_equal(r.read_patch("a", "image", start, size), expect)
        np.testing.assert_array_equal(r.read_patch("a", "label", start, size),
                                      label[tuple(slice(s, s + k) for s, k in zip(start, size))])
    # borders exactly, the whole array, and padded reads with a fill value
    np.testing.assert_array_equal(r.read_patch("a", "image", (29, 21, 15), (8, 8, 8)), image[29:, 21:, 15:])
    np.testing.assert_array_equal(r.read_patch("a", "image", (0, 0, 0), image.shape), image)
    padded = np.pad(image, 50, constant_values=-7)
    for start in [(-10, -3, 0), (30, 25, 20), (-4, 10, -9), (-10, -10, -10)]:
        size = (20, 15, 43)
        got = r.read_patch("a", "image", start, size, fill=-7)
        expect = padded[tuple(slice(s + 50, s + 50 + k) for s, k in zip(start, size))]
        np.testing.assert_array_equal(got, expect)
    assert (r.read_patch("a", "image", (100, 100, 100), (4, 4, 4), fill=3) == 3).all()
    with pytest.raises(ValueError, match="negative start"):
        r.read_patch("a", "image", (-1, 0, 0), (4, 4, 4))
    with pytest.raises(ValueError, match="axes"):
        r.read_patch("a", "image", (0, 0), (4, 4))
    if cache_bytes:
        stats = r.cache_stats
        assert stats["hits"] > 0 and 0 < stats["bytes"] <= cache_bytes


def test_cache_is_bounded_in_bytes(store: DatasetStore) -> None:
    w = store.writer("ds", "v1", {})
    for i in range(4):
        w.write_case(f"c{i}", {"image": volume(i, (48, 48, 48))}, {})
    w.commit()
    limit = 200_000  # ~3 decoded 24^3 float32 chunks
    r = store.open("ds", cache_bytes=limit)
    for i in range(4):
        r.read_patch(f"c{i}", "image", (0, 0, 0), (48, 48, 48))
        assert r.cache_stats["bytes"] <= limit
    assert r.cache_stats["bytes"] > 0
    r.clear_cache()
    r.read("c0")  # whole reads bypass the cache
    assert r.cache_stats["bytes"] == 0


def test_version_is_invisible_until_its_manifest_is_committed(store: DatasetStore) -> None:
    w = store.writer("ds", "v1", PLAN)
    w.write_case("a", {"image": volume(0)}, {})
    assert store.versions("ds") == [] and store.latest("ds") is None
    assert not store.has_version("ds", "v1")
    with pytest.raises(VersionNotFoundError, match="no committed version"):
        store.open("ds")
    info = w.commit()
    assert store.has_version("ds", "v1") and store.latest("ds") == info
    os.remove(Path(store.root) / "ds" / "v1" / "manifest.json")
    assert store.versions("ds") == []


def test_resume_cleans_uncommitted_cases_and_temp_files(store: DatasetStore) -> None:
    from infra.storage import DEFAULT_CHUNK_EDGES, DEFAULT_CODEC, _write_array

    w = store.writer("ds", "v1", PLAN)
    w.write_case("a", {"image": volume(0)}, {"k": "a"})
    w.write_case("b", {"image": volume(1)}, {"k": "b"})
    root = Path(store.root) / "ds" / "v1"
    # a killed attempt: case c's arrays are written but its marker is not; temp files lie around
    _write_array(w._fs, str(root / "cases" / "c" / "image"), volume(2), DEFAULT_CODEC, None, DEFAULT_CHUNK_EDGES, 1 << 30)
    (root / ".manifest.json.tmp-dead").write_bytes(b"{")
    (root / "cases" / ".c.tmp-dead").write_bytes(b"")
    (root / "quarantine").mkdir()
    (root / "quarantine" / ".x.json.tmp-dead").write_bytes(b"")
    (root / "records" / "t" / "col").mkdir(parents=True)  # table without marker

    w2 = store.writer("ds", "v1", PLAN)
    assert w2.committed_cases() == {"a", "b"}
    assert not (root / "cases" / "c").exists()
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]
    assert not (root / "records" / "t").exists()
    assert sorted(w2.reader().cases) == ["a", "b"]
    w2.write_case("c", {"image": volume(2)}, {"k": "c"})
    w2.commit()
    r = store.open("ds")
    assert r.cases == ["a", "b", "c"] and r.case_attrs("a") == {"k": "a"}
    np.testing.assert_array_equal(r.read("c"), volume(2))


def test_sigkill_mid_case_leaves_no_partial_case(store: DatasetStore) -> None:
    """A real SIGKILL between two file writes of a case; the rerun resumes from committed cases."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        import numpy as np
        import infra.storage as s
        w = s.DatasetStore({store.root!r}).writer("ds", "v1", {{}})
        w.write_case("a", {{"image": np.ones((20, 20, 20), np.float32)}}, {{}})
        real, calls = s._LocalFs.write_atomic, []
        def dying(self, path, data, fsync=False):
            calls.append(path)
            if len(calls) == 2:  # the shard of 'image' is written, the shard of 'label' is not
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, path, data, fsync)
        s._LocalFs.write_atomic = dying
        w.write_case("b", {{"image": np.ones((20, 20, 20), np.float32), "label": np.ones((20, 20, 20), np.uint8)}}, {{}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    root = Path(store.root) / "ds" / "v1"
    assert (root / "cases" / "b" / "image").exists() and not (root / "cases" / "b" / "zarr.json").exists()
    w = store.writer("ds", "v1", {})
    assert w.committed_cases() == {"a"} and not (root / "cases" / "b").exists()
    w.write_case("b", {"image": np.full((20, 20, 20), 2, np.float32)}, {})
    w.commit()
    assert store.open("ds").cases == ["a", "b"]


def test_commit_is_idempotent_and_committed_versions_are_immutable(store: DatasetStore) -> None:
    w = store.writer("ds", "v1", PLAN)
    w.write_case("a", {"image": volume(0)}, {})
    info = w.commit({"x": 1})
    manifest = Path(store.root) / "ds" / "v1" / "manifest.json"
    before = (manifest.stat().st_mtime_ns, manifest.read_bytes())
    assert w.commit({"x": 2}) == info
    again = store.writer("ds", "v1", PLAN)
    assert again.committed and again.committed_cases() == {"a"}
    assert again.commit({"x": 3}) == info
    assert (manifest.stat().st_mtime_ns, manifest.read_bytes()) == before
    with pytest.raises(StoreError, match="immutable"):
        again.write_case("b", {"image": volume(1)}, {})
    with pytest.raises(StoreError, match="immutable"):
        again.quarantine("b", "late")
    assert store.open("ds").attrs["x"] == 1


def test_a_different_plan_for_the_same_version_is_refused(store: DatasetStore) -> None:
    store.writer("ds", "v1", {"a": 1})
    with pytest.raises(ValueError, match="different plan"):
        store.writer("ds", "v1", {"a": 2})


def test_quarantine_is_listed_and_exclusive_with_cases(store: DatasetStore) -> None:
    w = store.writer("ds", "v1", {})
    w.write_case("a", {"image": volume(0)}, {})
    w.write_case("b", {"image": volume(1)}, {})
    w.quarantine("bad id/../x", "unreadable header", "/data/x.nii.gz")
    w.quarantine("b", "label out of range", None)
    w.quarantine("c", "empty", None)
    w.write_case("c", {"image": volume(2)}, {})  # a later good write lifts the quarantine
    assert {q["case_id"] for q in w.quarantined()} == {"bad id/../x", "b"}
    info = w.commit()
    assert (info.n_cases, info.n_quarantined) == (2, 2)
    r = store.open("ds")
    assert r.cases == ["a", "c"]
    assert r.quarantine == [
        {"case_id": "b", "reason": "label out of range", "source": None},
        {"case_id": "bad id/../x", "reason": "unreadable header", "source": "/data/x.nii.gz"},
    ]


@pytest.mark.parametrize("bad", ["", "..", "../x", "a/b", "a\\b", ".hidden", "a b", "x..y", "meta.json", "é", "-x", "a" * 201])
def test_unsafe_names_are_rejected(store: DatasetStore, bad: str) -> None:
    w = store.writer("ds", "v1", {})
    before = files_under(Path(store.root).parent)
    with pytest.raises(ValueError, match="invalid case id"):
        w.write_case(bad, {"image": volume(0)}, {})
    with pytest.raises(ValueError, match="invalid array name"):
        w.write_case("ok", {bad: volume(0)}, {})
    with pytest.raises(ValueError, match="invalid dataset name"):
        store.writer(bad, "v1", {})
    with pytest.raises(ValueError):
        check_name(bad)
    assert files_under(Path(store.root).parent) == before


def test_records_round_trip_with_strings_and_nulls(store: DatasetStore) -> None:
    columns = {
        "case_id": ["r0", "r1", "r2"],
        "text": ["Heart size normal.", "Ünïcode — ok", None],
        "age": np.array([34, 71, 55], dtype=np.int64),
        "score": [0.5, None, 2.0],
        "flag": np.array([True, False, True]),
        "expression": np.random.default_rng(0).standard_normal((3, 200)).astype(np.float32),
        "labels": np.array(["a", "b", "a"]),
    }
    w = store.writer("reports", "v1", {})
    w.write_records("records", columns)
    with pytest.raises(ValueError, match="rows"):
        w.write_records("bad", {"a": [1, 2], "b": [1, 2, 3]})
    with pytest.raises(ValueError, match="column 'm'"):
        w.write_records("bad", {"m": [1, "x"]})
    w.commit()
    r = store.open("reports")
    assert r.tables == ["records"] and r.cases == []
    got = r.records("records")
    assert list(got) == list(columns)
    assert got["case_id"] == ["r0", "r1", "r2"] and got["text"] == ["Heart size normal.", "Ünïcode — ok", None]
    assert got["labels"] == ["a", "b", "a"]
    np.testing.assert_array_equal(got["age"], columns["age"])
    np.testing.assert_array_equal(got["score"], [0.5, np.nan, 2.0])
    np.testing.assert_array_equal(got["flag"], columns["flag"])
    np.testing.assert_array_equal(got["expression"], columns["expression"])
    assert list(zarr.open_array(str(Path(r.uri) / "records" / "records" / "text"), mode="r")[:2]) == columns["text"][:2]
    with pytest.raises(KeyError, match="tables"):
        r.records("nope")


def test_versions_order_and_prefix_resolution(store: DatasetStore) -> None:
    infos = []
    for version in ("aaa111", "aab222", "bbb333"):
        w = store.writer("ds", version, {"v": version})
        w.write_case("a", {"image": volume(0)}, {})
        infos.append(w.commit())
    assert store.versions("ds") == infos
    assert store.latest("ds") == infos[-1] and store.open("ds").version == "bbb333"
    assert store.open("ds", "aab").version == "aab222"
    assert store.open("ds", "aaa111").version == "aaa111"
    with pytest.raises(VersionNotFoundError, match="ambiguous: aaa111, aab222"):
        store.open("ds", "aa")
    with pytest.raises(VersionNotFoundError, match="aaa111.*aab222.*bbb333"):
        store.open("ds", "zzz")
    assert store.datasets() == ["ds"]


def test_pending_reader_pickling_and_verify(store: DatasetStore) -> None:
    w = store.writer("ds", "v1", {"p": 1})
    w.write_case("a", {"image": volume(0)}, {"s": 1})
    pending = w.reader()
    assert pending.cases == ["a"] and not pending.committed and pending.attrs["plan"] == {"p": 1}
    w.commit()
    r = store.open("ds", cache_bytes=1 << 20)
    r.read("a")
    clone = pickle.loads(pickle.dumps(r))
    np.testing.assert_array_equal(clone.read_patch("a", "image", (1, 2, 3), (5, 5, 5)), volume(0)[1:6, 2:7, 3:8])
    shard = Path(r.uri) / "cases" / "a" / "image" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert store.open("ds").verify() == ["a"]
    data[-10] ^= 0xFF  # inside the index: its crc32c no longer matches
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum"):
        store.open("ds").read("a")


def test_fsspec_store_round_trip() -> None:
    """The non-local code path (one PUT per file, ranged reads) on fsspec's memory file system."""
    import fsspec

    root = f"memory://medfoundry-test-{os.getpid()}"
    try:
        store = DatasetStore(root)
        image = volume(7, (40, 30, 20))
        w = store.writer("ds", "v1", {})
        w.write_case("a", {"image": image}, {"spacing": [1, 1, 1]})
        w.write_records("records", {"case_id": ["a"], "value": np.array([1.5])})
        w.commit()
        r = store.open("ds", "v1", cache_bytes=1 << 20)
        np.testing.assert_array_equal(r.read_patch("a", "image", (3, 4, 5), (30, 20, 10)), image[3:33, 4:24, 5:15])
        np.testing.assert_array_equal(r.read("a"), image)
        assert r.records()["case_id"] == ["a"]
        assert store.versions("ds")[0].uri.startswith("memory://")
    finally:
        fsspec.filesystem("memory").rm(root.replace("memory://", "/"), recursive=True)


def test_manifest_is_the_last_file_written(store: DatasetStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import infra.storage as storage

    written: list[str] = []
    real = storage._LocalFs.write_atomic

    def record(self, path, data, fsync=False):
        written.append(os.path.basename(path))
        return real(self, path, data, fsync)

    monkeypatch.setattr(storage._LocalFs, "write_atomic", record)
    w = store.writer("ds", "v1", {})
    w.write_case("a", {"image": volume(0)}, {})
    w.commit()
    assert written[-1] == "manifest.json" and written[-2] == "cases.json"
    manifest = json.loads((Path(store.root) / "ds" / "v1" / "manifest.json").read_text())
    cases = (Path(store.root) / "ds" / "v1" / "cases.json").read_bytes()
    assert manifest["cases_sha256"] == hashlib.sha256(cases).hexdigest()
