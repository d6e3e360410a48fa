"""The Python API: one ``Hub`` ties settings, the lake and the catalog together.

Every CLI command is a few lines over one method here. Module-level shortcuts in
``cachehub/__init__.py`` use a default hub built from the environment.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from . import diff as diffmod
from .catalog import Catalog, current_user
from .config import Settings, load_settings
from .errors import (
    AmbiguousRefError,
    CachehubError,
    ConfigError,
    ConflictError,
    DatasetNotFoundError,
    NotCachedError,
    RefNotFoundError,
)
from .lake import Lake
from .manifest import read_manifest
from .model import CacheResult, Commit, DatasetInfo, DiffEntry, ManifestEntry, PushResult, Site, Tag, VerifyResult
from .progress import NULL, Progress
from .refs import LATEST, Ref, parse_ref, validate_dataset_name, validate_tag_name

if TYPE_CHECKING:
    from .evict import EvictionPlan, EvictionResult
    from .store import SiteStore


class Hub:
    """cachehub's state for one user: settings, lake and catalog (opened lazily)."""

    def __init__(self, settings: Settings | None = None, *, home: str | os.PathLike[str] | None = None) -> None:
        self.settings = settings or load_settings(home)
        self._lake: Lake | None = None
        self._catalog: Catalog | None = None
        self._rebuilding = False
        self.user = current_user()

    # -- plumbing ----------------------------------------------------------------------------
    @property
    def lake(self) -> Lake:
        if self._lake is None:
            from cachehub.backends import open_backend

            backend = open_backend(
                self.settings.lake_url, endpoint_url=self.settings.endpoint_url, region=self.settings.region
            )
            lake = Lake(backend)
            lake.check_readable()  # refuse a lake written by a newer cachehub, once per process
            self._lake = lake
        return self._lake

    @property
    def catalog(self) -> Catalog:
        """The catalog, refusing one that indexes a different lake than the configured one."""
        if self._catalog is None:
            catalog = Catalog(self.settings.catalog_path)
            indexed = catalog.get_meta("lake")
            wanted = lake_identity(self.settings.lake_url)
            if indexed is None:
                catalog.set_meta("lake", wanted)
            elif indexed != wanted and not self._rebuilding:
                catalog.close()
                raise ConfigError(
                    f"the catalog {self.settings.catalog_path} indexes the lake {indexed}, not {wanted}; "
                    "run cachehub catalog rebuild to re-index for this lake, or use another CACHEHUB_HOME"
                )
            self._catalog = catalog
        return self._catalog

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None
        if self._lake is not None:
            self._lake.backend.close()
            self._lake = None

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def manifest_path(self, manifest_id: str) -> Path:
        """A verified local copy of a manifest, fetched from the lake once."""
        return self.lake.fetch_manifest(manifest_id, self.settings.manifest_cache)

    def manifest(self, commit: Commit) -> Iterator[ManifestEntry]:
        """Stream a commit's manifest entries."""
        return read_manifest(self.manifest_path(commit.manifest))

    # -- catalog <- lake ---------------------------------------------------------------------
    def refresh(self, dataset: str) -> bool:
        """Index a dataset's commits and tags from the lake; False if the lake has no such dataset.

        Only commits the catalog does not know are read. A damaged commit document is skipped
        (and reported by ``catalog rebuild``) rather than hiding the whole dataset.
        """
        validate_dataset_name(dataset)
        commits, tags, _problems = self._read_dataset(dataset, known=self.catalog.commit)
        tombstones = self._read_tombstones(dataset)
        if commits is None and not tombstones:
            return False
        with self.catalog.transaction():
            self.catalog.add_commits(commits or [])
            self.catalog.replace_tags(dataset, tags)
            self._index_tombstones(tombstones)
            if commits is not None:
                self.catalog.touch_dataset(dataset)
        return commits is not None

    def _read_tombstones(self, dataset: str) -> list[dict]:
        from .restore import read_tombstones

        return read_tombstones(self, dataset)

    def _index_tombstones(self, tombstones: list[dict]) -> None:
        for t in tombstones:
            self.catalog.conn.execute("DELETE FROM commits WHERE id = ?", (t["commit"],))
            self.catalog.conn.execute(
                "INSERT OR REPLACE INTO tombstones VALUES (?,?,?,?,?)", (t["commit"], t["dataset"], t["reason"], t["purged_by"], t["purged"])
            )

    def _read_dataset(self, dataset: str, known: object = None) -> tuple[list[Commit] | None, list[Tag], list[str]]:
        from .errors import CachehubError

        lake = self.lake
        ids = lake.commit_ids(dataset)
        if not ids:
            return None, [], []
        commits, problems = [], []
        for cid in ids:
            if callable(known) and known(cid) is not None:
                continue
            try:
                commits.append(lake.read_commit(dataset, cid))
            except (CachehubError, ValueError, KeyError) as exc:
                problems.append(f"{dataset}/commits/{cid}: {exc}")
        return commits, lake.tags(dataset), problems

    def _read_runs(self) -> list[dict]:
        out = []
        for key in self.lake.backend.list("runs/"):
            if key.endswith(".json"):
                data, _ = self.lake.backend.read(key)
                out.append(json.loads(data))
        return out

    def _index_provenance(self, runs: list[dict]) -> None:
        """Runs from the lake, then run inputs and restores carried by audit events."""
        from .runs import RunRecord

        fields = set(RunRecord.__dataclass_fields__)
        with self.catalog.transaction():
            conn = self.catalog.conn
            for doc in runs:
                record = RunRecord(**{k: v for k, v in doc.items() if k in fields})
                conn.execute(
                    "INSERT OR REPLACE INTO runs (id, user, host, site, started, ended, status, exit_code, duration, command, origin)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (record.id, record.user, record.host, record.site, record.started, record.ended, record.status,
                     record.exit_code, record.duration, json.dumps(record.command), record.origin),
                )  # fmt: skip
                for i in record.inputs:
                    conn.execute(
                        "INSERT OR IGNORE INTO run_inputs (run_id, dataset, commit_id, ref, site, time) VALUES (?,?,?,?,?,?)",
                        (record.id, i["dataset"], i["commit"], i.get("ref"), i.get("site"), record.started),
                    )
            for e in self.catalog.audit_events():
                run = e["details"].get("run")
                if e["action"] in ("resolve", "use") and run and e["commit"]:
                    conn.execute("INSERT OR IGNORE INTO runs (id, user, host, site, started, status, origin) VALUES (?,?,?,?,?,?,?)",
                                 (run, e["user"], e["host"], e["site"], e["time"], "open", "audit"))  # fmt: skip
                    conn.execute(
                        "INSERT OR IGNORE INTO run_inputs (run_id, dataset, commit_id, ref, site, time) VALUES (?,?,?,?,?,?)",
                        (run, e["dataset"], e["commit"], e["ref"], e["site"], e["time"]),
                    )
                elif e["action"] == "restore" and not conn.execute(
                    "SELECT 1 FROM restores WHERE commit_id = ? AND path = ? AND time = ?", (e["commit"], e["details"].get("path"), e["time"])
                ).fetchone():
                    conn.execute("INSERT INTO restores VALUES (?,?,?,?,?,?)", (e["commit"], e["dataset"], e["details"].get("path"), e["host"], e["user"], e["time"]))

    def rebuild_catalog(self) -> dict[str, object]:
        """Rebuild the index from the lake alone (and the site roots); the audit trail is kept.

        The lake is read completely before the catalog is touched, so a lake that cannot be
        read leaves the old catalog as it was.
        """
        from .store import scan_site_entries

        self.lake.check_readable()
        self._rebuilding = True
        try:
            catalog = self.catalog
        finally:
            self._rebuilding = False
        found: list[tuple[str, list[Commit], list[Tag]]] = []
        problems: list[str] = []
        tombstones: list[dict] = []
        for name in self.lake.datasets():
            commits, tags, bad = self._read_dataset(name)
            problems += bad
            tombstones += self._read_tombstones(name)
            if commits:
                found.append((name, commits, tags))
        runs = self._read_runs()
        entries = scan_site_entries(self.settings.sites.values())
        with catalog.transaction():
            catalog.clear_index()
            for name, commits, tags in found:
                catalog.add_commits(commits)
                catalog.replace_tags(name, tags)
                catalog.touch_dataset(name)
            self._index_tombstones(tombstones)
            for entry in entries:
                catalog.add_cache_entry(entry)
            catalog.set_meta("lake", lake_identity(self.settings.lake_url))
        from .audit import import_from_lake

        imported = import_from_lake(self)
        self._index_provenance(runs)
        counts: dict[str, object] = {
            "datasets": len(found),
            "commits": sum(len(c) for _, c, _ in found),
            "tags": sum(len(t) for _, _, t in found),
            "cache_entries": len(entries),
        }
        counts["audit_events_imported"] = imported
        counts["runs"] = len(runs)
        catalog.audit("catalog-rebuild", problems=len(problems), **counts)
        counts["problems"] = problems
        return counts

    # -- refs --------------------------------------------------------------------------------
    def resolve_commit(self, ref: str | Ref, *, refresh: bool = False) -> Commit:
        """The commit a ``name@ref`` names; distinct errors for unknown dataset, ref, ambiguity."""
        parsed = ref if isinstance(ref, Ref) else parse_ref(ref)
        catalog = self.catalog
        if refresh or not catalog.has_dataset(parsed.dataset):
            if not self.refresh(parsed.dataset) and not catalog.has_dataset(parsed.dataset):
                known = catalog.dataset_names()
                hint = f"known datasets: {', '.join(known[:10])}" if known else "the catalog is empty"
                raise DatasetNotFoundError(
                    f"unknown dataset {parsed.dataset!r} ({hint}); publish it with: cachehub push DIR {parsed.dataset}",
                    dataset=parsed.dataset,
                )
            refresh = True  # just refreshed
        found = self._lookup(parsed)
        if found is None and not refresh:
            self.refresh(parsed.dataset)
            found = self._lookup(parsed)
        if found is None:
            self._refuse_purged(parsed)
            tags = [t.name for t in catalog.tags(parsed.dataset)]
            hint = f"tags: {', '.join(tags[:10])}" if tags else "no tags yet"
            raise RefNotFoundError(
                f"{parsed.dataset} has no tag or commit {parsed.ref!r} ({hint}); see: cachehub log {parsed.dataset}",
                dataset=parsed.dataset,
                ref=parsed.ref,
            )
        return found

    def _refuse_purged(self, parsed: Ref) -> None:
        if not parsed.could_be_commit:
            return
        row = self.catalog.conn.execute(
            "SELECT commit_id, reason, user, time FROM tombstones WHERE dataset = ? AND commit_id >= ? AND commit_id < ?",
            (parsed.dataset, parsed.ref, parsed.ref + "g"),
        ).fetchone()
        if row:
            raise RefNotFoundError(
                f"{parsed.dataset}@{row[0][:12]} was purged on {row[3]} by {row[2]} (reason: {row[1]}); it cannot be resolved",
                dataset=parsed.dataset,
                ref=parsed.ref,
            )

    def _hook(self, event: str, **context: object) -> None:
        from .hooks import dispatch

        context.setdefault("lake", lake_uri(self.settings.lake_url))
        dispatch(event, {k: v for k, v in context.items() if v is not None}, self.settings.hooks)

    def _lookup(self, parsed: Ref) -> Commit | None:
        catalog = self.catalog
        if parsed.ref == LATEST:
            return catalog.latest(parsed.dataset)
        tagged = catalog.tag(parsed.dataset, parsed.ref)
        if tagged is not None:
            return catalog.commit(tagged[0])
        if parsed.could_be_commit:
            matches = catalog.commits_with_prefix(parsed.dataset, parsed.ref)
            if len(matches) > 1:
                raise AmbiguousRefError(
                    f"{parsed} matches {len(matches)} commits ({', '.join(c.short for c in matches[:5])}); "
                    "give more characters of the commit id",
                    dataset=parsed.dataset,
                    ref=parsed.ref,
                )
            if matches:
                return matches[0]
        return None

    # -- verbs -------------------------------------------------------------------------------
    def push(self, directory: str | os.PathLike[str], dataset: str, **options: object) -> PushResult:
        """Publish a directory as a new commit (see ``cachehub.push.push`` for options)."""
        from .push import push

        self._hook("pre_push", dataset=dataset, directory=str(directory))
        result = push(self, directory, dataset, **options)  # type: ignore[arg-type]
        self._hook("post_push", dataset=dataset, directory=str(directory), commit=result.commit, created=result.created)
        self.ship_audit()
        return result

    def datasets(self) -> list[DatasetInfo]:
        """Every dataset in the lake, with commit count, newest commit and tags."""
        for name in self.lake.datasets():
            if not self.catalog.has_dataset(name):
                self.refresh(name)
        out = []
        for name in self.catalog.dataset_names():
            latest = self.catalog.latest(name)
            out.append(
                DatasetInfo(
                    name=name,
                    commits=self.catalog.count_commits(name),
                    latest=latest.id if latest else None,
                    latest_created=latest.created if latest else None,
                    tags=tuple(t.name for t in self.catalog.tags(name)),
                )
            )
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
        a = self.resolve_commit(old)
        b = self.resolve_commit(new)
        return diffmod.diff_files(self.manifest_path(a.manifest), self.manifest_path(b.manifest))

    def tag(self, ref: str, tag: str, *, force: bool = False) -> Tag:
        """Point ``tag`` at the commit ``ref`` names, by compare-and-swap in the lake."""
        validate_tag_name(tag)
        commit = self.resolve_commit(ref)
        lake_tag = self.lake.read_tag(commit.dataset, tag)
        if lake_tag is not None and lake_tag[0] == commit.id:
            self.catalog.set_tag(Tag(commit.dataset, tag, commit.id), lake_tag[1])
            return Tag(commit.dataset, tag, commit.id)
        if lake_tag is not None and not force:
            raise ConflictError(
                f"tag {commit.dataset}@{tag} already points at {lake_tag[0][:12]}; pass --force to move it",
                dataset=commit.dataset,
                tag=tag,
            )
        expect: str | bool = lake_tag[1] if lake_tag is not None else False
        try:
            etag = self.lake.write_tag(commit.dataset, tag, commit.id, author=self.user, expect=expect)
        except ConflictError:
            raise ConflictError(
                f"tag {commit.dataset}@{tag} was moved by someone else at the same moment; nothing changed. "
                f"Check with: cachehub show {commit.dataset}@{tag}",
                dataset=commit.dataset,
                tag=tag,
            ) from None
        result = Tag(commit.dataset, tag, commit.id)
        with self.catalog.transaction():
            self.catalog.set_tag(result, etag)
            self.catalog.audit(
                "tag",
                dataset=commit.dataset,
                commit=commit.id,
                ref=tag,
                previous=lake_tag[0] if lake_tag else None,
                forced=bool(force and lake_tag),
            )
        return result


    # -- sites and caches --------------------------------------------------------------------
    def site_add(self, name: str, root: str | os.PathLike[str], *, link: str = "auto", **policy: object) -> Site:
        """Register a site (a cache root near compute) in config.toml and lay out its root.

        ``policy`` takes ``ttl`` ("1d", seconds), ``quota`` ("2T", bytes), ``low_watermark``
        ("80%"), ``min_free`` ("10%") and ``grace`` ("10m"); see docs/operations.md.
        """
        from .config import validate_site_name

        validate_site_name(name)
        if name in self.settings.sites:
            existing = self.settings.sites[name]
            raise ConflictError(
                f"site {name!r} already exists (root {existing.root}); change it with: cachehub site set {name} --root PATH"
            )
        site = _with_policy(Site(name=name, root=os.path.abspath(os.path.expanduser(root))), link=link, **policy)
        return self._save_site(site, "site-add")

    def site_set(self, name: str, *, root: str | os.PathLike[str] | None = None, **changes: object) -> Site:
        """Change a site's root, link mode or policy (an old root is left as it is)."""
        current = self.settings.site(name)
        if root is not None:
            from dataclasses import replace

            current = replace(current, root=os.path.abspath(os.path.expanduser(root)))
        return self._save_site(_with_policy(current, **changes), "site-set")

    def _save_site(self, site: Site, action: str) -> Site:
        from dataclasses import replace

        from .config import update_config
        from .store import SiteStore

        if _inside(self.settings.catalog_path, Path(site.root)):
            raise ConfigError(f"site root {site.root} would contain the catalog; the catalog must stay on local disk outside it")
        SiteStore(site).ensure()

        from .config import site_to_config

        def change(data: dict) -> None:
            data.setdefault("sites", {})[site.name] = site_to_config(site)

        update_config(self.settings.home, change)
        self.settings = replace(self.settings, sites={**self.settings.sites, site.name: site})
        self.catalog.audit(action, site=site.name, **site_to_config(site))
        return site

    def sites(self) -> list[Site]:
        return sorted(self.settings.sites.values(), key=lambda s: s.name)

    def cache(self, ref: str, *, site: str | None = None, progress: Progress = NULL, jobs: int | None = None) -> CacheResult:
        """Materialise a commit at a site, fetching only the content the site lacks."""
        from .sync import cache

        site_name = self.settings.site(site).name
        self._hook("pre_cache", ref=ref, site=site_name)
        result = cache(self, ref, site=site, progress=progress, jobs=jobs)
        self._hook("post_cache", ref=ref, site=site_name, commit=result.commit, path=result.path, fetched_bytes=result.fetched_bytes)
        if not result.already_cached:
            self.ship_audit()
        return result

    def verify(self, ref: str, *, site: str | None = None, repair: bool = False, progress: Progress = NULL) -> VerifyResult:
        """Re-hash a cached commit against its manifest; optionally repair it from the lake."""
        from .sync import verify

        return verify(self, ref, site=site, repair=repair, progress=progress)

    def resolve(self, ref: str, *, site: str | None = None, fetch: bool = False, as_ref: str | None = None) -> Path:
        """The local, read-only path of a cached commit; with ``fetch`` cache it first.

        A full commit id is answered from the site root alone; a tag or prefix from the local
        catalog. The use is recorded (mtime of ``<root>/used/<commit-id>``) *before* the tree
        is checked, so an eviction running at that moment either sees the use and keeps the
        tree, or has already removed it and this call reports it missing. A bare resolve
        protects the entry for the site's ``grace`` period (default 10 min); hold a lease with
        ``use()`` for longer jobs. ``as_ref`` is the ref to record when ``ref`` was already
        resolved to a commit id by the caller.
        """
        from .store import SiteStore

        parsed = parse_ref(ref)
        store = SiteStore(self.settings.site(site))
        if len(parsed.ref) == 64 and parsed.could_be_commit:
            commit_id, dataset = parsed.ref, parsed.dataset
        else:
            commit = self.resolve_commit(parsed)
            commit_id, dataset = commit.id, commit.dataset
        self._hook("pre_resolve", ref=ref, site=store.site.name, commit=commit_id)
        store.touch(commit_id)
        if not _present(store, commit_id):
            if not fetch:
                raise NotCachedError(
                    f"{parsed} ({commit_id[:12]}) is not cached at site {store.site.name}; "
                    f"run: cachehub cache {parsed} --site {store.site.name}",
                    dataset=dataset,
                    commit=commit_id,
                    site=store.site.name,
                )
            from . import cache_queue

            if cache_queue.daemon_info(store) is not None:
                # a daemon serves this site: one download for every node asking at once
                request = cache_queue.enqueue(store, dataset=dataset, commit=commit_id, ref=parsed.ref)
                cache_queue.wait_for(store, commit_id, request)
            else:
                self.cache(f"{dataset}@{commit_id}", site=store.site.name)
        with self.catalog.transaction():  # one commit for the run record and the audit event
            run_id = self._record_input(dataset, commit_id, as_ref or parsed.ref, store.site.name)
            self.catalog.audit("resolve", dataset=dataset, commit=commit_id, ref=as_ref or parsed.ref, site=store.site.name, run=run_id)
        path = store.commit_path(commit_id)
        self._hook("post_resolve", ref=f"{dataset}@{as_ref or parsed.ref}", dataset=dataset, site=store.site.name, commit=commit_id, path=str(path))
        return path

    def _record_input(self, dataset: str, commit_id: str, ref: str, site: str) -> str:
        """Note that the current run read ``commit_id`` (one row per run and commit)."""
        from .runs import current_run_id

        run_id, source = current_run_id()
        conn = self.catalog.conn
        conn.execute(
            "INSERT OR IGNORE INTO runs (id, user, host, site, started, status, origin) VALUES (?,?,?,?,?,?,?)",
            (run_id, self.user, _host(), site, _now(), "open", source),
        )
        conn.execute(
            "INSERT OR IGNORE INTO run_inputs (run_id, dataset, commit_id, ref, site, time) VALUES (?,?,?,?,?,?)",
            (run_id, dataset, commit_id, ref, site, _now()),
        )
        return run_id

    @contextmanager
    def use(
        self,
        ref: str,
        *,
        site: str | None = None,
        fetch: bool = False,
        run: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[Path]:
        """``with hub.use("ds@v3") as path:`` -- the path, leased for the block's duration.

        The lease lives on the site root (every host sees it), renews its heartbeat from a
        background thread, and is released when the block ends, even on error.
        """
        from .lease import Lease
        from .policy import DEFAULT_LEASE_TIMEOUT
        from .store import SiteStore

        parsed = parse_ref(ref)
        store = SiteStore(self.settings.site(site))
        commit_id = parsed.ref if len(parsed.ref) == 64 and parsed.could_be_commit else self.resolve_commit(parsed).id
        held = Lease(store, commit_id, user=self.user, run=run, timeout=timeout or DEFAULT_LEASE_TIMEOUT)
        try:
            path = self.resolve(f"{parsed.dataset}@{commit_id}", site=site, fetch=fetch, as_ref=parsed.ref)
            self.catalog.audit("use", dataset=parsed.dataset, commit=commit_id, ref=parsed.ref, site=store.site.name, lease=held.id, run=run or _run_id())
            yield path
        finally:
            held.release()

    def cache_async(self, ref: str, *, site: str | None = None) -> Path:
        """Ask the site's daemon to cache ``ref``; returns the request file at once."""
        from . import cache_queue
        from .store import SiteStore

        commit = self.resolve_commit(ref, refresh=True)
        store = SiteStore(self.settings.site(site))
        store.ensure()
        request = cache_queue.enqueue(store, dataset=commit.dataset, commit=commit.id, ref=ref)
        self.catalog.audit("cache-request", dataset=commit.dataset, commit=commit.id, ref=ref, site=store.site.name)
        return request

    def subscribe(self, ref: str, *, site: str | None = None, every: str | float = "10m") -> dict:
        """Keep ``ref`` (usually ``name@latest``) cached at a site: the daemon checks every ``every``."""
        from .policy import parse_duration

        parsed = parse_ref(ref)
        self.resolve_commit(Ref(parsed.dataset))  # the dataset must exist
        site_obj = self.settings.site(site)
        seconds = parse_duration(every)
        if seconds < 1:
            raise ConfigError("a subscription must be checked at least every few seconds: use e.g. --every 10m")
        sub_id = self.catalog.add_subscription(parsed.dataset, parsed.ref, site_obj.name, seconds)
        self.catalog.audit("subscribe", dataset=parsed.dataset, ref=parsed.ref, site=site_obj.name, every=seconds)
        return {"id": sub_id, "dataset": parsed.dataset, "ref": parsed.ref, "site": site_obj.name, "every": seconds}

    def unsubscribe(self, ref: str, *, site: str | None = None) -> bool:
        parsed = parse_ref(ref)
        site_obj = self.settings.site(site)
        removed = self.catalog.remove_subscription(parsed.dataset, parsed.ref, site_obj.name)
        if removed:
            self.catalog.audit("unsubscribe", dataset=parsed.dataset, ref=parsed.ref, site=site_obj.name)
        return removed

    def subscriptions(self) -> list[dict]:
        return self.catalog.subscriptions()

    def pin(self, ref: str, *, site: str | None = None, reason: str = "") -> bool:
        """Keep a cached entry hot: a pinned entry is never evicted. False if already pinned."""
        from . import lease
        from .store import SiteStore

        commit = self.resolve_commit(ref)
        store = SiteStore(self.settings.site(site))
        if not store.is_cached(commit.id):
            raise NotCachedError(f"{ref} is not cached at site {store.site.name}; cache it first: cachehub cache {ref}")
        changed = lease.pin(store, commit.id, user=self.user, reason=reason)
        self.catalog.audit("pin", dataset=commit.dataset, commit=commit.id, ref=ref, site=store.site.name, reason=reason, changed=changed)
        return changed

    def unpin(self, ref: str, *, site: str | None = None) -> bool:
        from . import lease
        from .store import SiteStore

        commit = self.resolve_commit(ref)
        store = SiteStore(self.settings.site(site))
        changed = lease.unpin(store, commit.id)
        self.catalog.audit("unpin", dataset=commit.dataset, commit=commit.id, ref=ref, site=store.site.name, changed=changed)
        return changed

    def leases(self, site: str | None = None) -> list[dict]:
        """Every lease at a site with whether its holder is alive."""
        from . import lease
        from .store import SiteStore

        store = SiteStore(self.settings.site(site))
        return [
            {"lease": x.id, "commit": x.commit, "host": x.host, "pid": x.pid, "user": x.user, "run": x.run, "created": x.created, "live": x.live()}
            for x in lease.leases(store)
        ]

    def plan_eviction(
        self,
        *,
        site: str | None = None,
        refs: Iterable[str] | None = None,
        expired_only: bool = False,
        need_bytes: int = 0,
        now: float | None = None,
        keep: set[bytes] | None = None,
    ) -> EvictionPlan:
        """What an eviction would remove, and why; nothing is changed.

        ``refs``: exactly those entries. Otherwise expired entries, then (unless
        ``expired_only``) least recently used ones while the site is over its quota or
        free-space floor, or lacks ``need_bytes`` for an admission.
        """
        from .evict import gather, plan_eviction
        from .store import SiteStore

        store = SiteStore(self.settings.site(site))
        now = time.time() if now is None else now
        entries, usage, shared = gather(store, now=now, keep=keep)
        only = [self.resolve_commit(r).id for r in refs] if refs else None
        fs = _fs_space(store.root)
        return plan_eviction(
            entries,
            store.site,
            now=now,
            usage=usage,
            fs_free=fs["fs_free"],
            fs_total=fs["fs_total"],
            need_bytes=need_bytes,
            capacity=not expired_only,
            only=only,
            shared=shared,
        )

    def evict(
        self,
        refs: Iterable[str] | None = None,
        *,
        site: str | None = None,
        expired_only: bool = False,
        dry_run: bool = False,
        now: float | None = None,
        reason: str | None = None,
    ) -> tuple[EvictionPlan, EvictionResult | None]:
        """Plan and (unless ``dry_run``) carry out an eviction; every removal is audited.

        With ``refs``: exactly those entries (refusing pinned, leased or just-used ones). Without:
        expired entries, then least recently used ones if the site is over its quota or free-space
        floor. Leases of dead holders are reaped first.
        """
        from .evict import execute
        from .store import SiteStore

        store = SiteStore(self.settings.site(site))
        if not dry_run:
            self._reap(store, now)
            if not refs:
                from .evict import gc

                gc(store)  # garbage first, so capacity is judged on what entries really hold
        plan = self.plan_eviction(site=site, refs=refs, expired_only=expired_only, now=now)
        if not dry_run and plan.evict:
            self._hook("pre_evict", site=store.site.name, commits=[e.entry.commit for e in plan.evict])
        if refs:
            refused = [f"{e.dataset}@{e.commit[:12]} ({why})" for e, why in plan.kept]
            if refused:
                raise ConflictError(f"not evicting {', '.join(refused)}: unpin it, or wait for its users to finish")
        if dry_run:
            return plan, None
        result = execute(store, plan)
        self._audit_evictions(store, result, reason)
        if result.evicted:
            self._hook("post_evict", site=store.site.name, commits=[e.entry.commit for e in result.evicted])
            self.ship_audit()
        return plan, result

    def gc(self, *, site: str | None = None, dry_run: bool = False) -> dict[str, int]:
        """Remove content objects no cached commit at the site references."""
        from .evict import gc
        from .store import SiteStore

        store = SiteStore(self.settings.site(site))
        count, nbytes = gc(store, dry_run=dry_run)
        if not dry_run:
            self.catalog.audit("gc", site=store.site.name, objects=count, bytes=nbytes)
        return {"objects": count, "bytes": nbytes, "dry_run": dry_run}

    # -- provenance: audit, lineage, runs, snapshots ----------------------------------------
    def ship_audit(self) -> int:
        """Copy unshipped audit events to the lake; a lake that cannot be reached is retried later."""
        from .audit import ship

        try:
            return ship(self)
        except (CachehubError, OSError) as exc:
            import logging

            logging.getLogger("cachehub").warning("audit events not shipped to the lake yet: %s", exc)
            return 0

    def audit(self, **filters: str | None) -> list[dict]:
        """Audit events (filters: dataset, action, user, since, commit), oldest first."""
        return list(self.catalog.audit_events(**filters))  # type: ignore[arg-type]

    def audit_verify(self) -> list:
        """Check every hash chain in the catalog; an empty list means intact."""
        from .audit import ordered_for_verify, verify_chain

        return verify_chain(ordered_for_verify(self))

    def lineage(self, ref: str, *, up: bool = True, down: bool = True, depth: int | None = None):  # type: ignore[no-untyped-def]
        """The lineage subgraph around a commit (see cachehub.lineage)."""
        from . import lineage

        parsed = parse_ref(ref)
        try:
            commit_id = self.resolve_commit(parsed).id
        except RefNotFoundError:
            row = self.catalog.conn.execute(
                "SELECT commit_id FROM tombstones WHERE dataset = ? AND commit_id >= ? AND commit_id < ?",
                (parsed.dataset, parsed.ref, parsed.ref + "g"),
            ).fetchone()
            if not row:
                raise
            commit_id = row[0]  # a purged commit still has lineage
        return lineage.walk(lineage.build(self.catalog), f"commit:{commit_id}", up=up, down=down, depth=depth)

    def snapshot(
        self,
        directory: str | os.PathLike[str],
        dataset: str,
        *,
        message: str = "",
        run: str | None = None,
        derived_from: tuple[str, ...] = (),
        tag: str | None = None,
        progress: Progress = NULL,
    ) -> PushResult:
        """A new commit from a working directory, re-hashing only files changed since last seen."""
        from .push import push

        self._hook("pre_snapshot", dataset=dataset, directory=str(directory), run=run)
        result = push(self, directory, dataset, message=message or f"snapshot of {directory}", derived_from=derived_from, tag=tag, progress=progress, run=run)
        if run and result.commit:
            self.catalog.conn.execute(
                "INSERT OR IGNORE INTO run_outputs (run_id, dataset, commit_id) VALUES (?,?,?)", (run, dataset, result.commit)
            )
        self.catalog.audit(
            "snapshot", dataset=dataset, commit=result.commit, directory=str(os.path.abspath(directory)), run=run,
            created=result.created, hashed_files=result.hashed_files, uploaded_files=result.uploaded_files,
        )  # fmt: skip
        self._hook("post_snapshot", dataset=dataset, directory=str(directory), commit=result.commit, run=run)
        self.ship_audit()
        return result

    def restore(self, ref: str, directory: str | os.PathLike[str], *, jobs: int | None = None):  # type: ignore[no-untyped-def]
        """A writable working copy of a commit in ``directory``; history is never changed."""
        from .restore import restore

        commit = self.resolve_commit(ref)
        self._hook("pre_restore", ref=ref, commit=commit.id, directory=str(directory))
        result = restore(self, commit, Path(directory), jobs=jobs or self.settings.jobs)
        with self.catalog.transaction():
            self.catalog.conn.execute(
                "INSERT INTO restores VALUES (?,?,?,?,?,?)", (commit.id, commit.dataset, result.path, _host(), self.user, _now())
            )
            self.catalog.audit("restore", dataset=commit.dataset, commit=commit.id, ref=ref, path=result.path, from_site=result.from_site)
        self._hook("post_restore", ref=ref, commit=commit.id, directory=result.path)
        self.ship_audit()
        return result

    def purge(self, ref: str, *, reason: str):  # type: ignore[no-untyped-def]
        """Erase a commit (right to erasure): unshared content in the lake and at every site."""
        from .restore import purge

        if not reason.strip():
            raise ConfigError("purge needs --reason: it is recorded in the tombstone and the audit trail")
        commit = self.resolve_commit(ref, refresh=True)
        result = purge(self, commit, reason=reason)
        self.catalog.audit(
            "purge", dataset=commit.dataset, commit=commit.id, ref=ref, reason=reason, removed_objects=result.removed_objects,
            removed_bytes=result.removed_bytes, tags=list(result.tags_removed), sites=list(result.sites_evicted),
        )  # fmt: skip
        self.ship_audit()
        return result

    def run(
        self,
        command: list[str],
        *,
        uses: Iterable[str] = (),
        snapshots: Iterable[tuple[str, str]] = (),
        site: str | None = None,
        snapshot_on_failure: bool = False,
    ):  # type: ignore[no-untyped-def]
        """Run ``command`` with leased inputs; record the run; snapshot its outputs (see runs.py)."""
        from .runs import run_command

        return run_command(self, command, uses=list(uses), snapshots=list(snapshots), site=site, snapshot_on_failure=snapshot_on_failure)

    def _reap(self, store: SiteStore, now: float | None) -> None:
        from . import lease

        for dead in lease.reap(store, now):
            self.catalog.audit(
                "lease-reap", commit=dead.commit, site=store.site.name, lease=dead.id, host=dead.host, pid=dead.pid, reason="holder gone"
            )

    def _audit_evictions(self, store: SiteStore, result: EvictionResult, reason: str | None) -> None:
        with self.catalog.transaction():
            for ev in result.evicted:
                self.catalog.remove_cache_entry(store.site.name, ev.entry.commit)
                self.catalog.audit(
                    "evict", dataset=ev.entry.dataset, commit=ev.entry.commit, site=store.site.name, reason=reason or ev.reason, bytes=ev.entry.bytes
                )
            for cid in result.restored:
                self.catalog.audit("evict-abandoned", commit=cid, site=store.site.name, reason="used or leased during eviction")
            if result.gc_objects:
                self.catalog.audit("gc", site=store.site.name, objects=result.gc_objects, bytes=result.gc_bytes)

    def status(self, site: str | None = None) -> list[dict]:
        """Per site: cached commits, their sizes, bytes shared between them, filesystem space."""
        from .store import SiteStore

        names = [site] if site else sorted(self.settings.sites)
        out = []
        for name in names:
            store = SiteStore(self.settings.site(name))
            commits = list(store.cached()) if store.root.exists() else []
            objects, object_bytes = store.object_bytes() if commits else (0, 0)
            logical = sum(c.bytes for c in commits)
            if store.site.link == "copy":  # trees are copies: nothing is shared with objects/
                object_bytes += logical
            fs = _fs_space(store.root)
            from . import cache_queue, lease

            live = [x for x in lease.leases(store) if x.live()] if store.root.exists() else []
            out.append(
                {
                    "site": name,
                    "root": str(store.root),
                    "link": store.site.link,
                    "commits": [
                        {
                            "dataset": c.dataset,
                            "commit": c.commit,
                            "files": c.files,
                            "bytes": c.bytes,
                            "cached_at": c.cached_at,
                            "last_used": _iso(c.last_used),
                            "path": str(c.path),
                        }
                        for c in commits
                    ],
                    "objects": objects,
                    "object_bytes": object_bytes,
                    "logical_bytes": logical,
                    "shared_bytes": max(0, logical - object_bytes),
                    "quota": store.site.quota,
                    "ttl": store.site.ttl,
                    "leases": len(live),
                    "pinned": sum(1 for c in commits if lease.is_pinned(store, c.commit)),
                    "queue_depth": cache_queue.depth(store) if store.root.exists() else 0,
                    "daemon": cache_queue.daemon_info(store) if store.root.exists() else None,
                    **fs,
                }
            )
        return out


def init(
    *,
    home: str | os.PathLike[str] | None = None,
    lake: str | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> dict[str, str]:
    """Write the configuration, create the catalog, check the lake and prepare the default site."""
    from .config import DEFAULT_SITE, update_config
    from .store import SiteStore

    settings = load_settings(home, lake=lake)

    def change(data: dict) -> None:
        section = data.setdefault("lake", {})
        section["url"] = settings.lake_url
        if endpoint_url:
            section["endpoint_url"] = endpoint_url
        if region:
            section["region"] = region
        data.setdefault("defaults", {}).setdefault("site", DEFAULT_SITE)

    settings.home.mkdir(parents=True, exist_ok=True)
    path = update_config(settings.home, change)
    settings = load_settings(home, lake=lake)
    with Hub(settings) as hub:
        hub.lake.ensure_initialised()
        site = settings.site()
        SiteStore(site).ensure()
        hub.catalog.audit("init", lake=settings.lake_url, site=site.name)
        return {
            "config": str(path),
            "catalog": str(settings.catalog_path),
            "lake": settings.lake_url,
            "site": site.name,
            "site_root": site.root,
        }


def _with_policy(site: Site, **changes: object) -> Site:
    """``site`` with the given (unparsed) policy values applied; None means unchanged."""
    from dataclasses import replace

    from .config import LINK_MODES
    from .policy import parse_duration, parse_fraction, parse_size

    parsers = {"ttl": parse_duration, "low_watermark": parse_fraction, "min_free": parse_fraction, "grace": parse_duration}
    values: dict[str, object] = {}
    for key, raw in changes.items():
        if raw is None:
            continue
        if key == "link":
            if raw not in LINK_MODES:
                raise ConfigError(f"unknown link mode {raw!r}; use one of {', '.join(LINK_MODES)}")
            values[key] = raw
        elif key == "quota":
            values[key] = None if raw in ("", "0", 0, "none") else parse_size(raw)  # type: ignore[arg-type]
        elif key in parsers:
            values[key] = parsers[key](raw)  # type: ignore[operator]
        else:
            raise TypeError(f"unknown site setting {key!r}")
    return replace(site, **values)  # type: ignore[arg-type]


def lake_uri(url: str) -> str:
    """The lake as a URI (``file:///abs/path`` for a directory), for lineage systems."""
    return url.rstrip("/") if "://" in url else "file://" + os.path.abspath(os.path.expanduser(url))


def lake_identity(url: str) -> str:
    """A stable name for a lake URL (absolute path for a directory, URL without trailing / for S3)."""
    if "://" in url and not url.startswith("file://"):
        return url.rstrip("/")
    path = url[len("file://") :] if url.startswith("file://") else url
    return os.path.abspath(os.path.expanduser(path))


def _host() -> str:
    from .fsutil import HOST

    return HOST


def _now() -> str:
    from .lake import now_iso

    return now_iso()


def _run_id() -> str:
    from .runs import current_run_id

    return current_run_id()[0]


def _present(store: SiteStore, commit_id: str) -> bool:
    """Is the tree published? Called after the use was recorded; waits out a running eviction."""
    if (store.root / "evicting" / commit_id).exists():
        from .evict import wait_while_evicting

        wait_while_evicting(store, commit_id)
    return store.is_cached(commit_id)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _fs_space(path: Path) -> dict[str, int | None]:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return {"fs_total": None, "fs_used": None, "fs_free": None}
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize
    return {"fs_total": total, "fs_used": total - st.f_bfree * st.f_frsize, "fs_free": free}


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


__all__ = ["Hub", "NULL", "Progress"]
