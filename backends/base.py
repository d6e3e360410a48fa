"""The one small interface every lake backend implements.

Keys are '/'-separated strings relative to the lake root. Errors crossing this boundary are
built-ins or cachehub errors, never a library's own: FileNotFoundError for a missing key,
ConflictError for a failed precondition, LakeError for anything else (server down, denied...).

The synchronous methods serve metadata (commits, tags, manifests); the ``a*`` coroutines are
the data path the transfer engine drives with many requests in flight.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path

# What the data path returns: ``bytes`` or any object with the buffer protocol (obstore's
# ``Bytes``), so a downloaded body is hashed and written without being copied.
try:
    from collections.abc import Buffer  # Python 3.12+
except ImportError:  # 3.11: the name only serves annotations
    Buffer = bytes  # type: ignore[misc,assignment]


class Backend(abc.ABC):
    """Storage adapter for one lake root."""

    url: str

    # -- metadata ---------------------------------------------------------------------------
    @abc.abstractmethod
    def read(self, key: str) -> tuple[bytes, str]:
        """Return (bytes, etag) of ``key``; FileNotFoundError if absent."""

    @abc.abstractmethod
    def write(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        """Write ``data`` at ``key`` atomically and return its new etag.

        ``if_none_match`` creates only if absent; ``if_match`` replaces only if the current
        etag equals it. Either failing raises ConflictError and changes nothing.
        """

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[str]:
        """Every key under ``prefix`` (recursively), in no particular order."""

    @abc.abstractmethod
    def list_dirs(self, prefix: str) -> list[str]:
        """Names of the immediate 'sub-directories' of ``prefix``."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; no error if it is already gone."""

    @abc.abstractmethod
    def download(self, key: str, dest: Path) -> None:
        """Copy ``key`` to the local file ``dest`` (written atomically)."""

    # -- data path --------------------------------------------------------------------------
    @abc.abstractmethod
    async def aexists(self, key: str) -> bool: ...

    @abc.abstractmethod
    async def aget(self, key: str) -> Buffer:
        """The whole object; FileNotFoundError if absent."""

    @abc.abstractmethod
    async def aget_range(self, key: str, start: int, end: int) -> Buffer:
        """Bytes ``[start, end)`` of the object (ranged reads of large objects, and one-call
        reads of small objects whose size is known); may be shorter if the object is."""

    async def astream(self, key: str, piece: int) -> AsyncIterator[Buffer]:
        """The whole object in pieces of about ``piece`` bytes, hashed as they arrive by whoever
        reads them (``lake verify``, ``push --repair``): memory stays bounded whatever its size.
        FileNotFoundError if absent."""
        data = await self.aget(key)
        for start in range(0, len(data), piece):  # type: ignore[arg-type]
            yield memoryview(data)[start : start + piece]  # type: ignore[arg-type]

    def delete_prefix(self, prefix: str) -> None:
        """Remove every key under ``prefix`` (doctor's probe objects)."""
        for key in list(self.list(prefix)):
            self.delete(key)

    @abc.abstractmethod
    def read_range(self, key: str, start: int, end: int) -> Buffer:
        """``aget_range`` from synchronous code (the ``cachehub://`` filesystem's reads)."""

    @abc.abstractmethod
    async def aput(self, key: str, data: bytes, *, sha256: str) -> None:
        """Store ``data`` at ``key``; the store verifies ``sha256`` (hex) or rejects the write."""

    async def areplace(self, key: str, data: bytes, *, sha256: str) -> None:
        """Store ``data`` at ``key`` over whatever is there (``push --repair`` of a damaged copy);
        the bytes are checked against ``sha256`` like ``aput``."""
        await self.aput(key, data, sha256=sha256)

    async def aput_if_absent(self, key: str, data: Buffer, *, sha256: str) -> bool:
        """``aput`` unless ``key`` exists; True if this call stored it.

        The default is a HEAD then a PUT; backends with a create-only write override it with
        one request (content-addressed keys make a lost race harmless either way).
        """
        if await self.aexists(key):
            return False
        await self.aput(key, data, sha256=sha256)
        return True

    # -- what cachehub doctor checks and records (docs/lake-format.md) -------------------------
    def uploads_verified(self) -> bool:
        """Does the store itself check each ``aput``'s bytes against their checksum? When it
        does not (Azure, GCS, an S3 server doctor found accepting wrong checksums), push reads
        each upload back and hashes it."""
        return False

    def modified(self, key: str) -> datetime:
        """When ``key`` was last written, by the server's clock (doctor's clock-skew check)."""
        raise NotImplementedError

    def probe_bad_checksum(self, key: str) -> bool | None:
        """Upload to ``key`` with a checksum that does not match the body: True if the server
        refused it, False if it stored it, None if this backend's uploads carry no checksum."""
        return None

    def apply_server_facts(self, facts: dict) -> None:  # noqa: B027 - optional hook
        """Take what doctor recorded about the server (the lake marker's ``server.facts``) and
        degrade where a guarantee is missing; backends with nothing to degrade ignore it."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections (optional)."""
