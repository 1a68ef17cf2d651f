"""Worker-side data access shared by the recipes: a worker's shard of a store version, in memory.

The demo and CI datasets are small, so each worker reads its shard of cases once and keeps
them in memory; random crops then cost a numpy slice. Datasets too large for a worker's
memory would use the store's patch reader instead (``tasks.loader.PatchSampler``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.loader import open_dataset, shard


@dataclass
class CaseArrays:
    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    foreground: np.ndarray | None = None
    """Voxel coordinates of ``label > 0`` (``np.argwhere``), found once per case for foreground crops."""


def load_shard(store: str, dataset: str, version: str | None, case_ids: list[str] | None, rank: int, world: int,
               with_labels: bool = False) -> list[CaseArrays]:
    """This worker's cases (round-robin shard of ``case_ids`` or of every case)."""
    reader = open_dataset(store, dataset, version)
    ids = case_ids if case_ids is not None else list(reader.cases)
    mine = shard(ids, rank, world) if len(ids) >= world else sorted(ids)
    out = []
    for case_id in mine:
        label = reader.read(case_id, "label") if with_labels and "label" in reader.array_names(case_id) else None
        foreground = np.argwhere(label > 0) if label is not None else None
        out.append(CaseArrays(case_id, reader.read(case_id, "image"), label, foreground))
    return out


def random_crop(array: np.ndarray, size: tuple[int, ...], rng: np.random.Generator, label: np.ndarray | None = None,
                foreground_p: float = 0.0, foreground: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A random crop of ``size`` (zero-padded where the array is smaller); with probability
    ``foreground_p`` centred on one of the ``foreground`` coordinates (``CaseArrays.foreground``;
    zero-padding at the far end leaves them valid)."""
    pad = [(0, max(0, s - d)) for s, d in zip(size, array.shape)]
    if any(p[1] for p in pad):
        array = np.pad(array, pad)
        label = np.pad(label, pad) if label is not None else None
    starts = []
    fg = foreground if foreground is not None and foreground_p > 0 and rng.random() < foreground_p else None
    centre = fg[rng.integers(len(fg))] if fg is not None and len(fg) else None
    for axis, (s, d) in enumerate(zip(size, array.shape)):
        if centre is not None:
            starts.append(int(np.clip(centre[axis] - s // 2, 0, d - s)))
        else:
            starts.append(int(rng.integers(0, d - s + 1)))
    window = tuple(slice(st, st + s) for st, s in zip(starts, size))
    return array[window], (label[window] if label is not None else None)
