"""Log the commits a job reads into its MLflow run.

* In a training process that has imported mlflow and has an active run, every
  ``post_resolve`` (``resolve()``, ``use()``) calls ``mlflow.log_input``.
* ``cachehub run`` with ``MLFLOW_RUN_ID`` set logs every ``--use`` input to that run when the
  wrapped command ends (``post_run``), through the tracking client, without touching the
  run's status.

Each input is a dataset named ``dataset@ref`` whose digest is the full commit id and whose
source is the dataset's location in the lake, so the MLflow UI shows exactly which version a
model was trained on. Tracking is best effort: a failure is logged, never raised.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger("cachehub.mlflow")


def hook(event: str, context: dict[str, Any]) -> None:
    try:
        if event == "post_resolve" and "mlflow" in sys.modules:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.log_input(meta_dataset(context["lake"], context["dataset"], context.get("ref", ""), context["commit"]), context="training")
        elif event == "post_run" and os.environ.get("MLFLOW_RUN_ID") and context.get("inputs"):
            log_run_inputs(os.environ["MLFLOW_RUN_ID"], context["lake"], context["inputs"])
    except ImportError:
        return
    except Exception as exc:  # tracking is best effort: never fail the data access or the run
        log.warning("MLflow input not logged: %s", exc)


def meta_dataset(lake: str, dataset: str, ref: str, commit: str) -> Any:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    source = resolve_dataset_source(f"{lake.rstrip('/')}/datasets/{dataset}")
    tag = ref.partition("@")[2] if "@" in ref else (ref or "latest")
    return MetaDataset(source=source, name=f"{dataset}@{tag}", digest=commit)


def log_run_inputs(run_id: str, lake: str, inputs: list[dict[str, Any]]) -> None:
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.tracking import MlflowClient

    datasets = [
        DatasetInput(
            meta_dataset(lake, i["dataset"], i.get("ref") or "latest", i["commit"])._to_mlflow_entity(),
            tags=[InputTag(key="mlflow.data.context", value="training")],
        )
        for i in inputs
    ]
    MlflowClient().log_inputs(run_id, datasets=datasets)
