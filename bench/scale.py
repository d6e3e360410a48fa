#!/usr/bin/env python3
"""Scale: does cachehub stay linear in time and bounded in memory as a dataset grows?

For each size N (default 60,000 and 600,000 tiny files in 15 class folders) it runs, as
commands in fresh processes against the embedded default (a local lake and a local site, no
server: this measures cachehub's own per-file work, not an S3 server's), and records wall
time and the peak RSS of each command:

  push v1 (cold: hashes and uploads every file)       push v2 (1% rewritten; hash cache)
  cache v1 (cold)                                      diff v1 v2 --stat
  cache v2 (the 1% delta)                              evict v1 (remove a commit tree)

plus, in-process, ``diff`` of two synthetic 1,000,000-entry manifests (1% modified) with its
peak traced memory. Prints one table; ``--markdown FILE`` writes it as markdown too. Every
tree written is checked against the source (file count and a sample of hashes) so a fast
wrong answer cannot pass. Work goes to a fresh tmpfs under bench/.work/scale (root needed),
because an ext4 image big enough for 1.8 million inodes is slow to make; pass ``--dir`` to
use an existing directory instead.

    sudo python bench/scale.py                     # 60k and 600k files, ~10 minutes
    sudo python bench/scale.py --sizes 20000       # a quick look
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "bench" / ".work" / "scale"
CLASSES = 15


def measured(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run ``cmd``; return (wall s, peak RSS MiB, stdout).

    It runs under a tiny wrapper process: RUSAGE_CHILDREN's ``ru_maxrss`` is the largest of
    any child so far, so only a fresh parent per command reports that command's own peak.
    """
    wrapper = (
        "import json,resource,subprocess,sys,time\n"
        "t=time.perf_counter();p=subprocess.run(sys.argv[1:],capture_output=True,text=True)\n"
        "w=time.perf_counter()-t\n"
        "r=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024\n"
        "sys.stderr.write(p.stderr)\n"
        "print(json.dumps({'wall':w,'rss':r,'code':p.returncode,'out':p.stdout}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, capture_output=True, text=True)
    try:
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SystemExit(f"{' '.join(cmd)}: no result:\n{proc.stderr[-3000:]}") from None
    if res["code"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res['code']}):\n{proc.stderr[-3000:]}")
    return res["wall"], res["rss"], res["out"]


def make_tree(root: Path, n: int, seed: int) -> dict[str, str]:
    """n tiny files (16-200 bytes, all different) in CLASSES folders; return {path: sha256}."""
    rng = random.Random(seed)
    out = {}
    for c in range(CLASSES):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rel = f"class{i % CLASSES:02d}/img{i:07d}.bin"
        data = i.to_bytes(8, "little") + rng.randbytes(rng.randint(8, 192))
        with open(root / rel, "wb") as fh:
            fh.write(data)
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def check(tree: Path, expected: dict[str, str], *, sample: int = 2000) -> None:
    count = sum(len(files) for _, _, files in os.walk(tree))
    if count != len(expected):
        raise SystemExit(f"{tree}: {count} files, expected {len(expected)}")
    rng = random.Random(1)
    for rel in rng.sample(sorted(expected), min(sample, len(expected))):
        if hashlib.sha256((tree / rel).read_bytes()).hexdigest() != expected[rel]:
            raise SystemExit(f"{tree / rel}: wrong content")


