"""Chunk-level deltas: a big file that changes a little moves only its changed chunks.

Against both backends (the S3 one is a real SeaweedFS). The byte counts come from the real
backend: its ranged read is wrapped to add up what was asked of the lake, then delegates.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
from pathlib import Path

import pytest

from cachehub import chunks, lake
from cachehub.api import Hub
from cachehub.errors import FormatError
from cachehub.lake import object_key
from cachehub.store import SiteStore

from .conftest import tree_digest, write_tree

MiB = 1024 * 1024


def _big(seed: int, size: int) -> bytearray:
    return bytearray(random.Random(seed).randbytes(size))


def _count_lake_ranges(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the length of every ranged read the fetch makes from the lake (then do it)."""
    backend = hub.lake.backend
    real = backend.aget_range
    asked: list[int] = []

    async def counting(key: str, start: int, end: int):  # type: ignore[no-untyped-def]
        asked.append(end - start)
        return await real(key, start, end)

    monkeypatch.setattr(backend, "aget_range", counting)
    return asked


def _edit(data: bytearray) -> bytes:
    """About 1% of 24 MiB changed: 64 KiB rewritten in place, 4 KiB inserted, 4 KiB deleted."""
    rng = random.Random(99)
    data[10 * MiB : 10 * MiB + 64 * 1024] = rng.randbytes(64 * 1024)
    data[18 * MiB : 18 * MiB] = rng.randbytes(4096)
    del data[21 * MiB : 21 * MiB + 4096]
    return bytes(data)


def _cached_v1(hub: Hub, src: Path, v1: bytearray, **more: str) -> None:
    write_tree(src, {"shard.bin": bytes(v1), **more})
    hub.push(src, "ds", tag="v1")
    hub.cache("ds@v1")


def _pushed_v2(hub: Hub, src: Path, v1: bytearray) -> bytes:
    v2 = _edit(bytearray(v1))
    (src / "shard.bin").write_bytes(v2)
    hub.push(src, "ds", tag="v2")
    return v2


