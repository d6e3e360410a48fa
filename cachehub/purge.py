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
from .errors import CachehubError, ConfigError, ConflictError, LakeError
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
        held = [x for e in store.entries_of(commit.id) for x in lease.live_leases(store, e)] if store.exists() else []
        if held:
            who = ", ".join(f"{x.user}@{x.host} pid {x.pid}" for x in held)
            raise ConflictError(f"{commit.dataset}@{commit.short} is leased at site {store.name} by {who}; purge when they finish")
    lake = ctx.lake
    # content used by any other commit of any dataset stays
    shared: set[str] = set()
    same_tree = False  # the same manifest lives on in another commit: no content goes
    for other in other_commits(ctx, commit):
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
    evicted = [store.name for store in stores if store.exists() and store.entries_of(commit.id) and evict_purged(ctx, store, [commit.id])]
    return PurgeResult(
        commit.dataset, commit.id, len(doomed), sum(doomed.values()), len(mine) - len(doomed), tags_removed, tuple(evicted)
    )


def other_commits(ctx: Context, commit: Commit) -> list[Commit]:
    """Every other live commit of the lake, each read by its key, or LakeError (nothing deleted).

    What a purge may delete is decided from these documents, so the list must be complete, and
    no single listing is trusted for that: the commits listed by folder, those in a flat listing
    of ``datasets/`` and those this home's catalog knows must agree. A commit one of them shows
    and another misses (a server whose delimiter listings leave prefixes out; a lake changed
    behind its back) makes the purge refuse. A commit that cannot be read (damaged) does too:
    what it uses is unknown.
    """
    lake = ctx.lake
    by_folder, flat = lake.commit_listings()
    gone = {(t.dataset, t.commit) for ds in {d for d, _ in by_folder | flat} for t in lake.tombstones(ds)}
    known = {(c.dataset, c.id) for ds in ctx.catalog.dataset_names() for c in ctx.catalog.log(ds)}
    fix = (
        "purge deletes only what it can prove no other commit uses, so it stopped before deleting anything. "
        "Run it against a server whose listings are complete (`cachehub doctor` checks), or run `cachehub catalog rebuild` "
        "if the lake was changed by hand"
    )
    if by_folder != flat:
        differ = sorted((by_folder ^ flat))[:3]
        raise LakeError(
            f"the lake's listings disagree: {len(by_folder ^ flat)} commit(s) appear in one listing of datasets/ and not in "
            f"the other (e.g. {', '.join(f'{d}@{c[:12]}' for d, c in differ)}): this server's delimiter listings are "
            f"incomplete. {fix}"
        )
    unlisted = [(d, c) for d, c in sorted(known - flat - gone) if lake.has_commit(d, c)]
    if unlisted:
        raise LakeError(
            f"{len(unlisted)} commit(s) exist in the lake but are missing from its listings (e.g. "
            f"{', '.join(f'{d}@{c[:12]}' for d, c in unlisted[:3])}). {fix}"
        )
    out = []
    for dataset, cid in sorted(flat - gone - {(commit.dataset, commit.id)}):
        try:
            out.append(lake.read_commit(dataset, cid))
        except FileNotFoundError:
            continue  # deleted since it was listed: it uses nothing any more
        except CachehubError as exc:
            raise LakeError(f"commit {dataset}@{cid[:12]} cannot be read ({exc}), so what it uses is unknown. {fix}") from exc
    return out


def evict_purged(ctx: Context, store: SiteStore, commit_ids: list[str]) -> list[str]:
    """Remove purged commits from a site through the eviction path; return those that were there."""
    now = ctx.now()
    entries = [e for cid in commit_ids for e in store.entries_of(cid)]  # whole trees and partial caches
    plans = [evict.plan_purge(store, e, now=now) for e in entries]
    evictions = tuple(e for p in plans for e in p.evict)
    plan = evict.EvictionPlan(evictions, (), sum(e.entry.bytes for e in evictions), 0, None, 0, now)
    with site_errors(store, "remove a purged commit"):
        result = evict.apply(ctx, store, plan)
    return [e.entry.commit for e in result.evicted]
