"""Readers: list the cases of a catalog entry cheaply, decode each one only when asked.

:func:`list_cases` dispatches on ``entry.source.kind`` to one lister per kind. A lister
globs the source (and at most reads headers, an archive's member list or a table) and
returns :class:`~tasks.ingest.types.CaseRef` objects whose ``load()`` decodes one case into
a :class:`~tasks.ingest.types.RawCase`. The split matters for two reasons:

* the version digest covers the source files, so it is known before any decoding;
* a problem with one case (truncated file, NaN voxels, a label that does not fit its image,
  undecodable text, a duplicated case id) becomes a :class:`CaseError` from that case's
  ``load()``, i.e. one quarantine entry, while the rest of the dataset proceeds.

Problems with the source as a whole are raised at listing time: :class:`CatalogError`
(nothing matches ``source.uri``, a path or symlink escapes the declared root, a column named
in the catalog does not exist) or :class:`SourceUnavailable` when the source is declared
``optional`` and has no files, so the caller can report it and skip the entry.

Every path, including the ones a lister finds on its own (files in a DICOM folder, the
images that an MSD ``dataset.json`` names), goes through :func:`tasks.catalog.resolve_paths`
so that neither ``..`` nor a symlink can make a reader leave the declared root.

Array conventions (see ``RawCase``): 3D volumes keep nibabel's voxel order (X, Y, Z), with
``meta['affine']`` (4x4 nested lists, voxel index -> RAS+ mm) and ``meta['spacing']`` (mm
per array axis); multi-channel volumes are (C, X, Y, Z). 2D images are (H, W) or (H, W, 3)
with ``meta['spacing']`` = [row spacing, column spacing] in mm, or ``None`` where the file
does not say (preprocessing must then not resample by spacing). Array cases also carry
``meta['original_shape']`` and ``meta['dtype']`` (the on-disk dtype); every case carries
``meta['source_files']``.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob as globlib
import json
import math
import re
import struct
import tarfile
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from tasks.catalog import CatalogError, Entry, _glob_root, _split_uri, resolve_paths
from tasks.ingest.types import CaseError, CaseRef, RawCase

MAX_TEXT_BYTES = 16 * 1024 * 1024
"""Largest report (XML file, archive member, JSONL line) a text reader will read; larger ones
are quarantined unread, so that a hostile archive cannot make the reader inflate gigabytes."""

TISSUE_MAX_MEAN_RGB = 220.0
TISSUE_MIN_SATURATION = 0.07

_ARCHIVE_SUFFIXES = (".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", *_DICOM_SUFFIXES)
_UNSAFE_ID = re.compile(r"[/\\\x00-\x1f\x7f]")
_XML_DECLARATIONS = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
_PIL_HIGH_DEPTH_GRAY = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}

# Exceptions that decoding libraries (nibabel, pydicom, PIL, tifffile, h5py, pandas) raise on
# malformed input; inside a case's load() they become that case's CaseError.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError,
    struct.error, zlib.error, RuntimeError, SyntaxError,
)


class SourceUnavailable(FileNotFoundError):
    """An ``optional: true`` source has no files (data not staged, package not installed).

    The caller reports it and skips the entry instead of failing the whole ingest.
    """

    def __init__(self, entry: str, reason: str):
        self.entry, self.reason = entry, reason
        super().__init__(f"catalog entry '{entry}': optional source unavailable: {reason}")


# --------------------------------------------------------------------------- dispatch
def list_cases(entry: Entry, base_dir: Path, *, max_voxels: int) -> list[CaseRef]:
    """List the cases of ``entry`` without decoding them.

    ``base_dir`` is the catalog file's folder (relative URIs start there). ``max_voxels``
    caps the number of array elements one case may declare; a file declaring more is
    quarantined before decoding (decompression-bomb guard). Case ids are unique in the result:
    a repeated id keeps its first occurrence, and each later occurrence is returned as
    ``<id>#<n>`` (n = 2, 3, ...) whose ``load()`` raises ``CaseError("duplicate case id '<id>'
    (also from <first origin>)")``. The suffix matters: the store keeps a case either in the
    version or in quarantine, so quarantining a duplicate under the bare id would delete the
    first, good case.
    """
    kind = entry.source.kind
    if kind == "synthetic":
        from tasks.ingest.synthetic import list_synthetic_cases

        return list_synthetic_cases(entry)
    lister = _LISTERS.get(kind)
    if lister is None:
        raise CatalogError(f"no reader for source kind {kind!r}", entry=entry.name, field="source.kind",
                           hint=f"use one of: {', '.join(sorted([*_LISTERS, 'synthetic']))}")
    # Absolute, so that paths found inside matched folders are not re-joined to a relative base.
    return _finalize(lister(entry, Path(base_dir).absolute(), max_voxels))


# A lister returns (ref, origin) pairs; origin says where the case came from ("x.csv row 3",
# "reports.tgz:ecgen-radiology/1.xml") and is quoted when a later case repeats its id.
Listed = list[tuple[CaseRef, str]]


def _finalize(listed: Listed) -> list[CaseRef]:
    """Quarantine unsafe and duplicate case ids (first occurrence wins) and return the refs."""
    seen: dict[str, str] = {}
    taken = {ref.case_id for ref, _ in listed}
    refs: list[CaseRef] = []
    for ref, origin in listed:
        if not ref.case_id or ref.case_id in (".", "..") or _UNSAFE_ID.search(ref.case_id):
            refs.append(_failing(ref.case_id, ref.sources, f"case id {ref.case_id!r} from {origin} is empty or contains a path "
                                                           "separator or control character; it cannot name a stored case"))
        elif ref.case_id in seen:
            occurrence = 2
            while f"{ref.case_id}#{occurrence}" in taken:
                occurrence += 1
            alias = f"{ref.case_id}#{occurrence}"
            taken.add(alias)
            refs.append(_failing(alias, ref.sources, f"duplicate case id '{ref.case_id}' (also from {seen[ref.case_id]})"))
        else:
            seen[ref.case_id] = origin
            refs.append(ref)
    return refs


def _run_load(case_id: str, func: Callable[..., RawCase], args: tuple[Any, ...], kwargs: dict[str, Any]) -> RawCase:
    """Run a decoder; any problem with the data becomes a CaseError naming the case."""
    try:
        return func(case_id, *args, **kwargs)
    except CaseError as exc:
        raise CaseError(f"case '{case_id}': {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise CaseError(f"case '{case_id}': cannot decode: {type(exc).__name__}: {exc}") from exc


def _ref(case_id: str, files: list[Path], func: Callable[..., RawCase], /, *args: Any, **kwargs: Any) -> CaseRef:
    """A CaseRef over ``files`` whose load() is ``func(case_id, *args, **kwargs)``, guarded (picklable: no lambdas)."""
    return CaseRef(case_id=case_id, sources=list(files), load=partial(_run_load, case_id, func, args, kwargs))


def _raise_case_error(reason: str) -> RawCase:
    raise CaseError(reason)


def _failing(case_id: str, sources: list[Path], reason: str) -> CaseRef:
    """A case found at listing time that is already known to be bad: load() raises ``reason``."""
    return CaseRef(case_id=case_id, sources=list(sources), load=partial(_raise_case_error, reason))


# --------------------------------------------------------------------------- paths
def _missing(entry: Entry, reason: str, field: str = "source.uri") -> Exception:
    """The no-files error: SourceUnavailable for optional sources, else a CatalogError."""
    if entry.source.optional:
        return SourceUnavailable(entry.name, reason)
    return CatalogError(reason, entry=entry.name, field=field,
                        hint="check the path or glob (relative paths start at the catalog's folder) and that the data is staged, "
                             "or declare the source optional: true to skip it when absent")


def _resolve(entry: Entry, base_dir: Path, uri: str, *, field: str = "source.uri", files_only: bool = True) -> list[Path]:
    """Resolve ``uri`` to existing paths inside the root; folders are expanded recursively.

    Raises the no-files error when nothing matches (a missing pkg:// package counts as nothing).
    """
    try:
        matches = resolve_paths(uri, base_dir=base_dir, entry=entry.name, root=entry.source.root, field=field)
    except CatalogError:
        raise
    except FileNotFoundError as exc:
        raise _missing(entry, str(exc), field) from None
    if files_only:
        expanded: list[Path] = []
        for match in matches:
            if match.is_dir():
                # The folder itself was checked against the root; its files must stay inside it.
                inner = resolve_paths(globlib.escape(str(match)) + "/**/*", base_dir=base_dir, entry=entry.name,
                                      root=str(match), field=field)
                expanded.extend(p for p in inner if p.is_file())
            elif match.is_file():
                expanded.append(match)
        matches = expanded
    if not matches:
        raise _missing(entry, f"no files match {uri!r}" + (" (the folder is empty)" if _is_empty_dir(entry, base_dir, uri) else ""), field)
    return matches


def _is_empty_dir(entry: Entry, base_dir: Path, uri: str) -> bool:
    try:
        path = _split_uri(uri, base_dir, entry.name)
    except (CatalogError, FileNotFoundError):
        return False
    return path.is_dir() and not any(path.iterdir())


def _within(entry: Entry, base_dir: Path, path: Path, root: Path, field: str) -> Path | None:
    """``path`` if it exists inside ``root`` (after symlinks), None if missing; CatalogError if it escapes."""
    found = resolve_paths(globlib.escape(str(path)), base_dir=base_dir, entry=entry.name,
                          root=entry.source.root or str(root), field=field)
    return found[0] if found else None


def _id_base(entry: Entry, base_dir: Path, uri: str) -> Path:
    """The folder that relative case ids start from: the URI's non-glob prefix (or the URI if it is a folder)."""
    pattern = _split_uri(uri, base_dir, entry.name)
    return pattern if pattern.is_dir() else _glob_root(pattern)


def _relative_id(path: Path, base: Path, suffixes: tuple[str, ...]) -> str:
    """Case id from a file's path below ``base``: folders joined by '_', known suffix dropped.

    Unlike the bare stem, this keeps ids of e.g. ``p1/IM0001.dcm`` and ``p2/IM0001.dcm`` apart
    and stays stable when files are added to other folders.
    """
    try:
        rel = path.relative_to(base)
    except ValueError:
        rel = Path(path.name)
    name = rel.name
    for suffix in sorted(suffixes, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return "_".join([*rel.parent.parts, name])


def _common_meta(sources: list[Path], shape: tuple[int, ...], dtype: Any) -> dict[str, Any]:
    return {"original_shape": [int(s) for s in shape], "source_files": [str(p) for p in sources], "dtype": np.dtype(dtype).name}


def _check_declared(what: str, shape: tuple[int, ...], max_voxels: int) -> None:
    count = math.prod(int(s) for s in shape)
    if count > max_voxels:
        raise CaseError(f"{what} declares shape {tuple(int(s) for s in shape)} = {count:,} values, over max_voxels={max_voxels:,}; "
                        "refused before decoding (possible decompression bomb)")


def _check_finite(what: str, array: np.ndarray) -> None:
    if array.dtype.kind in "fc":
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(array.size - np.count_nonzero(finite))
            raise CaseError(f"{what} has {bad:,} NaN/Inf value(s)")


# --------------------------------------------------------------------------- nifti
def _case_pattern(entry: Entry) -> re.Pattern[str]:
    pattern = getattr(entry.source, "case_id_pattern", r"^(?P<case>.+?)(_0000)?\.nii(\.gz)?$")
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise CatalogError(f"invalid regular expression {pattern!r}: {exc}", entry=entry.name, field="source.case_id_pattern",
                           hint="a Python regex with a named group 'case', e.g. ^(?P<case>.+?)\\.nii(\\.gz)?$") from None
    if "case" not in compiled.groupindex:
        raise CatalogError(f"{pattern!r} has no group named 'case'", entry=entry.name, field="source.case_id_pattern",
                           hint="name the id part (?P<case>...)")
    return compiled


def _match_id(pattern: re.Pattern[str], name: str) -> str | None:
    match = pattern.search(name)
    return match.group("case") if match and match.group("case") else None


def _list_nifti(entry: Entry, base_dir: Path, max_voxels: int) -> Listed:
    src = entry.source
    pattern = _case_pattern(entry)
    if src.labels and src.probability_maps:
        raise CatalogError("labels and probability_maps are both set", entry=entry.name, field="source.labels",
                           hint="label maps come either from label files or from thresholded probability maps, not both")
    images = _resolve(entry, base_dir, src.uri)
    labels_by_id: dict[str, Path] | None = None
    not_images: set[Path] = set()
    if src.labels:
        labels_by_id = {}
        for path in _resolve(entry, base_dir, src.labels, field="source.labels"):
            not_images.add(path)
            case_id = _match_id(pattern, path.name)
            if case_id is not None:
                labels_by_id.setdefault(case_id, path)
    maps: dict[int, tuple[dict[str, Path], Path | None]] = {}
    if src.probability_maps:
        declared = set(entry.labels.values()) if isinstance(entry.labels, dict) else None
        for value, uri in sorted(src.probability_maps.items()):
            field = f"source.probability_maps.{value}"
            if value <= 0 or (declared is not None and value not in declared):
                raise CatalogError(f"label value {value} is not a positive value declared in labels", entry=entry.name, field=field,
                                   hint="use the integers of 'labels:' (0 is background, left to voxels under the threshold)")
            files = _resolve(entry, base_dir, uri, field=field)
            not_images.update(files)
            maps[value] = ({cid: p for p in files if (cid := _match_id(pattern, p.name)) is not None}, files[0] if len(files) == 1 else None)
    images = [p for p in images if p not in not_images]
    if not images:
        raise _missing(entry, f"no image files match {src.uri!r} (all matches are label or probability-map files)")
    declared_labels = set(entry.labels.values()) if isinstance(entry.labels, dict) else None
    listed: Listed = []
    for path in images:
        case_id = _match_id(pattern, path.name)
        if case_id is None:
            reason = f"file name {path.name!r} does not match case_id_pattern {pattern.pattern!r}"
            listed.append((_failing(path.name, [path], reason), str(path)))
            continue
        label = None
        case_maps: list[tuple[int, Path]] | None = None
        if labels_by_id is not None:
            label = labels_by_id.get(case_id)
            if label is None:
                listed.append((_failing(case_id, [path], f"no file of source.labels matches case id '{case_id}'"), str(path)))
                continue
        if maps:
            case_maps = []
            for value, (by_id, single) in maps.items():
                # One map file for one image (a template such as MNI152), else matched by case id.
                map_path = by_id.get(case_id) or (single if len(images) == 1 else None)
                if map_path is None:
                    break
                case_maps.append((value, map_path))
            if len(case_maps) != len(maps):
                listed.append((_failing(case_id, [path], f"no probability map for every label value matches case id '{case_id}'"), str(path)))
                continue
        sources = [path] + ([label] if label else []) + [p for _, p in case_maps or []]
        listed.append((_ref(case_id, sources, _load_volume, [path], label=label, maps=case_maps, threshold=src.threshold,
                            max_voxels=max_voxels, allow_channels=False, declared_labels=declared_labels), str(path)))
    return listed


def _nifti_errors() -> tuple[type[BaseException], ...]:
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    return (OSError, EOFError, ValueError, zlib.error, struct.error, ImageFileError, HeaderDataError)


def _nifti_header(path: Path, what: str, max_voxels: int) -> Any:
    """Open a NIfTI file reading only its header; refuse oversized declared shapes."""
    import nibabel as nib

    try:
        image = nib.load(str(path), mmap=False)
    except FileNotFoundError:
        raise CaseError(f"{what} {path} is missing") from None
    except _nifti_errors() as exc:
        raise CaseError(f"{what} {path.name} is truncated or corrupt: {type(exc).__name__}: {exc}") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise CaseError(f"{what} {path.name} is not a NIfTI file (read as {type(image).__name__})")
    _check_declared(f"{what} {path.name}", image.header.get_data_shape(), max_voxels)
    if not np.isfinite(image.affine).all():
        raise CaseError(f"{what} {path.name} has a non-finite affine")
    return image


def _spatial(shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """(spatial shape, channels) of a NIfTI data shape; trailing singleton dims are dropped."""
    dims = [int(s) for s in shape]
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    return tuple(dims[:3]), (dims[3] if len(dims) == 4 else (1 if len(dims) == 3 else -1))


def _nifti_data(image: Any, path: Path, what: str) -> np.ndarray:
    """Decode the voxels (scaled as the header says), checking they are finite numbers."""
    try:
        data = np.asarray(image.dataobj)
    except _nifti_errors() as exc:
        raise CaseError(f"{what} {path.name} is truncated or corrupt: {type(exc).__name__}: {exc}") from None
    if data.dtype.kind not in "biuf":
        raise CaseError(f"{what} {path.name} has unsupported voxel type {data.dtype}")
    if data.dtype == np.float64 and image.get_data_dtype() != np.float64:
        data = data.astype(np.float32)
    _check_finite(f"{what} {path.name}", data)
    return data


def _as_label_map(data: np.ndarray, what: str) -> np.ndarray:
    if data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):
        raise CaseError(f"{what} has non-integer values; a label map holds integer classes")
    if data.size and data.min() < 0:
        raise CaseError(f"{what} has negative values ({data.min()})")
    top = int(data.max()) if data.size else 0
    return data.astype(np.uint8 if top < 256 else np.int32)


def _load_volume(case_id: str, images: list[Path], *, label: Path | None, maps: list[tuple[int, Path]] | None, threshold: float,
                 max_voxels: int, allow_channels: bool, declared_labels: set[int] | None,
                 extra_meta: dict[str, Any] | None = None) -> RawCase:
    """Decode one NIfTI case: image(s) (one file per channel, or one 4D file), label or tissue maps.

    All headers are checked (declared size, dimensionality, matching shapes) before any voxel
    is decoded.
    """
    headers = [_nifti_header(p, "image", max_voxels) for p in images]
    shape, channels = _spatial(headers[0].header.get_data_shape())
    if len(shape) != 3 or channels < 1 or (channels > 1 and not (allow_channels and len(images) == 1)):
        raise CaseError(f"image {images[0].name} has shape {headers[0].header.get_data_shape()}; a 3D volume is expected")
    _check_declared(f"case '{case_id}' images", (*shape, channels * len(images)), max_voxels)
    for path, header in zip(images[1:], headers[1:]):
        other, other_channels = _spatial(header.header.get_data_shape())
        if other != shape or other_channels != 1:
            raise CaseError(f"channel image {path.name} has shape {header.header.get_data_shape()}, but {images[0].name} has {shape}")
    label_image = _nifti_header(label, "label", max_voxels) if label else None
    if label_image is not None:
        label_shape, label_channels = _spatial(label_image.header.get_data_shape())
        if label_shape != shape or label_channels != 1:
            raise CaseError(f"label shape {label_image.header.get_data_shape()} != image shape {shape} ({label.name} vs {images[0].name})")
        if not np.allclose(label_image.affine, headers[0].affine, rtol=1e-3, atol=1e-2):
            raise CaseError(f"label {label.name} has a different affine than image {images[0].name}: they are not in the same space")
    map_images = [(value, path, _nifti_header(path, f"probability map {value}", max_voxels)) for value, path in maps or []]
    for value, path, image in map_images:
        if _spatial(image.header.get_data_shape()) != (shape, 1):
            raise CaseError(f"probability map {value} shape {image.header.get_data_shape()} != image shape {shape} ({path.name})")

    volumes = [_nifti_data(h, p, "image") for p, h in zip(images, headers)]
    if len(volumes) > 1:
        image = np.stack([v.reshape(shape) for v in volumes])
    elif channels > 1:
        image = np.moveaxis(volumes[0].reshape((*shape, channels)), -1, 0)
    else:
        image = volumes[0].reshape(shape)
    arrays: dict[str, np.ndarray] = {"image": image}  # nibabel's Fortran order: preprocessing transposes it for free
    if label_image is not None:
        arrays["label"] = _as_label_map(_nifti_data(label_image, label, "label").reshape(shape), f"label {label.name}")
    elif map_images:
        arrays["label"] = _threshold_maps([(v, p, _nifti_data(i, p, f"probability map {v}").reshape(shape)) for v, p, i in map_images],
                                          threshold, shape)
    if "label" in arrays and declared_labels is not None:
        present = {int(v) for v in np.flatnonzero(np.bincount(arrays["label"].ravel()))}
        unknown = sorted(present - declared_labels - {0})
        if unknown:
            raise CaseError(f"label values {unknown} are not declared in the entry's labels {sorted(declared_labels)}")
    import nibabel as nib

    affine = headers[0].affine
    meta = _common_meta([*images, *([label] if label else []), *[p for _, p, _ in map_images]],
                        headers[0].header.get_data_shape(), headers[0].get_data_dtype())
    meta.update(affine=[[float(v) for v in row] for row in affine],
                spacing=[float(z) for z in headers[0].header.get_zooms()[:3]],
                orientation="".join(nib.aff2axcodes(affine)),
                label_source="file" if label else ("probability_maps" if map_images else None))
    if extra_meta:
        meta.update(extra_meta)
    return RawCase(case_id=case_id, arrays=arrays, meta=meta)


def _threshold_maps(maps: list[tuple[int, Path, np.ndarray]], threshold: float, shape: tuple[int, ...]) -> np.ndarray:
    """Label = the value whose probability is highest, where that probability exceeds ``threshold``; else 0.

    Integer maps are read as fractions of their dtype's maximum (uint8 255 = 1.0, as in the
    nilearn MNI tissue maps); float maps must already lie in [0, 1].
    """
    best = np.zeros(shape, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8 if max(v for v, _, _ in maps) < 256 else np.int32)
    for value, path, data in maps:
        if data.dtype.kind in "iu":
            prob = data.astype(np.float32) / float(np.iinfo(data.dtype).max)
        else:
            prob = data.astype(np.float32, copy=False)
            if prob.size and (prob.min() < -1e-6 or prob.max() > 1 + 1e-6):
                raise CaseError(f"probability map {value} ({path.name}) has values outside [0, 1]: [{prob.min()}, {prob.max()}]")
        better = prob > best
        labels[better] = value
        best[better] = prob[better]
    labels[best <= threshold] = 0
    return labels


# --------------------------------------------------------------------------- msd
def _list_msd(entry: Entry, base_dir: Path, max_voxels: int) -> Listed:
    """Medical Segmentation Decathlon (``training: [{image, label}]``) or nnU-Net v2 (``channel_names``,
    ``file_ending``, cases found in labelsTr/) folders. Only training cases are listed."""
    matches = _resolve(entry, base_dir, entry.source.uri, files_only=False)
    declared_labels = set(entry.labels.values()) if isinstance(entry.labels, dict) else None
    listed: Listed = []
    for match in matches:
        folder = match if match.is_dir() else match.parent
        spec_path = _within(entry, base_dir, folder / "dataset.json", folder, "source.uri")
        if spec_path is None:
            raise _missing(entry, f"{folder} has no dataset.json")
        try:
            spec = json.loads(spec_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CatalogError(f"{spec_path} is not valid JSON: {exc}", entry=entry.name, field="source.uri",
                               hint="dataset.json must be the UTF-8 JSON file of an MSD / nnU-Net dataset") from None
        if not isinstance(spec, dict):
            raise CatalogError(f"{spec_path} is not a JSON object", entry=entry.name, field="source.uri", hint="see the MSD dataset.json layout")
        channel_names = _msd_channels(spec)
        extra = {"channel_names": channel_names, "dataset_labels": spec.get("labels"), "dataset": folder.name}
        for case_id, image_rels, label_rel in _msd_cases(entry, folder, spec, spec_path):
            images = [_within(entry, base_dir, folder / rel, folder, "source.uri") for rel in image_rels]
            label = _within(entry, base_dir, folder / label_rel, folder, "source.uri") if label_rel else None
            sources = [p for p in [*images, label] if p is not None]
            missing = [rel for rel, p in zip([*image_rels, label_rel], [*images, label]) if rel and p is None]
            if missing:
                reason = f"file(s) listed in {spec_path.name} are missing: {', '.join(missing)}"
                listed.append((_failing(case_id, sources, reason), str(spec_path)))
                continue
            listed.append((_ref(case_id, sources, _load_volume, images, label=label, maps=None, threshold=0.5, max_voxels=max_voxels,
                                allow_channels=True, declared_labels=declared_labels, extra_meta=extra), str(images[0])))
    return listed


def _msd_channels(spec: dict[str, Any]) -> list[str]:
    names = spec.get("channel_names") or spec.get("modality") or {}
    if not isinstance(names, dict):
        return []
    return [str(names[k]) for k in sorted(names, key=lambda k: int(k) if str(k).isdigit() else 0)]


def _msd_cases(entry: Entry, folder: Path, spec: dict[str, Any], spec_path: Path) -> Iterator[tuple[str, list[str], str | None]]:
    pattern = re.compile(r"^(?P<case>.+?)(_0000)?\.nii(\.gz)?$")
    if "training" in spec:
        training = spec["training"]
        if not isinstance(training, list) or not all(isinstance(t, dict) and isinstance(t.get("image"), str) for t in training):
            raise CatalogError(f"{spec_path}: 'training' must be a list of {{image, label}} objects", entry=entry.name,
                               field="source.uri", hint="see the MSD dataset.json layout")
        for item in training:
            image = item["image"]
            name = PurePosixPath(image).name
            yield _match_id(pattern, name) or name, [image], item.get("label")
        return
    ending = spec.get("file_ending")
    if not isinstance(ending, str) or "channel_names" not in spec:
        raise CatalogError(f"{spec_path} has neither 'training' (MSD) nor 'channel_names' + 'file_ending' (nnU-Net v2)",
                           entry=entry.name, field="source.uri", hint="point source.uri at an MSD or nnU-Net v2 dataset folder")
    channels = len(_msd_channels(spec)) or 1
    for label in sorted((folder / "labelsTr").glob(f"*{globlib.escape(ending)}")):
        case_id = label.name[: -len(ending)]
        yield case_id, [f"imagesTr/{case_id}_{c:04d}{ending}" for c in range(channels)], f"labelsTr/{label.name}"


# --------------------------------------------------------------------------- dicom
def _dcmread(path: Path, *, header_only: bool) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=header_only)
    except InvalidDicomError as exc:
        raise CaseError(f"{path.name} is not a DICOM file ({exc})") from None
    except FileNotFoundError:
        raise CaseError(f"{path} is missing") from None
    except (OSError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError, struct.error) as exc:
        raise CaseError(f"{path.name} is an unreadable or truncated DICOM file: {type(exc).__name__}: {exc}") from None


def _positive_floats(value: Any, count: int) -> list[float] | None:
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(math.isfinite(v) and v > 0 for v in numbers) else None


def _dicom_pixels(ds: Any, path: Path, max_voxels: int) -> tuple[np.ndarray, np.dtype]:
    """Decoded pixels, modality LUT (RescaleSlope/Intercept) applied and MONOCHROME1 inverted,
    with the stored dtype.

    Pixels are (H, W), (H, W, 3) or for multi-frame files (F, H, W). The declared size is
    checked before the pixel data is decoded.
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise CaseError(f"{path.name} has no pixel data")
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    _check_declared(path.name, (frames, int(ds.Rows), int(ds.Columns), samples), max_voxels)
    try:
        pixels = ds.pixel_array
    except _DECODE_ERRORS as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise CaseError(f"cannot decode the pixel data of {path.name} (transfer syntax {syntax}): {type(exc).__name__}: {exc}") from None
    stored = pixels.dtype
    if samples == 1:
        from pydicom.pixels import apply_modality_lut

        if "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds:
            pixels = apply_modality_lut(pixels, ds)
            if pixels.dtype == np.float64:
                pixels = pixels.astype(np.float32)
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            pixels = _invert(pixels)
    _check_finite(path.name, pixels)
    return np.ascontiguousarray(pixels), stored


def _invert(pixels: np.ndarray) -> np.ndarray:
    """MONOCHROME1 (high = dark) to MONOCHROME2, mirrored within the image's own value range."""
    low, high = pixels.min(), pixels.max()
    if pixels.dtype.kind == "f":
        return (high + low - pixels).astype(pixels.dtype)
    return (int(high) + int(low) - pixels.astype(np.int64)).astype(pixels.dtype)


def _dicom_meta(ds: Any, path: Path) -> dict[str, Any]:
    return {"modality": str(ds.get("Modality", "")) or None,
            "photometric": str(ds.get("PhotometricInterpretation", "")) or None,
            "inverted": str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"}


def _list_dicom(entry: Entry, base_dir: Path, max_voxels: int) -> Listed:
    src = entry.source
    files = [p for p in _resolve(entry, base_dir, src.uri) if p.name.upper() != "DICOMDIR"]
    if not files:
        raise _missing(entry, f"no DICOM files match {src.uri!r} (only a DICOMDIR index)")
    base = _id_base(entry, base_dir, src.uri)
    if not src.series:
        return [(_ref(_relative_id(p, base, _DICOM_SUFFIXES), [p], _load_dicom_file, p, max_voxels=max_voxels), str(p)) for p in files]
    series: dict[str, list[Path]] = {}
    sizes: dict[str, int] = {}
    listed: Listed = []
    for path in files:
        file_id = _relative_id(path, base, _DICOM_SUFFIXES)
        try:
            ds = _dcmread(path, header_only=True)
        except CaseError as exc:
            listed.append((_failing(file_id, [path], f"case '{file_id}': {exc}"), str(path)))
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            listed.append((_failing(file_id, [path], f"case '{file_id}': {path.name} has no SeriesInstanceUID"), str(path)))
            continue
        series.setdefault(uid, []).append(path)
        sizes[uid] = sizes.get(uid, 0) + int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0) * int(ds.get("NumberOfFrames") or 1)
    for uid, paths in series.items():
        listed.append((_ref(uid, paths, _load_dicom_series, paths, declared=sizes[uid], tolerance=src.spacing_tolerance,
                            max_voxels=max_voxels), str(paths[0])))
    return listed


def _load_dicom_file(case_id: str, path: Path, *, max_voxels: int) -> RawCase:
    """One file: a 2D image, or a 3D volume for multi-frame files."""
    ds = _dcmread(path, header_only=False)
    pixels, stored = _dicom_pixels(ds, path, max_voxels)
    meta = _common_meta([path], pixels.shape, stored)
    meta.update(_dicom_meta(ds, path))
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1 and pixels.ndim == 3 and int(ds.get("SamplesPerPixel") or 1) == 1:
        volume, affine, spacing = _multiframe_geometry(ds, pixels)
        meta.update(affine=affine, spacing=spacing)
        return RawCase(case_id=case_id, arrays={"image": volume}, meta=meta)
    if pixels.ndim not in (2, 3):
        raise CaseError(f"{path.name} has pixel shape {pixels.shape}; expected (H, W), (H, W, 3) or (frames, H, W)")
    meta["spacing"] = _positive_floats(ds.get("PixelSpacing"), 2) or _positive_floats(ds.get("ImagerPixelSpacing"), 2)
    return RawCase(case_id=case_id, arrays={"image": pixels}, meta=meta)


def _multiframe_geometry(ds: Any, pixels: np.ndarray) -> tuple[np.ndarray, list[list[float]], list[float] | None]:
    """A multi-frame (F, H, W) stack as an (X, Y, Z) volume; geometry from functional groups when present.

    Without orientation and per-frame positions the affine is the diagonal of the known
    spacings (1 where unknown) and ``spacing`` is None.
    """
    shared = ds.get("SharedFunctionalGroupsSequence")
    group = shared[0] if shared else ds
    measures = group.get("PixelMeasuresSequence")
    pixel_spacing = _positive_floats((measures[0] if measures else ds).get("PixelSpacing"), 2)
    orientation_seq = group.get("PlaneOrientationSequence")
    iop = (orientation_seq[0] if orientation_seq else ds).get("ImageOrientationPatient")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    positions = None
    if per_frame and len(per_frame) == pixels.shape[0]:
        try:
            positions = [[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient] for f in per_frame]
        except (AttributeError, IndexError, TypeError, ValueError):
            positions = None
    volume = np.ascontiguousarray(np.transpose(pixels, (2, 1, 0)))
    if pixel_spacing and iop is not None and positions:
        affine, spacing = _slice_affine([float(v) for v in iop], pixel_spacing, np.asarray(positions, dtype=np.float64),
                                        float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0))
        return volume, affine, spacing
    thickness = _positive_floats([ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")], 1)
    diagonal = [pixel_spacing[1] if pixel_spacing else 1.0, pixel_spacing[0] if pixel_spacing else 1.0, thickness[0] if thickness else 1.0]
    known = pixel_spacing is not None and thickness is not None
    return volume, np.diag([*diagonal, 1.0]).tolist(), diagonal if known else None


def _slice_affine(iop: list[float], pixel_spacing: list[float], positions: np.ndarray,
                  default_gap: float) -> tuple[list[list[float]], list[float]]:
    """RAS+ affine of an (X=column, Y=row, Z=slice) volume from DICOM geometry (slices already sorted).

    The slice step is the mean step between first and last slice position, so gantry tilt
    ends up in the affine instead of being lost.
    """
    row_dir, col_dir = np.asarray(iop[:3]), np.asarray(iop[3:])
    normal = np.cross(row_dir, col_dir)
    if len(positions) > 1:
        step = (positions[-1] - positions[0]) / (len(positions) - 1)
        gap = float(abs(np.dot(step, normal)))
    else:
        step, gap = normal * default_gap, default_gap
    lps = np.eye(4)
    lps[:3, 0] = row_dir * pixel_spacing[1]
    lps[:3, 1] = col_dir * pixel_spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return ras.tolist(), [pixel_spacing[1], pixel_spacing[0], gap]


def _load_dicom_series(case_id: str, paths: list[Path], *, declared: int, tolerance: float, max_voxels: int) -> RawCase:
    """One series as an (X, Y, Z) volume sorted along the slice normal, with consistent spacing."""
    if declared > max_voxels:
        raise CaseError(f"series of {len(paths)} files declares {declared:,} pixels, over max_voxels={max_voxels:,}; "
                        "refused before decoding (possible decompression bomb)")
    datasets = [_dcmread(p, header_only=False) for p in paths]
    geometry = []
    for path, ds in zip(paths, datasets):
        iop = ds.get("ImageOrientationPatient")
        ipp = ds.get("ImagePositionPatient")
        spacing = _positive_floats(ds.get("PixelSpacing"), 2)
        if iop is None or ipp is None or spacing is None or len(iop) != 6 or len(ipp) != 3:
            raise CaseError(f"{path.name} lacks ImageOrientationPatient, ImagePositionPatient or PixelSpacing; cannot place it in a volume")
        geometry.append(([float(v) for v in iop], [float(v) for v in ipp], spacing, (int(ds.Rows), int(ds.Columns))))
    iop0, _, spacing0, size0 = geometry[0]
    for path, (iop, _, spacing, size) in zip(paths, geometry):
        if not np.allclose(iop, iop0, atol=1e-4):
            raise CaseError(f"{path.name} has ImageOrientationPatient {iop}, unlike {paths[0].name} {iop0}: the slices are not parallel")
        if size != size0 or not np.allclose(spacing, spacing0, rtol=1e-4):
            raise CaseError(f"{path.name} has size {size} / PixelSpacing {spacing}, unlike {paths[0].name} {size0} / {spacing0}")
    normal = np.cross(np.asarray(iop0[:3]), np.asarray(iop0[3:]))
    positions = np.asarray([g[1] for g in geometry], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    sorted_paths = [paths[i] for i in order]
    if len(paths) > 1:
        gaps = np.diff(along)
        if gaps.min() <= 1e-6:
            i = int(np.argmin(gaps))
            raise CaseError(f"{sorted_paths[i].name} and {sorted_paths[i + 1].name} lie at the same position along the slice normal "
                            f"({along[i]:.4g} mm): duplicate or multi-echo slices")
        typical = float(np.median(gaps))
        if float(np.max(np.abs(gaps - typical))) / typical > tolerance:
            raise CaseError(f"inconsistent slice spacing {[round(float(g), 4) for g in gaps]} mm (median {typical:.4g}, relative "
                            f"tolerance {tolerance}): missing or irregular slices")
    ds0 = datasets[0]
    default_gap = _positive_floats([ds0.get("SpacingBetweenSlices") or ds0.get("SliceThickness")], 1)
    affine, spacing = _slice_affine(iop0, spacing0, positions, default_gap[0] if default_gap else 1.0)
    slices = []
    for i in order:
        ds = datasets[i]
        pixels, stored = _dicom_pixels(ds, paths[i], max_voxels)
        if pixels.ndim != 2:
            raise CaseError(f"{paths[i].name} has pixel shape {pixels.shape}; a series needs single-frame grayscale slices")
        slices.append(pixels)
    dtype = np.result_type(*[s.dtype for s in slices])
    volume = np.stack([s.astype(dtype, copy=False).T for s in slices], axis=-1)
    meta = _common_meta(sorted_paths, (len(slices), *size0), stored)
    meta.update(_dicom_meta(ds0, paths[0]), affine=affine, spacing=spacing, orientation=_axcodes(affine), n_slices=len(slices))
    return RawCase(case_id=case_id, arrays={"image": np.ascontiguousarray(volume)}, meta=meta)


def _axcodes(affine: list[list[float]]) -> str:
    import nibabel as nib

    return "".join(nib.aff2axcodes(np.asarray(affine)))


# --------------------------------------------------------------------------- image
def _sniff(path: Path) -> str:
    """The file's format from its magic bytes (extensions lie; DICOM often has none).

    DICOM is tested first: its 128-byte preamble may itself hold a TIFF header (dual-format
    files such as RG1_UNCR.dcm), and reading those as TIFF would skip the DICOM semantics.
    """
    with open(path, "rb") as fh:
        head = fh.read(132)
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"BM"):
        return "bmp"
    return "unknown"


def _list_image(entry: Entry, base_dir: Path, max_voxels: int) -> Listed:
    src = entry.source
    files = _resolve(entry, base_dir, src.uri)
    base = _id_base(entry, base_dir, src.uri)
    return [(_ref(_relative_id(p, base, _IMAGE_SUFFIXES), [p], _load_image, p, grayscale=src.grayscale, max_voxels=max_voxels), str(p))
            for p in files]


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (PIL's 'L' conversion), keeping the input dtype."""
    gray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    if rgb.dtype.kind in "iu":
        info = np.iinfo(rgb.dtype)
        return np.clip(np.rint(gray), info.min, info.max).astype(rgb.dtype)
    return gray.astype(rgb.dtype)


def _load_image(case_id: str, path: Path, *, grayscale: bool, max_voxels: int) -> RawCase:
    """A 2D image: PNG/JPEG/BMP via PIL, TIFF via tifffile, DICOM via pydicom; RGB -> luma if ``grayscale``."""
    kind = _sniff(path)
    meta: dict[str, Any]
    if kind == "dicom":
        ds = _dcmread(path, header_only=False)
        if int(ds.get("NumberOfFrames") or 1) > 1:
            raise CaseError(f"{path.name} is a multi-frame DICOM ({ds.NumberOfFrames} frames); an image source takes single 2D images")
        pixels, stored = _dicom_pixels(ds, path, max_voxels)
        meta = _common_meta([path], pixels.shape, stored)
        meta.update(_dicom_meta(ds, path),
                    spacing=_positive_floats(ds.get("PixelSpacing"), 2) or _positive_floats(ds.get("ImagerPixelSpacing"), 2))
    elif kind == "tiff":
        pixels, meta = _read_tiff_image(path, max_voxels)
    elif kind in ("png", "jpeg", "bmp"):
        pixels, meta = _read_pil_image(path, max_voxels, grayscale)
    else:
        raise CaseError(f"{path.name} is not a PNG, JPEG, BMP, TIFF or DICOM file")
    if pixels.ndim == 3 and pixels.shape[-1] == 4:
        pixels = pixels[..., :3]
    if pixels.ndim == 3 and pixels.shape[-1] == 3 and grayscale:
        pixels = _luma(pixels)
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] != 3):
        raise CaseError(f"{path.name} has pixel shape {pixels.shape}; expected a 2D (H, W) or (H, W, 3) image")
    _check_finite(path.name, pixels)
    return RawCase(case_id=case_id, arrays={"image": np.ascontiguousarray(pixels)}, meta=meta)


def _read_pil_image(path: Path, max_voxels: int, grayscale: bool) -> tuple[np.ndarray, dict[str, Any]]:
    import warnings

    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise CaseError(f"{path.name}: {exc} (possible decompression bomb)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise CaseError(f"{path.name} is a corrupt or unreadable image: {exc}") from None
    with image:
        bands = len(image.getbands())
        _check_declared(path.name, (image.height, image.width, bands), max_voxels)
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error) as exc:
            raise CaseError(f"{path.name} is a truncated or corrupt image: {type(exc).__name__}: {exc}") from None
        original = (image.height, image.width) if bands == 1 else (image.height, image.width, bands)
        meta = {"mode": image.mode, "format": image.format}
        image = ImageOps.exif_transpose(image)
        if image.mode in _PIL_HIGH_DEPTH_GRAY:
            pixels = np.asarray(image)
            pixels = pixels.astype(pixels.dtype.newbyteorder("="))
        else:
            pixels = np.asarray(image.convert("L" if grayscale or image.mode in ("1", "L", "LA") else "RGB"))
    result = _common_meta([path], original, pixels.dtype)
    result.update(meta, spacing=None)
    return pixels, result


def _read_tiff_image(path: Path, max_voxels: int) -> tuple[np.ndarray, dict[str, Any]]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            _check_declared(path.name, series.shape, max_voxels)
            pixels = series.asarray()
    except CaseError:
        raise
    except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError, struct.error, zlib.error, RuntimeError) as exc:
        raise CaseError(f"{path.name} is a truncated or corrupt TIFF: {type(exc).__name__}: {exc}") from None
    original = pixels.shape
    while pixels.ndim > 2 and pixels.shape[0] == 1:
        pixels = pixels[0]
    meta = _common_meta([path], original, pixels.dtype)
    meta["spacing"] = None
    return pixels, meta


# --------------------------------------------------------------------------- slide
def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean mask of tissue pixels in an RGB uint8 image.

    A pixel is tissue when it is not near-white (mean of R, G, B < 220) and has some colour
    (HSV saturation (max - min) / max > 0.07). Background glass is bright and grey; H&E-stained
    tissue is darker and pink/purple; the saturation test also drops black or grey pen marks,
    dust and the scanner's dark borders.
    """
    rgb = rgb.astype(np.float32)
    high = rgb.max(axis=-1)
    low = rgb.min(axis=-1)
    saturation = np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)
    return (rgb.mean(axis=-1) < TISSUE_MAX_MEAN_RGB) & (saturation > TISSUE_MIN_SATURATION)


def _as_rgb(pixels: np.ndarray, what: str) -> np.ndarray:
    if pixels.dtype != np.uint8:
        raise CaseError(f"{what} has dtype {pixels.dtype}; slides must be 8-bit RGB")
    if pixels.ndim == 2:
        return np.repeat(pixels[..., None], 3, axis=-1)
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        return pixels[..., :3]
    raise CaseError(f"{what} has shape {pixels.shape}; expected (H, W, 3)")


def _list_slide(entry: Entry, base_dir: Path, max_voxels: int) -> Listed:
    """One case per tile with enough tissue; a slide that cannot be read or has no such tile is
    listed once (as ``<stem>``) with the reason, so it is quarantined rather than silently absent."""
    src = entry.source
    listed: Listed = []
    for path in _resolve(entry, base_dir, src.uri):
        stem = path.name.split(".")[0]
        try:
            tiles, meta = _slide_tiles(path, src.level, src.tile_size, src.stride or src.tile_size, src.min_tissue_fraction, max_voxels)
        except CaseError as exc:
            listed.append((_failing(stem, [path], f"slide '{stem}': {exc}"), str(path)))
            continue
        except _DECODE_ERRORS as exc:
            listed.append((_failing(stem, [path], f"slide '{stem}' is unreadable: {type(exc).__name__}: {exc}"), str(path)))
            continue
        if not tiles:
            listed.append((_failing(stem, [path], f"slide '{stem}': no {src.tile_size}px tile at level {src.level} reaches "
                                                  f"min_tissue_fraction={src.min_tissue_fraction}"), str(path)))
        for x, y, fraction in tiles:
            case_id = f"{stem}_x{x}_y{y}"
            listed.append((_ref(case_id, [path], _load_tile, path, x=x, y=y, level=src.level, size=src.tile_size,
                                meta={**meta, "tissue_fraction": round(fraction, 4)}), f"{path} x={x} y={y}"))
    return listed


def _slide_tiles(path: Path, level: int, tile: int, stride: int, min_fraction: float,
                 max_voxels: int) -> tuple[list[tuple[int, int, float]], dict[str, Any]]:
    """Tile origins (x, y, tissue fraction) at ``level`` that reach ``min_fraction``.

    Tissue is measured on the slide's smallest pyramid level when that fits in
    ``max_voxels`` (one cheap read), else tile by tile at the requested level (one streaming
    pass, memory bounded by a tile).
    """
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        if level >= len(levels):
            raise CaseError(f"has {len(levels)} pyramid level(s); level {level} was requested")
        chosen = levels[level]
        height, width = int(chosen.shape[0]), int(chosen.shape[1])
        if height < tile or width < tile:
            raise CaseError(f"level {level} is {width}x{height}, smaller than one {tile}px tile")
        origins = [(x, y) for y in range(0, height - tile + 1, stride) for x in range(0, width - tile + 1, stride)]
        smallest = levels[-1]
        fractions: list[float] = []
        if math.prod(smallest.shape) <= max_voxels:
            mask = tissue_mask(_as_rgb(smallest.asarray(), f"level {len(levels) - 1}"))
            sy, sx = mask.shape[0] / height, mask.shape[1] / width
            for x, y in origins:
                region = mask[int(y * sy): max(int(y * sy) + 1, math.ceil((y + tile) * sy)),
                              int(x * sx): max(int(x * sx) + 1, math.ceil((x + tile) * sx))]
                fractions.append(float(region.mean()) if region.size else 0.0)
        else:
            store = tif.series[0].aszarr(level=level)
            array = zarr.open(store, mode="r")
            for x, y in origins:
                fractions.append(float(tissue_mask(_as_rgb(np.asarray(array[y:y + tile, x:x + tile]), "tile")).mean()))
        mpp = re.search(r"MPP\s*=\s*([0-9.]+)", tif.pages[0].description or "")
        downsample = float(levels[0].shape[0]) / height
        meta = {"level": level, "slide_shape": [height, width],
                "spacing": [float(mpp.group(1)) * 1e-3 * downsample] * 2 if mpp else None}
    return [(x, y, f) for (x, y), f in zip(origins, fractions) if f >= min_fraction], meta


def _load_tile(case_id: str, path: Path, *, x: int, y: int, level: int, size: int, meta: dict[str, Any]) -> RawCase:
    import tifffile
    import zarr

    try:
        with tifffile.TiffFile(path) as tif:
            array = zarr.open(tif.series[0].aszarr(level=level), mode="r")
            pixels = np.asarray(array[y:y + size, x:x + size])
    except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError, RuntimeError) as exc:
        raise CaseError(f"cannot read the tile at x={x}, y={y} of {path.name}: {type(exc).__name__}: {exc}") from None
    original = pixels.shape
    pixels = _as_rgb(pixels, f"tile of {path.name}")
    if pixels.shape[:2] != (size, size):
        raise CaseError(f"tile at x={x}, y={y} of {path.name} is {pixels.shape[:2]}, not {size}x{size}")
    case_meta = _common_meta([path], original, pixels.dtype)
    case_meta.update(meta, x=x, y=y)
    return RawCase(case_id=case_id, arrays={"image": np.ascontiguousarray(pixels)}, meta=case_meta)


# --------------------------------------------------------------------------- text
def _decode_text(data: bytes, encoding: str, where: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise CaseError(f"{where} is not valid {encoding} text (byte {exc.start}: {data[exc.start:exc.start + 4]!r})") from None


def _text_case(case_id: str, fields: dict[str, str], src: Any, sources: list[Path], origin: str, extra: dict[str, Any]) -> RawCase:
    if not any(v.strip() for v in fields.values()):
        raise CaseError(f"no text in fields {list(src.text_fields)} ({origin})")
    meta: dict[str, Any] = {"text": fields, "source_files": [str(p) for p in sources], "origin": origin}
    meta.update(extra)
    return RawCase(case_id=case_id, meta=meta)


def _list_text(entry: Entry, base_dir: Path, max_voxels: int) -> Listed:
    src = entry.source
    try:
        codecs.lookup(src.encoding)
    except LookupError:
        raise CatalogError(f"unknown text encoding {src.encoding!r}", entry=entry.name, field="source.encoding",
                           hint="use a Python codec name such as utf-8 or latin-1") from None
    files = _resolve(entry, base_dir, src.uri)
    limit = src.limit if src.limit is not None else math.inf
    listed: Listed = []
    for path in files:
        if len(listed) >= limit:
            break
        if src.format == "xml" and path.name.lower().endswith(_ARCHIVE_SUFFIXES):
            listed.extend(_xml_archive_records(path, src, limit - len(listed)))
        elif src.format == "xml":
            listed.append((_ref(path.stem, [path], _load_xml_file, path, src=src), str(path)))
        elif src.format == "jsonl":
            listed.extend(_jsonl_records(path, src, limit - len(listed)))
        else:
            listed.extend(_csv_text_records(entry, path, src, limit - len(listed)))
    return listed


def _xml_archive_records(path: Path, src: Any, budget: float) -> Listed:
    """Members of a tar archive matching ``member_glob``, read in one streaming pass (never extracted).

    Member bytes are kept in the CaseRef (reports are small; oversized members are refused
    unread), so loading a case does not re-decompress the archive.
    """
    listed: Listed = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if len(listed) >= budget:
                    break
                if not member.isfile():
                    continue
                name = PurePosixPath(member.name)
                if not (fnmatch.fnmatch(member.name, src.member_glob) or fnmatch.fnmatch(name.name, src.member_glob)):
                    continue
                case_id, origin = name.stem, f"{path.name}:{member.name}"
                if member.size > MAX_TEXT_BYTES:
                    listed.append((_failing(case_id, [path], f"case '{case_id}': {origin} is {member.size:,} bytes, over the "
                                                             f"{MAX_TEXT_BYTES:,}-byte limit for one report; not read"), origin))
                    continue
                handle = tar.extractfile(member)
                data = handle.read(MAX_TEXT_BYTES + 1) if handle else b""
                listed.append((_ref(case_id, [path], _load_xml_bytes, data, src=src, origin=origin, sources=[path]), origin))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        stem = path.name.split(".")[0]
        listed.append((_failing(stem, [path], f"archive {path.name} is truncated or corrupt after {len(listed)} report(s): "
                                              f"{type(exc).__name__}: {exc}"), str(path)))
    return listed


def _load_xml_file(case_id: str, path: Path, *, src: Any) -> RawCase:
    size = path.stat().st_size
    if size > MAX_TEXT_BYTES:
        raise CaseError(f"{path.name} is {size:,} bytes, over the {MAX_TEXT_BYTES:,}-byte limit for one report")
    return _load_xml_bytes(case_id, path.read_bytes(), src=src, origin=str(path), sources=[path])


def _load_xml_bytes(case_id: str, data: bytes, *, src: Any, origin: str, sources: list[Path]) -> RawCase:
    """One XML report: text of ``AbstractText[@Label=FIELD]`` (Indiana NLMCXR layout) or of
    elements named like the field; labels from ``label_field`` (default ``MeSH/major``).

    DOCTYPE and ENTITY declarations are refused before parsing: they are how XML bombs
    (billion laughs, external entities) are built, and reports do not need them.
    """
    text = _decode_text(data, src.encoding, origin)
    if _XML_DECLARATIONS.search(text):
        raise CaseError(f"{origin} declares a DOCTYPE/ENTITY; refused (XML entity-expansion guard)")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise CaseError(f"{origin} is not well-formed XML: {exc}") from None
    fields: dict[str, str] = {}
    for field in src.text_fields:
        parts = [(el.text or "").strip() for el in root.iter("AbstractText") if (el.get("Label") or "").upper() == field.upper()]
        if not parts:
            parts = ["".join(el.itertext()).strip() for el in root.iter() if isinstance(el.tag, str) and el.tag.lower() == field.lower()]
        fields[field] = "\n".join(p for p in parts if p)
    labels = [(el.text or "").strip() for el in root.findall(f".//{src.label_field or 'MeSH/major'}")]
    return _text_case(case_id, fields, src, sources, origin, {"labels": [label for label in labels if label]})


def _jsonl_records(path: Path, src: Any, budget: float) -> Listed:
    """One record per non-empty line; lines are re-read by byte offset at load time."""
    listed: Listed = []
    stem = path.name.split(".")[0]
    with open(path, "rb") as fh:
        offset = 0
        for number, line in enumerate(fh, start=1):
            start, offset = offset, offset + len(line)
            if len(listed) >= budget:
                break
            if not line.strip():
                continue
            fallback = f"{stem}_line{number}"
            origin = f"{path.name} line {number}"
            if len(line) > MAX_TEXT_BYTES:
                listed.append((_failing(fallback, [path], f"case '{fallback}': {origin} is over {MAX_TEXT_BYTES:,} bytes"), origin))
                continue
            try:
                record = json.loads(line.decode(src.encoding, errors="surrogateescape"))
            except json.JSONDecodeError as exc:
                listed.append((_failing(fallback, [path], f"case '{fallback}': {origin} is not valid JSON: {exc}"), origin))
                continue
            case_id = record.get(src.id_field) if isinstance(record, dict) else None
            if case_id is None or case_id == "":
                listed.append((_failing(fallback, [path], f"case '{fallback}': {origin} has no '{src.id_field}'"), origin))
                continue
            listed.append((_ref(str(case_id), [path], _load_jsonl_line, path, offset=start, src=src, origin=origin), origin))
    return listed


def _load_jsonl_line(case_id: str, path: Path, *, offset: int, src: Any, origin: str) -> RawCase:
    with open(path, "rb") as fh:
        fh.seek(offset)
        line = fh.readline(MAX_TEXT_BYTES + 1)
    record = json.loads(_decode_text(line, src.encoding, origin))
    fields = {f: _as_text(record.get(f), f, origin) for f in src.text_fields}
    extra = {"label": record.get(src.label_field)} if src.label_field else {}
    return _text_case(case_id, fields, src, [path], origin, extra)


def _as_text(value: Any, field: str, origin: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CaseError(f"{origin}: field '{field}' is {type(value).__name__}, not text")
    return value


def _csv_text_records(entry: Entry, path: Path, src: Any, budget: float) -> Listed:
    """Rows of a CSV of reports. Bytes that do not decode are kept as surrogates at listing and
    turned into a CaseError for the rows that hold them."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding=src.encoding, encoding_errors="surrogateescape")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError) as exc:
        stem = path.name.split(".")[0]
        return [(_failing(stem, [path], f"{path.name} is not a readable CSV: {exc}"), str(path))]
    for field, names in (("source.id_field", [src.id_field]), ("source.text_fields", src.text_fields),
                         ("source.label_field", [src.label_field] if src.label_field else [])):
        absent = [n for n in names if n not in frame.columns]
        if absent:
            raise CatalogError(f"{path.name} has no column(s) {absent}", entry=entry.name, field=field,
                               hint=f"columns are: {', '.join(map(str, frame.columns))}")
    listed: Listed = []
    for number, row in enumerate(frame.to_dict("records")):
        if len(listed) >= budget:
            break
        origin = f"{path.name} row {number}"
        case_id = row[src.id_field] or f"row{number}"
        fields = {f: row[f] for f in src.text_fields}
        extra = {"label": row[src.label_field]} if src.label_field else {}
        listed.append((_ref(case_id, [path], _load_csv_text_row, fields, src=src, origin=origin, sources=[path], extra=extra), origin))
    return listed


def _load_csv_text_row(case_id: str, fields: dict[str, str], *, src: Any, origin: str, sources: list[Path], extra: dict[str, Any]) -> RawCase:
    for field, value in [*fields.items(), *extra.items()]:
        try:
            str(value).encode(src.encoding)
        except UnicodeEncodeError:
            raise CaseError(f"{origin}: field '{field}' is not valid {src.encoding} text") from None
    return _text_case(case_id, fields, src, sources, origin, extra)


# --------------------------------------------------------------------------- table
def _json_scalar(value: Any) -> Any:
    """A JSON-serialisable Python value (None for missing)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or (isinstance(value, str) and value in ("?", "")):
        return None
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value


def _read_table(path: Path, fmt: str) -> Any:
    import pandas as pd

    if fmt == "arff":
        from scipy.io import arff

        data, meta = arff.loadarff(str(path))
        frame = pd.DataFrame(data)
        for name, kind in zip(meta.names(), meta.types()):
            if kind == "nominal":
                frame[name] = [None if v in (b"?", "?") else (v.decode("utf-8") if isinstance(v, bytes) else v) for v in frame[name]]
        return frame
    return pd.read_csv(path, sep="," if fmt == "csv" else "\t")


def _list_table(entry: Entry, base_dir: Path, max_voxels: int) -> Listed:
    """One case per row: numeric non-target columns -> ``arrays['values']`` (float32, NaN kept for
    missing values), other columns -> ``meta['attributes']``, target columns -> ``meta['targets']``."""
    import pandas as pd

    src = entry.source
    listed: Listed = []
    feature_columns: list[str] | None = None
    row_number = 0
    for path in _resolve(entry, base_dir, src.uri):
        try:
            frame = _read_table(path, src.format)
        except (ValueError, OSError, pd.errors.ParserError, UnicodeDecodeError, NotImplementedError) as exc:
            stem = path.name.split(".")[0]
            reason = f"table {path.name} cannot be parsed as {src.format}: {type(exc).__name__}: {exc}"
            listed.append((_failing(stem, [path], reason), str(path)))
            continue
        columns = [str(c) for c in frame.columns]
        frame.columns = columns
        for field, names in (("source.id_column", [src.id_column] if src.id_column else []), ("source.target_columns", src.target_columns)):
            absent = [n for n in names if n not in columns]
            if absent:
                raise CatalogError(f"{path.name} has no column(s) {absent}", entry=entry.name, field=field,
                                   hint=f"columns are: {', '.join(columns[:20])}{' ...' if len(columns) > 20 else ''}")
        skip = set(src.target_columns) | ({src.id_column} if src.id_column else set())
        numeric = [c for c in columns if c not in skip and (pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c]))]
        if feature_columns is None:
            feature_columns = numeric
        elif numeric != feature_columns:
            raise CatalogError(f"{path.name} has numeric columns {numeric[:5]}... unlike the first table {feature_columns[:5]}...",
                               entry=entry.name, field="source.uri", hint="all tables of one entry need the same columns")
        attributes = [c for c in columns if c not in skip and c not in numeric]
        values = frame[numeric].to_numpy(dtype=np.float32) if numeric else np.zeros((len(frame), 0), dtype=np.float32)
        records = frame.to_dict("records")
        for i, record in enumerate(records):
            origin = f"{path.name} row {i}"
            raw_id = _json_scalar(record[src.id_column]) if src.id_column else f"row{row_number}"
            row_number += 1
            case_id = str(raw_id) if raw_id is not None else f"row{row_number - 1}"
            if src.id_column and raw_id is None:
                listed.append((_failing(case_id, [path], f"case '{case_id}': {origin} has an empty id column '{src.id_column}'"), origin))
                continue
            meta = {"columns": numeric, "targets": {c: _json_scalar(record[c]) for c in src.target_columns},
                    "attributes": {c: _json_scalar(record[c]) for c in attributes}, "row": i}
            listed.append((_ref(case_id, [path], _load_table_row, values[i].copy(), meta=meta, sources=[path]), origin))
    return listed


def _load_table_row(case_id: str, values: np.ndarray, *, meta: dict[str, Any], sources: list[Path]) -> RawCase:
    case_meta = _common_meta(sources, values.shape, values.dtype)
    case_meta.update(meta, n_missing=int(np.isnan(values).sum()))
    return RawCase(case_id=case_id, arrays={"values": values}, meta=case_meta)


# --------------------------------------------------------------------------- h5ad
def _h5_strings(values: Any) -> list[str]:
    return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in np.asarray(values).ravel()]


def _h5ad_index(group: Any) -> list[str]:
    """obs/var names of an AnnData dataframe, old (compound dataset) or new (group) layout."""
    import h5py

    if isinstance(group, h5py.Dataset):
        names = group.dtype.names or ()
        return _h5_strings(group["index"]) if "index" in names else [str(i) for i in range(group.shape[0])]
    key = group.attrs.get("_index", "_index")
    key = key.decode() if isinstance(key, bytes) else str(key)
    return _h5_strings(group[key][()])


def h5ad_gene_names(path: str | Path) -> list[str]:
    """Gene (var) names of an .h5ad file, in the order of every case's ``expression`` vector."""
    import h5py

    with h5py.File(path, "r") as f:
        return _h5ad_index(f["var"])


def _h5ad_labels(f: Any, column: str) -> list[Any] | None:
    """Values of obs/<column>, decoding categoricals of all AnnData layouts; None if absent."""
    import h5py

    obs = f["obs"]
    if isinstance(obs, h5py.Dataset):
        if column not in (obs.dtype.names or ()):
            return None
        raw = obs[column]
        categories = f.get(f"uns/{column}_categories")
        if categories is not None and raw.dtype.kind in "iu":
            cats = _h5_strings(categories[()])
            return [cats[c] if 0 <= c < len(cats) else None for c in raw.tolist()]
        return [_json_scalar(v) for v in raw.tolist()]
    if column not in obs:
        return None
    node = obs[column]
    if isinstance(node, h5py.Group) and "codes" in node:
        cats = _h5_strings(node["categories"][()])
        return [cats[c] if 0 <= c < len(cats) else None for c in node["codes"][()].tolist()]
    if isinstance(node, h5py.Group) and "values" in node:
        mask = node["mask"][()] if "mask" in node else np.zeros(node["values"].shape, dtype=bool)
        return [None if m else _json_scalar(v) for v, m in zip(node["values"][()].tolist(), mask.tolist())]
    if "categories" in node.attrs:
        cats = _h5_strings(f[node.attrs["categories"]][()])
        return [cats[c] if 0 <= c < len(cats) else None for c in node[()].tolist()]
    values = node[()]
    return _h5_strings(values) if values.dtype.kind in "OSU" else [_json_scalar(v) for v in values.tolist()]


def _list_h5ad(entry: Entry, base_dir: Path, max_voxels: int) -> Listed:
    """One case per obs row (cell or sample); ``X`` dense or CSR."""
    import h5py

    src = entry.source
    listed: Listed = []
    for path in _resolve(entry, base_dir, src.uri):
        stem = path.name.split(".")[0]
        try:
            with h5py.File(path, "r") as f:
                names = _h5ad_index(f["obs"])
                labels = None
                if src.label_column:
                    labels = _h5ad_labels(f, src.label_column)
                    if labels is None:
                        raise CatalogError(f"{path.name} has no obs column '{src.label_column}'", entry=entry.name,
                                           field="source.label_column", hint="name a column of adata.obs")
                layout, shape = _h5ad_matrix(f["X"])
        except CatalogError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as exc:
            listed.append((_failing(stem, [path], f"{path.name} is not a readable .h5ad file: {type(exc).__name__}: {exc}"), str(path)))
            continue
        for i, name in enumerate(names):
            meta = {"label": labels[i] if labels is not None else None, "n_genes": int(shape[1]), "row": i}
            listed.append((_ref(name, [path], _load_h5ad_row, path, row=i, layout=layout, meta=meta, max_voxels=max_voxels),
                           f"{path.name} obs row {i}"))
    return listed


def _h5ad_matrix(x: Any) -> tuple[str, tuple[int, int]]:
    import h5py

    if isinstance(x, h5py.Dataset):
        return "dense", (int(x.shape[0]), int(x.shape[1]))
    encoding = x.attrs.get("encoding-type", x.attrs.get("h5sparse_format", ""))
    encoding = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
    shape = x.attrs.get("shape", x.attrs.get("h5sparse_shape"))
    layout = "csr" if encoding.startswith("csr") else ("csc" if encoding.startswith("csc") else encoding)
    return layout, (int(shape[0]), int(shape[1]))


def _load_h5ad_row(case_id: str, path: Path, *, row: int, layout: str, meta: dict[str, Any], max_voxels: int) -> RawCase:
    import h5py

    n_genes = meta["n_genes"]
    _check_declared(f"{path.name} row {row}", (n_genes,), max_voxels)
    with h5py.File(path, "r") as f:
        x = f["X"]
        if layout == "dense":
            dtype = x.dtype
            expression = np.asarray(x[row, :], dtype=np.float32)
        elif layout == "csr":
            start, stop = (int(v) for v in x["indptr"][row:row + 2])
            dtype = x["data"].dtype
            indices = x["indices"][start:stop]
            if indices.size and (indices.min() < 0 or indices.max() >= n_genes):
                raise CaseError(f"{path.name} row {row} has CSR column indices outside [0, {n_genes})")
            expression = np.zeros(n_genes, dtype=np.float32)
            expression[indices] = x["data"][start:stop]
        else:
            raise CaseError(f"{path.name}: X is stored as {layout or 'an unknown encoding'}; only dense and CSR matrices are read "
                            "(convert with adata.X = scipy.sparse.csr_matrix(adata.X))")
    _check_finite(f"{path.name} row {row}", expression)
    case_meta = _common_meta([path], (n_genes,), dtype)
    case_meta.update(meta)
    return RawCase(case_id=case_id, arrays={"expression": expression}, meta=case_meta)


_LISTERS: dict[str, Callable[[Entry, Path, int], Listed]] = {
    "nifti": _list_nifti,
    "dicom": _list_dicom,
    "image": _list_image,
    "slide": _list_slide,
    "text": _list_text,
    "table": _list_table,
    "h5ad": _list_h5ad,
    "msd": _list_msd,
}
