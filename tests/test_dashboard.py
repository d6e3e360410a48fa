"""The dashboard in a real headless Chromium (Debian's chromium and chromium-driver, driven by
Selenium), against a real ``cachehub daemon`` process serving an S3 lake (SeaweedFS) and two
sites. It loads every page, follows every link, performs an authenticated "cache at site" and
sees the entry appear, and is refused an unauthenticated action. The screenshots in
docs/dashboard.md are taken here (docs/images/dashboard-*.png).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import object_store_lake, random_tree, run_cli, write_tree

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "docs" / "images"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # show the 303 itself


def _get(url: str, *, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    """(status, body) of one request, redirects not followed (a 303's body is its Location)."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, (exc.headers.get("location") or "").encode() if exc.code in (301, 302, 303) else exc.read()


@pytest.fixture
def world(tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """An S3 lake with two datasets (one derived from the other, three versions), two sites,
    one commit cached at one of them, and a daemon process serving both with a token."""
    lake = object_store_lake("seaweed", request, monkeypatch)
    env = dict(os.environ, CACHEHUB_HOME=str(tmp_path / "home"), CACHEHUB_LAKE=lake)
    for name in ("gpu-a", "gpu-b"):
        run_cli("site", "add", name, "--root", str(tmp_path / name), "--quota", "250K", "--grace", "0", env=env, check=True)
    raw = random_tree(tmp_path / "raw", 40, seed=1)
    run_cli("push", str(raw), "chest-xray", "--tag", "v1", "-m", "first scan batch", env=env, check=True)
    write_tree(raw, {"extra/new-scan.png": os.urandom(3000)})
    sorted(p for p in raw.rglob("*") if p.is_file() and "extra" not in p.parts)[0].write_bytes(b"relabelled")
    run_cli("push", str(raw), "chest-xray", "--tag", "v2", "-m", "second batch, one relabel", env=env, check=True)
    feats = random_tree(tmp_path / "feats", 10, seed=2)
    run_cli("push", str(feats), "xray-features", "--tag", "v1", "-m", "features of v2", "--derived-from", "chest-xray@v2", env=env, check=True)
    run_cli("cache", "chest-xray@v1", "--site", "gpu-a", env=env, check=True)
    run_cli("pin", "chest-xray@v1", "--site", "gpu-a", env=env, check=True)
    run_cli("cache", "xray-features@v1", "--site", "gpu-a", env=env, check=True)
    run_cli("evict", "xray-features@v1", "--site", "gpu-a", env=env, check=True)  # a recent eviction to show
    run_cli("run", "--use", "chest-xray@v1", "--site", "gpu-a", "--", sys.executable, "-c", "print('train')", env=env, check=True)
    token = secrets.token_hex(24)
    (tmp_path / "token").write_text(token + "\n")
    log = open(tmp_path / "daemon.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachehub.cli.main", "daemon", "--site", "gpu-a", "--site", "gpu-b", "--listen", "127.0.0.1:0",
         "--token-file", str(tmp_path / "token"), "--refresh", "2s", "--sweep", "2s"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    address = None
    while address is None:
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
        found = re.search(r"http (127\.0\.0\.1:\d+)", (tmp_path / "daemon.log").read_text())
        address = found.group(1) if found else None
        time.sleep(0.1)
    yield {"env": env, "base": f"http://{address}", "token": token, "log": tmp_path / "daemon.log", "tmp": tmp_path}
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium'}",
                 "--window-size=1300,900"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _shot(driver: object, name: str) -> None:
    """A full-height screenshot for docs/dashboard.md."""
    height = driver.execute_script("return Math.min(document.body.scrollHeight + 20, 2400)")  # type: ignore[attr-defined]
    driver.set_window_size(1300, max(600, height))  # type: ignore[attr-defined]
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"dashboard-{name}.png"))  # type: ignore[attr-defined]
    driver.set_window_size(1300, 900)  # type: ignore[attr-defined]


def test_every_page_and_link_in_chromium(world: dict, browser: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, driver = world["base"], browser
    seen: dict[str, str] = {}
    todo = ["/"]
    while todo and len(seen) < 80:
        path = todo.pop(0)
        if path in seen:
            continue
        driver.get(base + path)  # type: ignore[attr-defined]
        title = driver.title  # type: ignore[attr-defined]
        heading = driver.find_element(By.TAG_NAME, "h1").text  # type: ignore[attr-defined]
        assert "Cannot show this page" not in heading, (path, driver.find_element(By.TAG_NAME, "main").text)  # type: ignore[attr-defined]
        seen[path] = title
        twin = driver.find_element(By.ID, "json-twin").get_attribute("href")  # type: ignore[attr-defined]
        status, body = _get(twin)
        assert status == 200 and isinstance(json.loads(body), dict), (path, twin, status)
        for link in driver.find_elements(By.CSS_SELECTOR, "a[href]"):  # type: ignore[attr-defined]
            href = link.get_attribute("href")
            if href and href.startswith(base) and "/api/" not in href and "/static/" not in href and "/login" not in href:
                target = href[len(base):].split("#")[0] or "/"
                if target not in seen and target not in todo:
                    todo.append(target)
    kinds = {re.sub(r"/[^/]+", "/x", p) for p in seen}
    assert {"/", "/x", "/x/x", "/x/x/x"} <= kinds, seen  # datasets, sites/runs/audit, a dataset, a commit and lineage
    for page in ("/", "/sites", "/runs", "/audit", "/datasets/chest-xray", "/datasets/xray-features", "/datasets/chest-xray/v2",
                 "/lineage/xray-features/", "/lineage/chest-xray/", "/runs/"):  # fmt: skip
        assert any(p == page or page.endswith("/") and p.startswith(page) for p in seen), (page, sorted(seen))

    driver.get(base + "/datasets/chest-xray/v2")  # type: ignore[attr-defined]
    assert "1 added" in driver.page_source and "1 modified" in driver.page_source  # type: ignore[attr-defined]
    driver.get(base + "/lineage/xray-features/v1")  # type: ignore[attr-defined]
    nodes = driver.find_elements(By.CSS_SELECTOR, "svg#lineage g.node")  # type: ignore[attr-defined]
    assert len(nodes) >= 3  # the features, the raw v2 it came from, and v2's parent
    WebDriverWait(driver, 30).until(lambda d: d.get(base + "/audit?action=pin") or "verifies" in d.find_element(By.ID, "chain").text)
    rows = driver.find_elements(By.CSS_SELECTOR, "table#audit tbody tr")  # type: ignore[attr-defined]
    assert len(rows) == 1 and "pin" in rows[0].text
    assert "Every hash chain verifies" in driver.find_element(By.ID, "chain").text  # type: ignore[attr-defined]

    for name, path in (("datasets", "/"), ("history", "/datasets/chest-xray"), ("commit", "/datasets/chest-xray/v2"),
                       ("lineage", "/lineage/xray-features/v1"), ("sites", "/sites"), ("runs", "/runs"), ("audit", "/audit")):  # fmt: skip
        driver.get(base + path)  # type: ignore[attr-defined]
        _shot(driver, name)


def test_cache_at_a_site_from_the_browser_and_refusals(world: dict, browser: object) -> None:
    from selenium.webdriver.common.by import By

    from selenium.webdriver.support.ui import WebDriverWait

    base, driver, token = world["base"], browser, world["token"]
    wait = WebDriverWait(driver, 30)
    # unauthenticated actions are refused, whatever the client
    assert _get(base + "/api/cache", data=b'{"ref": "chest-xray@v2", "site": "gpu-b"}', headers={"Content-Type": "application/json"})[0] == 401
    wrong = {"Content-Type": "application/json", "Authorization": "Bearer " + "0" * 48}
    assert _get(base + "/api/pin", data=b'{"ref": "chest-xray@v2", "site": "gpu-b"}', headers=wrong)[0] == 401
    driver.get(base + "/datasets/chest-xray/v2")  # type: ignore[attr-defined]
    assert not driver.find_elements(By.CSS_SELECTOR, "button.cache-at")  # type: ignore[attr-defined]  # no actions before logging in

    driver.find_element(By.LINK_TEXT, "Log in").click()  # type: ignore[attr-defined]
    driver.find_element(By.ID, "token").send_keys("not the token")  # type: ignore[attr-defined]
    driver.find_element(By.ID, "login").click()  # type: ignore[attr-defined]
    wait.until(lambda d: "wrong token" in d.page_source)
    driver.find_element(By.ID, "token").send_keys(token)  # type: ignore[attr-defined]
    driver.find_element(By.ID, "login").click()  # type: ignore[attr-defined]
    wait.until(lambda d: d.current_url.endswith("/datasets/chest-xray/v2"))
    row = driver.find_element(By.CSS_SELECTOR, 'table#cached tr[data-site="gpu-b"]')  # type: ignore[attr-defined]
    assert "absent" in row.text
    row.find_element(By.CSS_SELECTOR, "button.cache-at").click()
    wait.until(lambda d: d.find_elements(By.ID, "done"))
    assert "asked gpu-b to cache" in driver.find_element(By.ID, "done").text  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60
    while True:  # the daemon serves the queue: the entry appears
        driver.get(base + "/datasets/chest-xray/v2")  # type: ignore[attr-defined]
        state = driver.find_element(By.CSS_SELECTOR, 'table#cached tr[data-site="gpu-b"] td.state').text  # type: ignore[attr-defined]
        if state.startswith("complete"):
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    _shot(driver, "commit-cached")
    # the browser's session cookie alone (no CSRF token) is not enough for an action
    cookie = driver.get_cookie("cachehub_session")["value"]  # type: ignore[attr-defined]
    forged = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": f"cachehub_session={cookie}"}
    status, location = _get(base + "/api/pin", data=b"ref=chest-xray%40v2&site=gpu-b", headers=forged)
    assert status == 303 and b"CSRF" in location  # back to the page, with the refusal...
    assert json.loads(_get(base + "/api/datasets/chest-xray/v2")[1])["cached"][1]["pinned"] is False  # ...with nothing done
    # the API with the bearer token
    ok = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    status, body = _get(base + "/api/pin", data=b'{"ref": "chest-xray@v2", "site": "gpu-b"}', headers=ok)
    assert status == 200 and json.loads(body)["changed"] is True
    driver.get(base + "/datasets/chest-xray")  # type: ignore[attr-defined]
    driver.find_element(By.CSS_SELECTOR, "form#subscribe button").click()  # type: ignore[attr-defined]  # keep chest-xray@latest at gpu-a
    wait.until(lambda d: d.find_elements(By.ID, "done"))
    assert "chest-xray@latest" in driver.find_element(By.CSS_SELECTOR, "table#subscriptions").text  # type: ignore[attr-defined]
    status, body = _get(base + "/api/cache", data=b'{"ref": "chest-xray@nope", "site": "gpu-b"}', headers=ok)
    assert status == 404 and json.loads(body)["exit_code"] == 5
    assert token not in world["log"].read_text()  # the token never reaches the log
    # a refused form goes back to this server only, whatever the Referer says
    status, location = _get(base + "/api/pin", data=b"ref=x", headers={"Content-Type": "application/x-www-form-urlencoded",
                                                                       "Referer": "https://evil.example//evil.example/x"})  # fmt: skip
    assert status == 303 and location.startswith(b"/?error=")
    # a loopback dashboard answers loopback host names only (no DNS rebinding)
    assert _get(base + "/", headers={"Host": "evil.example:8731"})[0] == 400
    assert _get(base + "/api/runs/no-such-run")[0] == 404


def test_a_public_address_needs_a_token(local_env: dict[str, str], tmp_path: Path) -> None:
    """Refused before the socket opens (nothing is bound: the test never listens off loopback)."""
    r = run_cli("ui", "--listen", "0.0.0.0:0", "--no-refresh", env=local_env)
    assert r.returncode == 13 and "without a token" in r.stderr and "--token-file" in r.stderr
    (tmp_path / "short").write_text("abc\n")
    r = run_cli("ui", "--token-file", str(tmp_path / "short"), "--no-refresh", env=local_env)
    assert r.returncode == 13 and "shorter than 16 characters" in r.stderr


def test_the_audit_page_checks_new_events_at_once_and_old_ones_in_full_checks(local_env: dict[str, str]) -> None:
    """The audit page does not re-hash the whole trail on each load: events added since the last
    check are checked as they come, and an edit to an old event is caught by the next full check."""
    from cachehub import views
    from cachehub.context import Context

    with Context() as ctx:
        for i in range(5):
            ctx.catalog.audit("resolve", dataset="ds", ref=f"v{i}")
        assert views.audit(ctx)["chain_ok"] is None  # before the first full check: said so, not guessed
        assert views.chain_state(ctx, full=True)["ok"]
        assert views.audit(ctx)["chain_ok"]
        ctx.catalog.conn.execute("UPDATE audit SET user = 'mallory' WHERE seq = 2")  # an old event edited
        assert views.audit(ctx)["chain_ok"]  # not seen until the next full check...
        ctx.catalog.audit("resolve", dataset="ds", ref="v5")
        ctx.catalog.conn.execute("UPDATE audit SET details = '{\"x\": 1}' WHERE seq = (SELECT max(seq) FROM audit)")
        found = views.audit(ctx)  # ...but a new event that does not hash right is caught at once
        assert not found["chain_ok"] and "was changed after it was written" in found["chain_problems"][0]
        full = views.chain_state(ctx, full=True)  # what the server's thread does every 5 minutes
        assert len(full["problems"]) == 2 and any(":2 " in p for p in full["problems"])
        assert views.audit(ctx)["chain_problems"] == full["problems"]


def test_who_may_read_without_the_token() -> None:
    """Stand-in request objects (no network): a page needs no token only for a client on this
    machine, to a loopback-bound server; a forwarded client (X-Forwarded-For, rewritten into
    request.client by uvicorn) is remote like any other."""
    from types import SimpleNamespace

    from cachehub.web import Auth

    def request(client: str, **headers: str) -> object:
        return SimpleNamespace(client=SimpleNamespace(host=client), headers={k.lower(): v for k, v in headers.items()}, cookies={})

    token = "t" * 32
    on_loopback, public = Auth(token, loopback=True), Auth(token, loopback=False)
    assert on_loopback.may_read(request("127.0.0.1")) and on_loopback.may_read(request("::1"))
    assert not on_loopback.may_read(request("10.1.2.3"))  # through a local proxy
    assert not public.may_read(request("127.0.0.1"))
    assert public.may_read(request("10.1.2.3", Authorization=f"Bearer {token}"))
    assert not public.may_read(request("10.1.2.3", Authorization="Bearer " + "x" * 32))


def test_a_commit_page_without_the_lake_still_shows_where_it_is_cached(local_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cachehub import views
    from cachehub.context import Context

    src = write_tree(tmp_path / "src", {"a": "1", "b": "2"})
    run_cli("push", str(src), "ds", "--tag", "v1", env=local_env, check=True)
    write_tree(src, {"a": "changed"})
    run_cli("push", str(src), "ds", "--tag", "v2", env=local_env, check=True)
    run_cli("cache", "ds@v2", env=local_env, check=True)
    monkeypatch.setenv("CACHEHUB_OFFLINE", "1")
    with Context() as ctx:
        page = views.commit(ctx, "ds@v2")
    assert "CACHEHUB_OFFLINE" in page["diff_error"] and page["diff"] is None
    assert [s["state"] for s in page["cached"]] == ["complete"]
    monkeypatch.delenv("CACHEHUB_OFFLINE")
    with Context() as ctx:
        page = views.commit(ctx, "ds@v2")
        assert page["diff"] == {"added": 0, "removed": 0, "modified": 1} and page["diff_files"][0]["path"] == "a"
        commit = ctx.catalog.commit(page["commit"])
        assert ctx.catalog.diff_listed(commit.id, commit.parents[0])
