#!/usr/bin/env python3
"""Where cachehub's time goes: profile ``cachehub push``, a cold ``cachehub cache`` and ``cachehub path``.

Uses the same SeaweedFS set-up and reference data as bench.py (default ``--scale 0.1``). For each
command it records

* a cProfile of the Python side (top functions by own time and by cumulative time),
* the CPU time of every thread of the process at exit (Python's main thread vs obstore's Rust
  runtime threads vs hashing threads), read from /proc/self/task,
* with ``py-spy`` on PATH, a sampled profile including native frames (``--native``), summarised
  as the hottest leaf frames and the hottest Python functions (inclusive).

Results go to stdout and to bench/.work/profile/ (``.prof`` files open with ``python -m pstats``
or snakeviz). Must run as root (it mounts a fresh ext4 for the cache like bench.py).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (same directory; sets the loopback-only environment on import)

OUT = bench.WORK / "profile"

# Runs the real CLI entry point and, at exit, prints per-thread CPU seconds to stderr as JSON.
THREAD_WRAPPER = r"""
import atexit, json, os, sys, runpy
def _threads():
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            name = open(f"/proc/self/task/{tid}/comm").read().strip()
            stat = open(f"/proc/self/task/{tid}/stat").read()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2:].split()
        cpu = (int(f[11]) + int(f[12])) / tick
        key = "main" if int(tid) == os.getpid() else name
        out[key] = out.get(key, 0) + cpu
    ru = __import__("resource").getrusage(__import__("resource").RUSAGE_SELF)
    out["__total__"] = ru.ru_utime + ru.ru_stime
    out["__file__"] = getattr(sys.modules.get("cachehub"), "__file__", "?")
    sys.stderr.write("\nTHREADCPU " + json.dumps(out) + "\n")
atexit.register(_threads)
sys.argv = ["cachehub", *sys.argv[1:]]
runpy.run_module("cachehub.cli.main", run_name="__main__")
"""


def pstats_text(path: Path, sort: str, limit: int, only: str | None = None) -> str:
    """A pstats listing; with ``only``, just the functions whose file path matches that regex."""
    buf = io.StringIO()
    st = pstats.Stats(str(path), stream=buf)
    if only is None:
        st.strip_dirs()
    st.sort_stats(sort).print_stats(*([only, limit] if only else [limit]))
    text = buf.getvalue()
    start = text.find("   ncalls")
    text = text[start:] if start >= 0 else text
    if only:
        text = re.sub(r"\S*/cachehub/", "cachehub/", text)
    return text.rstrip() + "\n"


def pyspy_summary(raw: Path, limit: int = 15) -> str:
    """Hottest leaf frames and cachehub functions (inclusive) from py-spy's raw output (all threads)."""
    leaf: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = importing = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        if any("importlib._bootstrap" in fr for fr in frames):
            importing += n
        leaf[_short(frames[-1])] += n
        seen = set()
        for fr in frames:
            s = _short(fr)
            if "cachehub/" in fr and "<module>" not in fr and s not in seen:
                seen.add(s)
                incl[s] += n
    out = [
        f"samples: {total} (all threads, idle excluded); {100 * importing / max(total, 1):.0f}% of them inside imports",
        "",
        "hottest leaf frames (self time, native frames included):",
    ]
    for name, n in leaf.most_common(limit):
        out.append(f"  {100 * n / total:5.1f}%  {name}")
    out += ["", "cachehub functions, inclusive:"]
    for name, n in incl.most_common(limit):
        out.append(f"  {100 * n / total:5.1f}%  {name}")
    return "\n".join(out)


