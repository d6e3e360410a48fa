"""Eviction: one path for every removal of a cache entry -- plan (pure), execute, record.

* ``plan_eviction(entries, policy, now, ...)`` is a pure function returning an ``EvictionPlan``;
  ``plan(store, ...)`` gathers a site's state and calls it; ``plan_purge`` plans the removal of
  a purged commit;
* ``execute(store, plan)`` carries a plan out (the protocol below), then collects garbage
  (``gc.py``);
* ``record(ctx, store, result)`` updates the catalog and appends the audit events.

``evict`` (``cachehub evict``, the daemon's sweep), admission (``cache.py``) and purge
(``purge.py``, and the daemon for purges made elsewhere) all go through these three.

Eviction only ever removes site copies: never the lake, never a pinned entry, never one with
a live lease, never one used within the site's grace period. A purge is the one exception: an
erased commit goes whatever its pins (``purge.py`` refuses first while it is leased).

The race with readers (see docs/operations.md, "Eviction and running jobs"):

1. a reader first records its use (a lease file, or the ``used/<id>`` mtime), then looks for an
   eviction marker ``evicting/<id>`` and waits while one exists, and only then checks that the
   tree exists;
2. the evictor first creates the marker (``O_EXCL``), then looks again at the leases and the
   last use; if either appeared since it planned, it removes the marker and keeps the tree;
   otherwise it renames the tree to ``trash/``, removes the marker, and deletes the trash.

Either the reader's use is recorded before the evictor looks (the tree stays), or the marker
exists before the reader looks (the reader waits, then finds the tree gone and caches it
again). A reader never gets a path to a tree that is being removed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import lease as leasemod
from .errors import SiteDamagedError
from .gc import collect_unlinked, expire_partials, gc
from .model import Site
from .store import CachedCommit, ManifestSource, SiteStore, fs_space, remove_tree, site_errors

if TYPE_CHECKING:
    from .context import Context

log = logging.getLogger("cachehub.evict")
RECENT_USE_SLACK = 2.0  # seconds: coarse NFS mtimes must not hide a use during eviction


@dataclass(frozen=True)
class EntryState:
    """What eviction needs to know about one cached commit (gathered by ``gather``)."""

    commit: str
    dataset: str
    bytes: int  # as seen by readers
    exclusive_bytes: int  # freed on disk if only this entry goes
    last_used: float
    pinned: bool
    leased: bool
    manifest: str = ""  # the manifest id of the cached commit (what a purge's gc removes)


@dataclass(frozen=True)
class Eviction:
    entry: EntryState
    reason: str  # "expired" | "capacity" | "manual" | "admission" | "purged"


@dataclass(frozen=True)
class EvictionPlan:
    """The decision: what goes (and why), what stays (and why), and what is still missing."""

    evict: tuple[Eviction, ...]
    kept: tuple[tuple[EntryState, str], ...]
    freed_bytes: int
    usage: int
    target: int | None  # usage the plan aims for (None: no capacity pressure)
    shortfall: int  # bytes still needed after evicting every candidate (admission fails if > 0)
    now: float = field(compare=False, default=0.0)


def plan_eviction(
    entries: Iterable[EntryState],
    site: Site,
    *,
    now: float,
    usage: int,
    fs_free: int | None = None,
    fs_total: int | None = None,
    need_bytes: int = 0,
    expire: bool = True,
    capacity: bool = True,
    only: Iterable[str] | None = None,
    shared: Iterable[tuple[int, tuple[str, ...]]] = (),
) -> EvictionPlan:
    """Decide evictions: expired entries first, then least recently used under capacity pressure.

    ``need_bytes`` is space a pending cache must find (admission). ``only`` restricts the plan
    to the given commit ids (manual eviction: no TTL or capacity logic).
    """
    entries = list(entries)
    freer = _Freer(shared)
    kept: list[tuple[EntryState, str]] = []
    evict: list[Eviction] = []
    candidates: list[EntryState] = []
    wanted = set(only) if only is not None else None
    for e in entries:
        if wanted is not None and e.commit not in wanted:
            continue
        why = _protected(e, site, now)
        if why:
            kept.append((e, why))
        else:
            candidates.append(e)
    if wanted is not None:
        evict = [Eviction(e, "manual") for e in candidates]
        freed = sum(freer.evict(e) for e in candidates)
        return EvictionPlan(tuple(evict), tuple(kept), freed, usage, None, 0, now)

    candidates.sort(key=lambda e: (e.last_used, e.commit))  # least recently used first
    freed = 0
    rest: list[EntryState] = []
    for e in candidates:
        if expire and site.ttl > 0 and now - e.last_used > site.ttl:
            evict.append(Eviction(e, "expired"))
            freed += freer.evict(e)
        else:
            rest.append(e)

    need = _bytes_to_free(site, usage - freed, fs_free + freed if fs_free is not None else None, fs_total, need_bytes) + freed if capacity else 0
    target = max(0, usage - need) if need > 0 else None
    # LRU, skipping entries whose eviction alone frees nothing (content others still use);
    # a second pass takes those too if the first fell short (shared content frees together)
    skipped: list[EntryState] = []
    for e in rest:
        if freed >= need:
            kept.append((e, "not needed"))
        elif freer.gain(e) == 0:
            skipped.append(e)
        else:
            evict.append(Eviction(e, "capacity"))
            freed += freer.evict(e)
    for e in skipped:
        if freed >= need:
            kept.append((e, "frees nothing"))
        else:
            evict.append(Eviction(e, "capacity"))
            freed += freer.evict(e)
    return EvictionPlan(tuple(evict), tuple(kept), freed, usage, target, max(0, need - freed), now)


class _Freer:
    """Bytes freed by evicting one more entry: its own content, plus shared content whose
    every other owner is already evicted."""

    def __init__(self, shared: Iterable[tuple[int, tuple[str, ...]]]) -> None:
        self.remaining: list[list] = []
        self.by_commit: dict[str, list[int]] = {}
        for size, owners in shared:
            index = len(self.remaining)
            self.remaining.append([size, len(owners)])
            for owner in owners:
                self.by_commit.setdefault(owner, []).append(index)

    def gain(self, e: EntryState) -> int:
        """What evicting ``e`` next would free, without deciding it."""
        return e.exclusive_bytes + sum(self.remaining[i][0] for i in self.by_commit.get(e.commit, ()) if self.remaining[i][1] == 1)

    def evict(self, e: EntryState) -> int:
        freed = e.exclusive_bytes
        for index in self.by_commit.get(e.commit, ()):
            slot = self.remaining[index]
            slot[1] -= 1
            if slot[1] == 0:
                freed += slot[0]
        return freed


def _protected(e: EntryState, site: Site, now: float) -> str | None:
    if e.pinned:
        return "pinned"
    if e.leased:
        return "leased"
    if now - e.last_used < site.grace:
        return "used recently"
    return None


def _bytes_to_free(site: Site, usage: int, fs_free: int | None, fs_total: int | None, need_bytes: int) -> int:
    """How much must go so that ``need_bytes`` fits within the quota and the free-space floor."""
    need = 0
    if site.quota is not None:
        if usage + need_bytes > site.quota:
            # admission frees what it needs; a sweep over quota frees down to the low watermark
            floor = site.low_watermark * site.quota if need_bytes == 0 else site.quota
            need = max(need, int(usage + need_bytes - floor))
    if site.min_free > 0 and fs_free is not None and fs_total:
        reserve = site.min_free * fs_total
        if fs_free - need_bytes < reserve:
            need = max(need, int(reserve - (fs_free - need_bytes)))
    return need


# -- gathering state (I/O) -------------------------------------------------------------------
def entry_state(store: SiteStore, c: CachedCommit, *, now: float, exclusive_bytes: int = 0) -> EntryState:
    """What eviction needs to know about one cached commit (its pins, leases, last use)."""
    last = c.last_used if c.last_used is not None else _mtime(store.meta_path(c.commit), now)
    return EntryState(
        commit=c.commit,
        dataset=c.dataset,
        bytes=c.bytes,
        exclusive_bytes=exclusive_bytes,
        last_used=last,
        pinned=leasemod.is_pinned(store, c.commit),
        leased=bool(leasemod.live_leases(store, c.commit, now)),
        manifest=c.manifest,
    )


def gather(
    store: SiteStore, *, now: float | None = None, keep: set[bytes] | None = None, source: ManifestSource | None = None
) -> tuple[list[EntryState], int, list[tuple[int, tuple[str, ...]]]]:
    """The site's entries, its usage in bytes, and the content shared between entries.

    Usage counts ``objects/`` (plus the trees of a ``copy`` site). An entry's exclusive bytes
    are the content only it references; ``shared`` lists (bytes, commits): the total size of the
    content exactly those entries reference, freed only when all of them go. Content in ``keep`` (what a commit
    being admitted will reuse) is never counted as freed. An entry whose manifest copy is lost
    and cannot be fetched again (``source``) counts as freeing nothing (the gc after it removes
    nothing either, gc.py), and is still evictable.
    """
    now = time.time() if now is None else now
    cached = list(store.cached())
    # sha -> (size << width) | owners, bit i of owners meaning cached[i] references it: one int
    # per content, not lists, so 600,000 objects at a site take tens of MB here, not hundreds
    width = len(cached)
    refs: dict[bytes, int] = {}
    for i, c in enumerate(cached):
        bit = 1 << i
        try:
            entries = store.entry_files(c, source)  # a partial cache: only the files it holds
        except SiteDamagedError as exc:
            log.warning("%s", exc)
            continue
        for entry in entries:
            key = bytes.fromhex(entry.sha256)
            value = refs.get(key)
            refs[key] = (entry.size << width) | bit if value is None else value | bit
    everyone = (1 << width) - 1
    exclusive: dict[str, int] = {}
    together: dict[int, int] = {}  # owner mask -> bytes of content exactly those entries share
    for key, value in refs.items():
        if keep and key in keep:
            continue
        owners, size = value & everyone, value >> width
        if owners & (owners - 1) == 0:  # one owner
            commit = cached[owners.bit_length() - 1].commit
            exclusive[commit] = exclusive.get(commit, 0) + size
        else:
            together[owners] = together.get(owners, 0) + size
    del refs
    shared = [(size, tuple(c.commit for i, c in enumerate(cached) if owners >> i & 1)) for owners, size in together.items()]
    copies = store.site.link == "copy"
    entries = [entry_state(store, c, now=now, exclusive_bytes=exclusive.get(c.commit, 0) + (c.bytes if copies else 0)) for c in cached]
    usage = store.usage()[1] + (sum(c.bytes for c in cached) if copies else 0)
    return entries, usage, shared


def plan(
    store: SiteStore,
    *,
    now: float,
    only: Iterable[str] | None = None,
    expired_only: bool = False,
    need_bytes: int = 0,
    keep: set[bytes] | None = None,
    source: ManifestSource | None = None,
) -> EvictionPlan:
    """What an eviction at ``store`` would remove, and why; nothing is changed.

    ``only``: exactly those commit ids -- planned from those entries alone, so it costs what they
    hold, not what the site holds (``plan_only``). Otherwise expired entries, then (unless
    ``expired_only``) least recently used ones while the site is over its quota or free-space
    floor, or lacks ``need_bytes`` for an admission (``keep``: content it will reuse).
    """
    if only is not None:
        return plan_only(store, only, now=now, source=source)
    entries, usage, shared = gather(store, now=now, keep=keep, source=source)
    fs = fs_space(store.root)
    return plan_eviction(
        entries, store.site, now=now, usage=usage, fs_free=fs["fs_free"], fs_total=fs["fs_total"], need_bytes=need_bytes,
        capacity=not expired_only, only=list(only) if only is not None else None, shared=shared,
    )  # fmt: skip


def plan_only(store: SiteStore, commit_ids: Iterable[str], *, now: float, source: ManifestSource | None = None) -> EvictionPlan:
    """A manual eviction of exactly ``commit_ids``, looking at nothing else at the site.

    What an entry frees is counted from its own objects' link counts where trees are hard links
    (an object linked by no other tree goes with it); for symlink and copy sites, its size.
    """
    entries = []
    for cid in dict.fromkeys(commit_ids):
        found = store.cached_commit(cid)
        if found is not None:
            entries.append(entry_state(store, found, now=now, exclusive_bytes=_frees(store, found, source)))
    return plan_eviction(entries, store.site, now=now, usage=0, only=[e.commit for e in entries])


def _frees(store: SiteStore, cached: CachedCommit, source: ManifestSource | None) -> int:
    if store.site.link not in ("auto", "hardlink"):
        return cached.bytes
    total = 0
    try:
        for entry in store.entry_files(cached, source):
            try:
                if os.stat(store.object_file(entry.sha256)).st_nlink <= 2:  # the object and this tree's link
                    total += entry.size
            except FileNotFoundError:
                continue
    except SiteDamagedError:
        return 0
    return total


def plan_purge(store: SiteStore, commit_id: str, *, now: float) -> EvictionPlan:
    """The removal of a purged commit from a site: pins notwithstanding (an empty plan if absent)."""
    found = store.cached_commit(commit_id)
    if found is None:
        return EvictionPlan((), (), 0, 0, None, 0, now)
    entry = entry_state(store, found, now=now, exclusive_bytes=found.bytes)
    return EvictionPlan((Eviction(entry, "purged"),), (), found.bytes, 0, None, 0, now)


def _mtime(path: Path, default: float) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return default


# -- execution (I/O) -------------------------------------------------------------------------
@dataclass(frozen=True)
class EvictionResult:
    evicted: tuple[Eviction, ...]
    restored: tuple[str, ...]  # commit ids used or leased while being evicted: kept
    gc_objects: int
    gc_bytes: int


def execute(
    store: SiteStore, plan: EvictionPlan, *, keep: set[bytes] | None = None, own_lock: Path | None = None, source: ManifestSource | None = None
) -> EvictionResult:
    """Carry out a plan with the unpublish/re-check/restore protocol, then collect garbage.

    A ``purged`` eviction is not re-checked (an erased commit goes even if read meanwhile);
    its pin is removed, and the content it referenced is collected whatever its age.
    """
    done: list[Eviction] = []
    restored: list[str] = []
    doomed: set[bytes] = set()
    for ev in plan.evict:
        cid = ev.entry.commit
        purged = ev.reason == "purged"
        marker = store.mark_evicting(cid)
        if marker is None and not purged:
            continue  # another evictor is on it
        try:
            if not purged and (_used_since(store, cid, ev.entry.last_used, plan.now) or leasemod.live_leases(store, cid)):
                restored.append(cid)  # a reader arrived after the plan: keep the tree
                continue
            if purged:
                doomed |= _content_of(store, ev.entry.manifest)
            trash = store.unpublish(cid)
            if trash is None:
                continue  # someone else evicted it
            store.meta_path(cid).unlink(missing_ok=True)
            store.used_path(cid).unlink(missing_ok=True)
            if purged:
                leasemod.unpin(store, cid)
        finally:
            if marker is not None:
                marker.unlink(missing_ok=True)
        remove_tree(trash)
        done.append(ev)
    named = plan.target is None and all(ev.reason in ("manual", "purged") for ev in plan.evict)
    if named and store.site.link in ("auto", "hardlink") and store.all_trees_linked():
        # named entries on a hard-link site: collect only their content (what they touched)
        candidates: set[bytes] = set(doomed)
        for ev in done:
            candidates |= _content_of(store, ev.entry.manifest)
        objects, nbytes = collect_unlinked(store, candidates, keep=keep, doomed=doomed, source=source)
    else:
        objects, nbytes = gc(store, keep=keep, own_lock=own_lock, doomed=doomed or None, source=source)
    return EvictionResult(tuple(done), tuple(restored), objects, nbytes)


def _content_of(store: SiteStore, manifest_id: str) -> set[bytes]:
    try:
        return {bytes.fromhex(e.sha256) for e in store.manifest_entries(manifest_id)}
    except (SiteDamagedError, ValueError):
        return set()


def record(ctx: Context, store: SiteStore, result: EvictionResult, reason: str | None = None) -> None:
    """Forget the evicted entries in the catalog and audit every removal (``reason`` overrides the plan's)."""
    catalog = ctx.catalog
    with catalog.transaction():
        for ev in result.evicted:
            catalog.remove_cache_entry(store.name, ev.entry.commit)
            ctx.events.audit(
                "evict", dataset=ev.entry.dataset, commit=ev.entry.commit, site=store.name, reason=reason or ev.reason, bytes=ev.entry.bytes
            )
        for cid in result.restored:
            ctx.events.audit("evict-abandoned", commit=cid, site=store.name, reason="used or leased during eviction")
        if result.gc_objects:
            ctx.events.audit("gc", site=store.name, objects=result.gc_objects, bytes=result.gc_bytes)


def apply(
    ctx: Context, store: SiteStore, plan: EvictionPlan, *, reason: str | None = None, keep: set[bytes] | None = None, own_lock: Path | None = None
) -> EvictionResult:
    """Execute ``plan`` and record it: the one way every eviction is carried out."""
    result = execute(store, plan, keep=keep, own_lock=own_lock, source=ctx.manifest_source())
    record(ctx, store, result, reason)
    return result


def run(
    ctx: Context,
    store: SiteStore,
    *,
    only: Iterable[str] | None = None,
    expired_only: bool = False,
    dry_run: bool = False,
    now: float | None = None,
    reason: str | None = None,
    collect: bool = True,
) -> tuple[EvictionPlan, EvictionResult | None]:
    """Plan and (unless ``dry_run``) carry out an eviction at a site, with its hooks; audited.

    With ``only`` (commit ids): exactly those entries, refusing pinned, leased or just-used
    ones (ConflictError, nothing removed). Without: expired entries, then least recently used
    ones while the site is over its quota or free-space floor. Leases of dead holders are
    reaped first, and (with ``collect``, and no ``only``) expired partial caches forgotten and
    garbage collected by a full walk first, so that capacity is judged on what entries hold.
    """
    with site_errors(store, "evict"):
        return _run(ctx, store, only=only, expired_only=expired_only, dry_run=dry_run, now=now, reason=reason, collect=collect)


def _run(
    ctx: Context,
    store: SiteStore,
    *,
    only: Iterable[str] | None,
    expired_only: bool,
    dry_run: bool,
    now: float | None,
    reason: str | None,
    collect: bool,
) -> tuple[EvictionPlan, EvictionResult | None]:
    from . import audit
    from .errors import ConflictError

    now = ctx.now() if now is None else now
    if not dry_run:
        for dead in leasemod.reap(store, now):
            ctx.events.audit(
                "lease-reap", commit=dead.commit, site=store.name, lease=dead.id, host=dead.host, pid=dead.pid, reason="holder gone"
            )
        if only is None and collect:
            for p in expire_partials(store, now):
                log.info("partial cache of %s at %s expired (kept %s): its objects go with this gc", p.commit[:12], store.name, store.site.keep_partial)
                ctx.events.audit("partial-expired", dataset=p.dataset, commit=p.commit, site=store.name, host=p.host)
            removed, freed = gc(store, source=ctx.manifest_source())
            if removed:
                log.info("gc at %s removed %d objects (%d bytes) no cached commit uses", store.name, removed, freed)
                ctx.events.audit("gc", site=store.name, objects=removed, bytes=freed)
    the_plan = plan(store, now=now, only=only, expired_only=expired_only, source=ctx.manifest_source())
    if only is not None:
        refused = [f"{e.dataset}@{e.commit[:12]} ({why})" for e, why in the_plan.kept]
        if refused:
            raise ConflictError(f"not evicting {', '.join(refused)}: unpin it, or wait for its users to finish")
    if not dry_run and the_plan.evict:
        ctx.events.hook("pre_evict", site=store.name, commits=[e.entry.commit for e in the_plan.evict])
    if dry_run:
        return the_plan, None
    result = apply(ctx, store, the_plan, reason=reason)
    if result.evicted:
        ctx.events.hook("post_evict", site=store.name, commits=[e.entry.commit for e in result.evicted])
        audit.ship_quietly(ctx)
    return the_plan, result


def _used_since(store: SiteStore, commit_id: str, planned_last_use: float, plan_time: float) -> bool:
    last = store.last_used(commit_id)
    if last is None:
        return False
    return last > planned_last_use + 1e-6 and last >= plan_time - RECENT_USE_SLACK


def describe(plan: EvictionPlan) -> dict:
    """A JSON-ready view of a plan."""
    return {
        "evict": [
            {"commit": e.entry.commit, "dataset": e.entry.dataset, "reason": e.reason, "bytes": e.entry.bytes, "frees": e.entry.exclusive_bytes, "last_used": e.entry.last_used}
            for e in plan.evict
        ],
        "kept": [{"commit": e.commit, "dataset": e.dataset, "why": why} for e, why in plan.kept],
        "freed_bytes": plan.freed_bytes,
        "usage": plan.usage,
        "target": plan.target,
        "shortfall": plan.shortfall,
    }
