"""The daemon's HTTP side: a route table over what the daemon reports, nothing computed here.

``source`` is anything with a ``status() -> dict`` (the daemon); ``cachehub.web`` mounts these
routes beside the dashboard. Routes:

* ``GET /status``  the daemon, its sites, subscriptions and counters, as JSON;
* ``GET /metrics`` the same numbers in the Prometheus text format (prometheus_client);
* ``GET /healthz`` 200 while the daemon's process serves requests (a liveness probe);
* ``GET /readyz``  200 when every site it serves has its root mounted and marked, else 503
  naming the sites that are not (a readiness probe: a pod whose NFS export vanished leaves
  the Service).

A new page is one function taking the source and returning (body, content type[, status]),
and one line in ``ROUTES``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("cachehub.daemon")
DURATION_BUCKETS = (1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 4 * 3600.0, float("inf"))  # seconds of one cache


class Source(Protocol):
    def status(self) -> dict: ...


def status_page(source: Source) -> tuple[bytes, str]:
    return json.dumps(source.status(), default=str).encode(), "application/json"


def metrics_page(source: Source) -> tuple[bytes, str]:
    from prometheus_client import CONTENT_TYPE_LATEST

    return prometheus(source.status()).encode(), CONTENT_TYPE_LATEST


def health_page(source: Source) -> tuple[bytes, str]:
    return b"ok\n", "text/plain"


def ready_page(source: Source) -> tuple[bytes, str, int]:
    down = [f"{s['site']}: {s.get('state')}" for s in source.status()["sites"] if s.get("state", "ok") != "ok"]
    if down:
        return ("not ready: " + "; ".join(down) + "\n").encode(), "text/plain", 503
    return b"ready\n", "text/plain", 200


ROUTES: dict[str, Callable[[Source], tuple]] = {
    "/status": status_page,
    "/metrics": metrics_page,
    "/healthz": health_page,
    "/readyz": ready_page,
}


def prometheus(st: dict) -> str:
    """The daemon's status in the Prometheus text format, written by prometheus_client: the
    families below, the process and platform collectors, and the object-store request stats of
    this process. Everything comes from ``status()`` (site records and the usage ledger): a
    scrape never walks ``objects/``."""
    from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(st))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return generate_latest(registry).decode()


class _StatusCollector:
    def __init__(self, st: dict) -> None:
        self.st = st

    def collect(self):  # type: ignore[no-untyped-def]  # noqa: C901 - one family after another
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily

        from cachehub import __version__
        from cachehub.backends import objstore_stats

        st, m = self.st, self.st["metrics"]
        sites = [s["site"] for s in st["sites"]]
        yield InfoMetricFamily("cachehub_build", "The cachehub that serves these metrics.", value={"version": __version__})
        per_site = {
            "fetched_bytes": ("cachehub_fetched_bytes", "Bytes downloaded from the lake into the site."),
            "reused_bytes": ("cachehub_reused_bytes", "Bytes of cached commits the site already held (not downloaded)."),
            "fetched_files": ("cachehub_fetched_objects", "Objects downloaded from the lake into the site."),
            "reused_files": ("cachehub_reused_objects", "Files served from content the site already held."),
            "caches": ("cachehub_caches", "Commits this daemon cached at the site."),
            "repairs": ("cachehub_repairs", "Files repaired at the site after a change was detected."),
        }
        by_site = m.get("by_site", {})
        for key, (name, help_text) in per_site.items():
            family = CounterMetricFamily(name, help_text, labels=["site"])
            for site in sites:
                family.add_metric([site], by_site.get(site, {}).get(key, 0))
            yield family
        hist = HistogramMetricFamily("cachehub_cache_duration_seconds", "How long caching one commit took at the site.", labels=["site"])
        for site, h in sorted(m.get("cache_seconds", {}).items()):
            buckets = [(("+Inf" if b == float("inf") else repr(b)), h[i]) for i, b in enumerate(DURATION_BUCKETS)]
            hist.add_metric([site], buckets, h[-2])
        yield hist
        evictions = CounterMetricFamily("cachehub_evictions", "Entries evicted from the site, by reason (expired, capacity, manual, admission, purged), as recorded in this home's audit trail.", labels=["site", "reason"])  # noqa: E501
        recorded = {(e["site"], e["reason"]): e["count"] for e in m.get("evictions_recorded", [])}
        for site in sites:
            for reason in ("expired", "capacity", "manual", "admission", "purged"):
                recorded.setdefault((site, reason), 0)
        for (site, reason), n in sorted(recorded.items()):
            evictions.add_metric([site, reason], n)
        yield evictions
        failures = CounterMetricFamily("cachehub_failures", "Failed daemon actions, by site and kind.", labels=["site", "kind"])
        for site, kinds in sorted(m["failures"].items()):
            for kind, n in sorted(kinds.items()):
                failures.add_metric([site, kind], n)
        yield failures
        last = GaugeMetricFamily("cachehub_last_success_timestamp_seconds", "When each job (sweep, refresh, each subscription) last succeeded.", labels=["job"])
        for job, when in sorted(m["last_success"].items()):
            last.add_metric([job], when)
        yield last
        ratio = GaugeMetricFamily("cachehub_hit_ratio", "Share of cached bytes that were already at the site.")
        ratio.add_metric([], m["hit_ratio"] if m["hit_ratio"] is not None else float("nan"))
        yield ratio
        gauges = [
            ("cachehub_site_up", "1 if the site's root carries its marker (0: missing, paused).", lambda s: 1 if s.get("state", "ok") == "ok" else 0),
            ("cachehub_site_used_bytes", "Bytes of content stored at the site.", lambda s: s.get("object_bytes")),
            ("cachehub_site_quota_bytes", "The site's quota (absent: none).", lambda s: s.get("quota")),
            ("cachehub_fs_free_bytes", "Free bytes on the site's filesystem.", lambda s: s.get("fs_free")),
            ("cachehub_fs_size_bytes", "Size of the site's filesystem.", lambda s: s.get("fs_total")),
            ("cachehub_cached_commits", "Commits cached at the site.", lambda s: len(s["commits"])),
            ("cachehub_partial_caches", "Interrupted caches whose objects the site keeps for a re-run.", lambda s: len(s.get("partial", ()))),
            ("cachehub_leases", "Live leases at the site.", lambda s: s.get("leases")),
            ("cachehub_pins", "Pinned entries at the site.", lambda s: s.get("pinned")),
            ("cachehub_queue_depth", "Cache requests waiting at the site.", lambda s: s.get("queue_depth")),
        ]
        for name, help_text, value in gauges:
            family = GaugeMetricFamily(name, help_text, labels=["site"])
            for s in st["sites"]:
                v = value(s)
                if v is not None:
                    family.add_metric([s["site"]], v)
            yield family
        stats = objstore_stats()
        if stats is not None:
            with stats.lock:
                latency = {op: list(h) for op, h in stats.latency.items()}
                errors = dict(stats.errors)
            lat = HistogramMetricFamily("cachehub_lake_request_duration_seconds", "Object-store requests of this process, by operation.", labels=["op"])
            for op, h in sorted(latency.items()):
                lat.add_metric([op], [(("+Inf" if b == float("inf") else repr(b)), h[i]) for i, b in enumerate(stats.BUCKETS)], h[-2])
            yield lat
            errs = CounterMetricFamily("cachehub_lake_request_errors", "Failed object-store requests, by operation and kind (timeout, denied, other).", labels=["op", "kind"])
            for (op, kind), n in sorted(errors.items()):
                errs.add_metric([op, kind], n)
            yield errs
