"""Dataset fingerprints: shape, spacing, intensity and label statistics; text/table statistics.

``compute_fingerprint(source)`` takes a committed :class:`~infra.storage.VersionReader` or a
:class:`~infra.storage.VersionWriter` (it then reads the cases written so far, before
commit), so the ingest can put the result in the manifest: ``writer.commit({"fingerprint":
compute_fingerprint(writer)})``. The result is plain JSON.

How. One dask graph, computed once with the threaded scheduler: one task per case reads the
case's image (and label) through the store's reader and returns a small summary; one task per
table summarises its columns; the summaries are merged in numpy. A task per case rather than
``dask.array.from_zarr`` per inner chunk because the reader decodes a whole case an order of
magnitude faster than zarr-python reads its chunks one by one, and a case fits in memory
(the ingest just held it).

What.
* ``shape`` per axis (min / median / max over cases), ``spacing`` likewise (case attrs
  ``spacing``).
* ``intensity`` over all image voxels: exact count, mean, std (population, merged with Chan's
  parallel formula), min, max; percentiles 0.5 / 50 / 99.5 over a seeded uniform sample of at
  most ``sample_per_case`` voxels per case (exact when no case is larger; nnU-Net samples 10k
  foreground voxels per case the same way).
* ``foreground_intensity``: the same over voxels whose label is > 0, what nnU-Net's CT
  normalisation uses (``None`` without labels).
* ``labels``: voxel count per label value and the fraction of cases containing each value.
* ``records``: per table ``n_records``; per text column vocabulary size, token count, mean
  tokens per record and nulls (lowercase word tokens, ``[^\\W_]+``); per numeric column
  mean / std / min / max ignoring NaN, and NaN count.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Sequence

import numpy as np

from infra.storage import VersionReader, VersionWriter

__all__ = ["compute_fingerprint", "fingerprint_version", "tokenize"]

PERCENTILES = (0.5, 50.0, 99.5)
_TOKEN = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens (letters and digits of any script)."""
    return _TOKEN.findall(text.lower())


def _case_seed(seed: int, case_id: str) -> list[int]:
    return [seed, int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:4], "big")]


def _moments(values: np.ndarray, rng: np.random.Generator, k: int) -> dict | None:
    """Count, mean, M2, min, max and a sample of at most ``k`` values of a flat array."""
    n = int(values.size)
    if n == 0:
        return None
    v64 = values.astype(np.float64, copy=False)
    mean = float(v64.mean())
    m2 = float(np.square(v64 - mean).sum())
    sample = v64 if n <= k else v64[rng.choice(n, k, replace=False)]
    return {"n": n, "mean": mean, "m2": m2, "min": float(v64.min()), "max": float(v64.max()), "sample": sample, "exact": n <= k}


def _case_summary(reader: VersionReader, case_id: str, image: str, label: str | None, k: int, seed: int) -> dict:
    """Everything the fingerprint needs from one case (runs as one dask task)."""
    names = reader.array_names(case_id)
    out: dict[str, Any] = {"case_id": case_id, "spacing": reader.case_attrs(case_id).get("spacing")}
    if image not in names:
        return out
    img = reader.read(case_id, image)
    rng = np.random.default_rng(_case_seed(seed, case_id))
    out["shape"] = list(img.shape)
    out["intensity"] = _moments(img.ravel(), rng, k)
    if label is not None and label in names:
        lab = reader.read(case_id, label)
        values, counts = np.unique(lab, return_counts=True)
        out["labels"] = {str(int(v) if lab.dtype.kind in "biu" else v.item()): int(c) for v, c in zip(values, counts)}
        if lab.shape == img.shape:
            out["foreground"] = _moments(img[lab > 0], rng, k)
        elif lab.shape == img.shape[1:]:  # (C, D, H, W) image, (D, H, W) label
            out["foreground"] = _moments(img[:, lab > 0].ravel(), rng, k)
    return out


