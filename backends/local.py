"""A lake in a local (or NFS-mounted) directory: the embedded default.

Keys map to files below ``root``. Writes go to a process-unique temp name and are published by
one atomic ``rename`` (or ``link`` for create-if-absent). Compare-and-swap on an existing key
(``if_match``) holds a short-lived lock file made with ``O_EXCL``; the etag is the SHA-256 of
the file's bytes, so the comparison itself needs no extra state.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from pathlib import Path

from cachehub.errors import ConflictError, IntegrityError, LakeError, UnsafePathError
from cachehub.fsutil import atomic_write, unique_suffix

from .base import Backend

LOCK_STALE_SECONDS = 30.0


class LocalBackend(Backend):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/") or "\x00" in key:
            raise UnsafePathError(f"refusing lake key {key!r}", path=key)
        return self.root / key

    def read(self, key: str) -> tuple[bytes, str]:
        data = self._path(key).read_bytes()
        return data, hashlib.sha256(data).hexdigest()

    def write(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        etag = hashlib.sha256(data).hexdigest()
        if if_none_match:
            try:
                atomic_write(path, data, exclusive=True)
            except FileExistsError:
                raise ConflictError(f"{key} already exists in the lake", key=key) from None
            return etag
        if if_match is None:
            atomic_write(path, data)
            return etag
        with _KeyLock(path):
            try:
                current = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:
                current = None
            if current != if_match:
                raise ConflictError(f"{key} was changed by someone else", key=key)
            atomic_write(path, data)
        return etag

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    async def astream(self, key: str, piece: int) -> AsyncIterator[bytes]:
        path = self._path(key)
        fh = await asyncio.to_thread(open, path, "rb")
        try:
            while chunk := await asyncio.to_thread(fh.read, piece):
                yield chunk
        finally:
            fh.close()

    def delete_prefix(self, prefix: str) -> None:
        if not prefix.strip("/"):
            raise UnsafePathError("refusing to delete the whole lake", path=prefix)
        shutil.rmtree(self._path(prefix.rstrip("/")), ignore_errors=True)

    def uploads_verified(self) -> bool:
        return True  # aput hashes the bytes it writes

    def modified(self, key: str) -> datetime:
        return datetime.fromtimestamp(self._path(key).stat().st_mtime, tz=timezone.utc)

    def list(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, self.root)
            for name in files:
                if name.startswith("."):  # temp files and locks
                    continue
                yield name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")

    def list_dirs(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        try:
            return sorted(e.name for e in os.scandir(base) if e.is_dir() and not e.name.startswith("."))
        except FileNotFoundError:
            return []

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def download(self, key: str, dest: Path) -> None:
        src = self._path(key)
        tmp = dest.with_name(f".{dest.name}.{unique_suffix()}.tmp")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    async def aexists(self, key: str) -> bool:
        return self._path(key).exists()

    async def aget(self, key: str) -> bytes:
        return await asyncio.to_thread(self._path(key).read_bytes)

    async def aget_range(self, key: str, start: int, end: int) -> bytes:
        return await asyncio.to_thread(self._read_range, key, start, end)

    def read_range(self, key: str, start: int, end: int) -> bytes:
        return self._read_range(key, start, end)

    def _read_range(self, key: str, start: int, end: int) -> bytes:
        fd = os.open(self._path(key), os.O_RDONLY)
        try:
            return os.pread(fd, end - start, start)
        finally:
            os.close(fd)

    async def aput(self, key: str, data: bytes, *, sha256: str) -> None:
        await asyncio.to_thread(self._put_verified, key, data, sha256)

    async def aput_if_absent(self, key: str, data: bytes, *, sha256: str) -> bool:
        return await asyncio.to_thread(self._put_verified, key, data, sha256)

    async def areplace(self, key: str, data: bytes, *, sha256: str) -> None:
        await asyncio.to_thread(self._replace_verified, key, data, sha256)

    def _replace_verified(self, key: str, data: bytes, sha256: str) -> None:
        if hashlib.sha256(data).hexdigest() != sha256:
            raise IntegrityError(f"refusing to store {key}: bytes do not match sha256 {sha256}", key=key)
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data, mode=0o444)  # a rename over the damaged copy

    def _put_verified(self, key: str, data: bytes, sha256: str) -> bool:
        if hashlib.sha256(data).hexdigest() != sha256:
            raise IntegrityError(f"refusing to store {key}: bytes do not match sha256 {sha256}", key=key)
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(path, data, mode=0o444, exclusive=True)
        except FileExistsError:
            return False  # content-addressed: whoever wrote it first wrote the same bytes
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise LakeError(f"the lake directory {self.root} is full; free space and re-run") from exc
            raise
        return True


class _KeyLock:
    """An O_EXCL lock file beside ``path``; saves the read-compare-replace from a race.

    A lock older than LOCK_STALE_SECONDS belonged to a dead process (a CAS takes milliseconds)
    and is broken by renaming it away, which only one breaker can do.
    """

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.lock = path.with_name(f".{path.name}.lock")
        self.timeout = timeout

    def __enter__(self) -> _KeyLock:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fd = os.open(self.lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.close(fd)
                return self
            except FileExistsError:
                try:
                    age = time.time() - self.lock.stat().st_mtime
                    if age > LOCK_STALE_SECONDS:
                        stale = self.lock.with_name(f"{self.lock.name}.{unique_suffix()}.stale")
                        os.rename(self.lock, stale)
                        stale.unlink()
                        continue
                except FileNotFoundError:
                    continue
                if time.monotonic() > deadline:
                    raise ConflictError(f"{self.lock} is held by another writer; retry") from None
                time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self.lock.unlink(missing_ok=True)
