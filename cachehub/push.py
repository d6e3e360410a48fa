"""Publish a directory as a new commit of a dataset.

Order of events, each step safe to kill:

1. hash every file (threads) and write the manifest to a local temp file, streaming;
2. upload every content object the lake lacks (content-addressed, so an upload that already
   arrived before a crash is not stored twice: small files go as one create-only PUT, big ones
   are asked about with a HEAD first); objects above
   ``chunks.CHUNKED_MIN`` also get a chunk map (``chunks.py``), written after the object;
3. upload the manifest;
4. write the commit document (create-only) -- only now does the commit exist;
5. move the tag (compare-and-swap), then index the commit in the catalog and audit it.

A commit therefore never points at content that is not in the lake.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterator
from . import audit, chunks, index, tags
from .context import Context
from .errors import ConflictError, IntegrityError
from .fsutil import unique_suffix
from .hashcache import HashCache
from .lake import Lake, commit_document, now_iso
from .lanes import run
from .manifest import ManifestWriter, read_manifest
from .model import Commit, ManifestEntry, PushResult
from .progress import NULL, Progress
from .refs import validate_dataset_name, validate_tag_name
from .scan import hash_files, walk
from .store import sweep_dead_entries

SMALL_FILE = 4 * 1024 * 1024
RECENT = 65_536  # contents remembered to skip duplicates within one push
BIG_FILES_IN_FLIGHT = 4  # files above SMALL_FILE read into memory at once (memory: 4 x the largest)


def push(ctx: Context, directory: str | os.PathLike[str], dataset: str, **options: object) -> PushResult:
    """Publish ``directory`` with the push hooks around it, then ship the audit trail."""
    ctx.events.hook("pre_push", dataset=dataset, directory=str(directory))
    result = publish(ctx, directory, dataset, **options)  # type: ignore[arg-type]
    ctx.events.hook("post_push", dataset=dataset, directory=str(directory), commit=result.commit, created=result.created)
    audit.ship_quietly(ctx)
    return result


def snapshot(
    ctx: Context,
    directory: str | os.PathLike[str],
    dataset: str,
    *,
    message: str = "",
    run: str | None = None,
    derived_from: tuple[str, ...] = (),
    tag: str | None = None,
    progress: Progress = NULL,
) -> PushResult:
    """A new commit from a working directory, re-hashing only files changed since last seen."""
    ctx.events.hook("pre_snapshot", dataset=dataset, directory=str(directory), run=run)
    result = publish(
        ctx, directory, dataset, message=message or f"snapshot of {directory}", derived_from=derived_from, tag=tag, progress=progress, run=run
    )
    catalog = ctx.catalog
    if run and result.commit:
        catalog.add_run_output(run, dataset, result.commit)
    ctx.events.audit(
        "snapshot", dataset=dataset, commit=result.commit, directory=str(os.path.abspath(directory)), run=run,
        created=result.created, hashed_files=result.hashed_files, uploaded_files=result.uploaded_files,
    )  # fmt: skip
    ctx.events.hook("post_snapshot", dataset=dataset, directory=str(directory), commit=result.commit, run=run)
    audit.ship_quietly(ctx)
    return result


def publish(
    ctx: Context,
    directory: str | os.PathLike[str],
    dataset: str,
    *,
    message: str = "",
    tag: str | None = None,
    force: bool = False,
    parent: str | None = None,
    derived_from: tuple[str, ...] = (),
    transform: str | None = None,
    progress: Progress = NULL,
    jobs: int | None = None,
    run: str | None = None,
    repair: bool = False,
) -> PushResult:
    """Publish ``directory`` as a new commit of ``dataset``; upload only what the lake lacks.

    With ``repair`` every object of the directory is read back from the lake and checked
    against its SHA-256; a missing or damaged one is uploaded again (``repaired_files``). The
    fix for "object … of … is missing from the lake" or "does not match its SHA-256".
    """
    started = time.monotonic()
    validate_dataset_name(dataset)
    if tag is not None:
        validate_tag_name(tag)
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory} is not a directory; give the folder to publish")
    jobs = jobs or ctx.settings.jobs
    lake = ctx.lake
    catalog = ctx.catalog
    lake.ensure_initialised()
    if catalog.has_dataset(dataset) or lake.commit_ids(dataset):
        index.refresh(ctx, dataset)
    if tag is not None and not force and catalog.tag(dataset, tag) is not None:
        raise ConflictError(
            f"tag {dataset}@{tag} already exists; pick a new tag or pass --force to move it", dataset=dataset, tag=tag
        )
    parent_commit = index.resolve_commit(ctx, parent) if parent else catalog.latest(dataset)
    inputs = tuple(index.resolve_commit(ctx, ref).id for ref in derived_from)

    tmp = ctx.settings.tmp_dir
    tmp.mkdir(parents=True, exist_ok=True)
    sweep_dead_entries(tmp)
    manifest_tmp = tmp / f"push-manifest.{unique_suffix()}"
    todo_tmp = tmp / f"push-todo.{unique_suffix()}"
    try:
        hashes = HashCache(catalog)
        manifest_id, files, nbytes, candidates = _hash_and_list(
            lake, directory, None if repair else parent_commit, manifest_tmp, todo_tmp, progress, hashes
        )  # repair: every object is checked, not only those the parent lacks
        hashes.save()
        unchanged = parent_commit is not None and manifest_id == parent_commit.manifest and not inputs
        if unchanged and not repair:
            if tag is not None:
                tags.tag(ctx, parent_commit, tag, force=force)
            return PushResult(
                dataset, parent_commit.id, False, files, nbytes, 0, 0, files, nbytes, tag, time.monotonic() - started, hashes.misses
            )
        uploaded_files, uploaded_bytes, repaired = _upload(lake, todo_tmp, candidates, progress, jobs, repair=repair)
        if repaired:
            ctx.events.audit("push-repair", dataset=dataset, objects=repaired, lake=lake.url)
        if unchanged:
            if tag is not None:
                tags.tag(ctx, parent_commit, tag, force=force)
            return PushResult(
                dataset, parent_commit.id, False, files, nbytes, uploaded_files, uploaded_bytes, files - uploaded_files,
                nbytes - uploaded_bytes, tag, time.monotonic() - started, hashes.misses, repaired,
            )  # fmt: skip
        lake.put_manifest(manifest_id, manifest_tmp)
    finally:
        manifest_tmp.unlink(missing_ok=True)
        todo_tmp.unlink(missing_ok=True)

    body = commit_document(
        dataset=dataset, manifest=manifest_id, files=files, bytes=nbytes, parents=[parent_commit.id] if parent_commit else [],
        author=ctx.user, host=ctx.host, message=message, created=now_iso(), derived_from=inputs, transform=transform, run=run,
    )  # fmt: skip
    commit = lake.write_commit(body)
    with catalog.transaction():
        catalog.add_commits([commit])
        catalog.touch_dataset(dataset)
        ctx.events.audit(
            "push",
            dataset=dataset,
            commit=commit.id,
            files=files,
            bytes=nbytes,
            uploaded_files=uploaded_files,
            uploaded_bytes=uploaded_bytes,
            parents=list(commit.parents),
            derived_from=list(inputs),
            transform=transform,
            lake=lake.url,
        )
    if tag is not None:
        tags.tag(ctx, commit, tag, force=force)
    return PushResult(
        dataset=dataset,
        commit=commit.id,
        created=True,
        files=files,
        bytes=nbytes,
        uploaded_files=uploaded_files,
        uploaded_bytes=uploaded_bytes,
        present_files=files - uploaded_files,
        present_bytes=nbytes - uploaded_bytes,
        tag=tag,
        seconds=time.monotonic() - started,
        hashed_files=hashes.misses,
        repaired_files=repaired,
    )


def _hash_and_list(
    lake: Lake,
    directory: str | os.PathLike[str],
    parent: Commit | None,
    manifest_path: os.PathLike[str],
    todo_path: os.PathLike[str],
    progress: Progress,
    hashes: HashCache,
) -> tuple[str, int, int, int]:
    """Write the manifest; list (sha, size, abspath) of files whose content may be new.

    Content at the same path with the same hash in the parent commit is known to be in the
    lake (a commit is written only after its objects) and is not listed.
    """
    parent_entries: Iterator[ManifestEntry] = iter(())
    if parent is not None:
        parent_entries = read_manifest(lake.manifest(parent.manifest), validate=False)  # validated on arrival
    prev = next(parent_entries, None)
    writer = ManifestWriter(manifest_path)
    candidates = 0
    progress.start("hash")
    try:
        with open(todo_path, "w", encoding="utf-8") as todo:
            hashed = hash_files(
                walk(directory), jobs=max(2, min(8, os.cpu_count() or 2)), known=hashes.lookup, on_hashed=hashes.remember
            )
            for found, entry in hashed:
                writer.add(entry)
                progress.advance(1, entry.size)
                while prev is not None and prev.path < entry.path:
                    prev = next(parent_entries, None)
                if prev is not None and prev.path == entry.path and prev.sha256 == entry.sha256:
                    continue
                candidates += 1
                todo.write(f"{entry.sha256}\t{entry.size}\t{found.mtime_ns}\t{found.abspath}\n")
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.finish()
    return writer.close(), writer.files, writer.bytes, candidates


def _upload(
    lake: Lake, todo_path: os.PathLike[str], candidates: int, progress: Progress, jobs: int, *, repair: bool = False
) -> tuple[int, int, int]:
    """Upload the listed contents the lake lacks; return (files, bytes, repaired).

    With ``repair``, the lake's copy of each is read back and checked first, and a missing or
    damaged one is uploaded again, over it (counted in ``repaired`` and in files and bytes).
    """
    recent: dict[str, None] = {}  # contents handled lately (bounded: duplicates cluster)
    counts = [0, 0, 0]

    def items() -> Iterator[tuple[str, int, int, str]]:
        with open(todo_path, encoding="utf-8") as fh:
            for line in fh:
                sha, size, mtime, path = line.rstrip("\n").split("\t", 3)
                # a duplicate missed here costs one request that finds the object (a create-only
                # PUT, or a HEAD for a big file), so a bounded memory of recent contents is enough
                if sha in recent:
                    progress.advance(1, 0)
                    continue
                recent[sha] = None
                if len(recent) > RECENT:
                    del recent[next(iter(recent))]
                yield sha, int(size), int(mtime), path

    big: list[asyncio.Semaphore] = []  # made inside the event loop, on first use

    async def repaired(sha: str, size: int, mtime: int, path: str) -> bool:
        """Check the lake's copy; put the file's bytes over it if it is missing or damaged."""
        object_ok = await lake.acheck_object(sha, size) is None
        map_ok = size <= chunks.CHUNKED_MIN or await lake.acheck_chunk_map(sha, size) is None
        if object_ok and map_ok:
            return False
        data = await asyncio.to_thread(_read_checked, path, sha, size, mtime)
        if not object_ok:
            await lake.areplace_object(sha, data)
        if not map_ok:  # after the object: a chunk map never describes content the lake lacks
            await lake.aput_chunk_map(sha, await asyncio.to_thread(chunks.compute, data), replace=True)
        return True

    async def one(item: tuple[str, int, int, str]) -> None:
        sha, size, mtime, path = item
        if repair:
            if not big:
                big.append(asyncio.Semaphore(BIG_FILES_IN_FLIGHT))
            async with big[0]:  # whole objects in memory: bound how many at once
                fixed = await repaired(sha, size, mtime, path)
            if fixed:
                counts[0] += 1
                counts[1] += size
                counts[2] += 1
            progress.advance(1, size if fixed else 0)
            return
        if size <= SMALL_FILE:
            # candidates are mostly new (unchanged paths were dropped against the parent):
            # one create-only PUT, not a HEAD and then a PUT
            if not await lake.aput_object_if_absent(sha, _read_checked(path, sha, size, mtime)):
                progress.advance(1, 0)
                return
        else:
            present = await lake.aobject_exists(sha)  # big: ask first rather than send the bytes in vain
            # a present object may still lack its chunk map (pushed before maps existed, or by
            # a push that died in between): this push has the file at hand, so it adds the map
            wants_map = size > chunks.CHUNKED_MIN and not (present and await lake.ahas_chunk_map(sha))
            if present and not wants_map:
                progress.advance(1, 0)
                return
            if not big:
                big.append(asyncio.Semaphore(BIG_FILES_IN_FLIGHT))
            async with big[0]:  # big files are read whole: bound how many are in memory at once
                data = await asyncio.to_thread(_read_checked, path, sha, size, mtime)
                chunk_map = await asyncio.to_thread(chunks.compute, data) if wants_map else None
                if not present:
                    await lake.aput_object(sha, data)
                del data
            if chunk_map is not None:
                # after the object: a chunk map never describes content the lake lacks
                await lake.aput_chunk_map(sha, chunk_map)
            if present:
                progress.advance(1, 0)
                return
        counts[0] += 1
        counts[1] += size
        progress.advance(1, size)

    progress.start("repair" if repair else "upload", total_files=candidates)
    try:
        run(items(), one, jobs=jobs)
    finally:
        progress.finish()
    return counts[0], counts[1], counts[2]


def _read_checked(path: str, sha: str, size: int, mtime_ns: int) -> bytes:
    """The file's bytes, refusing a file that changed since it was hashed."""
    with open(path, "rb") as fh:
        data = fh.read()
        st = os.fstat(fh.fileno())
    if len(data) != size or st.st_mtime_ns != mtime_ns or hashlib.sha256(data).hexdigest() != sha:
        raise IntegrityError(f"{path} changed while it was being pushed; re-run the push when it is stable", path=path)
    return data
