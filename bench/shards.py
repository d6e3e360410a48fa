#!/usr/bin/env python3
"""Sharded caching on one machine: 1, 2 and 4 shard processes caching one commit into one site.

Starts SeaweedFS on 127.0.0.1 (as bench.py does: loopback only, dummy credentials, telemetry
off), builds bench.py's reference data with its seed -- the small-file set (20,000 files at
scale 1) and the large-file set (8 x 64 MiB) -- and pushes each as a dataset. Then for each
shard count N it caches each dataset into a fresh site root with N processes started at once,
each with its own home (a host of its own, as on a cluster), ``cachehub cache DS --shard K/N``,
and, for reference, with one plain ``cachehub cache DS``. It reports per run:

  wall        from the first start to the last exit (the last shard publishes)
  client CPU  user+sys of all N processes (wait4 rusage), and per GB cached
  GETs        S3 GETs the server answered during the run, and per object+piece fetched
  server CPU  the SeaweedFS process's user+sys during the run

Every result is checked (SHA-256 of every file against the source). This machine has 2 cores
shared by the server and the clients, so the speed-up is bound by them; the point is the CPU
per GB (what each host of a real cluster spends) and that N shards do no more work than one.

    sudo python bench/shards.py                      # scale 0.5, shards 1,2,4: a few minutes
    sudo python bench/shards.py --scale 1 --shards 1,2,4 --markdown /tmp/shards.md
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402 - sets the loopback-only environment on import

WORK = B.WORK / "shards"
BUCKET = "cachehub-shards"
GB = 1e9


def rusage_wait(procs: list[subprocess.Popen[bytes]]) -> tuple[float, list[int]]:
    """Wait for every process; return their summed user+sys CPU seconds and exit codes."""
    cpu, codes = 0.0, []
    for p in procs:
        _pid, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        codes.append(p.returncode)
        cpu += usage.ru_utime + usage.ru_stime
    return cpu, codes


def check(root: Path, source: Path) -> int:
    """Compare the published tree with the source, file by file (SHA-256); return the file count."""
    [tree] = list((root / "commits").iterdir())
    n = 0
    for dirpath, _dirs, files in os.walk(source):
        for name in files:
            src = Path(dirpath) / name
            rel = src.relative_to(source)
            got = hashlib.sha256((tree / rel).read_bytes()).hexdigest()
            if got != hashlib.sha256(src.read_bytes()).hexdigest():
                raise SystemExit(f"{rel}: wrong content in the cached tree")
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=0.5)
    ap.add_argument("--shards", default="1,2,4")
    ap.add_argument("--jobs", type=int, default=64)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()

    bins = B.find_binaries()
    WORK.mkdir(parents=True, exist_ok=True)
    data = B.build_data(args.scale, B.SEED)
    server = B.SeaweedServer(bins["weed"], WORK / "seaweed", BUCKET)
    if (WORK / "seaweed").exists():
        shutil.rmtree(WORK / "seaweed")
    server.start()
    rows = []
    try:
        lake = f"s3://{BUCKET}/lake"
        base = dict(os.environ, CACHEHUB_LAKE=lake, CACHEHUB_ENDPOINT_URL=server.endpoint)
        shutil.rmtree(WORK / "home-pusher", ignore_errors=True)  # a fresh server: a home from an earlier run would not match it
        pusher = dict(base, CACHEHUB_HOME=str(WORK / "home-pusher"))
        sets = {"small": data.small_dir, "large": data.large_dir}
        for name, directory in sets.items():
            B.log(f"push {name}")
            subprocess.run(["cachehub", "push", str(directory), name], env=pusher, check=True, capture_output=True)
        counts = [int(n) for n in args.shards.split(",")]
        for name, directory in sets.items():
            nbytes = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
            for n in [0, *counts]:  # 0: one plain `cachehub cache`
                label = "plain cache" if n == 0 else f"{n} shard{'s' if n > 1 else ''}"
                root = WORK / "site"
                shutil.rmtree(root, ignore_errors=True)
                procs_env = []
                for k in range(max(n, 1)):
                    home = WORK / f"home-{k}"
                    shutil.rmtree(home, ignore_errors=True)
                    env = dict(base, CACHEHUB_HOME=str(home), CACHEHUB_SITE="team", CACHEHUB_JOBS=str(args.jobs))
                    subprocess.run(["cachehub", "site", "add", "team", "--root", str(root)], env=env, check=True, capture_output=True)
                    subprocess.run(["cachehub", "datasets"], env=env, check=True, capture_output=True)  # the catalog, not measured
                    argv = ["cachehub", "cache", name] + ([] if n == 0 else ["--shard", f"{k}/{n}"])
                    procs_env.append((argv, env))
                B.log(f"{name}: {label}")
                gets0, server0 = server.requests().get("GET", 0), server.cpu_seconds()
                started = time.perf_counter()
                procs = [subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for argv, env in procs_env]
                cpu, codes = rusage_wait(procs)
                wall = time.perf_counter() - started
                if any(codes):
                    raise SystemExit(f"{name} {label}: exit codes {codes}: {[p.stderr.read()[-500:] for p in procs if p.stderr]}")
                gets = server.requests().get("GET", 0) - gets0
                files = check(root, directory)
                rows.append(
                    {"set": name, "run": label, "n": n, "files": files, "bytes": nbytes, "wall": wall, "cpu": cpu,
                     "gets": gets, "server_cpu": server.cpu_seconds() - server0}
                )  # fmt: skip
        peers = server.remote_peers()
        if peers:
            raise SystemExit(f"the server talked to non-loopback peers: {peers}")
    finally:
        server.stop()

    lines = []
    for r in rows:
        one = next(x for x in rows if x["set"] == r["set"] and x["n"] == 1)
        lines.append(
            f"| {r['set']} | {r['run']} | {r['files']:,} | {r['bytes'] / GB:.2f} | {r['wall']:.2f} | {one['wall'] / r['wall']:.2f}x | "
            f"{r['cpu']:.2f} | {r['cpu'] / (r['bytes'] / GB):.1f} | {r['gets']:,} | {r['server_cpu']:.2f} |"
        )
    B.print_table(
        "Sharded caching", f"SeaweedFS on 127.0.0.1; scale {args.scale}; jobs {args.jobs}",
        "| set | run | files | GB | wall s | speed-up | client CPU s | CPU s per GB | S3 GETs | server CPU s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        lines, args.markdown,
    )  # fmt: skip

if __name__ == "__main__":
    main()
