"""Caching a commit at a site: link what the site holds, fetch only what is missing, publish once.

Under the commit's build lock (which names the commit's manifest, copied to the site first,
so that a gc at the site keeps this build's content), into a private staging directory:

1. **link and plan**: stream the manifest (validated when it entered the manifest cache);
   link every file whose content the site's object store already holds (from any commit of
   any dataset) -- the link itself is the existence check -- and list the files not linked
   and the distinct contents the site lacks. No listing of the lake, no HEAD requests;
2. **admit**: evict to make room under the site's quota and free-space floor, or refuse
   (``evict.plan`` then ``evict.apply``, the one eviction path);
3. **fetch**: the download engine (``download.py``) fetches the missing objects, verified,
   into ``objects/`` -- the set is the list of step 1, with chunk plans for large objects
   that have an older version at the site;
4. **link the rest** (the files listed in step 1), then **publish**: one ``rename`` to
   ``commits/<id>``. A concurrent builder that loses the race discards its staging tree; both
   callers get the same, complete tree.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import download, evict, index, pause
from .context import Context
from .errors import IntegrityError, NoSpaceError
from .fsutil import human_bytes
from .lake import now_iso
from .manifest import read_manifest
from .model import CacheEntry, CacheResult, Commit, ManifestEntry
from .progress import NULL, Progress
from .refs import LATEST, Ref
from .select import Selection
from .store import BuildLock, Linker, SiteStore, make_tree_readonly, remove_tree, site_errors

log = logging.getLogger("cachehub.cache")
LOCK_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Plan:
    """What caching one commit at one site needs, decided before anything is written there."""

    files: int
    bytes: int
    missing_objects: int  # distinct contents to download
    missing_bytes: int
    reused_files: int  # files whose content the site already holds
    reused_bytes: int
    # path -> (sha256, size) of each missing large object: where to look for an older version
    # to copy chunks from (large files are few, so this stays small)
    large: dict[str, tuple[str, int]] = field(default_factory=dict)


def cache(
    ctx: Context,
    ref: str | Ref,
    *,
    site: str | None = None,
    progress: Progress = NULL,
    jobs: int | None = None,
    given: str | None = None,
    selection: Selection = Selection(),
) -> CacheResult:
    """Materialise the commit ``ref`` names at ``site`` with the cache hooks around it.

    ``given`` is the ref as the user wrote it when ``ref`` is already resolved (a shard). With a
    ``selection`` only its files are cached, as a partial entry of their own (``select.py``).
    """
    parsed = Ref.of(ref)
    store = ctx.store(site)
    given = given or str(ref)
    ctx.events.hook("pre_cache", ref=given, site=store.name)
    result = build(ctx, parsed, store, progress=progress, jobs=jobs, given=given, selection=selection)
    ctx.events.hook(
        "post_cache", ref=given, site=store.name, commit=result.commit, path=result.path, fetched_bytes=result.fetched_bytes
    )
    if not result.already_cached:
        from . import audit

        audit.ship_quietly(ctx)
    return result


def build(
    ctx: Context,
    ref: Ref,
    store: SiteStore,
    *,
    progress: Progress = NULL,
    jobs: int | None = None,
    given: str | None = None,
    selection: Selection = Selection(),
) -> CacheResult:
    """Materialise the commit ``ref`` names (or its ``selection``) in ``store``; fetch only what the site lacks.

    ``given`` is the ref as the user wrote it, for the audit trail (default: ``ref``).
    """
    with site_errors(store, f"cache {given or ref}"):
        return _cache_at(ctx, ref, store, progress=progress, jobs=jobs, given=given, selection=selection)


def _cache_at(
    ctx: Context, ref: Ref, store: SiteStore, *, progress: Progress, jobs: int | None, given: str | None, selection: Selection
) -> CacheResult:
    started = time.monotonic()
    commit = index.resolve_commit(ctx, ref, refresh_first=not ref.is_full_id)
    entry = selection.entry_id(commit.id)  # the site entry: the commit, or a partial cache of it
    store.check()
    if store.is_cached(entry):
        store.touch(entry)
        _record_refs(ctx, store, ref, commit, selection)
        return _already(commit, store, entry, started)

    manifest = ctx.manifest(commit.manifest)  # verified and validated copy on this host's disk
    _wait_for_shards(store, commit, progress)
    missing_list = ctx.scratch(f"plan-{commit.id[:16]}")
    try:
        # the site's copy of the manifest first, and a lock that names it: a gc at the site
        # (any host) then keeps this build's content, linked or not yet (gc.py); the copy is
        # refreshed once the lock is held, so a gc that read the locks just before keeps it too
        store.keep_manifest(commit.manifest, manifest)
        lock = _wait_for_lock(store, commit, entry)
        try:
            pause.point("cache.after-lock")
            store.keep_manifest(commit.manifest, manifest)
            if lock is not None:
                store.sweep_leftovers()
            if store.is_cached(entry):  # another process published it while we waited
                store.touch(entry)
                _record_refs(ctx, store, ref, commit, selection)
                return _already(commit, store, entry, started)
            the_plan, evicted, got = _build(ctx, store, commit, manifest, missing_list, progress, jobs or ctx.settings.jobs, lock, selection)
        finally:
            if lock is not None:
                lock.release()
    finally:
        missing_list.unlink(missing_ok=True)
    store.touch(entry)
    _record_refs(ctx, store, ref, commit, selection)
    result = _result(
        commit, store, entry, got.objects, got.bytes, the_plan.reused_files, the_plan.reused_bytes, the_plan.files, the_plan.bytes, started, already=False
    )
    result = replace(result, evicted=evicted, chunk_copied_bytes=got.chunk_copied_bytes)
    extra = {"selection": selection.to_json(), "entry": entry} if selection else {}
    with ctx.catalog.transaction():
        ctx.catalog.add_cache_entry(CacheEntry(store.name, entry, commit.dataset, result.path, the_plan.files, the_plan.bytes, now_iso(), None))
        ctx.events.audit(
            "cache",
            dataset=commit.dataset,
            commit=commit.id,
            ref=given or str(ref),
            site=store.name,
            fetched_files=got.objects,
            fetched_bytes=got.bytes,
            reused_files=the_plan.reused_files,
            reused_bytes=the_plan.reused_bytes,
            chunk_copied_bytes=got.chunk_copied_bytes,
            **extra,
        )
    return result


def _build(
    ctx: Context,
    store: SiteStore,
    commit: Commit,
    manifest: Path,
    missing_list: Path,
    progress: Progress,
    jobs: int,
    lock: BuildLock | None,
    selection: Selection = Selection(),
) -> tuple[Plan, tuple[str, ...], download.Downloaded]:
    """Build the commit's tree in a private staging directory and publish it with one rename.

    Returns the plan, the entries admission evicted and what the download engine fetched. On
    any failure the staging tree is removed: nothing is published.
    """
    entry = selection.entry_id(commit.id)
    staging = store.new_staging(entry)
    if lock is not None:
        lock.fresh.append(staging)  # a cold fetch of a big dataset can outlast the sweep's 24 hours
    top = str(staging)
    linker = Linker(store.site.link)
    counts = [0, 0, 0]

    def fetch(objects: download.ObjectSet, shown: Progress) -> None:
        got = download.download(ctx.lake, store, objects, progress=shown, jobs=jobs)
        counts[0] += got.objects
        counts[1] += got.bytes
        counts[2] += got.chunk_copied_bytes

    what = f"{commit.dataset}@{commit.short}"
    unlinked = missing_list.with_name(missing_list.name + ".files")  # the files pass 1 could not link
    try:
        progress.start("link", total_files=commit.files)
        try:
            the_plan = _link_present(store, manifest, top, linker, missing_list, unlinked, progress, selection)
        finally:
            progress.finish()
        evicted = _admit(ctx, store, commit, the_plan, manifest, lock.path if lock is not None else None, selection)
        if the_plan.missing_objects:
            store.begin_partial(commit, entry=entry)  # what arrives is kept for a re-run if this stops (gc.py)
        bases = download.chunk_bases(ctx.lake, store, the_plan.large, _base_candidates(ctx, store, commit)) if the_plan.large else {}
        fetch(download.ObjectSet.from_file(missing_list, count=the_plan.missing_objects, nbytes=the_plan.missing_bytes, what=what, bases=bases), progress)
        if the_plan.reused_files < the_plan.files:
            vanished: list[ManifestEntry] = []

            def lost(entry: ManifestEntry) -> None:
                if os.path.exists(store.object_file(entry.sha256)):  # the object is there: the tree is not
                    raise FileNotFoundError(errno.ENOENT, f"cannot place {entry.path} in the staging tree {top}")
                vanished.append(entry)  # fetched, then collected by a gc elsewhere before it was linked

            progress.start("link", total_files=the_plan.files - the_plan.reused_files)
            try:
                _place_files(store, _read_entries(unlinked), top, linker, progress, lost)
            finally:
                progress.finish()
            if vanished:
                fetch(download.ObjectSet.from_pairs(sorted({(e.sha256, e.size) for e in vanished}), what=what), NULL)
                gone: list[ManifestEntry] = []
                _place_files(store, iter(vanished), top, linker, NULL, gone.append)
                if gone:
                    raise IntegrityError(
                        f"objects of {commit.dataset}@{commit.short} vanished twice from site {store.name} while "
                        "linking (a gc running at the same time?); nothing was published: re-run"
                    )
        make_tree_readonly(staging, group=store.site.group)
        store.write_meta(commit, selection=selection, files=the_plan.files, nbytes=the_plan.bytes)
        store.keep_manifest(commit.manifest, manifest)
        pause.point("cache.before-publish")
        store.publish(staging, entry)
        store.end_partial(entry)
    except NoSpaceError:
        remove_tree(staging)
        raise
    except OSError as exc:
        remove_tree(staging)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpaceError(
                f"site {store.name} ({store.root}) ran out of space while building {commit.dataset}@{commit.short}; "
                "nothing was published. Free space there (or cache to another site) and re-run",
                site=store.name,
            ) from exc
        raise
    except BaseException:
        remove_tree(staging)
        raise
    finally:
        unlinked.unlink(missing_ok=True)
    return the_plan, evicted, download.Downloaded(counts[0], counts[1], counts[2])


def _link_present(
    store: SiteStore,
    manifest: Path,
    top: str,
    linker: Linker,
    missing_list: Path,
    unlinked: Path,
    progress: Progress,
    selection: Selection = Selection(),
) -> Plan:
    """Link every file whose content the site holds under ``top``; list what it lacks.

    ``manifest`` is a copy from the local manifest cache, which holds only manifests verified
    against their id and validated line by line on arrival (``Lake.fetch_manifest``), so its
    paths are safe and it is not validated again. The distinct missing contents go to
    ``missing_list`` (``sha256<TAB>size`` lines) and the files not linked to ``unlinked``
    (manifest lines), both outside the site. Memory: one set entry per *missing* content,
    nothing per reused file.
    """
    missing: set[bytes] = set()
    large: dict[str, tuple[str, int]] = {}
    n = [0, 0, 0, 0, 0]  # files, bytes, files to fetch, their bytes, bytes of distinct missing contents

    def entries() -> Iterator[ManifestEntry]:
        for entry in read_manifest(manifest, validate=False):
            if selection and not selection.matches(entry.path):
                continue  # a partial cache: this file is not in it
            n[0] += 1
            n[1] += entry.size
            yield entry

    with open(missing_list, "w", encoding="ascii") as out, open(unlinked, "w", encoding="utf-8", newline="\n") as not_linked:

        def absent(entry: ManifestEntry) -> None:
            n[2] += 1
            n[3] += entry.size
            not_linked.write(f"{entry.sha256}\t{entry.size}\t{entry.path}\n")
            key = bytes.fromhex(entry.sha256)
            if key not in missing:
                missing.add(key)
                n[4] += entry.size
                out.write(f"{entry.sha256}\t{entry.size}\n")
                if entry.size > download.LARGE_OBJECT:
                    large.setdefault(entry.path, (entry.sha256, entry.size))

        _place_files(store, entries(), top, linker, progress, absent)
    files, nbytes, fetch_files, fetch_bytes, missing_bytes = n
    return Plan(files, nbytes, len(missing), missing_bytes, files - fetch_files, nbytes - fetch_bytes, large)


def _read_entries(path: Path) -> Iterator[ManifestEntry]:
    """The entries ``_link_present`` wrote to its list of files not linked (manifest lines)."""
    with open(path, encoding="utf-8", newline="\n") as fh:
        for line in fh:
            digest, size, rel = line.rstrip("\n").split("\t", 2)
            yield ManifestEntry(rel, int(size), digest)


def _record_refs(ctx: Context, store: SiteStore, ref: Ref, commit: Commit, selection: Selection = Selection()) -> None:
    """Record at the site the names this commit has now (the ref asked for, its tags, and
    ``latest`` if it is the newest): what a host without the lake resolves them to. Only for
    whole commits: a site ref names a commit, and a partial cache is not one."""
    if selection:
        return
    names = set(commit.tags) | ({ref.ref} if not ref.could_be_commit else set())
    latest = ctx.catalog.latest(commit.dataset)
    if latest is not None and latest.id == commit.id:
        names.add(LATEST)
    store.record_refs(commit.dataset, sorted(names), commit.id)


def _admit(
    ctx: Context, store: SiteStore, commit: Commit, the_plan: Plan, manifest: Path, lock: Path | None, selection: Selection = Selection()
) -> tuple[str, ...]:
    """Make room under the site's quota and free-space floor before downloading anything.

    Fails (NoSpaceError, nothing fetched) if the commit would not fit even after evicting every
    evictable entry; otherwise evicts least recently used entries first and says which.
    """
    site = store.site
    if site.quota is None and site.min_free <= 0:
        return ()
    needed = {bytes.fromhex(e.sha256) for e in read_manifest(manifest, validate=False) if selection.matches(e.path)}  # reused: never freed
    plan = evict.plan(store, now=ctx.now(), need_bytes=the_plan.missing_bytes, keep=needed, source=ctx.manifest_source())
    if plan.shortfall > 0:
        kept = ", ".join(f"{e.dataset}@{e.commit[:12]} ({why})" for e, why in plan.kept) or "none"
        raise NoSpaceError(
            f"{commit.dataset}@{commit.short} needs {human_bytes(the_plan.missing_bytes)} at site {site.name} and would not fit "
            f"even after evicting every evictable entry: {human_bytes(plan.shortfall)} missing (kept: {kept}). "
            "Raise the quota (cachehub site set --quota), unpin entries, or cache to another site",
            site=site.name,
            missing=plan.shortfall,
        )
    if not plan.evict:
        return ()
    admission = replace(plan, evict=tuple(replace(e, reason="admission" if e.reason == "capacity" else e.reason) for e in plan.evict), kept=())
    result = evict.apply(ctx, store, admission, keep=needed, own_lock=lock)
    return tuple(f"{e.entry.dataset}@{e.entry.commit}" for e in result.evicted)


def _base_candidates(ctx: Context, store: SiteStore, commit: Commit) -> list:
    """Commits of the same dataset cached at the site, to copy chunks from: ancestors first
    (nearest first), then the most recently cached."""
    cached = {c.commit: c for c in store.cached() if c.dataset == commit.dataset}
    if not cached:
        return []
    order: list[str] = []
    seen: set[str] = set()
    frontier = list(commit.parents)
    while frontier and len(seen) < 64:  # ancestors, nearest first
        cid = frontier.pop(0)
        if cid in seen:
            continue
        seen.add(cid)
        if cid in cached:
            order.append(cid)
        parent = ctx.catalog.commit(cid)
        if parent is not None:
            frontier.extend(parent.parents)
    order += sorted((c for c in cached if c not in order), key=lambda c: cached[c].cached_at, reverse=True)
    return [cached[c] for c in order]


SHARD_POLL_SECONDS = 1.0


def _wait_for_shards(store: SiteStore, commit: Commit, progress: Progress) -> None:
    """While shards of this commit run at the site (``cache --shard``), wait instead of fetching
    what they fetch: a daemon serving a queued request, or a plain cache started meanwhile,
    then only fetches what is still missing (nothing, usually) and publishes."""
    running = store.shards_running(commit.id)
    if not running:
        return
    log.info("%s@%s: shards %s are fetching it at site %s; waiting for them", commit.dataset, commit.short, ", ".join(running), store.name)
    pause.point("cache.waiting-for-shards")
    while store.shards_running(commit.id) and not store.is_cached(commit.id):
        time.sleep(SHARD_POLL_SECONDS)


def _wait_for_lock(store: SiteStore, commit: Commit, entry: str) -> BuildLock | None:
    """The advisory build lock of the entry, or None once another process has published it."""
    while True:
        lock = store.lock(entry, commit.manifest)
        if lock is not None or store.is_cached(entry):
            return lock
        time.sleep(LOCK_POLL_SECONDS)  # another process is building it; wait and reuse its work


LINK_THREADS = 2  # link() releases the GIL: 20k links on ext4 took 0.41 s on one thread, 0.28 s on two
LINK_BATCH = 1024


def _place_files(
    store: SiteStore,
    entries: Iterator[ManifestEntry],
    top: str,
    linker: Linker,
    progress: Progress,
    absent: Callable[[ManifestEntry], None],
) -> None:
    """Place each entry's file under ``top`` from the site's object store, per the link mode.

    Entries whose object the store does not hold are passed to ``absent`` (on this thread).
    Directories are made on this thread, in manifest order, before any file of theirs is
    handed to the LINK_THREADS workers, in batches of LINK_BATCH files, a few batches ahead.
    """
    made = {""}

    def place(batch: list[ManifestEntry]) -> list[ManifestEntry]:
        gone = []
        for entry in batch:
            obj = store.object_file(entry.sha256)
            try:
                linker.place(obj, f"{top}/{entry.path}")
            except FileNotFoundError:
                gone.append(entry)  # the object is missing (the tree's directories are all made)
        return gone

    pending: deque[tuple[Future[list[ManifestEntry]], list[ManifestEntry]]] = deque()

    def collect() -> None:
        future, batch = pending.popleft()
        gone = future.result()
        for entry in gone:
            absent(entry)
        progress.advance(len(batch), sum(e.size for e in batch))

    pool = ThreadPoolExecutor(max_workers=LINK_THREADS, thread_name_prefix="cachehub-link")
    try:
        batch: list[ManifestEntry] = []
        for entry in entries:
            parent = entry.path.rpartition("/")[0]
            if parent not in made:
                os.makedirs(f"{top}/{parent}", exist_ok=True)
                made.add(parent)
            batch.append(entry)
            if len(batch) == LINK_BATCH:
                pending.append((pool.submit(place, batch), batch))
                batch = []
                while len(pending) > 2 * LINK_THREADS:
                    collect()
        if batch:
            pending.append((pool.submit(place, batch), batch))
        while pending:
            collect()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _already(commit: Commit, store: SiteStore, entry: str, started: float) -> CacheResult:
    """The result for an entry that was published already (by this or another process)."""
    cached = store.cached_commit(entry)
    files, nbytes = (cached.files, cached.bytes) if cached is not None else (commit.files, commit.bytes)
    return _result(commit, store, entry, 0, 0, files, nbytes, files, nbytes, started, already=True)


def _result(
    commit: Commit,
    store: SiteStore,
    entry: str,
    fetched_files: int,
    fetched_bytes: int,
    reused_files: int,
    reused_bytes: int,
    files: int,
    nbytes: int,
    started: float,
    *,
    already: bool,
) -> CacheResult:
    return CacheResult(
        dataset=commit.dataset,
        commit=commit.id,
        site=store.name,
        path=str(store.commit_path(entry)),
        fetched_files=fetched_files,
        fetched_bytes=fetched_bytes,
        reused_files=reused_files,
        reused_bytes=reused_bytes,
        files=files,
        bytes=nbytes,
        seconds=time.monotonic() - started,
        already_cached=already,
        entry=entry,
    )
