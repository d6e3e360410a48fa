"""Reading a cached commit: ``resolve`` a ref to a local path, ``use`` it under a lease.

These are the calls training jobs make, so they are on the hot path: a full commit id is
answered from the site root alone (no catalog, no lake); a tag or prefix from the local
catalog. The use is recorded *before* the tree is checked (``used/<commit-id>`` mtime, or a
lease), so an eviction running at that moment either sees the use and keeps the tree, or has
already removed it and the caller is told it is missing (docs/operations.md, "Eviction and
running jobs").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import index
from .context import Context, current_run_id
from .errors import ConfigError, LakeError, NotCachedError, RefNotFoundError
from .policy import DEFAULT_LEASE_TIMEOUT
from .refs import Ref
from .select import Selection

from .store import SiteStore, site_errors

log = logging.getLogger("cachehub")


def commit_id_of(ctx: Context, ref: Ref, store: SiteStore) -> str:
    """The full commit id ``ref`` names, as fresh as the rules below allow.

    * a full commit id: itself (no catalog, no lake);
    * online: the catalog, which reads the lake first when what it knows of the dataset's tags
      is older than ``max_staleness`` (default 60 s) -- so a tag is never staler than that;
    * the lake unreachable (down, no credentials), or ``CACHEHUB_OFFLINE=1``: the catalog as it
      is, then the refs the site recorded when it cached each commit (``<root>/refs/``), so a
      pod with no credentials and no catalog resolves ``NAME@TAG`` from the site alone.
    """
    if ref.is_full_id:
        return ref.ref
    if ctx.settings.offline:
        found = index.lookup_local(ctx, ref)
        if found is not None:
            return found.id
        return _from_site_refs(store, ref, why="CACHEHUB_OFFLINE=1")
    try:
        return index.resolve_commit(ctx, ref, max_age=ctx.settings.max_staleness).id
    except (LakeError, ConfigError) as exc:  # the lake cannot be reached, or read with what this host has
        found = index.lookup_local(ctx, ref)
        where = "this home's catalog" if found is not None else f"site {store.name}'s refs"
        commit_id = found.id if found is not None else _from_site_refs(store, ref, why=str(exc))
        log.warning("the lake could not be read (%s); %s answered from %s", exc, ref, where)
        return commit_id


def _from_site_refs(store: SiteStore, ref: Ref, *, why: str) -> str:
    recorded = store.site_ref(ref.dataset, ref.ref)
    if recorded is None or not store.is_cached(recorded[0]):
        raise RefNotFoundError(
            f"{ref} is not known here without the lake ({why}), and site {store.name} holds no commit cached as {ref}; "
            f"give a full commit id, or reach the lake",
            dataset=ref.dataset,
            ref=ref.ref,
        )
    return recorded[0]


def entry_of(store: SiteStore, commit_id: str, selection: Selection) -> str:
    """The site entry that serves ``selection`` of ``commit_id``: its partial cache if published,
    else the whole commit (a superset) if that is, else the partial entry's id (to cache)."""
    if not selection:
        return commit_id
    entry = selection.entry_id(commit_id)
    if not store.is_cached(entry) and store.is_cached(commit_id):
        return commit_id
    return entry


def resolve(
    ctx: Context,
    ref: str | Ref,
    *,
    site: str | None = None,
    fetch: bool = False,
    as_ref: str | None = None,
    selection: Selection = Selection(),
) -> Path:
    """The local, read-only path of a cached commit; with ``fetch`` cache it first.

    A bare resolve protects the entry for the site's ``grace`` period (default 10 min); hold a
    lease with ``use()`` for longer jobs. ``as_ref`` is the ref to record when ``ref`` was
    already resolved to a commit id by the caller. With a ``selection`` (include/exclude
    patterns) the path is that partial cache's tree, or the whole commit's when that is cached.
    """
    parsed = Ref.of(ref)
    store = ctx.store(site)
    commit_id = commit_id_of(ctx, parsed, store)
    entry = entry_of(store, commit_id, selection)
    dataset = parsed.dataset
    ctx.events.hook("pre_resolve", ref=str(ref), site=store.name, commit=commit_id)
    with site_errors(store, f"record the use of {parsed}"):
        store.touch(entry)
        is_present = present(store, entry)
    if not is_present:
        if not fetch:
            raise NotCachedError(
                f"{parsed} ({commit_id[:12]}{', ' + selection.describe() if selection else ''}) is not cached at site "
                f"{store.name}; run: cachehub cache {parsed} --site {store.name}{selection.flags()}",
                dataset=dataset,
                commit=commit_id,
                site=store.name,
            )
        from . import cache_queue  # not at the top, like cache below: only a fetch needs them

        if cache_queue.daemon_info(store) is not None and not selection:
            # a daemon serves this site: one download for every node asking at once
            with site_errors(store, f"queue a request for {parsed}"):
                request = cache_queue.enqueue(store, dataset=dataset, commit=commit_id, ref=parsed.ref)
                cache_queue.wait_for(store, commit_id, request)
        else:
            # imported here, not at the top: resolving a cached commit (``cachehub path`` before
            # every job) never needs the download engine, and importing it (asyncio) costs ~25 ms
            from .cache import cache

            cache(ctx, parsed.at(commit_id), site=store.name, selection=selection)
    recorded = as_ref or parsed.ref
    catalog = ctx.catalog
    with catalog.transaction():  # one commit for the run record and the audit event
        run_id = record_input(ctx, dataset, commit_id, recorded, store.name)
        extra = {"entry": entry} if entry != commit_id else {}
        ctx.events.audit("resolve", dataset=dataset, commit=commit_id, ref=recorded, site=store.name, run=run_id, **extra)
    path = store.commit_path(entry)
    ctx.events.hook("post_resolve", ref=f"{dataset}@{recorded}", dataset=dataset, site=store.name, commit=commit_id, path=str(path))
    return path


