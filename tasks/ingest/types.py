"""What readers hand to the ingest step: lazy case references and loaded cases.

A reader lists its cases cheaply (:class:`CaseRef`: id + source files) and loads each one
only when asked, so that one corrupt file becomes a quarantine entry for that case while
the rest proceeds, and so that the version digest (which covers the source files) is known
before any case is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np


class CaseError(ValueError):
    """A case cannot be ingested; the message is the quarantine reason."""


@dataclass
class RawCase:
    """One decoded case.

    ``arrays`` holds the case's arrays by role: ``image`` (3D: (D,H,W) or (C,D,H,W) in the
    source orientation described by ``meta['affine']``; 2D: (H,W) or (H,W,C)), optionally
    ``label`` (same spatial shape, integer), or for record-like cases e.g. ``expression``
    (G,) or ``features`` (N, F). ``meta`` holds JSON-serialisable facts: ``spacing`` (per
    spatial axis, mm), ``affine`` (4x4 list, 3D), text fields, class label, survival time...
    """

    case_id: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaseRef:
    """A case that a reader found but has not decoded yet."""

    case_id: str
    sources: list[Path]
    load: Callable[[], RawCase]
    source_digest: str | None = None  # set for sources without files (synthetic: digest of generator + params)
