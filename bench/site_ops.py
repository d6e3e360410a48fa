#!/usr/bin/env python3
"""Site operations cost what they touch: system calls of evict, gc and status at two site sizes.

For each size N (default 20,000 and 200,000 objects) it builds a site with the real commands on
the embedded default (a local lake, no server): a dataset ``bulk`` of N - 1,000 tiny files and a
dataset ``victim`` of 1,000, both cached. Then, each under ``strace -c -f`` (the system calls
of the command and every thread it starts; on NFS each metadata call is a round trip):

  evict victim        a manual eviction of the 1,000-file commit (re-cached before each run)
  evict --dry-run     the site policy's plan (TTL, capacity): reads every cached commit
  gc --dry-run        a full garbage-collection walk of objects/
  status              the site's state as `cachehub status` shows it

and prints one table: calls in all, the stat family, directory reads, and wall time (under
strace, so slower than usual). Work goes to a fresh tmpfs under bench/.work/siteops (root
needed); ``--dir`` uses an existing directory instead.

    sudo python bench/site_ops.py                   # 20k and 200k objects, a few minutes
    sudo python bench/site_ops.py --sizes 2000,20000
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "bench" / ".work" / "siteops"
VICTIM_FILES = 1000
STAT = ("stat", "lstat", "fstat", "newfstatat", "statx", "fstatat64", "stat64", "lstat64")
DIRS = ("getdents64", "getdents", "openat")


def run(cmd: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def make_tree(root: Path, n: int, tag: str) -> None:
    """``n`` tiny files with distinct content, 1,000 to a folder."""
    for i in range(n):
        d = root / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:07d}").write_bytes(f"{tag}:{i}\n".encode())


def straced(cmd: list[str], env: dict[str, str], out: Path) -> dict[str, float]:
    """Run ``cmd`` under strace -c -f; return call counts (all, stat family, directory reads) and wall s."""
    started = time.perf_counter()
    proc = subprocess.run(["strace", "-c", "-f", "-o", str(out), *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    calls: dict[str, int] = {}
    for line in out.read_text().splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(fields) >= 5 and re.fullmatch(r"[\d.]+", fields[0]) and fields[3].isdigit():
            calls[fields[-1]] = int(fields[3])
    total = sum(v for k, v in calls.items() if k != "total")
    return {
        "calls": total,
        "stat": sum(calls.get(k, 0) for k in STAT),
        "dirs": sum(calls.get(k, 0) for k in DIRS),
        "wall": wall,
    }


def site(n: int, base: Path) -> list[dict[str, object]]:
    home = base / f"home-{n}"
    env = {**os.environ, "CACHEHUB_HOME": str(home), "CACHEHUB_LAKE": str(base / f"lake-{n}")}
    for var in ("CACHEHUB_CONFIG", "CACHEHUB_SITE", "CACHEHUB_ENDPOINT_URL"):
        env.pop(var, None)
    cli = [sys.executable, "-m", "cachehub.cli.main"]
    t0 = time.perf_counter()
    make_tree(base / f"bulk-{n}", n - VICTIM_FILES, "bulk")
    make_tree(base / f"victim-{n}", VICTIM_FILES, "victim")
    run([*cli, "site", "set", "local", "--grace", "0"], env)
    run([*cli, "push", str(base / f"bulk-{n}"), "bulk"], env)
    run([*cli, "push", str(base / f"victim-{n}"), "victim"], env)
    run([*cli, "cache", "bulk"], env)
    print(f"  site of {n:,} objects built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows = []
    for name, args, before in (
        ("evict victim (1,000 files)", ["evict", "victim"], ["cache", "victim"]),
        ("evict --dry-run (policy plan)", ["evict", "--dry-run"], None),
        ("gc --dry-run (full walk)", ["gc", "--dry-run"], None),
        ("status", ["status", "--site", "local"], None),
    ):
        if before:
            run([*cli, *before], env)
        got = straced([*cli, *args], env, base / "strace.txt")
        rows.append({"what": name, "objects": n, **got})
        print(f"  {name}: {got['calls']:,} calls", file=sys.stderr)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20000,200000", help="site sizes in objects (default 20000,200000)")
    ap.add_argument("--dir", type=Path, help="work here instead of a fresh tmpfs")
    args = ap.parse_args()
    if shutil.which("strace") is None:
        print("site_ops.py needs strace (apt-get install strace)", file=sys.stderr)
        return 2
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    mounted = False
    base = args.dir
    if base is None:
        if os.geteuid() != 0:
            print("site_ops.py mounts a tmpfs and must run as root (or pass --dir)", file=sys.stderr)
            return 2
        base = WORK
        base.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8g", "tmpfs", str(base)], check=True)
        mounted = True
    try:
        rows = []
        for n in sizes:
            print(f"site of {n:,} objects", file=sys.stderr)
            rows += site(n, base)
    finally:
        if mounted:
            subprocess.run(["umount", str(base)], check=False)
    print("| operation | site objects | system calls | stat family | directory reads (openat, getdents) | wall s (under strace) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['objects']:,} | {r['calls']:,} | {r['stat']:,} | {r['dirs']:,} | {r['wall']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
