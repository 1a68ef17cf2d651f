"""Map an official UniMiSS pre-training checkpoint onto :class:`models.mit.MiT` parameter names.

Spec ``unimiss.md`` (d)6/(e): the official checkpoint is a dict ``{student, teacher,
optimizer, ..., dino_loss}``; downstream loaders take the **student** state dict, strip the
wrapper prefixes (``module.`` from DDP, ``backbone.`` from the DINO wrapper, ``transformer.``
from the MiT module that holds the network), drop the projection head and load the keys that
match by name and shape.

:func:`from_official_unimiss` does the same and then renames leaf keys with a small rule
table for PVT-style names (``patch_embed{2D,3D}{i}``, ``pos_embed{2D,3D}{i}``,
``block{i}.{j}``, ``cls_token``, ``norm``), to ours (``encoder_stages.{i-1}...``). It is
**best effort**: the rules were written from the PVT naming the official MiT follows and have
not been checked against a real official checkpoint, whose decoder/stem names in particular
may differ. Keys that no rule matches are passed through unchanged, so
:func:`load_matching` reports them as unexpected instead of silently dropping them. Keys
already in this package's layout (e.g. our own ``UniMiSSStudentTeacher`` checkpoints, which
use the same ``student.backbone.`` / ``student.head.`` structure) map to themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from torch import Tensor, nn

WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "student.", "backbone.", "transformer.")
HEAD_PREFIX = "head."
CHECKPOINT_MODEL_KEYS: tuple[str, ...] = ("student", "state_dict", "model")


_RENAME_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^cls_token$"), "encoder_stages.0.cls_token"),
    (
        re.compile(r"^patch_embed(?P<dim>[23]D)(?P<stage>[1-4])\.proj\."),
        "encoder_stages.{stage}.patch_embed.conv{dim}.",
    ),
    (
        re.compile(r"^patch_embed(?P<dim>[23]D)(?P<stage>[1-4])\.norm\."),
        "encoder_stages.{stage}.patch_embed.norm{dim}.",
    ),
    (re.compile(r"^pos_embed(?P<dim>[23]D)(?P<stage>[1-4])$"), "encoder_stages.{stage}.pos_embed{dim}"),
    (re.compile(r"^block(?P<stage>[1-4])\."), "encoder_stages.{stage}.blocks."),
    (re.compile(r"^norm\."), "decoder_norm."),
]


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                stripped = True
    return key


def _rename(key: str) -> str:
    for pattern, template in _RENAME_RULES:
        match = pattern.match(key)
        if match is None:
            continue
        groups = match.groupdict()
        values = {"dim": groups.get("dim") or ""}
        if groups.get("stage"):
            values["stage"] = str(int(groups["stage"]) - 1)  # official stages count from 1
        return template.format(**values) + key[match.end() :]
    return key


def from_official_unimiss(state_dict: Mapping[str, object]) -> dict[str, Tensor]:
    """Backbone state dict in :class:`~models.mit.MiT` naming from an official checkpoint.

    Accepts the whole checkpoint (its ``student`` entry is used) or a state dict (if it holds
    ``student.*`` keys, e.g. a ``UniMiSSStudentTeacher`` state dict, only those). Wrapper
    prefixes are stripped, ``head.*`` keys dropped, PVT-style names renamed (module doc).
    """
    for model_key in CHECKPOINT_MODEL_KEYS:
        inner = state_dict.get(model_key)
        if isinstance(inner, Mapping):
            state_dict = inner
            break
    if any(key.startswith("student.") for key in state_dict):
        state_dict = {key: value for key, value in state_dict.items() if key.startswith("student.")}
    mapped: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            continue
        stripped = _strip_wrappers(key)
        if stripped.startswith(HEAD_PREFIX):
            continue
        mapped[_rename(stripped)] = value
    return mapped


@dataclass
class LoadReport:
    """What :func:`load_matching` loaded and what it could not."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)


def load_matching(model: nn.Module, mapped: Mapping[str, Tensor]) -> LoadReport:
    """Load the entries of ``mapped`` whose name and shape match ``model``, as downstream loaders do."""
    own = model.state_dict()
    report = LoadReport()
    compatible: dict[str, Tensor] = {}
    for key, value in mapped.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            report.shape_mismatch.append(key)
        else:
            compatible[key] = value
    model.load_state_dict(compatible, strict=False)
    report.loaded = sorted(compatible)
    report.missing = sorted(set(own) - set(compatible))
    return report
