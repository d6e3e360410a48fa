"""Typed results of the facade's site and provenance operations (``Hub.status``, ``leases``,
``gc``, ``subscriptions``, ``audit``, ``init``, ``restore``, ``purge``).

Kept apart from ``model.py`` (the values every worker passes around) so that the short paths --
``cachehub path`` before every training job -- do not build these classes at import.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any


class Fields(Mapping[str, Any]):
    """A typed result that also reads as a mapping of its fields (``status["commits"]``).

    ``Hub.status()``, ``gc()``, ``leases()``, ``subscriptions()``, ``audit()`` and ``init()``
    returned plain dicts before they became frozen dataclasses; as read-only mappings they still
    compare equal to those dicts, so scripts written against them keep working. New code reads
    attributes. Subclasses are declared ``@dataclass(frozen=True, eq=False)`` so that equality
    is the mapping's (field by field, with a dict or another result).
    """

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:  # type: ignore[attr-defined]
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)  # type: ignore[attr-defined]


@dataclass(frozen=True, eq=False)
class DaemonInfo(Fields):
    """The daemon serving a site, as it announces itself in ``<root>/daemon.json``."""

    host: str
    pid: int
    listen: str | None
    started: str


@dataclass(frozen=True, eq=False)
class Subscription(Fields):
    """Keep ``dataset@ref`` cached at ``site``; the daemon checks every ``every`` seconds."""

    id: int
    dataset: str
    ref: str
    site: str
    every: float
    created: str


@dataclass(frozen=True, eq=False)
class CachedCommitStatus(Fields):
    dataset: str
    commit: str
    files: int
    bytes: int
    cached_at: str
    last_used: str | None  # ISO 8601, UTC
    path: str
    # a partial cache (cache --include/--exclude): ``commit`` is then the entry's id
    # (``<commit>-<digest>``), ``of_commit`` the commit and ``selection`` its patterns
    of_commit: str = ""
    selection: dict | None = None


@dataclass(frozen=True, eq=False)
class PartialStatus(Fields):
    """A cache that fetched objects and stopped: they are kept until ``expires`` for a re-run."""

    dataset: str
    commit: str
    host: str
    started: str | None  # ISO 8601, UTC: when it last ran
    expires: str | None
    running: bool


@dataclass(frozen=True, eq=False)
class SiteStatus(Fields):
    """One site as ``cachehub status`` shows it: what it holds and how full it is."""

    site: str
    root: str
    link: str
    commits: tuple[CachedCommitStatus, ...]
    objects: int  # distinct content objects
    object_bytes: int  # bytes on disk (objects, plus the trees of a copy-mode site)
    logical_bytes: int  # bytes as readers see them (sum over cached commits)
    shared_bytes: int  # logical bytes stored once for several files or commits
    quota: int | None
    ttl: float
    leases: int  # live leases
    pinned: int
    queue_depth: int
    daemon: DaemonInfo | None
    fs_total: int | None
    fs_used: int | None
    fs_free: int | None
    partial: tuple[PartialStatus, ...] = ()
    state: str = "ok"  # "ok", or "missing": the root has no marker (an unmounted export?)


@dataclass(frozen=True, eq=False)
class LeaseStatus(Fields):
    """A lease at a site and whether its holder is alive."""

    lease: str
    commit: str
    host: str
    pid: int
    user: str
    run: str | None
    created: str
    live: bool


@dataclass(frozen=True, eq=False)
class GcResult(Fields):
    objects: int
    bytes: int
    dry_run: bool


@dataclass(frozen=True, eq=False)
class InitResult(Fields):
    config: str
    catalog: str
    lake: str
    site: str
    site_root: str
    #: what ``cachehub doctor`` (run by init) found missing or degraded at the lake's server
    server_gaps: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class DoctorCheck(Fields):
    """One guarantee of the object-store contract, as ``cachehub doctor`` found it."""

    name: str
    state: str  # "ok", "degraded" (worked around) or "missing" (operations that need it are refused)
    detail: str
    affects: str  # what the gap changes, or "" when ok


@dataclass(frozen=True, eq=False)
class DoctorReport(Fields):
    lake: str
    ok: bool
    checks: list[DoctorCheck]
    facts: dict[str, Any]  # what is recorded in the lake marker's ``server.facts``


@dataclass(frozen=True, eq=False)
class AuditEvent(Fields):
    """One event of the hash-chained audit trail."""

    seq: int
    time: str
    user: str
    host: str
    action: str
    dataset: str | None
    commit: str | None
    ref: str | None
    site: str | None
    details: dict
    origin: str
    origin_seq: int
    prev: str
    hash: str


@dataclass(frozen=True)
class RestoreResult:
    dataset: str
    commit: str
    path: str
    files: int
    bytes: int
    from_site: str | None  # the site it was copied from, or None (fetched from the lake)


@dataclass(frozen=True)
class PurgeResult:
    dataset: str
    commit: str
    removed_objects: int
    removed_bytes: int
    kept_shared: int  # objects also used by other commits, kept
    tags_removed: tuple[str, ...]
    sites_evicted: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class ShardResult(Fields):
    """What one shard of a sharded cache did (``cachehub cache --shard K/N``)."""

    dataset: str
    commit: str
    site: str
    shard: str  # "K/N"
    fetched_files: int  # small objects this shard fetched
    fetched_bytes: int  # their bytes plus the bytes of the pieces of large objects it fetched
    fetched_pieces: int  # pieces of large objects it fetched
    published: bool  # the commit is published at the site now
    published_here: bool  # ... and this shard published it
    path: str | None  # the tree, once published
    waiting_for: str | None  # unpublished: the first file whose content another shard still fetches
    seconds: float


@dataclass(frozen=True, eq=False)
class LakeProblem(Fields):
    """One thing ``cachehub lake verify`` found wrong in the lake: its key, what, and the fix."""

    key: str
    what: str
    fix: str


@dataclass(frozen=True, eq=False)
class LakeVerifyResult(Fields):
    lake: str
    datasets: list[str]
    commits: int  # good commit documents read
    manifests: int
    objects: int  # distinct content objects the manifests name
    checked_objects: int  # read back and hashed (all, or the sample), this run and the run it resumed
    checked_bytes: int
    sample: float | None
    resumed_from: int  # objects a previous, interrupted run had already checked
    ok: bool
    problems: list[LakeProblem]
