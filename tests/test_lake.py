"""The lake module alone: every key and document type, on a local directory and on S3 (SeaweedFS)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachehub import chunks, lake as lakemod
from cachehub.backends import open_backend
from cachehub.errors import ConflictError, IntegrityError, UnsafePathError
from cachehub.lake import Lake, canonical_json, commit_document
from cachehub.manifest import write_manifest
from cachehub.model import ManifestEntry, Tombstone


@pytest.fixture
def lake(lake_url: str, tmp_path: Path) -> Iterator[Lake]:
    backend = open_backend(lake_url, endpoint_url=os.environ.get("CACHEHUB_ENDPOINT_URL"))
    the_lake = Lake(backend, manifest_cache=tmp_path / "manifests")
    the_lake.ensure_initialised()
    yield the_lake
    the_lake.close()


def test_keys_are_the_documented_layout() -> None:
    sha = "ab" + "0" * 62
    assert lakemod.object_key(sha) == f"objects/sha256/ab/{sha}"
    assert lakemod.chunk_map_key(sha) == f"chunks/sha256/ab/{sha}"
    assert lakemod.manifest_key(sha) == f"manifests/sha256/ab/{sha}.tsv.gz"
    assert lakemod.commit_key("ds", sha) == f"datasets/ds/commits/{sha}.json"
    assert lakemod.tag_key("ds", "v1") == "datasets/ds/tags/v1.json"
    assert lakemod.tombstone_key("ds", sha) == f"datasets/ds/tombstones/{sha}.json"
    assert lakemod.run_key("exp-1") == "runs/exp-1.json"
    assert lakemod.audit_batch_key("o1", 1, 20) == "audit/o1/000000000001-000000000020.jsonl"


def test_a_commit_id_is_the_hash_of_its_document(lake: Lake) -> None:
    body = commit_document(
        dataset="ds", manifest="m" * 64, files=2, bytes=7, parents=[], author="ann", host="h1", message="first", created="2026-01-01T00:00:00Z"
    )
    commit = lake.write_commit(body)
    assert commit.id == hashlib.sha256(canonical_json(body)).hexdigest()
    assert lake.write_commit(body) == commit  # create-only, and idempotent
    assert lake.read_commit("ds", commit.id) == commit and lake.commit_ids("ds") == [commit.id]
    assert lake.datasets() == ["ds"]
    assert lakemod.commit_body(commit) == body
    fields = {k: v for k, v in body.items() if k not in ("format", "format_version")}
    assert lake.write_commit(commit_document(**fields, run="r1")).run == "r1"
    lake.backend.write(lakemod.commit_key("other", commit.id), canonical_json(body))  # filed under the wrong dataset
    with pytest.raises(IntegrityError, match="belongs to"):
        lake.read_commit("other", commit.id)


def test_tags_move_only_by_compare_and_swap(lake: Lake) -> None:
    etag = lake.write_tag("ds", "v1", "a" * 64, author="ann", expect=False)
    assert lake.read_tag("ds", "v1") == ("a" * 64, etag)
    with pytest.raises(ConflictError):
        lake.write_tag("ds", "v1", "b" * 64, author="bob", expect=False)  # exists already
    moved = lake.write_tag("ds", "v1", "b" * 64, author="bob", expect=etag)
    with pytest.raises(ConflictError):
        lake.write_tag("ds", "v1", "c" * 64, author="cat", expect=etag)  # stale etag
    assert lake.read_tag("ds", "v1") == ("b" * 64, moved)
    assert [(t.name, t.commit) for t in lake.tags("ds")] == [("v1", "b" * 64)]
    lake.delete_tag("ds", "v1")
    assert lake.read_tag("ds", "v1") is None and lake.tags("ds") == []


def test_tombstones_runs_and_audit_batches(lake: Lake) -> None:
    t = Tombstone("c" * 64, "ds", "erasure request", "bob", "2026-02-01T00:00:00Z", "h2")
    lake.write_tombstone(t)
    assert lake.tombstones("ds") == [t]
    lake.write_run({"id": "exp-1", "status": "running"})
    lake.write_run({"id": "exp-1", "status": "succeeded"})  # a run's document follows its life
    assert lake.runs() == [{"format": "cachehub-run", "format_version": 1, "id": "exp-1", "status": "succeeded"}]
    event = {"time": "t", "user": "u", "host": "h", "action": "push", "dataset": "ds", "commit": None, "ref": None, "site": None, "details": {}}
    rows = [{**event, "origin": "o1", "origin_seq": n, "prev": str(n - 1), "hash": str(n)} for n in (1, 2)]
    assert lake.write_audit_batch("o1", rows) == "audit/o1/000000000001-000000000002.jsonl"
    with pytest.raises(ConflictError):
        lake.write_audit_batch("o1", rows)  # shipped history is never overwritten
    assert [(e["origin"], e["seq"], e["hash"]) for e in lake.audit_events()] == [("o1", 1, "1"), ("o1", 2, "2")]


def test_manifests_are_verified_before_they_are_kept(lake: Lake, tmp_path: Path) -> None:
    entries = [ManifestEntry("a/x.png", 3, hashlib.sha256(b"abc").hexdigest())]
    local = tmp_path / "m.tsv.gz"
    mid, _, _ = write_manifest(local, entries)
    lake.put_manifest(mid, local)
    kept = tmp_path / "manifests" / mid[:2] / f"{mid}.tsv.gz"
    assert kept.exists() and not local.exists()  # moved into the local cache
    kept.unlink()
    assert lake.manifest(mid) == kept and kept.exists()  # fetched again, verified
    lake.delete_manifest(mid)
    assert not kept.exists() and not lake.backend.exists(lakemod.manifest_key(mid))
    # a manifest whose bytes do not hash to its id, and a hostile one that does
    good = hashlib.sha256(b"ok").hexdigest()
    lake.backend.write(lakemod.manifest_key("f" * 64), gzip.compress(f"#cachehub-manifest format_version=1\n{good}\t2\tx\n".encode()))
    with pytest.raises(IntegrityError):
        lake.manifest("f" * 64)
    hostile = f"#cachehub-manifest format_version=1\n{good}\t2\t../escape\n".encode()
    hostile_id = hashlib.sha256(hostile).hexdigest()
    lake.backend.write(lakemod.manifest_key(hostile_id), gzip.compress(hostile))
    with pytest.raises(UnsafePathError):
        lake.manifest(hostile_id)
    assert not list((tmp_path / "manifests").rglob("*.tsv.gz"))  # nothing refused was kept


def test_objects_and_chunk_maps_on_the_data_path(lake: Lake) -> None:
    data = os.urandom(3 * chunks.MAX_SIZE)
    sha = hashlib.sha256(data).hexdigest()

    async def main() -> None:
        assert await lake.aput_object_if_absent(sha, data)
        assert not await lake.aput_object_if_absent(sha, data)
        assert await lake.aobject_exists(sha) and not await lake.ahas_chunk_map(sha)
        assert bytes(await lake.aget_object_range(sha, 10, 20)) == data[10:20]
        assert bytes(await lake.aget_object(sha)) == data
        await lake.aput_chunk_map(sha, chunks.compute(data))
        assert await lake.ahas_chunk_map(sha)

    asyncio.run(main())
    assert lake.read_chunk_map(sha, size=len(data)) == chunks.compute(data)
    lake.delete_object(sha)
    assert not asyncio.run(lake.aobject_exists(sha))
