"""Caching a commit at a site: plan from manifests, fetch only what is missing, publish once.

1. **plan** (pure reading): stream the manifest; every path is validated before anything is
   written; content already in the site's object store (from any commit of any dataset) is
   reused, the rest is listed -- no listing of the lake, no HEAD requests;
2. **fetch**: the transfer engine downloads the missing objects concurrently, checks each
   one's SHA-256 and size, and places it read-only in ``objects/`` (atomic link from a
   process-unique temp name), so whatever arrived survives a crash;
3. **build**: link every file into a private staging directory;
4. **publish**: one ``rename`` to ``commits/<id>``. A concurrent builder that loses the race
   discards its staging tree; both callers get the same, complete tree.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import IntegrityError, NoSpaceError, NotCachedError
from .fsutil import atomic_write, sha256_file
from .lake import now_iso, object_key
from .manifest import read_manifest
from .model import CacheEntry, CacheResult, Commit, ManifestEntry, VerifyResult
from .progress import NULL, Progress
from .store import Linker, SiteStore, make_tree_readonly, remove_tree
from .transfer import run

if TYPE_CHECKING:
    from .api import Hub

LOCK_POLL_SECONDS = 0.2


def cache(
    hub: Hub,
    ref: str,
    *,
    site: str | None = None,
    progress: Progress = NULL,
    jobs: int | None = None,
) -> CacheResult:
    """Materialise the commit ``ref`` names at ``site``; fetch only what the site lacks."""
    started = time.monotonic()
    commit = hub.resolve_commit(ref, refresh=not _is_full_id(ref))
    store = SiteStore(hub.settings.site(site))
    store.ensure()
    if store.is_cached(commit.id):
        store.touch(commit.id)
        return _result(commit, store, 0, 0, commit.files, commit.bytes, started, already=True)

    manifest = _site_manifest(hub, store, commit)
    lock = None
    while True:
        lock = store.lock(commit.id)
        if lock is not None or store.is_cached(commit.id):
            break
        time.sleep(LOCK_POLL_SECONDS)  # another process is building it; wait and reuse its work
    try:
        if store.is_cached(commit.id):
            store.touch(commit.id)
            return _result(commit, store, 0, 0, commit.files, commit.bytes, started, already=True)
        missing_list = store.root / "tmp" / f"plan.{commit.id}.{os.getpid()}.{time.monotonic_ns()}"
        try:
            fetched_files, fetched_bytes, reused_files, reused_bytes = _fill(
                hub, store, commit, manifest, missing_list, lock, progress, jobs or hub.settings.jobs
            )
        finally:
            missing_list.unlink(missing_ok=True)
        _build_and_publish(store, commit, manifest, progress)
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)
    store.touch(commit.id)
    result = _result(commit, store, fetched_files, fetched_bytes, reused_files, reused_bytes, started, already=False)
    with hub.catalog.transaction():
        hub.catalog.add_cache_entry(
            CacheEntry(store.site.name, commit.id, commit.dataset, result.path, commit.files, commit.bytes, _now(), None)
        )
        hub.catalog.audit(
            "cache",
            dataset=commit.dataset,
            commit=commit.id,
            ref=ref,
            site=store.site.name,
            fetched_files=fetched_files,
            fetched_bytes=fetched_bytes,
            reused_files=reused_files,
            reused_bytes=reused_bytes,
        )
    return result


def _fill(
    hub: Hub,
    store: SiteStore,
    commit: Commit,
    manifest: Path,
    missing_list: Path,
    lock: Path | None,
    progress: Progress,
    jobs: int,
) -> tuple[int, int, int, int]:
    """Plan, then download every missing object; return (fetched files, bytes, reused files, bytes)."""
    progress.start("plan", total_files=commit.files)
    missing: set[bytes] = set()
    files = nbytes = fetched_paths = fetched_path_bytes = 0
    missing_bytes = 0
    with open(missing_list, "w", encoding="ascii") as out:
        for entry in read_manifest(manifest):  # validates every path before anything is written
            files += 1
            nbytes += entry.size
            key = bytes.fromhex(entry.sha256)
            if key in missing:
                fetched_paths += 1
                fetched_path_bytes += entry.size
                continue
            if os.path.exists(store.object_path(entry.sha256)):
                continue
            missing.add(key)
            missing_bytes += entry.size
            fetched_paths += 1
            fetched_path_bytes += entry.size
            out.write(f"{entry.sha256}\t{entry.size}\n")
    progress.finish()
    backend = hub.lake.backend
    counts = [0, 0]
    heartbeat = [time.monotonic()]

    def items() -> Iterator[tuple[str, int]]:
        with open(missing_list, encoding="ascii") as fh:
            for line in fh:
                sha, size = line.split()
                yield sha, int(size)

    async def one(item: tuple[str, int]) -> None:
        sha, size = item
        if store.object_path(sha).exists():  # another process fetched it meanwhile
            progress.advance(1, size)
            return
        try:
            data = await backend.aget(object_key(sha))
        except FileNotFoundError:
            raise IntegrityError(
                f"object {sha} of {commit.dataset}@{commit.short} is missing from the lake; the lake is damaged "
                "(re-push the dataset from its source)",
                sha256=sha,
            ) from None
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            raise IntegrityError(
                f"object {sha} from the lake does not match its SHA-256 (got {len(data)} bytes); it was not stored. "
                "The lake copy is damaged: re-push the file, then re-run",
                sha256=sha,
            )
        if store.store_object(sha, data):
            counts[0] += 1
            counts[1] += size
        progress.advance(1, size)
        now = time.monotonic()
        if lock is not None and now - heartbeat[0] > 5:
            heartbeat[0] = now
            os.utime(lock)  # keeps waiting builders from treating the lock as stale

    progress.start("fetch", total_files=len(missing), total_bytes=missing_bytes)
    try:
        run(items(), one, jobs=jobs)
    finally:
        progress.finish()
    return counts[0], counts[1], files - fetched_paths, nbytes - fetched_path_bytes


def _build_and_publish(store: SiteStore, commit: Commit, manifest: Path, progress: Progress) -> None:
    staging = store.new_staging(commit.id)
    linker = Linker(store.site.link)
    made: set[str] = {""}
    progress.start("link", total_files=commit.files)
    try:
        for entry in read_manifest(manifest):
            parent, _, _ = entry.path.rpartition("/")
            if parent not in made:
                os.makedirs(staging / parent, exist_ok=True)
                made.add(parent)
            linker.place(store.object_path(entry.sha256), os.path.join(staging, entry.path))
            progress.advance(1, entry.size)
        make_tree_readonly(staging)
        store.write_meta(commit)
        store.publish(staging, commit.id)
    except OSError as exc:
        remove_tree(staging)
        if isinstance(exc, NoSpaceError) or exc.errno in (28, 122):  # ENOSPC, EDQUOT
            raise NoSpaceError(
                f"site {store.site.name} ({store.root}) ran out of space while building {commit.dataset}@{commit.short}; "
                "nothing was published. Free space (cachehub evict / gc) and re-run",
                site=store.site.name,
            ) from exc
        raise
    except BaseException:
        remove_tree(staging)
        raise
    finally:
        progress.finish()


def _site_manifest(hub: Hub, store: SiteStore, commit: Commit) -> Path:
    """The commit's manifest, kept at the site so nodes can verify without the lake."""
    path = store.manifest_path(commit.manifest)
    if not path.exists():
        src = hub.manifest_path(commit.manifest)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as fh:
            atomic_write(path, fh.read())
    return path


