"""OpenLineage and MLflow integrations, against the real libraries (no servers needed).

OpenLineage: the real client with its file transport. MLflow: the real client with a local
file store (MLFLOW_ALLOW_FILE_STORE=true, since MLflow 3 prefers a database backend).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest

from cachehub.api import Hub
from cachehub.integrations.openlineage import run_uuid

from .conftest import run_cli, write_tree


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_openlineage_run_events(tmp_path: Path, local_env: dict[str, str]) -> None:
    events_file = tmp_path / "ol.jsonl"
    config = tmp_path / "openlineage.yml"
    config.write_text(f"transport:\n  type: file\n  log_file_path: {events_file}\n  append: true\n")
    env = {**local_env, "OPENLINEAGE_CONFIG": str(config), "CACHEHUB_JOB_NAME": "train-resnet"}
    images = json.loads(run_cli("push", str(write_tree(tmp_path / "src", {"a.png": "x"})), "images", "--tag", "v3", "--json", env=env, check=True).stdout)["commit"]
    out = tmp_path / "out"
    out.mkdir()
    ok = run_cli("run", "--use", "images@v3", "--snapshot", f"{out}:model", "--json", "--", sys.executable, "-c", f"open({str(out / 'w.bin')!r}, 'w').write('w')", env=env)
    assert ok.returncode == 0, ok.stderr
    run = json.loads(ok.stdout)
    start, complete = _events(events_file)
    assert (start["eventType"], complete["eventType"]) == ("START", "COMPLETE")
    assert start["run"]["runId"] == complete["run"]["runId"] == run_uuid(run["id"])
    assert complete["job"] == {"facets": {}, "name": "train-resnet", "namespace": "cachehub"}
    lake = "file://" + local_env["CACHEHUB_LAKE"]
    [inp] = complete["inputs"]
    assert (inp["namespace"], inp["name"]) == (lake, "images")
    assert inp["facets"]["version"]["datasetVersion"] == images
    assert inp["facets"]["symlinks"]["identifiers"] == [{"name": "images@v3", "namespace": lake, "type": "TAG"}]
    [output] = complete["outputs"]
    assert output["name"] == "model" and output["facets"]["version"]["datasetVersion"] == run["outputs"][0]["commit"]

    failed = run_cli("run", "--use", "images@v3", "--", sys.executable, "-c", "raise SystemExit(2)", env=env)
    assert failed.returncode == 2
    assert [e["eventType"] for e in _events(events_file)][-2:] == ["START", "FAIL"]


def test_mlflow_log_input_names_the_commit(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow
    from mlflow.tracking import MlflowClient

    commit = hub.push(write_tree(tmp_path / "src", {"a.png": "x"}), "images", tag="v3").commit
    hub.cache("images@v3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mlflow.start_run() as active:
            with hub.use("images@v3"):
                pass
        run = MlflowClient().get_run(active.info.run_id)
    [logged] = run.inputs.dataset_inputs
    assert logged.dataset.name == "images@v3" and logged.dataset.digest == commit
    source = json.loads(logged.dataset.source)
    lake = hub.settings.lake_url
    expected = f"{lake}/datasets/images" if "://" in lake else f"file://{lake}/datasets/images"
    assert source["uri"] == expected
    assert [t.value for t in logged.tags] == ["training"]
    # without an active run nothing is logged and nothing fails
    hub.resolve("images@v3")


def test_mlflow_inputs_of_a_wrapped_command(tmp_path: Path, local_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """cachehub run with MLFLOW_RUN_ID: the inputs reach that run without changing its status."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    env = {**local_env, "MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "true"}
    commit = json.loads(run_cli("push", str(write_tree(tmp_path / "src", {"a.png": "x"})), "images", "--tag", "v3", "--json", env=env, check=True).stdout)["commit"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("wrapped")).info.run_id
        result = run_cli("run", "--use", "images@v3", "--", "true", env={**env, "MLFLOW_RUN_ID": run_id})
        assert result.returncode == 0, result.stderr
        run = client.get_run(run_id)
    [logged] = run.inputs.dataset_inputs
    assert (logged.dataset.name, logged.dataset.digest) == ("images@v3", commit)
    assert run.info.status == "RUNNING"  # cachehub did not end somebody else's run
