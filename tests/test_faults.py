"""Crashes, races, dead servers and full disks, with real processes, servers and filesystems."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cachehub.api import Hub
from cachehub.config import load_settings
from cachehub.errors import ConflictError, NoSpaceError
from cachehub.lake import object_key

from .conftest import BUCKET, SeaweedServer, random_tree, tree_digest, write_tree

SPAWN = multiprocessing.get_context("spawn")  # obstore's runtime must not be forked


def _python(code: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


CACHE_SNIPPET = """
import json, sys
from cachehub.api import Hub
with Hub() as hub:
    r = hub.cache(sys.argv[1] if len(sys.argv) > 1 else "ds")
    print(json.dumps({"path": r.path, "fetched": r.fetched_files, "already": r.already_cached}))
"""


def _published_trees_are_complete(root: Path, expected: dict[str, str]) -> None:
    if not (root / "commits").exists():
        return  # killed before the site root was even laid out
    for tree in (root / "commits").iterdir():
        assert tree_digest(tree) == expected, f"{tree} is published but incomplete"


def test_kill_9_during_cache_then_rerun(hub: Hub, tmp_path: Path, env: dict[str, str]) -> None:
    src = random_tree(tmp_path / "src", 1500, max_size=3000)
    expected = tree_digest(src)
    hub.push(src, "ds")
    root = Path(hub.settings.site().root)
    env = {**env, "CACHEHUB_JOBS": "4"}
    rng = random.Random(7)
    completed = False
    for _attempt in range(12):
        proc = _python(CACHE_SNIPPET, env)
        time.sleep(rng.uniform(0.2, 1.5))
        if proc.poll() is not None:
            completed = True
            proc.communicate()
            break
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        _published_trees_are_complete(root, expected)  # never a half-published commit
    objects_before = sum(1 for _ in (root / "objects").rglob("*") if _.is_file())
    proc = _python(CACHE_SNIPPET, env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert tree_digest(Path(result["path"])) == expected
    distinct = len(set(expected.values()))
    if not completed:
        assert result["fetched"] == distinct - objects_before  # what had arrived was not fetched again
    assert not list((root / "staging").iterdir())


def test_two_processes_cache_the_same_commit(hub: Hub, tmp_path: Path, env: dict[str, str]) -> None:
    src = random_tree(tmp_path / "src", 800, max_size=4000)
    hub.push(src, "ds")
    env = {**env, "CACHEHUB_JOBS": "4"}
    procs = [_python(CACHE_SNIPPET, env) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert results[0]["path"] == results[1]["path"]
    assert tree_digest(Path(results[0]["path"])) == tree_digest(src)
    # downloaded once: the lock made the second wait for the first's tree
    assert results[0]["fetched"] + results[1]["fetched"] == len(set(tree_digest(src).values()))


def _push_worker(args: tuple[dict[str, str], str, str]) -> str | None:
    env, directory, tag = args
    os.environ.update(env)
    with Hub(load_settings()) as hub:
        return hub.push(directory, "ds", message=tag).commit


def test_concurrent_pushes_both_become_commits(hub: Hub, tmp_path: Path, env: dict[str, str]) -> None:
    hub.push(write_tree(tmp_path / "base", {"x": "0"}), "ds")
    a = write_tree(tmp_path / "a", {"x": "a"})
    b = write_tree(tmp_path / "b", {"x": "b"})
    with SPAWN.Pool(2) as pool:
        ids = pool.map(_push_worker, [(env, str(a), "a"), (env, str(b), "b")])
    assert len(set(ids)) == 2
    logged = {c.id for c in hub.log("ds")}
    assert set(ids) <= logged and len(logged) == 3


def _tag_worker(args: tuple[dict[str, str], str, str, str, object]) -> str:
    env, commit, etag, barrier_name, _ = args
    os.environ.update(env)
    with Hub(load_settings()) as hub:
        _wait_for_file(Path(barrier_name))
        try:
            hub.lake.write_tag("ds", "prod", commit, author="worker", expect=etag)
            return "won"
        except ConflictError:
            return "lost"


def _wait_for_file(path: Path) -> None:
    while not path.exists():
        time.sleep(0.001)


def test_concurrent_tag_moves_exactly_one_wins(hub: Hub, tmp_path: Path, env: dict[str, str]) -> None:
    src = tmp_path / "s"
    commits = []
    for i in range(3):
        write_tree(src, {"x": str(i)})
        commits.append(hub.push(src, "ds").commit)
    hub.tag(f"ds@{commits[0]}", "prod")
    for round_ in range(3):
        _, etag = hub.lake.read_tag("ds", "prod")
        go = tmp_path / f"go-{round_}"
        with SPAWN.Pool(2) as pool:
            pending = pool.map_async(
                _tag_worker, [(env, commits[1], etag, str(go), None), (env, commits[2], etag, str(go), None)]
            )
            time.sleep(1.0)  # both workers are up and waiting
            go.touch()
            outcomes = pending.get(timeout=120)
        assert sorted(outcomes) == ["lost", "won"]
        winner = commits[1] if outcomes[0] == "won" else commits[2]
        assert hub.lake.read_tag("ds", "prod")[0] == winner


PUSH_SNIPPET = """
import json, sys
from cachehub.api import Hub
with Hub() as hub:
    r = hub.push(sys.argv[1], "ds")
    print(json.dumps({"uploaded": r.uploaded_files, "commit": r.commit}))
