"""The background service: scheduled sweeps, subscriptions, the cache queue, repair, HTTP.

``Daemon(settings, sites=..., listen=...)`` wires APScheduler jobs:

* ``sweep``      reap dead leases, evict expired entries, then LRU while over capacity;
* ``refresh``    keep the catalog in step with the lake (commits and tags from other sites);
* ``queue``      serve cache requests dropped on the site roots, one download per commit;
* ``subscriptions`` for each subscription whose interval passed, cache the commit its ref
                 names now if the site lacks it (a new commit arrives as a delta);
* ``repair``     re-verify (and repair) commits in which watchdog saw a file change;
* ``heartbeat``  renew ``<root>/daemon.json`` so compute nodes know requests are served.

It also serves ``/status`` (JSON) and ``/metrics`` (Prometheus text) on 127.0.0.1 by default.
Every job opens its own Hub (SQLite connections are per thread). ``stop()`` (SIGTERM) lets
running jobs finish; an interrupted download is safe to abandon and is resumed after restart,
because queued requests live on the site root until served.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from . import cache_queue
from .api import Hub
from .config import Settings
from .errors import CachehubError
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
        self.failures = 0
        self.subscription_caches = 0

    def record_cache(self, result: object) -> None:
        with self.lock:
            self.caches += 1
            self.fetched_bytes += result.fetched_bytes  # type: ignore[attr-defined]
            self.reused_bytes += result.reused_bytes  # type: ignore[attr-defined]
            self.fetched_files += result.fetched_files  # type: ignore[attr-defined]
            self.reused_files += result.reused_files  # type: ignore[attr-defined]
            self.evictions["admission"] += len(getattr(result, "evicted", ()))


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        sites: Iterable[str] | None = None,
        listen: str | None = DEFAULT_LISTEN,
        sweep_every: float = 60.0,
        refresh_every: float = 60.0,
        queue_every: float = 1.0,
        clock: Callable[[], float] = time.time,
        watch: bool = True,
    ) -> None:
        self.settings = settings
        self.site_names = list(sites) if sites else sorted(settings.sites)
        for name in self.site_names:
            settings.site(name)  # unknown site: fail now, with the fix
        self.listen = listen
        self.sweep_every = sweep_every
        self.refresh_every = refresh_every
        self.queue_every = queue_every
        self.clock = clock
        self.watch = watch
        self.metrics = Metrics()
        self.damaged: set[tuple[str, str]] = set()
        self.started = clock()
        self._damaged_lock = threading.Lock()
        self._scheduler = None
        self._observer = None
        self._http: ThreadingHTTPServer | None = None
        self._stopped = threading.Event()
        self._sub_last: dict[int, float] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        for name in self.site_names:
            SiteStore(self.settings.site(name)).ensure()
        if self.listen:
            self._start_http()
        for name in self.site_names:
            cache_queue.announce(SiteStore(self.settings.site(name)), self.address)
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
        with self._hub() as hub:
            hub.catalog.audit("daemon-start", sites=self.site_names, listen=self.address)
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
            self._http.shutdown()
            self._http.server_close()
        for name in self.site_names:
            cache_queue.withdraw(SiteStore(self.settings.site(name)))
        with self._hub() as hub:
            hub.catalog.audit("daemon-stop", sites=self.site_names)

    def wait(self) -> None:
        self._stopped.wait()

    @property
    def address(self) -> str | None:
        if self._http is None:
            return None
        host, port = self._http.server_address[:2]
        return f"{host}:{port}"

    def _hub(self) -> Hub:
        return Hub(self.settings)

    # -- jobs --------------------------------------------------------------------------------
    def sweep(self) -> None:
        """Reap dead leases, evict expired entries, then LRU while over capacity."""
        with self._hub() as hub:
            for name in self.site_names:
                try:
                    _, result = hub.evict(site=name, now=self.clock())
                except CachehubError as exc:
                    log.warning("sweep of %s failed: %s", name, exc)
                    continue
                if result is not None:
                    with self.metrics.lock:
                        for ev in result.evicted:
                            self.metrics.evictions[ev.reason] += 1

    def refresh(self) -> None:
        """Index commits and tags pushed from other sites; evict commits purged elsewhere;
        ship this daemon's audit events; pick up new subscriptions."""
        with self._hub() as hub:
            try:
                for name in hub.lake.datasets():
                    hub.refresh(name)
                self._evict_purged(hub)
                hub.ship_audit()
            except (CachehubError, OSError) as exc:
                log.warning("refresh failed: %s", exc)

    def _evict_purged(self, hub: Hub) -> None:
        """A purge on another host reaches this host's sites through the lake's tombstones."""
        from .evict import gc
        from .restore import evict_purged

        purged = [r[0] for r in hub.catalog.conn.execute("SELECT commit_id FROM tombstones")]
        for name in self.site_names:
            store = SiteStore(self.settings.site(name))
            removed, doomed = [], set()
            for cid in purged:
                content = evict_purged(store, cid)
                if content is not None:
                    removed.append(cid)
                    doomed |= content
            if removed:
                gc(store, doomed=doomed)
            for cid in removed:
                hub.catalog.remove_cache_entry(name, cid)
                hub.catalog.audit("evict", commit=cid, site=name, reason="purged")
                with self.metrics.lock:
                    self.metrics.evictions["purged"] += 1

    def serve_queue(self) -> None:
        """Cache every requested commit once per site; tell waiters about failures."""
        with self._hub() as hub:
            for name in self.site_names:
                store = SiteStore(self.settings.site(name))
                for commit, requests in cache_queue.pending(store).items():
                    if self._stopped.is_set():
                        return
                    ref = f"{requests[0].dataset}@{commit}"
                    try:
                        result = hub.cache(ref, site=name)
                    except (CachehubError, OSError) as exc:
                        cache_queue.failed(requests, str(exc))
                        with self.metrics.lock:
                            self.metrics.failures += 1
                        log.warning("queued cache of %s at %s failed: %s", ref, name, exc)
                        continue
                    self.metrics.record_cache(result)
                    cache_queue.done(requests)
                    hub.catalog.audit(
                        "queue-served", dataset=result.dataset, commit=commit, site=name, requests=len(requests), fetched_bytes=result.fetched_bytes
                    )

    def check_subscription(self, sub_id: int) -> None:
        """Cache the commit a subscription's ref names now, if the site lacks it."""
        with self._hub() as hub:
            sub = hub.catalog.subscription(sub_id)
            if sub is None:
                return
            try:
                commit = hub.resolve_commit(f"{sub['dataset']}@{sub['ref']}", refresh=True)
                store = SiteStore(self.settings.site(sub["site"]))
                if store.is_cached(commit.id):
                    return
                result = hub.cache(f"{commit.dataset}@{commit.id}", site=sub["site"])
            except (CachehubError, OSError) as exc:
                log.warning("subscription %s failed: %s", sub_id, exc)
                return
            self.metrics.record_cache(result)
            with self.metrics.lock:
                self.metrics.subscription_caches += 1
            hub.catalog.audit(
                "subscription-cache",
                dataset=commit.dataset,
                commit=commit.id,
                ref=sub["ref"],
                site=sub["site"],
                reason=f"subscription {sub['dataset']}@{sub['ref']}",
                fetched_bytes=result.fetched_bytes,
            )

    def repair(self) -> None:
        """Verify and repair commits in which a file was changed or deleted."""
        with self._damaged_lock:
            todo = sorted(self.damaged)
            self.damaged.clear()
        if not todo:
            return
        with self._hub() as hub:
            for site, commit_id in todo:
                store = SiteStore(self.settings.site(site))
                meta = store.meta_path(commit_id)
                if not store.is_cached(commit_id) or not meta.exists():
                    continue
                dataset = json.loads(meta.read_bytes())["dataset"]
                try:
                    report = hub.verify(f"{dataset}@{commit_id}", site=site, repair=True)
                except (CachehubError, OSError) as exc:
                    log.warning("repair of %s at %s failed: %s", commit_id[:12], site, exc)
                    continue
                if report.repaired:
                    with self.metrics.lock:
                        self.metrics.repairs += len(report.repaired)

    def heartbeat(self) -> None:
        for name in self.site_names:
            cache_queue.heartbeat(SiteStore(self.settings.site(name)))

    def subscriptions_tick(self) -> None:
        """Check each subscription whose interval has passed (one job; no scheduler changes
        from job threads, which could deadlock against a shutdown)."""
        with self._hub() as hub:
            subs = [s for s in hub.catalog.subscriptions() if s["site"] in self.site_names]
        now = time.monotonic()
        for sub in subs:
            if self._stopped.is_set():
                return
            last = self._sub_last.get(sub["id"])
            if last is None or now - last >= sub["every"]:
                self._sub_last[sub["id"]] = now
                self.check_subscription(sub["id"])

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
        for name in self.site_names:
            commits = SiteStore(self.settings.site(name)).root / "commits"
            commits.mkdir(parents=True, exist_ok=True)
            observer.schedule(Handler(name, commits), str(commits), recursive=True)
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

    # -- HTTP --------------------------------------------------------------------------------
    def status(self) -> dict:
        with self._hub() as hub:
            sites = hub.status()
            sites = [s for s in sites if s["site"] in self.site_names]
            subs = hub.catalog.subscriptions()
            for s in sites:
                store = SiteStore(self.settings.site(s["site"]))
                s["queue_depth"] = cache_queue.depth(store)
                s["leases"] = len([x for x in hub.leases(s["site"]) if x["live"]])
                s["quota"] = store.site.quota
        m = self.metrics
        with m.lock:
            total = m.fetched_bytes + m.reused_bytes
            metrics = {
                "fetched_bytes": m.fetched_bytes,
                "reused_bytes": m.reused_bytes,
                "hit_ratio": (m.reused_bytes / total) if total else None,
                "caches": m.caches,
                "evictions": dict(m.evictions),
                "repairs": m.repairs,
                "failures": m.failures,
                "subscription_caches": m.subscription_caches,
            }
        return {
            "daemon": {"pid": __import__("os").getpid(), "started": self.started, "uptime": self.clock() - self.started, "listen": self.address},
            "sites": sites,
            "subscriptions": subs,
            "metrics": metrics,
        }

    def prometheus(self) -> str:
        st = self.status()
        m = st["metrics"]
        lines = [
            "# HELP cachehub_fetched_bytes_total Bytes downloaded from the lake by this daemon.",
            "# TYPE cachehub_fetched_bytes_total counter",
            f"cachehub_fetched_bytes_total {m['fetched_bytes']}",
            "# HELP cachehub_reused_bytes_total Bytes served from content already at the site.",
            "# TYPE cachehub_reused_bytes_total counter",
            f"cachehub_reused_bytes_total {m['reused_bytes']}",
            "# HELP cachehub_hit_ratio Share of cached bytes that were already at the site.",
            "# TYPE cachehub_hit_ratio gauge",
            f"cachehub_hit_ratio {m['hit_ratio'] if m['hit_ratio'] is not None else 'NaN'}",
            "# HELP cachehub_evictions_total Cache entries evicted, by reason.",
            "# TYPE cachehub_evictions_total counter",
        ]
        for reason in ("expired", "capacity", "manual", "admission", "purged"):
            lines.append(f'cachehub_evictions_total{{reason="{reason}"}} {m["evictions"].get(reason, 0)}')
        lines += ["# HELP cachehub_repairs_total Files repaired after a change was detected.", "# TYPE cachehub_repairs_total counter", f"cachehub_repairs_total {m['repairs']}"]
        gauges = [
            ("cachehub_leases", "Live leases at the site.", "leases"),
            ("cachehub_queue_depth", "Cache requests waiting at the site.", "queue_depth"),
            ("cachehub_site_used_bytes", "Bytes of content stored at the site.", "object_bytes"),
            ("cachehub_site_quota_bytes", "The site's quota (absent: none).", "quota"),
            ("cachehub_fs_free_bytes", "Free bytes on the site's filesystem.", "fs_free"),
            ("cachehub_cached_commits", "Commits cached at the site.", None),
        ]
        for metric, help_text, key in gauges:
            lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge"]
            for s in st["sites"]:
                value = len(s["commits"]) if key is None else s.get(key)
                if value is not None:
                    lines.append(f'{metric}{{site="{s["site"]}"}} {value}')
        return "\n".join(lines) + "\n"

    def _start_http(self) -> None:
        host, _, port = (self.listen or DEFAULT_LISTEN).rpartition(":")
        daemon = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?")[0] == "/status":
                    body, ctype = json.dumps(daemon.status(), default=str).encode(), "application/json"
                elif self.path.split("?")[0] == "/metrics":
                    body, ctype = daemon.prometheus().encode(), "text/plain; version=0.0.4"
                else:
                    self.send_error(404, "try /status or /metrics")
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("http: " + fmt, *args)

        self._http = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, name="cachehub-http", daemon=True).start()


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
