"""Eviction: decide (pure) which cache entries go, then remove them safely (I/O).

``plan_eviction(entries, policy, now, ...)`` is a pure function returning an ``EvictionPlan``;
``execute(store, plan)`` carries it out; ``gc(store)`` removes content no cached commit uses.
Eviction only ever removes site copies: never the lake, never a pinned entry, never one with
a live lease, never one used within the site's grace period.

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

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import lease as leasemod
from .fsutil import HOST, atomic_write, unique_suffix
from .manifest import read_manifest
from .model import Site
from .store import SiteStore, lock_is_stale, remove_tree

RECENT_USE_SLACK = 2.0  # seconds: coarse NFS mtimes must not hide a use during eviction
GC_MIN_AGE = 3600.0  # objects younger than this may belong to a tree being built


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


@dataclass(frozen=True)
class Eviction:
    entry: EntryState
    reason: str  # "expired" | "capacity" | "manual"


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
def gather(
    store: SiteStore, *, now: float | None = None, keep: set[bytes] | None = None
) -> tuple[list[EntryState], int, list[tuple[int, tuple[str, ...]]]]:
    """The site's entries, its usage in bytes, and the content shared between entries.

    Usage counts ``objects/`` (plus the trees of a ``copy`` site). An entry's exclusive bytes
    are the content only it references; ``shared`` lists (bytes, commits): the total size of the
    content exactly those entries reference, freed only when all of them go. Content in ``keep`` (what a commit
    being admitted will reuse) is never counted as freed.
    """
    now = time.time() if now is None else now
    cached = list(store.cached())
    # sha -> (size << width) | owners, bit i of owners meaning cached[i] references it: one int
    # per content, not lists, so 600,000 objects at a site take tens of MB here, not hundreds
    width = len(cached)
    refs: dict[bytes, int] = {}
    for i, c in enumerate(cached):
        bit = 1 << i
        for entry in read_manifest(store.manifest_path(c.manifest), validate=False):
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
    entries = []
    for c in cached:
        last = c.last_used if c.last_used is not None else _mtime(store.meta_path(c.commit), now)
        extra = c.bytes if store.site.link == "copy" else 0
        entries.append(
            EntryState(
                commit=c.commit,
                dataset=c.dataset,
                bytes=c.bytes,
                exclusive_bytes=exclusive.get(c.commit, 0) + extra,
                last_used=last,
                pinned=leasemod.is_pinned(store, c.commit),
                leased=bool(leasemod.live_leases(store, c.commit, now)),
            )
        )
    usage = store.object_bytes()[1] + (sum(c.bytes for c in cached) if store.site.link == "copy" else 0)
    return entries, usage, shared


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


def execute(store: SiteStore, plan: EvictionPlan, *, keep: set[bytes] | None = None, own_lock: Path | None = None) -> EvictionResult:
    """Carry out a plan with the unpublish/re-check/restore protocol, then collect garbage."""
    done: list[Eviction] = []
    restored: list[str] = []
    for ev in plan.evict:
        cid = ev.entry.commit
        marker = mark_evicting(store, cid)
        if marker is None:
            continue  # another evictor is on it
        try:
            if _used_since(store, cid, ev.entry.last_used, plan.now) or leasemod.live_leases(store, cid):
                restored.append(cid)  # a reader arrived after the plan: keep the tree
                continue
            trash = store.root / "trash" / f"{cid}.{unique_suffix()}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(store.commit_path(cid), trash)
            except FileNotFoundError:
                continue  # someone else evicted it
            store.meta_path(cid).unlink(missing_ok=True)
            store.used_path(cid).unlink(missing_ok=True)
        finally:
            marker.unlink(missing_ok=True)
        remove_tree(trash)
        done.append(ev)
    objects, nbytes = gc(store, keep=keep, own_lock=own_lock)
    return EvictionResult(tuple(done), tuple(restored), objects, nbytes)


def marker_path(store: SiteStore, commit_id: str) -> Path:
    return store.root / "evicting" / commit_id


def mark_evicting(store: SiteStore, commit_id: str) -> Path | None:
    """Create the eviction marker (atomic create); None if another evictor holds it."""
    path = marker_path(store, commit_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, f"{HOST} {os.getpid()} {time.time():.3f}\n".encode(), exclusive=True, durable=False)
        return path
    except FileExistsError:
        if lock_is_stale(path):
            path.unlink(missing_ok=True)
            return mark_evicting(store, commit_id)
        return None


def wait_while_evicting(store: SiteStore, commit_id: str, *, timeout: float = 120.0) -> None:
    """Block while an eviction of ``commit_id`` is deciding or removing (a reader's step 1)."""
    path = marker_path(store, commit_id)
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        if lock_is_stale(path):
            path.unlink(missing_ok=True)
            return
        time.sleep(0.01)


def _used_since(store: SiteStore, commit_id: str, planned_last_use: float, plan_time: float) -> bool:
    last = store.last_used(commit_id)
    if last is None:
        return False
    return last > planned_last_use + 1e-6 and last >= plan_time - RECENT_USE_SLACK


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
    locks_dir = store.root / "locks"

    def index_builds() -> set[str]:
        """Keep the content of every build in progress here (its lock names its manifest).

        Returns the lock names looked at (stale ones too), listed before the locks were read.
        """
        names = lock_names()
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

    def lock_names() -> set[str]:
        try:
            return {name for name in os.listdir(locks_dir) if name.endswith(".lock")}
        except FileNotFoundError:
            return set()

    builds = index_builds()
    started = time.time()

    def other_builder() -> bool:
        return bool(lock_names() - {own_lock.name if own_lock is not None else None})

    count = total = 0
    for dirpath, _dirs, files in os.walk(store.root / "objects"):
        for name in files:
            try:
                key = bytes.fromhex(name)
            except ValueError:
                continue
            if key in referenced:
                continue
            path = os.path.join(dirpath, name)
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
                    current = set(os.listdir(store.root / "commits"))
                    if current != published:  # a build published meanwhile: look again
                        published = index()
                        if key in referenced:
                            continue
            if lock_names() - builds:  # a build started meanwhile: keep what it needs
                builds = index_builds()
                if key in referenced:
                    continue
            if not dry_run:
                os.unlink(path)
            count += 1
            total += st.st_size
    if not dry_run:
        for path in (store.root / "manifests").glob("*/*.tsv.gz"):
            if path.name[: -len(".tsv.gz")] not in manifests:
                path.unlink(missing_ok=True)
        used = store.root / "used"
        for marker in used.iterdir() if used.exists() else ():
            if not store.is_cached(marker.name) and now - _mtime(marker, now) > store.site.grace:
                marker.unlink(missing_ok=True)
    return count, total


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
