"""Runs, lineage, the tamper-evident audit trail, snapshot/restore, purge and hooks."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import sys
from pathlib import Path

import pytest

from cachehub.api import Hub
from cachehub.config import load_settings
from cachehub.errors import ConflictError, RefNotFoundError
from cachehub.hooks import HookError
from cachehub.backends.local import LocalBackend
from cachehub.lake import Lake, object_key
from cachehub.runs import current_run_id, input_env_name
from cachehub.store import SiteStore

from .conftest import random_tree, run_cli, tree_digest, write_tree


def test_run_ids_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CACHEHUB_RUN_ID", "MLFLOW_RUN_ID", "SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(var, raising=False)
    generated, source = current_run_id()
    assert source == "generated" and current_run_id()[0] == generated  # stable within a process
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("HOSTNAME", "trainer-7f9c")
    assert current_run_id() == ("k8s-trainer-7f9c", "kubernetes")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert current_run_id() == ("slurm-4242-3", "slurm")
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc123")
    assert current_run_id() == ("mlflow-abc123", "mlflow")
    monkeypatch.setenv("CACHEHUB_RUN_ID", "exp-17")
    assert current_run_id() == ("exp-17", "CACHEHUB_RUN_ID")
    assert input_env_name("chest-xray.v2") == "CACHEHUB_INPUT_CHEST_XRAY_V2"


def test_resolve_records_the_run_and_what_it_read(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.push(write_tree(tmp_path / "a", {"x": "1"}), "images", tag="v1")
    hub.push(write_tree(tmp_path / "b", {"y": "2"}), "labels", tag="v2")
    hub.cache("images@v1")
    hub.cache("labels@v2")
    monkeypatch.setenv("CACHEHUB_RUN_ID", "exp-17")
    hub.resolve("images@v1")
    with hub.use("labels@v2"):
        pass
    rows = hub.catalog.conn.execute("SELECT dataset, ref FROM run_inputs WHERE run_id = 'exp-17' ORDER BY dataset").fetchall()
    assert rows == [("images", "v1"), ("labels", "v2")]
    graph = hub.lineage("images@v1", up=False)
    assert any(e.kind == "used" and e.src == "run:exp-17" for e in graph.edges)


WRITER = """
import json, os, sys
from pathlib import Path
from cachehub.api import Hub
out = Path(sys.argv[1]); out.mkdir(exist_ok=True)
(out / "env.json").write_text(json.dumps({k: v for k, v in os.environ.items() if k.startswith("CACHEHUB_")}))
with Hub() as hub:
    (out / "leases.json").write_text(json.dumps([dict(lease) for lease in hub.leases()]))  # typed results read as mappings
