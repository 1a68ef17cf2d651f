"""Prefect tasks of the training plane: UniMiSS pre-training, segmentation fine-tuning,
classification evaluation and registration. They pass names, versions, paths and run ids."""

from __future__ import annotations

import math
import time
from typing import Any

from prefect import task

from infra.settings import get_settings
from tasks.profiles import unimiss_profile
from tasks.stages import StageResult, finished_stage, record_outputs, run_training
from tasks.logs import get_logger


def _worker_config(settings) -> dict[str, Any]:
    return {"store": settings.store, "use_gpu": settings.use_gpu, "precision": settings.precision,
            "threads_per_worker": settings.threads_per_worker}


def _log_inputs(versions: dict[str, str], context: str) -> None:
    from infra import tracking
    from infra.storage import DatasetStore

    store = DatasetStore(get_settings().store)
    for name, version in versions.items():
        reader = store.open(name, version)
        tracking.log_dataset_input(dataset=name, version=version, source=reader.uri,
                                   schema={"modality": reader.attrs.get("modality"), "dims": reader.attrs.get("dims")},
                                   fingerprint=reader.attrs.get("fingerprint", {}), context=context)


@task(name="unimiss-pretrain")
def pretrain_unimiss(profile: str, versions: dict[str, str], parent_run_id: str) -> dict[str, Any]:
    """UniMiSS self-distillation on the 3D volumes and 2D radiographs of the catalog."""
    from infra import tracking
    from tasks.recipes.unimiss import train_unimiss

    settings = get_settings()
    p = unimiss_profile(profile).pretrain
    inputs = {name: versions[name] for name in [p.dataset_3d, *p.datasets_2d]}
    config = {**_worker_config(settings), "model_size": p.model_size, "dataset_3d": p.dataset_3d,
              "version_3d": inputs[p.dataset_3d], "datasets_2d": [(n, inputs[n]) for n in p.datasets_2d],
              "epochs": p.epochs, "steps_per_epoch": p.steps_per_epoch, "batch_size": p.batch_size,
              "view_3d": list(p.view_3d), "view_2d": p.view_2d, "hyper": _unimiss_hyper(p), "seed": settings.seed}
    key = tracking.stage_key("unimiss-pretrain", config, [f"{n}@{v}" for n, v in inputs.items()])
    done = finished_stage(key)
    if done:
        get_logger().info("unimiss-pretrain: finished run %s has the same config and inputs; skipped", done.run_id)
        return {**done.outputs, "run_id": done.run_id, "skipped": True}
    started = time.perf_counter()
    with tracking.stage_run("unimiss-pretrain", parent_run_id, config, stage_key=key,
                            inputs=[f"{n}@{v}" for n, v in inputs.items()]) as run:
        run_id = run.info.run_id
        _log_inputs(inputs, "training")
        result = run_training(train_unimiss, config, key=key, stage="unimiss-pretrain", settings=settings, run_id=run_id)
        history = _metric_history(run_id, "loss")
        tracking.log_loss_curve([{"step": s, "loss": v} for s, v in history], ["loss"], "plots/pretrain_loss.png", run_id=run_id)
        import mlflow

        checkpoint = _local_checkpoint_dir(result.checkpoint)
        mlflow.log_artifacts(checkpoint, artifact_path="checkpoint")
        outputs = {"checkpoint": checkpoint, "loss_first": history[0][1] if history else None,
                   "loss_last": history[-1][1] if history else None, "seconds": time.perf_counter() - started,
                   "model_size": p.model_size, "out_dim": config["hyper"]["out_dim"]}
        record_outputs(run_id, outputs)
    return {**outputs, "run_id": run_id, "skipped": False}


def _unimiss_hyper(p) -> dict[str, Any]:
    """The resolved hyper-parameters (recorded in the stage's params and in every checkpoint)."""
    from dataclasses import asdict

    from tasks.recipes.unimiss import build_hyper

    return asdict(build_hyper(p.model_size, p.hyper, p.epochs))


