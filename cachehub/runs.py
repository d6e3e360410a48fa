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
import uuid
from dataclasses import dataclass, field

from .errors import CachehubError
from .fsutil import HOST
from .lake import canonical_json, now_iso

_generated: dict[int, str] = {}


def current_run_id() -> tuple[str, str]:
    """(run id, where it came from) for this process."""
    env = os.environ
    if env.get("CACHEHUB_RUN_ID"):
        return env["CACHEHUB_RUN_ID"], "CACHEHUB_RUN_ID"
    if env.get("MLFLOW_RUN_ID"):
        return f"mlflow-{env['MLFLOW_RUN_ID']}", "mlflow"
    if env.get("SLURM_JOB_ID"):
        task = env.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{env['SLURM_JOB_ID']}" + (f"-{task}" if task else ""), "slurm"
    if env.get("KUBERNETES_SERVICE_HOST") and env.get("HOSTNAME"):
        return f"k8s-{env['HOSTNAME']}", "kubernetes"
    pid = os.getpid()
    if pid not in _generated:
        _generated[pid] = f"run-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    return _generated[pid], "generated"


@dataclass
class RunRecord:
    """A run as written to the lake (``runs/<id>.json``)."""

    id: str
    origin: str
    user: str
    host: str = HOST
    site: str | None = None
    command: list[str] = field(default_factory=list)
    started: str = field(default_factory=now_iso)
    ended: str | None = None
    status: str = "running"  # running | succeeded | failed
    exit_code: int | None = None
    duration: float | None = None
    inputs: list[dict] = field(default_factory=list)  # {dataset, commit, ref, site}
    outputs: list[dict] = field(default_factory=list)  # {dataset, commit}

    def document(self) -> bytes:
        body = {"format": "cachehub-run", "format_version": 1, **self.__dict__}
        return canonical_json(body)


def run_key(run_id: str) -> str:
    return f"runs/{run_id}.json"


def input_env_name(dataset: str) -> str:
    """The environment variable ``cachehub run`` exports a dataset's path in."""
    cleaned = "".join(c if c.isalnum() else "_" for c in dataset.upper())
    return f"CACHEHUB_INPUT_{cleaned}"


@dataclass(frozen=True)
class RunResult:
    id: str
    status: str
    exit_code: int
    duration: float
    inputs: tuple[dict, ...]
    outputs: tuple[dict, ...]


def run_command(
    hub: object,
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

    from .catalog import current_user

    run_id = os.environ.get("CACHEHUB_RUN_ID") or current_run_id()[0]
    record = RunRecord(id=run_id, origin="cachehub run", user=current_user(), site=site, command=list(command))
    env = dict(os.environ)
    env["CACHEHUB_RUN_ID"] = run_id
    started = time.monotonic()
    paths: dict[str, str] = {}
    hub._hook("pre_run", run=run_id, command=command, inputs=uses)  # type: ignore[attr-defined]
    _save_run(hub, record)
    try:
        return _run_recorded(hub, record, command, uses, snapshots, site, snapshot_on_failure, env, started, paths)
    except BaseException:
        if record.status == "running":  # an input, the command or a snapshot failed: say so
            record.status = "failed"
            _finish(hub, record, started)
            hub._hook("post_run", run=run_id, command=command, status="failed", exit_code=record.exit_code, inputs=record.inputs, outputs=record.outputs)  # type: ignore[attr-defined]
        raise


def _run_recorded(
    hub: object,
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
            commit = hub.resolve_commit(ref, refresh=True)  # type: ignore[attr-defined]
            prior = os.environ.get("CACHEHUB_RUN_ID")
            os.environ["CACHEHUB_RUN_ID"] = run_id  # the inputs are recorded under this run
            try:
                path = stack.enter_context(hub.use(f"{commit.dataset}@{commit.id}", site=site, fetch=True, run=run_id))  # type: ignore[attr-defined]
            finally:
                if prior is None:
                    os.environ.pop("CACHEHUB_RUN_ID", None)
                else:
                    os.environ["CACHEHUB_RUN_ID"] = prior
            paths[commit.dataset] = str(path)
            env[input_env_name(commit.dataset)] = str(path)
            record.inputs.append({"dataset": commit.dataset, "commit": commit.id, "ref": ref.partition("@")[2] or "latest", "site": site})
        env["CACHEHUB_INPUTS"] = json.dumps(paths)
        _save_run(hub, record)
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
            result = hub.snapshot(directory, dataset, message=f"output of run {run_id}", run=run_id, derived_from=inputs)  # type: ignore[attr-defined]
            if result.commit:
                record.outputs.append({"dataset": dataset, "commit": result.commit})
    record.status = "succeeded" if exit_code == 0 else "failed"
    _finish(hub, record, started)
    hub._hook(  # type: ignore[attr-defined]
        "post_run", run=run_id, command=command, status=record.status, exit_code=exit_code, inputs=record.inputs, outputs=record.outputs
    )
    return RunResult(run_id, record.status, exit_code, record.duration or 0.0, tuple(record.inputs), tuple(record.outputs))


def _finish(hub: object, record: RunRecord, started: float) -> None:
    record.ended = now_iso()
    record.duration = round(time.monotonic() - started, 3)
    _save_run(hub, record)
    hub.catalog.audit(  # type: ignore[attr-defined]
        "run", run=record.id, status=record.status, exit_code=record.exit_code, duration=record.duration,
        inputs=[f"{i['dataset']}@{i['commit']}" for i in record.inputs],
        outputs=[f"{o['dataset']}@{o['commit']}" for o in record.outputs],
    )  # fmt: skip
    hub.ship_audit()  # type: ignore[attr-defined]


def _save_run(hub: object, record: RunRecord) -> None:
    """Index the run in the catalog and write its document to the lake (``runs/<id>.json``)."""
    import json

    conn = hub.catalog.conn  # type: ignore[attr-defined]
    conn.execute(
        "INSERT OR REPLACE INTO runs (id, user, host, site, started, ended, status, exit_code, duration, command, origin)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (record.id, record.user, record.host, record.site, record.started, record.ended, record.status, record.exit_code,
         record.duration, json.dumps(record.command), record.origin),
    )  # fmt: skip
    for i in record.inputs:  # replaces the row use() wrote, to keep the ref the user gave
        conn.execute(
            "INSERT OR REPLACE INTO run_inputs (run_id, dataset, commit_id, ref, site, time) VALUES (?,?,?,?,?,?)",
            (record.id, i["dataset"], i["commit"], i["ref"], i["site"], record.started),
        )
    for o in record.outputs:
        conn.execute("INSERT OR IGNORE INTO run_outputs (run_id, dataset, commit_id) VALUES (?,?,?)", (record.id, o["dataset"], o["commit"]))
    try:
        hub.lake.backend.write(run_key(record.id), record.document())  # type: ignore[attr-defined]
    except OSError:
        pass  # the lake is unreachable: the catalog has it, the audit trail will carry it later
