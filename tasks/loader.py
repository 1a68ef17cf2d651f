"""The read side for training recipes: open a version, split, shard, sample patches.

Pure data code (no Prefect/Ray imports), so that every Ray Train worker can call it on its own
shard. Everything is deterministic given a seed:

* :func:`split_cases` assigns each case by a hash of (seed, case id), so a case keeps its split
  when cases are added or removed and the order of ``reader.cases`` does not matter;
* :func:`shard` deals sorted case ids round-robin to ranks;
* :class:`PatchSampler` draws random patches like nnU-Net v2's data loader: a share
  (``foreground_fraction``, nnU-Net's ``oversample_foreground_percent`` = 0.33) of patches is
  centred on a random voxel of a random foreground class, and patches larger than the volume
  (or near its border) are padded symmetrically, as in nnU-Net's ``get_bbox``.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from infra.storage import DatasetStore, VersionReader

__all__ = [
    "DEFAULT_CACHE_BYTES", "PatchSampler", "iter_cases", "iter_records", "open_dataset", "paired", "shard", "split_cases",
    "split_cases_by_id",
]

DEFAULT_CACHE_BYTES = 256 << 20
"""Decoded-chunk cache per reader: training re-reads the same volumes every epoch."""


def open_dataset(store_root: str, dataset: str, version: str | None = None, *, cache_bytes: int = DEFAULT_CACHE_BYTES) -> VersionReader:
    """A reader of ``dataset`` at ``version`` (digest or unique prefix; ``None`` = latest)."""
    return DatasetStore(store_root).open(dataset, version, cache_bytes=cache_bytes)


def _unit(seed: int, case_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, case id)."""
    digest = hashlib.sha256(f"{seed}\x00{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_cases(
    reader: VersionReader | Sequence[str],
    split: str,
    ratios: Mapping[str, float],
    seed: int,
    explicit: Mapping[str, Sequence[str]] | None = None,
    *,
    strict: bool = False,
) -> list[str]:
    """Sorted case ids of ``split``; every case lands in exactly one split.

    Cases named in ``explicit`` (split -> ids) go to that split; the others are assigned by a
    hash of (seed, case id) against the cumulative ``ratios`` (normalised; in the mapping's
    order). Ids in ``explicit`` that are not in the version (e.g. quarantined) are ignored,
    unless ``strict``. A case listed in two splits is an error.
    """
    ids = list(reader.cases if isinstance(reader, VersionReader) else reader)
    explicit = explicit or {}
    names = list(ratios) + [n for n in explicit if n not in ratios]
    if split not in names:
        raise ValueError(f"unknown split {split!r}; splits: {names}")
    if any(r < 0 for r in ratios.values()):
        raise ValueError(f"split ratios must be >= 0, got {dict(ratios)}")
    assigned: dict[str, str] = {}
    for name, listed in explicit.items():
        for cid in listed:
            if assigned.get(cid, name) != name:
                raise ValueError(f"case {cid!r} is listed in splits {assigned[cid]!r} and {name!r}")
            assigned[cid] = name
    known = set(ids)
    missing = sorted(set(assigned) - known)
    if strict and missing:
        raise ValueError(f"explicit split lists name cases not in the version: {missing[:10]}")
    rest = [cid for cid in ids if cid not in assigned]
    total = float(sum(ratios.values()))
    if rest and total <= 0:
        raise ValueError(f"{len(rest)} cases are in no explicit split and no positive ratios are given")
    bounds = list(itertools.accumulate(r / total for r in ratios.values())) if total > 0 else []
    order = list(ratios)
    for cid in rest:
        u = _unit(seed, cid)
        idx = next((i for i, b in enumerate(bounds) if u < b), None)
        if idx is None:  # u >= the last bound only through rounding: the last split with a positive ratio
            idx = max(i for i, r in enumerate(ratios.values()) if r > 0)
        assigned[cid] = order[idx]
    return sorted(cid for cid in ids if assigned[cid] == split)


