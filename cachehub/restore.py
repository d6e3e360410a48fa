"""Restore: a writable working copy of a commit, never touching history.

It copies (never links: the copy must be writable and the store read-only) from a site where
the commit is cached, or fetches from the lake, verifying every byte. Later commits stay as
they are, unlike an in-place storage snapshot restore. The restored files are entered in the
hash cache, so a later ``snapshot`` of the directory re-hashes only what the user changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from . import audit, index
from .context import Context
from .errors import ConflictError, IntegrityError
from .hashcache import HashCache
from .lanes import run
from .manifest import read_manifest
from .model import Commit
from .results import RestoreResult
from .scan import FoundFile
from .store import remove_tree


def restore(ctx: Context, ref: str, directory: Path, *, jobs: int | None = None) -> RestoreResult:
    """A writable working copy of the commit ``ref`` names in ``directory``; history is never changed."""
    commit = index.resolve_commit(ctx, ref)
    ctx.events.hook("pre_restore", ref=ref, commit=commit.id, directory=str(directory))
    result = copy_out(ctx, commit, Path(directory), jobs=jobs or ctx.settings.jobs)
    with ctx.catalog.transaction():
        ctx.catalog.add_restore(commit.id, commit.dataset, result.path, ctx.host, ctx.user, ctx.now_iso())
        ctx.events.audit("restore", dataset=commit.dataset, commit=commit.id, ref=ref, path=result.path, from_site=result.from_site)
    ctx.events.hook("post_restore", ref=ref, commit=commit.id, directory=result.path)
    audit.ship_quietly(ctx)
    return result


def copy_out(ctx: Context, commit: Commit, directory: Path, *, jobs: int) -> RestoreResult:
    """Write a writable copy of ``commit`` into ``directory`` (which must be empty or absent)."""
    directory = directory.absolute()
    if directory.exists() and any(directory.iterdir()):
        raise ConflictError(f"{directory} is not empty; restore into a new or empty directory (cachehub never overwrites)")
    entries = list(read_manifest(ctx.manifest(commit.manifest)))  # validated: no path escapes
    source = next((s for s in ctx.stores() if s.is_cached(commit.id)), None)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        if source is not None:
            top = source.commit_path(commit.id)
            for e in entries:
                dest = directory / e.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(top / e.path, dest)
        else:
            lake = ctx.lake

            async def one(e: object) -> None:
                data = await lake.aget_object(e.sha256)  # type: ignore[attr-defined]
                if hashlib.sha256(data).hexdigest() != e.sha256:  # type: ignore[attr-defined]
                    raise IntegrityError(f"object {e.sha256} in the lake is damaged; nothing usable was restored")  # type: ignore[attr-defined]
                dest = directory / e.path  # type: ignore[attr-defined]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)  # type: ignore[arg-type]

            run(entries, one, jobs=jobs)
    except BaseException:
        remove_tree(directory)
        raise
    _remember_hashes(ctx, directory, entries)
    return RestoreResult(commit.dataset, commit.id, str(directory), commit.files, commit.bytes, source.name if source else None)


def _remember_hashes(ctx: Context, directory: Path, entries: list) -> None:
    cache = HashCache(ctx.catalog)
    for e in entries:
        path = directory / e.path
        st = os.stat(path)
        cache.remember(FoundFile(e.path, str(path), st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns), e.sha256, True)
    cache.save()
