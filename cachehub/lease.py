"""Leases and pins: claims on cache entries that every host sharing the site root can see.

A lease is a file ``<root>/leases/<commit-id>/<lease-id>.json`` (``SiteStore.lease_dir``) written by a running job; its
mtime is its heartbeat, renewed from a background thread. It is *live* while its holder is a
live process on this host, or (holder on another host) while its heartbeat is younger than
its timeout. A dead lease is reaped (removed and audited) by eviction sweeps.

A pin is a file ``<root>/pins/<commit-id>.json``: an operator's "keep this hot".

Leased or pinned entries are never evicted. Time is a parameter everywhere (``now``), so the
rules are tested without sleeping.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .fsutil import HOST, atomic_write
from .lake import canonical_json, now_iso
from .policy import DEFAULT_LEASE_TIMEOUT
from .store import SiteStore, pid_alive


@dataclass(frozen=True)
class LeaseInfo:
    """A lease as read from the site root."""

    id: str
    commit: str
    host: str
    pid: int
    user: str
    run: str | None
    created: str
    heartbeat: float  # mtime of the lease file
    timeout: float
    path: Path

    def live(self, now: float | None = None) -> bool:
        """Is the holder still there? Same host: its pid. Other hosts: a fresh heartbeat."""
        if self.host == HOST:
            return pid_alive(self.pid)
        return (now if now is not None else time.time()) - self.heartbeat <= self.timeout


class Lease:
    """A held lease with a heartbeat thread; release() (or the with-block's end) drops it."""

    def __init__(self, store: SiteStore, commit_id: str, *, user: str, run: str | None = None, timeout: float = DEFAULT_LEASE_TIMEOUT) -> None:
        self.store = store
        self.commit = commit_id
        self.id = f"{HOST}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
        self.path = store.lease_dir(commit_id) / f"{self.id}.json"
        self.timeout = timeout
        body = {
            "format_version": 1,
            "lease": self.id,
            "commit": commit_id,
            "host": HOST,
            "pid": os.getpid(),
            "user": user,
            "run": run,
            "created": now_iso(),
            "timeout": timeout,
        }
        for attempt in range(3):
            store.make_dirs(self.path.parent)
            try:
                atomic_write(self.path, canonical_json(body), durable=False)
                break
            except FileNotFoundError:  # another job's release removed the empty directory just now
                if attempt == 2:
                    raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="cachehub-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(max(1.0, self.timeout / 3)):
            try:
                os.utime(self.path)
            except FileNotFoundError:  # reaped by someone who thought we were dead
                return

    def release(self) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()
        except OSError:
            pass

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def leases(store: SiteStore, commit_id: str | None = None) -> list[LeaseInfo]:
    """Every lease file at the site (or of one commit), live or not."""
    base = store.leases_dir
    dirs = [base / commit_id] if commit_id else (sorted(p for p in base.iterdir() if p.is_dir()) if base.exists() else [])
    out = []
    for d in dirs:
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            continue
        for name in names:
            if not name.endswith(".json"):
                continue
            path = d / name
            try:
                body = json.loads(path.read_bytes())
                mtime = path.stat().st_mtime
            except (FileNotFoundError, ValueError):
                continue
            out.append(
                LeaseInfo(
                    id=body.get("lease", name[:-5]),
                    commit=d.name,
                    host=body.get("host", ""),
                    pid=int(body.get("pid", 0)),
                    user=body.get("user", ""),
                    run=body.get("run"),
                    created=body.get("created", ""),
                    heartbeat=mtime,
                    timeout=float(body.get("timeout", DEFAULT_LEASE_TIMEOUT)),
                    path=path,
                )
            )
    return out


def live_leases(store: SiteStore, commit_id: str, now: float | None = None) -> list[LeaseInfo]:
    return [lease for lease in leases(store, commit_id) if lease.live(now)]


def reap(store: SiteStore, now: float | None = None) -> list[LeaseInfo]:
    """Remove leases whose holder is gone; return them (the caller audits)."""
    dead = [lease for lease in leases(store) if not lease.live(now)]
    for lease in dead:
        lease.path.unlink(missing_ok=True)
        try:
            lease.path.parent.rmdir()
        except OSError:
            pass
    return dead


def pin(store: SiteStore, commit_id: str, *, user: str, reason: str = "") -> bool:
    """Pin an entry; False if it was already pinned."""
    path = store.pin_path(commit_id)
    store.make_dirs(path.parent)
    body = {"format_version": 1, "commit": commit_id, "user": user, "host": HOST, "pinned": now_iso(), "reason": reason}
    try:
        atomic_write(path, canonical_json(body), exclusive=True)
        return True
    except FileExistsError:
        return False


def unpin(store: SiteStore, commit_id: str) -> bool:
    path = store.pin_path(commit_id)
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed


def is_pinned(store: SiteStore, commit_id: str) -> bool:
    return store.pin_path(commit_id).exists()