def _merge_moments(parts: list[dict]) -> dict | None:
    """Chan et al.'s pairwise merge of count / mean / M2, plus min, max and sample percentiles."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    n, mean, m2 = 0, 0.0, 0.0
    for p in parts:
        nb = p["n"]
        delta = p["mean"] - mean
        total = n + nb
        mean += delta * nb / total
        m2 += p["m2"] + delta * delta * n * nb / total
        n = total
    sample = np.concatenate([p["sample"] for p in parts])
    pct = np.percentile(sample, PERCENTILES)
    out = {
        "n_voxels": n,
        "mean": mean,
        "std": float(np.sqrt(m2 / n)),
        "min": min(p["min"] for p in parts),
        "max": max(p["max"] for p in parts),
        "n_sampled": int(sample.size),
        "exact_percentiles": all(p["exact"] for p in parts),
    }
    for q, v in zip(PERCENTILES, pct):
        out[f"percentile_{q:05.1f}".replace(".", "_")] = float(v)
    return out


def _axis_stats(rows: list[Sequence[float]]) -> dict | None:
    if not rows:
        return None
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        return {"ndims": sorted(lengths)}
    arr = np.asarray(rows, dtype=np.float64)
    return {"ndim": arr.shape[1], "min": arr.min(0).tolist(), "median": np.median(arr, 0).tolist(), "max": arr.max(0).tolist()}


def _table_summary(reader: VersionReader, name: str) -> dict:
    """n_records and per-column statistics of one table (runs as one dask task)."""
    columns = reader.records(name)
    n = len(next(iter(columns.values()))) if columns else 0
    stats: dict[str, dict] = {}
    for col, values in columns.items():
        if isinstance(values, np.ndarray):
            v = values.astype(np.float64)
            finite = v[~np.isnan(v)] if v.size else v
            stats[col] = {
                "kind": "numeric",
                "shape": list(values.shape),
                "n_nan": int(v.size - finite.size),
                "mean": float(finite.mean()) if finite.size else None,
                "std": float(finite.std()) if finite.size else None,
                "min": float(finite.min()) if finite.size else None,
                "max": float(finite.max()) if finite.size else None,
            }
        else:
            vocab: set[str] = set()
            n_tokens = 0
            for text in values:
                if text is None:
                    continue
                tokens = tokenize(text)
                n_tokens += len(tokens)
                vocab.update(tokens)
            n_text = sum(t is not None for t in values)
            stats[col] = {
                "kind": "text",
                "vocab_size": len(vocab),
                "n_tokens": n_tokens,
                "mean_tokens": n_tokens / n_text if n_text else 0.0,
                "n_null": len(values) - n_text,
            }
    return {"n_records": n, "columns": stats}


def compute_fingerprint(
    source: VersionReader | VersionWriter,
    case_ids: Sequence[str] | None = None,
    *,
    image: str = "image",
    label: str | None = "label",
    tables: Sequence[str] | None = None,
    sample_per_case: int = 10_000,
    seed: int = 0,
    num_workers: int | None = None,
) -> dict:
    """The fingerprint of ``case_ids`` (default: all cases) and ``tables`` (default: all).

    ``source`` is a committed reader or a writer (its cases written so far). Cases without an
    ``image`` array count in ``n_cases`` and spacing only. See the module docstring for the
    statistics and how percentiles are sampled.
    """
    import dask

    reader = source.reader() if isinstance(source, VersionWriter) else source
    ids = list(reader.cases if case_ids is None else case_ids)
    names = list(reader.tables if tables is None else tables)
    case_tasks = [dask.delayed(_case_summary)(reader, cid, image, label, sample_per_case, seed) for cid in ids]
    table_tasks = [dask.delayed(_table_summary)(reader, name) for name in names]
    cases, table_results = dask.compute(case_tasks, table_tasks, scheduler="threads", num_workers=num_workers)

    with_image = [c for c in cases if "shape" in c]
    spacings = [c["spacing"] for c in cases if c.get("spacing") is not None]
    labelled = [c["labels"] for c in with_image if "labels" in c]
    labels = None
    if labelled:
        voxels: dict[str, int] = {}
        present: dict[str, int] = {}
        for counts in labelled:
            for value, count in counts.items():
                voxels[value] = voxels.get(value, 0) + count
                present[value] = present.get(value, 0) + 1
        order = sorted(voxels, key=lambda v: float(v))
        labels = {
            "n_cases": len(labelled),
            "voxels": {v: voxels[v] for v in order},
            "case_fraction": {v: present[v] / len(labelled) for v in order},
        }
    return {
        "n_cases": len(ids),
        "n_image_cases": len(with_image),
        "image": image,
        "label": label,
        "shape": _axis_stats([c["shape"] for c in with_image]),
        "spacing": _axis_stats(spacings),
        "intensity": _merge_moments([c["intensity"] for c in with_image]),
        "foreground_intensity": _merge_moments([c.get("foreground") for c in with_image]) if labelled else None,
        "labels": labels,
        "records": dict(zip(names, table_results)),
        "percentile_sample_per_case": sample_per_case,
        "seed": seed,
    }


def fingerprint_version(source: VersionReader | VersionWriter, entry: Any = None, **kwargs: Any) -> dict:
    """:func:`compute_fingerprint` of every case and table, annotated from a catalog entry
    (``dims``, ``modality``, and ``label_names`` value -> name when labels are a mapping)."""
    fingerprint = compute_fingerprint(source, **kwargs)
    if entry is not None:
        labels = getattr(entry, "labels", None)
        fingerprint["dims"] = getattr(entry, "dims", None)
        fingerprint["modality"] = getattr(entry, "modality", None)
        fingerprint["label_names"] = {str(v): k for k, v in labels.items()} if isinstance(labels, dict) else None
    return fingerprint
