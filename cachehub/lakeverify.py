"""``cachehub lake verify``: check the lake itself, sampled or in full, resumably.

What it reads, in order:

1. every dataset's commit documents (each must hash to its id) and tag documents (each must
   point at a commit that is there);
2. each commit's manifest (its text must hash to its id and validate);
3. the content objects those manifests name, each read back and hashed (large ones in ranged
   pieces, with bounded memory), and the chunk map of each large object.

``--sample F`` checks a random fraction F of the objects (documents and manifests are always
all read: they are small). Objects are visited in the order of their hash, and the last one
checked is saved in the home every ``CHECKPOINT`` objects (``lake-verify/<lake>.json``): an
interrupted run, re-run with the same options, resumes after it (and checks again what it had
found wrong); ``--restart`` starts over.

Nothing is changed in the lake. Each problem names its key and the fix.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
from pathlib import Path

from . import chunks, pause
from .context import Context
from .errors import CachehubError
from .fsutil import atomic_write
from .lake import Lake, chunk_map_key, commit_key, manifest_key, object_key, tag_key
from .lanes import run
from .manifest import read_manifest
from .progress import NULL, Progress
from .results import LakeProblem, LakeVerifyResult

CHECKPOINT = 512
OBJECT_FIX = "push a directory holding that file with `cachehub push DIR NAME --repair`, or restore the key from a backup of the lake"
MANIFEST_FIX = "restore the key from a backup of the lake, or push the commit's directory again (a new commit)"


def verify_lake(
    ctx: Context,
    *,
    datasets: list[str] | None = None,
    sample: float | None = None,
    restart: bool = False,
    jobs: int | None = None,
    progress: Progress = NULL,
) -> LakeVerifyResult:
    if sample is not None and not 0 < sample <= 1:
        from .errors import ConfigError

        raise ConfigError(f"--sample must be a fraction in (0, 1], not {sample}")
    jobs = jobs or min(ctx.settings.jobs, 32)
    lake = ctx.lake
    names = sorted(datasets) if datasets else lake.datasets()
    problems: list[LakeProblem] = []
    manifests: dict[str, str] = {}  # manifest id -> the first "dataset@commit" using it
    commits = _documents(ctx, lake, names, problems, manifests)
    objects: dict[str, int] = {}
    progress.start("manifests", total_files=len(manifests))
    try:
        for mid, where in sorted(manifests.items()):
            try:
                path = lake.manifest(mid)
                for entry in read_manifest(path):
                    objects[entry.sha256] = entry.size
            except CachehubError as exc:
                problems.append(LakeProblem(manifest_key(mid), f"manifest of {where}: {exc}", MANIFEST_FIX))
            progress.advance(1, 0)
    finally:
        progress.finish()

    state_path = ctx.settings.home / "lake-verify" / f"{hashlib.sha256(lake.url.encode()).hexdigest()[:16]}.json"
    options = {"lake": lake.url, "datasets": names, "sample": sample}
    state = _load_state(state_path, options) if not restart else None
    if state is None:
        state = {**options, "seed": random.SystemRandom().getrandbits(64), "last": "", "checked": 0, "bytes": 0, "problems": []}
    order = sorted(objects)
    if sample is not None:
        seed = str(state["seed"]).encode()
        order = [sha for sha in order if int(hashlib.sha256(seed + sha.encode()).hexdigest()[:12], 16) < sample * 16**12]
    # resume after the last object checked, by hash: objects pushed or purged since do not shift it
    start = bisect.bisect_right(order, state["last"]) if state["last"] else 0
    resumed_from = state["checked"] if state["last"] else 0
    found: list[dict] = []

    async def check(sha: str, *, count: bool = True) -> None:
        size = objects[sha]
        what = await lake.acheck_object(sha, size)
        if what is not None:
            found.append({"sha": sha, "key": object_key(sha), "what": f"object {sha} is {what}", "fix": OBJECT_FIX})
        elif size > chunks.CHUNKED_MIN:
            what = await lake.acheck_chunk_map(sha, size)
            if what is not None:
                found.append({"sha": sha, "key": chunk_map_key(sha), "what": f"the chunk map of {sha} is {what}", "fix": OBJECT_FIX})
        if count:
            state["checked"] += 1
            state["bytes"] += size
            progress.advance(1, size)

    # what the interrupted run found wrong is checked again: a --repair since may have fixed it
    again = [p["sha"] for p in state["problems"] if p["sha"] in objects]
    if again:
        run(again, lambda sha: check(sha, count=False), jobs=jobs)
    progress.start("objects", total_files=len(order), total_bytes=sum(objects[s] for s in order))
    progress.advance(start, sum(objects[s] for s in order[:start]))
    try:
        for first in range(start, len(order), CHECKPOINT):
            run(order[first : first + CHECKPOINT], check, jobs=jobs)
            state["last"] = order[min(len(order), first + CHECKPOINT) - 1]
            state["problems"] = found
            _save_state(state_path, state)
            pause.point("lake-verify.checkpoint")
    finally:
        progress.finish()
    state_path.unlink(missing_ok=True)  # done: the next run starts over
    problems += [LakeProblem(p["key"], p["what"], p["fix"]) for p in found]
    ctx.events.audit("lake-verify", lake=lake.url, objects=state["checked"], problems=len(problems), sample=sample)
    return LakeVerifyResult(
        lake=lake.url,
        datasets=names,
        commits=commits,
        manifests=len(manifests),
        objects=len(objects),
        checked_objects=state["checked"],
        checked_bytes=state["bytes"],
        sample=sample,
        resumed_from=resumed_from,
        ok=not problems,
        problems=problems,
    )


def _documents(ctx: Context, lake: Lake, names: list[str], problems: list[LakeProblem], manifests: dict[str, str]) -> int:
    """Read every commit and tag document; collect the manifests of the good commits."""
    count = 0
    for name in names:
        ids = set(lake.commit_ids(name))
        for cid in sorted(ids):
            try:
                commit = lake.read_commit(name, cid)
            except CachehubError as exc:
                problems.append(LakeProblem(commit_key(name, cid), str(exc), ""))
                continue
            count += 1
            manifests.setdefault(commit.manifest, f"{name}@{cid[:12]}")
        damaged: list[CachehubError] = []
        for tag in lake.tags(name, damaged):
            if tag.commit not in ids:
                problems.append(LakeProblem(
                    tag_key(name, tag.name), f"tag {name}@{tag.name} points at commit {tag.commit}, which is not in the lake",
                    f"point it at a commit that is there: `cachehub tag {name}@COMMIT {tag.name} --force`",
                ))  # fmt: skip
        for exc in damaged:
            problems.append(LakeProblem(str(getattr(exc, "key", name)), str(exc), ""))
    return count


def _load_state(path: Path, options: dict) -> dict | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if any(state.get(k) != v for k, v in options.items()):
        return None  # another run's (other datasets or sample): start over
    return state


def _save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(state).encode(), mode=0o600)
