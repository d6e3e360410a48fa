"""Cache requests queued on a site root, served by the daemon: one download per commit.

A request is a file ``<root>/queue/<commit-id>.<host>.<pid>.<random>.json``. Compute nodes that
share the NFS export drop requests there (``cachehub cache --async``, or ``resolve(fetch=True)``
while a daemon serves the site) and wait for ``commits/<commit-id>`` to appear. The daemon
takes every request of a commit at once, caches it once, and removes them; a request that
fails is renamed ``*.failed`` with the error inside. Requests survive a daemon restart.

The daemon announces itself in ``<root>/daemon.json``, whose mtime is its heartbeat.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .catalog import current_user
from .errors import CachehubError, NotCachedError
from .fsutil import HOST, atomic_write, unique_suffix
from .lake import canonical_json, now_iso
from .results import DaemonInfo
from .store import SiteStore, pid_alive

DAEMON_STALE_SECONDS = 30.0


@dataclass(frozen=True)
class Request:
    path: Path
    commit: str
    dataset: str
    ref: str
    user: str
    host: str
    requested: str


def enqueue(store: SiteStore, *, dataset: str, commit: str, ref: str) -> Path:
    """Drop a request for ``commit`` on the site root; return its path."""
    base = store.queue_dir
    store.make_dirs(base)
    path = base / f"{commit}.{unique_suffix()}.json"
    body = {"format_version": 1, "commit": commit, "dataset": dataset, "ref": ref, "user": current_user(), "host": HOST, "requested": now_iso()}
    atomic_write(path, canonical_json(body))
    return path


def pending(store: SiteStore) -> dict[str, list[Request]]:
    """Pending requests grouped by commit id, oldest commit first."""
    groups: dict[str, list[Request]] = defaultdict(list)
    try:
        names = sorted(os.listdir(store.queue_dir), key=lambda n: _mtime(store.queue_dir / n))
    except FileNotFoundError:
        return {}
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = store.queue_dir / name
        try:
            body = json.loads(path.read_bytes())
            request = Request(path, body["commit"], body["dataset"], body.get("ref", ""), body.get("user", ""), body.get("host", ""), body.get("requested", ""))
        except (FileNotFoundError, PermissionError, ValueError, KeyError, TypeError):
            continue  # gone, unreadable or malformed: one bad file must not stop the queue
        groups[request.commit].append(request)
    return dict(groups)


def depth(store: SiteStore) -> int:
    return sum(len(v) for v in pending(store).values())


def done(requests: list[Request]) -> None:
    for r in requests:
        r.path.unlink(missing_ok=True)


def failed(requests: list[Request], error: str) -> None:
    for r in requests:
        try:
            body = json.loads(r.path.read_bytes())
        except (FileNotFoundError, ValueError):
            continue
        body["error"] = error
        atomic_write(r.path.with_suffix(".failed"), canonical_json(body))
        r.path.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


# -- the daemon's presence -------------------------------------------------------------------
def announce(store: SiteStore, listen: str | None) -> None:
    body = {"format_version": 1, "host": HOST, "pid": os.getpid(), "listen": listen, "started": now_iso()}
    atomic_write(store.daemon_path, canonical_json(body), durable=False)


def heartbeat(store: SiteStore) -> None:
    try:
        os.utime(store.daemon_path)
    except FileNotFoundError:
        pass


def withdraw(store: SiteStore) -> None:
    path = store.daemon_path
    try:
        body = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return
    if body.get("host") == HOST and body.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def daemon_info(store: SiteStore, now: float | None = None) -> DaemonInfo | None:
    """The daemon serving this site, if one is alive."""
    path = store.daemon_path
    try:
        body = json.loads(path.read_bytes())
        age = (now if now is not None else time.time()) - path.stat().st_mtime
    except (FileNotFoundError, ValueError):
        return None
    info = DaemonInfo(body.get("host", ""), int(body.get("pid", 0)), body.get("listen"), body.get("started", ""))
    if info.host == HOST:
        return info if pid_alive(info.pid) else None
    return info if age <= DAEMON_STALE_SECONDS else None


def wait_for(store: SiteStore, commit: str, request: Path, *, timeout: float = 3600.0, poll: float = 0.2) -> Path:
    """Block until the daemon has published ``commit`` (or failed the request)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if store.is_cached(commit):
            return store.commit_path(commit)
        raise_if_failed(request, commit)
        time.sleep(poll)
    raise NotCachedError(f"timed out after {timeout:.0f}s waiting for the daemon to cache {commit[:12]}; is it running?")


def raise_if_failed(request: Path, commit: str) -> None:
    """Raise the daemon's error if it gave up on ``request`` (and forget the failure)."""
    failed_path = request.with_suffix(".failed")
    if failed_path.exists():
        error = json.loads(failed_path.read_bytes()).get("error", "unknown error")
        failed_path.unlink(missing_ok=True)
        raise CachehubError(f"the daemon could not cache {commit[:12]}: {error}")
