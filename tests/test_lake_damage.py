"""Damaged documents in the lake: one clear error naming the key and the fix, with the documented
exit code, and never a whole command taken down for the rest of the lake (issue 15).

Each case is a crafted document written through the lake's backend (bit rot, a bad tool, a
partial upload), in a real local lake; the commands run as the CLI.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from cachehub import Hub
from cachehub.config import load_settings
from cachehub.lake import commit_key, manifest_key, tag_key

from .conftest import SeaweedServer, run_cli, write_tree

HEADER = b"#cachehub-manifest format_version=1\n"


@pytest.fixture
def lake(hub: Hub, tmp_path: Path) -> Hub:
    hub.push(write_tree(tmp_path / "good", {"a.txt": "fine"}), "good", tag="v1")
    return hub


def _commit(hub: Hub, dataset: str, manifest_id: str, **extra: object) -> str:
    body = {
        "format": "cachehub-commit", "format_version": 1, "dataset": dataset, "manifest": manifest_id, "files": 1,
        "bytes": 1, "parents": [], "author": "t", "host": "h", "message": "m", "created": "2026-12-02T00:00:00Z", **extra,
    }  # fmt: skip
    data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    cid = hashlib.sha256(data).hexdigest()
    hub.lake.backend.write(commit_key(dataset, cid), data)
    hub.lake.backend.write(tag_key(dataset, "v1"), json.dumps({"format": "cachehub-tag", "format_version": 1, "commit": cid}).encode())
    return cid


def _manifest(hub: Hub, text: bytes, *, blob: bytes | None = None) -> str:
    mid = hashlib.sha256(text).hexdigest()
    hub.lake.backend.write(manifest_key(mid), gzip.compress(text) if blob is None else blob)
    return mid


def _cache(env: dict[str, str], ref: str) -> tuple[int, str]:
    r = run_cli("cache", ref, env=env)
    return r.returncode, r.stderr


def _good_still_works(env: dict[str, str]) -> None:
    assert run_cli("cache", "good@v1", env=env).returncode == 0


def test_a_damaged_tag_takes_down_nothing_else(lake: Hub, env: dict[str, str], tmp_path: Path) -> None:
    lake.push(write_tree(tmp_path / "other", {"b.txt": "x"}), "scans", tag="v1")
    lake.lake.backend.write(tag_key("scans", "v1"), b"not json")
    rebuilt = run_cli("catalog", "rebuild", env=env)  # reads every document of the lake
    assert rebuilt.returncode == 0 and "datasets/scans/tags/v1.json" in rebuilt.stderr  # named, as a warning
    listing = run_cli("datasets", env=env)
    assert listing.returncode == 0 and "good" in listing.stdout and "scans" in listing.stdout
    code, err = _cache(env, "scans@v1")
    assert code == 12 and "key datasets/scans/tags/v1.json" in err and "--force" in err
    _good_still_works(env)
    commit = lake.resolve_commit("scans@latest").id
    run_cli("tag", f"scans@{commit}", "v1", "--force", env=env, check=True)  # the fix the message names
    assert _cache(env, "scans@v1")[0] == 0


@pytest.mark.parametrize(
    ("case", "exit_code"),
    [("not-json", 12), ("wrong-hash", 9), ("format-2", 12), ("missing-field", 12)],
)
def test_a_damaged_commit_is_named_with_its_exit_code(lake: Hub, env: dict[str, str], case: str, exit_code: int) -> None:
    mid = _manifest(lake, HEADER + b"a" * 64 + b"\t1\tx.bin\n")
    if case == "format-2":
        cid = _commit(lake, "bad", mid, format_version=2)
    elif case == "missing-field":
        cid = _commit(lake, "bad", mid)
        data = json.dumps({"format": "cachehub-commit", "format_version": 1, "dataset": "bad"}).encode()
        cid = hashlib.sha256(data).hexdigest()
        lake.lake.backend.write(commit_key("bad", cid), data)
        lake.lake.backend.write(tag_key("bad", "v1"), json.dumps({"format": "cachehub-tag", "format_version": 1, "commit": cid}).encode())
    else:
        cid = _commit(lake, "bad", mid)
        damaged = b"{not json" if case == "not-json" else b'{"format": "cachehub-commit", "format_version": 1}'
        if case == "not-json":  # named by its own hash: only the JSON is wrong
            cid = hashlib.sha256(damaged).hexdigest()
            lake.lake.backend.write(tag_key("bad", "v1"), json.dumps({"format": "cachehub-tag", "format_version": 1, "commit": cid}).encode())
        lake.lake.backend.write(commit_key("bad", cid), damaged)
    for ref in ("bad@v1", f"bad@{cid[:12]}"):
        code, err = _cache(env, ref)
        assert code == exit_code, err
        assert f"key datasets/bad/commits/{cid}.json" in err and "restore that key" in err
    assert run_cli("datasets", env=env).returncode == 0
    _good_still_works(env)


@pytest.mark.parametrize(
    ("case", "exit_code", "says"),
    [
        ("truncated", 9, "not a complete gzip file"),
        ("not-gzip", 9, "not a complete gzip file"),
        ("not-utf8", 12, "not UTF-8"),
        ("file-and-folder", 10, "lies inside 'd', which is a file"),
    ],
)
def test_a_damaged_manifest_is_refused_on_arrival(
    lake: Hub, env: dict[str, str], case: str, exit_code: int, says: str
) -> None:
    line = b"a" * 64 + b"\t1\t"
    text = {
        "truncated": HEADER + line + b"one.bin\n" + line + b"two.bin\n",
        "not-gzip": HEADER + line + b"three.bin\n",
        "not-utf8": HEADER + line + b"caf\xe9.bin\n",
        "file-and-folder": HEADER + line + b"d\n" + line + b"d/x\n",
    }[case]
    blob = {"truncated": gzip.compress(text)[:-12], "not-gzip": text}.get(case)
    mid = _manifest(lake, text, blob=blob)
    _commit(lake, "bad", mid)
    code, err = _cache(env, "bad@v1")
    assert code == exit_code, err
    assert says in err and manifest_key(mid) in err
    assert ".tmp" not in err  # the lake's key is named, not a temporary file
    site = Path(env["CACHEHUB_HOME"]) / "sites" / "local" / "commits"
    assert not site.exists() or not [p for p in site.iterdir() if not p.name.startswith(lake.resolve_commit("good@v1").id)]
    _good_still_works(env)


def test_a_missing_bucket_is_reported_as_missing(seaweed: SeaweedServer, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEHUB_")}
    env.update(CACHEHUB_HOME=str(tmp_path / "home"), CACHEHUB_LAKE="s3://no-such-bucket-here/lake", CACHEHUB_ENDPOINT_URL=seaweed.endpoint)
    for args in (("datasets",), ("cache", "ds@v1")):
        r = run_cli(*args, env=env)
        assert r.returncode == 11, r.stderr
        assert "bucket 'no-such-bucket-here' does not exist" in r.stderr and "access denied" not in r.stderr


@pytest.fixture
def s3_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEHUB_")}
    env.update(CACHEHUB_HOME=str(tmp_path / "home"), CACHEHUB_LAKE="s3://lake/prefix", CACHEHUB_REQUEST_TIMEOUT="1", CACHEHUB_RETRY_TIMEOUT="2")
    return env


def _timed(env: dict[str, str]) -> tuple[int, str, float]:
    started = time.monotonic()
    r = run_cli("cache", "ds@v1", env=env)
    return r.returncode, r.stderr, time.monotonic() - started


def test_a_refused_port_is_retried_until_the_deadline(s3_env: dict[str, str]) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, err, took = _timed({**s3_env, "CACHEHUB_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    assert code == 11 and "did not answer" in err and "CACHEHUB_RETRY_TIMEOUT" in err
    assert took >= 1.5  # retried for the deadline (2 s), not given up after the first tries
    assert took < 30  # and then stopped


def test_a_frozen_server_ends_at_the_request_deadline(s3_env: dict[str, str]) -> None:
    """A server that accepts connections and never answers (a real socket on loopback)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        code, err, took = _timed({**s3_env, "CACHEHUB_ENDPOINT_URL": f"http://127.0.0.1:{server.getsockname()[1]}"})
    finally:
        server.close()
        for conn in held:
            conn.close()
    assert code == 11 and "did not answer" in err and "CACHEHUB_REQUEST_TIMEOUT" in err
    assert took < 30  # 1 s per request, retried for 2 s: not the 300 s of before
    assert held  # it did reach the server


