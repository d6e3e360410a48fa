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
    referenced: set[bytes] = set(keep or ())
    manifests: set[str] = set()
    damaged: list[str] = []

    def add(manifest_id: str) -> None:
        manifests.add(manifest_id)
        for entry in store.manifest_entries(manifest_id, source):
            referenced.add(bytes.fromhex(entry.sha256))

    def index() -> set[str]:
        names = set()
        for c in store.cached():
            names.add(c.commit)
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
