"""OpenLineage run events for ``cachehub run`` (START, then COMPLETE or FAIL).

Inputs and outputs are datasets in the namespace of the lake (its URL), named after the
cachehub dataset; the commit id is the dataset version facet, and the tag the user gave (if
any) is a symlink identifier ``dataset@tag``. The OpenLineage run id is a UUID derived from
the cachehub run id, so START and COMPLETE pair up and a re-run of the same id is recognisable.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

PRODUCER = "https://github.com/cachehub/cachehub"
JOB_NAMESPACE = "cachehub"


def enabled() -> bool:
    if not (os.environ.get("OPENLINEAGE_URL") or os.environ.get("OPENLINEAGE_CONFIG") or os.environ.get("CACHEHUB_OPENLINEAGE") == "1"):
        return False
    try:
        import openlineage.client  # noqa: F401
    except ImportError:
        return False
    return True


def hook(event: str, context: dict[str, Any]) -> None:
    """Emit the run event; lineage is best effort and never stops a training job."""
    if event not in ("pre_run", "post_run") or not enabled():
        return
    try:
        from openlineage.client import OpenLineageClient

        OpenLineageClient().emit(build_event(event, context))
    except Exception as exc:  # an unreachable lineage server must not block the run
        import logging

        logging.getLogger("cachehub.openlineage").warning("OpenLineage event not sent: %s", exc)


def run_uuid(run_id: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"cachehub-run:{run_id}"))


def build_event(event: str, context: dict[str, Any]) -> Any:
    """The RunEvent for a hook call (pure: no I/O)."""
    from datetime import UTC, datetime

    from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
    from openlineage.client.facet_v2 import dataset_version_dataset, symlinks_dataset

    namespace = context.get("lake", "cachehub")

    def facets(item: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"version": dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=item["commit"])}
        ref = item.get("ref")
        if ref and ref != "latest" and ref != item["commit"]:
            out["symlinks"] = symlinks_dataset.SymlinksDatasetFacet(
                identifiers=[symlinks_dataset.Identifier(namespace=namespace, name=f"{item['dataset']}@{ref}", type="TAG")]
            )
        return out

    if event == "pre_run":
        state, inputs, outputs = RunState.START, [], []
    else:
        state = RunState.COMPLETE if context.get("status") == "succeeded" else RunState.FAIL
        inputs = [InputDataset(namespace=namespace, name=i["dataset"], facets=facets(i)) for i in context.get("inputs", [])]
        outputs = [OutputDataset(namespace=namespace, name=o["dataset"], facets=facets(o)) for o in context.get("outputs", [])]
    command = context.get("command") or []
    job_name = os.environ.get("CACHEHUB_JOB_NAME") or (os.path.basename(command[0]) if command else "cachehub-run")
    return RunEvent(
        eventType=state,
        eventTime=datetime.now(UTC).isoformat(),
        run=Run(runId=run_uuid(context["run"])),
        job=Job(namespace=JOB_NAMESPACE, name=job_name),
        producer=PRODUCER,
        inputs=inputs,
        outputs=outputs,
    )
