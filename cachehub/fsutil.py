"""Small filesystem helpers shared by the local lake and the site store."""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from datetime import UTC, datetime
from pathlib import Path

HOST = socket.gethostname()


def now_iso() -> str:
    """Now, in UTC, as the ISO 8601 text every document and audit event carries."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def unique_suffix() -> str:
    """A name part no other process on any host sharing this filesystem will produce."""
    return f"{HOST}.{os.getpid()}.{uuid.uuid4().hex[:12]}"


def atomic_write(
    path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644, exclusive: bool = False, durable: bool = True
) -> None:
    """Write ``data`` to ``path`` via a same-directory temp file and one atomic rename.

    With ``exclusive`` the final step is ``link`` instead of ``rename``, so it fails with
    FileExistsError if ``path`` exists: an atomic create-if-absent, safe on NFS. ``durable``
    fsyncs the bytes before they become visible, so a crash never publishes an empty file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{unique_suffix()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                # over NFS a retransmitted link() can report EEXIST for our own success: then the
                # temp file has two names (open(2), "O_EXCL"), and the file is ours
                if os.stat(tmp).st_nlink != 2:
                    raise
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike[str], *, block: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(block)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
