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
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import (
    CachehubError,
    ConfigError,
    ConflictError,
    FormatError,
    NoSpaceError,
    SiteDamagedError,
    SiteIOError,
    SiteMissingError,
    SitePermissionError,
)
from .fsutil import HOST, atomic_write, unique_suffix
from .lake import canonical_json, now_iso
from .manifest import read_manifest
from .model import CacheEntry, Commit, ManifestEntry, Site
from .select import Selection, commit_of

MARKER = "cachehub-site.json"
POLICY_FORMAT = "cachehub-site-policy"
POLICY_FIELDS = ("link", "ttl", "quota", "low_watermark", "min_free", "grace", "keep_partial", "group")
SITE_FORMAT = "cachehub-site"
SITE_FORMAT_VERSION = 1
META_FORMAT_VERSION = 1
LOCK_STALE_SECONDS = 30.0
FALLBACK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}
# a verified local copy of a manifest, by id (Context.manifest_source): what restores a site's copy
ManifestSource = Callable[[str], Path]


@dataclass(frozen=True)
class PartialBuild:
    """A cache that started fetching and has not published (yet, or ever: it was interrupted)."""

    commit: str
    dataset: str
    manifest: str
    host: str
    started: float  # mtime of its record: when it last started or resumed


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
    selection: Selection = Selection()  # a partial cache's files (empty: the whole commit)

    @property
    def source_commit(self) -> str:
        """The commit this entry holds (``commit`` is the entry's id: ``<commit>-<digest>`` if partial)."""
        return commit_of(self.commit)


