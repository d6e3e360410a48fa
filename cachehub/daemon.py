"""The background service: scheduled sweeps, subscriptions, the cache queue, repair, HTTP.

``Daemon(settings, sites=..., listen=...)`` wires APScheduler jobs:

* ``sweep``      reap dead leases, evict expired entries, then LRU while over capacity;
* ``refresh``    keep the catalog in step with the lake (commits and tags from other sites);
* ``queue``      serve cache requests dropped on the site roots, one download per commit;
* ``subscriptions`` for each subscription whose interval passed, cache the commit its ref
                 names now if the site lacks it (a new commit arrives as a delta);
* ``repair``     re-verify (and repair) commits in which watchdog saw a file change;
* ``heartbeat``  renew ``<root>/daemon.json`` so compute nodes know requests are served.

It also serves ``/status`` (JSON) and ``/metrics`` (Prometheus text) on 127.0.0.1 by default
(``server.py``). Every job opens its own Context (SQLite connections are per thread) and calls
the workers; the daemon computes nothing a worker already does. ``stop()`` (SIGTERM) lets
running jobs finish; an interrupted download is safe to abandon and is resumed after restart,
because queued requests live on the site root until served.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any
from pathlib import Path

from . import audit, cache, cache_queue, evict, index, purge, server, verify, views
from .config import Settings
from .context import Context
from .errors import CachehubError
from .model import to_dict
from .status import site_status
from .store import SiteStore

log = logging.getLogger("cachehub.daemon")
DEFAULT_PORT = 8731
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"


class Metrics:
    """Counters the daemon exposes; guarded by one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fetched_bytes = 0
        self.reused_bytes = 0
        self.fetched_files = 0
        self.reused_files = 0
        self.caches = 0
        self.evictions: Counter[str] = Counter()
        self.repairs = 0
        self.failures: Counter[tuple[str, str]] = Counter()  # (site, kind) -> count
        self.subscription_caches = 0
        self.last_success: dict[str, float] = {}  # "sweep", "refresh", "subscription:<id>" -> time
        # the same, by site (what /metrics labels): counters per (site, name), eviction reasons
        # per (site, reason), and each site's cache durations in histogram buckets
        self.by_site: Counter[tuple[str, str]] = Counter()
        self.evictions_by_site: Counter[tuple[str, str]] = Counter()
        self.durations: dict[str, list[float]] = {}  # site -> [count per bucket..., sum, count]

    def evicted(self, site: str, reason: str, n: int = 1) -> None:
        with self.lock:
            self.evictions[reason] += n
            self.evictions_by_site[(site, reason)] += n

    def fail(self, site: str, kind: str) -> None:
        with self.lock:
            self.failures[(site, kind)] += 1

    def succeeded(self, what: str, when: float) -> None:
        with self.lock:
            self.last_success[what] = when

    def record_cache(self, result: object) -> None:
        site = result.site  # type: ignore[attr-defined]
        with self.lock:
            self.caches += 1
            self.fetched_bytes += result.fetched_bytes  # type: ignore[attr-defined]
            self.reused_bytes += result.reused_bytes  # type: ignore[attr-defined]
            self.fetched_files += result.fetched_files  # type: ignore[attr-defined]
            self.reused_files += result.reused_files  # type: ignore[attr-defined]
            for name in ("fetched_bytes", "reused_bytes", "fetched_files", "reused_files"):
                self.by_site[(site, name)] += getattr(result, name)
            self.by_site[(site, "caches")] += 1
            admitted = len(getattr(result, "evicted", ()))
            self.evictions["admission"] += admitted
            self.evictions_by_site[(site, "admission")] += admitted
            if not result.already_cached:  # type: ignore[attr-defined]
                hist = self.durations.setdefault(site, [0.0] * (len(server.DURATION_BUCKETS) + 2))
                for i, bound in enumerate(server.DURATION_BUCKETS):
                    if result.seconds <= bound:  # type: ignore[attr-defined]
                        hist[i] += 1
                hist[-2] += result.seconds  # type: ignore[attr-defined]
                hist[-1] += 1


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        sites: Iterable[str] | None = None,
        listen: str | None = DEFAULT_LISTEN,
        token: str | None = None,
        sweep_every: float = 60.0,
        refresh_every: float = 60.0,
        queue_every: float = 1.0,
        gc_every: float = 3600.0,
        clock: Callable[[], float] = time.time,
        watch: bool = True,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.site_names = list(sites) if sites else sorted(settings.sites)
        for name in self.site_names:
            settings.site(name)  # unknown site: fail now, with the fix
        self.listen = listen
        self.token = token  # the dashboard's actions (docs/dashboard.md); never logged
        self.sweep_every = sweep_every
        self.refresh_every = refresh_every
        self.queue_every = queue_every
        self.clock = clock
        self.monotonic = monotonic  # when subscriptions fall due (injected by tests)
        self.gc_every = gc_every  # full gc walks (O(objects)) happen this often, not every sweep
        self._gc_next = float("-inf")
        self.watch = watch
        self.metrics = Metrics()
        self.damaged: set[tuple[str, str]] = set()
        self.started = clock()
        self._damaged_lock = threading.Lock()
        self._scheduler = None
        self._observer = None
        self._http: Any = None  # web.Server
        self._stopped = threading.Event()
        self._sub_next: dict[int, float] = {}  # subscription id -> monotonic time it is due
        self._sub_failures: dict[int, int] = {}  # subscription id -> failures in a row
        self._missing: set[str] = set()  # sites whose root is missing: paused

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        from cachehub import web

        # the socket first: a public address without a token is refused before anything starts
        bound = web.bind(self.listen, token=self.token) if self.listen else None
        for name in self.site_names:
            store = SiteStore(self.settings.site(name))
            if self.settings.creates_on_use(store.site):
                store.create()
        if bound is not None:
            sock, loopback = bound
            self._http = web.Server(web.create_app(self.settings, token=self.token, loopback=loopback, daemon=self), sock)
        for store in self.stores():
            cache_queue.announce(store, self.address)
        scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30})
        scheduler.add_job(self.sweep, "interval", seconds=self.sweep_every, id="sweep", next_run_time=_now_dt())
        scheduler.add_job(self.refresh, "interval", seconds=self.refresh_every, id="refresh", next_run_time=_now_dt())
        scheduler.add_job(self.serve_queue, "interval", seconds=self.queue_every, id="queue", next_run_time=_now_dt())
        scheduler.add_job(self.repair, "interval", seconds=max(1.0, self.queue_every), id="repair")
        scheduler.add_job(self.heartbeat, "interval", seconds=10, id="heartbeat")
        scheduler.add_job(self.subscriptions_tick, "interval", seconds=self.queue_every, id="subscriptions", next_run_time=_now_dt())
        self._scheduler = scheduler
        scheduler.start()
        if self.watch:
            self._start_watchdog()
        with self._context() as ctx:
            ctx.events.audit("daemon-start", sites=self.site_names, listen=self.address)
        log.info("cachehub daemon serving sites %s, http %s", ", ".join(self.site_names), self.address or "off")

    def stop(self, *, wait: bool = True) -> None:
        """Stop scheduling, let running jobs finish (``wait``), withdraw from the site roots."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=wait)
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._http is not None:
            self._http.close()
        for store in self.stores():
            cache_queue.withdraw(store)
        with self._context() as ctx:
            ctx.events.audit("daemon-stop", sites=self.site_names)

    def wait(self) -> None:
        self._stopped.wait()

    @property
    def address(self) -> str | None:
        return self._http.address if self._http is not None else None

    def _context(self) -> Context:
        return Context(self.settings, clock=self.clock)

    def stores(self) -> list[SiteStore]:
        """The stores of the sites served now: a site whose root lost its marker is paused
        (reported in /status and /metrics, logged once) until the root is back."""
        out = []
        for name in self.site_names:
            store = SiteStore(self.settings.site(name))
            if store.exists():
                if name in self._missing:
                    self._missing.discard(name)
                    log.info("site %s: root %s is back; serving it again", name, store.root)
                out.append(store)
            elif name not in self._missing:
                self._missing.add(name)
                self.metrics.fail(name, "root-missing")
                log.warning("site %s: %s has no cachehub-site.json (unmounted export?): paused until it is back", name, store.root)
        return out

    # -- jobs --------------------------------------------------------------------------------
    def sweep(self) -> None:
        """Reap dead leases, evict expired entries, then LRU while over capacity."""
        collect = self.monotonic() >= self._gc_next
        if collect:
            self._gc_next = self.monotonic() + self.gc_every
        with self._context() as ctx:
            failed = False
            for store in self.stores():
                try:
                    _, result = evict.run(ctx, store, now=self.clock(), collect=collect)
                except (CachehubError, OSError) as exc:
                    failed = True
                    self.metrics.fail(store.name, "sweep")
                    log.warning("sweep of %s failed: %s", store.name, exc)
                    continue
                if result is not None:
                    for ev in result.evicted:
                        self.metrics.evicted(store.name, ev.reason)
                    for ev in result.evicted:
                        log.info("evicted %s@%s at %s (%s, %d bytes)", ev.entry.dataset, ev.entry.commit[:12], store.name, ev.reason, ev.entry.bytes)
                    if result.gc_objects:
                        log.info("gc at %s removed %d objects (%d bytes)", store.name, result.gc_objects, result.gc_bytes)
            if not failed:
                self.metrics.succeeded("sweep", self.clock())

    def refresh(self) -> None:
        """Index commits and tags pushed from other sites; evict commits purged elsewhere;
        ship this daemon's audit events; pick up new subscriptions; compute the diffs the
        dashboard's history shows."""
        with self._context() as ctx:
            try:
                for name in ctx.lake.datasets():
                    index.refresh(ctx, name)
                self._evict_purged(ctx)
                audit.ship_quietly(ctx)
            except (CachehubError, OSError) as exc:
                self.metrics.fail("", "refresh")
                log.warning("refresh failed: %s", exc)
                return
            self.metrics.succeeded("refresh", self.clock())
            # the dashboard's history shows each commit's change against its parent: compute
            # the missing ones here, a few seconds at a time, rather than on a page load
            views.fill_diffs(ctx, budget=10.0)

    def _evict_purged(self, ctx: Context) -> None:
        """A purge on another host reaches this host's sites through the lake's tombstones."""
        purged = [t.commit for t in ctx.catalog.tombstones()]
        for store in self.stores():
            if any(store.is_cached(cid) for cid in purged):
                removed = purge.evict_purged(ctx, store, [cid for cid in purged if store.entries_of(cid)])
                for cid in removed:
                    log.info("evicted %s at %s: purged from the lake", cid[:12], store.name)
                self.metrics.evicted(store.name, "purged", len(removed))

    def serve_queue(self) -> None:
        """Cache every requested commit once per site; tell waiters about failures."""
        with self._context() as ctx:
            for store in self.stores():
                name = store.name
                for commit, requests in cache_queue.pending(store).items():
                    if self._stopped.is_set():
                        return
                    ref = f"{requests[0].dataset}@{commit}"
                    try:
                        result = cache.cache(ctx, ref, site=name)
                    except (CachehubError, OSError) as exc:
                        cache_queue.failed(requests, str(exc))
                        self.metrics.fail(name, "queue")
                        log.warning("queued cache of %s at %s failed: %s", ref, name, exc)
                        continue
                    self.metrics.record_cache(result)
                    cache_queue.done(requests)
                    log.info(
                        "cached %s at %s for %d queued request(s): fetched %d objects (%d bytes)",
                        ref[: ref.index("@") + 13], name, len(requests), result.fetched_files, result.fetched_bytes,
                    )  # fmt: skip
                    ctx.events.audit(
                        "queue-served", dataset=result.dataset, commit=commit, site=name, requests=len(requests), fetched_bytes=result.fetched_bytes
                    )

    def check_subscription(self, sub_id: int) -> bool:
        """Cache the commit a subscription's ref names now, if the site lacks it; False if that failed."""
        with self._context() as ctx:
            sub = ctx.catalog.subscription(sub_id)
            if sub is None:
                return True
            try:
                commit = index.resolve_commit(ctx, f"{sub.dataset}@{sub.ref}", refresh_first=True)
                if ctx.store(sub.site).is_cached(commit.id):
                    self.metrics.succeeded(f"subscription:{sub_id}", self.clock())
                    return True
                result = cache.cache(ctx, f"{commit.dataset}@{commit.id}", site=sub.site)
            except (CachehubError, OSError) as exc:
                self.metrics.fail(sub.site, "subscription")
                failures = self._sub_failures.get(sub_id, 0) + 1
                log.warning(
                    "subscription %s@%s at %s failed (%d in a row; next try in %s s): %s",
                    sub.dataset, sub.ref, sub.site, failures, int(self._backoff(sub.every, failures)), exc,
                )  # fmt: skip
                return False
            self.metrics.record_cache(result)
            self.metrics.succeeded(f"subscription:{sub_id}", self.clock())
            log.info(
                "prefetched %s@%s (%s) at %s: fetched %d objects (%d bytes)",
                sub.dataset, sub.ref, commit.short, sub.site, result.fetched_files, result.fetched_bytes,
            )  # fmt: skip
            with self.metrics.lock:
                self.metrics.subscription_caches += 1
            ctx.events.audit(
                "subscription-cache",
                dataset=commit.dataset,
                commit=commit.id,
                ref=sub.ref,
                site=sub.site,
                reason=f"subscription {sub.dataset}@{sub.ref}",
                fetched_bytes=result.fetched_bytes,
            )

    def repair(self) -> None:
        """Verify and repair commits in which a file was changed or deleted."""
        with self._damaged_lock:
            todo = sorted(self.damaged)
            self.damaged.clear()
        if not todo:
            return
        with self._context() as ctx:
            for site, commit_id in todo:
                try:
                    store = ctx.store(site)
                    found = verify.verify_entry(ctx, store, commit_id, repair=True)  # a commit's tree, or a partial cache's
                    if found is None:
                        continue
                    report, dataset = found, found.dataset
                except (CachehubError, OSError, ValueError, KeyError) as exc:
                    self.metrics.fail(site, "repair")
                    log.warning("repair of %s at %s failed: %s", commit_id[:12], site, exc)
                    continue
                if report.repaired:
                    log.info("repaired %d file(s) of %s@%s at %s", len(report.repaired), dataset, commit_id[:12], site)
                    with self.metrics.lock:
                        self.metrics.repairs += len(report.repaired)
                        self.metrics.by_site[(site, "repairs")] += len(report.repaired)

    def heartbeat(self) -> None:
        for store in self.stores():
            cache_queue.heartbeat(store)

    def subscriptions_tick(self) -> None:
        """Check each subscription whose interval has passed (one job; no scheduler changes
        from job threads, which could deadlock against a shutdown)."""
        with self._context() as ctx:
            subs = [s for s in ctx.catalog.subscriptions() if s.site in self.site_names and s.site not in self._missing]
        for sub in subs:
            if self._stopped.is_set():
                return
            now = self.monotonic()
            if now < self._sub_next.get(sub.id, float("-inf")):
                continue
            if self.check_subscription(sub.id):
                self._sub_failures.pop(sub.id, None)
                self._sub_next[sub.id] = now + sub.every
            else:
                failures = self._sub_failures[sub.id] = self._sub_failures.get(sub.id, 0) + 1
                self._sub_next[sub.id] = now + self._backoff(sub.every, failures)

    @staticmethod
    def _backoff(every: float, failures: int) -> float:
        """After ``failures`` failures in a row: every, 2x, 4x... at most an hour (or ``every`` if longer)."""
        return max(every, min(every * 2 ** (failures - 1), 3600.0))

    # -- watchdog ----------------------------------------------------------------------------
    def _start_watchdog(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        daemon = self

        class Handler(FileSystemEventHandler):
            def __init__(self, site: str, commits: Path) -> None:
                self.site = site
                self.commits = commits

            def on_any_event(self, event) -> None:  # type: ignore[no-untyped-def]
                if event.event_type in ("opened", "closed", "closed_no_write", "created"):
                    return
                daemon._note_change(self.site, self.commits, str(event.src_path), event.is_directory, event.event_type)

        observer = Observer()
        for store in self.stores():
            commits = store.commits_dir
            commits.mkdir(parents=True, exist_ok=True)
            observer.schedule(Handler(store.name, commits), str(commits), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def _note_change(self, site: str, commits: Path, src: str, is_dir: bool, kind: str) -> None:
        try:
            rel = Path(src).relative_to(commits)
        except ValueError:
            return
        parts = rel.parts
        if not parts or (len(parts) == 1 and is_dir):
            return  # a whole tree published or evicted: not damage
        if not (commits / parts[0]).is_dir():
            return  # events from a tree already moved out (eviction): not damage
        with self._damaged_lock:
            self.damaged.add((site, parts[0]))
        log.info("change (%s) inside published commit %s at %s: will verify", kind, parts[0][:12], site)

    # -- what the HTTP side shows (server.py) -------------------------------------------------
    def status(self) -> dict:
        """The daemon, its sites, subscriptions and counters, JSON-ready."""
        with self._context() as ctx:
            sites = [to_dict(site_status(SiteStore(self.settings.site(name)))) for name in self.site_names]
            subs = [to_dict(s) for s in ctx.catalog.subscriptions()]
            recorded = [{"site": s, "reason": r, "count": n} for s, r, n in ctx.catalog.eviction_counts() if s in self.site_names]
        for s in subs:
            s["failures_in_a_row"] = self._sub_failures.get(s["id"], 0)
        m = self.metrics
        with m.lock:
            total = m.fetched_bytes + m.reused_bytes
            failures: dict[str, dict[str, int]] = {}
            for (site, kind), n in m.failures.items():
                failures.setdefault(site, {})[kind] = n
            metrics = {
                "fetched_bytes": m.fetched_bytes,
                "reused_bytes": m.reused_bytes,
                "hit_ratio": (m.reused_bytes / total) if total else None,
                "caches": m.caches,
                "evictions": dict(m.evictions),
                "repairs": m.repairs,
                "failures": failures,
                "subscription_caches": m.subscription_caches,
                "last_success": dict(m.last_success),
                "by_site": {site: {k: v for (s2, k), v in m.by_site.items() if s2 == site} for site in {s for s, _ in m.by_site}},
                "evictions_by_site": [{"site": s, "reason": r, "count": n} for (s, r), n in sorted(m.evictions_by_site.items())],
                "evictions_recorded": recorded,
                "cache_seconds": {site: list(h) for site, h in m.durations.items()},
            }
        return {
            "daemon": {"pid": os.getpid(), "started": self.started, "uptime": self.clock() - self.started, "listen": self.address},
            "sites": sites,
            "subscriptions": subs,
            "metrics": metrics,
        }


def _now_dt():  # type: ignore[no-untyped-def]
    from datetime import datetime

    return datetime.now()


def run_forever(daemon: Daemon) -> None:
    """Run until SIGTERM or SIGINT, then stop cleanly (systemd-friendly)."""
    import signal

    def handle(signum: int, _frame: object) -> None:
        log.info("signal %s: stopping (running jobs finish first)", signum)
        threading.Thread(target=daemon.stop, name="cachehub-stop").start()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    daemon.start()
    daemon.wait()
    # stop() runs in its own thread; wait until it has withdrawn from the sites
    for thread in threading.enumerate():
        if thread.name == "cachehub-stop":
            thread.join()
