"""The dataset catalog: typed schema, loading with precise errors, and safe path resolution.

``catalog.yaml`` is the contract with data engineers. Every entry is validated at load by a
pydantic schema in which unknown keys are errors. A failure is reported like Kedro's
``DatasetError``: the entry, the field and a hint on how to fix it.

Source URIs are either paths relative to the catalog file's folder, absolute paths, or
``pkg://PACKAGE/sub/path`` (a file shipped inside an installed Python package, e.g. the
nilearn MNI template). Globs are allowed. A resolved path, after following symlinks, must
stay inside its declared root (``root``, default: the folder the URI starts from), so a
catalog cannot read outside what it declares.
"""

from __future__ import annotations

import glob as globlib
import importlib.util
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class CatalogError(ValueError):
    """A catalog problem, naming the entry, the field and a hint."""

    def __init__(self, message: str, *, entry: str | None = None, field: str | None = None, hint: str | None = None):
        self.entry, self.field, self.hint = entry, field, hint
        parts = []
        if entry:
            parts.append(f"catalog entry '{entry}'")
        if field:
            parts.append(f"field '{field}'")
        prefix = ", ".join(parts)
        text = f"{prefix}: {message}" if prefix else message
        if hint:
            text += f"\n  hint: {hint}"
        super().__init__(text)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- sources
class _SourceBase(_Strict):
    uri: str = Field(description="Path, glob, fsspec URI or pkg://PACKAGE/path of the source files.")
    root: str | None = Field(default=None, description="Folder every resolved path must stay inside; default: the URI's non-glob prefix folder.")
    optional: bool = Field(default=False, description="A missing source is reported and skipped instead of failing.")


class NiftiSource(_SourceBase):
    """NIfTI volumes (``uri`` globs images). Labels either from ``labels`` (a glob whose files
    match images by case id) or from tissue ``probability_maps`` thresholded into a label map."""

    kind: Literal["nifti"]
    labels: str | None = None
    probability_maps: dict[int, str] | None = Field(default=None, description="label value -> probability map URI; label = argmax where max > threshold.")
    threshold: float = Field(default=0.5, gt=0, lt=1)
    case_id_pattern: str = Field(default=r"^(?P<case>.+?)(_0000)?\.nii(\.gz)?$", description="Regex with a 'case' group, applied to file names.")


class DicomSource(_SourceBase):
    """DICOM files. ``series: true`` groups files by SeriesInstanceUID into one volume sorted
    by ImagePositionPatient along the slice normal; otherwise each file is a 2D case."""

    kind: Literal["dicom"]
    series: bool = False
    spacing_tolerance: float = Field(default=0.01, ge=0, description="Relative tolerance on slice-spacing consistency.")


class ImageSource(_SourceBase):
    """2D images: PNG, JPEG, TIFF or single-frame DICOM (MONOCHROME1 is inverted)."""

    kind: Literal["image"]
    grayscale: bool = True


class SlideSource(_SourceBase):
    """Whole-slide or large TIFF (e.g. .svs) regions, tiled into fixed-size RGB patches."""

    kind: Literal["slide"]
    tile_size: int = Field(default=224, ge=16, le=4096)
    stride: int | None = Field(default=None, ge=16)
    level: int = Field(default=0, ge=0)
    min_tissue_fraction: float = Field(default=0.5, ge=0, le=1)


class TextSource(_SourceBase):
    """Report text: XML (one report per file, also inside .tgz/.tar archives), JSONL or CSV."""

    kind: Literal["text"]
    format: Literal["xml", "jsonl", "csv"]
    id_field: str = "id"
    text_fields: list[str] = Field(default_factory=lambda: ["findings", "impression"])
    label_field: str | None = None
    member_glob: str = Field(default="*", description="Inside archives: which members to read.")
    encoding: str = "utf-8"
    limit: int | None = Field(default=None, ge=1, description="Read at most this many records (demo profiles).")


class TableSource(_SourceBase):
    """Tables: CSV, TSV or ARFF; one row per case."""

    kind: Literal["table"]
    format: Literal["csv", "tsv", "arff"]
    id_column: str | None = None
    target_columns: list[str] = Field(default_factory=list)


class H5adSource(_SourceBase):
    """AnnData .h5ad expression matrices (cells/samples x genes)."""

    kind: Literal["h5ad"]
    label_column: str | None = None


class MsdSource(_SourceBase):
    """An nnU-Net / Medical Segmentation Decathlon folder: dataset.json + imagesTr/ + labelsTr/."""

    kind: Literal["msd"]


