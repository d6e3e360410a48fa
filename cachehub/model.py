"""Frozen values that cross module lines."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .fsutil import HOST, now_iso


def to_dict(value: Any) -> dict[str, Any]:
    """A JSON-ready dict of a model dataclass (tuples become lists)."""
    return asdict(value)



@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One file of a commit: its relative path, size in bytes and SHA-256 (hex) of its bytes."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Commit:
    """One immutable version of a dataset; ``id`` is the SHA-256 of its canonical JSON."""

    id: str
    dataset: str
    manifest: str  # SHA-256 of the uncompressed manifest text
    files: int
    bytes: int
    parents: tuple[str, ...]
    author: str
    host: str
    message: str
    created: str  # ISO 8601, UTC
    derived_from: tuple[str, ...] = ()
    transform: str | None = None
    tags: tuple[str, ...] = field(default=(), compare=False)
    run: str | None = None  # the run that produced it (``cachehub run --snapshot``)

    @property
    def short(self) -> str:
        return self.id[:12]


@dataclass(frozen=True)
class DiffEntry:
    """One path that differs between two manifests."""

    path: str
    change: str  # "added" | "removed" | "modified"
    old_size: int | None
    new_size: int | None


@dataclass(frozen=True)
class DiffStat:
    added: int = 0
    removed: int = 0
    modified: int = 0
    added_bytes: int = 0
    removed_bytes: int = 0
    modified_bytes: int = 0  # new size of modified files


@dataclass(frozen=True)
class PushResult:
    dataset: str
    commit: str | None  # None when nothing changed
    created: bool
    files: int
    bytes: int
    uploaded_files: int
    uploaded_bytes: int
    present_files: int
    present_bytes: int
    tag: str | None
    seconds: float
    hashed_files: int = 0  # files read and hashed (the rest were unchanged since last seen)
    repaired_files: int = 0  # push --repair: lake copies that were missing or damaged, uploaded again


@dataclass(frozen=True)
class Tag:
    dataset: str
    name: str
    commit: str


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    commits: int
    latest: str | None
    latest_created: str | None
    tags: tuple[str, ...]


@dataclass(frozen=True)
class Site:
    """A cache location near compute and its policy (see docs/operations.md)."""

    name: str
    root: str
    link: str = "auto"  # auto | hardlink | symlink | copy
    ttl: float = 86400.0  # seconds idle before an entry expires; 0 disables
    quota: int | None = None  # bytes the site may use; None: only the filesystem limits it
    low_watermark: float = 0.8  # capacity eviction frees down to this fraction of the quota
    min_free: float = 0.0  # fraction of the filesystem to keep free; 0 disables
    grace: float = 600.0  # a bare resolve() protects an entry this many seconds
    keep_partial: float = 86400.0  # objects of an interrupted cache are kept this long for a re-run
    group: str | None = None  # Unix group sharing the site: trees group-readable, state dirs group-writable


@dataclass(frozen=True)
class CacheResult:
    dataset: str
    commit: str
    site: str
    path: str
    fetched_files: int
    fetched_bytes: int
    reused_files: int
    reused_bytes: int
    files: int
    bytes: int
    seconds: float
    already_cached: bool
    evicted: tuple[str, ...] = ()  # "dataset@commit" entries evicted to make room (admission)
    # of fetched_bytes, how many were copied from an older version of the same file already
    # at the site (chunk-level delta) instead of downloaded: network bytes = the difference
    chunk_copied_bytes: int = 0
    # the site entry: the commit id, or ``<commit>-<digest>`` for a partial cache (select.py)
    entry: str = ""


@dataclass(frozen=True)
class CacheEntry:
    """One commit materialised at one site."""

    site: str
    commit: str
    dataset: str
    path: str
    files: int
    bytes: int
    cached_at: str
    last_used: str | None


@dataclass(frozen=True)
class VerifyResult:
    dataset: str
    commit: str
    site: str
    files: int
    damaged: tuple[str, ...]
    missing: tuple[str, ...]
    repaired: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not (set(self.damaged) | set(self.missing)) - set(self.repaired)


@dataclass(frozen=True)
class Tombstone:
    """A purged commit, as recorded in the lake (``datasets/<name>/tombstones/<id>.json``)."""

    commit: str
    dataset: str
    reason: str
    purged_by: str
    purged: str  # ISO 8601, UTC
    host: str = ""












@dataclass
class RunRecord:
    """A run as written to the lake (``runs/<id>.json``)."""

    id: str
    origin: str
    user: str
    host: str = HOST
    site: str | None = None
    command: list[str] = field(default_factory=list)
    started: str = field(default_factory=now_iso)
    ended: str | None = None
    status: str = "running"  # running | succeeded | failed
    exit_code: int | None = None
    duration: float | None = None
    inputs: list[dict] = field(default_factory=list)  # {dataset, commit, ref, site}
    outputs: list[dict] = field(default_factory=list)  # {dataset, commit}


@dataclass(frozen=True)
class RunResult:
    id: str
    status: str
    exit_code: int
    duration: float
    inputs: tuple[dict, ...]
    outputs: tuple[dict, ...]
