"""Garbage collection at a site: remove content that no cached commit, build or partial cache uses.

Eviction removes trees; the content objects they linked stay in ``objects/`` until a gc finds
that nothing references them any more. What a gc keeps, whoever runs it on whichever host:

* the content of every published commit (its manifest copy at the site says which);
* the content of every build in progress (its lock names its manifest, whose copy is at the site
  before the lock is taken), looked at again before each removal;
* the content of every **partial cache** -- a cache that fetched objects and stopped (Ctrl-C, a
  crash, a full disk) -- for the site's ``keep_partial`` period after it last ran, so that a
  re-run resumes from what arrived (``store.partials()``; expired ones are removed by
  ``expire_partials``, which the callers audit);
* manifest copies younger than ``GC_MIN_AGE`` (a build on another host may have just written
  one), and the ones any of the above names;
* objects that arrived while the gc ran, and young objects while another build lock is held.

A manifest copy of a published commit that is missing (lost by an older version, or a crash)
is fetched again through ``source`` (a verified copy from the lake); if it cannot be, the gc
removes no object at all and reports the damage: it cannot know what that commit uses.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from . import pause
from .errors import SiteDamagedError
from .store import ManifestSource, PartialBuild, SiteStore

log = logging.getLogger("cachehub.gc")
GC_MIN_AGE = 3600.0  # objects and manifest copies younger than this may belong to a build


def gc(
    store: SiteStore,
    *,
    now: float | None = None,
    dry_run: bool = False,
    keep: set[bytes] | None = None,
    own_lock: Path | None = None,
    doomed: set[bytes] | None = None,
    source: ManifestSource | None = None,
) -> tuple[int, int]:
    """Remove content objects (and manifest copies) nothing at the site needs; return (count, bytes).

    ``keep`` is content a build in progress needs (admission passes the new commit's).
    ``doomed`` content (a purged commit's) goes whatever its age, unless a cached commit
    still references it. Use markers of commits that are no longer cached are removed too.
    """
    now = time.time() if now is None else now
    referenced: dict[bytes, int] = dict.fromkeys(keep or (), -1)  # content -> size (-1: unknown)
    manifests: set[str] = set()
    damaged: list[str] = []

    def add(manifest_id: str) -> None:
        manifests.add(manifest_id)
        for entry in store.manifest_entries(manifest_id, source):
            referenced[bytes.fromhex(entry.sha256)] = entry.size

    def index() -> set[str]:
        names = store.published()  # the same kind of set the removals compare with
        for c in store.cached():
            try:
                add(c.manifest)
            except SiteDamagedError as exc:
                damaged.append(str(exc))
        return names

    published = index()
    for partial in live_partials(store, now):
        try:
            add(partial.manifest)
        except SiteDamagedError as exc:  # its objects are young: the age rule below covers them
            log.warning("partial cache of %s at %s: %s", partial.commit[:12], store.name, exc)
    seen_builds: set[str] = set()

    def index_builds() -> set[str]:
        """Keep the content of every build in progress here (its lock names its manifest).

        Returns the lock names looked at (stale ones too), listed before the locks were read.
        """
        names = store.lock_names()
        for manifest_id in set(store.building().values()) - seen_builds - {""}:
            seen_builds.add(manifest_id)
            try:
                add(manifest_id)
            except SiteDamagedError:  # a builder of an older version: the age rule below covers it
                continue
        return names

    builds = index_builds()
    started = time.time()
    pause.point("gc.after-index")
    if damaged:
        # what a published commit uses is unknown: removing anything could break it
        log.warning("gc at %s removed nothing: %s", store.name, "; ".join(damaged))
        return 0, 0

    def other_builder() -> bool:
        return bool(store.lock_names() - {own_lock.name if own_lock is not None else None})

    deltas = store.usage_deltas()  # what the ledger says beyond its base; this walk supersedes them
    count = total = 0
    left = [0, 0]  # objects and bytes this walk leaves: the ledger's new base

    def keeps(size: int) -> None:
        left[0] += 1
        left[1] += size

    for name, path in store.object_files():
        try:
            key = bytes.fromhex(name)
        except ValueError:
            continue
        size = referenced.get(key)
        if size is not None and size >= 0:
            keeps(size)
            continue
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if size is not None:  # referenced, size unknown (``keep``)
            keeps(st.st_size)
            continue
        if not (doomed and key in doomed):
            if st.st_mtime >= started:
                keeps(st.st_size)
                continue  # arrived while this gc ran: surely some build's
            if now - st.st_mtime < GC_MIN_AGE and other_builder():
                keeps(st.st_size)
                continue
            if store.published() != published:  # a build published meanwhile (it may reuse old content): look again
                published = index()
                if key in referenced:
                    keeps(st.st_size)
                    continue
        if store.lock_names() - builds:  # a build started meanwhile: keep what it needs
            builds = index_builds()
            if key in referenced:
                keeps(st.st_size)
                continue
        if not dry_run:
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue  # another gc (another host) removed it first
        count += 1
        total += st.st_size
    if not dry_run:
        store.set_usage_base(left[0], left[1], superseded=deltas)
    if not dry_run:
        pause.point("gc.before-manifest-delete")
        in_use = manifests | set(store.building().values()) | {c.manifest for c in store.cached()}
        for manifest_id, path in store.manifest_files():
            if manifest_id in in_use:
                continue
            try:
                if time.time() - path.stat().st_mtime < GC_MIN_AGE:
                    continue  # a build elsewhere may have just written (or refreshed) it
            except FileNotFoundError:
                continue
            path.unlink(missing_ok=True)
        for marker in store.used_markers():
            if not store.is_cached(marker.name) and now - _mtime(marker, now) > store.site.grace:
                marker.unlink(missing_ok=True)
        expire_range_parts(store, now)
    return count, total


def expire_range_parts(store: SiteStore, now: float) -> int:
    """Remove pieces of large objects (sharded caching) nobody will finish; return how many objects.

    A piece file goes once its object is in ``objects/`` (its publisher died before removing
    it), or when no piece of it was written for the site's ``keep_partial`` and no shard is
    running at the site -- the same rule as a partial cache's objects. Records of finished
    shards go once their commit is published, or by the same rule.
    """
    removed = 0
    shards_running = any(".shard-" in name for name in store.lock_names()) and bool(store.building())
    for sha, _directory in store.range_part_dirs():
        parts = store.range_parts(sha, 0)
        if os.path.exists(store.object_file(sha)) or (not shards_running and now - parts.newest() > store.site.keep_partial):
            parts.remove()
            removed += 1
    for commit_id, directory in store.shard_records():  # which shards finished: moot once published or expired
        if store.is_cached(commit_id) or (not shards_running and now - _mtime(directory, now) > store.site.keep_partial):
            store.forget_shards(commit_id)
    return removed


def collect_unlinked(
    store: SiteStore,
    candidates: set[bytes],
    *,
    keep: set[bytes] | None = None,
    doomed: set[bytes] | None = None,
    source: ManifestSource | None = None,
) -> tuple[int, int]:
    """Remove those ``candidates`` (an evicted commit's content) that no tree links any more.

    For a site whose trees are hard links: an object whose link count is 1 is in no published
    tree. It is kept if a build in progress or a live partial cache needs it (their manifests
    are read: they are few), if it is in ``keep``, or if it is young while another build runs
    (a builder of an older version names no manifest). Costs what the evicted commits hold, not
    what the site holds; a full ``gc`` walk is for ``cachehub gc`` and the daemon's sweep.
    """
    now = time.time()
    protected: set[bytes] = set(keep or ())
    for manifest_id in {*store.building().values(), *(p.manifest for p in live_partials(store, now))} - {""}:
        try:
            protected.update(bytes.fromhex(e.sha256) for e in store.manifest_entries(manifest_id, source))
        except SiteDamagedError:
            return 0, 0  # a build whose needs are unknown: remove nothing now (the next gc will)
    builder = bool(store.lock_names())
    count = total = 0
    for key in candidates - protected:
        path = store.object_file(key.hex())
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if st.st_nlink > 1:
            continue  # another published tree still links it
        if builder and now - st.st_mtime < GC_MIN_AGE and not (doomed and key in doomed):
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        count += 1
        total += st.st_size
    store.add_usage(-count, -total)
    return count, total


def live_partials(store: SiteStore, now: float) -> list[PartialBuild]:
    """The partial caches still within the site's ``keep_partial`` period (or still building)."""
    keep = store.site.keep_partial
    return [p for p in store.partials() if now - p.started <= keep or store.partial_builder_alive(p)]


def expire_partials(store: SiteStore, now: float) -> list[PartialBuild]:
    """Forget partial caches older than the site's ``keep_partial``; return them (callers audit).

    Their objects then go with the next gc like any unreferenced content.
    """
    keep = store.site.keep_partial
    expired = [p for p in store.partials() if now - p.started > keep and not store.partial_builder_alive(p)]
    for p in expired:
        store.end_partial(p.commit)
    return expired


def _mtime(path: Path, default: float) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return default
