"""The Python API: ``Hub``, a thin facade over the workers.

A ``Hub`` holds one ``Context`` (settings, lake, catalog, identity, clock, the audit/hook sink)
and each method is one call into the worker module named after its verb: ``push.push``,
``cache.cache``, ``access.resolve``, ``evict.run``, ``purge.purge``... Every CLI command is a
few lines over one method here. Module-level shortcuts in ``cachehub/__init__.py`` use a
default hub built from the environment. See docs/architecture.md for who owns what.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from . import access, audit, cache, doctor, evict, index, lakeverify, lineage, purge, push, restore, runs, shard, sites, status, tags, verify
from .catalog import Catalog
from .config import Settings, lake_identity, lake_uri
from .context import Context
from .diff import diff_files
from .errors import NotCachedError
from .gc import gc as collect
from .lake import Lake
from .lease import pin, unpin
from .manifest import read_manifest
from .model import CacheResult, Commit, DatasetInfo, DiffEntry, ManifestEntry, PushResult, Site, Tag, VerifyResult
from .results import AuditEvent, DoctorReport, GcResult, LakeVerifyResult, LeaseStatus, PurgeResult, RestoreResult, ShardResult, SiteStatus, Subscription
from .policy import parse_duration
from .progress import NULL, Progress
from .refs import Ref, validate_dataset_name, validate_tag_name
from .select import Selection
from .sites import init
from .store import site_errors


Patterns = str | Iterable[str] | None  # glob patterns of a partial cache (cachehub.select)


class Hub:
    """cachehub for one user: every verb of the library, over one Context."""

    def __init__(self, settings: Settings | None = None, *, home: str | os.PathLike[str] | None = None) -> None:
        self.ctx = Context(settings, home=home)

    # -- plumbing ----------------------------------------------------------------------------
    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    @property
    def user(self) -> str:
        return self.ctx.user

    @property
    def lake(self) -> Lake:
        return self.ctx.lake

    @property
    def catalog(self) -> Catalog:
        return self.ctx.catalog

    def close(self) -> None:
        self.ctx.close()

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def manifest_path(self, manifest_id: str) -> Path:
        """A verified local copy of a manifest, fetched from the lake once."""
        return self.ctx.manifest(manifest_id)

    def manifest(self, commit: Commit) -> Iterator[ManifestEntry]:
        """Stream a commit's manifest entries."""
        return read_manifest(self.manifest_path(commit.manifest))

    # -- the index of the lake ---------------------------------------------------------------
    def refresh(self, dataset: str) -> bool:
        """Index a dataset's commits and tags from the lake; False if the lake has no such dataset."""
        return index.refresh(self.ctx, dataset)

    def rebuild_catalog(self) -> dict[str, object]:
        """Rebuild the index from the lake alone (and the site roots); the audit trail is kept."""
        return index.rebuild(self.ctx)

    def resolve_commit(self, ref: str | Ref, *, refresh: bool = False) -> Commit:
        """The commit a ``name@ref`` names; distinct errors for unknown dataset, ref, ambiguity."""
        return index.resolve_commit(self.ctx, ref, refresh_first=refresh)

    # -- publishing and browsing -------------------------------------------------------------
    def push(self, directory: str | os.PathLike[str], dataset: str, **options: object) -> PushResult:
        """Publish a directory as a new commit (options: see ``cachehub.push.publish``)."""
        return push.push(self.ctx, directory, dataset, **options)

    def snapshot(self, directory: str | os.PathLike[str], dataset: str, **options: object) -> PushResult:
        """A new commit from a working directory, re-hashing only files changed since last seen
        (options: ``message``, ``run``, ``derived_from``, ``tag``, ``progress``; see ``cachehub.push.snapshot``)."""
        return push.snapshot(self.ctx, directory, dataset, **options)  # type: ignore[arg-type]

    def tag(self, ref: str, tag: str, *, force: bool = False) -> Tag:
        """Point ``tag`` at the commit ``ref`` names, by compare-and-swap in the lake."""
        validate_tag_name(tag)
        return tags.tag(self.ctx, self.resolve_commit(ref), tag, force=force)

    def datasets(self) -> list[DatasetInfo]:
        """Every dataset in the lake, with commit count, newest commit and tags."""
        catalog = self.catalog
        for name in self.lake.datasets():
            if not catalog.has_dataset(name):
                index.refresh(self.ctx, name)
        out = []
        for name in catalog.dataset_names():
            latest = catalog.latest(name)
            tagged = tuple(t.name for t in catalog.tags(name))
            created = latest.created if latest else None
            out.append(DatasetInfo(name, catalog.count_commits(name), latest.id if latest else None, created, tagged))
        return out

    def log(self, dataset: str, *, limit: int | None = None) -> list[Commit]:
        """A dataset's commits, newest first."""
        self.resolve_commit(Ref(validate_dataset_name(dataset)), refresh=True)
        return self.catalog.log(dataset, limit=limit)

    def show(self, ref: str) -> Commit:
        """One commit's metadata (with its tags)."""
        return self.resolve_commit(ref, refresh=True)

    def ls(self, ref: str, subpath: str = "") -> Iterator[ManifestEntry]:
        """The files of a commit (streamed), optionally only those under ``subpath``."""
        commit = self.resolve_commit(ref)  # errors now, not on first iteration
        prefix = subpath.strip("/")
        entries = self.manifest(commit)
        if not prefix:
            return entries
        return (e for e in entries if e.path == prefix or e.path.startswith(prefix + "/"))

    def diff(self, old: str, new: str) -> Iterator[DiffEntry]:
        """Added, removed and modified paths from ``old`` to ``new`` (one linear merge)."""
        a, b = self.resolve_commit(old), self.resolve_commit(new)
        return diff_files(self.manifest_path(a.manifest), self.manifest_path(b.manifest))

    # -- sites and caches --------------------------------------------------------------------
    def site_add(self, name: str, root: str | os.PathLike[str], *, link: str | None = None, **policy: object) -> Site:
        """Add a site: lay out a new root with its policy, or join a root another host laid out."""
        return sites.add(self.ctx, name, root, link=link, **policy)

    def site_set(self, name: str, *, root: str | os.PathLike[str] | None = None, create: bool = False, **changes: object) -> Site:
        """Change a site's policy (for every host using the root), or this home's root for it."""
        return sites.set_(self.ctx, name, root=root, create=create, **changes)

    def sites(self) -> list[Site]:
        """Every configured site, with the policy its root holds (this home's values if unreachable)."""
        return [self.ctx.store(s.name, check=False).site for s in sorted(self.settings.sites.values(), key=lambda s: s.name)]

    def cache(
        self,
        ref: str,
        *,
        site: str | None = None,
        progress: Progress = NULL,
        jobs: int | None = None,
        include: Patterns = None,
        exclude: Patterns = None,
    ) -> CacheResult:
        """Materialise a commit at a site, fetching only the content the site lacks.

        ``include``/``exclude`` (glob patterns, ``cachehub.select``) cache only those files, as a
        partial entry of its own (``result.entry``); ``resolve`` and ``use`` take the same.
        """
        return cache.cache(self.ctx, ref, site=site, progress=progress, jobs=jobs, selection=Selection.of(include, exclude))

    def cache_shard(
        self, ref: str, part: str | shard.Shard, *, site: str | None = None, progress: Progress = NULL, jobs: int | None = None
    ) -> ShardResult:
        """Fetch shard ``K/N`` (``"2/8"`` or a ``Shard``) of a commit into a site; publish it if complete.

        See ``cachehub.shard``: shards never overlap, and the one that finds every object at
        the site publishes the commit.
        """
        which = part if isinstance(part, shard.Shard) else shard.Shard.parse(part)
        return shard.cache_shard(self.ctx, ref, which, site=site, progress=progress, jobs=jobs)

    def wait(
        self, ref: str, *, site: str | None = None, timeout: float = 86400.0, request: Path | None = None, report: Callable[[str], None] | None = None
    ) -> Path:
        """Wait until a commit is cached at a site by anyone (shards, a daemon, another host); its path."""
        return access.wait_cached(self.ctx, ref, site=site, timeout=timeout, request=request, report=report)

    def cache_async(self, ref: str, *, site: str | None = None) -> Path:
        """Ask the site's daemon to cache ``ref``; returns the request file at once."""
        return access.request_cache(self.ctx, ref, site=site)

    def verify(
        self,
        ref: str,
        *,
        site: str | None = None,
        repair: bool = False,
        progress: Progress = NULL,
        include: Patterns = None,
        exclude: Patterns = None,
    ) -> VerifyResult:
        """Re-hash a cached commit (or a partial cache of it) against its manifest; optionally repair it."""
        return verify.verify(self.ctx, ref, site=site, repair=repair, progress=progress, selection=Selection.of(include, exclude))

    def resolve(
        self,
        ref: str,
        *,
        site: str | None = None,
        fetch: bool = False,
        as_ref: str | None = None,
        include: Patterns = None,
        exclude: Patterns = None,
    ) -> Path:
        """The local, read-only path of a cached commit; with ``fetch`` cache it first.

        A full commit id is answered from the site root alone; a tag or prefix from the local
        catalog. With ``include``/``exclude``, the partial cache of those files (or the whole
        commit's tree when that is cached). See ``cachehub.access.resolve``.
        """
        return access.resolve(self.ctx, ref, site=site, fetch=fetch, as_ref=as_ref, selection=Selection.of(include, exclude))

    def use(
        self,
        ref: str,
        *,
        site: str | None = None,
        fetch: bool = False,
        run: str | None = None,
        timeout: float | None = None,
        include: Patterns = None,
        exclude: Patterns = None,
    ) -> AbstractContextManager[Path]:
        """``with hub.use("ds@v3") as path:`` -- the path, leased for the block's duration."""
        selection = Selection.of(include, exclude)
        return access.use(self.ctx, ref, site=site, fetch=fetch, run=run, timeout=timeout, selection=selection)

    def status(self, site: str | None = None) -> list[SiteStatus]:
        """Per site: cached commits, their sizes, bytes shared between them, filesystem space."""
        names = [site] if site else sorted(self.settings.sites)
        return [status.site_status(self.ctx.store(name, check=False)) for name in names]

    def leases(self, site: str | None = None) -> list[LeaseStatus]:
        """Every lease at a site with whether its holder is alive."""
        return status.lease_status(self.ctx.store(site))

    def pin(self, ref: str, *, site: str | None = None, reason: str = "") -> bool:
        """Keep a cached entry hot: a pinned entry is never evicted. False if already pinned."""
        commit = self.resolve_commit(ref)
        store = self.ctx.store(site)
        if not store.is_cached(commit.id):
            raise NotCachedError(f"{ref} is not cached at site {store.name}; cache it first: cachehub cache {ref}")
        with site_errors(store, f"pin {ref}"):
            changed = pin(store, commit.id, user=self.user, reason=reason)
        self.ctx.events.audit("pin", dataset=commit.dataset, commit=commit.id, ref=ref, site=store.name, reason=reason, changed=changed)
        return changed

    def unpin(self, ref: str, *, site: str | None = None) -> bool:
        commit = self.resolve_commit(ref)
        store = self.ctx.store(site)
        with site_errors(store, f"unpin {ref}"):
            changed = unpin(store, commit.id)
        self.ctx.events.audit("unpin", dataset=commit.dataset, commit=commit.id, ref=ref, site=store.name, changed=changed)
        return changed

    def plan_eviction(
        self,
        *,
        site: str | None = None,
        refs: Iterable[str] | None = None,
        expired_only: bool = False,
        need_bytes: int = 0,
        now: float | None = None,
        keep: set[bytes] | None = None,
    ) -> evict.EvictionPlan:
        """What an eviction would remove, and why; nothing is changed."""
        only = [self.resolve_commit(r).id for r in refs] if refs else None
        store = self.ctx.store(site)
        now = self.ctx.now() if now is None else now
        return evict.plan(store, now=now, only=only, expired_only=expired_only, need_bytes=need_bytes, keep=keep, source=self.ctx.manifest_source())

    def evict(
        self,
        refs: Iterable[str] | None = None,
        *,
        site: str | None = None,
        expired_only: bool = False,
        dry_run: bool = False,
        now: float | None = None,
        reason: str | None = None,
    ) -> tuple[evict.EvictionPlan, evict.EvictionResult | None]:
        """Plan and (unless ``dry_run``) carry out an eviction; every removal is audited (``evict.run``).

        A ref names every entry of its commit at the site: the whole commit and its partial caches.
        """
        store = self.ctx.store(site)
        only = None
        if refs:
            ids = {self.resolve_commit(r).id for r in refs}
            with site_errors(store, "list the site's entries"):
                partial = [c.commit for c in store.cached() if c.source_commit in ids and c.commit not in ids]
            only = sorted(ids) + partial
        return evict.run(self.ctx, store, only=only, expired_only=expired_only, dry_run=dry_run, now=now, reason=reason)

    def gc(self, *, site: str | None = None, dry_run: bool = False) -> GcResult:
        """Remove content objects no cached commit at the site references."""
        store = self.ctx.store(site)
        with site_errors(store, "collect garbage"):
            count, nbytes = collect(store, dry_run=dry_run, source=self.ctx.manifest_source())
        if not dry_run:
            self.ctx.events.audit("gc", site=store.name, objects=count, bytes=nbytes)
        return GcResult(count, nbytes, dry_run)

    def subscribe(self, ref: str, *, site: str | None = None, every: str | float = "10m") -> Subscription:
        """Keep ``ref`` (usually ``name@latest``) cached at a site: the daemon checks every ``every``."""
        from .errors import ConfigError

        parsed = Ref.of(ref)
        self.resolve_commit(Ref(parsed.dataset))  # the dataset must exist
        site_name = self.ctx.site(site).name
        seconds = parse_duration(every)
        if seconds < 1:
            raise ConfigError("a subscription must be checked at least every few seconds: use e.g. --every 10m")
        sub_id = self.catalog.add_subscription(parsed.dataset, parsed.ref, site_name, seconds)
        self.ctx.events.audit("subscribe", dataset=parsed.dataset, ref=parsed.ref, site=site_name, every=seconds)
        return self.catalog.subscription(sub_id)  # type: ignore[return-value]

    def unsubscribe(self, ref: str, *, site: str | None = None) -> bool:
        parsed = Ref.of(ref)
        site_name = self.ctx.site(site).name
        removed = self.catalog.remove_subscription(parsed.dataset, parsed.ref, site_name)
        if removed:
            self.ctx.events.audit("unsubscribe", dataset=parsed.dataset, ref=parsed.ref, site=site_name)
        return removed

    def subscriptions(self) -> list[Subscription]:
        return self.catalog.subscriptions()

    # -- provenance: audit, lineage, runs, snapshots ----------------------------------------
    def ship_audit(self) -> int:
        """Copy unshipped audit events to the lake; a lake that cannot be reached is retried later."""
        return audit.ship_quietly(self.ctx)

    def audit(self, **filters: str | None) -> list[AuditEvent]:
        """Audit events (filters: dataset, action, user, since, commit), oldest first."""
        return [AuditEvent(**e) for e in self.catalog.audit_events(**filters)]  # type: ignore[arg-type]

    def audit_verify(self) -> list[audit.ChainProblem]:
        """Check every hash chain in the catalog; an empty list means intact."""
        return audit.verify(self.ctx)

    def audit_count(self) -> int:
        return self.catalog.count_audit_events()

    def lineage(self, ref: str, *, up: bool = True, down: bool = True, depth: int | None = None) -> lineage.Graph:
        """The lineage subgraph around a commit (a purged commit still has its lineage)."""
        return lineage.around(self.ctx, ref, up=up, down=down, depth=depth)

    def restore(self, ref: str, directory: str | os.PathLike[str], *, jobs: int | None = None) -> RestoreResult:
        """A writable working copy of a commit in ``directory``; history is never changed."""
        return restore.restore(self.ctx, ref, Path(directory), jobs=jobs)

    def doctor(self, *, record: bool = True) -> DoctorReport:
        """What the lake's server guarantees, recorded in the lake marker (``cachehub.doctor``)."""
        return doctor.doctor(self.ctx, record=record)

    def verify_lake(self, *, datasets: list[str] | None = None, sample: float | None = None, restart: bool = False,
                    jobs: int | None = None, progress: Progress = NULL) -> LakeVerifyResult:  # fmt: skip
        """Check the lake itself, sampled or in full, resumably (``cachehub.lakeverify``)."""
        return lakeverify.verify_lake(self.ctx, datasets=datasets, sample=sample, restart=restart, jobs=jobs, progress=progress)

    def purge(self, ref: str, *, reason: str) -> PurgeResult:
        """Erase a commit (right to erasure): unshared content in the lake and at every site."""
        return purge.purge(self.ctx, ref, reason=reason)

    def run(
        self,
        command: list[str],
        *,
        uses: Iterable[str] = (),
        snapshots: Iterable[tuple[str, str]] = (),
        site: str | None = None,
        snapshot_on_failure: bool = False,
    ) -> runs.RunResult:
        """Run ``command`` with leased inputs; record the run; snapshot its outputs (see runs.py)."""
        return runs.run_command(self.ctx, command, uses=list(uses), snapshots=list(snapshots), site=site, snapshot_on_failure=snapshot_on_failure)


__all__ = ["Hub", "NULL", "Progress", "init", "lake_identity", "lake_uri"]
