"""Per-entry preprocessing of a decoded case, and the checks a case must pass to be stored.

3D volumes are reoriented (exact flips/permutations, default RAS), resampled to the entry's
target spacing (MONAI ``Spacing``: bilinear for images, nearest for labels), and stored as
(D, H, W) = (S, A, R) for RAS, i.e. axial slices first — the order torch models expect. 2D
images are stored (H, W) or (H, W, C). Intensity normalisation follows the modality's usual
practice: a CT window scaled to [0, 1], z-score for MRI, percentile scaling for radiographs.

``PREPROCESS_VERSION`` is part of every dataset version digest: bump it whenever the output
of this module changes for the same input, so stale versions are never reused.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks.catalog import Entry, Preprocess
from tasks.ingest.types import CaseError, RawCase

PREPROCESS_VERSION = 3  # 3: table rows with a missing value are no longer quarantined


def preprocess_case(case: RawCase, entry: Entry, *, max_voxels: int) -> RawCase:
    """Return the case as it will be stored, or raise CaseError with the reason.

    Non-finite voxels are the readers' check (each rejects them as it decodes); table rows keep
    NaN for a missing value on purpose, so nothing here rejects NaN again."""
    if entry.dims == 0 or "image" not in case.arrays:
        return case
    image = np.asarray(case.arrays["image"])
    if image.size > max_voxels:
        raise CaseError(f"image has {image.size} voxels, more than the limit {max_voxels} (decompression bomb guard)")
    label = case.arrays.get("label")
    spatial = image.shape[-3:] if entry.dims == 3 and image.ndim == 4 else image.shape[: entry.dims]
    if label is not None and tuple(label.shape) != tuple(spatial):
        raise CaseError(f"label shape {tuple(label.shape)} differs from image shape {tuple(spatial)}")
    meta = dict(case.meta)
    meta.setdefault("original_shape", list(image.shape))
    if entry.dims == 3:
        image, label, meta = _volume(image, label, meta, entry.preprocess)
    else:
        image, label, meta = _image(image, label, meta, entry.preprocess)
    image = _normalise(image, entry.preprocess, entry.modality)
    arrays = {"image": _cast(image, entry.preprocess.dtype)}
    if label is not None:
        arrays["label"] = _labels(label, entry)
    for key, value in case.arrays.items():
        if key not in arrays and key not in ("image", "label"):
            arrays[key] = value
    return RawCase(case.case_id, arrays, meta)


def _volume(image: np.ndarray, label: np.ndarray | None, meta: dict[str, Any], plan: Preprocess):
    """Reorient (exact axis flips/permutations, nibabel), resample (MONAI ``Spacing``) and
    return (D,H,W) arrays.

    Reorientation never interpolates, so it is done on numpy views with nibabel's orientation
    algebra (what MONAI's ``Orientation`` computes too) and costs no copy; MONAI resamples only
    when the plan asks for a spacing or size change.
    """
    import nibabel.orientations as orient

    affine = np.asarray(meta.get("affine") if meta.get("affine") is not None else np.diag([*meta.get("spacing", [1, 1, 1]), 1.0]),
                        dtype=np.float64)
    channels_first = image.ndim == 4
    if plan.orientation:
        transform = orient.ornt_transform(orient.io_orientation(affine), orient.axcodes2ornt(tuple(plan.orientation)))
        spatial_shape = image.shape[-3:]
        if channels_first:
            image = np.stack([orient.apply_orientation(c, transform) for c in image])
        else:
            image = orient.apply_orientation(image, transform)
        label = orient.apply_orientation(label, transform) if label is not None else None
        affine = affine @ orient.inv_ornt_aff(transform, spatial_shape)
    if plan.target_spacing or plan.resize:
        image, label, affine = _resample(image, label, affine, plan)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0)).tolist()
    to_dhw = (0, 3, 2, 1) if channels_first and image.ndim == 4 else (2, 1, 0)
    image_out = image.transpose(to_dhw)
    label_out = label.transpose(2, 1, 0) if label is not None else None
    meta.update(spacing=[float(s) for s in spacing[::-1]], affine=affine.tolist(), axes="DHW",
                orientation=plan.orientation or "source")
    return image_out, label_out, meta


def _resample(image: np.ndarray, label: np.ndarray | None, affine: np.ndarray, plan: Preprocess):
    """MONAI ``Spacing`` (bilinear image, nearest label) then optional ``Resize`` on MetaTensors."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Resize, Spacing

    meta_affine = torch.as_tensor(affine)
    img = MetaTensor(torch.as_tensor(np.ascontiguousarray(image if image.ndim == 4 else image[None]), dtype=torch.float32),
                     affine=meta_affine)
    lab = MetaTensor(torch.as_tensor(np.ascontiguousarray(label[None]), dtype=torch.float32), affine=meta_affine) \
        if label is not None else None
    if plan.target_spacing:
        img = Spacing(pixdim=plan.target_spacing, mode="bilinear")(img)
        lab = Spacing(pixdim=plan.target_spacing, mode="nearest")(lab) if lab is not None else None
    if plan.resize:
        img = Resize(plan.resize, mode="trilinear")(img)
        lab = Resize(plan.resize, mode="nearest")(lab) if lab is not None else None
    out = img.numpy()
    out = out[0] if image.ndim == 3 else out
    lab_out = np.rint(lab.numpy()[0]).astype(np.int16) if lab is not None else None
    return out, lab_out, img.affine.numpy().astype(np.float64)


def _image(image: np.ndarray, label: np.ndarray | None, meta: dict[str, Any], plan: Preprocess):
    """Resize 2D images (channels last) when the plan asks for a fixed size."""
    if plan.resize:
        import torch
        import torch.nn.functional as F

        h, w = plan.resize
        old = image.shape[:2]
        chw = torch.as_tensor(image.astype(np.float32)).reshape(old[0], old[1], -1).permute(2, 0, 1)[None]
        image = F.interpolate(chw, size=(h, w), mode="area").permute(0, 2, 3, 1)[0].numpy()
        image = image[..., 0] if image.shape[-1] == 1 else image
        if label is not None:
            lab = torch.as_tensor(label.astype(np.float32))[None, None]
            label = F.interpolate(lab, size=(h, w), mode="nearest")[0, 0].numpy().astype(np.int16)
        if meta.get("spacing"):
            meta["spacing"] = [float(s) * o / n for s, o, n in zip(meta["spacing"], old, (h, w))]
    meta["axes"] = "HWC" if image.ndim == 3 else "HW"
    return image, label, meta


def _normalise(image: np.ndarray, plan: Preprocess, modality: str) -> np.ndarray:
    mode = plan.intensity.mode
    if mode == "none":
        return image
    image = image.astype(np.float32, copy=False)
    if mode == "ct_window":
        low, high = plan.intensity.window
        return np.clip((image - low) / (high - low), 0.0, 1.0)
    if mode == "zscore":
        foreground = image[image > image.min()] if modality == "mri" and (image > image.min()).any() else image
        return (image - foreground.mean()) / max(float(foreground.std()), 1e-6)
    if mode == "percentile":
        low, high = np.percentile(image, plan.intensity.percentiles)
        return np.clip((image - low) / max(float(high - low), 1e-6), 0.0, 1.0)
    low, high = float(image.min()), float(image.max())
    return (image - low) / max(high - low, 1e-6)


def _cast(image: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "uint8" and np.issubdtype(image.dtype, np.floating):
        return np.clip(np.rint(image * 255.0 if image.max() <= 1.0 else image), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image.astype(dtype, copy=False))


def _labels(label: np.ndarray, entry: Entry) -> np.ndarray:
    label = np.asarray(label)
    if isinstance(entry.labels, dict):
        allowed = set(entry.labels.values()) | {0}
        present = set(np.unique(label).tolist())
        unknown = present - allowed
        if unknown:
            raise CaseError(f"label map has values {sorted(unknown)} not declared in labels {entry.labels}")
    return label.astype(np.uint8 if label.max(initial=0) < 256 and label.min(initial=0) >= 0 else np.int16)