def _metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    import mlflow

    return [(m.step, m.value) for m in sorted(mlflow.MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)]


def _local_checkpoint_dir(checkpoint: Any) -> str:
    path = getattr(checkpoint, "path", checkpoint)
    if path is None:
        raise RuntimeError("training finished without a checkpoint")
    return str(path)


@task(name="segmentation-finetune")
def finetune_segmentation(profile: str, dataset: str, version: str, pretrained: dict[str, Any] | None, parent_run_id: str,
                          seed: int = 0, register: bool = True) -> dict[str, Any]:
    """Fine-tune (from the pre-trained backbone, or from scratch when ``pretrained`` is None),
    evaluate on the held-out split with sliding-window Dice/HD95 and register the model."""
    from infra import tracking
    from infra.storage import DatasetStore
    from tasks.evaluate import evaluate_segmentation
    from tasks.recipes.segmentation import train_segmentation

    settings = get_settings()
    p = unimiss_profile(profile).segmentation
    reader = DatasetStore(settings.store).open(dataset, version)
    labels = reader.attrs["labels"]
    num_classes = max(labels.values()) + 1
    splits = reader.attrs["splits"]
    model_size = pretrained["model_size"] if pretrained else unimiss_profile(profile).pretrain.model_size
    config = {**_worker_config(settings), "dataset": dataset, "version": version, "train_ids": splits["train"],
              "model_size": model_size, "num_classes": num_classes, "epochs": p.epochs, "steps_per_epoch": p.steps_per_epoch,
              "batch_size": p.batch_size, "patch": list(p.patch), "lr": p.lr, "seed": seed,
              "init_checkpoint": pretrained["checkpoint"] if pretrained else None}
    init = "unimiss" if pretrained else "scratch"
    key = tracking.stage_key(f"segmentation-{init}", config, [f"{dataset}@{version}"])
    done = finished_stage(key)
    if done:
        return {**done.outputs, "run_id": done.run_id, "skipped": True}
    started = time.perf_counter()
    with tracking.stage_run(f"segmentation-{init}", parent_run_id, config, stage_key=key, inputs=[f"{dataset}@{version}"],
                            upstream_run_id=pretrained.get("run_id") if pretrained else None) as run:
        run_id = run.info.run_id
        _log_inputs({dataset: version}, "training")
        result = run_training(train_segmentation, config, key=key, stage=f"seg-{init}", settings=settings, run_id=run_id)
        checkpoint = _local_checkpoint_dir(result.checkpoint)
        model = _load_segmenter(checkpoint, model_size, num_classes)
        names = [n for n, v in sorted(labels.items(), key=lambda kv: kv[1]) if v != 0]
        evaluation = evaluate_segmentation(model, reader, splits.get("test") or splits["train"], num_classes,
                                           tuple(p.patch), names)
        import mlflow

        mlflow.log_metrics({f"test_{k}": v for k, v in evaluation["mean"].items() if v == v})
        tracking.log_dict_artifact(evaluation, "evaluation/segmentation.json")
        _log_segmentation_figure(model, reader, (splits.get("test") or splits["train"])[0], run_id)
        outputs = {"checkpoint": checkpoint, "dice": evaluation["mean"]["dice_mean"], "hd95": evaluation["mean"]["hd95_mean"],
                   "seconds": time.perf_counter() - started, "init": init, "seed": seed}
        if register:
            outputs.update(_register_segmenter(model, dataset, model_size, evaluation, run_id, reader, tuple(p.patch)))
        record_outputs(run_id, outputs)
    return {**outputs, "run_id": run_id, "skipped": False}


def _load_segmenter(checkpoint: str, model_size: str, num_classes: int):
    from infra.checkpoint import load_checkpoint
    from tasks.recipes.segmentation import build_segmenter

    model = build_segmenter(model_size, num_classes)
    model.load_state_dict(load_checkpoint(checkpoint)["state"]["model"])
    return model.eval()