(out / "model.bin").write_bytes(b"weights " + Path(os.environ["CACHEHUB_INPUT_IMAGES"], "x").read_bytes())
sys.exit(int(sys.argv[2]))
"""


def test_cachehub_run_wraps_a_training_command(tmp_path: Path, local_env: dict[str, str]) -> None:
    env = local_env
    run_cli("push", str(write_tree(tmp_path / "src", {"x": "pixels"})), "images", "--tag", "v3", env=env, check=True)
    ckpt = tmp_path / "ckpt"
    result = run_cli(
        "run", "--use", "images@v3", "--snapshot", f"{ckpt}:resnet-ckpt", "--json", "--", sys.executable, "-c", WRITER, str(ckpt), "0", env=env
    )
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)
    assert run["status"] == "succeeded" and run["exit_code"] == 0
    seen = json.loads((ckpt / "env.json").read_text())
    assert seen["CACHEHUB_RUN_ID"] == run["id"]
    assert Path(seen["CACHEHUB_INPUT_IMAGES"], "x").read_text() == "pixels"
    assert json.loads(seen["CACHEHUB_INPUTS"]) == {"images": seen["CACHEHUB_INPUT_IMAGES"]}
    leases = json.loads((ckpt / "leases.json").read_text())
    assert len(leases) == 1 and leases[0]["live"] and leases[0]["run"] == run["id"]
    with Hub(load_settings()) as hub:
        assert hub.leases() == []  # released when the command ended
        [out] = run["outputs"]
        commit = hub.show(f"resnet-ckpt@{out['commit']}")
        assert commit.run == run["id"] and commit.derived_from == (hub.resolve_commit("images@v3").id,)
        up = hub.lineage(f"resnet-ckpt@{out['commit']}", down=False)
        kinds = {(e.kind, e.dst.split(":")[0]) for e in up.edges}
        assert {("derived-from", "commit"), ("produced-by", "run"), ("used", "commit")} <= kinds
        assert hub.lake.backend.exists(f"runs/{run['id']}.json")


def test_a_failing_run_is_recorded_releases_leases_and_snapshots_nothing(tmp_path: Path, local_env: dict[str, str]) -> None:
    env = local_env
    run_cli("push", str(write_tree(tmp_path / "src", {"x": "pixels"})), "images", env=env, check=True)
    ckpt = tmp_path / "ckpt"
    result = run_cli("run", "--use", "images", "--snapshot", f"{ckpt}:ckpt", "--", sys.executable, "-c", WRITER, str(ckpt), "3", env=env)
    assert result.returncode == 3
    with Hub(load_settings()) as hub:
        status, code = hub.catalog.conn.execute("SELECT status, exit_code FROM runs WHERE exit_code IS NOT NULL").fetchone()
        assert (status, code) == ("failed", 3)
        assert hub.leases() == []
        assert hub.lake.commit_ids("ckpt") == []


def test_derived_datasets_and_lineage_formats(hub: Hub, tmp_path: Path) -> None:
    raw = hub.push(write_tree(tmp_path / "raw", {"a.png": "big"}), "chest-xray", tag="v3").commit
    small = hub.push(
        write_tree(tmp_path / "small", {"a.png": "small"}), "chest-xray-224", derived_from=("chest-xray@v3",), transform="resize.py@1a2b3c"
    ).commit
    down = hub.lineage("chest-xray@v3", up=False)
    [edge] = [e for e in down.edges if e.kind == "derived-from"]
    assert (edge.src, edge.dst, edge.label) == (f"commit:{small}", f"commit:{raw}", "resize.py@1a2b3c")
    from cachehub import lineage

    assert "resize.py@1a2b3c" in lineage.to_dot(down) and lineage.to_dot(down).startswith("digraph")
    assert lineage.to_mermaid(down).startswith("flowchart")
    body = lineage.to_json(down)
    assert {n["id"] for n in body["nodes"]} == {f"commit:{raw}", f"commit:{small}"}
    assert hub.lineage("chest-xray-224", down=False, depth=1).nodes.keys() == {f"commit:{small}", f"commit:{raw}"}


def _tamper(hub: Hub, sql: str, *params: object) -> None:
    db = sqlite3.connect(hub.settings.catalog_path)
    db.execute(sql, params)
    db.commit()
    db.close()


@pytest.mark.parametrize("attack", ["edit", "delete", "reorder"])
def test_audit_verify_detects_tampering(hub: Hub, tmp_path: Path, attack: str) -> None:
    for i in range(4):
        hub.push(write_tree(tmp_path / f"s{i}", {"x": str(i)}), "ds", tag=f"v{i}")
    assert hub.audit_verify() == []
    seqs = [r[0] for r in hub.catalog.conn.execute("SELECT seq FROM audit ORDER BY seq")]
    victim = seqs[3]
    if attack == "edit":
        _tamper(hub, "UPDATE audit SET user = 'mallory' WHERE seq = ?", victim)
    elif attack == "delete":
        _tamper(hub, "DELETE FROM audit WHERE seq = ?", victim)
    else:
        cols = "time, user, host, action, dataset, commit_id, ref, site, details, prev, hash"
        a = hub.catalog.conn.execute(f"SELECT {cols} FROM audit WHERE seq = ?", (victim,)).fetchone()
        b = hub.catalog.conn.execute(f"SELECT {cols} FROM audit WHERE seq = ?", (victim + 1,)).fetchone()
        sets = ", ".join(f"{c.strip()} = ?" for c in cols.split(","))
        _tamper(hub, f"UPDATE audit SET {sets} WHERE seq = ?", *b, victim)
        _tamper(hub, f"UPDATE audit SET {sets} WHERE seq = ?", *a, victim + 1)
    problems = hub.audit_verify()
    assert problems, attack
    assert problems[0].kind == ("edited" if attack == "edit" else "missing or reordered")
    result = run_cli("audit", "verify", env=dict(os.environ))
    assert result.returncode == 9 and "BROKEN" in result.stdout


def test_audit_filters_and_lake_copy_survive_rebuild(hub: Hub, tmp_path: Path, settings, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CACHEHUB_RUN_ID", "exp-1")
    hub.push(write_tree(tmp_path / "s", {"x": "1"}), "ds", tag="v1")
    hub.cache("ds@v1")
    hub.resolve("ds@v1")
    hub.ship_audit()
    assert [e["action"] for e in hub.audit(dataset="ds", action="tag")] == ["tag"]
    assert hub.audit(since="2999-01-01") == []
    assert any(k.startswith("audit/") for k in hub.lake.backend.list("audit/"))
    before = {(e["action"], e["commit"]) for e in hub.audit(dataset="ds")}
    hub.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(settings.catalog_path) + suffix).unlink(missing_ok=True)
    with Hub(settings) as fresh:
        counts = fresh.rebuild_catalog()
        assert counts["audit_events_imported"] >= len(before)
        assert before <= {(e["action"], e["commit"]) for e in fresh.audit(dataset="ds")}
        assert fresh.audit_verify() == []
        graph = fresh.lineage("ds@v1", up=False)
        assert any(e.src == "run:exp-1" and e.kind == "used" for e in graph.edges)  # runs survive too


def test_snapshot_rehashes_only_what_changed(hub: Hub, tmp_path: Path) -> None:
    work = random_tree(tmp_path / "work", 50)
    first = hub.snapshot(work, "ckpt")
    assert first.hashed_files == 50
    again = hub.snapshot(work, "ckpt")
    assert not again.created and again.hashed_files == 0
    (work / "class0/img0000.bin").write_bytes(b"changed")
    (work / "new.bin").write_bytes(b"new")
    third = hub.snapshot(work, "ckpt")
    assert third.created and third.hashed_files == 2 and third.uploaded_files == 2


def test_restore_is_a_writable_copy_and_history_stays(hub: Hub, tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {"a.txt": "alpha", "d/b.txt": "bravo"})
    v1 = hub.push(src, "ds", tag="v1").commit
    (src / "a.txt").write_text("ALPHA")
    v2 = hub.push(src, "ds", tag="v2").commit
    hub.cache("ds@v1")
    out = hub.restore("ds@v1", tmp_path / "wc")
    wc = Path(out.path)
    assert out.from_site == "local" and tree_digest(wc) == {"a.txt": _sha(b"alpha"), "d/b.txt": _sha(b"bravo")}
    st = os.stat(wc / "a.txt")
    assert st.st_nlink == 1 and st.st_mode & stat.S_IWUSR  # a copy, writable
    (wc / "a.txt").write_text("edited")  # never touches the store
    assert hub.verify("ds@v1").ok
    assert [c.id for c in hub.log("ds")] == [v2, v1]  # later history untouched
    with pytest.raises(ConflictError, match="not empty"):
        hub.restore("ds@v2", wc)
    fresh = hub.restore("ds@v2", tmp_path / "wc2")  # not cached: straight from the lake
    assert fresh.from_site is None and (Path(fresh.path) / "a.txt").read_text() == "ALPHA"
    snap = hub.snapshot(wc, "ds")
    assert snap.hashed_files == 1  # restored files were already known to the hash cache
    assert any(n["kind"] == "restore" for n in hub.lineage("ds@v1", up=False).nodes.values())


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_purge_reaches_the_lake_and_every_site(hub: Hub, tmp_path: Path) -> None:
    shared = {"shared.bin": "kept by other commits"}
    keep = hub.push(write_tree(tmp_path / "keep", shared), "ds", tag="keep").commit
    bad = hub.push(write_tree(tmp_path / "bad", {**shared, "pii.csv": "alice,555-0100"}), "ds", tag="bad").commit
    hub.site_add("gpu-b", tmp_path / "gpu-b")
    hub.cache("ds@bad")
    hub.cache("ds@bad", site="gpu-b")
    hub.pin("ds@bad", site="gpu-b")
    result = hub.purge("ds@bad", reason="erasure request #42")
    assert result.removed_objects == 1 and result.kept_shared == 1 and result.tags_removed == ("bad",)
    assert set(result.sites_evicted) == {"local", "gpu-b"}
    assert not hub.lake.backend.exists(object_key(_sha(b"alice,555-0100")))
    assert hub.lake.backend.exists(object_key(_sha(b"kept by other commits")))
    assert hub.lake.backend.exists(f"datasets/ds/tombstones/{bad}.json")
    for site in ("local", "gpu-b"):
        store = SiteStore(hub.settings.site(site))
        assert not store.is_cached(bad) and not store.object_path(_sha(b"alice,555-0100")).exists()
    with pytest.raises(RefNotFoundError, match="purged"):
        hub.resolve_commit(f"ds@{bad}")
    assert hub.resolve_commit("ds@keep").id == keep
    [event] = hub.audit(action="purge")
    assert event["details"]["reason"] == "erasure request #42"
    # a fresh catalog learns the tombstone from the lake
    with Hub(load_settings(tmp_path / "other-home")) as other:
        with pytest.raises(RefNotFoundError, match="purged"):
            other.resolve_commit(f"ds@{bad}")


def test_purge_waits_for_running_jobs(hub: Hub, tmp_path: Path) -> None:
    hub.push(write_tree(tmp_path / "s", {"x": "1"}), "ds")
    hub.cache("ds")
    with hub.use("ds"):
        with pytest.raises(ConflictError, match="leased"):
            hub.purge("ds", reason="test")
    assert hub.lake.commit_ids("ds")


def test_failing_pre_hook_aborts_and_changes_nothing(tmp_path: Path, local_env: dict[str, str]) -> None:
    env = local_env
    home = Path(env["CACHEHUB_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "hook.log"
    (home / "config.toml").write_text(
        "format_version = 1\n[hooks]\n"
        'pre_push = "echo licence check failed: no LICENSE file >&2; exit 1"\n'
        f'post_cache = "echo $CACHEHUB_HOOK_EVENT $CACHEHUB_HOOK_COMMIT >> {log}"\n'
    )
    src = write_tree(tmp_path / "src", {"x": "1"})
    result = run_cli("push", str(src), "ds", env=env)
    assert result.returncode == 16 and "licence check failed: no LICENSE file" in result.stderr
    assert not (Path(env["CACHEHUB_LAKE"]) / "datasets").exists()
    (home / "config.toml").write_text(
        "format_version = 1\n[hooks]\n" f'post_cache = "echo $CACHEHUB_HOOK_EVENT $CACHEHUB_HOOK_COMMIT >> {log}"\n'
    )
    commit = json.loads(run_cli("push", str(src), "ds", "--json", env=env, check=True).stdout)["commit"]
    run_cli("cache", "ds", env=env, check=True)
    assert log.read_text().split() == ["post_cache", commit]


def test_python_entry_point_hooks(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real installed entry point (a dist-info on sys.path) in the cachehub.hooks group."""
    from cachehub import hooks

    plugin = tmp_path / "plugin"
    (plugin / "cachehub_test_plugin-1.0.dist-info").mkdir(parents=True)
    (plugin / "cachehub_test_plugin-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: cachehub-test-plugin\nVersion: 1.0\n")
    (plugin / "cachehub_test_plugin-1.0.dist-info" / "entry_points.txt").write_text("[cachehub.hooks]\nguard = cachehub_test_plugin:hook\n")
    (plugin / "cachehub_test_plugin.py").write_text(
        "calls = []\n"
        "def hook(event, context):\n"
        "    calls.append((event, context.get('dataset')))\n"
        "    if event == 'pre_push' and context.get('dataset') == 'forbidden':\n"
        "        raise ValueError('datasets named forbidden are not allowed')\n"
    )
    monkeypatch.syspath_prepend(str(plugin))
    hooks.reset()
    try:
        with pytest.raises(HookError, match="not allowed"):
            hub.push(write_tree(tmp_path / "s", {"x": "1"}), "forbidden")
        assert hub.lake.commit_ids("forbidden") == []
        hub.push(tmp_path / "s", "allowed")
        import cachehub_test_plugin  # type: ignore[import-not-found]

        assert ("post_push", "allowed") in cachehub_test_plugin.calls
    finally:
        hooks.reset()


