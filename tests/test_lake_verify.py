"""``cachehub lake verify``: the lake read back, sampled or full, resumable, on crafted damage."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cachehub.backends import open_backend

from .conftest import object_store_lake, random_tree, run_cli, write_tree


@pytest.fixture
def hub_s3_lake(tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple:
    url = object_store_lake("seaweed", request, monkeypatch)
    env = dict(os.environ, CACHEHUB_HOME=str(tmp_path / "home"), CACHEHUB_LAKE=url)
    return env, open_backend(url, endpoint_url=os.environ["CACHEHUB_ENDPOINT_URL"])


def _lake_file(env: dict[str, str], key: str) -> Path:
    return Path(env["CACHEHUB_LAKE"]) / key


def _push(env: dict[str, str], src: Path, name: str, *extra: str) -> str:
    out = run_cli("push", str(src), name, "--json", *extra, env=env, check=True)
    return json.loads(out.stdout)["commit"]


def test_clean_lake_then_each_kind_of_damage(local_env: dict[str, str], tmp_path: Path) -> None:
    env = local_env
    a = random_tree(tmp_path / "a", 12, seed=1)
    write_tree(a, {"big.bin": os.urandom(17 * 1024 * 1024)})  # above the chunk-map threshold
    _push(env, a, "alpha", "--tag", "v1")
    b = random_tree(tmp_path / "b", 5, seed=2)
    _push(env, b, "beta", "--tag", "v1")
    ok = run_cli("lake", "verify", "--json", env=env)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["ok"] and report["datasets"] == ["alpha", "beta"] and report["commits"] == 2
    assert report["objects"] == report["checked_objects"] == 18 and report["checked_bytes"] > 17 * 1024 * 1024

    lake = Path(env["CACHEHUB_LAKE"])
    objects = sorted(p for p in (lake / "objects").rglob("*") if p.is_file())
    small = next(p for p in objects if p.stat().st_size < 100_000)
    small.chmod(0o644)
    small.write_bytes(b"x" + small.read_bytes()[1:])  # same size, other bytes
    missing = next(p for p in objects if p != small and p.stat().st_size < 100_000)
    missing.unlink()
    chunk_map = next(p for p in (lake / "chunks").rglob("*") if p.is_file())
    chunk_map.chmod(0o644)
    chunk_map.write_bytes(b"not a chunk map")
    tag = lake / "datasets" / "beta" / "tags" / "v1.json"
    body = json.loads(tag.read_text())
    body["commit"] = "0" * 64
    tag.write_text(json.dumps(body))

    bad = run_cli("lake", "verify", env=env)
    assert bad.returncode == 9, bad.stdout + bad.stderr
    out = bad.stdout
    assert f"problem: objects/sha256/{small.name[:2]}/{small.name}: object {small.name} is damaged: its bytes hash to" in out
    assert f"object {missing.name} is missing" in out
    assert "the chunk map of" in out and "is damaged" in out
    assert "tag beta@v1 points at commit 0000" in out
    assert "cachehub push DIR NAME --repair" in out and "4 problems" in out
    # --repair puts the damaged object, the missing one and the chunk map back
    repaired = run_cli("push", str(a), "alpha", "--repair", "--json", env=env, check=True)
    assert json.loads(repaired.stdout)["repaired_files"] == 3
    again = run_cli("lake", "verify", "--dataset", "alpha", env=env)
    assert again.returncode == 0 and "lake ok" in again.stdout, again.stdout


def test_sample_reads_a_fraction(local_env: dict[str, str], tmp_path: Path) -> None:
    env = local_env
    _push(env, random_tree(tmp_path / "s", 400, seed=4, max_size=200), "many")
    report = json.loads(run_cli("lake", "verify", "--sample", "0.1", "--json", env=env, check=True).stdout)
    assert report["objects"] == 400 and 10 <= report["checked_objects"] <= 80 and report["sample"] == 0.1
    bad = run_cli("lake", "verify", "--sample", "1.5", env=env)
    assert bad.returncode == 13 and "--sample must be a fraction" in bad.stderr


def test_interrupted_run_resumes(local_env: dict[str, str], tmp_path: Path) -> None:
    """Paused right after its first checkpoint (512 objects), then interrupted: the re-run
    resumes there and checks only the rest."""
    env = local_env
    _push(env, random_tree(tmp_path / "r", 600, seed=5, max_size=200), "many")
    handshake = tmp_path / "pause"
    handshake.mkdir()
    paused = dict(env, CACHEHUB_PAUSE=f"lake-verify.checkpoint@{handshake}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachehub.cli.main", "lake", "verify"], env=paused, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not (handshake / "lake-verify.checkpoint.reached").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "re-run to resume" in err
    resumed = json.loads(run_cli("lake", "verify", "--json", env=env, check=True).stdout)
    assert resumed["resumed_from"] == 512 and resumed["checked_objects"] == 600 and resumed["ok"]
    fresh = json.loads(run_cli("lake", "verify", "--json", env=env, check=True).stdout)
    assert fresh["resumed_from"] == 0  # a finished run leaves nothing to resume


def test_a_truncated_or_emptied_large_object_is_damage_not_an_error(hub_s3_lake: tuple, tmp_path: Path) -> None:
    """Cut short at a multiple of 8 MiB, or emptied: reported as damaged (exit 9), and
    --repair puts it back, on an object store."""
    env, backend = hub_s3_lake
    src = write_tree(tmp_path / "big", {"a.bin": os.urandom(16 * 1024 * 1024 + 5), "b.bin": os.urandom(9 * 1024 * 1024)})
    _push(env, src, "big")
    sha = {n: hashlib.sha256((src / n).read_bytes()).hexdigest() for n in ("a.bin", "b.bin")}
    backend.write(f"objects/sha256/{sha['a.bin'][:2]}/{sha['a.bin']}", (src / "a.bin").read_bytes()[: 8 * 1024 * 1024])
    backend.write(f"objects/sha256/{sha['b.bin'][:2]}/{sha['b.bin']}", b"")
    bad = run_cli("lake", "verify", env=env)
    assert bad.returncode == 9, bad.stderr
    assert f"object {sha['a.bin']} is damaged: 8388608 bytes where 16777221 were expected" in bad.stdout
    assert f"object {sha['b.bin']} is damaged: 0 bytes where 9437184 were expected" in bad.stdout
    fixed = json.loads(run_cli("push", str(src), "big", "--repair", "--json", env=env, check=True).stdout)
    assert fixed["repaired_files"] == 2
    assert run_cli("lake", "verify", env=env).returncode == 0


def test_a_resumed_run_rechecks_what_it_found_and_skips_nothing(local_env: dict[str, str], tmp_path: Path) -> None:
    """Interrupted after finding damage; meanwhile the damage is repaired and another dataset
    is pushed (new hashes land before the resume point): the resumed run reports no stale
    problem, and every object of the snapshot it started from is checked exactly once."""
    env = local_env
    src = random_tree(tmp_path / "r", 600, seed=6, max_size=200)
    _push(env, src, "many")
    lake = Path(env["CACHEHUB_LAKE"])
    first = sorted(p for p in (lake / "objects").rglob("*") if p.is_file())[3]  # before the first checkpoint
    first.chmod(0o644)
    first.write_bytes(b"rot")
    handshake = tmp_path / "pause"
    handshake.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "cachehub.cli.main", "lake", "verify"], text=True,
                            env=dict(env, CACHEHUB_PAUSE=f"lake-verify.checkpoint@{handshake}"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (handshake / "lake-verify.checkpoint.reached").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    run_cli("push", str(src), "many", "--repair", env=env, check=True)
    random_tree(src / "more", 50, seed=7, max_size=200)  # a new commit of the same dataset
    _push(env, src, "many")
    (state,) = (Path(env["CACHEHUB_HOME"]) / "lake-verify").glob("*.json")
    last = json.loads(state.read_text())["last"]
    shas = [p.name for p in (lake / "objects").rglob("*") if p.is_file()]
    resumed = json.loads(run_cli("lake", "verify", "--json", env=env, check=True).stdout)
    assert resumed["ok"] and resumed["resumed_from"] == 512 and resumed["objects"] == 650, resumed
    assert resumed["checked_objects"] == 512 + sum(1 for s in shas if s > last)