def _short(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"; drop the line number
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    if where:
        file, _, _line = where.rpartition(":")
        file = file or where
        parts = Path(file).parts
        short = "/".join(parts[-2:]) if "cachehub" in parts[-2:-1] else Path(file).name
        return f"{name} ({short})"
    return name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--jobs", type=int, default=64)
    ap.add_argument("--limit", type=int, default=25, help="rows per cProfile listing")
    ap.add_argument(
        "--src", type=Path, help="profile a snapshot of cachehub's sources made by bench.py (default: snapshot the working tree now)"
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("must run as root (mounts a fresh filesystem)", file=sys.stderr)
        return 2
    bench.cleanup_stale_mounts()
    data = bench.build_data(args.scale, bench.SEED)
    big = bench.build_data(1.0, bench.SEED)  # the large files at full size (8 x 64 MiB): above the ranged-GET threshold
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    src = args.src.resolve() if args.src else bench.snapshot_sources(OUT / "src")
    os.environ["PYTHONPATH"] = str(src)
    sys.path.insert(0, str(src))
    digest = bench.source_digest(src / "cachehub")
    bins = bench.find_binaries()
    server = bench.SeaweedServer(bins["weed"], OUT / "seaweed", bench.BUCKET)
    pyspy = shutil.which("py-spy")
    report: list[str] = [
        f"# cachehub profile, scale {args.scale:g} ({len(data.small)} small files), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"cachehub sources: {src} (digest {digest})",
        "",
    ]
    try:
        server.start()
        lake = f"s3://{bench.BUCKET}/lake"
        base_env = dict(os.environ, CACHEHUB_LAKE=lake, CACHEHUB_ENDPOINT_URL=server.endpoint, CACHEHUB_DEBUG="1")

        def run(name: str, cli_args: list[str], env: dict[str, str], *, spy: bool = True) -> None:
            prof = OUT / f"{name}.prof"
            t0 = time.perf_counter()
            wrapper = OUT / "cli_with_thread_cpu.py"
            wrapper.write_text(THREAD_WRAPPER)
            proc = subprocess.run(
                [sys.executable, "-m", "cProfile", "-o", str(prof), str(wrapper), *cli_args],
                env=env, capture_output=True, text=True, cwd=str(OUT),  # not the repo: -m puts the cwd on sys.path
            )  # fmt: skip
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"{name}: cachehub failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            threads = {}
            for line in proc.stderr.splitlines():
                if line.startswith("THREADCPU "):
                    threads = json.loads(line[len("THREADCPU ") :])
            report.append(f"## {name}: `cachehub {' '.join(cli_args)}`")
            report.append("")
            report.append(f"wall {wall:.2f} s under cProfile (cProfile slows the Python side)")
            report.append("")
            report.append("CPU seconds by thread (at exit):")
            total = threads.pop("__total__", 0.0)
            loaded = threads.pop("__file__", "?")
            if not str(loaded).startswith(str(src)):
                raise SystemExit(f"{name}: cachehub was imported from {loaded}, not from {src}")
            grouped: dict[str, float] = collections.Counter()
            for k, v in threads.items():
                grouped[k.rstrip("0123456789-_")] += v
            for k, v in sorted(grouped.items(), key=lambda kv: -kv[1]):
                report.append(f"  {v:7.2f}  {k}")
            report.append(f"  {max(0.0, total - sum(grouped.values())):7.2f}  (threads that had already ended)")
            report.append(f"  {total:7.2f}  (process total)")
            report.append("")
            report.append("cProfile, cachehub's own functions by own time:")
            report.append("```")
            report.append(pstats_text(prof, "tottime", args.limit, only=re.escape(str(src)) + "/cachehub/"))
            report.append("```")
            report.append("cProfile, everything by own time:")
            report.append("```")
            report.append(pstats_text(prof, "tottime", args.limit))
            report.append("```")
            report.append("cProfile, by cumulative time:")
            report.append("```")
            report.append(pstats_text(prof, "cumulative", args.limit))
            report.append("```")

        def spy(name: str, cli_args: list[str], env: dict[str, str]) -> None:
            if not pyspy:
                return
            raw = OUT / f"{name}.pyspy.txt"
            proc = subprocess.run(
                [pyspy, "record", "--native", "--rate", "500", "--format", "raw", "-o", str(raw), "--", *bins["cachehub"], *cli_args],
                env=env, capture_output=True, text=True,
            )  # fmt: skip
            if proc.returncode != 0 or not raw.exists():
                report.append(f"(py-spy failed for {name}: {proc.stderr[-500:]})")
                return
            report.append(f"### {name}: py-spy --native (sampled, main thread and other Python threads)")
            report.append("```")
            report.append(pyspy_summary(raw))
            report.append("```")
            report.append("")

        # push (cold lake) under cProfile, then again into a second lake under py-spy
        pub = OUT / "publisher"
        env = dict(base_env, CACHEHUB_HOME=str(pub))
        run("push", ["push", str(data.small_dir), "small", "--tag", "v1", "--json", "--jobs", str(args.jobs)], env)
        spy_env = dict(base_env, CACHEHUB_HOME=str(OUT / "publisher-spy"), CACHEHUB_LAKE=f"s3://{bench.BUCKET}/lake-spy")
        spy("push", ["push", str(data.small_dir), "small", "--tag", "v1", "--json", "--jobs", str(args.jobs)], spy_env)
        subprocess.run([*bins["cachehub"], "push", str(big.large_dir), "large", "--tag", "v1", "--json"], env=env, check=True, capture_output=True)
        subprocess.run([*bins["cachehub"], "push", str(data.v2_dir), "small", "--tag", "v2", "--json"], env=env, check=True, capture_output=True)

        from cachehub.api import Hub, init
        from cachehub.config import load_settings

        for tool in ("cprofile", "pyspy"):
            if tool == "pyspy" and not pyspy:
                continue
            with bench.FreshFS("ext4", int(2.5 * bench.total_bytes(data.small)) + 2 * bench.total_bytes(big.large) + 512 * bench.MiB) as mnt:
                home = mnt / "home"
                init(home=home, lake=lake, endpoint_url=server.endpoint)
                with Hub(load_settings(home, lake=lake)) as hub:
                    hub.site_add("bench", mnt / "site")
                env = dict(base_env, CACHEHUB_HOME=str(home))
                cache_args = ["cache", "small@v1", "--site", "bench", "--jobs", str(args.jobs), "--json"]
                large_args = ["cache", "large@v1", "--site", "bench", "--jobs", str(args.jobs), "--json"]
                if tool == "cprofile":
                    run("cold cache", cache_args, env)
                    run("delta v1 -> v2", ["cache", "small@v2", "--site", "bench", "--jobs", str(args.jobs), "--json"], env)
                    run("cold cache, large (8 x 64 MiB)", large_args, env)
                    run("path", ["path", "small@v1", "--site", "bench"], env)
                else:
                    spy("cold cache", cache_args, env)
                    spy("delta v1 -> v2", ["cache", "small@v2", "--site", "bench", "--jobs", str(args.jobs), "--json"], env)
                    spy("cold cache, large (8 x 64 MiB)", large_args, env)
                    spy("path", ["path", "small@v1", "--site", "bench"], env)
    finally:
        server.stop()
        bench.cleanup_stale_mounts()
        shutil.rmtree(OUT / "seaweed", ignore_errors=True)
    text = "\n".join(report) + "\n"
    (OUT / "profile.md").write_text(text)
    print(text)
    print(f"written to {OUT / 'profile.md'}; .prof files in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
