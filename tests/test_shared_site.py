"""One site, many hosts: several homes on one site root, each a host of its own.

Each host is a home directory and its own processes; as root, each command runs in its own UTS
namespace with its own hostname (``unshare --uts``), so leases, locks and partial caches carry
different hosts exactly as on a cluster. Races are made deterministic with pause points
(``cachehub/pause.py``): one process waits at a named point until the test lets it go.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachehub.errors import ConflictError
from cachehub.model import Site
from cachehub.store import SiteStore

from .conftest import random_tree, tree_digest

CAN_UNSHARE = os.geteuid() == 0 and shutil.which("unshare") is not None


class Host:
    """A machine sharing the lake and the site root: its own home, hostname and processes."""

    def __init__(self, name: str, tmp: Path, lake: Path) -> None:
        self.name = name
        self.home = tmp / f"home-{name}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEHUB_")}
        self.env.update(CACHEHUB_HOME=str(self.home), CACHEHUB_LAKE=str(lake), CACHEHUB_SITE="team")

    def argv(self, *args: str) -> list[str]:
        cli = [sys.executable, "-m", "cachehub.cli.main", *args]
        if CAN_UNSHARE:
            return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', self.name, *cli]
        return cli  # not root: same hostname, still separate homes and processes

    def run(self, *args: str, ok: bool = True, pause: tuple[str, Path] | None = None, **env: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.argv(*args), env=self._env(pause, env), capture_output=True, text=True, timeout=300)
        if ok and result.returncode != 0:
            raise AssertionError(f"{self.name}: cachehub {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def json(self, *args: str, **env: str) -> object:
        return json.loads(self.run(*args, "--json", **env).stdout)

    def start(self, *args: str, pause: tuple[str, Path]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(self.argv(*args), env=self._env(pause, {}), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        point, directory = pause
        _wait_for(lambda: (directory / f"{point}.reached").exists() or proc.poll() is not None, f"{self.name} at {point}")
        assert proc.poll() is None, proc.communicate()
        return proc

    def start_free(self, *args: str) -> subprocess.Popen[str]:
        """Start a command and return at once (no pause point)."""
        return subprocess.Popen(self.argv(*args), env=self._env(None, {}), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def _env(self, pause: tuple[str, Path] | None, extra: dict[str, str]) -> dict[str, str]:
        env = {**self.env, **extra}
        if pause is not None:
            env["CACHEHUB_PAUSE"] = f"{pause[0]}@{pause[1]}"
        return env


def _wait_for(condition, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _go(proc: subprocess.Popen[str], point: str, directory: Path) -> tuple[int, str, str]:
    (directory / f"{point}.go").touch()
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


@pytest.fixture
def site_root(tmp_path: Path) -> Path:
    return tmp_path / "nfs" / "cachehub"


@pytest.fixture
def hosts(tmp_path: Path, site_root: Path) -> tuple[Host, Host]:
    """Two hosts on one lake and one site root: host-a laid the site out, host-b joined it."""
    lake = tmp_path / "lake"
    a, b = Host("host-a", tmp_path, lake), Host("host-b", tmp_path, lake)
    a.run("site", "add", "team", "--root", str(site_root))
    b.run("site", "add", "team", "--root", str(site_root))
    return a, b


@pytest.fixture
def handshake(tmp_path: Path) -> Path:
    path = tmp_path / "handshake"
    path.mkdir()
    return path


def _objects(root: Path) -> int:
    return sum(1 for p in (root / "objects").rglob("*") if p.is_file())


# -- policy ----------------------------------------------------------------------------------
def test_the_policy_lives_in_the_root_and_every_host_applies_it(hosts: tuple[Host, Host], tmp_path: Path, site_root: Path) -> None:
    a, b = hosts
    for i in range(3):
        a.run("push", str(random_tree(tmp_path / f"src{i}", 3, seed=i)), f"ds{i}")
        a.run("cache", f"ds{i}")
    assert a.json("evict", "--dry-run")["evict"] == []  # fresh under the default policy, on both hosts
    assert b.json("evict", "--dry-run")["evict"] == []
    a.run("site", "set", "team", "--ttl", "1s", "--grace", "0")
    [seen] = [s for s in b.json("site", "list") if s["name"] == "team"]
    assert (seen["ttl"], seen["grace"]) == (1, 0)  # changed on host-a, applied on host-b
    assert "ttl" not in (b.home / "config.toml").read_text()  # a home maps the name to the root, nothing more
    time.sleep(1.1)  # entries must be idle longer than the 1 s TTL set above
    assert len(b.json("evict", "--dry-run")["evict"]) == 3
    versions = sorted(p.name for p in (site_root / "policy").iterdir())
    assert versions == ["00000001.json", "00000002.json"]
    audit = [e for e in a.json("audit") if e["action"] == "site-set"]
    assert audit and audit[-1]["details"]["policy_version"] == 2


def test_policy_changes_are_compare_and_swap(site_root: Path) -> None:
    store = SiteStore(Site("team", str(site_root)))
    store.create()
    seen = store.read_policy()["version"]  # type: ignore[index]
    other = SiteStore(Site("team", str(site_root)))
    other.update_policy(Site("team", str(site_root), ttl=60), expect=seen, by="bob")  # another host wins
    with pytest.raises(ConflictError, match="changed meanwhile"):
        store.update_policy(Site("team", str(site_root), ttl=7200), expect=seen, by="ann")
    assert SiteStore(Site("team", str(site_root))).site.ttl == 60


def test_a_site_from_an_older_version_migrates_on_first_use(tmp_path: Path, site_root: Path) -> None:
    host = Host("host-a", tmp_path, tmp_path / "lake")
    host.run("site", "add", "team", "--root", str(site_root))
    shutil.rmtree(site_root / "policy")  # as an older cachehub laid it out
    config = host.home / "config.toml"
    config.write_text(config.read_text().replace(f'root = "{site_root}"', f'root = "{site_root}"\nttl = "12h"\nquota = "2G"'))
    [site] = [s for s in host.json("site", "list") if s["name"] == "team"]
    assert (site["ttl"], site["quota"]) == (12 * 3600, 2 * 1024**3)
    body = json.loads((site_root / "policy" / "00000001.json").read_text())
    assert (body["ttl"], body["quota"], body["changed_by"]) == (12 * 3600, 2 * 1024**3, "migration")


# -- the root guard --------------------------------------------------------------------------
def test_a_vanished_root_is_an_error_and_never_recreated(hosts: tuple[Host, Host], tmp_path: Path, site_root: Path) -> None:
    a, b = hosts
    a.run("push", str(random_tree(tmp_path / "src", 4)), "ds")
    shutil.rmtree(site_root)  # what an unmounted export looks like
    for args in (("cache", "ds"), ("path", "ds"), ("evict",), ("gc",), ("pin", "ds"), ("verify", "ds"), ("cache", "ds", "--async")):
        result = b.run(*args, ok=False)
        assert result.returncode == 17, (args, result.stderr)
        assert "has no cachehub-site.json" in result.stderr and "not mounted" in result.stderr and "--create" in result.stderr
        assert not site_root.exists(), args
    [status] = b.json("status", "--site", "team")
    assert status["state"] == "missing" and status["commits"] == []
    b.run("site", "set", "team", "--root", str(site_root), "--create")
    assert json.loads(b.run("cache", "ds", "--json").stdout)["fetched_files"] == 4


# -- gc and eviction beside a build on another host ------------------------------------------
def test_gc_on_one_host_while_another_caches_keeps_the_build(hosts: tuple[Host, Host], tmp_path: Path, site_root: Path, handshake: Path) -> None:
    """The gc indexes the site, pauses; the other host caches a commit to the end; the gc goes on."""
    a, b = hosts
    src = random_tree(tmp_path / "src", 20)
    a.run("push", str(src), "ds")
    gc = b.start("gc", pause=("gc.after-index", handshake))
    result = json.loads(a.run("cache", "ds", "--json").stdout)
    code, _out, err = _go(gc, "gc.after-index", handshake)
    assert code == 0, err
    assert tree_digest(Path(result["path"])) == tree_digest(src)
    assert list((site_root / "manifests").rglob("*.tsv.gz"))  # the build's manifest copy is still there
    for args in (("gc",), ("evict", "--dry-run"), ("evict", "--expired"), ("verify", "ds")):
        b.run(*args)
    assert a.json("verify", "ds")["ok"]


def test_a_build_holding_its_lock_survives_an_eviction_and_gc(hosts: tuple[Host, Host], tmp_path: Path, site_root: Path, handshake: Path) -> None:
    """Host-a's build holds its lock and will reuse "old"'s content; host-b evicts "old" and collects."""
    a, b = hosts
    a.run("site", "set", "team", "--grace", "0")
    src = random_tree(tmp_path / "src", 20)
    a.run("push", str(src), "old")
    a.run("push", str(src), "new")
    a.run("cache", "old")
    for obj in (site_root / "objects").rglob("*"):
        if obj.is_file():
            os.utime(obj, (0, 0))  # old content: once "old" goes, only the build's lock protects it
    build = a.start("cache", "new", "--json", pause=("cache.after-lock", handshake))
    b.run("evict", "old")
    b.run("gc")
    code, out, err = _go(build, "cache.after-lock", handshake)
    assert code == 0, err
    result = json.loads(out)
    assert (result["fetched_files"], result["reused_files"]) == (0, 20)
    assert tree_digest(Path(result["path"])) == tree_digest(src)
    assert b.json("verify", "new")["ok"]


def test_a_lost_manifest_copy_is_fetched_again_or_reported(hosts: tuple[Host, Host], tmp_path: Path, site_root: Path) -> None:
    a, b = hosts
    a.run("push", str(random_tree(tmp_path / "src", 6)), "ds")
    a.run("cache", "ds")
    [copy] = list((site_root / "manifests").rglob("*.tsv.gz"))
    copy.unlink()
    before = _objects(site_root)
    lake = tmp_path / "lake"
    lake.rename(tmp_path / "lake-away")  # the lake cannot be read now
    offline = b.run("gc")
    assert "removed nothing" in offline.stderr and _objects(site_root) == before
    assert b.run("evict", "--dry-run").returncode == 0
    (tmp_path / "lake-away").rename(lake)
    b.run("gc")  # the lake is back: the copy is fetched again, verified
    assert copy.exists() and _objects(site_root) == before
    assert b.json("verify", "ds")["ok"]


# -- interrupted caches ----------------------------------------------------------------------
def test_an_interrupted_cache_is_kept_for_a_rerun_and_expires_by_policy(hosts: tuple[Host, Host], tmp_path: Path, site_root: Path, handshake: Path) -> None:
    a, b = hosts
    src = random_tree(tmp_path / "src", 30)
    a.run("push", str(src), "ds")
    proc = a.start("cache", "ds", pause=("cache.before-publish", handshake))  # everything fetched, not published
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "cachehub: interrupted; re-run to resume"
    fetched = _objects(site_root)
    assert fetched == 30 and not any((site_root / "staging").iterdir())
    [status] = b.json("status", "--site", "team")
    [partial] = status["partial"]
    assert partial["dataset"] == "ds" and not partial["running"] and partial["expires"]
    b.run("gc")
    b.run("evict")  # the daemon's sweep does the same
    assert _objects(site_root) == fetched  # kept for the re-run
    again = json.loads(a.run("cache", "ds", "--json").stdout)
    assert again["fetched_files"] == 0 and tree_digest(Path(again["path"])) == tree_digest(src)
    assert b.json("status", "--site", "team")[0]["partial"] == []
    # an interrupted cache past the site's keep_partial period goes, audited
    a.run("push", str(random_tree(tmp_path / "src2", 5, seed=9)), "other")
    again_dir = handshake / "again"
    again_dir.mkdir()
    proc = a.start("cache", "other", pause=("cache.before-publish", again_dir))
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    a.run("site", "set", "team", "--keep-partial", "0")
    b.run("evict")
    assert _objects(site_root) == fetched and b.json("status", "--site", "team")[0]["partial"] == []
    assert [e["dataset"] for e in b.json("audit", "--action", "partial-expired")] == ["other"]


# -- Unix users ------------------------------------------------------------------------------
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to run commands as other users")
UIDS = {"ann": 2101, "bob": 2102, "eve": 2103, "dan": 2104}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Path]:
    """A directory other users can reach (pytest's tmp_path is root's, mode 0700), with a home each."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="cachehub-users-", dir="/tmp"))
    os.chmod(base, 0o755)
    for name, uid in UIDS.items():
        (base / f"home-{name}").mkdir()
        os.chown(base / f"home-{name}", uid, uid)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def as_user(base: Path, name: str, *args: str, groups: tuple[int, ...] = (), ok: bool = True) -> subprocess.CompletedProcess[str]:
    """Run cachehub as uid UIDS[name] (no /etc/passwd entry needed), in its own home."""
    group_args = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEHUB_")}
    home = base / f"home-{name}"
    env.update(HOME=str(home), USER=name, LOGNAME=name, CACHEHUB_HOME=str(home), CACHEHUB_LAKE=str(base / "lake"), CACHEHUB_SITE="team")
    uid = UIDS[name]
    argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", *group_args, sys.executable, "-m", "cachehub.cli.main", *args]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=base)
    if ok and result.returncode != 0:
        raise AssertionError(f"{name}: cachehub {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


def _readable_tree(base: Path, n: int) -> Path:
    src = random_tree(base / "src", n)
    for path in [src, *src.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return src


def _owned_by(base: Path, name: str, *dirs: str) -> None:
    for d in dirs:
        (base / d).mkdir()
        os.chown(base / d, UIDS[name], UIDS[name])


@NEEDS_ROOT
def test_a_user_who_is_not_root_caches_and_evicts(world: Path) -> None:
    """Publishing and evicting move a tree to another directory: that needs write permission on
    the tree's top, which root never lacks and every other user must keep."""
    _owned_by(world, "dan", "nfs", "lake")
    src = _readable_tree(world, 6)
    as_user(world, "dan", "site", "add", "team", "--root", str(world / "nfs" / "cachehub"), "--grace", "0")
    as_user(world, "dan", "push", str(src), "ds")
    result = json.loads(as_user(world, "dan", "cache", "ds", "--json").stdout)
    top = Path(result["path"])
    assert tree_digest(top) == tree_digest(src)
    assert all(p.stat().st_mode & 0o222 == 0 for p in top.rglob("*"))  # files and subdirectories read-only
    as_user(world, "dan", "evict", "ds")
    assert not top.exists() and not any((world / "nfs" / "cachehub" / "trash").iterdir())


@NEEDS_ROOT
def test_a_team_of_unix_users_shares_one_site(world: Path) -> None:
    """ann lays the site out for group `users`; bob (in the group) leases, evicts ann's tree and
    caches; eve (not in it) gets a clear permission error. Real uids, no /etc/passwd entries."""
    import grp

    gid = grp.getgrnam("users").gr_gid
    team = (gid,)
    _owned_by(world, "ann", "nfs", "lake")  # ann lays the site out and publishes
    src = _readable_tree(world, 8)
    root = world / "nfs" / "cachehub"
    as_user(world, "ann", "site", "add", "team", "--root", str(root), "--group", "users", "--grace", "0", groups=team)
    assert root.stat().st_gid == gid and root.stat().st_mode & 0o2070 == 0o2070  # group-writable, setgid
    commit = json.loads(as_user(world, "ann", "push", str(src), "ds", "--json", groups=team).stdout)["commit"]
    first = json.loads(as_user(world, "ann", "cache", "ds", "--json", groups=team).stdout)
    assert Path(first["path"]).stat().st_uid == UIDS["ann"]
    as_user(world, "bob", "site", "add", "team", "--root", str(root), groups=team)
    assert as_user(world, "bob", "path", "ds", groups=team).stdout.strip() == first["path"]  # bob's use of ann's tree
    run = as_user(world, "bob", "run", "--use", "ds", "--", "true", groups=team)  # a lease by bob, released at the end
    assert run.returncode == 0 and not any((root / "leases").rglob("*.json"))
    as_user(world, "bob", "evict", "ds", groups=team)  # removes the tree ann published
    assert not (root / "commits" / commit).exists() and not any((root / "trash").iterdir())
    again = json.loads(as_user(world, "bob", "cache", "ds", "--json", groups=team).stdout)
    assert tree_digest(Path(again["path"])) == tree_digest(src) and Path(again["path"]).stat().st_uid == UIDS["bob"]
    as_user(world, "eve", "site", "add", "team", "--root", str(root))  # she can see it...
    denied = as_user(world, "eve", "cache", "ds", ok=False)  # ...but not use it
    assert denied.returncode == 18, denied.stderr
    assert "group users" in denied.stderr and "Traceback" not in denied.stderr


# -- offline resolution ----------------------------------------------------------------------
def test_a_pod_without_the_lake_resolves_tags_from_the_site(hosts: tuple[Host, Host], tmp_path: Path, site_root: Path) -> None:
    a, _ = hosts
    src = random_tree(tmp_path / "src", 5)
    a.run("push", str(src), "xray", "--tag", "v1")
    path = a.run("cache", "xray@v1").stdout.strip()
    # a pod: an empty home, an S3 lake it has no credentials for, the site mounted
    pod = Host("pod-1", tmp_path, tmp_path / "unused")
    pod.env = {k: v for k, v in pod.env.items() if not k.startswith("AWS_")}
    pod.env.update(
        CACHEHUB_LAKE="s3://cachehub-test/lake", CACHEHUB_ENDPOINT_URL="http://127.0.0.1:9",
        AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )  # fmt: skip
    pod.run("site", "add", "team", "--root", str(site_root))
    assert "no AWS credentials" in pod.run("datasets", ok=False).stderr  # the lake is out of reach indeed
    for ref in ("xray@v1", "xray@latest", "xray"):
        assert pod.run("path", ref).stdout.strip() == path, ref
        assert pod.run("path", ref, CACHEHUB_OFFLINE="1").stdout.strip() == path, ref
    missing = pod.run("path", "xray@v2", ok=False, CACHEHUB_OFFLINE="1")
    assert missing.returncode == 5 and "CACHEHUB_OFFLINE=1" in missing.stderr
    offline_push = a.run("push", str(src), "xray", ok=False, CACHEHUB_OFFLINE="1")
    assert offline_push.returncode == 11 and "never contacted offline" in offline_push.stderr


def test_online_a_tag_is_never_staler_than_the_bound(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    a, b = hosts
    a.run("push", str(random_tree(tmp_path / "v1", 3, seed=1)), "ds", "--tag", "prod")
    v1 = b.run("cache", "ds@prod").stdout.strip()
    assert b.run("path", "ds@prod").stdout.strip() == v1  # host-b's catalog now knows prod
    a.run("push", str(random_tree(tmp_path / "v2", 3, seed=2)), "ds", "--tag", "prod", "--force")  # moved on host-a
    v2 = a.run("cache", "ds@prod").stdout.strip()
    assert v2 != v1
    # within the bound host-b may answer from its catalog; with a bound of 0 it must read the lake
    assert b.run("path", "ds@prod", CACHEHUB_MAX_STALENESS="0").stdout.strip() == v2


# -- the audit trail, shipped by the CLI and the daemon of one home at once -------------------
def test_two_shippers_of_one_catalog_raise_no_false_tamper_alarm(tmp_path: Path, handshake: Path) -> None:
    host = Host("host-a", tmp_path, tmp_path / "lake")
    host.run("push", str(random_tree(tmp_path / "src", 2)), "ds")  # ships its events
    host.run("tag", "ds", "v1")  # more events, shipped too
    shipper = host.start("audit", "push", pause=("audit.ship.before-write", handshake))  # the daemon, say
    other = host.run("audit", "push")  # the CLI, meanwhile
    assert other.returncode == 0 and "diverged" not in other.stderr
    code, out, err = _go(shipper, "audit.ship.before-write", handshake)
    assert code == 0 and "diverged" not in err, err
    verified = host.run("audit", "verify")
    assert "intact" in verified.stdout


def test_a_batch_shipped_before_a_crash_is_recognised(tmp_path: Path) -> None:
    from cachehub import audit
    from cachehub.config import load_settings
    from cachehub.context import Context

    host = Host("host-a", tmp_path, tmp_path / "lake")
    host.run("init", CACHEHUB_SITE="local")
    with Context(load_settings(host.home, lake=str(tmp_path / "lake"))) as ctx:
        ctx.events.audit("tag", dataset="ds", ref="v1")
        pending = ctx.catalog.unshipped_events(ctx.catalog.origin)
        ctx.lake.write_audit_batch(ctx.catalog.origin, pending)  # written, then the process died
        assert audit.ship(ctx) == len(pending)  # recognised as shipped, no alarm
        assert ctx.catalog.unshipped_events(ctx.catalog.origin) == []
        assert audit.verify(ctx) == []


# -- init ------------------------------------------------------------------------------------
def test_init_saves_every_setting_it_used(tmp_path: Path) -> None:
    host = Host("host-a", tmp_path, tmp_path / "lake")
    # the endpoint from the environment is saved with the lake it was used to reach
    out = host.run("init", "--json", CACHEHUB_ENDPOINT_URL="http://127.0.0.1:9/", CACHEHUB_SITE="local")
    assert json.loads(out.stdout)["lake"] == str(tmp_path / "lake")
    config = (host.home / "config.toml").read_text()
    assert 'endpoint_url = "http://127.0.0.1:9/"' in config and f'url = "{tmp_path / "lake"}"' in config