class SyntheticSource(_Strict):
    """Seeded generators (same seed and parameters -> same bytes)."""

    kind: Literal["synthetic"]
    generator: Literal["phantom3d", "radiograph2d", "reports", "pathology_pairs"]
    seed: int = 0
    n_cases: int = Field(default=8, ge=1, le=100_000)
    shape: list[int] | None = Field(default=None, description="Output spatial shape (D,H,W) or (H,W).")
    structures: list[str] | None = Field(default=None, description="phantom3d: which structures are labelled (the others stay background).")
    options: dict[str, Any] = Field(default_factory=dict)
    optional: bool = False


Source = Annotated[
    Union[NiftiSource, DicomSource, ImageSource, SlideSource, TextSource, TableSource, H5adSource, MsdSource, SyntheticSource],
    Field(discriminator="kind"),
]
SOURCE_KINDS = ("nifti", "dicom", "image", "slide", "text", "table", "h5ad", "msd", "synthetic")


# --------------------------------------------------------------------------- the rest of an entry
class Pairs(_Strict):
    """How a case finds its partner in another entry (report, expression profile, ...)."""

    entry: str
    on: Literal["case_id"] = "case_id"


class Splits(_Strict):
    """Seeded ratios, or explicit case-id lists (``explicit`` wins)."""

    seed: int = 0
    ratios: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "test": 0.2})
    explicit: dict[str, list[str]] | None = None

    @field_validator("ratios")
    @classmethod
    def _sum_to_one(cls, ratios: dict[str, float]) -> dict[str, float]:
        if any(r < 0 for r in ratios.values()) or abs(sum(ratios.values()) - 1.0) > 1e-6:
            raise ValueError(f"split ratios must be non-negative and sum to 1, got {ratios}")
        return ratios


class Intensity(_Strict):
    mode: Literal["none", "ct_window", "zscore", "percentile", "minmax"] = "none"
    window: tuple[float, float] | None = Field(default=None, description="ct_window: (low, high) HU.")
    percentiles: tuple[float, float] = (0.5, 99.5)

    @model_validator(mode="after")
    def _window_for_ct(self) -> "Intensity":
        if self.mode == "ct_window" and self.window is None:
            raise ValueError("intensity mode 'ct_window' needs window: [low, high]")
        return self


class Preprocess(_Strict):
    orientation: str | None = Field(default="RAS", description="3D: reorient to these axis codes; null keeps the source orientation.")
    target_spacing: list[float] | None = Field(default=None, description="Resample to this spacing (mm), per spatial axis.")
    resize: list[int] | None = Field(default=None, description="Resize the spatial shape to exactly this (after resampling).")
    intensity: Intensity = Field(default_factory=Intensity)
    dtype: Literal["float32", "float16", "uint8", "int16"] = "float32"


class Entry(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    modality: Literal["ct", "mri", "xray", "pathology", "report", "expression", "clinical"]
    dims: Literal[0, 2, 3] = Field(description="Spatial dims of a case: 3 volumes, 2 images, 0 text/tables.")
    task: Literal["ssl", "segmentation", "classification", "survival", "paired"]
    license: str
    description: str = ""
    source: Source
    labels: dict[str, int] | list[str] | None = None
    pairs: Pairs | None = None
    splits: Splits = Field(default_factory=Splits)
    preprocess: Preprocess = Field(default_factory=Preprocess)

    @model_validator(mode="after")
    def _consistent(self) -> "Entry":
        if self.task == "segmentation" and not isinstance(self.labels, dict):
            raise ValueError("task 'segmentation' needs labels: {name: integer} (background 0 included)")
        if self.task == "classification" and self.labels is None:
            raise ValueError("task 'classification' needs labels: [class names] or {name: integer}")
        if isinstance(self.labels, dict) and len(set(self.labels.values())) != len(self.labels):
            raise ValueError("labels must map each name to a distinct integer")
        if self.preprocess.target_spacing is not None and self.dims in (2, 3) and len(self.preprocess.target_spacing) != self.dims:
            raise ValueError(f"preprocess.target_spacing needs {self.dims} values for dims={self.dims}")
        return self


class Catalog(_Strict):
    version: Literal[1] = 1
    entries: list[Entry]
    base_dir: Path = Field(default=Path("."), exclude=True)

    def get(self, name: str) -> Entry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise CatalogError(f"no entry named '{name}'", hint=f"known entries: {', '.join(e.name for e in self.entries)}")

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]


# --------------------------------------------------------------------------- loading
_HINTS = {
    "extra_forbidden": "remove it or fix its spelling; unknown keys are errors",
    "missing": "add it",
    "literal_error": "use one of the allowed values",
    "union_tag_invalid": f"source.kind must be one of: {', '.join(SOURCE_KINDS)}",
    "union_tag_not_found": f"add source.kind: one of {', '.join(SOURCE_KINDS)}",
    "string_pattern_mismatch": "use lower-case letters, digits, '-' and '_' (max 64 chars)",
}


def _field_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in SOURCE_KINDS and parts and parts[-1] == "source":
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts).replace(".[", "[")


