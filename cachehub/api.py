"""The Python API: one ``Hub`` ties settings, the lake and the catalog together.

Every CLI command is a few lines over one method here. Module-level shortcuts in
``cachehub/__init__.py`` use a default hub built from the environment.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from . import diff as diffmod
from .catalog import Catalog, current_user
from .config import Settings, load_settings
from .errors import (
    AmbiguousRefError,
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


class Hub:
    """cachehub's state for one user: settings, lake and catalog (opened lazily)."""

    def __init__(self, settings: Settings | None = None, *, home: str | os.PathLike[str] | None = None) -> None:
        self.settings = settings or load_settings(home)
        self._lake: Lake | None = None
        self._catalog: Catalog | None = None
        self.user = current_user()

    # -- plumbing ----------------------------------------------------------------------------
    @property
    def lake(self) -> Lake:
        if self._lake is None:
            from cachehub.backends import open_backend

            backend = open_backend(
                self.settings.lake_url, endpoint_url=self.settings.endpoint_url, region=self.settings.region
            )
            self._lake = Lake(backend)
        return self._lake

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = Catalog(self.settings.catalog_path)
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
        """Index a dataset's commits and tags from the lake; False if the lake has no such dataset."""
        lake = self.lake
        ids = lake.commit_ids(dataset)
        if not ids:
            return False
        catalog = self.catalog
        new = [lake.read_commit(dataset, cid) for cid in ids if catalog.commit(cid) is None]
        tags = lake.tags(dataset)
        with catalog.transaction():
            catalog.add_commits(new)
            catalog.replace_tags(dataset, tags)
            catalog.touch_dataset(dataset)
        return True

    def rebuild_catalog(self) -> dict[str, int]:
        """Rebuild the index from the lake alone (and the site roots); the audit trail is kept."""
        self.lake.check_readable()
        with self.catalog.transaction():
            self.catalog.clear_index()
        datasets = 0
        for name in self.lake.datasets():
            if self.refresh(name):
                datasets += 1
        from .store import rescan_sites

        entries = rescan_sites(self)
        commits = self.catalog.conn.execute("SELECT count(*) FROM commits").fetchone()[0]
        tags = self.catalog.conn.execute("SELECT count(*) FROM tags").fetchone()[0]
        self.catalog.audit("catalog-rebuild", datasets=datasets, commits=commits, tags=tags, cache_entries=entries)
        return {"datasets": datasets, "commits": commits, "tags": tags, "cache_entries": entries}

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
            tags = [t.name for t in catalog.tags(parsed.dataset)]
            hint = f"tags: {', '.join(tags[:10])}" if tags else "no tags yet"
            raise RefNotFoundError(
                f"{parsed.dataset} has no tag or commit {parsed.ref!r} ({hint}); see: cachehub log {parsed.dataset}",
                dataset=parsed.dataset,
                ref=parsed.ref,
            )
        return found

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

        return push(self, directory, dataset, **options)  # type: ignore[arg-type]

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
        """The files of a commit, optionally only those under ``subpath``."""
        commit = self.resolve_commit(ref)
        prefix = subpath.strip("/")
        for entry in self.manifest(commit):
            if not prefix or entry.path == prefix or entry.path.startswith(prefix + "/"):
                yield entry

    def diff(self, old: str, new: str) -> Iterator[DiffEntry]:
        """Added, removed and modified paths from ``old`` to ``new`` (one linear merge)."""
        a = self.resolve_commit(old)
        b = self.resolve_commit(new)
        return diffmod.diff(self.manifest(a), self.manifest(b))

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
    def site_add(self, name: str, root: str | os.PathLike[str], *, link: str = "auto", replace: bool = False) -> Site:
        """Register a site (a cache root near compute) in the configuration and prepare its root."""
        from .config import LINK_MODES, save_settings, with_site
        from .store import SiteStore

        validate_dataset_name(name)
        if link not in LINK_MODES:
            raise ConfigError(f"unknown link mode {link!r}; use one of {', '.join(LINK_MODES)}")
        if name in self.settings.sites and not replace:
            existing = self.settings.sites[name]
            raise ConflictError(f"site {name!r} already exists (root {existing.root}); use cachehub site set {name} to change it")
        root_path = Path(root).expanduser().absolute()
        if _inside(self.settings.catalog_path, root_path):
            raise ConfigError(f"site root {root_path} would contain the catalog; the catalog must stay on local disk outside it")
        site = Site(name=name, root=str(root_path), link=link)
        SiteStore(site).ensure()
        self.settings = with_site(self.settings, site)
        save_settings(self.settings)
        self.catalog.audit("site-add", site=name, root=site.root, link=link)
        return site

    def sites(self) -> list[Site]:
        return sorted(self.settings.sites.values(), key=lambda s: s.name)

    def cache(self, ref: str, *, site: str | None = None, progress: Progress = NULL, jobs: int | None = None) -> CacheResult:
        """Materialise a commit at a site, fetching only the content the site lacks."""
        from .sync import cache

        return cache(self, ref, site=site, progress=progress, jobs=jobs)

    def verify(self, ref: str, *, site: str | None = None, repair: bool = False, progress: Progress = NULL) -> VerifyResult:
        """Re-hash a cached commit against its manifest; optionally repair it from the lake."""
        from .sync import verify

        return verify(self, ref, site=site, repair=repair, progress=progress)

    def resolve(self, ref: str, *, site: str | None = None, fetch: bool = False, record: bool = True) -> Path:
        """The local, read-only path of a cached commit; with ``fetch`` cache it first.

        A full commit id is answered from the site root alone; a tag or prefix from the local
        catalog. The use is recorded as the mtime of ``<root>/used/<commit-id>`` (one utime).
        """
        from .store import SiteStore

        parsed = parse_ref(ref)
        store = SiteStore(self.settings.site(site))
        if len(parsed.ref) == 64 and parsed.could_be_commit and store.is_cached(parsed.ref):
            commit_id, dataset = parsed.ref, parsed.dataset
        else:
            commit = self.resolve_commit(parsed)
            commit_id, dataset = commit.id, commit.dataset
            if not store.is_cached(commit_id):
                if not fetch:
                    raise NotCachedError(
                        f"{parsed} ({commit.short}) is not cached at site {store.site.name}; "
                        f"run: cachehub cache {parsed} --site {store.site.name}",
                        dataset=dataset,
                        commit=commit_id,
                        site=store.site.name,
                    )
                self.cache(str(parsed), site=store.site.name)
        if record:
            store.touch(commit_id)
            self.catalog.audit("resolve", dataset=dataset, commit=commit_id, ref=parsed.ref, site=store.site.name)
        return store.commit_path(commit_id)

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
            fs = _fs_space(store.root)
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
    from dataclasses import replace

    from .config import save_settings
    from .store import SiteStore

    settings = load_settings(home, lake=lake)
    if endpoint_url is not None or region is not None:
        settings = replace(settings, endpoint_url=endpoint_url or settings.endpoint_url, region=region or settings.region)
    settings.home.mkdir(parents=True, exist_ok=True)
    path = save_settings(settings)
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
