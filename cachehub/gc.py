"""Garbage collection at a site: remove content no cached commit (or build in progress) uses.

Eviction removes trees; the content objects they linked stay in ``objects/`` until a gc finds
that nothing references them any more. A build in progress at the site (any host) is safe: its
lock names its manifest, whose copy is at the site before the lock is taken.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .manifest import read_manifest
from .store import SiteStore

GC_MIN_AGE = 3600.0  # objects younger than this may belong to a tree being built


def gc(
    store: SiteStore,
    *,
    now: float | None = None,
    dry_run: bool = False,
    keep: set[bytes] | None = None,
    own_lock: Path | None = None,
    doomed: set[bytes] | None = None,
) -> tuple[int, int]:
    """Remove content objects (and manifests) no cached commit references; return (count, bytes).

    ``keep`` is content a build in progress needs (admission passes the new commit's). The
    content of every build in progress at the site is kept too: each build lock names the
    build's manifest, whose copy is at the site before the lock is taken, and the locks are
    looked at again before each removal. Objects younger than GC_MIN_AGE are also kept while
    *another* build lock is held (a builder of an older version names no manifest).
    ``doomed`` content (a purged commit's) goes whatever its age, unless a cached commit
    still references it. Use markers of commits that are no longer cached are removed too.
    """
    now = time.time() if now is None else now
    referenced: set[bytes] = set(keep or ())
    manifests: set[str] = set()

    def index() -> set[str]:
        names = set()
        for c in store.cached():
            names.add(c.commit)
            manifests.add(c.manifest)
            for entry in read_manifest(store.manifest_path(c.manifest), validate=False):
                referenced.add(bytes.fromhex(entry.sha256))
        return names

    published = index()
    seen_builds: set[str] = set()

    def index_builds() -> set[str]:
        """Keep the content of every build in progress here (its lock names its manifest).

        Returns the lock names looked at (stale ones too), listed before the locks were read.
        """
        names = store.lock_names()
        building = store.building()
        for manifest_id in set(building.values()) - seen_builds - {""}:
            seen_builds.add(manifest_id)
            try:
                for entry in read_manifest(store.manifest_path(manifest_id), validate=False):
                    referenced.add(bytes.fromhex(entry.sha256))
            except FileNotFoundError:  # a builder of an older version: the age rule below covers it
                continue
            manifests.add(manifest_id)
        return names

    builds = index_builds()
    started = time.time()

    def other_builder() -> bool:
        return bool(store.lock_names() - {own_lock.name if own_lock is not None else None})

    count = total = 0
    for name, path in store.object_files():
        try:
            key = bytes.fromhex(name)
        except ValueError:
            continue
        if key in referenced:
            continue
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if not (doomed and key in doomed):
            if st.st_mtime >= started:
                continue  # arrived while this gc ran: surely some build's
            if now - st.st_mtime < GC_MIN_AGE:
                if other_builder():
                    continue
                if store.published() != published:  # a build published meanwhile: look again
                    published = index()
                    if key in referenced:
                        continue
        if store.lock_names() - builds:  # a build started meanwhile: keep what it needs
            builds = index_builds()
            if key in referenced:
                continue
        if not dry_run:
            os.unlink(path)
        count += 1
        total += st.st_size
    if not dry_run:
        for manifest_id, path in store.manifest_files():
            if manifest_id not in manifests:
                path.unlink(missing_ok=True)
        for marker in store.used_markers():
            if not store.is_cached(marker.name) and now - _mtime(marker, now) > store.site.grace:
                marker.unlink(missing_ok=True)
    return count, total


def _mtime(path: Path, default: float) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return default
