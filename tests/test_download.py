"""The download engine alone: any set of objects into a site's object store, each verified.

Caching a commit, a shard of one or a subset is the same engine with a different set; here the
set is part of a commit's objects, chosen by the test, on a local lake and on S3 (SeaweedFS).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from cachehub import download
from cachehub.api import Hub
from cachehub.download import ObjectSet
from cachehub.errors import IntegrityError
from cachehub.lake import object_key
from cachehub.model import Site
from cachehub.store import SiteStore

from .conftest import write_tree


def _objects(hub: Hub, ref: str) -> list[tuple[str, int]]:
    return sorted({(e.sha256, e.size) for e in hub.manifest(hub.resolve_commit(ref))})


@pytest.fixture
def pushed(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """A commit of small files and three "large" ones (ranged GETs: thresholds made small)."""
    monkeypatch.setattr(download, "LARGE_OBJECT", 64 * 1024)
    monkeypatch.setattr(download, "RANGE_SIZE", 16 * 1024)
    rng = random.Random(11)
    files = {f"small/{i:02d}": rng.randbytes(rng.randint(1, 4000)) for i in range(16)}
    files |= {f"large/{i}": rng.randbytes(64 * 1024 + 1 + i * 30_000) for i in range(3)}
    files["small/empty"] = b""
    hub.push(write_tree(tmp_path / "src", files), "ds")
    return _objects(hub, "ds")


def _store(tmp_path: Path, name: str = "partial") -> SiteStore:
    store = SiteStore(Site(name, str(tmp_path / name)))
    store.ensure()
    return store


def _held(store: SiteStore) -> dict[str, bytes]:
    return {name: Path(path).read_bytes() for name, path in store.object_files()}


def test_a_partial_set_fetches_exactly_those_objects(hub: Hub, tmp_path: Path, pushed: list[tuple[str, int]]) -> None:
    chosen = pushed[::2]  # some small, some large, maybe the empty one
    store = _store(tmp_path)
    got = download.download(hub.lake, store, ObjectSet.from_pairs(chosen, what="half of ds"), jobs=4)
    assert (got.objects, got.bytes, got.chunk_copied_bytes) == (len(chosen), sum(s for _, s in chosen), 0)
    held = _held(store)
    assert sorted(held) == sorted(sha for sha, _ in chosen)
    assert all(hashlib.sha256(data).hexdigest() == sha for sha, data in held.items())
    assert not list((store.root / "tmp").iterdir())
    # the rest, listed in a file as cache.py does; then a cache of the commit fetches nothing
    rest = [p for p in pushed if p not in chosen]
    listing = tmp_path / "rest.tsv"
    listing.write_text("".join(f"{sha}\t{size}\n" for sha, size in rest))
    got = download.download(hub.lake, store, ObjectSet.from_file(listing, count=len(rest), nbytes=sum(s for _, s in rest)))
    assert got.objects == len(rest) and sorted(_held(store)) == sorted(sha for sha, _ in pushed)
    hub.site_add("partial", store.root)
    result = hub.cache("ds", site="partial")
    assert result.fetched_files == 0 and result.reused_files == result.files


def test_a_subset_filter_and_duplicates(hub: Hub, tmp_path: Path, pushed: list[tuple[str, int]]) -> None:
    whole = ObjectSet.from_pairs(pushed + pushed[:3])  # duplicates are dropped
    assert whole.count == len(pushed)
    keep = {sha for sha, _ in pushed[:5]}
    store = _store(tmp_path)
    got = download.download(hub.lake, store, whole.only(keep.__contains__))
    assert got.objects == 5 and set(_held(store)) == keep


def test_a_damaged_object_is_never_stored(hub: Hub, tmp_path: Path, pushed: list[tuple[str, int]]) -> None:
    small = next((sha, size) for sha, size in pushed if 10 < size < 4000)
    large = next((sha, size) for sha, size in pushed if size > 64 * 1024)
    for sha, size in (small, large):
        data = bytearray(random.Random(1).randbytes(size))
        hub.lake.backend.write(object_key(sha), bytes(data))  # same size, other bytes
        store = _store(tmp_path, f"s{size}")
        with pytest.raises(IntegrityError, match=sha):
            download.download(hub.lake, store, ObjectSet.from_pairs([(sha, size)]))
        assert _held(store) == {} and not list((store.root / "tmp").iterdir())


def test_a_missing_object_names_the_set(hub: Hub, tmp_path: Path, pushed: list[tuple[str, int]]) -> None:
    sha, size = pushed[1]
    hub.lake.delete_object(sha)
    with pytest.raises(IntegrityError, match="of chest-xray@v9 is missing from the lake"):
        download.download(hub.lake, _store(tmp_path), ObjectSet.from_pairs([(sha, size)], what="chest-xray@v9"))