def _result(
    commit: Commit,
    store: SiteStore,
    fetched_files: int,
    fetched_bytes: int,
    reused_files: int,
    reused_bytes: int,
    started: float,
    *,
    already: bool,
) -> CacheResult:
    return CacheResult(
        dataset=commit.dataset,
        commit=commit.id,
        site=store.site.name,
        path=str(store.commit_path(commit.id)),
        fetched_files=fetched_files,
        fetched_bytes=fetched_bytes,
        reused_files=reused_files,
        reused_bytes=reused_bytes,
        files=commit.files,
        bytes=commit.bytes,
        seconds=time.monotonic() - started,
        already_cached=already,
    )


def _is_full_id(ref: str) -> bool:
    _, _, tail = ref.partition("@")
    return len(tail) == 64 and all(c in "0123456789abcdef" for c in tail)


def _now() -> str:
    return now_iso()


def verify(hub: Hub, ref: str, *, site: str | None = None, repair: bool = False, progress: Progress = NULL) -> VerifyResult:
    """Re-hash a cached tree against its manifest; with ``repair`` re-fetch what is wrong."""
    commit = hub.resolve_commit(ref)
    store = SiteStore(hub.settings.site(site))
    if not store.is_cached(commit.id):
        raise NotCachedError(
            f"{commit.dataset}@{commit.short} is not cached at site {store.site.name}; run: cachehub cache {ref}",
        )
    manifest = _site_manifest(hub, store, commit)
    top = store.commit_path(commit.id)
    damaged: list[str] = []
    missing: list[str] = []
    bad: list[ManifestEntry] = []
    progress.start("verify", total_files=commit.files, total_bytes=commit.bytes)
    for entry in read_manifest(manifest):
        path = top / entry.path
        try:
            ok = os.path.getsize(path) == entry.size and sha256_file(path) == entry.sha256
        except FileNotFoundError:
            missing.append(entry.path)
            bad.append(entry)
            progress.advance(1, entry.size)
            continue
        if not ok:
            damaged.append(entry.path)
            bad.append(entry)
        progress.advance(1, entry.size)
    progress.finish()
    repaired: list[str] = []
    if repair and bad:
        repaired = _repair(hub, store, commit, top, bad)
    hub.catalog.audit(
        "verify",
        dataset=commit.dataset,
        commit=commit.id,
        site=store.site.name,
        damaged=len(damaged),
        missing=len(missing),
        repaired=len(repaired),
    )
    return VerifyResult(commit.dataset, commit.id, store.site.name, commit.files, tuple(damaged), tuple(missing), tuple(repaired))


