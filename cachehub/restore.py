"""Restore: a writable working copy of a commit, and purge: erasing a commit everywhere.

Restore copies (never links: the copy must be writable and the store read-only) from a site
where the commit is cached, or fetches from the lake, verifying every byte. It never touches
history: later commits stay as they are, unlike an in-place storage snapshot restore. The
restored files are entered in the hash cache, so a later ``snapshot`` of the directory
re-hashes only what the user changed.

Purge (right to erasure) removes a commit's *unshared* content from the lake and from every
configured site, deletes its commit document and tags, and leaves a tombstone
``datasets/<name>/tombstones/<commit-id>.json`` so the id can never silently resolve again.
Sites configured on other hosts evict it when their daemon next reads the lake.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConflictError, IntegrityError
from .fsutil import HOST
from .lake import canonical_json, commit_key, manifest_key, now_iso, object_key, tag_key
from .manifest import read_manifest
from .model import Commit
from .scan import FoundFile
from .store import SiteStore, remove_tree
from .transfer import run

if TYPE_CHECKING:
    from .api import Hub


@dataclass(frozen=True)
class RestoreResult:
    dataset: str
    commit: str
    path: str
    files: int
    bytes: int
    from_site: str | None  # the site it was copied from, or None (fetched from the lake)


def restore(hub: Hub, commit: Commit, directory: Path, *, jobs: int) -> RestoreResult:
    """Write a writable copy of ``commit`` into ``directory`` (which must be empty or absent)."""
    directory = directory.absolute()
    if directory.exists() and any(directory.iterdir()):
        raise ConflictError(f"{directory} is not empty; restore into a new or empty directory (cachehub never overwrites)")
    entries = list(read_manifest(hub.manifest_path(commit.manifest)))  # validated: no path escapes
    source = next((SiteStore(s) for s in hub.settings.sites.values() if SiteStore(s).is_cached(commit.id)), None)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        if source is not None:
            top = source.commit_path(commit.id)
            for e in entries:
                dest = directory / e.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(top / e.path, dest)
        else:
            backend = hub.lake.backend

            async def one(e: object) -> None:
                data = await backend.aget(object_key(e.sha256))  # type: ignore[attr-defined]
                if hashlib.sha256(data).hexdigest() != e.sha256:  # type: ignore[attr-defined]
                    raise IntegrityError(f"object {e.sha256} in the lake is damaged; nothing usable was restored")  # type: ignore[attr-defined]
                dest = directory / e.path  # type: ignore[attr-defined]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)

            run(entries, one, jobs=jobs)
    except BaseException:
        remove_tree(directory)
        raise
    _remember_hashes(hub, directory, entries)
    return RestoreResult(commit.dataset, commit.id, str(directory), commit.files, commit.bytes, source.site.name if source else None)


def _remember_hashes(hub: Hub, directory: Path, entries: list) -> None:
    from .hashcache import HashCache

    cache = HashCache(hub.catalog)
    for e in entries:
        path = directory / e.path
        st = os.stat(path)
        cache.remember(FoundFile(e.path, str(path), st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns), e.sha256, True)
    cache.save()


@dataclass(frozen=True)
class PurgeResult:
    dataset: str
    commit: str
    removed_objects: int
    removed_bytes: int
    kept_shared: int  # objects also used by other commits, kept
    tags_removed: tuple[str, ...]
    sites_evicted: tuple[str, ...]


def tombstone_key(dataset: str, commit_id: str) -> str:
    return f"datasets/{dataset}/tombstones/{commit_id}.json"


def purge(hub: Hub, commit: Commit, *, reason: str) -> PurgeResult:
    """Erase a commit's unshared content from the lake and every configured site."""
    from . import lease
    from .evict import gc

    stores = [SiteStore(s) for s in hub.settings.sites.values()]
    for store in stores:
        held = lease.live_leases(store, commit.id) if store.root.exists() else []
        if held:
            who = ", ".join(f"{x.user}@{x.host} pid {x.pid}" for x in held)
            raise ConflictError(f"{commit.dataset}@{commit.short} is leased at site {store.site.name} by {who}; purge when they finish")
    lake = hub.lake
    # content used by any other commit of any dataset stays
    shared: set[str] = set()
    for name in lake.datasets():
        for cid in lake.commit_ids(name):
            if cid == commit.id:
                continue
            other = lake.read_commit(name, cid)
            if other.manifest == commit.manifest:
                shared.add("*")  # the same tree lives on in another commit: no content goes
                continue
            shared.update(e.sha256 for e in read_manifest(hub.manifest_path(other.manifest), validate=False))
    mine = {e.sha256: e.size for e in read_manifest(hub.manifest_path(commit.manifest), validate=False)}
    doomed = {} if "*" in shared else {sha: size for sha, size in mine.items() if sha not in shared}
    body = {
        "format": "cachehub-tombstone",
        "format_version": 1,
        "dataset": commit.dataset,
        "commit": commit.id,
        "reason": reason,
        "purged_by": hub.user,
        "host": HOST,
        "purged": now_iso(),
    }
    lake.backend.write(tombstone_key(commit.dataset, commit.id), canonical_json(body))  # first: the id is dead from now on
    tags_removed = tuple(t.name for t in lake.tags(commit.dataset) if t.commit == commit.id)
    for tag in tags_removed:
        lake.backend.delete(tag_key(commit.dataset, tag))
    for sha in doomed:
        lake.backend.delete(object_key(sha))
    if "*" not in shared:
        lake.backend.delete(manifest_key(commit.manifest))
    lake.backend.delete(commit_key(commit.dataset, commit.id))
    evicted = []
    for store in stores:
        if not store.root.exists():
            continue
        doomed_here = evict_purged(store, commit.id)
        if doomed_here is not None:
            evicted.append(store.site.name)
        gc(store, doomed=doomed_here)
    with hub.catalog.transaction():
        hub.catalog.conn.execute("DELETE FROM commits WHERE id = ?", (commit.id,))
        hub.catalog.conn.execute("DELETE FROM tags WHERE commit_id = ?", (commit.id,))
        hub.catalog.conn.execute("DELETE FROM cache_entries WHERE commit_id = ?", (commit.id,))
        hub.catalog.conn.execute(
            "INSERT OR REPLACE INTO tombstones VALUES (?,?,?,?,?)", (commit.id, commit.dataset, reason, hub.user, body["purged"])
        )
    manifest_copy = hub.settings.manifest_cache / commit.manifest[:2] / f"{commit.manifest}.tsv.gz"
    if "*" not in shared:
        manifest_copy.unlink(missing_ok=True)
    return PurgeResult(
        commit.dataset, commit.id, len(doomed), sum(doomed.values()), len(mine) - len(doomed), tags_removed, tuple(evicted)
    )


def evict_purged(store: SiteStore, commit_id: str) -> set[bytes] | None:
    """Remove a purged commit's tree and traces from a site, pins notwithstanding.

    Returns the content the commit referenced (for ``gc(doomed=...)``), or None if it was not
    cached here.
    """
    from . import lease

    if not store.is_cached(commit_id):
        return None
    doomed: set[bytes] = set()
    try:
        manifest_id = json.loads(store.meta_path(commit_id).read_bytes())["manifest"]
        doomed = {bytes.fromhex(e.sha256) for e in read_manifest(store.manifest_path(manifest_id), validate=False)}
    except (FileNotFoundError, ValueError, KeyError):
        pass
    trash = store.unpublish(commit_id)
    lease.unpin(store, commit_id)
    store.meta_path(commit_id).unlink(missing_ok=True)
    store.used_path(commit_id).unlink(missing_ok=True)
    if trash is not None:
        remove_tree(trash)
    return doomed


def read_tombstones(hub: Hub, dataset: str) -> list[dict]:
    out = []
    for key in hub.lake.backend.list(f"datasets/{dataset}/tombstones/"):
        if key.endswith(".json"):
            data, _ = hub.lake.backend.read(key)
            out.append(json.loads(data))
    return out