def _log_segmentation_figure(model, reader, case_id: str, run_id: str) -> None:
    """A mid-slice of image, ground truth and prediction as a PNG artifact."""
    import numpy as np
    import torch

    from infra import tracking

    image = np.asarray(reader.read(case_id, "image"), dtype=np.float32)
    label = np.asarray(reader.read(case_id, "label"))
    with torch.no_grad():
        from monai.inferers import sliding_window_inference

        logits = sliding_window_inference(torch.from_numpy(image)[None, None], (32, 32, 32), 2, model)
    prediction = logits.argmax(1)[0].numpy()
    z = int(np.argmax((label > 0).sum(axis=(1, 2)))) if label.any() else image.shape[0] // 2

    def draw(ax):
        ax.imshow(np.concatenate([image[z], label[z] / max(1, label.max()), prediction[z] / max(1, label.max())], axis=1), cmap="gray")
        ax.set_title(f"{case_id}: image | ground truth | prediction (slice {z})")
        ax.axis("off")

    tracking.log_figure_png(draw, "plots/segmentation.png", run_id=run_id)


def _register_segmenter(model, dataset, model_size, evaluation, run_id, reader, patch) -> dict[str, Any]:
    import numpy as np

    example = np.zeros((1, 1, *patch), dtype=np.float32)
    return _register_gated(model, _registered_name(model_size, f"seg-{dataset}"), example, evaluation["mean"], "dice_mean",
                           _test_split(dataset, reader.version), run_id)


def _registered_name(model_size: str, task: str | None = None) -> str:
    """``unimiss-mit-<size>`` for the encoder, ``unimiss-mit-<size>-<task>`` for a fine-tuned model."""
    return "-".join(["unimiss-mit", model_size.replace("_", "-")] + ([task] if task else []))


def _test_split(dataset: str, version: str) -> str:
    """The held-out split a key metric was measured on; promotion compares only equal splits."""
    return f"{dataset}@{version[:12]}:test"


