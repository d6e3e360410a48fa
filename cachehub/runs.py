"""Runs: which job read which commits, and which commits it produced.

A run's id comes from the environment, first match wins: ``CACHEHUB_RUN_ID``, an MLflow run
(``MLFLOW_RUN_ID``), a SLURM job (``SLURM_JOB_ID`` plus ``SLURM_ARRAY_TASK_ID``), a Kubernetes
pod (``HOSTNAME`` when ``KUBERNETES_SERVICE_HOST`` is set), else one generated per process.
``resolve()`` and ``use()`` record the commits a run reads; ``cachehub run`` wraps a command,
records its exit status and duration, and snapshots its outputs with lineage to its inputs.
Finished runs are written to the lake as ``runs/<run-id>.json``.
"""

from __future__ import annotations

import os
import time

from . import access, audit, index, push
from .context import Context, current_run_id
from .errors import CachehubError
from .lake import now_iso
from .model import RunRecord, RunResult

def input_env_name(dataset: str) -> str:
    """The environment variable ``cachehub run`` exports a dataset's path in."""
    cleaned = "".join(c if c.isalnum() else "_" for c in dataset.upper())
    return f"CACHEHUB_INPUT_{cleaned}"


def run_command(
    ctx: Context,
    command: list[str],
    *,
    uses: list[str],
    snapshots: list[tuple[str, str]],
    site: str | None,
    snapshot_on_failure: bool = False,
) -> RunResult:
    """Run ``command`` with its inputs resolved and leased, then record and snapshot.

    Inputs are exported as ``CACHEHUB_INPUT_<DATASET>`` (upper case, non-alphanumerics as
    ``_``), plus ``CACHEHUB_INPUTS`` (JSON: dataset -> path) and ``CACHEHUB_RUN_ID``. The
    command's exit code is returned as the run's; a crash is recorded as ``failed`` and the
    leases are released either way. Snapshots are taken when the command succeeds (or always,
    with ``snapshot_on_failure``), as commits derived from the inputs and produced by the run.
    """
    run_id = os.environ.get("CACHEHUB_RUN_ID") or current_run_id()[0]
    record = RunRecord(id=run_id, origin="cachehub run", user=ctx.user, site=site, command=list(command))
    env = dict(os.environ)
    env["CACHEHUB_RUN_ID"] = run_id
    started = time.monotonic()
    paths: dict[str, str] = {}
    ctx.events.hook("pre_run", run=run_id, command=command, inputs=uses)
    _save_run(ctx, record)
    try:
        return _run_recorded(ctx, record, command, uses, snapshots, site, snapshot_on_failure, env, started, paths)
    except BaseException:
        if record.status == "running":  # an input, the command or a snapshot failed: say so
            record.status = "failed"
            _finish(ctx, record, started)
            ctx.events.hook("post_run", run=run_id, command=command, status="failed", exit_code=record.exit_code, inputs=record.inputs, outputs=record.outputs)
        raise


def _run_recorded(
    ctx: Context,
    record: RunRecord,
    command: list[str],
    uses: list[str],
    snapshots: list[tuple[str, str]],
    site: str | None,
    snapshot_on_failure: bool,
    env: dict[str, str],
    started: float,
    paths: dict[str, str],
) -> RunResult:
    import contextlib
    import json
    import signal
    import subprocess

    run_id = record.id
    exit_code = 1
    with contextlib.ExitStack() as stack:
        for ref in uses:
            commit = index.resolve_commit(ctx, ref, refresh_first=True)
            prior = os.environ.get("CACHEHUB_RUN_ID")
            os.environ["CACHEHUB_RUN_ID"] = run_id  # the inputs are recorded under this run
            try:
                path = stack.enter_context(access.use(ctx, f"{commit.dataset}@{commit.id}", site=site, fetch=True, run=run_id))
            finally:
                if prior is None:
                    os.environ.pop("CACHEHUB_RUN_ID", None)
                else:
                    os.environ["CACHEHUB_RUN_ID"] = prior
            paths[commit.dataset] = str(path)
            env[input_env_name(commit.dataset)] = str(path)
            record.inputs.append({"dataset": commit.dataset, "commit": commit.id, "ref": ref.partition("@")[2] or "latest", "site": site})
        env["CACHEHUB_INPUTS"] = json.dumps(paths)
        if site:
            env["CACHEHUB_SITE"] = site  # the command resolves at the site the run uses, not the default
        _save_run(ctx, record)
        try:
            proc = subprocess.Popen(command, env=env)
        except OSError as exc:
            record.exit_code = 127
            raise CachehubError(f"cannot start {command[0]!r}: {exc}; check the command after --") from exc
        forward = {sig: signal.signal(sig, lambda s, _f: proc.send_signal(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            exit_code = proc.wait()
            if exit_code < 0:  # killed by a signal: the shell's convention, 128 + signal
                exit_code = 128 - exit_code
        finally:
            for sig, previous in forward.items():
                signal.signal(sig, previous)
    record.exit_code = exit_code
    if exit_code == 0 or snapshot_on_failure:
        inputs = tuple(f"{i['dataset']}@{i['commit']}" for i in record.inputs)
        for directory, dataset in snapshots:
            result = push.snapshot(ctx, directory, dataset, message=f"output of run {run_id}", run=run_id, derived_from=inputs)
            if result.commit:
                record.outputs.append({"dataset": dataset, "commit": result.commit})
    record.status = "succeeded" if exit_code == 0 else "failed"
    _finish(ctx, record, started)
    ctx.events.hook(
        "post_run", run=run_id, command=command, status=record.status, exit_code=exit_code, inputs=record.inputs, outputs=record.outputs
    )
    return RunResult(run_id, record.status, exit_code, record.duration or 0.0, tuple(record.inputs), tuple(record.outputs))


def _finish(ctx: Context, record: RunRecord, started: float) -> None:
    record.ended = now_iso()
    record.duration = round(time.monotonic() - started, 3)
    _save_run(ctx, record)
    ctx.events.audit(
        "run", run=record.id, status=record.status, exit_code=record.exit_code, duration=record.duration,
        inputs=[f"{i['dataset']}@{i['commit']}" for i in record.inputs],
        outputs=[f"{o['dataset']}@{o['commit']}" for o in record.outputs],
    )  # fmt: skip
    audit.ship_quietly(ctx)


def _save_run(ctx: Context, record: RunRecord) -> None:
    """Index the run in the catalog and write its document to the lake (``runs/<id>.json``)."""
    ctx.catalog.save_run(record.__dict__)
    try:
        ctx.lake.write_run(dict(record.__dict__))
    except OSError:
        pass  # the lake is unreachable: the catalog has it, the audit trail will carry it later
