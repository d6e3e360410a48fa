"""``cachehub://NAME@REF/path``: a commit's files through fsspec, cached at a site or not.

Every loader that opens data through fsspec (pandas, pyarrow, Hugging Face datasets, Dask, Ray
Data, a PyTorch Dataset calling ``fsspec.open``) reads a commit this way without caching it::

    pandas.read_parquet("cachehub://sales@v3/2026/11.parquet", storage_options={"site": "gpu-a"})

The first path segment is a ref (``NAME`` alone means ``NAME@latest``); the rest is a path in
that commit. ``ls``, ``info``, ``find``, ``glob`` and ``walk`` are answered from the commit's
manifest (a verified local copy; no listing of anything). Bytes come from, in this order:

1. **the site**, when the commit is cached there (its read-only tree) or the object is in the
   site's ``objects/`` (another commit shares it): plain local reads;
2. **the lake**, with ranged reads. A small object (up to 16 MiB) is read whole and checked
   against its SHA-256 before any byte reaches the caller. A large one is read by chunks of its
   chunk map (content-defined, about 1 MiB), each checked against the chunk's SHA-256 before it
   is returned; a large object without a chunk map is fetched whole into the site's object
   store first (verified by the download engine), then read there.

A damaged object raises ``IntegrityError`` and no byte of it is returned. With
``write_through=True`` every object read whole from the lake is also stored at the site, so the
next reader there reads it locally. Each filesystem instance records one ``use`` of each commit
it reads (lineage and audit), not one per file.

Options (``storage_options``): ``site``, ``home``, ``lake``, ``write_through``, ``include`` and
``exclude`` (glob patterns, ``select.py``: only those files are seen, and a partial cache of
them at the site is read locally); s3fs-style
``key``, ``secret``, ``token``, ``endpoint_url``, ``client_kwargs={"endpoint_url", "region_name"}``
reach the lake client; other fsspec options are accepted and passed to fsspec.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from . import access, chunks, download
from .context import Context
from .config import load_settings
from .errors import IntegrityError, SiteMissingError
from .lanes import run, run_loop
from .manifest import read_manifest
from .model import Commit
from .refs import Ref
from .select import Selection
from .store import SiteStore

log = logging.getLogger("cachehub.fs")
_HASHERS: dict[int, ThreadPoolExecutor] = {}  # by pid: a forked worker makes its own


def _hashers() -> ThreadPoolExecutor:
    pool = _HASHERS.get(os.getpid())
    if pool is None:
        pool = _HASHERS[os.getpid()] = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cachehub-fs-hash")
    return pool
SMALL = download.LARGE_OBJECT  # up to this, an object is read (and verified) whole


@dataclass
class _Tree:
    """One commit as the filesystem sees it: its files and folders, from its manifest."""

    ref: str  # as the caller wrote it
    commit: Commit
    files: dict[str, tuple[int, str]]  # path -> (size, sha256)
    dirs: dict[str, list[str]]  # folder ("" for the top) -> the names in it
    entry: str  # the site entry that would hold it: the commit, or a partial cache of it
    cached: bool = False  # that entry is published at the site (checked until it is)
    top: str = ""  # the entry's tree at the site, as a string (the per-file path is hot)


ENV_KEYS = ("CACHEHUB_HOME", "CACHEHUB_CONFIG", "CACHEHUB_LAKE", "CACHEHUB_SITE", "CACHEHUB_ENDPOINT_URL", "XDG_DATA_HOME")


class _PerEnvironment(type(AbstractFileSystem)):  # type: ignore[misc]
    """fsspec keeps one instance per set of options; ours depend on the environment too (the
    home, lake and site it names), so a changed ``CACHEHUB_HOME`` gets a new instance."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("environment", tuple(os.environ.get(k, "") for k in ENV_KEYS))
        return super().__call__(*args, **kwargs)