def record_input(ctx: Context, dataset: str, commit_id: str, ref: str, site: str) -> str:
    """Note that the current run read ``commit_id`` (one row per run and commit); return the run id."""
    run_id, source = current_run_id()
    now = ctx.now_iso()
    ctx.catalog.open_run(run_id, user=ctx.user, host=ctx.host, site=site, started=now, origin=source)
    ctx.catalog.add_run_input(run_id, dataset, commit_id, ref, site, now)
    return run_id


@contextmanager
def use(
    ctx: Context,
    ref: str | Ref,
    *,
    site: str | None = None,
    fetch: bool = False,
    run: str | None = None,
    timeout: float | None = None,
    selection: Selection = Selection(),
) -> Iterator[Path]:
    """``with use(ctx, "ds@v3") as path:`` -- the path, leased for the block's duration.

    The lease lives on the site root (every host sees it), renews its heartbeat from a
    background thread, and is released when the block ends, even on error. With a
    ``selection``, the lease is on the entry that serves it (``entry_of``).
    """
    from .lease import Lease

    parsed = Ref.of(ref)
    store = ctx.store(site)
    commit_id = commit_id_of(ctx, parsed, store)
    entry = entry_of(store, commit_id, selection)
    with site_errors(store, f"take a lease on {parsed}"):
        held = Lease(store, entry, user=ctx.user, run=run, timeout=timeout or DEFAULT_LEASE_TIMEOUT)
    try:
        path = resolve(ctx, parsed.at(commit_id), site=site, fetch=fetch, as_ref=parsed.ref, selection=selection)
        ctx.events.audit(
            "use", dataset=parsed.dataset, commit=commit_id, ref=parsed.ref, site=store.name, lease=held.id, run=run or current_run_id()[0]
        )
        yield path
    finally:
        held.release()


def present(store: SiteStore, commit_id: str) -> bool:
    """Is the tree published? Called after the use was recorded; waits out a running eviction."""
    store.wait_while_evicting(commit_id)
    return store.is_cached(commit_id)


def request_cache(ctx: Context, ref: str, *, site: str | None = None) -> Path:
    """Ask the site's daemon to cache ``ref``; returns the request file at once."""
    from . import cache_queue

    commit = index.resolve_commit(ctx, ref, refresh_first=True)
    store = ctx.store(site)
    with site_errors(store, f"queue a request for {ref}"):
        request = cache_queue.enqueue(store, dataset=commit.dataset, commit=commit.id, ref=ref)
    ctx.events.audit("cache-request", dataset=commit.dataset, commit=commit.id, ref=ref, site=store.name)
    return request


def wait_cached(
    ctx: Context,
    ref: str | Ref,
    *,
    site: str | None = None,
    timeout: float = 86400.0,
    request: Path | None = None,
    report: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Wait until the commit ``ref`` names is cached at ``site``, by whoever caches it; its path.

    Fetches nothing: this is what a training pod's init container runs while shards, a daemon
    (``request`` is then its queue entry: a failed request ends the wait) or another host cache
    the commit. Polls the site root (0.2 s, growing to 5 s); ``report`` gets a line every 30 s
    saying what it waits for. The use is recorded (``used/``) when it returns, like ``resolve``.
    Raises NotCachedError after ``timeout`` seconds.
    """
    from . import cache_queue

    parsed = Ref.of(ref)
    store = ctx.store(site)
    commit_id = commit_id_of(ctx, parsed, store)
    started = clock()
    poll, last_report = 0.2, started
    with site_errors(store, f"wait for {parsed}"):
        while not store.is_cached(commit_id):
            if request is not None:
                cache_queue.raise_if_failed(request, commit_id)
            now = clock()
            if now - started >= timeout:
                raise NotCachedError(
                    f"waited {now - started:.0f}s for {parsed} ({commit_id[:12]}) to be cached at site {store.name}, "
                    f"and nobody published it; see `cachehub status --site {store.name}` (is a cache, its shards "
                    "or the daemon running?), or raise --timeout",
                    dataset=parsed.dataset,
                    commit=commit_id,
                    site=store.name,
                )
            if report is not None and now - last_report >= 30:
                last_report = now
                building = [p for p in store.partials() if p.commit == commit_id]
                state = f"being fetched (from {building[0].host})" if building else "not being fetched yet"
                report(f"waiting for {parsed} ({commit_id[:12]}) at site {store.name}: {state}, {now - started:.0f}s so far")
            sleep(min(poll, max(0.0, timeout - (now - started))))
            poll = min(poll * 2, 5.0)
        store.touch(commit_id)
    return store.commit_path(commit_id)