def one_size(n: int, base: Path, rows: list[dict]) -> None:
    work = base / f"n{n}"
    shutil.rmtree(work, ignore_errors=True)
    src = work / "src"
    env = dict(os.environ, CACHEHUB_HOME=str(work / "home"), CACHEHUB_LAKE=str(work / "lake"))
    env.pop("CACHEHUB_ENDPOINT_URL", None)
    print(f"[{n:,} files] generating", flush=True)
    expected = make_tree(src, n, seed=n)
    cachehub = [sys.executable, "-m", "cachehub.cli.main"]

    def step(name: str, args: list[str]) -> str:
        wall, rss, out = measured([*cachehub, *args], env)
        rows.append({"files": n, "step": name, "wall": wall, "rss_mib": rss, "us_per_file": wall / n * 1e6})
        print(f"[{n:,} files] {name:<28} {wall:8.2f} s  {wall / n * 1e6:7.1f} µs/file  peak RSS {rss:7.1f} MiB", flush=True)
        return out

    # no grace period: "evict v1" right after caching it must not be refused as recently used
    subprocess.run([*cachehub, "site", "set", "local", "--grace", "0"], env=env, check=True, capture_output=True)
    step("push v1 (cold)", ["push", str(src), "scale", "--tag", "v1", "--json"])
    out = step("cache v1 (cold)", ["cache", "scale@v1", "--json"])
    check(Path(json.loads(out)["path"]), expected)
    rng = random.Random(n + 1)
    for rel in rng.sample(sorted(expected), n // 100):
        data = b"v2" + rng.randbytes(rng.randint(8, 192))
        os.chmod(src / rel, 0o644)
        (src / rel).write_bytes(data)
        expected[rel] = hashlib.sha256(data).hexdigest()
    step("push v2 (1% rewritten)", ["push", str(src), "scale", "--tag", "v2", "--json"])
    out = step("diff v1 v2 --stat", ["diff", "scale@v1", "scale@v2", "--stat", "--json"])
    stat = json.loads(out)
    if stat.get("modified") != n // 100:
        raise SystemExit(f"diff found {stat}, expected {n // 100} modified")
    out = step("cache v2 (1% delta)", ["cache", "scale@v2", "--json"])
    res = json.loads(out)
    if res["fetched_files"] != n // 100:
        raise SystemExit(f"delta fetched {res['fetched_files']} objects, expected {n // 100}")
    check(Path(res["path"]), expected)
    step("evict v1", ["evict", "scale@v1", "--json"])
    step("gc", ["gc", "--json"])
    shutil.rmtree(work, ignore_errors=True)


def diff_1m(rows: list[dict], base: Path) -> None:
    """diff of two synthetic 1,000,000-entry manifests, 1% modified, in this process."""
    import tracemalloc

    if importlib.util.find_spec("cachehub") is None:
        sys.path.insert(0, str(REPO))
    from cachehub.diff import diff_files, stat
    from cachehub.manifest import write_manifest
    from cachehub.model import ManifestEntry

    n = 1_000_000
    rng = random.Random(7)
    paths = sorted((f"class{i % CLASSES:02d}/img{i:07d}.png" for i in range(n)), key=str.encode)
    changed = set(rng.sample(range(n), n // 100))

    def entries(v2: bool):  # type: ignore[no-untyped-def]
        for i, p in enumerate(paths):
            tag = b"v2" if v2 and i in changed else b"v1"
            yield ManifestEntry(p, 30_000 + i % 5000, hashlib.sha256(tag + i.to_bytes(4, "little")).hexdigest())

    a, b = base / "m1.tsv.gz", base / "m2.tsv.gz"
    write_manifest(a, entries(False))
    write_manifest(b, entries(True))
    best = None
    for _ in range(3):
        t0 = time.perf_counter()
        s = stat(diff_files(a, b))
        wall = time.perf_counter() - t0
        best = wall if best is None else min(best, wall)
    if s.modified != n // 100 or s.added or s.removed:
        raise SystemExit(f"1M diff found {s}")
    tracemalloc.start()
    stat(diff_files(a, b))
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    rows.append({"files": n, "step": "diff two 1M manifests (in-process, best of 3)", "wall": best, "rss_mib": None, "traced_mib": peak, "us_per_file": best / n * 1e6})
    print(f"[1,000,000 entries] diff in-process {best:.2f} s, peak traced memory {peak:.1f} MiB", flush=True)


def markdown(rows: list[dict], machine: str) -> str:
    out = [f"Machine: {machine}", "", "| files | step | wall s | µs per file | peak RSS MiB |", "|---|---|---|---|---|"]
    for r in rows:
        rss = f"{r['rss_mib']:.0f}" if r.get("rss_mib") is not None else f"{r['traced_mib']:.1f} (traced)"
        out.append(f"| {r['files']:,} | {r['step']} | {r['wall']:.2f} | {r['us_per_file']:.1f} | {rss} |")
    return "\n".join(out) + "\n"


def run(sizes: list[int], directory: str | None = None) -> tuple[list[dict], str]:
    """The 1M-entry diff, then every step at each size; returns (rows, machine line).

    Raises SystemExit naming the step when a command fails or a result is wrong.
    """
    base = Path(directory) if directory else WORK
    mounted = False
    if not directory:
        base.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16g,nr_inodes=0", "tmpfs", str(base)], check=True)
        mounted = True
    rows: list[dict] = []
    machine = f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, Python {sys.version.split()[0]}, " + (
        "fresh tmpfs" if mounted else f"directory {base}"
    )
    try:
        diff_1m(rows, base)
        for n in sizes:
            one_size(n, base, rows)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(base)], check=False)
    return rows, machine


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="60000,600000", help="comma-separated file counts")
    ap.add_argument("--dir", help="work in this existing directory instead of a fresh tmpfs")
    ap.add_argument("--markdown", help="also write the table as markdown to this file")
    args = ap.parse_args()
    rows, machine = run([int(s) for s in args.sizes.split(",")], args.dir)
    text = markdown(rows, machine)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