def test_big_file_changed_a_little_moves_only_changed_chunks(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    v1 = _big(1, 24 * MiB)
    _cached_v1(hub, src, v1, **{"small.txt": "labels"})
    v2 = _pushed_v2(hub, src, v1)
    asked = _count_lake_ranges(hub, monkeypatch)
    r = hub.cache("ds@v2")

    assert tree_digest(Path(r.path)) == tree_digest(src)
    assert r.fetched_files == 1 and r.fetched_bytes == len(v2)
    network = r.fetched_bytes - r.chunk_copied_bytes
    assert sum(asked) == network  # exactly the ranges it did not copy crossed the network
    # three edits touch at most two chunks each (max 4 MiB), and the chunks are ~1 MiB
    assert 0 < network <= 6 * chunks.MAX_SIZE and network < len(v2) // 3
    assert r.chunk_copied_bytes > len(v2) // 2
    # v1 is untouched, and both versions are complete, independent files at the site
    v1_path = Path(hub.resolve("ds@v1")) / "shard.bin"
    assert hashlib.sha256(v1_path.read_bytes()).hexdigest() == hashlib.sha256(bytes(v1)).hexdigest()


def test_damaged_base_at_the_site_falls_back_to_a_whole_fetch(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    v1 = _big(2, 24 * MiB)
    _cached_v1(hub, src, v1)
    # bit rot in the site's copy of v1, inside chunks v2 shares with it
    obj = SiteStore(hub.settings.site()).object_path(hashlib.sha256(bytes(v1)).hexdigest())
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as fh:
        fh.seek(3 * MiB)
        fh.write(b"\0" * 100)
    v2 = _pushed_v2(hub, src, v1)
    asked = _count_lake_ranges(hub, monkeypatch)
    r = hub.cache("ds@v2")
    assert tree_digest(Path(r.path)) == tree_digest(src)
    assert r.chunk_copied_bytes == 0  # the copy did not verify, so the whole object came from the lake
    assert sum(asked) > len(v2)  # the failed delta's ranges, then the whole object


def test_object_without_chunk_map_is_fetched_whole(hub: Hub, tmp_path: Path) -> None:
    """A lake written before chunk maps existed (or a push that died before writing one)."""
    src = tmp_path / "src"
    v1 = _big(3, 20 * MiB)
    _cached_v1(hub, src, v1)
    v2 = bytearray(v1)
    v2[5 * MiB : 5 * MiB + 10] = b"0123456789"
    (src / "shard.bin").write_bytes(bytes(v2))
    hub.push(src, "ds", tag="v2")
    sha2 = hashlib.sha256(bytes(v2)).hexdigest()
    assert hub.lake.backend.exists(lake.chunk_map_key(sha2))
    hub.lake.backend.delete(lake.chunk_map_key(sha2))
    r = hub.cache("ds@v2")
    assert tree_digest(Path(r.path)) == tree_digest(src)
    assert r.chunk_copied_bytes == 0 and r.fetched_bytes == len(v2)


@pytest.mark.parametrize("damage", ["deflate", "header"])
def test_damaged_chunk_map_means_a_whole_fetch_not_a_failure(hub: Hub, tmp_path: Path, damage: str) -> None:
    """Chunk maps are optional: one that cannot be read costs time, never the cache."""
    src = tmp_path / "src"
    v1 = _big(4, 20 * MiB)
    _cached_v1(hub, src, v1)
    v2 = _pushed_v2(hub, src, v1)
    key = lake.chunk_map_key(hashlib.sha256(v2).hexdigest())
    blob = hub.lake.backend.read(key)[0]
    bad = blob[:20] + bytes(64) + blob[84:] if damage == "deflate" else gzip.compress(b"not a chunk map\n")
    hub.lake.backend.delete(key)
    hub.lake.backend.write(key, bad)
    r = hub.cache("ds@v2")
    assert tree_digest(Path(r.path)) == tree_digest(src)
    assert r.chunk_copied_bytes == 0 and r.fetched_bytes == len(v2)


def test_large_file_with_a_non_ascii_path(hub: Hub, tmp_path: Path) -> None:
    """The plan lists large objects with their path: any UTF-8 path a manifest allows."""
    src = tmp_path / "src"
    v1 = _big(5, 18 * MiB)
    write_tree(src, {"données/échantillon-01.bin": bytes(v1)})
    hub.push(src, "ds", tag="v1")
    r1 = hub.cache("ds@v1")
    assert tree_digest(Path(r1.path)) == tree_digest(src)
    v2 = bytearray(v1)
    v2[9 * MiB : 9 * MiB + 100] = bytes(100)
    (src / "données/échantillon-01.bin").write_bytes(bytes(v2))
    hub.push(src, "ds", tag="v2")
    r2 = hub.cache("ds@v2")
    assert tree_digest(Path(r2.path)) == tree_digest(src)
    assert r2.chunk_copied_bytes > len(v2) // 2


def test_a_push_adds_the_missing_chunk_map_of_an_object_already_in_the_lake(hub: Hub, tmp_path: Path) -> None:
    """An object pushed without its map (older cachehub, or a push that died in between) gets it."""
    data = bytes(_big(6, 17 * MiB))
    src = write_tree(tmp_path / "src", {"shard.bin": data})
    hub.push(src, "one")
    key = lake.chunk_map_key(hashlib.sha256(data).hexdigest())
    hub.lake.backend.delete(key)
    again = hub.push(src, "two")  # another dataset: the file is a candidate again
    assert again.uploaded_files == 0 and again.present_files == 1
    assert chunks.decode(hub.lake.backend.read(key)[0], size=len(data)).size == len(data)


def test_small_objects_get_no_chunk_map(hub: Hub, tmp_path: Path) -> None:
    data = b"x" * (1 * MiB)
    hub.push(write_tree(tmp_path / "src", {"a.bin": data}), "ds")
    sha = hashlib.sha256(data).hexdigest()
    assert hub.lake.backend.exists(object_key(sha))
    assert not hub.lake.backend.exists(lake.chunk_map_key(sha))


# -- the chunk map format and the segment planner (pure functions) -------------------------------


def test_chunk_boundaries_are_content_defined() -> None:
    """An insertion near the start shifts every byte after it, yet most chunks are unchanged."""
    data = bytes(_big(7, 12 * MiB))
    before = chunks.compute(data)
    after = chunks.compute(data[: 1 * MiB] + b"inserted" + data[1 * MiB :])
    assert before.size == len(data) and after.size == len(data) + 8
    shared = {sha for _, _, sha in before.chunks} & {sha for _, _, sha in after.chunks}
    assert len(shared) >= len(before.chunks) - 2
    for offset, length, sha in before.chunks:
        assert hashlib.sha256(data[offset : offset + length]).hexdigest() == sha


def test_chunk_map_round_trip_and_refusals() -> None:
    data = bytes(_big(8, 6 * MiB))
    cmap = chunks.compute(data)
    blob = chunks.encode(cmap)
    assert chunks.encode(cmap) == blob  # deterministic bytes: concurrent pushers write the same
    assert chunks.decode(blob, size=len(data)) == cmap
    with pytest.raises(FormatError, match="covers"):
        chunks.decode(blob, size=len(data) + 1)
    with pytest.raises(FormatError, match="not a chunk map"):
        chunks.decode(b"garbage")
    text = gzip.decompress(blob).decode()
    with pytest.raises(FormatError, match="v2"):
        chunks.decode(gzip.compress(text.replace("\t1\t", "\t2\t", 1).encode()))
    with pytest.raises(FormatError, match="malformed"):
        chunks.decode(gzip.compress((text + "12\tnot-a-hash\n").encode()))


def test_plan_segments_merges_runs() -> None:
    a, b, c, d = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)
    base = chunks.ChunkMap(((0, 10, a), (10, 10, b), (20, 10, c)))
    target = chunks.ChunkMap(((0, 10, a), (10, 10, b), (20, 5, d), (25, 10, c)))
    segs = chunks.plan_segments(target, base)
    assert segs == [chunks.Segment(0, 20, 0), chunks.Segment(20, 5, None), chunks.Segment(25, 10, 20)]
    assert chunks.copied_bytes(segs) == 30
    assert chunks.plan_segments(target, chunks.ChunkMap(())) == [chunks.Segment(0, 35, None)]
