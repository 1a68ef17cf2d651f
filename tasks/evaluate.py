"""Downstream evaluation harness shared by every method.

- 3D/2D segmentation: sliding-window inference over whole cases (MONAI), Dice and HD95 per
  class (MONAI metrics, HD95 in mm using the case spacing), per case and mean.
- 2D classification: a linear probe on frozen features and full fine-tuning, reporting
  macro one-vs-rest AUC and accuracy on the held-out split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, reader, case_ids: list[str], num_classes: int, roi: tuple[int, ...],
                          class_names: list[str] | None = None, overlap: float = 0.5) -> dict[str, Any]:
    """Per-case and mean Dice / HD95 for classes 1..K-1 of ``model`` on stored cases."""
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    if model.training:  # an exported (registry-loaded) module is already in eval mode and refuses .eval()
        model.eval()
    names = class_names or [f"class{i}" for i in range(1, num_classes)]
    per_case = []
    for case_id in case_ids:
        image = torch.from_numpy(np.ascontiguousarray(reader.read(case_id, "image"), dtype=np.float32))[None, None]
        label = torch.from_numpy(np.asarray(reader.read(case_id, "label"), dtype=np.int64))[None, None]
        spacing = reader.case_attrs(case_id).get("spacing")
        logits = sliding_window_inference(image, roi_size=roi, sw_batch_size=2, predictor=model, overlap=overlap)
        prediction = logits.argmax(1, keepdim=True)
        pred_onehot = F.one_hot(prediction[:, 0], num_classes).movedim(-1, 1).float()
        true_onehot = F.one_hot(label[:, 0], num_classes).movedim(-1, 1).float()
        dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(pred_onehot, true_onehot)[0]
        hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
            pred_onehot, true_onehot, spacing=spacing)[0]
        row: dict[str, Any] = {"case_id": case_id}
        for i, name in enumerate(names):
            row[f"dice_{name}"] = float(dice[i])
            row[f"hd95_{name}"] = float(hd95[i])
        row["dice_mean"] = float(np.nanmean([row[f"dice_{n}"] for n in names]))
        finite = [row[f"hd95_{n}"] for n in names if np.isfinite(row[f"hd95_{n}"])]
        row["hd95_mean"] = float(np.mean(finite)) if finite else float("nan")
        per_case.append(row)
    summary = {key: float(np.nanmean([r[key] for r in per_case])) for key in per_case[0] if key != "case_id"}
    return {"per_case": per_case, "mean": summary}


def _features(backbone: torch.nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    backbone.eval()
    with torch.no_grad():
        return torch.cat([backbone(images[i:i + batch]) for i in range(0, len(images), batch)])


def _auc_accuracy(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    probs = logits.softmax(-1).numpy()
    y = targets.numpy()
    accuracy = float((probs.argmax(-1) == y).mean())
    present = np.unique(y)
    if len(present) < 2:
        return {"accuracy": accuracy, "auc": float("nan")}
    if num_classes == 2:
        return {"accuracy": accuracy, "auc": float(roc_auc_score(y, probs[:, 1]))}
    cols = [c for c in range(num_classes) if c in present]
    aucs = [roc_auc_score(y == c, probs[:, c]) for c in cols]
    return {"accuracy": accuracy, "auc": float(np.mean(aucs))}


def classification_classes(reader) -> dict[str, int]:
    """``{class name: index}`` of a labelled store version (labels as a list or a name->index map)."""
    classes = reader.attrs["labels"]
    return {c: i for i, c in enumerate(classes)} if isinstance(classes, list) else dict(classes)


def load_classification_cases(reader, case_ids: list[str], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2D cases of a store version as a 3-channel ``(N, 3, S, S)`` batch (area-resized) and their class indices."""
    class_index = classification_classes(reader)
    images, targets = [], []
    for case_id in case_ids:
        image = torch.from_numpy(np.asarray(reader.read(case_id, "image"), dtype=np.float32))
        images.append(F.interpolate(image[None, None], size=(image_size,) * 2, mode="area")[0].expand(3, -1, -1))
        targets.append(class_index[reader.case_attrs(case_id)["label"]])
    return torch.stack(images), torch.tensor(targets)


def linear_probe(backbone: torch.nn.Module, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                 num_classes: int, epochs: int = 200, lr: float = 1e-2, seed: int = 0) -> dict[str, float]:
    """Logistic regression on frozen, standardised backbone features."""
    torch.manual_seed(seed)
    f_train, f_test = _features(backbone, train[0]), _features(backbone, test[0])
    mean, std = f_train.mean(0), f_train.std(0).clamp_min(1e-6)
    f_train, f_test = (f_train - mean) / std, (f_test - mean) / std
    head = torch.nn.Linear(f_train.shape[1], num_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-3)
    for _ in range(epochs):
        optimizer.zero_grad()
        F.cross_entropy(head(f_train), train[1]).backward()
        optimizer.step()
    with torch.no_grad():
        return _auc_accuracy(head(f_test), test[1], num_classes)


def train_classifier(backbone: torch.nn.Module, train: tuple[torch.Tensor, torch.Tensor], num_classes: int,
                     epochs: int = 5, lr: float = 3e-4, batch: int = 16, seed: int = 0) -> torch.nn.Sequential:
    """Full fine-tuning of backbone + linear head; returns the classifier (logits) in eval mode."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(backbone.out_dim, num_classes)
    model = torch.nn.Sequential(backbone, head)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train[0]), generator=generator)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            optimizer.zero_grad()
            F.cross_entropy(model(train[0][idx]), train[1][idx]).backward()
            optimizer.step()
    return model.eval()


def evaluate_classifier(model: torch.nn.Module, test: tuple[torch.Tensor, torch.Tensor], num_classes: int,
                        batch: int = 64) -> dict[str, float]:
    """Macro one-vs-rest AUC and accuracy of a logits model on a test set."""
    with torch.no_grad():
        logits = torch.cat([model(test[0][i:i + batch]) for i in range(0, len(test[0]), batch)])
    return _auc_accuracy(logits, test[1], num_classes)