def _repair(hub: Hub, store: SiteStore, commit: Commit, top: Path, bad: list[ManifestEntry]) -> list[str]:
    """Fetch verified bytes for each bad file and rewrite it, fixing every tree sharing the inode."""
    import asyncio

    backend = hub.lake.backend
    repaired = []
    for entry in bad:
        data = asyncio.run(backend.aget(object_key(entry.sha256)))
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise IntegrityError(f"the lake's copy of {entry.path} ({entry.sha256}) is damaged too; re-push it")
        path = top / entry.path
        obj = store.object_path(entry.sha256)
        parent = path.parent
        os.chmod(parent, 0o755)
        try:
            if path.exists() and not path.is_symlink():
                # rewrite in place: every hardlink of this inode (other commits too) is fixed at once
                os.chmod(path, 0o644)
                with open(path, "wb") as fh:
                    fh.write(data)
                os.chmod(path, 0o444)
                if not obj.exists() or not os.path.samefile(obj, path):
                    obj.unlink(missing_ok=True)
                    store.store_object(entry.sha256, data)
            else:
                path.unlink(missing_ok=True)
                if not obj.exists() or os.path.getsize(obj) != entry.size:
                    obj.unlink(missing_ok=True)
                    store.store_object(entry.sha256, data)
                elif sha256_file(obj) != entry.sha256:
                    os.chmod(obj, 0o644)
                    with open(obj, "wb") as fh:
                        fh.write(data)
                    os.chmod(obj, 0o444)
                Linker(store.site.link).place(obj, str(path))
        finally:
            os.chmod(parent, 0o555)
        repaired.append(entry.path)
    hub.catalog.audit("repair", dataset=commit.dataset, commit=commit.id, site=store.site.name, files=len(repaired))
    return repaired