class SiteStore:
    """File operations on one site root. Cheap to construct; touches nothing until asked.

    ``site`` comes from a home's configuration: its name and root. The policy (TTL, quota,
    link mode...) lives in the root (``policy/``) so that every host applies the same one;
    ``store.site`` reads it on first use. The configuration's own policy values only seed the
    root's first policy document when a site made by an older cachehub is first used.
    """

    def __init__(self, site: Site) -> None:
        self._configured = site
        self._site: Site | None = None
        self.root = Path(site.root)
        self._objects = f"{site.root}/objects/sha256"
        self._tmp = f"{site.root}/tmp"

    @property
    def site(self) -> Site:
        """The site with the policy its root holds (read once per store; migrated if absent)."""
        if self._site is None:
            policy = self.read_policy()
            if policy is None and self.exists():
                policy = self._migrate_policy()
            self._site = self._configured if policy is None else replace(self._configured, **_policy_values(policy))
        return self._site

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

    def manifest_entries(self, manifest_id: str, source: ManifestSource | None = None) -> Iterator[ManifestEntry]:
        """The entries of the site's copy of a manifest (validated when it entered any cache).

        A missing copy -- removed by an older gc, or lost with a crash -- is put back from
        ``source`` (a verified copy, e.g. downloaded from the lake); without one, or if that
        fails, SiteDamagedError says so and nothing is guessed.
        """
        path = self.manifest_path(manifest_id)
        if not os.path.exists(path):
            if source is None:
                raise SiteDamagedError(
                    f"site {self.name} lost its copy of manifest {manifest_id}; run cachehub verify on the commits "
                    "that use it (or any command with the lake reachable) to fetch it again",
                    site=self.name,
                    manifest=manifest_id,
                ) from None
            try:
                local = source(manifest_id)
            except Exception as exc:  # noqa: BLE001 - any failure to restore is reported the same way
                raise SiteDamagedError(
                    f"site {self.name} lost its copy of manifest {manifest_id} and it could not be fetched again "
                    f"({exc}); re-run when the lake is reachable",
                    site=self.name,
                    manifest=manifest_id,
                ) from exc
            self.keep_manifest(manifest_id, local)
        return read_manifest(path, validate=False)

    def keep_manifest(self, manifest_id: str, local: Path) -> Path:
        """Write (or refresh the mtime of) the site's copy of a manifest from a verified local copy.

        A fresh mtime is what tells a gc running elsewhere that the copy was just needed: gc
        removes only manifest copies older than its minimum age (gc.py).
        """
        path = self.manifest_path(manifest_id)
        try:
            os.utime(path)
        except (FileNotFoundError, PermissionError):  # absent, or another user's copy: write ours
            self.make_dirs(path.parent)
            atomic_write(path, local.read_bytes())
        return path

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

    @property
    def name(self) -> str:
        return self._configured.name

    def make_dirs(self, path: Path) -> None:
        """``mkdir -p`` of a directory under the root -- never of the root itself: a root that
        vanished (an unmounted export) raises SiteMissingError instead of coming back empty."""
        if path.is_dir():
            return
        try:
            path.mkdir()
        except FileExistsError:
            return
        except FileNotFoundError:
            if not self.exists():
                self.check()
            self.make_dirs(path.parent)
            try:
                path.mkdir()
            except FileExistsError:
                return
        if self.site.group:  # setgid is inherited; the group's write permission is not (umask)
            _share_with_group(path, self.site.group)

    def partial_builder_alive(self, partial: PartialBuild) -> bool:
        """Is a cache that wrote ``partial`` still running (its build lock, or a shard's, is live)?"""
        return any(not lock_is_stale(lock) for lock in self.locks_dir.glob(f"{partial.commit}.*lock"))

    # -- refs: under which names this site holds each commit (offline resolution) ---------------
    def ref_path(self, dataset: str, ref: str) -> Path:
        return self.root / "refs" / dataset / f"{ref}.json"

    def record_refs(self, dataset: str, refs: Iterable[str], commit_id: str) -> None:
        """Note that ``dataset@ref`` named ``commit_id`` when it was cached here (for each ref)."""
        for ref in refs:
            path = self.ref_path(dataset, ref)
            try:
                if json.loads(path.read_bytes()).get("commit") == commit_id:
                    os.utime(path)  # still true: only its time moves
                    continue
            except (FileNotFoundError, ValueError, PermissionError):
                pass  # absent, damaged, or another user's file: written again below
            self.make_dirs(path.parent)
            body = {"format_version": 1, "dataset": dataset, "ref": ref, "commit": commit_id, "host": HOST, "recorded": now_iso()}
            atomic_write(path, canonical_json(body), durable=False)

    def site_ref(self, dataset: str, ref: str) -> tuple[str, float] | None:
        """(commit id, when it was last recorded) for ``dataset@ref`` at this site, or None."""
        path = self.ref_path(dataset, ref)
        try:
            body = json.loads(path.read_bytes())
            return body["commit"], path.stat().st_mtime
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def partial_path(self, commit_id: str) -> Path:
        return self.root / "partial" / f"{commit_id}.json"

    def begin_partial(self, commit: Commit, *, entry: str | None = None) -> None:
        """Record that a cache of ``commit`` (into site entry ``entry``, default the commit's own) is
        fetching: gc keeps what it fetched until it publishes, or for the site's ``keep_partial``
        after it stopped (a re-run resumes from it)."""
        entry = entry or commit.id
        body = {"format_version": 1, "commit": entry, "dataset": commit.dataset, "manifest": commit.manifest, "host": HOST, "pid": os.getpid(), "started": now_iso()}
        path = self.partial_path(entry)
        self.make_dirs(path.parent)
        atomic_write(path, canonical_json(body), durable=False)

    def end_partial(self, commit_id: str) -> None:
        self.partial_path(commit_id).unlink(missing_ok=True)

    def partials(self) -> list[PartialBuild]:
        """Every recorded partial cache at the site (O(partial caches), not O(objects))."""
        base = self.root / "partial"
        out = []
        for name in sorted(os.listdir(base)) if base.exists() else ():
            path = base / name
            try:
                body = json.loads(path.read_bytes())
                out.append(PartialBuild(body["commit"], body.get("dataset", ""), body["manifest"], body.get("host", ""), path.stat().st_mtime))
            except (FileNotFoundError, PermissionError, ValueError, KeyError, TypeError):
                continue  # gone or malformed: a bad record must not break gc or status
        return out

    def mark_evicting(self, commit_id: str) -> Path | None:
        """Create the eviction marker of ``commit_id`` (atomic create); None if another evictor holds it.

        The marker is the evictor's half of the reader/evictor protocol (evict.py): a reader
        that finds it waits (``wait_while_evicting``) before it looks for the tree.
        """
        path = self.evicting_path(commit_id)
        self.make_dirs(path.parent)
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

    def entries_of(self, commit_id: str) -> list[str]:
        """The published entries holding ``commit_id``: its whole tree and its partial caches."""
        return sorted(name for name in self.published() if name == commit_id or name.startswith(commit_id + "-"))

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
        self.make_dirs(path.parent)
        return path

    def check(self) -> None:
        """Refuse a root without its marker (never recreate it) or of an unknown format version."""
        marker = self.marker_path
        try:
            body = json.loads(marker.read_bytes())
        except FileNotFoundError:
            raise SiteMissingError(
                f"site {self.name}: {self.root} has no {MARKER}. If it lives on NFS, the export is probably not mounted "
                f"(check with: ls {self.root.parent}); mount it and re-run. cachehub never recreates a site root: to start "
                f"an empty site there, run: cachehub site set {self.name} --root {self.root} --create",
                site=self.name,
                root=str(self.root),
            ) from None
        except ValueError:
            raise FormatError(f"{marker} is not JSON: the site's marker is damaged; restore it from another host's view or re-create the site") from None
        if body.get("format") != SITE_FORMAT or body.get("format_version") != SITE_FORMAT_VERSION:
            raise FormatError(
                f"{marker} is format {body.get('format')} v{body.get('format_version')}; "
                f"this cachehub reads {SITE_FORMAT} v{SITE_FORMAT_VERSION}: upgrade cachehub or use another root"
            )

    def ensure(self) -> None:
        """Lay out the root if needed (``create``): for ``site add`` and tools; workers ``check``."""
        self.create()

    def create(self, *, by: str = "") -> None:
        """Lay out a new site root, or check an existing one (idempotent): only ``site add``,
        ``init`` (the embedded default site) and ``--create`` call this."""
        if self.marker_path.exists():
            self.check()
            return
        self.root.mkdir(parents=True, exist_ok=True)
        subdirs = ["objects", "objects/sha256", "commits", "meta", "manifests", "used", "staging", "tmp", "locks", "trash", "policy", "usage"]
        subdirs += [f"objects/sha256/{i:02x}" for i in range(256)]  # so storing an object never needs a mkdir
        for sub in subdirs:
            (self.root / sub).mkdir(exist_ok=True)
        if not any(True for _ in self.object_files()):  # a new root: its usage ledger starts at zero
            self.set_usage_base(0, 0, superseded=())
        group = self._configured.group
        if group:  # every directory of the root belongs to the team, group-writable and setgid
            for path in (self.root, *(self.root / sub for sub in subdirs)):
                _share_with_group(path, group)
        if self.read_policy() is None:
            try:
                self._write_policy(1, self._configured, by=by or "site-create")
            except ConflictError:
                pass  # another process is laying out the same root at the same moment: its policy stands
        body = {"format": SITE_FORMAT, "format_version": SITE_FORMAT_VERSION, "name": self.name, "created": now_iso()}
        try:
            atomic_write(self.marker_path, canonical_json(body), exclusive=True)  # last: the root is complete
        except FileExistsError:
            pass

    # -- the policy, kept in the root ----------------------------------------------------------
    @property
    def policy_dir(self) -> Path:
        return self.root / "policy"

    def read_policy(self) -> dict | None:
        """The newest policy document (``policy/<version>.json``), or None if there is none."""
        try:
            versions = sorted(n for n in os.listdir(self.policy_dir) if n.endswith(".json") and n[:-5].isdigit())
        except FileNotFoundError:
            return None
        for name in reversed(versions):
            try:
                body = json.loads((self.policy_dir / name).read_bytes())
            except FileNotFoundError:
                continue
            except ValueError:
                raise FormatError(f"{self.policy_dir / name} is not JSON: the site policy is damaged; set it again with cachehub site set") from None
            if body.get("format") != POLICY_FORMAT or body.get("format_version") != 1:
                raise FormatError(f"{self.policy_dir / name} is not a {POLICY_FORMAT} v1 document: upgrade cachehub")
            return body
        return None

    def update_policy(self, changed: Site, *, expect: int | None, by: str) -> int:
        """Write ``changed``'s policy as the next version; ConflictError if ``expect`` is no longer current.

        Compare-and-swap on any filesystem, NFS included: the next version's file is created
        exclusively (``link``), so of two hosts changing the policy at once exactly one wins.
        """
        current = self.read_policy()
        version = current["version"] if current else 0
        if expect is not None and version != expect:
            raise ConflictError(f"site {self.name}'s policy changed meanwhile (now version {version}); look with: cachehub site show {self.name}")
        self._write_policy(version + 1, changed, by=by)
        self._site = None
        return version + 1

    def _write_policy(self, version: int, site: Site, *, by: str) -> None:
        body = {"format": POLICY_FORMAT, "format_version": 1, "version": version, **{k: getattr(site, k) for k in POLICY_FIELDS}}
        body.update(changed_by=by, host=HOST, changed_at=now_iso())
        self.policy_dir.mkdir(exist_ok=True)
        try:
            atomic_write(self.policy_dir / f"{version:08d}.json", canonical_json(body), exclusive=True)
        except FileExistsError:
            raise ConflictError(
                f"site {self.name}'s policy was changed by someone else at the same moment; nothing changed. "
                f"Look with: cachehub site show {self.name}, then re-run"
            ) from None
        if group := site.group:
            _share_with_group(self.policy_dir / f"{version:08d}.json", group)

    def _migrate_policy(self) -> dict | None:
        """A root laid out by an older cachehub has no policy: this home's values become version 1."""
        try:
            self._write_policy(1, self._configured, by="migration")
        except ConflictError:
            pass  # another host migrated it at the same moment: its values stand
        except OSError:
            return None  # a read-only view of the root: use this home's values
        return self.read_policy()

    # -- state -------------------------------------------------------------------------------
    def is_cached(self, commit_id: str) -> bool:
        return os.path.isdir(self.commit_path(commit_id))

    def touch(self, commit_id: str) -> None:
        """Record a use: one utime on the site root, cheap and safe on NFS."""
        path = self.used_path(commit_id)
        try:
            os.utime(path)
        except FileNotFoundError:
            self.make_dirs(path.parent)
            # group-writable on a shared site: the next user's utime needs write access to it
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o664 if self.site.group else 0o644)
            os.close(fd)
            if self.site.group:
                os.chmod(path, 0o664)

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
            found = self.cached_commit(name)
            if found is not None:
                yield found

    def all_trees_linked(self) -> bool:
        """Were every published tree's files made as hard links (meta ``link`` auto/hardlink)?

        Only then does an object's link count say whether a tree still uses it. O(commits).
        """
        for name in self.published():
            try:
                if json.loads(self.meta_path(name).read_bytes()).get("link") not in ("auto", "hardlink"):
                    return False
            except (FileNotFoundError, ValueError):
                return False
        return True

    def cached_commit(self, commit_id: str) -> CachedCommit | None:
        """One published commit, if it is here with its metadata (O(1): no listing)."""
        try:
            meta = json.loads(self.meta_path(commit_id).read_bytes())
        except (FileNotFoundError, ValueError):
            return None  # not cached, or a tree without metadata: not ours to describe
        path = self.commit_path(commit_id)
        if not os.path.isdir(path):
            return None
        return CachedCommit(
            commit=commit_id,
            dataset=meta["dataset"],
            manifest=meta["manifest"],
            files=meta["files"],
            bytes=meta["bytes"],
            cached_at=meta["cached_at"],
            path=path,
            last_used=self.last_used(commit_id),
            selection=Selection.from_json(meta.get("selection")),
        )

    def write_meta(self, commit: Commit, *, selection: Selection = Selection(), files: int | None = None, nbytes: int | None = None) -> None:
        """Describe a published entry: the whole commit, or (``selection``) a partial cache of it."""
        entry = selection.entry_id(commit.id)
        body = {
            "format_version": META_FORMAT_VERSION,
            "commit": entry,
            "dataset": commit.dataset,
            "manifest": commit.manifest,
            "files": commit.files if files is None else files,
            "bytes": commit.bytes if nbytes is None else nbytes,
            "cached_at": now_iso(),
            "cached_by_host": HOST,
            "link": self.site.link,  # how the tree was made: what a removal may infer from link counts
        }
        if selection:
            body["of_commit"] = commit.id
            body["selection"] = selection.to_json()
        atomic_write(self.meta_path(entry), canonical_json(body))

    def entry_files(self, cached: CachedCommit, source: ManifestSource | None = None) -> Iterator[ManifestEntry]:
        """The files of a published entry: its commit's manifest, less what its selection leaves out."""
        entries = self.manifest_entries(cached.manifest, source)
        if not cached.selection:
            return entries
        return (e for e in entries if cached.selection.matches(e.path))

    def object_bytes(self) -> tuple[int, int]:
        """(count, bytes) of distinct content objects at the site, by walking ``objects/`` (O(objects))."""
        count = total = 0
        for _name, path in self.object_files():
            try:
                total += os.stat(path).st_size
                count += 1
            except FileNotFoundError:
                pass
        return count, total

    # -- the usage ledger: what objects/ holds, kept up to date without walking it -------------
    @property
    def usage_dir(self) -> Path:
        return self.root / "usage"

    def usage(self) -> tuple[int, int]:
        """(objects, bytes) in ``objects/`` from the ledger: O(changes since the last full gc).

        ``usage/base.json`` is what the last full walk counted; each download and each targeted
        removal adds a small ``usage/<unique>.json`` of what it changed. A root without a base
        (laid out by an older version) is walked once to make one.
        """
        try:
            names = os.listdir(self.usage_dir)
        except FileNotFoundError:
            names = []
        if "base.json" not in names:
            deltas = [n for n in names if n.startswith("delta.")]
            objects, nbytes = self.object_bytes()
            self.set_usage_base(objects, nbytes, superseded=deltas)
            return objects, nbytes
        objects = nbytes = 0
        for name in names:
            if name != "base.json" and not (name.startswith("delta.") and name.endswith(".json")):
                continue  # a temp file of an interrupted write
            try:
                body = json.loads((self.usage_dir / name).read_bytes())
            except (FileNotFoundError, ValueError):
                continue
            objects += int(body.get("objects", 0))
            nbytes += int(body.get("bytes", 0))
        return max(0, objects), max(0, nbytes)

    def add_usage(self, objects: int, nbytes: int) -> None:
        """Record that ``objects``/``nbytes`` were added to (or, negative, removed from) ``objects/``."""
        if not objects and not nbytes:
            return
        self.make_dirs(self.usage_dir)
        body = {"objects": objects, "bytes": nbytes, "host": HOST, "time": now_iso()}
        atomic_write(self.usage_dir / f"delta.{unique_suffix()}.json", canonical_json(body), durable=False)

    def usage_deltas(self) -> list[str]:
        try:
            return [n for n in os.listdir(self.usage_dir) if n.startswith("delta.")]
        except FileNotFoundError:
            return []

    def set_usage_base(self, objects: int, nbytes: int, *, superseded: Iterable[str]) -> None:
        """Write what a full walk counted, and drop the deltas it already includes."""
        self.make_dirs(self.usage_dir)
        body = {"objects": objects, "bytes": nbytes, "host": HOST, "time": now_iso()}
        atomic_write(self.usage_dir / "base.json", canonical_json(body), durable=False)
        for name in superseded:
            (self.usage_dir / name).unlink(missing_ok=True)

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
                    f"site {self.name} ({self.root}) is full; free space there (or cache to another site) and re-run",
                    site=self.name,
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

    def lock(self, commit_id: str, manifest: str = "", *, shard: str = "") -> BuildLock | None:
        """Take the advisory lock for building ``commit_id`` (from ``manifest``); None if a live builder holds it.

        ``shard`` ("2-of-8") takes the lock of one shard of a sharded cache instead: shards of
        a commit run at once, each under its own lock, and every lock names the manifest so a
        gc keeps what any of them fetched.
        """
        self.make_dirs(self.locks_dir)
        name = f"{commit_id}.shard-{shard}.lock" if shard else f"{commit_id}.lock"
        return BuildLock.acquire(self.locks_dir / name, manifest)

    def shards_running(self, commit_id: str) -> list[str]:
        """The shards of ``commit_id`` whose processes are alive now ("2-of-8", ...)."""
        out = []
        for path in self.locks_dir.glob(f"{commit_id}.shard-*.lock") if self.locks_dir.exists() else ():
            if not lock_is_stale(path):
                out.append(path.name[len(commit_id) + len(".shard-") : -len(".lock")])
        return sorted(out)

    def shard_lock_holder(self, commit_id: str, shard: str) -> str:
        """Who holds a shard's lock ("host pid"), for an error message ("" if nobody)."""
        try:
            return " pid ".join((self.locks_dir / f"{commit_id}.shard-{shard}.lock").read_text().split()[:2])
        except (FileNotFoundError, PermissionError):
            return ""

    def shard_done(self, commit_id: str, shard: str) -> None:
        """Record that shard ``shard`` ("2-of-8") of ``commit_id`` has every object of its share here."""
        path = self.root / "shards" / commit_id
        self.make_dirs(path)
        with open(path / shard, "wb"):
            pass

    def shards_done(self, commit_id: str) -> set[str]:
        """The shards of ``commit_id`` that finished their share ("2-of-8", ...)."""
        try:
            return set(os.listdir(self.root / "shards" / commit_id))
        except FileNotFoundError:
            return set()

    def shard_records(self) -> Iterator[tuple[str, Path]]:
        """(commit id, directory) of every commit with shard records at the site."""
        base = self.root / "shards"
        for name in sorted(os.listdir(base)) if base.exists() else ():
            yield name, base / name

    def forget_shards(self, commit_id: str) -> None:
        shutil.rmtree(self.root / "shards" / commit_id, ignore_errors=True)

    # -- large objects fetched in pieces by several processes (sharded caching) ---------------
    def range_parts(self, sha256: str, size: int) -> RangeParts:
        return RangeParts(self.root / "ranges" / sha256, sha256, size)

    def range_part_dirs(self) -> Iterator[tuple[str, Path]]:
        """(sha256, directory) of every large object being fetched in pieces at the site."""
        base = self.root / "ranges"
        for name in sorted(os.listdir(base)) if base.exists() else ():
            yield name, base / name

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
        self.make_dirs(path.parent)
        path.mkdir()
        return path

    def publish(self, staging: Path, commit_id: str) -> bool:
        """Rename a finished tree into place; False (and staging removed) if another won the race.

        Moving a directory to another parent needs write permission on it (for every user but
        root), so the read-only top is made writable for the rename and read-only again after.
        """
        target = self.commit_path(commit_id)
        mode = stat.S_IMODE(os.stat(staging).st_mode)
        os.chmod(staging, mode | 0o200)
        try:
            os.rename(staging, target)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                remove_tree(staging)
                return False
            raise
        os.chmod(target, mode)
        return True

    def unpublish(self, commit_id: str) -> Path | None:
        """Atomically take a tree out of ``commits/``; returns where it went, for deletion.

        The tree's top must be writable for the move: its owner makes it so; on a group site the
        group may write it already (``make_tree_readonly``), so another member can move it too.
        """
        trash = self.trash_path(commit_id)
        path = self.commit_path(commit_id)
        try:
            os.chmod(path, stat.S_IMODE(os.stat(path).st_mode) | 0o200)
        except PermissionError:
            pass  # another user's tree: the group's write permission has to do
        except FileNotFoundError:
            return None
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return None
        return trash