def test_the_command_deadline_ends_a_command_waiting_on_a_frozen_server(s3_env: dict[str, str]) -> None:
    """CACHEHUB_COMMAND_TIMEOUT bounds the whole command, whatever the request deadlines say."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    env = {**s3_env, "CACHEHUB_ENDPOINT_URL": f"http://127.0.0.1:{server.getsockname()[1]}",
           "CACHEHUB_REQUEST_TIMEOUT": "60", "CACHEHUB_RETRY_TIMEOUT": "120", "CACHEHUB_COMMAND_TIMEOUT": "2s"}  # fmt: skip
    try:
        code, err, took = _timed(env)
    finally:
        server.close()
    assert code == 11 and "deadline of 2s (CACHEHUB_COMMAND_TIMEOUT)" in err and "re-run to resume" in err
    assert took < 30  # not the 60 s of one request
    bad = run_cli("datasets", env={**env, "CACHEHUB_COMMAND_TIMEOUT": "soon"})
    assert bad.returncode == 13 and "CACHEHUB_COMMAND_TIMEOUT='soon' is not a duration" in bad.stderr


def test_no_abort_when_exiting_on_an_error_with_requests_in_flight(tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache that fails on one missing object while many others are in flight exits with
    the error's code every time, never SIGABRT (134) from obstore's threads at teardown."""
    from .conftest import object_store_lake, random_tree

    url = object_store_lake("seaweed", request, monkeypatch)
    env = {**os.environ, "CACHEHUB_HOME": str(tmp_path / "home"), "CACHEHUB_LAKE": url}
    src = random_tree(tmp_path / "src", 300, seed=9, max_size=2000)
    run_cli("push", str(src), "ds", "--tag", "v1", env=env, check=True)
    hub = Hub(load_settings(tmp_path / "home", lake=url))
    victim = hashlib.sha256(sorted(p for p in src.rglob("*") if p.is_file())[150].read_bytes()).hexdigest()
    hub.lake.backend.delete(f"objects/sha256/{victim[:2]}/{victim}")
    hub.close()
    codes = []
    for i in range(12):  # each run from a new home: an empty site, every object to fetch
        codes.append(run_cli("cache", "ds@v1", "--jobs", "64", env={**env, "CACHEHUB_HOME": str(tmp_path / f"h{i}")}).returncode)
    assert set(codes) == {9}, codes


