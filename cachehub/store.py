"""The site store: a cache root on NFS (or any POSIX path) that describes itself.

::

    <root>/cachehub-site.json            {"format": "cachehub-site", "format_version": 1, ...}
    <root>/objects/sha256/<aa>/<sha256>  content, read-only (0444), one file per distinct content
    <root>/commits/<commit-id>/...       published trees: hardlinks (or symlinks/copies) of objects
    <root>/meta/<commit-id>.json         what a published tree is (dataset, manifest, size, time)
    <root>/manifests/<aa>/<id>.tsv.gz    manifests of cached commits, for verify without the lake
    <root>/used/<commit-id>              its mtime is the commit's last use at this site
    <root>/staging/<commit-id>.<unique>/ trees being built (never read by anyone)
    <root>/tmp/                          downloads in flight, process-unique names
    <root>/locks/<commit-id>.lock        advisory: saves duplicate downloads, never needed for safety
    <root>/trash/                        trees being removed

Correctness on NFS comes from immutable content, process-unique temp names and atomic rename:
a tree is published by renaming its staging directory to ``commits/<commit-id>``, so a reader
sees all of a commit or none of it. The catalog is never stored here.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat as statmod
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FormatError, NoSpaceError
from .fsutil import HOST, atomic_write, unique_suffix
from .lake import canonical_json, now_iso
from .model import CacheEntry, Commit, Site

if TYPE_CHECKING:
    from .api import Hub

SITE_FORMAT = "cachehub-site"
SITE_FORMAT_VERSION = 1
META_FORMAT_VERSION = 1
LOCK_STALE_SECONDS = 120.0
FALLBACK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


@dataclass(frozen=True)
class CachedCommit:
    """What the site root says about one published commit."""

    commit: str
    dataset: str
    manifest: str
    files: int
    bytes: int
    cached_at: str
    path: Path
    last_used: float | None


class SiteStore:
    """File operations on one site root. Cheap to construct; touches nothing until asked."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.root = Path(site.root)

    # -- layout ------------------------------------------------------------------------------
    def object_path(self, sha256: str) -> Path:
        return self.root / "objects" / "sha256" / sha256[:2] / sha256

    def commit_path(self, commit_id: str) -> Path:
        return self.root / "commits" / commit_id

    def meta_path(self, commit_id: str) -> Path:
        return self.root / "meta" / f"{commit_id}.json"

    def manifest_path(self, manifest_id: str) -> Path:
        return self.root / "manifests" / manifest_id[:2] / f"{manifest_id}.tsv.gz"

    def used_path(self, commit_id: str) -> Path:
        return self.root / "used" / commit_id

    def ensure(self) -> None:
        """Create the layout (idempotent) and check the root's format version."""
        marker = self.root / "cachehub-site.json"
        if marker.exists():
            body = json.loads(marker.read_bytes())
            if body.get("format") != SITE_FORMAT or body.get("format_version") != SITE_FORMAT_VERSION:
                raise FormatError(
                    f"{marker} is format {body.get('format')} v{body.get('format_version')}; "
                    f"this cachehub reads {SITE_FORMAT} v{SITE_FORMAT_VERSION}: upgrade cachehub or use another root"
                )
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("objects/sha256", "commits", "meta", "manifests", "used", "staging", "tmp", "locks", "trash"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        body = {"format": SITE_FORMAT, "format_version": SITE_FORMAT_VERSION, "name": self.site.name, "created": now_iso()}
        try:
            atomic_write(marker, canonical_json(body), exclusive=True)
        except FileExistsError:
            pass

    # -- state -------------------------------------------------------------------------------
    def is_cached(self, commit_id: str) -> bool:
        return os.path.isdir(self.commit_path(commit_id))

    def touch(self, commit_id: str) -> None:
        """Record a use: one utime on the site root, cheap and safe on NFS."""
        path = self.used_path(commit_id)
        try:
            os.utime(path)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()

    def last_used(self, commit_id: str) -> float | None:
        try:
            return self.used_path(commit_id).stat().st_mtime
        except FileNotFoundError:
            return None

    def cached(self) -> Iterator[CachedCommit]:
        """Every published commit at this site, from the root alone."""
        base = self.root / "commits"
        try:
            names = sorted(os.listdir(base))
        except FileNotFoundError:
            return
        for name in names:
            try:
                meta = json.loads(self.meta_path(name).read_bytes())
            except (FileNotFoundError, ValueError):
                continue  # a tree without metadata is not ours to describe
            yield CachedCommit(
                commit=name,
                dataset=meta["dataset"],
                manifest=meta["manifest"],
                files=meta["files"],
                bytes=meta["bytes"],
                cached_at=meta["cached_at"],
                path=base / name,
                last_used=self.last_used(name),
            )

    def write_meta(self, commit: Commit) -> None:
        body = {
            "format_version": META_FORMAT_VERSION,
            "commit": commit.id,
            "dataset": commit.dataset,
            "manifest": commit.manifest,
            "files": commit.files,
            "bytes": commit.bytes,
            "cached_at": now_iso(),
            "cached_by_host": HOST,
        }
        atomic_write(self.meta_path(commit.id), canonical_json(body))

    def object_bytes(self) -> tuple[int, int]:
        """(count, bytes) of distinct content objects at the site."""
        count = total = 0
        for dirpath, _dirs, files in os.walk(self.root / "objects"):
            for name in files:
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                    count += 1
                except FileNotFoundError:
                    pass
        return count, total

    # -- writing -----------------------------------------------------------------------------
    def store_object(self, sha256: str, data: bytes) -> bool:
        """Place verified bytes as a read-only object; False if it was already there."""
        final = self.object_path(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "tmp" / f"{sha256}.{unique_suffix()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            return True
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpaceError(
                    f"site {self.site.name} ({self.root}) is full; free space (cachehub evict / gc) and re-run",
                    site=self.site.name,
                ) from exc
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def lock(self, commit_id: str) -> Path | None:
        """Take the advisory lock for building ``commit_id``; None if someone live holds it."""
        path = self.root / "locks" / f"{commit_id}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(path, f"{HOST} {os.getpid()} {time.time()}\n".encode(), exclusive=True)
            return path
        except FileExistsError:
            try:
                if time.time() - path.stat().st_mtime > LOCK_STALE_SECONDS:
                    stale = path.with_name(f"{path.name}.{unique_suffix()}.stale")
                    os.rename(path, stale)
                    stale.unlink(missing_ok=True)
                    return self.lock(commit_id)
            except FileNotFoundError:
                return self.lock(commit_id)
            return None

    def new_staging(self, commit_id: str) -> Path:
        path = self.root / "staging" / f"{commit_id}.{unique_suffix()}"
        path.mkdir(parents=True)
        return path

    def publish(self, staging: Path, commit_id: str) -> bool:
        """Rename a finished tree into place; False (and staging removed) if another won the race."""
        target = self.commit_path(commit_id)
        try:
            os.rename(staging, target)
            return True
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                remove_tree(staging)
                return False
            raise

    def unpublish(self, commit_id: str) -> Path | None:
        """Atomically take a tree out of ``commits/``; returns where it went, for deletion."""
        trash = self.root / "trash" / f"{commit_id}.{unique_suffix()}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(self.commit_path(commit_id), trash)
        except FileNotFoundError:
            return None
        return trash


class Linker:
    """Materialises one file of a tree from an object, per the site's link mode.

    ``auto`` hardlinks and falls back to a copy where the filesystem refuses (EXDEV, EPERM,
    EMLINK when a file is duplicated past the link limit, ENOTSUP); after EXDEV/EPERM it stops
    trying links for the rest of the tree.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.fallbacks = 0
        self._links_work = mode in ("auto", "hardlink")

    def place(self, obj: Path, dest: str) -> None:
        if self.mode == "symlink":
            os.symlink(os.path.relpath(obj, os.path.dirname(dest)), dest)
            return
        if self._links_work:
            try:
                os.link(obj, dest)
                return
            except OSError as exc:
                if self.mode == "hardlink" or exc.errno not in FALLBACK_ERRNOS:
                    raise
                self.fallbacks += 1
                if exc.errno != errno.EMLINK:
                    self._links_work = False
        copy_readonly(obj, dest)


def copy_readonly(src: Path | str, dest: str) -> None:
    """Copy (reflink where the kernel can) and make read-only."""
    shutil.copyfile(src, dest)
    os.chmod(dest, 0o444)


def make_tree_readonly(top: Path) -> None:
    """chmod 0555 every directory of a tree (files are already 0444)."""
    for dirpath, _dirs, _files in os.walk(top):
        os.chmod(dirpath, 0o555)


def remove_tree(top: Path) -> None:
    """Delete a tree whose directories may be read-only; never follows symlinks out of it."""
    if not top.exists() and not top.is_symlink():
        return
    for dirpath, dirnames, _files in os.walk(top):
        os.chmod(dirpath, 0o755)
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, 0o755)
    shutil.rmtree(top)


def scan_commit_entries(store: SiteStore) -> list[CacheEntry]:
    return [
        CacheEntry(
            site=store.site.name,
            commit=c.commit,
            dataset=c.dataset,
            path=str(c.path),
            files=c.files,
            bytes=c.bytes,
            cached_at=c.cached_at,
            last_used=None,
        )
        for c in store.cached()
    ]


def rescan_sites(hub: Hub) -> int:
    """Re-index every configured site's published commits into the catalog; return the count."""
    count = 0
    for site in hub.settings.sites.values():
        store = SiteStore(site)
        if not (store.root / "cachehub-site.json").exists():
            continue
        for entry in scan_commit_entries(store):
            hub.catalog.add_cache_entry(entry)
            count += 1
    return count


def is_regular_file(path: str) -> bool:
    try:
        return statmod.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return False
