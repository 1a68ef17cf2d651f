"""Seeded synthetic sources: CT phantoms, chest radiographs with paired reports, pathology pairs.

Why: the pipeline (catalog -> zarr -> pretraining -> MLflow) must run end to end in CI and in
demos without licensed downloads, and the models it trains need data whose signal is real and
learnable (organ contrast, findings visible in images and named in reports, subtypes and
survival visible in both slides and expression), otherwise a smoke run proves nothing.

:func:`list_synthetic_cases` turns a ``kind: synthetic`` catalog entry into lazy
:class:`~tasks.ingest.types.CaseRef` objects, dispatching on ``source.generator``:

``phantom3d``
    Torso CT phantoms in HU with a label map of the chosen ``structures`` (1..K in the given
    order; see :data:`PHANTOM_STRUCTURES`).
``radiograph2d``
    Chest radiographs (uint8, (H, W)) projected from a fresh phantom with sampled findings.
``reports``
    The radiology report of the ``radiograph2d`` case with the same seed and index: same case
    id, same findings (both read :func:`sample_cxr_findings`).
``pathology_pairs``
    Per patient: patch features of a slide, a log-expression profile, subtype and survival.

Reproducibility: case ``i`` is built only from ``np.random.default_rng([seed, i])`` (plus fixed
side streams ``[seed, i, k]``), so its bytes do not depend on ``n_cases`` or on the other
cases. Every CaseRef carries ``source_digest`` = sha256 over the generator name,
:data:`GENERATOR_VERSION`, seed, n_cases, shape, structures, the options with their defaults
filled in, and the case index: any parameter change, or a code change that bumps the version,
gives a new dataset version. Bump :data:`GENERATOR_VERSION` whenever the bytes a given set of
parameters produces change.

Geometry: anatomy is defined in normalised patient coordinates (x to the patient's right,
y anterior, z superior; the torso is about 1.8 units wide, :data:`MM_PER_UNIT` mm per unit).
3D arrays are stored in that RAS order, axis 0 = x, 1 = y, 2 = z, so ``meta['affine']`` is
simply ``diag(spacing) + [1]`` and reorienting to RAS is the identity.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from scipy import ndimage

from tasks.catalog import CatalogError, Entry, SyntheticSource
from tasks.ingest.types import CaseRef, RawCase
from tasks.ingest.version import canonical_json, sha256_text

GENERATOR_VERSION = "1"
"""Bumped whenever the bytes produced for given parameters change; part of every digest."""

MM_PER_UNIT = 200.0
"""Millimetres per normalised anatomical unit (used for radiograph pixels and nodule sizes)."""

PHANTOM_STRUCTURES: tuple[str, ...] = (
    "liver", "spleen", "kidney_left", "kidney_right", "heart", "aorta", "vertebra",
    "lung_left", "lung_right", "stomach", "tumor",
)
"""Labellable phantom structures, in the canonical order used when ``structures`` is null."""

CXR_FINDINGS: tuple[str, ...] = ("cardiomegaly", "pleural_effusion", "nodule", "pneumothorax")
"""Radiograph findings, in the canonical order of ``meta['findings']``."""

CXR_CLASSES: tuple[str, ...] = ("normal", *CXR_FINDINGS)
"""Class names of ``meta['multi_hot']`` and ``meta['label']`` (``normal`` when no finding)."""

DEFAULT_FINDING_PROBABILITIES: dict[str, float] = {
    "cardiomegaly": 0.25, "pleural_effusion": 0.2, "nodule": 0.2, "pneumothorax": 0.0,
}
"""Independent per-case probabilities of each finding (48% of cases are normal). Pneumothorax
is opt-in (``options: {finding_probabilities: {pneumothorax: 0.1}}``) so that a class list
without it stays complete."""

_FINDINGS_STREAM = 1
_REPORT_TEXT_STREAM = 2
_BIOLOGY_STREAM = 7
_MU_WATER_PER_UNIT = 0.02 * MM_PER_UNIT  # linear attenuation of water, ~0.2 /cm, per unit
_BONE_MU_FACTOR = 1.15  # photoelectric boost of bone at diagnostic energies


# --------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class SyntheticParams:
    """A synthetic entry's resolved parameters (defaults filled in), shared by all its cases."""

    generator: str
    seed: int
    n_cases: int
    shape: tuple[int, ...] | None
    structures: tuple[str, ...] | None
    options: dict[str, Any] = field(default_factory=dict)

    def canonical_json(self) -> str:
        """The parameters as canonical JSON, the basis of every case digest."""
        return canonical_json({
            "generator": self.generator,
            "version": GENERATOR_VERSION,
            "seed": self.seed,
            "n_cases": self.n_cases,
            "shape": list(self.shape) if self.shape is not None else None,
            "structures": list(self.structures) if self.structures is not None else None,
            "options": self.options,
        })

    def digest(self, case_index: int) -> str:
        """sha256 of the parameters and the case index: the case's source digest."""
        return sha256_text(f"{self.canonical_json()}|case_index={case_index}")


def _case_id(prefix: str, index: int) -> str:
    """``prefix-0007``; indices above 9999 simply get more digits, so ids never depend on n_cases."""
    return f"{prefix}-{index:04d}"


Validator = Callable[[Any], Any]


def _int_in(lo: int, hi: int) -> Validator:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"expected an integer in [{lo}, {hi}], got {value!r}")
        return int(value)
    return check


def _float_in(lo: float, hi: float) -> Validator:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise ValueError(f"expected a number in [{lo}, {hi}], got {value!r}")
        return float(value)
    return check


def _spacing(ndim: int) -> Validator:
    def check(value: Any) -> list[float] | None:
        if value is None:
            return None
        if (not isinstance(value, (list, tuple)) or len(value) != ndim
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value)):
            raise ValueError(f"expected {ndim} positive numbers (mm), got {value!r}")
        return [float(v) for v in value]
    return check


def _id_prefix(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_]{0,31}", value):
        raise ValueError(f"expected lower-case letters, digits and '_' (max 32 chars), got {value!r}")
    return value


