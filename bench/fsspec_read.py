#!/usr/bin/env python3
"""Reading through ``cachehub://`` against s3fs and against plain ``open()``, in one run.

Starts SeaweedFS on 127.0.0.1 (as bench.py does: loopback only, dummy credentials, telemetry
off), builds bench.py's reference sets with its seed -- 20,000 small files and 8 x 64 MiB at
scale 1 -- and pushes each with cachehub. Then, for each set:

The setup of a filesystem (resolving the ref, reading the manifest, recording the use: once
per instance and ref) is timed apart, before the reads. In the cached case every file is read
once beforehand so that both sides find the page cache warm.

  uncached   the commit is not at the site: cachehub:// reads the lake (every byte verified:
             small objects whole against their SHA-256, large ones chunk by chunk), s3fs reads
             the very same objects (the lake's ``objects/sha256/..`` keys), unverified
  cached     the commit is cached at the site: cachehub:// against ``open()`` on the tree

each two ways: ``cat`` of every file at once (both filesystems fetch concurrently) and a loop
opening and reading one file after the other (what a simple loader does). Every byte read is
compared with the source (outside the timed part). Prints one table.

    sudo python bench/fsspec_read.py                    # scale 1: a few minutes
    sudo python bench/fsspec_read.py --scale 0.1
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402 - sets the loopback-only environment on import

WORK = B.WORK / "fsspec"
BUCKET = "cachehub-fsspec"


def timed(fn):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    cpu = time.process_time()
    out = fn()
    return out, time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()

    import s3fs

    bins = B.find_binaries()
    WORK.mkdir(parents=True, exist_ok=True)
    data = B.build_data(args.scale, B.SEED)
    shutil.rmtree(WORK / "seaweed", ignore_errors=True)
    shutil.rmtree(WORK / "home", ignore_errors=True)
    server = B.SeaweedServer(bins["weed"], WORK / "seaweed", BUCKET)
    server.start()
    rows = []
    try:
        prefix = "lake"
        os.environ.update(CACHEHUB_HOME=str(WORK / "home"), CACHEHUB_LAKE=f"s3://{BUCKET}/{prefix}", CACHEHUB_ENDPOINT_URL=server.endpoint)
        for var in ("CACHEHUB_CONFIG", "CACHEHUB_SITE"):
            os.environ.pop(var, None)
        from cachehub import Hub
        from cachehub.fs import CachehubFileSystem

        sets = {"small": data.small_dir, "large": data.large_dir}
        for name, directory in sets.items():
            B.log(f"push {name}")
            subprocess.run(["cachehub", "push", str(directory), name, "--tag", "v1"], check=True, capture_output=True)
        s3 = s3fs.S3FileSystem(
            key=os.environ["AWS_ACCESS_KEY_ID"], secret=os.environ["AWS_SECRET_ACCESS_KEY"],
            endpoint_url=server.endpoint, client_kwargs={"region_name": "us-east-1"}, skip_instance_cache=True,
        )  # fmt: skip
        with Hub() as hub:
            for name, directory in sets.items():
                entries = list(hub.ls(f"{name}@v1"))
                nbytes = sum(e.size for e in entries)
                expect = {e.path: e.sha256 for e in entries}
                ours = [f"{name}@v1/{e.path}" for e in entries]
                keys = [f"{BUCKET}/{prefix}/objects/sha256/{e.sha256[:2]}/{e.sha256}" for e in entries]

                def check(got: dict[str, bytes]) -> None:
                    for e in entries:
                        if hashlib.sha256(got[e.path]).hexdigest() != expect[e.path]:
                            raise SystemExit(f"{name}: wrong bytes for {e.path}")

                def loop(open_one, paths):  # type: ignore[no-untyped-def]
                    out = {}
                    for e, p in zip(entries, paths, strict=True):
                        with open_one(p) as fh:
                            out[e.path] = fh.read()
                    return out

                def ready() -> tuple[CachehubFileSystem, float]:
                    """A new filesystem with its commit resolved and its manifest read (timed apart)."""
                    fs = CachehubFileSystem(skip_instance_cache=True)
                    _, setup, _ = timed(lambda: fs.info(ours[0]))
                    return fs, setup

                def measure(work, rekey=None):  # type: ignore[no-untyped-def]
                    """Time ``work``, check every byte it returned, and drop the bytes before the
                    next measurement (a result still held makes the next one fault in new memory)."""
                    got, wall, cpu = timed(work)
                    check(rekey(got) if rekey else got)
                    del got
                    gc.collect()
                    return wall, cpu

                by_key = {k: e.path for e, k in zip(entries, keys, strict=True)}
                strip = lambda got: {p.split("/", 1)[1]: v for p, v in got.items()}  # noqa: E731
                for how in ("cat", "loop"):
                    fs, setup = ready()
                    if how == "cat":
                        ref_wall, ref_cpu = measure(lambda: s3.cat(keys), lambda got: {by_key[k]: v for k, v in got.items()})
                        wall, cpu = measure(lambda fs=fs: fs.cat(ours), strip)
                    else:
                        ref_wall, ref_cpu = measure(lambda: loop(lambda k: s3.open(k, "rb"), keys))
                        wall, cpu = measure(lambda fs=fs: loop(lambda p: fs.open(p, "rb"), ours))
                    rows.append((name, "uncached", how, len(entries), nbytes, setup, wall, cpu, "s3fs", ref_wall, ref_cpu))
                    B.log(f"{name} uncached {how}: cachehub {wall:.2f}s (+{setup:.3f}s setup), s3fs {ref_wall:.2f}s")
                result = hub.cache(f"{name}@v1")
                tree = Path(result.path)
                loop(lambda p: open(tree / p.split("/", 1)[1], "rb"), ours)  # page cache warm for both
                for how in ("cat", "loop"):
                    fs, setup = ready()
                    if how == "cat":
                        ref_wall, ref_cpu = measure(lambda: {e.path: (tree / e.path).read_bytes() for e in entries})
                        wall, cpu = measure(lambda fs=fs: fs.cat(ours), strip)
                    else:
                        ref_wall, ref_cpu = measure(lambda: loop(lambda p: open(tree / p.split("/", 1)[1], "rb"), ours))
                        wall, cpu = measure(lambda fs=fs: loop(lambda p: fs.open(p, "rb"), ours))
                    rows.append((name, "cached", how, len(entries), nbytes, setup, wall, cpu, "open()", ref_wall, ref_cpu))
                    B.log(f"{name} cached {how}: cachehub {wall:.2f}s (+{setup:.3f}s setup), open() {ref_wall:.2f}s")
        peers = server.remote_peers()
        if peers:
            raise SystemExit(f"the server talked to non-loopback peers: {peers}")
    finally:
        server.stop()

    lines = []
    for name, state, how, files, nbytes, setup, wall, cpu, refname, ref_wall, ref_cpu in rows:
        mb = nbytes / 1e6
        lines.append(
            f"| {name} | {state} | {how} | {files:,} | {mb:.0f} | {setup:.3f} | {wall:.2f} | {mb / wall:.0f} | {cpu:.2f} | {refname} | "
            f"{ref_wall:.2f} | {mb / ref_wall:.0f} | {ref_cpu:.2f} | {ref_wall / wall:.2f}x |"
        )
    B.print_table(
        "Reading through cachehub://", f"SeaweedFS on 127.0.0.1; scale {args.scale}",
        "| set | commit | how | files | MB | setup s | cachehub:// s | MB/s | CPU s | reference | ref s | ref MB/s | ref CPU s | throughput vs reference |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
        lines, args.markdown,
    )  # fmt: skip

if __name__ == "__main__":
    main()
