"""Sharded caching: N processes, on as many hosts, fetch one commit into one site at once.

``cachehub cache NAME@REF --shard K/N`` fetches a deterministic 1/N of what the site lacks:

* a **small object** belongs to shard ``int(sha256[:15], 16) % N``: shards never overlap, and
  the split needs no coordination and no listing;
* a **large object** (over ``download.LARGE_OBJECT``) is split into pieces of
  ``download.RANGE_SIZE`` on a fixed grid; piece ``i`` belongs to shard
  ``(int(sha256[:15], 16) + i) % N``. Pieces go into one sparse file at the site
  (``store.RangeParts``), each marked done once flushed, so a 50 GB file is the work of every
  shard, and shards run with a different N for the same commit still agree on the pieces.

A shard runs under its own lock (``locks/<commit>.shard-K-of-N.lock``, naming the manifest, so
a gc anywhere keeps what it fetched) and records the commit as a partial cache. When its share
is in, it records that (``shards/<commit>/K-of-N``). If every shard of its N has, it publishes;
otherwise it checks -- one ``stat`` per distinct object, stopping at the first missing --
whether the site holds every object anyway (large ones: every piece; shards run with another N
fill it too). Publishing goes through the ordinary cache path (``cache.cache``): the build lock
makes it happen exactly once, its link pass is the final check (what a gc took meanwhile is
fetched again), large objects are verified whole and renamed into ``objects/``, and nothing
else is fetched again. A shard killed and re-run resumes: what it stored is in ``objects/`` or marked
done. A plain ``cachehub cache NAME@REF`` afterwards publishes too, fetching only what is
still missing.

Where K and N come from when ``--shard`` is not given (``Shard.from_env``): a Kubernetes
Indexed Job (``JOB_COMPLETION_INDEX``, with the count in ``CACHEHUB_SHARDS`` set in the Job
spec) or a Slurm job array (``SLURM_ARRAY_TASK_ID`` and ``SLURM_ARRAY_TASK_COUNT``).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import cache, download, index, pause
from .context import Context
from .errors import ConfigError, ConflictError
from .manifest import read_manifest
from .model import Commit
from .progress import NULL, Progress
from .refs import Ref
from .results import ShardResult
from .store import SiteStore, site_errors

SHARDS_ENV = "CACHEHUB_SHARDS"  # the shard count, set in a Kubernetes Indexed Job's spec


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``index`` counts from 0)."""

    index: int
    count: int
    source: str = "--shard"  # where it came from, for the line the CLI prints

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"shard {self.index}/{self.count} ({self.source}): need 0 <= K < N, e.g. --shard 0/4")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def tag(self) -> str:
        """The shard in file names: ``2-of-8``."""
        return f"{self.index}-of-{self.count}"

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``K/N`` as the user typed it."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if m is None:
            raise ConfigError(f"--shard {text!r}: expected K/N with 0 <= K < N, e.g. --shard 0/4")
        return cls(int(m[1]), int(m[2]))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Shard | None:
        """The shard a Kubernetes Indexed Job or a Slurm job array says this process is, or None.

        * Kubernetes: ``JOB_COMPLETION_INDEX`` (set by the Job controller) and ``CACHEHUB_SHARDS``
          (the Job's ``completions``, which Kubernetes does not expose: the Job spec passes it).
          An Indexed Job without ``CACHEHUB_SHARDS`` is not sharded (a training Job may be
          indexed too);
        * Slurm: ``SLURM_ARRAY_TASK_ID`` and ``SLURM_ARRAY_TASK_COUNT``; arrays that start at 1
          or step (``--array=1-7:2``) are mapped to 0..N-1 with ``SLURM_ARRAY_TASK_MIN`` and
          ``SLURM_ARRAY_TASK_STEP``. ``CACHEHUB_SHARDS``, if set, must agree with the count.
        """
        env = os.environ if environ is None else environ

        def number(name: str) -> int:
            value = env.get(name, "").strip()
            if not value.isdigit():
                raise ConfigError(f"{name}={value!r} is not a whole number; fix the job spec, or pass --shard K/N")
            return int(value)

        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            task, count = number("SLURM_ARRAY_TASK_ID"), number("SLURM_ARRAY_TASK_COUNT")
            low = number("SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
            step = number("SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
            if step < 1 or (task - low) % step:
                raise ConfigError(f"SLURM_ARRAY_TASK_ID={task} is not on the array's grid (min {low}, step {step}); pass --shard K/N")
            if SHARDS_ENV in env and number(SHARDS_ENV) != count:
                raise ConfigError(f"{SHARDS_ENV}={env[SHARDS_ENV]} but the Slurm array has {count} tasks; drop one of them")
            return cls((task - low) // step, count, "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT")
        if "JOB_COMPLETION_INDEX" in env and SHARDS_ENV in env:
            return cls(number("JOB_COMPLETION_INDEX"), number(SHARDS_ENV), f"JOB_COMPLETION_INDEX/{SHARDS_ENV}")
        return None

    def _key(self, sha256: str) -> int:
        return int(sha256[:15], 16)

    def owns(self, sha256: str) -> bool:
        """Does this shard fetch the small object ``sha256``?"""
        return self._key(sha256) % self.count == self.index

    def owns_piece(self, sha256: str, start: int) -> bool:
        """Does this shard fetch the piece of large object ``sha256`` at offset ``start``?"""
        return (self._key(sha256) + start // download.RANGE_SIZE) % self.count == self.index


def cache_shard(
    ctx: Context, ref: str | Ref, shard: Shard, *, site: str | None = None, progress: Progress = NULL, jobs: int | None = None
) -> ShardResult:
    """Fetch this shard's share of the commit ``ref`` names into ``site``; publish it if complete."""
    parsed = Ref.of(ref)
    store = ctx.store(site)
    with site_errors(store, f"cache {parsed} --shard {shard}"):
        return _shard(ctx, parsed, shard, store, progress, jobs or ctx.settings.jobs)


def _shard(ctx: Context, ref: Ref, shard: Shard, store: SiteStore, progress: Progress, jobs: int) -> ShardResult:
    started = time.monotonic()
    commit = index.resolve_commit(ctx, ref, refresh_first=not ref.is_full_id)
    store.check()
    if store.is_cached(commit.id):
        return _publish(ctx, ref, commit, store, shard, progress, jobs, started, (0, 0, 0))
    manifest = ctx.manifest(commit.manifest)
    what = f"{commit.dataset}@{commit.short}"
    store.keep_manifest(commit.manifest, manifest)  # before the lock that names it (gc.py)
    lock = store.lock(commit.id, commit.manifest, shard=shard.tag)
    if lock is None:
        holder = store.shard_lock_holder(commit.id, shard.tag) or "another process"
        raise ConflictError(
            f"shard {shard} of {what} is already running at site {store.name} ({holder}); "
            "wait for it, or stop it and re-run this shard (it resumes)"
        )
    listing: Path | None = None
    try:
        listing = ctx.scratch(f"shard-{commit.id[:16]}")
        store.keep_manifest(commit.manifest, manifest)
        store.begin_partial(commit)  # what arrives is kept for the other shards and for a re-run
        count, nbytes, pieces = _plan(store, manifest, shard, listing)
        piece_bytes = sum(min(download.RANGE_SIZE, p.size - s) for p in pieces for s in p.starts)
        need = cache.Plan(commit.files, commit.bytes, count + len(pieces), nbytes + piece_bytes, 0, 0)
        cache._admit(ctx, store, commit, need, manifest, lock.path)
        got = download.download(
            ctx.lake, store, download.ObjectSet.from_file(listing, count=count, nbytes=nbytes, what=what), progress=progress, jobs=jobs
        )
        got_pieces = download.download_pieces(ctx.lake, store, pieces, progress=progress, jobs=jobs)
        ctx.events.audit(
            "cache-shard",
            dataset=commit.dataset,
            commit=commit.id,
            ref=str(ref),
            site=store.name,
            shard=str(shard),
            fetched_files=got.objects,
            fetched_bytes=got.bytes,
            fetched_pieces=sum(len(p.starts) for p in pieces),
            fetched_piece_bytes=got_pieces.bytes,
        )
        store.shard_done(commit.id, shard.tag)
        pause.point("shard.after-fetch")
    finally:
        lock.release()
        if listing is not None:
            listing.unlink(missing_ok=True)
    fetched = (got.objects, got.bytes + got_pieces.bytes, sum(len(p.starts) for p in pieces))
    # every shard of this N done: publish without a pass of its own (the build's link pass is the
    # check, and fetches anything gone since); otherwise look, stopping at the first missing
    every = {f"{k}-of-{shard.count}" for k in range(shard.count)} <= store.shards_done(commit.id)
    missing = None if every else first_missing(store, manifest)
    if missing is None:
        return _publish(ctx, ref, commit, store, shard, progress, jobs, started, fetched)
    return ShardResult(
        commit.dataset, commit.id, store.name, str(shard), fetched[0], fetched[1], fetched[2],
        published=False, published_here=False, path=None, waiting_for=missing, seconds=time.monotonic() - started,
    )  # fmt: skip


def _publish(
    ctx: Context, ref: Ref, commit: Commit, store: SiteStore, shard: Shard, progress: Progress, jobs: int, started: float, fetched: tuple[int, int, int]
) -> ShardResult:
    """Every object is at the site: publish through the ordinary path (once, under the build lock)."""
    pause.point("shard.before-publish")
    result = cache.cache(ctx, ref.at(commit.id), site=store.name, progress=progress, jobs=jobs, given=str(ref))
    store.forget_shards(commit.id)
    return ShardResult(
        commit.dataset, commit.id, store.name, str(shard), fetched[0], fetched[1], fetched[2],
        published=True, published_here=not result.already_cached, path=result.path, waiting_for=None,
        seconds=time.monotonic() - started,
    )  # fmt: skip


def _plan(store: SiteStore, manifest: Path, shard: Shard, listing: Path) -> tuple[int, int, list[download.Pieces]]:
    """List this shard's missing small objects in ``listing``; return their count and bytes, and
    the pieces of large objects it fetches (those not done already)."""
    seen: set[bytes] = set()
    count = nbytes = 0
    pieces: list[download.Pieces] = []
    with open(listing, "w", encoding="ascii") as out:
        for entry in read_manifest(manifest, validate=False):
            key = bytes.fromhex(entry.sha256)
            if key in seen:
                continue
            seen.add(key)
            if entry.size > download.LARGE_OBJECT:
                starts = [s for s in range(0, entry.size, download.RANGE_SIZE) if shard.owns_piece(entry.sha256, s)]
                if not starts or os.path.exists(store.object_file(entry.sha256)):
                    continue
                done = store.range_parts(entry.sha256, entry.size).done()
                todo = tuple(s for s in starts if s not in done)
                if todo:
                    pieces.append(download.Pieces(entry.sha256, entry.size, todo))
            elif shard.owns(entry.sha256) and not os.path.exists(store.object_file(entry.sha256)):
                out.write(f"{entry.sha256}\t{entry.size}\n")
                count += 1
                nbytes += entry.size
    return count, nbytes, pieces


def first_missing(store: SiteStore, manifest: Path) -> str | None:
    """The path of the first file whose content the site does not hold yet, or None if it holds all.

    A large object counts as held when every piece of it is done (publishing verifies it). One
    ``stat`` per distinct object, stopping at the first missing: a shard that finishes early
    learns quickly that others are still working.
    """
    seen: set[bytes] = set()
    for entry in read_manifest(manifest, validate=False):
        key = bytes.fromhex(entry.sha256)
        if key in seen:
            continue
        seen.add(key)
        if os.path.exists(store.object_file(entry.sha256)):
            continue
        if entry.size > download.LARGE_OBJECT and store.range_parts(entry.sha256, entry.size).complete(download.RANGE_SIZE):
            continue
        return entry.path
    return None