def _register_gated(model, name: str, example, metrics: dict[str, float], key_metric: str, split: str, run_id: str,
                    extra_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Register ``model`` (alias ``candidate``) and move ``champion`` to it if its ``key_metric``
    (higher is better) beats the champion's on ``split``; returns name, version, alias, reason."""
    from infra.registry import promote_if_better, register_model

    info = register_model(model, name, input_example=example, metrics=metrics, key_metric=key_metric, run_id=run_id,
                          eval_split=split, extra_tags=extra_tags)
    decision = promote_if_better(name, info.version, key_metric=key_metric, higher_is_better=True, eval_split=split)
    return {"model": name, "model_version": str(info.version), "alias": "champion" if decision.promoted else "candidate",
            "promotion": decision.reason}


@task(name="classification-eval")
def evaluate_classification(profile: str, dataset: str, version: str, pretrained: dict[str, Any] | None,
                            parent_run_id: str, register: bool = True) -> dict[str, Any]:
    """Linear probe and full fine-tuning of the 2D path on a labelled 2D dataset (AUC, accuracy).

    Both run from the pre-trained backbone and from scratch (the comparison is logged); the
    classifier fine-tuned from the pre-trained backbone is registered, gated by its test AUC
    (not registered when the test split holds a single class, where AUC is undefined).
    """
    import mlflow
    import torch

    from infra import tracking
    from infra.storage import DatasetStore
    from models.mit import MiT, MiTConfig
    from tasks.evaluate import (classification_classes, evaluate_classifier, linear_probe, load_classification_cases,
                                train_classifier)
    from tasks.recipes.unimiss import pretrained_backbone_state

    settings = get_settings()
    p = unimiss_profile(profile).classification
    reader = DatasetStore(settings.store).open(dataset, version)
    class_index = classification_classes(reader)
    splits = reader.attrs["splits"]
    train = load_classification_cases(reader, splits["train"], p.image_size)
    test = load_classification_cases(reader, splits["test"], p.image_size)
    model_size = pretrained["model_size"] if pretrained else unimiss_profile(profile).pretrain.model_size

    pretrained_state = pretrained_backbone_state(pretrained["checkpoint"]) if pretrained else None

    def backbone(init: str) -> MiT:
        torch.manual_seed(0)
        net = MiT(getattr(MiTConfig, model_size)())
        if init == "unimiss":
            net.load_state_dict(pretrained_state)
        return net

    key = "unimiss" if pretrained else "scratch"
    results, outputs = {}, {}
    started = time.perf_counter()
    with tracking.stage_run("classification-eval", parent_run_id, {"dataset": dataset, "profile": profile},
                            inputs=[f"{dataset}@{version}"], upstream_run_id=pretrained.get("run_id") if pretrained else None) as run:
        for init in (["unimiss", "scratch"] if pretrained else ["scratch"]):
            probe = linear_probe(backbone(init), train, test, len(class_index), epochs=p.probe_epochs)
            classifier = train_classifier(backbone(init), train, len(class_index), epochs=p.finetune_epochs)
            tuned = evaluate_classifier(classifier, test, len(class_index))
            results[init] = {"probe": probe, "finetune": tuned}
            mlflow.log_metrics({f"{init}_probe_auc": probe["auc"], f"{init}_probe_accuracy": probe["accuracy"],
                                f"{init}_finetune_auc": tuned["auc"], f"{init}_finetune_accuracy": tuned["accuracy"]})
            if init == key and register and math.isfinite(tuned["auc"]):
                outputs = _register_classifier(classifier, dataset, model_size, tuned, run.info.run_id, reader.version,
                                               p.image_size)
        tracking.log_dict_artifact(results, "evaluation/classification.json")
    return {"run_id": run.info.run_id, "probe_auc": results[key]["probe"]["auc"], "finetune_auc": results[key]["finetune"]["auc"],
            "results": results, "seconds": time.perf_counter() - started, **outputs}


def _register_classifier(model, dataset: str, model_size: str, evaluation: dict[str, float], run_id: str, version: str,
                         image_size: int) -> dict[str, Any]:
    """Register a fine-tuned 2D classifier (3-channel image in, class logits out), gated by test AUC."""
    import numpy as np

    example = np.zeros((1, 3, image_size, image_size), dtype=np.float32)
    metrics = {"auc": evaluation["auc"], "accuracy": evaluation["accuracy"]}
    return _register_gated(model, _registered_name(model_size, f"cls-{dataset}"), example, metrics, "auc",
                           _test_split(dataset, version), run_id)


@task(name="register-encoder")
def register_encoder(pretrained: dict[str, Any], downstream: dict[str, Any], dataset: str, version: str) -> dict[str, Any]:
    """Register the pre-trained MiT encoder, gated by its downstream segmentation Dice.

    The encoder's own loss says little about its worth, so its key metric is the held-out Dice
    of the model fine-tuned from it (recorded with the split it was measured on); ``champion``
    moves to a new encoder only when that Dice beats the current champion's on the same split.
    """
    import numpy as np

    from models.mit import MiT, MiTConfig
    from tasks.recipes.unimiss import pretrained_backbone_state

    model_size = pretrained["model_size"]
    backbone = MiT(getattr(MiTConfig, model_size)())
    backbone.load_state_dict(pretrained_backbone_state(pretrained["checkpoint"]))
    example = np.zeros((1, backbone.config.in_chans_3d, *backbone.config.img_size_3d), dtype=np.float32)
    metrics = {"downstream_dice": downstream["dice"], "pretrain_loss_last": pretrained["loss_last"]}
    return _register_gated(backbone.eval(), _registered_name(model_size), example, metrics, "downstream_dice",
                           _test_split(dataset, version), pretrained["run_id"],
                           extra_tags={"downstream_run_id": downstream["run_id"]})
