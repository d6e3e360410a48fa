"""Log the commits a process reads into the active MLflow run.

On every ``post_resolve`` (which ``use()`` and ``cachehub run --use`` also go through), if the
process has imported mlflow and a run is active, ``mlflow.log_input`` records a dataset named
``dataset@ref`` whose digest is the full commit id and whose source is the dataset's location
in the lake, so the MLflow UI shows exactly which version a model was trained on.
"""

from __future__ import annotations

import sys
from typing import Any


def hook(event: str, context: dict[str, Any]) -> None:
    if event != "post_resolve" or "mlflow" not in sys.modules:
        return
    import mlflow

    if mlflow.active_run() is None:
        return
    try:
        log_commit(mlflow, context)
    except Exception as exc:  # tracking is best effort: never fail the data access
        import logging

        logging.getLogger("cachehub.mlflow").warning("MLflow input not logged: %s", exc)


def log_commit(mlflow: Any, context: dict[str, Any]) -> None:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    lake = context.get("lake", "")
    dataset = context["dataset"]
    source = resolve_dataset_source(f"{lake.rstrip('/')}/datasets/{dataset}")
    ref = context.get("ref", "latest").partition("@")[2] or "latest"
    mlflow.log_input(MetaDataset(source=source, name=f"{dataset}@{ref}", digest=context["commit"]), context="training")
