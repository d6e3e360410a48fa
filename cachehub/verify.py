"""Verify a cached commit against its manifest, and repair it from the lake.

Every file of the tree is re-hashed; a damaged or missing one is reported, and with ``repair``
fetched again (verified), rewritten in place so that every tree sharing its inode is fixed at
once, and the object store's copy replaced.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from . import index
from .context import Context
from .errors import IntegrityError, NotCachedError
from .fsutil import sha256_file
from .manifest import read_manifest
from .model import Commit, ManifestEntry, VerifyResult
from .progress import NULL, Progress
from .select import Selection
from .store import Linker, SiteStore, site_errors


def verify(
    ctx: Context, ref: str, *, site: str | None = None, repair: bool = False, progress: Progress = NULL, selection: Selection = Selection()
) -> VerifyResult:
    """Re-hash a cached tree (the commit's, or a partial cache's) against its manifest; with
    ``repair`` re-fetch what is wrong."""
    commit = index.resolve_commit(ctx, ref)
    store = ctx.store(site)
    with site_errors(store, f"verify {ref}"):
        return _verify(ctx, ref, commit, store, repair=repair, progress=progress, selection=selection)


def verify_entry(ctx: Context, store: SiteStore, entry: str, *, repair: bool) -> VerifyResult | None:
    """Verify a published site entry by its id (the daemon's repair); None if it is not there."""
    cached = store.cached_commit(entry)
    if cached is None:
        return None
    commit = index.resolve_commit(ctx, f"{cached.dataset}@{cached.source_commit}")
    with site_errors(store, f"verify {cached.dataset}@{entry[:12]}"):
        return _verify(ctx, f"{cached.dataset}@{cached.source_commit}", commit, store, repair=repair, progress=NULL, selection=cached.selection)


def _verify(
    ctx: Context, ref: str, commit: Commit, store: SiteStore, *, repair: bool, progress: Progress, selection: Selection = Selection()
) -> VerifyResult:
    entry_id = selection.entry_id(commit.id)
    if not store.is_cached(entry_id):
        raise NotCachedError(
            f"{commit.dataset}@{commit.short}{' (' + selection.describe() + ')' if selection else ''} is not cached at site "
            f"{store.name}; run: cachehub cache {ref}{selection.flags()}",
        )
    manifest = store.manifest_path(commit.manifest)
    if not manifest.exists():
        store.keep_manifest(commit.manifest, ctx.manifest(commit.manifest))
    top = store.commit_path(entry_id)
    damaged: list[str] = []
    missing: list[str] = []
    bad: list[ManifestEntry] = []
    progress.start("verify", total_files=commit.files, total_bytes=commit.bytes)
    files = 0
    for entry in read_manifest(manifest):
        if selection and not selection.matches(entry.path):
            continue
        files += 1
        path = top / entry.path
        try:
            ok = os.path.getsize(path) == entry.size and sha256_file(path) == entry.sha256
        except FileNotFoundError:
            missing.append(entry.path)
            bad.append(entry)
            progress.advance(1, entry.size)
            continue
        if not ok:
            damaged.append(entry.path)
            bad.append(entry)
        progress.advance(1, entry.size)
    progress.finish()
    repaired: list[str] = []
    if repair and bad:
        repaired = _repair(ctx, store, commit, top, bad)
    ctx.events.audit(
        "verify",
        dataset=commit.dataset,
        commit=commit.id,
        site=store.name,
        damaged=len(damaged),
        missing=len(missing),
        repaired=len(repaired),
    )
    return VerifyResult(commit.dataset, commit.id, store.name, files, tuple(damaged), tuple(missing), tuple(repaired))


def _repair(ctx: Context, store: SiteStore, commit: Commit, top: Path, bad: list[ManifestEntry]) -> list[str]:
    """Fetch verified bytes for each bad file and rewrite it, fixing every tree sharing the inode."""
    lake = ctx.lake
    repaired = []
    for entry in bad:
        data = bytes(lake.get_object_range(entry.sha256, 0, entry.size)) if entry.size else b""  # type: ignore[arg-type]
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise IntegrityError(f"the lake's copy of {entry.path} ({entry.sha256}) is damaged too; put it back with cachehub push DIR NAME --repair")
        path = top / entry.path
        obj = store.object_path(entry.sha256)
        parent = path.parent
        os.chmod(parent, 0o755)
        try:
            if path.exists() and not path.is_symlink():
                # rewrite in place: every hardlink of this inode (other commits too) is fixed at once
                os.chmod(path, 0o644)
                with open(path, "wb") as fh:
                    fh.write(data)
                os.chmod(path, 0o444)
                if not obj.exists() or not os.path.samefile(obj, path):
                    obj.unlink(missing_ok=True)
                    store.store_object(entry.sha256, data)
            else:
                path.unlink(missing_ok=True)
                if not obj.exists() or os.path.getsize(obj) != entry.size:
                    obj.unlink(missing_ok=True)
                    store.store_object(entry.sha256, data)
                elif sha256_file(obj) != entry.sha256:
                    os.chmod(obj, 0o644)
                    with open(obj, "wb") as fh:
                        fh.write(data)
                    os.chmod(obj, 0o444)
                Linker(store.site.link).place(obj, str(path))
        finally:
            os.chmod(parent, 0o575 if store.site.group else 0o555)
        repaired.append(entry.path)
    ctx.events.audit("repair", dataset=commit.dataset, commit=commit.id, site=store.name, files=len(repaired))
    return repaired
