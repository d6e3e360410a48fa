"""Diff of two sorted manifest streams: one linear merge, constant memory (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .model import DiffEntry, DiffStat, ManifestEntry


def diff(old: Iterable[ManifestEntry], new: Iterable[ManifestEntry]) -> Iterator[DiffEntry]:
    """Yield added, removed and modified paths, in path order, from two path-sorted streams.

    A file is *modified* when its content hash or size differs; an identical file under a new
    name is a removal plus an addition (the content is still reused when caching).
    """
    old_it, new_it = iter(old), iter(new)
    a = next(old_it, None)
    b = next(new_it, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a.path < b.path):
            assert a is not None
            yield DiffEntry(a.path, "removed", a.size, None)
            a = next(old_it, None)
        elif a is None or b.path < a.path:
            yield DiffEntry(b.path, "added", None, b.size)
            b = next(new_it, None)
        else:
            if a.sha256 != b.sha256 or a.size != b.size:
                yield DiffEntry(b.path, "modified", a.size, b.size)
            a = next(old_it, None)
            b = next(new_it, None)


def stat(changes: Iterable[DiffEntry]) -> DiffStat:
    """Count a diff's changes and bytes."""
    counts = {"added": 0, "removed": 0, "modified": 0}
    sizes = {"added": 0, "removed": 0, "modified": 0}
    for change in changes:
        counts[change.change] += 1
        sizes[change.change] += (change.old_size if change.change == "removed" else change.new_size) or 0
    return DiffStat(
        added=counts["added"],
        removed=counts["removed"],
        modified=counts["modified"],
        added_bytes=sizes["added"],
        removed_bytes=sizes["removed"],
        modified_bytes=sizes["modified"],
    )
