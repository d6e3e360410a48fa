#!/usr/bin/env python3
"""Server time of every dashboard page, at the scale the issue names: a lake with 1,000 commits
of a 600,000-file dataset, and a site holding 100 commits.

What is real and what is made up, so the numbers mean what they say:

- the **catalog** holds 1,000 commits of dataset ``big`` (600,000 files, 250 GB each) as a
  refresh would index them (``Catalog.add_commits``), with tags, and each commit's diff against
  its parent kept (6,000 changed files, 1%, for the commit whose page is measured; counts for
  the rest), as the daemon's refresh computes them. Their manifests are not generated: no page
  reads a manifest once the diff is kept (the one-time diff of two 600,000-file manifests is
  measured separately in docs/performance.md: 0.87 s);
- the **site** is real: 100 small commits pushed to a local lake and cached at it, one pinned
  (its records, pins and usage ledger are what a page reads); ``big`` is not cached there;
- the **audit trail** holds 20,000 events in its hash chain (real, ``Catalog.audit``);
- the audit chains are checked in full by a thread of the server (at start and every 5
  minutes; its time is printed with the table), and a page load checks only the events added
  since;
- the server is the real app under uvicorn on 127.0.0.1, and the time is taken by the client
  around each request (loopback adds well under a millisecond). Each page is requested 3 times
  to warm up, then 20 times; the table shows the median and the worst.

    python bench/dashboard.py [--commits 1000] [--files 600000] [--site-commits 100] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402 - sets the loopback-only environment on import

WORK = B.WORK / "dashboard"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commits", type=int, default=1000)
    ap.add_argument("--files", type=int, default=600_000)
    ap.add_argument("--site-commits", type=int, default=100)
    ap.add_argument("--audit-events", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()

    import shutil

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    os.environ.update(CACHEHUB_HOME=str(WORK / "home"), CACHEHUB_LAKE=str(WORK / "lake"), CACHEHUB_PROGRESS="off")
    for var in ("CACHEHUB_CONFIG", "CACHEHUB_SITE", "CACHEHUB_ENDPOINT_URL"):
        os.environ.pop(var, None)

    from cachehub.api import Hub
    from cachehub.model import Commit, DiffEntry, Tag

    started = time.perf_counter()
    with Hub() as hub:
        # a site holding `site-commits` real cached commits
        for i in range(args.site_commits):
            src = WORK / "src" / f"d{i}"
            src.mkdir(parents=True)
            for j in range(10):
                (src / f"f{j}.bin").write_bytes(os.urandom(256) + bytes([i, j]))
            hub.push(src, f"small-{i:03d}", tag="v1")
            hub.cache(f"small-{i:03d}@v1")
        hub.pin("small-000@v1")
        # 1,000 commits of a 600,000-file dataset, indexed as a refresh would
        catalog = hub.catalog
        t0 = datetime(2026, 1, 1, tzinfo=UTC)
        commits, parent = [], None
        for i in range(args.commits):
            cid = hashlib.sha256(f"big-{i}".encode()).hexdigest()
            commits.append(Commit(cid, "big", hashlib.sha256(f"m{i}".encode()).hexdigest(), args.files, 250 * 10**9,
                                  (parent,) if parent else (), "alice", "gpu-07", f"nightly import {i}",
                                  (t0 + timedelta(hours=i)).isoformat().replace("+00:00", "Z")))  # fmt: skip
            parent = cid
        catalog.add_commits(commits)
        catalog.touch_dataset("big")
        for name, c in (("latest-good", commits[-1]), ("v1", commits[0]), ("v500", commits[len(commits) // 2])):
            catalog.set_tag(Tag("big", name, c.id), None)
        newest = commits[-1]
        changed = args.files // 100
        catalog.save_diff(newest.id, newest.parents[0], (
            DiffEntry(f"images/{k:07d}.png", ("added", "removed", "modified")[k % 3], None if k % 3 == 0 else 40_000, None if k % 3 == 1 else 41_000)
            for k in range(changed)
        ), keep_files=changed)  # fmt: skip
        with catalog.transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO diffs VALUES (?,?,?,?,?,0)",
                             [(c.id, c.parents[0], 2000, 2000, 2000) for c in commits[1:-1]])  # fmt: skip
        for i in range(args.audit_events):
            catalog.audit("resolve", dataset="big", commit=commits[i % len(commits)].id, ref="latest-good", site="local")
        settings = hub.settings
    setup = time.perf_counter() - started

    from cachehub.web import serve

    from cachehub import views
    from cachehub.context import Context

    server = serve(settings, "127.0.0.1:0")
    base = f"http://{server.address}"
    with Context(settings) as ctx:  # the server's thread checks the chains in full at start: time one such check
        t = time.perf_counter()
        views.chain_state(ctx, full=True)
        full_check_ms = (time.perf_counter() - t) * 1000
    pages = [
        ("datasets", "/"),
        ("history (page 1 of 20)", "/datasets/big"),
        ("history (page 20)", "/datasets/big?page=20"),
        ("commit (diff kept, 6,000 files, page 1)", f"/datasets/big/{newest.id}"),
        ("commit (diff page 120)", f"/datasets/big/{newest.id}?page=120"),
        ("lineage (depth 4)", f"/lineage/big/{newest.id}"),
        ("sites", "/sites"),
        ("runs", "/runs"),
        (f"audit ({args.audit_events:,} events; new ones checked)", "/audit"),
        ("audit filtered", "/audit?action=pin"),
    ]
    rows = []
    try:
        for label, path in pages:
            for kind, url in (("page", base + path), ("json", base + ("/api/datasets" if path == "/" else "/api" + path))):
                times = []
                for i in range(3 + args.runs):
                    t = time.perf_counter()
                    with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 - loopback only
                        resp.read()
                        assert resp.status == 200
                    if i >= 3:
                        times.append((time.perf_counter() - t) * 1000)
                rows.append(f"| {label} | {kind} | {statistics.median(times):.1f} | {max(times):.1f} |")
    finally:
        server.close()
    B.print_table(
        "Dashboard pages, server time in ms",
        f"catalog: {args.commits:,} commits of a {args.files:,}-file dataset, {args.audit_events:,} audit events; "
        f"a site with {args.site_commits} cached commits; median and worst of {args.runs} after 3 warm-ups; setup {setup:.0f} s; "
        f"the full audit-chain check (a background thread, every 5 min) {full_check_ms:.0f} ms",
        "| page | | median ms | worst ms |",
        "|---|---|---:|---:|",
        rows,
        args.markdown,
    )


if __name__ == "__main__":
    main()
