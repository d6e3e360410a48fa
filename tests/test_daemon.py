"""The background service: subscriptions, the queue, repair, sweeps, HTTP, SIGTERM and restart."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import cachehub

from cachehub.api import Hub
from cachehub.config import load_settings
from cachehub.daemon import Daemon
from cachehub.store import SiteStore

from .conftest import random_tree, run_cli, tree_digest, write_tree

DAY = 86400.0


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics page, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def wait_until(check: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def daemon_factory(env: dict[str, str]) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(**kw: object) -> Daemon:
        options = {"listen": "127.0.0.1:0", "sweep_every": 0.5, "refresh_every": 0.5, "queue_every": 0.2}
        options.update(kw)
        d = Daemon(load_settings(), **options)  # type: ignore[arg-type]
        d.start()
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


def test_subscription_prefetches_each_new_commit_as_a_delta(hub: Hub, tmp_path: Path, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    src = random_tree(tmp_path / "src", 30)
    v1 = hub.push(src, "ds").commit
    hub.subscribe("ds@latest", every="1s")
    daemon_factory()
    store = SiteStore(hub.settings.site())
    wait_until(lambda: store.is_cached(v1), what="v1 cached by the subscription")
    (src / "new.bin").write_bytes(b"fresh data")
    # another site pushes v2 through its own catalog: the daemon sees it via the lake
    other = Hub(load_settings(tmp_path / "other-home"))
    v2 = other.push(src, "ds").commit
    other.close()
    wait_until(lambda: store.is_cached(v2), what="v2 prefetched")
    events = [e for e in hub.catalog.audit_events(action="subscription-cache")]
    by_commit = {e["commit"]: e for e in events}
    assert by_commit[v2]["details"]["fetched_bytes"] == len(b"fresh data")
    assert tree_digest(store.commit_path(v2)) == tree_digest(src)


def test_queue_serves_many_requests_with_one_download(hub: Hub, tmp_path: Path, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    commit = hub.push(random_tree(tmp_path / "src", 40), "ds").commit
    hub.cache_async("ds")
    hub.cache_async("ds")
    store = SiteStore(hub.settings.site())
    assert len(list((store.root / "queue").glob("*.json"))) == 2
    daemon_factory()
    wait_until(lambda: store.is_cached(commit) and not list((store.root / "queue").glob("*.json")), what="queue served")
    served = [e for e in hub.catalog.audit_events(action="queue-served")]
    assert len(served) == 1 and served[0]["details"]["requests"] == 2
    assert len([e for e in hub.catalog.audit_events(action="cache") if e["commit"] == commit]) == 1


def test_resolve_fetch_from_a_compute_node_goes_through_the_daemon(hub: Hub, tmp_path: Path, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    commit = hub.push(random_tree(tmp_path / "src", 10), "ds").commit
    daemon_factory()
    path = hub.resolve(f"ds@{commit}", fetch=True)
    assert path == SiteStore(hub.settings.site()).commit_path(commit) and path.exists()
    # the daemon audits right after publishing; the waiter may return first
    wait_until(lambda: [e["commit"] for e in hub.catalog.audit_events(action="queue-served")] == [commit], what="queue-served audited")


def test_a_changed_file_is_detected_and_repaired(hub: Hub, tmp_path: Path, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    src = write_tree(tmp_path / "src", {"a.txt": "original a", "b/c.txt": "original c"})
    hub.push(src, "ds")
    path = Path(hub.cache("ds").path)
    d = daemon_factory()
    time.sleep(0.5)  # the watch is in place
    os.chmod(path / "a.txt", 0o644)
    (path / "a.txt").write_text("scribbled over")
    wait_until(lambda: (path / "a.txt").read_text() == "original a", what="repair of a.txt")
    os.chmod(path / "b", 0o755)
    (path / "b/c.txt").unlink()
    os.chmod(path / "b", 0o555)
    wait_until(lambda: (path / "b/c.txt").exists() and (path / "b/c.txt").read_text() == "original c", what="repair of b/c.txt")
    wait_until(lambda: d.metrics.repairs >= 2, what="repairs counted")
    assert hub.verify("ds").ok


def test_http_status_and_metrics(hub: Hub, tmp_path: Path, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    hub.push(random_tree(tmp_path / "src", 5), "ds")
    hub.cache("ds")
    d = daemon_factory()
    host, port = d.address.split(":")  # type: ignore[union-attr]
    assert host == "127.0.0.1"
    status = json.loads(urllib.request.urlopen(f"http://{d.address}/status", timeout=5).read())
    assert status["daemon"]["listen"] == d.address
    [site] = status["sites"]
    assert site["site"] == "local" and len(site["commits"]) == 1 and site["queue_depth"] == 0
    metrics = samples(urllib.request.urlopen(f"http://{d.address}/metrics", timeout=5).read().decode())
    assert metrics[("cachehub_evictions_total", (("reason", "expired"), ("site", "local")))] == 0
    assert metrics[("cachehub_queue_depth", (("site", "local"),))] == 0
    assert metrics[("cachehub_cached_commits", (("site", "local"),))] == 1
    assert metrics[("cachehub_leases", (("site", "local"),))] == 0
    assert metrics[("cachehub_pins", (("site", "local"),))] == 0
    assert metrics[("cachehub_partial_caches", (("site", "local"),))] == 0
    assert metrics[("cachehub_fetched_bytes_total", (("site", "local"),))] == 0  # cached before the daemon started
    assert metrics[("cachehub_site_used_bytes", (("site", "local"),))] > 0
    assert ("cachehub_build_info", (("version", cachehub.__version__),)) in metrics
    assert any(name == "process_resident_memory_bytes" for name, _ in metrics)
    if hub.settings.lake_url.startswith("s3://"):  # this process's object-store requests, by operation
        assert metrics[("cachehub_lake_request_duration_seconds_count", (("op", "get"),))] > 0
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://{d.address}/nope", timeout=5)
    assert urllib.request.urlopen(f"http://{d.address}/healthz", timeout=5).read() == b"ok\n"
    assert urllib.request.urlopen(f"http://{d.address}/readyz", timeout=5).status == 200
    # cachehub status shows the daemon
    out = run_cli("status", env=dict(os.environ), check=True).stdout
    assert f"http {d.address}" in out


def test_sweeps_evict_expired_entries_with_an_injected_clock(hub: Hub, tmp_path: Path, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    for i in range(3):
        hub.push(write_tree(tmp_path / f"s{i}", {"x": str(i)}), f"ds{i}")
        hub.cache(f"ds{i}")
    hub.pin("ds0")
    d = daemon_factory(clock=lambda: time.time() + 2 * DAY)
    store = SiteStore(hub.settings.site())
    wait_until(lambda: len(list(store.cached())) == 1, what="expired entries evicted")
    assert [c.dataset for c in store.cached()] == ["ds0"]  # pinned
    wait_until(lambda: d.metrics.evictions["expired"] == 2, what="evictions counted")
    reasons = [e["details"]["reason"] for e in hub.catalog.audit_events(action="evict")]
    assert reasons == ["expired", "expired"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_stops_cleanly_and_a_restart_resumes_queued_work(hub: Hub, tmp_path: Path, env: dict[str, str]) -> None:
    commit = hub.push(random_tree(tmp_path / "src", 20), "ds").commit
    store = SiteStore(hub.settings.site())
    store.ensure()
    listen = f"127.0.0.1:{_free_port()}"
    cmd = [sys.executable, "-m", "cachehub.cli.main", "daemon", "--listen", listen, "--sweep", "1h", "--refresh", "1h"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (store.root / "daemon.json").exists(), what="daemon announced")
        wait_until(lambda: _get(f"http://{listen}/status"), what="http up")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not (store.root / "daemon.json").exists()  # withdrawn: nodes stop queueing
        hub.cache_async("ds")  # queued while no daemon runs
        assert not store.is_cached(commit)
        log = open(tmp_path / "daemon2.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: store.is_cached(commit), what="queued request served after restart")
        except AssertionError:
            raise AssertionError((tmp_path / "daemon2.log").read_text()[-3000:]) from None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    actions = [e["action"] for e in hub.catalog.audit_events()]
    assert actions.count("daemon-start") == 2 and actions.count("daemon-stop") == 2


def _get(url: str) -> bytes | None:
    try:
        return urllib.request.urlopen(url, timeout=2).read()
    except OSError:
        return None


def test_a_purge_on_another_host_reaches_this_hosts_sites(hub: Hub, tmp_path: Path, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    commit = hub.push(write_tree(tmp_path / "src", {"pii.csv": "alice,555-0100"}), "ds").commit
    hub.cache("ds")
    store = SiteStore(hub.settings.site())
    d = daemon_factory()
    with Hub(load_settings(tmp_path / "elsewhere")) as other:  # same lake, its own catalog and sites
        result = other.purge(f"ds@{commit}", reason="erasure request")
        assert result.sites_evicted == ()  # this host's site is not configured over there
    wait_until(lambda: not store.is_cached(commit), what="purged commit evicted by the daemon")
    wait_until(lambda: not any(p.is_file() for p in (store.root / "objects").rglob("*")), what="purged content collected")
    wait_until(lambda: d.metrics.evictions["purged"] == 1, what="purge counted")


def test_a_failing_subscription_backs_off_and_is_counted(hub: Hub, tmp_path: Path, env: dict[str, str], caplog) -> None:  # type: ignore[no-untyped-def]
    """A subscription whose commit can never fit is tried after 1x, 2x, 4x its interval, not every
    time the job runs. The jobs are called directly with an injected clock: no sleeping."""
    import logging

    from cachehub import server

    hub.push(write_tree(tmp_path / "src", {"big.bin": b"x" * 5000}), "ds")
    hub.site_set("local", quota="1K")  # the commit can never fit
    hub.subscribe("ds@latest", every="10s")
    caplog.set_level(logging.INFO, logger="cachehub.daemon")
    now = [1000.0]
    d = Daemon(load_settings(), listen=None, watch=False, monotonic=lambda: now[0])
    tries = []
    for t in (0, 5, 10, 15, 29, 30, 60, 69, 70):  # due: 0, +10 -> 10, +20 -> 30, +40 -> 70
        now[0] = 1000.0 + t
        d.subscriptions_tick()
        tries.append(d.metrics.failures[("local", "subscription")])
    assert tries == [1, 1, 2, 2, 2, 3, 3, 3, 4]
    status = d.status()
    assert status["metrics"]["failures"]["local"]["subscription"] == 4
    assert status["subscriptions"][0]["failures_in_a_row"] == 4
    metrics = samples(server.prometheus(status))
    assert metrics[("cachehub_failures_total", (("kind", "subscription"), ("site", "local")))] == 4
    assert metrics[("cachehub_site_up", (("site", "local"),))] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "subscription ds@latest" in r.getMessage()]
    assert len(warnings) == 4 and "next try in 80 s" in warnings[-1]


def test_a_missing_root_pauses_its_site(hub: Hub, tmp_path: Path, env: dict[str, str], caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    from cachehub import server

    root = tmp_path / "nfs" / "cachehub"
    hub.site_add("nfs", root)
    hub.push(write_tree(tmp_path / "src", {"a": "1"}), "ds")
    hub.cache("ds", site="nfs")
    caplog.set_level(logging.INFO, logger="cachehub.daemon")
    d = Daemon(load_settings(), sites=["nfs"], listen=None, watch=False)
    d.sweep()
    shutil.rmtree(root)  # the export is unmounted
    for _ in range(3):
        d.sweep()
        d.serve_queue()
    assert not root.exists()  # never recreated
    assert d.metrics.failures[("nfs", "root-missing")] == 1
    assert len([r for r in caplog.records if "paused until it is back" in r.getMessage()]) == 1
    status = d.status()
    assert [s["state"] for s in status["sites"]] == ["missing"]
    assert samples(server.prometheus(status))[("cachehub_site_up", (("site", "nfs"),))] == 0
    # the probes a Kubernetes Deployment uses (deploy/kubernetes): alive, but not ready
    assert server.ROUTES["/healthz"](d)[:2] == (b"ok\n", "text/plain")
    body, _, code = server.ROUTES["/readyz"](d)
    assert code == 503 and b"nfs: missing" in body
    from cachehub.store import SiteStore

    root.mkdir(parents=True)
    SiteStore(load_settings().site("nfs")).create()  # the export is back (laid out again: the test's "mount")
    assert server.ROUTES["/readyz"](d)[2] == 200
