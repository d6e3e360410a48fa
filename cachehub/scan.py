"""Walk a directory in manifest order and hash its files, in bounded memory.

Order: a manifest is sorted by path bytewise. Visiting each directory's children sorted by
``name`` for files and ``name + "/"`` for directories yields exactly that order without holding
all paths at once; memory is bounded by the largest single directory.

Symlinks in the pushed directory: a link to a regular file *inside* the directory is followed
and stored as an ordinary file with the target's bytes; a link that dangles, points outside the
directory or points to a directory is refused (UnsafePathError naming it), as are devices, FIFOs
and sockets. Nothing is ever read from outside the directory.
"""

from __future__ import annotations

import os
import stat as statmod
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from .errors import UnsafePathError
from .fsutil import sha256_file
from .model import ManifestEntry
from .paths import normalise, validate_path


@dataclass(frozen=True, slots=True)
class FoundFile:
    path: str  # manifest path (relative, '/'-separated, NFC)
    abspath: str  # where to read the bytes
    size: int
    ino: int
    dev: int
    mtime_ns: int
    ctime_ns: int = 0


def walk(root: str | os.PathLike[str]) -> Iterator[FoundFile]:
    """Yield every file below ``root`` in manifest order; refuse what cannot be stored safely."""
    top = os.path.realpath(root)
    if not os.path.isdir(top):
        raise NotADirectoryError(f"{root} is not a directory")
    yield from _walk(top, top, "")


def _walk(top: str, directory: str, prefix: str) -> Iterator[FoundFile]:
    children: list[tuple[str, str, os.stat_result, bool]] = []
    with os.scandir(directory) as it:
        for entry in it:
            name = normalise(entry.name)
            rel = prefix + name
            st = entry.stat(follow_symlinks=False)
            if statmod.S_ISLNK(st.st_mode):
                target = os.path.realpath(entry.path)
                if os.path.commonpath([top, target]) != top:
                    raise UnsafePathError(f"symlink {rel!r} points outside the pushed directory; copy the file in instead", path=rel)
                try:
                    st = os.stat(target)
                except FileNotFoundError:
                    raise UnsafePathError(f"symlink {rel!r} dangles; remove it or fix its target", path=rel) from None
                if not statmod.S_ISREG(st.st_mode):
                    raise UnsafePathError(f"symlink {rel!r} points to a directory or special file; only links to files are followed", path=rel)
                children.append((name, target, st, False))
            elif statmod.S_ISDIR(st.st_mode):
                children.append((name, entry.path, st, True))
            elif statmod.S_ISREG(st.st_mode):
                children.append((name, entry.path, st, False))
            else:
                raise UnsafePathError(f"{rel!r} is a device, FIFO or socket; only regular files can be pushed", path=rel)
    children.sort(key=lambda c: c[0] + "/" if c[3] else c[0])
    for name, path, st, is_dir in children:
        rel = prefix + name
        if is_dir:
            yield from _walk(top, path, rel + "/")
        else:
            validate_path(rel)
            yield FoundFile(rel, path, st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns)


HashLookup = Callable[[FoundFile], str | None]


def hash_files(
    files: Iterator[FoundFile],
    *,
    jobs: int = 4,
    known: HashLookup | None = None,
    on_hashed: Callable[[FoundFile, str, bool], None] | None = None,
) -> Iterator[tuple[FoundFile, ManifestEntry]]:
    """Hash files with a thread pool, yielding in input order with a bounded window.

    ``known`` may return a hash already recorded for an unchanged file (inode, size, mtime),
    which is then not read again. ``on_hashed(file, sha, was_rehashed)`` observes progress.
    """
    window: deque[tuple[FoundFile, Future[str] | str]] = deque()
    limit = max(8, jobs * 16)
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="cachehub-hash") as pool:
        for found in files:
            cached = known(found) if known else None
            window.append((found, cached if cached else pool.submit(sha256_file, found.abspath)))
            while len(window) >= limit:
                yield _settle(window.popleft(), on_hashed)
        while window:
            yield _settle(window.popleft(), on_hashed)


def _settle(
    item: tuple[FoundFile, Future[str] | str], on_hashed: Callable[[FoundFile, str, bool], None] | None
) -> tuple[FoundFile, ManifestEntry]:
    found, pending = item
    rehashed = not isinstance(pending, str)
    digest = pending.result() if isinstance(pending, Future) else pending
    if on_hashed:
        on_hashed(found, digest, rehashed)
    return found, ManifestEntry(found.path, found.size, digest)
