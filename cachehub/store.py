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
    <root>/evicting/<commit-id>          an eviction of that commit is deciding or removing
    <root>/leases/<commit-id>/<id>.json  running jobs' claims (lease.py)
    <root>/pins/<commit-id>.json         operators' "keep hot" flags (lease.py)
    <root>/queue/<commit-id>.<...>.json  cache requests for the daemon (cache_queue.py)
    <root>/daemon.json                   the daemon serving this site; its mtime is its heartbeat

This module is the one owner of those paths: every other module asks a ``SiteStore`` for them.

Correctness on NFS comes from immutable content, process-unique temp names and atomic rename:
a tree is published by renaming its staging directory to ``commits/<commit-id>``, so a reader
sees all of a commit or none of it. The catalog is never stored here.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import FormatError, NoSpaceError
from .fsutil import HOST, atomic_write, unique_suffix
from .lake import canonical_json, now_iso
from .model import CacheEntry, Commit, Site

MARKER = "cachehub-site.json"
SITE_FORMAT = "cachehub-site"
SITE_FORMAT_VERSION = 1
META_FORMAT_VERSION = 1
LOCK_STALE_SECONDS = 30.0
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
        self._objects = f"{site.root}/objects/sha256"
        self._tmp = f"{site.root}/tmp"

    # -- layout ------------------------------------------------------------------------------
    def object_path(self, sha256: str) -> Path:
        return self.root / "objects" / "sha256" / sha256[:2] / sha256

    def object_file(self, sha256: str) -> str:
        """``object_path`` as a plain string: the per-file hot paths avoid pathlib's cost."""
        return f"{self._objects}/{sha256[:2]}/{sha256}"

    def temp_file(self, name: str) -> str:
        """A process-unique temp name under ``tmp/`` (``<name>.<host>.<pid>.<n>``)."""
        return f"{self._tmp}/{name}.{HOST}.{os.getpid()}.{next(_COUNTER)}"

    @property
    def commits_dir(self) -> Path:
        return self.root / "commits"

    def commit_path(self, commit_id: str) -> Path:
        return self.commits_dir / commit_id

    def meta_path(self, commit_id: str) -> Path:
        return self.root / "meta" / f"{commit_id}.json"

    def manifest_path(self, manifest_id: str) -> Path:
        return self.root / "manifests" / manifest_id[:2] / f"{manifest_id}.tsv.gz"

    def used_path(self, commit_id: str) -> Path:
        return self.root / "used" / commit_id

    @property
    def marker_path(self) -> Path:
        return self.root / MARKER

    def exists(self) -> bool:
        """Does the root carry its marker (a laid-out site, not an empty or unmounted directory)?"""
        return self.marker_path.exists()

    @property
    def leases_dir(self) -> Path:
        return self.root / "leases"

    def lease_dir(self, commit_id: str) -> Path:
        return self.leases_dir / commit_id

    def pin_path(self, commit_id: str) -> Path:
        return self.root / "pins" / f"{commit_id}.json"

    @property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    @property
    def daemon_path(self) -> Path:
        return self.root / "daemon.json"

    def evicting_path(self, commit_id: str) -> Path:
        return self.root / "evicting" / commit_id

    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"

    def mark_evicting(self, commit_id: str) -> Path | None:
        """Create the eviction marker of ``commit_id`` (atomic create); None if another evictor holds it.

        The marker is the evictor's half of the reader/evictor protocol (evict.py): a reader
        that finds it waits (``wait_while_evicting``) before it looks for the tree.
        """
        path = self.evicting_path(commit_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(path, f"{HOST} {os.getpid()} {time.time():.3f}\n".encode(), exclusive=True, durable=False)
            return path
        except FileExistsError:
            if lock_is_stale(path):
                path.unlink(missing_ok=True)
                return self.mark_evicting(commit_id)
            return None

    def wait_while_evicting(self, commit_id: str, *, timeout: float = 120.0) -> None:
        """Block while an eviction of ``commit_id`` is deciding or removing (a reader's step 1)."""
        path = self.evicting_path(commit_id)
        if not path.exists():
            return
        deadline = time.monotonic() + timeout
        while path.exists() and time.monotonic() < deadline:
            if lock_is_stale(path):
                path.unlink(missing_ok=True)
                return
            time.sleep(0.01)

    def lock_names(self) -> set[str]:
        """The names of the build lock files now at the site (live or stale)."""
        try:
            return {name for name in os.listdir(self.locks_dir) if name.endswith(".lock")}
        except FileNotFoundError:
            return set()

    def published(self) -> set[str]:
        """The commit ids whose trees are published now (names under ``commits/``)."""
        try:
            return set(os.listdir(self.root / "commits"))
        except FileNotFoundError:
            return set()

    def object_files(self) -> Iterator[tuple[str, str]]:
        """(name, path) of every file under ``objects/`` (a walk: O(objects at the site))."""
        for dirpath, _dirs, files in os.walk(self.root / "objects"):
            for name in files:
                yield name, os.path.join(dirpath, name)

    def manifest_files(self) -> Iterator[tuple[str, Path]]:
        """(manifest id, path) of every manifest copy kept at the site."""
        for path in (self.root / "manifests").glob("*/*.tsv.gz"):
            yield path.name[: -len(".tsv.gz")], path

    def used_markers(self) -> Iterator[Path]:
        used = self.root / "used"
        yield from (used.iterdir() if used.exists() else ())

    def trash_path(self, commit_id: str) -> Path:
        """A fresh, process-unique place in ``trash/`` for a tree being removed."""
        path = self.root / "trash" / f"{commit_id}.{unique_suffix()}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def ensure(self) -> None:
        """Create the layout (idempotent) and check the root's format version."""
        marker = self.marker_path
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
        for i in range(256):  # so storing an object never needs a mkdir
            (self.root / "objects" / "sha256" / f"{i:02x}").mkdir(exist_ok=True)
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
        for _name, path in self.object_files():
            try:
                total += os.stat(path).st_size
                count += 1
            except FileNotFoundError:
                pass
        return count, total

    # -- writing -----------------------------------------------------------------------------
    def store_object(self, sha256: str, data: bytes) -> None:
        """Place verified bytes as a read-only object (temp name, then one atomic rename).

        If the object already exists it is replaced by identical bytes; trees keep their links
        to the old inode, and gc works from manifests, not link counts, so nothing is lost.
        """
        tmp = self.temp_file(sha256)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            self.publish_object(tmp, sha256)
        except OSError as exc:
            _unlink_quietly(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpaceError(
                    f"site {self.site.name} ({self.root}) is full; free space there (or cache to another site) and re-run",
                    site=self.site.name,
                ) from exc
            raise

    def publish_object(self, tmp: str, sha256: str) -> None:
        """Rename a verified temp file into the object store."""
        final = self.object_file(sha256)
        try:
            os.rename(tmp, final)
        except FileNotFoundError:
            if not os.path.exists(tmp):
                raise
            os.makedirs(os.path.dirname(final), exist_ok=True)  # a root laid out by an older version
            os.rename(tmp, final)

    def lock(self, commit_id: str, manifest: str = "") -> BuildLock | None:
        """Take the advisory lock for building ``commit_id`` (from ``manifest``); None if a live builder holds it."""
        return BuildLock.acquire(self.locks_dir / f"{commit_id}.lock", manifest)

    def building(self) -> dict[Path, str]:
        """The live build locks at this site and the manifest id each names ("" if none)."""
        out: dict[Path, str] = {}
        locks = self.locks_dir
        for path in locks.glob("*.lock") if locks.exists() else ():
            try:
                parts = path.read_text().split()
            except FileNotFoundError:
                continue
            if not lock_is_stale(path):
                out[path] = parts[3] if len(parts) > 3 and len(parts[3]) == 64 else ""
        return out

    def sweep_leftovers(self, *, max_age: float = 86400.0) -> int:
        """Remove staging trees, temp files and trash left by builders that died; return the count."""
        return sum(sweep_dead_entries(self.root / sub, max_age=max_age) for sub in ("staging", "tmp", "trash"))

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
        trash = self.trash_path(commit_id)
        try:
            os.rename(self.commit_path(commit_id), trash)
        except FileNotFoundError:
            return None
        return trash


_COUNTER = itertools.count()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class BuildLock:
    """An advisory lock file (``O_EXCL`` create) that only saves duplicate downloads.

    Its holder rewrites its mtime every HEARTBEAT_SECONDS from a background thread. A lock is
    stale when its holder is a dead process on this host, or its heartbeat is older than
    LOCK_STALE_SECONDS (a holder on another host that died). Correctness never depends on it:
    two builders that both think they hold it just do the same work twice.
    """

    HEARTBEAT_SECONDS = 5.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fresh: list[Path] = []  # also touched by the heartbeat (the build's staging tree)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="cachehub-lock-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, path: Path, manifest: str = "") -> BuildLock | None:
        """Create the lock file: ``HOST PID TIME [MANIFEST-ID]``; None if a live holder has it.

        The manifest id tells a gc at the site which content this build needs (``building``).
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                text = f"{HOST} {os.getpid()} {time.time():.3f} {manifest}".rstrip() + "\n"
                atomic_write(path, text.encode(), exclusive=True, durable=False)
                return cls(path)
            except FileExistsError:
                if not lock_is_stale(path):
                    return None
                stale = path.with_name(f"{path.name}.{unique_suffix()}.stale")
                try:
                    os.rename(path, stale)  # only one breaker wins the rename
                    stale.unlink(missing_ok=True)
                except FileNotFoundError:
                    pass
        return None

    def _beat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return
            for path in self.fresh:  # so that no sweep on another host takes it for a dead builder's
                try:
                    os.utime(path)
                except OSError:
                    pass

    def release(self) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)


def lock_is_stale(path: Path, *, now: float | None = None) -> bool:
    """True if the lock's holder is gone: a dead pid on this host, or no heartbeat for a while."""
    try:
        text = path.read_text()
        age = (now or time.time()) - path.stat().st_mtime
    except FileNotFoundError:
        return True
    parts = text.split()
    if len(parts) >= 2 and parts[0] == HOST and parts[1].isdigit():
        return not pid_alive(int(parts[1]))
    return age > LOCK_STALE_SECONDS


def sweep_dead_entries(base: Path, *, max_age: float = 86400.0) -> int:
    """Remove entries of ``base`` named ``<what>.<host>.<pid>.<random>`` whose writer is gone.

    Gone means: that pid is dead on this host, or (another host's entry) it is older than
    ``max_age``. Returns how many were removed.
    """
    removed = 0
    now = time.time()
    try:
        entries = list(os.scandir(base))
    except FileNotFoundError:
        return 0
    for entry in entries:
        owner = _owner(entry.name)
        if owner is None:
            continue
        host, pid = owner
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        if not ((host == HOST and not pid_alive(pid)) or (host != HOST and age > max_age)):
            continue
        if entry.is_dir(follow_symlinks=False):
            remove_tree(Path(entry.path))
        else:
            Path(entry.path).unlink(missing_ok=True)
        removed += 1
    return removed


def _owner(name: str) -> tuple[str, int] | None:
    """(host, pid) from a name ending in ``.<host>.<pid>.<random>`` (see unique_suffix)."""
    parts = name.split(".")
    if len(parts) < 4 or not parts[-2].isdigit():
        return None
    # the prefix before the host is a hash (no dots) or a hash plus a file extension
    head = parts[0]
    host = ".".join(parts[1:-2])
    if not head:
        return None
    return host, int(parts[-2])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Linker:
    """Materialises one file of a tree from an object, per the site's link mode.

    ``auto`` hardlinks and falls back to a copy where the filesystem refuses (EXDEV, EPERM,
    EMLINK when a file is duplicated past the link limit, ENOTSUP); after EXDEV/EPERM it stops
    trying links for the rest of the tree. In every mode a missing object raises
    FileNotFoundError and places nothing. Safe to share between threads.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._links_work = mode in ("auto", "hardlink")

    def place(self, obj: Path | str, dest: str) -> None:
        if self.mode == "symlink":
            os.stat(obj)  # FileNotFoundError for a missing object, as in the other modes
            os.symlink(os.path.relpath(obj, os.path.dirname(dest)), dest)
            return
        if self._links_work:
            try:
                os.link(obj, dest)
                return
            except OSError as exc:
                if self.mode == "hardlink" or exc.errno not in FALLBACK_ERRNOS:
                    raise
                if exc.errno != errno.EMLINK:
                    self._links_work = False
        copy_readonly(obj, dest)


def copy_readonly(src: Path | str, dest: str) -> None:
    """Copy (in-kernel where possible) and make read-only."""
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


def scan_site_entries(sites: Iterable[Site]) -> list[CacheEntry]:
    """Every published commit of every site whose root exists, read from the roots alone."""
    out = []
    for site in sites:
        store = SiteStore(site)
        if not store.exists():
            continue
        out += [
            CacheEntry(site.name, c.commit, c.dataset, str(c.path), c.files, c.bytes, c.cached_at, None)
            for c in store.cached()
        ]
    return out


def fs_space(path: Path) -> dict[str, int | None]:
    """Total, used and free (for unprivileged users) bytes of the filesystem holding ``path``."""
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
