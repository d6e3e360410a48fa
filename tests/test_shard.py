"""Sharded caching: many processes, each a host of its own, fetch one commit into one site root.

Against a real SeaweedFS whose own request counter says how many GETs it answered; hosts are
separate homes and processes with their own hostnames (``unshare --uts`` as root, see
``test_shared_site.Host``); a shard is killed with SIGKILL at a pause point, not after a sleep.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from cachehub import download
from cachehub.errors import ConfigError
from cachehub.shard import Shard

from .conftest import BUCKET, SeaweedServer, random_tree, tree_digest, write_tree
from .test_shared_site import Host, _wait_for

PIECE = download.RANGE_SIZE


# -- which shard owns what --------------------------------------------------------------------
def test_shards_partition_objects_and_pieces_whatever_n() -> None:
    rng = random.Random(7)
    shas = [hashlib.sha256(rng.randbytes(8)).hexdigest() for _ in range(2000)]
    for n in (1, 2, 3, 8):
        shards = [Shard(k, n) for k in range(n)]
        for sha in shas:
            assert sum(s.owns(sha) for s in shards) == 1
        for sha in shas[:50]:
            for start in range(0, 10 * PIECE, PIECE):
                assert sum(s.owns_piece(sha, start) for s in shards) == 1
        counts = [sum(s.owns(sha) for sha in shas) for s in shards]
        assert max(counts) - min(counts) < 0.2 * len(shas) / n + 30  # about even
    big = shas[0]  # one object's pieces go round the shards: every shard gets some of a big file
    assert {k for k in range(4) for start in range(0, 8 * PIECE, PIECE) if Shard(k, 4).owns_piece(big, start)} == {0, 1, 2, 3}


def test_shard_parse_and_bad_values() -> None:
    assert (Shard.parse("2/8").index, Shard.parse(" 2 / 8 ").count) == (2, 8)
    for bad in ("8/8", "1", "a/b", "-1/4", "0/0", "1/4/5"):
        with pytest.raises(ConfigError, match="K/N|0 <= K < N"):
            Shard.parse(bad)


def test_shard_from_kubernetes_indexed_job_and_slurm_arrays() -> None:
    assert Shard.from_env({}) is None
    assert Shard.from_env({"JOB_COMPLETION_INDEX": "3"}) is None  # an indexed training Job is not a shard
    k8s = Shard.from_env({"JOB_COMPLETION_INDEX": "3", "CACHEHUB_SHARDS": "4"})
    assert (k8s.index, k8s.count, k8s.source) == (3, 4, "JOB_COMPLETION_INDEX/CACHEHUB_SHARDS")
    slurm = Shard.from_env({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"})
    assert (slurm.index, slurm.count) == (2, 4)
    one_based = Shard.from_env({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"})
    assert (one_based.index, one_based.count) == (3, 4)
    stepped = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2"}
    assert Shard.from_env(stepped).index == 2  # --array=1-7:2 -> tasks 1,3,5,7
    with pytest.raises(ConfigError, match="not on the array's grid"):
        Shard.from_env({**stepped, "SLURM_ARRAY_TASK_ID": "4"})
    with pytest.raises(ConfigError, match="0 <= K < N"):
        Shard.from_env({"JOB_COMPLETION_INDEX": "4", "CACHEHUB_SHARDS": "4"})
    with pytest.raises(ConfigError, match="not a whole number"):
        Shard.from_env({"JOB_COMPLETION_INDEX": "x", "CACHEHUB_SHARDS": "4"})
    with pytest.raises(ConfigError, match="array has 4 tasks"):
        Shard.from_env({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4", "CACHEHUB_SHARDS": "3"})


# -- many hosts against SeaweedFS ----------------------------------------------------------------
@pytest.fixture
def s3_hosts(tmp_path: Path, seaweed: SeaweedServer) -> list[Host]:
    """Four hosts on one S3 lake (SeaweedFS) and one site root."""
    lake = f"s3://{BUCKET}/{uuid.uuid4().hex}"
    root = tmp_path / "nfs" / "cachehub"
    hosts = []
    for i in range(4):
        host = Host(f"gpu-{i}", tmp_path, lake)  # type: ignore[arg-type]
        host.env["CACHEHUB_ENDPOINT_URL"] = seaweed.endpoint
        host.run("site", "add", "team", "--root", str(root))
        hosts.append(host)
    return hosts


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """1,200 small files (some sharing content) and two large files of 3 and 5 pieces."""
    src = random_tree(tmp_path / "src", 1200, seed=3, min_size=200, max_size=3000)
    rng = random.Random(5)
    write_tree(src, {"dup/a.bin": b"same bytes" * 50, "dup/b.bin": b"same bytes" * 50})
    write_tree(src, {"big/one.bin": rng.randbytes(2 * PIECE + 12345), "big/two.bin": rng.randbytes(4 * PIECE + 1)})
    return src


def _shard_json(proc: subprocess.Popen[str]) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out)


def _audit(hosts: list[Host], action: str) -> list[dict]:
    return [e for h in hosts for e in h.json("audit") if e["action"] == action]


def _expected_gets(src: Path, n_pieces: int) -> int:
    contents = {hashlib.sha256(p.read_bytes()).hexdigest() for p in src.rglob("*") if p.is_file() and p.stat().st_size <= download.LARGE_OBJECT}
    return len(contents) + n_pieces


def test_three_hosts_cache_one_commit_together_and_publish_once(s3_hosts: list[Host], dataset: Path, seaweed: SeaweedServer) -> None:
    pusher, *shards = s3_hosts
    pusher.run("push", str(dataset), "scans", "--tag", "v1")
    for host in shards:
        host.run("datasets")  # each host knows the lake already: what is counted below is the cache
    before = seaweed.requests("GET")
    procs = [h.start_free("cache", "scans@v1", "--shard", f"{k}/3", "--json") for k, h in enumerate(shards)]
    results = [_shard_json(p) for p in procs]
    gets = seaweed.requests("GET") - before

    assert sum(r["published_here"] for r in results) == 1  # exactly one publish
    assert len(_audit(s3_hosts, "cache")) == 1
    assert len(_audit(s3_hosts, "cache-shard")) == 3
    pieces = sum(r["fetched_pieces"] for r in results)
    assert pieces == 3 + 5  # every piece of both large files, once
    objects = _expected_gets(dataset, 0)
    assert sum(r["fetched_files"] for r in results) == objects  # shards never overlap
    assert all(r["fetched_files"] > objects / 6 for r in results)  # and share the work
    assert gets <= 1.02 * (objects + pieces), (gets, objects, pieces)
    path = shards[0].run("path", "scans@v1").stdout.strip()
    assert tree_digest(Path(path)) == tree_digest(dataset)  # byte-identical
    assert not any((Path(path).parents[1] / "ranges").iterdir())  # the piece files went into objects/
    assert not any((Path(path).parents[1] / "shards").iterdir())  # which shards finished: moot once published
    assert shards[2].run("verify", "scans@v1").returncode == 0


def test_a_killed_shard_resumes_and_different_n_stay_correct(s3_hosts: list[Host], dataset: Path, seaweed: SeaweedServer, tmp_path: Path) -> None:
    pusher, a, b, c = s3_hosts
    pusher.run("push", str(dataset), "scans", "--tag", "v1")
    handshake = tmp_path / "handshake"
    handshake.mkdir()
    killed = a.start("cache", "scans@v1", "--shard", "0/2", "--json", pause=("download.piece-done", handshake))
    killed.send_signal(signal.SIGKILL)  # at a piece just marked done: mid-fetch, deterministically
    killed.wait()
    [site] = [s for s in a.json("site", "list") if s["name"] == "team"]
    assert any(Path(site["root"], "ranges").iterdir()) and not any(Path(site["root"], "commits").iterdir())

    before = seaweed.requests("GET")
    again = json.loads(a.run("cache", "scans@v1", "--shard", "0/2", "--json").stdout)
    resumed_gets = seaweed.requests("GET") - before
    assert again["fetched_files"] == 0  # every small object of the shard had arrived before the kill
    assert 0 < again["fetched_pieces"] < 4  # at least one piece was done and is not fetched again
    # the remaining pieces, plus the reads that resolve the tag (its documents): nothing twice
    assert again["fetched_pieces"] <= resumed_gets <= again["fetched_pieces"] + 3
    assert not again["published"]

    # the rest with three shards instead of two: correct, published once
    rest = [h.start_free("cache", "scans@v1", "--shard", f"{k}/3", "--json") for k, h in enumerate((a, b, c))]
    results = [_shard_json(p) for p in rest]
    assert sum(r["published_here"] for r in results) == 1
    path = b.run("path", "scans@v1").stdout.strip()
    assert tree_digest(Path(path)) == tree_digest(dataset)
    assert c.run("verify", "scans@v1").returncode == 0


def test_an_init_container_waits_for_the_shards(s3_hosts: list[Host], dataset: Path, tmp_path: Path) -> None:
    pusher, a, b, trainer = s3_hosts
    pusher.run("push", str(dataset), "scans", "--tag", "v1")
    waiting = trainer.start_free("cache", "scans@v1", "--wait", "--timeout", "5m")
    a.run("cache", "scans@v1", "--shard", "0/2")
    assert waiting.poll() is None  # half the commit is there: still waiting
    done = b.run("cache", "scans@v1", "--shard", "1/2")
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert out.strip() == done.stdout.strip()
    assert tree_digest(Path(out.strip())) == tree_digest(dataset)
    again = trainer.run("cache", "scans@v1", "--wait", "--timeout", "1s")
    assert again.stdout == out  # published already: returns at once


def test_wait_gives_up_with_exit_3(tmp_path: Path) -> None:
    host = Host("solo", tmp_path, tmp_path / "lake")
    host.run("site", "add", "team", "--root", str(tmp_path / "site"))
    host.run("push", str(random_tree(tmp_path / "src", 5)), "ds")
    started = time.monotonic()
    late = host.run("cache", "ds", "--wait", "--timeout", "1s", ok=False)
    assert late.returncode == 3 and "nobody published it" in late.stderr and "--timeout" in late.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "site" / "commits").exists() or not any((tmp_path / "site" / "commits").iterdir())


def test_shard_from_slurm_environment_is_announced(tmp_path: Path) -> None:
    host = Host("solo", tmp_path, tmp_path / "lake")
    host.run("site", "add", "team", "--root", str(tmp_path / "site"))
    host.run("push", str(random_tree(tmp_path / "src", 40)), "ds")
    r = host.run("cache", "ds", SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_COUNT="2", SLURM_ARRAY_TASK_MIN="1")
    assert "shard 0/2 (from SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT)" in r.stderr
    assert "not published yet" in r.stderr and r.stdout == ""
    whole = host.run("cache", "ds", "--no-shard", SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_COUNT="2")
    assert "shard" not in whole.stderr and whole.stdout.strip()  # the rest fetched, published
    bad = host.run("cache", "ds", "--shard", "2/2", ok=False)
    assert bad.returncode == 13 and "0 <= K < N" in bad.stderr


def test_a_damaged_piece_is_caught_and_the_object_fetched_whole(tmp_path: Path) -> None:
    host = Host("solo", tmp_path, tmp_path / "lake")
    root = tmp_path / "site"
    host.run("site", "add", "team", "--root", str(root))
    rng = random.Random(9)
    src = write_tree(tmp_path / "src", {"big.bin": rng.randbytes(3 * PIECE + 7), "small.txt": "x"})
    host.run("push", str(src), "ds")
    first = json.loads(host.run("cache", "ds", "--shard", "0/2", "--json").stdout)
    [parts] = list((root / "ranges").iterdir())
    done = sorted(int(p.name.split(".")[0]) for p in parts.glob("*.done"))
    assert done and first["fetched_pieces"] == len(done)
    with open(parts / "data", "r+b") as fh:  # bit rot (or a bad server) in a piece marked done
        fh.seek(done[0] + 100)
        fh.write(b"\xff\x00\xff")
    second = json.loads(host.run("cache", "ds", "--shard", "1/2", "--json").stdout)
    assert second["published_here"]
    assert tree_digest(Path(second["path"])) == tree_digest(src)
    assert not parts.exists()
    assert host.run("verify", "ds").returncode == 0


def test_a_late_piece_write_never_reaches_the_published_object(tmp_path: Path) -> None:
    """A shard of another shard count may still hold the pieces file open when the object is
    published (both own the same piece): what it writes then must not change the published
    bytes. This test holds the file open the way such a shard does, and writes after the
    publish."""
    host = Host("solo", tmp_path, tmp_path / "lake")
    root = tmp_path / "site"
    host.run("site", "add", "team", "--root", str(root))
    rng = random.Random(5)
    src = write_tree(tmp_path / "src", {"big.bin": rng.randbytes(3 * PIECE + 11)})
    host.run("push", str(src), "ds")
    host.run("cache", "ds", "--shard", "0/2")
    [parts] = list((root / "ranges").iterdir())
    late = os.open(parts / "data", os.O_WRONLY)  # the slower shard's descriptor
    try:
        second = json.loads(host.run("cache", "ds", "--shard", "1/2", "--json").stdout)
        assert second["published_here"]
        os.pwrite(late, b"\x00" * 4096, 0)  # its piece arrives after the publish
    finally:
        os.close(late)
    sha = hashlib.sha256((src / "big.bin").read_bytes()).hexdigest()
    assert hashlib.sha256((Path(second["path"]) / "big.bin").read_bytes()).hexdigest() == sha
    assert host.run("verify", "ds").returncode == 0


def test_gc_removes_pieces_nobody_will_finish(tmp_path: Path) -> None:
    host = Host("solo", tmp_path, tmp_path / "lake")
    root = tmp_path / "site"
    host.run("site", "add", "team", "--root", str(root), "--keep-partial", "1h")
    rng = random.Random(2)
    host.run("push", str(write_tree(tmp_path / "src", {"big.bin": rng.randbytes(3 * PIECE)})), "ds")
    host.run("cache", "ds", "--shard", "0/3")
    [parts] = list((root / "ranges").iterdir())
    host.run("gc")
    assert parts.exists()  # young: another shard may still come
    old = time.time() - 7200
    for p in parts.iterdir():
        os.utime(p, (old, old))
    host.run("gc")
    assert not parts.exists()


def test_a_plain_cache_waits_for_running_shards_instead_of_fetching_their_share(s3_hosts: list[Host], dataset: Path, tmp_path: Path) -> None:
    """The daemon serving a queued request (or anyone's plain cache) while a shard job runs."""
    pusher, a, b, _ = s3_hosts
    pusher.run("push", str(dataset), "scans", "--tag", "v1")
    handshake = tmp_path / "handshake"
    handshake.mkdir()
    shard = a.start("cache", "scans@v1", "--shard", "0/2", "--json", pause=("shard.after-fetch", handshake))  # share in, lock held
    (handshake / "cache.waiting-for-shards.go").touch()  # the plain cache only marks that it waits
    plain = subprocess.Popen(
        b.argv("cache", "scans@v1", "--json"), env=b._env(("cache.waiting-for-shards", handshake), {}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_for((lambda: (handshake / "cache.waiting-for-shards.reached").exists() or plain.poll() is not None), "the plain cache waiting")
    assert plain.poll() is None  # waiting for the shard, not fetching its share
    (handshake / "shard.after-fetch.go").touch()
    first = _shard_json(shard)
    out, err = plain.communicate(timeout=300)
    assert plain.returncode == 0, err
    whole = json.loads(out)
    assert first["fetched_files"] + whole["fetched_files"] == _expected_gets(dataset, 0) + 2  # + the two large objects, assembled
    assert len(_audit(s3_hosts, "cache")) == 1
    assert tree_digest(Path(whole["path"])) == tree_digest(dataset)
