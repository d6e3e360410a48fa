"""The site store alone: the layout of a site root, as every host sharing it sees it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cachehub.errors import FormatError
from cachehub.model import Commit, Site
from cachehub.store import MARKER, SiteStore, fs_space


@pytest.fixture
def store(tmp_path: Path) -> SiteStore:
    s = SiteStore(Site("gpu-a", str(tmp_path / "root")))
    s.ensure()
    return s


def test_ensure_lays_out_the_documented_tree(store: SiteStore) -> None:
    root = store.root
    for sub in ("objects/sha256/00", "objects/sha256/ff", "commits", "meta", "manifests", "used", "staging", "tmp", "locks", "trash"):
        assert (root / sub).is_dir(), sub
    marker = json.loads((root / MARKER).read_bytes())
    assert (marker["format"], marker["format_version"], marker["name"]) == ("cachehub-site", 1, "gpu-a")
    assert store.exists()
    store.ensure()  # idempotent


def test_every_path_is_under_the_root_where_the_docs_say(store: SiteStore) -> None:
    sha, cid = "ab" + "1" * 62, "c" * 64
    root = store.root
    assert store.object_path(sha) == root / "objects/sha256/ab" / sha and store.object_file(sha) == str(store.object_path(sha))
    assert store.commit_path(cid) == root / "commits" / cid and store.commits_dir == root / "commits"
    assert store.meta_path(cid) == root / "meta" / f"{cid}.json"
    assert store.manifest_path(sha) == root / "manifests/ab" / f"{sha}.tsv.gz"
    assert store.used_path(cid) == root / "used" / cid
    assert store.lease_dir(cid) == root / "leases" / cid and store.leases_dir == root / "leases"
    assert store.pin_path(cid) == root / "pins" / f"{cid}.json"
    assert store.queue_dir == root / "queue" and store.daemon_path == root / "daemon.json"
    assert store.evicting_path(cid) == root / "evicting" / cid and store.locks_dir == root / "locks"
    a, b = store.trash_path(cid), store.trash_path(cid)
    assert a != b and a.parent == b.parent == root / "trash" and a.name.startswith(cid)
    assert store.temp_file(sha).startswith(f"{root}/tmp/{sha}.")


def test_a_root_without_its_marker_is_not_a_site(tmp_path: Path) -> None:
    empty = SiteStore(Site("nfs", str(tmp_path / "unmounted")))
    assert not empty.exists() and empty.published() == set() and empty.lock_names() == set()
    assert list(empty.cached()) == [] and list(empty.used_markers()) == []


def test_a_root_of_another_format_version_is_refused(store: SiteStore) -> None:
    (store.root / MARKER).write_text(json.dumps({"format": "cachehub-site", "format_version": 99}))
    with pytest.raises(FormatError, match="upgrade cachehub"):
        store.ensure()


def test_state_listings_read_the_root(store: SiteStore) -> None:
    sha = "ab" + "2" * 62
    store.store_object(sha, b"bytes")
    assert [name for name, _ in store.object_files()] == [sha] and store.object_bytes() == (1, 5)
    commit = Commit("d" * 64, "ds", "e" * 64, 1, 5, (), "ann", "h", "m", "2026-01-01T00:00:00Z")
    staging = store.new_staging(commit.id)
    store.write_meta(commit)
    assert store.publish(staging, commit.id) and store.published() == {commit.id}
    [cached] = list(store.cached())
    assert (cached.commit, cached.dataset, cached.manifest, cached.last_used) == (commit.id, "ds", "e" * 64, None)
    store.touch(commit.id)
    assert [p.name for p in store.used_markers()] == [commit.id] and store.last_used(commit.id) is not None
    manifest = store.manifest_path("e" * 64)
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes(b"")
    assert [m for m, _ in store.manifest_files()] == ["e" * 64]
    lock = store.lock(commit.id, commit.manifest)
    assert lock is not None and store.lock_names() == {f"{commit.id}.lock"} and store.building() == {lock.path: commit.manifest}
    assert store.lock(commit.id) is None  # a live holder has it
    lock.release()
    trash = store.unpublish(commit.id)
    assert trash is not None and trash.parent == store.root / "trash" and store.published() == set()
    assert fs_space(store.root)["fs_free"] > 0  # type: ignore[operator]


def test_the_usage_ledger_follows_every_change_without_a_walk(tmp_path: Path) -> None:
    """status reads usage from the ledger; after caches, evictions, gc and a partial cache it
    equals what a walk of objects/ counts."""
    from cachehub.api import Hub
    from cachehub.config import load_settings

    from .conftest import random_tree

    with Hub(load_settings(tmp_path / "home", lake=str(tmp_path / "lake"))) as hub:
        hub.site_set("local", grace="0")
        store = hub.ctx.store()

        def agree() -> None:
            [status] = hub.status("local")
            assert (status.objects, status.object_bytes) == store.object_bytes() == store.usage()

        hub.push(random_tree(tmp_path / "a", 20, seed=1), "a")
        hub.push(random_tree(tmp_path / "b", 20, seed=2), "b")
        hub.cache("a")
        agree()
        hub.cache("b")
        agree()
        hub.evict(["a"])  # a targeted eviction: its objects go, counted as a negative delta
        agree()
        assert store.usage_deltas()
        hub.gc()  # a full walk: the ledger gets a new base, the deltas it includes go
        agree()
        assert store.usage_deltas() == []
        hub.cache("a")
        hub.evict()  # a policy sweep
        agree()


@pytest.mark.parametrize(
    ("err", "kind", "advice"),
    [
        (116, "SiteIOError", "remount"),  # ESTALE: a stale NFS file handle
        (5, "SiteIOError", "check the mount"),  # EIO
        (13, "SitePermissionError", "--group"),  # EACCES on a site without a group
        (28, "NoSpaceError", "free space"),  # ENOSPC
        (18, "SiteIOError", "--link auto"),  # EXDEV: a hard link refused
    ],
)
def test_filesystem_errors_at_a_site_name_the_fix(store: SiteStore, err: int, kind: str, advice: str) -> None:
    """The one mocked fault family here: errors a real mount gives (stale handles...) are made
    as OSError values and passed through the translation every site operation uses."""
    import os as _os

    from cachehub.store import site_errors

    with pytest.raises(Exception) as raised:
        with site_errors(store, "cache ds"):
            raise OSError(err, _os.strerror(err), str(store.root / "used" / "x"))
    assert type(raised.value).__name__ == kind and advice in str(raised.value)
    assert "site gpu-a" in str(raised.value) and "cache ds" in str(raised.value)


def test_a_vanished_root_is_reported_as_missing_not_as_a_raw_error(store: SiteStore) -> None:
    import shutil as _shutil

    from cachehub.errors import SiteMissingError
    from cachehub.store import site_errors

    _shutil.rmtree(store.root)
    with pytest.raises(SiteMissingError, match="not mounted"):
        with site_errors(store, "record a use"):
            store.touch("c" * 64)
    assert not store.root.exists()  # and nothing recreated it


def test_the_ledger_ignores_leftovers_of_interrupted_writes(store: SiteStore) -> None:
    store.set_usage_base(1, 100, superseded=())
    store.add_usage(2, 50)
    (store.usage_dir / ".delta.x.json.host.1.abc.tmp").write_text('{"objects": 9, "bytes": 900}')  # a crash mid-write
    assert store.usage() == (3, 150)


def test_a_malformed_queue_request_or_partial_record_is_skipped(store: SiteStore) -> None:
    from cachehub import cache_queue

    store.make_dirs(store.queue_dir)
    (store.queue_dir / "bad.json").write_text('{"no": "commit"}')
    good = cache_queue.enqueue(store, dataset="ds", commit="c" * 64, ref="v1")
    assert [r.path for r in cache_queue.pending(store)["c" * 64]] == [good]
    store.make_dirs(store.partial_path("x").parent)
    store.partial_path("x").write_text("not json")
    assert store.partials() == []
