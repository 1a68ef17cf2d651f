"""Stage plumbing shared by training tasks: skip finished stages, resume interrupted ones.

A stage is keyed by a digest of its config and its ``dataset@version`` inputs. If MLflow holds
a FINISHED run with that key, the stage is skipped and its recorded outputs are returned. If
not, the stage's Ray Train run is named after the key, so a re-run after a crash (or a killed
flow) finds the earlier run's checkpoints in the Ray storage and resumes from the last one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from infra.settings import Settings

OUTPUTS_TAG = "medfoundry.outputs"


@dataclass
class StageResult:
    run_id: str
    outputs: dict[str, Any]
    skipped: bool


def finished_stage(key: str) -> StageResult | None:
    """The outputs of an earlier FINISHED run of this stage key, if any."""
    from infra import tracking

    run = tracking.find_run_record({tracking.TAG_STAGE_KEY: key})
    if run is None or OUTPUTS_TAG not in run.data.tags:
        return None
    return StageResult(run.info.run_id, json.loads(run.data.tags[OUTPUTS_TAG]), skipped=True)


def record_outputs(run_id: str, outputs: dict[str, Any]) -> None:
    """Store a stage's outputs on its run (as the last step, so a skip never sees half of them)."""
    import mlflow

    mlflow.MlflowClient().set_tag(run_id, OUTPUTS_TAG, json.dumps(outputs, default=str))


def run_training(recipe: Callable[[dict], None], config: dict[str, Any], *, key: str, stage: str, settings: Settings,
                 run_id: str) -> Any:
    """Launch ``recipe`` on Ray Train under a run name derived from the stage key (resumable)."""
    from infra.launcher import launch

    result = launch(recipe, {**config, "mlflow_run_id": run_id}, name=f"{stage}-{key[:16]}", settings=settings)
    return result.raise_for_error()