_COUNTER = itertools.count()


class RangeParts:
    """One large object being fetched in pieces, by several processes, into one file at the site.

    ``ranges/<sha256>/data`` is a sparse file of the object's size; each piece (a range of
    ``piece`` bytes on a fixed grid, so that shards run with different N agree on it) is
    written at its offset, flushed, and then marked done by creating ``<start>.done``. A piece
    without its marker is fetched again; nothing here is trusted until the whole file hashes to
    its SHA-256 (``download.py``). What enters ``objects/`` is a private copy (``copy``), never
    ``data`` itself: a writer of another shard may still hold ``data`` open, and a late piece
    write must not reach a published object.
    """

    def __init__(self, directory: Path, sha256: str, size: int) -> None:
        self.dir = directory
        self.sha256 = sha256
        self.size = size
        self.data = directory / "data"

    def exists(self) -> bool:
        return self.data.exists()

    def starts(self, piece: int) -> range:
        """The offsets of every piece of the object."""
        return range(0, self.size, piece)

    def done(self) -> set[int]:
        """The offsets of the pieces written and marked done."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return set()
        return {int(n[: -len(".done")]) for n in names if n.endswith(".done") and n[: -len(".done")].isdigit()}

    def complete(self, piece: int) -> bool:
        return self.exists() and self.done() >= set(self.starts(piece))

    def open_for_write(self) -> int:
        """The data file, opened for writing at offsets (made, at the object's size, if absent)."""
        os.makedirs(self.dir, exist_ok=True)
        fd = os.open(self.data, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != self.size:
                os.ftruncate(fd, self.size)  # every writer truncates to the same size: harmless twice
        except BaseException:
            os.close(fd)
            raise
        return fd

    def copy(self) -> Path:
        """A private copy of ``data`` (a new inode, in this directory): made server-side where
        the filesystem can (``copy_file_range``: NFS 4.2, XFS and btrfs reflinks), else read and
        written. Its bytes are what the caller then hashes and publishes."""
        target = self.dir / f".copy.{unique_suffix()}"
        with open(self.data, "rb") as src, open(target, "wb") as dst:
            left = self.size
            try:
                while left > 0:
                    n = os.copy_file_range(src.fileno(), dst.fileno(), left)
                    if n == 0:
                        break
                    left -= n
            except OSError:  # not supported here: copy through this process
                src.seek(0)
                dst.seek(0)
                dst.truncate()
                shutil.copyfileobj(src, dst, 8 * 1024 * 1024)
            dst.flush()
            os.fsync(dst.fileno())
        return target

    def mark_done(self, start: int) -> None:
        with open(self.dir / f"{start}.done", "wb"):
            pass

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def newest(self) -> float:
        """When a piece was last written (0.0 if none): how long ago anyone worked on it."""
        times = [0.0]
        for path in (self.data, *self.dir.glob("*.done")):
            try:
                times.append(path.stat().st_mtime)
            except FileNotFoundError:
                continue
        return max(times)


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
        path.parent.mkdir(exist_ok=True)
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
        """Drop the lock, unless someone broke it meanwhile (then the file is theirs now)."""
        self._stop.set()
        try:
            parts = self.path.read_text().split()
        except FileNotFoundError:
            return
        if parts[:2] == [HOST, str(os.getpid())]:
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
        try:
            if entry.is_dir(follow_symlinks=False):
                remove_tree(Path(entry.path))
            else:
                Path(entry.path).unlink(missing_ok=True)
        except OSError:
            continue  # another user's leftovers we may not remove: its owner (or the daemon) will
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


def make_tree_readonly(top: Path, *, group: str | None = None) -> None:
    """chmod every directory of a tree read-only (files are already 0444).

    0555; on a site shared with a ``group``, 0575: members may then remove a tree another member
    published (an eviction), while nobody writes into it by accident as its owner.
    """
    mode = 0o575 if group else 0o555
    for dirpath, _dirs, _files in os.walk(top):
        os.chmod(dirpath, mode)


def remove_tree(top: Path) -> None:
    """Delete a tree whose directories may be read-only; never follows symlinks out of it.

    A directory of another user's tree cannot be chmodded; on a group site it is writable for
    the group already (``make_tree_readonly``), so the removal goes on.
    """
    if not top.exists() and not top.is_symlink():
        return
    for dirpath, dirnames, _files in os.walk(top):
        _make_writable(dirpath)
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                _make_writable(p)
    shutil.rmtree(top)


def _make_writable(path: str) -> None:
    try:
        os.chmod(path, 0o755)
    except PermissionError:
        pass  # not ours: removable through the group's write permission, or rmtree says why


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


def _policy_values(body: dict) -> dict:
    """The Site fields a policy document sets (unknown keys ignored, missing ones default)."""
    defaults = Site("", "")
    return {k: body.get(k, getattr(defaults, k)) for k in POLICY_FIELDS}


def _share_with_group(path: Path, group: str) -> None:
    """Give ``path`` to ``group`` (read and write): the users of a team site share its state."""
    import grp

    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"no Unix group {group!r} on this host; create it, or change the site's group with cachehub site set --group") from None
    try:
        os.chown(path, -1, gid)
        os.chmod(path, (os.stat(path).st_mode & 0o7777) | 0o060 | (0o2010 if path.is_dir() else 0))
    except PermissionError:
        pass  # not ours to change: whoever made it shared it


@contextmanager
def site_errors(store: SiteStore, doing: str) -> Iterator[None]:
    """Turn a filesystem error at ``store`` into a CachehubError that says what to do.

    A missing root is SiteMissingError (the mount), a refusal SitePermissionError (the group),
    a full disk NoSpaceError, a stale or failing mount SiteIOError; cachehub's own errors pass.
    """
    try:
        yield
    except CachehubError:
        raise
    except OSError as exc:
        raise translate_os_error(store, exc, doing) from exc


def translate_os_error(store: SiteStore, exc: OSError, doing: str) -> CachehubError:
    where = f"site {store.name} ({store.root})"
    what = f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"
    if exc.errno == errno.ENOENT and not store.exists():
        try:
            store.check()
        except CachehubError as missing:
            return missing
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        group = store.site.group
        advice = (
            f"the site is shared with group {group}: ask an administrator to add you to it (then log in again)"
            if group
            else f"ask whoever runs the site to share it with your team: cachehub site set {store.name} --group GROUP"
        )
        return SitePermissionError(f"{where}: cannot {doing} ({what}); {advice}", site=store.name)
    if exc.errno in (errno.EXDEV, errno.EMLINK):
        return SiteIOError(
            f"{where}: the filesystem refused a hard link while trying to {doing} ({what}); let cachehub fall back to "
            f"copies where links fail: cachehub site set {store.name} --link auto",
            site=store.name,
        )
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpaceError(f"{where} is full while trying to {doing}; free space there (cachehub evict) or use another site", site=store.name)
    if exc.errno == errno.ENOENT:
        return SiteIOError(
            f"{where}: {what} vanished while trying to {doing} (another host removed it, or this host's NFS attribute cache "
            "is stale); re-run",
            site=store.name,
        )
    return SiteIOError(
        f"{where}: the filesystem failed while trying to {doing} ({what}); check the mount (remount a stale NFS handle) and re-run",
        site=store.name,
    )