def test_push_repair_puts_back_damaged_and_missing_objects(hub: Hub, tmp_path: Path, env: dict[str, str]) -> None:
    src = write_tree(tmp_path / "src", {"a.txt": "alpha", "b.txt": "bravo", "c.txt": "charlie"})
    hub.push(src, "ds", tag="v1")
    sha = {p: hashlib.sha256((src / p).read_bytes()).hexdigest() for p in ("a.txt", "b.txt")}
    hub.lake.backend.write(f"objects/sha256/{sha['a.txt'][:2]}/{sha['a.txt']}", b"bit rot")
    hub.lake.backend.delete(f"objects/sha256/{sha['b.txt'][:2]}/{sha['b.txt']}")
    broken = run_cli("cache", "ds@v1", env=env)
    assert broken.returncode == 9 and "--repair" in broken.stderr
    plain = run_cli("push", str(src), "ds", env=env, check=True)  # what the old advice did: nothing
    assert "nothing changed" in plain.stdout
    fixed = run_cli("push", str(src), "ds", "--repair", env=env, check=True)
    assert "2 missing or damaged, uploaded again" in fixed.stderr
    assert run_cli("cache", "ds@v1", env=env).returncode == 0
    again = run_cli("push", str(src), "ds", "--repair", "--json", env=env, check=True)
    assert json.loads(again.stdout)["repaired_files"] == 0  # all good now: nothing uploaded
