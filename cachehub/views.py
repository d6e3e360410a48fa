"""What each dashboard page shows, as plain data: the page's JSON twin is exactly this.

The HTTP layer (``cachehub/web``) renders these dicts and computes nothing. Every function
reads the catalog (kept fresh from the lake by the daemon's refresh, or ``cachehub ui``'s at
start) and the site roots' own records (entries, leases, pins, partial caches, the queue and
the usage ledger): never a site's ``objects/``, and never the lake on a page load except to
compute a commit's diff once, which is then kept in the catalog.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from urllib.parse import urlencode

from . import cache_queue, lease, lineage
from .context import Context
from .diff import diff_files
from .errors import CachehubError, DatasetNotFoundError
from .index import resolve_commit
from .model import Commit
from .refs import Ref
from .status import iso, site_status

PAGE = 50  # rows per page: commits, diff files, audit events
DIFF_FILES_KEPT = 100_000  # a commit page lists at most this many changed files (the counts are exact)


class RunNotFoundError(CachehubError, LookupError):
    """No run of that id in the catalog."""


def datasets(ctx: Context) -> dict:
    rows = []
    for name, commits, last, files, nbytes in ctx.catalog.dataset_summaries():
        rows.append({"name": name, "commits": commits, "last_change": last, "files": files, "bytes": nbytes,
                     "tags": [t.name for t in ctx.catalog.tags(name)]})  # fmt: skip
    return {"datasets": rows}


def dataset(ctx: Context, name: str, *, page: int = 1) -> dict:
    catalog = ctx.catalog
    total = catalog.count_commits(name)
    if not total:
        raise DatasetNotFoundError(f"no dataset {name!r} in the catalog", dataset=name)
    commits = catalog.log_page(name, limit=PAGE, offset=(page - 1) * PAGE)
    return {
        "dataset": name,
        "commits_total": total,
        "page": page,
        "pages": -(-total // PAGE),
        "tags": {t.name: t.commit for t in catalog.tags(name)},
        "commits": [_commit_row(ctx, c) for c in commits],
        "sites": sorted(ctx.settings.sites),
        "subscriptions": [dict(s) for s in catalog.subscriptions() if s.dataset == name],
    }


def commit(ctx: Context, ref: str, *, page: int = 1) -> dict:
    """One commit: its metadata, its diff against its parent (paged), where it is cached, and
    the runs that read or made it."""
    c = resolve_commit(ctx, Ref.of(ref))
    row = _commit_row(ctx, c, compute=True)
    parent = c.parents[0] if c.parents else None
    files = ctx.catalog.diff_page(c.id, parent, limit=PAGE, offset=(page - 1) * PAGE) if parent else []
    changed = min(sum(row["diff"].values()), DIFF_FILES_KEPT) if row["diff"] else 0
    return {
        "diff_files_kept": DIFF_FILES_KEPT,
        **row,
        "manifest": c.manifest,
        "transform": c.transform,
        "page": page,
        "pages": max(1, -(-changed // PAGE)),
        "diff_files": [{"path": e.path, "change": e.change, "old_size": e.old_size, "new_size": e.new_size} for e in files],
        "cached": cached_at_sites(ctx, c.id),
        "runs": _runs_of(ctx, c.id),
    }


def _commit_row(ctx: Context, c: Commit, *, compute: bool = False) -> dict:
    parent = c.parents[0] if c.parents else None
    stat, error = None, None
    if parent:
        try:
            stat = diffstat(ctx, c, compute=compute, files=compute)
        except (CachehubError, OSError) as exc:  # the lake is down, or a manifest damaged: the rest of the page still shows
            error = str(exc)
    return {
        "diff_error": error,
        "dataset": c.dataset, "commit": c.id, "short": c.short, "message": c.message, "author": c.author, "host": c.host,
        "created": c.created, "files": c.files, "bytes": c.bytes, "parent": parent, "tags": list(c.tags),
        "derived_from": [_commit_ref(ctx, d) for d in c.derived_from], "run": c.run,
        "diff": dict(zip(("added", "removed", "modified"), stat, strict=True)) if stat else None,
    }  # fmt: skip


def diffstat(ctx: Context, c: Commit, *, compute: bool, files: bool = False) -> tuple[int, int, int] | None:
    """Counts of the diff against the first parent: kept in the catalog once computed; computed
    (two manifests, one linear merge) only when ``compute``. The daemon fills in counts
    (``fill_diffs``); a commit page (``files``) also keeps the first ``DIFF_FILES_KEPT`` changed
    files, so that a history of many large rewrites does not fill the catalog."""
    parent = c.parents[0]
    known = ctx.catalog.diffstat(c.id, parent)
    if not compute or (known is not None and (not files or ctx.catalog.diff_listed(c.id, parent))):
        return known
    older = ctx.catalog.commit(parent)
    if older is None:
        return None
    lake = ctx.lake
    entries = diff_files(lake.manifest(older.manifest), lake.manifest(c.manifest))
    return ctx.catalog.save_diff(c.id, parent, entries, keep_files=DIFF_FILES_KEPT if files else 0)


def fill_diffs(ctx: Context, *, budget: float = 30.0) -> int:
    """Compute missing diffs, newest commits first, for at most ``budget`` seconds (a daemon job)."""
    started, done = time.monotonic(), 0
    for name in ctx.catalog.dataset_names():
        for c in ctx.catalog.log(name):
            if time.monotonic() - started > budget:
                return done
            if c.parents and ctx.catalog.diffstat(c.id, c.parents[0]) is None:
                try:
                    if diffstat(ctx, c, compute=True) is not None:
                        done += 1
                except CachehubError:
                    continue  # a damaged manifest: the commit page says so when opened
    return done


def _commit_ref(ctx: Context, commit_id: str) -> dict:
    c = ctx.catalog.commit(commit_id)
    return {"commit": commit_id, "dataset": c.dataset if c else None, "short": commit_id[:12]}


def cached_at_sites(ctx: Context, commit_id: str) -> list[dict]:
    """Each configured site's state for a commit: complete, partial (a selection), building,
    or absent; with size, last use, time left before TTL eviction, leases and the pin, all of
    the entry shown (a partial cache is an entry of its own, with its own id)."""
    from .evict import entry_state

    now = ctx.now()
    out = []
    for name in sorted(ctx.settings.sites):
        store = ctx.store(name, check=False)
        if not store.exists():
            out.append({"site": name, "state": "absent" if ctx.settings.creates_on_use(store.site) else "unreachable"})
            continue
        entries = [e for e in store.cached() if e.source_commit == commit_id]
        e = next((x for x in entries if x.commit == commit_id), entries[0] if entries else None)
        entry_id = e.commit if e else commit_id
        live = [x for x in lease.leases(store, entry_id) if x.live()]
        row: dict = {"site": name, "state": "absent", "leases": len(live), "pinned": lease.is_pinned(store, entry_id)}
        if e is not None:
            state = entry_state(store, e, now=now)  # what eviction itself goes by
            ttl = store.site.ttl
            row.update(
                state="complete" if e.commit == commit_id else "partial", entry=e.commit, files=e.files, bytes=e.bytes,
                cached_at=e.cached_at, last_used=iso(state.last_used),
                ttl_left=max(0.0, ttl - (now - state.last_used)) if ttl and not row["pinned"] else None,
                selection=e.selection.to_json() if e.selection else None, path=str(e.path),
            )  # fmt: skip
        else:
            building = [p for p in store.partials() if p.commit.split("-")[0] == commit_id]
            if building:
                row.update(state="building", host=building[0].host, started=iso(building[0].started))
        out.append(row)
    return out


def _runs_of(ctx: Context, commit_id: str) -> list[dict]:
    return [{"run": run_id, "role": role, **(ctx.catalog.run(run_id) or {})} for run_id, role in ctx.catalog.runs_of(commit_id)]


def sites(ctx: Context) -> dict:
    """Every site: capacity (used, quota, free, watermarks), the queue, recent evictions."""
    out = []
    for name in sorted(ctx.settings.sites):
        store = ctx.store(name, check=False)
        st = site_status(store)
        site = store.site if st.state == "ok" else ctx.settings.sites[name]
        # the embedded default site is laid out on first use: not there yet is not "missing"
        state = "unused" if st.state != "ok" and ctx.settings.creates_on_use(site) else st.state
        used = st.object_bytes
        queue = [{"dataset": r.dataset, "commit": c, "ref": r.ref, "user": r.user, "host": r.host, "requested": r.requested}
                 for c, reqs in (cache_queue.pending(store).items() if st.state == "ok" else ()) for r in reqs]  # fmt: skip
        evictions, _ = ctx.catalog.audit_page(limit=10, action="evict", site=name)
        out.append({
            "site": name, "root": st.root, "state": state, "link": st.link, "used": used, "quota": st.quota,
            "fs_total": st.fs_total, "fs_free": st.fs_free, "low_watermark": site.low_watermark, "min_free": site.min_free,
            "ttl": st.ttl, "used_fraction": used / st.quota if st.quota else (used / st.fs_total if st.fs_total else None),
            "commits": len(st.commits), "leases": st.leases, "pinned": st.pinned, "queue": queue,
            "daemon": dict(st.daemon) if st.daemon else None,
            "partial": [dict(p) for p in st.partial],
            "evictions": [{"time": e["time"], "dataset": e["dataset"], "commit": e["commit"], "reason": e["details"].get("reason"),
                           "bytes": e["details"].get("bytes"), "user": e["user"]} for e in evictions],
            "entries": [dict(c) for c in st.commits],
        })  # fmt: skip
    return {"sites": out}


def runs(ctx: Context) -> dict:
    return {"runs": ctx.catalog.recent_runs(200)}


def run(ctx: Context, run_id: str) -> dict:
    found = ctx.catalog.run(run_id)
    if found is None:
        raise RunNotFoundError(f"no run {run_id!r} in this home's catalog: `cachehub lineage` lists the runs it knows", run=run_id)
    inputs, outputs = ctx.catalog.run_io(run_id)
    return {
        **found,
        "inputs": [{"dataset": d, "commit": c, "ref": r, "site": s} for d, c, r, s in inputs],
        "outputs": [{"dataset": d, "commit": c} for d, c in outputs],
    }


def graph(ctx: Context, ref: str, *, depth: int = 4) -> dict:
    """The lineage of a commit, up and down, laid out in columns for drawing: upstream to the
    left, downstream to the right (x = distance from the commit)."""
    c = resolve_commit(ctx, Ref.of(ref))
    start = f"commit:{c.id}"
    g = lineage.walk(lineage.build(ctx.catalog), start, up=True, down=True, depth=depth)
    level = {start: 0}
    todo = deque([start])
    while todo:
        node = todo.popleft()
        for e in g.out(node):  # towards what it came from: left
            if e.dst not in level:
                level[e.dst] = level[node] - 1
                todo.append(e.dst)
        for e in g.into(node):  # towards what came from it: right
            if e.src not in level:
                level[e.src] = level[node] + 1
                todo.append(e.src)
    columns: dict[int, list[str]] = {}
    for node in sorted(level, key=lambda n: (level[n], n)):
        columns.setdefault(level[node], []).append(node)
    low = min(columns)
    nodes = []
    for lv, members in sorted(columns.items()):
        for i, node in enumerate(members):
            info = g.nodes.get(node, {})
            nodes.append({"id": node, "kind": info.get("kind", node.split(":")[0]), "label": lineage.label(node, info),
                          "x": (lv - low) * 220 + 10, "y": i * 70 + 10, "start": node == start,
                          "dataset": info.get("dataset"), "commit": info.get("commit"), "run": info.get("run")})  # fmt: skip
    where = {n["id"]: n for n in nodes}
    edges = [{"src": e.src, "dst": e.dst, "kind": e.kind, "label": e.label,
              "x1": where[e.src]["x"], "y1": where[e.src]["y"] + 20, "x2": where[e.dst]["x"] + 190, "y2": where[e.dst]["y"] + 20}
             for e in g.edges if e.src in where and e.dst in where]  # fmt: skip
    width = (max(columns) - low + 1) * 220 + 20
    height = max(len(m) for m in columns.values()) * 70 + 20
    return {"commit": c.id, "dataset": c.dataset, "nodes": nodes, "edges": edges, "width": width, "height": height}


FULL_CHAIN_CHECK = 300.0  # seconds between two full checks of the audit chains (a web server's thread)
_CHAINS: dict[str, dict] = {}  # catalog path -> what the last check found (this process)
_CHAINS_LOCK = threading.Lock()


def chain_state(ctx: Context, *, full: bool = False) -> dict:
    """The audit chains' state without re-hashing the whole trail on a page load.

    ``full`` re-hashes every event (it catches an edit to an old one): the web server does that
    in a thread of its own, at start and every ``FULL_CHAIN_CHECK`` seconds. A page load only
    checks the events added since, continued from the last check's chain heads; before the
    first full check has finished it says so (``ok`` is None)."""
    from .audit import verify_since

    key = str(ctx.settings.catalog_path)
    if full:
        memo = {"full_time": iso(time.time()), "last": {}, "seq": 0, "problems": []}
    else:
        with _CHAINS_LOCK:
            memo = _CHAINS.get(key)
            memo = None if memo is None else {**memo, "last": dict(memo["last"]), "problems": list(memo["problems"])}
        if memo is None:
            return {"ok": None, "problems": [], "full_check": None, "checked_through_seq": 0}
    problems, memo["seq"] = verify_since(ctx, memo["seq"], memo["last"])
    memo["problems"] += [str(p) for p in problems]
    with _CHAINS_LOCK:
        current = _CHAINS.get(key)
        if full or current is None or current["seq"] <= memo["seq"]:
            _CHAINS[key] = memo
    return {"ok": not memo["problems"], "problems": memo["problems"], "full_check": memo["full_time"], "checked_through_seq": memo["seq"]}


def audit(ctx: Context, *, page: int = 1, **filters: str | None) -> dict:
    """Audit events, newest first, filtered; with the state of every hash chain."""
    events, total = ctx.catalog.audit_page(limit=PAGE, offset=(page - 1) * PAGE, **filters)
    chains = chain_state(ctx)
    given = {k: v for k, v in filters.items() if v}
    return {
        "filters": given,
        "query_prev": urlencode({**given, "page": page - 1}),
        "query_next": urlencode({**given, "page": page + 1}),
        "page": page,
        "pages": max(1, -(-total // PAGE)),
        "total": total,
        "chain_ok": chains["ok"],
        "chain_problems": chains["problems"],
        "chain_full_check": chains["full_check"],
        "events": [{**e, "details": json.dumps(e["details"], sort_keys=True)} for e in events],
    }