def test_runs_that_fail_inside_cachehub_are_recorded_as_failed(tmp_path: Path, local_env: dict[str, str]) -> None:
    env = {**local_env, "CACHEHUB_RUN_ID": "broken-run"}
    missing_input = run_cli("run", "--use", "nosuch", "--", "true", env=env)
    assert missing_input.returncode == 4
    with Hub(load_settings()) as hub:
        assert hub.catalog.conn.execute("SELECT status FROM runs WHERE id = 'broken-run'").fetchone() == ("failed",)
        data, _ = hub.lake.backend.read("runs/broken-run.json")
        assert json.loads(data)["status"] == "failed"


def test_a_command_killed_by_a_signal_exits_128_plus_the_signal(tmp_path: Path, local_env: dict[str, str]) -> None:
    result = run_cli("run", "--", "sh", "-c", "kill -9 $$", env=local_env)
    assert result.returncode == 137


def test_shipping_never_overwrites_the_lakes_copy(hub: Hub, tmp_path: Path) -> None:
    hub.push(write_tree(tmp_path / "s", {"x": "1"}), "ds")
    shipped = sorted(hub.lake.backend.list("audit/"))
    assert shipped
    _tamper(hub, "DELETE FROM audit WHERE seq = (SELECT max(seq) FROM audit)")  # hide the newest event
    hub.close()
    with Hub(hub.settings) as again:
        again.catalog.audit("gc", site="local", objects=0, bytes=0)  # reuses the hidden event's number
        assert again.ship_audit() == 0  # refused, logged: the lake keeps what it had
        assert sorted(again.lake.backend.list("audit/")) == shipped