def parse_entry(raw: Any, index: int) -> Entry:
    """Validate one raw entry, raising a CatalogError that names the entry and field."""
    name = raw.get("name") if isinstance(raw, dict) else None
    label = name or f"#{index}"
    if not isinstance(raw, dict):
        raise CatalogError("an entry must be a mapping", entry=label, hint="each item under 'entries:' is 'name: ..., modality: ..., ...'")
    try:
        return Entry.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = _field_path(err["loc"]) or "(entry)"
        message = err["msg"]
        if err["type"] == "literal_error" and err.get("ctx", {}).get("expected"):
            message = f"got {err.get('input')!r}, expected {err['ctx']['expected']}"
        more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
        raise CatalogError(message + more, entry=label, field=field, hint=_HINTS.get(err["type"], "see the schema in tasks/catalog.py")) from None


def load_catalog(path: str | Path) -> Catalog:
    """Load and validate a catalog file (``yaml.safe_load``; unknown keys are errors)."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"catalog file not found: {path}", hint="pass --catalog PATH or set MEDFOUNDRY_CATALOG")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise CatalogError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}", hint="check indentation and quoting") from None
    if not isinstance(raw, dict) or "entries" not in raw:
        raise CatalogError(f"{path} must be a mapping with 'entries:'", hint="start the file with 'version: 1' and 'entries:'")
    unknown = set(raw) - {"version", "entries"}
    if unknown:
        raise CatalogError(f"unknown top-level key(s): {', '.join(sorted(unknown))}", hint="only 'version' and 'entries' are allowed")
    if raw.get("version", 1) != 1:
        raise CatalogError(f"unsupported catalog version {raw.get('version')!r}", field="version", hint="use version: 1")
    if not isinstance(raw["entries"], list):
        raise CatalogError("'entries' must be a list", field="entries", hint="write each entry as '- name: ...'")
    entries = [parse_entry(item, i) for i, item in enumerate(raw["entries"])]
    check_cross_references(entries)
    return Catalog(entries=entries, base_dir=path.resolve().parent)


def check_cross_references(entries: list[Entry]) -> None:
    """Names are unique and every ``pairs.entry`` names another entry."""
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            raise CatalogError("the name is used twice", entry=entry.name, field="name", hint="give every entry a unique name")
        seen.add(entry.name)
    for entry in entries:
        if entry.pairs and entry.pairs.entry not in seen:
            raise CatalogError(f"pairs with unknown entry '{entry.pairs.entry}'", entry=entry.name, field="pairs.entry",
                               hint=f"name one of: {', '.join(sorted(seen))}")


# --------------------------------------------------------------------------- path resolution
_GLOB_CHARS = re.compile(r"[*?\[]")


def _package_dir(package: str, entry: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"entry '{entry}': package '{package}' is not installed (pip install --no-deps {package})")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def _split_uri(uri: str, base_dir: Path, entry: str) -> Path:
    if uri.startswith("pkg://"):
        package, _, rest = uri[len("pkg://"):].partition("/")
        return _package_dir(package, entry) / rest
    if "://" in uri and not uri.startswith("file://"):
        raise CatalogError(f"remote URI {uri!r} is not readable by this reader", entry=entry, field="source.uri",
                           hint="stage remote sources to a local path, or use a local/pkg:// URI")
    path = Path(uri.removeprefix("file://")).expanduser()
    return path if path.is_absolute() else base_dir / path


def _glob_root(pattern: Path) -> Path:
    parts = pattern.parts
    for i, part in enumerate(parts):
        if _GLOB_CHARS.search(part):
            return Path(*parts[:i])
    return pattern.parent


def resolve_paths(uri: str, *, base_dir: Path, entry: str, root: str | None = None, field: str = "source.uri") -> list[Path]:
    """Resolve a URI or glob to sorted existing files, refusing any that escape the root.

    The root is ``root`` (resolved like the URI) or the URI's non-glob prefix folder. Every
    match is resolved through symlinks and must lie inside the resolved root.
    """
    pattern = _split_uri(uri, base_dir, entry)
    root_path = (_split_uri(root, base_dir, entry) if root else _glob_root(pattern)).resolve()
    if ".." in Path(uri).parts and root is None:
        raise CatalogError(f"'..' in {uri!r} would leave the catalog's folder", entry=entry, field=field,
                           hint="declare source.root explicitly, or use an absolute or pkg:// path")
    matches = sorted(Path(p) for p in globlib.glob(str(pattern), recursive=True)) if _GLOB_CHARS.search(str(pattern)) else (
        [pattern] if pattern.exists() else [])
    for match in matches:
        real = match.resolve()
        if real != root_path and root_path not in real.parents:
            raise CatalogError(f"{match} resolves to {real}, outside the declared root {root_path}", entry=entry, field=field,
                               hint="keep sources inside source.root; symlinks may not point out of it")
    return matches