def split_cases_by_id(case_ids: Sequence[str], splits: Any) -> dict[str, list[str]]:
    """Every split at once, ``{split: sorted ids}``, from a catalog ``Splits`` (or a mapping
    with ``seed``, ``ratios``, ``explicit``); same assignment as :func:`split_cases`."""
    get = splits.get if isinstance(splits, Mapping) else (lambda key, default=None: getattr(splits, key, default))
    ratios = dict(get("ratios", None) or {})
    explicit = dict(get("explicit", None) or {})
    seed = int(get("seed", 0) or 0)
    names = list(ratios) + [n for n in explicit if n not in ratios]
    return {name: split_cases(case_ids, name, ratios, seed, explicit) for name in names}


def shard(case_ids: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The ids of ``rank`` among ``world_size`` workers: sorted, then dealt round-robin
    (disjoint, covering, sizes differ by at most one)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return sorted(case_ids)[rank::world_size]


def iter_cases(reader: VersionReader, case_ids: Sequence[str] | None = None, arrays: Sequence[str] = ("image",)) -> Iterator[dict]:
    """Whole cases: ``{'case_id', 'attrs', 'arrays': {name: ndarray}}``, in the given order."""
    for cid in reader.cases if case_ids is None else case_ids:
        yield {"case_id": cid, "attrs": reader.case_attrs(cid), "arrays": {name: reader.read(cid, name) for name in arrays}}


def iter_records(reader: VersionReader, name: str = "records") -> Iterator[dict]:
    """Rows of a table as dicts: numbers as Python scalars, vector columns as arrays, text as str/None."""
    columns = reader.records(name)
    n = len(next(iter(columns.values()))) if columns else 0
    for i in range(n):
        row: dict[str, Any] = {}
        for col, values in columns.items():
            value = values[i]
            row[col] = value.item() if isinstance(value, np.generic) else value
        yield row


def _ids(reader: VersionReader) -> set[str]:
    """Case ids of a version, plus the ``case_id`` column of its ``records`` table if any."""
    ids = set(reader.cases)
    if "records" in reader.tables:
        column = reader.records("records").get("case_id")
        if column is not None:
            ids.update(str(v) for v in (column.tolist() if isinstance(column, np.ndarray) else column) if v is not None)
    return ids


def paired(reader_a: VersionReader, reader_b: VersionReader) -> list[str]:
    """Sorted ids present in both versions (image/report or slide/expression pairs); an id
    is a case id or a value of the ``case_id`` column of the ``records`` table."""
    return sorted(_ids(reader_a) & _ids(reader_b))


class PatchSampler:
    """Random patches of one or more aligned arrays, nnU-Net style.

    Yields ``{'case_id', 'start', 'arrays': {name: patch}, 'foreground': centred}``; ``start`` is
    the patch origin in spatial voxels (negative or past the end where padded). Arrays have
    the spatial dims of ``patch_size`` (2 or 3) and may carry one channel axis: first for 3D
    ``(C, D, H, W)``, last for 2D ``(H, W, C)`` (override with ``channel_axis``). With
    probability ``foreground_fraction`` the patch is centred on a voxel of a foreground class
    of ``label`` (a class chosen uniformly among those present, then a voxel); cases without
    foreground get a random patch. Foreground locations are computed once per case (at most
    ``max_locations`` per class kept). ``set_epoch`` changes the stream between epochs.
    """

    def __init__(
        self,
        reader: VersionReader,
        case_ids: Sequence[str],
        patch_size: Sequence[int],
        seed: int = 0,
        arrays: Sequence[str] = ("image", "label"),
        foreground_fraction: float = 0.33,
        *,
        label: str | None = "label",
        num_samples: int | None = None,
        pad_values: Mapping[str, float] | None = None,
        channel_axis: int | None = None,
        max_locations: int = 2000,
    ):
        if not case_ids:
            raise ValueError("PatchSampler needs at least one case")
        if len(patch_size) not in (2, 3) or any(p < 1 for p in patch_size):
            raise ValueError(f"patch_size must be 2 or 3 positive sizes, got {tuple(patch_size)}")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError("foreground_fraction must be in [0, 1]")
        self.reader = reader
        self.case_ids = list(case_ids)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.seed = int(seed)
        self.arrays = tuple(arrays)
        self.foreground_fraction = float(foreground_fraction)
        self.label = label
        self.num_samples = num_samples
        self.pad_values = dict(pad_values or {})
        self.channel_axis = channel_axis
        self.max_locations = int(max_locations)
        self.epoch = 0
        self._locations: dict[str, dict[int, np.ndarray]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("an endless PatchSampler has no length; pass num_samples")
        return self.num_samples

    def __iter__(self) -> Iterator[dict]:
        rng = np.random.default_rng([self.seed, self.epoch])
        counter = range(self.num_samples) if self.num_samples is not None else itertools.count()
        for _ in counter:
            yield self.sample(rng)

    # -- geometry
    def _channel_axis(self, ndim: int) -> int | None:
        k = len(self.patch_size)
        if ndim == k:
            return None
        if ndim == k + 1:
            if self.channel_axis is not None:
                return self.channel_axis % ndim
            return 0 if k == 3 else ndim - 1
        raise ValueError(f"array with {ndim} axes does not fit {k}D patches (allowed: {k} or {k + 1} axes)")

    def _spatial_shape(self, case_id: str, array: str) -> tuple[int, ...]:
        shape = self.reader.shape(case_id, array)
        axis = self._channel_axis(len(shape))
        return tuple(n for d, n in enumerate(shape) if d != axis)

    def _bounds(self, shape: Sequence[int]) -> tuple[list[int], list[int]]:
        """nnU-Net's get_bbox: the range of patch origins, padding symmetrically when needed."""
        pad = [max(0, p - s) for p, s in zip(self.patch_size, shape)]
        lbs = [-(n // 2) for n in pad]
        ubs = [s + n // 2 + n % 2 - p for s, n, p in zip(shape, pad, self.patch_size)]
        return lbs, ubs

    def foreground_locations(self, case_id: str) -> dict[int, np.ndarray]:
        """Voxel coordinates (int32, at most ``max_locations``) per foreground class of a case."""
        cached = self._locations.get(case_id)
        if cached is not None:
            return cached
        if self.label not in self.reader.array_names(case_id):
            self._locations[case_id] = {}
            return {}
        lab = self.reader.read(case_id, self.label)
        axis = self._channel_axis(lab.ndim)
        if axis is not None:
            lab = lab.max(axis=axis)
        rng = np.random.default_rng([self.seed, int(_unit(0, case_id) * 2**32)])
        out: dict[int, np.ndarray] = {}
        for value in np.unique(lab):
            if value <= 0:
                continue
            coords = np.argwhere(lab == value)
            if len(coords) > self.max_locations:
                coords = coords[rng.choice(len(coords), self.max_locations, replace=False)]
            out[int(value)] = coords.astype(np.int32)
        self._locations[case_id] = out
        return out

    # -- sampling
    def sample(self, rng: np.random.Generator) -> dict:
        """One patch drawn with ``rng``."""
        case_id = self.case_ids[int(rng.integers(len(self.case_ids)))]
        shape = self._spatial_shape(case_id, self.arrays[0])
        lbs, ubs = self._bounds(shape)
        forced = self.label is not None and rng.random() < self.foreground_fraction
        start = None
        centred = False
        if forced:
            locations = self.foreground_locations(case_id)
            if locations:
                classes = sorted(locations)
                coords = locations[classes[int(rng.integers(len(classes)))]]
                voxel = coords[int(rng.integers(len(coords)))]
                start = [min(max(int(v) - p // 2, lo), hi) for v, p, lo, hi in zip(voxel, self.patch_size, lbs, ubs)]
                centred = True
        if start is None:
            start = [int(rng.integers(lo, hi + 1)) for lo, hi in zip(lbs, ubs)]
        patches = {}
        for name in self.arrays:
            full = self.reader.shape(case_id, name)
            axis = self._channel_axis(len(full))
            if tuple(n for d, n in enumerate(full) if d != axis) != shape:
                raise ValueError(f"case {case_id!r}: array {name!r} has shape {full}, not aligned with {self.arrays[0]!r} {shape}")
            s, z = list(start), list(self.patch_size)
            if axis is not None:
                s.insert(axis, 0)
                z.insert(axis, full[axis])
            patches[name] = self.reader.read_patch(case_id, name, s, z, fill=self.pad_values.get(name, 0))
        return {"case_id": case_id, "start": tuple(start), "arrays": patches, "foreground": centred}