class _PrefixGapBackend(LocalBackend):
    """A lake on a server whose delimiter listing leaves out every prefix that holds only deeper
    keys (``datasets/<name>/`` holds ``commits/...`` and ``tags/...``, no key of its own).

    A stand-in for that server's fault: SeaweedFS and ``rclone serve s3``, the servers these
    tests start, both list such prefixes completely, so the fault cannot be produced with them.
    """

    def list_dirs(self, prefix: str) -> list[str]:
        return [d for d in super().list_dirs(prefix) if any(k.count("/") == prefix.count("/") + 2 for k in self.list(f"{prefix}/{d}/"))]


def test_purge_refuses_when_the_lake_listings_are_incomplete(tmp_path: Path, local_env: dict[str, str]) -> None:
    from cachehub.errors import LakeError

    with Hub(load_settings()) as hub:
        shared = {"shared.bin": "still used by ds@keep"}
        hub.push(write_tree(tmp_path / "keep", shared), "ds", tag="keep")
        hub.push(write_tree(tmp_path / "bad", {**shared, "pii.csv": "alice"}), "other", tag="bad")
        gap = Lake(_PrefixGapBackend(hub.settings.lake_url), manifest_cache=hub.settings.manifest_cache)
        assert gap.datasets() == []  # what such a server answers: no dataset at all
        hub.ctx._lake = gap  # this process talks to that server from now on
        before = sorted(gap.backend.list(""))
        with pytest.raises(LakeError, match="listings disagree") as refused:
            hub.purge("other@bad", reason="erasure request #43")
        assert "stopped before deleting anything" in str(refused.value)
        assert sorted(gap.backend.list("")) == before  # nothing deleted, no tombstone written
        assert gap.backend.exists(object_key(_sha(b"still used by ds@keep")))