class CachehubFileSystem(AbstractFileSystem, metaclass=_PerEnvironment):
    """Read-only fsspec filesystem over cachehub commits; see the module docstring."""

    protocol = "cachehub"
    root_marker = ""

    def __init__(
        self,
        *,
        site: str | None = None,
        home: str | None = None,
        lake: str | None = None,
        write_through: bool = False,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        key: str | None = None,
        secret: str | None = None,
        token: str | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        client_kwargs: dict | None = None,
        context: Context | None = None,
        environment: tuple[str, ...] = (),  # set by the metaclass: part of fsspec's instance key
        **storage_options: Any,
    ) -> None:
        super().__init__(**storage_options)
        if context is None:
            settings = load_settings(home, lake=lake)
            client = client_kwargs or {}
            changes: dict[str, Any] = {}
            if endpoint_url or client.get("endpoint_url"):
                changes["endpoint_url"] = endpoint_url or client["endpoint_url"]
            if region or client.get("region_name"):
                changes["region"] = region or client["region_name"]
            if key and secret:
                creds = {"access_key_id": key, "secret_access_key": secret}
                if token:
                    creds["session_token"] = token
                changes["credentials"] = creds
            context = Context(replace(settings, **changes))
        self.ctx = context
        self.site_name = site
        self.write_through = write_through
        self.selection = Selection.of(include, exclude)
        self._trees: dict[str, _Tree] = {}
        self._maps: OrderedDict[str, chunks.ChunkMap | None] = OrderedDict()  # sha -> chunk map (None: it has none)
        self._lock = threading.RLock()
        self._store: SiteStore | None = None

    # -- paths -------------------------------------------------------------------------------
    @classmethod
    def _strip_protocol(cls, path: str | list[str]) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith("cachehub://"):
            path = path[len("cachehub://") :]
        elif path.startswith("cachehub::"):
            path = path[len("cachehub::") :]
        return path.strip("/")

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        ref, _, rel = path.partition("/")
        return ref, rel

    @property
    def store(self) -> SiteStore:
        if self._store is None:
            self._store = self.ctx.store(self.site_name, check=False)
        return self._store

    def _tree(self, ref: str) -> _Tree:
        """The commit ``ref`` names, its files, and its use recorded once for this instance."""
        with self._lock:
            tree = self._trees.get(ref)
            if tree is not None:
                if not tree.cached:
                    tree.entry = access.entry_of(self.store, tree.commit.id, self.selection)
                    tree.cached = self.store.is_cached(tree.entry)
                    tree.top = str(self.store.commit_path(tree.entry))
                return tree
            ctx = self.ctx
            parsed = Ref.of(ref)
            store = self.store
            commit_id = access.commit_id_of(ctx, parsed, store)
            commit = ctx.catalog.commit(commit_id)
            if commit is None:  # a full id this home has not indexed yet
                from . import index

                commit = index.resolve_commit(ctx, parsed.at(commit_id), refresh_first=True)
            files: dict[str, tuple[int, str]] = {}
            dirs: dict[str, list[str]] = {"": []}
            selection = self.selection
            for entry in read_manifest(ctx.manifest(commit.manifest), validate=False):
                if selection and not selection.matches(entry.path):
                    continue  # include/exclude: this filesystem shows the selected files only
                files[entry.path] = (entry.size, entry.sha256)
                parent, _, name = entry.path.rpartition("/")
                _add_folder(dirs, parent)
                dirs[parent].append(name)
            entry_id = access.entry_of(store, commit.id, selection)
            tree = _Tree(ref, commit, files, dirs, entry_id, store.is_cached(entry_id), str(store.commit_path(entry_id)))
            self._record_use(tree, parsed)
            self._trees[ref] = tree
            return tree

    def _record_use(self, tree: _Tree, ref: Ref) -> None:
        ctx = self.ctx
        store = self.store
        if tree.cached:
            store.touch(tree.entry)
        with ctx.catalog.transaction():
            run_id = access.record_input(ctx, tree.commit.dataset, tree.commit.id, ref.ref, store.name)
            ctx.events.audit("use", dataset=tree.commit.dataset, commit=tree.commit.id, ref=ref.ref, site=store.name, run=run_id, via="fsspec")

    def _entry(self, path: str) -> tuple[_Tree, str, int, str]:
        ref, rel = self._split(self._strip_protocol(path))
        tree = self._tree(ref)
        found = tree.files.get(rel)
        if found is None:
            raise FileNotFoundError(f"cachehub://{ref}/{rel}: no such file in {tree.commit.dataset}@{tree.commit.short}")
        return tree, rel, found[0], found[1]

    # -- listing -----------------------------------------------------------------------------
    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list:
        path = self._strip_protocol(path)
        if not path:
            out = [{"name": name, "size": 0, "type": "directory"} for name in sorted(self.ctx.lake.datasets())]
            return out if detail else [o["name"] for o in out]
        ref, rel = self._split(path)
        tree = self._tree(ref)
        if rel in tree.files:
            info = self._file_info(ref, rel, tree)
            return [info] if detail else [info["name"]]
        if rel not in tree.dirs:
            raise FileNotFoundError(f"cachehub://{path}: no such file or folder in {tree.commit.dataset}@{tree.commit.short}")
        out = []
        for name in tree.dirs[rel]:
            child = f"{rel}/{name}" if rel else name
            if child in tree.files:
                out.append(self._file_info(ref, child, tree))
            else:
                out.append({"name": f"{ref}/{child}", "size": 0, "type": "directory"})
        return out if detail else [o["name"] for o in out]

    def _file_info(self, ref: str, rel: str, tree: _Tree) -> dict:
        size, sha = tree.files[rel]
        return {"name": f"{ref}/{rel}", "size": size, "type": "file", "sha256": sha, "commit": tree.commit.id}

    def info(self, path: str, **kwargs: Any) -> dict:
        path = self._strip_protocol(path)
        ref, rel = self._split(path)
        if not path:
            return {"name": "", "size": 0, "type": "directory"}
        tree = self._tree(ref)
        if rel in tree.files:
            return self._file_info(ref, rel, tree)
        if rel in tree.dirs:
            return {"name": path, "size": 0, "type": "directory", "commit": tree.commit.id}
        raise FileNotFoundError(f"cachehub://{path}: no such file or folder in {tree.commit.dataset}@{tree.commit.short}")

    def find(self, path: str, maxdepth: int | None = None, withdirs: bool = False, detail: bool = False, **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        ref, rel = self._split(path)
        if not ref or maxdepth is not None:
            return super().find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)
        tree = self._tree(ref)
        if rel in tree.files:
            found = {f"{ref}/{rel}": self._file_info(ref, rel, tree)}
        else:
            prefix = f"{rel}/" if rel else ""
            found = {f"{ref}/{p}": self._file_info(ref, p, tree) for p in tree.files if p.startswith(prefix)}
            if withdirs:
                for d in tree.dirs:
                    if d and d.startswith(prefix):
                        found[f"{ref}/{d}"] = {"name": f"{ref}/{d}", "size": 0, "type": "directory"}
        names = dict(sorted(found.items()))
        return names if detail else list(names)

    # -- reading -----------------------------------------------------------------------------
    def _local(self, tree: _Tree, rel: str, sha: str) -> str | None:
        """A local file with this content: the cached tree's, or the site's object; else None."""
        if tree.cached:
            return f"{tree.top}/{rel}"
        obj = self.store.object_file(sha)
        return obj if os.path.exists(obj) else None

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, autocommit: bool = True, cache_options: dict | None = None, **kwargs: Any) -> Any:
        if mode != "rb":
            raise PermissionError(f"cachehub://{self._strip_protocol(path)} is read-only: a commit never changes (open it with 'rb')")
        tree, rel, size, sha = self._entry(path)
        local = self._local(tree, rel, sha)
        if local is not None:
            try:
                return open(local, "rb")  # noqa: SIM115 - the caller closes it
            except FileNotFoundError:
                tree.cached = False  # evicted meanwhile: read from the lake
        return LakeFile(self, self._strip_protocol(path), sha, size, block_size=block_size, cache_options=cache_options)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        tree, rel, size, sha = self._entry(path)
        lo, hi = _bounds(start, end, size)
        local = self._local(tree, rel, sha)
        if local is not None:
            try:
                with open(local, "rb") as fh:
                    fh.seek(lo)
                    return fh.read(hi - lo)
            except FileNotFoundError:
                tree.cached = False
        return self.read_range(sha, size, lo, hi)

    def cat(self, path: Any, recursive: bool = False, on_error: str = "raise", **kwargs: Any) -> Any:
        """Many files at once: local ones read here, the others fetched concurrently from the lake."""
        if isinstance(path, list) and not recursive and not any(c in p for p in path for c in "*?["):
            paths = [self._strip_protocol(p) for p in path]  # plain paths: nothing to expand
        else:
            paths = [self._strip_protocol(p) for p in self.expand_path(path, recursive=recursive)]
        if len(paths) == 1 and not (isinstance(path, list) or self._strip_protocol(path) != paths[0] or recursive):
            return self.cat_file(paths[0], **kwargs)
        out: dict[str, Any] = {}
        remote: list[tuple[str, str, int]] = []
        for p in paths:
            ref, rel = self._split(p)
            if ref and rel in self._tree(ref).dirs:
                continue  # a folder that ``expand_path`` listed (recursive)
            try:
                tree, rel, size, sha = self._entry(p)
            except FileNotFoundError as exc:
                if on_error == "raise":
                    raise
                if on_error != "omit":
                    out[p] = exc
                continue
            local = self._local(tree, rel, sha)
            if local is not None:
                try:
                    with open(local, "rb") as fh:
                        out[p] = fh.read()
                    continue
                except FileNotFoundError:
                    tree.cached = False  # evicted meanwhile: from the lake
            remote.append((p, sha, size))
        if remote:
            got = self._fetch_whole_many([(sha, size) for _, sha, size in remote])
            for p, sha, _ in remote:
                out[p] = got[sha]
        return {p: out[p] for p in paths if p in out}

    # -- bytes from the lake ------------------------------------------------------------------
    def read_range(self, sha: str, size: int, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of an object from the lake, verified before they are returned."""
        if start >= end:
            return b""
        if size <= SMALL:
            return self._fetch_small(sha, size)[start:end]
        chunk_map = self._chunk_map(sha, size)
        if chunk_map is None:  # no chunk map: only a whole, verified copy at the site will do
            obj = self._fetch_whole_into_site(sha, size)
            with open(obj, "rb") as fh:
                fh.seek(start)
                return fh.read(end - start)
        return self._read_chunks(sha, chunk_map, start, end)

    def _fetch_small(self, sha: str, size: int) -> bytes:
        data = bytes(self.ctx.lake.get_object_range(sha, 0, size)) if size else b""
        self._check(sha, size, data)
        self._keep(sha, data)
        return data

    def _fetch_whole_many(self, items: list[tuple[str, int]]) -> dict[str, bytes]:
        """Whole objects from the lake, many at once, each checked against its SHA-256."""
        lake = self.ctx.lake
        got: dict[str, bytes] = {}

        limit: list[asyncio.Semaphore] = []  # made inside the event loop

        async def one(item: tuple[str, int]) -> None:
            sha, size = item
            if size <= SMALL:
                data = bytes(await lake.aget_object_range(sha, 0, size)) if size else b""
                self._check(sha, size, data)
            else:
                if not limit:
                    limit.append(asyncio.Semaphore(download.RANGES_IN_FLIGHT))
                span = await _aget_span(lake, sha, 0, size, limit[0])
                await asyncio.to_thread(self._check, sha, size, span)
                data = bytes(span)
            got[sha] = data

        _run_sync(lambda: run(list(dict.fromkeys(items)), one, jobs=self.ctx.settings.jobs))
        for sha, data in got.items():
            self._keep(sha, data)
        return got

    def _check(self, sha: str, size: int, data: bytes) -> None:
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            raise IntegrityError(
                f"object {sha} from the lake does not match its SHA-256 (got {len(data)} of {size} bytes); "
                "nothing of it was returned. The lake copy is damaged: cachehub push DIR NAME --repair puts it back",
                sha256=sha,
            )

    def _keep(self, sha: str, data: bytes) -> None:
        """Write-through: store a verified object at the site, for the next reader there."""
        if not self.write_through:
            return
        try:
            store = self.ctx.store(self.site_name)  # the embedded default site is laid out on first use
        except SiteMissingError as exc:  # an unmounted export: reading goes on, without write-through
            log.warning("cachehub://: write-through stopped: %s", exc)
            self.write_through = False
            return
        if not os.path.exists(store.object_file(sha)):
            store.store_object(sha, data)
            store.add_usage(1, len(data))

    def _chunk_map(self, sha: str, size: int) -> chunks.ChunkMap | None:
        with self._lock:
            if sha in self._maps:
                self._maps.move_to_end(sha)
                return self._maps[sha]
        try:
            found: chunks.ChunkMap | None = self.ctx.lake.read_chunk_map(sha, size=size)
        except FileNotFoundError:
            found = None
        with self._lock:
            self._maps[sha] = found
            while len(self._maps) > 64:
                self._maps.popitem(last=False)
        return found

    def _read_chunks(self, sha: str, chunk_map: chunks.ChunkMap, start: int, end: int) -> bytes:
        offsets = [c[0] for c in chunk_map.chunks]
        first = bisect.bisect_right(offsets, start) - 1
        last = bisect.bisect_right(offsets, end - 1) - 1
        lo = chunk_map.chunks[first][0]
        hi = chunk_map.chunks[last][0] + chunk_map.chunks[last][1]
        if hi - lo <= download.RANGE_SIZE:
            data = memoryview(bytes(self.ctx.lake.get_object_range(sha, lo, hi)))
        else:  # a long span: ranged GETs in parallel, as the download engine does
            lake = self.ctx.lake
            held: list[bytearray] = []

            async def fetch() -> None:
                # the bytes are handed over in ``held``, not as the coroutine's result: Python
                # 3.11's asyncio.run formats its main task (result included) while restoring the
                # SIGINT handler, which costs about a second per 64 MiB
                held.append(await _aget_span(lake, sha, lo, hi, asyncio.Semaphore(download.RANGES_IN_FLIGHT)))

            _run_sync(lambda: run_loop(fetch()))
            data = memoryview(held[0])
        if len(data) != hi - lo:
            raise IntegrityError(f"object {sha} in the lake is shorter than its chunk map says; nothing was returned. Re-push the file", sha256=sha)
        wanted = chunk_map.chunks[first : last + 1]

        def check(chunk: tuple[int, int, str]) -> None:
            offset, length, digest = chunk
            if hashlib.sha256(data[offset - lo : offset - lo + length]).hexdigest() != digest:
                raise IntegrityError(
                    f"object {sha} from the lake: bytes {offset}-{offset + length} do not match its chunk map; "
                    "nothing of them was returned. The lake copy is damaged: cachehub push DIR NAME --repair puts it back",
                    sha256=sha,
                )

        if len(wanted) > 2:  # SHA-256 releases the GIL: the chunks of a long span are hashed on two threads
            list(_hashers().map(check, wanted))
        else:
            for chunk in wanted:
                check(chunk)
        return bytes(data[start - lo : end - lo])

    def _fetch_whole_into_site(self, sha: str, size: int) -> str:
        store = self.ctx.store(self.site_name)  # a missing site root is an error, not a place to fill
        obj = store.object_file(sha)
        if not os.path.exists(obj):
            download.download(self.ctx.lake, store, download.ObjectSet.from_pairs([(sha, size)], what=f"object {sha[:12]}"))
        return obj


class LakeFile(AbstractBufferedFile):
    """A file of a commit that is not at the site: ranged, verified reads from the lake."""

    def __init__(self, fs: CachehubFileSystem, path: str, sha: str, size: int, **kwargs: Any) -> None:
        self.sha = sha
        options = kwargs.pop("cache_options", None) or {}
        block = kwargs.pop("block_size", None) or (size if size <= SMALL else 4 * 1024 * 1024)
        super().__init__(fs, path, mode="rb", block_size=max(block, 1), cache_type="readahead", cache_options=options, size=size)

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self.fs.read_range(self.sha, self.size, start, min(end, self.size))


async def _aget_span(lake: Any, sha: str, lo: int, hi: int, limit: asyncio.Semaphore) -> bytearray:
    """Bytes ``[lo, hi)`` of an object, fetched as RANGE_SIZE pieces in parallel (unverified;
    a bytearray, so that the caller copies it once, into what it returns)."""
    out = bytearray(hi - lo)

    async def piece(start: int) -> None:
        end = min(start + download.RANGE_SIZE, hi)
        async with limit:
            data = await lake.aget_object_range(sha, start, end)
        if len(data) != end - start:
            raise IntegrityError(f"object {sha} in the lake is shorter than the manifest says; nothing was returned. Re-push the file", sha256=sha)
        out[start - lo : end - lo] = data

    await asyncio.gather(*(piece(start) for start in range(lo, hi, download.RANGE_SIZE)))
    return out


def _run_sync(work: Any) -> Any:
    """Run ``work`` (which starts its own event loop) here, or on a thread if this thread already
    runs one (a notebook, an async application): an event loop cannot be started inside another."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return work()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(work).result()


def _add_folder(dirs: dict[str, list[str]], folder: str) -> None:
    """Make ``folder`` and every folder above it known, each listed in its parent."""
    missing = []
    while folder not in dirs:
        missing.append(folder)
        folder = folder.rpartition("/")[0]
    for made in reversed(missing):
        up, _, name = made.rpartition("/")
        dirs[made] = []
        dirs[up].append(name)


def _bounds(start: int | None, end: int | None, size: int) -> tuple[int, int]:
    lo = 0 if start is None else (size + start if start < 0 else start)
    hi = size if end is None else (size + end if end < 0 else end)
    return max(0, min(lo, size)), max(0, min(hi, size))


__all__ = ["CachehubFileSystem", "LakeFile"]