def _finding_probabilities(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping finding -> probability, got {value!r}")
    unknown = set(value) - set(CXR_FINDINGS)
    if unknown:
        raise ValueError(f"unknown finding(s) {sorted(unknown)}; known: {', '.join(CXR_FINDINGS)}")
    merged = dict(DEFAULT_FINDING_PROBABILITIES)
    for name, p in value.items():
        merged[name] = _float_in(0.0, 1.0)(p)
    return merged


@dataclass(frozen=True)
class _Generator:
    """What a generator accepts and how it builds one case."""

    build: Callable[[SyntheticParams, int, str], RawCase]
    dims: int
    default_shape: tuple[int, ...] | None
    min_size: int
    max_size: int
    options: dict[str, tuple[Any, Validator]]
    uses_structures: bool = False


def resolve_synthetic_params(entry: Entry) -> SyntheticParams:
    """Validate a synthetic entry's parameters and fill in defaults.

    Problems raise :class:`~tasks.catalog.CatalogError` naming the entry and field, as catalog
    loading does, so a bad option is reported before any case is generated.
    """
    source = entry.source
    if not isinstance(source, SyntheticSource):
        raise CatalogError(f"source kind '{source.kind}' is not synthetic", entry=entry.name, field="source.kind",
                           hint="list_synthetic_cases only reads 'kind: synthetic' entries")
    gen = _GENERATORS[source.generator]
    if entry.dims != gen.dims:
        raise CatalogError(f"generator '{source.generator}' makes {gen.dims}D cases, the entry says dims: {entry.dims}",
                           entry=entry.name, field="dims", hint=f"set dims: {gen.dims}")
    if source.seed < 0:
        raise CatalogError(f"seed must be >= 0, got {source.seed}", entry=entry.name, field="source.seed",
                           hint="use a non-negative integer")
    shape: tuple[int, ...] | None
    if gen.default_shape is None:
        if source.shape is not None:
            raise CatalogError(f"generator '{source.generator}' has no spatial shape", entry=entry.name,
                               field="source.shape", hint="remove it; size this generator through source.options")
        shape = None
    else:
        shape = tuple(source.shape) if source.shape is not None else gen.default_shape
        if len(shape) != len(gen.default_shape) or not all(gen.min_size <= s <= gen.max_size for s in shape):
            raise CatalogError(f"got {list(shape)}", entry=entry.name, field="source.shape",
                               hint=f"give {len(gen.default_shape)} sizes in [{gen.min_size}, {gen.max_size}], "
                                    f"e.g. {list(gen.default_shape)}")
    structures: tuple[str, ...] | None = None
    if gen.uses_structures:
        structures = tuple(source.structures) if source.structures is not None else PHANTOM_STRUCTURES
        unknown = [s for s in structures if s not in PHANTOM_STRUCTURES]
        if unknown or len(set(structures)) != len(structures) or not structures:
            raise CatalogError(f"got {list(structures)}", entry=entry.name, field="source.structures",
                               hint=f"list distinct names out of: {', '.join(PHANTOM_STRUCTURES)}")
        _check_label_names(entry, structures)
    elif source.structures is not None:
        raise CatalogError(f"generator '{source.generator}' has no structures", entry=entry.name,
                           field="source.structures", hint="only phantom3d labels structures; remove it")
    unknown_opts = set(source.options) - set(gen.options)
    if unknown_opts:
        name = sorted(unknown_opts)[0]
        raise CatalogError(f"unknown option '{name}' for generator '{source.generator}'", entry=entry.name,
                           field=f"source.options.{name}", hint=f"known options: {', '.join(sorted(gen.options))}")
    options: dict[str, Any] = {}
    for name, (default, check) in gen.options.items():
        value = source.options.get(name, default)
        try:
            options[name] = check(value)
        except ValueError as exc:
            raise CatalogError(str(exc), entry=entry.name, field=f"source.options.{name}",
                               hint=f"default: {default!r}") from None
    if "finding_probabilities" in options:
        _check_class_names(entry, options["finding_probabilities"])
    return SyntheticParams(source.generator, source.seed, source.n_cases, shape, structures, options)


def _check_class_names(entry: Entry, probabilities: dict[str, float]) -> None:
    """A radiograph entry's ``labels`` must hold every class ``meta['label']`` can take, or
    training would meet a class it cannot index."""
    if entry.labels is None:
        return
    possible = ["normal", *(name for name in CXR_FINDINGS if probabilities[name] > 0)]
    missing = [name for name in possible if name not in entry.labels]
    if missing:
        raise CatalogError(f"labels lack {missing}, which this generator produces", entry=entry.name, field="labels",
                           hint=f"add them to labels, or set source.options.finding_probabilities: "
                                f"{{{', '.join(f'{m}: 0' for m in missing if m != 'normal')}}}")


def _check_label_names(entry: Entry, structures: tuple[str, ...]) -> None:
    """A segmentation entry's ``labels`` must give each structure its 1..K value, or the model
    would learn under wrong names without any error."""
    if not isinstance(entry.labels, dict):
        return
    expected = {name: i + 1 for i, name in enumerate(structures)}
    named = {k: v for k, v in entry.labels.items() if v != 0}
    if named != expected:
        raise CatalogError(f"labels {entry.labels} do not match source.structures {list(structures)}",
                           entry=entry.name, field="labels",
                           hint="use {background: 0, " + ", ".join(f"{k}: {v}" for k, v in expected.items()) + "}")


def list_synthetic_cases(entry: Entry) -> list[CaseRef]:
    """The entry's cases as lazy references; nothing is generated until ``load()``.

    Each ref has no source files (``sources=[]``) and a ``source_digest`` covering the
    generator, :data:`GENERATOR_VERSION`, all parameters and the case index.
    """
    params = resolve_synthetic_params(entry)
    gen = _GENERATORS[params.generator]
    prefix = params.options["id_prefix"]
    refs = []
    for index in range(params.n_cases):
        case_id = _case_id(prefix, index)
        refs.append(CaseRef(case_id=case_id, sources=[], load=functools.partial(gen.build, params, index, case_id),
                            source_digest=params.digest(index)))
    return refs


# --------------------------------------------------------------------------- random helpers
def _smooth_field(rng: np.random.Generator, axes: tuple[np.ndarray, ...], n_freq: int) -> np.ndarray:
    """A random smooth field with unit standard deviation on the grid spanned by ``axes``.

    A sum of separable cosines up to ``n_freq`` per axis with 1/f-like amplitudes, evaluated
    with pairwise einsum (no BLAS, so the bytes do not depend on thread counts).
    """
    k = np.arange(n_freq)
    weights = rng.standard_normal((n_freq,) * len(axes))
    for dim in range(len(axes)):
        shape = [1] * len(axes)
        shape[dim] = n_freq
        weights = weights / (1.0 + k.reshape(shape))
    bases = []
    for axis in axes:
        u = (axis - axis[0]) / max(float(axis[-1] - axis[0]), 1e-6)
        phase = rng.uniform(0, np.pi, n_freq)[:, None]
        bases.append(np.cos(np.pi * k[:, None] * u[None, :] + phase).astype(np.float32))
    out = weights.astype(np.float32)
    if len(axes) == 3:
        out = np.einsum("abc,ck->abk", out, bases[2])
        out = np.einsum("abk,bj->ajk", out, bases[1])
        out = np.einsum("ajk,ai->ijk", out, bases[0])
    else:
        out = np.einsum("ab,bj->aj", out, bases[1])
        out = np.einsum("aj,ai->ij", out, bases[0])
    sample = out[tuple(slice(None, None, 2) for _ in axes)]
    return (out - np.float32(sample.mean())) / np.float32(max(float(sample.std()), 1e-6))


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx from three angles in degrees."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class _Blob:
    """A rotated ellipsoid whose radius is modulated by low-order harmonics of the direction,
    which gives organ-like, asymmetric but smooth shapes."""

    center: np.ndarray
    radii: np.ndarray
    rot: np.ndarray
    wobble: np.ndarray

    def scaled(self, factor: float | np.ndarray) -> "_Blob":
        return _Blob(self.center.copy(), self.radii * factor, self.rot, self.wobble)


def _blob(rng: np.random.Generator, center: tuple[float, float, float], radii: tuple[float, float, float], *,
          body: np.ndarray, jitter: float, scale: tuple[float, float], angles: tuple[float, float, float],
          base_angles: tuple[float, float, float] = (0.0, 0.0, 0.0), wobble: float = 0.05) -> _Blob:
    """Sample a blob around a nominal pose; ``body`` scales x and y with the patient's size.

    Always draws the same number of variates, so that options never shift later draws.
    """
    c = (np.asarray(center) + rng.uniform(-1, 1, 3) * jitter) * body
    size = rng.uniform(scale[0], scale[1])
    r = np.asarray(radii) * size * rng.uniform(0.92, 1.08, 3) * body
    a = np.asarray(base_angles) + rng.uniform(-1, 1, 3) * np.asarray(angles)
    return _Blob(c, r, _rotation(a), rng.normal(0.0, wobble, 9))


# --------------------------------------------------------------------------- tissues
_TISSUES = (
    "air", "fat", "muscle", "mediastinum", "visceral_fat", "bowel", "rib", "airway",
    "lung_right", "lung_left", "heart_wall", "heart_blood", "aorta", "vertebra", "disc", "canal",
    "liver", "tumor", "spleen", "stomach_wall", "stomach", "stomach_gas", "kidney_right", "kidney_left",
    "effusion", "pneumothorax",
)
_T = {name: code for code, name in enumerate(_TISSUES)}
_N_TISSUES = len(_TISSUES)
_BONES = (_T["rib"], _T["vertebra"])
_CAVITY = ("mediastinum", "visceral_fat", "bowel")
_ABDOMEN = ("visceral_fat", "bowel")
_STRUCTURE_TISSUES: dict[str, tuple[str, ...]] = {
    "liver": ("liver", "tumor"),  # the tumour is part of the organ unless labelled itself
    "spleen": ("spleen",),
    "kidney_left": ("kidney_left",),
    "kidney_right": ("kidney_right",),
    "heart": ("heart_wall", "heart_blood"),
    "aorta": ("aorta",),
    "vertebra": ("vertebra",),
    "lung_left": ("lung_left",),
    "lung_right": ("lung_right",),
    "stomach": ("stomach_wall", "stomach", "stomach_gas"),
    "tumor": ("tumor",),
}


def _lut(names: tuple[str, ...] | list[str]) -> np.ndarray:
    out = np.zeros(_N_TISSUES, dtype=bool)
    out[[_T[n] for n in names]] = True
    return out


def _sample_hu(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-case mean HU (portal-venous-like contrast) and texture amplitude of every tissue."""
    u = rng.uniform
    hu = np.zeros(_N_TISSUES, dtype=np.float32)
    hu[_T["air"]] = -1000
    hu[_T["fat"]] = u(-115, -85)
    hu[_T["muscle"]] = u(40, 60)
    hu[_T["mediastinum"]] = u(-90, -50)
    hu[_T["visceral_fat"]] = hu[_T["fat"]] + u(-5, 15)
    hu[_T["bowel"]] = u(10, 40)
    hu[_T["rib"]] = u(500, 700)
    hu[_T["airway"]] = -990
    hu[[_T["lung_right"], _T["lung_left"]]] = u(-860, -780)
    hu[_T["heart_wall"]] = u(70, 110)
    hu[_T["heart_blood"]] = u(140, 220)
    hu[_T["aorta"]] = hu[_T["heart_blood"]] + u(-10, 30)
    hu[_T["vertebra"]] = u(550, 800)
    hu[_T["disc"]] = u(70, 100)
    hu[_T["canal"]] = u(10, 30)
    hu[_T["liver"]] = u(80, 130)
    hu[_T["tumor"]] = hu[_T["liver"]] - u(40, 75)
    hu[_T["spleen"]] = u(95, 140)
    hu[_T["stomach_wall"]] = u(90, 130)
    hu[_T["stomach"]] = u(15, 35)
    hu[_T["stomach_gas"]] = u(-980, -900)
    hu[[_T["kidney_right"], _T["kidney_left"]]] = u(140, 200)
    hu[_T["effusion"]] = u(5, 20)
    hu[_T["pneumothorax"]] = -1000
    texture = np.full(_N_TISSUES, 8.0, dtype=np.float32)
    texture[[_T["air"], _T["airway"], _T["pneumothorax"], _T["stomach_gas"]]] = 0.0
    texture[[_T["lung_right"], _T["lung_left"]]] = 45.0
    texture[[_T["rib"], _T["vertebra"]]] = 70.0
    texture[[_T["bowel"], _T["kidney_right"], _T["kidney_left"]]] = 14.0
    return hu, texture


# --------------------------------------------------------------------------- anatomy
@dataclass
class _Anatomy:
    """One patient's sampled anatomy in normalised coordinates (see the module docstring)."""

    bx: float
    by_ant: float
    by_post: float
    t_fat: float
    t_wall: float
    dome_right: float
    dome_left: float
    dome_height: float
    sx: float
    sy: float
    yv: float
    vert_r: tuple[float, float]
    vert_period: float
    vert_phase: float
    vert_curve: float
    rib_period: float
    rib_phase: float
    aorta_x: float
    aorta_y: float
    aorta_r: float
    aorta_wave: tuple[float, float]
    lungs: dict[str, _Blob]
    heart: _Blob
    blood_fraction: float
    liver: tuple[_Blob, _Blob]
    spleen: _Blob
    stomach: _Blob
    gas_level: float
    has_gas: bool
    kidneys: dict[str, _Blob]
    tumor: _Blob
    has_tumor: bool
    hu: np.ndarray
    texture: np.ndarray


def _sample_anatomy(rng: np.random.Generator, tumor_probability: float) -> _Anatomy:
    """Sample a patient: body habitus, organ poses, sizes, shapes and tissue HU.

    The draw sequence is fixed (every branch consumes the same variates), so a change in an
    option such as ``tumor_probability`` does not reshuffle the rest of the anatomy.
    """
    u = rng.uniform
    sx, sy = u(0.9, 1.04), u(0.88, 1.06)
    body = np.array([sx, sy, 1.0])
    t_fat, t_wall = u(0.05, 0.14), u(0.05, 0.07)
    dome_right = u(-0.04, 0.08)
    dome_left = dome_right - u(0.02, 0.08)
    dome_height = u(0.08, 0.14)
    by_post = 0.54 * sy
    yv = -by_post * (1 - t_fat - t_wall) + 0.19 * sy
    vert_r = (0.085 * u(0.9, 1.1) * sx, 0.075 * u(0.9, 1.1) * sy)
    aorta_r = u(0.042, 0.056)
    dz = 0.5 * (dome_right + dome_left)
    lungs = {
        "right": _blob(rng, (0.37, 0.0, dome_right + 0.47), (0.33, 0.52, 0.58), body=body, jitter=0.02,
                       scale=(0.93, 1.07), angles=(4, 4, 6), wobble=0.04),
        "left": _blob(rng, (-0.37, 0.0, dome_left + 0.47), (0.32, 0.52, 0.58), body=body, jitter=0.02,
                      scale=(0.93, 1.07), angles=(4, 4, 6), wobble=0.04),
    }
    heart = _blob(rng, (-0.12, 0.12, dz + 0.19), (0.32, 0.24, 0.23), body=body, jitter=0.025, scale=(0.88, 1.1),
                  angles=(6, 6, 8), base_angles=(0, -20, 25), wobble=0.04)
    liver = (
        _blob(rng, (0.36, 0.0, dome_right - 0.24), (0.4, 0.44, 0.3), body=body, jitter=0.03, scale=(0.85, 1.15),
              angles=(8, 8, 10), wobble=0.07),
        _blob(rng, (-0.02, 0.22, dome_right - 0.12), (0.3, 0.17, 0.12), body=body, jitter=0.03,
              scale=(0.75, 1.2), angles=(6, 10, 10), base_angles=(0, 12, 0), wobble=0.07),
    )
    spleen = _blob(rng, (-0.5, -0.2, dome_left - 0.22), (0.13, 0.24, 0.18), body=body, jitter=0.03,
                   scale=(0.75, 1.25), angles=(8, 8, 12), base_angles=(0, 0, -35), wobble=0.07)
    stomach = _blob(rng, (-0.24, 0.2, dome_left - 0.2), (0.2, 0.15, 0.17), body=body, jitter=0.03,
                    scale=(0.8, 1.2), angles=(8, 8, 15), base_angles=(0, 0, 20), wobble=0.07)
    kidneys = {
        "right": _blob(rng, (0.31, -0.25, dome_right - 0.62), (0.12, 0.1, 0.23), body=body, jitter=0.025,
                       scale=(0.85, 1.15), angles=(6, 6, 8), base_angles=(0, -10, -20), wobble=0.05),
        "left": _blob(rng, (-0.31, -0.25, dome_left - 0.55), (0.12, 0.1, 0.23), body=body, jitter=0.025,
                      scale=(0.85, 1.15), angles=(6, 6, 8), base_angles=(0, 10, 20), wobble=0.05),
    }
    right_lobe = liver[0]
    tumor_center = right_lobe.center + u(-0.35, 0.35, 3) * right_lobe.radii - np.array([0.0, 0.0, 0.05])
    tumor_r = u(0.07, 0.14) * u(0.8, 1.2, 3)
    tumor = _Blob(tumor_center, tumor_r, _rotation(u(-30, 30, 3)), rng.normal(0.0, 0.08, 9))
    has_tumor = bool(u() < tumor_probability)
    has_gas = bool(u() < 0.5)
    gas_level = u(0.7, 0.9)
    hu, texture = _sample_hu(rng)
    return _Anatomy(
        bx=0.86 * sx, by_ant=0.6 * sy, by_post=by_post, t_fat=t_fat, t_wall=t_wall,
        dome_right=dome_right, dome_left=dome_left, dome_height=dome_height, sx=sx, sy=sy,
        yv=yv, vert_r=vert_r, vert_period=u(0.11, 0.13), vert_phase=u(0, 1), vert_curve=u(-0.03, 0.03),
        rib_period=u(0.13, 0.16), rib_phase=u(0, 1),
        aorta_x=-0.06 * sx + u(-0.015, 0.015), aorta_y=yv + vert_r[1] + 0.03 + aorta_r, aorta_r=aorta_r,
        aorta_wave=(u(-0.03, 0.03), u(0, 2 * np.pi)),
        lungs=lungs, heart=heart, blood_fraction=u(0.65, 0.78), liver=liver, spleen=spleen, stomach=stomach,
        gas_level=gas_level, has_gas=has_gas, kidneys=kidneys, tumor=tumor, has_tumor=has_tumor,
        hu=hu, texture=texture,
    )


@dataclass
class _Chest:
    """Radiograph findings turned into geometry on top of an anatomy."""

    heart_scale: np.ndarray
    effusion: dict[str, float]  # side -> fluid height above the diaphragm
    pneumothorax: dict[str, float]  # side -> fraction of the lung left
    nodule: tuple[np.ndarray, float] | None  # centre, radius


class _Grid:
    """Voxel-centre coordinates along each axis, with helpers to work inside bounding boxes.

    ``y_offset`` (one value per z row) dithers the y samples of a projection grid: without it,
    the number of samples inside a structure steps at fixed x, which draws vertical bands into
    a radiograph; with it the quantisation error becomes fine noise.
    """

    def __init__(self, axes: tuple[np.ndarray, np.ndarray, np.ndarray], y_offset: np.ndarray | None = None):
        self.axes = tuple(a.astype(np.float32) for a in axes)
        self.shape = tuple(len(a) for a in axes)
        self.y_offset = None if y_offset is None else y_offset.astype(np.float32)
        self.full = tuple(slice(0, n) for n in self.shape)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        out = []
        for dim, (axis, a, b) in enumerate(zip(self.axes, lo, hi)):
            if dim == 1 and self.y_offset is not None:
                a, b = a - float(self.y_offset.max()), b - float(self.y_offset.min())
            i0, i1 = int(np.searchsorted(axis, a)), int(np.searchsorted(axis, b, side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def coords(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable x (n,1,1), y (1,n,1) or (1,n,m) when dithered, and z (1,1,m)."""
        x, y, z = (a[s] for a, s in zip(self.axes, sl))
        yy = y[None, :, None] if self.y_offset is None else y[None, :, None] + self.y_offset[sl[2]][None, None, :]
        return x[:, None, None], yy, z[None, None, :]


_WOBBLE_BOUND = np.array([1.0, 1.0, 1.0, 1.0, 0.67, 0.5, 0.5, 0.5, 0.2])


def _blob_mask(grid: _Grid, blob: _Blob) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """The blob's voxels as (bounding box, mask inside it), or None when it misses the grid.

    The radius modulation is evaluated on the local coordinates themselves rather than on the
    unit direction: the two agree on the surface, where it matters, and this saves a square
    root and three divisions per voxel.
    """
    rot = blob.rot  # local -> world
    half = np.sqrt(((rot * blob.radii[None, :]) ** 2).sum(axis=1)) * (1.0 + float(np.abs(blob.wobble) @ _WOBBLE_BOUND))
    sl = grid.box(blob.center - half, blob.center + half)
    if sl is None:
        return None
    x, y, z = grid.coords(sl)
    x, y, z = x - float(blob.center[0]), y - float(blob.center[1]), z - float(blob.center[2])
    q = [x * float(rot[0, i] / blob.radii[i]) + y * float(rot[1, i] / blob.radii[i]) + z * float(rot[2, i] / blob.radii[i])
         for i in range(3)]
    w = [float(v) for v in blob.wobble]
    q0q0, q1q1, q2q2 = q[0] * q[0], q[1] * q[1], q[2] * q[2]
    m = (1.0 + w[0] * q[0] + w[1] * q[1] + w[2] * q[2] + w[3] * (q0q0 - q1q1) + w[4] * (q2q2 - 0.33)
         + q[0] * (w[5] * q[1] + w[6] * q[2]) + q[1] * q[2] * (w[7] + w[8] * q[0]))
    return sl, q0q0 + q1q1 + q2q2 < m * m


def _local_y(grid: _Grid, blob: _Blob, sl: tuple[slice, slice, slice]) -> np.ndarray:
    """The blob's second local coordinate (normalised by its radius) inside ``sl``."""
    x, y, z = grid.coords(sl)
    rot, c, r = blob.rot, blob.center, float(blob.radii[1])
    return ((x - float(c[0])) * float(rot[0, 1] / r) + (y - float(c[1])) * float(rot[1, 1] / r)
            + (z - float(c[2])) * float(rot[2, 1] / r))


def _paint(tissue: np.ndarray, sl: tuple[slice, ...], mask: np.ndarray, code: str,
           allowed: np.ndarray | None = None) -> None:
    """Set ``code`` where ``mask`` holds inside ``sl``, only over tissues in ``allowed``."""
    sub = tissue[sl]
    if allowed is not None:
        mask = mask & allowed[sub]
    sub[mask] = _T[code]


def _paint_blob(tissue: np.ndarray, grid: _Grid, blob: _Blob, code: str, allowed: np.ndarray | None = None,
                extra: Callable[[tuple[slice, slice, slice]], np.ndarray] | None = None) -> None:
    found = _blob_mask(grid, blob)
    if found is None:
        return
    sl, mask = found
    if extra is not None:
        mask = mask & extra(sl)
    _paint(tissue, sl, mask, code, allowed)


def _tube(grid: _Grid, xc: Callable[[np.ndarray], np.ndarray], yc: Callable[[np.ndarray], np.ndarray],
          rx: float, ry: float, z0: float, z1: float, slack: float = 0.1
          ) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray] | None:
    """An elliptic tube along z with centre line (xc(z), yc(z)): (box, mask, z coords)."""
    zs = grid.axes[2]
    zsel = zs[(zs >= z0) & (zs <= z1)]
    if zsel.size == 0:
        return None
    cx, cy = xc(zsel), yc(zsel)
    lo = np.array([cx.min() - rx, cy.min() - ry, z0])
    hi = np.array([cx.max() + rx, cy.max() + ry, z1])
    sl = grid.box(lo - [slack * rx, slack * ry, 0], hi + [slack * rx, slack * ry, 0])
    if sl is None:
        return None
    x, y, z = grid.coords(sl)
    zz = z[0, 0]
    mask = ((x - xc(zz)[None, None, :]) / rx) ** 2 + ((y - yc(zz)[None, None, :]) / ry) ** 2 < 1.0
    return sl, mask, z


def _body_profile(z: np.ndarray) -> np.ndarray:
    """Relative torso width along z: a barrel narrowing towards the apices, then the neck."""
    barrel = 1.0 - 0.1 * np.clip((z - 0.45) / 0.6, 0.0, 1.0) ** 2
    t = np.clip((z - 0.98) / 0.16, 0.0, 1.0)
    return (barrel * (1.0 - 0.5 * t * t * (3.0 - 2.0 * t))).astype(np.float32)


def _dome(anat: _Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height of the diaphragm over (x, y): a dome per hemithorax, the right one higher."""
    base = np.where(x > 0, anat.dome_right, anat.dome_left)
    shape = 1.0 - ((np.abs(x) / anat.sx - 0.3) / 0.5) ** 2 - ((y / anat.sy + 0.05) / 0.55) ** 2
    return (base + anat.dome_height * np.maximum(shape, -2.0)).astype(np.float32)


def _render(anat: _Anatomy, grid: _Grid, rng: np.random.Generator, chest: _Chest | None = None) -> np.ndarray:
    """Paint the anatomy into a tissue-code volume (uint8, the grid's shape)."""
    x, y, z = grid.coords(grid.full)
    by = np.where(y >= 0, np.float32(anat.by_ant), np.float32(anat.by_post))
    rho = np.sqrt((x / np.float32(anat.bx)) ** 2 + (y / by) ** 2) / _body_profile(z)
    tissue = np.full(grid.shape, _T["air"], dtype=np.uint8)
    tissue[rho < 1.0] = _T["fat"]
    tissue[rho < 1.0 - anat.t_fat] = _T["muscle"]
    inner = 1.0 - anat.t_fat - anat.t_wall
    cavity = rho < inner
    dome = _dome(anat, x, y)
    thorax = z > dome
    tissue[cavity & thorax] = _T["mediastinum"]
    tissue[cavity & ~thorax] = _T["visceral_fat"]
    tissue[cavity & ~thorax & (z > dome - 0.035)] = _T["muscle"]  # the diaphragm
    bowel = _smooth_field(rng, grid.axes, 10) > 0.15
    tissue[(tissue == _T["visceral_fat"]) & bowel & (z < dome - 0.2)] = _T["bowel"]
    band = np.mod((z + 0.35 * y) / anat.rib_period + anat.rib_phase, 1.0) < 0.3
    ribs = (rho >= inner) & (rho < inner + 0.6 * anat.t_wall) & band & (z > anat.dome_left - 0.25) & (z < 1.02)
    ribs &= ~((np.abs(x) < 0.12) & (y > 0))
    tissue[ribs] = _T["rib"]
    sternum = (np.abs(x) < 0.07) & (rho >= inner) & (rho < inner + 0.7 * anat.t_wall) & (y > 0)
    tissue[sternum & (z > anat.dome_right) & (z < 1.0)] = _T["rib"]

    cavity_lut = _lut(_CAVITY)
    abdomen_lut = _lut(_ABDOMEN)
    yv, (vrx, vry) = anat.yv, anat.vert_r

    def spine_y(zz: np.ndarray) -> np.ndarray:
        return yv + anat.vert_curve * (zz - 0.2) ** 2

    for side in (1.0, -1.0):
        para = _tube(grid, lambda zz, s=side: np.full_like(zz, s * 0.15 * anat.sx),
                     lambda zz: spine_y(zz) - 0.12, 0.1 * anat.sx, 0.09 * anat.sy, -2.0, 2.0)
        if para is not None:
            _paint(tissue, para[0], para[1], "muscle", _lut([*_CAVITY, "fat", "rib"]))

    lung_codes = {"right": "lung_right", "left": "lung_left"}
    for side, blob in anat.lungs.items():
        sign = 1.0 if side == "right" else -1.0
        _paint_blob(tissue, grid, blob, lung_codes[side], _lut(["mediastinum"]),
                    extra=lambda sl, s=sign: (grid.coords(sl)[0] * s > 0.07 * anat.sx))
    mediastinal_lut = _lut(["mediastinum", "lung_right", "lung_left"])
    heart = anat.heart.scaled(chest.heart_scale) if chest is not None else anat.heart
    _paint_blob(tissue, grid, heart, "heart_wall", mediastinal_lut)
    _paint_blob(tissue, grid, heart.scaled(anat.blood_fraction), "heart_blood", _lut(["heart_wall"]))
    trachea = _tube(grid, lambda zz: np.full_like(zz, 0.01), lambda zz: spine_y(zz) + vry + 0.11,
                    0.035, 0.035, anat.dome_right + 0.55, 2.0)
    if trachea is not None:
        _paint(tissue, trachea[0], trachea[1], "airway", mediastinal_lut)
    amp, phase = anat.aorta_wave
    aorta = _tube(grid, lambda zz: anat.aorta_x + amp * np.sin(2.0 * zz + phase),
                  lambda zz: spine_y(zz) + (anat.aorta_y - yv), anat.aorta_r, anat.aorta_r, -0.8, 0.8)
    if aorta is not None:
        _paint(tissue, aorta[0], aorta[1], "aorta", _lut([*_CAVITY, "muscle", "lung_right", "lung_left",
                                                             "heart_wall", "heart_blood"]))

    not_air = ~_lut(["air"])
    column = _tube(grid, lambda zz: np.zeros_like(zz), spine_y, vrx, vry, -2.0, 2.0)
    if column is not None:
        sl, mask, zc = column
        disc = np.mod(zc / anat.vert_period + anat.vert_phase, 1.0) < 0.22
        _paint(tissue, sl, mask & ~disc, "vertebra", not_air)
        _paint(tissue, sl, mask & disc, "disc", not_air)
    arch = _tube(grid, lambda zz: np.zeros_like(zz), lambda zz: spine_y(zz) - vry - 0.045, 0.075, 0.06, -2.0, 2.0)
    if arch is not None:
        _paint(tissue, arch[0], arch[1], "vertebra", not_air)
    canal = _tube(grid, lambda zz: np.zeros_like(zz), lambda zz: spine_y(zz) - vry - 0.045, 0.042, 0.034, -2.0, 2.0)
    if canal is not None:
        _paint(tissue, canal[0], canal[1], "canal", not_air)
    spinous = _tube(grid, lambda zz: np.zeros_like(zz), lambda zz: spine_y(zz) - vry - 0.13, 0.022, 0.05, -2.0, 2.0)
    if spinous is not None:
        _paint(tissue, spinous[0], spinous[1], "vertebra", not_air)

    for lobe in anat.liver:
        _paint_blob(tissue, grid, lobe, "liver", abdomen_lut)
    _paint_blob(tissue, grid, anat.spleen, "spleen", abdomen_lut)
    _paint_blob(tissue, grid, anat.stomach.scaled(1.35), "visceral_fat", abdomen_lut)  # a fat plane around it
    _paint_blob(tissue, grid, anat.stomach, "stomach_wall", abdomen_lut)
    content = anat.stomach.scaled(0.8)
    found = _blob_mask(grid, content)
    if found is not None:
        sl, mask = found
        _paint(tissue, sl, mask, "stomach", _lut(["stomach_wall"]))
        if anat.has_gas:
            _paint(tissue, sl, mask & (_local_y(grid, content, sl) > anat.gas_level), "stomach_gas",
                   _lut(["stomach"]))
    kidney_lut = _lut([*_ABDOMEN, "liver", "spleen", "muscle"])
    for side, blob in anat.kidneys.items():
        _paint_blob(tissue, grid, blob.scaled(1.35), "visceral_fat", _lut([*_ABDOMEN, "muscle"]))
        _paint_blob(tissue, grid, blob, f"kidney_{side}", kidney_lut)
    if anat.has_tumor:
        _paint_blob(tissue, grid, anat.tumor, "tumor", _lut(["liver"]))
    if chest is not None:
        _paint_chest(tissue, grid, anat, chest, dome)
    return tissue


def _paint_chest(tissue: np.ndarray, grid: _Grid, anat: _Anatomy, chest: _Chest, dome: np.ndarray) -> None:
    """Pneumothorax (lung collapsed away from the chest wall) and pleural effusion (fluid at the base)."""
    for side, fraction in chest.pneumothorax.items():
        blob = anat.lungs[side]
        shrunk = blob.scaled(fraction)
        shrunk.center = blob.center - np.array([0.0, 0.0, (1 - fraction) * blob.radii[2] * 0.5])
        shrunk.center[0] = blob.center[0] - np.sign(blob.center[0]) * (1 - fraction) * blob.radii[0] * 0.6
        found = _blob_mask(grid, blob.scaled(1.3))
        if found is None:
            continue
        sl, _ = found
        kept = np.zeros(grid.shape, dtype=bool)
        inner = _blob_mask(grid, shrunk)
        if inner is not None:
            kept[inner[0]] = inner[1]
        code = _T[f"lung_{side}"]
        region = tissue[sl]
        region[(region == code) & ~kept[sl]] = _T["pneumothorax"]
    x, _, z = grid.coords(grid.full)
    for side, height in chest.effusion.items():
        code = _T[f"lung_{side}"]
        lateral = np.abs(x) / (0.7 * anat.sx)
        level = dome + height * (0.6 + 0.8 * np.clip(lateral, 0, 1.2))
        tissue[(tissue == code) & (z < level)] = _T["effusion"]


def _phantom_grid(shape: tuple[int, int, int]) -> _Grid:
    """The 3D field of view: x and y over [-1, 1], z over [-0.95, 1.05] (lung apices to pelvis)."""
    def centres(n: int, lo: float, hi: float) -> np.ndarray:
        step = (hi - lo) / n
        return lo + step * (np.arange(n) + 0.5)
    return _Grid((centres(shape[0], -1.0, 1.0), centres(shape[1], -1.0, 1.0), centres(shape[2], -0.95, 1.05)))


# --------------------------------------------------------------------------- phantom3d
def _label_lut(structures: tuple[str, ...]) -> np.ndarray:
    """Tissue code -> label value; the tumour label wins over the liver label inside the liver."""
    lut = np.zeros(_N_TISSUES, dtype=np.uint8)
    ordered = sorted(enumerate(structures), key=lambda item: item[1] == "tumor")
    for index, name in ordered:
        for tissue in _STRUCTURE_TISSUES[name]:
            lut[_T[tissue]] = index + 1
    return lut


def _build_phantom(params: SyntheticParams, index: int, case_id: str) -> RawCase:
    """One CT phantom: HU image with texture, bias field, partial-volume blur and noise, plus labels."""
    assert params.shape is not None and params.structures is not None
    opts = params.options
    rng = np.random.default_rng([params.seed, index])
    anat = _sample_anatomy(rng, opts["tumor_probability"])
    grid = _phantom_grid(params.shape)  # type: ignore[arg-type]
    tissue = _render(anat, grid, rng)
    image = anat.hu[tissue] + anat.texture[tissue] * _smooth_field(rng, grid.axes, 7)
    bias = _smooth_field(rng, grid.axes, 2) * np.float32(opts["bias_hu"])
    image += np.where(tissue != _T["air"], bias, np.float32(0.0))
    image = ndimage.gaussian_filter(image, 0.5, mode="nearest")
    image += rng.standard_normal(grid.shape, dtype=np.float32) * np.float32(opts["noise_hu"])
    label = _label_lut(params.structures)[tissue]
    spacing = opts["spacing"] or [1.5, 1.5, 1.5]
    affine = np.diag([*spacing, 1.0]).tolist()
    return RawCase(
        case_id=case_id,
        arrays={"image": image.astype(np.float32, copy=False), "label": label},
        meta={
            "spacing": spacing,
            "affine": affine,
            "modality_hint": "ct",
            "labels": {"background": 0, **{name: i + 1 for i, name in enumerate(params.structures)}},
            "tumor": bool((tissue == _T["tumor"]).any()),
            "generator": "phantom3d",
        },
    )


# --------------------------------------------------------------------------- radiograph2d and reports
@dataclass(frozen=True)
class CxrFindings:
    """A radiograph's findings: names in :data:`CXR_FINDINGS` order (``('normal',)`` when none)
    and their details (side, size, severity, nodule size in mm and lung zone)."""

    findings: tuple[str, ...]
    details: dict[str, dict[str, Any]]

    @property
    def label(self) -> str:
        """The primary class: the first finding in canonical order, or ``normal``."""
        return self.findings[0]

    @property
    def multi_hot(self) -> dict[str, int]:
        return {name: int(name in self.findings) for name in CXR_CLASSES}


def sample_cxr_findings(seed: int, case_index: int, probabilities: dict[str, float] | None = None) -> CxrFindings:
    """The findings of radiograph ``case_index``, from a stream of their own.

    Both ``radiograph2d`` (which renders them) and ``reports`` (which describes them) call this,
    so a report always names exactly its image's findings. A fixed number of variates is drawn,
    so changing one probability does not change the other findings' details.
    """
    probs = {**DEFAULT_FINDING_PROBABILITIES, **(probabilities or {})}
    rng = np.random.default_rng([seed, case_index, _FINDINGS_STREAM])
    draws = rng.random(len(CXR_FINDINGS))
    side = rng.random(len(CXR_FINDINGS))
    size = rng.random(len(CXR_FINDINGS))
    nodule_mm = int(rng.integers(8, 31))
    zone = ("upper", "mid", "lower")[int(rng.integers(3))]
    present = [name for name, d in zip(CXR_FINDINGS, draws) if d < probs[name]]
    details: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(CXR_FINDINGS):
        if name not in present:
            continue
        if name == "cardiomegaly":
            details[name] = {"severity": "mild" if size[i] < 0.6 else "moderate"}
        elif name == "pleural_effusion":
            details[name] = {"side": "left" if side[i] < 0.4 else ("right" if side[i] < 0.8 else "bilateral"),
                             "size": "small" if size[i] < 0.5 else ("moderate" if size[i] < 0.85 else "large")}
        elif name == "nodule":
            details[name] = {"side": "left" if side[i] < 0.5 else "right", "size_mm": nodule_mm, "zone": zone}
        else:
            details[name] = {"side": "left" if side[i] < 0.5 else "right", "size": "small" if size[i] < 0.6 else "large"}
    return CxrFindings(tuple(present) or ("normal",), details)


def _sample_chest(rng: np.random.Generator, anat: _Anatomy, f: CxrFindings) -> _Chest:
    """Geometry of the findings; draws a fixed number of variates whatever the findings are."""
    mild, moderate = rng.uniform(1.22, 1.32), rng.uniform(1.35, 1.5)
    depth = rng.uniform(1.05, 1.15)
    heart_scale = np.ones(3)
    if "cardiomegaly" in f.details:
        grow = mild if f.details["cardiomegaly"]["severity"] == "mild" else moderate
        heart_scale = np.array([grow, depth, 0.5 + 0.5 * grow])
    effusion_heights = {"small": rng.uniform(0.08, 0.14), "moderate": rng.uniform(0.18, 0.28),
                        "large": rng.uniform(0.32, 0.45)}
    effusion: dict[str, float] = {}
    if "pleural_effusion" in f.details:
        d = f.details["pleural_effusion"]
        sides = ("left", "right") if d["side"] == "bilateral" else (d["side"],)
        effusion = {s: float(effusion_heights[d["size"]]) for s in sides}
    collapse = {"small": rng.uniform(0.82, 0.9), "large": rng.uniform(0.6, 0.72)}
    pneumothorax: dict[str, float] = {}
    if "pneumothorax" in f.details:
        d = f.details["pneumothorax"]
        pneumothorax = {d["side"]: float(collapse[d["size"]])}
    offset = rng.uniform(-1, 1, 3)
    nodule = None
    if "nodule" in f.details:
        d = f.details["nodule"]
        sign = 1.0 if d["side"] == "right" else -1.0
        base = anat.dome_right if sign > 0 else anat.dome_left
        zc = base + {"upper": 0.72, "mid": 0.46, "lower": 0.22}[d["zone"]] + 0.05 * offset[2]
        centre = np.array([sign * (0.4 + 0.1 * offset[0]) * anat.sx, 0.12 * offset[1] * anat.sy, zc])
        nodule = (centre, d["size_mm"] / 2.0 / MM_PER_UNIT)
    return _Chest(heart_scale, effusion, pneumothorax, nodule)


def _build_radiograph(params: SyntheticParams, index: int, case_id: str) -> RawCase:
    """A PA chest radiograph: line integrals of attenuation through a phantom with the case's findings.

    The image is (H, W) with the patient's right on the viewer's left and the head at the top.
    """
    assert params.shape is not None
    opts = params.options
    findings = sample_cxr_findings(params.seed, index, opts["finding_probabilities"])
    rng = np.random.default_rng([params.seed, index])
    anat = _sample_anatomy(rng, 0.0)
    chest = _sample_chest(rng, anat, findings)
    height, width = params.shape
    pixel = 1.8 / height
    xs = (np.arange(width) - (width - 1) / 2) * pixel
    zs = 0.4 + (np.arange(height) - (height - 1) / 2) * pixel
    depth = max(16, height // 4)
    ys = -0.75 + 1.5 / depth * np.arange(depth)
    grid = _Grid((xs, ys, zs), y_offset=rng.uniform(0.0, 1.5 / depth, height))
    tissue = _render(anat, grid, rng, chest)
    hu = anat.hu.copy()
    for side, fraction in chest.pneumothorax.items():  # the collapsed lung holds less air
        hu[_T[f"lung_{side}"]] += 250.0 * (1.0 - fraction) / 0.4
    mu = np.clip(1.0 + hu / 1000.0, 0.0, None).astype(np.float32)
    mu[list(_BONES)] *= _BONE_MU_FACTOR
    step = np.float32(1.5 / depth * _MU_WATER_PER_UNIT)
    path = mu[tissue].sum(axis=1) * step  # (W, H)
    lung = _lut(["lung_right", "lung_left"])[tissue].sum(axis=1) * np.float32(1.5 / depth)
    hilum = np.clip(1.3 - np.abs(xs)[:, None] / 0.6, 0.3, 1.3)
    markings = np.maximum(_smooth_field(rng, (xs, zs), 24), 0.0)
    path += np.float32(0.12 * _MU_WATER_PER_UNIT) * lung * markings * hilum
    if chest.nodule is not None:
        (cx, _, cz), radius = chest.nodule
        d2 = (xs[:, None] - cx) ** 2 + (zs[None, :] - cz) ** 2
        chord = 2.0 * np.sqrt(np.clip(radius * radius - d2, 0.0, None))
        path += np.float32(0.85 * _MU_WATER_PER_UNIT) * chord.astype(np.float32)
    path = ndimage.gaussian_filter(path, 0.6, mode="nearest")
    image = np.clip(path / 7.0, 0.0, 1.0) ** 0.8
    image = image + rng.standard_normal(image.shape).astype(np.float32) * np.float32(opts["noise"])
    image = np.clip(image[::-1, ::-1].T, 0.0, 1.0)
    spacing = opts["spacing"] or [pixel * MM_PER_UNIT, pixel * MM_PER_UNIT]
    return RawCase(
        case_id=case_id,
        arrays={"image": np.round(image * 255).astype(np.uint8)},
        meta={
            "spacing": spacing,
            "modality_hint": "xray",
            "view": "PA",
            "findings": list(findings.findings),
            "label": findings.label,
            "multi_hot": findings.multi_hot,
            "finding_details": findings.details,
            "generator": "radiograph2d",
        },
    )


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _write_report(f: CxrFindings, rng: np.random.Generator) -> dict[str, str]:
    """Findings and impression sections in radiology style, with templated variety."""
    d = f.details
    sentences: list[str] = []
    impressions: list[str] = []
    if "cardiomegaly" in d:
        severity = d["cardiomegaly"]["severity"]
        sentences.append(_pick(rng, ("The heart is enlarged.", "The cardiac silhouette is enlarged.",
                                     f"{severity.capitalize()} cardiomegaly.", "Cardiomegaly is present.")))
        impressions.append(_pick(rng, ("Cardiomegaly.", f"{severity.capitalize()} cardiomegaly.",
                                       "Enlarged cardiac silhouette.")))
    else:
        sentences.append(_pick(rng, ("Heart size is normal.", "The cardiomediastinal silhouette is within normal limits.",
                                     "Normal heart size.")))
    if "nodule" in d:
        n = d["nodule"]
        article = "An" if str(n["size_mm"]).startswith("8") or n["size_mm"] in (11, 18) else "A"
        sentences.append(_pick(rng, (f"{article} {n['size_mm']} mm nodule is seen in the {n['side']} {n['zone']} lung zone.",
                                     f"There is {article.lower()} {n['size_mm']} mm {n['side']} {n['zone']} zone pulmonary nodule.",
                                     f"{n['side'].capitalize()} {n['zone']} zone nodular opacity measuring {n['size_mm']} mm.")))
        sentences.append("The lungs are otherwise clear.")
        impressions.append(_pick(rng, (f"{n['side'].capitalize()} pulmonary nodule; CT is recommended for further characterization.",
                                       f"{n['size_mm']} mm {n['side']} lung nodule. Follow-up chest CT recommended.")))
    else:
        sentences.append(_pick(rng, ("The lungs are clear.", "No focal consolidation.",
                                     "The lungs are clear without focal consolidation.")))
    pleura = []
    if "pleural_effusion" in d:
        e = d["pleural_effusion"]
        text = (f"{e['size'].capitalize()} bilateral pleural effusions." if e["side"] == "bilateral" else
                _pick(rng, (f"{e['size'].capitalize()} {e['side']} pleural effusion.",
                            f"There is a {e['size']} {e['side']} pleural effusion with blunting of the costophrenic angle.")))
        pleura.append(text)
        impressions.append(f"{e['size'].capitalize()} {e['side']} pleural effusion{'s' if e['side'] == 'bilateral' else ''}.")
    if "pneumothorax" in d:
        p = d["pneumothorax"]
        pleura.append(_pick(rng, (f"{p['size'].capitalize()} {p['side']} pneumothorax.",
                                  f"There is a {p['size']} {p['side']} apical pneumothorax.")))
        impressions.append(f"{p['size'].capitalize()} {p['side']} pneumothorax.")
    if not pleura:
        pleura.append(_pick(rng, ("No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax.")))
    elif "pneumothorax" not in d:
        pleura.append("No pneumothorax.")
    elif "pleural_effusion" not in d:
        pleura.append("No pleural effusion.")
    sentences.extend(pleura)
    if rng.random() < 0.4:
        sentences.append(_pick(rng, ("No acute osseous abnormality.", "The visualized osseous structures are unremarkable.")))
    if not impressions:
        impression = _pick(rng, ("No acute cardiopulmonary abnormality.", "No acute cardiopulmonary process.",
                                 "Normal chest radiograph."))
    elif len(impressions) > 1 and rng.random() < 0.5:
        impression = " ".join(f"{i + 1}. {text}" for i, text in enumerate(impressions))
    else:
        impression = " ".join(impressions)
    return {"findings": " ".join(sentences), "impression": impression}


def check_report_pairing(reports: Entry, radiographs: Entry) -> None:
    """Refuse a ``reports`` entry that would not describe the ``radiograph2d`` entry it pairs with.

    Pairing is by case id and the findings come from ``(seed, case index)`` and the finding
    probabilities, so those must agree and the id prefixes must match; otherwise every report
    would silently describe another image. Call it when an entry's ``pairs`` links the two.
    """
    rep, rad = resolve_synthetic_params(reports), resolve_synthetic_params(radiographs)
    if rep.generator != "reports" or rad.generator != "radiograph2d":
        raise CatalogError("pairing check needs a 'reports' and a 'radiograph2d' entry", entry=reports.name,
                           field="source.generator", hint="pair reports with a radiograph2d entry")
    for name, a, b in (("seed", rep.seed, rad.seed),
                       ("options.id_prefix", rep.options["id_prefix"], rad.options["id_prefix"]),
                       ("options.finding_probabilities", rep.options["finding_probabilities"],
                        rad.options["finding_probabilities"])):
        if a != b:
            raise CatalogError(f"{a!r} differs from {b!r} in '{radiographs.name}'", entry=reports.name,
                               field=f"source.{name}", hint=f"use the same {name} as '{radiographs.name}'")


def _build_report(params: SyntheticParams, index: int, case_id: str) -> RawCase:
    """The report paired with radiograph ``index`` of the same seed (no arrays)."""
    findings = sample_cxr_findings(params.seed, index, params.options["finding_probabilities"])
    text = _write_report(findings, np.random.default_rng([params.seed, index, _REPORT_TEXT_STREAM]))
    return RawCase(
        case_id=case_id,
        meta={
            "text": text,
            "labels": list(findings.findings),
            "findings": list(findings.findings),
            "finding_details": findings.details,
            "generator": "reports",
        },
    )


# --------------------------------------------------------------------------- pathology_pairs
def pathology_gene_names(n_genes: int) -> list[str]:
    """Names of the ``expression`` entries of ``pathology_pairs`` cases (``SYN0000``...)."""
    return [f"SYN{i:04d}" for i in range(n_genes)]


@dataclass(frozen=True)
class _Biology:
    """The disease shared by all patients: subtype programmes, cross-modal loadings and hazards."""

    weights: np.ndarray
    latent_means: np.ndarray
    expr_base: np.ndarray
    expr_programmes: np.ndarray
    expr_loadings: np.ndarray
    feat_normal: np.ndarray
    feat_tumour: np.ndarray
    feat_loadings: np.ndarray
    tumour_fraction: np.ndarray
    log_hazard: np.ndarray
    risk_weights: np.ndarray


_LATENT_DIM = 8


@functools.lru_cache(maxsize=16)
def _biology(biology_seed: int, n_subtypes: int, feature_dim: int, n_genes: int, signal: float) -> _Biology:
    """Derived from ``biology_seed`` only, not the entry seed, so entries with different seeds
    (train / held-out cohorts) sample patients of the same disease."""
    rng = np.random.default_rng([biology_seed, _BIOLOGY_STREAM])
    k, g, f, latent = n_subtypes, n_genes, feature_dim, _LATENT_DIM
    weights = rng.dirichlet(np.full(k, 12.0))
    latent_means = rng.normal(0.0, 0.5, (k, latent)) * signal
    expr_base = rng.uniform(1.0, 8.0, g)
    active = rng.random((k, g)) < 0.12
    expr_programmes = np.where(active, rng.choice([-1.0, 1.0], (k, g)) * rng.uniform(0.6, 1.2, (k, g)), 0.0) * signal
    expr_loadings = rng.normal(0.0, 0.3, (g, latent))
    feat_normal = rng.normal(0.0, 1.0, f)
    feat_tumour = feat_normal + rng.normal(0.0, 0.8, f) + rng.normal(0.0, 0.35, (k, f)) * signal
    feat_loadings = rng.normal(0.0, 0.3, (f, latent))
    tumour_fraction = rng.uniform(0.4, 0.8, k)
    medians = np.exp(rng.permutation(np.linspace(np.log(12.0), np.log(60.0), k)))  # months
    log_hazard = np.log(np.log(2.0) / medians)
    risk_weights = rng.normal(0.0, 1.0, latent)
    risk_weights *= 0.6 / np.linalg.norm(risk_weights)
    return _Biology(weights, latent_means, expr_base, expr_programmes, expr_loadings, feat_normal, feat_tumour,
                    feat_loadings, tumour_fraction, log_hazard, risk_weights)


def _build_pathology(params: SyntheticParams, index: int, case_id: str) -> RawCase:
    """One patient: slide patch features and expression sharing subtype and latent-risk signal."""
    o = params.options
    bio = _biology(o["biology_seed"], o["n_subtypes"], o["feature_dim"], o["n_genes"], o["signal"])
    rng = np.random.default_rng([params.seed, index])
    subtype = int(rng.choice(o["n_subtypes"], p=bio.weights))
    z = bio.latent_means[subtype] + rng.standard_normal(_LATENT_DIM)
    expression = (bio.expr_base + bio.expr_programmes[subtype] + bio.expr_loadings @ z
                  + rng.normal(0.0, 0.6, o["n_genes"]))
    patient_effect = rng.normal(0.0, 0.4, o["feature_dim"])
    is_tumour = rng.random(o["n_patches"]) < bio.tumour_fraction[subtype]
    tumour = bio.feat_tumour[subtype] + bio.feat_loadings @ z + patient_effect
    features = np.where(is_tumour[:, None], tumour[None, :], bio.feat_normal[None, :] + 0.5 * patient_effect)
    features = features + rng.normal(0.0, 1.0, (o["n_patches"], o["feature_dim"]))
    hazard = np.exp(bio.log_hazard[subtype] + bio.risk_weights @ z)
    event_time = rng.exponential(1.0 / hazard)
    censored = rng.random() < o["censoring"]
    observed = event_time * rng.uniform(0.1, 1.0) if censored else event_time
    return RawCase(
        case_id=case_id,
        arrays={"features": features.astype(np.float32), "expression": expression.astype(np.float32)},
        meta={
            "subtype": f"subtype_{chr(ord('A') + subtype)}",
            "subtype_index": subtype,
            "survival_time": round(float(observed), 3),
            "event": not censored,
            "generator": "pathology_pairs",
        },
    )


# --------------------------------------------------------------------------- registry
_CXR_OPTIONS: dict[str, tuple[Any, Validator]] = {
    "id_prefix": ("cxr", _id_prefix),
    "finding_probabilities": ({}, _finding_probabilities),
}

_GENERATORS: dict[str, _Generator] = {
    "phantom3d": _Generator(
        build=_build_phantom, dims=3, default_shape=(64, 64, 64), min_size=16, max_size=512, uses_structures=True,
        options={
            "id_prefix": ("phantom", _id_prefix),
            "spacing": (None, _spacing(3)),
            "noise_hu": (20.0, _float_in(0.0, 500.0)),
            "bias_hu": (20.0, _float_in(0.0, 500.0)),
            "tumor_probability": (0.6, _float_in(0.0, 1.0)),
        },
    ),
    "radiograph2d": _Generator(
        build=_build_radiograph, dims=2, default_shape=(128, 128), min_size=32, max_size=1024,
        options={**_CXR_OPTIONS, "spacing": (None, _spacing(2)), "noise": (0.015, _float_in(0.0, 0.5))},
    ),
    "reports": _Generator(build=_build_report, dims=0, default_shape=None, min_size=0, max_size=0, options=dict(_CXR_OPTIONS)),
    "pathology_pairs": _Generator(
        build=_build_pathology, dims=0, default_shape=None, min_size=0, max_size=0,
        options={
            "id_prefix": ("path", _id_prefix),
            "n_subtypes": (4, _int_in(2, 26)),
            "n_patches": (32, _int_in(1, 4096)),
            "feature_dim": (64, _int_in(2, 4096)),
            "n_genes": (200, _int_in(10, 50_000)),
            "censoring": (0.3, _float_in(0.0, 0.95)),
            "signal": (1.0, _float_in(0.0, 10.0)),
            "biology_seed": (0, _int_in(0, 2**31 - 1)),
        },
    ),
}
