"""Purge (right to erasure): remove a commit's unshared content from the lake and every site.

The commit document and its tags go, and so does its content, except what any other commit
of any dataset still uses. A tombstone ``datasets/<name>/tombstones/<commit-id>.json`` is
written first, so the id can never silently resolve again. Each configured site drops the
commit's tree through the one eviction path (``evict.plan_purge`` then ``evict.apply``, pins
notwithstanding); sites configured on other hosts do the same when their daemon next reads the
lake (``evict_purged``).
"""

from __future__ import annotations

from . import audit, evict, index, lease
from .context import Context
from .errors import ConfigError, ConflictError
from .manifest import read_manifest
from .model import Commit, Tombstone
from .results import PurgeResult
from .store import SiteStore, site_errors


def purge(ctx: Context, ref: str, *, reason: str) -> PurgeResult:
    """Erase the commit ``ref`` names: unshared content in the lake and at every site; audited."""
    if not reason.strip():
        raise ConfigError("purge needs --reason: it is recorded in the tombstone and the audit trail")
    commit = index.resolve_commit(ctx, ref, refresh_first=True)
    result = erase(ctx, commit, reason=reason)
    ctx.events.audit(
        "purge", dataset=commit.dataset, commit=commit.id, ref=ref, reason=reason, removed_objects=result.removed_objects,
        removed_bytes=result.removed_bytes, tags=list(result.tags_removed), sites=list(result.sites_evicted),
    )  # fmt: skip
    audit.ship_quietly(ctx)
    return result


def erase(ctx: Context, commit: Commit, *, reason: str) -> PurgeResult:
    """Erase a commit's unshared content from the lake and every configured site."""
    stores = ctx.stores()
    for store in stores:
        held = lease.live_leases(store, commit.id) if store.exists() else []
        if held:
            who = ", ".join(f"{x.user}@{x.host} pid {x.pid}" for x in held)
            raise ConflictError(f"{commit.dataset}@{commit.short} is leased at site {store.name} by {who}; purge when they finish")
    lake = ctx.lake
    # content used by any other commit of any dataset stays
    shared: set[str] = set()
    same_tree = False  # the same manifest lives on in another commit: no content goes
    for name in lake.datasets():
        for cid in lake.commit_ids(name):
            if cid == commit.id:
                continue
            other = lake.read_commit(name, cid)
            if other.manifest == commit.manifest:
                same_tree = True
                continue
            shared.update(e.sha256 for e in read_manifest(lake.manifest(other.manifest), validate=False))
    mine = {e.sha256: e.size for e in read_manifest(lake.manifest(commit.manifest), validate=False)}
    doomed = {} if same_tree else {sha: size for sha, size in mine.items() if sha not in shared}
    tombstone = Tombstone(commit.id, commit.dataset, reason, ctx.user, ctx.now_iso(), ctx.host)
    lake.write_tombstone(tombstone)  # first: the id is dead from now on
    with ctx.catalog.transaction():
        ctx.catalog.add_tombstone(tombstone)  # and here too, before anything below can fail
    tags_removed = tuple(t.name for t in lake.tags(commit.dataset) if t.commit == commit.id)
    for tag in tags_removed:
        lake.delete_tag(commit.dataset, tag)
    for sha in doomed:
        lake.delete_object(sha)
    if not same_tree:
        lake.delete_manifest(commit.manifest)
    lake.delete_commit(commit.dataset, commit.id)
    evicted = [store.name for store in stores if store.exists() and store.is_cached(commit.id) and evict_purged(ctx, store, [commit.id])]
    return PurgeResult(
        commit.dataset, commit.id, len(doomed), sum(doomed.values()), len(mine) - len(doomed), tags_removed, tuple(evicted)
    )


def evict_purged(ctx: Context, store: SiteStore, commit_ids: list[str]) -> list[str]:
    """Remove purged commits from a site through the eviction path; return those that were there."""
    now = ctx.now()
    plans = [evict.plan_purge(store, cid, now=now) for cid in commit_ids]
    evictions = tuple(e for p in plans for e in p.evict)
    plan = evict.EvictionPlan(evictions, (), sum(e.entry.bytes for e in evictions), 0, None, 0, now)
    with site_errors(store, "remove a purged commit"):
        result = evict.apply(ctx, store, plan)
    return [e.entry.commit for e in result.evicted]
