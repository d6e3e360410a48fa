"""What a site holds and how full it is, and its leases: typed values for the CLI, the daemon
and the dashboard to format (they compute nothing themselves)."""

from __future__ import annotations

from datetime import UTC, datetime

from . import cache_queue, lease
from .results import CachedCommitStatus, LeaseStatus, PartialStatus, SiteStatus
from .store import SiteStore, fs_space


def site_status(store: SiteStore) -> SiteStatus:
    """Per site: cached commits, their sizes, bytes shared between them, filesystem space."""
    laid_out = store.exists()
    commits = list(store.cached()) if laid_out else []
    objects, object_bytes = store.usage() if laid_out else (0, 0)  # the ledger: never a walk of objects/
    logical = sum(c.bytes for c in commits)
    if store.site.link == "copy":  # trees are copies: nothing is shared with objects/
        object_bytes += logical
    live = [x for x in lease.leases(store) if x.live()] if laid_out else []
    return SiteStatus(
        site=store.name,
        root=str(store.root),
        link=store.site.link,
        commits=tuple(
            CachedCommitStatus(
                c.dataset, c.commit, c.files, c.bytes, c.cached_at, iso(c.last_used), str(c.path),
                c.source_commit, c.selection.to_json() if c.selection else None,
            )  # fmt: skip
            for c in commits
        ),
        objects=objects,
        object_bytes=object_bytes,
        logical_bytes=logical,
        shared_bytes=max(0, logical - object_bytes),
        quota=store.site.quota,
        ttl=store.site.ttl,
        leases=len(live),
        pinned=sum(1 for c in commits if lease.is_pinned(store, c.commit)),
        queue_depth=cache_queue.depth(store) if laid_out else 0,
        daemon=cache_queue.daemon_info(store) if laid_out else None,
        **fs_space(store.root),
        state="ok" if laid_out else "missing",
        partial=tuple(
            PartialStatus(p.dataset, p.commit, p.host, iso(p.started), iso(p.started + store.site.keep_partial), store.partial_builder_alive(p))
            for p in (store.partials() if laid_out else ())
        ),
    )


def lease_status(store: SiteStore) -> list[LeaseStatus]:
    """Every lease at a site with whether its holder is alive."""
    return [LeaseStatus(x.id, x.commit, x.host, x.pid, x.user, x.run, x.created, x.live()) for x in lease.leases(store)]


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