"""


def test_killed_push_leaves_no_dangling_commit_and_resumes(tmp_path: Path, local_env: dict[str, str]) -> None:
    """Local lake (object presence is cheap to list there); the S3 path shares the same code."""
    env = local_env
    src = random_tree(tmp_path / "src", 1500, max_size=3000)
    lake = Path(env["CACHEHUB_LAKE"])
    env = {**env, "CACHEHUB_JOBS": "2"}
    rng = random.Random(3)
    code = PUSH_SNIPPET.replace("sys.argv[1]", repr(str(src)))
    for _ in range(6):
        proc = _python(code, env)
        time.sleep(rng.uniform(0.3, 1.5))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        with Hub(load_settings()) as hub:
            for cid in hub.lake.commit_ids("ds"):  # any commit that exists is whole
                commit = hub.lake.read_commit("ds", cid)
                for entry in hub.manifest(commit):
                    assert (lake / object_key(entry.sha256)).exists()
    present = sum(1 for p in (lake / "objects").rglob("*") if p.is_file() and not p.name.startswith("."))
    proc = _python(code, env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    result = json.loads(out)
    distinct = len(set(tree_digest(src).values()))
    # objects that arrived before a kill are not uploaded again (0 if an earlier run finished)
    assert result["uploaded"] in (distinct - present, 0)
    assert result["commit"]


def test_s3_server_dies_mid_transfer_then_rerun_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dedicated SeaweedFS, killed with SIGKILL while objects stream in, then restarted."""
    server = SeaweedServer(tmp_path / "weed")
    server.start()
    try:
        home = tmp_path / "home"
        env = {
            **os.environ,
            "CACHEHUB_HOME": str(home),
            "CACHEHUB_LAKE": f"s3://{BUCKET}/dies",
            "CACHEHUB_ENDPOINT_URL": server.endpoint,
            "CACHEHUB_JOBS": "1",
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        src = random_tree(tmp_path / "src", 1500, min_size=2000, max_size=6000)
        with Hub(load_settings()) as hub:
            hub.push(src, "ds")
            root = Path(hub.settings.site().root)
        proc = subprocess.Popen(
            [sys.executable, "-m", "cachehub.cli.main", "cache", "ds", "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if sum(1 for p in (root / "objects").rglob("*") if p.is_file()) >= 50:
                break
            time.sleep(0.01)
        server.kill()
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 11, (out, err)
        assert "cachehub: error:" in err and server.endpoint in err
        assert len(err.strip().splitlines()) == 1  # one clear line, no traceback
        assert list((root / "commits").iterdir()) == []
        arrived = sum(1 for p in (root / "objects").rglob("*") if p.is_file())
        assert arrived >= 50
        server.start()  # same ports, same data
        rerun = subprocess.run(
            [sys.executable, "-m", "cachehub.cli.main", "cache", "ds", "--json"], env=env, capture_output=True, text=True
        )
        assert rerun.returncode == 0, rerun.stderr
        result = json.loads(rerun.stdout)
        distinct = len(set(tree_digest(src).values()))
        assert result["fetched_files"] == distinct - arrived
        assert tree_digest(Path(result["path"])) == tree_digest(src)
    finally:
        server.stop()


def test_full_disk_while_linking_fails_cleanly(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from a link made on a worker thread (injected: a full directory is hard to make
    reliably) becomes NoSpaceError; the staging tree goes and nothing is published."""
    from cachehub import cache
    from cachehub.store import Linker

    monkeypatch.setattr(cache, "LINK_BATCH", 4)
    src = random_tree(tmp_path / "src", 40)
    hub.push(src, "ds", tag="v1")
    hub.cache("ds@v1")
    (src / "extra").write_bytes(b"one more file")
    hub.push(src, "ds", tag="v2")
    real = Linker.place
    calls = []

    def place(self, obj, dest):  # type: ignore[no-untyped-def]
        calls.append(dest)
        if len(calls) == 17:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, obj, dest)

    monkeypatch.setattr(Linker, "place", place)
    with pytest.raises(NoSpaceError, match="ran out of space while building"):
        hub.cache("ds@v2")
    root = Path(hub.settings.site().root)
    assert [p.name for p in (root / "commits").iterdir()] == [hub.resolve_commit("ds@v1").id]
    assert list((root / "staging").iterdir()) == [] and list((root / "locks").iterdir()) == []
    monkeypatch.undo()
    assert tree_digest(Path(hub.cache("ds@v2").path)) == tree_digest(src)


def test_full_disk_fails_cleanly(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real 1 MiB tmpfs as the site when we may mount (root, as in CI); else ENOSPC is injected."""
    src = random_tree(tmp_path / "src", 200, min_size=20000, max_size=30000)  # ~5 MB
    hub.push(src, "ds")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tiny)], capture_output=True).returncode == 0
    try:
        if not mounted:
            real_write = os.write

            def write(fd, data):  # type: ignore[no-untyped-def]
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr("cachehub.store.os.write", write)
            assert real_write
        hub.site_add("tiny", tiny / "site")
        with pytest.raises(NoSpaceError, match="full|space"):
            hub.cache("ds", site="tiny")
        root = tiny / "site"
        assert list((root / "commits").iterdir()) == []
        assert list((root / "staging").iterdir()) == []
        assert [p for p in (root / "tmp").iterdir()] == []
        # the other site still works and the lake is untouched
        assert tree_digest(Path(hub.cache("ds").path)) == tree_digest(src)
    finally:
        if mounted:
            subprocess.run(["umount", str(tiny)], check=False)
