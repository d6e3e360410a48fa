"""The daemon's HTTP side: a route table over what the daemon reports, nothing computed here.

``serve(source, "127.0.0.1:8731")`` starts a threaded HTTP server; ``source`` is anything with
a ``status() -> dict`` (the daemon). Routes:

* ``GET /status``  the daemon, its sites, subscriptions and counters, as JSON;
* ``GET /metrics`` the same numbers in the Prometheus text format;
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
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

log = logging.getLogger("cachehub.daemon")


class Source(Protocol):
    def status(self) -> dict: ...


def status_page(source: Source) -> tuple[bytes, str]:
    return json.dumps(source.status(), default=str).encode(), "application/json"


def metrics_page(source: Source) -> tuple[bytes, str]:
    return prometheus(source.status()).encode(), "text/plain; version=0.0.4"


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
    """The daemon's status in the Prometheus text exposition format."""
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
    lines += ["# HELP cachehub_failures_total Failed daemon actions, by site and kind.", "# TYPE cachehub_failures_total counter"]
    for site, kinds in sorted(m["failures"].items()):
        for kind, n in sorted(kinds.items()):
            lines.append(f'cachehub_failures_total{{site="{site}",kind="{kind}"}} {n}')
    lines += ["# HELP cachehub_last_success_timestamp_seconds When each job last succeeded.", "# TYPE cachehub_last_success_timestamp_seconds gauge"]
    for job, when in sorted(m["last_success"].items()):
        lines.append(f'cachehub_last_success_timestamp_seconds{{job="{job}"}} {when:.3f}')
    lines += ["# HELP cachehub_site_up 1 if the site's root carries its marker (0: missing, paused).", "# TYPE cachehub_site_up gauge"]
    for s in st["sites"]:
        lines.append(f'cachehub_site_up{{site="{s["site"]}"}} {1 if s.get("state", "ok") == "ok" else 0}')
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


class Server:
    """A running HTTP server on its own thread; ``close()`` stops it."""

    def __init__(self, httpd: ThreadingHTTPServer) -> None:
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, name="cachehub-http", daemon=True).start()

    @property
    def address(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"{host}:{port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def serve(source: Source, listen: str) -> Server:
    """Serve ``ROUTES`` for ``source`` on ``listen`` (``HOST:PORT``; port 0 picks a free one)."""
    host, _, port = listen.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            page = ROUTES.get(self.path.split("?")[0])
            if page is None:
                self.send_error(404, f"try {' or '.join(ROUTES)}")
                return
            body, ctype, *code = page(source)
            self.send_response(code[0] if code else 200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: object) -> None:
            log.debug("http: " + fmt, *args)

    httpd = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
    httpd.daemon_threads = True
    return Server(httpd)
